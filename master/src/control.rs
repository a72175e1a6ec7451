//! The control listener: one task per worker connection.
//!
//! A connection must complete the handshake of [`pomelo_proto::auth`] within
//! [`auth::HANDSHAKE_TIMEOUT`]: the worker's hello (id, nonce), the master's challenge (nonce, proof made
//! with the key it derives for that id from the cluster secret), then the worker's `Register` with its
//! own proof, checked here before anything reaches the supervisor. Until then frames are capped at
//! [`auth::HANDSHAKE_MAX_FRAME`] and at most [`auth::MAX_UNAUTHENTICATED`] connections are in their
//! handshake at once (more are closed at once); ids from the peer are logged escaped and truncated.
//! A server whose `host` is a DNS name has it resolved here (bounded in time) once its key is proven,
//! so the supervisor can check the peer's address against it. After that the task forwards heartbeats to the supervisor and writes what the supervisor queues for
//! the worker. The supervisor decides (welcome or reject) and closes a link by dropping its sender.
//! Connection tasks run on the master's task tracker and end when the peer goes away or the listener's
//! token is cancelled.

use std::net::SocketAddr;
use std::sync::Arc;

use pomelo_proto::auth::{self, LinkKind, Role, Transcript};
use pomelo_proto::config::WorkerSpec;
use pomelo_proto::control::{BoundAddrs, ServerType, Stats, ToMaster, ToWorker};
use pomelo_proto::link::{self, JsonFramed};
use pomelo_proto::peer;
use pomelo_proto::tls;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::supervisor::event::Registration;
use crate::view::ClusterView;

/// Messages queued for one worker; a worker that does not read is cut off.
const OUTBOX: usize = 64;

/// What the control listener tells the supervisor (only about workers that proved their id).
#[derive(Debug)]
pub enum LinkEvent {
    Registered {
        reg: Registration,
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
    /// A worker that proved its id asks for its spec (`worker --join`); the supervisor answers on `reply`.
    Join {
        ask: JoinAsk,
        reply: oneshot::Sender<Result<WorkerSpec, String>>,
    },
}

/// Who asks to join, and from where.
#[derive(Debug)]
pub struct JoinAsk {
    pub id: String,
    pub peer: SocketAddr,
    pub peer_local: bool,
    pub host_addrs: Vec<std::net::IpAddr>,
}

/// How long a join waits for the supervisor's answer.
const JOIN_ANSWER: std::time::Duration = std::time::Duration::from_secs(5);

pub async fn listen(
    listener: TcpListener,
    secret: Arc<str>,
    tls: Option<tls::TlsAcceptor>,
    view: watch::Receiver<Arc<ClusterView>>,
    events: mpsc::Sender<LinkEvent>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
) {
    let mut next_conn = 0u64;
    let stop = shutdown.clone();
    let admission = Arc::new(Admission { secret, tls, view });
    let unauthenticated = Arc::new(Semaphore::new(auth::MAX_UNAUTHENTICATED));
    link::accept_loop(listener, shutdown, "control port", |stream, peer| {
        let Ok(permit) = unauthenticated.clone().try_acquire_owned() else {
            tracing::warn!(
                "control connection from {peer} closed: {} handshakes already open",
                auth::MAX_UNAUTHENTICATED
            );
            return;
        };
        next_conn += 1;
        let (conn, events, shutdown, admission) = (next_conn, events.clone(), stop.clone(), admission.clone());
        tasks.spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = serve(stream, peer, conn, &admission, permit, events) => {}
            }
        });
    })
    .await;
}

/// What every connection is admitted with: the cluster secret its key is derived from, the TLS
/// acceptor (when cluster TLS is on), and the configured servers (for the peer's `host`).
struct Admission {
    secret: Arc<str>,
    tls: Option<tls::TlsAcceptor>,
    view: watch::Receiver<Arc<ClusterView>>,
}

/// What a worker that proved its id registered with.
struct Registered {
    id: String,
    server_type: ServerType,
    pid: u32,
    spec_hash: String,
    addrs: BoundAddrs,
}

/// What a peer that proved its key came for.
enum Opened {
    Register(Registered),
    Join(String),
}

