//! How big a pod's VM is: its boot size from the sandbox's limits, and how
//! far it must grow when its containers' limits are raised. Pure functions
//! over [`SizingPolicy`] (from the `[guest]` configuration).
//!
//! The CRI plugin passes the pod's limits to the sandbox as annotations
//! (containerd's `io.kubernetes.cri.sandbox-*`): the CFS quota and period of
//! the pod's CPU limit and its memory limit in bytes. A value of 0 (or -1
//! for the quota) means "no limit", as in the CRI and the OCI spec.
//!
//! - vCPUs = `overhead_vcpus` + ceil(quota / period), or `vcpus` without a
//!   CPU limit; at least 1, at most `max_vcpus` and the host's CPUs.
//! - memory = `overhead_memory_mib` + the limit in MiB (rounded up), or
//!   `memory_mib` without a memory limit; at most `max_memory_mib`.

use clh_config::GuestConfig;
pub use clh_hypervisor::VmSize;
use serde_json::Value;

pub const CPU_QUOTA_ANNOTATION: &str = "io.kubernetes.cri.sandbox-cpu-quota";
pub const CPU_PERIOD_ANNOTATION: &str = "io.kubernetes.cri.sandbox-cpu-period";
pub const MEMORY_ANNOTATION: &str = "io.kubernetes.cri.sandbox-memory";

/// The kernel's default CFS period, used when a quota comes without one.
const DEFAULT_CFS_PERIOD_US: u64 = 100_000;
const MIB: u64 = 1 << 20;

/// A limit we cannot read. The shim maps it to InvalidArgument.
#[derive(Debug, thiserror::Error)]
pub enum SizingError {
    #[error("invalid annotation {key}={value:?}: {problem}")]
    Annotation {
        key: &'static str,
        value: String,
        problem: &'static str,
    },
    #[error("invalid linux.resources {field} {value}: {problem}")]
    Resources {
        field: &'static str,
        value: String,
        problem: &'static str,
    },
}

/// The sizes sizing works with, taken from the `[guest]` configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizingPolicy {
    /// A VM whose pod sets no limit (per resource).
    pub default: VmSize,
    /// Added to the pod's limits.
    pub overhead: VmSize,
    /// No VM is larger; `vcpus` is already capped at the host's CPUs.
    pub max: VmSize,
}

impl SizingPolicy {
    /// The policy of `guest`, with vCPUs capped at `host_cpus` (see
    /// [`host_cpus`]).
    pub fn from_config(guest: &GuestConfig, host_cpus: u32) -> Self {
        let max = VmSize {
            vcpus: guest.max_vcpus.min(host_cpus).max(1),
            memory_mib: guest.max_memory_mib,
        };
        Self {
            default: VmSize {
                vcpus: guest.vcpus,
                memory_mib: guest.memory_mib,
            },
            overhead: VmSize {
                vcpus: guest.overhead_vcpus,
                memory_mib: guest.overhead_memory_mib,
            },
            max,
        }
    }
}

/// The CPUs this process may run on (affinity and cgroup quota included),
/// 1 if that cannot be told.
pub fn host_cpus() -> u32 {
    std::thread::available_parallelism()
        .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
        .unwrap_or(1)
}

/// A pod's (or a sum of containers') limits. `None`: no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PodLimits {
    /// CPU limit in thousandths of a CPU, rounded up.
    pub cpu_millis: Option<u64>,
    pub memory_bytes: Option<u64>,
}

impl PodLimits {
    /// The limits in a sandbox's OCI spec annotations (`annotations` of
    /// `config.json`); no annotations at all means no limits.
    pub fn from_sandbox_spec(spec: &Value) -> Result<Self, SizingError> {
        let annotations = spec.get("annotations").and_then(Value::as_object);
        for key in [
            CPU_QUOTA_ANNOTATION,
            CPU_PERIOD_ANNOTATION,
            MEMORY_ANNOTATION,
        ] {
            match annotations.and_then(|a| a.get(key)) {
                Some(value) if !value.is_string() => {
                    return Err(SizingError::Annotation {
                        key,
                        value: value.to_string(),
                        problem: "annotation values must be strings",
                    })
                }
                _ => {}
            }
        }
        Self::from_annotations(|key| annotations?.get(key)?.as_str())
    }

