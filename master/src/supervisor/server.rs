//! The life of one supervised server, as a pure state machine.
//!
//! Each method takes the current time and an event and returns the [`Action`]s the supervisor must carry
//! out (spawn, signal, tell the worker); nothing here touches a process, so every transition is unit-tested.
//!
//! ```text
//!  stopped/failed --start--> starting --registered--> running
//!        ^                      |  \--start timeout--> (killed) ---exit---> backoff --elapsed--> starting
//!        |                      v                                  \--too many--> failed
//!        +----exit---- stopping <--stop-- (any live state)
//! running --heartbeats stop--> (killed as hung) --exit--> backoff
//! ```

use std::time::{Duration, Instant};

use super::restart::{RestartTracker, Verdict};
pub use crate::view::{ExitStatus, Phase};
use pomelo_proto::config::{MasterConfig, ServerSpec};

/// What to do once a stopping server has exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterStop {
    Stay,
    Restart,
    /// It was removed from servers.yaml.
    Remove,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Spawn,
    /// SIGTERM to the process group, and a `Stop` on the control link.
    Terminate,
    /// SIGKILL to the process group.
    Kill,
    /// The server is gone for good (removed from the file) and can be forgotten.
    Forget,
    Log(String),
}

#[derive(Debug, Clone)]
enum State {
    Starting { deadline: Instant },
    Running,
    Backoff { until: Instant },
    Stopping { deadline: Instant, killed: bool, then: AfterStop },
    Stopped,
    Failed,
}

/// One server: its spec, state, process and history.
#[derive(Debug, Clone)]
pub struct Server {
    pub spec: ServerSpec,
    state: State,
    pub pid: Option<u32>,
    /// Registered on the control link (a live link makes it part of the membership).
    pub registered: bool,
    /// When the current process started, for uptime.
    pub started_at: Option<Instant>,
    pub last_heartbeat: Option<Instant>,
    pub last_exit: Option<ExitStatus>,
    pub restarts: RestartTracker,
    /// Why the last kill happened (hung, start timeout), reported with the exit.
    kill_reason: Option<&'static str>,
}

impl Server {
    /// A server that has not been started.
    pub fn new(spec: ServerSpec) -> Server {
        Server {
            spec,
            state: State::Stopped,
            pid: None,
            registered: false,
            started_at: None,
            last_heartbeat: None,
            last_exit: None,
            restarts: RestartTracker::default(),
            kill_reason: None,
        }
    }

    /// Starting again, waiting to, or stopping to restart: its process is coming back.
    pub fn coming_back(&self) -> bool {
        matches!(
            self.state,
            State::Starting { .. } | State::Backoff { .. } | State::Stopping { then: AfterStop::Restart, .. }
        )
    }

    pub fn phase(&self) -> Phase {
        match self.state {
            State::Starting { .. } => Phase::Starting,
            State::Running => Phase::Running,
            State::Backoff { .. } => Phase::Backoff,
            State::Stopping { .. } => Phase::Stopping,
            State::Stopped => Phase::Stopped,
            State::Failed => Phase::Failed,
        }
    }

    pub fn uptime(&self, now: Instant) -> Option<Duration> {
        self.started_at.filter(|_| self.pid.is_some()).map(|t| now.duration_since(t))
    }

    /// Start (or start again) from stopped or failed; a person's start clears the crash history.
    pub fn start(&mut self, now: Instant, cfg: &MasterConfig) -> Vec<Action> {
        match self.state {
            State::Stopped | State::Failed | State::Backoff { .. } => {
                self.restarts.clear();
                self.state = State::Starting { deadline: now + cfg.start_timeout };
                vec![Action::Spawn]
            }
            State::Stopping { deadline, killed, .. } => {
                self.state = State::Stopping { deadline, killed, then: AfterStop::Restart };
                vec![]
            }
            State::Starting { .. } | State::Running => vec![],
        }
    }

    /// The spawn succeeded.
    pub fn on_spawned(&mut self, pid: u32, now: Instant) {
        self.pid = Some(pid);
        self.started_at = Some(now);
        self.registered = false;
        self.last_heartbeat = None;
        self.kill_reason = None;
    }

    /// A live process found from an earlier master; it has `deadline` to register.
    pub fn adopt(&mut self, pid: u32, now: Instant, deadline: Instant) {
        self.on_spawned(pid, now);
        self.state = State::Starting { deadline };
    }

    /// The worker registered on the control link.
    pub fn on_registered(&mut self, now: Instant) -> Vec<Action> {
        self.registered = true;
        self.last_heartbeat = Some(now);
        match self.state {
            State::Starting { .. } => {
                self.state = State::Running;
                vec![Action::Log(format!("running (pid {})", self.pid.unwrap_or(0)))]
            }
            // A worker that reconnects while running, or one we are stopping, stays as it is.
            _ => vec![],
        }
    }

    pub fn on_heartbeat(&mut self, now: Instant) {
        self.last_heartbeat = Some(now);
    }

