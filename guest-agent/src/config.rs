//! The agent's configuration, parsed once from the kernel command line and
//! passed down by value (no global statics: every consumer states what it
//! needs, and tests build a `Config` directly).

use crate::cmdline::{self, Param};
use clh_agent_protocol::AGENT_VSOCK_PORT;
use tracing::Level;

/// A known `clh.*` option with a value we cannot use. The shim writes these,
/// so a bad value is a host bug: fail loudly instead of guessing.
#[derive(Debug, thiserror::Error)]
#[error("kernel command line option {key}={value:?}: {reason}")]
pub struct ConfigError {
    key: &'static str,
    value: String,
    reason: &'static str,
}

/// Hostname used when the host does not pass `clh.hostname=`.
pub const DEFAULT_HOSTNAME: &str = "clh";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// `clh.hostname=`: the guest's hostname.
    pub hostname: String,
    /// `clh.seed=<hex>`: entropy from the host, credited to the guest RNG.
    pub seed: Option<Vec<u8>>,
    /// `clh.debug`: log at debug level instead of info.
    pub log_level: Level,
    /// `clh.port=`: the vsock port to serve ttrpc on.
    pub port: u32,
    /// Every word of the command line, kept for module parameters.
    pub params: Vec<Param>,
    /// Unknown `clh.*` options; logged once logging is up. Unknown options
    /// are tolerated so that a newer host can pass hints an older image
    /// ignores; malformed values of known options are errors instead.
    pub warnings: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            hostname: DEFAULT_HOSTNAME.to_owned(),
            seed: None,
            log_level: Level::INFO,
            port: AGENT_VSOCK_PORT,
            params: Vec::new(),
            warnings: Vec::new(),
        }
    }
}

impl Config {
    /// Builds the configuration from the text of `/proc/cmdline`.
    pub fn from_cmdline(text: &str) -> Result<Self, ConfigError> {
        let mut config = Config {
            params: cmdline::parse(text),
            ..Config::default()
        };
        for param in config.params.clone() {
            let value = param.value.as_deref();
            match (param.key.as_str(), value) {
                ("clh.hostname", Some(v)) if !v.is_empty() => config.hostname = v.to_owned(),
                ("clh.seed", Some(v)) => match decode_hex(v) {
                    Some(seed) if !seed.is_empty() => config.seed = Some(seed),
                    _ => return Err(bad("clh.seed", v, "not a non-empty hex string")),
                },
                ("clh.debug", None | Some("1" | "true" | "")) => config.log_level = Level::DEBUG,
                ("clh.port", Some(v)) => match v.parse() {
                    Ok(port) => config.port = port,
                    Err(_) => return Err(bad("clh.port", v, "not a port number")),
                },
                (key, _) if key.starts_with("clh.") => config
                    .warnings
                    .push(format!("unknown or malformed option {key:?}, ignored")),
                _ => {}
            }
        }
        Ok(config)
    }
}

fn bad(key: &'static str, value: &str, reason: &'static str) -> ConfigError {
    ConfigError {
        key,
        value: value.to_owned(),
        reason,
    }
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_without_clh_options() {
        let c = Config::from_cmdline("console=ttyS0 quiet").unwrap();
        assert_eq!(c.hostname, "clh");
        assert_eq!(c.seed, None);
        assert_eq!(c.log_level, Level::INFO);
        assert_eq!(c.port, AGENT_VSOCK_PORT);
        assert!(c.warnings.is_empty());
    }

    #[test]
    fn reads_all_options() {
        let c = Config::from_cmdline("clh.hostname=pod1 clh.seed=00ff10 clh.debug clh.port=2000")
            .unwrap();
        assert_eq!(c.hostname, "pod1");
        assert_eq!(c.seed, Some(vec![0x00, 0xff, 0x10]));
        assert_eq!(c.log_level, Level::DEBUG);
        assert_eq!(c.port, 2000);
    }

    #[test]
    fn bad_values_are_errors() {
        let e = Config::from_cmdline("clh.seed=xyz").unwrap_err();
        assert!(e.to_string().contains("clh.seed=\"xyz\""), "{e}");
        assert!(Config::from_cmdline("clh.port=http").is_err());
    }

    #[test]
    fn unknown_options_only_warn() {
        let c = Config::from_cmdline("clh.bogus=1 clh.hostname").unwrap();
        assert_eq!(c.warnings.len(), 2);
        assert_eq!(c.hostname, DEFAULT_HOSTNAME);
    }

    #[test]
    fn hex_decoding() {
        assert_eq!(decode_hex("aB01"), Some(vec![0xab, 0x01]));
        assert_eq!(decode_hex("abc"), None);
        assert_eq!(decode_hex("zz"), None);
    }
}
