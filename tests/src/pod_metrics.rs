//! A pod's own metrics (`<state_dir>/<id>/metrics.sock`, Prometheus text
//! over HTTP on a Unix socket), as the benchmarks read them.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};

const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// `GET /metrics` on a pod's metrics socket: the body.
pub fn scrape(socket: &Path) -> Result<String> {
    let mut stream =
        UnixStream::connect(socket).with_context(|| format!("connecting {}", socket.display()))?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: pod\r\nConnection: close\r\n\r\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let (head, body) = answer.split_once("\r\n\r\n").context("not HTTP")?;
    ensure!(head.starts_with("HTTP/1.1 200 "), "{head}");
    Ok(body.to_string())
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
