//! The supervisor: one task that owns every [`Server`] and carries out what their state machines decide.
//!
//! Inputs, all on bounded channels: control-link events, child exits, commands from the API, a 100 ms
//! tick for timers and a 1 s tick for process figures. Outputs: spawns and signals, messages on the
//! control links (welcome, membership, stop), the published [`ClusterView`] and [`ServerEvent`]s.
//! On shutdown every server is stopped (SIGTERM, grace, SIGKILL) and the task returns once all are down.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::Signal;
use pomelo_proto::config::{ServerSpec, Topology, WorkerSpec};
use pomelo_proto::control::{Membership, ServerInfo, Stats, ToWorker};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::child::{self, Exited};
use crate::control::LinkEvent;
use crate::logs::LogSink;
use crate::procstat::{ProcSample, ProcSampler};
use crate::runstate;
use crate::server::{Action, AfterStop, ExitStatus, Phase, Server};
use crate::view::{ClusterView, MasterView, ServerEvent, ServerView};

/// What the API asks of the supervisor.
#[derive(Debug)]
pub enum Command {
    Start(String),
    Stop(String),
    Restart(String),
    /// Re-read servers.yaml and apply what changed.
    Reload,
    /// Stop everything and end the master.
    Shutdown,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("no server `{0}` in servers.yaml")]
    UnknownServer(String),
    #[error("`{0}` is already stopping")]
    AlreadyStopping(String),
    #[error("`{0}` is already {1}")]
    AlreadyThere(String, &'static str),
    #[error("the master is shutting down")]
    ShuttingDown,
    #[error("{0}\nnothing was changed; the cluster runs as before")]
    InvalidConfig(String),
}

pub type Reply = oneshot::Sender<Result<String, CommandError>>;

struct Slot {
    server: Server,
    adopted: bool,
    link: Option<(u64, mpsc::Sender<ToWorker>)>,
    addrs: pomelo_proto::control::BoundAddrs,
    stats: Stats,
    /// Per-second rates of the `_total` counters in `stats`.
    rates: crate::view::Rates,
    proc: ProcSample,
    /// The spec hash a worker registered with (an adopted worker may run an older spec).
    spec_hash: Option<String>,
    /// Removed from servers.yaml and stopped: dropped at the end of the loop turn.
    forget: bool,
}

/// Everything the supervisor is started with.
pub struct Setup {
    pub topology: Topology,
    pub exe: PathBuf,
    pub cluster_token: String,
    pub control_addr: std::net::SocketAddr,
    pub admin_addr: std::net::SocketAddr,
    /// Print worker output to the terminal too.
    pub echo: bool,
    /// Live workers of an earlier master: id → pid.
    pub adopt: HashMap<String, u32>,
}

pub struct Supervisor {
    topo: Topology,
    slots: Vec<Slot>,
    exe: PathBuf,
    cluster_token: String,
    control_addr: std::net::SocketAddr,
    admin_addr: std::net::SocketAddr,
    echo: bool,
    started: Instant,
    exits_tx: mpsc::Sender<Exited>,
    membership: Membership,
    sampler: ProcSampler,
    master_proc: ProcSample,
    view_tx: watch::Sender<Arc<ClusterView>>,
    events_tx: broadcast::Sender<ServerEvent>,
    seq: u64,
    shutting_down: bool,
    config_error: Option<String>,
}

pub struct Channels {
    pub links: mpsc::Receiver<LinkEvent>,
    pub commands: mpsc::Receiver<(Command, Reply)>,
    pub view_tx: watch::Sender<Arc<ClusterView>>,
    pub events_tx: broadcast::Sender<ServerEvent>,
}

