//! The guest copy of a synced volume, on a temp dir: layout, updates,
//! pieces of large files, path validation, atomicity for a concurrent
//! reader, and the inotify events a watcher in the container would get.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clh_agent_protocol::{SyncVolumeRequest, VolumeEntry, VolumeEntryKind};
use inotify::{Inotify, WatchMask};

use super::{VolError, Volumes};

fn ids() -> (u32, u32) {
    (
        nix::unistd::getuid().as_raw(),
        nix::unistd::getgid().as_raw(),
    )
}

fn file(path: &str, data: &[u8]) -> VolumeEntry {
    let (uid, gid) = ids();
    VolumeEntry {
        path: path.into(),
        kind: VolumeEntryKind::FILE.into(),
        mode: 0o644,
        uid,
        gid,
        data: data.to_vec(),
        ..Default::default()
    }
}

fn piece(path: &str, offset: u64, data: &[u8]) -> VolumeEntry {
    VolumeEntry {
        offset,
        ..file(path, data)
    }
}

fn dir(path: &str) -> VolumeEntry {
    VolumeEntry {
        kind: VolumeEntryKind::DIR.into(),
        mode: 0o755,
        ..file(path, b"")
    }
}

fn symlink(path: &str, target: &str) -> VolumeEntry {
    VolumeEntry {
        kind: VolumeEntryKind::SYMLINK.into(),
        target: target.into(),
        ..file(path, b"")
    }
}

fn request(generation: u64, entries: Vec<VolumeEntry>, commit: bool) -> SyncVolumeRequest {
    let (root_uid, root_gid) = ids();
    SyncVolumeRequest {
        container_id: "c1".into(),
        volume: 3,
        generation,
        entries,
        commit,
        root_mode: 0o755,
        root_uid,
        root_gid,
        ..Default::default()
    }
}

struct Fixture {
    _tmp: tempfile::TempDir,
    base: PathBuf,
    volumes: Volumes,
}

impl Fixture {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("volumes");
        Fixture {
            volumes: Volumes::new(&base),
            base,
            _tmp: tmp,
        }
    }

    fn vol(&self) -> PathBuf {
        self.base.join("c1/3")
    }

    async fn sync(&self, generation: u64, entries: Vec<VolumeEntry>) -> u64 {
        let (dir, committed) = self
            .volumes
            .sync(request(generation, entries, true))
            .await
            .unwrap();
        assert_eq!(dir, self.vol());
        committed
    }

    /// The volume's names, sorted, beside `want` sorted.
    fn assert_names(&self, want: &[&str]) {
        let mut want: Vec<String> = want.iter().map(|s| (*s).to_owned()).collect();
        want.sort();
        assert_eq!(self.names(), want);
    }

    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.vol())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap()
}

#[tokio::test]
async fn a_snapshot_is_laid_out_as_the_kubelets_atomic_writer_does() {
    let f = Fixture::new();
    let entries = vec![
        file("a", b"alpha"),
        dir("sub"),
        file("sub/b", b"beta"),
        symlink("c", "a"),
    ];
    assert_eq!(f.sync(1, entries).await, 1);
    let vol = f.vol();
    let data = std::fs::read_link(vol.join("..data")).unwrap();
    let data = data.to_str().unwrap();
    assert!(data.starts_with("..") && data.ends_with(".1"), "{data}");
    f.assert_names(&["..data", data, "a", "c", "sub"]);
    for top in ["a", "c", "sub"] {
        let link = std::fs::read_link(vol.join(top)).unwrap();
        assert_eq!(link, Path::new("..data").join(top));
    }
    assert_eq!(read(&vol.join("a")), "alpha");
    assert_eq!(read(&vol.join("c")), "alpha");
    assert_eq!(read(&vol.join("sub/b")), "beta");
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&vol.join("a")), 0o644);
    assert_eq!(mode(&vol.join(data)), 0o755);
}

