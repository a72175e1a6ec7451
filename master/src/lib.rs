//! The pomelo-rs master: it runs the servers of a `servers.yaml` and keeps them running.
//!
//! [`prepare`] checks that no other master runs for this file and finds live workers of an earlier
//! master to adopt; [`start`] takes the bound control listener and runs the control listener, the reload
//! triggers and the [`supervisor`] until the shutdown token is cancelled (or a `Shutdown` command arrives)
//! and every server has stopped. The admin server lives in the `pomelo-dashboard` crate and talks to the
//! supervisor only through a [`MasterHandle`] ([`Command`] in, [`ClusterView`] and [`ServerEvent`]s out).
//!
//! Layout: `supervisor/` is a pure core (`core.rs` with `event.rs`, `register.rs`, `apply.rs`: every rule, unit-
//! tested without processes; `server.rs` and `restart.rs`: one server's life) inside a small shell
//! (`mod.rs`: the loop; `effects.rs`: spawn, signal, link sends, runstate files). `reload/` holds the
//! diff and the triggers, `command.rs` what may be asked, `child.rs` processes, `control.rs` the control
//! listener, `view.rs` what is shown, `runstate.rs` the run directory, `procstat.rs` `/proc`, `logs.rs`
//! worker logs.
//!
//! Shutdown: one token tree (the listener and triggers get a child token, cancelled once the supervisor
//! has stopped every server) and one [`TaskTracker`] for every task the master starts (control links,
//! triggers, child pumps and waits); its drain is bounded by [`DRAIN`] and warns when that expires.
//!
//! Shared with the CLI, the bench and the tests: [`admin_client`] (find a running master, call its API)
//! and [`procstat`] (the only reader of `/proc`).

pub mod admin_client;
pub mod child;
pub mod command;
pub mod control;
pub mod logs;
pub mod procstat;
pub mod reload;
pub mod runstate;
pub mod ssh;
pub mod supervisor;
pub mod view;

/// One server's life and its restart policy, under the supervisor; re-exported at their old paths.
pub use supervisor::{restart, server};

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use pomelo_proto::config::Topology;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use command::{Command, CommandError};
pub use view::{ClusterView, ServerEvent, ServerView};

/// How long the master's own tasks get to end once every server has stopped.
pub const DRAIN: std::time::Duration = std::time::Duration::from_secs(3);

/// What [`prepare`] found.
pub struct Prepared {
    pub topology: Topology,
    pub run_dir: PathBuf,
    pub cluster_token: String,
    /// The cluster CA when links run over TLS (`Topology::cluster_tls`).
    pub tls: Option<Arc<pomelo_proto::tls::Authority>>,
    /// Live workers of an earlier master: id → pid.
    pub adopt: HashMap<String, u32>,
    /// External servers an earlier master had running: awaited (by id) before the first membership.
    pub rejoin: Vec<String>,
}

