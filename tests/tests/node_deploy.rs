//! The node installer as Kubernetes runs it: its image (`make
//! node-image`) run through containerd as clh-deploy.yaml and
//! clh-cleanup.yaml run it, and the manifests of packaging/kubernetes
//! checked against the installer and the Makefile.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use clh_tests::containerd::ContainerdVersion;
use clh_tests::ctr;
use clh_tests::node::{listing, payload, static_installer, terminate, wait_for_log, SHIM};

/// The installer image (`make node-image`), run as clh-deploy.yaml runs
/// it: privileged, the host's / (a scratch root here) at /host, the host's
/// network, a service account for a (fake, TLS) API server. containerd's
/// version is asked inside the host root. Its `daemonset` command installs,
/// labels the node and waits; SIGTERM (a rollout) ends it and leaves the
/// install in place. `cleanup` from the same image (clh-cleanup.yaml)
/// unlabels the node and restores it byte for byte.
#[test]
fn the_installer_image_installs_into_a_host_root_and_out_again() {
    image_install_uninstall().unwrap();
}

fn image_install_uninstall() -> Result<()> {
    let s = ctr::setup()?;
    let ctd = clh_tests::containerd::PrivateContainerd::start(ContainerdVersion::V2, None)?;
    let work = tempfile::Builder::new()
        .prefix("image-")
        .tempdir_in("/tmp")?;
    let template = fs::read_to_string(&s.config)?;
    let dir = payload(
        &work.path().join("payload"),
        &ctr::shim_dir()?.join(SHIM),
        &s.image,
        &template,
    )?;
    fs::copy(static_installer()?, dir.join("bin/clh-install"))?;
    let tar = work.path().join("installer.tar");
    let name = "localhost/clh-shim-installer:test";
    let status = Command::new("python3")
        .arg(ctr::workspace().join("tests/images/oci_image.py"))
        .args(["installer"])
        .arg(&dir)
        .arg(name)
        .arg(&tar)
        .status()?;
    ensure!(status.success(), "oci_image.py installer: {status}");
    ctd.import_image(&tar, name)?;

    // The host: a 2.x containerd config of its own and a containerd
    // binary (a static busybox sh script printing 2.1's version line).
    let host = work.path().join("host");
    fs::create_dir_all(host.join("etc/containerd"))?;
    fs::create_dir_all(host.join("usr/bin"))?;
    fs::create_dir_all(host.join("bin"))?;
    let original = b"version = 3\n# the node's own\n[plugins.'io.containerd.cri.v1.images'.pinned_images]\n  sandbox = \"registry.k8s.io/pause:3.10\"\n";
    fs::write(host.join("etc/containerd/config.toml"), original)?;
    fs::copy(
        clh_tests::containerd::cache_dir().join("busybox-static/bin/busybox"),
        host.join("bin/sh"),
    )?;
    fs::write(
        host.join("usr/bin/containerd"),
        "#!/bin/sh\necho containerd github.com/containerd/containerd/v2 v2.1.9 deadbeef\n",
    )?;
    let exec = std::os::unix::fs::PermissionsExt::from_mode(0o755);
    fs::set_permissions(host.join("usr/bin/containerd"), exec)?;
    let before = listing(&host);

    let api = clh_tests::kube_api::FakeApiServer::start(&work.path().join("api"))?;
    let entry = "/opt/clh-shim-payload/bin/clh-install";
    let mount = format!(
        "type=bind,src={},dst=/host,options=rbind:rw",
        host.display()
    );
    let sa = format!(
        "type=bind,src={},dst=/var/run/secrets/kubernetes.io/serviceaccount,options=rbind:ro",
        api.service_account_dir.display()
    );
    let mut pod_args: Vec<String> = vec![
        "--privileged".into(),
        "--net-host".into(),
        "--mount".into(),
        mount,
        "--mount".into(),
        sa,
    ];
    for (k, v) in api
        .env()
        .iter()
        .chain([&("NODE_NAME".to_owned(), "node-1".to_owned())])
    {
        pod_args.push("--env".into());
        pod_args.push(format!("{k}={v}"));
    }
    let run =
        |detach_log: Option<&Path>, id: &str, args: &[&str]| -> Result<std::process::Output> {
            let mut a: Vec<String> = vec!["run".into()];
            match detach_log {
                Some(log) => a.extend([
                    "-d".into(),
                    "--log-uri".into(),
                    format!("file://{}", log.display()),
                ]),
                None => a.push("--rm".into()),
            }
            a.extend(pod_args.iter().cloned());
            a.push(name.into());
            a.push(id.into());
            a.extend(args.iter().map(|s| s.to_string()));
            ctd.ctr(&a)
        };
    // The DaemonSet's own command, detached, then a rollout's SIGTERM.
    let log = work.path().join("installer.log");
    let out = run(Some(&log), "installer", &[])?;
    clh_tests::containerd::check(&out, "ctr run -d installer")?;
    wait_for_log(&log, "installed; waiting", Duration::from_secs(60))?;
    terminate(&ctd, "installer")?;
    let said = fs::read_to_string(&log)?;
    ensure!(
        said.contains("the installation stays"),
        "the DaemonSet command on SIGTERM:\n{said}"
    );

    // What it left: host-view paths throughout.
    let drop_in = fs::read_to_string(host.join("etc/containerd/conf.d/clh.toml"))?;
    ensure!(
        drop_in.contains("runtime_path = \"/opt/clh-shim/current/bin/containerd-shim-clh-v2\""),
        "{drop_in}"
    );
    let main = fs::read_to_string(host.join("etc/containerd/config.toml"))?;
    ensure!(
        main.contains("imports = [\"/etc/containerd/conf.d/clh.toml\"]"),
        "{main}"
    );
    let link = fs::read_link(host.join("usr/local/bin").join(SHIM))?;
    ensure!(
        link == Path::new("/opt/clh-shim/current/bin").join(SHIM),
        "{link:?}"
    );
    let version = fs::read_link(host.join("opt/clh-shim/current"))?;
    let config = fs::read_to_string(
        host.join("opt/clh-shim")
            .join(&version)
            .join("etc/clh-shim/config.toml"),
    )?;
    let kernel = format!(
        "kernel = \"/opt/clh-shim/{}/share/clh-shim/vmlinux\"",
        version.display()
    );
    ensure!(
        config.contains(&kernel),
        "the version's config names its own kernel ({kernel}):\n{config}"
    );
    ensure!(
        config.contains("virtiofsd = \"/opt/clh-shim/"),
        "the bundled virtiofsd:\n{config}"
    );

    let requests = api.requests()?;
    ensure!(requests.len() == 1, "one label call: {requests:?}");
    let r = &requests[0];
    ensure!(
        r.method == "PATCH"
            && r.path == "/api/v1/nodes/node-1"
            && r.auth.as_deref() == Some(&format!("Bearer {}", clh_tests::kube_api::TOKEN))
            && r.content_type.as_deref() == Some("application/merge-patch+json")
            && r.body == r#"{"metadata":{"labels":{"clh-shim/runtime":"true"}}}"#,
        "the label call: {r:?}"
    );

    // Out again, from the same image, as clh-cleanup.yaml runs it.
    let log = work.path().join("cleanup.log");
    let out = run(
        Some(&log),
        "cleanup",
        &[entry, "cleanup", "--host-root", "/host"],
    )?;
    clh_tests::containerd::check(&out, "ctr run cleanup")?;
    wait_for_log(&log, "uninstalled; waiting", Duration::from_secs(60))?;
    terminate(&ctd, "cleanup")?;
    let requests = api.requests()?;
    ensure!(
        requests.len() == 2
            && requests[1].body == r#"{"metadata":{"labels":{"clh-shim/runtime":null}}}"#,
        "the unlabel call: {requests:?}"
    );
    ensure!(
        fs::read(host.join("etc/containerd/config.toml"))? == original,
        "the config is not back byte for byte"
    );
    ensure!(
        listing(&host) == before,
        "left on the host: {:?} (before: {before:?})",
        listing(&host)
    );
    Ok(())
}

