//! `make bench` (net): pod networking, handler `clh` beside `runc` on the
//! same bridge (one private containerd 2.1, the test bridge network of
//! tests/src/containerd/cri.rs), in one run.
//!
//! - pod start with networking: RunPodSandbox sent → container RUNNING,
//!   p50 and p95 over a few pods per handler, rounds alternating.
//! - host → pod TCP throughput: the bench writes 16 MiB to a discarding
//!   `nc -l` in the pod, from connect to the server's close.
//! - pod → pod TCP throughput: an exec in a client pod fetches 8 MiB, then
//!   64 MiB, over HTTP (busybox wget, by IP) from a server pod of the same
//!   handler; the difference of the sizes over the difference of the two
//!   times (which cancels the exec's own cost).
//! - request round trip: sequential HTTP GETs from the host to a busybox
//!   httpd in the pod, each on a new connection; the median.
//!
//! Absolute clh figures are QEMU TCG's on this host; the ratio to runc is
//! the figure to track.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clh_tests::cri::{ContainerBuilder, ContainerState, Kubelet, Pod, BUSYBOX};
use clh_tests::ctr;

const HANDLERS: [&str; 2] = ["clh", "runc"];
const START_PODS: usize = 4;
const BULK: usize = 16 << 20;
/// The files a client pod fetches from the server pod (pod → pod).
const SMALL: usize = 8 << 20;
const LARGE: usize = 64 << 20;
const ROUND_TRIPS: usize = 30;
const AGENT_TIMEOUT_MS: u64 = 120_000;
const SINK_PORT: u16 = 5001;

fn main() -> Result<()> {
    let s = ctr::setup()?;
    let images = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let setup = ctr::cri_setup(&s, ctr::release_shim_dir()?, images, AGENT_TIMEOUT_MS)?;
    let mut k = Kubelet::start(&setup)?;
    k.use_bridge_networks(1)?;
    println!(
        "network benchmark: dual-stack CNI bridge, clh (QEMU TCG, 1 vCPU) beside runc; \
         {START_PODS} starts, {} MiB bulk, {ROUND_TRIPS} round trips per handler",
        BULK >> 20
    );
    let mut starts = [Vec::new(), Vec::new()];
    for round in 0..START_PODS {
        for h in order(round) {
            let (pod, took) = start(
                &k,
                HANDLERS[h],
                &format!("s{h}x{round}"),
                ContainerBuilder::sleeper("sleeper"),
            )?;
            starts[h].push(took);
            k.remove_pod(&pod)?;
        }
    }
    let mut rows = Vec::new();
    for (h, handler) in HANDLERS.iter().enumerate() {
        rows.push((handler, measure(&k, handler, h)?));
    }
    for (h, handler) in HANDLERS.iter().enumerate() {
        let mut s = starts[h].clone();
        s.sort();
        println!(
            "{handler:>5}: pod start with networking p50 {:>7.0} ms  p95 {:>7.0} ms",
            ms(percentile(&s, 0.50)),
            ms(percentile(&s, 0.95))
        );
    }
    for (handler, m) in &rows {
        println!(
            "{handler:>5}: host→pod {:>7.1} MB/s  pod→pod {:>7.1} MB/s  round trip p50 {:>6.2} ms",
            m.host_to_pod, m.pod_to_pod, m.round_trip_ms
        );
    }
    let (clh, runc) = (&rows[0].1, &rows[1].1);
    println!(
        "clh/runc: host→pod {:.2}x  pod→pod {:.2}x  round trip {:.1}x",
        clh.host_to_pod / runc.host_to_pod,
        clh.pod_to_pod / runc.pod_to_pod,
        clh.round_trip_ms / runc.round_trip_ms
    );
    k.finish()
}

fn order(round: usize) -> [usize; 2] {
    if round % 2 == 0 {
        [0, 1]
    } else {
        [1, 0]
    }
}

/// A discarding sink on [`SINK_PORT`] (one connection at a time) and an
/// httpd on 80.
fn servers() -> ContainerBuilder {
    let script = format!(
        "mkdir -p /www && echo ok > /www/index.html && \
         dd if=/dev/zero of=/www/small bs=65536 count={} 2>/dev/null && \
         dd if=/dev/zero of=/www/large bs=65536 count={} 2>/dev/null && \
         httpd -p 80 -h /www && \
         while true; do nc -l -p {SINK_PORT} > /dev/null; done",
        SMALL / 65536,
        LARGE / 65536
    );
    ContainerBuilder::new("servers", BUSYBOX).command(&["sh", "-c", &script])
}

