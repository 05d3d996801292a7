//! Pod networking through CRI (issue 11): a private containerd whose pods
//! get a dual-stack bridge network from Debian's CNI plugins (`bridge`,
//! `host-local`), and the `clh` handler wiring each pod's interfaces into
//! its VM.
//!
//! - `a_clh_pod_serves_http_to_the_host_over_ipv4_and_ipv6`: the container
//!   sees the CNI-assigned addresses, MTU and default route, its
//!   resolv.conf is the PodSandboxConfig's, and an HTTP server in it
//!   answers the host on both pod addresses.
//! - `a_clh_pod_and_a_runc_pod_reach_each_other`: pod-to-pod across the
//!   bridge, both ways, between a VM pod and a runc pod.
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
use clh_tests::cri::{ContainerBuilder, ContainerState, CriSetup, Kubelet, Pod, BUSYBOX};
use clh_tests::ctr;

const AGENT_TIMEOUT_MS: u64 = 120_000;
const PAGE: &str = "hello-from-the-pod";

fn setup() -> (ctr::Setup, CriSetup) {
    let s = ctr::setup().expect("shim setup");
    let shim_dir = ctr::shim_dir().expect("building the shim");
    let images = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let cri = ctr::cri_setup(&s, shim_dir, images, AGENT_TIMEOUT_MS).expect("CRI setup");
    (s, cri)
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

/// GET / from the host, retried until the server answers or `within`
/// passes (it may not listen yet).
fn http_get(ip: IpAddr, within: Duration) -> Result<String> {
    let addr = SocketAddr::new(ip, 80);
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
    let run = || -> Result<()> {
        let mut k = Kubelet::start(&cri)?;
        k.use_bridge_network()?;
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
        k.remove_pod(&pod)?;
        no_taps_on_the_host()?;
        k.finish()
    };
    run().unwrap();
}

#[test]
fn a_clh_pod_and_a_runc_pod_reach_each_other() {
    let (_s, cri) = setup();
    let run = || -> Result<()> {
        let mut k = Kubelet::start(&cri)?;
        k.use_bridge_network()?;
        let vm_pod = k.run_pod(&k.pod("vm"))?;
        let (runc_pod, _) = k.run_pod_as(&k.pod("plain"), "runc")?;
        let mut servers = Vec::new();
        for pod in [&vm_pod, &runc_pod] {
            let id = k.run_container(pod, &web_server())?;
            k.cri()
                .wait_container_state(&id, ContainerState::ContainerRunning, k.timeout())?;
            servers.push((id, pod_ips(&k, pod)?.0));
        }
        let [(vm_ctr, vm_ip), (runc_ctr, runc_ip)] = servers.as_slice() else {
            bail!("two servers expected");
        };
        for (from, to) in [(vm_ctr, runc_ip), (runc_ctr, vm_ip)] {
            // Retried in the shell: the other server may not listen yet.
            let script = format!(
                "for i in $(seq 50); do \
                   printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {to} 80 && exit 0; sleep 0.2; \
                 done; exit 1"
            );
            let reply = k.sh(from, &script)?;
            ensure!(reply.contains(PAGE), "{from} → {to}: {reply}");
        }
        k.remove_pod(&vm_pod)?;
        k.remove_pod(&runc_pod)?;
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
        k.use_bridge_network()?;
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
