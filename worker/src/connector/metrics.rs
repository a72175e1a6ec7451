//! The connector's RPC counters and latency histogram, and the count of client requests it refused
//! before any RPC, reported with the heartbeat. Atomics only; no
//! tasks.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use pomelo_proto::control::Stats;

/// Upper bounds (ms) of the RPC latency histogram buckets.
pub const LATENCY_BUCKETS_MS: [f64; 8] = [0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 100.0, 1000.0];

#[derive(Debug, Default)]
pub struct RpcMetrics {
    requests: AtomicU64,
    errors: AtomicU64,
    deliveries_in: AtomicU64,
    /// Client requests refused before any RPC (bad names, bodies nested too deep).
    refused: AtomicU64,
    latency_us_sum: AtomicU64,
    /// Cumulative counts for the latency buckets in [`LATENCY_BUCKETS_MS`].
    latency_buckets: [AtomicU64; 8],
}

impl RpcMetrics {
    pub(crate) fn request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn refused(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn delivered(&self, sessions: usize) {
        self.deliveries_in.fetch_add(sessions as u64, Ordering::Relaxed);
    }

    pub(crate) fn observe(&self, d: Duration) {
        let ms = d.as_secs_f64() * 1000.0;
        self.latency_us_sum.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
        for (i, le) in LATENCY_BUCKETS_MS.iter().enumerate() {
            if ms <= *le {
                self.latency_buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Writes `rpc_requests_total`, `rpc_errors_total`, the latency histogram as
    /// `rpc_latency_seconds_bucket_<seconds>` (cumulative), `_sum` and `_count`.
    pub fn snapshot(&self, out: &mut Stats) {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        out.insert("rpc_requests_total".into(), g(&self.requests));
        out.insert("rpc_errors_total".into(), g(&self.errors));
        out.insert("rpc_deliveries_in_total".into(), g(&self.deliveries_in));
        out.insert("requests_refused_total".into(), g(&self.refused));
        for (i, le) in LATENCY_BUCKETS_MS.iter().enumerate() {
            out.insert(format!("rpc_latency_seconds_bucket_{}", le / 1000.0), g(&self.latency_buckets[i]));
        }
        out.insert("rpc_latency_seconds_sum".into(), g(&self.latency_us_sum) / 1e6);
        out.insert("rpc_latency_seconds_count".into(), g(&self.requests) - g(&self.errors));
    }
}
