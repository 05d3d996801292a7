//! SEC-FS-07 `virtiofsd_raw_fuse` and SEC-FS-06 `virtiofsd_hardening`: a
//! malicious guest kernel against a real virtiofsd started exactly as the
//! shim starts it (SEC-FS-01/-05 on the shim's export layout are in
//! virtiofsd_export_fuse.rs).
//!
//! The harness is the guest: it speaks vhost-user to virtiofsd like a VMM
//! and puts hand-made FUSE requests in the request queue, with names and
//! credentials no honest kernel would send. Each test asserts on what
//! virtiofsd answered and on the host file system afterwards: the canary
//! tree next to the share, the host's /etc and /, and the share's parent.
//!
//! Needs root and virtiofsd (PATH or ~/.cargo/bin); fails without them.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use clh_tests::fuse_frontend::{host_ino, tree, Creds, Entry, Fixture, ROOT_ID};
use nix::errno::Errno;
use nix::libc;
use nix::sys::stat::{makedev, mknod, Mode, SFlag};

const S_IFMT: u32 = libc::S_IFMT;
const S_IFREG: u32 = libc::S_IFREG;
const S_IFDIR: u32 = libc::S_IFDIR;
const S_IFLNK: u32 = libc::S_IFLNK;
const S_IFCHR: u32 = libc::S_IFCHR;
const S_ISUID: u32 = libc::S_ISUID;
const S_ISGID: u32 = libc::S_ISGID;

/// A guest user with no host privileges to borrow.
const USER: Creds = Creds::user(1000, 1000);

/// A FUSE `rdev` for `major:minor` (the kernel's `new_encode_dev`).
fn rdev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
}

