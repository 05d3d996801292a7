//! The service without a VM: what is refused before anything starts, and
//! that a refusal publishes nothing.

use std::sync::Arc;
use std::time::Duration;

use containerd_shim::asynchronous::ExitSignal;
use containerd_shim_protos::api::{CreateTaskRequest, StateRequest};
use tokio::sync::mpsc;

use super::events::Event;
use super::stats::CgroupVersion;
use super::{Error, ServiceConfig, TaskService};
use crate::vm::VmOptions;

fn service() -> (
    TaskService<mpsc::UnboundedSender<Event>>,
    mpsc::UnboundedReceiver<Event>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let config = clh_config::Config::default();
    let (vm, _) = VmOptions::from_config(&config, &crate::host::KvmFlavour::None);
    let cfg = ServiceConfig {
        state_dir: "/nonexistent/clh-test".into(),
        vm,
        cgroup: CgroupVersion::V2,
        sizing: test_sizing(),
    };
    (
        TaskService::new(cfg, tx, Arc::new(ExitSignal::default())),
        rx,
    )
}

fn bundle(config_json: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), config_json).unwrap();
    dir
}

#[tokio::test]
async fn bad_creates_are_refused_before_any_vm_and_publish_nothing() {
    let (svc, mut rx) = service();
    let good = bundle("{}");
    let bad = bundle("{\"process\": [");
    let cases = [
        ("../escape", good.path()),
        ("x/y", good.path()),
        ("ok", bad.path()),
    ];
    for (id, dir) in cases {
        let req = CreateTaskRequest {
            id: id.into(),
            bundle: dir.display().to_string(),
            ..Default::default()
        };
        let err = svc.create(req).await.unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{id}: {err}");
    }
    let with_options = CreateTaskRequest {
        id: "ok".into(),
        bundle: good.path().display().to_string(),
        options: Some(
            containerd_shim_protos::protobuf::well_known_types::any::Any {
                type_url: "example.com/Unknown".into(),
                value: vec![1],
                ..Default::default()
            },
        )
        .into(),
        ..Default::default()
    };
    assert!(matches!(
        svc.create(with_options).await,
        Err(Error::InvalidArgument(_))
    ));
    let quiet = tokio::time::timeout(Duration::from_millis(50), rx.recv()).await;
    assert!(
        quiet.is_err(),
        "an event was published for a refused create"
    );
}

#[tokio::test]
async fn unknown_containers_are_not_found() {
    let (svc, _rx) = service();
    let req = StateRequest {
        id: "nope".into(),
        ..Default::default()
    };
    assert!(matches!(svc.state(req).await, Err(Error::NotFound(_))));
}

#[tokio::test]
async fn shutdown_with_nothing_left_ends_the_shim() {
    let (tx, _rx) = mpsc::unbounded_channel::<Event>();
    let exit = Arc::new(ExitSignal::default());
    let (vm, _) = VmOptions::from_config(
        &clh_config::Config::default(),
        &crate::host::KvmFlavour::None,
    );
    let cfg = ServiceConfig {
        state_dir: "/nonexistent".into(),
        vm,
        cgroup: CgroupVersion::V1,
        sizing: test_sizing(),
    };
    let svc = TaskService::new(cfg, tx, exit.clone());
    svc.shutdown().await.unwrap();
    tokio::time::timeout(Duration::from_secs(1), exit.wait())
        .await
        .expect("the exit signal was not set");
}

fn test_sizing() -> crate::sizing::SizingPolicy {
    crate::sizing::SizingPolicy::from_config(&clh_config::Config::default().guest, 1)
}
