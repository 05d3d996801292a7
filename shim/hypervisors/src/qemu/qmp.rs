//! Just enough QMP to learn that QEMU got past machine setup (kernel and
//! initramfs loaded, vhost-user devices negotiated) and is running the guest.
//! Every read and write is under the caller's deadline.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::time::Instant;

use crate::process::ManagedProcess;
use crate::wait::wait_until;
use crate::{Error, Result};

/// Longest QMP line we accept; QEMU's replies to our two commands are tiny.
const MAX_LINE: usize = 64 * 1024;

/// Connects to QEMU's QMP socket and waits until `query-status` reports
/// the guest running. Fails early, with QEMU's log, if QEMU exits.
pub async fn wait_running(socket: &Path, qemu: &ManagedProcess, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let stream = wait_until("QEMU's QMP socket", timeout, || async {
        if qemu.exited().is_some() {
            return Some(Err(qemu.exited_early()));
        }
        UnixStream::connect(socket).await.ok().map(Ok)
    })
    .await??;
    let talk = async {
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read);
        read_reply(&mut lines, "QMP greeting", |v| v.get("QMP").is_some()).await?;
        write
            .write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
            .await
            .map_err(io("QMP write"))?;
        read_reply(&mut lines, "qmp_capabilities", |v| {
            v.get("return").is_some()
        })
        .await?;
        write
            .write_all(b"{\"execute\":\"query-status\"}\n")
            .await
            .map_err(io("QMP write"))?;
        let status = read_reply(&mut lines, "query-status", |v| v.get("return").is_some()).await?;
        match status["return"]["status"].as_str() {
            Some("running") => Ok(()),
            other => Err(Error::Qmp(format!(
                "QEMU reports the VM as {other:?} instead of running"
            ))),
        }
    };
    match tokio::time::timeout_at(deadline, talk).await {
        Ok(result) => result.map_err(|e| {
            if qemu.exited().is_some() {
                qemu.exited_early()
            } else {
                e
            }
        }),
        Err(_) if qemu.exited().is_some() => Err(qemu.exited_early()),
        Err(_) => Err(Error::Timeout {
            what: "QEMU to report the VM running over QMP".into(),
            timeout,
        }),
    }
}

/// Reads JSON lines until one satisfies `is_reply`, skipping asynchronous
/// events; a QMP error reply fails.
async fn read_reply<R, F>(lines: &mut BufReader<R>, what: &str, is_reply: F) -> Result<Value>
where
    R: tokio::io::AsyncRead + Unpin,
    F: Fn(&Value) -> bool,
{
    loop {
        let mut line = String::new();
        let n = (&mut *lines)
            .take(MAX_LINE as u64)
            .read_line(&mut line)
            .await
            .map_err(io("QMP read"))?;
        if n == 0 {
            return Err(Error::Qmp(format!(
                "QEMU closed the connection before answering {what}"
            )));
        }
        let value: Value = serde_json::from_str(&line).map_err(|e| {
            Error::Qmp(format!(
                "unparsable reply to {what} ({e}): {:.200}",
                line.trim_end()
            ))
        })?;
        if let Some(err) = value.get("error") {
            return Err(Error::Qmp(format!("{what} failed: {err}")));
        }
        if is_reply(&value) {
            return Ok(value);
        }
    }
}

fn io(what: &'static str) -> impl Fn(std::io::Error) -> Error {
    move |source| Error::Io {
        what,
        path: "qmp.sock".into(),
        source,
    }
}
