//! The report: merged counts turned into the figures BENCHMARKS.md quotes, as one JSON document.
//!
//! Per step: deliveries expected (`Σ over rooms of messages sent in the room × members who entered it`),
//! received (unique), missing (`expected − received`), duplicates, deliveries/s (`received / step
//! seconds`), latency percentiles from the merged HDR histogram, and CPU seconds of the cluster's
//! processes and of the generators over the step (send time plus grace), also per delivery. Pure
//! functions over plain data.

use hdrhistogram::Histogram;
use serde_json::{json, Value};

use crate::cluster::Usage;
use crate::spec::{Spec, Step};
use crate::track::{self, Counts, StepCounts};

fn hist(pairs: &[(u64, u64)]) -> Histogram<u64> {
    let mut h = track::new_hist();
    track::merge_hist(&mut h, pairs);
    h
}

fn ms(us: u64) -> f64 {
    (us as f64 / 1000.0 * 1000.0).round() / 1000.0
}

/// `{p50, p90, p99, p999, max}` in milliseconds.
pub fn percentiles_ms(pairs: &[(u64, u64)]) -> Value {
    let h = hist(pairs);
    if h.is_empty() {
        return Value::Null;
    }
    let q = |x: f64| ms(h.value_at_quantile(x));
    json!({"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "p999": q(0.999), "max": ms(h.max()), "count": h.len()})
}

fn expected(c: &StepCounts, ready: &Counts) -> u64 {
    c.sent_by_room.iter().zip(&ready.joined_by_room).map(|(s, m)| s * m).sum()
}

/// One step's figures.
#[derive(Debug, Clone)]
pub struct StepResult {
    pub k: usize,
    pub step: Step,
    pub counts: StepCounts,
    pub expected: u64,
    pub server_cpu_secs: f64,
    pub gen_cpu_secs: f64,
    pub wall_secs: f64,
    /// Deliveries per second the step offers: rate × Σ members².
    pub offered: f64,
    /// Fraction of the machine's CPU time (all cores, every process) that was busy during the step.
    pub machine_busy: f64,
}

impl StepResult {
    pub fn new(
        k: usize,
        step: Step,
        counts: StepCounts,
        ready: &Counts,
        server_cpu_secs: f64,
        gen_cpu_secs: f64,
        wall_secs: f64,
    ) -> StepResult {
        let sq: u64 = ready.joined_by_room.iter().map(|m| m * m).sum();
        StepResult {
            k,
            expected: expected(&counts, ready),
            offered: step.rate * sq as f64,
            step,
            counts,
            server_cpu_secs,
            gen_cpu_secs,
            wall_secs,
            machine_busy: 0.0,
        }
    }

    /// The same step with the counts of the final reports (late deliveries included).
    pub fn with_final(mut self, c: StepCounts, ready: &Counts) -> StepResult {
        self.expected = expected(&c, ready);
        self.counts = c;
        self
    }

    pub fn missing(&self) -> u64 {
        self.expected.saturating_sub(self.counts.received)
    }

    pub fn p99_ms(&self) -> f64 {
        let h = hist(&self.counts.latency_us);
        if h.is_empty() {
            0.0
        } else {
            h.value_at_quantile(0.99) as f64 / 1000.0
        }
    }

    fn per_delivery_us(&self, cpu: f64) -> Option<f64> {
        (self.counts.received > 0).then(|| (cpu * 1e6 / self.counts.received as f64 * 1000.0).round() / 1000.0)
    }

    pub fn summary(&self) -> String {
        format!(
            "step {} ({} msg/s per client): {} of {} deliveries, {} missing, {} dup, {:.0}/s, p99 {:.1} ms, server {:.2} CPU-s ({:?} µs/delivery), machine {:.0}% busy",
            self.k,
            self.step.rate,
            self.counts.received,
            self.expected,
            self.missing(),
            self.counts.duplicates,
            self.counts.received as f64 / self.step.secs.max(1e-9),
            self.p99_ms(),
            self.server_cpu_secs,
            self.per_delivery_us(self.server_cpu_secs),
            self.machine_busy * 100.0,
        )
    }

    pub fn to_json(&self) -> Value {
        let c = &self.counts;
        json!({
            "step": self.k,
            "warmup": self.step.warmup,
            "rate_per_client": self.step.rate,
            "secs": self.step.secs,
            "offered_deliveries_per_sec": self.offered,
            "messages_sent": c.sent_by_room.iter().sum::<u64>(),
            "acks": c.acks,
            "send_errors": c.send_errors,
            "deliveries_expected": self.expected,
            "deliveries_received": c.received,
            "missing": self.missing(),
            "duplicates": c.duplicates,
            "deliveries_per_sec": (c.received as f64 / self.step.secs.max(1e-9)).round(),
            "latency_ms": percentiles_ms(&c.latency_us),
            "latency_from_write_ms": percentiles_ms(&c.latency_from_write_us),
            "max_send_lag_ms": ms(c.max_send_lag_us),
            "wall_secs": self.wall_secs,
            "machine_cpu_busy": (self.machine_busy * 1000.0).round() / 1000.0,
            "server_cpu_secs": self.server_cpu_secs,
            "server_cpu_us_per_delivery": self.per_delivery_us(self.server_cpu_secs),
            "generator_cpu_secs": self.gen_cpu_secs,
            "generator_cpu_us_per_delivery": self.per_delivery_us(self.gen_cpu_secs),
        })
    }
}

pub struct Inputs<'a> {
    pub scenario: &'a str,
    pub spec: &'a Spec,
    pub ready: &'a Counts,
    pub fin: &'a Counts,
    pub connect_secs: f64,
    pub steps: Vec<StepResult>,
    pub server_empty: Usage,
    pub server_connected: Usage,
    pub server_after: Usage,
    pub server_each_empty: Value,
    pub server_each_end: Value,
    pub gen_cpu_secs: f64,
    pub orchestrator_cpu_secs: f64,
    pub view_end: &'a Value,
    /// What `--kill-connector` saw (`orchestrate::kill_connector`).
    pub kill: Option<Value>,
}

/// Stats worth keeping from the admin API's view of each server.
fn server_stats(view: &Value) -> Value {
    const KEYS: [&str; 12] = [
        "connections",
        "connections_total",
        "refused_total",
        "kicks_total",
        "queue_full_total",
        "protocol_errors_total",
        "rooms",
        "members",
        "messages_in_total",
        "deliveries_out_total",
        "deliveries_dropped_total",
        "rpc_errors_total",
    ];
    let servers: Vec<Value> = view["servers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            let stats: serde_json::Map<String, Value> =
                KEYS.iter().filter_map(|k| Some((k.to_string(), s["stats"].get(*k)?.clone()))).collect();
            json!({"id": s["id"], "state": s["state"], "restarts": s["restarts"], "stats": stats})
        })
        .collect();
    json!(servers)
}

