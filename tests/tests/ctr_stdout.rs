//! A process's last output reaches containerd before its exit is reported,
//! however much of it is still buffered when it exits (issue 14, part 3):
//! a container (`ctr run`) and an exec'd process (`ctr task exec`) each
//! write 50 MiB to stdout and exit at once; ctr must deliver every byte,
//! checked against what was written (tests/src/output.rs).
//!
//! The reader pauses for [`PAUSE`] when all but [`PAUSED_AT`] bytes have
//! arrived, as a busy consumer would: the process then exits with the
//! rest still in the buffers between it and ctr, and its exit must wait
//! for them (a fixed drain deadline shorter than the pause lost that
//! tail). A pause is not a reader that stopped: the shim gives up only
//! after a much longer stall.
//!
//! Run one at a time (`-- --test-threads=1`): each boots a VM.

use std::io::Read;
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clh_tests::containerd::{ContainerdVersion, PrivateContainerd};
use clh_tests::ctr::{
    ctr_command, finish, kill_and_remove, run_sleeper, setup, start, wait_status, BUSYBOX, RUNTIME,
    VM_DEADLINE,
};
use clh_tests::output::{self, Checker};

const BYTES: u64 = 50 * 1024 * 1024;
/// Where the reader pauses: less than the buffers between the process
/// and ctr hold (pipe, agent, vsock, shim, FIFO), more than ctr's own.
const PAUSED_AT: u64 = BYTES - 320 * 1024;
/// Longer than the drain deadline the shim had (2 s), far shorter than
/// the stall after which it gives up on a reader.
const PAUSE: Duration = Duration::from_secs(5);
/// 50 MiB through TCG on a loaded 2-core host, plus a boot.
const DEADLINE: Duration = Duration::from_secs(240);

fn tmpdir() -> &'static Path {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
}

/// Runs `ctr args` reading its stdout through a [`Checker`] (pausing
/// once at [`PAUSED_AT`]) and waits for it, all within [`DEADLINE`].
fn ctr_streaming(ctd: &PrivateContainerd, args: &[&str]) -> Result<Checker> {
    let mut child = ctr_command(ctd, args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning ctr")?;
    let mut stdout = child.stdout.take().context("ctr stdout")?;
    let mut stderr = child.stderr.take().context("ctr stderr")?;
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let (tx, rx) = mpsc::channel();
    let got = Arc::new(AtomicU64::new(0));
    let seen = got.clone();
    std::thread::spawn(move || {
        let mut checker = Checker::default();
        let mut buf = vec![0u8; 1 << 20];
        let mut paused = false;
        let result = loop {
            match stdout.read(&mut buf) {
                Ok(0) => break Ok(checker),
                Ok(n) => {
                    checker.feed(&buf[..n]);
                    seen.store(checker.bytes, Ordering::Relaxed);
                }
                Err(e) => break Err(e),
            }
            if !paused && checker.bytes >= PAUSED_AT {
                paused = true;
                std::thread::sleep(PAUSE);
            }
        };
        let _ = tx.send(result);
    });
    let checker = match rx.recv_timeout(DEADLINE) {
        Ok(r) => r.context("reading ctr's stdout")?,
        Err(_) => {
            kill(&mut child);
            let got = got.load(Ordering::Relaxed);
            bail!("ctr {args:?} did not finish within {DEADLINE:?} ({got} bytes read)");
        }
    };
    let status = clh_tests::ctr::wait_within(&mut child, Duration::from_secs(60))?;
    let errors = errors.join().unwrap_or_default();
    ensure!(status.success(), "ctr {args:?}: {status}: {errors}");
    Ok(checker)
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// `ctr run`: the container's init writes 50 MiB and exits.
#[test]
fn container_output_all_arrives() -> Result<()> {
    let s = setup()?;
    let ctd = start(ContainerdVersion::V2, &s, tmpdir())?;
    let script = output::script(BYTES);
    let args = [
        "run",
        "--runtime",
        RUNTIME,
        "--rm",
        BUSYBOX,
        "big1",
        "sh",
        "-c",
        &script,
    ];
    let started = Instant::now();
    let seen = ctr_streaming(&ctd, &args)?;
    seen.verify(BYTES)?;
    println!("50 MiB through ctr run in {:?}", started.elapsed());
    finish(ctd, &s)
}

/// `ctr task exec`: an exec'd process writes 50 MiB and exits, its
/// container running on.
#[test]
fn exec_output_all_arrives() -> Result<()> {
    let s = setup()?;
    let ctd = start(ContainerdVersion::V2, &s, tmpdir())?;
    run_sleeper(&ctd, "big2")?;
    wait_status(&ctd, "big2", "RUNNING", VM_DEADLINE)?;
    let script = output::script(BYTES);
    let args = [
        "task",
        "exec",
        "--exec-id",
        "e1",
        "big2",
        "sh",
        "-c",
        &script,
    ];
    let seen = ctr_streaming(&ctd, &args)?;
    seen.verify(BYTES)?;
    kill_and_remove(&ctd, "big2")?;
    finish(ctd, &s)
}
