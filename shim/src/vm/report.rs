//! The report a failed start carries: the tails of the guest console, the
//! backend's own logs (named by the backend) and virtiofsd's log.

use std::path::Path;

use clh_hypervisor::Backend;

/// Lines of each log quoted in a start error.
const LOG_TAIL_LINES: usize = 30;

pub(super) fn failure_report(dir: &Path, backend: Backend) -> String {
    let mut logs = vec![("guest console", dir.join("console.log"))];
    logs.extend(backend.log_files(dir));
    logs.push(("virtiofsd log", dir.join("virtiofsd.log")));
    let mut report = String::new();
    for (what, path) in logs {
        let tail = clh_hypervisor::process::log_tail(&path, LOG_TAIL_LINES);
        if !tail.trim().is_empty() {
            report.push_str(&format!(
                "\n--- last lines of the {what} ({}) ---\n{tail}",
                path.display()
            ));
        }
    }
    report
}
