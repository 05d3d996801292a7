//! What a bind mount's OPTIONS ask for, as runc reads them, and what of it
//! a VM can give.
//!
//! - `ro` makes the bind's own mount read-only; submounts keep their own
//!   flags (a read-write tmpfs below stays writable). In the guest the
//!   whole volume is one virtio-fs directory, so the guest mounts each
//!   direct submount again, read-write, over the read-only volume
//!   ([`submount_entries`]); the host's flags on each submount still
//!   decide what can be written. `rro` (CRI `recursiveReadOnly`) makes
//!   every mount read-only, on the host and in the guest.
//! - `rslave` (HostToContainer): a mount the host makes below the source
//!   later reaches the container. The host clone is a slave of the
//!   source's mounts; virtiofsd serves what is mounted there when the
//!   guest next looks the path up. Refused for a source that holds the
//!   host's /proc, /sys, /dev or a runtime's state directory (`/`, `/run`,
//!   `/var`): the kernel and runtime mounts the initial bind leaves out
//!   (submounts.rs) would arrive later that way.
//! - `rshared` (Bidirectional): refused. A mount made in the guest is a
//!   mount of the guest kernel, on top of virtio-fs; nothing of it can
//!   reach the host's mount table.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::error::{Error, Result};
use crate::bind_mount::{BindOptions, Propagation};
use crate::submounts::HOST_KERNEL_TREES;

fn options(m: &Value) -> impl Iterator<Item = &str> {
    m.get("options")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
}

fn has(m: &Value, opt: &str) -> bool {
    options(m).any(|o| o == opt)
}

fn destination(m: &Value) -> &str {
    m.get("destination").and_then(Value::as_str).unwrap_or("?")
}

/// Read-only in the spec: `ro` or `rro` (containerd sends `rro` alone).
pub fn is_readonly(m: &Value) -> bool {
    has(m, "ro") || has(m, "rro")
}

/// The host-side options of bind mount `m`; a Bidirectional mount is an
/// InvalidArgument (see the module doc).
pub fn bind_options(m: &Value) -> Result<BindOptions> {
    let mut propagation = Propagation::Private;
    for opt in options(m) {
        match opt {
            "shared" | "rshared" => {
                return Err(Error::InvalidArgument(format!(
                    "the mount for {} asks for {opt} propagation (mountPropagation: Bidirectional), which a VM cannot give: the container's mounts are the guest kernel's, made on top of virtio-fs, and can never reach the host's mount table. Use HostToContainer (host mounts still reach the container), or a runc RuntimeClass for a pod that must mount for the host",
                    destination(m)
                )))
            }
            "slave" | "rslave" => propagation = Propagation::Slave,
            "private" | "rprivate" => propagation = Propagation::Private,
            _ => {}
        }
    }
    Ok(BindOptions {
        recursive: has(m, "rbind"),
        readonly: is_readonly(m),
        recursive_readonly: has(m, "rro"),
        propagation,
    })
}

/// Refuses, before anything is made, a spec with a bind mount that
/// [`bind_options`] refuses.
pub fn check_mounts(spec: &Value) -> Result<()> {
    let mounts = spec.get("mounts").and_then(Value::as_array);
    for m in mounts.into_iter().flatten() {
        if super::binds::is_bind(m) {
            bind_options(m)?;
        }
    }
    Ok(())
}

/// The spec as the guest must read its propagation: the host carries a
/// HostToContainer volume's later mounts (the guest sees them as virtio-fs
/// content, not as mount events), so in the guest every bind and the
/// rootfs are private; asking libcontainer for slave mounts there fails
/// the container's rootfs setup.
pub fn guest_propagation(spec: &mut Value) {
    if let Some(mounts) = spec.get_mut("mounts").and_then(Value::as_array_mut) {
        for m in mounts.iter_mut().filter(|m| super::binds::is_bind(m)) {
            if let Some(opts) = m.get_mut("options").and_then(Value::as_array_mut) {
                for o in opts.iter_mut() {
                    if matches!(o.as_str(), Some("slave" | "rslave")) {
                        *o = Value::String("rprivate".into());
                    }
                }
            }
        }
    }
    let slave = spec
        .pointer("/linux/rootfsPropagation")
        .and_then(Value::as_str)
        .is_some_and(|p| matches!(p, "slave" | "rslave"));
    if slave {
        if let Some(linux) = spec.get_mut("linux").and_then(Value::as_object_mut) {
            linux.remove("rootfsPropagation");
        }
    }
}

/// Refuses a slave bind of `source` (canonical) when it holds the host's
/// kernel trees or one of `hidden` (see the module doc).
pub fn check_slave_source(m: &Value, source: &Path, hidden: &[PathBuf]) -> Result<()> {
    let held = HOST_KERNEL_TREES
        .iter()
        .map(Path::new)
        .chain(hidden.iter().map(PathBuf::as_path))
        .find(|tree| tree.starts_with(source));
    match held {
        Some(tree) => Err(Error::InvalidArgument(format!(
            "the mount for {} asks for HostToContainer propagation of {}, which holds {}: mounts the host makes there later (kernel filesystems, other pods' volumes) would reach the VM. Mount a directory of its own with HostToContainer, or use None",
            destination(m),
            source.display(),
            tree.display()
        ))),
        None => Ok(()),
    }
}

