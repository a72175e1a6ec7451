//! How a connection ends: [`End`] says what stopped its read loop, [`settle`] logs the one line every
//! close gets and decides what happens to the outbound queue (KICK and flush, flush, or drop). No tasks.

use std::net::SocketAddr;

use pomelo_proto::wire;

use super::metrics::{self, FrontendMetrics};
use super::session::{CloseReason, SessionInner, QUEUE_FULL_REASON};

/// How the read loop ended.
pub(crate) enum End {
    /// The session was ended (kick, close, queue full, failed write): see its close reason.
    Closing,
    PeerClosed,
    PeerReset(String),
    Failed(String),
    Protocol(String),
    Timeout(&'static str),
    Forced,
}

/// Every close gets one line saying why: INFO when the server ends it, WARN for malformed input, DEBUG
/// when the client simply goes (a close or a reset is how clients leave).
pub(crate) fn settle(end: &End, s: &SessionInner, peer: SocketAddr, m: &FrontendMetrics) {
    let (id, why) = (s.id, s.close_reason());
    match (end, why) {
        (End::Closing, Some(CloseReason::Kick(reason))) => {
            tracing::info!(session = id, %peer, "kicked: {reason:?}");
            s.queue.push_last(wire::kick(&reason));
        }
        (End::Closing, Some(CloseReason::QueueFull)) => {
            // `end` already swapped the backlog for the KICK; let the writer deliver it.
            tracing::info!(session = id, %peer, "kicked: {:?}", QUEUE_FULL_REASON);
        }
        (End::Closing, Some(CloseReason::Close(why))) => {
            tracing::info!(session = id, %peer, "closing: {why}");
            s.queue.close();
        }
        (End::Closing, Some(CloseReason::PeerGone)) => {
            // The writer logged the failed write; nothing more can be sent.
            s.queue.abort();
        }
        (End::Timeout(what), _) => {
            metrics::inc(&m.timeouts_total);
            tracing::info!(session = id, %peer, "closing connection: {what}");
            s.queue.abort();
        }
        (End::Protocol(e), _) => {
            metrics::inc(&m.protocol_errors_total);
            // Debug-quoted: the text may quote what the client sent.
            tracing::warn!(session = id, %peer, "closing connection on malformed input: {e:?}");
            // Tell the client why, in place of whatever was still queued (it may not be able to read it).
            s.queue.replace_with_last(wire::kick(&format!("malformed input: {e}")));
        }
        (End::Failed(e), _) => {
            tracing::info!(session = id, %peer, "connection failed: {e}");
            s.queue.abort();
        }
        (End::PeerReset(e), _) => {
            tracing::debug!(session = id, %peer, "client reset the connection: {e}");
            s.queue.abort();
        }
        (End::PeerClosed, _) => {
            tracing::debug!(session = id, %peer, "client closed the connection");
            s.queue.abort();
        }
        (End::Forced, _) | (End::Closing, None) => {
            tracing::debug!(session = id, %peer, "connection dropped at shutdown");
            s.queue.abort();
        }
    }
}
