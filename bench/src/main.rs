//! `pomelo-bench`: a load generator for pomelo-rs that speaks Pomelo's client protocol over raw TCP
//! (the default) or WebSocket (`--transport ws`: the same packages in binary messages).
//!
//! - `pomelo-bench run -c servers.yaml [scenario flags]`: finds the running cluster through its admin
//!   API, starts `--procs` generator processes, runs the timeline and prints the report as JSON.
//! - `pomelo-bench wait -c servers.yaml`: waits until every server of the cluster is running.
//! - `pomelo-bench summary REPORT...`: the reports' figures against the bar.
//! - `pomelo-bench floor --connections N --rate R`: the machine's floor, one `write()` per delivery
//!   (see [`floor`]), as a report `summary` sets the scenarios' server CPU against.
//! - `pomelo-bench gen` (internal): one generator process, driven by `run` over stdin/stdout.
//!
//! Modules: [`spec`] what a run does; [`connect`], [`client`], [`inbound`], [`wire`] and [`ws`] one
//! simulated user; [`shard`] a generator process; [`track`] counting; [`orchestrate`] the conductor; [`cluster`] the
//! cluster seen through `pomelo_master::admin_client` and `pomelo_master::procstat`; [`report`] the
//! figures; [`summary`] the figures against the bar.

mod client;
mod cluster;
mod connect;
mod floor;
mod inbound;
mod orchestrate;
mod report;
mod shard;
mod spec;
mod summary;
mod track;
mod wire;
mod ws;

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use spec::{Spec, Step};

#[derive(Parser)]
#[command(name = "pomelo-bench", about = "Load generator for pomelo-rs (Pomelo protocol over raw TCP or WebSocket)")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(clap::Args, Clone)]
struct Target {
    /// The cluster's servers.yaml (its run directory, `.pomelo` beside it unless `master.runDir` says
    /// otherwise, holds master.json and the token).
    #[arg(short = 'c', long = "config", default_value = "servers.yaml")]
    config: PathBuf,
    /// The run directory, if not the one servers.yaml names.
    #[arg(long)]
    run_dir: Option<PathBuf>,
}

impl Target {
    fn run_dir(&self) -> PathBuf {
        self.run_dir
            .clone()
            .unwrap_or_else(|| pomelo_master::runstate::run_dir(&self.config, pomelo_proto::config::DEFAULT_ENV))
    }

    fn admin(&self) -> anyhow::Result<cluster::Admin> {
        cluster::admin(&self.config, &self.run_dir())
    }
}

