//! The chat server: the cluster RPC listener and one task per connector link, in front of the rooms
//! task ([`rooms_task`](super::rooms_task)).
//!
//! The accept task spawns a link task per connection. A link task runs the handshake of
//! [`pomelo_proto::auth`]: the connector's hello (its id, a nonce), this server's challenge (its nonce and
//! a proof with the link key it derives from its own key and that id), the connector's proof; only a
//! connector holding the link key the master issued it for this server gets past it, so no one can claim
//! another connector's name; and a connector the membership lists must connect from its `host`. Before that, frames are capped at [`auth::HANDSHAKE_MAX_FRAME`], the whole
//! handshake at [`auth::HANDSHAKE_TIMEOUT`], and at most [`auth::MAX_UNAUTHENTICATED`] connections are in
//! it at once (more are closed at once). Then it reads requests and passes them to the rooms task on a bounded channel
//! ([`INBOX`]), and writes what the rooms task puts in its outbox (answers and deliveries;
//! bounded by frames and bytes, see `outbox.rs`). All
//! tasks end when the shutdown token is cancelled; a link's end is reported to the rooms task.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use pomelo_proto::auth::{self, Key, LinkKind, Role, Transcript};
use pomelo_proto::cluster::{self, ChatError, ChatRequest, FromChat, Member, ToChat};
use pomelo_proto::control::{Membership, ServerType, Stats};
use pomelo_proto::peer;
use pomelo_proto::wire::Dictionary;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio_util::codec::{Framed, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::history::History;
use super::outbox::{outbox, OUTBOX_BYTES};
use super::room_table::{Limits, RoomTable};
use super::rooms_task::{rooms_task, Inbox, Keeps};

/// Frames queued for one connector.
const OUTBOX: usize = 16 * 1024;
/// Requests queued for the rooms task from all links.
const INBOX: usize = 16 * 1024;
/// Members one re-join may carry (a connector holds at most `maxConnections`, at most 1,000,000).
const MAX_REJOIN_MEMBERS: usize = 2_000_000;

#[derive(Debug, Default)]
pub struct ChatMetrics {
    pub rooms: AtomicU64,
    pub members: AtomicU64,
    pub links: AtomicU64,
    pub requests: AtomicU64,
    pub messages_in: AtomicU64,
    pub deliveries_out: AtomicU64,
    pub frames_dropped: AtomicU64,
    pub rpc_errors: AtomicU64,
    /// Sends answered 500 because their history backend could not store them.
    pub history_failures: AtomicU64,
}

impl ChatMetrics {
    pub fn snapshot(&self, out: &mut Stats) {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        out.insert("rooms".into(), g(&self.rooms));
        out.insert("members".into(), g(&self.members));
        out.insert("rpc_links".into(), g(&self.links));
        out.insert("rpc_requests_total".into(), g(&self.requests));
        out.insert("messages_in_total".into(), g(&self.messages_in));
        out.insert("deliveries_out_total".into(), g(&self.deliveries_out));
        out.insert("deliveries_dropped_total".into(), g(&self.frames_dropped));
        out.insert("rpc_errors_total".into(), g(&self.rpc_errors));
        out.insert("history_failures_total".into(), g(&self.history_failures));
    }
}

pub struct ChatServer {
    pub id: String,
    /// `maxRoomMembers` and `maxRooms`.
    pub limits: Limits,
    /// `history` from servers.yaml (`None`: the defaults, or the environment's `POMELO_HISTORY_*`).
    pub history: Option<pomelo_proto::config::HistoryConfig>,
    /// The master says this server's rooms had another owner while it was away: a `disk` history starts
    /// anew (what it kept would continue with a silent gap).
    pub fresh_history: bool,
    /// This server's key (hex).
    pub token: String,
    pub dict: Option<Arc<Dictionary>>,
    /// servers.yaml `protobuf`: pushes of routes with a server proto (onChat, onAdd, onLeave) are protobuf.
    pub protobuf: pomelo_proto::wire::protobuf::Protobuf,
    pub membership: watch::Receiver<Arc<Membership>>,
    pub metrics: Arc<ChatMetrics>,
    pub shutdown: CancellationToken,
    pub tasks: TaskTracker,
}

impl ChatServer {
    /// Opens the room history (a `disk` store that cannot be opened is an error) and serves.
    pub fn start(self, listener: TcpListener) -> Result<(), String> {
        let (tx, rx) = mpsc::channel(INBOX);
        let stop = self.shutdown.clone();
        let key = Key::from_hex(&self.token);
        if key.is_none() {
            tracing::error!("the server key is not 64 hex digits: every rpc link will be refused");
        }
        let me: Arc<(String, Option<Key>)> = Arc::new((self.id.clone(), key));
        let unauthenticated = Arc::new(Semaphore::new(auth::MAX_UNAUTHENTICATED));
        let metrics = self.metrics.clone();
        let tasks = self.tasks.clone();
        let history = History::open(self.history.as_ref(), &self.id, self.fresh_history)?;
        let keeps = Keeps { rooms: self.limits, history };
        let members = self.membership.clone();
        let rooms = RoomTable::new(self.dict).with_protobuf(self.protobuf);
        self.tasks.spawn(rooms_task(self.id, rooms, self.membership, self.metrics, rx, stop.clone(), keeps));
        tasks.clone().spawn(async move {
            let mut next = 0u64;
            let stopping = stop.clone();
            pomelo_proto::link::accept_loop(listener, stop, "rpc", |stream, peer| {
                let Ok(permit) = unauthenticated.clone().try_acquire_owned() else {
                    tracing::warn!(
                        "rpc connection from {peer} closed: {} handshakes already open",
                        auth::MAX_UNAUTHENTICATED
                    );
                    return;
                };
                next += 1;
                let conn = next;
                let (tx, me, metrics, stop) = (tx.clone(), me.clone(), metrics.clone(), stopping.clone());
                let members = members.clone();
                tasks.spawn(async move {
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        r = link(stream, conn, tx, &me, permit, metrics, members) => if let Err(e) = r {
                            tracing::info!("rpc link from {peer} closed: {e}");
                        }
                    }
                });
            })
            .await;
        });
        Ok(())
    }
}

