//! Templates ([`super::template`]): the bodies we send, checked against
//! CH's OpenAPI spec (see `spec_tests`), and the calls `save_template` and
//! a restoring `start` make, in order, against the fake CH of
//! `client_tests`, with what they leave behind.
//!
//! The VMM process is a stand-in script that only sleeps; the fake serves
//! its API socket once the backend has spawned it (the backend removes
//! any old socket first).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use super::api::{RestoreConfig, VmSnapshotConfig};
use super::client_tests::{response, FakeCh};
use super::spec_tests::openapi;
use super::template::file_url;
use super::{net_config, save_template, template_config, vm_config, vsock_config};
use super::{CloudHypervisor, VMM_LOG};
use crate::console_log::{pipe_path, AGENT_SERVING_MESSAGE};
use crate::testing::{fake_ch, FAKE_CH_LINE};
use crate::wait::wait_until;
use crate::{Error, Hypervisor, SharedFs, VmSize, VmSpec};

const PING: &str = r#"{"build_version":"v53.0","version":"53.0.0","pid":1,"features":[]}"#;
const PLUGGED: &str = r#"{"id":"_dev0","bdf":"0000:00:06.0"}"#;
const TEMPLATE_SOCKET: &str = "template-api.sock";
const TEMPLATE_LOG: &str = "template-vmm.log";

/// A pod's VM with every per-pod device: virtio-fs and two NICs.
fn pod(dir: &Path) -> VmSpec {
    VmSpec {
        shared_fs: Some(SharedFs {
            socket: dir.join("fs.sock"),
            tag: "clh-shared".into(),
        }),
        nics: crate::Nic::two_for_test(),
        max: Some(VmSize {
            vcpus: 2,
            memory_mib: 1024,
        }),
        free_page_reporting: true,
        ..VmSpec::for_test(dir)
    }
}

/// A stand-in `cloud-hypervisor` that sleeps (in a loop, so that its
/// command line, which names the VM directory, stays visible in /proc).
/// Written by a child shell, as [`fake_ch`] is, against ETXTBSY.
fn sleeping_ch(dir: &Path) -> PathBuf {
    let path = dir.join("sleeping-ch");
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(r#"printf '#!/bin/sh\nwhile :; do sleep 1; done\n' > "$1" && chmod 755 "$1""#)
        .arg("sh")
        .arg(&path)
        .status();
    assert!(status.is_ok_and(|s| s.success()));
    path
}

/// Once the backend has spawned its VMM (its `log` exists), serves
/// `responses` on `dir/socket`; with `serving`, first prints the agent's
/// line into the console FIFO, as the template's guest would.
async fn serve_once_spawned(
    dir: &Path,
    log: &str,
    socket: &str,
    serving: bool,
    responses: Vec<Option<&'static str>>,
) -> FakeCh {
    wait_until("the VMM to be spawned", Duration::from_secs(5), || async {
        dir.join(log).exists().then_some(())
    })
    .await
    .unwrap();
    if serving {
        use std::io::Write;
        // The backend's copier holds the FIFO open for reading: no block.
        let mut fifo = std::fs::OpenOptions::new()
            .write(true)
            .open(pipe_path(dir))
            .unwrap();
        writeln!(fifo, "agent: {AGENT_SERVING_MESSAGE} port 1024").unwrap();
    }
    FakeCh::serve_at(dir.join(socket), responses)
}

/// `"PUT vm.restore"` and the JSON body, if any, of a request.
fn split(request: &str) -> (String, Option<Value>) {
    let line = request.lines().next().unwrap_or_default();
    let mut words = line.split(' ');
    let method = words.next().unwrap_or_default();
    let path = words.next().unwrap_or_default();
    let endpoint = path.trim_start_matches("/api/v1/");
    let (_, body) = request.split_once("\r\n\r\n").unwrap_or_default();
    let body = (!body.is_empty()).then(|| serde_json::from_str(body).unwrap());
    (format!("{method} {endpoint}"), body)
}

/// Whether a process's command line names `dir`: our stand-in VMM.
fn processes_in(dir: &Path) -> Vec<u32> {
    let needle = dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            String::from_utf8_lossy(&cmdline)
                .contains(&needle)
                .then_some(pid)
        })
        .collect()
}

#[test]
fn template_and_restore_bodies_match_the_spec() {
    let Some(api) = openapi() else { return };
    let dir = PathBuf::from("/run/clh/pod1");
    api.assert_valid("VmConfig", &template_config(&pod(&dir)));
    let url = file_url(Path::new("/var/lib/clh/templates/k/snapshot")).unwrap();
    api.assert_valid(
        "VmSnapshotConfig",
        &VmSnapshotConfig {
            destination_url: url.clone(),
        },
    );
    for prefault in [false, true] {
        let restore = RestoreConfig {
            source_url: url.clone(),
            prefault,
        };
        api.assert_valid("RestoreConfig", &restore);
    }
    api.assert_valid("VsockConfig", &vsock_config(&dir.join("vsock.sock")));
}

