//! `containerd-shim-clh-v2 logs ID`: a pod's guest console, from the host.
//!
//! The shim copies each VM's serial console into
//! `<state_dir>/<sandbox id>/console.log` (rotated to `console.log.1`,
//! both bounded: `shim/hypervisors/src/console_log.rs`). The guest kernel
//! and the agent (PID 1, which logs to the console) write there, so an
//! operator reads what happened in a VM without entering it. `ID` is a
//! pod sandbox's id (or a `ctr run` container's, whose VM is its own), or
//! the id of one of a pod's containers, whose VM is its sandbox's: found
//! by its directory `<state_dir>/<sandbox id>/private/<id>`, which exists
//! while the container does.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clh_config::{Config, Source};

use crate::shared_mount::private_dir;

/// The console log in a VM directory, and its rotated older half.
const CONSOLE_LOG: &str = "console.log";
const CONSOLE_LOG_ROTATED: &str = "console.log.1";

/// How often `--follow` looks for more output.
const FOLLOW_POLL: Duration = Duration::from_millis(200);

const USAGE: &str =
    "usage: containerd-shim-clh-v2 logs [--config PATH] [--agent | --console] [--follow] ID";

/// Which lines to print.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lines {
    /// The whole console: the guest kernel and the agent.
    Console,
    /// The agent's lines only.
    Agent,
}

#[derive(Debug, PartialEq, Eq)]
pub struct Args {
    pub id: String,
    pub config: Option<PathBuf>,
    pub lines: Lines,
    pub follow: bool,
}

/// Parses `logs`' arguments (after `logs`).
pub fn parse(args: &[String]) -> Result<Args, String> {
    let mut id = None;
    let mut config = None;
    let mut lines = None;
    let mut follow = false;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--config" => {
                let path = it.next().ok_or("--config needs a path")?;
                config = Some(PathBuf::from(path));
            }
            "--agent" | "--console" => {
                let want = if arg == "--agent" {
                    Lines::Agent
                } else {
                    Lines::Console
                };
                if lines.is_some_and(|l| l != want) {
                    return Err("--agent and --console exclude each other".into());
                }
                lines = Some(want);
            }
            "--follow" | "-f" => follow = true,
            flag if flag.starts_with('-') => return Err(format!("unknown option {flag}")),
            name => {
                if let Some(first) = &id {
                    return Err(format!("one id, not {first} and {name}"));
                }
                id = Some(name.to_string());
            }
        }
    }
    Ok(Args {
        id: id.ok_or("which pod or container? (its id)")?,
        config,
        lines: lines.unwrap_or(Lines::Console),
        follow,
    })
}

/// The subcommand: prints the log, exits non-zero with the reason when it
/// cannot.
pub fn main(args: &[String]) -> ExitCode {
    let args = match parse(args) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("containerd-shim-clh-v2 logs: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let stdout = io::stdout();
    match run(&args, &mut stdout.lock()) {
        Ok(()) => ExitCode::SUCCESS,
        // `logs ID | head`: the reader has what it wanted.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("containerd-shim-clh-v2 logs: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<io::Error>()
            .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
    })
}

fn run(args: &Args, out: &mut impl Write) -> anyhow::Result<()> {
    let (config, source) = match &args.config {
        Some(path) => (Config::load(path)?, Source::File(path.clone())),
        None => Config::load_default()?,
    };
    let state_dir = &config.runtime.state_dir;
    let vm = find_vm(state_dir, &args.id).map_err(|e| {
        anyhow::anyhow!(
            "{e:#}\n(configuration: {source}; a shim given another one, by CLH_SHIM_CONFIG in containerd's environment, keeps its VMs elsewhere: pass that file with --config)"
        )
    })?;
    if let Some(sandbox) = &vm.sandbox {
        eprintln!(
            "container {} runs in the VM of pod sandbox {sandbox}",
            args.id
        );
    }
    let mut printer = Printer::new(args.lines);
    let current = print_console(&vm.dir, &mut printer, out)?;
    if args.follow {
        follow(&vm.dir, current, &mut printer, out)?;
        eprintln!("the VM of {} stopped", args.id);
    }
    printer.finish(out)?;
    out.flush()?;
    Ok(())
}

/// A VM's directory, and the pod sandbox it was found through when the id
/// was one of the pod's containers.
#[derive(Debug, PartialEq, Eq)]
pub struct FoundVm {
    pub dir: PathBuf,
    pub sandbox: Option<String>,
}

