//! clh-shim's configuration: one TOML file, one schema, validated at load.
//!
//! The file is looked up at `$CLH_SHIM_CONFIG`, else beside the running
//! binary ([`installed_path`]: what the node installer ships with each
//! version), else [`DEFAULT_PATH`]; when none exists the built-in defaults
//! apply. Unknown keys and bad values
//! are rejected with the key named, so a typo never silently falls back to a
//! default. `config/clh-shim.toml` is the documented example; a unit test
//! keeps it parseable and equal to the defaults.

mod error;
mod schema;

use std::path::{Path, PathBuf};

pub use error::ConfigError;
pub use schema::{
    BackendChoice, Config, GuestConfig, HypervisorConfig, LogLevel, RuntimeConfig, TimeoutsConfig,
    DEFAULT_QEMU_TB_SIZE_MIB,
};

/// Where the shim reads its configuration when `$CLH_SHIM_CONFIG` is unset.
pub const DEFAULT_PATH: &str = "/etc/clh-shim/config.toml";

/// Where an installed version keeps its configuration, relative to the
/// directory above the binary's `bin/`: `<version>/etc/clh-shim/config.toml`
/// for `<version>/bin/containerd-shim-clh-v2`.
pub const INSTALLED_RELATIVE_PATH: &str = "etc/clh-shim/config.toml";

/// The configuration the node installer placed beside `exe` (the resolved
/// path of the running binary, `/proc/self/exe`), if `exe` lies in a `bin/`
/// directory. The kernel resolves symlinks such as the installer's
/// `current` before the binary runs, so a shim always reads the
/// configuration of its own version, even while an upgrade swaps
/// `current` (a new binary never meets an old guest image, nor the reverse).
pub fn installed_path(exe: &Path) -> Option<PathBuf> {
    let bin = exe.parent()?;
    if bin.file_name()? != "bin" {
        return None;
    }
    Some(bin.parent()?.join(INSTALLED_RELATIVE_PATH))
}

/// The environment variable that overrides [`DEFAULT_PATH`].
pub const PATH_ENV: &str = "CLH_SHIM_CONFIG";

/// Where the configuration comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    File(PathBuf),
    BuiltInDefaults,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::File(p) => write!(f, "{}", p.display()),
            Source::BuiltInDefaults => write!(f, "built-in defaults (no {DEFAULT_PATH})"),
        }
    }
}

impl Config {
    /// Parses and validates a configuration text. `origin` names it in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_path_buf(),
            message: e.to_string(),
        })?;
        config
            .validate()
            .map_err(|(key, problem)| ConfigError::Invalid {
                path: origin.to_path_buf(),
                key,
                problem,
            })?;
        Ok(config)
    }

    /// Loads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Loads `$CLH_SHIM_CONFIG` (which must exist when set), else the
    /// running binary's [`installed_path`] if it exists, else
    /// [`DEFAULT_PATH`] if it exists, else the defaults.
    pub fn load_default() -> Result<(Config, Source), ConfigError> {
        if let Some(path) = std::env::var_os(PATH_ENV) {
            let path = PathBuf::from(path);
            return Ok((Self::load(&path)?, Source::File(path)));
        }
        let beside = std::env::current_exe()
            .ok()
            .and_then(|exe| installed_path(&exe));
        for path in beside.into_iter().chain([PathBuf::from(DEFAULT_PATH)]) {
            if path.exists() {
                return Ok((Self::load(&path)?, Source::File(path)));
            }
        }
        Ok((Config::default(), Source::BuiltInDefaults))
    }
}

#[cfg(test)]
mod tests;
