//! install, uninstall and status, step by step (see lib.rs).

use std::fs;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::containerd::{self, Handler, Major};
use crate::error::{io, InstallError, Result};
use crate::layout::Layout;
use crate::payload::{self, Payload};
use crate::restart::{self, Outcome};
use crate::state::{self, Original, State};
use crate::{fsutil, procs, shim_config, Options, Report};

const SHIM_NAME: &str = "containerd-shim-clh-v2";
/// How long a second installer waits for the first one.
const LOCK_TIMEOUT: Duration = Duration::from_secs(120);
/// Where containerd usually is, when --containerd is not given.
const CONTAINERD_PLACES: &[&str] = &[
    "/usr/local/bin/containerd",
    "/usr/bin/containerd",
    "/bin/containerd",
    "/usr/local/sbin/containerd",
    "/usr/sbin/containerd",
];

/// Installs (or upgrades to) the payload; a second run with the same
/// payload changes nothing.
pub fn install(opts: &Options) -> Result<Report> {
    let mut report = Report::default();
    let layout = Layout::new(&opts.host_root, &opts.prefix);
    // Everything that can refuse the install is checked before anything
    // is made: a refused install leaves the node as it was.
    let payload = Payload::load(&opts.payload)?;
    let (template, template_path, admin) = match &opts.shim_config {
        Some(p) => (fs::read(p).map_err(io("reading", p))?, p.clone(), true),
        None => {
            let p = opts.payload.join(payload::CONFIG);
            (fs::read(&p).map_err(io("reading", &p))?, p, false)
        }
    };
    let id = payload.version_id(&template, &opts.prefix)?;
    let config = shim_config::render(&template, &template_path, admin, &payload, &layout, &id)?;
    clh_config::Config::parse(&String::from_utf8_lossy(&config), &template_path).map_err(|e| {
        InstallError::ConfigShape {
            path: template_path.clone(),
            problem: format!("the shim would refuse it: {e}"),
        }
    })?;
    let major = match opts.containerd_major {
        Some(m) => m,
        None => detect(opts)?,
    };
    let handler = Handler {
        name: opts.handler.clone(),
        runtime_path: layout.current_view(payload::SHIM),
    };
    let drop_in_path = opts.drop_in_dir.join(format!("{}.toml", opts.handler));
    let main_on_host = opts.on_host(&opts.containerd_config);
    let plan_now = || -> Result<(Option<Vec<u8>>, containerd::Plan)> {
        let main = fsutil::read_optional(&main_on_host)?;
        let plan = containerd::plan(
            main.as_deref(),
            &opts.containerd_config,
            &drop_in_path,
            major,
            &handler,
        )?;
        Ok((main, plan))
    };
    plan_now()?;

    let mut created = fsutil::create_dirs(&layout.on_host)?;
    let _lock = lock(&layout.on_host)?;
    if layout.install_version(&payload, &id, &config)? {
        report.say(format!(
            "installed version {id} in {}",
            layout.version_dir(&id).display()
        ));
    } else {
        report.say(format!("version {id} already installed"));
    }
    let previous = layout.current();
    if layout.set_current(&id)? {
        report.say(format!(
            "{} now points at version {id} (was {})",
            layout.on_host.join(crate::layout::CURRENT).display(),
            previous.as_deref().unwrap_or("none")
        ));
    }
    let mut st = State::load(&layout.on_host)?.unwrap_or_default();
    st.handler.clone_from(&opts.handler);
    st.version.clone_from(&id);
    st.main_config.clone_from(&opts.containerd_config);

    // Again under the lock: another installer may have changed the file.
    let (main, plan) = plan_now()?;
    if let Some(bytes) = &plan.drop_in {
        let on_host = opts.on_host(&drop_in_path);
        if fsutil::read_optional(&on_host)?.as_deref() != Some(bytes.as_slice()) {
            created.extend(fsutil::create_dirs(&opts.on_host(&opts.drop_in_dir))?);
            fsutil::write_atomic(&on_host, bytes, 0o644)?;
            report.containerd_config_changed = true;
            report.say(format!(
                "wrote the containerd drop-in {}",
                drop_in_path.display()
            ));
        }
        st.drop_in = Some(drop_in_path.clone());
    }
    if let Some(bytes) = &plan.main {
        if st.main_original.is_none() {
            st.main_original = Some(back_up(&layout, &main_on_host, main.as_deref())?);
        }
        created.extend(fsutil::create_dirs(
            main_on_host.parent().unwrap_or(Path::new("/")),
        )?);
        let mode = fsutil::mode_or(&main_on_host, 0o644);
        fsutil::write_atomic(&main_on_host, bytes, mode)?;
        st.main_written_sha256 = Some(fsutil::sha256_hex(bytes));
        st.added_import |= plan.added_import;
        for r in &plan.added_runtimes {
            if !st.added_runtimes.contains(r) {
                st.added_runtimes.push(r.clone());
            }
        }
        report.containerd_config_changed = true;
        report.say(format!(
            "registered runtime handler {:?} in {} ({})",
            opts.handler,
            opts.containerd_config.display(),
            if plan.added_import {
                "an import of the drop-in"
            } else {
                "in place: containerd 1.x would let a drop-in replace this file's CRI settings"
            }
        ));
    }
    if let Some(dir) = &opts.link_dir {
        link_shim(opts, dir, &layout, &mut st, &mut created, &mut report)?;
    }
    for d in created {
        let d = host_view(opts, &d);
        if !st.created_dirs.contains(&d) {
            st.created_dirs.push(d);
        }
    }
    st.save(&layout.on_host)?;
    if report.containerd_config_changed {
        let outcome = restart::restart(&opts.restart, &opts.host_root)?;
        report.say(describe(&outcome));
        report.restart = Some(outcome);
    } else {
        report.say("containerd configuration unchanged: containerd not restarted");
    }
    remove_unused_versions(opts, &layout, Some(&id), &mut report);
    report.version = Some(id);
    Ok(report)
}

