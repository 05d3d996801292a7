//! Validation of the paths a host sends in a volume snapshot.
//!
//! The agent is the guest's PID 1 and writes as root, so a path from the
//! host must never reach outside the volume's directory: every entry path
//! is split into plain components here (no absolute path, no `.` or `..`,
//! no empty component, nothing that could clash with the atomic writer's
//! `..data`, `..data_tmp` and `..<timestamp>` names), and the writer opens
//! each component relative to its parent without following symlinks
//! (see `fsat.rs`). Symlink targets are checked lexically to resolve inside
//! the volume, so the copy holds no link out of it either.

/// The longest path the host may send (PATH_MAX).
const MAX_PATH: usize = 4096;
/// A file name's longest length (NAME_MAX).
const MAX_NAME: usize = 255;
/// The deepest entry: the kubelet nests item paths, never this deep.
pub const MAX_DEPTH: usize = 64;

/// Splits an entry path into its components, or says why it is refused.
pub fn entry_components(path: &str) -> Result<Vec<&str>, String> {
    if path.is_empty() {
        return Err("an entry has an empty path".into());
    }
    if path.len() > MAX_PATH || path.contains('\0') {
        return Err(format!(
            "entry path {path:?} is too long or holds a NUL byte"
        ));
    }
    if path.starts_with('/') {
        return Err(format!(
            "entry path {path:?} is absolute; paths are relative to the volume"
        ));
    }
    let parts: Vec<&str> = path.split('/').collect();
    if parts.len() > MAX_DEPTH {
        return Err(format!(
            "entry path {path:?} is deeper than {MAX_DEPTH} components"
        ));
    }
    for part in &parts {
        if part.is_empty() || *part == "." || *part == ".." || part.len() > MAX_NAME {
            return Err(format!(
                "entry path {path:?} has an empty, '.', '..' or over-long component"
            ));
        }
    }
    if parts[0].starts_with("..") {
        return Err(format!(
            "entry path {path:?} starts with '..', which names the atomic writer's own files"
        ));
    }
    Ok(parts)
}

/// Checks that a symlink at `link` (components, inside the data directory)
/// with `target` resolves, lexically, inside the volume's directory.
pub fn check_symlink_target(link: &[&str], target: &str) -> Result<(), String> {
    let path = link.join("/");
    if target.is_empty() || target.len() > MAX_PATH || target.contains('\0') {
        return Err(format!(
            "symlink {path:?} has an empty, over-long or NUL target"
        ));
    }
    if target.starts_with('/') {
        return Err(format!(
            "symlink {path:?} -> {target:?} is absolute; only relative links inside the volume are copied"
        ));
    }
    // The link's directory, counted from the volume's root: the data
    // directory is one level down, then the link's parents.
    let mut depth = link.len();
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." if depth == 0 => {
                return Err(format!(
                    "symlink {path:?} -> {target:?} points out of the volume"
                ))
            }
            ".." => depth -= 1,
            _ => depth += 1,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_relative_paths_pass() {
        assert_eq!(entry_components("key").unwrap(), ["key"]);
        assert_eq!(entry_components("a/b/c.txt").unwrap(), ["a", "b", "c.txt"]);
        assert_eq!(
            entry_components(".hidden/x..y").unwrap(),
            [".hidden", "x..y"]
        );
    }

    #[test]
    fn escaping_or_clashing_paths_are_refused() {
        let deep = vec!["d"; MAX_DEPTH + 1].join("/");
        let long = "x".repeat(MAX_NAME + 1);
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a/./b",
            "a//b",
            "a/",
            ".",
            "..data",
            "..data/key",
            "..2026_11_22_10_00_00.1/k",
            "..",
            "a\0b",
            &deep,
            &long,
        ] {
            assert!(entry_components(bad).is_err(), "{bad:?} passed");
        }
        // `..` deeper down is a plain name only when it is not a component.
        assert!(entry_components("a/..b").is_ok());
    }

    #[test]
    fn symlink_targets_must_stay_in_the_volume() {
        assert!(check_symlink_target(&["k"], "other").is_ok());
        assert!(check_symlink_target(&["k"], "../..data/other").is_ok());
        assert!(check_symlink_target(&["a", "k"], "../../x").is_ok());
        for (link, target) in [
            (&["k"][..], "/etc/shadow"),
            (&["k"][..], "../../x"),
            (&["a", "k"][..], "../../../x"),
            (&["k"][..], "a/../../../x"),
            (&["k"][..], ""),
        ] {
            assert!(
                check_symlink_target(link, target).is_err(),
                "{link:?} -> {target:?}"
            );
        }
    }
}
