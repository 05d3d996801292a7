//! The Prometheus text exposition format (version 0.0.4), written and
//! read by hand: the shim writes it, the monitor reads the shims' output
//! back to add each pod's labels and merge the families.

use std::fmt::Write as _;

/// `Content-Type` of the format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A metric family's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// Builds an exposition: a family's `# HELP` and `# TYPE` once, then its
/// samples, all together (the format requires a family's lines to be
/// contiguous).
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts the family `name`; the samples that follow belong to it.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) -> &mut Self {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {}", kind.as_str());
        self
    }

    /// One sample line: `name{labels} value`.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) -> &mut Self {
        self.out.push_str(name);
        write_labels(&mut self.out, labels.iter().map(|(k, v)| (*k, *v)));
        self.out.push(' ');
        self.out.push_str(&format_value(value));
        self.out.push('\n');
        self
    }

    /// A family of one sample.
    pub fn single(&mut self, name: &str, kind: Kind, help: &str, value: f64) -> &mut Self {
        self.family(name, kind, help).sample(name, &[], value)
    }

    /// A histogram's samples (`_bucket` per bound, `_sum`, `_count`) under
    /// `labels`; `buckets` are cumulative, the last one +Inf.
    pub fn histogram(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        buckets: &[(f64, u64)],
        sum: f64,
        count: u64,
    ) -> &mut Self {
        let bucket = format!("{name}_bucket");
        for (le, n) in buckets {
            let le = format_value(*le);
            let mut with_le = labels.to_vec();
            with_le.push(("le", &le));
            self.sample(&bucket, &with_le, *n as f64);
        }
        self.sample(&format!("{name}_sum"), labels, sum);
        self.sample(&format!("{name}_count"), labels, count as f64)
    }

    pub fn finish(self) -> String {
        self.out
    }
}

/// A value as the format writes it: integers without a fraction, `+Inf`,
/// `-Inf`, `NaN`.
pub fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        // Display never uses an exponent and prints 3.0 as "3".
        format!("{v}")
    }
}

/// Escapes a label value: backslash, double quote and newline.
pub fn escape_label_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

fn write_labels<'a>(out: &mut String, labels: impl Iterator<Item = (&'a str, &'a str)>) {
    let mut first = true;
    for (k, v) in labels {
        out.push(if first { '{' } else { ',' });
        first = false;
        let _ = write!(out, "{k}=\"{}\"", escape_label_value(v));
    }
    if !first {
        out.push('}');
    }
}

/// One sample line, read back.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    /// The value and an optional timestamp, as written.
    pub rest: String,
}

impl Sample {
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The line, with `extra` labels first (those the sample already has
    /// are left as the sample has them).
    pub fn render_with(&self, extra: &[(&str, &str)]) -> String {
        let mut out = self.name.clone();
        let added = extra
            .iter()
            .filter(|(k, _)| self.label(k).is_none())
            .copied();
        let own = self.labels.iter().map(|(k, v)| (k.as_str(), v.as_str()));
        write_labels(&mut out, added.chain(own));
        out.push(' ');
        out.push_str(&self.rest);
        out
    }
}

/// Parses `name{k="v",...} value [timestamp]`; `None` for a line that is
/// not one.
pub fn parse_sample(line: &str) -> Option<Sample> {
    let line = line.trim();
    let name_end = line.find(['{', ' ', '\t']).unwrap_or(line.len());
    let name = &line[..name_end];
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    {
        return None;
    }
    let mut labels = Vec::new();
    let mut rest = &line[name_end..];
    if let Some(body) = rest.strip_prefix('{') {
        let mut s = body;
        loop {
            s = s.trim_start_matches([',', ' ', '\t']);
            if let Some(after) = s.strip_prefix('}') {
                rest = after;
                break;
            }
            let eq = s.find('=')?;
            let key = s[..eq].trim();
            let quoted = s[eq + 1..].trim_start().strip_prefix('"')?;
            let mut value = String::new();
            let mut it = quoted.char_indices();
            let end = loop {
                let (i, c) = it.next()?;
                match c {
                    '"' => break i,
                    '\\' => {
                        let (_, e) = it.next()?;
                        value.push(if e == 'n' { '\n' } else { e });
                    }
                    c => value.push(c),
                }
            };
            labels.push((key.to_string(), value));
            s = &quoted[end + 1..];
        }
    }
    let rest = rest.trim();
    if rest.is_empty() {
        return None;
    }
    Some(Sample {
        name: name.to_string(),
        labels,
        rest: rest.to_string(),
    })
}

/// Metric families gathered from several expositions: each family's
/// `# HELP`/`# TYPE` once, its samples from every source together.
#[derive(Debug, Default)]
pub struct Merged {
    /// (name, help and type lines, sample lines), in order of first sight.
    families: Vec<(String, Vec<String>, Vec<String>)>,
}

impl Merged {
    /// Adds every family of `text`, each sample with `extra` labels.
    pub fn add(&mut self, text: &str, extra: &[(&str, &str)]) {
        let mut current: Option<usize> = None;
        for line in text.lines() {
            if let Some(meta) = line.strip_prefix("# ") {
                let mut words = meta.splitn(3, ' ');
                let (Some(kw @ ("HELP" | "TYPE")), Some(name)) = (words.next(), words.next())
                else {
                    continue;
                };
                let i = self.family_index(name);
                let head = &mut self.families[i].1;
                if !head.iter().any(|l| l.starts_with(&format!("# {kw} "))) {
                    head.push(line.to_string());
                }
                current = Some(i);
                continue;
            }
            let Some(sample) = parse_sample(line) else {
                continue;
            };
            let i = match current {
                Some(i) if belongs(&sample.name, &self.families[i].0) => i,
                _ => self.family_index(&sample.name),
            };
            self.families[i].2.push(sample.render_with(extra));
        }
    }

    fn family_index(&mut self, name: &str) -> usize {
        match self.families.iter().position(|(n, _, _)| n == name) {
            Some(i) => i,
            None => {
                self.families
                    .push((name.to_string(), Vec::new(), Vec::new()));
                self.families.len() - 1
            }
        }
    }

    pub fn finish(self) -> String {
        let mut out = String::new();
        for (_, head, samples) in self.families {
            // HELP before TYPE, as written.
            for line in head.iter().chain(&samples) {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }
}

/// Whether sample `name` is of family `family` (a histogram's `_bucket`,
/// `_sum` and `_count` are).
fn belongs(name: &str, family: &str) -> bool {
    name == family
        || name
            .strip_prefix(family)
            .is_some_and(|s| matches!(s, "_bucket" | "_sum" | "_count" | "_total"))
}