/// Takes everything install made off the node. Refuses while processes
/// still run from an installed version, unless `force` (then their
/// version directories stay).
pub fn uninstall(opts: &Options, force: bool) -> Result<Report> {
    let mut report = Report::default();
    let layout = Layout::new(&opts.host_root, &opts.prefix);
    if !layout.on_host.exists() {
        report.say(format!("nothing installed at {}", opts.prefix.display()));
        return Ok(report);
    }
    let _lock = lock(&layout.on_host)?;
    let Some(st) = State::load(&layout.on_host)? else {
        // What an uninstall --force left: versions that were in use.
        remove_unused_versions(opts, &layout, None, &mut report);
        if layout.versions().is_empty() {
            remove_empty_prefix(&layout);
        }
        report.say(format!(
            "no install record in {}: nothing else to undo",
            opts.prefix.display()
        ));
        return Ok(report);
    };
    if !force {
        let versions = layout.on_host.join(crate::layout::VERSIONS);
        let pids = procs::running_from(&versions, &opts.proc_dir);
        if !pids.is_empty() {
            return Err(InstallError::InUse {
                dir: versions,
                pids,
            });
        }
    }
    let main_on_host = opts.on_host(&st.main_config);
    if let Some(original) = &st.main_original {
        let now = fsutil::read_optional(&main_on_host)?;
        let ours = now.as_deref().map(fsutil::sha256_hex) == st.main_written_sha256;
        if ours {
            if original.existed {
                let backup = layout
                    .on_host
                    .join(state::BACKUP_DIR)
                    .join(state::MAIN_BACKUP);
                let bytes = fs::read(&backup).map_err(io("reading the backup", &backup))?;
                fsutil::write_atomic(&main_on_host, &bytes, original.mode)?;
                report.say(format!(
                    "restored {} as it was before install",
                    st.main_config.display()
                ));
            } else {
                fs::remove_file(&main_on_host).map_err(io("removing", &main_on_host))?;
                report.say(format!(
                    "removed {} (install created it)",
                    st.main_config.display()
                ));
            }
        } else if let Some(now) = now {
            let drop_in = st.drop_in.clone().unwrap_or_default();
            let bytes =
                containerd::remove_ours(&now, &st.main_config, &drop_in, &st.added_runtimes)?;
            fsutil::write_atomic(&main_on_host, &bytes, fsutil::mode_or(&main_on_host, 0o644))?;
            report.say(format!(
                "{} changed since install: took out only the handler and import install added (the backup of the original stays in {})",
                st.main_config.display(),
                opts.prefix.join(state::BACKUP_DIR).display()
            ));
        }
        report.containerd_config_changed = true;
    }
    if let Some(drop_in) = &st.drop_in {
        let on_host = opts.on_host(drop_in);
        if on_host.exists() {
            fs::remove_file(&on_host).map_err(io("removing", &on_host))?;
            report.containerd_config_changed = true;
            report.say(format!("removed the drop-in {}", drop_in.display()));
        }
    }
    if let Some(link) = &st.link {
        let on_host = opts.on_host(link);
        if fs::read_link(&on_host).is_ok_and(|t| t == layout.current_view(payload::SHIM)) {
            fs::remove_file(&on_host).map_err(io("removing", &on_host))?;
            report.say(format!("removed the symlink {}", link.display()));
        }
    }
    if report.containerd_config_changed {
        let outcome = restart::restart(&opts.restart, &opts.host_root)?;
        report.say(describe(&outcome));
        report.restart = Some(outcome);
    }
    remove_unused_versions(opts, &layout, None, &mut report);
    let _ = fs::remove_file(layout.on_host.join(state::FILE));
    let _ = fs::remove_dir_all(layout.on_host.join(state::BACKUP_DIR));
    if !layout.versions().is_empty() {
        report.say(format!(
            "{} kept: processes still run from it; remove it once they are gone",
            opts.prefix.display()
        ));
        return Ok(report);
    }
    remove_empty_prefix(&layout);
    for d in st.created_dirs.iter().rev() {
        // Only if empty: something else may have put files there since.
        let _ = fs::remove_dir(opts.on_host(d));
    }
    report.say(format!("removed {}", opts.prefix.display()));
    Ok(report)
}

