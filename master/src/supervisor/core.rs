//! The supervisor's rules, as a pure state machine over every server of the cluster.
//!
//! [`Core::on_event`] takes one [`Event`] (a link registered or closed, a process exited, a command, a
//! reload's file content, a tick, process figures) and the time, and returns the [`Effect`]s the shell
//! (`supervisor::mod` and `effects`) must carry out: spawn or signal a process, send on or close a control
//! link, write `workers.json`, tell people, answer a command. Nothing here touches a process, a socket, a
//! file or the clock: liveness checks (`/proc`) arrive as inputs, so every rule is unit-tested
//! (`core/tests.rs`). It owns no task and no channel. The events and effects are in `event.rs`;
//! registration, adoption and membership rules in `register.rs`; commands, the reload apply and the view
//! in `apply.rs`.
//!
//! Membership: only servers that are running and linked are in it; it is announced to every link when
//! it changes, numbered `(epoch, version)`, the epoch differing for each master. While adopted workers
//! of an earlier master are still expected to register, nothing is announced (see `register.rs`).
//! Shutdown: every server is stopped; the core says [`Effect::Finished`] when none is left running or
//! the shutdown deadline (stop grace + [`SHUTDOWN_SLACK`]) has passed, warning about what still runs.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use pomelo_proto::config::{Launch, ServerSpec, Topology, WorkerSpec};
use pomelo_proto::control::{BoundAddrs, Membership, Stats, ToWorker};

pub use super::event::{Effect, Event, Registration, Setup, SpawnSpec};
use super::server::{Action, ExitStatus, Server};
use crate::command::CommandError;
use crate::procstat::ProcSample;

/// How long past the stop grace a shutdown waits for the last servers before the master gives up on them.
pub const SHUTDOWN_SLACK: Duration = Duration::from_secs(5);

pub(super) struct Slot {
    pub server: Server,
    /// Started by an earlier master.
    pub adopted: bool,
    /// Adopted and not yet registered: membership waits for it (or the adoption deadline).
    pub awaiting: bool,
    pub link: Option<u64>,
    pub addrs: BoundAddrs,
    pub stats: Stats,
    /// Per-second rates of the `_total` counters in `stats`.
    pub rates: crate::view::Rates,
    pub proc: ProcSample,
    /// The spec hash a worker registered with (an adopted worker may run an older spec).
    pub spec_hash: Option<String>,
    /// Removed from servers.yaml and stopped: dropped at the end of the event.
    pub forget: bool,
    /// Another host: the local ssh process of its session, while there is one (`server.pid` then).
    pub ssh_pid: Option<u32>,
    /// Another host: the pid the worker registered with (a number on that host, never signalled here).
    pub remote_pid: Option<u32>,
    /// A new spec that starts the server another way (master ↔ external, local ↔ ssh): the running
    /// process is stopped the way it was started, and this takes effect at the next spawn.
    pub pending: Option<ServerSpec>,
    /// A chat server with a `disk` history that was out of the membership while other chat servers were in
    /// it: they owned its rooms meanwhile, so its next process starts its history anew.
    pub rooms_moved: bool,
}

impl Slot {
    /// A chat server whose room history is its own `disk` store.
    pub fn keeps_disk_history(&self) -> bool {
        self.server.spec.server_type == pomelo_proto::control::ServerType::Chat
            && self
                .server
                .spec
                .history
                .as_ref()
                .is_some_and(|h| h.backend == pomelo_proto::config::HistoryBackend::Disk)
    }

    pub fn new(spec: ServerSpec) -> Slot {
        Slot {
            server: Server::new(spec),
            adopted: false,
            awaiting: false,
            link: None,
            addrs: Default::default(),
            stats: Stats::new(),
            rates: Default::default(),
            proc: ProcSample::default(),
            spec_hash: None,
            forget: false,
            ssh_pid: None,
            remote_pid: None,
            pending: None,
            rooms_moved: false,
        }
    }
}

pub struct Core {
    pub(super) setup: Setup,
    pub(super) topo: Topology,
    pub(super) slots: Vec<Slot>,
    pub(super) started: Instant,
    pub(super) membership: Membership,
    /// Whether this master has announced a membership yet (the first goes out even if it is empty).
    pub(super) announced: bool,
    /// While adopted workers are expected to register: until when the membership waits for them.
    pub(super) adopting: Option<Instant>,
    pub(super) master_proc: ProcSample,
    pub(super) shutdown_deadline: Option<Instant>,
    pub(super) config_error: Option<String>,
    /// Hash of the servers.yaml content last read, so an unchanged file is not reloaded.
    pub(super) last_text: Option<u64>,
    /// Reloads applied or attempted since start.
    pub reloads: u64,
    /// Source of jitter for restart backoff, in [0, 1); a fixed value in tests.
    pub(super) jitter: fn() -> f64,
    /// The time of the event being handled (for rules reached through `apply`).
    pub(super) now: Instant,
}

