//! install and uninstall against a scratch host root, without VMs: the
//! paths the end-to-end tests (tests/tests/node_install.rs) do not take.

use std::fs;
use std::path::{Path, PathBuf};

use clh_install::{install, uninstall, InstallError, Major, Options, Restart};

/// A scratch host root and a payload whose "shim" is a copy of sleep.
struct Host {
    dir: tempfile::TempDir,
}

impl Host {
    fn new() -> Host {
        let dir = tempfile::tempdir().expect("setting up the scratch host");
        let p = dir.path().join("payload");
        for sub in ["bin", "share/clh-shim", "etc/clh-shim"] {
            fs::create_dir_all(p.join(sub)).expect("setting up the scratch host");
        }
        fs::copy("/bin/sleep", p.join("bin/containerd-shim-clh-v2"))
            .expect("setting up the scratch host");
        for f in ["vmlinux", "vmlinuz", "initramfs.cpio.gz"] {
            fs::write(p.join("share/clh-shim").join(f), f).expect("setting up the scratch host");
        }
        fs::write(p.join("etc/clh-shim/config.toml"), "").expect("setting up the scratch host");
        fs::create_dir_all(dir.path().join("root/etc/containerd"))
            .expect("setting up the scratch host");
        Host { dir }
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    fn opts(&self) -> Options {
        let mut o = Options::new(self.dir.path().join("payload"));
        o.host_root = self.root();
        o.containerd_major = Some(Major::Two);
        // The test host forbids entering PID 1's mount namespace; the
        // restart command is tested end to end (node_install.rs).
        o.restart = Restart::Never;
        o
    }

    fn main_config(&self) -> PathBuf {
        self.root().join("etc/containerd/config.toml")
    }

    fn listing(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        walk(&self.root(), &mut out);
        out.sort();
        out
    }
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir)
        .expect("setting up the scratch host")
        .flatten()
    {
        out.push(e.path());
        if e.file_type().expect("setting up the scratch host").is_dir() {
            walk(&e.path(), out);
        }
    }
}

const ORIGINAL: &str = "version = 3\n# the admin's\n[plugins.'io.containerd.cri.v1.images']\n  snapshotter = \"overlayfs\"\n";

#[test]
fn deploy_cleanup_deploy_cleanup_leaves_the_node_as_it_was() {
    let h = Host::new();
    fs::write(h.main_config(), ORIGINAL).unwrap();
    let before = h.listing();
    for round in 0..2 {
        let r = install(&h.opts()).unwrap();
        assert!(r.containerd_config_changed, "round {round}: {r:?}");
        // Paths in the host's files are the host's, not the installer's.
        let drop_in = fs::read_to_string(h.root().join("etc/containerd/conf.d/clh.toml")).unwrap();
        assert!(
            drop_in.contains("runtime_path = \"/opt/clh-shim/current/bin/containerd-shim-clh-v2\""),
            "{drop_in}"
        );
        let r = uninstall(&h.opts(), false).unwrap();
        assert!(r.containerd_config_changed, "{r:?}");
        assert_eq!(
            fs::read_to_string(h.main_config()).unwrap(),
            ORIGINAL,
            "round {round}"
        );
        assert_eq!(h.listing(), before, "round {round}: {r:?}");
    }
}

#[test]
fn an_admins_later_edit_survives_uninstall() {
    let h = Host::new();
    fs::write(h.main_config(), ORIGINAL).unwrap();
    install(&h.opts()).unwrap();
    let installed = fs::read_to_string(h.main_config()).unwrap();
    fs::write(
        h.main_config(),
        format!("{installed}\n[debug]\n  level = \"debug\"\n"),
    )
    .unwrap();
    let r = uninstall(&h.opts(), false).unwrap();
    let now = fs::read_to_string(h.main_config()).unwrap();
    assert!(
        now.contains("level = \"debug\""),
        "the admin's edit is kept:\n{now}"
    );
    assert!(!now.contains("clh.toml"), "our import is gone:\n{now}");
    assert!(
        r.lines.iter().any(|l| l.contains("changed since install")),
        "{r:?}"
    );
}