    /// The limits in annotations read through `get` (a key → value lookup,
    /// e.g. over the CRI's map).
    pub fn from_annotations<'a>(
        get: impl Fn(&str) -> Option<&'a str>,
    ) -> Result<Self, SizingError> {
        let quota = parse_annotation::<i64>(CPU_QUOTA_ANNOTATION, get(CPU_QUOTA_ANNOTATION))?;
        if let Some(q) = quota.filter(|&q| q < -1) {
            return Err(SizingError::Annotation {
                key: CPU_QUOTA_ANNOTATION,
                value: q.to_string(),
                problem: "a CFS quota is -1 (no limit), 0 (none) or a positive number of µs",
            });
        }
        let period = parse_annotation::<u64>(CPU_PERIOD_ANNOTATION, get(CPU_PERIOD_ANNOTATION))?;
        let memory = parse_annotation::<u64>(MEMORY_ANNOTATION, get(MEMORY_ANNOTATION))?;
        Ok(Self {
            cpu_millis: quota.and_then(|q| cfs_millis(q, period.unwrap_or(0))),
            memory_bytes: memory.filter(|&m| m > 0),
        })
    }

    /// The limits of one container: the OCI `LinuxResources` object, as in
    /// a spec's `linux.resources` or the JSON of an UpdateTask request
    /// (`cpu.quota`, `cpu.period`, `memory.limit`; other fields ignored).
    pub fn from_linux_resources(resources: &Value) -> Result<Self, SizingError> {
        let cpu = resources.get("cpu");
        let quota = json_int(cpu, "quota", "cpu.quota")?;
        let period = json_int(cpu, "period", "cpu.period")?;
        let memory = json_int(resources.get("memory"), "limit", "memory.limit")?;
        let period = match period {
            Some(p) if p < 0 => {
                return Err(SizingError::Resources {
                    field: "cpu.period",
                    value: p.to_string(),
                    problem: "must not be negative",
                })
            }
            Some(p) => p.unsigned_abs(),
            None => 0,
        };
        Ok(Self {
            cpu_millis: quota.and_then(|q| cfs_millis(q, period)),
            // -1 is "unlimited" in the OCI spec; 0 is "unset".
            memory_bytes: memory.filter(|&m| m > 0).map(i64::unsigned_abs),
        })
    }
}

/// The sum of several containers' limits: what a VM holding them all
/// needs. A container without a limit adds nothing (it is bounded by the
/// others' and the VM's size, not sized for).
impl std::iter::Sum for PodLimits {
    fn sum<I: Iterator<Item = Self>>(iter: I) -> Self {
        iter.fold(PodLimits::default(), |acc, l| PodLimits {
            cpu_millis: add_opt(acc.cpu_millis, l.cpu_millis),
            memory_bytes: add_opt(acc.memory_bytes, l.memory_bytes),
        })
    }
}

/// The boot size of a VM for a pod with `limits`.
pub fn vm_size(limits: &PodLimits, policy: &SizingPolicy) -> VmSize {
    let vcpus = limits
        .cpu_millis
        .map_or(u64::from(policy.default.vcpus), |m| {
            u64::from(policy.overhead.vcpus) + m.div_ceil(1000)
        });
    let memory_mib = limits
        .memory_bytes
        .map_or(u64::from(policy.default.memory_mib), |b| {
            u64::from(policy.overhead.memory_mib) + b.div_ceil(MIB)
        });
    VmSize {
        vcpus: clamp(vcpus, 1, policy.max.vcpus),
        memory_mib: clamp(memory_mib, 1, policy.max.memory_mib),
    }
}

