//! `make bench` (fs): file throughput and metadata operations through the
//! shared file system (virtio-fs) beside the same operations on the host
//! directly, in one run.
//!
//! - clh: a busybox container in our VM (`ctr run -d --runtime
//!   io.containerd.clh.v2 --mount type=bind,…,options=rbind:rw`); each step
//!   is a `ctr task exec … sh -c <script>` on the bind-mounted host
//!   directory. The VM boots once, before anything is measured.
//! - host (baseline): the same scripts run by the same busybox-static binary
//!   the image carries (its applets as symlinks on PATH), directly on a
//!   sibling directory of the same host file system. Not runc: a runc
//!   container's bind mount is the host file system itself, so it would add
//!   process start-up noise and nothing else.
//!
//! Timing happens inside the scripts, so VM boot and exec round trips are
//! excluded. A mark is the shell's builtin `read` of /proc/uptime and a
//! builtin `echo`: no fork, nothing that waits on another process to be
//! scheduled, so the stamps are synchronous with the work. Their resolution
//! is 10 ms, and a `date` fork per stamp would not do better here: on this
//! loaded 2-core host two back-to-back forked stamps lie 1 to 70 ms apart.
//! So every timed interval must last many ticks on both sides, and the
//! host is 10 to 100 times faster: the host repeats the same operations
//! more often ([`Plan`]: more 128 MiB files, more passes, more
//! create/unlink cycles), and rates are per byte or per operation. Each
//! figure is a median over rounds. The guest's clock is checked against
//! the host's: one exec's stamps may not span more than its wall time seen
//! from the host.
//!
//! Caching, step by step:
//! - write: `dd bs=1M conv=fsync` of 128 MiB files from /dev/zero, so on
//!   both sides the step ends with the data on the host's disk (without the
//!   fsync the host figure would be its page cache's speed).
//! - read, host cache evicted: after the write the bench evicts the files
//!   from the host page cache (fdatasync + POSIX_FADV_DONTNEED on those
//!   files alone, not drop_caches: others share this host). The guest page cache
//!   cannot serve it either: under virtiofsd's `--cache auto` the guest
//!   kernel drops a file's cached pages at every open (no FOPEN_KEEP_CACHE).
//! - read, host cache warm: the same files read 4 times more; the host page
//!   cache now holds them for both sides, so this isolates the virtio-fs
//!   path.
//! - create, stat, readdir, unlink of 2000 small files: the host's dentry
//!   and inode caches are warm for both sides. A guest keeps a looked-up
//!   name for 1 s under `--cache auto`, so each guest stat pass starts once
//!   that has lapsed (the script's `sleep 1.2`, outside the timed part: a
//!   cache TTL running out, not a synchronisation) and stats each name once,
//!   so every stat in it is a FUSE LOOKUP round trip. The host has no such
//!   cache to wait for and runs its passes back to back.
//!
//! Rounds alternate which side goes first, so both see the same host load.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clh_tests::containerd::{check, run_with_timeout, ContainerdVersion, PrivateContainerd};
use clh_tests::ctr::{busybox_tar, release_shim_dir, setup, BUSYBOX, RUNTIME};
use nix::fcntl::{posix_fadvise, PosixFadviseAdvice};

const ROUNDS: usize = 3;
const FILE_MIB: u64 = 128;
const FILES: u64 = 2000;
/// How much each side repeats the steps, so that every timed interval
/// lasts many /proc/uptime ticks on the faster host (see the module doc).
struct Plan {
    /// 128 MiB files written, then read cold, then read warm.
    files: u64,
    warm_passes: u64,
    /// Timed stat intervals, each after `ttl_sleep`, of `stat_passes`.
    stat_rounds: u64,
    stat_passes: u64,
    ttl_sleep: &'static str,
    readdir_passes: u64,
    /// create/unlink cycles over the 2000 files (stat and readdir: once).
    cycles: u64,
}

const CLH_PLAN: Plan = Plan {
    files: 1,
    warm_passes: 4,
    stat_rounds: 3,
    stat_passes: 1,
    ttl_sleep: "1.2",
    readdir_passes: 30,
    cycles: 1,
};

