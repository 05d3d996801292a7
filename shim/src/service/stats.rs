//! The guest's cgroup figures as containerd's `Metrics` for the host's
//! cgroup version (the node's CRI and cAdvisor decode by type URL).

use clh_agent_protocol::ContainerStatsResponse;
use containerd_shim_protos::cgroups::metrics as v1;
use containerd_shim_protos::cgroups_v2::metrics as v2;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::{Message, MessageField};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    V1,
    V2,
}

impl CgroupVersion {
    /// The host's mode: unified hierarchy (v2) when the root cgroup has
    /// `cgroup.controllers`.
    pub fn of_host() -> Self {
        if std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
            CgroupVersion::V2
        } else {
            CgroupVersion::V1
        }
    }
}

pub fn to_any(s: &ContainerStatsResponse, version: CgroupVersion) -> protobuf::Result<Any> {
    let (type_url, value) = match version {
        CgroupVersion::V1 => (
            "io.containerd.cgroups.v1.Metrics",
            v1_metrics(s).write_to_bytes()?,
        ),
        CgroupVersion::V2 => (
            "io.containerd.cgroups.v2.Metrics",
            v2_metrics(s).write_to_bytes()?,
        ),
    };
    Ok(Any {
        type_url: type_url.to_string(),
        value,
        ..Default::default()
    })
}

fn v2_metrics(s: &ContainerStatsResponse) -> v2::Metrics {
    v2::Metrics {
        pids: MessageField::some(v2::PidsStat {
            current: s.pids_current,
            limit: s.pids_limit,
            ..Default::default()
        }),
        cpu: MessageField::some(v2::CPUStat {
            usage_usec: s.cpu_usage_usec,
            user_usec: s.cpu_user_usec,
            system_usec: s.cpu_system_usec,
            nr_periods: s.cpu_nr_periods,
            nr_throttled: s.cpu_nr_throttled,
            throttled_usec: s.cpu_throttled_usec,
            ..Default::default()
        }),
        memory: MessageField::some(v2::MemoryStat {
            usage: s.memory_usage_bytes,
            usage_limit: s.memory_limit_bytes,
            max_usage: s.memory_max_usage_bytes,
            anon: s.memory_anon_bytes,
            file: s.memory_file_bytes,
            ..Default::default()
        }),
        memory_events: MessageField::some(v2::MemoryEvents {
            oom_kill: s.memory_oom_kills,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// v1 counts CPU time in nanoseconds, v2 in microseconds.
fn v1_metrics(s: &ContainerStatsResponse) -> v1::Metrics {
    let ns = |usec: u64| usec.saturating_mul(1000);
    v1::Metrics {
        pids: MessageField::some(v1::PidsStat {
            current: s.pids_current,
            limit: s.pids_limit,
            ..Default::default()
        }),
        cpu: MessageField::some(v1::CPUStat {
            usage: MessageField::some(v1::CPUUsage {
                total: ns(s.cpu_usage_usec),
                user: ns(s.cpu_user_usec),
                kernel: ns(s.cpu_system_usec),
                ..Default::default()
            }),
            throttling: MessageField::some(v1::Throttle {
                periods: s.cpu_nr_periods,
                throttled_periods: s.cpu_nr_throttled,
                throttled_time: ns(s.cpu_throttled_usec),
                ..Default::default()
            }),
            ..Default::default()
        }),
        memory: MessageField::some(v1::MemoryStat {
            rss: s.memory_anon_bytes,
            cache: s.memory_file_bytes,
            total_rss: s.memory_anon_bytes,
            total_cache: s.memory_file_bytes,
            usage: MessageField::some(v1::MemoryEntry {
                usage: s.memory_usage_bytes,
                limit: s.memory_limit_bytes,
                max: s.memory_max_usage_bytes,
                ..Default::default()
            }),
            ..Default::default()
        }),
        memory_oom_control: MessageField::some(v1::MemoryOomControl {
            oom_kill: s.memory_oom_kills,
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ContainerStatsResponse {
        ContainerStatsResponse {
            cpu_usage_usec: 7,
            cpu_user_usec: 5,
            cpu_system_usec: 2,
            memory_usage_bytes: 4096,
            memory_limit_bytes: 8192,
            memory_anon_bytes: 1024,
            memory_oom_kills: 1,
            pids_current: 3,
            pids_limit: 10,
            ..Default::default()
        }
    }

    #[test]
    fn v2_keeps_the_guest_figures() {
        let any = to_any(&sample(), CgroupVersion::V2).unwrap();
        assert_eq!(any.type_url, "io.containerd.cgroups.v2.Metrics");
        let m = v2::Metrics::parse_from_bytes(&any.value).unwrap();
        assert_eq!(m.cpu.usage_usec, 7);
        assert_eq!(m.memory.usage, 4096);
        assert_eq!(m.memory.usage_limit, 8192);
        assert_eq!(m.memory_events.oom_kill, 1);
        assert_eq!((m.pids.current, m.pids.limit), (3, 10));
    }

    #[test]
    fn v1_converts_cpu_time_to_nanoseconds() {
        let any = to_any(&sample(), CgroupVersion::V1).unwrap();
        assert_eq!(any.type_url, "io.containerd.cgroups.v1.Metrics");
        let m = v1::Metrics::parse_from_bytes(&any.value).unwrap();
        assert_eq!(m.cpu.usage.total, 7000);
        assert_eq!(m.cpu.usage.kernel, 2000);
        assert_eq!(m.memory.usage.usage, 4096);
        assert_eq!(m.memory.rss, 1024);
        assert_eq!(m.memory_oom_control.oom_kill, 1);
        assert_eq!(m.pids.current, 3);
    }
}
