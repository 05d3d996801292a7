//! The service with a fake hypervisor and a fake agent (fakes.rs) and
//! everything else real (virtiofsd, mounts, the pod cgroup, the agent
//! client): a container's whole life, and each failure point of a pod
//! start, with the ttrpc code containerd gets and nothing left behind.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use containerd_shim::asynchronous::ExitSignal;
use containerd_shim_protos::api::{CreateTaskRequest, DeleteRequest, KillRequest, StartRequest};
use containerd_shim_protos::topics;
use tokio::sync::mpsc;
use ttrpc::Code;

use super::events::Event;
use super::fakes::{self, Boot, Fakes, GUEST_PID};
use super::stats::CgroupVersion;
use super::{ServiceConfig, TaskService};
use crate::vm::VmOptions;

type Service = TaskService<mpsc::UnboundedSender<Event>>;

struct Harness {
    svc: Service,
    events: mpsc::UnboundedReceiver<Event>,
    fakes: Fakes,
    exit: Arc<ExitSignal>,
    state_dir: PathBuf,
    /// Holds the state dir, the guest image stand-ins and the bundle.
    tmp: tempfile::TempDir,
}

/// A service on fakes booting as `boot`, with `adjust` applied to its VM
/// options; `None` (a visible skip) without root or virtiofsd.
fn harness(boot: Boot, adjust: impl FnOnce(&mut VmOptions)) -> Option<Harness> {
    let virtiofsd = fakes::virtiofsd();
    let Some(virtiofsd) = virtiofsd.filter(|_| nix::unistd::geteuid().is_root()) else {
        clh_test_skip::skip("the service tests need root (mounts, cgroups) and virtiofsd on PATH");
        return None;
    };
    let tmp = tempfile::tempdir().unwrap();
    let fakes = Fakes::new(boot);
    let config = clh_config::Config::default();
    let (mut vm, _) = VmOptions::from_config(&config, &crate::host::KvmFlavour::None);
    vm.hypervisors = fakes.factory();
    vm.binaries.virtiofsd = virtiofsd;
    (vm.kernel, vm.initramfs) = crate::vm::test_guest_image(tmp.path());
    vm.vmm_start_timeout = Duration::from_secs(10);
    vm.agent_timeout = Duration::from_secs(2);
    vm.stop_timeout = Duration::from_secs(2);
    adjust(&mut vm);
    let state_dir = tmp.path().join("state");
    let cfg = ServiceConfig {
        state_dir: state_dir.clone(),
        vm,
        cgroup: CgroupVersion::V1,
        sizing: crate::sizing::SizingPolicy::from_config(&config.guest, 1),
    };
    let (tx, events) = mpsc::unbounded_channel();
    let exit = Arc::new(ExitSignal::default());
    Some(Harness {
        svc: TaskService::new(cfg, tx, exit.clone()),
        events,
        fakes,
        exit,
        state_dir,
        tmp,
    })
}

/// A unique cgroupfs path for this test process.
fn cgroups_path(name: &str) -> String {
    format!("/clh-unit-{}-{name}", std::process::id())
}

/// A bundle with a rootfs directory and `config.json` holding `spec`.
fn bundle(h: &Harness, name: &str, spec: serde_json::Value) -> PathBuf {
    let dir = h.tmp.path().join(name);
    std::fs::create_dir_all(dir.join("rootfs")).unwrap();
    std::fs::write(dir.join("config.json"), spec.to_string()).unwrap();
    dir
}

fn create_request(id: &str, bundle: &Path) -> CreateTaskRequest {
    CreateTaskRequest {
        id: id.into(),
        bundle: bundle.display().to_string(),
        ..Default::default()
    }
}

fn container_spec(cgroups_path: &str) -> serde_json::Value {
    serde_json::json!({
        "ociVersion": "1.0.2",
        "root": {"path": "rootfs"},
        "process": {"args": ["true"], "cwd": "/"},
        "linux": {"cgroupsPath": cgroups_path},
    })
}

