use super::*;

const ID: &str = "t1";
const NS: &str = "default";

fn flags() -> Flags {
    Flags {
        id: ID.into(),
        namespace: NS.into(),
        address: "/run/containerd/containerd.sock".into(),
        publish_binary: "/usr/bin/containerd".into(),
        action: "start".into(),
        ..Default::default()
    }
}

fn env() -> LegacyEnv {
    LegacyEnv {
        ttrpc_address: "/run/containerd/containerd.sock.ttrpc".into(),
        grpc_address: "/run/containerd/containerd.sock".into(),
    }
}

fn any(type_url: &str, value: &[u8]) -> Any {
    Any {
        type_url: type_url.into(),
        value: value.to_vec(),
        ..Default::default()
    }
}

fn params(extensions: Vec<Any>) -> BootstrapParams {
    BootstrapParams {
        instance_id: ID.into(),
        namespace: NS.into(),
        containerd_version: "2.3.4".into(),
        containerd_ttrpc_address: "/run/containerd/containerd.sock.ttrpc".into(),
        containerd_grpc_address: "/run/containerd/containerd.sock".into(),
        containerd_binary: "/usr/bin/containerd".into(),
        socket_dir: Some("/run/containerd/s".into()),
        extensions: extensions
            .into_iter()
            .map(|a| Extension {
                value: Some(a).into(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

#[test]
fn empty_stdin_is_the_legacy_protocol_with_flags_and_environment() {
    let s = parse_start(&[], &flags(), &env()).unwrap();
    assert_eq!(s.protocol, Protocol::Legacy);
    assert_eq!(s.opts.id, ID);
    assert_eq!(s.opts.namespace, NS);
    assert_eq!(s.opts.address, "/run/containerd/containerd.sock");
    assert_eq!(
        s.opts.ttrpc_address,
        "/run/containerd/containerd.sock.ttrpc"
    );
    assert!(s.opts.socket_dir.is_none());
    assert!(!s.opts.debug);
    assert!(s.runtime_options.is_empty());
}

#[test]
fn bootstrap_params_are_used_as_sent() {
    let mut p = params(vec![]);
    p.log_level = EnumOrUnknown::new(LogLevel::LOG_LEVEL_DEBUG);
    p.containerd_ttrpc_address = "/x/ttrpc".into();
    let s = parse_start(&p.write_to_bytes().unwrap(), &flags(), &env()).unwrap();
    assert_eq!(s.protocol, Protocol::Bootstrap);
    assert_eq!(s.opts.socket_dir.as_deref(), Some("/run/containerd/s"));
    assert_eq!(
        s.opts.ttrpc_address, "/x/ttrpc",
        "the params win over the environment"
    );
    assert_eq!(s.opts.containerd_version, "2.3.4");
    assert!(s.opts.debug);
    // The socket goes in the directory containerd named.
    assert!(s
        .opts
        .socket_address(ID)
        .starts_with("unix:///run/containerd/s/"));
}

#[test]
fn runtime_options_are_an_extension_in_bootstrap_params_and_are_checked() {
    let empty = any("runtimeoptions.v1.Options", b"");
    let p = params(vec![empty.clone()]);
    let s = parse_start(&p.write_to_bytes().unwrap(), &flags(), &env()).unwrap();
    assert_eq!(s.runtime_options, vec![empty]);
    // A config path (field 2) is refused with what to do instead.
    let path = any("runtimeoptions.v1.Options", b"\x12\x05/a/b/");
    let p = params(vec![path]);
    let err = parse_start(&p.write_to_bytes().unwrap(), &flags(), &env()).unwrap_err();
    assert!(err.to_string().contains("CLH_SHIM_CONFIG"), "{err}");
    // An extension of another kind is not runtime options.
    let p = params(vec![any(
        "containerd.io/cri.v1.PodSandboxConfig",
        b"\x0a\x00",
    )]);
    let s = parse_start(&p.write_to_bytes().unwrap(), &flags(), &env()).unwrap();
    assert!(s.runtime_options.is_empty());
}

#[test]
fn legacy_runtime_options_are_never_taken_for_bootstrap_params() {
    // Runc's default options encode to nothing: an Any with a type URL
    // only, which decodes as BootstrapParams{instance_id: <url>}.
    for a in [
        any("containerd.runc.v1.Options", b""),
        any("runtimeoptions.v1.Options", b""),
        any("runtimeoptions.v1.Options", b"\x0a\x03abc"),
    ] {
        let s = parse_start(&a.write_to_bytes().unwrap(), &flags(), &env()).unwrap();
        assert_eq!(s.protocol, Protocol::Legacy);
        assert_eq!(s.opts.id, ID);
        assert_eq!(s.runtime_options, vec![a]);
    }
    let unknown = any("example.com/Other", b"");
    let err = parse_start(&unknown.write_to_bytes().unwrap(), &flags(), &env()).unwrap_err();
    assert!(
        err.to_string().contains("unsupported runtime options"),
        "{err}"
    );
}

#[test]
fn params_for_another_shim_or_garbage_are_refused() {
    let mut p = params(vec![]);
    p.instance_id = "other".into();
    let err = parse_start(&p.write_to_bytes().unwrap(), &flags(), &env()).unwrap_err();
    assert!(err.to_string().contains("default/other"), "{err}");
    let err = parse_start(&[0xff, 0xff, 0xff], &flags(), &env()).unwrap_err();
    assert!(err.to_string().contains("neither"), "{err}");
}

#[test]
fn no_ttrpc_address_is_refused() {
    let err = parse_start(&[], &flags(), &LegacyEnv::default()).unwrap_err();
    assert!(err.to_string().contains("TTRPC_ADDRESS"), "{err}");
    // containerd 2.3 without it in the params: the environment's.
    let mut p = params(vec![]);
    p.containerd_ttrpc_address.clear();
    let s = parse_start(&p.write_to_bytes().unwrap(), &flags(), &env()).unwrap();
    assert_eq!(
        s.opts.ttrpc_address,
        "/run/containerd/containerd.sock.ttrpc"
    );
}

#[test]
fn debug_flag_raises_the_level_in_both_protocols() {
    let mut f = flags();
    f.debug = true;
    assert!(parse_start(&[], &f, &env()).unwrap().opts.debug);
    let p = params(vec![]);
    assert!(
        parse_start(&p.write_to_bytes().unwrap(), &f, &env())
            .unwrap()
            .opts
            .debug
    );
}

#[test]
fn replies() {
    let addr = "unix:///run/containerd/s/0123";
    assert_eq!(
        start_reply(Protocol::Legacy, addr).unwrap(),
        addr.as_bytes()
    );
    let r = BootstrapResult::parse_from_bytes(&start_reply(Protocol::Bootstrap, addr).unwrap())
        .unwrap();
    assert_eq!(
        (r.version, r.address.as_str(), r.protocol.as_str()),
        (3, addr, "ttrpc")
    );
}

#[test]
fn runtime_info_names_us_echoes_options_and_refuses_idmap() {
    let info = runtime_info("io.containerd.clh.v2", &[]).unwrap();
    assert_eq!(info.name, "io.containerd.clh.v2");
    assert_eq!(info.version.version, env!("CARGO_PKG_VERSION"));
    assert!(info.options.is_none());
    assert_eq!(info.features.type_url, FEATURES_TYPE_URL);
    let f: serde_json::Value = serde_json::from_slice(&info.features.value).unwrap();
    assert_eq!(f["linux"]["mountExtensions"]["idmap"]["enabled"], false);
    assert!(f["ociVersionMin"].is_string() && f["ociVersionMax"].is_string());

    let opts = any("runtimeoptions.v1.Options", b"");
    let info = runtime_info("io.containerd.clh.v2", &opts.write_to_bytes().unwrap()).unwrap();
    assert_eq!(info.options.as_ref(), Some(&opts));
    let err = runtime_info("io.containerd.clh.v2", &[0xff, 0xff]).unwrap_err();
    assert!(format!("{err:#}").contains("-info"), "{err:#}");
}
