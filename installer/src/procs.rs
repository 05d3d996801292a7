//! Which processes run from an installed version (a shim, its virtiofsd
//! or vhost-device-vsock): such a version is never removed.

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// The pids (from `proc`, the host's /proc: the installer's pod shares the
/// host's PID namespace) whose executable is a file under `dir`. Files are
/// compared by device and inode, which hold across mount namespaces where
/// paths do not. This process is never counted: `clh-install uninstall`
/// run from an installed version (`make node-uninstall`) is not a user of
/// it.
pub fn running_from(dir: &Path, proc: &Path) -> Vec<u32> {
    let me = std::process::id();
    let mut files = HashSet::new();
    collect_inodes(dir, &mut files);
    if files.is_empty() {
        return Vec::new();
    }
    let Ok(entries) = fs::read_dir(proc) else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| {
            // metadata() follows the exe link to the file itself, even one
            // renamed or unlinked since.
            fs::metadata(proc.join(pid.to_string()).join("exe"))
                .is_ok_and(|m| files.contains(&(m.dev(), m.ino())))
        })
        .collect();
    pids.sort_unstable();
    pids
}

fn collect_inodes(dir: &Path, out: &mut HashSet<(u64, u64)>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.filter_map(|e| e.ok()) {
        let Ok(meta) = fs::symlink_metadata(entry.path()) else {
            continue;
        };
        if meta.is_dir() {
            collect_inodes(&entry.path(), out);
        } else if meta.is_file() {
            out.insert((meta.dev(), meta.ino()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_running_copy_of_a_binary_is_found_and_others_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        fs::create_dir(&bin).unwrap();
        let sleeper = bin.join("sleep");
        fs::copy("/bin/sleep", &sleeper).unwrap();
        let mut child = std::process::Command::new(&sleeper)
            .arg("30")
            .spawn()
            .unwrap();
        let found = running_from(dir.path(), Path::new("/proc"));
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(found, vec![child.id()]);
        assert!(running_from(dir.path(), Path::new("/proc")).is_empty());
    }
}
