//! `start` and `-info` driven as each containerd version drives them:
//! argv, environment and stdin byte for byte as written down in
//! fixtures/containerd_start.rs, stdout and stderr read as one stream as
//! containerd does, the reply parsed with that version's rules, and the
//! task service that version would then call answering on the address.
//!
//! No VM is started: the daemon serves the Task service before any
//! Create. Each test stops its daemon with Shutdown and waits for it to
//! exit (it is our child: the test process is a subreaper).

#[path = "fixtures/containerd_start.rs"]
mod fixture;

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use containerd_shim_protos::api::{ShutdownRequest, StateRequest};
use containerd_shim_protos::protobuf::Message;
use containerd_shim_protos::types::introspection::RuntimeInfo;
use fixture::{Launch, Version, VERSIONS};

const SHIM: &str = env!("CARGO_BIN_EXE_containerd-shim-clh-v2");

/// A bundle, a configuration and short socket paths of one test.
struct Host {
    dir: tempfile::TempDir,
    /// Keeps the bundle's `log` FIFO open for reading, as containerd does.
    _log: std::fs::File,
}

impl Host {
    fn new() -> Host {
        let dir = tempfile::Builder::new()
            .prefix("cs-")
            .tempdir_in("/tmp")
            .expect("temp dir");
        let bundle = dir.path().join("bundle");
        std::fs::create_dir(&bundle).expect("bundle");
        std::fs::write(
            bundle.join("config.json"),
            r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"}}"#,
        )
        .expect("config.json");
        nix::unistd::mkfifo(&bundle.join("log"), nix::sys::stat::Mode::S_IRWXU).expect("log");
        let log = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(bundle.join("log"))
            .expect("open log");
        let state = dir.path().join("state");
        std::fs::write(
            dir.path().join("config.toml"),
            format!("[runtime]\nstate_dir = \"{}\"\n", state.display()),
        )
        .expect("config");
        Host { dir, _log: log }
    }

    fn bundle(&self) -> PathBuf {
        self.dir.path().join("bundle")
    }

    /// What containerd would pass for container `id` in namespace `ns`.
    fn launch(&self, ns: &str, id: &str) -> Launch {
        let d = self.dir.path().display();
        Launch {
            namespace: ns.into(),
            id: id.into(),
            grpc: format!("{d}/c.sock"),
            ttrpc: format!("{d}/c.sock.ttrpc"),
            containerd: "/usr/bin/containerd".into(),
            containerd_version: "v2.3.4".into(),
            socket_dir: format!("{d}/s"),
            debug: false,
            options: None,
        }
    }

    /// containerd's own environment, which the shim inherits.
    fn base_env(&self) -> Vec<(String, String)> {
        vec![
            ("PATH".into(), "/usr/sbin:/usr/bin:/sbin:/bin".into()),
            (
                "CLH_SHIM_CONFIG".into(),
                self.dir.path().join("config.toml").display().to_string(),
            ),
        ]
    }

    /// Runs `start` as version `v` would; returns its success and its
    /// stdout and stderr as one stream.
    fn start(&self, v: &Version, launch: &Launch) -> (bool, Vec<u8>) {
        let stdin = launch.stdin(v);
        let (mut reader, writer) = pipe();
        let mut cmd = Command::new(SHIM);
        cmd.args(launch.argv())
            .current_dir(self.bundle())
            .env_clear()
            .envs(self.base_env())
            .envs(launch.env(v))
            .stdout(Stdio::from(writer.try_clone().expect("dup")))
            .stderr(Stdio::from(writer));
        // Go's exec gives /dev/null when containerd sets no stdin.
        cmd.stdin(if stdin.is_empty() {
            Stdio::null()
        } else {
            Stdio::piped()
        });
        let mut child = cmd.spawn().expect("spawn the shim");
        drop(cmd);
        if let Some(mut pipe) = child.stdin.take() {
            pipe.write_all(&stdin).expect("write stdin");
        }
        let mut out = Vec::new();
        reader.read_to_end(&mut out).expect("read the reply");
        let status = child.wait().expect("wait for start");
        (status.success(), out)
    }
}