/// Effects gathered while handling one event.
pub(super) type Out = Vec<Effect>;

impl Core {
    /// The core for `setup`, and the effects of starting: adopted workers are awaited, the rest spawned.
    pub fn new(setup: Setup, now: Instant, jitter: fn() -> f64) -> (Core, Vec<Effect>) {
        let topo = setup.topology.clone();
        let membership = Membership { epoch: setup.epoch, ..Membership::default() };
        let last_text = setup.text.as_deref().map(text_hash);
        let mut core = Core {
            setup,
            topo,
            slots: Vec::new(),
            started: now,
            membership,
            announced: false,
            adopting: None,
            master_proc: ProcSample::default(),
            shutdown_deadline: None,
            config_error: None,
            last_text,
            reloads: 0,
            jitter,
            now,
        };
        let mut out = Vec::new();
        core.start_all(now, &mut out);
        core.finish(now, &mut out);
        (core, out)
    }

    pub fn on_event(&mut self, event: Event, now: Instant) -> Vec<Effect> {
        let mut out = Vec::new();
        self.now = now;
        match event {
            Event::Registered { reg, holder_alive } => self.on_registered(reg, holder_alive, now, &mut out),
            Event::Heartbeat { conn, id, stats } => {
                if let Some(slot) = self.linked(&id, conn) {
                    slot.server.on_heartbeat(now);
                    slot.rates.update(&stats, now);
                    if slot.server.spec.launch() != Launch::Local {
                        slot.proc = super::remote::reported_proc(&stats, &slot.rates);
                    }
                    slot.stats = stats;
                }
            }
            Event::Leaving { conn, id, reason } => {
                if let Some(i) = self.slots.iter().position(|s| s.server.spec.id == id && s.link == Some(conn)) {
                    self.event(i, format!("leaving: {reason}"), &mut out);
                }
            }
            Event::Closed { conn, id } => {
                if let Some(slot) = self.linked(&id, conn) {
                    slot.link = None;
                    slot.server.on_unregistered();
                    self.remote_closed(&id, now, &mut out);
                }
            }
            Event::Exited { id, pid, status } => self.on_exited(&id, pid, status, now, &mut out),
            Event::Spawned { id, result } => self.on_spawned(&id, result, now, &mut out),
            Event::Command(cmd) => {
                let r = self.on_command(cmd, now, &mut out);
                out.push(Effect::Reply(r));
            }
            Event::Reload { forced, text } => {
                let r = if self.shutting_down() {
                    Err(CommandError::ShuttingDown)
                } else {
                    self.reload(forced, text, now, &mut out)
                };
                out.push(Effect::Reply(r));
            }
            Event::Tick => {
                let cfg = self.topo.master.clone();
                for i in 0..self.slots.len() {
                    let actions = self.slots[i].server.on_tick(now, &cfg);
                    self.apply(i, actions, &mut out);
                }
            }
            Event::Sampled { servers, master } => {
                for slot in self.slots.iter_mut().filter(|s| s.server.spec.launch() == Launch::Local) {
                    slot.proc =
                        servers.iter().find(|(id, _)| *id == slot.server.spec.id).map(|(_, p)| *p).unwrap_or_default();
                }
                self.master_proc = master;
            }
            Event::Shutdown => self.begin_shutdown(now, &mut out),
        }
        self.finish(now, &mut out);
        out
    }

    pub fn shutting_down(&self) -> bool {
        self.shutdown_deadline.is_some()
    }

    /// The pid this master holds for `id`.
    pub fn pid_of(&self, id: &str) -> Option<u32> {
        self.index(id).and_then(|i| self.slots[i].server.pid)
    }

    /// The local child this master holds for `id` (none for servers on other hosts or external ones).
    pub fn local_pid_of(&self, id: &str) -> Option<u32> {
        self.index(id)
            .filter(|i| self.slots[*i].server.spec.launch() == Launch::Local)
            .and_then(|i| self.slots[i].server.pid)
    }

    /// Adopted processes (not our children: the shell polls whether they are still alive).
    pub fn adopted_pids(&self) -> Vec<(String, u32)> {
        self.slots
            .iter()
            .filter(|s| s.adopted)
            .filter_map(|s| Some((s.server.spec.id.clone(), s.server.pid?)))
            .collect()
    }

    /// Every process this master watches.
    pub fn pids(&self) -> Vec<(String, u32)> {
        self.slots.iter().filter_map(|s| Some((s.server.spec.id.clone(), s.server.pid?))).collect()
    }

    /// The local processes of local servers (whose `/proc` figures the shell reads).
    pub fn local_pids(&self) -> Vec<(String, u32)> {
        self.slots
            .iter()
            .filter(|s| s.server.spec.launch() == Launch::Local)
            .filter_map(|s| Some((s.server.spec.id.clone(), s.server.pid?)))
            .collect()
    }

