//! The shim configuration an installed version carries: the template (the
//! payload's, or the admin's `--shim-config`) with the guest image and the
//! bundled helpers pointed at the version's own files.

use std::path::Path;

use toml_edit::{value, DocumentMut, Item, Table};

use crate::error::{InstallError, Result};
use crate::layout::Layout;
use crate::payload::Payload;

/// (table, key, file in the version) for what the installer manages.
const GUEST: &[(&str, &str)] = &[
    ("kernel", "share/clh-shim/vmlinux"),
    ("kernel_bzimage", "share/clh-shim/vmlinuz"),
    ("initramfs", "share/clh-shim/initramfs.cpio.gz"),
];
/// Helpers used from the payload when it carries them.
const HELPERS: &[(&str, &str)] = &[
    ("virtiofsd", "bin/virtiofsd"),
    ("vhost_device_vsock", "bin/vhost-device-vsock"),
];

/// The configuration text for version `id`. Keys an admin's own file
/// (`admin = true`) sets are kept: e.g. a PVM-enabled guest kernel.
pub fn render(
    template: &[u8],
    origin: &Path,
    admin: bool,
    payload: &Payload,
    layout: &Layout,
    id: &str,
) -> Result<Vec<u8>> {
    let parse_err = |message: String| InstallError::ConfigParse {
        path: origin.to_path_buf(),
        message,
    };
    let text = std::str::from_utf8(template).map_err(|e| parse_err(e.to_string()))?;
    let mut doc: DocumentMut = text.parse().map_err(|e| parse_err(format!("{e}")))?;
    let guest = GUEST.iter().map(|(k, f)| ("guest", *k, *f));
    let helpers = HELPERS
        .iter()
        .filter(|(_, f)| payload.has(f))
        .map(|(k, f)| ("hypervisor", *k, *f));
    for (table, key, file) in guest.chain(helpers) {
        let t = doc
            .entry(table)
            .or_insert_with(|| Item::Table(Table::new()))
            .as_table_like_mut()
            .ok_or_else(|| parse_err(format!("[{table}] is not a table")))?;
        if admin && t.contains_key(key) {
            continue;
        }
        t.insert(key, value(layout.host_view(id, file).display().to_string()));
    }
    let mut out = format!(
        "# Written by clh-install for version {id}: the guest image and helpers\n\
         # are this version's own files. Change the template and reinstall\n\
         # (--shim-config FILE) rather than editing this copy.\n"
    )
    .into_bytes();
    out.extend_from_slice(doc.to_string().as_bytes());
    Ok(out)
}