impl Supervisor {
    pub async fn run(setup: Setup, mut ch: Channels, shutdown: CancellationToken) {
        let (exits_tx, mut exits) = mpsc::channel(256);
        let now = Instant::now();
        let mut sup = Supervisor {
            slots: Vec::new(),
            exe: setup.exe,
            cluster_token: setup.cluster_token,
            control_addr: setup.control_addr,
            admin_addr: setup.admin_addr,
            echo: setup.echo,
            started: now,
            exits_tx,
            membership: Membership::default(),
            sampler: ProcSampler::new(),
            master_proc: ProcSample::default(),
            view_tx: ch.view_tx,
            events_tx: ch.events_tx,
            seq: 0,
            shutting_down: false,
            config_error: None,
            topo: setup.topology,
        };
        let adopt_deadline = now + sup.topo.master.heartbeat_timeout.max(Duration::from_secs(3));
        for spec in sup.topo.servers.clone() {
            let mut slot = new_slot(spec);
            if let Some(pid) = setup.adopt.get(&slot.server.spec.id) {
                tracing::info!(server = %slot.server.spec.id, "found pid {pid} from an earlier master; waiting for it to register");
                slot.server.adopt(*pid, now, adopt_deadline);
                slot.adopted = true;
                sup.slots.push(slot);
            } else {
                sup.slots.push(slot);
                let i = sup.slots.len() - 1;
                let cfg = sup.topo.master.clone();
                let actions = if sup.slots[i].server.spec.is_local() {
                    sup.slots[i].server.start(now, &cfg)
                } else {
                    tracing::info!(server = %sup.slots[i].server.spec.id, host = %sup.slots[i].server.spec.host,
                        "runs on another host: waiting for it to register (start it there with `pomelo-rs worker`)");
                    vec![]
                };
                sup.apply(i, actions);
            }
        }
        sup.publish();
        let mut timers = tokio::time::interval(Duration::from_millis(100));
        let mut stats_tick = tokio::time::interval(Duration::from_secs(1));
        let mut shutdown_deadline: Option<Instant> = None;
        loop {
            tokio::select! {
                Some(ev) = ch.links.recv() => sup.on_link(ev),
                Some(exit) = exits.recv() => sup.on_exited(exit),
                Some((cmd, reply)) = ch.commands.recv() => {
                    let r = sup.on_command(cmd);
                    let _ = reply.send(r);
                }
                _ = timers.tick() => sup.on_timers(),
                _ = stats_tick.tick() => sup.sample(),
                _ = shutdown.cancelled(), if !sup.shutting_down => sup.begin_shutdown(),
            }
            if sup.shutting_down {
                let deadline = *shutdown_deadline
                    .get_or_insert_with(|| Instant::now() + sup.topo.master.stop_grace + Duration::from_secs(5));
                let live: Vec<&str> =
                    sup.slots.iter().filter(|s| s.server.pid.is_some()).map(|s| s.server.spec.id.as_str()).collect();
                if live.is_empty() {
                    break;
                }
                if Instant::now() >= deadline {
                    tracing::warn!("shutdown timed out; still running: {}", live.join(", "));
                    break;
                }
            }
            if sup.slots.iter().any(|s| s.forget) {
                sup.slots.retain(|s| !s.forget);
                sup.write_workers();
            }
            sup.publish_membership();
            sup.publish();
        }
        sup.write_workers();
        sup.publish();
    }

    fn cfg(&self) -> pomelo_proto::config::MasterConfig {
        self.topo.master.clone()
    }

    fn index(&self, id: &str) -> Option<usize> {
        self.slots.iter().position(|s| s.server.spec.id == id)
    }

    /// Carries out what a server's state machine decided.
    fn apply(&mut self, i: usize, actions: Vec<Action>) {
        for action in actions {
            let id = self.slots[i].server.spec.id.clone();
            match action {
                Action::Log(msg) => {
                    tracing::info!(server = %id, "{msg}");
                    self.event(i, msg);
                }
                Action::Spawn => self.spawn(i),
                Action::Terminate => {
                    let slot = &mut self.slots[i];
                    if let Some((_, tx)) = &slot.link {
                        let _ = tx.try_send(ToWorker::Stop { reason: "stopped by the master".into() });
                    }
                    if let Some(pid) = slot.server.pid {
                        child::signal_group(pid, Signal::SIGTERM);
                        // A stopped (SIGSTOP) process must run to handle SIGTERM.
                        child::signal_group(pid, Signal::SIGCONT);
                    }
                    self.event(i, "stopping (SIGTERM)".into());
                }
                Action::Kill => {
                    if let Some(pid) = self.slots[i].server.pid {
                        child::signal_group(pid, Signal::SIGKILL);
                    }
                }
                Action::Forget => {
                    self.slots[i].forget = true;
                    self.event(i, "removed from servers.yaml".into());
                }
            }
        }
    }