async fn link(
    stream: TcpStream,
    conn: u64,
    inbox: mpsc::Sender<Inbox>,
    me: &(String, Option<Key>),
    permit: OwnedSemaphorePermit,
    metrics: Arc<ChatMetrics>,
    members: watch::Receiver<Arc<Membership>>,
) -> anyhow::Result<()> {
    stream.set_nodelay(true).ok();
    let peer = stream.peer_addr()?.ip();
    let peer_local = peer.is_loopback() || stream.local_addr().is_ok_and(|l| l.ip() == peer);
    let (chat, key) = me;
    let key = key.as_ref().ok_or_else(|| anyhow::anyhow!("this chat server has no valid server key"))?;
    let mut codec = pomelo_proto::link::cluster_codec();
    codec.set_max_frame_length(auth::HANDSHAKE_MAX_FRAME);
    // The TLS handshake and ours share one deadline.
    let opened = async {
        let stream = pomelo_proto::tls::worker_accept(stream).await.map_err(|e| anyhow::anyhow!("TLS: {e}"))?;
        let mut framed = Framed::new(stream, codec);
        let connector = handshake(&mut framed, chat, key).await?;
        anyhow::Ok((framed, connector))
    };
    let (mut framed, connector): (_, Arc<str>) = tokio::time::timeout(auth::HANDSHAKE_TIMEOUT, opened)
        .await
        .map_err(|_| anyhow::anyhow!("no handshake within {:?}", auth::HANDSHAKE_TIMEOUT))??;
    // A connector the membership lists must come from its `host`; one it does not list yet (a new
    // master that has not heard from it) is vouched for by its link key alone.
    let host = members
        .borrow()
        .servers
        .iter()
        .find(|s| s.server_type == ServerType::Connector && *s.id == *connector)
        .map(|s| s.host.clone());
    if let Some(host) = host {
        let resolved = if peer::is_dns_name(&host) { peer::resolve(&host).await } else { Vec::new() };
        peer::fits(&host, peer, peer_local, &resolved)
            .map_err(|why| anyhow::anyhow!("connector \"{}\" refused: {why}", auth::printable(&connector)))?;
    }
    drop(permit);
    framed.codec_mut().set_max_frame_length(pomelo_proto::link::CLUSTER_MAX_FRAME);
    framed.send(cluster::encode_msg(&FromChat::Welcome { chat: chat.clone() })).await?;
    let (mut sink, mut stream) = framed.split();
    let (out_tx, mut out_rx) = outbox(OUTBOX, OUTBOX_BYTES);
    // The reader answers requests it cannot decode; it must not keep the outbox open on its own.
    let errors = out_tx.downgrade();
    inbox.send(Inbox::Link { connector: connector.clone(), conn, outbox: out_tx }).await?;
    metrics.links.fetch_add(1, Ordering::Relaxed);
    let writer = async {
        while let Some(frame) = out_rx.recv().await {
            sink.feed(frame).await?;
            // Write what else is queued in the same syscall.
            while let Some(more) = out_rx.try_recv() {
                sink.feed(more).await?;
            }
            // Sessions whose deliveries did not fit are told, after what was queued before them.
            let lost = out_rx.take_lost();
            if !lost.is_empty() {
                sink.feed(cluster::encode_msg(&FromChat::Lost { sessions: lost })).await?;
            }
            if let Some(ask) = out_rx.take_ask() {
                sink.feed(ask).await?;
            }
            sink.flush().await?;
        }
        anyhow::Ok(())
    };
    let reader = async {
        let mut rejoin: Vec<Member> = Vec::new();
        while let Some(frame) = stream.next().await {
            let frame = frame?.freeze();
            let (id, req) = match cluster::decode::<ToChat>(frame.clone()) {
                Ok(cluster::Frame::Msg(ToChat::Request { id, req })) => (id, req),
                Ok(_) => anyhow::bail!("unexpected frame from {connector:?}"),
                Err(e) => {
                    // One request this server cannot take fails alone; the link and the rest go on.
                    let Some(id) = cluster::request_id(&frame) else { return Err(e.into()) };
                    tracing::warn!("request {id} from {connector:?} refused: {e}");
                    metrics.rpc_errors.fetch_add(1, Ordering::Relaxed);
                    let result =
                        Err(ChatError::Other { msg: format!("the chat server cannot read this request: {e}") });
                    if let Some(out) = errors.upgrade() {
                        if out.try_send(cluster::encode_msg(&FromChat::Response { id, result })).is_err() {
                            metrics.frames_dropped.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    continue;
                }
            };
            let req = match req {
                // A re-join comes in chunks; the rooms task gets it whole, so it replaces at once.
                ChatRequest::Rejoin { members, more } => {
                    if rejoin.len() + members.len() > MAX_REJOIN_MEMBERS {
                        anyhow::bail!("{connector:?} re-joined more than {MAX_REJOIN_MEMBERS} members");
                    }
                    rejoin.extend(members);
                    if more {
                        continue;
                    }
                    ChatRequest::Rejoin { members: std::mem::take(&mut rejoin), more: false }
                }
                req => req,
            };
            inbox.send(Inbox::Request { connector: connector.clone(), conn, id, req }).await?;
        }
        anyhow::Ok(())
    };
    let result = tokio::select! { r = writer => r, r = reader => r };
    metrics.links.fetch_sub(1, Ordering::Relaxed);
    let _ = inbox.send(Inbox::Unlink { connector, conn }).await;
    result
}

/// This server's side of the handshake: the connector id that proved itself (escaped in every error).
async fn handshake(
    framed: &mut Framed<pomelo_proto::tls::Stream, LengthDelimitedCodec>,
    chat: &str,
    key: &Key,
) -> anyhow::Result<Arc<str>> {
    let frame = framed.next().await.ok_or_else(|| anyhow::anyhow!("closed before hello"))??.freeze();
    let (connector, dialler_nonce) = match cluster::decode::<ToChat>(frame)? {
        cluster::Frame::Msg(ToChat::Hello { connector, nonce }) => (connector, nonce),
        _ => anyhow::bail!("the first frame was not a hello"),
    };
    if !auth::valid_id(&connector) || !auth::valid_nonce(&dialler_nonce) {
        anyhow::bail!("malformed hello (connector \"{}\")", auth::printable(&connector));
    }
    let link_key = auth::link_key(key, &connector);
    let nonce = auth::nonce()?;
    let t = Transcript {
        kind: LinkKind::Rpc,
        dialler: &connector,
        acceptor: chat,
        dialler_nonce: &dialler_nonce,
        acceptor_nonce: &nonce,
    };
    let proof = t.prove(&link_key, Role::Acceptor);
    framed.send(cluster::encode_msg(&FromChat::Challenge { chat: chat.into(), nonce: nonce.clone(), proof })).await?;
    let frame = framed.next().await.ok_or_else(|| anyhow::anyhow!("closed before its proof"))??.freeze();
    match cluster::decode::<ToChat>(frame)? {
        cluster::Frame::Msg(ToChat::Proof { proof }) if t.verify(&link_key, Role::Dialler, &proof) => {
            Ok(connector.into())
        }
        _ => anyhow::bail!("\"{}\" failed to prove its link key", auth::printable(&connector)),
    }
}