/// Polls `done` until it holds or `what` times out.
async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// No state dir entry, VMM, virtiofsd, mount or cgroup is left.
async fn assert_nothing_left(h: &Harness, cgroups_path: &str) {
    let entries: Vec<_> = std::fs::read_dir(&h.state_dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(entries.is_empty(), "left in the state dir: {entries:?}");
    let vmms = h.fakes.vmm_pids.lock().unwrap().clone();
    wait_until("the VMMs to go", || {
        !vmms.iter().any(|&p| fakes::is_running(p))
    })
    .await;
    wait_until("virtiofsd to go", || {
        fakes::processes_mentioning(&h.state_dir).is_empty()
    })
    .await;
    assert_eq!(fakes::mounts_under(&h.state_dir), Vec::<String>::new());
    let relative = cgroups_path.trim_start_matches('/');
    for controller in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        let left = controller.path().join(relative);
        assert!(!left.exists(), "cgroup left: {}", left.display());
    }
}

async fn next_topic(h: &mut Harness) -> &'static str {
    let event = tokio::time::timeout(Duration::from_secs(10), h.events.recv()).await;
    event
        .expect("no event within 10 s")
        .expect("events closed")
        .topic
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_is_created_started_killed_and_deleted_leaving_nothing() {
    let Some(mut h) = harness(Boot::WithAgent, |_| {}) else {
        return;
    };
    let cgroup = cgroups_path("life");
    let dir = bundle(&h, "b", container_spec(&cgroup));
    let created = h.svc.create(create_request("c1", &dir)).await.unwrap();
    assert_eq!(created.pid, GUEST_PID);
    let start = StartRequest {
        id: "c1".into(),
        ..Default::default()
    };
    assert_eq!(h.svc.start(start).await.unwrap().pid, GUEST_PID);
    let kill = KillRequest {
        id: "c1".into(),
        signal: 9,
        ..Default::default()
    };
    h.svc.kill(kill).await.unwrap();
    let topics: Vec<_> = [
        next_topic(&mut h).await,
        next_topic(&mut h).await,
        next_topic(&mut h).await,
    ]
    .into();
    assert_eq!(
        topics,
        [
            topics::TASK_CREATE_EVENT_TOPIC,
            topics::TASK_START_EVENT_TOPIC,
            topics::TASK_EXIT_EVENT_TOPIC
        ]
    );
    let delete = DeleteRequest {
        id: "c1".into(),
        ..Default::default()
    };
    assert_eq!(h.svc.delete(delete).await.unwrap().exit_status, 137);
    assert_eq!(next_topic(&mut h).await, topics::TASK_DELETE_EVENT_TOPIC);
    h.svc.shutdown().await.unwrap();
    tokio::time::timeout(Duration::from_secs(1), h.exit.wait())
        .await
        .expect("Shutdown with nothing left did not end the shim");
    let calls = h.fakes.agent.calls();
    for call in [
        "Version",
        "SeedRandom",
        "SetIdentity",
        "CreateContainer",
        "StartProcess",
        "SignalProcess",
        "RemoveContainer",
    ] {
        assert!(calls.contains(&call), "{call} not called: {calls:?}");
    }
    assert_nothing_left(&h, &cgroup).await;
}

/// containerd gives up on a Create (it shuts down mid-call: Delete, then
/// it forgets the task): the Create undoes its work when it ends, rather
/// than leave a container and a VM nobody will delete (REL-CTRD-02).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_deleted_while_in_flight_undoes_itself() {
    let Some(h) = harness(Boot::WithAgent, |_| {}) else {
        return;
    };
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    *h.fakes.agent.hold_create.lock().unwrap() = Some(gate.clone());
    let cgroup = cgroups_path("abandoned");
    let dir = bundle(&h, "b", container_spec(&cgroup));
    let h = Arc::new(h);
    let creator = h.clone();
    let create = tokio::spawn(async move { creator.svc.create(create_request("c1", &dir)).await });
    wait_until("CreateContainer to reach the agent", || {
        h.fakes.agent.calls().contains(&"CreateContainer")
    })
    .await;
    let delete = DeleteRequest {
        id: "c1".into(),
        ..Default::default()
    };
    let err = h.svc.delete(delete).await.unwrap_err();
    assert_eq!(err.code(), Code::NOT_FOUND, "{err}");
    gate.add_permits(1);
    let err = create.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::FAILED_PRECONDITION, "{err}");
    assert!(
        err.to_string()
            .contains("deleted while it was being created"),
        "{err}"
    );
    assert!(h.fakes.agent.calls().contains(&"RemoveContainer"));
    assert_nothing_left(&h, &cgroup).await;
    // The id is free again.
    let state = containerd_shim_protos::api::StateRequest {
        id: "c1".into(),
        ..Default::default()
    };
    assert_eq!(
        h.svc.state(state).await.unwrap_err().code(),
        Code::NOT_FOUND
    );
}

