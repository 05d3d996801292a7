//! Test helpers shared by this crate's tests, the shim's and the VM tests
//! (hidden from the docs: not part of the API).

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::{Nic, VmSpec};

/// The line the stand-in of [`fake_ch`] prints before failing.
pub const FAKE_CH_LINE: &str = "fake-ch: error booting VM: no KVM here";

/// A stand-in `cloud-hypervisor` in `dir` that prints [`FAKE_CH_LINE`] on
/// stderr and exits 1, as CH does when it cannot start. Written by a child
/// shell, so no thread of the test process ever holds it open for writing
/// while another forks (ETXTBSY at exec).
pub fn fake_ch(dir: &Path) -> PathBuf {
    let path = dir.join("cloud-hypervisor");
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(r#"printf '#!/bin/sh\necho "%s" >&2\nexit 1\n' "$2" > "$1" && chmod 755 "$1""#)
        .arg("sh")
        .arg(&path)
        .arg(FAKE_CH_LINE)
        .status();
    assert!(
        status.is_ok_and(|s| s.success()),
        "cannot write {}",
        path.display()
    );
    path
}

impl Nic {
    /// Two NICs as CNI makes them: `tap0_clh` with MTU 1450 and `tap1_clh`
    /// with the default MTU (0), one queue each.
    pub fn two_for_test() -> Vec<Nic> {
        vec![
            Nic {
                tap: "tap0_clh".into(),
                mac: "0a:58:0a:f4:00:07".into(),
                mtu: 1450,
                queues: 1,
            },
            Nic {
                tap: "tap1_clh".into(),
                mac: "0a:58:0a:f4:01:07".into(),
                mtu: 0,
                queues: 1,
            },
        ]
    }
}

impl VmSpec {
    /// A small VM in `dir`: 1 vCPU, 128 MiB, `dir/vmlinux` and `dir/initrd`
    /// (not created), no shared directory, `dir/console.log`, 10 s to
    /// start. Tests change what they need with `..VmSpec::for_test(dir)`.
    pub fn for_test(dir: &Path) -> VmSpec {
        VmSpec {
            id: "t".into(),
            dir: dir.to_path_buf(),
            vcpus: 1,
            memory_mib: 128,
            max: None,
            kernel: dir.join("vmlinux"),
            initramfs: dir.join("initrd"),
            cmdline: String::new(),
            shared_fs: None,
            console_log: dir.join("console.log"),
            console_log_max_bytes: crate::console_log::DEFAULT_MAX_BYTES,
            free_page_reporting: false,
            tcg_tb_size_mib: 0,
            restore_from: None,
            start_timeout: Duration::from_secs(10),
            netns: None,
            nics: Vec::new(),
        }
    }
}
