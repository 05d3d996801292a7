//! A test that cannot run here (no `cloud-hypervisor` on PATH, no spec
//! file in a plain clone) returns early, which cargo counts as a pass.
//! [`skip`] makes it visible instead: it prints the reason and appends a
//! line to the skip log named by `$CLH_TEST_SKIP_LOG`, which `make test`
//! empties before the run and summarises after it (`tests/report-skips.sh`),
//! with the count and every reason.

use std::io::Write;

/// The environment variable naming the skip log.
pub const LOG_ENV: &str = "CLH_TEST_SKIP_LOG";

/// Records that the running test is skipped, and why. Call it, then return
/// from the test.
pub fn skip(reason: &str) {
    // libtest names each test's thread after the test.
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("<unnamed test>");
    println!("SKIPPED {test}: {reason}");
    let Some(log) = std::env::var_os(LOG_ENV) else {
        return;
    };
    // One write of one line with O_APPEND: concurrent tests never
    // interleave their lines.
    let line = format!("{test}\t{}\n", reason.replace(['\n', '\t'], " "));
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = written {
        // A lost record would turn the skip back into a silent pass.
        panic!(
            "cannot record the skip in {} ({e}): {test} skipped: {reason}",
            std::path::Path::new(&log).display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_skip_is_logged_with_the_test_name_and_reason() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("skips.log");
        // The only test of this crate that reads the variable.
        std::env::set_var(LOG_ENV, &log);
        skip("no widget\there");
        skip("second");
        std::env::remove_var(LOG_ENV);
        let text = std::fs::read_to_string(&log).unwrap();
        let name = "tests::a_skip_is_logged_with_the_test_name_and_reason";
        assert_eq!(text, format!("{name}\tno widget here\n{name}\tsecond\n"));
    }
}
