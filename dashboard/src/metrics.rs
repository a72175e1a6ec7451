//! `GET /metrics`: Prometheus text format, one scrape target for the whole cluster.
//!
//! Every scrape builds an owned [`Registry`] from the latest [`ClusterView`], so each per-server family has
//! exactly one series per server in the view and a removed server's series vanish with it. Per server
//! (labels `server_id`, `server_type`):
//!
//! - from the master: `pomelo_server_up`, `pomelo_server_state{state}` (1, for the current state only),
//!   `pomelo_server_info{host, supervisor}` (1),
//!   `pomelo_server_restarts_total`, `pomelo_server_uptime_seconds`, `pomelo_server_cpu_seconds_total`,
//!   `pomelo_server_resident_memory_bytes`, `pomelo_server_open_fds`;
//! - from the worker's stats (0 when a server does not report one): `pomelo_server_connections`,
//!   `_rooms`, `_members`, `_handshakes_total`, `_messages_in_total`, `_deliveries_out_total`,
//!   `_protocol_errors_total`, `_kicks_total`, `_bytes_in_total`, `_bytes_out_total`;
//! - histograms the worker encodes as described in [`crate::histogram`] (e.g. `rpc_latency_seconds`) as
//!   `pomelo_server_<name>`, and any other stat `<name>` as `pomelo_server_<name>` (a counter if it ends in
//!   `_total`, else a gauge), for the servers that report it.
//!
//! Cluster-wide: `pomelo_cluster_servers{state}`, `pomelo_master_uptime_seconds`, `pomelo_master_config_error`,
//! `pomelo_dashboard_sse_clients`, and the master's own `process_*` metrics ([`crate::process`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use pomelo_master::server::Phase;
use pomelo_master::{ClusterView, MasterHandle, ServerView};
use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, MetricFamily, MetricType};
use prometheus::{CounterVec, Encoder, Gauge, GaugeVec, Opts, Registry, TextEncoder};
use warp::http::StatusCode;
use warp::reply::{Reply, Response};
use warp::{Filter, Rejection};

use crate::histogram::{self, Decoded};
use crate::sse::Feeds;

const LABELS: [&str; 2] = ["server_id", "server_type"];

