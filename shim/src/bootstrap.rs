//! What containerd hands `start` and `-info`, and what it reads back, for
//! every containerd since 1.6. `tests/fixtures/containerd_start.rs` writes
//! down, with source references, what each version sends.
//!
//! - containerd 1.6 to 2.2 (the legacy protocol): the shim's settings in
//!   flags (`-namespace -address -publish-binary -id [-debug] start`) and
//!   the environment (`TTRPC_ADDRESS`; from 1.7 also `GRPC_ADDRESS`,
//!   `NAMESPACE`, `MAX_SHIM_VERSION=2`); on stdin the runtime options (a
//!   protobuf `Any`) or nothing. containerd reads stdout and stderr together
//!   and takes the trimmed text for the address: 1.6 as it is, 1.7 to 2.2
//!   as JSON when it parses as such, else as a bare address of task API v2.
//! - containerd 2.3 (the bootstrap protocol): the same flags and
//!   environment, and on stdin a protobuf `BootstrapParams` that carries
//!   them too, the socket directory, the log level, and the runtime options
//!   as an extension. It parses the reply as a protobuf `BootstrapResult`
//!   first (then as the legacy text).
//!
//! A legacy `Any` also decodes as `BootstrapParams` (its type URL lands in
//! `instance_id`, its value in `namespace`): params count as the bootstrap
//! protocol only when they name this shim's id and namespace, which no type
//! URL can (ids have no `/`). So stdin is never mistaken either way.
//!
//! The reply: a `BootstrapResult` of task API v3 to 2.3; the bare address
//! to the others (a JSON reply of version 3 would be refused by 1.7, and
//! 1.6 takes only an address); the daemon serves the Task service under
//! both names (daemon.rs). Nothing else may reach stdout or stderr during
//! `start`: containerd reads them as one stream.

use std::io::{IsTerminal, Read};

use anyhow::{bail, Context};
use containerd_shim::bootstrap::{BootstrapParams, BootstrapResult, Extension, LogLevel};
use containerd_shim::{Flags, StartOpts};
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::{Enum, EnumOrUnknown, Message};
use containerd_shim_protos::types::introspection::{RuntimeInfo, RuntimeVersion};

use crate::service::validate;

/// The most containerd may write on stdin, as containerd's own shims read.
const MAX_INPUT: u64 = 10 << 20;

/// The task API version our reply announces to containerd 2.3.
const TASK_API_VERSION: i32 = containerd_shim_protos::TASK_API_VERSION;

/// How containerd started us, which decides the reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// containerd 2.3+: `BootstrapParams` in, `BootstrapResult` out.
    Bootstrap,
    /// containerd 1.6 to 2.2: flags, environment, runtime options in; the
    /// bare address out.
    Legacy,
}

/// What `start` was given, normalized.
#[derive(Debug)]
pub struct Start {
    pub protocol: Protocol,
    /// id, namespace, addresses, socket directory, debug, extensions.
    pub opts: StartOpts,
    /// The runtime options containerd passed, if any: the `Any` on a legacy
    /// stdin, or the extensions of a runtime-options type.
    pub runtime_options: Vec<Any>,
}

/// What the legacy protocol passes in the environment.
#[derive(Debug, Default, Clone)]
pub struct LegacyEnv {
    pub ttrpc_address: String,
    pub grpc_address: String,
}

impl LegacyEnv {
    pub fn from_env() -> Self {
        LegacyEnv {
            ttrpc_address: std::env::var("TTRPC_ADDRESS").unwrap_or_default(),
            grpc_address: std::env::var("GRPC_ADDRESS").unwrap_or_default(),
        }
    }
}

/// Reads what containerd wrote on stdin (nothing from a terminal), up to
/// [`MAX_INPUT`] bytes.
pub fn read_stdin() -> anyhow::Result<Vec<u8>> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        return Ok(Vec::new());
    }
    let mut input = Vec::new();
    stdin
        .lock()
        .take(MAX_INPUT)
        .read_to_end(&mut input)
        .context("cannot read containerd's bootstrap input on stdin")?;
    Ok(input)
}

/// Runtime options types: runc's (whose fields do not apply to a VM) and
/// CRI's generic one. Checked by [`validate::runtime_options`]; another
/// extension of a `BootstrapParams` (a future CRI or NRI section) is not
/// runtime options and is left alone.
const RUNTIME_OPTIONS_TYPES: [&str; 3] = [
    "containerd.runc.v1.Options",
    "io.containerd.runc.v1.Options",
    "runtimeoptions.v1.Options",
];

fn is_runtime_options(any: &Any) -> bool {
    let name = any.type_url.rsplit('/').next().unwrap_or_default();
    RUNTIME_OPTIONS_TYPES.contains(&name)
}

