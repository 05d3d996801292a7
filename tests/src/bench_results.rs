//! What a benchmark run leaves behind, so that the trend is visible across
//! commits: per run, `<results>/<UTC time>-<git rev>/<bench>.tsv` (every
//! figure beside its baseline from the same run) and `<bench>.svg` (ours
//! over the baseline, one bar per figure); across runs, `<results>/
//! history.tsv` (one line per figure per run) and `<results>/<bench>-
//! trend.svg` (each figure's ratio over the runs). `<results>` is
//! `$CLH_BENCH_RESULTS`, else `bench-results/` in the workspace.

use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result};

/// One figure: ours and the baseline measured in the same run.
#[derive(Debug, Clone, PartialEq)]
pub struct Figure {
    pub name: String,
    pub unit: String,
    pub ours: f64,
    pub baseline: f64,
    /// What the baseline is (`runc`, `host`, `Debian kernel`).
    pub baseline_name: String,
}

impl Figure {
    pub fn new(name: &str, unit: &str, ours: f64, baseline: f64, baseline_name: &str) -> Figure {
        Figure {
            name: name.into(),
            unit: unit.into(),
            ours,
            baseline,
            baseline_name: baseline_name.into(),
        }
    }

    pub fn ratio(&self) -> f64 {
        if self.baseline == 0.0 {
            f64::NAN
        } else {
            self.ours / self.baseline
        }
    }
}

pub fn results_dir() -> PathBuf {
    std::env::var_os("CLH_BENCH_RESULTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::ctr::workspace().join("bench-results"))
}

/// Writes this run's table and plot for `bench`, appends to the history
/// and redraws the trend; returns the run's directory.
pub fn record(bench: &str, figures: &[Figure]) -> Result<PathBuf> {
    let root = results_dir();
    let now = Command::new("date")
        .args(["-u", "+%Y%m%dT%H%M%SZ"])
        .output()?;
    let now = String::from_utf8_lossy(&now.stdout).trim().to_owned();
    let rev = Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .current_dir(crate::ctr::workspace())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let run = root.join(format!("{now}-{rev}"));
    fs::create_dir_all(&run).with_context(|| format!("creating {}", run.display()))?;
    let mut table = String::from("figure\tunit\tours\tbaseline\tbaseline_is\tratio\n");
    for f in figures {
        let _ = writeln!(
            table,
            "{}\t{}\t{:.4}\t{:.4}\t{}\t{:.4}",
            f.name,
            f.unit,
            f.ours,
            f.baseline,
            f.baseline_name,
            f.ratio()
        );
    }
    fs::write(run.join(format!("{bench}.tsv")), &table)?;
    fs::write(run.join(format!("{bench}.svg")), bars(bench, &rev, figures))?;
    let history = root.join("history.tsv");
    let new = !history.exists();
    let mut h = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&history)?;
    if new {
        writeln!(h, "time\trev\tbench\tfigure\tunit\tours\tbaseline\tratio")?;
    }
    for f in figures {
        writeln!(
            h,
            "{now}\t{rev}\t{bench}\t{}\t{}\t{:.4}\t{:.4}\t{:.4}",
            f.name,
            f.unit,
            f.ours,
            f.baseline,
            f.ratio()
        )?;
    }
    drop(h);
    let text = fs::read_to_string(&history)?;
    fs::write(root.join(format!("{bench}-trend.svg")), trend(bench, &text))?;
    println!(
        "results: {} ({bench}.tsv, {bench}.svg); trend: {}",
        run.display(),
        root.join(format!("{bench}-trend.svg")).display()
    );
    Ok(run)
}

