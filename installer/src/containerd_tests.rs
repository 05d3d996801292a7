use super::*;

fn handler() -> Handler {
    Handler {
        name: "clh".into(),
        runtime_path: "/opt/clh-shim/current/bin/containerd-shim-clh-v2".into(),
    }
}

const MAIN: &str = "/etc/containerd/config.toml";
const DROP_IN: &str = "/etc/containerd/conf.d/clh.toml";

fn plan_for(main: Option<&str>, major: Major) -> Result<Plan> {
    plan(
        main.map(str::as_bytes),
        Path::new(MAIN),
        Path::new(DROP_IN),
        major,
        &handler(),
    )
}

fn text(bytes: &Option<Vec<u8>>) -> String {
    String::from_utf8(bytes.clone().unwrap_or_default()).unwrap()
}

#[test]
fn the_version_is_read_from_each_containerds_own_words() {
    let cases = [
        (
            "containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3",
            Major::One,
        ),
        (
            "containerd github.com/containerd/containerd 1.7.24~ds1 1.7.24~ds1-6+deb13u1",
            Major::One,
        ),
        (
            "containerd github.com/containerd/containerd/v2 2.1.9+unknown ",
            Major::Two,
        ),
        (
            "containerd github.com/containerd/containerd/v2 v2.3.4 abcdef",
            Major::Two,
        ),
    ];
    for (out, major) in cases {
        assert_eq!(parse_version_output(out), Some(major), "{out}");
    }
    assert_eq!(parse_version_output("bash: containerd: not found"), None);
}

#[test]
fn globs_match_as_containerd_imports_do() {
    let m = |p: &str, n: &str| glob_match(Path::new(p), Path::new(n));
    assert!(m("/etc/containerd/conf.d/*.toml", DROP_IN));
    assert!(m(DROP_IN, DROP_IN));
    assert!(m("/etc/containerd/conf.d/c?h.toml", DROP_IN));
    assert!(!m("/etc/containerd/conf.d/*.conf", DROP_IN));
    assert!(!m("/etc/containerd/*.toml", DROP_IN));
}

#[test]
fn on_2x_a_drop_in_is_imported_and_the_rest_of_the_file_kept() {
    let main = "# the node's own\nversion = 3\nroot = \"/var/lib/containerd\"\n\n[plugins.'io.containerd.cri.v1.images']\n  snapshotter = \"overlayfs\" # keep me\n";
    let p = plan_for(Some(main), Major::Two).unwrap();
    assert_eq!(p.style, Style::DropIn);
    assert!(p.added_import);
    let new = text(&p.main);
    assert!(new.starts_with("# the node's own\nversion = 3\nroot = \"/var/lib/containerd\"\nimports = [\"/etc/containerd/conf.d/clh.toml\"]\n"), "{new}");
    assert!(
        new.contains("snapshotter = \"overlayfs\" # keep me"),
        "{new}"
    );
    let drop_in = text(&p.drop_in);
    assert!(drop_in.contains("version = 3\n"), "{drop_in}");
    assert!(
        drop_in.contains("[plugins.\"io.containerd.cri.v1.runtime\".containerd.runtimes.clh]"),
        "{drop_in}"
    );
    assert!(
        !drop_in.contains("runc"),
        "2.x merges deeply: runc stays as the node has it\n{drop_in}"
    );
    // Run again on the result: nothing more to do.
    let again = plan_for(Some(&new), Major::Two).unwrap();
    assert_eq!(again.main, None);
    assert_eq!(again.drop_in, p.drop_in);
}

#[test]
fn an_existing_glob_import_leaves_the_main_file_untouched() {
    let main = "version = 3\nimports = [\"/etc/containerd/conf.d/*.toml\"]\n";
    let p = plan_for(Some(main), Major::Two).unwrap();
    assert_eq!(p.main, None);
    assert!(!p.added_import);
    // Relative imports are relative to the main file's directory.
    let main = "version = 2\nimports = [\"conf.d/*.toml\"]\n";
    let p = plan_for(Some(main), Major::Two).unwrap();
    assert_eq!(p.main, None);
    assert!(
        text(&p.drop_in).contains("version = 2\n"),
        "the drop-in takes the main file's version"
    );
    assert!(text(&p.drop_in).contains("io.containerd.grpc.v1.cri"));
}