/// The VM that runs `id` under `state_dir`: `<state_dir>/<id>` for a pod
/// sandbox or a container with a VM of its own, else the VM whose
/// `private/` holds a directory for the container `id`.
pub fn find_vm(state_dir: &Path, id: &str) -> anyhow::Result<FoundVm> {
    if let Err(e) = clh_agent_protocol::check_id(id) {
        bail!("{id:?} is not a container or pod sandbox id: {e}");
    }
    let own = state_dir.join(id);
    if is_vm_dir(&own) {
        return Ok(FoundVm {
            dir: own,
            sandbox: None,
        });
    }
    let entries = match std::fs::read_dir(state_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            bail!(
                "no pod or container {id} runs with io.containerd.clh.v2 here: the shim's state directory {} does not exist (no VM ever ran with this configuration)",
                state_dir.display()
            )
        }
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => bail!(
            "cannot read the shim's state directory {}: {e}; it is root's only: run this as root",
            state_dir.display()
        ),
        Err(e) => {
            return Err(e).with_context(|| format!("cannot read {}", state_dir.display()));
        }
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(sandbox) = name.to_str() else {
            continue;
        };
        // .shim-logs and the like are no VM.
        if sandbox.starts_with('.') {
            continue;
        }
        let dir = entry.path();
        if is_vm_dir(&dir) && private_dir(&dir).join(id).is_dir() {
            return Ok(FoundVm {
                dir,
                sandbox: Some(sandbox.to_string()),
            });
        }
    }
    bail!(
        "no pod or container {id} runs with io.containerd.clh.v2 under {}: it runs with another runtime, or not any more (a VM's console log goes with it); `crictl pods`, `crictl ps` or `ctr -n NAMESPACE task ls` list what runs",
        state_dir.display()
    )
}

/// A VM directory as `PodVm::start` makes it: its console log, or the
/// `state.json` of its processes (written once the VM runs).
fn is_vm_dir(dir: &Path) -> bool {
    dir.join(CONSOLE_LOG).is_file() || dir.join("state.json").is_file()
}

/// Prints `console.log.1` then `console.log`; returns the latter, open
/// and read to its end, for `--follow`.
fn print_console(
    dir: &Path,
    printer: &mut Printer,
    out: &mut impl Write,
) -> anyhow::Result<Option<File>> {
    let rotated = dir.join(CONSOLE_LOG_ROTATED);
    match File::open(&rotated) {
        Ok(mut file) => printer.copy(&mut file, out)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", rotated.display())),
    }
    let log = dir.join(CONSOLE_LOG);
    match File::open(&log) {
        Ok(mut file) => {
            printer.copy(&mut file, out)?;
            Ok(Some(file))
        }
        // The VM is starting: no console yet.
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", log.display())),
    }
}

/// Prints what the VM's console adds, across rotations, until the VM
/// directory is gone (the VM stopped).
fn follow(
    dir: &Path,
    mut current: Option<File>,
    printer: &mut Printer,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let log = dir.join(CONSOLE_LOG);
    loop {
        if let Some(file) = current.as_mut() {
            printer.copy(file, out)?;
        }
        out.flush()?;
        if !dir.exists() {
            return Ok(());
        }
        // Rotated (renamed to console.log.1, a new console.log made) or
        // not made yet: what is left in the old one, then the new one.
        let now = std::fs::metadata(&log).ok().map(|m| (m.dev(), m.ino()));
        let ours = current
            .as_ref()
            .and_then(|f| f.metadata().ok())
            .map(|m| (m.dev(), m.ino()));
        if now.is_some() && now != ours {
            if let Some(mut old) = current.take() {
                printer.copy(&mut old, out)?;
            }
            current = File::open(&log).ok();
            continue;
        }
        std::thread::sleep(FOLLOW_POLL);
    }
}

/// Writes the console's complete lines (or only the agent's), each made
/// safe for a terminal: the guest writes the console, and must not drive
/// the operator's terminal with escape sequences or hide text behind a
/// carriage return. A control character but the tab is written as an
/// escape (`\x1b`, `\u009b`); the `\r` of `\r\n` is dropped.
pub struct Printer {
    lines: Lines,
    /// An incomplete last line.
    partial: Vec<u8>,
}

impl Printer {
    pub fn new(lines: Lines) -> Self {
        Self {
            lines,
            partial: Vec::new(),
        }
    }

