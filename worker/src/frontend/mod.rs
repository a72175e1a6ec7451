//! The hybrid frontend server: one client port serving Pomelo's protocol over WebSocket and raw TCP,
//! plus plain HTTP `GET` answered by the handler.
//!
//! [`serve`] runs the accept loop (`pomelo_proto::link::accept_loop`). Each accepted socket gets a connection task (`conn.rs`: protocol
//! state machine, timers, handler futures) and a writer task draining the session's bounded queue.
//! Sockets beyond `max_connections` are closed at once and counted. Shutdown: when the token is
//! cancelled the loop stops accepting, every connection kicks its client with "server shutting down"
//! and closes; after `shutdown_grace` whatever remains is dropped, then `serve` returns.
//!
//! - [`config`]: [`FrontendConfig`]. [`metrics`]: [`FrontendMetrics`].
//! - [`handler`]: the [`Handler`] trait the gate and connector implement.
//! - [`session`]: [`Session`] handles and the [`Sessions`] registry (push to ids, kick, lookup by uid).
//! - private: `conn` (one connection's tasks), `intake` (what one read brought, dispatched within the
//!   in-flight cap; the request rate), `close` (the reason logged for every close), `queue`, `state`,
//!   `transport`.

mod close;
pub mod config;
mod conn;
pub mod handler;
mod intake;
pub mod metrics;
mod queue;
pub mod session;
mod state;
mod transport;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{ClientTls, FrontendConfig};
pub use handler::{BoxFuture, Handler, HandlerError, Request, RequestKind};
pub use metrics::FrontendMetrics;
pub use queue::PushError;
pub use session::{BindError, CloseReason, Session, Sessions};

use pomelo_proto::link;
use pomelo_proto::wire::PackageDecoder;

#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    #[error("invalid frontend config: {0}")]
    Config(String),
}

/// Serves clients on `listener` until `shutdown` is cancelled, with a registry of its own.
pub async fn serve(
    listener: TcpListener,
    config: FrontendConfig,
    handler: Arc<dyn Handler>,
    metrics: Arc<FrontendMetrics>,
    shutdown: CancellationToken,
) -> Result<(), FrontendError> {
    let sessions = Sessions::new(&config, metrics);
    serve_with(listener, config, handler, sessions, shutdown).await
}

/// [`serve`] with a registry the caller keeps (to push to sessions and kick from other tasks).
/// The registry's metrics are the ones this server updates.
pub async fn serve_with(
    listener: TcpListener,
    config: FrontendConfig,
    handler: Arc<dyn Handler>,
    sessions: Arc<Sessions>,
    shutdown: CancellationToken,
) -> Result<(), FrontendError> {
    config.check().map_err(FrontendError::Config)?;
    let metrics = sessions.metrics().clone();
    // A WebSocket message may carry several packages; allow a few full-size ones, never more.
    let max_msg = (config.max_package_bytes + 4) * 4;
    // The writer sends a queued item as messages of at most max_batch_bytes, cut at package
    // boundaries; only a single package may be larger, and no package larger than the queue cap can be
    // queued. So one frame of the queue cap plus its header always fits: nothing queued is refused.
    let ws_config = WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0)
        .max_write_buffer_size(config.queue_max_bytes.max(config.max_batch_bytes) + 1024)
        .max_message_size(Some(max_msg))
        .max_frame_size(Some(max_msg));
    let shared = Arc::new(conn::Shared {
        routes: handler.routes().into_iter().collect::<HashSet<_>>(),
        decoder: PackageDecoder::new(config.max_package_bytes),
        ws_config,
        handler,
        sessions,
        metrics: metrics.clone(),
        config,
    });
    let slots = Arc::new(Semaphore::new(shared.config.max_connections));
    let tracker = TaskTracker::new();
    let force = CancellationToken::new();
    let local = listener.local_addr().ok();
    let mut refusals = Refusals::default();
    tracing::info!(addr = ?local, "frontend listening (websocket and tcp)");
    link::accept_loop(listener, shutdown.clone(), "frontend", |stream, peer| {
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            metrics::inc(&metrics.refused_total);
            refusals.refused(peer, shared.config.max_connections);
            drop(stream);
            return;
        };
        metrics::inc(&metrics.connections_total);
        metrics::inc(&metrics.connections);
        let (shared, shutdown, force, metrics) = (shared.clone(), shutdown.clone(), force.clone(), metrics.clone());
        tracker.spawn(async move {
            // Dropped even if the task unwinds, so the slot and the gauge are never leaked.
            let _slot = Slot { _permit: permit, metrics };
            conn::run(stream, peer, shared, shutdown, force).await;
        });
    })
    .await;
    tracker.close();
    let live = shared.sessions.count();
    tracing::info!(sessions = live, "frontend shutting down: kicking every session");
    if tokio::time::timeout(shared.config.shutdown_grace, tracker.wait()).await.is_err() {
        tracing::warn!("connections still open after {:?}; dropping them", shared.config.shutdown_grace);
        force.cancel();
        let hooks = shared.config.close_hook_timeout + Duration::from_secs(1);
        if tokio::time::timeout(hooks, tracker.wait()).await.is_err() {
            tracing::warn!("some connection tasks did not finish; giving up on them");
        }
    }
    Ok(())
}

/// Logs refused connections at most once a second, with how many there were, so a flood past
/// `max_connections` costs a log line per second rather than one per attempt (`refused_total` counts all).
#[derive(Default)]
struct Refusals {
    last_log: Option<tokio::time::Instant>,
    unlogged: u64,
}

impl Refusals {
    fn refused(&mut self, peer: std::net::SocketAddr, max: usize) {
        self.unlogged += 1;
        let now = tokio::time::Instant::now();
        if self.last_log.is_some_and(|t| now.duration_since(t) < Duration::from_secs(1)) {
            return;
        }
        tracing::warn!(%peer, max, refused = self.unlogged, "connections refused: max_connections reached");
        self.last_log = Some(now);
        self.unlogged = 0;
    }
}

/// One admitted connection: holds its `max_connections` permit and its share of the gauge.
struct Slot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    metrics: Arc<FrontendMetrics>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        metrics::sub(&self.metrics.connections, 1);
    }
}
