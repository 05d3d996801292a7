//! Deadline-bounded waiting: every wait in this crate goes through here.

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use tokio::time::{sleep, Instant};

use crate::{Error, Result};

/// How often a condition is re-checked. Short: the things we wait for (a
/// socket appearing) are cheap to check and we want to notice them early.
const POLL_INTERVAL: Duration = Duration::from_millis(5);

/// Polls `cond` until it returns `Some`, or fails with [`Error::Timeout`]
/// naming `what` once `timeout` has passed.
pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut cond: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = cond().await {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: what.to_string(),
                timeout,
            });
        }
        sleep(POLL_INTERVAL).await;
    }
}

/// Waits until a Unix socket at `path` accepts connections.
pub async fn wait_for_socket(what: &str, path: &Path, timeout: Duration) -> Result<()> {
    wait_until(what, timeout, || async {
        tokio::net::UnixStream::connect(path).await.ok().map(|_| ())
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wait_until_times_out_with_the_name_of_what_it_waited_for() {
        let err = wait_until("the moon", Duration::from_millis(20), || async {
            None::<()>
        })
        .await
        .unwrap_err();
        assert!(err.to_string().contains("the moon"), "{err}");
    }

    #[tokio::test]
    async fn wait_until_returns_the_value() {
        let mut n = 0;
        let v = wait_until("three", Duration::from_secs(5), || {
            n += 1;
            let ready = n >= 3;
            async move { ready.then_some(n) }
        })
        .await
        .unwrap();
        assert_eq!(v, 3);
    }
}
