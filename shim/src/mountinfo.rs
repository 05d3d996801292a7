//! The shim's own mount table (`/proc/self/mountinfo`), as far as the bind
//! and teardown code needs it: which mounts lie below a given one, where,
//! and of which filesystem type.

use std::collections::HashMap;
use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;

/// One line of mountinfo (proc(5)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub id: u64,
    pub parent: u64,
    /// Where it is mounted, in the shim's mount namespace.
    pub mount_point: PathBuf,
    pub fstype: String,
}

/// The shim's mount table, in mount order.
pub fn read() -> std::io::Result<Vec<MountEntry>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    text.lines()
        .map(|line| {
            parse_line(line).ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("unexpected line in /proc/self/mountinfo: {line:?}"),
                )
            })
        })
        .collect()
}

fn parse_line(line: &str) -> Option<MountEntry> {
    let (before, after) = line.split_once(" - ")?;
    let mut fields = before.split(' ');
    let id = fields.next()?.parse().ok()?;
    let parent = fields.next()?.parse().ok()?;
    let _dev = fields.next()?;
    let _root = fields.next()?;
    let mount_point = PathBuf::from(OsString::from_vec(unescape(fields.next()?)));
    let fstype = after.split(' ').next()?.to_string();
    Some(MountEntry {
        id,
        parent,
        mount_point,
        fstype,
    })
}

/// mountinfo writes space, tab, newline and backslash in paths as `\ooo`.
fn unescape(field: &str) -> Vec<u8> {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            let s = std::str::from_utf8(d).ok()?;
            u8::from_str_radix(s, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

/// Every mount below mount `root` (children, their children, ...), parents
/// before their children; `root` itself not included.
pub fn descendants(table: &[MountEntry], root: u64) -> Vec<&MountEntry> {
    let mut children: HashMap<u64, Vec<&MountEntry>> = HashMap::new();
    for m in table {
        // The namespace's root is its own parent on some kernels.
        if m.id != m.parent {
            children.entry(m.parent).or_default().push(m);
        }
    }
    let mut out = Vec::new();
    let mut queue = std::collections::VecDeque::from([root]);
    while let Some(id) = queue.pop_front() {
        for child in children.get(&id).map(Vec::as_slice).unwrap_or_default() {
            out.push(*child);
            queue.push_back(child.id);
        }
    }
    out
}

/// The mount id of the mount `fd` lies on (statx `STATX_MNT_ID`, the id
/// mountinfo shows).
pub fn mount_id(fd: impl std::os::fd::AsFd) -> std::io::Result<u64> {
    use rustix::fs::{statx, AtFlags, StatxFlags};
    let stx = statx(fd, "", AtFlags::EMPTY_PATH, StatxFlags::MNT_ID)?;
    if stx.stx_mask & StatxFlags::MNT_ID.bits() == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "the kernel reports no mount id (statx STATX_MNT_ID needs Linux 5.8)",
        ));
    }
    Ok(stx.stx_mnt_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_with_escaped_paths_and_optional_fields_parse() {
        let line = "36 35 98:0 /mnt1 /mnt\\040two\\134x rw,noatime master:1 shared:2 - ext3 /dev/root rw,errors=continue";
        assert_eq!(
            parse_line(line),
            Some(MountEntry {
                id: 36,
                parent: 35,
                mount_point: PathBuf::from("/mnt two\\x"),
                fstype: "ext3".into(),
            })
        );
        assert_eq!(parse_line("garbage"), None);
    }

    #[test]
    fn descendants_follow_parent_links_not_paths() {
        let m = |id, parent, at: &str| MountEntry {
            id,
            parent,
            mount_point: at.into(),
            fstype: "tmpfs".into(),
        };
        let table = vec![
            m(1, 1, "/"),
            m(2, 1, "/a"),
            m(3, 2, "/a/b"),
            m(4, 1, "/a/bb"),
            m(5, 3, "/a/b/c"),
        ];
        let ids: Vec<u64> = descendants(&table, 2).iter().map(|m| m.id).collect();
        assert_eq!(ids, vec![3, 5]);
        assert_eq!(descendants(&table, 1).len(), 4);
        // The table as read is never empty in a live process.
        let own = read().unwrap();
        assert!(own
            .iter()
            .any(|m| m.mount_point == std::path::Path::new("/")));
    }
}