/// One line per fact: the current version, the registration, the versions
/// kept and who runs from them.
pub fn status(opts: &Options) -> Result<Report> {
    let mut report = Report::default();
    let layout = Layout::new(&opts.host_root, &opts.prefix);
    let Some(st) = State::load(&layout.on_host)? else {
        report.say(format!("not installed at {}", opts.prefix.display()));
        return Ok(report);
    };
    report.say(format!(
        "current version: {}",
        layout.current().unwrap_or_default()
    ));
    report.say(format!(
        "handler {:?} registered in {}",
        st.handler,
        match &st.drop_in {
            Some(d) => d.display().to_string(),
            None => st.main_config.display().to_string(),
        }
    ));
    for v in layout.versions() {
        let pids = procs::running_from(&layout.version_dir(&v), &opts.proc_dir);
        report.say(format!(
            "version {v}: {} process(es) run from it",
            pids.len()
        ));
    }
    report.version = layout.current();
    Ok(report)
}

const LOCK_FILE: &str = ".lock";

/// Takes the prefix itself away once no version is left in it: `current`,
/// the empty `versions/`, the lock, the directory.
fn remove_empty_prefix(layout: &Layout) {
    let _ = fs::remove_file(layout.on_host.join(crate::layout::CURRENT));
    let _ = fs::remove_dir(layout.on_host.join(crate::layout::VERSIONS));
    let _ = fs::remove_file(layout.on_host.join(LOCK_FILE));
    let _ = fs::remove_dir(&layout.on_host);
}

