//! One volume's guest copy, written as the kubelet's atomic writer writes
//! it on a node (pkg/volume/util/atomic_writer.go):
//!
//! ```text
//! <vol>/..2026_11_22_14_05_09.7/   the data of generation 7 (a fresh dir)
//! <vol>/..data -> ..2026_11_22_14_05_09.7
//! <vol>/key    -> ..data/key       one per top-level name of the data
//! ```
//!
//! A generation is staged in its own fresh directory; the swap points a
//! new `..data_tmp` symlink at it and renames it over `..data`. rename(2)
//! is atomic, so any path resolved through `..data` lands wholly in the
//! old generation or wholly in the new one, never in a mix; and the events
//! a watcher of `<vol>` gets (IN_CREATE of the dir and of `..data_tmp`,
//! IN_MOVED_FROM/IN_MOVED_TO of `..data`, IN_DELETE of the old dir) are
//! the ones it gets on a node.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd};

use clh_agent_protocol::{VolumeEntry, VolumeEntryKind};

use super::fsat::{self, Attrs};
use super::path::{check_symlink_target, entry_components};
use super::VolError;

const DATA: &str = "..data";
const DATA_TMP: &str = "..data_tmp";

/// A generation being received, in its staging directory.
#[derive(Debug)]
pub struct Staging {
    pub generation: u64,
    /// `..<timestamp>.<generation>`, in the volume's directory.
    pub name: String,
    /// The first components of the entries: the user-visible names.
    pub top: BTreeSet<String>,
}

impl Staging {
    /// Creates the staging directory of `generation` in `vol`.
    pub fn create(vol: BorrowedFd<'_>, generation: u64, now_unix: u64) -> Result<Self, VolError> {
        let name = format!("..{}.{generation}", timestamp(now_unix));
        // 0755 as the kubelet's: readable by any container user; the
        // entries' own modes guard their content.
        let attrs = Attrs {
            mode: 0o755,
            uid: 0,
            gid: 0,
        };
        fsat::make_dir_at(vol, &name, attrs)
            .map_err(|e| VolError::internal(format!("creating the staging directory {name}"), e))?;
        Ok(Staging {
            generation,
            name,
            top: BTreeSet::new(),
        })
    }

    /// Writes one entry into the staging directory.
    pub fn apply(&mut self, vol: BorrowedFd<'_>, e: &VolumeEntry) -> Result<(), VolError> {
        let parts = entry_components(&e.path).map_err(VolError::InvalidArgument)?;
        let bad = |what: String| VolError::InvalidArgument(format!("entry {:?}: {what}", e.path));
        let stage = fsat::open_dir_at(vol, self.name.as_str())
            .map_err(|err| VolError::internal("opening the staging directory", err))?;
        let parent = fsat::open_parent(stage.as_fd(), &parts).map_err(|err| {
            bad(format!(
                "cannot open its parent directory: {err} (parents must come first, as directories)"
            ))
        })?;
        let (dir, name) = (parent.as_fd(), parts[parts.len() - 1]);
        let attrs = Attrs {
            mode: e.mode,
            uid: e.uid,
            gid: e.gid,
        };
        match e.kind.enum_value() {
            Ok(VolumeEntryKind::FILE) if e.offset == 0 => {
                fsat::create_file_at(dir, name, &e.data, attrs)
                    .map_err(|err| bad(format!("cannot create it: {err}")))?
            }
            Ok(VolumeEntryKind::FILE) => {
                fsat::append_file_at(dir, name, e.offset, &e.data).map_err(bad)?
            }
            Ok(VolumeEntryKind::DIR) => fsat::make_dir_at(dir, name, attrs)
                .map_err(|err| bad(format!("cannot create the directory: {err}")))?,
            Ok(VolumeEntryKind::SYMLINK) => {
                check_symlink_target(&parts, &e.target).map_err(VolError::InvalidArgument)?;
                fsat::symlink_at(dir, name, &e.target, Some((e.uid, e.gid)))
                    .map_err(|err| bad(format!("cannot create the symlink: {err}")))?
            }
            Err(kind) => return Err(bad(format!("unknown kind {kind}"))),
        }
        self.top.insert(parts[0].to_owned());
        Ok(())
    }

    /// Makes this generation the visible one: `..data` swapped atomically,
    /// then the user-visible links added and removed, then the previous
    /// data (and any abandoned staging dir) removed, in the kubelet's order.
    pub fn swap_in(self, vol: BorrowedFd<'_>) -> Result<(), VolError> {
        fsat::remove_tree_at(vol, OsStr::new(DATA_TMP))
            .map_err(|e| VolError::internal("removing a stale ..data_tmp", e))?;
        fsat::symlink_at(vol, DATA_TMP, &self.name, None)
            .map_err(|e| VolError::internal("creating ..data_tmp", e))?;
        fsat::rename_at(vol, DATA_TMP, DATA)
            .map_err(|e| VolError::internal("renaming ..data_tmp over ..data", e))?;

        for top in &self.top {
            let want = format!("{DATA}/{top}");
            let have = fsat::link_target(vol, OsStr::new(top));
            if have.as_deref() != Some(OsStr::new(&want)) {
                fsat::remove_tree_at(vol, OsStr::new(top))
                    .map_err(|e| VolError::internal(format!("replacing {top}"), e))?;
                fsat::symlink_at(vol, top, &want, None)
                    .map_err(|e| VolError::internal(format!("linking {top}"), e))?;
            }
        }
        let names = fsat::list(vol).map_err(|e| VolError::internal("listing the volume", e))?;
        for name in names {
            let text = name.to_string_lossy();
            let stale = if text.starts_with("..") {
                text != DATA && text != self.name.as_str()
            } else {
                !self.top.contains(text.as_ref())
            };
            if stale {
                fsat::remove_tree_at(vol, &name)
                    .map_err(|e| VolError::internal(format!("removing the stale {text}"), e))?;
            }
        }
        Ok(())
    }

    /// Removes the staging directory of an abandoned generation.
    pub fn discard(self, vol: BorrowedFd<'_>) -> Result<(), VolError> {
        fsat::remove_tree_at(vol, OsStr::new(&self.name))
            .map_err(|e| VolError::internal(format!("removing the abandoned {}", self.name), e))
    }
}

/// `2006_01_02_15_04_05` (UTC), the kubelet's format for its data dirs.
fn timestamp(unix: u64) -> String {
    let (days, secs) = (unix / 86_400, unix % 86_400);
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss) = (secs / 3600, secs % 3600 / 60, secs % 60);
    format!("{y:04}_{m:02}_{d:02}_{hh:02}_{mm:02}_{ss:02}")
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard
/// Hinnant's `civil_from_days`, for days >= 0).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    #[test]
    fn timestamps_are_the_kubelets_format() {
        assert_eq!(super::timestamp(0), "1970_01_01_00_00_00");
        assert_eq!(super::timestamp(951_782_400), "2000_02_29_00_00_00");
        assert_eq!(super::timestamp(1_795_356_309), "2026_11_22_14_05_09");
    }
}
