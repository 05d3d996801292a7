//! Host memory of idle pods for the benches (cri, density): a group of
//! pods' processes sampled until their memory stops moving, and the table
//! that prints it by role. What a pod's processes are and why PSS:
//! [`crate::podmem`].

use std::time::{Duration, Instant};

use anyhow::Result;

use crate::podmem::ProcessMemory;

/// The memory counts as settled once two samples this far apart differ
/// by at most [`SETTLED_CHANGE`] of their sum...
pub const SETTLE_STEP: Duration = Duration::from_secs(2);
pub const SETTLED_CHANGE: f64 = 0.02;
/// ...which must happen within this, or the figure is marked unsettled.
pub const SETTLE_DEADLINE: Duration = Duration::from_secs(60);
const MIB: f64 = 1024.0;

/// A group of idle pods: each pod's processes, once settled.
pub struct IdleMemory {
    /// What the group is: a handler, a configuration.
    pub label: String,
    pub pods: Vec<Vec<ProcessMemory>>,
    /// The last change between two samples of the sum, as a fraction, and
    /// whether it was within [`SETTLED_CHANGE`] before [`SETTLE_DEADLINE`].
    pub change: f64,
    pub settled: bool,
}

/// Samples `measure` every [`SETTLE_STEP`] until the sum of PSS changes by
/// at most [`SETTLED_CHANGE`] between two samples, or [`SETTLE_DEADLINE`]
/// passes.
pub fn settle(
    label: &str,
    mut measure: impl FnMut() -> Result<Vec<Vec<ProcessMemory>>>,
) -> Result<IdleMemory> {
    let total = |pods: &[Vec<ProcessMemory>]| -> f64 {
        pods.iter().flatten().map(|p| p.pss_kib as f64).sum()
    };
    let deadline = Instant::now() + SETTLE_DEADLINE;
    let mut last = measure()?;
    loop {
        // A sampling interval, not a synchronization: the question is
        // whether the figure still moves over this much time.
        std::thread::sleep(SETTLE_STEP);
        let now = measure()?;
        let (before, after) = (total(&last), total(&now));
        let change = (after - before).abs() / before.max(1.0);
        let settled = change <= SETTLED_CHANGE;
        if settled || Instant::now() >= deadline {
            return Ok(IdleMemory {
                label: label.to_owned(),
                pods: now,
                change,
                settled,
            });
        }
        last = now;
    }
}

impl IdleMemory {
    /// Mean over the pods of the sum over each pod's processes of `f`, in
    /// KiB.
    pub fn mean_kib(&self, f: impl Fn(&ProcessMemory) -> u64) -> f64 {
        let sum: u64 = self.pods.iter().flatten().map(f).sum();
        sum as f64 / self.pods.len().max(1) as f64
    }

    /// Mean PSS per pod and the guest RAM part of it, in MiB.
    pub fn per_pod_mib(&self) -> (f64, f64) {
        (
            self.mean_kib(|p| p.pss_kib) / MIB,
            self.mean_kib(|p| p.guest_ram_kib) / MIB,
        )
    }

    fn roles(&self) -> Vec<&'static str> {
        let mut roles: Vec<&'static str> = Vec::new();
        for p in self.pods.iter().flatten() {
            if !roles.contains(&p.role) {
                roles.push(p.role);
            }
        }
        roles
    }

    /// The configured guest RAM of a VM pod (the same for every pod of a
    /// group).
    pub fn guest_configured_mib(&self) -> Option<u64> {
        self.pods
            .iter()
            .flatten()
            .find_map(|p| p.guest_ram_configured_mib)
    }
}

/// Prints `groups` as one table under `title`: per role and in all, the
/// mean per pod of PSS, its guest RAM part and the rest.
pub fn print_memory(title: &str, groups: &[IdleMemory]) {
    /// A table row (label, mean PSS, mean guest RAM, in KiB) or a note.
    enum Line {
        Row(String, f64, f64),
        Note(String),
    }
    let mut lines = Vec::new();
    for m in groups {
        let l = &m.label;
        for role in m.roles() {
            let of_role = |p: &ProcessMemory| p.role == role;
            let n = m.pods.iter().flatten().filter(|p| of_role(p)).count();
            let per_pod = n as f64 / m.pods.len().max(1) as f64;
            let plural = if per_pod > 1.0 { "es" } else { "" };
            lines.push(Line::Row(
                format!("{l}: {role} ({per_pod:.0} process{plural} per pod)"),
                m.mean_kib(|p| if of_role(p) { p.pss_kib } else { 0 }),
                m.mean_kib(|p| if of_role(p) { p.guest_ram_kib } else { 0 }),
            ));
        }
        lines.push(Line::Row(
            format!("{l}: all ({} pods)", m.pods.len()),
            m.mean_kib(|p| p.pss_kib),
            m.mean_kib(|p| p.guest_ram_kib),
        ));
        if let Some(c) = m.guest_configured_mib() {
            lines.push(Line::Note(format!(
                "{l}: guest RAM configured {c} MiB per pod; the guest RAM column is what is resident"
            )));
        }
        let state = if m.settled { "settled" } else { "NOT settled" };
        lines.push(Line::Note(format!(
            "{l}: {state}: the sum moved {:.1}% over the last {SETTLE_STEP:?}",
            m.change * 100.0
        )));
    }
    let width = lines
        .iter()
        .filter_map(|line| match line {
            Line::Row(label, ..) => Some(label.len()),
            Line::Note(_) => None,
        })
        .chain([title.len(), 56])
        .max()
        .unwrap_or(56);
    println!();
    println!(
        "{title:<width$} {:>11} {:>11} {:>11}",
        "total", "guest RAM", "the rest"
    );
    for line in lines {
        match line {
            Line::Row(label, pss, guest) => println!(
                "{label:<width$} {:>7.1} MiB {:>7.1} MiB {:>7.1} MiB",
                pss / MIB,
                guest / MIB,
                (pss - guest) / MIB
            ),
            Line::Note(text) => println!("{text}"),
        }
    }
}