/// Where a per-server figure comes from.
#[derive(Clone, Copy)]
enum Source {
    Up,
    Restarts,
    Uptime,
    Cpu,
    Rss,
    Fds,
    Stat(&'static str),
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Gauge,
    Counter,
}

/// The families every server has, in the order they are documented.
const FIXED: &[(&str, Kind, Source, &str)] = &[
    ("pomelo_server_up", Kind::Gauge, Source::Up, "1 if the server is running, else 0."),
    ("pomelo_server_restarts_total", Kind::Counter, Source::Restarts, "Restarts since the master started."),
    ("pomelo_server_uptime_seconds", Kind::Gauge, Source::Uptime, "Seconds since the server's process started."),
    ("pomelo_server_cpu_seconds_total", Kind::Counter, Source::Cpu, "User and system CPU time of the process."),
    ("pomelo_server_resident_memory_bytes", Kind::Gauge, Source::Rss, "Resident memory of the process."),
    ("pomelo_server_open_fds", Kind::Gauge, Source::Fds, "Open file descriptors of the process."),
    ("pomelo_server_connections", Kind::Gauge, Source::Stat("connections"), "Open client connections."),
    ("pomelo_server_handshakes_total", Kind::Counter, Source::Stat("handshakes_total"), "Client handshakes."),
    ("pomelo_server_rooms", Kind::Gauge, Source::Stat("rooms"), "Chat rooms held."),
    ("pomelo_server_members", Kind::Gauge, Source::Stat("members"), "Members of the rooms held."),
    ("pomelo_server_messages_in_total", Kind::Counter, Source::Stat("messages_in_total"), "Chat messages received."),
    (
        "pomelo_server_deliveries_out_total",
        Kind::Counter,
        Source::Stat("deliveries_out_total"),
        "Message deliveries sent to members.",
    ),
    (
        "pomelo_server_protocol_errors_total",
        Kind::Counter,
        Source::Stat("protocol_errors_total"),
        "Connections closed for malformed or oversized input.",
    ),
    ("pomelo_server_kicks_total", Kind::Counter, Source::Stat("kicks_total"), "Clients kicked."),
    ("pomelo_server_bytes_in_total", Kind::Counter, Source::Stat("bytes_in_total"), "Bytes read from clients."),
    ("pomelo_server_bytes_out_total", Kind::Counter, Source::Stat("bytes_out_total"), "Bytes written to clients."),
];

const STATES: [Phase; 6] =
    [Phase::Starting, Phase::Running, Phase::Backoff, Phase::Stopping, Phase::Stopped, Phase::Failed];

pub fn route(handle: MasterHandle, feeds: Feeds) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    warp::path!("metrics").and(warp::get()).map(move || match render(&handle.view(), feeds.clients()) {
        Ok(text) => warp::reply::with_header(text, "content-type", prometheus::TEXT_FORMAT).into_response(),
        Err(e) => crate::api::error(StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics", e.to_string()),
    })
}

/// The whole exposition for one view.
pub fn render(view: &ClusterView, sse_clients: usize) -> prometheus::Result<String> {
    let registry = Registry::new();
    per_server(&registry, &view.servers)?;
    registry.register(Box::new(Prebuilt::of(dynamic(&view.servers))))?;
    cluster(&registry, view, sse_clients)?;
    crate::process::register(&registry, &view.master)?;
    let mut out = Vec::new();
    TextEncoder::new().encode(&registry.gather(), &mut out)?;
    String::from_utf8(out).map_err(|e| prometheus::Error::Msg(e.to_string()))
}

fn value(s: &ServerView, source: Source) -> f64 {
    let v = match source {
        Source::Up => f64::from(u8::from(s.state == Phase::Running)),
        Source::Restarts => s.restarts as f64,
        Source::Uptime => s.uptime_secs.unwrap_or(0.0),
        Source::Cpu => s.cpu_seconds,
        Source::Rss => s.rss_bytes as f64,
        Source::Fds => s.open_fds as f64,
        Source::Stat(key) => s.stats.get(key).copied().unwrap_or(0.0),
    };
    if v.is_finite() {
        v
    } else {
        0.0
    }
}

fn per_server(registry: &Registry, servers: &[ServerView]) -> prometheus::Result<()> {
    for (name, kind, source, help) in FIXED {
        let opts = Opts::new(*name, *help);
        if *kind == Kind::Gauge {
            let vec = GaugeVec::new(opts, &LABELS)?;
            for s in servers {
                vec.with_label_values(&[s.id.as_str(), s.server_type.as_str()]).set(value(s, *source));
            }
            registry.register(Box::new(vec))?;
        } else {
            let vec = CounterVec::new(opts, &LABELS)?;
            for s in servers {
                vec.with_label_values(&[s.id.as_str(), s.server_type.as_str()]).inc_by(value(s, *source).max(0.0));
            }
            registry.register(Box::new(vec))?;
        }
    }
    let state = GaugeVec::new(
        Opts::new("pomelo_server_state", "The server's state: 1 for the state it is in (one series per server)."),
        &["server_id", "server_type", "state"],
    )?;
    for s in servers {
        state.with_label_values(&[s.id.as_str(), s.server_type.as_str(), s.state.as_str()]).set(1.0);
    }
    registry.register(Box::new(state))?;
    let info = GaugeVec::new(
        Opts::new(
            "pomelo_server_info",
            "Always 1: where the server runs (`host` from servers.yaml) and who starts it (`supervisor`: local, ssh, external).",
        ),
        &["server_id", "server_type", "host", "supervisor"],
    )?;
    for s in servers {
        info.with_label_values(&[s.id.as_str(), s.server_type.as_str(), s.host.as_str(), s.supervisor.as_str()])
            .set(1.0);
    }
    registry.register(Box::new(info))
}

fn cluster(registry: &Registry, view: &ClusterView, sse_clients: usize) -> prometheus::Result<()> {
    let by_state = GaugeVec::new(Opts::new("pomelo_cluster_servers", "Servers in each state."), &["state"])?;
    for phase in STATES {
        let n = view.servers.iter().filter(|s| s.state == phase).count();
        by_state.with_label_values(&[phase.as_str()]).set(n as f64);
    }
    registry.register(Box::new(by_state))?;
    let gauges = [
        ("pomelo_master_uptime_seconds", "Seconds since the master started.", view.master.uptime_secs),
        (
            "pomelo_master_config_error",
            "1 while the last servers.yaml reload was invalid (the old configuration still runs).",
            f64::from(u8::from(view.master.config_error.is_some())),
        ),
        ("pomelo_dashboard_sse_clients", "Open live feeds (GET /api/events).", sse_clients as f64),
    ];
    for (name, help, v) in gauges {
        let g = Gauge::new(name, help)?;
        g.set(v);
        registry.register(Box::new(g))?;
    }
    Ok(())
}

/// Histograms and other stats: families whose names come from what workers report.
fn dynamic(servers: &[ServerView]) -> Vec<MetricFamily> {
    let taken: BTreeSet<String> = FIXED
        .iter()
        .map(|f| f.0.to_string())
        .chain(["pomelo_server_state".to_string()])
        .chain(FIXED.iter().filter_map(|f| match f.2 {
            Source::Stat(key) => Some(format!("pomelo_server_{key}")),
            _ => None,
        }))
        .collect();
    let mut families: BTreeMap<String, MetricFamily> = BTreeMap::new();
    for s in servers {
        let labels = [("server_id", s.id.as_str()), ("server_type", s.server_type.as_str())];
        let histograms = histogram::decode(&s.stats);
        for (name, h) in &histograms {
            let full = format!("pomelo_server_{name}");
            if !plain_name(name) || taken.contains(&full) {
                continue;
            }
            let help = format!("Histogram `{name}` reported by the worker.");
            push(&mut families, &full, &help, MetricType::HISTOGRAM, metric(&labels, Sample::Histogram(h)));
        }
        for (key, v) in &s.stats {
            let full = format!("pomelo_server_{key}");
            let reserved = ["_count", "_sum", "_bucket", "_created", "_info"].iter().any(|x| key.ends_with(x));
            if !plain_name(key) || reserved || taken.contains(&full) || histogram::is_part(key, &histograms) {
                continue;
            }
            if histograms.keys().any(|h| key.starts_with(h.as_str())) {
                continue;
            }
            let v = if v.is_finite() { *v } else { 0.0 };
            let (kind, sample) = if key.ends_with("_total") {
                (MetricType::COUNTER, Sample::Counter(v.max(0.0)))
            } else {
                (MetricType::GAUGE, Sample::Gauge(v))
            };
            let help = format!("`{key}` reported by the worker.");
            push(&mut families, &full, &help, kind, metric(&labels, sample));
        }
    }
    families.into_values().collect()
}

/// Snake case in lower-case ASCII: the only stat names turned into metric names.
fn plain_name(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

enum Sample<'a> {
    Gauge(f64),
    Counter(f64),
    Histogram(&'a Decoded),
}

fn metric(labels: &[(&str, &str)], sample: Sample<'_>) -> proto::Metric {
    let mut m = proto::Metric::from_label(
        labels
            .iter()
            .map(|(k, v)| {
                let mut pair = proto::LabelPair::default();
                pair.set_name(k.to_string());
                pair.set_value(v.to_string());
                pair
            })
            .collect(),
    );
    match sample {
        Sample::Gauge(v) => {
            let mut g = proto::Gauge::default();
            g.set_value(v);
            m.set_gauge(g);
        }
        Sample::Counter(v) => {
            let mut c = proto::Counter::default();
            c.set_value(v);
            m.set_counter(c);
        }
        Sample::Histogram(h) => {
            let mut hist = proto::Histogram::default();
            hist.set_sample_count(h.count);
            hist.set_sample_sum(h.sum);
            hist.set_bucket(
                h.buckets
                    .iter()
                    .map(|(le, n)| {
                        let mut b = proto::Bucket::default();
                        b.set_upper_bound(*le);
                        b.set_cumulative_count(*n);
                        b
                    })
                    .collect(),
            );
            m.set_histogram(hist);
        }
    }
    m
}

fn push(families: &mut BTreeMap<String, MetricFamily>, name: &str, help: &str, kind: MetricType, m: proto::Metric) {
    let family = families.entry(name.to_string()).or_insert_with(|| {
        let mut f = MetricFamily::default();
        f.set_name(name.to_string());
        f.set_help(help.to_string());
        f.set_field_type(kind);
        f
    });
    // One name, one type: a later server reporting the same name as another type is left out.
    if family.get_field_type() == kind {
        family.mut_metric().push(m);
    }
}

/// Families built before registration, with the descriptors the registry asks for.
struct Prebuilt {
    descs: Vec<Desc>,
    families: Vec<MetricFamily>,
}

impl Prebuilt {
    fn of(families: Vec<MetricFamily>) -> Prebuilt {
        let labels: Vec<String> = LABELS.iter().map(|l| l.to_string()).collect();
        let (descs, families) = families
            .into_iter()
            .filter_map(|f| {
                let desc = Desc::new(f.name().to_string(), f.help().to_string(), labels.clone(), HashMap::new());
                desc.ok().map(|d| (d, f))
            })
            .unzip();
        Prebuilt { descs, families }
    }
}

impl Collector for Prebuilt {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.families.clone()
    }
}

#[cfg(test)]
#[path = "metrics_tests.rs"]
mod tests;
