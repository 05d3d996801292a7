//! clh-agent's modules, as a library: the binary (`main.rs`) is the agent
//! itself; the library also gives the fuzz targets (fuzz/) the request
//! handlers' pure parts (see [`fuzzing`]).

pub mod boot_marks;
mod cmdline;
mod config;
pub mod containers;
mod faults;
pub mod forward_server;
mod hotplug;
mod identity;
pub mod init;
pub mod logging;
mod modules;
mod mounts;
mod network;
pub mod power;
pub mod reaper;
mod rng;
pub mod server;
pub mod service;
pub mod stdio_server;
pub mod switch_root;
mod sysctl;
mod sysinfo;
pub mod volumes;
mod vsock_peer;

#[doc(hidden)]
pub mod fuzzing;

/// Formats an error and its sources as `outer: inner: root`, for errors
/// that are not anyhow's (which does this itself with `{:#}`).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