#[tokio::test]
async fn an_update_swaps_the_data_and_drops_removed_keys() {
    let f = Fixture::new();
    f.sync(1, vec![file("a", b"1"), file("b", b"1")]).await;
    let old = std::fs::read_link(f.vol().join("..data")).unwrap();
    f.sync(2, vec![file("a", b"2"), file("new", b"2")]).await;
    let new = std::fs::read_link(f.vol().join("..data")).unwrap();
    assert_ne!(old, new);
    let new = new.to_string_lossy().into_owned();
    f.assert_names(&["..data", new.as_str(), "a", "new"]);
    assert_eq!(read(&f.vol().join("a")), "2");
    // An empty volume is a volume too.
    f.sync(3, vec![]).await;
    assert_eq!(f.names().len(), 2, "{:?}", f.names());
    f.volumes.remove("c1", 3).await.unwrap();
    assert!(!f.base.join("c1").exists());
    f.volumes.remove("c1", 3).await.unwrap();
}

#[tokio::test]
async fn a_generation_arrives_in_pieces_and_stale_ones_are_refused() {
    let f = Fixture::new();
    let v = &f.volumes;
    v.sync(request(5, vec![dir("d"), piece("d/big", 0, b"abc")], false))
        .await
        .unwrap();
    // Nothing is visible before the commit.
    assert!(!f.vol().join("..data").exists());
    v.sync(request(5, vec![piece("d/big", 3, b"def")], false))
        .await
        .unwrap();
    v.sync(request(5, vec![piece("d/big", 6, b"g")], true))
        .await
        .unwrap();
    assert_eq!(read(&f.vol().join("d/big")), "abcdefg");

    let stale = v.sync(request(5, vec![], true)).await.unwrap_err();
    assert!(matches!(stale, VolError::FailedPrecondition(_)), "{stale}");
    // A piece that does not continue its file fails the generation, which
    // can then never be committed.
    v.sync(request(6, vec![piece("x", 0, b"ab")], false))
        .await
        .unwrap();
    let gap = v.sync(request(6, vec![piece("x", 5, b"c")], false));
    assert!(matches!(gap.await, Err(VolError::InvalidArgument(_))));
    let after = v.sync(request(6, vec![], true)).await.unwrap_err();
    assert!(matches!(after, VolError::FailedPrecondition(_)), "{after}");
    // A newer generation abandons an unfinished one.
    v.sync(request(7, vec![file("y", b"7")], false))
        .await
        .unwrap();
    assert_eq!(f.sync(8, vec![file("z", b"8")]).await, 8);
    let late = v.sync(request(7, vec![], true)).await.unwrap_err();
    assert!(matches!(late, VolError::FailedPrecondition(_)), "{late}");
    let data = std::fs::read_link(f.vol().join("..data")).unwrap();
    f.assert_names(&["..data", data.to_str().unwrap(), "z"]);
}

#[tokio::test]
async fn paths_from_the_host_never_reach_outside_the_volume() {
    let f = Fixture::new();
    let outside = f.base.parent().unwrap().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("victim"), "untouched").unwrap();
    f.sync(1, vec![file("a", b"1")]).await;
    for (g, bad) in (2..).zip([
        file("../../outside/victim", b"x"),
        file("/etc/passwd", b"x"),
        file("..data/a", b"x"),
        symlink("l", "/etc/shadow"),
        symlink("l", "../../outside"),
        file("nodir/f", b"x"),
    ]) {
        let what = format!("{} -> {}", bad.path, bad.target);
        let err = f.volumes.sync(request(g, vec![bad], true)).await;
        assert!(
            matches!(err, Err(VolError::InvalidArgument(_))),
            "{what}: {err:?}"
        );
    }
    let bad = f.volumes.sync(SyncVolumeRequest {
        container_id: "../x".into(),
        ..request(20, vec![], true)
    });
    assert!(matches!(bad.await, Err(VolError::InvalidArgument(_))));

    // Links planted in the copy (a container with a writable mount) are
    // replaced, never followed.
    std::os::unix::fs::symlink(&outside, f.vol().join("..data_tmp")).unwrap();
    std::fs::remove_file(f.vol().join("a")).unwrap();
    std::os::unix::fs::symlink(outside.join("victim"), f.vol().join("a")).unwrap();
    std::os::unix::fs::symlink(&outside, f.vol().join("planted")).unwrap();
    f.sync(21, vec![file("a", b"11"), dir("sub")]).await;
    assert_eq!(read(&f.vol().join("a")), "11");
    assert_eq!(read(&outside.join("victim")), "untouched");
    assert!(!f.vol().join("planted").exists());
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 1);
}