fn pipe() -> (std::fs::File, OwnedFd) {
    // Close-on-exec: a process another test spawns meanwhile must not
    // hold our write end open.
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
    (std::fs::File::from(r), w)
}

fn root_or_skip() -> bool {
    if nix::unistd::geteuid().is_root() {
        // The daemon, orphaned when `start` exits, becomes our child.
        nix::sys::prctl::set_child_subreaper(true).expect("subreaper");
        true
    } else {
        clh_test_skip::skip("shim sockets go to /run/containerd/s, which needs root");
        false
    }
}

/// Calls `method` of `service` at `address`; Err is the status message.
fn call(address: &str, service: &str, method: &str, req: &impl Message) -> Result<Vec<u8>, String> {
    let client = ttrpc::sync::Client::connect(address).map_err(|e| format!("connect: {e}"))?;
    let request = ttrpc::Request {
        service: service.into(),
        method: method.into(),
        payload: req.write_to_bytes().map_err(|e| e.to_string())?,
        timeout_nano: 5_000_000_000,
        ..Default::default()
    };
    client
        .request(request)
        .map(|r| r.payload)
        .map_err(|e| e.to_string())
}

/// The daemon's pid, from the socket's peer credentials.
fn daemon_pid(address: &str) -> nix::unistd::Pid {
    let path = address.trim_start_matches("unix://");
    let stream = std::os::unix::net::UnixStream::connect(path).expect("connect");
    let cred = nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
        .expect("peer credentials");
    nix::unistd::Pid::from_raw(cred.pid())
}

/// Checks that the task service `v` calls for `parsed` answers, then stops
/// the daemon and waits for it to exit and remove its socket.
fn check_served_and_stop(parsed: &fixture::Parsed, id: &str) {
    assert_eq!(parsed.protocol, "ttrpc");
    let service = fixture::task_service(parsed.version);
    let pid = daemon_pid(&parsed.address);
    let state = StateRequest {
        id: "no-such-container".into(),
        ..Default::default()
    };
    // Both names serve (a 2.3 that downgrades calls v2 on a v3 shim).
    for name in [
        service,
        "containerd.task.v2.Task",
        "containerd.task.v3.Task",
    ] {
        let err = call(&parsed.address, name, "State", &state).expect_err("State of an unknown id");
        assert!(err.contains("not found"), "{name}.State: {err}");
    }
    let shutdown = ShutdownRequest {
        id: id.into(),
        ..Default::default()
    };
    call(&parsed.address, service, "Shutdown", &shutdown).expect("Shutdown");
    nix::sys::wait::waitpid(pid, None).expect("the daemon exits after Shutdown");
    let path = Path::new(parsed.address.trim_start_matches("unix://"));
    assert!(!path.exists(), "{} left behind", path.display());
}

#[test]
fn the_2_3_params_are_written_down_byte_for_byte() {
    let v = VERSIONS.iter().find(|v| v.name == "2.3.4").unwrap();
    let sent = Launch::default_install().stdin(v);
    assert_eq!(sent, fixture::DEFAULT_INSTALL_PARAMS_2_3);
    // And decode as the crate's BootstrapParams to the same values.
    let p = containerd_shim::bootstrap::BootstrapParams::parse_from_bytes(&sent).unwrap();
    assert_eq!(
        (p.instance_id.as_str(), p.namespace.as_str()),
        ("t1", "default")
    );
    assert_eq!(p.socket_dir.as_deref(), Some("/run/containerd/s"));
    assert_eq!(p.write_to_bytes().unwrap(), sent, "Go's field order");
}

