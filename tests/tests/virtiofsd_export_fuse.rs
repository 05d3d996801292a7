//! SEC-FS-01 and SEC-FS-05 with raw FUSE requests (the harness of
//! virtiofsd_raw_fuse.rs is the malicious guest kernel) against the shim's
//! own shared-directory layout: the read-only slave export of a private
//! tree, with volumes bound into it by file descriptor after virtiofsd
//! started. Needs root and virtiofsd; fails without them.

use std::path::Path;

use clh_tests::fuse_frontend::{Creds, Fixture, ROOT_ID};
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

/// SEC-FS-01, SEC-FS-02 (the swap half) and SEC-FS-05 against the shim's own layout: the share is the
/// read-only slave export of a private tree (shared_mount.rs), and volumes
/// are bound into the private tree after virtiofsd started, one read-only
/// and one read-write (bind_mount.rs). Guest root can plant nothing in the
/// layout, cannot write the read-only volume, and can write the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_export_is_read_only_to_the_guest() {
    use containerd_shim_clh_v2::bind_mount::{bind, BindOptions, SubmountPolicy};
    use containerd_shim_clh_v2::shared_mount::{mount_export, mount_staging};
    let fx = Fixture::start(|share| {
        let parent = share.parent().expect("the share has a parent");
        let private = parent.join("private");
        std::fs::create_dir_all(private.join("c1/mounts/0"))?;
        std::fs::create_dir_all(private.join("c1/mounts/1"))?;
        for (dir, content) in [("ro-src", "read only\n"), ("rw-src", "writable\n")] {
            std::fs::create_dir(parent.join(dir))?;
            std::fs::write(parent.join(dir).join("f"), content)?;
        }
        std::fs::create_dir(parent.join("staging"))?;
        mount_export(&private, share)?;
        mount_staging(&parent.join("staging"))
    })
    .await
    .expect("fixture");
    let parent = fx.parent().to_path_buf();
    let private = parent.join("private");
    let staging = parent.join("staging");
    let mounts = ExportMounts(vec![fx.share.clone(), private.clone(), staging.clone()]);
    let policy = SubmountPolicy {
        staging,
        hidden: Vec::new(),
    };
    // Volumes arrive after virtiofsd started, as a pod's containers do.
    for (n, src, readonly) in [(0, "ro-src", true), (1, "rw-src", false)] {
        let opts = BindOptions {
            recursive: true,
            readonly,
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