    /// Threads for a worker whose entry sets none: the cores shared among the local servers listed.
    fn auto_threads(&self) -> usize {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let local = self.slots.iter().filter(|s| !s.forget && s.server.spec.is_local()).count();
        pomelo_proto::config::auto_threads(cores, local)
    }

    fn spawn(&mut self, i: usize) {
        let now = Instant::now();
        let spec = self.slots[i].server.spec.clone();
        let worker = WorkerSpec {
            control_addr: self.control_addr.to_string(),
            run_dir: absolute(&self.topo.run_dir()),
            heartbeat_interval: self.topo.master.heartbeat_interval,
            orphan_timeout: self.topo.master.orphan_timeout,
            log_file: absolute(&self.topo.log_dir().join(format!("{}.log", spec.id))),
            log_max_bytes: self.topo.master.logs.max_bytes,
            threads: spec.threads.unwrap_or_else(|| self.auto_threads()),
            server: spec.clone(),
        };
        let result = LogSink::open(&self.topo.log_dir(), &spec.id, &self.topo.master.logs, self.echo)
            .and_then(|sink| child::spawn(&self.exe, &worker, &self.cluster_token, sink, self.exits_tx.clone()));
        match result {
            Ok(pid) => {
                let slot = &mut self.slots[i];
                slot.server.on_spawned(pid, now);
                slot.adopted = false;
                slot.stats.clear();
                slot.rates = Default::default();
                tracing::info!(server = %spec.id, "started pid {pid}");
                self.event(i, format!("started pid {pid}"));
                self.write_workers();
            }
            Err(e) => {
                tracing::error!(server = %spec.id, "cannot start {}: {e}", self.exe.display());
                let actions =
                    self.slots[i].server.on_exit(ExitStatus::Code { code: -1 }, now, &self.topo.master, jitter());
                self.apply(i, actions);
            }
        }
    }

    fn on_exited(&mut self, exit: Exited) {
        let Some(i) = self.index(&exit.id) else { return };
        // A late exit of an earlier process must not touch its replacement.
        if self.slots[i].server.pid != Some(exit.pid) {
            return;
        }
        self.drop_link(i);
        let actions = self.slots[i].server.on_exit(exit.status, Instant::now(), &self.topo.master, jitter());
        self.apply(i, actions);
        self.write_workers();
    }

    fn drop_link(&mut self, i: usize) {
        self.slots[i].link = None;
        self.slots[i].server.on_unregistered();
    }

