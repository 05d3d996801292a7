//! A guest turning volume sync against the host, through CRI with the
//! `clh` handler, as an attacker would: a container writes the kubelet's
//! atomic-writer layout (`..data -> ..<ts>`) into a volume it can write,
//! a container that mounts that volume read-only makes the shim treat it
//! like a ConfigMap, then the writer swaps `..data` to `..x`, a symlink to
//! a host directory. A shim that followed it would copy the host
//! directory, as root, into the guest. The host directory holds a canary:
//! a random secret in a file of mode 0600 owned by root, in a directory of
//! mode 0700. The secret must never show in the guest.
//!
//! - `sec_sync_01_guest_writable_volume_is_not_synced`: the writer and the
//!   reader are in one pod; the volume is the pod's read-write share, so
//!   the reader's mount stays a plain virtio-fs mount (writable_shares.rs).
//! - `sec_sync_02_synced_volume_never_follows_links`: the writer is in
//!   another pod, which the reader's shim cannot know of: the volume is
//!   synced, and the reader of the host directory never follows the link
//!   (volume_sync/volume_dir.rs); the sync keeps working afterwards.
//!
//! Each ends with the CRI and shim leak checks. Run one at a time
//! (`-- --test-threads=1`): each boots VMs.

use std::hash::{BuildHasher, Hasher};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use clh_tests::cri::{ContainerBuilder, CriSetup, Kubelet, Pod, BUSYBOX};
use clh_tests::ctr;

/// How long the secret is looked for after the swap: several of the
/// sync's 1 s rechecks, beside the inotify event that comes at once.
const WATCH_FOR_LEAK: Duration = Duration::from_secs(5);
/// Where the volume is in the containers.
const WRITER_DIR: &str = "/shared";
const READER_DIR: &str = "/cfg";

fn setup() -> (ctr::Setup, CriSetup) {
    let s = ctr::setup().expect("shim setup");
    let images = Path::new(env!("CARGO_TARGET_TMPDIR"));
    ctr::cri_test_setup(s, images, 60_000)
}

/// The host side: the volume a guest can write, and the canary.
struct Host {
    _tmp: tempfile::TempDir,
    volume: PathBuf,
    canary_dir: PathBuf,
    secret: String,
}

impl Host {
    fn new(volume: &str) -> Result<Host> {
        let tmp = tempfile::Builder::new()
            .prefix("sec-sync-")
            .tempdir_in("/tmp")?;
        let volume = tmp.path().join(volume);
        std::fs::create_dir_all(&volume)?;
        let canary_dir = tmp.path().join("canary");
        std::fs::create_dir(&canary_dir)?;
        std::fs::set_permissions(&canary_dir, std::fs::Permissions::from_mode(0o700))?;
        let random = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        let secret = format!("canary-{random:016x}");
        let file = canary_dir.join("secret");
        std::fs::write(&file, &secret)?;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))?;
        ensure!(
            nix::unistd::geteuid().is_root(),
            "the canary must be root's"
        );
        Ok(Host {
            _tmp: tmp,
            volume,
            canary_dir,
            secret,
        })
    }

    fn path(&self) -> &str {
        self.volume.to_str().unwrap_or_default()
    }
}

/// The writer: lays the volume out like a ConfigMap with `key` = `v1`.
fn writer(k: &Kubelet, pod: &Pod, host: &Host) -> Result<String> {
    let c = ContainerBuilder::new("writer", BUSYBOX)
        .command(&["sleep", "100000"])
        .mount(host.path(), WRITER_DIR, false);
    let id = k.run_container(pod, &c)?;
    let d = WRITER_DIR;
    k.sh(
        &id,
        &format!(
            "mkdir {d}/..2026_01 && echo v1 > {d}/..2026_01/key && \
             ln -s ..2026_01 {d}/..data && ln -s ..data/key {d}/key"
        ),
    )?;
    Ok(id)
}

/// The reader: mounts the volume read-only, as a ConfigMap is mounted.
fn reader(k: &Kubelet, pod: &Pod, host: &Host) -> Result<String> {
    let c = ContainerBuilder::new("reader", BUSYBOX)
        .command(&["sleep", "100000"])
        .mount(host.path(), READER_DIR, true);
    let id = k.run_container(pod, &c)?;
    let key = k.sh(&id, &format!("cat {READER_DIR}/key"))?;
    ensure!(key == "v1\n", "the reader sees {key:?}");
    Ok(id)
}

