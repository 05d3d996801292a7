//! SEC-FS-01 and SEC-FS-05 with raw FUSE requests (the harness of
//! virtiofsd_raw_fuse.rs is the malicious guest kernel) against the shim's
//! own shared-directory layout: the read-only slave export of a private
//! tree, with volumes bound into it by file descriptor after virtiofsd
//! started. Needs root and virtiofsd; fails without them.

use std::path::Path;

use clh_tests::fuse_frontend::{Creds, Fixture, ROOT_ID};
use containerd_shim_clh_v2::bind_mount::SubmountPolicy;
use nix::errno::Errno;
use nix::libc;

/// The names in `dir`, sorted.
fn listing(dir: &Path) -> Vec<std::ffi::OsString> {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

/// Unmounts the export layout of [`the_export_is_read_only_to_the_guest`]
/// whatever the test body did.
struct ExportMounts(Vec<std::path::PathBuf>);

impl Drop for ExportMounts {
    fn drop(&mut self) {
        use nix::mount::{umount2, MntFlags};
        for dir in &self.0 {
            while umount2(dir, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW).is_ok() {}
        }
    }
}

/// virtiofsd on the shim's layout: `private/` with `dirs` made in it,
/// exported read-only as the share, the staging mount beside it (where
/// recursive binds are trimmed), and two volume sources, `ro-src/f` and
/// `rw-src/f` holding `ro` and `rw`. Returns the policy `bind` needs.
async fn export_fixture(
    dirs: &[&str],
    ro: &str,
    rw: &str,
) -> (Fixture, ExportMounts, SubmountPolicy) {
    use containerd_shim_clh_v2::shared_mount::{mount_export, mount_staging};
    let fx = Fixture::start(|share| {
        let parent = share.parent().expect("the share has a parent");
        let private = parent.join("private");
        for dir in dirs {
            std::fs::create_dir_all(private.join(dir))?;
        }
        for (dir, content) in [("ro-src", ro), ("rw-src", rw)] {
            std::fs::create_dir(parent.join(dir))?;
            std::fs::write(parent.join(dir).join("f"), content)?;
        }
        std::fs::create_dir(parent.join("staging"))?;
        mount_export(&private, share)?;
        mount_staging(&parent.join("staging"))
    })
    .await
    .expect("fixture");
    let staging = fx.parent().join("staging");
    let mounts = ExportMounts(vec![
        fx.share.clone(),
        fx.parent().join("private"),
        staging.clone(),
    ]);
    let policy = SubmountPolicy {
        staging,
        hidden: Vec::new(),
    };
    (fx, mounts, policy)
}

/// SEC-FS-01, SEC-FS-02 (the swap half) and SEC-FS-05 against the shim's own layout: the share is the
/// read-only slave export of a private tree (shared_mount.rs), and volumes
/// are bound into the private tree after virtiofsd started, one read-only
/// and one read-write (bind_mount.rs). Guest root can plant nothing in the
/// layout, cannot write the read-only volume, and can write the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_export_is_read_only_to_the_guest() {
    use containerd_shim_clh_v2::bind_mount::{bind, BindOptions};
    let (fx, mounts, policy) =
        export_fixture(&["c1/mounts/0", "c1/mounts/1"], "read only\n", "writable\n").await;
    let parent = fx.parent().to_path_buf();
    let private = parent.join("private");
    // Volumes arrive after virtiofsd started, as a pod's containers do.
    for (n, src, readonly) in [(0, "ro-src", true), (1, "rw-src", false)] {
        let opts = BindOptions {
            recursive: true,
            readonly,
            ..Default::default()
        };
        bind(
            &parent.join(src),
            &private.join(format!("c1/mounts/{n}")),
            opts,
            &policy,
        )
        .expect("binding a volume");
    }
    fx.run(|fx| {
        let _mounts = mounts;
        let mut fs = fx.connect()?;
        let c1 = fs.lookup(ROOT_ID, b"c1")?.expect("LOOKUP c1");
        let dirs = fs.lookup(c1.nodeid, b"mounts")?.expect("LOOKUP mounts");
        // SEC-FS-01: nothing can be planted where the host mounts.
        for (parent, name) in [(ROOT_ID, "c2"), (c1.nodeid, "rootfs2"), (dirs.nodeid, "2")] {
            let planted = fs.symlink(parent, name.as_bytes(), b"/", Creds::ROOT)?;
            assert_eq!(planted.err(), Some(Errno::EROFS), "SYMLINK {name}");
            let made = fs.mkdir(parent, name.as_bytes(), 0o755, Creds::ROOT)?;
            assert_eq!(made.err(), Some(Errno::EROFS), "MKDIR {name}");
        }
        // SEC-FS-02: nor can the container's directory or its mount points
        // be moved aside or removed, so no symlink can take their place
        // before the host's teardown unmounts there.
        for (parent, name) in [(ROOT_ID, "c1"), (c1.nodeid, "mounts"), (dirs.nodeid, "0")] {
            let moved = fs.rename(parent, name.as_bytes(), parent, b"swapped")?;
            assert_eq!(moved.err(), Some(Errno::EROFS), "RENAME {name}");
            let removed = fs.rmdir(parent, name.as_bytes())?;
            assert_eq!(removed.err(), Some(Errno::EROFS), "RMDIR {name}");
        }
        // SEC-FS-05: the read-only volume is read-only to guest root.
        let ro = fs.lookup(dirs.nodeid, b"0")?.expect("LOOKUP 0");
        let file = fs.lookup(ro.nodeid, b"f")?.expect("LOOKUP 0/f");
        let created = fs.create(ro.nodeid, b"new", 0o644, libc::O_WRONLY, Creds::ROOT)?;
        assert_eq!(created.err(), Some(Errno::EROFS), "CREATE in the ro volume");
        let chmod = fs.chmod(file.nodeid, 0o777, Creds::ROOT)?;
        assert_eq!(chmod.err(), Some(Errno::EROFS), "SETATTR in the ro volume");
        let open = fs.open(file.nodeid, libc::O_RDWR)?;
        assert_eq!(open.err(), Some(Errno::EROFS), "OPEN rw in the ro volume");
        // The read-write volume is writable: the failures above are the
        // layout's doing, not a share that refuses everything.
        let rw = fs.lookup(dirs.nodeid, b"1")?.expect("LOOKUP 1");
        fs.create(rw.nodeid, b"new", 0o644, libc::O_WRONLY, Creds::ROOT)?
            .expect("CREATE in the rw volume");
        let parent = fx.parent();
        assert!(parent.join("rw-src/new").exists());
        assert_eq!(
            std::fs::read_to_string(parent.join("ro-src/f"))?,
            "read only\n"
        );
        assert_eq!(listing(&parent.join("ro-src")), vec!["f"]);
        assert_eq!(listing(&parent.join("private")), vec!["c1"]);
        Ok(())
    })
    .await;
}

