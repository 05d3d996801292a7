//! A pod VM's boot, phase by phase, from the host's spans of its start
//! (`StartTimeline`) and the guest's boot marks (Check's `boot_marks`,
//! microseconds since the guest kernel started). The two clocks meet at
//! the Check: the guest's uptime then, subtracted from the host's time of
//! the reply, places the kernel's start on the host's timeline (to within
//! the Check's round trip, a few ms). Printed by `make bench` (boot).

use std::time::Duration;

/// One boot's phases, in the order they happen (ms).
#[derive(Debug, Clone, PartialEq)]
pub struct Phases(pub Vec<(&'static str, f64)>);

/// The inputs of one boot, all in ms: the host's spans (start offset and
/// length, from the start request), the host time of the Check reply, the
/// guest's uptime in it, and the guest's marks (since its kernel started).
pub struct Boot<'a> {
    pub spans: &'a [(&'a str, f64, f64)],
    pub check_done: f64,
    pub guest_uptime: f64,
    pub marks: &'a [(&'a str, f64)],
}

impl Boot<'_> {
    fn span_end(&self, step: &str) -> Option<f64> {
        self.spans
            .iter()
            .find(|(s, _, _)| *s == step)
            .map(|(_, start, took)| start + took)
    }

    fn span_took(&self, step: &str) -> Option<f64> {
        self.spans.iter().find(|(s, _, _)| *s == step).map(|s| s.2)
    }

    fn mark(&self, name: &str) -> Option<f64> {
        self.marks.iter().find(|(n, _)| *n == name).map(|m| m.1)
    }

    /// VMM start, firmware, kernel to the initramfs, its unpacking, on to
    /// /init, the agent's switch to its tmpfs root and its init, until it
    /// serves, and the shim's vsock connect. A phase whose mark is missing
    /// (an older agent) is left out.
    pub fn phases(&self) -> Phases {
        let kernel_start = self.check_done - self.guest_uptime;
        let mut out = Vec::new();
        if let Some(vmm) = self.span_took("vmm") {
            out.push(("VMM start (spawn to its API / QMP ready)", vmm));
        }
        if let Some(vmm_end) = self.span_end("vmm") {
            out.push((
                "firmware, kernel decompression and early setup (to the kernel clock)",
                kernel_start - vmm_end,
            ));
        }
        let steps = [
            (
                "kernel to the initramfs (kernel start to its unpacking)",
                None,
                "initramfs_unpack_start",
            ),
            (
                "initramfs unpacking",
                Some("initramfs_unpack_start"),
                "initramfs_unpack_done",
            ),
            (
                "kernel, rest of its init (to running /init)",
                Some("initramfs_unpack_done"),
                "run_init",
            ),
            (
                "agent: copy to a tmpfs root and re-exec",
                Some("run_init"),
                "agent_start",
            ),
            (
                "agent: init (mounts, modules, hostname)",
                Some("agent_start"),
                "agent_init_done",
            ),
            (
                "agent: to serving ttrpc",
                Some("agent_init_done"),
                "agent_serving",
            ),
        ];
        for (label, from, to) in steps {
            let from = match from {
                Some(f) => self.mark(f),
                None => Some(0.0),
            };
            if let (Some(a), Some(b)) = (from, self.mark(to)) {
                out.push((label, b - a));
            }
        }
        if let (Some(serving), Some(connected)) =
            (self.mark("agent_serving"), self.span_end("agent_connect"))
        {
            out.push((
                "serving to the shim connected (vsock)",
                connected - (kernel_start + serving),
            ));
        }
        Phases(out)
    }
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_clock_is_placed_on_the_hosts_at_the_check() {
        let spans = [
            ("vmm", 10.0, 40.0),
            ("guest_boot", 50.0, 900.0),
            ("agent_connect", 950.0, 30.0),
        ];
        let marks = [
            ("initramfs_unpack_start", 100.0),
            ("initramfs_unpack_done", 300.0),
            ("run_init", 500.0),
            ("agent_start", 560.0),
            ("agent_init_done", 700.0),
            ("agent_serving", 800.0),
        ];
        // The kernel started at host 100 ms: 1000 - 900.
        let boot = Boot {
            spans: &spans,
            check_done: 1000.0,
            guest_uptime: 900.0,
            marks: &marks,
        };
        let p = boot.phases().0;
        let get = |prefix: &str| p.iter().find(|(l, _)| l.starts_with(prefix)).map(|x| x.1);
        assert_eq!(get("VMM start"), Some(40.0));
        assert_eq!(get("firmware"), Some(50.0));
        assert_eq!(get("initramfs unpacking"), Some(200.0));
        assert_eq!(get("agent: init"), Some(140.0));
        // Serving at host 900, connected at 980.
        assert_eq!(get("serving to the shim"), Some(80.0));
        // An older agent: no marks, only the host's phases.
        let old = Boot {
            spans: &spans,
            check_done: 1000.0,
            guest_uptime: 900.0,
            marks: &[],
        };
        assert_eq!(old.phases().0.len(), 2);
    }
}
