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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_without_clh_options() {
        let c = Config::from_cmdline("console=ttyS0 quiet").unwrap();
        assert_eq!(c.hostname, "clh");
        assert_eq!(c.log_level, Level::INFO);
        assert_eq!(c.port, AGENT_VSOCK_PORT);
        assert!(c.warnings.is_empty());
    }

    #[test]
    fn reads_all_options() {
        let c = Config::from_cmdline("clh.hostname=pod1 clh.debug clh.port=2000").unwrap();
        assert_eq!(c.hostname, "pod1");
        assert_eq!(c.log_level, Level::DEBUG);
        assert_eq!(c.port, 2000);
    }

    #[test]
    fn bad_values_are_errors() {
        let e = Config::from_cmdline("clh.port=http").unwrap_err();
        assert!(e.to_string().contains("clh.port=\"http\""), "{e}");
    }

    #[test]
    fn unknown_options_only_warn() {
        let c = Config::from_cmdline("clh.bogus=1 clh.hostname").unwrap();
        assert_eq!(c.warnings.len(), 2);
        assert_eq!(c.hostname, DEFAULT_HOSTNAME);
    }

    #[test]
    fn a_seed_on_the_command_line_is_not_taken() {
        // The RNG seed comes over vsock (SeedRandom): a command line is
        // readable by every container through /proc/cmdline.
        let c = Config::from_cmdline("clh.seed=00ff10").unwrap();
        assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
    }
}