const HOST_PLAN: Plan = Plan {
    files: 4,
    warm_passes: 4,
    stat_rounds: 1,
    stat_passes: 200,
    ttl_sleep: "0",
    readdir_passes: 300,
    cycles: 10,
};

/// One step under TCG takes seconds to tens of seconds; past this it hangs.
const STEP_TIMEOUT: Duration = Duration::from_secs(300);
const CID: &str = "fsbench";
/// Where the host directory appears in the container.
const GUEST_DIR: &str = "/data";

/// Every script runs with the directory as `$1`. `mark begin|end <label>`
/// prints the label with the uptime (see the module doc).
const PRELUDE: &str = r#"set -eu
cd "$1"
mark() { read -r up idle < /proc/uptime; echo "$1 $2 $up"; }
"#;

const WRITE: &str = r#"rm -f big*
mark begin write
i=1
while [ $i -le @FILES@ ]; do
  out=$(dd if=/dev/zero of=big$i bs=1M count=@MIB@ conv=fsync 2>&1)
  case "$out" in *"@MIB@+0 records out"*) ;; *) echo "dd: $out" >&2; exit 1 ;; esac
  i=$((i + 1))
done
mark end write
"#;

/// busybox's dd prints records, not bytes: whole 1 MiB blocks, no partial.
const READ: &str = r#"mark begin @LABEL@
k=0
while [ $k -lt @PASSES@ ]; do
  i=1
  while [ $i -le @FILES@ ]; do
    out=$(dd if=big$i of=/dev/null bs=1M 2>&1)
    case "$out" in *"@MIB@+0 records in"*) ;; *) echo "dd: $out" >&2; exit 1 ;; esac
    i=$((i + 1))
  done
  k=$((k + 1))
done
mark end @LABEL@
"#;

