//! `pomelo-rs`: one binary for the master, its workers and the CLI that talks to them.
//!
//! `main` parses flags, sets up logging and maps errors to exit codes; everything else lives in the
//! crates (`pomelo-master`, `pomelo-worker`, `pomelo-dashboard`) and in [`commands`].

mod commands;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "pomelo-rs", version, about = "A supervised real-time chat cluster, wire-compatible with Pomelo")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(clap::Args, Clone)]
pub struct ConfigArgs {
    /// The cluster file.
    #[arg(short = 'c', long = "config", default_value = "servers.yaml")]
    pub config: PathBuf,
    /// The environment section to use.
    #[arg(short = 'e', long = "env", default_value = pomelo_proto::config::DEFAULT_ENV)]
    pub env: String,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start the cluster: a master that starts and supervises every server in servers.yaml.
    /// With server ids, start those stopped or failed servers on the running master instead.
    Start {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// Run in the background (output to logs/master.log).
        #[arg(short = 'D', long)]
        daemon: bool,
        /// Servers to start on the running master.
        ids: Vec<String>,
    },
    /// Stop the given servers, or the whole cluster and its master.
    Stop {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// Server ids; none means everything.
        ids: Vec<String>,
    },
    /// Show every server: id, type, pid, state, uptime, restarts, RSS, ports.
    List {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Restart servers by id, or every server of a type.
    Restart {
        #[command(flatten)]
        cfg: ConfigArgs,
        ids: Vec<String>,
        /// Restart every server of this type (gate, connector, chat).
        #[arg(short = 't', long = "type")]
        server_type: Option<String>,
    },
    /// Re-read servers.yaml on the running master and apply what changed.
    Reload {
        #[command(flatten)]
        cfg: ConfigArgs,
    },
    /// Validate servers.yaml and list every problem.
    Check {
        #[command(flatten)]
        cfg: ConfigArgs,
    },
    /// Write the join credential of a `supervise: external` server (its key, and its TLS certificate when
    /// cluster TLS is on) for `worker --join`. Run it where the master's run directory is.
    Credential {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// The server's id.
        id: String,
        /// Write it to this file (created 0600) instead of stdout.
        #[arg(short = 'o', long)]
        output: Option<PathBuf>,
    },
    /// Run one server. The master starts these itself; a platform (systemd, Kubernetes) starts a
    /// `supervise: external` server with `--join MASTER_ADDR --id ID --credential FILE`.
    Worker {
        #[arg(long)]
        id: String,
        /// The server's type (the master passes it; a joining worker learns it from the master).
        #[arg(long = "type")]
        server_type: Option<String>,
        /// Join the master at HOST:PORT (its control address) and take this server's spec from it.
        #[arg(long, value_name = "MASTER_ADDR", requires = "credential")]
        join: Option<String>,
        /// The join credential `pomelo-rs credential ID` wrote.
        #[arg(long, value_name = "FILE", requires = "join")]
        credential: Option<PathBuf>,
        /// How long `--join` waits for a master to answer before giving up (exit 1, for the platform to retry).
        #[arg(long, value_name = "SECONDS", default_value_t = 300)]
        join_timeout: u64,
        /// Log level: error, warn, info, debug, trace.
        #[arg(long, default_value = "info")]
        log_level: String,
        /// Runtime threads (default: the `threads` the master chose for this server).
        #[arg(long)]
        threads: Option<usize>,
        /// Read the spec and key as one JSON line on stdin (how the master starts servers over ssh).
        #[arg(long)]
        spec_stdin: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Start { cfg, ids, .. } if !ids.is_empty() => commands::start_servers(&cfg, &ids),
        Cmd::Start { cfg, daemon, .. } => commands::start(&cfg, daemon),
        Cmd::Stop { cfg, ids } => commands::stop(&cfg, &ids),
        Cmd::List { cfg, json } => commands::list(&cfg, json),
        Cmd::Restart { cfg, ids, server_type } => commands::restart(&cfg, &ids, server_type.as_deref()),
        Cmd::Check { cfg } => commands::check(&cfg),
        Cmd::Reload { cfg } => commands::reload(&cfg),
        Cmd::Credential { cfg, id, output } => commands::credential(&cfg, &id, output.as_deref()),
        Cmd::Worker { id, server_type, join, credential, join_timeout, log_level, threads, spec_stdin } => {
            let how = match (join, credential) {
                (Some(addr), Some(file)) => {
                    commands::SpecFrom::Join { addr, credential: file, patience: Duration::from_secs(join_timeout) }
                }
                _ if spec_stdin => commands::SpecFrom::Stdin,
                _ => commands::SpecFrom::Env,
            };
            commands::worker(&id, server_type.as_deref(), &log_level, threads, how)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprint!("pomelo-rs: {e}");
            for cause in e.chain().skip(1) {
                eprint!(": {cause}");
            }
            eprintln!();
            if e.downcast_ref::<pomelo_master::admin_client::NoMaster>().is_some() {
                ExitCode::from(pomelo_master::admin_client::NO_MASTER as u8)
            } else if e.downcast_ref::<commands::Refused>().is_some() {
                ExitCode::from(3)
            } else if e.downcast_ref::<pomelo_proto::config::ConfigErrors>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
