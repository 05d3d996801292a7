//! Prometheus metrics: each shim serves its pod's on a Unix socket in the
//! VM directory (`pod.rs`), and `containerd-shim-clh-v2 monitor`
//! (`monitor.rs`) gathers every running shim's on one HTTP port, each
//! series labelled with the sandbox id and the pod's CRI name, namespace
//! and uid. The text format is written and read by hand (`text.rs`), the
//! little HTTP there is too (`http.rs`).

pub mod http;
pub mod monitor;
pub mod pod;
#[cfg(test)]
mod tests;
pub mod text;

pub use pod::{serve, PodLabels, SOCKET_NAME};