/// The template is the pod's machine without its devices, and its console
/// path is relative, so each restore writes into its own VM directory.
#[test]
fn a_template_has_no_per_pod_device_and_a_relative_console() {
    let dir = PathBuf::from("/run/clh/pod1");
    let spec = pod(&dir);
    let template = serde_json::to_value(template_config(&spec)).unwrap();
    let mut cold = serde_json::to_value(vm_config(&spec, &dir.join("vsock.sock"))).unwrap();
    for device in ["vsock", "fs", "net"] {
        assert!(template.get(device).is_none(), "{device}: {template}");
        assert!(cold.get(device).is_some(), "{device}: {cold}");
        cold.as_object_mut().unwrap().remove(device);
    }
    assert_eq!(
        template["serial"],
        json!({"mode": "File", "file": "console.pipe"})
    );
    cold["serial"] = template["serial"].clone();
    assert_eq!(template, cold);
}

#[test]
fn a_snapshot_url_needs_an_absolute_path() {
    assert_eq!(
        file_url(Path::new("/t/snap")).unwrap(),
        "file:///t/snap".to_string()
    );
    let err = file_url(Path::new("t/snap")).unwrap_err();
    assert!(matches!(err, Error::InvalidSpec(_)), "{err:?}");
}

#[tokio::test]
async fn save_template_boots_waits_for_the_agent_pauses_and_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let binary = sleeping_ch(dir.path());
    let spec = pod(dir.path());
    let snapshot = dir.path().join("snapshot");
    let no_body = Some(response("204 No Content", ""));
    let responses = vec![
        Some(response("200 OK", PING)),
        no_body, // vm.create
        no_body, // vm.boot
        no_body, // vm.pause
        no_body, // vm.snapshot
        no_body, // vmm.shutdown
    ];
    let serve = serve_once_spawned(dir.path(), TEMPLATE_LOG, TEMPLATE_SOCKET, true, responses);
    let (saved, fake) = tokio::join!(save_template(&binary, &spec, &snapshot), serve);
    saved.unwrap();

    let requests: Vec<_> = fake.requests().await.iter().map(|r| split(r)).collect();
    let endpoints: Vec<_> = requests.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(
        endpoints,
        [
            "GET vmm.ping",
            "PUT vm.create",
            "PUT vm.boot",
            "PUT vm.pause",
            "PUT vm.snapshot",
            "PUT vmm.shutdown"
        ]
    );
    let create = requests[1].1.clone().unwrap();
    assert_eq!(
        create,
        serde_json::to_value(template_config(&spec)).unwrap()
    );
    let destination = format!("file://{}", snapshot.display());
    assert_eq!(
        requests[4].1,
        Some(json!({ "destination_url": destination }))
    );
    if let Some(api) = openapi() {
        api.assert_valid("VmConfig", &create);
        api.assert_valid("VmSnapshotConfig", &requests[4].1);
    }
    // CH needs the directory to exist; the fake wrote nothing in it.
    assert!(snapshot.is_dir());
    for gone in [TEMPLATE_SOCKET, "console.pipe"] {
        assert!(!dir.path().join(gone).exists(), "{gone} left behind");
    }
    assert!(
        processes_in(dir.path()).is_empty(),
        "the template's VMM runs"
    );
}

/// A failure after the snapshot directory was made (CH refuses the
/// snapshot) removes it, and the VMM.
#[tokio::test]
async fn a_refused_snapshot_removes_the_snapshot_directory_and_the_vmm() {
    let dir = tempfile::tempdir().unwrap();
    let binary = sleeping_ch(dir.path());
    let spec = VmSpec::for_test(dir.path());
    let snapshot = dir.path().join("snapshot");
    let no_body = Some(response("204 No Content", ""));
    let refused = r#"["Error from API","The VM could not be snapshotted"]"#;
    let responses = vec![
        Some(response("200 OK", PING)),
        no_body,
        no_body,
        no_body,
        Some(response("500 Internal Server Error", refused)),
    ];
    let serve = serve_once_spawned(dir.path(), TEMPLATE_LOG, TEMPLATE_SOCKET, true, responses);
    let (saved, fake) = tokio::join!(save_template(&binary, &spec, &snapshot), serve);
    let err = saved.unwrap_err();
    assert!(
        matches!(&err, Error::Api { endpoint: "vm.snapshot", body, .. } if body.contains("snapshotted")),
        "{err:?}"
    );
    assert_eq!(fake.requests().await.len(), 5);
    for gone in ["snapshot", TEMPLATE_SOCKET, "console.pipe"] {
        assert!(!dir.path().join(gone).exists(), "{gone} left behind");
    }
    assert!(
        processes_in(dir.path()).is_empty(),
        "the template's VMM runs"
    );
}