#[test]
fn a_config_install_created_is_removed_again() {
    let h = Host::new();
    install(&h.opts()).unwrap();
    assert_eq!(
        fs::read_to_string(h.main_config()).unwrap(),
        "version = 3\nimports = [\"/etc/containerd/conf.d/clh.toml\"]\n"
    );
    uninstall(&h.opts(), false).unwrap();
    assert!(!h.main_config().exists());
    assert!(!h.root().join("opt").exists(), "{:?}", h.listing());
}

#[test]
fn uninstall_refuses_while_a_version_runs_and_force_keeps_its_files() {
    let h = Host::new();
    fs::write(h.main_config(), ORIGINAL).unwrap();
    install(&h.opts()).unwrap();
    let shim = h
        .root()
        .join("opt/clh-shim/current/bin/containerd-shim-clh-v2");
    let mut running = std::process::Command::new(&shim).arg("60").spawn().unwrap();
    let err = uninstall(&h.opts(), false).unwrap_err();
    assert!(
        matches!(&err, InstallError::InUse { pids, .. } if pids == &[running.id()]),
        "{err}"
    );
    assert!(err.to_string().contains("drain"), "{err}");
    assert!(
        h.main_config().exists() && fs::read_to_string(h.main_config()).unwrap() != ORIGINAL,
        "nothing undone yet"
    );
    uninstall(&h.opts(), true).unwrap();
    assert_eq!(fs::read_to_string(h.main_config()).unwrap(), ORIGINAL);
    assert!(shim.exists(), "the running version's files stay");
    running.kill().unwrap();
    running.wait().unwrap();
    // A later uninstall takes what is left.
    uninstall(&h.opts(), false).unwrap();
    assert!(!h.root().join("opt/clh-shim").exists(), "{:?}", h.listing());
}

#[test]
fn a_bad_shim_config_is_refused_before_anything_changes() {
    let h = Host::new();
    fs::write(h.main_config(), ORIGINAL).unwrap();
    let bad = h.dir.path().join("bad.toml");
    fs::write(&bad, "[guest]\nvcpus = \"many\"\n").unwrap();
    let mut o = h.opts();
    o.shim_config = Some(bad);
    let err = install(&o).unwrap_err();
    assert!(err.to_string().contains("vcpus"), "{err}");
    assert_eq!(fs::read_to_string(h.main_config()).unwrap(), ORIGINAL);
}

#[test]
fn the_installed_versions_own_installer_uninstalls_it() {
    // make node-uninstall runs /opt/clh-shim/current/bin/clh-install: it
    // runs from the version it removes, and must not count as its user.
    let h = Host::new();
    fs::write(h.main_config(), ORIGINAL).unwrap();
    fs::copy(
        env!("CARGO_BIN_EXE_clh-install"),
        h.dir.path().join("payload/bin/clh-install"),
    )
    .unwrap();
    install(&h.opts()).unwrap();
    let own = h.root().join("opt/clh-shim/current/bin/clh-install");
    let out = std::process::Command::new(&own)
        .arg("uninstall")
        .arg("--host-root")
        .arg(h.root())
        .arg("--no-restart")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(fs::read_to_string(h.main_config()).unwrap(), ORIGINAL);
    assert!(!h.root().join("opt/clh-shim").exists(), "{:?}", h.listing());
}

#[test]
fn a_refused_install_leaves_the_node_as_it_was() {
    let h = Host::new();
    fs::write(h.main_config(), ORIGINAL).unwrap();
    let before = h.listing();
    let mut o = h.opts();
    // No containerd in this host root to ask for its version.
    o.containerd_major = None;
    o.containerd_binary = Some("/usr/bin/containerd".into());
    let err = install(&o).unwrap_err();
    assert!(err.to_string().contains("--containerd-version"), "{err}");
    assert_eq!(h.listing(), before);
    // Nor does a config it cannot edit.
    fs::write(h.main_config(), "root = \"/var/lib/containerd\"\n").unwrap();
    let err = install(&h.opts()).unwrap_err();
    assert!(err.to_string().contains("migrate"), "{err}");
    assert_eq!(h.listing(), before);
}
