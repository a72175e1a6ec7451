//! The control listener: one task per worker connection.
//!
//! A connection must open with [`ToMaster::Register`] within [`REGISTER_TIMEOUT`]; after that the task
//! forwards heartbeats to the supervisor and writes what the supervisor queues for the worker. The
//! supervisor decides (welcome or reject) and closes a link by dropping its sender. Connection tasks run on
//! the master's task tracker and end when the peer goes away or the listener's token is cancelled.

use std::net::SocketAddr;
use std::time::Duration;

use pomelo_proto::control::{BoundAddrs, ServerType, Stats, ToMaster, ToWorker};
use pomelo_proto::link::{self, JsonFramed};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub const REGISTER_TIMEOUT: Duration = Duration::from_secs(5);
/// Messages queued for one worker; a worker that does not read is cut off.
const OUTBOX: usize = 64;

/// What the control listener tells the supervisor.
#[derive(Debug)]
pub enum LinkEvent {
    Registered {
        conn: u64,
        id: String,
        server_type: ServerType,
        pid: u32,
        token: String,
        spec_hash: String,
        addrs: BoundAddrs,
        peer: SocketAddr,
        outbox: mpsc::Sender<ToWorker>,
    },
    Heartbeat {
        conn: u64,
        id: String,
        stats: Stats,
    },
    Leaving {
        conn: u64,
        id: String,
        reason: String,
    },
    Closed {
        conn: u64,
        id: String,
    },
}

pub async fn listen(
    listener: TcpListener,
    events: mpsc::Sender<LinkEvent>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
) {
    let mut next_conn = 0u64;
    let stop = shutdown.clone();
    link::accept_loop(listener, shutdown, "control port", |stream, peer| {
        next_conn += 1;
        let (conn, events, shutdown) = (next_conn, events.clone(), stop.clone());
        tasks.spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = serve(stream, peer, conn, events) => {}
            }
        });
    })
    .await;
}

async fn serve(stream: TcpStream, peer: SocketAddr, conn: u64, events: mpsc::Sender<LinkEvent>) {
    stream.set_nodelay(true).ok();
    let mut framed = JsonFramed::new(stream);
    let first = tokio::time::timeout(REGISTER_TIMEOUT, framed.recv::<ToMaster>()).await;
    let (id, reg) = match first {
        Ok(Ok(ToMaster::Register { id, server_type, pid, token, spec_hash, addrs })) => {
            (id.clone(), (id, server_type, pid, token, spec_hash, addrs))
        }
        Ok(Ok(other)) => {
            tracing::warn!("control connection from {peer} sent {other:?} before registering; closed");
            return;
        }
        Ok(Err(e)) => {
            tracing::warn!("control connection from {peer}: {e}; closed");
            return;
        }
        Err(_) => {
            tracing::warn!("control connection from {peer} did not register within 5s; closed");
            return;
        }
    };
    let (tx, mut rx) = mpsc::channel(OUTBOX);
    let (rid, server_type, pid, token, spec_hash, addrs) = reg;
    let registered =
        LinkEvent::Registered { conn, id: rid, server_type, pid, token, spec_hash, addrs, peer, outbox: tx };
    if events.send(registered).await.is_err() {
        return;
    }
    loop {
        tokio::select! {
            out = rx.recv() => match out {
                Some(msg) => {
                    if framed.send(&msg).await.is_err() {
                        break;
                    }
                }
                // The supervisor dropped the link (rejected, replaced or shutting down).
                None => break,
            },
            msg = framed.recv::<ToMaster>() => match msg {
                Ok(ToMaster::Heartbeat { stats }) => {
                    if events.send(LinkEvent::Heartbeat { conn, id: id.clone(), stats }).await.is_err() {
                        return;
                    }
                }
                Ok(ToMaster::Leaving { reason }) => {
                    let _ = events.send(LinkEvent::Leaving { conn, id: id.clone(), reason }).await;
                }
                Ok(ToMaster::Register { .. }) => {
                    tracing::warn!(server = %id, "registered twice on one link; closing it");
                    break;
                }
                Err(_) => break,
            },
        }
    }
    let _ = events.send(LinkEvent::Closed { conn, id }).await;
}