/// An exclusive flock on the prefix, waited for within [`LOCK_TIMEOUT`].
fn lock(prefix_on_host: &Path) -> Result<fs::File> {
    let path = prefix_on_host.join(LOCK_FILE);
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io("opening the lock", &path))?;
    let deadline = Instant::now() + LOCK_TIMEOUT;
    loop {
        // SAFETY: flock on an fd this function owns; no memory is passed.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(file);
        }
        if Instant::now() > deadline {
            return Err(InstallError::Locked(path, LOCK_TIMEOUT));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn detect(opts: &Options) -> Result<Major> {
    let binary = match &opts.containerd_binary {
        Some(b) => b.clone(),
        None => CONTAINERD_PLACES
            .iter()
            .map(PathBuf::from)
            .find(|p| opts.on_host(p).is_file())
            .ok_or_else(|| {
                InstallError::ContainerdVersion(format!(
                    "no containerd binary in {}",
                    CONTAINERD_PLACES.join(", ")
                ))
            })?,
    };
    containerd::detect_major(&opts.host_root, &binary)
}

fn back_up(layout: &Layout, main_on_host: &Path, main: Option<&[u8]>) -> Result<Original> {
    let dir = layout.on_host.join(state::BACKUP_DIR);
    fsutil::create_dirs(&dir)?;
    let bytes = main.unwrap_or_default();
    if main.is_some() {
        fsutil::write_atomic(&dir.join(state::MAIN_BACKUP), bytes, 0o600)?;
    }
    Ok(Original {
        existed: main.is_some(),
        mode: fsutil::mode_or(main_on_host, 0o644),
        sha256: fsutil::sha256_hex(bytes),
    })
}

fn link_shim(
    opts: &Options,
    dir: &Path,
    layout: &Layout,
    st: &mut State,
    created: &mut Vec<PathBuf>,
    report: &mut Report,
) -> Result<()> {
    let link = dir.join(SHIM_NAME);
    let on_host = opts.on_host(&link);
    let target = layout.current_view(payload::SHIM);
    match fs::read_link(&on_host) {
        Ok(t) if t == target => st.link = Some(link),
        Err(_) if !on_host.exists() && fs::symlink_metadata(&on_host).is_err() => {
            created.extend(fsutil::create_dirs(&opts.on_host(dir))?);
            std::os::unix::fs::symlink(&target, &on_host).map_err(io("creating", &on_host))?;
            report.say(format!("linked {} -> {}", link.display(), target.display()));
            st.link = Some(link);
        }
        _ => report.say(format!(
            "left {} alone (not ours): `ctr --runtime io.containerd.clh.v2` runs that one; CRI's handler uses {}",
            link.display(),
            target.display()
        )),
    }
    Ok(())
}

/// Removes versions other than `keep` that no process runs from.
fn remove_unused_versions(
    opts: &Options,
    layout: &Layout,
    keep: Option<&str>,
    report: &mut Report,
) {
    for v in layout.versions() {
        if Some(v.as_str()) == keep {
            continue;
        }
        let dir = layout.version_dir(&v);
        let pids = procs::running_from(&dir, &opts.proc_dir);
        if !pids.is_empty() {
            report.say(format!(
                "kept version {v}: pids {pids:?} still run from it (a later install or uninstall removes it)"
            ));
            continue;
        }
        match fs::remove_dir_all(&dir) {
            Ok(()) => report.say(format!("removed version {v} (unused)")),
            Err(e) => report.say(format!("could not remove {}: {e}", dir.display())),
        }
    }
}

/// `path` under the host root, back to the host's view.
fn host_view(opts: &Options, on_host: &Path) -> PathBuf {
    match on_host.strip_prefix(&opts.host_root) {
        Ok(rel) => Path::new("/").join(rel),
        Err(_) => on_host.to_path_buf(),
    }
}

fn describe(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Restarted(cmd) => format!("restarted containerd (`{cmd}`)"),
        Outcome::NotRestarted(why) => format!("containerd not restarted: {why}"),
    }
}
