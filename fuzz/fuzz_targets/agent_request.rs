//! The agent's requests, as the host sends them over ttrpc: arbitrary bytes
//! decoded as the protocol's messages (`parse_from_bytes`), with hostile
//! values, into the handlers' pure parts (`clh_agent::fuzzing`) and into
//! the real SyncVolume writer over a temporary directory. Each input is a
//! sequence of requests, so volume generations and staging carry over.
//! Checked: ids that pass name one plain file, the container's cgroup is
//! the agent's, memory volumes are one name below EPHEMERAL_DIR, cgroup
//! writes go to known files, and the volume writer never touches anything
//! outside its base directory nor leaves a link pointing out of a volume.

#![no_main]

use std::path::{Component, Path, PathBuf};
use std::sync::OnceLock;

use clh_agent::fuzzing;
use clh_agent::volumes::Volumes;
use clh_agent_protocol::{
    CreateContainerRequest, ExecProcessRequest, SyncVolumeRequest, UpdateContainerRequest,
    EPHEMERAL_DIR,
};
use libfuzzer_sys::fuzz_target;
use protobuf::Message;

/// One request of the input: `[kind: u8][length: u16 LE][bytes]`, the kind
/// modulo the five below (a framing simple enough to write seeds by hand).
enum Request<'a> {
    Create(&'a [u8]),
    Exec(&'a [u8]),
    Update(&'a [u8]),
    SyncVolume(&'a [u8]),
    StdioHeader(&'a [u8]),
}

fn requests(mut data: &[u8]) -> Vec<Request<'_>> {
    let mut out = Vec::new();
    while let [kind, lo, hi, rest @ ..] = data {
        let len = usize::from(u16::from_le_bytes([*lo, *hi])).min(rest.len());
        let (bytes, next) = rest.split_at(len);
        out.push(match kind % 5 {
            0 => Request::Create(bytes),
            1 => Request::Exec(bytes),
            2 => Request::Update(bytes),
            3 => Request::SyncVolume(bytes),
            _ => Request::StdioHeader(bytes),
        });
        data = next;
    }
    out
}

/// The files UpdateContainer may write in a container's cgroup.
const CGROUP_FILES: [&str; 8] = [
    "memory.max",
    "memory.low",
    "memory.swap.max",
    "cpu.weight",
    "cpu.max",
    "cpuset.cpus",
    "cpuset.mems",
    "pids.max",
];

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a current-thread runtime")
    })
}

/// One plain file name: what an id names under the agent's directories.
fn plain_name(id: &str) -> bool {
    let mut parts = Path::new(id).components();
    matches!((parts.next(), parts.next()), (Some(Component::Normal(n)), None) if n == id)
}

fn create(bytes: &[u8]) {
    let Ok(req) = CreateContainerRequest::parse_from_bytes(bytes) else {
        return;
    };
    let terminal = req.stdio.as_ref().is_some_and(|s| s.terminal);
    let Ok((spec, term, dirs)) =
        fuzzing::create_container(&req.container_id, &req.oci_spec, terminal)
    else {
        return;
    };
    assert!(plain_name(&req.container_id), "{:?}", req.container_id);
    assert!(term || !terminal);
    if let Some(linux) = spec.linux() {
        let want = PathBuf::from(format!("/clh/{}", req.container_id));
        assert_eq!(linux.cgroups_path().as_ref(), Some(&want));
    }
    if let Some(p) = spec.process() {
        assert_eq!(p.terminal(), Some(term));
    }
    for dir in dirs {
        let name = dir
            .strip_prefix(EPHEMERAL_DIR)
            .expect("below EPHEMERAL_DIR");
        let name = name.to_str().unwrap_or("");
        assert!(plain_name(name), "memory volume {}", dir.display());
    }
}

fn exec(bytes: &[u8]) {
    let Ok(req) = ExecProcessRequest::parse_from_bytes(bytes) else {
        return;
    };
    if let Ok((process, term)) = fuzzing::exec_process(&req.exec_id, &req.process, false) {
        assert!(plain_name(&req.exec_id), "{:?}", req.exec_id);
        assert_eq!(process.terminal(), Some(term));
    }
}

fn update(bytes: &[u8]) {
    let Ok(req) = UpdateContainerRequest::parse_from_bytes(bytes) else {
        return;
    };
    if let Ok(writes) = fuzzing::update_container(&req.resources) {
        for (file, _) in writes {
            assert!(CGROUP_FILES.contains(&file), "{file}");
        }
    }
}

fn stdio_header(bytes: &[u8]) {
    let mut rest = bytes;
    let parsed = runtime().block_on(fuzzing::stdio_header(&mut rest));
    if parsed.is_ok() {
        let nl = bytes
            .iter()
            .position(|&b| b == b'\n')
            .expect("a header without newline");
        assert_eq!(rest, &bytes[nl + 1..], "stdin data was consumed");
    }
}

/// Lexically resolves `target` from the directory `dir`.
fn resolve(dir: &Path, target: &Path) -> PathBuf {
    let mut out = dir.to_path_buf();
    for c in target.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => out = PathBuf::from("/"),
        }
    }
    out
}

/// Every link below `dir` (the volume's directory at `vol`) stays in `vol`.
fn check_links(dir: &Path, vol: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&path).expect("reading a link");
            assert!(
                resolve(dir, &target).starts_with(vol),
                "{} -> {} leaves {}",
                path.display(),
                target.display(),
                vol.display()
            );
        } else if meta.is_dir() {
            check_links(&path, vol);
        }
    }
}

fn check_volumes(root: &Path, base: &Path) {
    let mut names: Vec<_> = std::fs::read_dir(root)
        .expect("listing the fuzz root")
        .map(|e| e.expect("an entry").file_name())
        .collect();
    names.sort();
    assert!(
        names.iter().all(|n| n == "canary" || n == "volumes"),
        "{names:?}"
    );
    let canary = std::fs::read_dir(root.join("canary")).expect("the canary");
    assert_eq!(
        canary.count(),
        0,
        "something was written beside the volumes"
    );
    let Ok(cids) = std::fs::read_dir(base) else {
        return;
    };
    for cid in cids.flatten() {
        for vol in std::fs::read_dir(cid.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let meta = std::fs::symlink_metadata(vol.path()).expect("a volume");
            assert!(meta.is_dir(), "{} is not a directory", vol.path().display());
            check_links(&vol.path(), &vol.path());
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut volumes: Option<(tempfile::TempDir, Volumes)> = None;
    for r in requests(data) {
        match r {
            Request::Create(b) => create(b),
            Request::Exec(b) => exec(b),
            Request::Update(b) => update(b),
            Request::StdioHeader(b) => stdio_header(b),
            Request::SyncVolume(b) => {
                let Ok(req) = SyncVolumeRequest::parse_from_bytes(b) else {
                    continue;
                };
                let (root, vols) = volumes.get_or_insert_with(|| {
                    let root = tempfile::tempdir().expect("a temporary directory");
                    std::fs::create_dir(root.path().join("canary")).expect("the canary");
                    let vols = Volumes::new(root.path().join("volumes"));
                    (root, vols)
                });
                let _ = runtime().block_on(vols.sync(req));
                check_volumes(root.path(), &root.path().join("volumes"));
            }
        }
    }
});