    /// The control link dropped; the process may still be alive (the exit tells).
    pub fn on_unregistered(&mut self) {
        self.registered = false;
    }

    /// The process exited (or could not be spawned, with `status` saying why).
    pub fn on_exit(&mut self, status: ExitStatus, now: Instant, cfg: &MasterConfig, jitter: f64) -> Vec<Action> {
        let uptime = self.uptime(now).unwrap_or_default();
        self.pid = None;
        self.registered = false;
        self.last_exit = Some(status.clone());
        let why = self.kill_reason.take().map(|r| format!(" after {r}")).unwrap_or_default();
        match self.state {
            State::Stopping { then, .. } => {
                let mut actions = vec![Action::Log(format!("stopped ({status})"))];
                match then {
                    AfterStop::Stay => self.state = State::Stopped,
                    AfterStop::Remove => {
                        self.state = State::Stopped;
                        actions.push(Action::Forget);
                    }
                    AfterStop::Restart => {
                        self.restarts.count_manual();
                        self.state = State::Starting { deadline: now + cfg.start_timeout };
                        actions.push(Action::Spawn);
                    }
                }
                actions
            }
            State::Stopped | State::Failed => vec![],
            _ if !self.spec.auto_restart => {
                self.state = State::Stopped;
                vec![Action::Log(format!("exited{why} ({status}); autoRestart is off, leaving it stopped"))]
            }
            _ => match self.restarts.on_crash(&cfg.restart, now, uptime, jitter) {
                Verdict::Backoff(d) => {
                    self.state = State::Backoff { until: now + d };
                    vec![Action::Log(format!(
                        "exited{why} ({status}) after {:.1}s up; restarting in {} ms",
                        uptime.as_secs_f64(),
                        d.as_millis()
                    ))]
                }
                Verdict::GiveUp => {
                    self.state = State::Failed;
                    vec![Action::Log(format!(
                        "exited{why} ({status}); more than {} restarts within {}s: marked failed until restarted by hand",
                        cfg.restart.max_restarts,
                        cfg.restart.window.as_secs()
                    ))]
                }
            },
        }
    }

    /// Stop it and keep it stopped (or `then` once it has exited).
    pub fn stop(&mut self, now: Instant, cfg: &MasterConfig, then: AfterStop) -> Vec<Action> {
        match self.state {
            State::Stopping { deadline, killed, .. } => {
                self.state = State::Stopping { deadline, killed, then };
                vec![]
            }
            _ if self.pid.is_some() => {
                self.state = State::Stopping { deadline: now + cfg.stop_grace, killed: false, then };
                vec![Action::Terminate]
            }
            _ => {
                self.state = State::Stopped;
                match then {
                    AfterStop::Stay => vec![],
                    AfterStop::Remove => vec![Action::Forget],
                    AfterStop::Restart => self.start(now, cfg),
                }
            }
        }
    }

    /// Restart by hand: stop, then start again, whatever the crash history.
    pub fn restart(&mut self, now: Instant, cfg: &MasterConfig) -> Vec<Action> {
        self.restarts.clear();
        self.stop(now, cfg, AfterStop::Restart)
    }

    /// Time passes: backoff ends, grace runs out, a worker stops heartbeating or never registers.
    pub fn on_tick(&mut self, now: Instant, cfg: &MasterConfig) -> Vec<Action> {
        match self.state {
            State::Backoff { until } if now >= until => {
                self.state = State::Starting { deadline: now + cfg.start_timeout };
                vec![Action::Spawn]
            }
            State::Starting { deadline } if now >= deadline && self.pid.is_some() && self.kill_reason.is_none() => {
                self.kill_reason = Some("not registering within startTimeout");
                vec![
                    Action::Log(format!("did not register within {}s: killing it", cfg.start_timeout.as_secs_f64())),
                    Action::Kill,
                ]
            }
            State::Running if self.kill_reason.is_none() => {
                let silent = self.last_heartbeat.map(|t| now.duration_since(t)).unwrap_or_default();
                if silent >= cfg.heartbeat_timeout {
                    self.kill_reason = Some("missed heartbeats");
                    vec![
                        Action::Log(format!(
                            "no heartbeat for {:.1}s (hung?): killing pid {}",
                            silent.as_secs_f64(),
                            self.pid.unwrap_or(0)
                        )),
                        Action::Kill,
                    ]
                } else {
                    vec![]
                }
            }
            State::Stopping { deadline, killed: false, then } if now >= deadline => {
                self.state = State::Stopping { deadline, killed: true, then };
                vec![
                    Action::Log(format!(
                        "still running {}s after SIGTERM: sending SIGKILL",
                        cfg.stop_grace.as_secs_f64()
                    )),
                    Action::Kill,
                ]
            }
            _ => vec![],
        }
    }

    /// Whether the server is meant to be up (it counts as missing when it is not).
    pub fn is_down_for_good(&self) -> bool {
        matches!(self.state, State::Stopped | State::Failed)
    }
}

#[cfg(test)]
mod tests;