#[tokio::test]
async fn a_template_whose_vmm_fails_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let binary = fake_ch(dir.path());
    let spec = VmSpec::for_test(dir.path());
    let snapshot = dir.path().join("snapshot");
    let err = save_template(&binary, &spec, &snapshot).await.unwrap_err();
    assert!(matches!(err, Error::ExitedEarly { .. }), "{err:?}");
    assert!(err.to_string().contains(FAKE_CH_LINE), "{err}");
    for gone in ["snapshot", TEMPLATE_SOCKET, "console.pipe"] {
        assert!(!dir.path().join(gone).exists(), "{gone} left behind");
    }

    // Refused before anything is spawned: a directory that exists, and a
    // relative one.
    std::fs::create_dir(&snapshot).unwrap();
    std::fs::remove_file(dir.path().join(TEMPLATE_LOG)).unwrap();
    for bad in [snapshot.as_path(), Path::new("relative/snapshot")] {
        let err = save_template(&binary, &spec, bad).await.unwrap_err();
        assert!(matches!(err, Error::InvalidSpec(_)), "{bad:?}: {err:?}");
        assert!(!dir.path().join(TEMPLATE_LOG).exists(), "CH was spawned");
    }
    assert!(snapshot.is_dir(), "the caller's directory was removed");
}

#[tokio::test]
async fn a_restore_plugs_the_pods_devices_while_paused_then_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let binary = sleeping_ch(dir.path());
    let template = dir.path().join("template");
    let spec = VmSpec {
        restore_from: Some(template.clone()),
        ..pod(dir.path())
    };
    let no_body = Some(response("204 No Content", ""));
    let plugged = Some(response("200 OK", PLUGGED));
    let responses = vec![
        Some(response("200 OK", PING)),
        no_body, // vm.restore
        plugged, // vm.add-vsock
        plugged, // vm.add-fs
        plugged, // vm.add-net
        plugged, // vm.add-net
        no_body, // vm.resume
    ];
    let mut ch = CloudHypervisor::new(binary);
    let serve = serve_once_spawned(dir.path(), VMM_LOG, "ch-api.sock", false, responses);
    let (started, fake) = tokio::join!(ch.start(&spec), serve);
    started.unwrap();
    assert_eq!(ch.vsock_socket(), dir.path().join("vsock.sock"));

    let requests: Vec<_> = fake.requests().await.iter().map(|r| split(r)).collect();
    let endpoints: Vec<_> = requests.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(
        endpoints,
        [
            "GET vmm.ping",
            "PUT vm.restore",
            "PUT vm.add-vsock",
            "PUT vm.add-fs",
            "PUT vm.add-net",
            "PUT vm.add-net",
            "PUT vm.resume"
        ]
    );
    let body = |i: usize| requests[i].1.clone().unwrap();
    let source = format!("file://{}", template.display());
    assert_eq!(body(1), json!({"source_url": source, "prefault": false}));
    // What a cold boot's vm.create would carry, device by device.
    let cold = serde_json::to_value(vm_config(&spec, &ch.vsock_socket())).unwrap();
    assert_eq!(body(2), cold["vsock"]);
    assert_eq!(body(2)["cid"], json!(3));
    assert_eq!(body(3), cold["fs"][0]);
    assert_eq!(body(4), cold["net"][0]);
    assert_eq!(body(5), cold["net"][1]);
    assert_eq!(
        body(5),
        serde_json::to_value(net_config(&spec.nics[1])).unwrap()
    );
    assert_eq!(requests[6].1, None);
    if let Some(api) = openapi() {
        for (i, schema) in [
            "RestoreConfig",
            "VsockConfig",
            "FsConfig",
            "NetConfig",
            "NetConfig",
        ]
        .into_iter()
        .enumerate()
        {
            api.assert_valid(schema, &body(i + 1));
        }
    }

    ch.stop(Duration::from_millis(200)).await.unwrap();
    assert!(ch.pids().is_empty());
    for gone in ["ch-api.sock", "vsock.sock", "console.pipe"] {
        assert!(!dir.path().join(gone).exists(), "{gone} left behind");
    }
    assert!(processes_in(dir.path()).is_empty(), "the VMM runs");
}

/// A refused restore fails `start` with CH's reason (the shim then boots
/// cold), after stopping the VMM and removing its sockets.
#[tokio::test]
async fn a_refused_restore_fails_start_and_stops_the_vmm() {
    let dir = tempfile::tempdir().unwrap();
    let binary = sleeping_ch(dir.path());
    let spec = VmSpec {
        restore_from: Some(dir.path().join("template")),
        ..VmSpec::for_test(dir.path())
    };
    let refused =
        r#"["Error from API","The VM could not be restored","Destination is not a directory"]"#;
    let responses = vec![
        Some(response("200 OK", PING)),
        Some(response("500 Internal Server Error", refused)),
    ];
    let mut ch = CloudHypervisor::new(binary);
    let serve = serve_once_spawned(dir.path(), VMM_LOG, "ch-api.sock", false, responses);
    let (started, fake) = tokio::join!(ch.start(&spec), serve);
    let err = started.unwrap_err();
    assert!(
        matches!(&err, Error::Api { endpoint: "vm.restore", body, .. } if body.contains("not a directory")),
        "{err:?}"
    );
    assert_eq!(fake.requests().await.len(), 2);
    assert!(ch.pids().is_empty());
    for gone in ["ch-api.sock", "vsock.sock", "console.pipe"] {
        assert!(!dir.path().join(gone).exists(), "{gone} left behind");
    }
    assert!(processes_in(dir.path()).is_empty(), "the VMM runs");
}
