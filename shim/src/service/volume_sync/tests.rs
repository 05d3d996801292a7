//! The shim side of volume sync against a fake agent on a Unix socket: the
//! volume rule, the event filter, snapshots in pieces, and updates made
//! the way the kubelet's atomic writer makes them.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use clh_agent_protocol::{
    Empty, SyncVolumeRequest, SyncVolumeResponse, VolumeEntry, VolumeEntryKind, VolumeRequest,
};
use inotify::EventMask;
use ttrpc::r#async::TtrpcContext;

use super::snapshot::{self, Outcome};
use super::volume_dir::VolumeDir;
use super::{classify, is_synced_volume, start, Trigger, WritableShares};

/// Writes `files` as the kubelet's atomic writer does: a new timestamped
/// dir, `..data_tmp` renamed over `..data`, the user-visible links, then
/// the old dir and the links of removed keys go.
fn atomic_write(dir: &Path, files: &[(&str, &str)]) {
    static SERIAL: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let ts = format!("..2026_11_22_10_00_00.{n}");
    std::fs::create_dir(dir.join(&ts)).unwrap();
    for (key, value) in files {
        std::fs::write(dir.join(&ts).join(key), value).unwrap();
    }
    let old = std::fs::read_link(dir.join("..data")).ok();
    std::os::unix::fs::symlink(&ts, dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    for (key, _) in files {
        let _ = std::os::unix::fs::symlink(format!("..data/{key}"), dir.join(key));
    }
    for e in std::fs::read_dir(dir).unwrap() {
        let name = e.unwrap().file_name();
        let text = name.to_string_lossy();
        if !text.starts_with("..") && !files.iter().any(|(k, _)| *k == text) {
            std::fs::remove_file(dir.join(&name)).unwrap();
        }
    }
    if let Some(old) = old {
        std::fs::remove_dir_all(dir.join(old)).unwrap();
    }
}

#[test]
fn only_atomic_writer_directories_are_synced() {
    let tmp = tempfile::tempdir().unwrap();
    let vol = tmp.path().join("kubernetes.io~configmap/cfg");
    std::fs::create_dir_all(&vol).unwrap();
    // No `..data` yet: not (yet) the atomic writer's.
    assert!(!is_synced_volume(&vol));
    atomic_write(&vol, &[("a", "1")]);
    assert!(is_synced_volume(&vol));
    assert!(
        !is_synced_volume(&vol.join("a")),
        "a file (a subPath mount)"
    );
    let plain = tmp.path().join("plain");
    std::fs::create_dir(&plain).unwrap();
    assert!(!is_synced_volume(&plain));
    std::fs::write(plain.join("..data"), "").unwrap();
    assert!(!is_synced_volume(&plain), "..data is a file");
    let odd = tmp.path().join("odd");
    std::fs::create_dir(&odd).unwrap();
    std::os::unix::fs::symlink("/etc", odd.join("..data")).unwrap();
    assert!(!is_synced_volume(&odd), "..data points elsewhere");
    assert!(!is_synced_volume(&tmp.path().join("missing")));
}

#[test]
fn only_data_swaps_and_lost_watches_trigger() {
    let data = Some(OsStr::new("..data"));
    assert_eq!(classify(EventMask::MOVED_TO, data), Trigger::Update);
    assert_eq!(classify(EventMask::CREATE, data), Trigger::Update);
    assert_eq!(classify(EventMask::Q_OVERFLOW, None), Trigger::Update);
    for gone in [
        EventMask::IGNORED,
        EventMask::DELETE_SELF,
        EventMask::MOVE_SELF,
        EventMask::UNMOUNT,
    ] {
        assert_eq!(classify(gone, None), Trigger::WatchGone);
    }
    let tmp = Some(OsStr::new("..data_tmp"));
    assert_eq!(classify(EventMask::CREATE, tmp), Trigger::Nothing);
    assert_eq!(
        classify(EventMask::MOVED_TO, Some(OsStr::new("key"))),
        Trigger::Nothing
    );
    let dir = EventMask::CREATE | EventMask::ISDIR;
    assert_eq!(
        classify(dir, Some(OsStr::new("..2026_11_22"))),
        Trigger::Nothing
    );
}

#[test]
fn a_snapshot_is_read_through_one_target_in_pieces() {
    let tmp = tempfile::tempdir().unwrap();
    let vol = tmp.path();
    atomic_write(vol, &[("a", "alpha"), ("empty", "")]);
    let dir = VolumeDir::open(vol).unwrap();
    let target = dir.data_target().unwrap().unwrap();
    let data = vol.join(&target);
    std::fs::create_dir(data.join("sub")).unwrap();
    let big: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(data.join("sub/big"), &big).unwrap();
    std::os::unix::fs::symlink("../a", data.join("sub/link")).unwrap();

    let mut calls: Vec<Vec<VolumeEntry>> = Vec::new();
    let chunk = 300;
    let outcome = snapshot::read(&dir, &target, chunk, &mut |e| {
        calls.push(e);
        true
    });
    let Ok(Outcome::Complete(rest)) = outcome else {
        panic!("{outcome:?}");
    };
    calls.push(rest);
    assert!(calls.len() >= 4, "{} calls", calls.len());
    for call in &calls {
        let bytes: usize = call.iter().map(|e| 64 + e.path.len() + e.data.len()).sum();
        assert!(bytes <= chunk, "a call of {bytes} bytes");
    }
    let entries: Vec<&VolumeEntry> = calls.iter().flatten().collect();
    let order: Vec<&str> = entries.iter().map(|e| e.path.as_str()).collect();
    let mut dedup = order.clone();
    dedup.dedup();
    assert_eq!(dedup, ["a", "empty", "sub", "sub/big", "sub/link"]);
    let mut rebuilt = Vec::new();
    for e in entries.iter().filter(|e| e.path == "sub/big") {
        assert_eq!(e.offset, rebuilt.len() as u64);
        rebuilt.extend_from_slice(&e.data);
    }
    assert_eq!(rebuilt, big);
    let link = entries.iter().find(|e| e.path == "sub/link").unwrap();
    assert_eq!(link.kind.enum_value(), Ok(VolumeEntryKind::SYMLINK));
    assert_eq!(link.target, "../a");
    let empty = entries.iter().find(|e| e.path == "empty").unwrap();
    assert!(empty.data.is_empty() && empty.offset == 0);

    // The data went away under the read: an update overtook it.
    let gone = snapshot::read(&dir, OsStr::new("..gone"), chunk, &mut |_| true);
    assert!(matches!(gone, Ok(Outcome::Vanished)), "{gone:?}");
}

/// What the fake agent has: the committed files of each generation.
#[derive(Default)]
struct FakeState {
    pending: BTreeMap<String, Vec<u8>>,
    committed: Vec<(u64, BTreeMap<String, Vec<u8>>)>,
    removed: bool,
}

#[derive(Clone, Default)]
struct FakeAgent(Arc<Mutex<FakeState>>);

#[async_trait]
impl clh_agent_protocol::Agent for FakeAgent {
    async fn sync_volume(
        &self,
        _ctx: &TtrpcContext,
        req: SyncVolumeRequest,
    ) -> ttrpc::Result<SyncVolumeResponse> {
        let mut s = self.0.lock().unwrap();
        for e in &req.entries {
            if e.kind.enum_value() == Ok(VolumeEntryKind::FILE) {
                let file = s.pending.entry(e.path.clone()).or_default();
                assert_eq!(file.len() as u64, e.offset);
                file.extend_from_slice(&e.data);
            }
        }
        if req.commit {
            let files = std::mem::take(&mut s.pending);
            s.committed.push((req.generation, files));
        }
        Ok(SyncVolumeResponse {
            committed_generation: req.generation,
            ..Default::default()
        })
    }

    async fn remove_volume(
        &self,
        _ctx: &TtrpcContext,
        _req: VolumeRequest,
    ) -> ttrpc::Result<Empty> {
        self.0.lock().unwrap().removed = true;
        Ok(Empty::default())
    }
}

impl FakeAgent {
    fn latest(&self) -> Option<BTreeMap<String, String>> {
        let s = self.0.lock().unwrap();
        let (_, files) = s.committed.last()?;
        let text = |v: &Vec<u8>| String::from_utf8_lossy(v).into_owned();
        Some(files.iter().map(|(k, v)| (k.clone(), text(v))).collect())
    }
}

async fn serve(
    dir: &Path,
    fake: FakeAgent,
) -> (ttrpc::r#async::Server, clh_agent_client::AgentClient) {
    let addr = format!("unix://{}", dir.join("agent.sock").display());
    let service = clh_agent_protocol::create_agent(Arc::new(fake));
    let mut server = ttrpc::r#async::Server::new()
        .bind(&addr)
        .unwrap()
        .register_service(service);
    server.start().await.unwrap();
    let client = ttrpc::r#async::Client::connect(&addr).await.unwrap();
    let client = clh_agent_protocol::AgentClient::new(client);
    (
        server,
        clh_agent_client::AgentClient::from_unchecked(client),
    )
}

fn files(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).into(), (*v).into()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_are_pushed_until_the_directory_goes() {
    let tmp = tempfile::tempdir().unwrap();
    let vol = tmp.path().join("vol");
    std::fs::create_dir(&vol).unwrap();
    atomic_write(&vol, &[("a", "1"), ("b", "1")]);
    let fake = FakeAgent::default();
    let (_server, client) = serve(tmp.path(), fake.clone()).await;

    let writable = Arc::new(WritableShares::default());
    let sync = start(client, vol.clone(), "c1", 4, writable).await.unwrap();
    assert_eq!(sync.guest_dir(), "/run/clh/volumes/c1/4");
    // The first snapshot is in before start returns.
    assert_eq!(fake.latest(), Some(files(&[("a", "1"), ("b", "1")])));

    let mut pushed = sync.pushed();
    let t0 = Instant::now();
    atomic_write(&vol, &[("a", "2"), ("c", "2")]);
    let deadline = Duration::from_secs(5);
    tokio::time::timeout(deadline, pushed.changed())
        .await
        .unwrap()
        .unwrap();
    let latency = pushed.borrow().at - t0;
    assert_eq!(fake.latest(), Some(files(&[("a", "2"), ("c", "2")])));
    assert!(latency < Duration::from_secs(1), "pushed after {latency:?}");

    // The kubelet removes the volume: the watcher ends by itself.
    std::fs::remove_dir_all(&vol).unwrap();
    let ended = tokio::time::timeout(deadline, pushed.changed())
        .await
        .unwrap();
    assert!(ended.is_err(), "the watcher still runs");
    sync.stop().await;
    assert!(fake.0.lock().unwrap().removed);
}

#[tokio::test]
async fn a_directory_without_the_layout_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (_server, client) = serve(tmp.path(), FakeAgent::default()).await;
    let err = start(client, tmp.path().to_path_buf(), "c1", 0, Arc::default()).await;
    let err = err.err().expect("a plain directory was synced").to_string();
    assert!(
        err.contains("atomic writer") && err.contains("virtio-fs"),
        "{err}"
    );
}

/// What a guest that can write a synced directory tries.
mod attacks;
