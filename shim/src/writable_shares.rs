//! The host paths a pod's guest can write through virtio-fs: the sources of
//! its containers' read-write bind mounts (a disk `emptyDir`, a read-write
//! `hostPath`, ...). Volume sync never copies a directory that lies in,
//! is, or contains one of them (volume_sync.rs): the guest would choose
//! what the shim, as root, reads on the host.
//!
//! A path stays recorded for the pod's life, after its container is gone:
//! what a guest wrote there is still there for the pod's next container
//! (a restarted container mounting the same `emptyDir`).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

#[derive(Debug, Default)]
pub struct WritableShares {
    /// Canonical host paths.
    paths: Mutex<Vec<PathBuf>>,
}

impl WritableShares {
    /// Records canonical `path` as writable by the pod's guest. Call it
    /// before the path is shared: a sync that checks afterwards
    /// ([`WritableShares::overlapping`]) then sees it before the guest
    /// could have written anything there.
    pub fn add(&self, path: PathBuf) {
        let mut paths = self.paths.lock().unwrap_or_else(|p| p.into_inner());
        if !paths.contains(&path) {
            paths.push(path);
        }
    }

    /// A recorded path that canonical `dir` lies in, is, or contains.
    pub fn overlapping(&self, dir: &Path) -> Option<PathBuf> {
        let paths = self.paths.lock().unwrap_or_else(|p| p.into_inner());
        paths
            .iter()
            .find(|w| dir.starts_with(w) || w.starts_with(dir))
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_share_covers_what_lies_in_it_and_what_contains_it() {
        let shares = WritableShares::default();
        shares.add("/pods/p/volumes/kubernetes.io~empty-dir/cache".into());
        let hit = |d: &str| shares.overlapping(Path::new(d)).is_some();
        assert!(hit("/pods/p/volumes/kubernetes.io~empty-dir/cache"));
        assert!(hit("/pods/p/volumes/kubernetes.io~empty-dir/cache/sub"));
        assert!(hit("/pods/p/volumes"), "a directory holding the share");
        assert!(!hit("/pods/p/volumes/kubernetes.io~configmap/cfg"));
        assert!(
            !hit("/pods/p/volumes/kubernetes.io~empty-dir/cache2"),
            "a sibling sharing a name prefix"
        );
    }
}
