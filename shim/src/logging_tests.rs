use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::mpsc;
use std::time::{Duration, UNIX_EPOCH};

use tracing_subscriber::layer::SubscriberExt;

use super::*;

/// How long a test waits for something that must not block at all.
const NO_BLOCK: Duration = Duration::from_secs(30);

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn timestamps_are_containerds_rfc3339_nano_fixed_in_utc() {
    let t = UNIX_EPOCH + Duration::new(1_796_531_125, 123_456_789);
    assert_eq!(rfc3339_nanos(t), "2026-12-06T04:25:25.123456789Z");
    assert_eq!(rfc3339_nanos(UNIX_EPOCH), "1970-01-01T00:00:00.000000000Z");
    // A leap day, and nanoseconds kept to nine digits.
    let t = UNIX_EPOCH + Duration::new(951_782_400, 7);
    assert_eq!(rfc3339_nanos(t), "2000-02-29T00:00:00.000000007Z");
    let t = UNIX_EPOCH + Duration::new(4_102_444_799, 0);
    assert_eq!(rfc3339_nanos(t), "2099-12-31T23:59:59.000000000Z");
}

#[test]
fn a_line_is_logrus_text_with_sorted_fields() {
    let t = UNIX_EPOCH + Duration::new(1_796_531_125, 123_456_789);
    let line = format_line(
        t,
        Level::INFO,
        "VM started",
        &pairs(&[
            ("runtime", "io.containerd.clh.v2"),
            ("namespace", "k8s.io"),
            ("id", "sandbox"),
            ("vcpus", "2"),
            ("id", "c1"),
        ]),
    );
    assert_eq!(
        line,
        "time=\"2026-12-06T04:25:25.123456789Z\" level=info msg=\"VM started\" id=c1 namespace=k8s.io runtime=io.containerd.clh.v2 vcpus=2\n"
    );
}

#[test]
fn levels_are_named_as_logrus_names_them() {
    let names: Vec<_> = [
        Level::ERROR,
        Level::WARN,
        Level::INFO,
        Level::DEBUG,
        Level::TRACE,
    ]
    .into_iter()
    .map(level_name)
    .collect();
    assert_eq!(names, ["error", "warning", "info", "debug", "trace"]);
}

#[test]
fn values_are_quoted_as_logrus_quotes_them() {
    for (value, written) in [
        ("plain-word_1.2/x@y^z+", "plain-word_1.2/x@y^z+"),
        ("", ""),
        ("two words", "\"two words\""),
        ("a=b", "\"a=b\""),
        ("say \"hi\"", "\"say \\\"hi\\\"\""),
        ("back\\slash", "\"back\\\\slash\""),
        ("line\nbreak\ttab\r", "\"line\\nbreak\\ttab\\r\""),
        ("bell\x07 nul\0 del\x7f", "\"bell\\a nul\\x00 del\\x7f\""),
        ("c1\u{85}", "\"c1\\u0085\""),
        ("héllo", "\"héllo\""),
    ] {
        assert_eq!(quoted(value), written, "{value:?}");
    }
    // A message can never end its field or start a forged line.
    let line = format_line(
        UNIX_EPOCH,
        Level::WARN,
        "x\" level=error msg=\"forged\ntime=\"",
        &[],
    );
    assert_eq!(line.matches('\n').count(), 1, "{line}");
    assert!(line.starts_with(
        "time=\"1970-01-01T00:00:00.000000000Z\" level=warning msg=\"x\\\" level=error"
    ));
}

#[test]
fn the_level_is_the_configured_one_or_debug_when_containerd_debugs() {
    assert_eq!(effective_level(LogLevel::Info, false), LogLevel::Info);
    assert_eq!(effective_level(LogLevel::Info, true), LogLevel::Debug);
    assert_eq!(effective_level(LogLevel::Warn, true), LogLevel::Debug);
    assert_eq!(effective_level(LogLevel::Trace, true), LogLevel::Trace);
    assert_eq!(effective_level(LogLevel::Error, false), LogLevel::Error);
}

#[test]
fn the_fallback_file_is_per_namespace_and_id_and_no_vm_directory() {
    let path = fallback_path(Path::new("/run/clh-shim"), "k8s.io", "abc");
    assert_eq!(path, Path::new("/run/clh-shim/.shim-logs/k8s.io/abc.log"));
    // Ids never start with a dot: no VM directory can be this directory.
    assert!(clh_agent_protocol::check_id(".shim-logs").is_err());
}

/// A writer into a shared buffer.
#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Write for Buffer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn notice() -> Notice {
    Box::new(|n| format!("lost {n}\n"))
}

