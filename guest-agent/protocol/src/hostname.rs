//! The one rule for a pod's hostname, on both sides: the shim refuses a
//! sandbox spec that breaks it, and the agent refuses a SetIdentity that
//! does.

/// Longest hostname (HOST_NAME_MAX).
pub const MAX_HOSTNAME: usize = 64;

/// What a hostname may be, for error messages.
pub const HOSTNAME_RULE: &str = "a hostname is 1 to 64 characters of [A-Za-z0-9.-_]";

/// Whether `name` keeps to [`HOSTNAME_RULE`].
pub fn is_valid_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_HOSTNAME
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnames_keep_to_the_rule() {
        for good in ["web-0", "a.b_c", &"h".repeat(64)] {
            assert!(is_valid_hostname(good), "{good:?}");
        }
        for bad in ["", "a b", "x\0y", "é", &"h".repeat(65)] {
            assert!(!is_valid_hostname(bad), "{bad:?}");
        }
    }
}
