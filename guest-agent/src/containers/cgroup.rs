//! A container's cgroup v2 directory: stats, pids, limits, freezing and
//! OOM-kill counting. Plain file reads and writes; missing files (a
//! controller not enabled) read as zero rather than failing the call.

use oci_spec::runtime::LinuxResources;
use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::mpsc;

/// How often memory.events is polled for OOM kills.
pub const OOM_POLL: Duration = Duration::from_millis(500);

/// The figures of ContainerStatsResponse.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Stats {
    pub cpu_usage_usec: u64,
    pub cpu_user_usec: u64,
    pub cpu_system_usec: u64,
    pub cpu_nr_periods: u64,
    pub cpu_nr_throttled: u64,
    pub cpu_throttled_usec: u64,
    pub memory_usage_bytes: u64,
    pub memory_limit_bytes: u64,
    pub memory_max_usage_bytes: u64,
    pub memory_oom_kills: u64,
    pub memory_anon_bytes: u64,
    pub memory_file_bytes: u64,
    pub pids_current: u64,
    pub pids_limit: u64,
}

/// `key value` lines (cpu.stat, memory.stat, memory.events).
fn flat_keyed(dir: &Path, file: &str) -> io::Result<HashMap<String, u64>> {
    let text = read_or_empty(&dir.join(file))?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_owned(), v.trim().parse().ok()?))
        })
        .collect())
}

/// One number; "max" (no limit) reads as u64::MAX.
fn single(dir: &Path, file: &str) -> io::Result<u64> {
    let text = read_or_empty(&dir.join(file))?;
    Ok(match text.trim() {
        "max" => u64::MAX,
        t => t.parse().unwrap_or(0),
    })
}

fn read_or_empty(path: &Path) -> io::Result<String> {
    match std::fs::read_to_string(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(String::new()),
        r => r,
    }
}

pub fn stats(dir: &Path) -> io::Result<Stats> {
    if !dir.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no cgroup at {}", dir.display()),
        ));
    }
    let cpu = flat_keyed(dir, "cpu.stat")?;
    let mem = flat_keyed(dir, "memory.stat")?;
    let events = flat_keyed(dir, "memory.events")?;
    let get = |m: &HashMap<String, u64>, k: &str| m.get(k).copied().unwrap_or(0);
    Ok(Stats {
        cpu_usage_usec: get(&cpu, "usage_usec"),
        cpu_user_usec: get(&cpu, "user_usec"),
        cpu_system_usec: get(&cpu, "system_usec"),
        cpu_nr_periods: get(&cpu, "nr_periods"),
        cpu_nr_throttled: get(&cpu, "nr_throttled"),
        cpu_throttled_usec: get(&cpu, "throttled_usec"),
        memory_usage_bytes: single(dir, "memory.current")?,
        memory_limit_bytes: single(dir, "memory.max")?,
        memory_max_usage_bytes: single(dir, "memory.peak")?,
        memory_oom_kills: get(&events, "oom_kill"),
        memory_anon_bytes: get(&mem, "anon"),
        memory_file_bytes: get(&mem, "file"),
        pids_current: single(dir, "pids.current")?,
        pids_limit: single(dir, "pids.max")?,
    })
}

/// Every pid in the cgroup and its descendants.
pub fn pids(dir: &Path) -> io::Result<Vec<u32>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        out.extend(
            read_or_empty(&d.join("cgroup.procs"))?
                .lines()
                .filter_map(|l| l.trim().parse::<u32>().ok()),
        );
        if let Ok(entries) = std::fs::read_dir(&d) {
            stack.extend(entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
        }
    }
    Ok(out)
}

pub fn freeze(dir: &Path, frozen: bool) -> io::Result<()> {
    std::fs::write(dir.join("cgroup.freeze"), if frozen { "1" } else { "0" })
}

/// The cgroup v2 file writes for OCI LinuxResources (the subset containerd
/// updates: memory, CPU, pids, cpuset).
pub(crate) fn resource_writes(r: &LinuxResources) -> Vec<(&'static str, String)> {
    let mut w = Vec::new();
    let limit = |v: i64| {
        if v < 0 {
            "max".to_owned()
        } else {
            v.to_string()
        }
    };
    if let Some(m) = r.memory() {
        if let Some(l) = m.limit() {
            w.push(("memory.max", limit(l)));
        }
        if let Some(r) = m.reservation() {
            w.push(("memory.low", limit(r)));
        }
        // OCI swap is memory+swap; cgroup v2 wants swap alone.
        if let (Some(s), Some(l)) = (m.swap(), m.limit()) {
            let swap = if s < 0 { -1 } else { (s - l).max(0) };
            w.push(("memory.swap.max", limit(swap)));
        }
    }
    if let Some(c) = r.cpu() {
        if let Some(shares) = c.shares() {
            // runc's conversion of cgroup v1 shares [2, 262144] to weight.
            let shares = shares.clamp(2, 262_144);
            let weight = 1 + ((shares - 2) * 9999) / 262_142;
            w.push(("cpu.weight", weight.to_string()));
        }
        if c.quota().is_some() || c.period().is_some() {
            let quota = c.quota().map_or("max".to_owned(), limit);
            let period = c.period().unwrap_or(100_000);
            w.push(("cpu.max", format!("{quota} {period}")));
        }
        if let Some(cpus) = c.cpus() {
            w.push(("cpuset.cpus", cpus.clone()));
        }
        if let Some(mems) = c.mems() {
            w.push(("cpuset.mems", mems.clone()));
        }
    }
    if let Some(p) = r.pids() {
        w.push(("pids.max", limit(p.limit())));
    }
    w
}

