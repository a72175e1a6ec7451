//! One generator process: its clients, on one current-thread runtime, and its conversation with the
//! orchestrator.
//!
//! The process opens its share of the clients at its share of the connect rate (at most [`CONNECTING`]
//! at once), prints `{"ev":"ready"}` when every one has entered its room or failed, then obeys commands
//! read from stdin, one per line: `step K T` runs step K from monotonic time T (µs), stays quiet for the
//! grace period and prints `{"ev":"step"}`; `counts` prints `{"ev":"counts"}` with the counts so far; `finish` (or the end of stdin, if the orchestrator died)
//! prints `{"ev":"final"}` with everything it counted and exits, which closes every connection. Client
//! tasks share the counters through `Rc<RefCell>`: one thread, no locks. Reports go to stdout as JSON
//! lines; logs go to stderr.

use std::cell::{Cell, RefCell};
use std::io::Write;
use std::rc::Rc;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::json;
use tokio::io::AsyncBufReadExt;
use tokio::sync::{mpsc, watch, Notify, Semaphore};
use tokio::time::Instant;

use crate::client;
use crate::spec::Spec;
use crate::track::{self, Counts, StepCounts};

/// Clients of one process in their connect phase at once.
pub const CONNECTING: usize = 512;

/// What the clients are doing now.
#[derive(Debug, Clone, PartialEq)]
pub enum Phase {
    Connecting,
    Step { k: u32, start_us: u64, end_us: u64, rate: f64 },
    Quiet,
    Finish,
}

/// The monotonic clock every generator process shares (CLOCK_MONOTONIC, in µs).
pub fn now_us() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(t) => (t.tv_sec() as u64) * 1_000_000 + (t.tv_nsec() as u64) / 1000,
        Err(_) => 0,
    }
}

/// Converts monotonic µs to a tokio instant.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    base_us: u64,
    base: Instant,
}

impl Clock {
    pub fn new() -> Clock {
        Clock { base_us: now_us(), base: Instant::now() }
    }

    pub fn instant(&self, us: u64) -> Instant {
        if us >= self.base_us {
            self.base + Duration::from_micros(us - self.base_us)
        } else {
            self.base.checked_sub(Duration::from_micros(self.base_us - us)).unwrap_or(self.base)
        }
    }
}

/// One step's live counts.
pub struct LiveStep {
    pub counts: StepCounts,
    /// Latency from when each message was due.
    pub hist: Histogram<u64>,
    /// Latency from when each message was written (the generator's own lag taken out).
    pub hist_write: Histogram<u64>,
}

/// State shared by the clients of this process.
pub struct Shard {
    pub spec: Spec,
    pub clock: Clock,
    pub counts: RefCell<Counts>,
    pub connect_hist: RefCell<Histogram<u64>>,
    /// Lost connection to room entered again, of rejoining clients (µs).
    pub rejoin_hist: RefCell<Histogram<u64>>,
    pub steps: RefCell<Vec<LiveStep>>,
    /// Read buffer every client uses in turn (reads never overlap on one thread).
    pub scratch: RefCell<Vec<u8>>,
    pub phase: watch::Receiver<Phase>,
    pub connecting: Semaphore,
    settled: Cell<u32>,
    settled_notify: Notify,
}

impl Shard {
    /// A client finished its connect phase, entered or not.
    pub fn settle(&self) {
        self.settled.set(self.settled.get() + 1);
        self.settled_notify.notify_one();
    }

    pub fn fail(&self, f: &crate::connect::Failure) {
        use crate::connect::Stage;
        let mut c = self.counts.borrow_mut();
        match f.stage {
            Stage::Gate => c.failed_gate += 1,
            Stage::Connect => c.failed_connect += 1,
            Stage::Handshake => c.failed_handshake += 1,
            Stage::Enter => c.failed_enter += 1,
        }
        if c.first_error.is_none() {
            c.first_error = Some(format!("{:?}: {}", f.stage, f.why));
        }
    }

    fn snapshot_counts(&self) -> Counts {
        let mut c = self.counts.borrow().clone();
        c.connect_us = track::hist_pairs(&self.connect_hist.borrow());
        c.rejoin_us = track::hist_pairs(&self.rejoin_hist.borrow());
        c
    }

    fn snapshot_step(&self, k: usize) -> Option<StepCounts> {
        let steps = self.steps.borrow();
        let s = steps.get(k)?;
        let mut c = s.counts.clone();
        c.latency_us = track::hist_pairs(&s.hist);
        c.latency_from_write_us = track::hist_pairs(&s.hist_write);
        Some(c)
    }
}