/// The size a VM of size `current` must grow to so that containers whose
/// limits add up to `containers` fit beside the overhead; `None` when they
/// fit already, or when `current` is at the maximum. Never shrinks: a
/// resource that fits keeps its current size.
pub fn grow_to(current: VmSize, containers: &PodLimits, policy: &SizingPolicy) -> Option<VmSize> {
    // What one resource must become: at least what it has, at most the max.
    let grow = |have: u32, needed: Option<u64>, max: u32| match needed {
        Some(needed) => have.max(clamp(needed, 0, max)),
        None => have,
    };
    let overhead = policy.overhead;
    let target = VmSize {
        vcpus: grow(
            current.vcpus,
            containers
                .cpu_millis
                .map(|m| u64::from(overhead.vcpus) + m.div_ceil(1000)),
            policy.max.vcpus,
        ),
        memory_mib: grow(
            current.memory_mib,
            containers
                .memory_bytes
                .map(|b| u64::from(overhead.memory_mib) + b.div_ceil(MIB)),
            policy.max.memory_mib,
        ),
    };
    (target != current).then_some(target)
}

/// Thousandths of a CPU a CFS quota gives, rounded up; `None` for no
/// limit (a quota of 0 or -1). A quota without a period gets the kernel's
/// default period.
fn cfs_millis(quota: i64, period: u64) -> Option<u64> {
    let quota = u64::try_from(quota).ok().filter(|&q| q > 0)?;
    let period = if period == 0 {
        DEFAULT_CFS_PERIOD_US
    } else {
        period
    };
    Some(
        u128::from(quota)
            .saturating_mul(1000)
            .div_ceil(u128::from(period))
            .try_into()
            .unwrap_or(u64::MAX),
    )
}

/// An annotation's value, if present, as a `T`.
fn parse_annotation<T: std::str::FromStr>(
    key: &'static str,
    value: Option<&str>,
) -> Result<Option<T>, SizingError> {
    let Some(value) = value else {
        return Ok(None);
    };
    value
        .trim()
        .parse()
        .map(Some)
        .map_err(|_| SizingError::Annotation {
            key,
            value: value.to_string(),
            problem: match key {
                CPU_QUOTA_ANNOTATION => "expected an integer number of microseconds",
                CPU_PERIOD_ANNOTATION => "expected a non-negative integer number of microseconds",
                _ => "expected a non-negative integer number of bytes",
            },
        })
}

/// `parent.key` as an integer; absent or null is `None`.
fn json_int(
    parent: Option<&Value>,
    key: &str,
    field: &'static str,
) -> Result<Option<i64>, SizingError> {
    match parent.and_then(|p| p.get(key)) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_i64().map(Some).ok_or_else(|| SizingError::Resources {
            field,
            value: v.to_string(),
            problem: "expected an integer",
        }),
    }
}

fn add_opt(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.saturating_add(b)),
        (a, None) => a,
        (None, b) => b,
    }
}

