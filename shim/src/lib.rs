//! containerd-shim-clh-v2: a containerd shim v2 runtime that runs every pod
//! in its own microVM. The binary (`main.rs`) is a thin front; the logic
//! lives in these modules.

pub mod bind_mount;
pub mod bootstrap;
pub mod check;
pub mod daemon;
pub mod host;
pub mod logging;
pub mod logs;
pub mod metrics;
pub mod mountinfo;
mod options;
mod orphan_daemon;
pub mod pod;
pub mod pod_cgroup;
pub mod remove_tree;
pub mod service;
pub mod shared_mount;
pub mod shim;
pub mod sizing;
pub mod submounts;
pub mod task;
pub mod template_cmd;
pub mod vm;
pub mod writable_shares;