/// The master's side of the handshake; `Err` says why the connection is closed (ids escaped).
async fn handshake(framed: &mut JsonFramed<tls::Stream>, secret: &str) -> Result<Opened, String> {
    let (id, dialler_nonce) = match framed.recv::<ToMaster>().await.map_err(|e| e.to_string())? {
        ToMaster::Hello { id, nonce } => (id, nonce),
        _ => return Err("the first frame was not a hello".into()),
    };
    if !auth::valid_id(&id) || !auth::valid_nonce(&dialler_nonce) {
        return Err(format!("malformed hello (id \"{}\")", auth::printable(&id)));
    }
    let key = auth::server_key(secret, &id);
    let nonce = auth::nonce().map_err(|e| e.to_string())?;
    let t = Transcript {
        kind: LinkKind::Control,
        dialler: &id,
        acceptor: auth::MASTER_ID,
        dialler_nonce: &dialler_nonce,
        acceptor_nonce: &nonce,
    };
    let proof = t.prove(&key, Role::Acceptor);
    framed.send(&ToWorker::Challenge { nonce: nonce.clone(), proof }).await.map_err(|e| e.to_string())?;
    match framed.recv::<ToMaster>().await.map_err(|e| e.to_string())? {
        ToMaster::Register { id: rid, server_type, pid, proof, spec_hash, addrs } => {
            if rid != id || !t.verify(&key, Role::Dialler, &proof) {
                // No `Rejected`: a peer without the key is owed nothing.
                return Err(format!("\"{}\" failed to prove its server key", auth::printable(&id)));
            }
            Ok(Opened::Register(Registered { id, server_type, pid, spec_hash, addrs }))
        }
        ToMaster::Join { id: rid, proof } => {
            if rid != id || !t.verify(&key, Role::Dialler, &proof) {
                return Err(format!("\"{}\" failed to prove its server key", auth::printable(&id)));
            }
            Ok(Opened::Join(id))
        }
        _ => Err(format!("\"{}\" sent something other than its registration", auth::printable(&id))),
    }
}

async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    conn: u64,
    admission: &Admission,
    permit: tokio::sync::OwnedSemaphorePermit,
    events: mpsc::Sender<LinkEvent>,
) {
    stream.set_nodelay(true).ok();
    let peer_local = peer.ip().is_loopback() || stream.local_addr().is_ok_and(|l| l.ip() == peer.ip());
    // The TLS handshake and ours share one deadline.
    let opened = async {
        let stream = tls::accept(admission.tls.as_ref(), stream).await.map_err(|e| format!("TLS: {e}"))?;
        let mut framed = JsonFramed::handshake(stream);
        let reg = handshake(&mut framed, &admission.secret).await?;
        Ok::<_, String>((framed, reg))
    };
    let (mut framed, reg) = match tokio::time::timeout(auth::HANDSHAKE_TIMEOUT, opened).await {
        Ok(Ok(reg)) => reg,
        Ok(Err(why)) => {
            tracing::warn!("control connection from {peer} closed: {why}");
            return;
        }
        Err(_) => {
            let secs = auth::HANDSHAKE_TIMEOUT.as_secs();
            tracing::warn!("control connection from {peer} did not complete its handshake within {secs}s; closed");
            return;
        }
    };
    let id = match &reg {
        Opened::Register(r) => &r.id,
        Opened::Join(id) => id,
    };
    let host = admission.view.borrow().servers.iter().find(|s| s.id == *id).map(|s| s.host.clone());
    let host_addrs = match host {
        Some(h) if peer::is_dns_name(&h) => peer::resolve(&h).await,
        _ => Vec::new(),
    };
    drop(permit);
    framed.authenticated();
    let reg = match reg {
        Opened::Register(reg) => reg,
        Opened::Join(id) => return join(framed, JoinAsk { id, peer, peer_local, host_addrs }, events).await,
    };
    let (tx, mut rx) = mpsc::channel(OUTBOX);
    let Registered { id, server_type, pid, spec_hash, addrs } = reg;
    let reg = Registration { conn, id: id.clone(), server_type, pid, spec_hash, addrs, peer, peer_local, host_addrs };
    let registered = LinkEvent::Registered { reg, outbox: tx };
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
                    if framed.send(&ToWorker::HeartbeatAck).await.is_err() {
                        break;
                    }
                }
                Ok(ToMaster::Leaving { reason }) => {
                    let _ = events.send(LinkEvent::Leaving { conn, id: id.clone(), reason }).await;
                }
                Ok(ToMaster::Register { .. } | ToMaster::Hello { .. } | ToMaster::Join { .. }) => {
                    tracing::warn!(server = %id, "registered twice on one link; closing it");
                    break;
                }
                Err(_) => break,
            },
        }
    }
    let _ = events.send(LinkEvent::Closed { conn, id }).await;
}

/// Answers a proven `Join` with the server's spec (or why not) and closes: the worker registers on a
/// link of its own once it runs.
async fn join(mut framed: JsonFramed<tls::Stream>, ask: JoinAsk, events: mpsc::Sender<LinkEvent>) {
    let (id, peer) = (ask.id.clone(), ask.peer);
    let (reply, answer) = oneshot::channel();
    if events.send(LinkEvent::Join { ask, reply }).await.is_err() {
        return;
    }
    let msg = match tokio::time::timeout(JOIN_ANSWER, answer).await {
        Ok(Ok(Ok(spec))) => {
            tracing::info!(server = %id, "{peer} joined: sent it its spec");
            ToWorker::Spec { spec: Box::new(spec) }
        }
        Ok(Ok(Err(reason))) => {
            tracing::warn!(server = %id, "refused the join from {peer}: {reason}");
            ToWorker::Rejected { reason }
        }
        // Closed without an answer: the worker tries again.
        _ => return,
    };
    let _ = tokio::time::timeout(JOIN_ANSWER, framed.send(&msg)).await;
}
