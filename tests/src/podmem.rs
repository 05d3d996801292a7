//! Host memory of one pod's processes, for the CRI benchmark: which host
//! processes a pod sandbox is made of, and their proportional set size.
//!
//! PSS charges each resident page to the processes mapping it in equal
//! parts, so a sum of PSS over processes counts every page once: the
//! shim's or QEMU's text, shared by several pods, is divided among them,
//! and guest RAM, mapped by the VMM and by its vhost-user backends
//! (virtiofsd, vhost-device-vsock), is counted once across the three.
//! Guest RAM is QEMU's shared memfd, told apart by its mapping's name in
//! `/proc/<pid>/smaps`.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};

use crate::containerd::{all_pids, cmdline, descendants};

/// The guest RAM mapping: QEMU names the memfd of `memory-backend-memfd`
/// after the backend's type (hostmem-memfd.c), and the backends that map
/// the fd QEMU passes them see the same name.
pub const GUEST_RAM_MAPPING: &str = "/memfd:memory-backend-memfd";

/// One process of a pod and its memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessMemory {
    pub pid: i32,
    /// What it is for the pod: shim, VMM, vhost-device-vsock, virtiofsd,
    /// pause, container.
    pub role: &'static str,
    /// PSS of the whole process (`smaps_rollup`).
    pub pss_kib: u64,
    /// The part of `pss_kib` in guest RAM mappings.
    pub guest_ram_kib: u64,
    /// The VMM's configured guest RAM (QEMU's `-m`).
    pub guest_ram_configured_mib: Option<u64>,
}

/// The host processes of pod sandbox `pod_id`: its shim (the process of
/// `shim_binary` started with `-id <pod_id>`; with runc as with clh one
/// shim serves the whole pod) and the shim's descendants (pause and the
/// containers with runc; the VMM, vhost-device-vsock and virtiofsd with
/// clh). Found twice, and the two must agree: the descendants must be
/// exactly the processes in the pod's cgroup tree `pod_cgroup` (a
/// cgroupfs path), and where `vm_dir` is given each must name it on its
/// command line. The shim comes first.
pub fn pod_processes(
    shim_binary: &str,
    pod_id: &str,
    pod_cgroup: &str,
    vm_dir: Option<&Path>,
) -> Result<Vec<i32>> {
    let shims: Vec<i32> = all_pids()
        .into_iter()
        .filter(|&pid| {
            let argv = cmdline(pid);
            argv.first().is_some_and(|a| basename(a) == shim_binary)
                && argv.windows(2).any(|w| w[0] == "-id" && w[1] == pod_id)
        })
        .collect();
    let [shim] = shims[..] else {
        bail!("expected one {shim_binary} -id {pod_id}, found pids {shims:?}");
    };
    let children: BTreeSet<i32> = descendants(shim).into_iter().collect();
    ensure!(
        !children.is_empty(),
        "the shim {shim} of pod {pod_id} has no child process"
    );
    let in_cgroup = cgroup_tree_procs(pod_cgroup)?;
    ensure!(
        children == in_cgroup,
        "pod {pod_id}: the shim's descendants {children:?} are not the processes of \
         the pod cgroup {pod_cgroup} {in_cgroup:?}"
    );
    if let Some(dir) = vm_dir {
        let needle = dir.display().to_string();
        for &pid in &children {
            let argv = cmdline(pid);
            ensure!(
                argv.iter().any(|a| a.contains(&needle)),
                "pod {pod_id}: process {pid} ({argv:?}) does not name the VM dir {needle}"
            );
        }
    }
    Ok(std::iter::once(shim).chain(children).collect())
}

/// [`measure`] of each of [`pod_processes`].
pub fn pod_memory(
    shim_binary: &str,
    pod_id: &str,
    pod_cgroup: &str,
    vm_dir: Option<&Path>,
) -> Result<Vec<ProcessMemory>> {
    pod_processes(shim_binary, pod_id, pod_cgroup, vm_dir)?
        .into_iter()
        .map(measure)
        .collect()
}

/// PSS of `pid`, with its guest RAM part, and for a VMM the guest RAM it
/// was configured with. A VMM must map guest RAM: one that does not shows
/// a mapping name this module does not know.
pub fn measure(pid: i32) -> Result<ProcessMemory> {
    let argv = cmdline(pid);
    let role = role(&argv);
    let rollup = read_proc(pid, "smaps_rollup")?;
    let pss_kib =
        field_kib(&rollup, "Pss").with_context(|| format!("no Pss in /proc/{pid}/smaps_rollup"))?;
    let guest_ram_kib = guest_ram_pss_kib(&read_proc(pid, "smaps")?);
    let mut configured = None;
    if role == "VMM" {
        ensure!(
            guest_ram_kib > 0,
            "the VMM {pid} maps no {GUEST_RAM_MAPPING} with resident pages"
        );
        configured = Some(qemu_memory_mib(&argv).with_context(|| {
            format!("no guest RAM size (-m) on the VMM {pid}'s command line {argv:?}")
        })?);
    }
    Ok(ProcessMemory {
        pid,
        role,
        // The two files are read one after the other: never let the part
        // exceed the whole.
        pss_kib: pss_kib.max(guest_ram_kib),
        guest_ram_kib,
        guest_ram_configured_mib: configured,
    })
}

fn read_proc(pid: i32, file: &str) -> Result<String> {
    let path = format!("/proc/{pid}/{file}");
    fs::read_to_string(&path).with_context(|| format!("reading {path}"))
}