    fn copy(&mut self, from: &mut impl Read, out: &mut impl Write) -> anyhow::Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).context("cannot read the console log"),
            };
            self.write(&buf[..n], out)?;
        }
    }

    /// Passes on the lines `bytes` completes; keeps the rest for later.
    pub fn write(&mut self, bytes: &[u8], out: &mut impl Write) -> io::Result<()> {
        self.partial.extend_from_slice(bytes);
        let Some(end) = self.partial.iter().rposition(|&b| b == b'\n') else {
            return Ok(());
        };
        let rest = self.partial.split_off(end + 1);
        let complete = std::mem::replace(&mut self.partial, rest);
        let mut text = String::with_capacity(complete.len());
        for line in complete[..end].split(|&b| b == b'\n') {
            self.line(line, &mut text);
        }
        out.write_all(text.as_bytes())
    }

    /// The last line, if it never got its newline.
    pub fn finish(&mut self, out: &mut impl Write) -> io::Result<()> {
        let last = std::mem::take(&mut self.partial);
        if last.is_empty() {
            return Ok(());
        }
        let mut text = String::new();
        self.line(&last, &mut text);
        out.write_all(text.as_bytes())
    }

    fn line(&self, line: &[u8], text: &mut String) {
        let line = String::from_utf8_lossy(line);
        let line = line.strip_suffix('\r').unwrap_or(&line);
        if self.lines == Lines::Agent && !is_agent_line(line) {
            return;
        }
        for c in line.chars() {
            match c {
                '\t' => text.push(c),
                c if c < ' ' || c == '\x7f' => {
                    let _ = write!(text, "\\x{:02x}", u32::from(c));
                }
                c if c.is_control() => {
                    let _ = write!(text, "\\u{:04x}", u32::from(c));
                }
                c => text.push(c),
            }
        }
        text.push('\n');
    }
}

