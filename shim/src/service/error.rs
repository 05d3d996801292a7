//! The Task service's errors, and the one place they become ttrpc codes.

use ttrpc::Code;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Unimplemented(String),
    #[error("{0}")]
    DeadlineExceeded(String),
    /// Anything else; the chain is printed with `{:#}`.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn code(&self) -> Code {
        match self {
            Error::NotFound(_) => Code::NOT_FOUND,
            Error::AlreadyExists(_) => Code::ALREADY_EXISTS,
            Error::InvalidArgument(_) => Code::INVALID_ARGUMENT,
            Error::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
            Error::Unimplemented(_) => Code::UNIMPLEMENTED,
            Error::DeadlineExceeded(_) => Code::DEADLINE_EXCEEDED,
            Error::Internal(_) => Code::INTERNAL,
        }
    }
}

/// An agent call that failed: its own status code survives (the agent maps
/// its errors the same way), a timeout is DeadlineExceeded.
pub fn agent_error(method: &str, e: ttrpc::Error) -> Error {
    match e {
        ttrpc::Error::RpcStatus(status) => {
            let msg = format!("agent {method}: {}", status.message());
            match status.code() {
                Code::NOT_FOUND => Error::NotFound(msg),
                Code::ALREADY_EXISTS => Error::AlreadyExists(msg),
                Code::INVALID_ARGUMENT => Error::InvalidArgument(msg),
                Code::FAILED_PRECONDITION => Error::FailedPrecondition(msg),
                Code::UNIMPLEMENTED => Error::Unimplemented(msg),
                Code::DEADLINE_EXCEEDED => Error::DeadlineExceeded(msg),
                _ => Error::Internal(anyhow::anyhow!(msg)),
            }
        }
        other => Error::Internal(anyhow::Error::new(other).context(format!("agent {method}"))),
    }
}

impl From<Error> for ttrpc::Error {
    fn from(e: Error) -> Self {
        let message = match &e {
            Error::Internal(inner) => format!("{inner:#}"),
            other => other.to_string(),
        };
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), message))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(e: Error) -> (Code, String) {
        match ttrpc::Error::from(e) {
            ttrpc::Error::RpcStatus(s) => (s.code(), s.message().to_string()),
            other => panic!("not a status: {other:?}"),
        }
    }

    #[test]
    fn every_variant_keeps_its_code_and_message() {
        let cases = [
            (Error::NotFound("a".into()), Code::NOT_FOUND),
            (Error::AlreadyExists("a".into()), Code::ALREADY_EXISTS),
            (Error::InvalidArgument("a".into()), Code::INVALID_ARGUMENT),
            (
                Error::FailedPrecondition("a".into()),
                Code::FAILED_PRECONDITION,
            ),
            (Error::Unimplemented("a".into()), Code::UNIMPLEMENTED),
            (Error::DeadlineExceeded("a".into()), Code::DEADLINE_EXCEEDED),
        ];
        for (err, code) in cases {
            assert_eq!(status(err), (code, "a".to_string()));
        }
    }

    #[test]
    fn internal_errors_carry_their_whole_chain() {
        let e = anyhow::anyhow!("root cause").context("starting the VM");
        let (code, msg) = status(Error::Internal(e));
        assert_eq!(code, Code::INTERNAL);
        assert_eq!(msg, "starting the VM: root cause");
    }

    #[test]
    fn agent_status_codes_survive() {
        let e = ttrpc::Error::RpcStatus(ttrpc::get_status(Code::NOT_FOUND, "no such process"));
        let (code, msg) = status(agent_error("WaitProcess", e));
        assert_eq!(code, Code::NOT_FOUND);
        assert_eq!(msg, "agent WaitProcess: no such process");
    }
}
