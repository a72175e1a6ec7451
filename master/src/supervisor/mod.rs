//! The supervisor: one task that feeds what happens to the pure [`core::Core`] and performs what it decides.
//!
//! Inputs, all on bounded channels: control-link events, child exits, commands (from the API, the CLI
//! and the reload triggers), a 100 ms tick for timers and adopted-pid liveness, a 1 s tick for process
//! figures, and the shutdown token. Each becomes one [`Event`]; the resulting [`core::Effect`]s are
//! performed by [`effects::Effects`]; then a fresh [`ClusterView`] is published. The loop reads the world
//! for the core (the file's content for a reload, whether a pid is alive, `/proc` figures) and nothing else.
//! On shutdown every server is stopped (SIGTERM, grace, SIGKILL) and the task returns once all are down or
//! the core's shutdown deadline passed.

mod apply;
pub mod core;
mod effects;
pub mod event;
mod register;
mod remote;
pub mod restart;
pub mod server;

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::core::{Core, Effect, Event};
use crate::child::{self, Exited};
use crate::command::{Command, Reply};
use crate::control::LinkEvent;
use crate::procstat::ProcSampler;
use crate::runstate;
use crate::view::{ClusterView, ExitStatus, ServerEvent};

/// Everything the supervisor is started with.
pub struct Setup {
    pub topology: pomelo_proto::config::Topology,
    pub exe: PathBuf,
    pub cluster_token: String,
    /// The cluster CA: each spawned worker gets a certificate from it.
    pub tls: Option<Arc<pomelo_proto::tls::Authority>>,
    pub control_addr: std::net::SocketAddr,
    pub admin_addr: std::net::SocketAddr,
    /// Print worker output to the terminal too.
    pub echo: bool,
    /// Live workers of an earlier master: id → pid.
    pub adopt: HashMap<String, u32>,
    /// External servers an earlier master had running (awaited before the first membership).
    pub rejoin: Vec<String>,
}

pub struct Channels {
    pub links: mpsc::Receiver<LinkEvent>,
    pub commands: mpsc::Receiver<(Command, Reply)>,
    pub view_tx: watch::Sender<Arc<ClusterView>>,
    pub events_tx: broadcast::Sender<ServerEvent>,
}

/// Runs the supervisor until shutdown is over; child tasks go on `tasks`.
pub async fn run(setup: Setup, mut ch: Channels, tasks: TaskTracker, shutdown: CancellationToken) {
    let (exits_tx, mut exits) = mpsc::channel(256);
    let topo = &setup.topology;
    let epoch = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    let core_setup = core::Setup {
        cluster_token: setup.cluster_token.clone(),
        control_addr: setup.control_addr,
        admin_addr: setup.admin_addr,
        master_pid: std::process::id(),
        epoch,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        run_dir: absolute(&topo.run_dir()),
        log_dir: absolute(&topo.log_dir()),
        adopt: setup.adopt.into_iter().collect(),
        rejoin: setup.rejoin.into_iter().collect(),
        // Read again here rather than passed from the load: an edit in between is missed until the next.
        text: std::fs::read_to_string(&topo.file).ok(),
        topology: topo.clone(),
    };
    let mut shell = Shell {
        effects: effects::Effects {
            workers_file: runstate::workers_file(&topo.run_dir()),
            exe: setup.exe,
            cluster_token: setup.cluster_token,
            tls: setup.tls,
            echo: setup.echo,
            exits: exits_tx,
            tasks,
            events: ch.events_tx,
            outboxes: HashMap::new(),
        },
        view_tx: ch.view_tx,
        seq: 0,
        sampler: ProcSampler::new(),
        file: topo.file.clone(),
    };
    let (mut core, effects) = Core::new(core_setup, Instant::now(), jitter);
    let mut done = shell.perform(&mut core, effects, None);
    let mut timers = tokio::time::interval(Duration::from_millis(100));
    let mut stats_tick = tokio::time::interval(Duration::from_secs(1));
    while !done {
        let (events, mut reply) = tokio::select! {
            Some(ev) = ch.links.recv() => (shell.link_event(&core, ev).into_iter().collect(), None),
            Some(Exited { id, pid, status }) = exits.recv() => (vec![Event::Exited { id, pid, status }], None),
            Some((cmd, reply)) = ch.commands.recv() => (vec![shell.command(cmd)], Some(reply)),
            _ = timers.tick() => {
                // An adopted worker is not our child: notice its end by polling.
                let mut events: Vec<Event> = core
                    .adopted_pids()
                    .into_iter()
                    .filter(|(_, pid)| !child::alive(*pid))
                    .map(|(id, pid)| Event::Exited { id, pid, status: ExitStatus::Unknown })
                    .collect();
                events.push(Event::Tick);
                (events, None)
            }
            _ = stats_tick.tick() => (vec![shell.sample(&core)], None),
            _ = shutdown.cancelled(), if !core.shutting_down() => (vec![Event::Shutdown], None),
        };
        for event in events {
            let effects = core.on_event(event, Instant::now());
            done |= shell.perform(&mut core, effects, reply.take());
        }
    }
}

