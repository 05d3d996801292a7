//! Tier 2: the agent's ttrpc service, served on a host Unix socket by the
//! real binary in host test mode (`--listen unix://...`), called through
//! the generated async client exactly as the shim will call it.

use clh_agent_protocol::{AgentClient, CheckRequest, VersionRequest, PROTOCOL_VERSION};
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};
use ttrpc::context;

/// Kills the agent when the test ends, pass or fail.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_agent(sock: &Path) -> Agent {
    let child = Command::new(env!("CARGO_BIN_EXE_clh-agent"))
        .arg("--listen")
        .arg(format!("unix://{}", sock.display()))
        .spawn()
        .expect("spawn clh-agent");
    let mut agent = Agent(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    // Until it accepts: the socket file exists from bind(), before listen().
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        if let Some(status) = agent.0.try_wait().expect("try_wait") {
            panic!("clh-agent exited early: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "the agent never accepted a connection"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    agent
}

async fn client(sock: &Path) -> AgentClient {
    let c = ttrpc::r#async::Client::connect(&format!("unix://{}", sock.display()))
        .await
        .expect("connect");
    AgentClient::new(c)
}

fn ctx() -> context::Context {
    context::with_timeout(Duration::from_secs(5).as_nanos() as i64)
}

#[tokio::test]
async fn version_check_and_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("agent.sock");
    let _agent = start_agent(&sock);
    let agent = client(&sock).await;

    let resp = agent
        .version(
            ctx(),
            &VersionRequest {
                protocol_version: PROTOCOL_VERSION,
                shim_version: "test".into(),
                ..Default::default()
            },
        )
        .await
        .expect("version");
    assert_eq!(resp.protocol_version, PROTOCOL_VERSION);
    assert_eq!(resp.agent_version, env!("CARGO_PKG_VERSION"));

    let err = agent
        .version(
            ctx(),
            &VersionRequest {
                protocol_version: PROTOCOL_VERSION + 1,
                shim_version: "9.9.9".into(),
                ..Default::default()
            },
        )
        .await
        .expect_err("mismatched version must fail");
    match err {
        ttrpc::Error::RpcStatus(status) => {
            assert_eq!(status.code(), ttrpc::Code::FAILED_PRECONDITION);
            let msg = status.message();
            assert!(
                msg.contains(&format!("protocol {}", PROTOCOL_VERSION + 1)),
                "{msg}"
            );
            assert!(
                msg.contains(&format!("protocol {PROTOCOL_VERSION}")),
                "{msg}"
            );
            assert!(msg.contains("same release"), "{msg}");
        }
        other => panic!("expected an RPC status, got {other:?}"),
    }

    let check = agent
        .check(ctx(), &CheckRequest::new())
        .await
        .expect("check");
    assert!(!check.kernel_release.is_empty());
    assert_eq!(check.boot_id.len(), 36, "boot_id {:?}", check.boot_id);
    assert!(check.uptime_ms > 0);
    assert!(check.agent_rss_kib > 0);
    assert!(check.mem_total_kib >= check.mem_available_kib);
    assert!(check.mem_available_kib > 0);
}

#[test]
fn refuses_to_run_without_listen_when_not_pid1() {
    let out = Command::new(env!("CARGO_BIN_EXE_clh-agent"))
        .output()
        .expect("run clh-agent");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--listen"));
}