fn spawn_failure() -> clh_hypervisor::Error {
    clh_hypervisor::Error::Spawn {
        binary: "/nonexistent/cloud-hypervisor".into(),
        source: std::io::ErrorKind::NotFound.into(),
    }
}

fn timeout_failure() -> clh_hypervisor::Error {
    clh_hypervisor::Error::Timeout {
        what: "the VMM's API socket".into(),
        timeout: Duration::from_secs(10),
    }
}

fn spec_failure() -> clh_hypervisor::Error {
    clh_hypervisor::Error::InvalidSpec("memory below the minimum".into())
}

/// One failure point: how the VM boots, what else is broken, the code
/// containerd must get and a piece of the message.
struct FailurePoint {
    name: &'static str,
    boot: Boot,
    adjust: fn(&mut VmOptions),
    cgroups_path: Option<&'static str>,
    refuse_create: bool,
    code: Code,
    says: &'static str,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_failure_of_a_pod_start_has_its_code_and_leaves_nothing() {
    let same = |_: &mut VmOptions| {};
    let points = [
        FailurePoint {
            name: "VMM binary missing",
            boot: Boot::Fails(spawn_failure),
            adjust: same,
            cgroups_path: None,
            refuse_create: false,
            code: Code::FAILED_PRECONDITION,
            says: "is it installed",
        },
        FailurePoint {
            name: "VMM too slow",
            boot: Boot::Fails(timeout_failure),
            adjust: same,
            cgroups_path: None,
            refuse_create: false,
            code: Code::DEADLINE_EXCEEDED,
            says: "timed out",
        },
        FailurePoint {
            name: "VM spec refused",
            boot: Boot::Fails(spec_failure),
            adjust: same,
            cgroups_path: None,
            refuse_create: false,
            code: Code::INVALID_ARGUMENT,
            says: "memory below the minimum",
        },
        FailurePoint {
            name: "agent unreachable",
            boot: Boot::Silent,
            adjust: same,
            cgroups_path: None,
            refuse_create: false,
            code: Code::DEADLINE_EXCEEDED,
            says: "did not answer",
        },
        FailurePoint {
            name: "VMM exits at boot",
            boot: Boot::VmmExits,
            adjust: same,
            cgroups_path: None,
            refuse_create: false,
            code: Code::UNAVAILABLE,
            says: "exited before the agent answered",
        },
        FailurePoint {
            name: "virtiofsd missing",
            boot: Boot::WithAgent,
            adjust: |vm| vm.binaries.virtiofsd = "/nonexistent/virtiofsd".into(),
            cgroups_path: None,
            refuse_create: false,
            code: Code::FAILED_PRECONDITION,
            says: "virtiofsd did not start",
        },
        FailurePoint {
            name: "kernel missing",
            boot: Boot::WithAgent,
            adjust: |vm| vm.kernel = "/nonexistent/vmlinux".into(),
            cgroups_path: None,
            refuse_create: false,
            code: Code::FAILED_PRECONDITION,
            says: "make guest-image",
        },
        FailurePoint {
            name: "cgroup path invalid",
            boot: Boot::WithAgent,
            adjust: same,
            cgroups_path: Some("relative/path"),
            refuse_create: false,
            code: Code::INVALID_ARGUMENT,
            says: "must be absolute",
        },
        FailurePoint {
            name: "CreateContainer refused",
            boot: Boot::WithAgent,
            adjust: same,
            cgroups_path: None,
            refuse_create: true,
            code: Code::INVALID_ARGUMENT,
            says: "agent CreateContainer: no such user",
        },
    ];
    for point in points {
        let Some(mut h) = harness(point.boot, point.adjust) else {
            return;
        };
        if point.refuse_create {
            *h.fakes.agent.refuse_create.lock().unwrap() = Some("no such user".into());
        }
        let cgroup = match point.cgroups_path {
            Some(path) => path.to_string(),
            None => cgroups_path("fail"),
        };
        let dir = bundle(&h, "b", container_spec(&cgroup));
        let err = h.svc.create(create_request("c1", &dir)).await.unwrap_err();
        let (code, message) = match ttrpc::Error::from(err) {
            ttrpc::Error::RpcStatus(s) => (s.code(), s.message().to_string()),
            other => panic!("{}: not a status: {other:?}", point.name),
        };
        assert_eq!(code, point.code, "{}: {message}", point.name);
        assert!(message.contains(point.says), "{}: {message}", point.name);
        let quiet = tokio::time::timeout(Duration::from_millis(50), h.events.recv()).await;
        assert!(quiet.is_err(), "{}: an event was published", point.name);
        assert_nothing_left(&h, &cgroup).await;
    }
}

