//! A pod's own metrics (`<state_dir>/<id>/metrics.sock`, Prometheus text
//! over HTTP on a Unix socket), as the benchmarks read them, and the one
//! `GET /metrics` the monitor's test uses too.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};

const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// `GET /metrics` on a pod's metrics socket: the body.
pub fn scrape(socket: &Path) -> Result<String> {
    let stream =
        UnixStream::connect(socket).with_context(|| format!("connecting {}", socket.display()))?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    get_metrics(stream).map(|(_, body)| body)
}

/// `GET /metrics` over `stream` (a pod's socket, or the monitor's TCP
/// port), with its read and write deadlines already set: the response's
/// head and body, failing on anything but 200.
pub fn get_metrics(mut stream: impl Read + Write) -> Result<(String, String)> {
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: metrics\r\nConnection: close\r\n\r\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let (head, body) = answer.split_once("\r\n\r\n").context("not HTTP")?;
    ensure!(head.starts_with("HTTP/1.1 200 "), "{head}");
    Ok((head.to_string(), body.to_string()))
}

/// The steps of the pod VM's start, in the order served, with how long
/// each took (`clh_pod_start_step_seconds{step=...}`).
pub fn start_steps(socket: &Path) -> Result<Vec<(String, Duration)>> {
    let body = scrape(socket)?;
    let prefix = "clh_pod_start_step_seconds{step=\"";
    body.lines()
        .filter_map(|l| l.strip_prefix(prefix))
        .map(|rest| {
            let (step, value) = rest.split_once("\"} ").context("malformed sample")?;
            let secs: f64 = value.trim().parse().context("sample value")?;
            Ok((step.to_owned(), Duration::from_secs_f64(secs)))
        })
        .collect()
}