#[test]
fn events_become_lines_with_the_origin_span_and_event_fields() {
    let buffer = Buffer::default();
    let sink = Sink::spawn(Box::new(buffer.clone()), notice()).unwrap();
    let origin = Origin {
        runtime: "io.containerd.clh.v2".into(),
        namespace: "k8s.io".into(),
        id: "pod1".into(),
    };
    let subscriber = tracing_subscriber::registry().with(LogrusLayer::new(&origin, sink.clone()));
    tracing::subscriber::with_default(subscriber, || {
        tracing::info!(vcpus = 2, "VM started");
        let span = tracing::info_span!("create", id = "c1");
        let _in = span.enter();
        tracing::warn!(error = %io::Error::other("it broke"), "failed");
    });
    assert!(sink.flush(NO_BLOCK));
    let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines[0].starts_with("time=\""), "{text}");
    assert!(
        lines[0].ends_with(
            "\" level=info msg=\"VM started\" id=pod1 namespace=k8s.io runtime=io.containerd.clh.v2 vcpus=2"
        ),
        "{text}"
    );
    assert!(
        lines[1].ends_with(
            "\" level=warning msg=failed error=\"it broke\" id=c1 namespace=k8s.io runtime=io.containerd.clh.v2"
        ),
        "{text}"
    );
}

/// A FIFO in a temporary directory.
fn fifo() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    (dir, path)
}

fn open_reader(path: &Path) -> File {
    // O_NONBLOCK so the open does not wait for a writer; then blocking.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(path)
        .unwrap();
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_truncate(fcntl(&file, FcntlArg::F_GETFL).unwrap());
    fcntl(&file, FcntlArg::F_SETFL(flags & !OFlag::O_NONBLOCK)).unwrap();
    file
}

/// Reads `reader` in a thread until a line equal to `last` arrives.
fn read_until(mut reader: File, last: &'static str) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 65536];
        loop {
            match reader.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
            if String::from_utf8_lossy(&seen).lines().any(|l| l == last) {
                break;
            }
        }
        let _ = tx.send(String::from_utf8_lossy(&seen).into_owned());
    });
    rx
}

/// Sends `count` numbered lines from another thread; fails the test if
/// sending blocks.
fn send_lines_without_blocking(sink: &Sink, count: usize) {
    let sender = sink.clone();
    let (done, finished) = mpsc::channel();
    std::thread::spawn(move || {
        for i in 0..count {
            sender.send(format!("line {i} {}\n", "x".repeat(100)));
        }
        let _ = done.send(());
    });
    finished
        .recv_timeout(NO_BLOCK)
        .expect("logging blocked while containerd was not reading");
}

#[test]
fn without_a_reader_the_fifo_does_not_open() {
    let (_dir, path) = fifo();
    let err = open_fifo(&path).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENXIO), "{err}");
    assert_eq!(
        open_fifo(&_dir.path().join("none")).unwrap_err().kind(),
        io::ErrorKind::NotFound
    );
}

#[test]
fn a_reader_that_stops_reading_never_blocks_the_shim_and_whole_lines_follow() {
    let (_dir, path) = fifo();
    let reader = open_reader(&path);
    let sink = Sink::spawn(Box::new(open_fifo(&path).unwrap()), notice()).unwrap();
    // Far more than the pipe (64 KiB) and the queue hold.
    send_lines_without_blocking(&sink, 20_000);
    assert!(sink.lost() > 0, "nothing was dropped");
    // containerd reads again: whole lines, each loss reported in the
    // stream where it happened, every line either written or counted.
    let seen = read_until(reader, "the end");
    // Once the queue has drained, the next line has room.
    assert!(sink.flush(NO_BLOCK), "the queue never drained");
    sink.send("the end\n".into());
    let text = seen
        .recv_timeout(NO_BLOCK)
        .expect("the last line never came");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.last(), Some(&"the end"));
    let lost: usize = lines
        .iter()
        .filter_map(|l| l.strip_prefix("lost "))
        .map(|n| n.parse::<usize>().unwrap())
        .sum();
    assert!(lost > 0, "no loss reported");
    let written: Vec<&&str> = lines.iter().filter(|l| l.starts_with("line ")).collect();
    assert_eq!(written.len() + lost, 20_000, "written + lost");
    for line in written {
        assert!(line.ends_with(&"x".repeat(100)), "a torn line: {line}");
    }
    assert_eq!(
        lines.len(),
        20_000 - lost + lines.iter().filter(|l| l.starts_with("lost ")).count() + 1
    );
}

#[test]
fn lines_logged_while_containerd_is_gone_are_counted_and_reported_when_it_is_back() {
    let (_dir, path) = fifo();
    let reader = open_reader(&path);
    let sink = Sink::spawn(Box::new(open_fifo(&path).unwrap()), notice()).unwrap();
    // containerd stops: no reader, writes fail with EPIPE and are dropped.
    drop(reader);
    send_lines_without_blocking(&sink, 10);
    assert!(sink.flush(NO_BLOCK));
    assert_eq!(sink.lost(), 10);
    // containerd restarts and opens the FIFO again.
    let reader = open_reader(&path);
    let seen = read_until(reader, "back");
    sink.send("back\n".into());
    let text = seen.recv_timeout(NO_BLOCK).expect("the line never came");
    assert_eq!(text, "lost 10\nback\n");
}

#[test]
fn flush_waits_for_queued_lines() {
    let buffer = Buffer::default();
    let sink = Sink::spawn(Box::new(buffer.clone()), notice()).unwrap();
    for i in 0..100 {
        sink.send(format!("{i}\n"));
    }
    assert!(sink.flush(NO_BLOCK));
    assert_eq!(
        buffer
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|&&b| b == b'\n')
            .count(),
        100
    );
}