    pub fn membership(&self) -> &Membership {
        &self.membership
    }

    pub(super) fn index(&self, id: &str) -> Option<usize> {
        self.slots.iter().position(|s| s.server.spec.id == id)
    }

    /// The slot of `id` if `conn` is its current link (events of a replaced link are ignored).
    fn linked(&mut self, id: &str, conn: u64) -> Option<&mut Slot> {
        self.slots.iter_mut().find(|s| s.server.spec.id == id && s.link == Some(conn))
    }

    fn start_all(&mut self, now: Instant, out: &mut Out) {
        let adopt_deadline = now + self.topo.master.heartbeat_timeout.max(Duration::from_secs(3));
        for spec in self.topo.servers.clone() {
            let mut slot = Slot::new(spec);
            let id = slot.server.spec.id.clone();
            if let Some(pid) = self.setup.adopt.get(&id) {
                tracing::info!(server = %id, "found pid {pid} from an earlier master; waiting for it to register");
                slot.server.adopt(*pid, now, adopt_deadline);
                slot.adopted = true;
                slot.awaiting = true;
                self.adopting = Some(adopt_deadline);
                self.slots.push(slot);
            } else {
                self.slots.push(slot);
                let i = self.slots.len() - 1;
                if self.slots[i].server.spec.external {
                    tracing::info!(server = %id, host = %self.slots[i].server.spec.host,
                        "supervised externally: waiting for it to join (`pomelo-rs worker --join`)");
                    if self.setup.rejoin.contains(&id) {
                        // It ran under the master before: the membership waits for it to re-register.
                        self.slots[i].awaiting = true;
                        self.adopting = Some(adopt_deadline);
                    }
                }
                // An external server starts as `starting` too: its platform's process registers into it.
                let actions = self.slots[i].server.start(now, &self.topo.master);
                self.apply(i, actions, out);
            }
        }
    }

    /// Turns what a server's state machine decided into effects.
    pub(super) fn apply(&mut self, i: usize, actions: Vec<Action>, out: &mut Out) {
        for action in actions {
            match action {
                Action::Log(msg) => {
                    tracing::info!(server = %self.slots[i].server.spec.id, "{msg}");
                    self.event(i, msg, out);
                }
                Action::Spawn if self.slots[i].pending.is_some() => {
                    let slot = &mut self.slots[i];
                    slot.server.spec = slot.pending.take().unwrap_or_else(|| slot.server.spec.clone());
                    slot.remote_pid = None;
                    self.apply(i, vec![Action::Spawn], out);
                }
                Action::Spawn if self.slots[i].server.spec.external => {
                    self.event(i, "waiting for its platform to start it".into(), out);
                }
                Action::Spawn => out.push(Effect::Spawn(Box::new(self.spawn_spec(i)))),
                Action::Terminate => {
                    let slot = &self.slots[i];
                    if let Some(conn) = slot.link {
                        out.push(Effect::Send { conn, msg: ToWorker::Stop { reason: "stopped by the master".into() } });
                    }
                    // A remote or external server's pid names a process this master did not start (on
                    // another host, or its platform's): it is stopped only over its authenticated link,
                    // never by a signal to whatever local group has that number.
                    if let Some(pid) = slot.server.pid.filter(|_| slot.server.spec.launch() == Launch::Local) {
                        out.push(Effect::Signal { pid, signal: Signal::SIGTERM });
                        // A stopped (SIGSTOP) process must run to handle SIGTERM.
                        out.push(Effect::Signal { pid, signal: Signal::SIGCONT });
                    }
                    self.event(i, "stopping (SIGTERM)".into(), out);
                }
                Action::Kill if self.slots[i].server.spec.launch() != Launch::Local => self.remote_kill(i, out),
                Action::Kill => {
                    let slot = &self.slots[i];
                    if let Some(pid) = slot.server.pid.filter(|_| slot.server.spec.launch() == Launch::Local) {
                        out.push(Effect::Signal { pid, signal: Signal::SIGKILL });
                    }
                }
                Action::Forget => {
                    self.slots[i].forget = true;
                    self.event(i, "removed from servers.yaml".into(), out);
                }
            }
        }
    }

    /// The spec for a `supervise: external` server that proved its key and asks to join (the answer to
    /// `worker --join`), or why it may not.
    pub fn join_spec(&self, ask: &crate::control::JoinAsk) -> Result<WorkerSpec, String> {
        if self.shutting_down() {
            return Err("the master is shutting down".into());
        }
        let file = self.topo.file.display();
        let Some(i) = self.index(&ask.id) else { return Err(format!("`{}` is not in {file}", ask.id)) };
        let spec = &self.slots[i].server.spec;
        if spec.launch() != Launch::External {
            return Err(format!(
                "`{}` is started by the master ({}); only servers with `supervise: external` join",
                ask.id,
                spec.launch().as_str()
            ));
        }
        pomelo_proto::peer::fits(&spec.host, ask.peer.ip(), ask.peer_local, &ask.host_addrs)?;
        Ok(self.spawn_spec(i).worker)
    }