/// Runs pod `name` with `c` through `handler`: the pod, its container id
/// and the time from RunPodSandbox to RUNNING.
fn start(k: &Kubelet, handler: &str, name: &str, c: ContainerBuilder) -> Result<(Pod, Duration)> {
    let (pod, sent) = k.run_pod_as(&k.pod(name), handler)?;
    let id = k.run_container(&pod, &c)?;
    k.cri()
        .wait_container_state(&id, ContainerState::ContainerRunning, k.timeout())?;
    Ok((pod, sent.elapsed()))
}

fn pod_ipv4(k: &Kubelet, pod: &Pod) -> Result<IpAddr> {
    let status = k.cri().pod_sandbox_status(&pod.id)?;
    let ip = status.network.context("no pod network")?.ip;
    ip.parse().with_context(|| format!("pod IP {ip:?}"))
}

struct Figures {
    host_to_pod: f64,
    pod_to_pod: f64,
    round_trip_ms: f64,
}

fn measure(k: &Kubelet, handler: &str, h: usize) -> Result<Figures> {
    let (server, _) = start(k, handler, &format!("srv{h}"), servers())?;
    let (client, _) = start(
        k,
        handler,
        &format!("cli{h}"),
        ContainerBuilder::sleeper("sleeper"),
    )?;
    let ip = pod_ipv4(k, &server)?;
    let result = (|| -> Result<Figures> {
        let host_to_pod = host_bulk(ip, k.timeout())?;
        let client_ctr = k
            .cri()
            .list_containers(Some(&client.id))?
            .first()
            .map(|c| c.id.clone())
            .context("the client pod has no container")?;
        // Two sizes: their difference cancels the exec's own cost.
        let small = timed_fetch(k, &client_ctr, ip, "small")?;
        let large = timed_fetch(k, &client_ctr, ip, "large")?;
        let pod_to_pod = match large.checked_sub(small) {
            Some(d) if !d.is_zero() => (LARGE - SMALL) as f64 / 1e6 / d.as_secs_f64(),
            _ => f64::NAN,
        };
        let mut trips = Vec::new();
        for _ in 0..ROUND_TRIPS {
            trips.push(http_round_trip(ip)?);
        }
        trips.sort();
        Ok(Figures {
            host_to_pod,
            pod_to_pod,
            round_trip_ms: ms(percentile(&trips, 0.5)),
        })
    })();
    k.remove_pod(&client)?;
    k.remove_pod(&server)?;
    result.with_context(|| format!("{handler} pods"))
}

/// Connects to `ip:port`, retrying while nothing listens (the sink's
/// `nc -l` listens again only after its last connection ended).
fn connect(ip: IpAddr, port: u16, within: Duration) -> Result<TcpStream> {
    let deadline = Instant::now() + within;
    let addr = SocketAddr::new(ip, port);
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => return Err(e).context(format!("{addr}")),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Writes [`BULK`] bytes and waits for the sink to close: MB/s.
fn host_bulk(ip: IpAddr, within: Duration) -> Result<f64> {
    let chunk = vec![0u8; 65536];
    let mut s = connect(ip, SINK_PORT, within)?;
    let began = Instant::now();
    s.set_write_timeout(Some(Duration::from_secs(60)))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    for _ in 0..BULK / chunk.len() {
        s.write_all(&chunk)?;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)?;
    Ok(mb_per_s(began.elapsed()))
}

/// Times an exec in `id` that fetches `/<file>` from the httpd at `ip`.
fn timed_fetch(k: &Kubelet, id: &str, ip: IpAddr, file: &str) -> Result<Duration> {
    timed_sh(k, id, &format!("wget -q -O /dev/null http://{ip}/{file}"))
}

fn timed_sh(k: &Kubelet, id: &str, script: &str) -> Result<Duration> {
    let began = Instant::now();
    let r = k
        .cri()
        .exec_sync(id, &["sh", "-c", script], Duration::from_secs(120))?;
    if r.exit_code != 0 {
        bail!("{script:?}: {r:?}");
    }
    Ok(began.elapsed())
}

fn http_round_trip(ip: IpAddr) -> Result<Duration> {
    let began = Instant::now();
    let mut s = connect(ip, 80, Duration::from_secs(60))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    let mut reply = Vec::new();
    s.read_to_end(&mut reply)?;
    ensure!(reply.starts_with(b"HTTP/1"), "reply: {reply:?}");
    Ok(began.elapsed())
}

fn mb_per_s(d: Duration) -> f64 {
    BULK as f64 / 1e6 / d.as_secs_f64().max(1e-9)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}
