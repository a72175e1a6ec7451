//! A worker process: bind, serve its role, stay on the control link, stop cleanly.
//!
//! [`run`] binds the server's listeners (ports may be 0; the bound addresses are registered), starts the
//! role's tasks under one [`CancellationToken`], and runs the control link until the master says stop, the
//! master refuses it, it is orphaned, or the caller's `stop` token is cancelled (the binary cancels it on
//! SIGTERM/SIGINT). Then it cancels the role's token (frontends kick their clients with a reason) and waits
//! for the role's tasks, at most [`DRAIN`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use pomelo_proto::config::WorkerSpec;
use pomelo_proto::control::{BoundAddrs, Membership};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::control::{self, Exit, StatsSource};
use crate::roles::{self, RoleContext};

/// How long the role's tasks get to finish after a stop.
pub const DRAIN: Duration = Duration::from_secs(5);

/// Runs the worker until the master stops it or `stop` is cancelled; `Ok` with the reason it stopped.
pub async fn run(spec: WorkerSpec, token: String, stop: CancellationToken) -> anyhow::Result<Exit> {
    let s = &spec.server;
    let bind_ip = pomelo_proto::config::bind_ip(&s.host)
        .map_err(|e| anyhow::anyhow!("cannot find an address to listen on for host `{}`: {e}", s.host))?;
    let rpc = match s.port {
        Some(p) => Some(bind(SocketAddr::new(bind_ip, p), "port").await?),
        None => None,
    };
    let client = match s.client_port {
        Some(p) => Some(bind(SocketAddr::new(bind_ip, p), "clientPort").await?),
        None => None,
    };
    let addrs = BoundAddrs {
        rpc: rpc.as_ref().and_then(|l| l.local_addr().ok()),
        client: client.as_ref().and_then(|l| l.local_addr().ok()),
    };
    tracing::info!("{} `{}` listening: rpc {:?}, clients {:?}", s.server_type, s.id, addrs.rpc, addrs.client);

    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();
    let (membership_tx, membership_rx) = watch::channel(Arc::new(Membership::default()));
    let ctx = RoleContext {
        spec: spec.clone(),
        rpc,
        client,
        membership: membership_rx,
        token: token.clone(),
        shutdown: shutdown.clone(),
        tasks: tasks.clone(),
    };
    let stats: Vec<StatsSource> = roles::start(ctx).await?;

    let link = control::Link { spec: &spec, token: &token, addrs, membership: membership_tx, stats };
    let exit = control::run(link, stop).await;
    match &exit {
        Exit::Stop(reason) => tracing::info!("the master asked to stop: {reason}"),
        Exit::Rejected(reason) => tracing::error!("the master refused this worker: {reason}"),
        Exit::Orphaned => tracing::warn!("orphaned: stopping"),
        Exit::Shutdown => {}
    }
    shutdown.cancel();
    tasks.close();
    if tokio::time::timeout(DRAIN, tasks.wait()).await.is_err() {
        tracing::warn!("tasks still running {DRAIN:?} after the stop; exiting anyway");
    }
    Ok(exit)
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} ({what}); is another process using it?"))
}
