//! Pod networking through CRI (issue 11): a private containerd whose pods
//! get a dual-stack bridge network from Debian's CNI plugins (`bridge`,
//! `host-local`), and the `clh` handler wiring each pod's interfaces into
//! its VM.
//!
//! - `a_clh_pod_serves_http_to_the_host_over_ipv4_and_ipv6`: the container
//!   sees the CNI-assigned addresses, MTU and default route, its
//!   resolv.conf is the PodSandboxConfig's, and an HTTP server in it
//!   answers the host on both pod addresses.
//! - `clh_pods_and_a_runc_pod_reach_each_other`: pod-to-pod across the
//!   bridge: VM pod to VM pod, and both ways between a VM pod and a runc
//!   pod.
//! - `a_pod_on_two_networks_gets_both_interfaces`: a pod attached to two
//!   CNI networks (eth0, eth1: containerd's `max_conf_num`) has both in its
//!   VM and answers on each; its VM has two vCPUs, and each NIC a queue
//!   pair per vCPU.
//! - `port_forward_reaches_servers_on_every_address_and_on_the_loopback`:
//!   CRI PortForward (what `kubectl port-forward` uses) carries HTTP to a
//!   server on 0.0.0.0 and to one on the guest's 127.0.0.1, two at once;
//!   on containerd 2.1 and 1.6.
//! - `a_host_port_reaches_the_pod`: hostPort 8080 → 80 (CNI `portmap`)
//!   answers on the host's address.
//! - `a_killed_shim_leaves_no_network_behind`: after a SIGKILL of the
//!   pod's shim, containerd's `delete` and the pod's removal leave nothing
//!   (VM processes, taps, state).
//! - `a_host_network_pod_is_refused_and_leaves_nothing`: hostNetwork is
//!   refused at RunPodSandbox with an error saying why.
//!
//! After each: no tap on the host, and Kubelet::finish's leak checks
//! (netns, processes, mounts, cgroups, state). Run one at a time.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clh_tests::containerd::{BRIDGE_GATEWAY_V4, BRIDGE_SUBNET_V4};
use clh_tests::cri::{
    ContainerBuilder, ContainerState, CriSetup, Kubelet, Pod, Resources, BUSYBOX,
};
use clh_tests::ctr;

const AGENT_TIMEOUT_MS: u64 = 120_000;
const PAGE: &str = "hello-from-the-pod";

fn setup() -> (ctr::Setup, CriSetup) {
    let s = ctr::setup().expect("shim setup");
    let images = Path::new(env!("CARGO_TARGET_TMPDIR"));
    ctr::cri_test_setup(s, images, AGENT_TIMEOUT_MS)
}

/// A busybox httpd serving [`PAGE`] on port 80 (all addresses).
fn web_server() -> ContainerBuilder {
    let script =
        format!("mkdir -p /www && echo {PAGE} > /www/index.html && exec httpd -f -p 80 -h /www");
    ContainerBuilder::new("web", BUSYBOX).command(&["sh", "-c", &script])
}

/// The pod's IPv4 and IPv6 addresses as CRI reports them.
fn pod_ips(k: &Kubelet, pod: &Pod) -> Result<(IpAddr, IpAddr)> {
    let status = k.cri().pod_sandbox_status(&pod.id)?;
    let net = status.network.context("no network in the pod's status")?;
    let mut ips: Vec<IpAddr> = std::iter::once(net.ip)
        .chain(net.additional_ips.into_iter().map(|i| i.ip))
        .map(|ip| ip.parse().with_context(|| format!("pod IP {ip:?}")))
        .collect::<Result<_>>()?;
    ips.sort_by_key(IpAddr::is_ipv6);
    match ips.as_slice() {
        [v4 @ IpAddr::V4(_), v6 @ IpAddr::V6(_)] => Ok((*v4, *v6)),
        other => bail!("expected one IPv4 and one IPv6 pod address, got {other:?}"),
    }
}

/// The hostPort of `a_host_port_reaches_the_pod`.
const HOST_PORT: i32 = 8080;

fn http_get(ip: IpAddr, within: Duration) -> Result<String> {
    http_get_port(ip, 80, within)
}