/// Refuses to run beside a live master of the same file; finds workers to adopt.
pub fn prepare(topology: Topology) -> anyhow::Result<Prepared> {
    let run_dir = topology.run_dir();
    pomelo_proto::files::private_dir(&run_dir)
        .with_context(|| format!("the run directory {} cannot be made private", run_dir.display()))?;
    if let Some(m) = runstate::read_master(&run_dir) {
        // A live master of this file: this program run as `start`, started when it wrote the file, listening
        // where the file says. A reused pid (`systemctl start`, another `start` of something) is not one.
        if m.pid != std::process::id() && child::alive(m.pid) && admin_client::verify(&m).is_ok() {
            anyhow::bail!(
                "a master is already running for {} (pid {}, admin http://{}); stop it with `pomelo-rs stop` first",
                topology.file.display(),
                m.pid,
                m.admin_addr
            );
        }
    }
    let cluster_token = runstate::secret(&run_dir, "cluster-token").context("cannot create the cluster token")?;
    let exe = std::env::current_exe().context("cannot find this program's own path")?;
    let abs_run_dir = std::path::absolute(&run_dir).unwrap_or_else(|_| run_dir.clone());
    let recorded = runstate::read_workers(&run_dir);
    let rejoin = recorded
        .keys()
        .filter(|id| topology.server(id).is_some_and(|s| s.launch() == pomelo_proto::config::Launch::External))
        .cloned()
        .collect();
    let adopt = recorded
        .into_iter()
        .filter(|(id, w)| {
            let local = topology.server(id).is_some_and(|s| s.launch() == pomelo_proto::config::Launch::Local);
            local && child::alive(w.pid())
        })
        .filter_map(|(id, w)| match child::is_our_worker(w.pid(), &id, w.start(), &exe, &abs_run_dir) {
            Ok(()) => Some((id, w.pid())),
            Err(why) => {
                tracing::warn!(server = %id, "not adopting pid {} from workers.json: {why}", w.pid());
                None
            }
        })
        .collect();
    let tls = cluster_authority(&topology)?.map(Arc::new);
    Ok(Prepared { topology, run_dir, cluster_token, tls, adopt, rejoin })
}

/// How the dashboard and CLI reach the supervisor.
#[derive(Clone)]
pub struct MasterHandle {
    commands: mpsc::Sender<(Command, command::Reply)>,
    view: watch::Receiver<Arc<ClusterView>>,
    events: broadcast::Sender<ServerEvent>,
    log_dir: PathBuf,
}

impl MasterHandle {
    pub async fn command(&self, cmd: Command) -> Result<String, CommandError> {
        let (tx, rx) = oneshot::channel();
        self.commands.send((cmd, tx)).await.map_err(|_| CommandError::ShuttingDown)?;
        rx.await.unwrap_or(Err(CommandError::ShuttingDown))
    }

    /// The latest snapshot.
    pub fn view(&self) -> Arc<ClusterView> {
        self.view.borrow().clone()
    }

    /// Wakes on every new snapshot.
    pub fn watch(&self) -> watch::Receiver<Arc<ClusterView>> {
        self.view.clone()
    }

    pub fn events(&self) -> broadcast::Receiver<ServerEvent> {
        self.events.subscribe()
    }

    /// The last `lines` lines of a server's log.
    pub fn tail(&self, id: &str, lines: usize) -> std::io::Result<Vec<String>> {
        logs::tail(&self.log_dir, id, lines)
    }
}

/// The master, running.
pub struct Running {
    pub handle: MasterHandle,
    /// Ends when every server has stopped after a shutdown and the master's tasks have drained.
    pub task: JoinHandle<()>,
    /// The master's one task tracker: a service the caller adds (the dashboard) is drained with the rest,
    /// bounded by [`DRAIN`].
    pub tasks: TaskTracker,
    /// Cancelled once every server has stopped: services stop serving then.
    pub services: CancellationToken,
}

