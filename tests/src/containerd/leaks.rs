//! What a [`PrivateContainerd`] left behind, and removing it.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::procs::{all_pids, cmdline};
use super::{PrivateContainerd, RUNC_ROOT};

impl PrivateContainerd {
    /// Everything this instance left behind: empty when clean.
    pub fn leak_report(&self) -> Vec<String> {
        let mut leaks = Vec::new();
        if let Some(child) = &self.child {
            leaks.push(format!("containerd pid {} still running", child.id()));
        }
        for pid in self.shim_pids() {
            leaks.push(format!("process {pid}: {}", cmdline(pid).join(" ")));
        }
        for m in self.mounts() {
            leaks.push(format!("mount {}", m.display()));
        }
        for d in self.namespace_dirs() {
            leaks.push(format!("dir {}", d.display()));
        }
        for s in &self.shim_sockets {
            if s.exists() {
                leaks.push(format!("socket {}", s.display()));
            }
        }
        if self.dir.exists() {
            leaks.push(format!("dir {}", self.dir.display()));
        }
        leaks
    }

    /// Processes whose command line names our socket: the shims.
    pub fn shim_pids(&self) -> Vec<i32> {
        let addr = self.socket.display().to_string();
        let unix = format!("unix://{addr}");
        all_pids()
            .into_iter()
            .filter(|&pid| cmdline(pid).iter().any(|a| *a == addr || *a == unix))
            .collect()
    }

    /// Mount points under our dir, deepest first.
    pub fn mounts(&self) -> Vec<PathBuf> {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut mounts: Vec<PathBuf> = mountinfo
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .map(|p| PathBuf::from(p.replace("\\040", " ")))
            .filter(|p| p.starts_with(&self.dir))
            .collect();
        mounts.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        mounts
    }

    pub(super) fn unmount_all(&self) -> Result<()> {
        use nix::mount::{umount2, MntFlags};
        for m in self.mounts() {
            // Lazy detach when busy: a process we could not kill must not
            // keep the rest of the cleanup from happening.
            umount2(&m, MntFlags::empty())
                .or_else(|_| umount2(&m, MntFlags::MNT_DETACH))
                .with_context(|| format!("umount {}", m.display()))?;
        }
        Ok(())
    }

    /// Host-global dirs named after our (unique) namespace: the runc shim's
    /// state and, with cgroup v1, one parent cgroup per hierarchy, for ctr's
    /// containers and for the CRI pods' (the CRI cgroup root).
    pub(super) fn namespace_dirs(&self) -> Vec<PathBuf> {
        let mut dirs = vec![Path::new(RUNC_ROOT).join(&self.namespace)];
        let cri_root = self.cri_cgroup_root();
        let cri_root = cri_root.trim_start_matches('/');
        for cgroup in [self.namespace.as_str(), cri_root] {
            if let Ok(entries) = fs::read_dir("/sys/fs/cgroup") {
                for e in entries.flatten() {
                    dirs.push(e.path().join(cgroup));
                }
            }
            dirs.push(Path::new("/sys/fs/cgroup").join(cgroup));
        }
        dirs.sort();
        dirs.dedup();
        dirs.into_iter().filter(|d| d.exists()).collect()
    }
}
