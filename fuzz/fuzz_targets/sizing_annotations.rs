//! The pod's limits the VM is sized from: CRI's sandbox annotations and a
//! container's `linux.resources`, both written from the pod's spec, through
//! `shim/src/sizing.rs`. Whatever they say, a VM is between 1 and the
//! policy's maximum, growing never shrinks it, and a booted VM already fits
//! the limits it was sized for.

#![no_main]

use arbitrary::Arbitrary;
use containerd_shim_clh_v2::sizing::{
    grow_to, vm_size, PodLimits, SizingPolicy, VmSize, CPU_PERIOD_ANNOTATION, CPU_QUOTA_ANNOTATION,
    MEMORY_ANNOTATION,
};
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Map, Value};

#[derive(Arbitrary, Debug)]
enum Key {
    Quota,
    Period,
    Memory,
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum Json {
    Str(String),
    Int(i64),
    Uint(u64),
    Float(f64),
    Bool(bool),
    Null,
}

impl Json {
    fn value(&self) -> Value {
        match self {
            Json::Str(s) => json!(s),
            Json::Int(i) => json!(i),
            Json::Uint(u) => json!(u),
            Json::Float(f) => json!(f),
            Json::Bool(b) => json!(b),
            Json::Null => Value::Null,
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Input {
    annotations: Vec<(Key, Json)>,
    /// `linux.resources` of the pod's containers: cpu.quota, cpu.period,
    /// memory.limit.
    containers: Vec<(Option<Json>, Option<Json>, Option<Json>)>,
    /// default, overhead, max: (vcpus, memory MiB) each.
    policy: [(u32, u32); 3],
    current: (u32, u32),
}

fn size((vcpus, memory_mib): (u32, u32)) -> VmSize {
    VmSize { vcpus, memory_mib }
}

fn check_limits(l: &PodLimits) {
    assert!(l.cpu_millis.is_none_or(|m| m > 0), "{l:?}");
    assert!(l.memory_bytes.is_none_or(|m| m > 0), "{l:?}");
}

fn within(s: VmSize, max: VmSize) -> bool {
    (1..=max.vcpus.max(1)).contains(&s.vcpus) && (1..=max.memory_mib.max(1)).contains(&s.memory_mib)
}

fuzz_target!(|input: Input| {
    let policy = SizingPolicy {
        default: size(input.policy[0]),
        overhead: size(input.policy[1]),
        max: size(input.policy[2]),
    };
    let mut map = Map::new();
    for (key, value) in &input.annotations {
        let key = match key {
            Key::Quota => CPU_QUOTA_ANNOTATION.to_string(),
            Key::Period => CPU_PERIOD_ANNOTATION.to_string(),
            Key::Memory => MEMORY_ANNOTATION.to_string(),
            Key::Other(k) => k.clone(),
        };
        map.insert(key, value.value());
    }
    let spec = json!({ "ociVersion": "1.1.0", "annotations": map });
    let from_spec = PodLimits::from_sandbox_spec(&spec);
    // The same annotations as CRI's string map give the same limits.
    let all_strings = map.values().all(Value::is_string);
    let from_map = PodLimits::from_annotations(|k| map.get(k)?.as_str());
    if all_strings {
        assert_eq!(from_spec.as_ref().ok(), from_map.as_ref().ok());
    }
    if let Ok(pod) = from_spec {
        check_limits(&pod);
        let boot = vm_size(&pod, &policy);
        assert!(
            within(boot, policy.max),
            "{boot:?} for {pod:?} under {policy:?}"
        );
        assert_eq!(
            grow_to(boot, &pod, &policy),
            None,
            "a fresh VM must fit its own limits"
        );
    }

    let mut limits = Vec::new();
    for (quota, period, memory) in &input.containers {
        let mut cpu = Map::new();
        let mut mem = Map::new();
        quota
            .as_ref()
            .map(|q| cpu.insert("quota".into(), q.value()));
        period
            .as_ref()
            .map(|p| cpu.insert("period".into(), p.value()));
        memory
            .as_ref()
            .map(|m| mem.insert("limit".into(), m.value()));
        let resources = json!({ "cpu": cpu, "memory": mem });
        if let Ok(l) = PodLimits::from_linux_resources(&resources) {
            check_limits(&l);
            limits.push(l);
        }
    }
    let sum: PodLimits = limits.iter().copied().sum();
    for l in &limits {
        assert!(sum.cpu_millis >= l.cpu_millis && sum.memory_bytes >= l.memory_bytes);
    }
    let current = size(input.current);
    if let Some(target) = grow_to(current, &sum, &policy) {
        assert_ne!(target, current);
        assert!(target.vcpus >= current.vcpus && target.memory_mib >= current.memory_mib);
        assert!(target.vcpus == current.vcpus || target.vcpus <= policy.max.vcpus);
        assert!(
            target.memory_mib == current.memory_mib || target.memory_mib <= policy.max.memory_mib
        );
        assert_eq!(grow_to(target, &sum, &policy), None, "growing twice");
    }
});
