//! Running netlink work inside the pod's network namespace: a thread of
//! its own enters it (setns moves only the calling thread), opens its
//! netlink socket there (a socket stays in the namespace it was made in)
//! and drives the work on a current-thread runtime, under a deadline.

use std::fs::File;
use std::future::Future;
use std::path::Path;

use nix::sched::{setns, CloneFlags};

use crate::{NetError, NETLINK_DEADLINE};

/// Runs `work` in a thread that entered `netns` (sockets it makes stay
/// in that namespace).
pub(crate) fn enter_and<T: Send + 'static>(
    netns: &Path,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, NetError> {
    let file = File::open(netns).map_err(|source| NetError::OpenNetns {
        path: netns.to_path_buf(),
        source,
    })?;
    let path = netns.to_path_buf();
    let thread = std::thread::Builder::new()
        .name("clh-netns".into())
        .spawn(move || {
            setns(&file, CloneFlags::CLONE_NEWNET)
                .map_err(|source| NetError::EnterNetns { path, source })?;
            Ok(work())
        })
        .map_err(NetError::Thread)?;
    thread.join().unwrap_or_else(|_| {
        Err(NetError::Panicked {
            path: netns.to_path_buf(),
        })
    })
}

pub(crate) fn run_in<T, F, Fut>(netns: &Path, work: F) -> Result<T, NetError>
where
    T: Send + 'static,
    F: FnOnce(rtnetlink::Handle) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, NetError>>,
{
    let path = netns.to_path_buf();
    enter_and(netns, move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(NetError::Thread)?;
        runtime.block_on(async {
            let (connection, handle, _) = rtnetlink::new_connection().map_err(NetError::Thread)?;
            tokio::spawn(connection);
            match tokio::time::timeout(NETLINK_DEADLINE, work(handle)).await {
                Ok(result) => result,
                Err(_) => Err(NetError::Timeout { path }),
            }
        })
    })?
}