/// Normalizes `input` (stdin), `flags` and `env` into a [`Start`], and
/// checks the runtime options it carries. An error says what was wrong
/// with what containerd sent.
pub fn parse_start(input: &[u8], flags: &Flags, env: &LegacyEnv) -> anyhow::Result<Start> {
    let (mut params, protocol, runtime_options) = match bootstrap_params(input, flags)? {
        Some(params) => {
            let options = params
                .extensions
                .iter()
                .filter_map(|e| e.value.as_ref())
                .filter(|any| is_runtime_options(any))
                .cloned()
                .collect();
            (params, Protocol::Bootstrap, options)
        }
        None => {
            let options = legacy_options(input)?;
            let params = BootstrapParams {
                instance_id: flags.id.clone(),
                namespace: flags.namespace.clone(),
                containerd_ttrpc_address: env.ttrpc_address.clone(),
                containerd_grpc_address: if flags.address.is_empty() {
                    env.grpc_address.clone()
                } else {
                    flags.address.clone()
                },
                containerd_binary: flags.publish_binary.clone(),
                extensions: options
                    .iter()
                    .map(|any| Extension {
                        value: Some(any.clone()).into(),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            };
            (params, Protocol::Legacy, options)
        }
    };
    // `-debug` comes beside both protocols.
    if flags.debug && params.log_level.value() > LogLevel::LOG_LEVEL_DEBUG.value() {
        params.log_level = EnumOrUnknown::new(LogLevel::LOG_LEVEL_DEBUG);
    }
    if params.containerd_ttrpc_address.is_empty() {
        // containerd 2.3 sends it in both; an older one only in the
        // environment. The daemon publishes events there.
        params.containerd_ttrpc_address = env.ttrpc_address.clone();
    }
    if params.containerd_ttrpc_address.is_empty() {
        bail!("containerd passed no TTRPC address (neither in BootstrapParams nor in TTRPC_ADDRESS): run the shim from containerd");
    }
    if params.namespace.is_empty() || params.instance_id.is_empty() {
        bail!(
            "containerd passed no namespace or id (-namespace, -id): run the shim from containerd"
        );
    }
    for any in &runtime_options {
        validate::runtime_options(Some(any)).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    Ok(Start {
        protocol,
        opts: StartOpts::from(params),
        runtime_options,
    })
}

/// `input` as containerd 2.3's `BootstrapParams` for this shim; `None`
/// when it is something else (nothing, or legacy runtime options).
fn bootstrap_params(input: &[u8], flags: &Flags) -> anyhow::Result<Option<BootstrapParams>> {
    if input.is_empty() {
        return Ok(None);
    }
    let Ok(params) = BootstrapParams::parse_from_bytes(input) else {
        return Ok(None);
    };
    if params.instance_id == flags.id && params.namespace == flags.namespace {
        return Ok(Some(params));
    }
    // An `Any` decodes as params with only instance_id and namespace set
    // (type URL and value). Anything more is real params for someone else.
    let any_like = BootstrapParams {
        instance_id: params.instance_id.clone(),
        namespace: params.namespace.clone(),
        ..Default::default()
    };
    if params == any_like {
        return Ok(None);
    }
    bail!(
        "containerd's BootstrapParams on stdin are for {}/{}, but the command line names {}/{}: refusing to start another container's shim",
        params.namespace,
        params.instance_id,
        flags.namespace,
        flags.id
    )
}

/// The legacy stdin: nothing, or the runtime options as a protobuf `Any`.
fn legacy_options(input: &[u8]) -> anyhow::Result<Vec<Any>> {
    if input.is_empty() {
        return Ok(Vec::new());
    }
    match Any::parse_from_bytes(input) {
        Ok(any) if !any.type_url.is_empty() => Ok(vec![any]),
        _ => bail!(
            "stdin holds {} bytes that are neither containerd 2.3's BootstrapParams for this shim nor runtime options (a protobuf Any): run the shim from containerd",
            input.len()
        ),
    }
}

/// The reply to `start` in the form `protocol` expects.
pub fn start_reply(protocol: Protocol, address: &str) -> anyhow::Result<Vec<u8>> {
    match protocol {
        Protocol::Legacy => Ok(address.as_bytes().to_vec()),
        Protocol::Bootstrap => BootstrapResult {
            version: TASK_API_VERSION,
            address: address.to_owned(),
            protocol: "ttrpc".to_owned(),
            ..Default::default()
        }
        .write_to_bytes()
        .context("cannot encode the BootstrapResult"),
    }
}

/// The `-info` answer: our name and version, the options containerd
/// passed (echoed, as runc's shim does), and OCI runtime features saying
/// what containerd checks before it creates a container: idmap mounts are
/// not supported (containerd then refuses such a container with that
/// reason instead of the VM mounting the volume without the mapping).
pub fn runtime_info(runtime_id: &str, input: &[u8]) -> anyhow::Result<RuntimeInfo> {
    let options = if input.is_empty() {
        None
    } else {
        let any = Any::parse_from_bytes(input).with_context(|| {
            format!(
                "-info: stdin holds {} bytes that are not runtime options (a protobuf Any)",
                input.len()
            )
        })?;
        Some(any)
    };
    let features = serde_json::json!({
        "ociVersionMin": "1.0.0",
        "ociVersionMax": oci_spec::runtime::VERSION,
        "linux": {
            "mountExtensions": { "idmap": { "enabled": false } }
        }
    });
    Ok(RuntimeInfo {
        name: runtime_id.to_owned(),
        version: Some(RuntimeVersion {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            revision: option_env!("CLH_SHIM_REVISION")
                .unwrap_or_default()
                .to_owned(),
            ..Default::default()
        })
        .into(),
        options: options.into(),
        features: Some(Any {
            type_url: FEATURES_TYPE_URL.to_owned(),
            value: serde_json::to_vec(&features).context("cannot encode the runtime features")?,
            ..Default::default()
        })
        .into(),
        ..Default::default()
    })
}

/// containerd's type URL for the runtime-spec `features.Features` (JSON),
/// registered in core/runtime/typeurl.go.
pub const FEATURES_TYPE_URL: &str =
    "types.containerd.io/opencontainers/runtime-spec/1/features/Features";

#[cfg(test)]
#[path = "bootstrap_tests.rs"]
mod tests;
