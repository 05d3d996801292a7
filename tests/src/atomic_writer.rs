//! The kubelet's volume writer, reproduced for tests: ConfigMap, Secret,
//! projected and downward-API volumes are written by its atomic writer, and
//! a container watches them with inotify (busybox has no inotify applet, so
//! `tests/images/inotify-wait.c` is compiled for it).

use std::path::Path;

use anyhow::Result;

/// The kubelet's atomic writer (pkg/volume/util/atomic_writer.go), in
/// order: new timestamped dir, `..data_tmp` renamed over `..data`, new
/// user-visible links, removed keys' links, the old dir.
pub fn atomic_write(dir: &Path, serial: u32, files: &[(&str, &[u8])]) -> Result<()> {
    let ts = format!("..2026_11_22_10_00_00.{serial}");
    std::fs::create_dir(dir.join(&ts))?;
    for (key, value) in files {
        std::fs::write(dir.join(&ts).join(key), value)?;
    }
    let old = std::fs::read_link(dir.join("..data")).ok();
    std::os::unix::fs::symlink(&ts, dir.join("..data_tmp"))?;
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data"))?;
    for (key, _) in files {
        if std::fs::symlink_metadata(dir.join(key)).is_err() {
            std::os::unix::fs::symlink(format!("..data/{key}"), dir.join(key))?;
        }
    }
    for e in std::fs::read_dir(dir)? {
        let name = e?.file_name();
        let name = name.to_string_lossy();
        if !name.starts_with("..") && !files.iter().any(|(k, _)| *k == name) {
            std::fs::remove_file(dir.join(&*name))?;
        }
    }
    if let Some(old) = old {
        std::fs::remove_dir_all(dir.join(old))?;
    }
    Ok(())
}

/// Compiles `tests/images/inotify-wait.c` statically to `out`.
pub fn build_inotify_wait(out: &Path) -> Result<()> {
    crate::build_static_helper("inotify-wait", out)
}
