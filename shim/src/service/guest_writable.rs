//! Which host paths a container's guest can write through virtio-fs, known
//! before anything of the container is shared: those are never synced
//! (writable_shares.rs, volume_sync.rs).

use std::path::{Path, PathBuf};

use super::bind_options::{bind_options, is_readonly};
use super::binds::{host_is_tmpfs, is_bind, memory_volume, refuse_guest_path};
use crate::bind_mount;
use crate::mountinfo::MountEntry;
use crate::writable_shares::WritableShares;

/// The host mounts below canonical `source` in `table`: a read-only bind
/// that is not recursively read-only leaves them writable
/// (bind_options.rs).
fn host_submounts<'a>(
    table: &'a [MountEntry],
    source: &'a Path,
) -> impl Iterator<Item = PathBuf> + 'a {
    table
        .iter()
        .map(|m| &m.mount_point)
        .filter(move |at| at.starts_with(source) && *at != source)
        .cloned()
}

/// Records in `writable` the host source of every bind mount of `spec`
/// that `Binds::share` will share read-write, and the submounts a
/// read-only but not recursively read-only bind leaves writable: the
/// guest can write those. Call it before anything of the container is
/// synced or shared. A source that cannot be resolved is recorded as
/// given (sharing it fails later anyway).
pub fn record_writable(spec: &serde_json::Value, writable: &WritableShares) {
    let Some(mounts) = spec.get("mounts").and_then(|m| m.as_array()) else {
        return;
    };
    for m in mounts {
        // A source in the guest's volume directory is no host path (and
        // Binds::share refuses any that is not a synced copy).
        let host_source = refuse_guest_path(m).is_ok();
        if !is_bind(m)
            || is_readonly(m)
            || !host_source
            || memory_volume(m, host_is_tmpfs).is_some()
        {
            continue;
        }
        let Some(source) = m.get("source").and_then(|s| s.as_str()) else {
            continue;
        };
        let source = Path::new(source);
        writable.add(bind_mount::resolve(source).unwrap_or_else(|_| source.to_path_buf()));
    }
    // Read once, for every read-only bind that needs it.
    let mut table: Option<Vec<MountEntry>> = None;
    for m in mounts {
        let Ok(opts) = bind_options(m) else { continue };
        let Some(source) = m.get("source").and_then(|s| s.as_str()) else {
            continue;
        };
        if !is_bind(m) || !opts.recursive || !opts.readonly || opts.recursive_readonly {
            continue;
        }
        if let Ok(source) = bind_mount::resolve(Path::new(source)) {
            let table = table.get_or_insert_with(|| crate::mountinfo::read().unwrap_or_default());
            host_submounts(table, &source).for_each(|p| writable.add(p));
        }
    }
}
