//! Terminals through ctr on a private containerd 2.x: `ctr run -t` and
//! `ctr task exec -t`, each under a real pseudo-terminal sized 40×100. The
//! guest's `stty size` can only see that size if ResizePty carried it into
//! the guest's pty. Every test ends with the leak checks.

use std::io::Read;
use std::path::Path;
use std::process::ExitStatus;
use std::sync::mpsc;
use std::time::Instant;

use anyhow::{ensure, Result};
use clh_tests::containerd::{ContainerdVersion, PrivateContainerd};
use clh_tests::ctr::{
    ctr_command, finish, kill_and_remove, run_sleeper, setup, wait_status, wait_within, Setup,
    BUSYBOX, RUNTIME, VM_DEADLINE,
};

fn start(s: &Setup) -> Result<PrivateContainerd> {
    clh_tests::ctr::start(
        ContainerdVersion::V2,
        s,
        Path::new(env!("CARGO_TARGET_TMPDIR")),
    )
}

/// Runs `ctr args` with a fresh 40×100 pseudo-terminal as its stdio until
/// it exits; returns its status and everything it wrote to the terminal.
fn ctr_under_pty(
    ctd: &PrivateContainerd,
    args: &[&str],
    expect: &str,
) -> Result<(ExitStatus, String)> {
    let size = nix::pty::Winsize {
        ws_row: 40,
        ws_col: 100,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // openpty applies the size with TIOCSWINSZ on the new terminal.
    let pty = nix::pty::openpty(Some(&size), None)?;
    let slave = std::fs::File::from(pty.slave);
    let mut child = ctr_command(ctd, args)
        .stdin(slave.try_clone()?)
        .stdout(slave.try_clone()?)
        .stderr(slave)
        .spawn()?;
    // The master reads EIO once every slave fd is closed (ours went to spawn).
    let mut master = std::fs::File::from(pty.master);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        while let Ok(n) = master.read(&mut chunk) {
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            let _ = tx.send(buf.clone());
        }
    });
    let deadline = Instant::now() + VM_DEADLINE;
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains(expect) {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(buf) => seen = buf,
            Err(_) => break,
        }
    }
    let status = wait_within(&mut child, VM_DEADLINE)?;
    Ok((status, String::from_utf8_lossy(&seen).to_string()))
}

/// `ctr run -t`: the container's terminal has the caller's size.
#[test]
fn tty_size_reaches_the_guest() -> Result<()> {
    let s = setup()?;
    let ctd = start(&s)?;
    let args = [
        "run",
        "-t",
        "--runtime",
        RUNTIME,
        "--rm",
        BUSYBOX,
        "tty1",
        "sh",
        "-c",
        "stty size",
    ];
    let (status, text) = ctr_under_pty(&ctd, &args, "40 100")?;
    ensure!(text.contains("40 100"), "stty size printed {text:?}");
    ensure!(status.success(), "ctr run -t: {status}, output {text:?}");
    finish(ctd, &s)
}

/// `ctr task exec -t` into a running container: the exec's own terminal
/// has the caller's size, and its exit code comes back through ctr.
#[test]
fn exec_with_a_tty_sees_its_size_and_exit_code() -> Result<()> {
    let s = setup()?;
    let ctd = start(&s)?;
    run_sleeper(&ctd, "tty2")?;
    wait_status(&ctd, "tty2", "RUNNING", VM_DEADLINE)?;

    let exec = [
        "task",
        "exec",
        "-t",
        "--exec-id",
        "e1",
        "tty2",
        "sh",
        "-c",
        "stty size; exit 3",
    ];
    let (status, text) = ctr_under_pty(&ctd, &exec, "40 100")?;
    ensure!(text.contains("40 100"), "stty size printed {text:?}");
    ensure!(
        status.code() == Some(3),
        "ctr task exec -t: {status}, output {text:?}"
    );

    kill_and_remove(&ctd, "tty2")?;
    finish(ctd, &s)
}
