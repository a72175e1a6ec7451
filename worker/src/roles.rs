//! What each server type runs on its bound listeners.
//!
//! - gate: the hybrid frontend with [`Gate`] (queryEntry) on the client port;
//! - connector: the hybrid frontend with [`Connector`] over [`ClusterRooms`], and a [`ChatClient`] whose
//!   deliveries go straight to the sessions; its RPC port is held (it is how peers see the server) but
//!   connectors take no RPC;
//! - chat: the [`ChatServer`] on the RPC port.
//!
//! Each returns the stats sources for the heartbeat. Every task runs under the runtime's token and tracker.

use std::sync::Arc;

use pomelo_proto::config::ServerSpec;
use pomelo_proto::control::ServerType;

use crate::chat::server::{ChatMetrics, ChatServer};
use crate::chat_client::{ChatClient, RpcMetrics};
use crate::cluster_rooms::ClusterRooms;
use crate::connector::{chat_dictionary, Connector};
use crate::control::StatsSource;
use crate::frontend::{self, FrontendConfig, FrontendMetrics, Sessions};
use crate::gate::Gate;
use crate::runtime::RoleContext;

/// The chat demo page the gate serves on `GET /` (HTML, CSS and JS in one file; no build step).
pub const CHAT_PAGE: &str = include_str!("../assets/chat.html");

/// The frontend settings of a servers.yaml entry.
pub fn frontend_config(spec: &ServerSpec) -> FrontendConfig {
    let base = match spec.server_type {
        ServerType::Connector => FrontendConfig::connector(Arc::new(chat_dictionary())),
        _ => FrontendConfig { dictionary: Arc::new(chat_dictionary()), ..FrontendConfig::gate() },
    };
    FrontendConfig {
        heartbeat: spec.heartbeat,
        use_dict: spec.use_dict,
        max_connections: spec.max_connections,
        idle_timeout: spec.idle_timeout,
        max_requests_per_second: spec.max_requests_per_second,
        ..base
    }
    .with_max_message(spec.max_message_bytes)
}

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
            let config = frontend_config(&spec);
            let stop = ctx.shutdown.clone();
            ctx.tasks.spawn(async move {
                if let Err(e) = frontend::serve(listener, config, handler, metrics, stop).await {
                    tracing::error!("gate stopped: {e}");
                }
            });
        }
        ServerType::Connector => {
            let listener = ctx.client.ok_or_else(|| anyhow::anyhow!("a connector needs a clientPort"))?;
            let config = frontend_config(&spec);
            let metrics = Arc::new(FrontendMetrics::new());
            let sessions = Sessions::new(&config, metrics.clone());
            let rpc_metrics = Arc::new(RpcMetrics::default());
            let target = sessions.clone();
            let client = ChatClient::start(
                spec.id.clone(),
                ctx.token.clone(),
                Arc::new(move |ids, payload| {
                    target.push_bytes(ids, &payload);
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
            let handler = Arc::new(Connector::new(Arc::new(ClusterRooms { client })));
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
                token: ctx.token.clone(),
                dict: Some(Arc::new(chat_dictionary())),
                membership: ctx.membership.clone(),
                metrics,
                shutdown: ctx.shutdown.clone(),
                tasks: ctx.tasks.clone(),
            }
            .start(listener);
        }
    }
    Ok(stats)
}

/// Keeps a listener bound and refuses what connects to it.
fn hold(
    listener: Option<tokio::net::TcpListener>,
    stop: tokio_util::sync::CancellationToken,
    tasks: &tokio_util::task::TaskTracker,
) {
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