/// The file system type of the reader's volume mount.
fn reader_fstype(k: &Kubelet, reader: &str) -> Result<String> {
    let script = format!("awk '$2 == \"{READER_DIR}\" {{print $3}}' /proc/mounts");
    Ok(k.sh(reader, &script)?.trim().to_owned())
}

/// The attack: `..x -> <the canary's host directory>`, `..data -> ..x`.
fn swap_to_host_dir(k: &Kubelet, writer: &str, host: &Host) -> Result<()> {
    let d = WRITER_DIR;
    let canary = host.canary_dir.display();
    k.sh(
        writer,
        &format!(
            "ln -s {canary} {d}/..x && ln -s ..x {d}/..data_tmp && mv -T {d}/..data_tmp {d}/..data"
        ),
    )?;
    let data = k.sh(writer, &format!("readlink {d}/..data"))?;
    ensure!(
        data == "..x\n",
        "the swap did not happen: ..data -> {data:?}"
    );
    Ok(())
}

/// Looks for the secret in everything the reader's volume shows, again
/// and again for [`WATCH_FOR_LEAK`]; fails the moment it appears.
fn secret_never_shows(k: &Kubelet, reader: &str, host: &Host) -> Result<()> {
    let r = READER_DIR;
    let script =
        format!("cat {r}/secret {r}/..data/secret {r}/..x/secret {r}/*/* 2>/dev/null; true");
    let deadline = Instant::now() + WATCH_FOR_LEAK;
    let mut looks = 0;
    while Instant::now() < deadline || looks < 3 {
        let seen = k.sh(reader, &script)?;
        ensure!(
            !seen.contains(&host.secret),
            "the host's canary reached the guest after {looks} looks: {seen:?}"
        );
        looks += 1;
    }
    Ok(())
}

#[test]
fn sec_sync_01_guest_writable_volume_is_not_synced() {
    let (_s, cri) = setup();
    one_pod(&cri).unwrap();
}

fn one_pod(setup: &CriSetup) -> Result<()> {
    let host = Host::new("pod/volumes/kubernetes.io~empty-dir/shared")?;
    let k = Kubelet::start(setup)?;
    let pod = k.run_pod(&k.pod("sec-sync-1"))?;
    let writer = writer(&k, &pod, &host)?;
    let reader = reader(&k, &pod, &host)?;
    swap_to_host_dir(&k, &writer, &host)?;
    secret_never_shows(&k, &reader, &host)?;
    // Not the shim's copy (a tmpfs in the guest): the share itself.
    let fstype = reader_fstype(&k, &reader)?;
    ensure!(
        fstype == "virtiofs",
        "{READER_DIR} is {fstype:?}, so it was synced"
    );
    k.remove_pod(&pod)?;
    k.finish()
}

#[test]
fn sec_sync_02_synced_volume_never_follows_links() {
    let (_s, cri) = setup();
    two_pods(&cri).unwrap();
}

fn two_pods(setup: &CriSetup) -> Result<()> {
    let host = Host::new("hostpath")?;
    let k = Kubelet::start(setup)?;
    let attacker = k.run_pod(&k.pod("sec-sync-attacker"))?;
    let writer = writer(&k, &attacker, &host)?;
    let victim = k.run_pod(&k.pod("sec-sync-victim"))?;
    let reader = reader(&k, &victim, &host)?;
    // The victim's shim cannot know of the other pod's share: synced.
    let fstype = reader_fstype(&k, &reader)?;
    ensure!(
        fstype != "virtiofs",
        "{READER_DIR} is on virtio-fs: not synced"
    );
    swap_to_host_dir(&k, &writer, &host)?;
    secret_never_shows(&k, &reader, &host)?;
    // The sync survived the attack: a proper update still comes through.
    let d = WRITER_DIR;
    k.sh(
        &writer,
        &format!(
            "mkdir {d}/..2026_02 && echo v2 > {d}/..2026_02/key && \
             ln -s ..2026_02 {d}/..data_tmp && mv -T {d}/..data_tmp {d}/..data"
        ),
    )?;
    k.cri()
        .wait_for("the update after the attack", k.timeout(), |_| {
            let key = k.sh(&reader, &format!("cat {READER_DIR}/key"))?;
            Ok((key == "v2\n").then_some(()))
        })
        .context("the sync stopped after the attack")?;
    secret_never_shows(&k, &reader, &host)?;
    k.remove_pod(&victim)?;
    k.remove_pod(&attacker)?;
    k.finish()
}
