//! `clh-install`: the node installer's command line (see lib.rs).
//!
//! ```text
//! clh-install install   [options]   install or upgrade; idempotent
//! clh-install uninstall [options] [--force]
//! clh-install status    [options]
//! clh-install daemonset [options]   install, label the node, wait for SIGTERM (clh-deploy.yaml)
//! clh-install cleanup   [options]   unlabel the node, uninstall, wait for SIGTERM (clh-cleanup.yaml)
//! clh-install label|unlabel [--node NAME]
//! ```

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clh_install::{node_label, Major, Options, Restart};

const USAGE: &str = "usage: clh-install install|uninstall|status|daemonset|cleanup|label|unlabel [options]

  --payload DIR            what to install (default: the directory above this binary's bin/)
  --host-root DIR          the host's / as this process sees it (default /; /host in the DaemonSet)
  --prefix PATH            where versions go (default /opt/clh-shim)
  --containerd-config PATH containerd's main config (default /etc/containerd/config.toml)
  --drop-in-dir PATH       where the drop-in goes (default /etc/containerd/conf.d)
  --link-dir PATH|none     where a containerd-shim-clh-v2 symlink goes, for ctr (default /usr/local/bin)
  --containerd-version 1|2 skip asking `containerd --version`
  --containerd PATH        the containerd binary to ask
  --restart-command CMD    how to restart containerd (default: systemctl restart containerd under systemd)
  --no-restart             never restart containerd; say that it needs one
  --shim-config FILE       ship this shim configuration (its guest and helper paths are kept)
  --handler NAME           the CRI runtime handler (default clh)
  --force                  uninstall even while pods run (their files stay)
  --node NAME              the node to label (default $NODE_NAME)
  --service-account-dir D  the API credentials (default /var/run/secrets/kubernetes.io/serviceaccount)
";

fn main() {
    if let Err(e) = run() {
        eprintln!("clh-install: error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let Some(command) = args.next() else {
        bail!("{USAGE}");
    };
    let exe = std::env::current_exe().context("locating this binary")?;
    let default_payload = exe
        .parent()
        .and_then(|bin| bin.parent())
        .map(PathBuf::from)
        .unwrap_or_default();
    let mut opts = Options::new(default_payload);
    let mut force = false;
    let mut node = std::env::var("NODE_NAME").ok();
    let mut sa_dir = PathBuf::from(node_label::SERVICE_ACCOUNT_DIR);
    while let Some(flag) = args.next() {
        let mut val = || {
            args.next()
                .with_context(|| format!("{flag} needs a value\n{USAGE}"))
        };
        match flag.as_str() {
            "--payload" => opts.payload = val()?.into(),
            "--host-root" => opts.host_root = val()?.into(),
            "--prefix" => opts.prefix = absolute(val()?, "--prefix")?,
            "--containerd-config" => {
                opts.containerd_config = absolute(val()?, "--containerd-config")?
            }
            "--drop-in-dir" => opts.drop_in_dir = absolute(val()?, "--drop-in-dir")?,
            "--link-dir" => {
                let v = val()?;
                opts.link_dir = (v != "none")
                    .then(|| absolute(v, "--link-dir"))
                    .transpose()?;
            }
            "--containerd-version" => {
                opts.containerd_major = Some(match val()?.split('.').next() {
                    Some("1") => Major::One,
                    Some("2") => Major::Two,
                    _ => bail!("--containerd-version takes 1 or 2 (or 1.7, 2.1, ...)"),
                })
            }
            "--containerd" => opts.containerd_binary = Some(absolute(val()?, "--containerd")?),
            "--restart-command" => opts.restart = Restart::Command(val()?),
            "--no-restart" => opts.restart = Restart::Never,
            "--shim-config" => opts.shim_config = Some(val()?.into()),
            "--handler" => opts.handler = val()?,
            "--force" => force = true,
            "--node" => node = Some(val()?),
            "--service-account-dir" => sa_dir = val()?.into(),
            "-h" | "--help" => {
                print!("{USAGE}");
                return Ok(());
            }
            other => bail!("unknown option {other:?}\n{USAGE}"),
        }
    }
    let label = |value: Option<&str>| -> Result<()> {
        let node = node.as_deref().context(
            "no node to label: pass --node NAME (the DaemonSet sets NODE_NAME from spec.nodeName)",
        )?;
        node_label::ApiServer::in_cluster(&sa_dir)?.label_node(node, value)?;
        match value {
            Some(v) => println!("labelled node {node} {}={v}", node_label::LABEL),
            None => println!("removed label {} from node {node}", node_label::LABEL),
        }
        Ok(())
    };
    let report = match command.as_str() {
        "install" => clh_install::install(&opts)?,
        "uninstall" => clh_install::uninstall(&opts, force)?,
        "status" => clh_install::status(&opts)?,
        "label" => return label(Some("true")),
        "unlabel" => return label(None),
        "cleanup" => {
            let signals = termination_signals();
            signals.thread_block().context("blocking SIGTERM")?;
            // Unlabelled first: no new clh pod is scheduled here meanwhile.
            label(None)?;
            print(&clh_install::uninstall(&opts, force)?);
            println!("uninstalled; waiting for SIGTERM (delete clh-cleanup.yaml now)");
            let sig = signals.wait().context("waiting for SIGTERM")?;
            println!("{sig:?}: exiting");
            return Ok(());
        }
        "daemonset" => {
            // Blocked from the start: a SIGTERM during the install waits
            // for it to finish (as PID 1 of its container the default
            // action would drop it, and the pod would never stop).
            let signals = termination_signals();
            signals.thread_block().context("blocking SIGTERM")?;
            let report = clh_install::install(&opts)?;
            print(&report);
            // Labelled last: the scheduler sends clh pods only to a node
            // whose runtime is in place.
            label(Some("true"))?;
            println!("installed; waiting for SIGTERM (stopping this pod uninstalls nothing: apply clh-cleanup.yaml for that)");
            let sig = signals.wait().context("waiting for SIGTERM")?;
            println!("{sig:?}: exiting; the installation stays");
            return Ok(());
        }
        _ => bail!("unknown command {command:?}\n{USAGE}"),
    };
    print(&report);
    Ok(())
}

fn print(report: &clh_install::Report) {
    for line in &report.lines {
        println!("{line}");
    }
}

/// Paths in options are as the host sees them: absolute.
fn absolute(value: String, flag: &str) -> Result<PathBuf> {
    let p = PathBuf::from(value);
    if !p.is_absolute() {
        bail!("{flag} takes an absolute path (as the host sees it), not {p:?}");
    }
    Ok(p)
}

/// SIGTERM and SIGINT, which end the DaemonSet's container. A DaemonSet's
/// pod is stopped on every rollout: that must never take the runtime off
/// the node under its pods, so they uninstall nothing.
fn termination_signals() -> nix::sys::signal::SigSet {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set
}
