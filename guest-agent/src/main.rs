//! clh-agent: the in-guest agent of clh-shim.
//!
//! As PID 1 of the microVM it sets up the guest (see `init`), reaps
//! orphans, and serves the ttrpc `Agent` service on AF_VSOCK. Run on the
//! host as `clh-agent --listen unix:///path`, it serves the same service on
//! a Unix socket and does no init work, so the service is testable without
//! a VM.

use clh_agent::{
    boot_marks, containers, forward_server, init, logging, power, reaper, server, service,
    stdio_server, switch_root, volumes,
};

use anyhow::Context;
use server::ListenAddr;
use std::convert::Infallible;
use tracing::info;

const USAGE: &str = "usage: clh-agent --listen unix:///path/to/socket [--debug]\n\
                     (as PID 1 it takes no arguments and reads the kernel command line)";

fn main() {
    if nix::unistd::getpid().as_raw() == 1 {
        power::install_panic_hook();
        if switch_root::needed() {
            // Only returns on error; otherwise we start over on the new root.
            let e = switch_root::switch_and_reexec();
            power::fatal_poweroff(&format!("{e:#}"));
        }
        // Only returns on error; serving runs until power-off.
        let Err(e) = run_as_init();
        power::fatal_poweroff(&format!("{e:#}"));
    }
    match parse_host_args(std::env::args().skip(1)) {
        Ok(Some((addr, debug))) => {
            if let Err(e) = run_on_host(addr, debug) {
                eprintln!("clh-agent: {e:#}");
                std::process::exit(1);
            }
        }
        Ok(None) => println!("clh-agent {}", service::AGENT_VERSION),
        Err(msg) => {
            eprintln!("clh-agent: {msg}\n{USAGE}");
            std::process::exit(2);
        }
    }
}

/// PID 1: init, then serve on vsock forever.
fn run_as_init() -> anyhow::Result<Infallible> {
    boot_marks::mark("agent_start");
    let config = init::init()?;
    boot_marks::mark("agent_init_done");
    let addr = ListenAddr::Vsock(config.port);
    runtime()?.block_on(async move {
        let reaper = reaper::Reaper::default();
        reaper
            .clone()
            .start()
            .context("installing the SIGCHLD handler")?;
        let containers = containers::Containers::new(reaper);
        containers.watch_oom();
        stdio_server::serve_vsock(clh_agent_protocol::STDIO_VSOCK_PORT, containers.clone())
            .context("listening for stdio streams")?;
        forward_server::serve_vsock(clh_agent_protocol::FORWARD_VSOCK_PORT)
            .context("listening for port-forward streams")?;
        let volumes = volumes::Volumes::new(clh_agent_protocol::GUEST_VOLUMES_DIR);
        let _server = server::serve(&addr, containers, volumes).await?;
        boot_marks::mark("agent_serving");
        // The QEMU backend waits for this line before it connects
        // (clh_hypervisor::console_log::AGENT_SERVING_MESSAGE).
        info!("serving ttrpc on {addr}");
        // The server runs in background tasks; PID 1 waits forever.
        std::future::pending::<()>().await;
        unreachable!("pending() never completes")
    })
}

/// Host test mode: serve on `addr` until SIGINT or SIGTERM.
fn run_on_host(addr: ListenAddr, debug: bool) -> anyhow::Result<()> {
    logging::init(if debug {
        tracing::Level::DEBUG
    } else {
        tracing::Level::INFO
    });
    runtime()?.block_on(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
        // Containers need root and a cgroup v2 mount: in host mode they
        // fail cleanly; the reaper only ever sees our own children.
        let reaper = reaper::Reaper::default();
        reaper
            .clone()
            .start()
            .context("installing the SIGCHLD handler")?;
        let containers = containers::Containers::new(reaper);
        // Not the host's /run/clh: a directory of this process's own.
        let volumes_dir =
            std::env::temp_dir().join(format!("clh-agent-{}-volumes", std::process::id()));
        let volumes = volumes::Volumes::new(&volumes_dir);
        let mut server = server::serve(&addr, containers, volumes).await?;
        info!("serving ttrpc on {addr} (host test mode, no init)");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        server
            .shutdown()
            .await
            .context("shutting down the server")?;
        if let ListenAddr::Unix(path) = &addr {
            let _ = std::fs::remove_file(path);
        }
        let _ = std::fs::remove_dir_all(&volumes_dir);
        Ok(())
    })
}

/// Two worker threads: enough that a slow RPC cannot stall the others,
/// while keeping the agent's memory footprint (one stack per worker) small
/// in VMs that may have many vCPUs.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("building the tokio runtime")
}

/// `--listen ADDR [--debug]` → `Some((addr, debug))`; `--version` → `None`.
fn parse_host_args(
    mut args: impl Iterator<Item = String>,
) -> Result<Option<(ListenAddr, bool)>, String> {
    let mut listen = None;
    let mut debug = false;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => {
                let value = args.next().ok_or("--listen needs an address")?;
                listen = Some(
                    ListenAddr::parse(&value).ok_or(format!("bad --listen address {value:?}"))?,
                );
            }
            "--debug" => debug = true,
            "--version" => return Ok(None),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let addr = listen.ok_or("not PID 1, so --listen is required")?;
    Ok(Some((addr, debug)))
}