/// A pod (its sandbox container "pod" created) and the bundle of a
/// container "app" of it; returns the pod's cgroup and the app's bundle.
async fn pod_and_app_bundle(h: &Harness) -> (String, PathBuf) {
    let cgroup = cgroups_path("pod");
    let mut pause = container_spec(&cgroup);
    pause["annotations"] = serde_json::json!({"io.kubernetes.cri.container-type": "sandbox"});
    // A network namespace of its own: without one the pod would share the
    // host's, which is refused.
    pause["linux"]["namespaces"] = serde_json::json!([{"type": "network"}]);
    let pod = bundle(h, "pod", pause);
    h.svc.create(create_request("pod", &pod)).await.unwrap();
    let mut spec = container_spec("");
    spec["annotations"] = serde_json::json!({
        "io.kubernetes.cri.container-type": "container",
        "io.kubernetes.cri.sandbox-id": "pod",
    });
    (cgroup, bundle(h, "app", spec))
}

/// After "app" failed to create: the pod's VM runs on and the app's
/// directory in it is gone; then the pod is removed, leaving nothing.
async fn app_failed_alone(h: &Harness, cgroup: &str) {
    let vmm = h.fakes.vmm_pids.lock().unwrap()[0];
    assert!(
        fakes::is_running(vmm),
        "the pod's VM went with its container"
    );
    let app_dir = crate::shared_mount::private_dir(&h.state_dir.join("pod")).join("app");
    assert!(!app_dir.exists(), "{} is left", app_dir.display());
    assert_eq!(fakes::mounts_under(&app_dir), Vec::<String>::new());
    let kill = KillRequest {
        id: "pod".into(),
        signal: 9,
        ..Default::default()
    };
    h.svc.kill(kill).await.unwrap();
    let delete = DeleteRequest {
        id: "pod".into(),
        ..Default::default()
    };
    h.svc.delete(delete).await.unwrap();
    assert_nothing_left(h, cgroup).await;
}

/// A pod container the agent refuses fails alone: the pod's VM runs on,
/// and the container's directory in it is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_pod_container_leaves_its_pod_running() {
    let Some(h) = harness(Boot::WithAgent, |_| {}) else {
        return;
    };
    let (cgroup, app) = pod_and_app_bundle(&h).await;
    *h.fakes.agent.refuse_create.lock().unwrap() = Some("no such user".into());
    let err = h.svc.create(create_request("app", &app)).await.unwrap_err();
    assert_eq!(err.code(), Code::INVALID_ARGUMENT, "{err}");
    assert!(!h.fakes.agent.calls().contains(&"RemoveContainer"));
    app_failed_alone(&h, &cgroup).await;
}

/// A CreateContainer the agent does not answer within agent_call_ms is
/// DeadlineExceeded, naming the setting; the shim removes the container
/// in the guest (the agent may have built it after all), and the pod runs
/// on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_container_past_its_deadline_is_removed_in_the_guest() {
    let Some(h) = harness(Boot::WithAgent, |vm| {
        vm.agent_call_timeout = Duration::from_millis(500);
    }) else {
        return;
    };
    let (cgroup, app) = pod_and_app_bundle(&h).await;
    let never = Arc::new(tokio::sync::Semaphore::new(0));
    *h.fakes.agent.hold_create.lock().unwrap() = Some(never);
    let err = h.svc.create(create_request("app", &app)).await.unwrap_err();
    assert_eq!(err.code(), Code::DEADLINE_EXCEEDED, "{err}");
    let msg = err.to_string();
    for what in ["CreateContainer within 500ms", "agent_call_ms"] {
        assert!(msg.contains(what), "{what:?} not in {msg}");
    }
    assert!(h.fakes.agent.calls().contains(&"RemoveContainer"));
    app_failed_alone(&h, &cgroup).await;
}