/// GET / from the host, retried until the server answers or `within`
/// passes (it may not listen yet).
fn http_get_port(ip: IpAddr, port: i32, within: Duration) -> Result<String> {
    let addr = SocketAddr::new(ip, u16::try_from(port)?);
    let deadline = Instant::now() + within;
    loop {
        let attempt = (|| -> Result<String> {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
            let mut reply = String::new();
            s.read_to_string(&mut reply)?;
            Ok(reply)
        })();
        match attempt {
            Ok(reply) if reply.contains(PAGE) => return Ok(reply),
            Ok(reply) if Instant::now() >= deadline => bail!("{addr} answered {reply:?}"),
            Err(e) if Instant::now() >= deadline => return Err(e.context(format!("GET {addr}"))),
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// No tap of ours is left on the host (they live in pod namespaces).
fn no_taps_on_the_host() -> Result<()> {
    let taps: Vec<String> = std::fs::read_dir("/sys/class/net")?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with("_clh"))
        .collect();
    ensure!(taps.is_empty(), "taps on the host: {taps:?}");
    Ok(())
}

#[test]
fn a_clh_pod_serves_http_to_the_host_over_ipv4_and_ipv6() {
    let (_s, cri) = setup();
    serves_http_over_ipv4_and_ipv6(&cri).unwrap();
}

/// The same pod with its VM restored from a template (`[runtime]
/// templates`): its NIC is hot-plugged after the restore, and everything
/// above holds. The pod's QEMU names `-incoming` on its command line.
#[test]
fn a_pod_restored_from_a_template_gets_its_network() {
    let s = ctr::setup().expect("shim setup");
    let _templates = clh_tests::templates::enable(&s).unwrap();
    let state_dir = s.state_dir.clone();
    let images = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let (_s, cri) = ctr::cri_test_setup(s, images, AGENT_TIMEOUT_MS);
    serves_http_over_ipv4_and_ipv6_then(&cri, || {
        ensure!(
            !clh_tests::templates::restored_vms(&state_dir).is_empty(),
            "the pod's QEMU was not restored from a template"
        );
        Ok(())
    })
    .unwrap();
}

fn serves_http_over_ipv4_and_ipv6(cri: &CriSetup) -> Result<()> {
    serves_http_over_ipv4_and_ipv6_then(cri, || Ok(()))
}

/// A pod on one bridge network with a web server: its addresses, MTU,
/// routes, DNS and hostname in the container, and HTTP from the host over
/// both families; `also` runs while the pod does.
fn serves_http_over_ipv4_and_ipv6_then(
    cri: &CriSetup,
    also: impl FnOnce() -> Result<()>,
) -> Result<()> {
    let run = || -> Result<()> {
        let mut k = Kubelet::start(cri)?;
        k.use_bridge_networks(1)?;
        let config = k
            .pod("web")
            .dns(&["10.123.0.53"], &["svc.example"], &["ndots:2"]);
        let pod = k.run_pod(&config)?;
        let (v4, v6) = pod_ips(&k, &pod)?;
        let id = k.run_container(&pod, &web_server())?;
        k.cri()
            .wait_container_state(&id, ContainerState::ContainerRunning, k.timeout())?;

        let addrs = k.sh(&id, "ip -o addr show")?;
        for ip in [v4, v6] {
            ensure!(addrs.contains(&format!(" {ip}/")), "{ip} not in: {addrs}");
        }
        let link = k.sh(&id, "ip -o link show eth0")?;
        ensure!(link.contains("mtu 1500"), "eth0: {link}");
        let routes = k.sh(&id, "ip route")?;
        ensure!(
            routes.contains(&format!("default via {BRIDGE_GATEWAY_V4}")),
            "routes: {routes}"
        );
        let subnet = BRIDGE_SUBNET_V4.trim_end_matches("/24");
        ensure!(routes.contains(subnet), "routes: {routes}");
        let resolv = k.sh(&id, "cat /etc/resolv.conf")?;
        for line in [
            "nameserver 10.123.0.53",
            "search svc.example",
            "options ndots:2",
        ] {
            ensure!(resolv.contains(line), "resolv.conf: {resolv}");
        }
        ensure!(k.sh(&id, "hostname")?.trim() == "web", "hostname");

        for ip in [v4, v6] {
            http_get(ip, k.timeout())?;
        }
        also()?;
        k.remove_pod(&pod)?;
        no_taps_on_the_host()?;
        k.finish()
    };
    run()
}

#[test]
fn clh_pods_and_a_runc_pod_reach_each_other() {
    let (_s, cri) = setup();
    let run = || -> Result<()> {
        let mut k = Kubelet::start(&cri)?;
        k.use_bridge_networks(1)?;
        let vm_a = k.run_pod(&k.pod("vma"))?;
        let vm_b = k.run_pod(&k.pod("vmb"))?;
        let (plain, _) = k.run_pod_as(&k.pod("plain"), "runc")?;
        let mut servers = Vec::new();
        for pod in [&vm_a, &vm_b, &plain] {
            let id = k.run_container(pod, &web_server())?;
            k.cri()
                .wait_container_state(&id, ContainerState::ContainerRunning, k.timeout())?;
            servers.push((id, pod_ips(&k, pod)?.0));
        }
        let [(a, a_ip), (_, b_ip), (runc, runc_ip)] = servers.as_slice() else {
            bail!("three servers expected");
        };
        // VM pod to VM pod, VM pod to runc pod, runc pod to VM pod.
        for (from, to) in [(a, b_ip), (a, runc_ip), (runc, a_ip)] {
            // Retried in the shell: the other server may not listen yet.
            let script = format!(
                "for i in $(seq 50); do \
                   printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {to} 80 && exit 0; sleep 0.2; \
                 done; exit 1"
            );
            let reply = k.sh(from, &script)?;
            ensure!(reply.contains(PAGE), "{from} → {to}: {reply}");
        }
        for pod in [&vm_a, &vm_b, &plain] {
            k.remove_pod(pod)?;
        }
        no_taps_on_the_host()?;
        k.finish()
    };
    run().unwrap();
}

/// The IPv4 address of `ifname` in `ip -o addr` output.
fn ipv4_of(addrs: &str, ifname: &str) -> Result<IpAddr> {
    addrs
        .lines()
        .filter(|l| l.split_whitespace().nth(1) == Some(ifname))
        .find_map(|l| {
            let mut words = l.split_whitespace();
            words.find(|w| *w == "inet")?;
            words.next()?.split('/').next()?.parse().ok()
        })
        .with_context(|| format!("no IPv4 address on {ifname} in: {addrs}"))
}

#[test]
fn a_pod_on_two_networks_gets_both_interfaces() {
    let (_s, cri) = setup();
    let run = || -> Result<()> {
        let mut k = Kubelet::start(&cri)?;
        k.use_bridge_networks(2)?;
        // A CPU limit of 2 makes a VM of two vCPUs: multi-queue NICs.
        let two_cpus = Resources {
            memory_limit_bytes: 256 << 20,
            cpu_quota: 200_000,
            cpu_period: 100_000,
            cpu_shares: 1024,
        };
        let pod = k.run_pod(&k.pod("multi").resources(two_cpus))?;
        let id = k.run_container(&pod, &web_server())?;
        k.cri()
            .wait_container_state(&id, ContainerState::ContainerRunning, k.timeout())?;
        let addrs = k.sh(&id, "ip -o addr show")?;
        let eth0 = ipv4_of(&addrs, "eth0")?;
        let eth1 = ipv4_of(&addrs, "eth1")?;
        ensure!(eth0.to_string().starts_with("10.123.0."), "eth0: {eth0}");
        ensure!(eth1.to_string().starts_with("10.123.1."), "eth1: {eth1}");
        ensure!(addrs.contains("fd12:3456:1:"), "no IPv6 on eth1: {addrs}");
        let vcpus: usize = k.sh(&id, "nproc")?.trim().parse()?;
        ensure!(vcpus > 1, "the pod's VM has {vcpus} vCPU");
        let queues = k.sh(&id, "ls /sys/class/net/eth0/queues")?;
        let rx = queues
            .split_whitespace()
            .filter(|q| q.starts_with("rx-"))
            .count();
        ensure!(rx == vcpus, "eth0 has {rx} RX queues for {vcpus} vCPUs");
        for ip in [eth0, eth1] {
            http_get(ip, k.timeout())?;
        }
        k.remove_pod(&pod)?;
        no_taps_on_the_host()?;
        k.finish()
    };
    run().unwrap();
}

/// A busybox httpd serving [`PAGE`] on the guest's 127.0.0.1:8081 only.
fn loopback_server() -> ContainerBuilder {
    let script = format!(
        "mkdir -p /www && echo {PAGE} > /www/index.html && exec httpd -f -p 127.0.0.1:8081 -h /www"
    );
    ContainerBuilder::new("local", BUSYBOX).command(&["sh", "-c", &script])
}

#[test]
fn port_forward_reaches_servers_on_every_address_and_on_the_loopback() {
    let (_s, cri) = setup();
    port_forward(&cri).unwrap();
}

/// The same on containerd 1.6 (bookworm's), whose CRI dials the same way.
#[test]
fn port_forward_on_containerd_1_6() {
    let (_s, mut cri) = setup();
    cri.version = clh_tests::containerd::ContainerdVersion::V1_6;
    port_forward(&cri).unwrap();
}

fn port_forward(cri: &CriSetup) -> Result<()> {
    let run = || -> Result<()> {
        let mut k = Kubelet::start(cri)?;
        k.use_bridge_networks(1)?;
        let pod = k.run_pod(&k.pod("fwd"))?;
        for c in [web_server(), loopback_server()] {
            let id = k.run_container(&pod, &c)?;
            k.cri()
                .wait_container_state(&id, ContainerState::ContainerRunning, k.timeout())?;
        }
        let request = b"GET / HTTP/1.0\r\n\r\n";
        // Retried: the servers may not listen yet.
        let deadline = Instant::now() + k.timeout();
        for port in [80, 8081] {
            loop {
                let url = k.cri().port_forward_url(&pod.id, port)?;
                match k
                    .cri()
                    .forward(&url, port, request, PAGE, Duration::from_secs(30))
                {
                    Ok(reply) if reply.contains(PAGE) => break,
                    other if Instant::now() >= deadline => bail!("port {port}: {other:?}"),
                    _ => std::thread::sleep(Duration::from_millis(200)),
                }
            }
        }
        // Two forwards at once.
        let urls = [
            k.cri().port_forward_url(&pod.id, 80)?,
            k.cri().port_forward_url(&pod.id, 8081)?,
        ];
        let (cri, timeout) = (k.cri(), k.timeout());
        let replies: Vec<Result<String>> = std::thread::scope(|scope| {
            let handles: Vec<_> = urls
                .iter()
                .zip([80, 8081])
                .map(|(url, port)| {
                    scope.spawn(move || cri.forward(url, port, request, PAGE, timeout))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| bail!("forward thread panicked"))
                })
                .collect()
        });
        for reply in replies {
            let reply = reply?;
            ensure!(reply.contains(PAGE), "{reply}");
        }
        k.remove_pod(&pod)?;
        no_taps_on_the_host()?;
        k.finish()
    };
    run()
}

#[test]
fn a_host_port_reaches_the_pod() {
    let (_s, cri) = setup();
    let run = || -> Result<()> {
        let mut k = Kubelet::start(&cri)?;
        k.use_bridge_networks(1)?;
        let pod = k.run_pod(&k.pod("hostport").host_port(HOST_PORT, 80))?;
        let id = k.run_container(&pod, &web_server())?;
        k.cri()
            .wait_container_state(&id, ContainerState::ContainerRunning, k.timeout())?;
        // The bridge's address is the host's own: portmap's DNAT of
        // locally generated traffic takes it to the pod.
        let host: IpAddr = BRIDGE_GATEWAY_V4.parse()?;
        http_get_port(host, HOST_PORT, k.timeout())?;
        k.remove_pod(&pod)?;
        no_taps_on_the_host()?;
        // portmap's per-pod chains (CNI-DN-…) go with the pod.
        let nat = std::process::Command::new("iptables")
            .args(["-t", "nat", "-S"])
            .output()?;
        let rules = String::from_utf8_lossy(&nat.stdout);
        let left: Vec<&str> = rules.lines().filter(|l| l.contains("CNI-DN-")).collect();
        ensure!(left.is_empty(), "hostPort rules left: {left:?}");
        k.finish()
    };
    run().unwrap();
}

#[test]
fn a_killed_shim_leaves_no_network_behind() {
    let (_s, cri) = setup();
    let run = || -> Result<()> {
        let mut k = Kubelet::start(&cri)?;
        k.use_bridge_networks(1)?;
        let pod = k.run_pod(&k.pod("crash"))?;
        let id = k.run_container(&pod, &web_server())?;
        k.cri()
            .wait_container_state(&id, ContainerState::ContainerRunning, k.timeout())?;
        let (v4, _) = pod_ips(&k, &pod)?;
        http_get(v4, k.timeout())?;
        let shims = k.containerd().shim_pids();
        ensure!(!shims.is_empty(), "no shim found");
        for pid in shims {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            )?;
        }
        // containerd notices the dead shim, runs its `delete` and reports
        // the container exited; a kubelet then removes the pod.
        k.cri()
            .wait_container_state(&id, ContainerState::ContainerExited, k.timeout())?;
        k.remove_pod(&pod)?;
        no_taps_on_the_host()?;
        k.finish()
    };
    run().unwrap();
}

#[test]
fn a_host_network_pod_is_refused_and_leaves_nothing() {
    let (_s, cri) = setup();
    let run = || -> Result<()> {
        let mut k = Kubelet::start(&cri)?;
        k.use_bridge_networks(1)?;
        let Err(err) = k.run_pod(&k.pod("hostnet").host_network()) else {
            bail!("a hostNetwork pod was accepted");
        };
        let msg = format!("{err:#}");
        ensure!(msg.contains("hostNetwork"), "{msg}");
        ensure!(msg.contains("runc RuntimeClass"), "{msg}");
        no_taps_on_the_host()?;
        k.finish()
    };
    run().unwrap();
}
