//! The JSON we send, checked against CH's v53 OpenAPI spec, and a golden
//! `vm.create` body.
//!
//! Validation is stricter than the spec: object schemas get
//! `additionalProperties: false`, because CH silently ignores unknown fields
//! and a misspelled field name would otherwise go unnoticed.

use std::path::{Path, PathBuf};
use std::sync::LazyLock;
use std::time::Duration;

use serde::Serialize;
use serde_json::{json, Value};

use super::api::{BalloonConfig, DiskConfig, FsConfig, ImageType, NetConfig, RngConfig, VmResize};
use super::{net_config, resize, vm_config};
use crate::{Nic, SharedFs, VmSize, VmSpec};

const SPEC_PATH: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../../shared/reference/cloud-hypervisor-v53.0-openapi.yaml"
);

/// The spec's `components`, made strict; loaded once. None when the file
/// is absent: a plain clone has no `shared/` beside it.
static COMPONENTS: LazyLock<Option<Value>> = LazyLock::new(|| {
    let text = match std::fs::read_to_string(SPEC_PATH) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => panic!("cannot read the Cloud Hypervisor OpenAPI spec at {SPEC_PATH}: {e}"),
    };
    let spec: serde_yaml::Value = serde_yaml::from_str(&text).expect("the spec is valid YAML");
    // Only `components` is converted: `paths` has integer keys (status
    // codes), which JSON objects cannot have.
    let components = spec.get("components").expect("the spec has components");
    let mut components = serde_json::to_value(components).expect("components convert to JSON");
    make_strict(&mut components);
    Some(components)
});

/// The loaded spec, or None after recording the skip. CI always has the
/// shared reference directory, so there a missing spec is a failure, never
/// a skip.
pub(super) fn openapi() -> Option<OpenApi> {
    if let Some(components) = COMPONENTS.as_ref() {
        return Some(OpenApi(components));
    }
    let reason = format!(
        "the Cloud Hypervisor OpenAPI spec is not at {SPEC_PATH} (a clone without the \
         shared reference directory beside it)"
    );
    assert!(
        std::env::var_os("CI").is_none(),
        "{reason}; CI must have it"
    );
    clh_test_skip::skip(&reason);
    None
}