/// `ctr run` (no runtime options) on every version: a reply it accepts,
/// and the task service it then calls answers there.
#[test]
fn start_as_every_containerd_sends_it() {
    if !root_or_skip() {
        return;
    }
    for v in &VERSIONS {
        let host = Host::new();
        let ns = format!("v{}", v.name.replace('.', "-"));
        let launch = host.launch(&ns, "t1");
        let (ok, out) = host.start(v, &launch);
        let text = String::from_utf8_lossy(&out);
        assert!(ok, "containerd {}: start failed: {text}", v.name);
        let parsed = fixture::parse_reply(v, &out)
            .unwrap_or_else(|e| panic!("containerd {} refuses {text:?}: {e}", v.name));
        // 2.3 gets task API v3 in its own protocol; the others the bare
        // address, which they all read as v2.
        let expected = if v.name.starts_with("2.3") { 3 } else { 2 };
        assert_eq!(parsed.version, expected, "containerd {}", v.name);
        if v.name.starts_with("2.3") {
            // In the directory 2.3 named.
            let dir = format!("unix://{}/", launch.socket_dir);
            assert!(parsed.address.starts_with(&dir), "{}", parsed.address);
        } else {
            assert!(parsed.address.starts_with("unix:///run/containerd/s/"));
        }
        // The bundle's address file, which `delete` reads after a crash.
        let written = std::fs::read_to_string(host.bundle().join("address")).unwrap();
        assert_eq!(written, parsed.address);
        check_served_and_stop(&parsed, "t1");
    }
}

/// With runtime options (a CRI handler with an empty `options` table:
/// `runtimeoptions.v1.Options{}`) and containerd at debug level.
#[test]
fn start_with_runtime_options_and_debug() {
    if !root_or_skip() {
        return;
    }
    for v in &VERSIONS {
        let host = Host::new();
        let ns = format!("o{}", v.name.replace('.', "-"));
        let mut launch = host.launch(&ns, "p1");
        launch.debug = true;
        launch.options = Some(("runtimeoptions.v1.Options".into(), Vec::new()));
        let (ok, out) = host.start(v, &launch);
        let text = String::from_utf8_lossy(&out);
        assert!(ok, "containerd {}: start failed: {text}", v.name);
        let parsed = fixture::parse_reply(v, &out).unwrap();
        check_served_and_stop(&parsed, "p1");
    }
}

/// Options we cannot honour (`ctr run --runtime-config-path`) fail
/// `start` with the reason where containerd shows it, and leave no daemon.
#[test]
fn refused_runtime_options_fail_start_with_the_reason() {
    for v in &VERSIONS {
        let host = Host::new();
        let ns = format!("r{}", v.name.replace('.', "-"));
        let mut launch = host.launch(&ns, "t1");
        // runtimeoptions.v1.Options { config_path = 2: "/etc/x.toml" }
        let mut value = vec![0x12, 11];
        value.extend_from_slice(b"/etc/x.toml");
        launch.options = Some(("runtimeoptions.v1.Options".into(), value));
        let (ok, out) = host.start(v, &launch);
        let text = String::from_utf8_lossy(&out);
        assert!(!ok, "containerd {}: start accepted {text}", v.name);
        assert!(
            text.contains("unsupported runtime options") && text.contains("CLH_SHIM_CONFIG"),
            "containerd {}: {text}",
            v.name
        );
        assert!(!host.bundle().join("address").exists());
    }
}

/// `-info` as containerd 2.x runs it (2.2 before every first create of a
/// runtime): stdout alone is a `RuntimeInfo`.
#[test]
fn info_answers_with_runtime_info_only() {
    for options in [Vec::new(), fixture::any("runtimeoptions.v1.Options", b"")] {
        let mut child = Command::new(SHIM)
            .arg("-info")
            .env_clear()
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(&options)
            .expect("stdin");
        let out = child.wait_with_output().expect("-info");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.stderr.is_empty(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let info = RuntimeInfo::parse_from_bytes(&out.stdout).expect("a RuntimeInfo");
        assert_eq!(info.name, "io.containerd.clh.v2");
        assert!(!info.version.version.is_empty());
        assert_eq!(info.options.is_some(), !options.is_empty());
        assert_eq!(
            info.features.type_url,
            "types.containerd.io/opencontainers/runtime-spec/1/features/Features"
        );
        let features: serde_json::Value = serde_json::from_slice(&info.features.value).unwrap();
        // containerd reads features.linux without a nil check.
        assert!(features["linux"].is_object(), "{features}");
    }
}
