//! What the master shows the world: a snapshot of the cluster and the events that change it.
//!
//! The supervisor publishes a fresh [`ClusterView`] on a watch channel after every change and once a
//! second with new process figures; the admin API, SSE feed and `/metrics` read from it and never lock
//! the supervisor.

use std::path::PathBuf;

use pomelo_proto::control::{BoundAddrs, ServerType, Stats};
use serde::Serialize;

use crate::server::{ExitStatus, Phase};

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
}

#[derive(Debug, Clone, Serialize)]
pub struct ServerView {
    pub id: String,
    #[serde(rename = "type")]
    pub server_type: ServerType,
    pub host: String,
    pub port: Option<u16>,
    pub client_port: Option<u16>,
    /// What it actually bound.
    pub addrs: BoundAddrs,
    pub state: Phase,
    pub pid: Option<u32>,
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
