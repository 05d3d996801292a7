//! containerd's side: which containerd the node runs, and how to register
//! the `clh` runtime handler in its configuration without breaking what is
//! there.
//!
//! How each version merges an imported file decides the style (checked with
//! `containerd config dump` on 1.6, 1.7 and 2.1, and end to end by
//! tests/tests/node_install.rs):
//!
//! - **containerd 2.x** merges imports deeply, after migrating each file to
//!   the current config version; an import whose version differs from the
//!   main file's is silently dropped. So: a drop-in in `conf.d` with the main
//!   file's config version, named in the main file's `imports` (untouched
//!   when an existing glob already covers it).
//! - **containerd 1.6/1.7** replace a whole `[plugins."<id>"]` table with an
//!   imported one. A drop-in holding the CRI plugin would wipe the node's own
//!   CRI settings (its CNI paths, sandbox image, ...). So: a drop-in only
//!   when the main file has no CRI table; otherwise the handler's table is
//!   added to the main file in place, its comments and layout kept
//!   (toml_edit), and the original bytes are kept for uninstall.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use toml_edit::{value, Array, DocumentMut, Item, Table};

use crate::error::{InstallError, Result};

/// The CRI plugin's runtime table for config version 2 (containerd 1.x,
/// and 2.x migrating a version 2 file).
const CRI_V2: &str = "io.containerd.grpc.v1.cri";
/// ... and for config version 3 (containerd 2.x).
const CRI_V3: &str = "io.containerd.cri.v1.runtime";
pub const RUNTIME_TYPE: &str = "io.containerd.clh.v2";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Major {
    One,
    Two,
}

/// The major version in `containerd --version` output
/// (`containerd github.com/containerd/containerd 1.6.20~ds1 ...`,
/// `containerd github.com/containerd/containerd/v2 v2.1.9 ...`).
pub fn parse_version_output(out: &str) -> Option<Major> {
    let token = out.split_whitespace().nth(2)?;
    match token.trim_start_matches('v').split('.').next()? {
        "1" => Some(Major::One),
        "2" => Some(Major::Two),
        _ => None,
    }
}

/// Runs `containerd --version` (`binary` as the host sees it, run chrooted
/// into the host root) and reads the major version.
pub fn detect_major(host_root: &Path, binary: &Path) -> Result<Major> {
    let mut cmd = Command::new(binary);
    if host_root != Path::new("/") {
        // The installer's image has no chroot binary (nor libc): chroot
        // here, between fork and exec, so that the host's containerd runs
        // with the host's libraries.
        let root = host_root.to_path_buf();
        // SAFETY: chroot and chdir are async-signal-safe syscalls; `root`
        // was allocated before the fork.
        unsafe {
            cmd.pre_exec(move || {
                nix::unistd::chroot(&root)?;
                nix::unistd::chdir("/")?;
                Ok(())
            });
        }
    }
    let out = cmd.arg("--version").output().map_err(|e| {
        InstallError::ContainerdVersion(format!("running {}: {e}", binary.display()))
    })?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_version_output(&text).ok_or_else(|| {
        InstallError::ContainerdVersion(format!(
            "`{} --version` printed {:?}",
            binary.display(),
            text.trim()
        ))
    })
}

/// The handler to register.
#[derive(Debug, Clone)]
pub struct Handler {
    pub name: String,
    /// The shim as the host sees it (through the prefix's `current`).
    pub runtime_path: PathBuf,
}

/// Where the handler goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    DropIn,
    InPlace,
}

/// The changes to make, computed from the main file as it is.
#[derive(Debug, PartialEq)]
pub struct Plan {
    pub style: Style,
    /// The main file's new bytes; None leaves it as it is.
    pub main: Option<Vec<u8>>,
    /// The drop-in's bytes (DropIn style).
    pub drop_in: Option<Vec<u8>>,
    /// Runtime tables this plan adds to the main file (InPlace style).
    pub added_runtimes: Vec<String>,
    /// Whether it adds the drop-in to the main file's `imports`.
    pub added_import: bool,
}