/// Starts the control listener and the supervisor.
pub fn start(
    prepared: Prepared,
    control: TcpListener,
    admin_addr: SocketAddr,
    echo: bool,
    shutdown: CancellationToken,
) -> anyhow::Result<Running> {
    let control_addr = control.local_addr()?;
    let topology = prepared.topology;
    let exe = std::env::current_exe().context("cannot find this program's own path to start workers")?;
    let file = runstate::MasterFile {
        pid: std::process::id(),
        control_addr: advertised(control_addr, &topology.master.host),
        admin_addr,
        config: std::path::absolute(&topology.file).unwrap_or_else(|_| topology.file.clone()),
        start: procstat::start_ticks(std::process::id()),
    };
    runstate::write_json(&runstate::master_file(&prepared.run_dir), &file).context("cannot write master.json")?;

    let (links_tx, links_rx) = mpsc::channel(1024);
    let (cmd_tx, cmd_rx) = mpsc::channel(64);
    let (events_tx, _) = broadcast::channel(256);
    let placeholder = Arc::new(ClusterView {
        seq: 0,
        master: view::MasterView {
            pid: std::process::id(),
            env: topology.env.clone(),
            config: topology.file.clone(),
            control_addr: control_addr.to_string(),
            admin_addr: admin_addr.to_string(),
            uptime_secs: 0.0,
            config_error: None,
            cpu_seconds: 0.0,
            rss_bytes: 0,
            open_fds: 0,
            max_fds: procstat::open_files_limit(),
        },
        servers: vec![],
    });
    let (view_tx, view_rx) = watch::channel(placeholder);
    let handle = MasterHandle {
        commands: cmd_tx.clone(),
        view: view_rx,
        events: events_tx.clone(),
        log_dir: topology.log_dir(),
    };

    let tasks = TaskTracker::new();
    let listener_stop = shutdown.child_token();
    reload::triggers::spawn(&topology.file, &topology.watched, cmd_tx, &tasks, listener_stop.clone());
    let acceptor = match &prepared.tls {
        Some(ca) => Some(
            ca.issue_with(
                pomelo_proto::auth::MASTER_ID,
                &topology.master.host,
                &[file.control_addr.ip(), control_addr.ip()],
            )
            .and_then(|m| m.acceptor())
            .context("cannot make the master's TLS certificate")?,
        ),
        None => None,
    };
    tasks.spawn(control::listen(
        control,
        prepared.cluster_token.as_str().into(),
        acceptor,
        handle.watch(),
        links_tx,
        tasks.clone(),
        listener_stop.clone(),
    ));
    let setup = supervisor::Setup {
        control_addr: file.control_addr,
        admin_addr,
        topology,
        exe,
        cluster_token: prepared.cluster_token,
        tls: prepared.tls,
        echo,
        adopt: prepared.adopt,
        rejoin: prepared.rejoin,
    };
    let channels = supervisor::Channels { links: links_rx, commands: cmd_rx, view_tx, events_tx };
    let run_dir = prepared.run_dir;
    let (services, tracker) = (listener_stop.clone(), tasks.clone());
    let task = tokio::spawn(async move {
        supervisor::run(setup, channels, tasks.clone(), shutdown).await;
        listener_stop.cancel();
        tasks.close();
        if tokio::time::timeout(DRAIN, tasks.wait()).await.is_err() {
            tracing::warn!(
                "{} master tasks still running {DRAIN:?} after the servers stopped; leaving them",
                tasks.len()
            );
        }
        std::fs::remove_file(runstate::master_file(&run_dir)).ok();
    });
    Ok(Running { handle, task, tasks: tracker, services })
}

/// The control address workers should dial: the configured host with the bound port.
fn advertised(bound: SocketAddr, host: &str) -> SocketAddr {
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) if !ip.is_unspecified() => SocketAddr::new(ip, bound.port()),
        _ if bound.ip().is_unspecified() => SocketAddr::from(([127, 0, 0, 1], bound.port())),
        _ => bound,
    }
}

/// Where cluster certificates come from when links run over TLS: the operator's files (`clusterTls: {ca,
/// certs}`), or the CA the master keeps in the run directory (created on first use). `None` without TLS.
pub fn cluster_authority(
    topology: &pomelo_proto::config::Topology,
) -> anyhow::Result<Option<pomelo_proto::tls::Authority>> {
    use pomelo_proto::tls::Authority;
    if !topology.cluster_tls() {
        return Ok(None);
    }
    let ca = match &topology.master.cluster_tls_files {
        Some(f) => Authority::provided(&f.ca, &f.certs)
            .with_context(|| format!("cannot use the cluster certificates in {}", f.certs.display()))?,
        None => {
            let dir = topology.run_dir().join("tls");
            Authority::load_or_create(&dir)
                .with_context(|| format!("cannot load or create the cluster CA in {}", dir.display()))?
        }
    };
    Ok(Some(ca))
}