/// The guest mounts that give back, read-write, each direct submount of a
/// read-only (not recursively read-only) bind `m` whose guest source is
/// `guest_source`: the same options with `ro` made `rw`, at
/// `<destination>/<rel>` from `<guest_source>/<rel>`.
pub fn submount_entries(m: &Value, guest_source: &str, submounts: &[PathBuf]) -> Vec<Value> {
    let dest = destination(m).trim_end_matches('/');
    let opts: Vec<Value> = options(m)
        .map(|o| if o == "ro" { "rw" } else { o })
        .map(|o| Value::String(o.to_owned()))
        .collect();
    submounts
        .iter()
        .filter_map(|rel| rel.to_str())
        .map(|rel| {
            serde_json::json!({
                "destination": format!("{dest}/{rel}"),
                "type": "bind",
                "source": format!("{guest_source}/{rel}"),
                "options": opts,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn mount(options: &[&str]) -> Value {
        json!({"destination": "/data", "type": "bind", "source": "/host/data", "options": options})
    }

    #[test]
    fn ro_rro_and_propagation_are_read_as_runc_reads_them() {
        let o = bind_options(&mount(&["rbind", "rprivate", "ro"])).unwrap();
        assert!(o.recursive && o.readonly && !o.recursive_readonly);
        assert_eq!(o.propagation, Propagation::Private);
        let o = bind_options(&mount(&["rbind", "rprivate", "rro"])).unwrap();
        assert!(
            o.readonly && o.recursive_readonly,
            "containerd sends rro alone"
        );
        let o = bind_options(&mount(&["rbind", "rslave", "rw"])).unwrap();
        assert!(!o.readonly);
        assert_eq!(o.propagation, Propagation::Slave);
        let o = bind_options(&mount(&["bind"])).unwrap();
        assert!(!o.recursive && !o.readonly);
    }

    #[test]
    fn bidirectional_propagation_is_refused_saying_why() {
        for opt in ["rshared", "shared"] {
            let Err(Error::InvalidArgument(msg)) = bind_options(&mount(&["rbind", opt, "rw"]))
            else {
                panic!("{opt} accepted");
            };
            assert!(
                msg.contains("/data")
                    && msg.contains("Bidirectional")
                    && msg.contains("HostToContainer"),
                "{msg}"
            );
        }
    }

    #[test]
    fn host_to_container_is_refused_for_a_source_holding_kernel_or_runtime_trees() {
        let m = mount(&["rbind", "rslave"]);
        let hidden = vec![
            PathBuf::from("/run/clh-shim"),
            PathBuf::from("/var/lib/containerd"),
        ];
        for held in ["/", "/run", "/var", "/var/lib", "/sys", "/run/clh-shim"] {
            let r = check_slave_source(&m, Path::new(held), &hidden);
            assert!(matches!(r, Err(Error::InvalidArgument(_))), "{held}: {r:?}");
        }
        for fine in ["/mnt/shared", "/var/lib/kubelet", "/run/clh-shim2", "/srv"] {
            assert!(
                check_slave_source(&m, Path::new(fine), &hidden).is_ok(),
                "{fine}"
            );
        }
    }

    #[test]
    fn the_guest_gets_private_mounts_for_host_to_container_volumes() {
        let mut spec = json!({
            "linux": {"rootfsPropagation": "rslave"},
            "mounts": [
                {"destination": "/p", "type": "bind", "source": "/s", "options": ["rbind", "rslave", "rw"]},
                {"destination": "/proc", "type": "proc", "source": "proc", "options": ["slave"]},
            ],
        });
        guest_propagation(&mut spec);
        assert_eq!(
            spec["mounts"][0]["options"],
            json!(["rbind", "rprivate", "rw"])
        );
        assert_eq!(spec["mounts"][1]["options"], json!(["slave"]), "not a bind");
        assert!(spec["linux"].get("rootfsPropagation").is_none(), "{spec}");
    }

    #[test]
    fn submounts_of_a_read_only_bind_are_mounted_again_read_write() {
        let m = mount(&["rbind", "rprivate", "ro"]);
        let entries = submount_entries(
            &m,
            "/run/clh/shared/c1/mounts/3",
            &[PathBuf::from("tmp"), PathBuf::from("a/b")],
        );
        assert_eq!(
            entries,
            vec![
                json!({"destination": "/data/tmp", "type": "bind",
                    "source": "/run/clh/shared/c1/mounts/3/tmp", "options": ["rbind", "rprivate", "rw"]}),
                json!({"destination": "/data/a/b", "type": "bind",
                    "source": "/run/clh/shared/c1/mounts/3/a/b", "options": ["rbind", "rprivate", "rw"]}),
            ]
        );
    }
}
