//! [`EventWatch`]: containerd's event stream as `ctr events` prints it
//! (`<time> <namespace> <topic> <event as JSON>`), to prove that an event
//! reached containerd rather than only its effect (CRI also learns exits
//! from Wait).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::{check, PrivateContainerd, CTR_TIMEOUT, POLL};

/// How long one probe may take to show before the next is tried.
const PROBE_WAIT: Duration = Duration::from_secs(2);

/// `ctr events` running against a [`PrivateContainerd`] (every namespace);
/// killed on drop.
pub struct EventWatch {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl EventWatch {
    /// Subscribes, and returns once the subscription is proven live: a
    /// namespace created and removed for the purpose shows in the stream
    /// (a subscription is made asynchronously; events before it are lost).
    pub fn start(ctd: &PrivateContainerd) -> Result<Self> {
        let mut child = Command::new(ctd.version().bin_dir().join("ctr"))
            // One argument: `PrivateContainerd::shim_pids` takes a process
            // with the bare address as an argument for a shim.
            .arg(format!("--address={}", ctd.address().display()))
            .arg("events")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning ctr events")?;
        let stdout = child.stdout.take().context("ctr events has no stdout")?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        });
        let me = Self { child, lines };
        let deadline = Instant::now() + CTR_TIMEOUT;
        for n in 0.. {
            let probe = format!("evwatch-{}-{n}", std::process::id());
            let out = ctd.ctr_in("default", &["namespaces", "create", &probe], CTR_TIMEOUT)?;
            check(&out, "ctr namespaces create")?;
            let seen = me.wait_for("the probe namespace's", PROBE_WAIT, |l| {
                l.contains("/namespaces/create") && l.contains(&probe)
            });
            let out = ctd.ctr_in("default", &["namespaces", "remove", &probe], CTR_TIMEOUT)?;
            check(&out, "ctr namespaces remove")?;
            if seen.is_ok() {
                break;
            }
            if Instant::now() >= deadline {
                bail!("ctr events saw none of its probes within {CTR_TIMEOUT:?}");
            }
        }
        Ok(me)
    }

    /// Every line seen so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits up to `within` for a line matching `matches`; returns it.
    pub fn wait_for(
        &self,
        what: &str,
        within: Duration,
        matches: impl Fn(&str) -> bool,
    ) -> Result<String> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(l) = self.lines().into_iter().find(|l| matches(l)) {
                return Ok(l);
            }
            if Instant::now() >= deadline {
                bail!(
                    "no event {what} within {within:?}; seen: {:#?}",
                    self.lines()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits for `topic` (`/tasks/exit`) naming container `id`.
    pub fn wait_topic(&self, topic: &str, id: &str, within: Duration) -> Result<String> {
        // The time has spaces in it: match the topic as a word.
        let topic = format!(" {topic} ");
        let quoted = format!("\"container_id\":\"{id}\"");
        self.wait_for(&format!("{topic} of {id}"), within, |l| {
            l.contains(&topic) && l.contains(&quoted)
        })
    }
}

impl Drop for EventWatch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