/// The names are built before the timed part; `set -- *` lists the
/// directory with the shell's own glob (readdir, no stat).
const META: &str = r#"rm -rf m; mkdir m; cd m
names=""; i=1
while [ $i -le @N@ ]; do names="$names f$i"; i=$((i + 1)); done
c=0
while [ $c -lt @CYCLES@ ]; do
  mark begin create
  for n in $names; do echo x > $n; done
  mark end create
  if [ $c -eq 0 ]; then
    r=0
    while [ $r -lt @STAT_ROUNDS@ ]; do
      sleep @TTL@
      mark begin stat
      k=0
      while [ $k -lt @STAT_PASSES@ ]; do
        stat -c %s $names > /dev/null
        k=$((k + 1))
      done
      mark end stat
      r=$((r + 1))
    done
    mark begin readdir
    k=0
    while [ $k -lt @READDIR_PASSES@ ]; do
      set -- *
      [ $# -eq @N@ ] || { echo "readdir listed $# entries" >&2; exit 1; }
      k=$((k + 1))
    done
    mark end readdir
  fi
  mark begin unlink
  rm $names
  mark end unlink
  set -- *
  [ "$1" = "*" ] || { echo "unlink left $# entries" >&2; exit 1; }
  c=$((c + 1))
done
cd .. && rmdir m
"#;

#[derive(Clone, Copy, PartialEq)]
enum Side {
    Clh,
    Host,
}

/// The measured steps: label in the scripts, row title, unit.
const STEPS: [(&str, &str, &str); 7] = [
    ("write", "write 128 MiB files, dd conv=fsync", "MB/s"),
    ("read_cold", "read them, host cache evicted", "MB/s"),
    ("read_warm", "read them x4, host cache warm", "MB/s"),
    ("create", "create 2000 files (echo x > f)", "op/s"),
    ("stat", "stat them (guest: after 1 s TTL)", "op/s"),
    ("readdir", "readdir, entries listed", "op/s"),
    ("unlink", "unlink them (one rm)", "op/s"),
];

impl Plan {
    /// What one timed total of `label` stands for: MB or operations.
    fn work(&self, label: &str) -> f64 {
        let n = FILES as f64;
        match label {
            "write" | "read_cold" => MB * self.files as f64,
            "read_warm" => MB * (self.files * self.warm_passes) as f64,
            "create" | "unlink" => n * self.cycles as f64,
            "stat" => n * (self.stat_rounds * self.stat_passes) as f64,
            _ => n * self.readdir_passes as f64,
        }
    }

    fn describe(&self) -> String {
        format!(
            "{} x 128 MiB files; stat {} x {} passes; readdir {} passes; {} create/unlink cycles",
            self.files, self.stat_rounds, self.stat_passes, self.readdir_passes, self.cycles
        )
    }
}

const MB: f64 = (FILE_MIB * 1024 * 1024) as f64 / 1e6;

fn main() -> Result<()> {
    let s = setup()?;
    let config = s.config.display().to_string();
    let mut ctd = PrivateContainerd::start_with_env(
        ContainerdVersion::V2,
        Some(&release_shim_dir()?),
        &[("CLH_SHIM_CONFIG", &config)],
    )?;
    let tmpdir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    ctd.import_image(&busybox_tar(tmpdir)?, BUSYBOX)?;
    let work = tempfile::Builder::new()
        .prefix("fsbench-")
        .tempdir_in(tmpdir)?;
    let bench = Bench::new(&ctd, work.path())?;

    let mount = format!(
        "type=bind,src={},dst={GUEST_DIR},options=rbind:rw",
        bench.vm_dir.display()
    );
    let args = ["run", "-d", "--runtime", RUNTIME, "--mount", &mount];
    let out = ctd.ctr_in(
        ctd.namespace(),
        &[&args[..], &[BUSYBOX, CID, "sleep", "3600"]].concat(),
        clh_tests::ctr::VM_DEADLINE,
    )?;
    check(&out, "ctr run -d")?;
    let host_fs = bench.host_fs();
    let guest = bench.exec(
        "echo \"$(nproc) vCPU, $(awk '/MemTotal/ {print $2}' /proc/meminfo) KiB MemTotal, kernel $(uname -r)\"",
    )?;
    let guest = String::from_utf8_lossy(&guest.stdout).trim().to_string();

    let mut samples: BTreeMap<(&str, bool), Vec<f64>> = BTreeMap::new();
    for round in 0..ROUNDS {
        let order = if round % 2 == 0 {
            [Side::Clh, Side::Host]
        } else {
            [Side::Host, Side::Clh]
        };
        for side in order {
            let plan = if side == Side::Clh {
                &CLH_PLAN
            } else {
                &HOST_PLAN
            };
            for (label, secs) in bench.round(side, plan)? {
                samples
                    .entry((label, side == Side::Clh))
                    .or_default()
                    .push(plan.work(label) / secs);
            }
        }
    }

    drop(bench);
    clh_tests::ctr::kill_and_remove(&ctd, CID)?;
    ctd.stop()?;
    let mut leaks = clh_tests::ctr::leaks(&ctd, &s.state_dir);
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    let needle = work.path().display().to_string();
    leaks.extend(
        mounts
            .lines()
            .filter(|l| l.contains(&needle))
            .map(String::from),
    );
    ensure!(leaks.is_empty(), "left behind: {leaks:#?}");

    report(&samples, &guest, &host_fs);
    println!("cleanup: containerd stopped, no shim, VM process, mount or state left");
    Ok(())
}

/// Both sides' directories and the host's busybox applets.
struct Bench<'a> {
    ctd: &'a PrivateContainerd,
    vm_dir: PathBuf,
    host_dir: PathBuf,
    host_bin: PathBuf,
    execs: std::cell::Cell<u32>,
}