/// `hostNetwork: true` (no network namespace in the sandbox's spec) is
/// refused before anything starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_network_pod_is_refused_before_anything_starts() {
    let Some(mut h) = harness(Boot::WithAgent, |_| {}) else {
        return;
    };
    let cgroup = cgroups_path("hostnet");
    let mut pause = container_spec(&cgroup);
    pause["annotations"] = serde_json::json!({"io.kubernetes.cri.container-type": "sandbox"});
    let pod = bundle(&h, "pod", pause);
    let err = h.svc.create(create_request("pod", &pod)).await.unwrap_err();
    assert_eq!(err.code(), Code::INVALID_ARGUMENT, "{err}");
    assert!(err.to_string().contains("hostNetwork"), "{err}");
    assert!(
        h.fakes.vmm_pids.lock().unwrap().is_empty(),
        "a VMM was started"
    );
    let quiet = tokio::time::timeout(Duration::from_millis(50), h.events.recv()).await;
    assert!(quiet.is_err(), "an event was published");
    assert_nothing_left(&h, &cgroup).await;
}

/// REL-AGENT-01 and REL-PANIC-01 without a guest: an agent that stops
/// answering health checks, or answers from another boot (a guest that
/// rebooted, as Cloud Hypervisor does after a panic), fails its pod within
/// the interval plus the deadline; the container exits (VM_DIED_STATUS)
/// and its removal leaves nothing.
async fn a_broken_guest_fails_its_pod(name: &str, break_it: impl FnOnce(&fakes::FakeAgent)) {
    let health = crate::vm::HealthCheck {
        interval: Duration::from_millis(100),
        deadline: Duration::from_millis(400),
    };
    let Some(mut h) = harness(Boot::WithAgent, |vm| vm.health = health) else {
        return;
    };
    let cgroup = cgroups_path(name);
    let dir = bundle(&h, "b", container_spec(&cgroup));
    h.svc.create(create_request("c1", &dir)).await.unwrap();
    let start = StartRequest {
        id: "c1".into(),
        ..Default::default()
    };
    h.svc.start(start).await.unwrap();
    assert_eq!(next_topic(&mut h).await, topics::TASK_CREATE_EVENT_TOPIC);
    assert_eq!(next_topic(&mut h).await, topics::TASK_START_EVENT_TOPIC);
    break_it(&h.fakes.agent);
    let broken_at = Instant::now();
    assert_eq!(next_topic(&mut h).await, topics::TASK_EXIT_EVENT_TOPIC);
    let detected = broken_at.elapsed();
    // Detection is bounded by interval + deadline; with the VM gone the
    // container's exit waits for no more output from it (a drain has no
    // quiet wait then), so only a little scheduling slack is added.
    assert!(
        detected < health.interval + health.deadline + Duration::from_secs(2),
        "{name}: noticed after {detected:?}"
    );
    let delete = DeleteRequest {
        id: "c1".into(),
        ..Default::default()
    };
    let status = h.svc.delete(delete).await.unwrap().exit_status;
    assert_eq!(status, super::container::VM_DIED_STATUS);
    h.svc.shutdown().await.unwrap();
    assert_nothing_left(&h, &cgroup).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_agent_fails_its_pod_within_the_health_deadline() {
    a_broken_guest_fails_its_pod("hung", |agent| {
        agent.hung.store(true, std::sync::atomic::Ordering::SeqCst)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebooted_guest_fails_its_pod_at_the_next_health_check() {
    a_broken_guest_fails_its_pod("rebooted", |agent| {
        agent
            .rebooted
            .store(true, std::sync::atomic::Ordering::SeqCst)
    })
    .await;
}
