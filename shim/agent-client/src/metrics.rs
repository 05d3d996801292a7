//! Agent RPC latency, kept per process (one shim serves one pod's VM): a
//! histogram with fixed buckets and an error count per method, read by the
//! shim's metrics endpoint. Every typed call records here once it is
//! answered or fails, except the long polls (WaitProcess, GetOomEvent),
//! whose duration is how long a process ran, not the agent's latency. A
//! call whose future is dropped before it ends records nothing.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Upper bounds of the latency buckets, in seconds (the last, +Inf, is
/// implicit). From a fast local call (~0.5 ms) to the default deadline.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A Prometheus-style histogram over [`LATENCY_BUCKETS`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    /// Observations per bucket, not cumulative; the last slot is +Inf.
    counts: [u64; LATENCY_BUCKETS.len() + 1],
    sum: f64,
    count: u64,
}

impl Histogram {
    pub fn observe(&mut self, seconds: f64) {
        let slot = LATENCY_BUCKETS
            .iter()
            .position(|&le| seconds <= le)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.counts[slot] += 1;
        self.sum += seconds;
        self.count += 1;
    }

    /// `(upper bound, observations ≤ it)` for every bucket, cumulative,
    /// ending with `(+Inf, count)`.
    pub fn cumulative(&self) -> Vec<(f64, u64)> {
        let bounds = LATENCY_BUCKETS.iter().copied().chain([f64::INFINITY]);
        let mut total = 0;
        bounds
            .zip(self.counts)
            .map(|(le, n)| {
                total += n;
                (le, total)
            })
            .collect()
    }

    /// The sum of the observations, in seconds.
    pub fn sum(&self) -> f64 {
        self.sum
    }

    pub fn count(&self) -> u64 {
        self.count
    }
}

/// One method's record.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RpcStats {
    /// Time from sending the request to its answer or failure, seconds.
    pub latency: Histogram,
    /// Calls that failed (an error status, a timeout, a lost connection).
    pub errors: u64,
}

static RPCS: Mutex<BTreeMap<&'static str, RpcStats>> = Mutex::new(BTreeMap::new());

/// Records one call of `method` that took `elapsed`.
pub fn record(method: &'static str, elapsed: Duration, ok: bool) {
    let mut rpcs = RPCS.lock().unwrap_or_else(|p| p.into_inner());
    let stats = rpcs.entry(method).or_default();
    stats.latency.observe(elapsed.as_secs_f64());
    if !ok {
        stats.errors += 1;
    }
}

/// Every method called so far, by name.
pub fn rpc_stats() -> Vec<(&'static str, RpcStats)> {
    let rpcs = RPCS.lock().unwrap_or_else(|p| p.into_inner());
    rpcs.iter().map(|(m, s)| (*m, s.clone())).collect()
}

/// Runs the call `fut` and records it as `method`.
pub(crate) async fn timed<T>(
    method: &'static str,
    fut: impl Future<Output = ttrpc::Result<T>>,
) -> ttrpc::Result<T> {
    let start = Instant::now();
    let r = fut.await;
    record(method, start.elapsed(), r.is_ok());
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_first_bucket_that_holds_them() {
        let mut h = Histogram::default();
        h.observe(0.0005); // on a bound: that bucket (le is ≤)
        h.observe(0.003);
        h.observe(0.003);
        h.observe(60.0); // past the last bound: +Inf only
        let c = h.cumulative();
        assert_eq!(c.len(), LATENCY_BUCKETS.len() + 1);
        assert_eq!(c[0], (0.0005, 1));
        assert_eq!(c[1], (0.001, 1));
        assert_eq!(c[2], (0.0025, 1));
        assert_eq!(c[3], (0.005, 3));
        assert_eq!(c[LATENCY_BUCKETS.len() - 1], (10.0, 3));
        assert_eq!(c[LATENCY_BUCKETS.len()], (f64::INFINITY, 4));
        assert_eq!(h.count(), 4);
        assert!((h.sum() - 60.0065).abs() < 1e-9);
        // Cumulative counts never decrease.
        assert!(c.windows(2).all(|w| w[0].1 <= w[1].1));
    }

    #[test]
    fn records_by_method_with_errors() {
        // The registry is per process and other tests call the agent: look
        // at a method name only this test uses, and at differences.
        const M: &str = "MetricsTestOnly";
        let before = rpc_stats().into_iter().find(|(m, _)| *m == M);
        assert!(before.is_none());
        record(M, Duration::from_millis(2), true);
        record(M, Duration::from_millis(20), false);
        let (_, s) = rpc_stats()
            .into_iter()
            .find(|(m, _)| *m == M)
            .expect("recorded");
        assert_eq!(s.latency.count(), 2);
        assert_eq!(s.errors, 1);
        assert!((s.latency.sum() - 0.022).abs() < 1e-9);
    }

    #[tokio::test]
    async fn timed_records_answers_and_failures() {
        const M: &str = "MetricsTestTimed";
        let r: ttrpc::Result<()> = timed(M, async { Err(ttrpc::Error::LocalClosed) }).await;
        assert!(r.is_err());
        let ok = timed(M, async { Ok(7) }).await;
        assert_eq!(ok.ok(), Some(7));
        let (_, s) = rpc_stats()
            .into_iter()
            .find(|(m, _)| *m == M)
            .expect("recorded");
        assert_eq!((s.latency.count(), s.errors), (2, 1));
    }
}