const ROW: f64 = 26.0;
const LEFT: f64 = 330.0;
const WIDTH: f64 = 420.0;

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// One bar per figure: ours / baseline on a log scale from 1/100 to 100,
/// 1 (as good as the baseline) in the middle.
fn bars(bench: &str, rev: &str, figures: &[Figure]) -> String {
    let height = 60.0 + ROW * figures.len() as f64;
    let x = |ratio: f64| LEFT + WIDTH / 2.0 + (ratio.log10().clamp(-2.0, 2.0) / 2.0) * WIDTH / 2.0;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <text x=\"10\" y=\"20\" font-size=\"14\">{} at {}: ours / baseline (log scale, 1 = same)</text>\n\
         <line x1=\"{mid}\" y1=\"30\" x2=\"{mid}\" y2=\"{height}\" stroke=\"#888\"/>\n",
        escape(bench),
        escape(rev),
        w = LEFT + WIDTH + 90.0,
        mid = x(1.0),
    );
    for (i, f) in figures.iter().enumerate() {
        let y = 40.0 + ROW * i as f64;
        let r = f.ratio();
        let (a, b) = (x(1.0), if r.is_finite() { x(r) } else { x(1.0) });
        let _ = write!(
            svg,
            "<text x=\"10\" y=\"{ty}\">{} ({} vs {})</text>\n\
             <rect x=\"{}\" y=\"{y}\" width=\"{}\" height=\"16\" fill=\"#4a7\"/>\n\
             <text x=\"{tx}\" y=\"{ty}\">{r:.2}x</text>\n",
            escape(&f.name),
            escape(&f.unit),
            escape(&f.baseline_name),
            a.min(b),
            (b - a).abs().max(1.0),
            ty = y + 12.0,
            tx = LEFT + WIDTH + 10.0,
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// Each figure of `bench` in the history: its ratio per run, a polyline.
fn trend(bench: &str, history: &str) -> String {
    let rows: Vec<Vec<&str>> = history
        .lines()
        .skip(1)
        .map(|l| l.split('\t').collect::<Vec<_>>())
        .filter(|c| c.len() == 8 && c[2] == bench)
        .collect();
    let mut runs: Vec<&str> = Vec::new();
    let mut names: Vec<&str> = Vec::new();
    for c in &rows {
        if !runs.contains(&c[0]) {
            runs.push(c[0]);
        }
        if !names.contains(&c[3]) {
            names.push(c[3]);
        }
    }
    let (w, h) = (760.0, 320.0 + 16.0 * names.len() as f64);
    let span = (runs.len().max(2) - 1) as f64;
    let px = |run: usize| 60.0 + 660.0 * run as f64 / span;
    let py = |ratio: f64| 160.0 - ratio.log10().clamp(-2.0, 2.0) * 60.0;
    let colors = [
        "#d33", "#37c", "#4a7", "#a5c", "#e90", "#399", "#777", "#b66",
    ];
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <text x=\"10\" y=\"20\" font-size=\"14\">{}: ours / baseline per run (log scale; {} runs)</text>\n\
         <line x1=\"60\" y1=\"{one}\" x2=\"720\" y2=\"{one}\" stroke=\"#888\"/><text x=\"20\" y=\"{one}\">1x</text>\n",
        escape(bench),
        runs.len(),
        one = py(1.0),
    );
    for (n, name) in names.iter().enumerate() {
        let color = colors[n % colors.len()];
        let points: Vec<String> = rows
            .iter()
            .filter(|c| c[3] == *name)
            .filter_map(|c| {
                let run = runs.iter().position(|r| *r == c[0])?;
                let ratio: f64 = c[7]
                    .parse()
                    .ok()
                    .filter(|r: &f64| r.is_finite() && *r > 0.0)?;
                Some(format!("{:.1},{:.1}", px(run), py(ratio)))
            })
            .collect();
        let _ = write!(
            svg,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>\n\
             <text x=\"60\" y=\"{}\" fill=\"{color}\">{}</text>\n",
            points.join(" "),
            300.0 + 16.0 * n as f64,
            escape(name)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_writes_its_table_plot_history_and_trend() {
        let dir = tempfile::tempdir().unwrap();
        std::env::set_var("CLH_BENCH_RESULTS", dir.path());
        let figures = [
            Figure::new("pod start p50", "s", 6.0, 0.2, "runc"),
            Figure::new("stdout", "MB/s", 40.0, 150.0, "runc"),
        ];
        let run = record("unit", &figures).unwrap();
        record("unit", &figures).unwrap();
        let table = fs::read_to_string(run.join("unit.tsv")).unwrap();
        assert!(
            table.contains("pod start p50\ts\t6.0000\t0.2000\truns\t30.0000")
                || table.contains("pod start p50\ts\t6.0000\t0.2000\trunc\t30.0000"),
            "{table}"
        );
        assert!(fs::read_to_string(run.join("unit.svg"))
            .unwrap()
            .contains("30.00x"));
        let history = fs::read_to_string(dir.path().join("history.tsv")).unwrap();
        assert_eq!(
            history.lines().count(),
            5,
            "a header and two runs of two figures:\n{history}"
        );
        let trend = fs::read_to_string(dir.path().join("unit-trend.svg")).unwrap();
        assert_eq!(trend.matches("<polyline").count(), 2);
    }
}
