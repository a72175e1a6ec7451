//! Messages on the control link between the master and each worker.
//!
//! One TCP connection per worker, framed by [`crate::link::JsonFramed`]. It opens with the handshake of
//! [`crate::auth`]: the worker sends [`ToMaster::Hello`] (its id and a nonce), the master proves itself in
//! [`ToWorker::Challenge`], and the worker, only if that proof holds, proves itself in
//! [`ToMaster::Register`]; the master answers [`ToWorker::Welcome`] or [`ToWorker::Rejected`], then sends the
//! live [`Membership`] and every change to it. The worker sends [`ToMaster::Heartbeat`] with its stats every
//! heartbeat interval; a master that hears nothing for the heartbeat timeout treats the worker as hung.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// The kinds of server a cluster runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServerType {
    Gate,
    Connector,
    Chat,
}

impl ServerType {
    pub const ALL: [ServerType; 3] = [ServerType::Gate, ServerType::Connector, ServerType::Chat];

    pub fn as_str(self) -> &'static str {
        match self {
            ServerType::Gate => "gate",
            ServerType::Connector => "connector",
            ServerType::Chat => "chat",
        }
    }

    /// Frontends own client sockets.
    pub fn is_frontend(self) -> bool {
        matches!(self, ServerType::Gate | ServerType::Connector)
    }

    pub fn parse(s: &str) -> Option<ServerType> {
        ServerType::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

impl std::fmt::Display for ServerType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The addresses a worker actually bound (ports may be configured as 0).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BoundAddrs {
    /// Cluster RPC listener, if the server has one.
    pub rpc: Option<SocketAddr>,
    /// Client listener (frontends).
    pub client: Option<SocketAddr>,
}

/// One live server as every worker sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerInfo {
    pub id: String,
    pub server_type: ServerType,
    /// The host clients and peers should use to reach it (from servers.yaml).
    pub host: String,
    /// Connectors: the host the gate gives clients, when it is not `host` (`clientHost`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_host: Option<String>,
    pub pid: u32,
    pub addrs: BoundAddrs,
    /// Chat servers only: the link key of each connector with this chat server, wrapped for that connector
    /// (see [`crate::auth::wrapped_link_keys`]), by connector id.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub link_keys: BTreeMap<String, String>,
}

/// The live servers, in a stable order (the order of `servers.yaml`), only those registered and running.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    /// Different for every master start (its start time in ms since the Unix epoch, so normally growing):
    /// a worker that sees a new epoch knows a new master numbers the versions. Absent (0) from older masters.
    #[serde(default)]
    pub epoch: u64,
    /// Bumped by the master on every change (from 1 for each master, so compare it within one epoch).
    pub version: u64,
    pub servers: Vec<ServerInfo>,
}

impl Membership {
    /// The live servers of one type, in membership order.
    pub fn of_type(&self, t: ServerType) -> impl Iterator<Item = &ServerInfo> {
        self.servers.iter().filter(move |s| s.server_type == t)
    }
}

/// Counters and gauges a worker reports; names are Prometheus-style without the `pomelo_` prefix,
/// e.g. `connections`, `handshakes_total`, `bytes_in_total`.
pub type Stats = BTreeMap<String, f64>;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum ToMaster {
    /// The first frame: who the worker claims to be, and its nonce.
    Hello {
        id: String,
        nonce: String,
    },
    /// After the master's challenge checked out: the registration and the worker's proof.
    Register {
        id: String,
        server_type: ServerType,
        pid: u32,
        /// The worker's proof over the handshake transcript, made with its server key.
        proof: String,
        /// Hash of the spec the worker was started with, so a new master can tell whether it changed.
        spec_hash: String,
        addrs: BoundAddrs,
    },
    /// Instead of `Register`, from `pomelo-rs worker --join` (a server its platform starts): the proof,
    /// and a request for the spec the master holds for it. The master answers `Spec` or `Rejected` and
    /// closes; the worker then opens its control link and registers as any other.
    Join {
        id: String,
        proof: String,
    },
    Heartbeat {
        stats: Stats,
    },
    /// The worker is shutting down on its own (orphan timeout, stop request): not a crash.
    Leaving {
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum ToWorker {
    /// The master's answer to a hello: its nonce and its proof, made with the worker's server key.
    Challenge {
        nonce: String,
        proof: String,
    },
    Welcome {
        master_pid: u32,
        heartbeat_interval_ms: u64,
    },
    Rejected {
        reason: String,
    },
    Membership(Membership),
    /// The answer to every heartbeat: a worker that hears nothing for a while knows the link is dead.
    HeartbeatAck,
    /// The answer to `Join`: the spec this server runs with.
    Spec {
        spec: Box<crate::config::WorkerSpec>,
    },
    /// Drain (frontends kick their clients with `reason`) and exit.
    Stop {
        reason: String,
    },
}

/// What `pomelo-rs credential` writes and `worker --join` reads: everything a server its platform starts
/// needs to prove itself, and nothing more (never the cluster secret or the CA's key).
#[derive(Serialize, Deserialize)]
pub struct JoinCredential {
    pub id: String,
    /// The server key (hex), derived from the cluster secret for this id.
    pub key: String,
    /// Its cluster TLS material (CA, certificate, key) when cluster TLS is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<crate::tls::Material>,
}
