//! The shim's own log, in containerd's format, into containerd's log.
//!
//! containerd makes a FIFO named `log` in the bundle before it runs the
//! shim, holds it open and copies whatever arrives there, byte for byte,
//! into its own output (its stderr, so journald or the file it logs to).
//! Its shims written in Go log with logrus' text format, so their lines
//! read like containerd's own; ours are formatted the same way
//! ([`format_line`]):
//!
//! ```text
//! time="2026-12-06T04:25:25.123456789Z" level=info msg="VM started" id=pod1 namespace=k8s.io runtime=io.containerd.clh.v2
//! ```
//!
//! Where the lines go ([`init_daemon`]): the daemon writes into the FIFO
//! of its bundle (the sandbox's, for a pod), through a bounded queue and
//! one writer thread ([`Sink`]): a containerd that stops reading never
//! blocks the shim, the lines it misses are counted and a line saying how
//! many were lost comes before the next one that gets through. A
//! containerd that restarts opens the same FIFO again and gets the lines
//! from then on. Without a FIFO (the daemon started by hand) the lines go
//! to a file in the state directory, `<state_dir>/.shim-logs/<namespace>/<id>.log`
//! (bounded like the console log). `start` writes into its bundle's FIFO
//! when there is one and nowhere else (containerd takes everything `start`
//! prints as its reply); `delete` writes to stderr, which containerd
//! quotes in its log as "cleanup warnings".
//!
//! The level is `runtime.log_level` (info by default), lowered to debug
//! when containerd runs at debug level (it passes `-debug`); `CLH_SHIM_LOG`
//! (a tracing filter) overrides both.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clh_config::LogLevel;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// The environment variable whose tracing filter overrides the level.
pub const FILTER_ENV: &str = "CLH_SHIM_LOG";

/// The FIFO containerd reads, in the bundle (the shim's working directory).
pub const FIFO: &str = "log";

/// Lines waiting for the writer; beyond them, lines are dropped (and
/// counted) rather than wait for containerd.
const QUEUE_LINES: usize = 1024;

/// The cap of the fallback file with its rotated older half.
const FALLBACK_MAX_BYTES: u64 = 1 << 20;

/// How long an exiting process waits for its last lines to be written.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(1);

/// The installed sink, for [`flush`].
static SINK: OnceLock<Sink> = OnceLock::new();

/// Who is logging: the fields every line carries, as containerd's Go shims
/// add `runtime`, `namespace` and the task `id`.
#[derive(Debug, Clone)]
pub struct Origin {
    pub runtime: String,
    pub namespace: String,
    /// The shim's `-id`: the sandbox's for a pod. A line's own `id` field
    /// (a container's) takes its place.
    pub id: String,
}

impl Origin {
    fn fields(&self) -> Vec<(String, String)> {
        [
            ("id", &self.id),
            ("namespace", &self.namespace),
            ("runtime", &self.runtime),
        ]
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
    }
}

/// The level to log at: the configured one, or debug when containerd asks
/// for it (`-debug`), whichever logs more.
pub fn effective_level(configured: LogLevel, debug: bool) -> LogLevel {
    if debug {
        configured.max(LogLevel::Debug)
    } else {
        configured
    }
}

/// The daemon's log: the bundle's FIFO (the working directory's `log`),
/// else `<state_dir>/.shim-logs/<namespace>/<id>.log`, else stderr.
pub fn init_daemon(origin: Origin, level: LogLevel, state_dir: &Path) {
    let (writer, fallback): (Box<dyn Write + Send>, Option<String>) = match open_fifo(Path::new(
        FIFO,
    )) {
        Ok(fifo) => (Box::new(fifo), None),
        Err(fifo_err) => {
            let path = fallback_path(state_dir, &origin.namespace, &origin.id);
            match open_fallback(&path) {
                    Ok(file) => (
                        Box::new(file),
                        Some(format!(
                            "no containerd log FIFO ({FIFO} in the bundle: {fifo_err}); logging to {}",
                            path.display()
                        )),
                    ),
                    Err(e) => (
                        Box::new(io::stderr()),
                        Some(format!(
                            "no containerd log FIFO ({FIFO} in the bundle: {fifo_err}) and no log file ({e}); logging to stderr"
                        )),
                    ),
                }
        }
    };
    install(origin, level, writer);
    if let Some(why) = fallback {
        tracing::warn!("{why}");
    }
}

/// `start`'s log: the bundle's FIFO if containerd made one, else nothing
/// (containerd reads all `start` prints as its reply).
pub fn init_start(origin: Origin, level: LogLevel) {
    if let Ok(fifo) = open_fifo(Path::new(FIFO)) {
        install(origin, level, Box::new(fifo));
    }
}

