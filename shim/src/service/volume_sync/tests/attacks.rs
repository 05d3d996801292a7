//! A guest that can write a directory laid out like a ConfigMap (a shared
//! `emptyDir`) turns its links against the host: a canary directory
//! outside the volume holds a secret, and every attack ends in an error or
//! the old snapshot, never in the secret.

use std::os::fd::AsFd;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{fstat, OFlags};
use rustix::io::Errno;

use super::super::snapshot::{open_file, SnapshotError, MAX_CHUNK_BYTES};
use super::super::volume_dir::open_beneath;
use super::super::{should_sync, Pusher, SyncError};
use super::*;

const SECRET: &str = "canary-secret-5f2c0d";

/// A volume with one key, `a` = `old`, beside a canary directory that
/// holds the secret, readable by its owner only.
struct Scene {
    tmp: tempfile::TempDir,
    vol: PathBuf,
    canary: PathBuf,
}

fn scene() -> Scene {
    let tmp = tempfile::tempdir().unwrap();
    let canary = tmp.path().join("canary");
    std::fs::create_dir(&canary).unwrap();
    for name in ["secret", "a"] {
        let file = canary.join(name);
        std::fs::write(&file, SECRET).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let vol = tmp.path().join("vol");
    std::fs::create_dir(&vol).unwrap();
    atomic_write(&vol, &[("a", "old")]);
    Scene { tmp, vol, canary }
}

/// Points `..data` at `target` the way the atomic writer swaps it.
fn swap_data(vol: &Path, target: &Path) {
    symlink(target, vol.join("..datatmp")).unwrap();
    std::fs::rename(vol.join("..datatmp"), vol.join("..data")).unwrap();
}

/// The published data directory.
fn data(vol: &Path) -> PathBuf {
    vol.join(std::fs::read_link(vol.join("..data")).unwrap())
}

/// Reads what `..data` points to now, as a push does; None: vanished.
fn read_now(dir: &VolumeDir) -> Result<Option<Vec<VolumeEntry>>, SnapshotError> {
    let Some(target) = dir.data_target()? else {
        return Ok(None);
    };
    let mut all = Vec::new();
    let outcome = snapshot::read(dir, &target, MAX_CHUNK_BYTES, &mut |e| {
        all.extend(e);
        true
    })?;
    match outcome {
        Outcome::Complete(rest) => {
            all.extend(rest);
            Ok(Some(all))
        }
        Outcome::Vanished | Outcome::Cancelled => Ok(None),
    }
}

fn assert_no_secret(entries: &[VolumeEntry]) {
    for e in entries {
        let data = String::from_utf8_lossy(&e.data);
        assert!(!data.contains(SECRET), "{} carries the canary", e.path);
    }
}

fn entry<'a>(entries: &'a [VolumeEntry], path: &str) -> &'a VolumeEntry {
    entries.iter().find(|e| e.path == path).unwrap()
}

#[test]
fn data_swapped_to_an_outside_directory_is_refused() {
    let s = scene();
    let dir = VolumeDir::open(&s.vol).unwrap();
    for outside in [s.canary.clone(), PathBuf::from("../canary")] {
        swap_data(&s.vol, &outside);
        let err = read_now(&dir).unwrap_err();
        assert!(
            matches!(err, SnapshotError::NotAtomicWriter { .. }),
            "{outside:?}: {err}"
        );
        assert!(!is_synced_volume(&s.vol));
    }
}

#[test]
fn data_pointing_at_a_dot_dot_link_is_refused() {
    let s = scene();
    let dir = VolumeDir::open(&s.vol).unwrap();
    // `..x` passes the name check; it is the link that must not be followed.
    symlink(&s.canary, s.vol.join("..x")).unwrap();
    swap_data(&s.vol, Path::new("..x"));
    let err = read_now(&dir).unwrap_err();
    assert!(
        matches!(err, SnapshotError::NotAtomicWriter { .. })
            && err.to_string().contains("never followed"),
        "{err}"
    );
    assert!(!is_synced_volume(&s.vol));
}

#[test]
fn a_symlinked_subdirectory_is_copied_as_a_link() {
    let s = scene();
    symlink(&s.canary, data(&s.vol).join("sub")).unwrap();
    let dir = VolumeDir::open(&s.vol).unwrap();
    let entries = read_now(&dir).unwrap().unwrap();
    assert_no_secret(&entries);
    let sub = entry(&entries, "sub");
    assert_eq!(sub.kind.enum_value(), Ok(VolumeEntryKind::SYMLINK));
    assert_eq!(Path::new(&sub.target), s.canary);
    assert!(
        !entries.iter().any(|e| e.path.starts_with("sub/")),
        "the link was followed"
    );
}

#[test]
fn a_file_replaced_by_a_link_is_copied_as_a_link() {
    let s = scene();
    let a = data(&s.vol).join("a");
    std::fs::remove_file(&a).unwrap();
    symlink(s.canary.join("secret"), &a).unwrap();
    let dir = VolumeDir::open(&s.vol).unwrap();
    let entries = read_now(&dir).unwrap().unwrap();
    assert_no_secret(&entries);
    assert_eq!(
        entry(&entries, "a").kind.enum_value(),
        Ok(VolumeEntryKind::SYMLINK)
    );
}

