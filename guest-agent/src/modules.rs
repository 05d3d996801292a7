//! Kernel module loading, without modprobe.
//!
//! The image build resolves dependencies with the kernel package's
//! `modules.dep` and writes `/lib/modules/clh-modules.load`: one path per
//! line, relative to `/lib/modules/<release>/`, in load order. We load each
//! with finit_module(2) and `MODULE_INIT_COMPRESSED_FILE`, so the kernel
//! decompresses the `.ko.xz` itself and we carry no xz code.

use crate::cmdline::Param;
use std::ffi::CString;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// The load list written by guest-image/build.sh.
pub const LOAD_LIST: &str = "/lib/modules/clh-modules.load";

/// finit_module(2) flag: the file is compressed; the kernel decompresses it.
/// Not in libc/nix yet (Linux 6.4+, include/uapi/linux/module.h).
const MODULE_INIT_COMPRESSED_FILE: libc::c_uint = 4;

#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    #[error("cannot read module list {path}")]
    List {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open module {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot load module {name} ({path}) with parameters {params:?}")]
    Load {
        name: String,
        path: PathBuf,
        params: String,
        #[source]
        source: std::io::Error,
    },
}

/// How one module fared, for the log.
#[derive(Debug, PartialEq, Eq)]
pub enum Loaded {
    Loaded {
        name: String,
        params: String,
    },
    /// EEXIST: built in, or loaded earlier (e.g. as a dependency).
    AlreadyLoaded {
        name: String,
    },
}

/// Loads every module of [`LOAD_LIST`] in order, from `/lib/modules/<release>`.
/// A missing list means an image without modules: nothing to do.
pub fn load_all(release: &str, cmdline: &[Param]) -> Result<Vec<Loaded>, ModuleError> {
    let text = match std::fs::read_to_string(LOAD_LIST) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(ModuleError::List {
                path: LOAD_LIST.into(),
                source,
            })
        }
    };
    let base = Path::new("/lib/modules").join(release);
    list_entries(&text)
        .map(|rel| load_one(&base.join(rel), cmdline))
        .collect()
}

/// The non-empty, non-comment lines of the load list.
fn list_entries(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
}

fn load_one(path: &Path, cmdline: &[Param]) -> Result<Loaded, ModuleError> {
    let name = module_name(path);
    let params = module_params(&name, cmdline);
    let file = File::open(path).map_err(|source| ModuleError::Open {
        path: path.to_owned(),
        source,
    })?;
    let load_err = |source| ModuleError::Load {
        name: name.clone(),
        path: path.to_owned(),
        params: params.clone(),
        source,
    };
    // Parameters come from /proc/cmdline, which cannot hold a NUL byte.
    let c_params = CString::new(params.as_str())
        .map_err(|_| load_err(std::io::Error::from(std::io::ErrorKind::InvalidInput)))?;
    // SAFETY: `file` is an open fd for the duration of the call and
    // `c_params` is a valid NUL-terminated string; finit_module reads both
    // and keeps neither.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            file.as_raw_fd(),
            c_params.as_ptr(),
            MODULE_INIT_COMPRESSED_FILE,
        )
    };
    if rc == 0 {
        return Ok(Loaded::Loaded { name, params });
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EEXIST) {
        return Ok(Loaded::AlreadyLoaded { name });
    }
    Err(load_err(err))
}

/// `kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko.xz` →
/// `vmw_vsock_virtio_transport`. The kernel treats '-' and '_' in module
/// names as the same; we normalise to '_'.
fn module_name(path: &Path) -> String {
    let file = path
        .file_name()
        .and_then(|f| f.to_str())
        .unwrap_or_default();
    let stem = file.split_once(".ko").map_or(file, |(stem, _)| stem);
    stem.replace('-', "_")
}

/// The parameters the kernel command line gives module `name` as
/// `name.param=value`, joined the way finit_module wants them. For a
/// built-in driver the kernel applies these itself; for a module it only
/// keeps them in /proc/cmdline, so passing them on is our job. (QEMU microvm
/// with `acpi=off` appends `virtio_mmio.device=...`; Debian's cloud kernel
/// lacks CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES and ignores it with a warning,
/// so microvm must keep ACPI on and describe its devices in the DSDT.)
fn module_params(name: &str, cmdline: &[Param]) -> String {
    let mut out = Vec::new();
    for param in cmdline {
        let Some((module, key)) = param.key.split_once('.') else {
            continue;
        };
        if module.replace('-', "_") != name || key.is_empty() {
            continue;
        }
        out.push(match &param.value {
            // Re-quote values with spaces so the kernel parses them whole.
            Some(v) if v.contains(char::is_whitespace) => format!("{key}=\"{v}\""),
            Some(v) => format!("{key}={v}"),
            None => key.to_owned(),
        });
    }
    out.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmdline::parse;

    #[test]
    fn names_from_paths() {
        assert_eq!(
            module_name(Path::new(
                "kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko.xz"
            )),
            "vmw_vsock_virtio_transport"
        );
        assert_eq!(module_name(Path::new("a/virtio-mmio.ko")), "virtio_mmio");
    }

    #[test]
    fn params_for_one_module_only() {
        let cmdline = parse(
            "console=ttyS0 virtio-mmio.device=512@0xfeb00e00:12 virtio_mmio.device=1K@0x1:5 \
             virtio_net.napi_tx=1 foo.bar vsock.x=\"a b\"",
        );
        assert_eq!(
            module_params("virtio_mmio", &cmdline),
            "device=512@0xfeb00e00:12 device=1K@0x1:5"
        );
        assert_eq!(module_params("virtio_net", &cmdline), "napi_tx=1");
        assert_eq!(module_params("foo", &cmdline), "bar");
        assert_eq!(module_params("vsock", &cmdline), "x=\"a b\"");
        assert_eq!(module_params("overlay", &cmdline), "");
    }

    #[test]
    fn list_skips_blanks_and_comments() {
        let entries: Vec<_> =
            list_entries("# generated\nkernel/a.ko.xz\n\n  kernel/b.ko.xz \n").collect();
        assert_eq!(entries, ["kernel/a.ko.xz", "kernel/b.ko.xz"]);
    }
}