/// How many times the guest tries each mutation in
/// [`sec_fs_03_share_toctou_race`].
const RACE_ROUNDS: usize = 10_000;
/// The volume mountpoints the host makes and removes over and over.
const RACE_SLOTS: usize = 8;

/// SEC-FS-03: guest root races the host while the host makes volume
/// mountpoints in the private tree and binds volumes onto them (a pod's
/// containers coming and going), trying 10k times to plant, rename or
/// remove entries where the host mounts. Every attempt fails (the export is
/// read-only), and no bind of a volume ever lands outside the sandbox tree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sec_fs_03_share_toctou_race() {
    use containerd_shim_clh_v2::bind_mount::{bind, BindOptions};
    use nix::mount::{umount2, MntFlags};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    let (fx, mounts, policy) = export_fixture(&["c1/mounts"], "volume\n", "volume\n").await;
    let parent = fx.parent().to_path_buf();
    let private = parent.join("private");
    fx.run(|fx| {
        let _mounts = mounts;
        let done = AtomicBool::new(false);
        let binds = AtomicUsize::new(0);
        let slot_dir = |n: usize| private.join(format!("c1/mounts/{n}"));
        std::thread::scope(|scope| {
            // The host: mountpoints made, bound, unbound and removed in turn.
            let host = scope.spawn(|| -> anyhow::Result<()> {
                let mut n = 0;
                while !done.load(Ordering::Relaxed) {
                    let target = slot_dir(n % RACE_SLOTS);
                    std::fs::create_dir(&target)?;
                    let (src, readonly) = if n % 2 == 0 {
                        ("ro-src", true)
                    } else {
                        ("rw-src", false)
                    };
                    let opts = BindOptions {
                        recursive: true,
                        readonly,
                        ..Default::default()
                    };
                    bind(&parent.join(src), &target, opts, &policy)?;
                    binds.fetch_add(1, Ordering::Relaxed);
                    umount2(&target, MntFlags::UMOUNT_NOFOLLOW | MntFlags::MNT_DETACH)?;
                    std::fs::remove_dir(&target)?;
                    n += 1;
                }
                Ok(())
            });
            let guest = race_as_guest(fx);
            done.store(true, Ordering::Relaxed);
            let host = host.join().expect("the host thread panicked");
            guest.and(host)
        })?;
        let binds = binds.load(Ordering::Relaxed);
        println!("the host made {binds} binds while the guest raced");
        assert!(binds > 0, "the host made no bind while the guest raced");
        // Every bind of a volume sits under the sandbox tree: a mount whose
        // root is one of the sources and whose mount point is elsewhere
        // would be the shim mounting through a guest-planted path.
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
        let tree = parent.to_string_lossy().into_owned();
        for line in mountinfo.lines() {
            let fields: Vec<&str> = line.split(' ').collect();
            let (root, point) = (fields[3], fields[4]);
            if root.contains("ro-src") || root.contains("rw-src") {
                assert!(point.starts_with(&tree), "a volume landed outside: {line}");
            }
        }
        assert!(listing(&private.join("c1/mounts")).is_empty());
        assert_eq!(listing(&parent.join("share")), vec!["c1"]);
        assert_eq!(
            std::fs::read_to_string(fx.canary.join("secret"))?,
            "host only\n"
        );
        Ok(())
    })
    .await;
}