/// `delete`'s log: stderr, which containerd logs as "cleanup warnings".
pub fn init_stderr(origin: Origin, level: LogLevel) {
    install(origin, level, Box::new(io::stderr()));
}

/// Waits up to `timeout` for the lines logged so far to be written.
pub fn flush(timeout: Duration) {
    if let Some(sink) = SINK.get() {
        sink.flush(timeout);
    }
}

fn install(origin: Origin, level: LogLevel, writer: Box<dyn Write + Send>) {
    let filter = std::env::var(FILTER_ENV)
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new(level.as_str()));
    let notice_origin = origin.clone();
    let notice = Box::new(move |lost: u64| {
        format_line(
            SystemTime::now(),
            Level::WARN,
            &format!("{lost} shim log lines were lost: containerd was not reading its log"),
            &notice_origin.fields(),
        )
    });
    let sink = match Sink::spawn(writer, notice) {
        Ok(sink) => sink,
        // No thread: the log would be the only way to say so.
        Err(_) => return,
    };
    let layer = LogrusLayer::new(&origin, sink.clone());
    let _ = SINK.set(sink);
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(layer)
        .try_init();
}

/// The file the daemon logs to when its bundle has no FIFO. Its directory
/// starts with a dot, so no VM directory (an id) can be named like it.
pub fn fallback_path(state_dir: &Path, namespace: &str, id: &str) -> PathBuf {
    state_dir
        .join(".shim-logs")
        .join(if namespace.is_empty() {
            "default"
        } else {
            namespace
        })
        .join(format!("{id}.log"))
}

fn open_fallback(path: &Path) -> io::Result<BoundedWriter> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    clh_hypervisor::console_log::BoundedLog::create(path, FALLBACK_MAX_BYTES)
        .map(BoundedWriter)
        .map_err(io::Error::other)
}

/// The fallback file, bounded like the console log.
struct BoundedWriter(clh_hypervisor::console_log::BoundedLog);

impl Write for BoundedWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf).map_err(io::Error::other)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Opens containerd's log FIFO for writing without waiting for a reader
/// (`O_NONBLOCK`: with no reader the open fails at once, `ENXIO`), then
/// makes the descriptor blocking for the writer thread, which alone waits
/// on it.
pub fn open_fifo(path: &Path) -> io::Result<File> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let file = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(OFlag::O_NONBLOCK.bits())
        .open(path)?;
    let flags = fcntl(&file, FcntlArg::F_GETFL).map_err(io::Error::from)?;
    let blocking = OFlag::from_bits_truncate(flags) & !OFlag::O_NONBLOCK;
    fcntl(&file, FcntlArg::F_SETFL(blocking)).map_err(io::Error::from)?;
    Ok(file)
}

/// Whole lines to one writer, from a thread of its own behind a bounded
/// queue: [`Sink::send`] never waits. A line the queue has no room for, or
/// that the writer fails to write (containerd gone: `EPIPE`), is counted
/// as lost; the next line written is preceded by a notice of how many.
#[derive(Clone)]
pub struct Sink {
    tx: SyncSender<String>,
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    lost: AtomicU64,
    /// Lines sent and not yet written (or failed).
    pending: Mutex<usize>,
    idle: Condvar,
}

impl Shared {
    fn done(&self, lines: usize) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        *pending = pending.saturating_sub(lines);
        if *pending == 0 {
            self.idle.notify_all();
        }
    }
}

type Notice = Box<dyn Fn(u64) -> String + Send>;

impl Sink {
    /// Starts the writer thread over `writer`; `notice(n)` is the line
    /// that says `n` lines were lost.
    pub fn spawn(mut writer: Box<dyn Write + Send>, notice: Notice) -> io::Result<Sink> {
        let (tx, rx) = sync_channel::<String>(QUEUE_LINES);
        let shared = Arc::new(Shared::default());
        let thread_shared = shared.clone();
        std::thread::Builder::new()
            .name("shim-log".into())
            .spawn(move || {
                let shared = thread_shared;
                for line in rx {
                    let lost = shared.lost.swap(0, Ordering::Relaxed);
                    if lost > 0 && writer.write_all(notice(lost).as_bytes()).is_err() {
                        shared.lost.fetch_add(lost, Ordering::Relaxed);
                    }
                    if writer.write_all(line.as_bytes()).is_err() {
                        shared.lost.fetch_add(1, Ordering::Relaxed);
                    }
                    shared.done(1);
                }
            })?;
        Ok(Sink { tx, shared })
    }

