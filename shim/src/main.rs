//! `containerd-shim-clh-v2`: the containerd runtime `io.containerd.clh.v2`.

use std::process::ExitCode;

use clh_config::{Config, Source};
use containerd_shim_clh_v2::daemon::{self, RUNTIME_ID};
use containerd_shim_clh_v2::logging;
use containerd_shim_clh_v2::shim::ClhShim;

const USAGE: &str = "usage: containerd-shim-clh-v2 check [--config PATH]
       containerd-shim-clh-v2 logs [--config PATH] [--agent | --console] [--follow] ID
       containerd-shim-clh-v2 monitor [--listen ADDR] [--config PATH]
       containerd-shim-clh-v2 template make [--config PATH]
       containerd-shim-clh-v2 --version

  check    tell what this host can run, and what to install or set otherwise
  logs     print the guest console of the VM of pod or container ID (its
           sandbox's VM for a pod's container): the guest kernel and the
           agent; --agent: the agent's lines only; --follow: keep printing
           until the VM stops
  monitor  serve every running pod's Prometheus metrics on one HTTP port
           (GET http://ADDR/metrics; ADDR 127.0.0.1:8090 by default), each
           series labelled with its sandbox id and CRI pod name, namespace
           and uid
  template make
           make the VM template that pods of the default size restore from
           ([runtime] templates = true), so that the first pod does not
           wait for it; prints the template's path

Any other arguments are containerd's (shim v2 protocol: start, delete, -info, serve).";

#[tokio::main]
async fn main() -> ExitCode {
    // Everything this binary and its children (VMM, virtiofsd,
    // vhost-device-vsock) create is owner-only, whatever umask containerd
    // runs with: state directories 0700, logs, state.json and sockets
    // 0600 (sockets are chmod'ed to exactly that where they are bound).
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("check") => check(&args[1..]).await,
        Some("logs") => containerd_shim_clh_v2::logs::main(&args[1..]),
        Some("monitor") => containerd_shim_clh_v2::metrics::monitor::main(&args[1..]).await,
        Some("template") => containerd_shim_clh_v2::template_cmd::main(&args[1..]).await,
        Some("--version" | "-v") => {
            println!("containerd-shim-clh-v2 {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        // containerd's actions: start and serving here (see daemon.rs),
        // -info here (bootstrap.rs), delete through containerd-shim's
        // bootstrap.
        Some(_) => containerd(&args).await,
        None => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
}

async fn containerd(args: &[String]) -> ExitCode {
    let flags = match containerd_shim::parse(args) {
        Ok(flags) => flags,
        Err(e) => {
            eprintln!("{RUNTIME_ID}: {e}");
            return ExitCode::from(2);
        }
    };
    if flags.info {
        return info();
    }
    let served = match flags.action.as_str() {
        "start" => daemon::start(&flags).await,
        "" if !flags.info && !flags.version => {
            let served = daemon::serve(RUNTIME_ID, &flags).await;
            // Everything is stopped; exit now rather than wait in the
            // runtime's drop for a blocking FIFO read containerd may
            // still hold open.
            if let Err(e) = &served {
                tracing::error!(error = format!("{e:#}"), "the shim stops");
                logging::flush(logging::FLUSH_TIMEOUT);
                eprintln!("{RUNTIME_ID}: {e:#}");
                std::process::exit(1);
            }
            tracing::info!("the shim exits");
            logging::flush(logging::FLUSH_TIMEOUT);
            std::process::exit(0);
        }
        _ => {
            if flags.action == "delete" {
                // containerd quotes delete's stderr in its log.
                if let Ok((config, _)) = Config::load_default() {
                    let level = logging::effective_level(config.runtime.log_level, flags.debug);
                    logging::init_stderr(daemon::origin(&flags), level);
                }
            }
            containerd_shim::asynchronous::run::<ClhShim>(RUNTIME_ID, None).await;
            logging::flush(logging::FLUSH_TIMEOUT);
            return ExitCode::SUCCESS;
        }
    };
    logging::flush(logging::FLUSH_TIMEOUT);
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{RUNTIME_ID}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `-info` (containerd ≥ 2.0 runs it, 2.2 once per runtime): the runtime
/// options on stdin, if any; our `RuntimeInfo` on stdout, nothing else.
fn info() -> ExitCode {
    use containerd_shim_protos::protobuf::Message;
    use std::io::Write;
    let info = containerd_shim_clh_v2::bootstrap::read_stdin()
        .and_then(|input| containerd_shim_clh_v2::bootstrap::runtime_info(RUNTIME_ID, &input));
    let written = info.and_then(|info| {
        let bytes = info.write_to_bytes()?;
        let mut stdout = std::io::stdout().lock();
        stdout.write_all(&bytes)?;
        stdout.flush()?;
        Ok(())
    });
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{RUNTIME_ID}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn check(args: &[String]) -> ExitCode {
    let loaded = match args {
        [] => Config::load_default(),
        [flag, path] if flag == "--config" => {
            let path = std::path::PathBuf::from(path);
            Config::load(&path).map(|c| (c, Source::File(path)))
        }
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let (config, source) = match loaded {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("containerd-shim-clh-v2 check: {e}");
            return ExitCode::FAILURE;
        }
    };
    let report = containerd_shim_clh_v2::check::check(&config, &source).await;
    println!("{report}");
    if report.can_run() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
