//! What a template's key is made of, for either backend: the backend's
//! description of the template VM (its command line or configuration,
//! with per-VM paths fixed) and one `input` line per file it is made from
//! (the VMM binary, firmware, kernel, initramfs). The shim hashes the text
//! into the key, keeps it beside the template, and later finds the
//! templates whose inputs changed ([`input_records_hold`]).

use std::path::Path;

use crate::{Error, Result, VmSpec};

/// `spec` with the names and paths that differ from one VM to the next
/// fixed, for the backend's description of it: a template is shared by
/// VMs of every id and directory.
pub(crate) fn with_fixed_paths(spec: &VmSpec) -> VmSpec {
    VmSpec {
        id: "template".into(),
        dir: "/template".into(),
        console_log: "/template/console.log".into(),
        ..spec.clone()
    }
}

/// The identity text: the backend's `description` of the template VM,
/// then one input line per file in `inputs`. A file that cannot be read
/// is an error.
pub(crate) fn identity<'a>(
    description: impl IntoIterator<Item = String>,
    inputs: impl IntoIterator<Item = &'a Path>,
) -> Result<String> {
    let mut text: Vec<String> = description.into_iter().collect();
    for file in inputs {
        text.push(input_record(file)?);
    }
    Ok(text.join("\n"))
}

/// The line of a template's identity for one input file: `input <path>
/// <size> <mtime> <inode>`. A template whose input lines no longer match
/// the files ([`input_records_hold`]) is stale.
fn input_record(file: &Path) -> Result<String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(file).map_err(|source| Error::Io {
        what: "reading a template input",
        path: file.to_path_buf(),
        source,
    })?;
    Ok(format!(
        "{INPUT} {} {} {}.{} {}",
        file.display(),
        meta.size(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ino()
    ))
}

const INPUT: &str = "input";

/// Whether every input file an identity ([`template_identity`]) names is
/// still the file it was; `false` for an identity that names none (made
/// by an older shim). A template whose inputs changed can never be chosen
/// again: its key is gone.
pub fn input_records_hold(identity: &str) -> bool {
    let mut inputs = identity
        .lines()
        .filter_map(|line| Some((line, line.strip_prefix(INPUT)?.strip_prefix(' ')?)))
        .peekable();
    inputs.peek().is_some()
        && inputs.all(|(line, rest)| {
            // The path is everything before the last three fields.
            let path = rest.rsplitn(4, ' ').nth(3).unwrap_or_default();
            input_record(Path::new(path)).is_ok_and(|now| now == line)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_template_is_stale_once_an_input_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("a kernel");
        std::fs::write(&kernel, b"one").unwrap();
        let identity = format!("-m\n512M\n{}", input_record(&kernel).unwrap());
        assert!(input_records_hold(&identity));
        assert!(!input_records_hold("-m\n512M"), "no input named");
        std::fs::write(&kernel, b"other").unwrap();
        assert!(!input_records_hold(&identity), "rewritten");
        std::fs::remove_file(&kernel).unwrap();
        assert!(!input_records_hold(&identity), "removed");
    }
}