    /// Queues `line` (with its newline); never waits.
    pub fn send(&self, line: String) {
        *self
            .shared
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner()) += 1;
        match self.tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.shared.lost.fetch_add(1, Ordering::Relaxed);
                self.shared.done(1);
            }
        }
    }

    /// Lines lost and not yet reported in the log.
    pub fn lost(&self) -> u64 {
        self.shared.lost.load(Ordering::Relaxed)
    }

    /// Waits up to `timeout` until every queued line is written; whether
    /// they were.
    pub fn flush(&self, timeout: Duration) -> bool {
        let pending = self
            .shared
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let (pending, _) = self
            .shared
            .idle
            .wait_timeout_while(pending, timeout, |p| *p > 0)
            .unwrap_or_else(|p| p.into_inner());
        *pending == 0
    }
}

/// A tracing layer that formats every event as containerd's log lines and
/// hands them to a [`Sink`].
pub struct LogrusLayer {
    fixed: Vec<(String, String)>,
    sink: Sink,
}

impl LogrusLayer {
    pub fn new(origin: &Origin, sink: Sink) -> Self {
        Self {
            fixed: origin.fields(),
            sink,
        }
    }
}

/// A span's fields, kept in its extensions for the events inside it.
struct SpanFields(Vec<(String, String)>);

impl<S> Layer<S> for LogrusLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut()
                .insert(SpanFields(fields.into_pairs()));
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        values.record(&mut fields);
        if let Some(span) = ctx.span(id) {
            let mut ext = span.extensions_mut();
            match ext.get_mut::<SpanFields>() {
                Some(SpanFields(pairs)) => pairs.extend(fields.into_pairs()),
                None => ext.insert(SpanFields(fields.into_pairs())),
            }
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut pairs = self.fixed.clone();
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope.from_root() {
                if let Some(SpanFields(f)) = span.extensions().get::<SpanFields>() {
                    pairs.extend(f.iter().cloned());
                }
            }
        }
        let mut fields = Fields::default();
        event.record(&mut fields);
        let message = std::mem::take(&mut fields.message);
        pairs.extend(fields.into_pairs());
        let level = *event.metadata().level();
        self.sink
            .send(format_line(SystemTime::now(), level, &message, &pairs));
    }
}

/// An event's or span's fields: `message` apart, `log.*` (the origin of
/// a `log` record, through tracing-log) left out.
#[derive(Default)]
struct Fields {
    message: String,
    pairs: Vec<(String, String)>,
}

impl Fields {
    fn into_pairs(self) -> Vec<(String, String)> {
        let mut pairs = self.pairs;
        if !self.message.is_empty() {
            pairs.push(("message".into(), self.message));
        }
        pairs
    }

    fn put(&mut self, field: &Field, value: String) {
        match field.name() {
            "message" => self.message = value,
            name if name.starts_with("log.") => {}
            name => self.pairs.push((name.to_string(), value)),
        }
    }
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.to_string());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.put(field, format!("{value:?}"));
    }
}

/// One line of logrus' text format as containerd configures it:
/// `time="<RFC 3339, nanoseconds>" level=<level> msg=<message>`, then the
/// fields sorted by name (a later pair of `fields` replaces an earlier one
/// of the same name), each value quoted only when logrus would quote it.
pub fn format_line(
    time: SystemTime,
    level: Level,
    msg: &str,
    fields: &[(String, String)],
) -> String {
    let mut line = format!(
        "time=\"{}\" level={} msg={}",
        rfc3339_nanos(time),
        level_name(level),
        quoted(msg)
    );
    let sorted: BTreeMap<&str, &str> = fields
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "time" | "level" | "msg"))
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    for (key, value) in sorted {
        let _ = write!(line, " {key}={}", quoted(value));
    }
    line.push('\n');
    line
}

/// logrus' names: `warning`, not `warn`.
fn level_name(level: Level) -> &'static str {
    match level {
        Level::ERROR => "error",
        Level::WARN => "warning",
        Level::INFO => "info",
        Level::DEBUG => "debug",
        Level::TRACE => "trace",
    }
}

/// The value as logrus' text formatter writes it: bare when it is made of
/// letters, digits and `-._/@^+` only (or empty), else Go's `%q`.
fn quoted(value: &str) -> std::borrow::Cow<'_, str> {
    let bare = value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-._/@^+".contains(c));
    if bare {
        return value.into();
    }
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\x07' => out.push_str("\\a"),
            '\x08' => out.push_str("\\b"),
            '\x0b' => out.push_str("\\v"),
            '\x0c' => out.push_str("\\f"),
            c if c < ' ' || c == '\x7f' => {
                let _ = write!(out, "\\x{:02x}", u32::from(c));
            }
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out.into()
}

/// `time` in UTC as containerd's `RFC3339NanoFixed`:
/// `2006-01-02T15:04:05.000000000Z`.
pub fn rfc3339_nanos(time: SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = i64::try_from(since.as_secs()).unwrap_or(i64::MAX);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_nanos()
    )
}

/// The proleptic Gregorian date of `days` since 1970-01-01 (Howard
/// Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
#[path = "logging_tests.rs"]
mod tests;