#[derive(clap::Args)]
struct Scenario {
    /// A name for the report.
    #[arg(long, default_value = "custom")]
    scenario: String,
    #[arg(long, default_value_t = 100)]
    clients: u32,
    #[arg(long, default_value_t = 1)]
    rooms: u32,
    /// Messages per second per client; several (comma separated) make a rising-rate run.
    #[arg(long, value_delimiter = ',', default_values_t = [1.0])]
    rate: Vec<f64>,
    /// Seconds each rate is held (heartbeats only, for rate 0).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds at the first rate before measuring.
    #[arg(long, default_value_t = 0.0)]
    warmup: f64,
    /// Bytes of each message's content.
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// New clients per second, all processes together.
    #[arg(long, default_value_t = 1000.0)]
    connect_rate: f64,
    /// Source addresses 127.0.0.1 to 127.0.0.N (each address has its own ephemeral ports).
    #[arg(long, default_value_t = 1)]
    sources: u8,
    /// Generator processes (each may hold at most 20,000 open files).
    #[arg(long, default_value_t = 1)]
    procs: u32,
    /// Raw TCP, or the same packages in binary WebSocket messages (same port).
    #[arg(long, value_enum, default_value_t = ws::Transport::Tcp)]
    transport: ws::Transport,
    /// Connect and heartbeat without entering a room.
    #[arg(long)]
    no_enter: bool,
    /// Quiet seconds after each step, so late deliveries count in their step.
    #[arg(long, default_value_t = 2.0)]
    grace: f64,
    /// Bound on each connect stage, seconds.
    #[arg(long, default_value_t = 20.0)]
    stage_timeout: f64,
    /// Stop a rising-rate run after the first step whose p99 latency passes this many ms.
    #[arg(long)]
    stop_p99_ms: Option<f64>,
    /// Stop a rising-rate run after the first step that loses deliveries.
    #[arg(long)]
    stop_on_missing: bool,
    /// Once everyone is in: kill -9 the connector holding the most clients, measure until its clients
    /// are back in their rooms (they log in again through the gate), then run the steps.
    #[arg(long)]
    kill_connector: bool,
    /// Also write the report to this file.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a scenario against a running cluster and print the report (JSON).
    Run {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        scenario: Scenario,
    },
    /// Wait until every server of the cluster is running (at most 60 s).
    Wait {
        #[command(flatten)]
        target: Target,
    },
    /// Print the figures of reports written by `run --out` against the bar.
    Summary { reports: Vec<PathBuf> },
    /// The machine's floor: one process writing 100 bytes per delivery round-robin over N loopback
    /// connections to another that reads them with epoll; prints the report (JSON).
    Floor {
        #[arg(long, default_value_t = 2000)]
        connections: u32,
        /// Deliveries per second, all connections together.
        #[arg(long, default_value_t = 200_000.0)]
        rate: f64,
        #[arg(long, default_value_t = 10.0)]
        secs: f64,
        #[arg(long, default_value_t = 100)]
        bytes: usize,
        /// Also write the report to this file.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// The floor's reader (started by `floor`).
    #[command(hide = true)]
    FloorRead {
        #[arg(long)]
        connections: u32,
    },
    /// One generator process (started by `run`).
    #[command(hide = true)]
    Gen {
        #[arg(long)]
        shard: u32,
        #[arg(long)]
        spec: String,
    },
}

fn spec_of(s: &Scenario) -> Spec {
    let mut steps = Vec::new();
    if s.warmup > 0.0 {
        steps.push(Step { rate: s.rate.first().copied().unwrap_or(0.0), secs: s.warmup, warmup: true });
    }
    steps.extend(s.rate.iter().map(|&rate| Step { rate, secs: s.duration, warmup: false }));
    Spec {
        gate: std::net::SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        transport: s.transport,
        clients: s.clients,
        rooms: s.rooms,
        payload: s.payload,
        connect_rate: s.connect_rate,
        sources: (1..=s.sources.max(1)).map(|i| Ipv4Addr::new(127, 0, 0, i)).collect(),
        procs: s.procs,
        prefix: format!("b{}_", std::process::id() % 100_000),
        enter: !s.no_enter,
        steps,
        grace: s.grace,
        stage_timeout: s.stage_timeout,
        reconnect: s.kill_connector,
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Cmd::Run { target, scenario } => {
            let spec = spec_of(&scenario);
            let opts = orchestrate::Options {
                scenario: scenario.scenario.clone(),
                admin: target.admin()?,
                stop_p99_ms: scenario.stop_p99_ms,
                stop_on_missing: scenario.stop_on_missing,
                kill_connector: scenario.kill_connector,
            };
            let report = orchestrate::run(spec, &opts)?;
            let text = serde_json::to_string_pretty(&report)?;
            if let Some(out) = &scenario.out {
                std::fs::write(out, &text).with_context(|| format!("cannot write {}", out.display()))?;
            }
            println!("{text}");
        }
        Cmd::Wait { target } => {
            let admin = target.admin()?;
            let view = orchestrate::wait_running(&admin)?;
            println!("{}", cluster::gate_addr(&view)?);
        }
        Cmd::Summary { reports } => summary::run(&reports)?,
        Cmd::Floor { connections, rate, secs, bytes, out } => {
            let report = floor::run(connections, rate, secs, bytes)?;
            let text = serde_json::to_string_pretty(&report)?;
            if let Some(out) = &out {
                std::fs::write(out, &text).with_context(|| format!("cannot write {}", out.display()))?;
            }
            println!("{text}");
        }
        Cmd::FloorRead { connections } => floor::read(connections)?,
        Cmd::Gen { shard, spec } => {
            let spec: Spec = serde_json::from_str(&spec).context("bad --spec")?;
            spec.check().map_err(anyhow::Error::msg)?;
            shard::run(spec, shard)?;
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pomelo-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