fn clamp(value: u64, min: u32, max: u32) -> u32 {
    u32::try_from(value)
        .unwrap_or(u32::MAX)
        .clamp(min, max.max(min))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use serde_json::json;

    use super::*;

    fn size(vcpus: u32, memory_mib: u32) -> VmSize {
        VmSize { vcpus, memory_mib }
    }

    /// Defaults 1 vCPU / 512 MiB, overhead 0 / 256 MiB, max 8 / 8192 MiB.
    fn policy() -> SizingPolicy {
        SizingPolicy::from_config(&GuestConfig::default(), 64)
    }

    fn spec(annotations: &[(&str, &str)]) -> Value {
        let map: serde_json::Map<String, Value> = annotations
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
        json!({ "ociVersion": "1.1.0", "annotations": map })
    }

    fn sized(annotations: &[(&str, &str)]) -> VmSize {
        vm_size(
            &PodLimits::from_sandbox_spec(&spec(annotations)).unwrap(),
            &policy(),
        )
    }

    #[test]
    fn the_policy_follows_the_config_and_caps_vcpus_at_the_host() {
        let p = policy();
        assert_eq!(p.default, size(1, 512));
        assert_eq!(p.overhead, size(0, 256));
        assert_eq!(p.max, size(8, 8192));
        assert_eq!(
            SizingPolicy::from_config(&GuestConfig::default(), 2).max,
            size(2, 8192)
        );
        assert_eq!(
            SizingPolicy::from_config(&GuestConfig::default(), 0)
                .max
                .vcpus,
            1
        );
        assert!(host_cpus() >= 1);
    }

    #[test]
    fn without_annotations_the_vm_gets_the_default_size() {
        assert_eq!(sized(&[]), size(1, 512));
        let no_annotations = json!({"ociVersion": "1.1.0"});
        let limits = PodLimits::from_sandbox_spec(&no_annotations).unwrap();
        assert_eq!(limits, PodLimits::default());
        assert_eq!(vm_size(&limits, &policy()), size(1, 512));
    }

    #[test]
    fn limits_add_to_the_overhead_rounding_up() {
        let limits = [
            (CPU_QUOTA_ANNOTATION, "150000"),
            (CPU_PERIOD_ANNOTATION, "100000"),
            (MEMORY_ANNOTATION, "268435457"), // 256 MiB + 1 byte
        ];
        assert_eq!(sized(&limits), size(2, 256 + 257));
        // Half a CPU is one vCPU; a round limit stays round.
        let half = [
            (CPU_QUOTA_ANNOTATION, "50000"),
            (CPU_PERIOD_ANNOTATION, "100000"),
            (MEMORY_ANNOTATION, "1073741824"),
        ];
        assert_eq!(sized(&half), size(1, 256 + 1024));
    }

    #[test]
    fn the_overhead_vcpus_are_added_to_a_cpu_limit_only() {
        let guest = GuestConfig {
            overhead_vcpus: 1,
            ..GuestConfig::default()
        };
        let p = SizingPolicy::from_config(&guest, 64);
        let quota = PodLimits::from_annotations(|k| match k {
            CPU_QUOTA_ANNOTATION => Some("200000"),
            CPU_PERIOD_ANNOTATION => Some("100000"),
            _ => None,
        })
        .unwrap();
        assert_eq!(vm_size(&quota, &p), size(3, 512));
        assert_eq!(vm_size(&PodLimits::default(), &p), size(1, 512));
    }

    #[test]
    fn no_limit_values_give_the_default_for_that_resource() {
        for quota in ["0", "-1"] {
            let s = sized(&[
                (CPU_QUOTA_ANNOTATION, quota),
                (CPU_PERIOD_ANNOTATION, "100000"),
                (MEMORY_ANNOTATION, "0"),
            ]);
            assert_eq!(s, size(1, 512), "quota {quota}");
        }
        // Memory limited, CPU not: each resource on its own.
        assert_eq!(sized(&[(MEMORY_ANNOTATION, "104857600")]), size(1, 356));
    }

    #[test]
    fn a_quota_without_a_period_uses_the_kernel_default_period() {
        assert_eq!(sized(&[(CPU_QUOTA_ANNOTATION, "300000")]), size(3, 512));
        let zero_period = [
            (CPU_QUOTA_ANNOTATION, "300000"),
            (CPU_PERIOD_ANNOTATION, "0"),
        ];
        assert_eq!(sized(&zero_period), size(3, 512));
    }

    #[test]
    fn sizes_are_clamped_to_the_maxima_and_host_cpus() {
        let huge = [
            (CPU_QUOTA_ANNOTATION, "9223372036854775807"),
            (CPU_PERIOD_ANNOTATION, "1000"),
            (MEMORY_ANNOTATION, "18446744073709551615"),
        ];
        assert_eq!(sized(&huge), size(8, 8192));
        let on_two_cpus = SizingPolicy::from_config(&GuestConfig::default(), 2);
        let limits = PodLimits {
            cpu_millis: Some(4000),
            memory_bytes: None,
        };
        assert_eq!(vm_size(&limits, &on_two_cpus).vcpus, 2);
    }

    #[test]
    fn malformed_annotations_are_errors_naming_the_annotation() {
        for (key, value) in [
            (CPU_QUOTA_ANNOTATION, "lots"),
            (CPU_QUOTA_ANNOTATION, "-2"),
            (CPU_QUOTA_ANNOTATION, "1.5"),
            (CPU_PERIOD_ANNOTATION, "-100000"),
            (MEMORY_ANNOTATION, "1Gi"),
            (MEMORY_ANNOTATION, "-1"),
            (MEMORY_ANNOTATION, ""),
        ] {
            let err = PodLimits::from_sandbox_spec(&spec(&[(key, value)])).unwrap_err();
            let text = err.to_string();
            assert!(text.contains(key), "{key}={value}: {text}");
            assert!(matches!(err, SizingError::Annotation { .. }), "{err:?}");
        }
        let not_a_string = json!({"annotations": {MEMORY_ANNOTATION: 1024}});
        let err = PodLimits::from_sandbox_spec(&not_a_string).unwrap_err();
        assert!(err.to_string().contains("must be strings"), "{err}");
    }

    #[test]
    fn annotations_can_come_from_a_map() {
        let map = HashMap::from([(MEMORY_ANNOTATION.to_string(), " 2097152 ".to_string())]);
        let limits = PodLimits::from_annotations(|k| map.get(k).map(String::as_str)).unwrap();
        assert_eq!(limits.memory_bytes, Some(2 << 20));
    }

    #[test]
    fn container_resources_are_read_from_linux_resources_json() {
        let r = json!({
            "cpu": {"quota": 25000, "period": 100000, "shares": 256},
            "memory": {"limit": 134217728, "swap": 134217728}
        });
        let limits = PodLimits::from_linux_resources(&r).unwrap();
        assert_eq!(limits.cpu_millis, Some(250));
        assert_eq!(limits.memory_bytes, Some(128 << 20));
        let unlimited = json!({"cpu": {"quota": -1}, "memory": {"limit": -1}});
        assert_eq!(
            PodLimits::from_linux_resources(&unlimited).unwrap(),
            PodLimits::default()
        );
        assert_eq!(
            PodLimits::from_linux_resources(&json!({})).unwrap(),
            PodLimits::default()
        );
        let bad = json!({"memory": {"limit": "1G"}});
        let err = PodLimits::from_linux_resources(&bad).unwrap_err();
        assert!(err.to_string().contains("memory.limit"), "{err}");
        let bad_period = json!({"cpu": {"quota": 1000, "period": -5}});
        let err = PodLimits::from_linux_resources(&bad_period).unwrap_err();
        assert!(err.to_string().contains("cpu.period"), "{err}");
    }

    #[test]
    fn container_limits_sum_and_unlimited_ones_add_nothing() {
        let a = PodLimits {
            cpu_millis: Some(500),
            memory_bytes: Some(100 << 20),
        };
        let b = PodLimits {
            cpu_millis: Some(700),
            memory_bytes: None,
        };
        let total: PodLimits = [a, b, PodLimits::default()].into_iter().sum();
        assert_eq!(total.cpu_millis, Some(1200));
        assert_eq!(total.memory_bytes, Some(100 << 20));
        let none: PodLimits = std::iter::empty().sum();
        assert_eq!(none, PodLimits::default());
    }

    #[test]
    fn grow_to_is_none_when_the_containers_fit() {
        let current = size(2, 1024);
        let fits = PodLimits {
            cpu_millis: Some(2000),
            memory_bytes: Some(768 << 20), // + 256 overhead = 1024
        };
        assert_eq!(grow_to(current, &fits, &policy()), None);
        assert_eq!(grow_to(current, &PodLimits::default(), &policy()), None);
    }

    #[test]
    fn grow_to_grows_only_what_is_short_and_never_shrinks() {
        let current = size(2, 1024);
        let more_memory = PodLimits {
            cpu_millis: Some(100),
            memory_bytes: Some(1 << 30),
        };
        assert_eq!(
            grow_to(current, &more_memory, &policy()),
            Some(size(2, 1280))
        );
        let more_cpu = PodLimits {
            cpu_millis: Some(3001),
            memory_bytes: None,
        };
        assert_eq!(grow_to(current, &more_cpu, &policy()), Some(size(4, 1024)));
    }

    #[test]
    fn grow_to_stops_at_the_maxima() {
        let too_much = PodLimits {
            cpu_millis: Some(100_000),
            memory_bytes: Some(1 << 40),
        };
        assert_eq!(
            grow_to(size(2, 1024), &too_much, &policy()),
            Some(size(8, 8192))
        );
        assert_eq!(grow_to(size(8, 8192), &too_much, &policy()), None);
        // A VM already above the max (booted under an older config) stays.
        assert_eq!(grow_to(size(16, 9000), &too_much, &policy()), None);
    }
}
