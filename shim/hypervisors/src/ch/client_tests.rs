//! The API client against a fake CH: a tiny HTTP/1.1 server on a Unix socket
//! that answers each connection with one canned response. The fake is also
//! used by `template_tests`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinHandle;

use super::api::{FsConfig, VmResize, VmState};
use super::client::ApiClient;
use crate::Error;

const TIMEOUT: Duration = Duration::from_secs(5);

pub(super) struct FakeCh {
    _dir: Option<tempfile::TempDir>,
    socket: PathBuf,
    /// The requests received, as text (head and body).
    requests: JoinHandle<Vec<String>>,
}

impl FakeCh {
    /// Serves one connection per entry of `responses`; `None` accepts the
    /// connection, reads the request and never answers.
    fn serve(responses: Vec<Option<&'static str>>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut fake = Self::serve_at(dir.path().join("api.sock"), responses);
        fake._dir = Some(dir);
        fake
    }

    /// [`FakeCh::serve`] on `socket`, which the caller's directory holds.
    pub(super) fn serve_at(socket: PathBuf, responses: Vec<Option<&'static str>>) -> Self {
        let listener = UnixListener::bind(&socket).unwrap();
        let requests = tokio::spawn(async move {
            let mut seen = Vec::new();
            for response in responses {
                let mut stream = loop {
                    let (mut stream, _) = listener.accept().await.unwrap();
                    // A connection closed unused is a readiness probe
                    // (`wait_for_api_socket`), not a request.
                    if let Some(request) = read_request(&mut stream).await {
                        seen.push(request);
                        break stream;
                    }
                };
                match response {
                    Some(response) => stream.write_all(response.as_bytes()).await.unwrap(),
                    None => std::future::pending::<()>().await,
                }
            }
            seen
        });
        Self {
            _dir: None,
            socket,
            requests,
        }
    }

    fn client(&self, timeout: Duration) -> ApiClient {
        ApiClient::new(&self.socket, timeout)
    }

    /// The requests, once every response was sent; a panic, rather than a
    /// hung test, if the client stops short of that.
    pub(super) async fn requests(self) -> Vec<String> {
        tokio::time::timeout(TIMEOUT, self.requests)
            .await
            .expect("the client made fewer requests than the fake has responses")
            .unwrap()
    }
}

/// Reads one request: the head, then `content-length` bytes of body; None
/// if the client closed without sending anything.
async fn read_request(stream: &mut UnixStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&buf).to_string();
        if let Some(head_end) = text.find("\r\n\r\n") {
            let length = text[..head_end]
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse::<usize>().unwrap())
                })
                .unwrap_or(0);
            if buf.len() >= head_end + 4 + length {
                return Some(text);
            }
        }
        let n = stream.read(&mut chunk).await.unwrap();
        if n == 0 && buf.is_empty() {
            return None;
        }
        assert!(n > 0, "client closed before sending a whole request");
        buf.extend_from_slice(&chunk[..n]);
    }
}

pub(super) fn response(status: &str, body: &str) -> &'static str {
    let content_type = if body.is_empty() {
        ""
    } else {
        "Content-Type: application/json\r\n"
    };
    let text = format!(
        "HTTP/1.1 {status}\r\nServer: Cloud Hypervisor API\r\n{content_type}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    Box::leak(text.into_boxed_str())
}

#[tokio::test]
async fn ping_sends_a_get_and_decodes_the_version() {
    let body =
        r#"{"build_version":"v53.0","version":"53.0.0","pid":42,"features":["kvm","io_uring"]}"#;
    let ch = FakeCh::serve(vec![Some(response("200 OK", body))]);
    let ping = ch.client(TIMEOUT).ping().await.unwrap();
    assert_eq!(ping.version, "53.0.0");
    assert_eq!(ping.build_version, "v53.0");
    assert_eq!(ping.pid, Some(42));
    assert_eq!(ping.features, ["kvm", "io_uring"]);
    let requests = ch.requests().await;
    assert!(
        requests[0].starts_with("GET /api/v1/vmm.ping HTTP/1.1\r\n"),
        "{requests:?}"
    );
}

#[tokio::test]
async fn put_with_a_body_sends_json_and_accepts_204() {
    let ch = FakeCh::serve(vec![Some(response("204 No Content", ""))]);
    let resize = VmResize {
        desired_vcpus: Some(2),
        ..VmResize::default()
    };
    ch.client(TIMEOUT).resize(&resize).await.unwrap();
    let request = &ch.requests().await[0];
    assert!(
        request.starts_with("PUT /api/v1/vm.resize HTTP/1.1\r\n"),
        "{request}"
    );
    assert!(
        request
            .to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{request}"
    );
    assert!(
        request.ends_with("\r\n\r\n{\"desired_vcpus\":2}"),
        "{request}"
    );
}