/// The strict `components` of CH's OpenAPI spec.
#[derive(Clone, Copy)]
pub(super) struct OpenApi(&'static Value);

impl OpenApi {
    /// Validation errors of `instance` against `#/components/schemas/<schema>`.
    pub(super) fn violations(self, schema: &str, instance: &Value) -> Vec<String> {
        let root = json!({
            "$ref": format!("#/components/schemas/{schema}"),
            "components": self.0,
        });
        let validator = jsonschema::options()
            .with_draft(jsonschema::Draft::Draft4)
            .build(&root)
            .unwrap_or_else(|e| panic!("schema {schema} does not compile: {e}"));
        validator
            .iter_errors(instance)
            .map(|e| format!("{}: {e}", e.instance_path()))
            .collect()
    }

    pub(super) fn assert_valid<T: Serialize>(self, schema: &str, body: &T) -> Value {
        let json = serde_json::to_value(body).unwrap();
        let errors = self.violations(schema, &json);
        assert!(
            errors.is_empty(),
            "{schema} body {json} violates the spec: {errors:#?}"
        );
        json
    }
}

fn make_strict(value: &mut Value) {
    match value {
        Value::Object(map) => {
            if map.contains_key("properties") && !map.contains_key("additionalProperties") {
                map.insert("additionalProperties".into(), Value::Bool(false));
            }
            if map.remove("nullable") == Some(Value::Bool(true)) {
                if let Some(Value::String(ty)) = map.get("type").cloned() {
                    map.insert("type".into(), json!([ty, "null"]));
                }
            }
            map.values_mut().for_each(make_strict);
        }
        Value::Array(items) => items.iter_mut().for_each(make_strict),
        _ => {}
    }
}

fn spec(dir: &Path) -> VmSpec {
    VmSpec {
        id: "pod1".into(),
        vcpus: 2,
        memory_mib: 512,
        kernel: "/opt/clh/vmlinux".into(),
        initramfs: "/opt/clh/initramfs.cpio.gz".into(),
        cmdline: "console=ttyS0 quiet".into(),
        shared_fs: Some(SharedFs {
            socket: dir.join("fs.sock"),
            tag: "clh-shared".into(),
        }),
        start_timeout: Duration::from_secs(5),
        ..VmSpec::for_test(dir)
    }
}

fn full_net() -> NetConfig {
    NetConfig {
        tap: Some("tap0".into()),
        ip: Some("192.168.249.1".into()),
        mask: Some("255.255.255.0".into()),
        mac: Some("12:34:56:78:90:ab".into()),
        host_mac: Some("12:34:56:78:90:ac".into()),
        mtu: Some(1500),
        num_queues: Some(2),
        queue_size: Some(256),
        vhost_user: Some(false),
        vhost_socket: None,
        id: Some("net0".into()),
    }
}

fn full_disk() -> DiskConfig {
    DiskConfig {
        path: Some("/var/lib/clh/rootfs.img".into()),
        readonly: Some(true),
        direct: Some(false),
        num_queues: Some(1),
        queue_size: Some(128),
        id: Some("disk0".into()),
        serial: Some("rootfs".into()),
        image_type: Some(ImageType::Raw),
    }
}

#[test]
fn vm_create_body_matches_the_spec() {
    let Some(api) = openapi() else { return };
    let dir = PathBuf::from("/run/clh/pod1");
    api.assert_valid("VmConfig", &vm_config(&spec(&dir), &dir.join("vsock.sock")));

    let mut everything = vm_config(&spec(&dir), &dir.join("vsock.sock"));
    everything.net = Some(vec![full_net()]);
    everything.disks = Some(vec![full_disk()]);
    everything.rng = Some(RngConfig {
        src: "/dev/urandom".into(),
    });
    everything.balloon = Some(BalloonConfig {
        size: 1 << 20,
        deflate_on_oom: Some(true),
        free_page_reporting: Some(true),
    });
    if let Some(memory) = everything.memory.as_mut() {
        memory.hugepages = Some(false);
        memory.hotplug_size = Some(1 << 30);
    }
    api.assert_valid("VmConfig", &everything);
}

/// One `net` entry per NIC, in order: the tap, the guest MAC and the MTU
/// when one is given, one queue pair; never `ip`/`mask` (CH would put
/// them on the pod's tap) nor `host_mac`.
#[test]
fn each_nic_is_a_net_device_on_its_tap() {
    let dir = PathBuf::from("/run/clh/pod1");
    let pod = VmSpec {
        netns: Some("/var/run/netns/cni-1234".into()),
        nics: Nic::two_for_test(),
        ..spec(&dir)
    };
    let body = serde_json::to_value(vm_config(&pod, &dir.join("vsock.sock"))).unwrap();
    assert_eq!(
        body["net"],
        json!([
            {"tap": "tap0_clh", "mac": "0a:58:0a:f4:00:07", "mtu": 1450, "num_queues": 2},
            {"tap": "tap1_clh", "mac": "0a:58:0a:f4:01:07", "num_queues": 2}
        ])
    );
    // A multi-queue tap: one RX and one TX queue per pair.
    let mut multi = Nic::two_for_test();
    multi[0].queues = 4;
    let pod4 = VmSpec {
        nics: multi,
        ..pod.clone()
    };
    let body4 = serde_json::to_value(vm_config(&pod4, &dir.join("vsock.sock"))).unwrap();
    assert_eq!(body4["net"][0]["num_queues"], json!(8));
    // The rest of the body does not change with NICs.
    let mut without = body.clone();
    without.as_object_mut().unwrap().remove("net");
    let plain = serde_json::to_value(vm_config(&spec(&dir), &dir.join("vsock.sock"))).unwrap();
    assert_eq!(without, plain);

    if let Some(api) = openapi() {
        api.assert_valid("VmConfig", &vm_config(&pod, &dir.join("vsock.sock")));
        for nic in &pod.nics {
            api.assert_valid("NetConfig", &net_config(nic));
        }
    }
}

#[test]
fn hotplug_and_resize_bodies_match_the_spec() {
    let Some(api) = openapi() else { return };
    let mut fs = FsConfig::new("extra", "/run/clh/pod1/fs2.sock");
    api.assert_valid("FsConfig", &fs);
    fs.id = Some("fs1".into());
    api.assert_valid("FsConfig", &fs);
    api.assert_valid("NetConfig", &full_net());
    api.assert_valid("NetConfig", &NetConfig::default());
    api.assert_valid("DiskConfig", &full_disk());
    let resize = VmResize {
        desired_vcpus: Some(4),
        desired_ram: Some(2 << 30),
        desired_balloon: Some(0),
    };
    api.assert_valid("VmResize", &resize);
}

#[test]
fn the_spec_rejects_misspelled_fields_wrong_enums_and_missing_requirements() {
    let Some(api) = openapi() else { return };
    let dir = PathBuf::from("/run/clh/pod1");
    let good = serde_json::to_value(vm_config(&spec(&dir), &dir.join("vsock.sock"))).unwrap();

    let mut misspelled = good.clone();
    misspelled["cpus"]["boot_vcpu"] = json!(2);
    let errors = api.violations("VmConfig", &misspelled);
    assert!(errors.iter().any(|e| e.contains("boot_vcpu")), "{errors:?}");

    let mut bad_enum = good.clone();
    bad_enum["console"]["mode"] = json!("off");
    assert!(!api.violations("VmConfig", &bad_enum).is_empty());

    let mut no_payload = good;
    no_payload.as_object_mut().unwrap().remove("payload");
    assert!(!api.violations("VmConfig", &no_payload).is_empty());

    let bad_cid = json!({"cid": 2, "socket": "/v.sock"});
    assert!(!api.violations("VsockConfig", &bad_cid).is_empty());

    let fs_without_queues = json!({"tag": "t", "socket": "/fs.sock"});
    assert!(!api.violations("FsConfig", &fs_without_queues).is_empty());
}

#[test]
fn vm_create_body_golden() {
    let dir = PathBuf::from("/run/clh/pod1");
    let body = serde_json::to_value(vm_config(&spec(&dir), &dir.join("vsock.sock"))).unwrap();
    let golden = json!({
        "cpus": {"boot_vcpus": 2, "max_vcpus": 2},
        "memory": {"size": 536_870_912, "shared": true},
        "payload": {
            "kernel": "/opt/clh/vmlinux",
            "cmdline": "console=ttyS0 quiet",
            "initramfs": "/opt/clh/initramfs.cpio.gz"
        },
        "fs": [{
            "tag": "clh-shared",
            "socket": "/run/clh/pod1/fs.sock",
            "num_queues": 1,
            "queue_size": 1024
        }],
        "serial": {"mode": "File", "file": "/run/clh/pod1/console.pipe"},
        "console": {"mode": "Off"},
        "vsock": {"cid": 3, "socket": "/run/clh/pod1/vsock.sock"}
    });
    assert_eq!(
        body,
        golden,
        "actual:\n{}",
        serde_json::to_string_pretty(&body).unwrap()
    );
}

#[test]
fn free_page_reporting_is_a_balloon_that_never_inflates() {
    let dir = PathBuf::from("/run/clh/pod1");
    let spec = VmSpec {
        free_page_reporting: true,
        ..spec(&dir)
    };
    let body = serde_json::to_value(vm_config(&spec, &dir.join("vsock.sock"))).unwrap();
    assert_eq!(
        body["balloon"],
        json!({"size": 0, "free_page_reporting": true}),
        "{body}"
    );
    if let Some(api) = openapi() {
        api.assert_valid("VmConfig", &body);
    }
}

#[test]
fn without_shared_fs_no_fs_field_is_sent() {
    let Some(api) = openapi() else { return };
    let dir = PathBuf::from("/run/clh/pod1");
    let mut spec = spec(&dir);
    spec.shared_fs = None;
    let body = api.assert_valid("VmConfig", &vm_config(&spec, &dir.join("vsock.sock")));
    assert!(body.get("fs").is_none(), "{body}");
}

#[test]
fn a_growable_vm_reserves_vcpus_and_acpi_hotplug_memory() {
    let Some(api) = openapi() else { return };
    let dir = PathBuf::from("/run/clh/pod1");
    let mut spec = spec(&dir);
    spec.max = Some(VmSize {
        vcpus: 8,
        memory_mib: 4096,
    });
    let body = api.assert_valid("VmConfig", &vm_config(&spec, &dir.join("vsock.sock")));
    assert_eq!(body["cpus"], json!({"boot_vcpus": 2, "max_vcpus": 8}));
    assert_eq!(
        body["memory"],
        json!({
            "size": 512_u64 << 20,
            "shared": true,
            "hotplug_size": 3584_u64 << 20,
            "hotplug_method": "Acpi"
        })
    );

    // A max below the boot size reserves nothing and never lowers max_vcpus
    // under boot_vcpus (CH refuses that).
    spec.max = Some(VmSize {
        vcpus: 1,
        memory_mib: 256,
    });
    let body = api.assert_valid("VmConfig", &vm_config(&spec, &dir.join("vsock.sock")));
    assert_eq!(body["cpus"], json!({"boot_vcpus": 2, "max_vcpus": 2}));
    assert!(body["memory"].get("hotplug_size").is_none(), "{body}");
}

#[test]
fn planned_resize_bodies_match_the_spec() {
    let Some(api) = openapi() else { return };
    let boot = VmSize {
        vcpus: 1,
        memory_mib: 512,
    };
    let max = VmSize {
        vcpus: 4,
        memory_mib: 2048,
    };
    for target in [
        VmSize {
            vcpus: 4,
            memory_mib: 1000,
        },
        VmSize {
            vcpus: 2,
            memory_mib: 512,
        },
        VmSize {
            vcpus: 1,
            memory_mib: 2048,
        },
    ] {
        let (body, _) = resize::plan(boot, max, target).unwrap().unwrap();
        api.assert_valid("VmResize", &body);
    }
}