    fn on_link(&mut self, ev: LinkEvent) {
        match ev {
            LinkEvent::Registered { conn, id, server_type, pid, token, spec_hash, addrs, peer, outbox } => {
                let reject = |why: String| {
                    tracing::warn!(server = %id, "refused registration of pid {pid} from {peer}: {why}");
                    let _ = outbox.try_send(ToWorker::Rejected { reason: why });
                };
                if token != self.cluster_token {
                    return reject("wrong cluster token".into());
                }
                if self.shutting_down {
                    return reject("the master is shutting down".into());
                }
                let Some(i) = self.index(&id) else {
                    return reject(format!("`{id}` is not in {}", self.topo.file.display()));
                };
                let slot = &mut self.slots[i];
                if slot.server.spec.server_type != server_type {
                    return reject(format!("`{id}` is a {} server in servers.yaml", slot.server.spec.server_type));
                }
                match slot.server.pid {
                    Some(p) if p != pid && child::alive(p) => {
                        return reject(format!("pid {p} already serves `{id}`"));
                    }
                    None if slot.server.spec.is_local() => {
                        return reject(format!("`{id}` is {} here", slot.server.phase().as_str()));
                    }
                    _ => {}
                }
                let now = Instant::now();
                if slot.server.pid != Some(pid) {
                    slot.server.on_spawned(pid, now);
                }
                let welcome = ToWorker::Welcome {
                    master_pid: std::process::id(),
                    heartbeat_interval_ms: self.topo.master.heartbeat_interval.as_millis() as u64,
                };
                let _ = outbox.try_send(welcome);
                let _ = outbox.try_send(ToWorker::Membership(self.membership.clone()));
                slot.link = Some((conn, outbox));
                slot.addrs = addrs;
                let changed = slot.spec_hash.as_deref() != Some(spec_hash.as_str()) && slot.adopted;
                slot.spec_hash = Some(spec_hash.clone());
                let actions = slot.server.on_registered(now);
                let stale = spec_hash != slot.server.spec.fingerprint();
                self.apply(i, actions);
                if self.slots[i].adopted && changed {
                    self.event(i, format!("adopted pid {pid} from an earlier master"));
                }
                if stale {
                    let msg = "runs an older servers.yaml entry: restarting it".to_string();
                    tracing::info!(server = %id, "{msg}");
                    self.event(i, msg);
                    let actions = self.slots[i].server.restart(now, &self.topo.master);
                    self.apply(i, actions);
                }
                self.write_workers();
            }
            LinkEvent::Heartbeat { conn, id, stats } => {
                if let Some(i) = self.index(&id) {
                    let slot = &mut self.slots[i];
                    if slot.link.as_ref().is_some_and(|(c, _)| *c == conn) {
                        let now = Instant::now();
                        slot.server.on_heartbeat(now);
                        slot.rates.update(&stats, now);
                        slot.stats = stats;
                    }
                }
            }
            LinkEvent::Leaving { conn, id, reason } => {
                if let Some(i) = self.index(&id) {
                    if self.slots[i].link.as_ref().is_some_and(|(c, _)| *c == conn) {
                        self.event(i, format!("leaving: {reason}"));
                    }
                }
            }
            LinkEvent::Closed { conn, id } => {
                if let Some(i) = self.index(&id) {
                    if self.slots[i].link.as_ref().is_some_and(|(c, _)| *c == conn) {
                        self.drop_link(i);
                    }
                }
            }
        }
    }

    fn on_command(&mut self, cmd: Command) -> Result<String, CommandError> {
        if self.shutting_down {
            return Err(CommandError::ShuttingDown);
        }
        let now = Instant::now();
        let cfg = self.cfg();
        let (id, actions, done) = match cmd {
            Command::Shutdown => {
                self.begin_shutdown();
                return Ok("stopping every server, then the master".into());
            }
            Command::Reload => return self.reload(),
            Command::Start(id) => {
                let i = self.index(&id).ok_or_else(|| CommandError::UnknownServer(id.clone()))?;
                match self.slots[i].server.phase() {
                    Phase::Running | Phase::Starting => return Err(CommandError::AlreadyThere(id, "running")),
                    _ => (i, self.slots[i].server.start(now, &cfg), "starting"),
                }
            }
            Command::Stop(id) => {
                let i = self.index(&id).ok_or_else(|| CommandError::UnknownServer(id.clone()))?;
                match self.slots[i].server.phase() {
                    Phase::Stopping => return Err(CommandError::AlreadyStopping(id)),
                    Phase::Stopped => return Err(CommandError::AlreadyThere(id, "stopped")),
                    _ => (i, self.slots[i].server.stop(now, &cfg, AfterStop::Stay), "stopping"),
                }
            }
            Command::Restart(id) => {
                let i = self.index(&id).ok_or_else(|| CommandError::UnknownServer(id.clone()))?;
                match self.slots[i].server.phase() {
                    Phase::Stopping => return Err(CommandError::AlreadyStopping(id)),
                    _ => (i, self.slots[i].server.restart(now, &cfg), "restarting"),
                }
            }
        };
        self.event(id, format!("{done} (asked through the admin API)"));
        self.apply(id, actions);
        Ok(format!("{} is {done}", self.slots[id].server.spec.id))
    }

