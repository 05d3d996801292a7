//! Entry points for the fuzz targets (fuzz/): the pure parts of the
//! request handlers, run on a decoded request's fields as the handlers run
//! them, before anything is created. Not an API: only fuzz/ calls these.
//! SyncVolume needs no entry point here: the fuzz target drives the real
//! [`crate::volumes::Volumes`] in a temporary directory.

use std::path::PathBuf;

use oci_spec::runtime::{Process, Spec};
use tokio::io::AsyncRead;

use crate::containers::process::StreamKind;
use crate::containers::{self, CtrError};

/// CreateContainer up to libcontainer: the spec as the container gets it,
/// whether it has a terminal, and the memory volumes' guest directories.
pub fn create_container(
    id: &str,
    spec_json: &[u8],
    terminal: bool,
) -> Result<(Spec, bool, Vec<PathBuf>), CtrError> {
    let (spec, terminal) = containers::prepare_spec(id, spec_json, terminal)?;
    let dirs = containers::ephemeral_dirs(&spec)?;
    Ok((spec, terminal, dirs))
}

/// ExecProcess up to writing the process's JSON: the exec id, which names
/// that file, and the process.
pub fn exec_process(
    exec_id: &str,
    process_json: &[u8],
    terminal: bool,
) -> Result<(Process, bool), CtrError> {
    containers::validate_id("exec id", exec_id)?;
    containers::prepare_process(process_json, terminal)
}

/// UpdateContainer up to the cgroup: the files written and their values.
pub fn update_container(resources_json: &[u8]) -> Result<Vec<(&'static str, String)>, CtrError> {
    Ok(containers::resource_writes(&containers::parse_resources(
        resources_json,
    )?))
}

/// A stdio stream's header, read and parsed as the stdio server does:
/// `(container id, exec id, stream)`. Nothing after its newline is read.
pub async fn stdio_header<S: AsyncRead + Unpin>(
    s: &mut S,
) -> Result<(String, String, StreamKind), String> {
    let line = crate::stdio_server::read_header(s).await?;
    let (id, exec, kind) = crate::stdio_server::parse_header(&line)?;
    Ok((id.to_owned(), exec.to_owned(), kind))
}
