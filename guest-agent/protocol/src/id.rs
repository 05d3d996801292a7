//! The one rule for container, sandbox and exec ids, on both sides.
//!
//! Ids name directories and cgroups on the host and in the guest, and ride
//! in the stdio header, so they are kept to a safe alphabet: 1 to
//! [`MAX_ID_LEN`] bytes of `[A-Za-z0-9_.-]`, not starting with `.` (which
//! also excludes `.` and `..`). Every id containerd and CRI produce passes:
//! 64-hex sandbox and container ids, CRI's 64-hex exec ids, and the exec
//! ids of ctr (containerd's own rule: alphanumeric first).

/// Longest id, in bytes. 64, what the shim has always taken (containerd
/// takes up to 76): the sandbox id names the VM directory, whose socket
/// paths must fit in `sun_path`, and the agent only sees ids the shim
/// passed on.
pub const MAX_ID_LEN: usize = 64;

/// What an id may be, for error messages.
pub const ID_RULE: &str =
    "an id is 1 to 64 characters of [A-Za-z0-9_.-] and does not start with '.'";

/// Why an id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("it is empty; {}", ID_RULE)]
    Empty,
    #[error("it is {len} bytes long; {}", ID_RULE)]
    TooLong { len: usize },
    #[error("it starts with '.'; {}", ID_RULE)]
    LeadingDot,
    #[error("it contains {ch:?}; {}", ID_RULE)]
    BadChar { ch: char },
}

/// Checks `id` against the rule above.
pub fn check_id(id: &str) -> Result<(), IdError> {
    if id.is_empty() {
        return Err(IdError::Empty);
    }
    if id.len() > MAX_ID_LEN {
        return Err(IdError::TooLong { len: id.len() });
    }
    if id.starts_with('.') {
        return Err(IdError::LeadingDot);
    }
    match id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        Some(ch) => Err(IdError::BadChar { ch }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_containerd_and_cri_produce_pass() {
        let hex64 = "0123456789abcdef".repeat(4);
        for good in [
            hex64.as_str(),
            "pod-1",
            "a.b_c",
            "exec-3f2a",
            "A..b",
            "x",
            &"x".repeat(MAX_ID_LEN),
        ] {
            assert_eq!(check_id(good), Ok(()), "{good:?} refused");
        }
    }

    #[test]
    fn ids_that_could_escape_or_break_paths_are_refused() {
        let long = "x".repeat(MAX_ID_LEN + 1);
        let cases: [(&str, IdError); 10] = [
            ("", IdError::Empty),
            (".", IdError::LeadingDot),
            ("..", IdError::LeadingDot),
            (".hidden", IdError::LeadingDot),
            ("../x", IdError::LeadingDot),
            ("a/b", IdError::BadChar { ch: '/' }),
            ("a b", IdError::BadChar { ch: ' ' }),
            ("é", IdError::BadChar { ch: 'é' }),
            ("a\0b", IdError::BadChar { ch: '\0' }),
            (
                &long,
                IdError::TooLong {
                    len: MAX_ID_LEN + 1,
                },
            ),
        ];
        for (bad, want) in cases {
            assert_eq!(check_id(bad), Err(want), "{bad:?}");
        }
    }

    #[test]
    fn the_error_says_what_is_wrong_and_what_an_id_may_be() {
        let msg = check_id("a/b").unwrap_err().to_string();
        assert!(msg.contains("'/'"), "{msg}");
        assert!(msg.contains(ID_RULE), "{msg}");
        assert!(ID_RULE.contains(&MAX_ID_LEN.to_string()), "{ID_RULE}");
    }
}
