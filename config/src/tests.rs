use std::path::Path;

use super::*;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new("/etc/clh-shim/config.toml"))
}

#[test]
fn the_documented_example_parses_to_the_defaults() {
    let example = include_str!("../clh-shim.toml");
    assert_eq!(parse(example).unwrap(), Config::default());
}

#[test]
fn an_empty_file_gives_the_defaults() {
    assert_eq!(parse("").unwrap(), Config::default());
}

#[test]
fn the_log_level_takes_containerds_names() {
    for (text, level) in [
        ("error", LogLevel::Error),
        ("warn", LogLevel::Warn),
        ("warning", LogLevel::Warn),
        ("info", LogLevel::Info),
        ("debug", LogLevel::Debug),
        ("trace", LogLevel::Trace),
    ] {
        let c = parse(&format!("[runtime]\nlog_level = \"{text}\"\n")).unwrap();
        assert_eq!(c.runtime.log_level, level, "{text}");
    }
    assert_eq!(Config::default().runtime.log_level, LogLevel::Info);
}

#[test]
fn values_are_read() {
    let c = parse(
        r#"
        [hypervisor]
        backend = "qemu"
        [guest]
        vcpus = 2
        memory_mib = 1024
        overhead_vcpus = 1
        overhead_memory_mib = 192
        max_vcpus = 4
        max_memory_mib = 4096
        kernel_params = ["loglevel=7"]
        [timeouts]
        agent_connect_ms = 1000
        agent_call_ms = 45000
        "#,
    )
    .unwrap();
    assert_eq!(c.hypervisor.backend, BackendChoice::Qemu);
    assert_eq!((c.guest.vcpus, c.guest.memory_mib), (2, 1024));
    let g = &c.guest;
    assert_eq!((g.overhead_vcpus, g.overhead_memory_mib), (1, 192));
    assert_eq!((g.max_vcpus, g.max_memory_mib), (4, 4096));
    assert_eq!(c.guest.kernel_params, vec!["loglevel=7".to_string()]);
    assert_eq!(c.timeouts.agent_connect_ms, 1000);
    assert_eq!(c.timeouts.agent_call_ms, 45000);
}

#[test]
fn unknown_keys_are_rejected_with_their_name() {
    let err = parse("[guest]\nvcpu = 2\n").unwrap_err().to_string();
    assert!(err.contains("unknown field `vcpu`"), "{err}");
    let err = parse("[gust]\n").unwrap_err().to_string();
    assert!(err.contains("unknown field `gust`"), "{err}");
}

#[test]
fn bad_types_and_enum_values_name_the_key() {
    let err = parse("[guest]\nvcpus = \"two\"\n").unwrap_err().to_string();
    assert!(err.contains("vcpus"), "{err}");
    let err = parse("[hypervisor]\nbackend = \"firecracker\"\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("firecracker") && err.contains("backend"),
        "{err}"
    );
}

#[test]
fn out_of_range_values_name_the_key_and_the_rule() {
    for (text, key) in [
        ("[guest]\nvcpus = 0\n", "`guest.vcpus`"),
        ("[guest]\nmemory_mib = 64\n", "`guest.memory_mib`"),
        ("[guest]\nmax_vcpus = 0\n", "`guest.max_vcpus`"),
        ("[guest]\nmax_vcpus = 256\n", "`guest.max_vcpus`"),
        ("[guest]\nmax_memory_mib = 100\n", "`guest.max_memory_mib`"),
        (
            "[guest]\nvcpus = 4\nmax_vcpus = 2\n",
            "`guest.vcpus` must be between 1 and 2 (guest.max_vcpus), not 4",
        ),
        (
            "[guest]\nmemory_mib = 2048\nmax_memory_mib = 1024\n",
            "`guest.memory_mib`",
        ),
        (
            "[guest]\noverhead_vcpus = 2\nmax_vcpus = 2\n",
            "`guest.overhead_vcpus`",
        ),
        (
            "[guest]\noverhead_memory_mib = 64\n",
            "`guest.overhead_memory_mib`",
        ),
        (
            "[guest]\noverhead_memory_mib = 1024\nmax_memory_mib = 1024\nmemory_mib = 512\n",
            "`guest.overhead_memory_mib`",
        ),
        ("[guest]\nkernel = \"vmlinux\"\n", "`guest.kernel`"),
        (
            "[guest]\nkernel_params = [\"a b\"]\n",
            "`guest.kernel_params`",
        ),
        (
            "[guest]\nkernel_params = [\"clh.debug\"]\n",
            "`guest.kernel_params`",
        ),
        ("[hypervisor]\nqemu = \"bin/qemu\"\n", "`hypervisor.qemu`"),
        (
            "[hypervisor]\nqemu_tb_size_mib = 4\n",
            "`hypervisor.qemu_tb_size_mib`",
        ),
        ("[timeouts]\nstop_ms = 0\n", "`timeouts.stop_ms`"),
        ("[runtime]\nstate_dir = \"run\"\n", "`runtime.state_dir`"),
        (
            "[runtime]\ntemplate_dir = \"templates\"\n",
            "`runtime.template_dir`",
        ),
        ("[runtime]\nlog_level = \"verbose\"\n", "log_level"),
        (
            "[runtime]\nstate_dir = \"/a/very/long/state/directory/path\"\n",
            "`runtime.state_dir`",
        ),
    ] {
        let err = parse(text).unwrap_err().to_string();
        assert!(err.contains(key), "{text:?}: {err}");
        assert!(err.contains("/etc/clh-shim/config.toml"), "{err}");
    }
}

#[test]
fn a_missing_file_is_a_clear_error() {
    let err = Config::load(Path::new("/nonexistent/clh.toml")).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/clh.toml"), "{err}");
}

#[test]
fn an_installed_version_reads_the_config_beside_its_bin_dir() {
    let exe = Path::new("/opt/clh-shim/versions/abc/bin/containerd-shim-clh-v2");
    assert_eq!(
        crate::installed_path(exe).as_deref(),
        Some(Path::new(
            "/opt/clh-shim/versions/abc/etc/clh-shim/config.toml"
        ))
    );
    // A binary outside a bin/ directory (cargo's target/release) has none.
    let dev = Path::new("/src/target/release/containerd-shim-clh-v2");
    assert_eq!(crate::installed_path(dev), None);
}