/// The guest side of [`sec_fs_03_share_toctou_race`]: plants, renames and
/// removes entries at every level where the host mounts; fails on the
/// first mutation that succeeds.
fn race_as_guest(fx: &Fixture) -> anyhow::Result<()> {
    let mut fs = fx.connect()?;
    let c1 = fs.lookup(ROOT_ID, b"c1")?.expect("LOOKUP c1").nodeid;
    let dirs = fs.lookup(c1, b"mounts")?.expect("LOOKUP mounts").nodeid;
    let mut refused_read_only = 0usize;
    for round in 0..RACE_ROUNDS {
        let slot = format!("{}", round % RACE_SLOTS);
        let slot = slot.as_bytes();
        let (parent, name): (u64, &[u8]) = match round % 3 {
            0 => (ROOT_ID, b"c1"),
            1 => (c1, b"mounts"),
            _ => (dirs, slot),
        };
        let attempts: [(&str, Result<(), Errno>); 5] = [
            (
                "SYMLINK",
                fs.symlink(parent, name, b"/", Creds::ROOT)?.map(drop),
            ),
            (
                "MKDIR",
                fs.mkdir(parent, name, 0o755, Creds::ROOT)?.map(drop),
            ),
            ("RENAME", fs.rename(parent, name, parent, b"moved")?),
            ("RMDIR", fs.rmdir(parent, name)?),
            ("UNLINK", fs.unlink(parent, name)?),
        ];
        for (op, answer) in attempts {
            match answer {
                Ok(()) => anyhow::bail!(
                    "round {round}: {op} {} in the read-only export succeeded",
                    String::from_utf8_lossy(name)
                ),
                Err(Errno::EROFS) => refused_read_only += 1,
                // The slot is not there at this instant, or is there and
                // of the other kind: refused before the write check.
                Err(Errno::ENOENT | Errno::EEXIST | Errno::ENOTDIR | Errno::EISDIR) => {}
                Err(e) => anyhow::bail!("round {round}: {op} failed with {e}, not EROFS"),
            }
        }
    }
    println!("{refused_read_only} guest mutations refused with EROFS");
    anyhow::ensure!(
        refused_read_only > RACE_ROUNDS,
        "only {refused_read_only} mutations reached the read-only check"
    );
    Ok(())
}
