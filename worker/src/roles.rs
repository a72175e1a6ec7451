//! What each server type runs on its bound listeners.
//!
//! - gate: the hybrid frontend with [`Gate`] (queryEntry) on the client port;
//! - connector: the hybrid frontend with [`Connector`] over [`ClusterRooms`], and a [`ChatClient`] whose
//!   deliveries go straight to the sessions; its RPC port is held (it is how peers see the server) but
//!   connectors take no RPC;
//! - chat: the [`ChatServer`] on the RPC port.
//!
//! Each returns the stats sources for the heartbeat. Every task runs under the runtime's token and tracker.
//! A connector's deliveries bypass the handler stack: the [`ChatClient`]'s `deliver` closure pushes the
//! chat server's pre-encoded bytes straight into the sessions' queues.

use std::sync::Arc;

use pomelo_proto::config::{ServerSpec, WorkerSpec};
use pomelo_proto::control::{Membership, ServerType};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::chat::room_table::Limits;
use crate::chat::server::{ChatMetrics, ChatServer};
use crate::connector::metrics::RpcMetrics;
use crate::connector::{ChatClient, ClusterRooms, Connector};
use crate::control::StatsSource;
use crate::frontend::{self, FrontendConfig, FrontendMetrics, Sessions};
use crate::gate::Gate;
use crate::routes::chat_dictionary_with;

/// What the role needs to start serving (built by [`crate::runtime::run`]).
pub struct RoleContext {
    pub spec: WorkerSpec,
    pub rpc: Option<TcpListener>,
    pub client: Option<TcpListener>,
    pub membership: watch::Receiver<Arc<Membership>>,
    /// The cluster token (peers prove they belong to this cluster with it).
    pub token: String,
    pub shutdown: CancellationToken,
    pub tasks: TaskTracker,
}

/// The chat demo page the gate serves on `GET /` (HTML, CSS and JS in one file; no build step).
pub const CHAT_PAGE: &str = include_str!("../assets/chat.html");

/// The frontend settings of a servers.yaml entry.
pub fn frontend_config(spec: &ServerSpec) -> FrontendConfig {
    let base = match spec.server_type {
        ServerType::Connector => FrontendConfig::connector(Arc::new(chat_dictionary_with(&spec.dictionary))),
        _ => FrontendConfig { dictionary: Arc::new(chat_dictionary_with(&spec.dictionary)), ..FrontendConfig::gate() },
    };
    FrontendConfig {
        heartbeat: spec.heartbeat,
        use_dict: spec.use_dict,
        max_connections: spec.max_connections,
        idle_timeout: spec.idle_timeout,
        max_requests_per_second: spec.max_requests_per_second,
        check_client: spec.check_client.clone(),
        use_crypto: spec.use_crypto,
        ..base
    }
    .with_max_message(spec.max_message_bytes)
}

/// The frontend settings with the client port's TLS certificate loaded (`ssl`), if it has one.
fn frontend_config_tls(spec: &ServerSpec) -> anyhow::Result<FrontendConfig> {
    let mut config = frontend_config(spec);
    config.protobuf = protobuf(spec)?;
    if let Some(ssl) = &spec.ssl {
        let tls = crate::frontend::ClientTls::from_files(&ssl.cert, &ssl.key)
            .map_err(|e| anyhow::anyhow!("cannot load the client port's TLS certificate: {e}"))?;
        config.tls = Some(tls);
        tracing::info!("client port serves TLS (wss:// and TLS over TCP) beside plain connections");
    }
    Ok(config)
}

/// The cluster's protos (servers.yaml `protobuf`), compiled, if it has any.
fn protobuf(spec: &ServerSpec) -> anyhow::Result<pomelo_proto::wire::protobuf::Protobuf> {
    let Some(texts) = &spec.protobuf else { return Ok(None) };
    let bundle = texts.compile().map_err(|e| anyhow::anyhow!("cannot compile the protobuf files: {e}"))?;
    tracing::info!(version = bundle.version(), "protobuf bodies for the routes in serverProtos and clientProtos");
    Ok(Some(Arc::new(bundle)))
}