pub fn build(i: Inputs<'_>) -> Value {
    let measured: Vec<&StepResult> = i.steps.iter().filter(|s| !s.step.warmup).collect();
    let mut total = StepCounts::default();
    for s in &measured {
        total.merge(&s.counts);
    }
    let expected: u64 = measured.iter().map(|s| s.expected).sum();
    let secs: f64 = measured.iter().map(|s| s.step.secs).sum();
    let server_cpu: f64 = measured.iter().map(|s| s.server_cpu_secs).sum();
    let gen_cpu: f64 = measured.iter().map(|s| s.gen_cpu_secs).sum();
    let per = |cpu: f64| (total.received > 0).then(|| cpu * 1e6 / total.received as f64);
    let r = i.ready;
    let alive = i.fin.made.saturating_sub(i.fin.lost);
    let rss_per_conn =
        |u: Usage| (alive > 0).then(|| (u.rss_bytes as f64 - i.server_empty.rss_bytes as f64) / alive as f64);
    json!({
        "scenario": i.scenario,
        "machine": crate::cluster::machine(),
        "params": {
            "transport": i.spec.transport, "clients": i.spec.clients, "rooms": i.spec.rooms, "payload_bytes": i.spec.payload,
            "connect_rate": i.spec.connect_rate, "procs": i.spec.procs, "sources": i.spec.sources.len(),
            "enter": i.spec.enter, "grace_secs": i.spec.grace, "steps": i.spec.steps,
        },
        "connections": {
            "attempted": r.attempted,
            "made": r.made,
            "failed": r.attempted - r.made,
            "failed_by_stage": {"gate": r.failed_gate, "connect": r.failed_connect, "handshake": r.failed_handshake, "enter": r.failed_enter},
            "first_error": r.first_error,
            "connect_secs": i.connect_secs,
            "connects_per_sec": (r.made as f64 / i.connect_secs.max(1e-9)).round(),
            "connect_time_ms": percentiles_ms(&r.connect_us),
            "lost": i.fin.lost,
            "kicked": i.fin.kicked,
            "alive_at_end": alive,
        },
        "heartbeats": {
            "sent": i.fin.heartbeats_sent,
            "received": i.fin.heartbeats_received,
            "timeouts": i.fin.heartbeat_timeouts,
            "max_lag_ms": ms(i.fin.heartbeat_max_lag_us),
        },
        "pushes": {"other": i.fin.other_pushes, "unparsed": i.fin.unparsed, "stray": i.fin.stray},
        "steps": i.steps.iter().map(StepResult::to_json).collect::<Vec<_>>(),
        "totals": {
            "messages_sent": total.sent_by_room.iter().sum::<u64>(),
            "deliveries_expected": expected,
            "deliveries_received": total.received,
            "missing": expected.saturating_sub(total.received),
            "duplicates": total.duplicates,
            "deliveries_per_sec": (total.received as f64 / secs.max(1e-9)).round(),
            "latency_ms": percentiles_ms(&total.latency_us),
            "server_cpu_secs": server_cpu,
            "server_cpu_us_per_delivery": per(server_cpu),
            "generator_cpu_secs": gen_cpu,
            "generator_cpu_us_per_delivery": per(gen_cpu),
        },
        "server": {
            "rss_empty_bytes": i.server_empty.rss_bytes,
            "rss_connected_bytes": i.server_connected.rss_bytes,
            "rss_after_steps_bytes": i.server_after.rss_bytes,
            "rss_per_connection_bytes": rss_per_conn(i.server_after),
            "rss_per_connection_bytes_at_connect": rss_per_conn(i.server_connected),
            "cpu_secs_connect_phase": i.server_connected.cpu_secs - i.server_empty.cpu_secs,
            "cpu_secs_total": i.server_after.cpu_secs - i.server_empty.cpu_secs,
            "processes_empty": i.server_each_empty,
            "processes_end": i.server_each_end,
            "servers": server_stats(i.view_end),
        },
        "kill": i.kill,
        "generator": {
            "procs": i.spec.procs,
            "cpu_secs_total": i.gen_cpu_secs,
            "orchestrator_cpu_secs": i.orchestrator_cpu_secs,
        },
    })
}