    /// Re-reads servers.yaml; an invalid file changes nothing and is shown until a valid one arrives.
    fn reload(&mut self) -> Result<String, CommandError> {
        let new = match Topology::load(&self.topo.file, &self.topo.env) {
            Ok(t) => t,
            Err(e) => {
                let msg = e.to_string();
                tracing::error!("{msg}\nnothing was changed; the cluster runs as before");
                self.config_error = Some(msg.clone());
                return Err(CommandError::InvalidConfig(msg));
            }
        };
        self.config_error = None;
        let d = crate::reload::diff(&self.topo.servers, &new.servers);
        let mut master = new.master.clone();
        let fixed = crate::reload::needs_master_restart(&self.topo.master, &new.master);
        if !fixed.is_empty() {
            tracing::warn!("changed in servers.yaml but only applied when the master restarts: {}", fixed.join(", "));
            let old = &self.topo.master;
            master.host.clone_from(&old.host);
            master.control_port = old.control_port;
            master.admin = old.admin;
            master.admin_token.clone_from(&old.admin_token);
            master.run_dir.clone_from(&old.run_dir);
            master.heartbeat_interval = old.heartbeat_interval;
        }
        self.topo.master = master;
        self.topo.servers.clone_from(&new.servers);
        let now = Instant::now();
        let cfg = self.cfg();
        for id in &d.removed {
            if let Some(i) = self.index(id) {
                let actions = self.slots[i].server.stop(now, &cfg, AfterStop::Remove);
                self.apply(i, actions);
            }
        }
        for id in &d.changed {
            let (Some(i), Some(spec)) = (self.index(id), new.server(id)) else { continue };
            self.slots[i].server.spec = spec.clone();
            if !self.slots[i].server.is_down_for_good() && spec.is_local() {
                self.event(i, "changed in servers.yaml: restarting".into());
                let actions = self.slots[i].server.restart(now, &cfg);
                self.apply(i, actions);
            }
        }
        for id in &d.added {
            let Some(spec) = new.server(id) else { continue };
            // A server removed a moment ago and still stopping comes back with its new spec.
            if let Some(i) = self.index(id) {
                self.slots[i].server.spec = spec.clone();
                let actions = self.slots[i].server.stop(now, &cfg, AfterStop::Restart);
                self.apply(i, actions);
                continue;
            }
            self.slots.push(new_slot(spec.clone()));
            let i = self.slots.len() - 1;
            if spec.is_local() {
                let actions = self.slots[i].server.start(now, &cfg);
                self.apply(i, actions);
            }
        }
        // Membership follows file order; servers on their way out go last.
        let order = |id: &str| new.servers.iter().position(|s| s.id == id).unwrap_or(usize::MAX);
        self.slots.sort_by_key(|s| order(&s.server.spec.id));
        let mut summary = d.summary();
        if !fixed.is_empty() {
            summary.push_str(&format!("; not applied until the master restarts: {}", fixed.join(", ")));
        }
        tracing::info!("servers.yaml applied: {summary}");
        Ok(summary)
    }

    fn begin_shutdown(&mut self) {
        if self.shutting_down {
            return;
        }
        tracing::info!("stopping every server");
        self.shutting_down = true;
        let now = Instant::now();
        let cfg = self.cfg();
        for i in 0..self.slots.len() {
            let actions = self.slots[i].server.stop(now, &cfg, AfterStop::Stay);
            self.apply(i, actions);
        }
    }

    fn on_timers(&mut self) {
        let now = Instant::now();
        let cfg = self.cfg();
        for i in 0..self.slots.len() {
            // An adopted worker is not our child: notice its end by polling.
            let slot = &self.slots[i];
            if slot.adopted {
                if let Some(pid) = slot.server.pid.filter(|p| !child::alive(*p)) {
                    self.on_exited(Exited { id: slot.server.spec.id.clone(), pid, status: ExitStatus::Unknown });
                    continue;
                }
            }
            let actions = self.slots[i].server.on_tick(now, &cfg);
            self.apply(i, actions);
        }
    }