/// A process's role in its pod, from its argv.
fn role(argv: &[String]) -> &'static str {
    let name = argv.first().map(|a| basename(a)).unwrap_or_default();
    match name {
        n if n.starts_with("containerd-shim") => "shim",
        n if n.starts_with("qemu-system") || n == "cloud-hypervisor" => "VMM",
        "vhost-device-vsock" => "vhost-device-vsock",
        "virtiofsd" => "virtiofsd",
        "pause" => "pause",
        _ => "container",
    }
}

fn basename(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// The value in kB of the `key:` line of a smaps file.
fn field_kib(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(key)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// Sum of the Pss of the guest RAM mappings in a `/proc/<pid>/smaps`.
/// A mapping's header is `start-end perms offset dev inode [path]`; its
/// fields are `Key: value kB` lines, whose first word ends in ':'.
fn guest_ram_pss_kib(smaps: &str) -> u64 {
    let mut in_guest_ram = false;
    let mut sum = 0;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or_default();
        if !first.ends_with(':') {
            let path = line.split_whitespace().nth(5).unwrap_or_default();
            in_guest_ram = path.starts_with(GUEST_RAM_MAPPING);
        } else if in_guest_ram && first == "Pss:" {
            sum += field_kib(line, "Pss").unwrap_or(0);
        }
    }
    sum
}

/// QEMU's `-m <size>` in MiB (`512M`, `1G`, a bare number is MiB).
fn qemu_memory_mib(argv: &[String]) -> Option<u64> {
    let value = argv.windows(2).find(|w| w[0] == "-m")?[1].as_str();
    // `-m size=512M,maxmem=...` is also valid QEMU syntax.
    let size = value.split(',').next()?.trim_start_matches("size=");
    let (digits, factor) = match size.char_indices().last()? {
        (i, 'M' | 'm') => (&size[..i], 1),
        (i, 'G' | 'g') => (&size[..i], 1024),
        _ => (size, 1),
    };
    digits.parse::<u64>().ok().map(|n| n * factor)
}

/// The processes in cgroup `cgroup` and below it, from the memory
/// controller's hierarchy on cgroup v1, the unified one on v2.
fn cgroup_tree_procs(cgroup: &str) -> Result<BTreeSet<i32>> {
    let rel = cgroup.trim_start_matches('/');
    let root = ["/sys/fs/cgroup/memory", "/sys/fs/cgroup"]
        .iter()
        .map(|base| Path::new(base).join(rel))
        .find(|p| p.is_dir())
        .with_context(|| format!("no cgroup {cgroup} in the memory or unified hierarchy"))?;
    let mut procs = BTreeSet::new();
    let mut todo: Vec<PathBuf> = vec![root];
    while let Some(dir) = todo.pop() {
        let file = dir.join("cgroup.procs");
        let text =
            fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
        procs.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
        let entries = fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))?;
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                todo.push(e.path());
            }
        }
    }
    Ok(procs)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0c0000000-55d0c0100000 r-xp 00000000 08:01 1234   /usr/bin/qemu-system-x86_64
Size:               1024 kB
Rss:                 800 kB
Pss:                 400 kB
VmFlags: rd ex mr mw me dw
7f0000000000-7f0020000000 rw-s 00000000 00:01 99     /memfd:memory-backend-memfd (deleted)
Size:             524288 kB
Rss:               90000 kB
Pss:               60000 kB
VmFlags: rd wr sh mr mw me ms
7f0030000000-7f0030001000 rw-p 00000000 00:00 0
Size:                  4 kB
Pss:                   4 kB
VmFlags: rd wr mr mw me ac
";

    #[test]
    fn guest_ram_is_the_memfd_mapping_only() {
        assert_eq!(guest_ram_pss_kib(SMAPS), 60000);
        assert_eq!(guest_ram_pss_kib(""), 0);
    }

    #[test]
    fn rollup_field() {
        let rollup = "00400000-7ffc0000 ---p 00000000 00:00 0  [rollup]\n\
                      Rss:  1000 kB\nPss:   700 kB\nPss_Anon:  300 kB\n";
        assert_eq!(field_kib(rollup, "Pss"), Some(700));
        assert_eq!(field_kib(rollup, "Pss_Anon"), Some(300));
        assert_eq!(field_kib(rollup, "Swap"), None);
    }

    #[test]
    fn qemu_memory_sizes() {
        let argv = |m: &str| -> Vec<String> {
            ["qemu-system-x86_64", "-smp", "1", "-m", m]
                .iter()
                .map(|s| s.to_string())
                .collect()
        };
        assert_eq!(qemu_memory_mib(&argv("512M")), Some(512));
        assert_eq!(qemu_memory_mib(&argv("2G")), Some(2048));
        assert_eq!(qemu_memory_mib(&argv("768")), Some(768));
        assert_eq!(qemu_memory_mib(&argv("size=256M,maxmem=1G")), Some(256));
        assert_eq!(qemu_memory_mib(&argv("lots")), None);
        assert_eq!(qemu_memory_mib(&argv("512M")[..3]), None);
    }

    #[test]
    fn roles() {
        let r = |a: &str| role(&[a.to_owned()]);
        assert_eq!(r("/work/target/release/containerd-shim-clh-v2"), "shim");
        assert_eq!(r("containerd-shim-runc-v2"), "shim");
        assert_eq!(r("/usr/bin/qemu-system-x86_64"), "VMM");
        assert_eq!(r("/usr/local/bin/virtiofsd"), "virtiofsd");
        assert_eq!(r("/pause"), "pause");
        assert_eq!(r("sleep"), "container");
        assert_eq!(role(&[]), "container");
    }
}