/// Plans the registration of `handler` given the main config's bytes
/// (`main`, None when the file does not exist; `main_path` and `drop_in`
/// as the host sees them).
pub fn plan(
    main: Option<&[u8]>,
    main_path: &Path,
    drop_in: &Path,
    major: Major,
    handler: &Handler,
) -> Result<Plan> {
    let mut doc = parse(main, main_path)?;
    let version = config_version(&doc, main.is_some(), major, main_path)?;
    if doc.get("version").is_none() {
        doc.insert("version", value(version));
    }
    let cri = if version >= 3 { CRI_V3 } else { CRI_V2 };
    let has_cri_table = doc
        .get("plugins")
        .and_then(|p| p.get(cri))
        .is_some_and(Item::is_table_like);
    if major == Major::One && has_cri_table {
        let mut added_runtimes = Vec::new();
        let runtimes = runtimes_table(&mut doc, cri);
        if runtimes.is_empty() {
            // 1.x would replace its default runtimes with ours: keep runc,
            // the default handler, registered.
            let mut runc = Table::new();
            runc.insert("runtime_type", value("io.containerd.runc.v2"));
            runtimes.insert("runc", Item::Table(runc));
            added_runtimes.push("runc".to_owned());
        }
        if !runtimes.contains_key(&handler.name) {
            added_runtimes.push(handler.name.clone());
        }
        runtimes.insert(&handler.name, Item::Table(handler_table(handler)));
        let new = doc.to_string().into_bytes();
        let changed = main != Some(new.as_slice());
        return Ok(Plan {
            style: Style::InPlace,
            main: changed.then_some(new),
            drop_in: None,
            added_runtimes: if changed { added_runtimes } else { Vec::new() },
            added_import: false,
        });
    }
    let covered = imports(&doc)
        .iter()
        .any(|pattern| glob_match(&absolute(pattern, main_path), drop_in));
    let main_new = if covered {
        None
    } else {
        let entry = drop_in.display().to_string();
        match doc.get_mut("imports").and_then(Item::as_array_mut) {
            Some(list) => list.push(entry),
            None => {
                let mut list = Array::new();
                list.push(entry);
                doc.insert("imports", value(list));
            }
        }
        Some(doc.to_string().into_bytes())
    };
    Ok(Plan {
        style: Style::DropIn,
        added_import: main_new.is_some(),
        main: main_new,
        drop_in: Some(drop_in_text(version, major, handler).into_bytes()),
        added_runtimes: Vec::new(),
    })
}

/// Takes out of the main file what [`plan`] put in (for a main file
/// changed since the install: restoring the saved bytes would lose the
/// admin's edits).
pub fn remove_ours(
    main: &[u8],
    main_path: &Path,
    drop_in: &Path,
    added_runtimes: &[String],
) -> Result<Vec<u8>> {
    let mut doc = parse(Some(main), main_path)?;
    let entry = drop_in.display().to_string();
    if let Some(list) = doc.get_mut("imports").and_then(Item::as_array_mut) {
        list.retain(|v| v.as_str() != Some(entry.as_str()));
        if list.is_empty() {
            doc.remove("imports");
        }
    }
    for cri in [CRI_V2, CRI_V3] {
        let runtimes = doc
            .get_mut("plugins")
            .and_then(|p| p.get_mut(cri))
            .and_then(|c| c.get_mut("containerd"))
            .and_then(|c| c.get_mut("runtimes"))
            .and_then(Item::as_table_like_mut);
        if let Some(runtimes) = runtimes {
            for name in added_runtimes {
                runtimes.remove(name);
            }
        }
    }
    Ok(doc.to_string().into_bytes())
}

/// The drop-in's text, in config version `version`.
pub fn drop_in_text(version: i64, major: Major, handler: &Handler) -> String {
    let cri = if version >= 3 { CRI_V3 } else { CRI_V2 };
    let mut out = format!(
        "# Written by clh-install; `clh-install uninstall` removes it.\n\
         # The CRI runtime handler \"{name}\": pods of a RuntimeClass with\n\
         # `handler: {name}` run in their own microVM.\n\
         version = {version}\n",
        name = handler.name
    );
    if major == Major::One {
        // Only used when the main file has no CRI table: 1.x then starts
        // from its defaults, whose runtimes table this one replaces.
        out.push_str(&format!(
            "\n[plugins.\"{cri}\".containerd.runtimes.runc]\n  runtime_type = \"io.containerd.runc.v2\"\n"
        ));
    }
    out.push_str(&format!(
        "\n[plugins.\"{cri}\".containerd.runtimes.{name}]\n  \
         runtime_type = \"{RUNTIME_TYPE}\"\n  \
         runtime_path = \"{path}\"\n  \
         # A privileged pod gets its guest's devices, never the host's.\n  \
         privileged_without_host_devices = true\n",
        name = handler.name,
        path = handler.runtime_path.display(),
    ));
    out
}