impl<'a> Bench<'a> {
    fn new(ctd: &'a PrivateContainerd, work: &Path) -> Result<Self> {
        let bench = Bench {
            ctd,
            vm_dir: work.join("vm"),
            host_dir: work.join("host"),
            host_bin: work.join("bin"),
            execs: Default::default(),
        };
        for dir in [&bench.vm_dir, &bench.host_dir, &bench.host_bin] {
            std::fs::create_dir(dir)?;
        }
        // The busybox the image was built from (build-busybox-image.sh).
        let busybox = clh_tests::containerd::cache_dir().join("busybox-static/bin/busybox");
        let list = Command::new(&busybox).arg("--list").output()?;
        check(&list, "busybox --list")?;
        for applet in String::from_utf8_lossy(&list.stdout).lines() {
            std::os::unix::fs::symlink(&busybox, bench.host_bin.join(applet))?;
        }
        Ok(bench)
    }

    /// One round on `side`: every step once; the seconds each step took.
    fn round(&self, side: Side, plan: &Plan) -> Result<Vec<(&'static str, f64)>> {
        let fill = |script: &str, label: &str, passes: u64| {
            script
                .replace("@MIB@", &FILE_MIB.to_string())
                .replace("@FILES@", &plan.files.to_string())
                .replace("@LABEL@", label)
                .replace("@PASSES@", &passes.to_string())
                .replace("@N@", &FILES.to_string())
                .replace("@CYCLES@", &plan.cycles.to_string())
                .replace("@STAT_ROUNDS@", &plan.stat_rounds.to_string())
                .replace("@STAT_PASSES@", &plan.stat_passes.to_string())
                .replace("@TTL@", plan.ttl_sleep)
                .replace("@READDIR_PASSES@", &plan.readdir_passes.to_string())
        };
        let dir = if side == Side::Clh {
            &self.vm_dir
        } else {
            &self.host_dir
        };
        let bigs: Vec<PathBuf> = (1..=plan.files)
            .map(|i| dir.join(format!("big{i}")))
            .collect();
        let mut totals = self.run(side, &fill(WRITE, "", 0))?;
        for big in &bigs {
            evict(big)?;
        }
        totals.extend(self.run(side, &fill(READ, "read_cold", 1))?);
        totals.extend(self.run(side, &fill(READ, "read_warm", plan.warm_passes))?);
        totals.extend(self.run(side, &fill(META, "", 0))?);
        for big in &bigs {
            std::fs::remove_file(big)?;
        }
        STEPS
            .iter()
            .map(|s| {
                let secs = totals
                    .get(s.0)
                    .with_context(|| format!("no {} timed", s.0))?;
                Ok((s.0, *secs))
            })
            .collect()
    }

    /// Runs a script on `side`; the seconds between each label's begin and
    /// end marks, summed over its passes.
    fn run(&self, side: Side, script: &str) -> Result<BTreeMap<String, f64>> {
        let script = format!("{PRELUDE}{script}");
        let started = Instant::now();
        let out = match side {
            Side::Clh => self.exec(&script)?,
            Side::Host => {
                let mut cmd = Command::new(self.host_bin.join("sh"));
                cmd.args(["-c", &script, "sh"])
                    .arg(&self.host_dir)
                    .env_clear()
                    .env("PATH", &self.host_bin);
                let out = run_with_timeout(cmd, STEP_TIMEOUT)?;
                check(&out, "host script")?;
                out
            }
        };
        spans(&String::from_utf8_lossy(&out.stdout), started.elapsed())
    }

    /// `ctr task exec` of `sh -c script sh /data` in the container.
    fn exec(&self, script: &str) -> Result<std::process::Output> {
        self.execs.set(self.execs.get() + 1);
        let id = format!("e{}", self.execs.get());
        let args = ["task", "exec", "--exec-id", &id, CID, "sh", "-c", script];
        let out = self.ctd.ctr_in(
            self.ctd.namespace(),
            &[&args[..], &["sh", GUEST_DIR]].concat(),
            STEP_TIMEOUT,
        )?;
        check(&out, "ctr task exec")?;
        Ok(out)
    }

    /// The host directory's file system, as findmnt names it.
    fn host_fs(&self) -> String {
        Command::new("findmnt")
            .args(["-no", "FSTYPE,SOURCE,OPTIONS", "-T"])
            .arg(&self.host_dir)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_else(|_| "unknown file system".into())
    }
}

