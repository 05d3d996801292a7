//! QMP: that QEMU got past machine setup (kernel and initramfs loaded,
//! vhost-user devices negotiated) and is running the guest, and the
//! commands of a template's save and restore (template.rs). Every read and
//! write is under the caller's deadline.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::time::Instant;

use crate::process::ManagedProcess;
use crate::wait::wait_until;
use crate::{Error, Result};

/// Longest QMP line we accept; QEMU's replies to our commands are small.
const MAX_LINE: usize = 64 * 1024;

/// A QMP session: greeting read, capabilities negotiated. Each command
/// is answered in order; asynchronous events in between are skipped.
pub struct Client {
    lines: BufReader<OwnedReadHalf>,
    write: OwnedWriteHalf,
}

impl Client {
    /// Connects to QEMU's QMP socket within `timeout`, failing early with
    /// QEMU's log if QEMU exits.
    pub async fn connect(socket: &Path, qemu: &ManagedProcess, timeout: Duration) -> Result<Self> {
        let deadline = Instant::now() + timeout;
        let stream = wait_until("QEMU's QMP socket", timeout, || async {
            if qemu.exited().is_some() {
                return Some(Err(qemu.exited_early()));
            }
            UnixStream::connect(socket).await.ok().map(Ok)
        })
        .await??;
        let (read, write) = stream.into_split();
        let mut client = Self {
            lines: BufReader::new(read),
            write,
        };
        let greet = async {
            read_reply(&mut client.lines, "QMP greeting", |v| {
                v.get("QMP").is_some()
            })
            .await?;
            client.execute("qmp_capabilities", Value::Null).await
        };
        let left = deadline.saturating_duration_since(Instant::now());
        qemu.within(left, "QEMU's QMP greeting", greet).await?;
        Ok(client)
    }

    /// Runs `command` with `arguments` (`Value::Null`: none); its `return`.
    pub async fn execute(&mut self, command: &str, arguments: Value) -> Result<Value> {
        let mut request = serde_json::json!({ "execute": command });
        if !arguments.is_null() {
            request["arguments"] = arguments;
        }
        let mut line = request.to_string();
        line.push('\n');
        self.write
            .write_all(line.as_bytes())
            .await
            .map_err(io("QMP write"))?;
        let reply = read_reply(&mut self.lines, command, |v| v.get("return").is_some()).await?;
        Ok(reply["return"].clone())
    }

    /// The VM's run state (`query-status`): "running", "paused",
    /// "inmigrate", ...
    pub async fn status(&mut self) -> Result<String> {
        let status = self.execute("query-status", Value::Null).await?;
        Ok(status["status"].as_str().unwrap_or_default().to_owned())
    }
}

/// Connects to QEMU's QMP socket and waits until `query-status` reports
/// the guest running. Fails early, with QEMU's log, if QEMU exits.
pub async fn wait_running(socket: &Path, qemu: &ManagedProcess, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut client = Client::connect(socket, qemu, timeout).await?;
    let status = qemu
        .within(
            deadline.saturating_duration_since(Instant::now()),
            "QEMU to report the VM running over QMP",
            client.status(),
        )
        .await?;
    match status.as_str() {
        "running" => Ok(()),
        other => Err(Error::Qmp(format!(
            "QEMU reports the VM as {other:?} instead of running"
        ))),
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
