//! Counters and gauges of one frontend, as atomics shared by every connection task. No tasks; read with
//! [`FrontendMetrics::snapshot`], which the worker reports to the master.

use std::sync::atomic::{AtomicU64, Ordering};

use pomelo_proto::control::Stats;

/// All counters are monotonic; `connections` and `outbound_queued_bytes` are gauges.
#[derive(Debug, Default)]
pub struct FrontendMetrics {
    pub connections: AtomicU64,
    pub connections_total: AtomicU64,
    pub handshakes_total: AtomicU64,
    pub bytes_in_total: AtomicU64,
    pub bytes_out_total: AtomicU64,
    pub packages_in_total: AtomicU64,
    pub packages_out_total: AtomicU64,
    pub protocol_errors_total: AtomicU64,
    pub kicks_total: AtomicU64,
    pub refused_total: AtomicU64,
    /// Sessions kicked because their outbound queue was full (also counted in `kicks_total`).
    pub queue_full_total: AtomicU64,
    /// Client packages over `max_package_bytes` (also counted in `protocol_errors_total`).
    pub oversized_total: AtomicU64,
    /// Sessions kicked for sending over `max_requests_per_second` (also counted in `kicks_total`).
    pub rate_limited_total: AtomicU64,
    /// Sessions that ended because a write to the client failed (what was queued for it is lost).
    pub write_failures_total: AtomicU64,
    /// Connections closed for a handshake, heartbeat or idle timeout.
    pub timeouts_total: AtomicU64,
    /// Bytes in every session's outbound queue, including batches being written.
    pub outbound_queued_bytes: AtomicU64,
    /// The most one session ever had queued; stays at or under `queue_max_bytes`.
    pub outbound_queue_peak_bytes: AtomicU64,
    pub requests_total: AtomicU64,
    pub http_requests_total: AtomicU64,
    /// Requests and notifies of a signing client (`useCrypto`) without a valid `__crypto__`.
    pub bad_signatures_total: AtomicU64,
}

pub(crate) fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

pub(crate) fn add(c: &AtomicU64, n: usize) {
    c.fetch_add(n as u64, Ordering::Relaxed);
}

pub(crate) fn sub(c: &AtomicU64, n: usize) {
    c.fetch_sub(n as u64, Ordering::Relaxed);
}

impl FrontendMetrics {
    pub fn new() -> FrontendMetrics {
        FrontendMetrics::default()
    }

    /// Writes every series under its Prometheus-style name (no `pomelo_` prefix).
    pub fn snapshot(&self, out: &mut Stats) {
        let series: [(&str, &AtomicU64); 20] = [
            ("connections", &self.connections),
            ("connections_total", &self.connections_total),
            ("handshakes_total", &self.handshakes_total),
            ("bytes_in_total", &self.bytes_in_total),
            ("bytes_out_total", &self.bytes_out_total),
            ("packages_in_total", &self.packages_in_total),
            ("packages_out_total", &self.packages_out_total),
            ("protocol_errors_total", &self.protocol_errors_total),
            ("kicks_total", &self.kicks_total),
            ("refused_total", &self.refused_total),
            ("queue_full_total", &self.queue_full_total),
            ("oversized_total", &self.oversized_total),
            ("rate_limited_total", &self.rate_limited_total),
            ("write_failures_total", &self.write_failures_total),
            ("timeouts_total", &self.timeouts_total),
            ("outbound_queued_bytes", &self.outbound_queued_bytes),
            ("outbound_queue_peak_bytes", &self.outbound_queue_peak_bytes),
            ("requests_total", &self.requests_total),
            ("http_requests_total", &self.http_requests_total),
            ("bad_signatures_total", &self.bad_signatures_total),
        ];
        for (name, v) in series {
            out.insert(name.to_owned(), v.load(Ordering::Relaxed) as f64);
        }
    }

    /// One series by name, for tests and logs.
    pub fn get(&self, name: &str) -> Option<u64> {
        let mut s = Stats::new();
        self.snapshot(&mut s);
        s.get(name).map(|v| *v as u64)
    }
}