/// Parses the marks (`begin|end <label> <uptime>`) into the summed
/// seconds per label. The stamps may not span more than `wall`, the host's
/// view of the whole command (plus one tick of /proc/uptime): a guest clock
/// running fast would inflate every rate.
fn spans(output: &str, wall: Duration) -> Result<BTreeMap<String, f64>> {
    let (mut open, mut totals) = (BTreeMap::new(), BTreeMap::new());
    let (mut first, mut last) = (None, 0u64);
    for line in output.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let [mark, label, stamp] = words[..] else {
            bail!("unexpected line {line:?} in:\n{output}");
        };
        // Centiseconds: /proc/uptime prints exactly two decimals.
        let at = match stamp.split_once('.') {
            Some((secs, cs)) if cs.len() == 2 => secs.parse::<u64>()? * 100 + cs.parse::<u64>()?,
            _ => bail!("bad uptime {stamp:?} in {line:?}"),
        };
        first.get_or_insert(at);
        last = at;
        match mark {
            "begin" => ensure!(open.insert(label, at).is_none(), "{label} begun twice"),
            "end" => {
                let began = open
                    .remove(label)
                    .with_context(|| format!("{label} ended, never begun"))?;
                // Zero ticks would be an infinite rate: the step was far
                // shorter than the design gives it (see the module doc).
                ensure!(
                    at > began,
                    "{label} took less than one 10 ms tick:\n{output}"
                );
                *totals.entry(label.to_string()).or_insert(0.0) += (at - began) as f64 / 100.0;
            }
            _ => bail!("unexpected line {line:?} in:\n{output}"),
        }
    }
    ensure!(open.is_empty(), "marks without an end: {open:?}");
    let spanned = Duration::from_millis(10 * (last - first.unwrap_or(last)));
    ensure!(
        spanned <= wall + Duration::from_millis(10),
        "the stamps span {spanned:?}, more than the command's {wall:?} on the host clock"
    );
    Ok(totals)
}

/// Makes the next read of `file` come from the disk: flushes it and drops
/// its pages (this file's only) from the host page cache.
fn evict(file: &Path) -> Result<()> {
    let f = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
    f.sync_data()?;
    posix_fadvise(&f, 0, 0, PosixFadviseAdvice::POSIX_FADV_DONTNEED)?;
    Ok(())
}

fn report(samples: &BTreeMap<(&str, bool), Vec<f64>>, guest: &str, host_fs: &str) {
    println!(
        "fs benchmark: {ROUNDS} rounds; busybox-static 1.35 on both sides (the image's binary)"
    );
    println!("clh  plan: {}", CLH_PLAN.describe());
    println!("host plan: {}", HOST_PLAN.describe());
    println!("clh:  QEMU TCG guest ({guest}), virtiofsd --cache auto, host dir bind-mounted rw");
    println!("host: the same scripts on a sibling host directory ({host_fs})");
    println!();
    println!(
        "{:<38} {:>16} {:>16} {:>9}   min-max clh | host",
        "", "clh median", "host median", "clh/host"
    );
    let mut summary = Vec::new();
    for (label, title, unit) in STEPS {
        let (clh, host) = (&samples[&(label, true)], &samples[&(label, false)]);
        let ratio = median(clh) / median(host);
        println!(
            "{title:<38} {:>11.1} {unit} {:>11.1} {unit} {ratio:>9.4}   {:.1}-{:.1} | {:.1}-{:.1}",
            median(clh),
            median(host),
            min(clh),
            max(clh),
            min(host),
            max(host),
        );
        summary.push(format!("{label} {ratio:.3}"));
    }
    println!("fs ratio clh/host (median): {}", summary.join(", "));
    println!(
        "These are QEMU TCG figures on a shared 2-core host: the ratio to the host is the \
         figure to track, not the absolute rates."
    );
}

fn median(samples: &[f64]) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

fn min(samples: &[f64]) -> f64 {
    samples.iter().copied().fold(f64::MAX, f64::min)
}

fn max(samples: &[f64]) -> f64 {
    samples.iter().copied().fold(f64::MIN, f64::max)
}