pub fn update(dir: &Path, r: &LinuxResources) -> io::Result<()> {
    for (file, value) in resource_writes(r) {
        std::fs::write(dir.join(file), &value)
            .map_err(|e| io::Error::new(e.kind(), format!("writing {value:?} to {file}: {e}")))?;
    }
    Ok(())
}

/// Counts oom_kill per container and queues one event per new kill.
pub struct OomWatch {
    seen: Mutex<HashMap<String, u64>>,
    tx: mpsc::UnboundedSender<String>,
    rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<String>>,
}

impl Default for OomWatch {
    fn default() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Self {
            seen: Mutex::default(),
            tx,
            rx: tokio::sync::Mutex::new(rx),
        }
    }
}

impl OomWatch {
    pub fn poll(&self, ids: &[String], dir_of: impl Fn(&str) -> PathBuf) {
        let mut seen = super::lock(&self.seen);
        seen.retain(|id, _| ids.contains(id));
        for id in ids {
            let Ok(events) = flat_keyed(&dir_of(id), "memory.events") else {
                continue;
            };
            let kills = events.get("oom_kill").copied().unwrap_or(0);
            let before = seen.insert(id.clone(), kills).unwrap_or(0);
            if kills > before {
                tracing::info!(id, kills, "OOM kill in container");
                let _ = self.tx.send(id.clone());
            }
        }
    }

    /// The next event; one caller at a time receives (the others queue).
    pub async fn next(&self) -> String {
        let mut rx = self.rx.lock().await;
        match rx.recv().await {
            Some(id) => id,
            // The sender lives in self, so this cannot happen.
            None => std::future::pending().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_read_cgroup_files() {
        let d = tempfile::tempdir().unwrap();
        let w = |f: &str, t: &str| std::fs::write(d.path().join(f), t).unwrap();
        w("cpu.stat", "usage_usec 10\nuser_usec 6\nsystem_usec 4\n");
        w("memory.current", "4096\n");
        w("memory.max", "max\n");
        w("memory.stat", "anon 100\nfile 200\n");
        w("memory.events", "low 0\noom_kill 2\n");
        w("pids.current", "3\n");
        let s = stats(d.path()).unwrap();
        assert_eq!((s.cpu_usage_usec, s.cpu_user_usec), (10, 6));
        assert_eq!(
            (s.memory_usage_bytes, s.memory_limit_bytes),
            (4096, u64::MAX)
        );
        assert_eq!((s.memory_anon_bytes, s.memory_file_bytes), (100, 200));
        assert_eq!(
            (s.memory_oom_kills, s.pids_current, s.pids_limit),
            (2, 3, 0)
        );
    }

    #[test]
    fn resources_map_to_cgroup_v2_files() {
        let r: LinuxResources = serde_json::from_str(
            r#"{"memory":{"limit":1048576,"swap":2097152},"cpu":{"quota":50000,"period":100000,"shares":1024},"pids":{"limit":-1}}"#,
        )
        .unwrap();
        let w = resource_writes(&r);
        assert!(w.contains(&("memory.max", "1048576".into())));
        assert!(w.contains(&("memory.swap.max", "1048576".into())));
        assert!(w.contains(&("cpu.max", "50000 100000".into())));
        assert!(w.contains(&("cpu.weight", "39".into())));
        assert!(w.contains(&("pids.max", "max".into())));
    }

    #[tokio::test]
    async fn oom_kills_become_events() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("c1");
        std::fs::create_dir(&dir).unwrap();
        let watch = OomWatch::default();
        let ids = vec!["c1".to_owned()];
        let dir_of = |id: &str| d.path().join(id);
        std::fs::write(dir.join("memory.events"), "oom_kill 0\n").unwrap();
        watch.poll(&ids, dir_of);
        std::fs::write(dir.join("memory.events"), "oom_kill 1\n").unwrap();
        watch.poll(&ids, dir_of);
        assert_eq!(watch.next().await, "c1");
    }
}