/// packaging/kubernetes agrees with the installer and the Makefile: the
/// image `make node-image` names, the commands clh-install has, the host
/// mount and PID namespace it needs, an account with the RBAC it uses, and
/// the label RuntimeClass `clh` selects.
#[test]
fn the_kubernetes_manifests_agree_with_the_installer() {
    manifests_agree().unwrap();
}

fn manifests_agree() -> Result<()> {
    let root = ctr::workspace();
    let makefile = fs::read_to_string(root.join("Makefile"))?;
    let image = makefile
        .lines()
        .find_map(|l| l.strip_prefix("NODE_IMAGE_NAME := "))
        .context("no NODE_IMAGE_NAME in the Makefile")?;
    let load = |name: &str| -> Result<Vec<serde_json::Value>> {
        let path = root.join("packaging/kubernetes").join(name);
        let out = Command::new("python3")
            .args(["-c", "import json,sys,yaml; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))"])
            .arg(&path)
            .output()?;
        ensure!(
            out.status.success(),
            "{}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    for (file, command) in [
        ("clh-deploy.yaml", "daemonset"),
        ("clh-cleanup.yaml", "cleanup"),
    ] {
        let docs = load(file)?;
        let kind = |k: &'static str| docs.iter().filter(move |d| d["kind"] == k);
        let ds = kind("DaemonSet").next().context("no DaemonSet")?;
        let pod = &ds["spec"]["template"]["spec"];
        let c = &pod["containers"][0];
        ensure!(
            c["image"] == image,
            "{file}: image {} is not {image}",
            c["image"]
        );
        ensure!(
            c["args"] == serde_json::json!([command, "--host-root", "/host"]),
            "{file}: args {}",
            c["args"]
        );
        ensure!(
            c["securityContext"]["privileged"] == true && pod["hostPID"] == true,
            "{file}: privileged, hostPID"
        );
        ensure!(
            c["volumeMounts"][0]["mountPath"] == "/host"
                && pod["volumes"][0]["hostPath"]["path"] == "/",
            "{file}: the host's / at /host"
        );
        ensure!(
            c["env"][0]["name"] == "NODE_NAME"
                && c["env"][0]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName",
            "{file}: NODE_NAME"
        );
        let account = &pod["serviceAccountName"];
        ensure!(
            kind("ServiceAccount").any(|a| &a["metadata"]["name"] == account),
            "{file}: no ServiceAccount {account}"
        );
        let bound = kind("ClusterRoleBinding")
            .find(|b| &b["subjects"][0]["name"] == account)
            .context("no binding")?;
        let role = kind("ClusterRole")
            .find(|r| r["metadata"]["name"] == bound["roleRef"]["name"])
            .context("no role")?;
        ensure!(
            role["rules"][0]["resources"] == serde_json::json!(["nodes"])
                && role["rules"][0]["verbs"] == serde_json::json!(["get", "patch"]),
            "{file}: the role is nodes get/patch, no more"
        );
    }
    let rc = load("runtimeclass.yaml")?;
    ensure!(
        rc[0]["handler"] == "clh"
            && rc[0]["scheduling"]["nodeSelector"]["clh-shim/runtime"] == "true",
        "RuntimeClass: {}",
        rc[0]
    );
    Ok(())
}
