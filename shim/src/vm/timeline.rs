//! Where a pod VM's start spends its time: one span per step of
//! `start_in`, from the start request. Steps that run concurrently
//! (network wiring and virtiofsd) overlap. Logged when the VM is up,
//! served as `clh_pod_start_step_seconds{step=...}`, and printed by
//! `make bench` (tests/benches/cri.rs) as a table.

use std::time::{Duration, Instant};

/// One step: when it began (after the start request) and how long it took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub step: &'static str,
    pub start: Duration,
    pub took: Duration,
}

#[derive(Debug, Clone)]
pub struct StartTimeline {
    began: Instant,
    spans: Vec<Span>,
}

impl StartTimeline {
    pub fn new() -> StartTimeline {
        StartTimeline {
            began: Instant::now(),
            spans: Vec::new(),
        }
    }

    /// Records `step` as running from `since` until now.
    pub fn record(&mut self, step: &'static str, since: Instant) {
        let now = Instant::now();
        self.spans.push(Span {
            step,
            start: since.saturating_duration_since(self.began),
            took: now.saturating_duration_since(since),
        });
    }

    pub fn spans(&self) -> &[Span] {
        &self.spans
    }

    pub fn get(&self, step: &str) -> Option<Span> {
        self.spans.iter().copied().find(|s| s.step == step)
    }

    /// From spawning the VMM to the end of the last step: the guest's
    /// share of the start (what `clh_vm_boot_seconds` has always meant).
    pub fn boot_to_agent(&self) -> Duration {
        let end = self.spans.iter().map(|s| s.start + s.took).max();
        match (self.get(VMM), end) {
            (Some(vmm), Some(end)) => end.saturating_sub(vmm.start),
            _ => Duration::ZERO,
        }
    }

    /// `step=12ms ...` in start order, for the log.
    pub fn summary(&self) -> String {
        let mut spans = self.spans.clone();
        spans.sort_by_key(|s| s.start);
        spans
            .iter()
            .map(|s| format!("{}={}ms", s.step, s.took.as_millis()))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

impl Default for StartTimeline {
    fn default() -> Self {
        Self::new()
    }
}

/// The step that spawns the VMM and waits for its API.
pub const VMM: &str = "vmm";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_to_agent_runs_from_the_vmm_to_the_last_step() {
        let mut t = StartTimeline::new();
        let at = |ms| t.began + Duration::from_millis(ms);
        let (a, b, c) = (at(0), at(10), at(30));
        t.spans = vec![
            Span {
                step: "network",
                start: a - t.began,
                took: Duration::from_millis(8),
            },
            Span {
                step: VMM,
                start: b - t.began,
                took: Duration::from_millis(15),
            },
            Span {
                step: "agent_connect",
                start: c - t.began,
                took: Duration::from_millis(20),
            },
        ];
        assert_eq!(t.boot_to_agent(), Duration::from_millis(40));
        assert_eq!(t.summary(), "network=8ms vmm=15ms agent_connect=20ms");
        assert_eq!(StartTimeline::new().boot_to_agent(), Duration::ZERO);
    }
}
