//! `containerd-shim-clh-v2 template make [--config PATH]`: makes, ahead of
//! the first pod, the VM template that pods without resource limits (the
//! configured default size) restore from, so that no pod pays for a
//! template's boot (docs/design/0004-vm-templates.md).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clh_config::{Config, Source};

use crate::host::KvmFlavour;
use crate::sizing::{self, PodLimits, SizingPolicy};
use crate::vm::{self, VmOptions};

const USAGE: &str = "usage: containerd-shim-clh-v2 template make [--config PATH]";

pub async fn main(args: &[String]) -> ExitCode {
    let config = match args {
        [make] if make == "make" => None,
        [make, flag, path] if make == "make" && flag == "--config" => Some(PathBuf::from(path)),
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match make(config).await {
        Ok(snapshot) => {
            println!("template ready: {}", snapshot.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("containerd-shim-clh-v2 template make: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn make(config: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let (config, source) = match config {
        Some(path) => (Config::load(&path)?, Source::File(path)),
        None => Config::load_default()?,
    };
    let (mut opts, _) = VmOptions::from_config(&config, &KvmFlavour::detect());
    // The size a pod without limits gets (service/create.rs).
    let policy = SizingPolicy::from_config(&config.guest, sizing::host_cpus());
    let size = sizing::vm_size(&PodLimits::default(), &policy);
    (opts.vcpus, opts.memory_mib) = (size.vcpus, size.memory_mib);
    vm::make_template(&opts)
        .await
        .with_context(|| format!("configuration {source}"))
}