    fn sample(&mut self) {
        let now = Instant::now();
        for slot in &mut self.slots {
            slot.proc = slot.server.pid.and_then(|p| self.sampler.sample(p, now)).unwrap_or_default();
        }
        self.master_proc = self.sampler.sample(std::process::id(), now).unwrap_or_default();
        let mut live: Vec<u32> = self.slots.iter().filter_map(|s| s.server.pid).collect();
        live.push(std::process::id());
        self.sampler.retain(&live);
    }

    /// Sends the membership to every worker when it changed.
    fn publish_membership(&mut self) {
        let servers: Vec<ServerInfo> = self
            .slots
            .iter()
            .filter(|s| s.server.phase() == Phase::Running && s.link.is_some())
            .map(|s| ServerInfo {
                id: s.server.spec.id.clone(),
                server_type: s.server.spec.server_type,
                host: s.server.spec.host.clone(),
                pid: s.server.pid.unwrap_or(0),
                addrs: s.addrs.clone(),
            })
            .collect();
        if servers == self.membership.servers {
            return;
        }
        self.membership = Membership { version: self.membership.version + 1, servers };
        let msg = ToWorker::Membership(self.membership.clone());
        for slot in &self.slots {
            if let Some((_, tx)) = &slot.link {
                if tx.try_send(msg.clone()).is_err() {
                    tracing::warn!(server = %slot.server.spec.id, "control link is backed up; membership not sent");
                }
            }
        }
    }

    fn event(&self, i: usize, message: String) {
        let s = &self.slots[i].server;
        let at_ms = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        let _ =
            self.events_tx.send(ServerEvent { at_ms, id: s.spec.id.clone(), state: s.phase(), pid: s.pid, message });
    }

    fn write_workers(&self) {
        let map: std::collections::BTreeMap<&str, u32> =
            self.slots.iter().filter_map(|s| s.server.pid.map(|p| (s.server.spec.id.as_str(), p))).collect();
        if let Err(e) = runstate::write_json(&runstate::workers_file(&self.topo.run_dir()), &map) {
            tracing::warn!("cannot write workers.json: {e}");
        }
    }

    fn publish(&mut self) {
        let now = Instant::now();
        self.seq += 1;
        let view = ClusterView {
            seq: self.seq,
            master: MasterView {
                pid: std::process::id(),
                env: self.topo.env.clone(),
                config: self.topo.file.clone(),
                control_addr: self.control_addr.to_string(),
                admin_addr: self.admin_addr.to_string(),
                uptime_secs: now.duration_since(self.started).as_secs_f64(),
                config_error: self.config_error.clone(),
                cpu_seconds: self.master_proc.cpu_seconds,
                rss_bytes: self.master_proc.rss_bytes,
            },
            servers: self.slots.iter().map(|s| server_view(s, now)).collect(),
        };
        self.view_tx.send_replace(Arc::new(view));
    }
}

fn server_view(s: &Slot, now: Instant) -> ServerView {
    let spec = &s.server.spec;
    ServerView {
        id: spec.id.clone(),
        server_type: spec.server_type,
        host: spec.host.clone(),
        port: spec.port,
        client_port: spec.client_port,
        addrs: s.addrs.clone(),
        state: s.server.phase(),
        pid: s.server.pid,
        adopted: s.adopted,
        uptime_secs: s.server.uptime(now).map(|d| d.as_secs_f64()),
        restarts: s.server.restarts.total,
        last_exit: s.server.last_exit.clone(),
        cpu_percent: s.proc.cpu_percent,
        cpu_seconds: s.proc.cpu_seconds,
        rss_bytes: s.proc.rss_bytes,
        open_fds: s.proc.open_fds,
        stats: s.stats.clone(),
        rates: s.rates.current.clone(),
    }
}

fn new_slot(spec: ServerSpec) -> Slot {
    Slot {
        server: Server::new(spec),
        adopted: false,
        link: None,
        addrs: Default::default(),
        stats: Stats::new(),
        rates: Default::default(),
        proc: ProcSample::default(),
        spec_hash: None,
        forget: false,
    }
}

fn jitter() -> f64 {
    rand::random::<f64>()
}

fn absolute(p: &std::path::Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}
