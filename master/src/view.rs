//! What the master shows the world: a snapshot of the cluster and the events that change it.
//!
//! The supervisor publishes a fresh [`ClusterView`] on a watch channel after every change and once a
//! second with new process figures; the admin API, SSE feed and `/metrics` read from it and never lock
//! the supervisor. [`Phase`] and [`ExitStatus`] live here, below the supervisor, so that this module and
//! `child.rs` need nothing from it. Plain data: no task, no channel.

use std::path::PathBuf;

use pomelo_proto::control::{BoundAddrs, ServerType, Stats};
use serde::Serialize;

/// What a person or a dashboard sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Starting,
    Running,
    Backoff,
    Stopping,
    Stopped,
    Failed,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Running => "running",
            Phase::Backoff => "backoff",
            Phase::Stopping => "stopping",
            Phase::Stopped => "stopped",
            Phase::Failed => "failed",
        }
    }
}

/// Why a process ended, as far as the master knows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ExitStatus {
    Code {
        code: i32,
    },
    Signal {
        signal: i32,
        name: String,
    },
    /// An adopted worker (not our child) vanished; its status is not ours to read.
    Unknown,
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Code { code } => write!(f, "exit code {code}"),
            ExitStatus::Signal { name, .. } => write!(f, "killed by {name}"),
            ExitStatus::Unknown => write!(f, "gone (not a child of this master; status unknown)"),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct MasterView {
    pub pid: u32,
    pub env: String,
    pub config: PathBuf,
    pub control_addr: String,
    pub admin_addr: String,
    pub uptime_secs: f64,
    /// The last reload error, shown until a valid file is loaded.
    pub config_error: Option<String>,
    pub cpu_seconds: f64,
    pub rss_bytes: u64,
    /// Files the master has open, and its limit (raised to the hard limit at start).
    pub open_fds: u64,
    pub max_fds: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServerView {
    pub id: String,
    #[serde(rename = "type")]
    pub server_type: ServerType,
    pub host: String,
    /// Who starts it: `local` (a child of the master), `ssh` (the master over ssh), `external` (a platform).
    pub supervisor: String,
    pub port: Option<u16>,
    pub client_port: Option<u16>,
    /// What it actually bound.
    pub addrs: BoundAddrs,
    pub state: Phase,
    /// The process id on the server's own host (for `ssh` and `external`, as the worker reported it).
    pub pid: Option<u32>,
    /// `ssh`: the master's local ssh process for the session, while there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_pid: Option<u32>,
    /// Started by an earlier master and adopted by this one.
    pub adopted: bool,
    pub uptime_secs: Option<f64>,
    pub restarts: u64,
    pub last_exit: Option<ExitStatus>,
    pub cpu_percent: f64,
    pub cpu_seconds: f64,
    pub rss_bytes: u64,
    pub open_fds: u64,
    /// Counters and gauges the worker reports (connections, rooms, messages...).
    pub stats: Stats,
    /// Per-second rates of the counters in `stats` (`messages_in_total` → `messages_in`), over the last
    /// few seconds.
    pub rates: Stats,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClusterView {
    /// Bumped on every publication.
    pub seq: u64,
    pub master: MasterView,
    pub servers: Vec<ServerView>,
}

/// A change worth telling a person about.
#[derive(Debug, Clone, Serialize)]
pub struct ServerEvent {
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    pub id: String,
    pub state: Phase,
    pub pid: Option<u32>,
    pub message: String,
}

/// Turns counters into per-second rates, averaged over at least [`Rates::SPAN`].
#[derive(Debug, Clone, Default)]
pub struct Rates {
    base: Option<(std::time::Instant, Stats)>,
    pub current: Stats,
}

impl Rates {
    pub const SPAN: std::time::Duration = std::time::Duration::from_secs(2);

    pub fn update(&mut self, stats: &Stats, now: std::time::Instant) {
        let Some((t0, old)) = &self.base else {
            self.base = Some((now, stats.clone()));
            return;
        };
        let dt = now.duration_since(*t0);
        if dt < Self::SPAN {
            return;
        }
        let secs = dt.as_secs_f64();
        self.current = stats
            .iter()
            .filter_map(|(k, v)| {
                let name = k.strip_suffix("_total")?;
                let before = old.get(k).copied().unwrap_or(0.0);
                Some((name.to_string(), ((v - before) / secs).max(0.0)))
            })
            .collect();
        self.base = Some((now, stats.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn rates_are_deltas_per_second_of_total_counters() {
        let mut r = Rates::default();
        let t0 = Instant::now();
        let s = |n: f64| Stats::from([("messages_in_total".to_string(), n), ("connections".to_string(), 5.0)]);
        r.update(&s(100.0), t0);
        r.update(&s(150.0), t0 + Duration::from_secs(1));
        assert!(r.current.is_empty(), "not before the span");
        r.update(&s(300.0), t0 + Duration::from_secs(2));
        assert_eq!(r.current.get("messages_in"), Some(&100.0));
        assert!(!r.current.contains_key("connections"));
    }
}
