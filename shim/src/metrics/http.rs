//! The little HTTP/1.1 both ends need: answer `GET /metrics` (one request
//! per connection, then close), and fetch it over a Unix socket. Every
//! read and write has a deadline, and what is read is bounded.

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::text::CONTENT_TYPE;

/// How long a client may take to send its request, and to read the answer.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest request head read.
const MAX_REQUEST: usize = 8 * 1024;

/// The longest answer [`get`] reads.
pub const MAX_BODY: u64 = 16 * 1024 * 1024;

/// What a request asked for.
#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    Metrics,
    NotFound,
    BadMethod,
    Malformed,
}

/// Reads the request line (and the head, up to its blank line).
pub fn parse_request(head: &[u8]) -> Request {
    let Ok(text) = std::str::from_utf8(head) else {
        return Request::Malformed;
    };
    let mut words = text.lines().next().unwrap_or_default().split(' ');
    let (Some(method), Some(target), Some(version)) = (words.next(), words.next(), words.next())
    else {
        return Request::Malformed;
    };
    if !version.starts_with("HTTP/1.") {
        return Request::Malformed;
    }
    if method != "GET" {
        return Request::BadMethod;
    }
    match target.split('?').next().unwrap_or_default() {
        "/metrics" | "/" => Request::Metrics,
        _ => Request::NotFound,
    }
}

/// Answers one request on `stream`: `body()` for `GET /metrics`, an error
/// status otherwise.
pub async fn answer<S, F, Fut>(mut stream: S, body: F)
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: FnOnce() -> Fut,
    Fut: Future<Output = String>,
{
    let head = match tokio::time::timeout(IO_TIMEOUT, read_head(&mut stream)).await {
        Ok(Ok(head)) => head,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "metrics: reading a request");
            return;
        }
        Err(_) => {
            tracing::debug!("metrics: a client sent no request in time");
            return;
        }
    };
    let (status, content_type, body) = match parse_request(&head) {
        Request::Metrics => ("200 OK", CONTENT_TYPE, body().await),
        Request::NotFound => ("404 Not Found", "text/plain", "GET /metrics\n".into()),
        Request::BadMethod => (
            "405 Method Not Allowed",
            "text/plain",
            "GET /metrics\n".into(),
        ),
        Request::Malformed => ("400 Bad Request", "text/plain", "GET /metrics\n".into()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let written = tokio::time::timeout(IO_TIMEOUT, async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await
    })
    .await;
    match written {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "metrics: writing an answer"),
        Err(_) => tracing::debug!("metrics: a client did not read its answer in time"),
    }
}

/// The request head: up to and including its blank line.
async fn read_head<S: AsyncRead + Unpin>(stream: &mut S) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        if head.len() > MAX_REQUEST {
            return Err(std::io::Error::other("request head too long"));
        }
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.extend_from_slice(&buf[..n]);
    }
    Ok(head)
}

/// Why a fetch failed.
#[derive(Debug, thiserror::Error)]
pub enum GetError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("answered {0:?}")]
    Status(String),
    #[error("not an HTTP answer")]
    Malformed,
}

/// `GET /metrics` on the Unix socket `path`; the body of a 200 answer.
/// Gives up after `timeout`.
pub async fn get_unix(path: &Path, timeout: Duration) -> Result<String, GetError> {
    tokio::time::timeout(timeout, async {
        let stream = tokio::net::UnixStream::connect(path).await?;
        get(stream).await
    })
    .await
    .map_err(|_| GetError::Timeout(timeout))?
}

/// `GET /metrics` on a connected `stream`.
pub async fn get<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S) -> Result<String, GetError> {
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await?;
    let mut answer = Vec::new();
    (&mut stream)
        .take(MAX_BODY + MAX_REQUEST as u64)
        .read_to_end(&mut answer)
        .await?;
    let text = String::from_utf8(answer).map_err(|_| GetError::Malformed)?;
    let (head, body) = text.split_once("\r\n\r\n").ok_or(GetError::Malformed)?;
    let status = head.lines().next().unwrap_or_default();
    match status.split(' ').nth(1) {
        Some("200") => Ok(body.to_string()),
        Some(_) => Err(GetError::Status(status.to_string())),
        None => Err(GetError::Malformed),
    }
}
