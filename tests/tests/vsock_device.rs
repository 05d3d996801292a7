//! vhost-device-vsock on its own, driven by a minimal vhost-user frontend
//! (`clh_tests::vsock_frontend`): what a host connection on its
//! hybrid-vsock socket does at each point of the device's life. No VM.
//!
//! Two tests pin down the upstream defects behind agent connects that were
//! never answered on loaded hosts (docs/ARCHITECTURE.md, step 7 of a VM's
//! start): each ends the device's only vring worker thread, after which
//! the socket still accepts connections but nothing reads them. The shim
//! avoids both triggers (`wait_vsock_ready` in
//! shim/hypervisors/src/qemu/mod.rs; the lingering connections of
//! shim/agent-client/src/hybrid_vsock.rs). Once a vhost-device-vsock
//! release fixes them, these tests fail and the workarounds can be
//! reviewed.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clh_hypervisor::wait::wait_until;
use clh_tests::vsock_frontend::{VsockFrontend, GUEST_CID, VSOCK_OP_REQUEST};

const WAIT: Duration = Duration::from_secs(10);

/// A vhost-device-vsock process, killed on drop.
struct Device {
    child: Child,
    vhost: PathBuf,
    uds: PathBuf,
}

impl Drop for Device {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn spawn_device(dir: &Path) -> Device {
    let vhost = dir.join("vhost.sock");
    let uds = dir.join("vsock.sock");
    let log = std::fs::File::create(dir.join("device.log")).expect("device log");
    let child = Command::new(clh_tests::binaries().vhost_device_vsock)
        .arg("--vm")
        .arg(format!(
            "guest-cid={GUEST_CID},socket={},uds-path={}",
            vhost.display(),
            uds.display()
        ))
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("device log"))
        .stderr(log)
        .spawn()
        .expect("spawning vhost-device-vsock");
    let device = Device { child, vhost, uds };
    wait_until("vhost-device-vsock's sockets", WAIT, || async {
        // Listening, not just bound; probed without connecting.
        let listening = |p: &Path| clh_hypervisor::virtiofsd::socket_is_listening(p);
        (listening(&device.vhost) && listening(&device.uds)).then_some(())
    })
    .await
    .expect("vhost-device-vsock did not start");
    device
}

/// The device's vring worker threads (vhost-user-backend names them).
fn vring_workers(pid: u32) -> usize {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == "vring_worker")
        })
        .count()
}

fn connect_1024(uds: &Path) -> UnixStream {
    let mut stream = UnixStream::connect(uds).expect("connecting to the hybrid-vsock socket");
    stream
        .write_all(b"CONNECT 1024\n")
        .expect("writing CONNECT");
    stream
}

#[tokio::test]
async fn a_connect_after_the_rings_are_up_reaches_the_guest() {
    let dir = tempfile::tempdir().unwrap();
    let device = spawn_device(dir.path()).await;
    let mut guest = VsockFrontend::connect_with_memory(&device.vhost, WAIT).unwrap();
    guest.start_rings().unwrap();

    let _host = connect_1024(&device.uds);
    let request = guest.next_rx_packet(Instant::now() + WAIT).unwrap();
    assert_eq!(
        (request.op, request.dst_port),
        (VSOCK_OP_REQUEST, 1024),
        "{request:?}"
    );
    assert_eq!(vring_workers(device.child.id()), 1);
}

/// vhost-device-vsock 0.3.0: when the guest accepts a request whose host
/// socket was closed meanwhile, the device writes `OK 1024` to it with
/// `write_all(..).unwrap()` (vsock_conn.rs), and the EPIPE panics its only
/// vring worker thread. The shim's client never closes a connection whose
/// CONNECT is unanswered (see `hybrid_vsock` in shim/agent-client).
#[tokio::test]
async fn vhost_device_vsock_panics_when_the_guest_accepts_a_closed_connection() {
    let dir = tempfile::tempdir().unwrap();
    let device = spawn_device(dir.path()).await;
    let pid = device.child.id();
    let mut guest = VsockFrontend::connect_with_memory(&device.vhost, WAIT).unwrap();
    guest.start_rings().unwrap();

    let host = connect_1024(&device.uds);
    let request = guest.next_rx_packet(Instant::now() + WAIT).unwrap();
    assert_eq!(request.op, VSOCK_OP_REQUEST, "{request:?}");
    drop(host);
    guest.send_response(1024, request.src_port).unwrap();

    wait_until("the vring worker to end", WAIT, || async {
        (vring_workers(pid) == 0).then_some(())
    })
    .await
    .unwrap();
    let log = std::fs::read_to_string(dir.path().join("device.log")).unwrap();
    assert!(
        log.contains("panicked") && log.contains("Broken pipe"),
        "{log}"
    );
}

/// vhost-device-vsock 0.3.0: a host connection after SET_MEM_TABLE and
/// before the TX ring is set up makes the backend event's `process_tx`
/// fail (the queue is not ready), and that error ends the device's only
/// vring worker thread, silently: nothing ever reads the hybrid-vsock
/// socket again, though it still accepts connections into its backlog.
#[tokio::test]
async fn vhost_device_vsock_stops_serving_after_a_connect_during_its_start() {
    let dir = tempfile::tempdir().unwrap();
    let device = spawn_device(dir.path()).await;
    let pid = device.child.id();
    let mut guest = VsockFrontend::connect_with_memory(&device.vhost, WAIT).unwrap();
    assert_eq!(vring_workers(pid), 1);

    let _early = UnixStream::connect(&device.uds).unwrap();
    wait_until("the vring worker to end", WAIT, || async {
        (vring_workers(pid) == 0).then_some(())
    })
    .await
    .unwrap();

    guest.start_rings().unwrap();
    let _host = connect_1024(&device.uds);
    let answer = guest.next_rx_packet(Instant::now() + Duration::from_secs(2));
    assert!(answer.is_err(), "the device answered: {answer:?}");
    let log = std::fs::read_to_string(dir.path().join("device.log")).unwrap();
    assert!(
        !log.contains("panicked"),
        "a panic, not a silent exit: {log}"
    );
}
