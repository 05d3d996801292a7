//! The VM's own name and time (SetIdentity), set by the host right after
//! the RNG seed on every VM. A VM restored from a template resumes with the
//! template's hostname and wall clock (its clock stood still while the
//! template lay on disk); a booted one has only the RTC's whole seconds.

use clh_agent_protocol::{is_valid_hostname, IdentityRequest, HOSTNAME_RULE};
use nix::sys::time::TimeSpec;
use nix::time::{clock_settime, ClockId};

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("hostname {name:?} refused: {HOSTNAME_RULE}")]
    BadHostname { name: String },
    #[error("realtime_unix_ns {0} is before the Unix epoch")]
    BadTime(i64),
    #[error("sethostname({name:?}) failed")]
    SetHostname {
        name: String,
        #[source]
        source: nix::Error,
    },
    #[error("clock_settime(CLOCK_REALTIME) failed")]
    SetClock(#[source] nix::Error),
}

impl IdentityError {
    /// Whether the request, not the guest, is at fault.
    pub fn is_invalid_argument(&self) -> bool {
        matches!(self, Self::BadHostname { .. } | Self::BadTime(_))
    }
}

/// Checks the whole request, then sets the clock and the hostname.
pub fn apply(req: &IdentityRequest) -> Result<(), IdentityError> {
    if !req.hostname.is_empty() && !is_valid_hostname(&req.hostname) {
        return Err(IdentityError::BadHostname {
            name: req.hostname.clone(),
        });
    }
    if req.realtime_unix_ns < 0 {
        return Err(IdentityError::BadTime(req.realtime_unix_ns));
    }
    if req.realtime_unix_ns > 0 {
        let ns = req.realtime_unix_ns;
        let now = TimeSpec::new(ns / 1_000_000_000, ns % 1_000_000_000);
        clock_settime(ClockId::CLOCK_REALTIME, now).map_err(IdentityError::SetClock)?;
    }
    if !req.hostname.is_empty() {
        nix::unistd::sethostname(&req.hostname).map_err(|source| IdentityError::SetHostname {
            name: req.hostname.clone(),
            source,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_request_is_refused_before_anything_is_set() {
        let bad_name = IdentityRequest {
            hostname: "a b".into(),
            realtime_unix_ns: 1,
            ..Default::default()
        };
        let err = apply(&bad_name).unwrap_err();
        assert!(err.is_invalid_argument(), "{err}");
        assert!(err.to_string().contains("1 to 64 characters"), "{err}");
        let bad_time = IdentityRequest {
            realtime_unix_ns: -1,
            ..Default::default()
        };
        assert!(apply(&bad_time).unwrap_err().is_invalid_argument());
    }

    #[test]
    fn an_empty_request_changes_nothing() {
        apply(&IdentityRequest::default()).unwrap();
    }
}