fn emit(v: serde_json::Value) {
    let mut out = std::io::stdout().lock();
    // If the orchestrator is gone there is nobody to tell.
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

enum Command {
    Step {
        k: u32,
        start_us: u64,
    },
    /// Print `{"ev":"counts"}` with the counts so far.
    Counts,
    Finish,
}

async fn read_commands(tx: mpsc::Sender<Command>) {
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let parts: Vec<&str> = line.split_whitespace().collect();
        let cmd = match parts.as_slice() {
            ["step", k, t] => match (k.parse(), t.parse()) {
                (Ok(k), Ok(start_us)) => Command::Step { k, start_us },
                _ => continue,
            },
            ["counts"] => Command::Counts,
            ["finish"] => Command::Finish,
            _ => continue,
        };
        if tx.send(cmd).await.is_err() {
            return;
        }
    }
    let _ = tx.send(Command::Finish).await;
}

/// Runs generator process `index` of the spec until `finish`.
pub fn run(spec: Spec, index: u32) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, drive(spec, index));
    // The stdin reader sits in a blocking read; do not wait for it.
    rt.shutdown_background();
    Ok(())
}

async fn drive(spec: Spec, index: u32) {
    let (phase_tx, phase_rx) = watch::channel(Phase::Connecting);
    let rooms = spec.rooms as usize;
    let steps = spec
        .steps
        .iter()
        .map(|_| LiveStep {
            counts: StepCounts { sent_by_room: vec![0; rooms], ..Default::default() },
            hist: track::new_hist(),
            hist_write: track::new_hist(),
        })
        .collect();
    let shard = Rc::new(Shard {
        counts: RefCell::new(Counts { joined_by_room: vec![0; rooms], ..Default::default() }),
        connect_hist: RefCell::new(track::new_hist()),
        rejoin_hist: RefCell::new(track::new_hist()),
        steps: RefCell::new(steps),
        scratch: RefCell::new(vec![0; 64 * 1024]),
        phase: phase_rx,
        connecting: Semaphore::new(CONNECTING),
        settled: Cell::new(0),
        settled_notify: Notify::new(),
        clock: Clock::new(),
        spec,
    });
    let (cmd_tx, mut cmds) = mpsc::channel(16);
    tokio::task::spawn_local(read_commands(cmd_tx));

    let mine: Vec<u32> = shard.spec.shard_clients(index).collect();
    let total = mine.len() as u32;
    let rate = shard.spec.connect_rate / f64::from(shard.spec.procs.max(1));
    let started = Instant::now();
    let s = shard.clone();
    tokio::task::spawn_local(async move {
        for (i, g) in mine.into_iter().enumerate() {
            tokio::time::sleep_until(started + Duration::from_secs_f64(i as f64 / rate)).await;
            s.counts.borrow_mut().attempted += 1;
            tokio::task::spawn_local(client::run(s.clone(), g));
        }
    });
    // Every client settles within its four bounded stages after it was started.
    let bound = Duration::from_secs_f64(f64::from(total) / rate + 4.0 * shard.spec.stage_timeout + 10.0);
    let _ = tokio::time::timeout(bound, async {
        while shard.settled.get() < total {
            shard.settled_notify.notified().await;
        }
    })
    .await;
    let connect_secs = started.elapsed().as_secs_f64();
    emit(json!({"ev": "ready", "shard": index, "connect_secs": connect_secs, "counts": shard.snapshot_counts()}));

    while let Some(cmd) = cmds.recv().await {
        match cmd {
            Command::Step { k, start_us } => {
                let Some(step) = shard.spec.steps.get(k as usize).cloned() else { continue };
                let end_us = start_us + (step.secs * 1e6) as u64;
                let _ = phase_tx.send(Phase::Step { k, start_us, end_us, rate: step.rate });
                let report_at = shard.clock.instant(end_us + (shard.spec.grace * 1e6) as u64);
                tokio::time::sleep_until(shard.clock.instant(end_us)).await;
                let _ = phase_tx.send(Phase::Quiet);
                tokio::time::sleep_until(report_at).await;
                let counts = shard.snapshot_counts();
                emit(
                    json!({"ev": "step", "shard": index, "k": k, "step": shard.snapshot_step(k as usize), "counts": counts}),
                );
            }
            Command::Counts => emit(json!({"ev": "counts", "shard": index, "counts": shard.snapshot_counts()})),
            Command::Finish => break,
        }
    }
    let _ = phase_tx.send(Phase::Finish);
    // Let the clients see `Finish` before the counts are read (they stop counting losses then).
    tokio::task::yield_now().await;
    let steps: Vec<StepCounts> = (0..shard.spec.steps.len()).filter_map(|k| shard.snapshot_step(k)).collect();
    emit(json!({"ev": "final", "shard": index, "counts": shard.snapshot_counts(), "steps": steps}));
}