#[test]
fn on_1x_a_file_with_cri_settings_gets_the_handler_in_place() {
    let main = "version = 2\n\n[plugins]\n  [plugins.\"io.containerd.grpc.v1.cri\"]\n    # CNI as Debian ships it\n    [plugins.\"io.containerd.grpc.v1.cri\".cni]\n      bin_dir = \"/usr/lib/cni\"\n";
    let p = plan_for(Some(main), Major::One).unwrap();
    assert_eq!(p.style, Style::InPlace);
    assert_eq!(p.drop_in, None);
    assert_eq!(p.added_runtimes, vec!["runc".to_owned(), "clh".to_owned()]);
    let new = text(&p.main);
    assert!(
        new.starts_with(main),
        "the file's own text comes first, unchanged:\n{new}"
    );
    let doc: DocumentMut = new.parse().unwrap();
    let runtimes = &doc["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"];
    assert_eq!(runtimes["clh"]["runtime_type"].as_str(), Some(RUNTIME_TYPE));
    assert_eq!(
        runtimes["runc"]["runtime_type"].as_str(),
        Some("io.containerd.runc.v2")
    );
    assert_eq!(
        plan_for(Some(&new), Major::One).unwrap().main,
        None,
        "idempotent"
    );
    // And out again.
    let back = remove_ours(
        new.as_bytes(),
        Path::new(MAIN),
        Path::new(DROP_IN),
        &p.added_runtimes,
    )
    .unwrap();
    let doc: DocumentMut = String::from_utf8(back).unwrap().parse().unwrap();
    let cri = &doc["plugins"]["io.containerd.grpc.v1.cri"];
    assert!(cri.get("containerd").is_none(), "{doc}");
    assert_eq!(
        doc["plugins"]["io.containerd.grpc.v1.cri"]["cni"]["bin_dir"].as_str(),
        Some("/usr/lib/cni")
    );
}

#[test]
fn on_1x_existing_runtimes_are_kept_and_no_runc_added() {
    let main = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]\n  runtime_type = \"io.containerd.runc.v2\"\n  [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc.options]\n    SystemdCgroup = true\n";
    let p = plan_for(Some(main), Major::One).unwrap();
    assert_eq!(p.added_runtimes, vec!["clh".to_owned()]);
    assert!(text(&p.main).contains("SystemdCgroup = true"));
}

#[test]
fn on_1x_without_cri_settings_a_drop_in_lists_runc_too() {
    let p = plan_for(
        Some("version = 2\n[grpc]\n  address = \"/run/c.sock\"\n"),
        Major::One,
    )
    .unwrap();
    assert_eq!(p.style, Style::DropIn);
    let drop_in = text(&p.drop_in);
    assert!(drop_in.contains("runtimes.runc]"), "{drop_in}");
    assert!(drop_in.contains("runtimes.clh]"), "{drop_in}");
}

#[test]
fn a_missing_main_file_is_created_with_the_import_only() {
    let p = plan_for(None, Major::Two).unwrap();
    assert_eq!(
        text(&p.main),
        "version = 3\nimports = [\"/etc/containerd/conf.d/clh.toml\"]\n"
    );
    let p = plan_for(None, Major::One).unwrap();
    assert_eq!(
        text(&p.main),
        "version = 2\nimports = [\"/etc/containerd/conf.d/clh.toml\"]\n"
    );
}

#[test]
fn shapes_it_cannot_edit_are_refused_saying_what_to_do() {
    let err = plan_for(Some("root = \"/var/lib/containerd\"\n"), Major::One).unwrap_err();
    assert!(
        err.to_string().contains("containerd config migrate"),
        "{err}"
    );
    let err = plan_for(Some("version = 3\n"), Major::One).unwrap_err();
    assert!(err.to_string().contains("containerd 2.x"), "{err}");
    let err = plan_for(Some("version = [\n"), Major::Two).unwrap_err();
    assert!(err.to_string().contains("not valid TOML"), "{err}");
}

#[test]
fn taking_out_an_import_keeps_the_others() {
    let main = "version = 3\nimports = [\"/etc/containerd/site.toml\", \"/etc/containerd/conf.d/clh.toml\"]\n";
    let back = remove_ours(main.as_bytes(), Path::new(MAIN), Path::new(DROP_IN), &[]).unwrap();
    assert_eq!(
        String::from_utf8(back).unwrap(),
        "version = 3\nimports = [\"/etc/containerd/site.toml\"]\n"
    );
}
