//! What goes into the supervisor's [`Core`](super::core::Core) and what comes out: [`Event`]s the shell
//! feeds it, [`Effect`]s it returns for the shell to perform, and the [`Setup`] it starts from. Plain data:
//! no task, no channel, no I/O.

use std::collections::BTreeMap;
use std::path::PathBuf;

use nix::sys::signal::Signal;
use pomelo_proto::config::{LogConfig, SshTarget, Topology, WorkerSpec};
use pomelo_proto::control::{BoundAddrs, Stats, ToWorker};

use super::server::{ExitStatus, Phase};
use crate::command::{Command, CommandError};
use crate::procstat::ProcSample;

/// What a worker said when it registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub conn: u64,
    pub id: String,
    pub server_type: pomelo_proto::control::ServerType,
    pub pid: u32,
    pub spec_hash: String,
    pub addrs: BoundAddrs,
    pub peer: std::net::SocketAddr,
    /// The peer is on this machine: loopback, or connected from the address it connected to.
    pub peer_local: bool,
    /// What the server's `host` resolved to when it is a DNS name (empty otherwise, or if it did not).
    pub host_addrs: Vec<std::net::IpAddr>,
}

/// Something that happened.
#[derive(Debug)]
pub enum Event {
    /// `holder_alive`: the pid this master holds for the id, if it is another, is alive (read by the shell).
    Registered {
        reg: Registration,
        holder_alive: bool,
    },
    Heartbeat {
        conn: u64,
        id: String,
        stats: Stats,
    },
    Leaving {
        conn: u64,
        id: String,
        reason: String,
    },
    Closed {
        conn: u64,
        id: String,
    },
    /// A process ended: a child reaped, or an adopted pid the shell found gone (status unknown).
    Exited {
        id: String,
        pid: u32,
        status: ExitStatus,
    },
    /// The outcome of an [`Effect::Spawn`].
    Spawned {
        id: String,
        result: Result<u32, String>,
    },
    /// Start, stop, restart or shut down (reloads come as [`Event::Reload`]).
    Command(Command),
    /// servers.yaml as just read (or why it could not be); `forced` reloads even if the content is the same.
    Reload {
        forced: bool,
        text: Result<String, String>,
    },
    /// Timers: backoff, start and stop deadlines, heartbeats, adoption.
    Tick,
    Sampled {
        servers: Vec<(String, ProcSample)>,
        master: ProcSample,
    },
    /// The master's token was cancelled.
    Shutdown,
}

/// Something the shell must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Start a process for the server (today: a local child; the shell reports [`Event::Spawned`]).
    Spawn(Box<SpawnSpec>),
    /// Signal the process group of a server's process.
    Signal {
        pid: u32,
        signal: Signal,
    },
    Send {
        conn: u64,
        msg: ToWorker,
    },
    /// Over ssh, SIGKILL the remote `pid` of server `id` on `host` if it is still that worker.
    RemoteKill {
        host: String,
        ssh: SshTarget,
        id: String,
        pid: u32,
    },
    /// Drop the control link (the worker sees it close).
    Close {
        conn: u64,
    },
    /// Tell people (the SSE feed): what happened to a server.
    Event {
        id: String,
        state: Phase,
        pid: Option<u32>,
        message: String,
    },
    /// Rewrite `workers.json` (id → pid).
    WriteWorkers(BTreeMap<String, u32>),
    /// The answer to the command being handled.
    Reply(Result<String, CommandError>),
    /// Shutdown is over: the shell stops.
    Finished,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SpawnSpec {
    pub worker: WorkerSpec,
    pub log_dir: PathBuf,
    pub logs: LogConfig,
    /// Another host: start it over ssh with these settings.
    pub ssh: Option<SshTarget>,
}

/// What the core is started with; every value the shell would otherwise read from the world.
#[derive(Debug, Clone)]
pub struct Setup {
    pub topology: Topology,
    pub cluster_token: String,
    pub control_addr: std::net::SocketAddr,
    pub admin_addr: std::net::SocketAddr,
    pub master_pid: u32,
    /// Different for every master start (and normally growing): workers tell a new master by it.
    pub epoch: u64,
    /// CPU cores, for the threads of workers whose entry sets none.
    pub cores: usize,
    /// The run and log directories made absolute for workers (whose working directory may differ).
    pub run_dir: PathBuf,
    pub log_dir: PathBuf,
    /// Live workers of an earlier master: id → pid.
    pub adopt: BTreeMap<String, u32>,
    /// External servers an earlier master had running: their platforms' processes will re-register, so
    /// the first membership waits for them as for adopted ones.
    pub rejoin: std::collections::BTreeSet<String>,
    /// The content servers.yaml had when it was loaded (`None`: unreadable).
    pub text: Option<String>,
}
