//! `containerd-shim-clh-v2 monitor [--listen ADDR] [--config PATH]`: one
//! HTTP endpoint (`GET /metrics`) for every pod on the node. Each request
//! scrapes the metrics socket of every VM directory under the state
//! directory at once, each under a deadline, and answers their families
//! merged, every series labelled `sandbox_id`, `pod_name`, `pod_namespace`
//! and `pod_uid`, with the monitor's own `clh_monitor_*` figures.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clh_config::{Config, Source};

use super::http;
use super::pod::SOCKET_NAME;
use super::text::{parse_sample, Exposition, Kind, Merged};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8090";

/// How long one shim may take to answer.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);

const USAGE: &str = "usage: containerd-shim-clh-v2 monitor [--listen ADDR] [--config PATH]";

/// Scrapes that failed since the monitor started.
static SCRAPE_ERRORS: AtomicU64 = AtomicU64::new(0);

#[derive(Debug, PartialEq, Eq)]
pub struct Args {
    pub listen: String,
    pub config: Option<PathBuf>,
}

pub fn parse(args: &[String]) -> Result<Args, String> {
    let mut listen = DEFAULT_LISTEN.to_string();
    let mut config = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--listen" => listen = it.next().ok_or("--listen needs an address")?.clone(),
            "--config" => config = Some(PathBuf::from(it.next().ok_or("--config needs a path")?)),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(Args { listen, config })
}

/// The subcommand: serves until killed.
pub async fn main(args: &[String]) -> ExitCode {
    let args = match parse(args) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("containerd-shim-clh-v2 monitor: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("containerd-shim-clh-v2 monitor: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: &Args) -> anyhow::Result<()> {
    use anyhow::Context;
    let (config, source) = match &args.config {
        Some(path) => (Config::load(path)?, Source::File(path.clone())),
        None => Config::load_default()?,
    };
    let state_dir = config.runtime.state_dir.clone();
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    // One line on stdout, for whoever started us on port 0.
    println!(
        "listening on http://{addr}/metrics (pods under {}; configuration: {source})",
        state_dir.display()
    );
    std::io::stdout().flush()?;
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                eprintln!("containerd-shim-clh-v2 monitor: accept: {e}");
                // EMFILE and the like: do not spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let dir = state_dir.clone();
        tokio::spawn(async move {
            http::answer(stream, || async move { gather(&dir, SCRAPE_TIMEOUT).await }).await;
        });
    }
}

/// The VM directories under `state_dir` that have a metrics socket:
/// `(sandbox id, socket)`.
pub fn sockets(state_dir: &Path) -> Vec<(String, PathBuf)> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(entries) = std::fs::read_dir(state_dir) else {
        return Vec::new();
    };
    let mut found: Vec<(String, PathBuf)> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| {
            let socket = e.path().join(SOCKET_NAME);
            let is_socket =
                std::fs::symlink_metadata(&socket).is_ok_and(|m| m.file_type().is_socket());
            let id = e.file_name().into_string().ok()?;
            is_socket.then_some((id, socket))
        })
        .collect();
    found.sort();
    found
}

/// Every pod's metrics and the monitor's own.
pub async fn gather(state_dir: &Path, timeout: Duration) -> String {
    let targets = sockets(state_dir);
    let scrapes = targets.iter().map(|(id, socket)| async move {
        let start = Instant::now();
        let r = http::get_unix(socket, timeout).await;
        (id, r, start.elapsed())
    });
    let results = futures::future::join_all(scrapes).await;
    let mut merged = Merged::default();
    let mut own = Exposition::new();
    own.family(
        "clh_monitor_scrape_up",
        Kind::Gauge,
        "Whether the pod's shim answered this scrape.",
    );
    let mut durations = Vec::new();
    for (id, result, took) in results {
        durations.push((id, took));
        match result {
            Ok(body) => {
                let pod = pod_labels(&body);
                let extra = [
                    ("sandbox_id", id.as_str()),
                    ("pod_name", pod[0].as_str()),
                    ("pod_namespace", pod[1].as_str()),
                    ("pod_uid", pod[2].as_str()),
                ];
                merged.add(&body, &extra);
                own.sample("clh_monitor_scrape_up", &[("sandbox_id", id)], 1.0);
            }
            Err(e) => {
                SCRAPE_ERRORS.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(sandbox = id, error = %e, "monitor: scrape");
                own.sample("clh_monitor_scrape_up", &[("sandbox_id", id)], 0.0);
            }
        }
    }
    own.family(
        "clh_monitor_scrape_duration_seconds",
        Kind::Gauge,
        "How long the pod's shim took to answer this scrape.",
    );
    for (id, took) in durations {
        own.sample(
            "clh_monitor_scrape_duration_seconds",
            &[("sandbox_id", id)],
            took.as_secs_f64(),
        );
    }
    own.single(
        "clh_monitor_pods",
        Kind::Gauge,
        "Pod VMs with a metrics socket under the state directory.",
        targets.len() as f64,
    );
    own.single(
        "clh_monitor_scrape_errors_total",
        Kind::Counter,
        "Scrapes of a pod's shim that failed since the monitor started.",
        SCRAPE_ERRORS.load(Ordering::Relaxed) as f64,
    );
    merged.add(&own.finish(), &[]);
    merged.finish()
}

/// `[pod_name, pod_namespace, pod_uid]` from a shim's `clh_pod_info`.
fn pod_labels(body: &str) -> [String; 3] {
    let info = body
        .lines()
        .filter(|l| l.starts_with("clh_pod_info"))
        .find_map(parse_sample);
    let get = |k: &str| {
        info.as_ref()
            .and_then(|s| s.label(k))
            .unwrap_or_default()
            .to_string()
    };
    [get("pod_name"), get("pod_namespace"), get("pod_uid")]
}