/// The race a reader by path loses: the file checked, then swapped for a
/// link (or another file) before it is opened for reading.
#[test]
fn a_file_swapped_after_its_check_is_not_read() {
    let s = scene();
    let data = data(&s.vol);
    let parent = rustix::fs::open(&data, OFlags::PATH, rustix::fs::Mode::empty()).unwrap();
    let checked = |name: &str| {
        let fd = open_beneath(parent.as_fd(), name.as_ref(), OFlags::PATH).unwrap();
        fstat(&fd).unwrap()
    };
    let st = checked("a");
    // Kept aside, so that no new file can reuse its inode number.
    std::fs::rename(data.join("a"), s.tmp.path().join("a.checked")).unwrap();
    symlink(s.canary.join("secret"), data.join("a")).unwrap();
    let err = open_file(&parent, "a".as_ref(), &st).unwrap_err();
    assert_eq!(err, Errno::LOOP);
    std::fs::remove_file(data.join("a")).unwrap();
    std::fs::copy(s.canary.join("secret"), data.join("a")).unwrap();
    let err = open_file(&parent, "a".as_ref(), &st).unwrap_err();
    assert_eq!(err, Errno::STALE, "another file than the one checked");
}

/// The sync holds the directory it started with: a path swapped for a
/// link to another atomic-writer tree is not followed.
#[test]
fn the_held_directory_is_read_whatever_its_path_becomes() {
    let s = scene();
    atomic_write(&s.canary, &[("a", SECRET)]);
    let dir = VolumeDir::open(&s.vol).unwrap();
    std::fs::rename(&s.vol, s.vol.with_extension("moved")).unwrap();
    symlink(&s.canary, &s.vol).unwrap();
    let entries = read_now(&dir).unwrap().unwrap();
    assert_no_secret(&entries);
    assert_eq!(entry(&entries, "a").data, b"old");
}

/// Through a pusher and the fake agent: the swap to `..x -> canary` is an
/// error, and the guest keeps the old copy.
#[tokio::test]
async fn a_swap_to_a_link_keeps_the_old_copy() {
    let s = scene();
    let fake = FakeAgent::default();
    let (_server, client) = serve(s.tmp.path(), fake.clone()).await;
    let mut pusher = Pusher {
        agent: client,
        cid: "c1".into(),
        volume: 0,
        dir: Arc::new(VolumeDir::open(&s.vol).unwrap()),
        writable: Arc::default(),
        generation: 0,
    };
    pusher.push().await.unwrap();
    symlink(&s.canary, s.vol.join("..x")).unwrap();
    swap_data(&s.vol, Path::new("..x"));
    let err = pusher.push().await.unwrap_err();
    assert!(
        matches!(
            err,
            SyncError::Snapshot(SnapshotError::NotAtomicWriter { .. })
        ),
        "{err}"
    );
    assert_eq!(fake.latest(), Some(files(&[("a", "old")])));
    let state = fake.0.lock().unwrap();
    let pending = state.pending.values();
    let committed = state.committed.iter().flat_map(|(_, f)| f.values());
    for v in pending.chain(committed) {
        assert!(!String::from_utf8_lossy(v).contains(SECRET));
    }
}

#[tokio::test]
async fn a_directory_the_guest_can_write_is_not_synced() {
    let s = scene();
    let shares = WritableShares::default();
    assert!(should_sync(&s.vol, true, &shares));
    assert!(
        !should_sync(&s.vol, false, &shares),
        "a mount the container may write"
    );
    let (_server, client) = serve(s.tmp.path(), FakeAgent::default()).await;
    let vol = std::fs::canonicalize(&s.vol).unwrap();
    for share in [
        vol.clone(),
        vol.join("..2026_11_22"),
        vol.parent().unwrap().into(),
    ] {
        let shares = WritableShares::default();
        shares.add(share.clone());
        assert!(!should_sync(&s.vol, true, &shares), "{share:?}");
        let err = start(client.clone(), s.vol.clone(), "c1", 0, Arc::new(shares)).await;
        let err = err.err().expect("a guest-writable directory was synced");
        assert!(matches!(err, SyncError::GuestWritable { .. }), "{err}");
    }
}

/// A read-write share of the directory recorded after the sync started (a
/// later container of the pod) ends the sync; the copy stays as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_share_recorded_later_ends_the_sync() {
    let s = scene();
    let fake = FakeAgent::default();
    let (_server, client) = serve(s.tmp.path(), fake.clone()).await;
    let shares = Arc::new(WritableShares::default());
    let sync = start(client, s.vol.clone(), "c1", 0, shares.clone())
        .await
        .unwrap();
    let mut pushed = sync.pushed();
    shares.add(std::fs::canonicalize(&s.vol).unwrap());
    atomic_write(&s.vol, &[("a", "written by the guest")]);
    let ended = tokio::time::timeout(Duration::from_secs(5), pushed.changed())
        .await
        .expect("the sync still runs");
    assert!(ended.is_err(), "a guest-writable directory was pushed");
    assert_eq!(fake.latest(), Some(files(&[("a", "old")])));
    sync.stop().await;
}