/// Whether a console line is the agent's: its log format (guest-agent's
/// `logging.rs`: `[<seconds since boot>] <LEVEL> ...`, the level padded to
/// five characters as tracing pads it) or its last words (`clh-agent: `).
/// The kernel's own lines carry the same timestamp but no level.
pub fn is_agent_line(line: &str) -> bool {
    if line.starts_with("clh-agent: ") {
        return true;
    }
    let Some((stamp, rest)) = line.strip_prefix('[').and_then(|l| l.split_once(']')) else {
        return false;
    };
    let stamp = stamp.trim();
    let is_time = stamp == "?"
        || stamp.split_once('.').is_some_and(|(s, us)| {
            !s.is_empty()
                && !us.is_empty()
                && s.bytes().chain(us.bytes()).all(|b| b.is_ascii_digit())
        });
    is_time
        && ["TRACE ", "DEBUG ", " INFO ", " WARN ", "ERROR "]
            .iter()
            .any(|level| rest.strip_prefix(' ').is_some_and(|r| r.starts_with(level)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn arguments() {
        assert_eq!(
            parse(&args(&["pod1"])).unwrap(),
            Args {
                id: "pod1".into(),
                config: None,
                lines: Lines::Console,
                follow: false
            }
        );
        assert_eq!(
            parse(&args(&["--agent", "-f", "--config", "/c.toml", "c1"])).unwrap(),
            Args {
                id: "c1".into(),
                config: Some("/c.toml".into()),
                lines: Lines::Agent,
                follow: true
            }
        );
        for bad in [
            &[][..],
            &["--agent", "--console", "x"][..],
            &["a", "b"][..],
            &["--config"][..],
            &["--namespace", "x"][..],
        ] {
            assert!(parse(&args(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn agent_lines_are_told_from_the_kernels() {
        for (line, agent) in [
            ("[    1.234567]  INFO serving ttrpc on vsock://1024", true),
            ("[   12.000001]  WARN clh_agent: something", true),
            ("[    0.500000] ERROR boom", true),
            ("[    0.500000] DEBUG x", true),
            ("[     ?     ]  INFO no clock", true),
            ("clh-agent: fatal: cannot mount", true),
            ("[    0.000000] Linux version 6.12.0", false),
            ("[  120.000000] INFO: task kworker blocked", false),
            ("[    1.000000]  INFOx", false),
            ("plain text", false),
            ("", false),
        ] {
            assert_eq!(is_agent_line(line), agent, "{line:?}");
        }
    }

    #[test]
    fn the_printer_keeps_agent_lines_across_reads() {
        let mut printer = Printer::new(Lines::Agent);
        let mut out = Vec::new();
        printer
            .write(b"[    0.1] kernel\r\n[    1.2]  INFO serv", &mut out)
            .unwrap();
        printer
            .write(b"ing ttrpc\r\n[    1.3] ker", &mut out)
            .unwrap();
        printer
            .write(b"nel\n[    2.0] ERROR last", &mut out)
            .unwrap();
        printer.finish(&mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "[    1.2]  INFO serving ttrpc\n[    2.0] ERROR last\n"
        );
        let mut printer = Printer::new(Lines::Console);
        let mut out = Vec::new();
        printer.write(b"any\r\nli", &mut out).unwrap();
        assert_eq!(out, b"any\n");
        printer.write(b"nes\n\nlast", &mut out).unwrap();
        printer.finish(&mut out).unwrap();
        assert_eq!(out, b"any\nlines\n\nlast\n");
    }

    #[test]
    fn the_guest_cannot_drive_the_operators_terminal() {
        let mut printer = Printer::new(Lines::Console);
        let mut out = Vec::new();
        printer
            .write(
                "\x1b]0;owned\x07 hidden\rshown\ttab \u{9b}2J \x7f\r\n".as_bytes(),
                &mut out,
            )
            .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "\\x1b]0;owned\\x07 hidden\\x0dshown\ttab \\u009b2J \\x7f\n"
        );
        let mut printer = Printer::new(Lines::Agent);
        let mut out = Vec::new();
        printer
            .write(b"[    1.0]  INFO \x1b[2Jcleared\n", &mut out)
            .unwrap();
        assert_eq!(out, b"[    1.0]  INFO \\x1b[2Jcleared\n");
    }

    #[test]
    fn a_pod_container_is_found_in_its_sandboxs_vm() {
        let root = tempfile::tempdir().unwrap();
        let vm = root.path().join("sandbox1");
        std::fs::create_dir_all(private_dir(&vm).join("c1")).unwrap();
        std::fs::write(vm.join(CONSOLE_LOG), "boot\n").unwrap();
        std::fs::create_dir_all(root.path().join(".shim-logs/c1")).unwrap();
        assert_eq!(
            find_vm(root.path(), "sandbox1").unwrap(),
            FoundVm {
                dir: vm.clone(),
                sandbox: None
            }
        );
        assert_eq!(
            find_vm(root.path(), "c1").unwrap(),
            FoundVm {
                dir: vm,
                sandbox: Some("sandbox1".into())
            }
        );
    }

    #[test]
    fn an_unknown_or_invalid_id_is_a_clear_error() {
        let root = tempfile::tempdir().unwrap();
        let err = find_vm(root.path(), "nope").unwrap_err().to_string();
        assert!(err.contains("no pod or container nope"), "{err}");
        assert!(err.contains(&root.path().display().to_string()), "{err}");
        let err = find_vm(&root.path().join("absent"), "nope")
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not exist"), "{err}");
        let err = find_vm(root.path(), "../etc").unwrap_err().to_string();
        assert!(
            err.contains("is not a container or pod sandbox id"),
            "{err}"
        );
    }

    #[test]
    fn the_rotated_half_comes_first() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join(CONSOLE_LOG_ROTATED), "older\n").unwrap();
        std::fs::write(root.path().join(CONSOLE_LOG), "newer\n").unwrap();
        let mut out = Vec::new();
        let mut printer = Printer::new(Lines::Console);
        let current = print_console(root.path(), &mut printer, &mut out).unwrap();
        assert!(current.is_some());
        assert_eq!(out, b"older\nnewer\n");
    }

    /// Hands what is written to the test, as it is written.
    struct Chan(std::sync::mpsc::Sender<Vec<u8>>);

    impl Write for Chan {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let _ = self.0.send(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// Receives until what was received ends with `end`.
    fn receive_until(rx: &std::sync::mpsc::Receiver<Vec<u8>>, seen: &mut Vec<u8>, end: &[u8]) {
        while !seen.ends_with(end) {
            let more = rx
                .recv_timeout(Duration::from_secs(30))
                .unwrap_or_else(|_| panic!("never printed {end:?}: {seen:?}"));
            seen.extend(more);
        }
    }

    #[test]
    fn follow_prints_across_a_rotation_until_the_vm_is_gone() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("vm");
        std::fs::create_dir(&dir).unwrap();
        let log = dir.join(CONSOLE_LOG);
        std::fs::write(&log, "one\n").unwrap();
        let mut out = Vec::new();
        let mut printer = Printer::new(Lines::Console);
        let current = print_console(&dir, &mut printer, &mut out).unwrap();
        assert_eq!(out, b"one\n");
        let (tx, rx) = std::sync::mpsc::channel();
        let follow_dir = dir.clone();
        let follower = std::thread::spawn(move || {
            follow(&follow_dir, current, &mut printer, &mut Chan(tx)).unwrap();
        });
        let mut seen = Vec::new();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&log)
            .and_then(|mut f| f.write_all(b"two\n"))
            .unwrap();
        receive_until(&rx, &mut seen, b"two\n");
        // A rotation, as the console copier makes it.
        std::fs::rename(&log, dir.join(CONSOLE_LOG_ROTATED)).unwrap();
        std::fs::write(&log, "three\n").unwrap();
        receive_until(&rx, &mut seen, b"three\n");
        std::fs::remove_dir_all(&dir).unwrap();
        follower.join().unwrap();
        assert_eq!(seen, b"two\nthree\n");
    }
}