struct Shell {
    effects: effects::Effects,
    view_tx: watch::Sender<Arc<ClusterView>>,
    seq: u64,
    sampler: ProcSampler,
    file: PathBuf,
}

impl Shell {
    /// Performs effects (and those of the events they cause), answers `reply`, publishes the view.
    /// Returns whether the core said the supervisor is finished.
    fn perform(&mut self, core: &mut Core, effects: Vec<Effect>, mut reply: Option<Reply>) -> bool {
        let mut queue = VecDeque::from(effects);
        let mut finished = false;
        while let Some(effect) = queue.pop_front() {
            match effect {
                Effect::Reply(r) => {
                    if let Some(tx) = reply.take() {
                        // The asker may have given up waiting.
                        let _ = tx.send(r);
                    }
                }
                Effect::Finished => finished = true,
                other => {
                    if let Some(event) = self.effects.perform(other) {
                        queue.extend(core.on_event(event, Instant::now()));
                    }
                }
            }
        }
        self.seq += 1;
        self.view_tx.send_replace(Arc::new(core.view(Instant::now(), self.seq)));
        finished
    }

    /// The event a link event is for the core; a join is answered here from the core's state.
    fn link_event(&mut self, core: &Core, ev: LinkEvent) -> Option<Event> {
        Some(match ev {
            LinkEvent::Registered { reg, outbox } => {
                self.effects.outboxes.insert(reg.conn, outbox);
                let holder_alive = core.local_pid_of(&reg.id).is_some_and(|p| p != reg.pid && child::alive(p));
                Event::Registered { reg, holder_alive }
            }
            LinkEvent::Heartbeat { conn, id, stats } => Event::Heartbeat { conn, id, stats },
            LinkEvent::Leaving { conn, id, reason } => Event::Leaving { conn, id, reason },
            LinkEvent::Closed { conn, id } => {
                self.effects.outboxes.remove(&conn);
                Event::Closed { conn, id }
            }
            LinkEvent::Join { ask, reply } => {
                // The asker may have given up waiting.
                let _ = reply.send(core.join_spec(&ask));
                return None;
            }
        })
    }

    /// A reload carries the file's content, read here so the core stays pure.
    fn command(&self, cmd: Command) -> Event {
        let read = || std::fs::read_to_string(&self.file).map_err(|e| e.to_string());
        match cmd {
            Command::Reload => Event::Reload { forced: true, text: read() },
            Command::ReloadIfChanged => Event::Reload { forced: false, text: read() },
            other => Event::Command(other),
        }
    }

    fn sample(&mut self, core: &Core) -> Event {
        let now = Instant::now();
        let me = std::process::id();
        let pids = core.local_pids();
        let servers = pids.iter().filter_map(|(id, pid)| Some((id.clone(), self.sampler.sample(*pid, now)?))).collect();
        let master = self.sampler.sample(me, now).unwrap_or_default();
        let mut live: Vec<u32> = pids.iter().map(|(_, p)| *p).collect();
        live.push(me);
        self.sampler.retain(&live);
        Event::Sampled { servers, master }
    }
}

fn jitter() -> f64 {
    rand::random::<f64>()
}

fn absolute(p: &std::path::Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}