/// Every read through `..data` sees one whole generation: all of its keys,
/// all with its content. (A reader that resolved `..data` just before the
/// old data was removed may fail to open a file; it never sees a mix.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_never_sees_a_mix_of_generations() {
    let f = Fixture::new();
    let keys = |g: u64| -> Vec<String> {
        let last = if g % 2 == 0 { "even" } else { "odd" };
        vec!["a".into(), "b".into(), "c".into(), last.into()]
    };
    let entries = |g: u64| -> Vec<VolumeEntry> {
        let text = format!("generation {g}");
        keys(g).iter().map(|k| file(k, text.as_bytes())).collect()
    };
    f.sync(1, entries(1)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let vol = f.vol();
    let reader = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut whole, mut vanished) = (0, 0);
            while !stop.load(Ordering::Relaxed) {
                match read_generation(&vol) {
                    Ok((g, mut names)) => {
                        names.sort();
                        let mut want = keys(g);
                        want.sort();
                        assert_eq!(names, want, "generation {g} is incomplete");
                        whole += 1;
                    }
                    Err(Vanished) => vanished += 1,
                }
            }
            (whole, vanished)
        })
    };
    for g in 2..=150 {
        f.sync(g, entries(g)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let (whole, vanished) = reader.join().unwrap();
    assert!(whole > 0, "the reader never read ({vanished} vanished)");
}

struct Vanished;

/// Opens `..data` once and reads every file in it; all must be of one
/// generation (else panics). Err if the data went away while reading.
fn read_generation(vol: &Path) -> Result<(u64, Vec<String>), Vanished> {
    let data = std::fs::read_link(vol.join("..data")).map_err(|_| Vanished)?;
    let dir = vol.join(&data);
    let mut names = Vec::new();
    let mut seen = None;
    for e in std::fs::read_dir(&dir).map_err(|_| Vanished)? {
        let name = e.map_err(|_| Vanished)?.file_name();
        let text = std::fs::read_to_string(dir.join(&name)).map_err(|_| Vanished)?;
        let g: u64 = text.trim_start_matches("generation ").parse().unwrap();
        assert!(seen.is_none_or(|s| s == g), "a mix: {seen:?} and {g}");
        seen = Some(g);
        names.push(name.to_string_lossy().into_owned());
    }
    // The old generation is deleted only after `..data` moved on: if it
    // still points here, nothing was deleted while we listed. Otherwise the
    // listing may miss files removed under it, which is the reader's race
    // (a container reads `..data/<key>`), not a mixed generation.
    if std::fs::read_link(vol.join("..data")).ok().as_deref() != Some(data.as_path()) {
        return Err(Vanished);
    }
    seen.map(|g| (g, names)).ok_or(Vanished)
}

#[tokio::test]
async fn an_update_fires_inotify_watches_on_the_volume() {
    let f = Fixture::new();
    f.sync(1, vec![file("a", b"1")]).await;
    let mut inotify = Inotify::init().unwrap();
    inotify
        .watches()
        .add(
            f.vol(),
            WatchMask::MOVED_TO | WatchMask::CREATE | WatchMask::DELETE,
        )
        .unwrap();
    f.sync(2, vec![file("a", b"2"), file("b", b"2")]).await;
    // The events are queued by the time the sync returns: a non-blocking
    // read sees them.
    let mut buffer = [0; 4096];
    let events: Vec<(String, WatchMask)> = inotify
        .read_events(&mut buffer)
        .unwrap()
        .map(|e| {
            let name = e.name.map(|n| n.to_string_lossy().into_owned());
            (
                name.unwrap_or_default(),
                WatchMask::from_bits_truncate(e.mask.bits()),
            )
        })
        .collect();
    let has =
        |name: &str, mask: WatchMask| events.iter().any(|(n, m)| n == name && m.contains(mask));
    assert!(has("..data", WatchMask::MOVED_TO), "{events:?}");
    assert!(has("..data_tmp", WatchMask::CREATE), "{events:?}");
    assert!(has("b", WatchMask::CREATE), "{events:?}");
}