fn handler_table(handler: &Handler) -> Table {
    let mut t = Table::new();
    t.insert("runtime_type", value(RUNTIME_TYPE));
    t.insert(
        "runtime_path",
        value(handler.runtime_path.display().to_string()),
    );
    t.insert("privileged_without_host_devices", value(true));
    t
}

/// `plugins.<cri>.containerd.runtimes`, created (as implicit parents) when
/// missing.
fn runtimes_table<'d>(doc: &'d mut DocumentMut, cri: &str) -> &'d mut Table {
    let mut at = doc.as_table_mut();
    for key in ["plugins", cri, "containerd", "runtimes"] {
        let item = at.entry(key).or_insert_with(|| {
            let mut t = Table::new();
            t.set_implicit(true);
            Item::Table(t)
        });
        if !item.is_table() {
            // An inline table or dotted keys: re-home them as a table.
            let inline = item.as_inline_table().cloned().unwrap_or_default();
            *item = Item::Table(inline.into_table());
        }
        at = match item.as_table_mut() {
            Some(t) => t,
            None => unreachable!("made a table just above"),
        };
    }
    at
}

fn parse(main: Option<&[u8]>, path: &Path) -> Result<DocumentMut> {
    let text =
        std::str::from_utf8(main.unwrap_or_default()).map_err(|e| InstallError::ConfigParse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    text.parse::<DocumentMut>()
        .map_err(|e| InstallError::ConfigParse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
}

/// The config version the file has (or the one a new file gets).
fn config_version(doc: &DocumentMut, exists: bool, major: Major, path: &Path) -> Result<i64> {
    let default = match major {
        Major::One => 2,
        Major::Two => 3,
    };
    let shape = |problem: String| InstallError::ConfigShape {
        path: path.to_path_buf(),
        problem,
    };
    match doc.get("version").map(|v| v.as_integer()) {
        None if !exists || doc.iter().next().is_none() => Ok(default),
        None => Err(shape(
            "it has no `version` key, i.e. config version 1, which clh-install does not edit: \
             migrate it (`containerd config migrate` on 2.x, or `containerd config default` as a start on 1.x) and rerun"
                .into(),
        )),
        Some(Some(3)) if major == Major::One => Err(shape(
            "config version 3 is for containerd 2.x, but this node runs 1.x: check --containerd-version".into(),
        )),
        Some(Some(v @ (2 | 3))) => Ok(v),
        Some(other) => Err(shape(format!(
            "config version {other:?} is not one clh-install knows (2 or 3)"
        ))),
    }
}

fn imports(doc: &DocumentMut) -> Vec<String> {
    doc.get("imports")
        .and_then(Item::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// An import relative to the main file's directory, as containerd reads it.
fn absolute(import: &str, main_path: &Path) -> PathBuf {
    let p = Path::new(import);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        main_path.parent().unwrap_or(Path::new("/")).join(p)
    }
}

/// Whether `pattern` (a path whose last component may hold `*` and `?`,
/// as in containerd's filepath.Glob imports) names `path`.
pub fn glob_match(pattern: &Path, path: &Path) -> bool {
    if pattern.parent() != path.parent() {
        return false;
    }
    let (Some(p), Some(n)) = (pattern.file_name(), path.file_name()) else {
        return false;
    };
    wildcard(p.as_encoded_bytes(), n.as_encoded_bytes())
}

fn wildcard(p: &[u8], n: &[u8]) -> bool {
    match (p.first(), n.first()) {
        (None, None) => true,
        (Some(b'*'), _) => wildcard(&p[1..], n) || (!n.is_empty() && wildcard(p, &n[1..])),
        (Some(b'?'), Some(_)) => wildcard(&p[1..], &n[1..]),
        (Some(a), Some(b)) if a == b => wildcard(&p[1..], &n[1..]),
        _ => false,
    }
}

#[cfg(test)]
#[path = "containerd_tests.rs"]
mod tests;