#[tokio::test]
async fn add_fs_returns_the_pci_device_on_hotplug_and_none_on_cold_add() {
    let ch = FakeCh::serve(vec![
        Some(response("200 OK", r#"{"id":"_fs0","bdf":"0000:00:05.0"}"#)),
        Some(response("204 No Content", "")),
    ]);
    let client = ch.client(TIMEOUT);
    let fs = FsConfig::new("shared", "/run/fs.sock");
    let hot = client.add_fs(&fs).await.unwrap().unwrap();
    assert_eq!(
        (hot.id.as_str(), hot.bdf.as_str()),
        ("_fs0", "0000:00:05.0")
    );
    assert_eq!(client.add_fs(&fs).await.unwrap(), None);
}

#[tokio::test]
async fn an_error_status_carries_ch_error_chain() {
    // What CH v53 answers a vm.boot with a missing kernel (recorded from a
    // real v53.0): the error chain as a JSON array of messages.
    let body = r#"["Error from API","The VM could not boot","Cannot open kernel file","No such file or directory (os error 2)"]"#;
    let ch = FakeCh::serve(vec![Some(response("500 Internal Server Error", body))]);
    let err = ch.client(TIMEOUT).boot().await.unwrap_err();
    match &err {
        Error::Api {
            endpoint,
            status,
            body,
        } => {
            assert_eq!((*endpoint, *status), ("vm.boot", 500));
            assert_eq!(
                body,
                "Error from API: The VM could not boot: Cannot open kernel file: \
                 No such file or directory (os error 2)"
            );
        }
        other => panic!("expected an API error, got {other:?}"),
    }
    let message = err.to_string();
    assert!(
        message.contains("vm.boot") && message.contains("HTTP 500"),
        "{message}"
    );
    assert!(message.contains("Cannot open kernel file"), "{message}");
}

#[tokio::test]
async fn a_plain_text_or_empty_error_body_is_still_reported() {
    let ch = FakeCh::serve(vec![
        Some(response("400 Bad Request", "bad json at line 1\n")),
        Some(response("404 Not Found", "")),
    ]);
    let client = ch.client(TIMEOUT);
    let text = client.info().await.unwrap_err().to_string();
    assert!(text.ends_with("HTTP 400: bad json at line 1"), "{text}");
    let empty = client.info().await.unwrap_err().to_string();
    assert!(empty.ends_with("HTTP 404: Not Found"), "{empty}");
}

#[tokio::test]
async fn a_server_that_never_answers_times_out_within_the_deadline() {
    let ch = FakeCh::serve(vec![None]);
    let started = Instant::now();
    let err = ch
        .client(Duration::from_millis(200))
        .ping()
        .await
        .unwrap_err();
    let elapsed = started.elapsed();
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    assert!(err.to_string().contains("vmm.ping"), "{err}");
    assert!(elapsed < Duration::from_secs(2), "took {elapsed:?}");
}

#[tokio::test]
async fn a_missing_socket_is_a_transport_error_naming_the_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let client = ApiClient::new(dir.path().join("absent.sock"), TIMEOUT);
    let err = client.boot().await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::ApiTransport {
                endpoint: "vm.boot",
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn an_undecodable_success_body_is_a_decode_error() {
    let ch = FakeCh::serve(vec![Some(response("200 OK", r#"{"state":42}"#))]);
    let err = ch.client(TIMEOUT).info().await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::ApiDecode {
                endpoint: "vm.info",
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn info_decodes_state_and_tolerates_states_newer_than_the_spec() {
    let running = r#"{"config":{"payload":{"kernel":"/k"}},"state":"Running","memory_actual_size":1073741824}"#;
    let newer = r#"{"config":{"payload":{}},"state":"BreakPoint","memory_actual_size":0}"#;
    let ch = FakeCh::serve(vec![
        Some(response("200 OK", running)),
        Some(response("200 OK", newer)),
    ]);
    let client = ch.client(TIMEOUT);
    let info = client.info().await.unwrap();
    assert_eq!(info.state, VmState::Running);
    assert_eq!(info.memory_actual_size, Some(1 << 30));
    assert_eq!(client.info().await.unwrap().state, VmState::Other);
}
