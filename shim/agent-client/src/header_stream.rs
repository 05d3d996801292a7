//! The agent's streams outside ttrpc (stdio on port 1025, port forwards on
//! 1026; agent.proto has the wire format): a hybrid-vsock connection, one
//! header line, the agent's `OK` or `ERR <reason>`, then raw bytes.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::{connect_hybrid_vsock, Error, Result};

/// The longest answer line read (an `ERR` line carries a reason).
const MAX_ANSWER: usize = 1024;

/// Connects to vsock `port` through `uds`, sends `header` (without its
/// newline) and reads the answer, all within `timeout`. A refusal, a late
/// or malformed answer becomes `refused(reason)`.
pub(crate) async fn open(
    uds: &Path,
    port: u32,
    header: &str,
    timeout: Duration,
    refused: impl Fn(String) -> Error,
) -> Result<UnixStream> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut stream = connect_hybrid_vsock(uds, port, timeout)
        .await
        .map_err(Error::Handshake)?;
    let exchange = async {
        stream.write_all(format!("{header}\n").as_bytes()).await?;
        read_answer(&mut stream).await
    };
    let answer = tokio::time::timeout_at(deadline, exchange)
        .await
        .map_err(|_| refused(format!("no answer within {timeout:?}")))?
        .map_err(|e| refused(e.to_string()))?;
    match answer.as_str() {
        "OK" => Ok(stream),
        other => Err(refused(
            other.strip_prefix("ERR ").unwrap_or(other).to_owned(),
        )),
    }
}

/// One line, a byte per read: what follows it is stream data.
async fn read_answer(stream: &mut UnixStream) -> std::io::Result<String> {
    let mut line = Vec::new();
    loop {
        let mut byte = [0u8; 1];
        if stream.read(&mut byte).await? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "agent closed the stream before answering (got {:?})",
                    String::from_utf8_lossy(&line)
                ),
            ));
        }
        if byte[0] == b'\n' {
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
        if line.len() >= MAX_ANSWER {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("answer longer than {MAX_ANSWER} bytes"),
            ));
        }
        line.push(byte[0]);
    }
}