/// The names in `dir`, sorted.
fn listing(dir: &Path) -> Vec<std::ffi::OsString> {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

/// The inode numbers the guest may see: the share and what is in it.
fn share_inos(fx: &Fixture) -> Vec<u64> {
    let mut inos: Vec<u64> = tree(&fx.share).values().map(|v| v.0).collect();
    inos.push(host_ino(&fx.share));
    inos
}

/// A LOOKUP that succeeded must have resolved to something in the share,
/// never to the share's parent, the canary tree or the host's /etc.
fn assert_confined(fx: &Fixture, name: &str, entry: &Entry) {
    let outside = [
        fx.parent().to_path_buf(),
        fx.canary.clone(),
        fx.canary.join("secret"),
        "/etc".into(),
        "/etc/passwd".into(),
        "/".into(),
    ];
    for path in &outside {
        assert_ne!(
            entry.attr.ino,
            host_ino(path),
            "LOOKUP {name:?} reached {}",
            path.display()
        );
    }
    assert!(
        share_inos(fx).contains(&entry.attr.ino),
        "LOOKUP {name:?} resolved to inode {} outside the share",
        entry.attr.ino
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookup_never_leaves_the_share() {
    // A decoy /etc inside the share: a name that reaches "/etc" must land here.
    let fx = Fixture::start(|share| {
        std::fs::create_dir(share.join("etc"))?;
        std::fs::write(share.join("etc/passwd"), "decoy\n")?;
        Ok(())
    })
    .await
    .expect("fixture");
    let canary_before = tree(&fx.canary);
    fx.run(|fx| {
        let mut fs = fx.connect()?;
        let share_ino = host_ino(&fx.share);

        // `..` at the root is the root itself, not the share's parent.
        let up = fs.lookup(ROOT_ID, b"..")?.expect("LOOKUP .. at the root");
        assert_eq!(up.attr.ino, share_ino, "`..` of the root");
        assert_ne!(up.attr.ino, host_ino(fx.parent()));
        let mut node = up.nodeid;
        for step in 0..16 {
            let up = fs.lookup(node, b"..")?.expect("LOOKUP .. again");
            assert_eq!(up.attr.ino, share_ino, "`..` #{step} climbed out");
            node = up.nodeid;
        }

        // Names with `/`: the sandbox's root is the share, so absolute and
        // `..`-laden names resolve inside it (the decoy etc) or nowhere.
        let parent = fx.parent().display().to_string();
        let secret = fx.canary.join("secret").display().to_string();
        let no_such = [
            "../canary".to_string(),
            "../canary/secret".to_string(),
            "../../../../../../../../canary/secret".to_string(),
            format!("{parent}/canary"),
            secret.clone(),
            format!("..{secret}"),
            "/tmp".to_string(),
            "../../../tmp".to_string(),
        ];
        for name in &no_such {
            assert_eq!(
                fs.lookup(ROOT_ID, name.as_bytes())?.err(),
                Some(Errno::ENOENT),
                "LOOKUP {name:?}"
            );
        }
        for (name, decoy) in [
            ("/etc", "etc"),
            ("../../etc", "etc"),
            ("/../../etc/passwd", "etc/passwd"),
            ("../../../../etc/passwd", "etc/passwd"),
            ("/", ""),
            ("../../../../../../..", ""),
        ] {
            let entry = fs
                .lookup(ROOT_ID, name.as_bytes())?
                .unwrap_or_else(|e| panic!("LOOKUP {name:?}: {e}"));
            assert_confined(fx, name, &entry);
            assert_eq!(
                entry.attr.ino,
                host_ino(&fx.share.join(decoy)),
                "LOOKUP {name:?}"
            );
        }
        // `..` from inside a directory chains back to the root, no further.
        let etc = fs.lookup(ROOT_ID, b"etc")?.expect("LOOKUP etc");
        let name = "../../../../canary/secret";
        assert_eq!(
            fs.lookup(etc.nodeid, name.as_bytes())?.err(),
            Some(Errno::ENOENT)
        );
        assert_eq!(tree(&fx.canary), canary_before, "the canary tree changed");
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symlink_names_and_targets_stay_in_the_share() {
    let fx = Fixture::start(|_| Ok(())).await.expect("fixture");
    let canary_before = tree(&fx.canary);
    let parent_before = listing(fx.parent());
    let marker = fx.marker.clone();
    fx.run(|fx| {
        let mut fs = fx.connect()?;
        let canary = fx.canary.display().to_string();

        // GHSA-2gv2: the new entry's *name* is an absolute host path.
        let escapes = [
            (format!("{canary}/{marker}"), fx.canary.join(&marker)),
            (format!("/etc/{marker}"), Path::new("/etc").join(&marker)),
            (format!("../canary/{marker}"), fx.canary.join(&marker)),
            (format!("/tmp/{marker}"), Path::new("/tmp").join(&marker)),
        ];
        for (name, host_path) in &escapes {
            let answer = fs.symlink(ROOT_ID, name.as_bytes(), b"/etc/shadow", Creds::ROOT)?;
            assert_eq!(answer.err(), Some(Errno::ENOENT), "SYMLINK named {name:?}");
            assert!(!host_path.exists(), "{} appeared", host_path.display());
        }
        // A name that climbs or is absolute but needs no missing directory
        // is created, in the share: its root is the sandbox's `/`.
        for (name, lands) in [
            (format!("../{marker}-up"), format!("{marker}-up")),
            (format!("/{marker}-abs"), format!("{marker}-abs")),
        ] {
            let made = fs.symlink(ROOT_ID, name.as_bytes(), b"/", Creds::ROOT)?;
            let made = made.unwrap_or_else(|e| panic!("SYMLINK named {name:?}: {e}"));
            assert_eq!(made.attr.ino, host_ino(&fx.share.join(&lands)), "{name:?}");
            assert!(
                !fx.parent().join(&lands).exists(),
                "{name:?} reached the parent"
            );
            assert!(!Path::new("/").join(&lands).exists(), "{name:?} reached /");
        }

        // An absolute *target* is allowed (the guest resolves it in the
        // guest), but virtiofsd never follows it on the host.
        let link = fs
            .symlink(ROOT_ID, b"escape", canary.as_bytes(), Creds::ROOT)?
            .expect("SYMLINK with an absolute target");
        assert_eq!(link.attr.mode & S_IFMT, S_IFLNK);
        assert_eq!(std::fs::read_link(fx.share.join("escape"))?, fx.canary);
        assert_eq!(
            fs.readlink(link.nodeid)?.expect("READLINK"),
            canary.as_bytes()
        );
        for name in ["escape/secret", "escape/../canary/secret", "escape/."] {
            let answer = fs.lookup(ROOT_ID, name.as_bytes())?;
            if let Ok(entry) = &answer {
                assert_confined(fx, name, entry);
            }
            assert_ne!(
                answer.map(|e| e.attr.ino),
                Ok(host_ino(&fx.canary.join("secret")))
            );
        }
        assert_eq!(
            fs.lookup(ROOT_ID, b"escape/secret")?.err(),
            Some(Errno::ENOENT)
        );
        // A relative target that climbs: following it stops at the root.
        fs.symlink(ROOT_ID, b"up", b"../../../..", Creds::ROOT)?
            .expect("SYMLINK up");
        let through = fs.lookup(ROOT_ID, b"up/canary/secret")?;
        assert_eq!(through.err(), Some(Errno::ENOENT));

        assert_eq!(tree(&fx.canary), canary_before, "the canary tree changed");
        assert_eq!(
            listing(fx.parent()),
            parent_before,
            "the share's parent changed"
        );
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_nodes_cannot_be_opened() {
    // CVE-2020-35517: device nodes and a FIFO the host placed in the share,
    // plus a regular file to show that OPEN works at all.
    let fx = Fixture::start(|share| {
        let rw = Mode::from_bits_truncate(0o666);
        mknod(&share.join("hostnull"), SFlag::S_IFCHR, rw, makedev(1, 3))?;
        mknod(&share.join("hostfifo"), SFlag::S_IFIFO, rw, 0)?;
        std::fs::write(share.join("plain"), "plain\n")?;
        Ok(())
    })
    .await
    .expect("fixture");
    fx.run(|fx| {
        let mut fs = fx.connect()?;

        let plain = fs.lookup(ROOT_ID, b"plain")?.expect("LOOKUP plain");
        let fh = fs.open(plain.nodeid, libc::O_RDONLY)?.expect("OPEN plain");
        fs.release(plain.nodeid, fh)?.expect("RELEASE plain");

        // Special files are never opened on the host: EBADF, and at once
        // (opening the FIFO for reading would otherwise block virtiofsd).
        for name in ["hostnull", "hostfifo"] {
            let node = fs.lookup(ROOT_ID, name.as_bytes())?.expect("LOOKUP");
            for flags in [libc::O_RDONLY, libc::O_RDWR, libc::O_WRONLY] {
                let answer = fs.open(node.nodeid, flags)?;
                assert_eq!(answer.err(), Some(Errno::EBADF), "OPEN {name} {flags:#o}");
            }
            // CREATE over an existing special file: virtiofsd creates with
            // O_EXCL; without O_EXCL from the guest it falls back to OPEN.
            for (flags, refused) in [
                (libc::O_RDWR, Errno::EBADF),
                (libc::O_RDWR | libc::O_EXCL, Errno::EEXIST),
            ] {
                let answer = fs.create(
                    ROOT_ID,
                    name.as_bytes(),
                    S_IFREG | 0o666,
                    flags,
                    Creds::ROOT,
                )?;
                assert_eq!(answer.err(), Some(refused), "CREATE {name} {flags:#o}");
            }
        }

        // MKNOD by guest root: the shim starts virtiofsd without CAP_MKNOD
        // (`--modcaps=-mknod`), so no host device node can be made.
        for (name, major, minor) in [("guestnull", 1, 3), ("guestmem", 1, 1)] {
            let made = fs.mknod(
                ROOT_ID,
                name.as_bytes(),
                S_IFCHR | 0o666,
                rdev(major, minor),
                Creds::ROOT,
            )?;
            let host = fx.share.join(name);
            eprintln!(
                "MKNOD {name} {major}:{minor} as guest root: {:?}",
                made.map(|e| e.attr)
            );
            assert_eq!(made.err(), Some(Errno::EPERM), "MKNOD {name} as guest root");
            assert!(!host.exists(), "MKNOD {name} left a node");
        }
        // A guest user cannot make device nodes: virtiofsd takes the
        // caller's uid for MKNOD and CAP_MKNOD goes with root.
        let answer = fs.mknod(ROOT_ID, b"usernull", S_IFCHR | 0o666, rdev(1, 3), USER)?;
        assert_eq!(answer.err(), Some(Errno::EPERM), "MKNOD as uid 1000");
        assert!(!fx.share.join("usernull").exists());
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_user_never_gets_setid_root_files() {
    let fx = Fixture::start(|_| Ok(())).await.expect("fixture");
    fx.run(|fx| {
        let mut fs = fx.connect()?;
        let not_setid_root = |path: &Path| {
            let meta = std::fs::symlink_metadata(path).expect("created on the host");
            let mode = meta.mode();
            eprintln!(
                "{}: mode {mode:o}, {}:{}",
                path.display(),
                meta.uid(),
                meta.gid()
            );
            assert!(
                !(mode & S_ISUID != 0 && meta.uid() == 0),
                "{} is SUID root",
                path.display()
            );
            assert!(
                !(mode & S_ISGID != 0 && meta.gid() == 0),
                "{} is SGID root",
                path.display()
            );
            meta
        };

        // A guest user asks for SUID/SGID bits: it gets them, but on a file
        // of its own uid and gid, as on any local file system.
        for (name, mode) in [("suid", 0o4777), ("sgid", 0o2777), ("both", 0o6777)] {
            let (entry, fh) = fs
                .create(ROOT_ID, name.as_bytes(), S_IFREG | mode, libc::O_RDWR, USER)?
                .unwrap_or_else(|e| panic!("CREATE {name}: {e}"));
            fs.release(entry.nodeid, fh)?.expect("RELEASE");
            let meta = not_setid_root(&fx.share.join(name));
            assert_eq!((meta.uid(), meta.gid()), (USER.uid, USER.gid), "{name}");
        }
        let dir = fs
            .mkdir(ROOT_ID, b"userdir", S_IFDIR | 0o2777, USER)?
            .expect("MKDIR");
        assert_eq!((dir.attr.uid, dir.attr.gid), (USER.uid, USER.gid));
        not_setid_root(&fx.share.join("userdir"));

        // CVE-2022-0358: in an SGID directory of group root, a guest user's
        // new file inherits group root, so it must lose its SGID bit
        // (virtiofsd dropped its supplementary groups and CAP_FSETID).
        let rootdir = fs
            .mkdir(ROOT_ID, b"rootsgid", S_IFDIR | 0o777, Creds::ROOT)?
            .expect("MKDIR");
        let attr = fs
            .chmod(rootdir.nodeid, 0o3777, Creds::ROOT)?
            .expect("SETATTR mode");
        assert_eq!((attr.mode & 0o7777, attr.gid), (0o3777, 0));
        let (entry, fh) = fs
            .create(rootdir.nodeid, b"f", S_IFREG | 0o2755, libc::O_RDWR, USER)?
            .expect("CREATE in the SGID dir");
        fs.release(entry.nodeid, fh)?.expect("RELEASE");
        let meta = not_setid_root(&fx.share.join("rootsgid/f"));
        assert_eq!(
            (meta.uid(), meta.gid()),
            (USER.uid, 0),
            "inherits the dir's group"
        );
        let made = fs
            .mknod(rootdir.nodeid, b"n", S_IFREG | 0o2755, 0, USER)?
            .expect("MKNOD");
        assert_eq!(made.attr.gid, 0);
        not_setid_root(&fx.share.join("rootsgid/n"));
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_and_forged_node_ids_stay_in_the_share() {
    let fx = Fixture::start(|share| Ok(std::fs::write(share.join("file"), "in share\n")?))
        .await
        .expect("fixture");
    let canary_before = tree(&fx.canary);
    let marker = fx.marker.clone();
    fx.run(|fx| {
        let mut fs = fx.connect()?;
        let file = fs.lookup(ROOT_ID, b"file")?.expect("LOOKUP file");

        // LINK's new name across the boundary.
        let canary = fx.canary.display().to_string();
        for (name, host) in [
            (format!("../canary/{marker}"), fx.canary.join(&marker)),
            (format!("{canary}/{marker}"), fx.canary.join(&marker)),
            (format!("/tmp/{marker}"), Path::new("/tmp").join(&marker)),
        ] {
            let answer = fs.link(file.nodeid, ROOT_ID, name.as_bytes())?;
            assert_eq!(answer.err(), Some(Errno::ENOENT), "LINK as {name:?}");
            assert!(!host.exists(), "{} appeared", host.display());
        }

        // Node ids are virtiofsd's own handles, not host inode numbers or
        // file handles: a guessed one names nothing.
        let secret_ino = host_ino(&fx.canary.join("secret"));
        for forged in [secret_ino, host_ino(&fx.canary), 0xdead_beef, u64::MAX] {
            assert_eq!(
                fs.getattr(forged)?.err(),
                Some(Errno::EBADF),
                "GETATTR {forged}"
            );
            assert_eq!(
                fs.lookup(forged, b"secret")?.err(),
                Some(Errno::EBADF),
                "LOOKUP in {forged}"
            );
            assert_eq!(
                fs.open(forged, libc::O_RDONLY)?.err(),
                Some(Errno::EBADF),
                "OPEN {forged}"
            );
            let answer = fs.link(forged, ROOT_ID, marker.as_bytes())?;
            assert_eq!(answer.err(), Some(Errno::EBADF), "LINK from {forged}");
        }
        assert!(!fx.share.join(&marker).exists());
        assert_eq!(tree(&fx.canary), canary_before, "the canary tree changed");
        Ok(())
    })
    .await;
}

/// virtiofsd's children: once it has answered a request, just the
/// sandboxed worker (the id-mapping helper is reaped before it is forked).
fn children_of(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn status_field(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .map(|v| v.trim().to_string())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn virtiofsd_hardening() {
    let fx = Fixture::start(|share| Ok(std::fs::write(share.join("file"), "in share\n")?))
        .await
        .expect("fixture");
    let pid = fx.virtiofsd().pid();
    fx.run(|fx| {
        // A reply to FUSE_INIT and a LOOKUP proves the worker has entered
        // its sandbox (it serves only from inside); until then its root may
        // still be the host's.
        let mut fs = fx.connect()?;
        let file = fs.lookup(ROOT_ID, b"file")?.expect("LOOKUP file");
        assert_eq!(
            file.attr.ino,
            host_ino(&fx.share.join("file")),
            "it serves the share"
        );
        let workers = children_of(pid);
        assert_eq!(workers.len(), 1, "virtiofsd's children: {workers:?}");
        let worker = workers[0];

        let argv: Vec<String> = std::fs::read(format!("/proc/{pid}/cmdline"))?
            .split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let value = |flag: &str| {
            let at = argv.iter().position(|a| a == flag);
            at.and_then(|i| argv.get(i + 1)).map(String::as_str)
        };
        assert_eq!(value("--sandbox"), Some("namespace"), "{argv:?}");
        assert!(
            matches!(value("--seccomp"), Some(s) if s != "none"),
            "{argv:?}"
        );
        assert_eq!(
            value("--shared-dir"),
            Some(&*fx.share.to_string_lossy()),
            "{argv:?}"
        );
        assert_eq!(value("--cache"), Some("auto"), "{argv:?}");
        // Nothing a pod could have added (GHSA-rr59): only the flags the
        // shim sets, each once.
        let expected = [
            "--shared-dir",
            "--socket-path",
            "--sandbox",
            "namespace",
            "--seccomp",
            "kill",
            "--modcaps=-mknod",
            "--cache",
            "auto",
        ];
        let flags: Vec<&str> = argv
            .iter()
            .skip(1)
            .map(String::as_str)
            .filter(|a| a.starts_with("--") || expected.contains(a))
            .collect();
        assert_eq!(flags, expected, "{argv:?}");

        // The worker lives in its own mount, pid and net namespaces, and its
        // root is the share, not the host's `/`.
        for ns in ["mnt", "pid", "net"] {
            let ours = std::fs::read_link(format!("/proc/self/ns/{ns}"))?;
            let its = std::fs::read_link(format!("/proc/{worker}/ns/{ns}"))?;
            assert_ne!(its, ours, "the worker shares our {ns} namespace");
        }
        let root = std::fs::metadata(format!("/proc/{worker}/root"))?;
        let share = std::fs::metadata(&fx.share)?;
        let host_root = std::fs::metadata("/")?;
        assert_eq!(
            (root.dev(), root.ino()),
            (share.dev(), share.ino()),
            "the worker's root"
        );
        assert_ne!((root.dev(), root.ino()), (host_root.dev(), host_root.ino()));
        eprintln!(
            "worker {worker}: root -> {:?}",
            std::fs::read_link(format!("/proc/{worker}/root"))
        );
        assert_eq!(status_field(worker, "Seccomp"), "2", "seccomp filter mode");
        assert_eq!(status_field(worker, "NoNewPrivs"), "1");
        eprintln!("worker {worker}: CapEff {}", status_field(worker, "CapEff"));
        Ok(())
    })
    .await;
}