    fn spawn_spec(&self, i: usize) -> SpawnSpec {
        let spec = self.slots[i].server.spec.clone();
        let local = self.slots.iter().filter(|s| !s.forget && s.server.spec.is_local()).count();
        let m = &self.topo.master;
        let worker = WorkerSpec {
            control_addr: self.setup.control_addr.to_string(),
            run_dir: self.setup.run_dir.clone(),
            heartbeat_interval: m.heartbeat_interval,
            orphan_timeout: m.orphan_timeout,
            log_file: self.setup.log_dir.join(format!("{}.log", spec.id)),
            log_max_bytes: m.logs.max_bytes,
            threads: spec.threads.unwrap_or_else(|| pomelo_proto::config::auto_threads(self.setup.cores, local)),
            joined: false,
            fresh_history: self.slots[i].rooms_moved,
            server: spec,
        };
        let ssh = (!worker.server.is_local()).then(|| m.ssh.for_host(&worker.server.host));
        SpawnSpec { worker, log_dir: self.setup.log_dir.clone(), logs: m.logs.clone(), ssh }
    }

    fn on_spawned(&mut self, id: &str, result: Result<u32, String>, now: Instant, out: &mut Out) {
        let Some(i) = self.index(id) else { return };
        match result {
            Ok(pid) => {
                let slot = &mut self.slots[i];
                slot.server.on_spawned(pid, now);
                if !slot.server.spec.is_local() {
                    slot.ssh_pid = Some(pid);
                    slot.remote_pid = None;
                }
                slot.adopted = false;
                slot.awaiting = false;
                slot.stats.clear();
                slot.rates = Default::default();
                tracing::info!(server = %id, "started pid {pid}");
                self.event(i, format!("started pid {pid}"), out);
                out.push(self.workers());
            }
            Err(e) => {
                tracing::error!(server = %id, "cannot start it: {e}");
                let status = ExitStatus::Code { code: -1 };
                let actions = self.slots[i].server.on_exit(status, now, &self.topo.master, (self.jitter)());
                self.apply(i, actions, out);
            }
        }
    }

    pub(super) fn on_exited(&mut self, id: &str, pid: u32, status: ExitStatus, now: Instant, out: &mut Out) {
        let Some(i) = self.index(id) else { return };
        if self.ssh_session_ended(i, pid, out) {
            return;
        }
        // A late exit of an earlier process must not touch its replacement.
        if self.slots[i].server.pid != Some(pid) {
            return;
        }
        let slot = &mut self.slots[i];
        if let Some(conn) = slot.link.take() {
            out.push(Effect::Close { conn });
        }
        slot.server.on_unregistered();
        slot.awaiting = false;
        slot.ssh_pid = None;
        slot.remote_pid = None;
        if slot.server.spec.launch() != Launch::Local {
            // Figures the gone worker reported are not its replacement's.
            slot.proc = Default::default();
        }
        let actions = slot.server.on_exit(status, now, &self.topo.master, (self.jitter)());
        self.apply(i, actions, out);
        out.push(self.workers());
    }

    /// The end of every event: drop forgotten servers, end a shutdown, settle adoption, announce membership.
    fn finish(&mut self, now: Instant, out: &mut Out) {
        if self.slots.iter().any(|s| s.forget) {
            self.slots.retain(|s| !s.forget);
            out.push(self.workers());
        }
        if let Some(deadline) = self.shutdown_deadline {
            let live: Vec<&str> =
                self.slots.iter().filter(|s| s.server.pid.is_some()).map(|s| s.server.spec.id.as_str()).collect();
            if live.is_empty() || now >= deadline {
                if !live.is_empty() {
                    tracing::warn!("shutdown timed out; still running: {}", live.join(", "));
                }
                out.push(self.workers());
                out.push(Effect::Finished);
                return;
            }
        }
        self.settle_adoption(now);
        self.announce(out);
    }

    pub(super) fn event(&self, i: usize, message: String, out: &mut Out) {
        let s = &self.slots[i].server;
        out.push(Effect::Event { id: s.spec.id.clone(), state: s.phase(), pid: s.pid, message });
    }

    pub(super) fn workers(&self) -> Effect {
        Effect::WriteWorkers(
            self.slots.iter().filter_map(|s| s.server.pid.map(|p| (s.server.spec.id.clone(), p))).collect(),
        )
    }
}

/// The hash servers.yaml's content is compared by.
pub fn text_hash(text: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests;