/// The KICK reason of a session whose messages a chat server had to drop.
pub const LOST_REASON: &str =
    "messages to you were lost: the chat server could not keep up with this connector; reconnect to recover them";

pub async fn start(ctx: RoleContext) -> anyhow::Result<Vec<StatsSource>> {
    let spec = ctx.spec.server.clone();
    let mut stats: Vec<StatsSource> = Vec::new();
    match spec.server_type {
        ServerType::Gate => {
            let listener = ctx.client.ok_or_else(|| anyhow::anyhow!("a gate needs a clientPort"))?;
            let metrics = Arc::new(FrontendMetrics::new());
            let m = metrics.clone();
            stats.push(Arc::new(move |s| m.snapshot(s)));
            let page = bytes::Bytes::from_static(CHAT_PAGE.as_bytes());
            let handler = Arc::new(Gate::new(ctx.membership.clone()).with_page("text/html; charset=utf-8", page));
            let config = frontend_config_tls(&spec)?;
            let stop = ctx.shutdown.clone();
            ctx.tasks.spawn(async move {
                if let Err(e) = frontend::serve(listener, config, handler, metrics, stop).await {
                    tracing::error!("gate stopped: {e}");
                }
            });
        }
        ServerType::Connector => {
            let listener = ctx.client.ok_or_else(|| anyhow::anyhow!("a connector needs a clientPort"))?;
            let config = frontend_config_tls(&spec)?;
            let metrics = Arc::new(FrontendMetrics::new());
            let sessions = Sessions::new(&config, metrics.clone());
            let rpc_metrics = Arc::new(RpcMetrics::default());
            let (target, kicked) = (sessions.clone(), sessions.clone());
            let client = ChatClient::start(
                spec.id.clone(),
                ctx.token.clone(),
                Arc::new(move |ids, payload| {
                    target.push_bytes(ids, &payload);
                }),
                // Told, not left to miss messages: they come back with `since` and recover from history.
                Arc::new(move |ids| {
                    for id in ids {
                        kicked.kick_session(*id, LOST_REASON);
                    }
                }),
                rpc_metrics.clone(),
                ctx.membership.clone(),
                ctx.shutdown.clone(),
            );
            let (m, r) = (metrics.clone(), rpc_metrics.clone());
            stats.push(Arc::new(move |s| {
                m.snapshot(s);
                r.snapshot(s);
            }));
            let handler = Arc::new(
                Connector::with_metrics(Arc::new(ClusterRooms { client }), rpc_metrics)
                    .with_max_name(spec.max_name_bytes),
            );
            let stop = ctx.shutdown.clone();
            ctx.tasks.spawn(async move {
                if let Err(e) = frontend::serve_with(listener, config, handler, sessions, stop).await {
                    tracing::error!("connector stopped: {e}");
                }
            });
            hold(ctx.rpc, ctx.shutdown.clone(), &ctx.tasks);
        }
        ServerType::Chat => {
            let listener = ctx.rpc.ok_or_else(|| anyhow::anyhow!("a chat server needs a port"))?;
            let metrics = Arc::new(ChatMetrics::default());
            let m = metrics.clone();
            stats.push(Arc::new(move |s| m.snapshot(s)));
            ChatServer {
                id: spec.id.clone(),
                limits: Limits { room_members: spec.max_room_members, rooms: spec.max_rooms },
                history: spec.history.clone(),
                fresh_history: ctx.spec.fresh_history,
                token: ctx.token.clone(),
                dict: Some(Arc::new(chat_dictionary_with(&spec.dictionary))),
                protobuf: protobuf(&spec)?,
                membership: ctx.membership.clone(),
                metrics,
                shutdown: ctx.shutdown.clone(),
                tasks: ctx.tasks.clone(),
            }
            .start(listener)
            .map_err(|e| anyhow::anyhow!("room history: {e}"))?;
        }
    }
    Ok(stats)
}

/// Keeps a listener bound and refuses what connects to it.
fn hold(listener: Option<TcpListener>, stop: CancellationToken, tasks: &TaskTracker) {
    let Some(listener) = listener else { return };
    tasks.spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                r = listener.accept() => drop(r),
            }
        }
    });
}
