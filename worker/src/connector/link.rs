//! One connector→chat-server link: a task that connects (with backoff), authenticates both ends (the
//! handshake of [`pomelo_proto::auth`] over the pair's link key, unwrapped from the membership with this
//! connector's server key: the connector proves itself only to a chat server that proved itself first,
//! so a squatter on a dead chat server's port gets no proof, no member and no message), re-joins the members
//! whose rooms that chat server owns, then writes queued requests and reads answers and deliveries.
//!
//! The re-join is authoritative (it replaces this connector's members on that chat server, see
//! `ChatRequest::Rejoin`) and is sent on every new connection and whenever the client asks (every
//! membership it receives), through a [`Notify`] that holds at most one request: never dropped, never
//! queued twice. Its members are read when it is written, so it agrees with every join and leave queued
//! before it, and it goes in chunks of [`cluster::REJOIN_CHUNK_BYTES`].
//!
//! Requests reach the task on a bounded queue ([`QUEUE`]); each one waiting for its answer is held in
//! [`Pending`] (at most [`MAX_PENDING`], inserted in one place; entries whose caller gave up are swept).
//! Deliveries go straight to the sessions through the client's `deliver` closure. When the link breaks,
//! everyone waiting on it gets an error at once; the backoff before the next attempt doubles up to 2 s
//! and starts again from 50 ms after a connection that lasted [`HEALTHY`]. The task ends when its `stop`
//! token (a child of the shutdown token) is cancelled.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use pomelo_proto::auth::{self, Key, LinkKind, Role, Transcript};
use pomelo_proto::cluster::{self, ChatError, ChatReply, ChatRequest, FromChat, Member, ToChat};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_util::codec::{Framed, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;

use super::metrics::RpcMetrics;
use super::placement;

/// Requests queued for one chat server.
const QUEUE: usize = 8 * 1024;
/// Requests awaiting an answer on one link.
const MAX_PENDING: usize = 64 * 1024;
/// A connection that lasted this long resets the reconnect backoff.
pub const HEALTHY: Duration = Duration::from_secs(5);
/// How often entries whose caller stopped waiting are swept from [`Pending`].
const SWEEP: Duration = Duration::from_secs(5);

/// Locks, recovering from poisoning: every map of the connector's RPC stays consistent between
/// statements, so a panic elsewhere never makes the data wrong, and skipping work on a poisoned lock
/// would lose records.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Hands a pre-encoded package to sessions of this connector.
pub type Deliver = Arc<dyn Fn(&[u64], bytes::Bytes) + Send + Sync>;
/// Called with the sessions a chat server could not deliver to (its outbox to this connector was full).
pub type Lost = Arc<dyn Fn(&[u64]) + Send + Sync>;

/// What every link of one connector shares.
pub(crate) struct Shared {
    pub(crate) connector: String,
    /// This connector's server key (hex).
    pub(crate) token: String,
    pub(crate) deliver: Deliver,
    pub(crate) lost: Lost,
    pub(crate) metrics: Arc<RpcMetrics>,
    /// The members whose rooms a chat server owns now, read when a re-join is written.
    pub(crate) owned: Owned,
    /// Whether this connector reckons room ownership over these chat servers now.
    pub(crate) agrees: Agrees,
}

/// See [`Shared::owned`].
pub(crate) type Owned = Box<dyn Fn(&str) -> Vec<Member> + Send + Sync>;

/// See [`Shared::agrees`].
pub(crate) type Agrees = Box<dyn Fn(&[String]) -> bool + Send + Sync>;

/// Where a request's answer goes.
pub(crate) type Reply = oneshot::Sender<Result<ChatReply, ChatError>>;

/// A request for the link task, and who waits for its answer (`None`: nobody, e.g. a compensating leave).
pub(crate) type Queued = (ChatRequest, Option<Reply>);

/// The link as the client's map holds it.
pub(crate) struct Link {
    pub(crate) addr: SocketAddr,
    pub(crate) pid: u32,
    pub(crate) tx: mpsc::Sender<Queued>,
    /// Asks the task for a re-join (held until it is written).
    pub(crate) rejoin: Arc<Notify>,
    pub(crate) stop: CancellationToken,
}

/// Requests sent on one connection and awaiting their answer, by request id.
#[derive(Default)]
struct Pending {
    next_id: AtomicU64,
    waiting: Mutex<HashMap<u64, Reply>>,
}

impl Pending {
    /// The one way in: assigns the request's id and records who waits for it, within [`MAX_PENDING`];
    /// `None` (and the waiter told) when full.
    fn insert(&self, reply: Reply) -> Option<u64> {
        let id = self.next_id();
        let mut waiting = lock(&self.waiting);
        if waiting.len() >= MAX_PENDING {
            // Answers the chat server dropped leave entries whose caller timed out: those go first.
            waiting.retain(|_, r| !r.is_closed());
        }
        if waiting.len() >= MAX_PENDING {
            let _ = reply.send(Err(ChatError::Other { msg: "too many requests in flight".into() }));
            return None;
        }
        waiting.insert(id, reply);
        Some(id)
    }

    /// Ids start at 1 (0 is the re-join sent on connect).
    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Forgets entries whose caller stopped waiting (its answer was lost: a full outbox on the chat
    /// server, a dropped frame).
    fn sweep(&self) {
        lock(&self.waiting).retain(|_, r| !r.is_closed());
    }

    fn take(&self, id: u64) -> Option<Reply> {
        lock(&self.waiting).remove(&id)
    }

    /// Whoever waits on this connection gets an error now rather than a timeout later.
    fn fail_all(&self) {
        lock(&self.waiting).clear();
    }
}

/// The chat server a link goes to.
pub(crate) struct Peer {
    pub chat: String,
    pub addr: SocketAddr,
    /// What its TLS certificate must name (its `host`).
    pub tls_name: String,
}

/// `wrapped`: the link key the membership carries for this connector with `chat`.
pub(crate) fn spawn(client: Arc<Shared>, to: Peer, pid: u32, wrapped: Option<String>, stop: CancellationToken) -> Link {
    let (tx, rx) = mpsc::channel(QUEUE);
    let rejoin = Arc::new(Notify::new());
    let (s, r) = (stop.clone(), rejoin.clone());
    let key = wrapped.and_then(|w| auth::unwrap_link_key(&Key::from_hex(&client.token)?, &to.chat, &w));
    let addr = to.addr;
    tokio::spawn(async move { run(client, to, key, rx, r, s).await });
    Link { addr, pid, tx, rejoin, stop }
}

async fn run(
    client: Arc<Shared>,
    to: Peer,
    key: Option<Key>,
    mut rx: mpsc::Receiver<Queued>,
    rejoin: Arc<Notify>,
    stop: CancellationToken,
) {
    const FIRST: Duration = Duration::from_millis(50);
    let mut backoff = FIRST;
    loop {
        let started = Instant::now();
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            r = connect_and_serve(&client, &to, key.as_ref(), &mut rx, &rejoin) => r,
        };
        if started.elapsed() >= HEALTHY {
            backoff = FIRST;
        }
        if let Err(e) = result {
            tracing::warn!("rpc link to `{}` at {}: {e}; reconnecting in {backoff:?}", to.chat, to.addr);
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

async fn connect_and_serve(
    client: &Shared,
    to: &Peer,
    key: Option<&Key>,
    rx: &mut mpsc::Receiver<Queued>,
    rejoin: &Notify,
) -> anyhow::Result<()> {
    let (inner, chat, addr) = (client, to.chat.as_str(), to.addr);
    let key =
        key.ok_or_else(|| anyhow::anyhow!("the membership holds no link key for this connector with `{chat}`"))?;
    let stream = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)).await??;
    stream.set_nodelay(true).ok();
    let stream =
        tokio::time::timeout(auth::HANDSHAKE_TIMEOUT, pomelo_proto::tls::worker_connect_to(stream, &to.tls_name))
            .await
            .map_err(|_| anyhow::anyhow!("no TLS handshake with `{chat}` within 5s"))??;
    let mut codec = pomelo_proto::link::cluster_codec();
    codec.set_max_frame_length(auth::HANDSHAKE_MAX_FRAME);
    let mut framed = Framed::new(stream, codec);
    tokio::time::timeout(auth::HANDSHAKE_TIMEOUT, handshake(&mut framed, &inner.connector, chat, key))
        .await
        .map_err(|_| anyhow::anyhow!("no handshake within {:?}", auth::HANDSHAKE_TIMEOUT))??;
    framed.codec_mut().set_max_frame_length(pomelo_proto::link::CLUSTER_MAX_FRAME);
    let (mut sink, mut stream) = framed.split();
    // Everything this chat server owns is re-joined before any new request reaches it.
    let pending = Pending::default();
    let n = send_rejoin(&mut sink, client, chat, &pending).await?;
    sink.flush().await?;
    tracing::info!("rpc link to `{chat}` at {addr} up; {n} members re-joined");
    let (deliver, lost) = (inner.deliver.clone(), inner.lost.clone());
    let metrics = inner.metrics.clone();
    let reader = async {
        while let Some(frame) = stream.next().await {
            match cluster::decode::<FromChat>(frame?.freeze())? {
                cluster::Frame::Deliver { sessions, payload } => {
                    metrics.delivered(sessions.len());
                    deliver(&sessions, payload);
                }
                cluster::Frame::Msg(FromChat::Response { id, result }) => {
                    if let Some(w) = pending.take(id) {
                        let _ = w.send(result);
                    }
                }
                cluster::Frame::Msg(FromChat::Lost { sessions }) => {
                    tracing::warn!("`{chat}` dropped deliveries to {} sessions: kicking them", sessions.len());
                    lost(&sessions);
                }
                // A chat server that gained rooms asks for them; a connector with another view of the
                // chat servers re-joins when its own membership changes.
                cluster::Frame::Msg(FromChat::Rejoin { chats }) => {
                    if (inner.agrees)(&chats) {
                        rejoin.notify_one();
                    }
                }
                cluster::Frame::Msg(FromChat::Welcome { .. } | FromChat::Challenge { .. }) => {}
            }
        }
        anyhow::bail!("closed by the chat server")
    };
    let writer = async {
        let mut sweep = tokio::time::interval(SWEEP);
        loop {
            let (first, rejoin_now) = tokio::select! {
                q = rx.recv() => match q {
                    Some(q) => (Some(q), false),
                    None => return anyhow::Ok(()),
                },
                _ = rejoin.notified() => (None, true),
                _ = sweep.tick() => {
                    pending.sweep();
                    continue;
                }
            };
            let mut next = first;
            // Write what else is queued in the same syscall; before a re-join, everything queued goes
            // first, so a join queued before it reaches the chat server with its `onAdd`.
            while let Some((req, reply)) = next.take().or_else(|| rx.try_recv().ok()) {
                let id = match reply {
                    Some(reply) => match pending.insert(reply) {
                        Some(id) => id,
                        None => continue,
                    },
                    None => pending.next_id(),
                };
                sink.feed(cluster::encode_msg(&ToChat::Request { id, req })).await?;
            }
            if rejoin_now {
                let n = send_rejoin(&mut sink, client, chat, &pending).await?;
                tracing::debug!("re-joined {n} members on `{chat}`");
            }
            sink.flush().await?;
        }
    };
    let r = tokio::select! { r = reader => r, r = writer => r };
    pending.fail_all();
    r
}

/// The connector's side of the handshake: hello, check the chat server's proof, then prove, then wait
/// for the welcome.
async fn handshake(
    framed: &mut Framed<pomelo_proto::tls::Stream, LengthDelimitedCodec>,
    connector: &str,
    chat: &str,
    key: &Key,
) -> anyhow::Result<()> {
    let nonce = auth::nonce()?;
    framed.send(cluster::encode_msg(&ToChat::Hello { connector: connector.into(), nonce: nonce.clone() })).await?;
    let frame = framed.next().await.ok_or_else(|| anyhow::anyhow!("closed before the challenge"))??;
    let cluster::Frame::Msg(FromChat::Challenge { chat: claimed, nonce: chat_nonce, proof }) =
        cluster::decode::<FromChat>(frame.freeze())?
    else {
        anyhow::bail!("the first frame was not a challenge");
    };
    let t = Transcript {
        kind: LinkKind::Rpc,
        dialler: connector,
        acceptor: chat,
        dialler_nonce: &nonce,
        acceptor_nonce: &chat_nonce,
    };
    if claimed != chat || !t.verify(key, Role::Acceptor, &proof) {
        anyhow::bail!("the peer could not prove it is `{chat}`; not linking to it");
    }
    framed.send(cluster::encode_msg(&ToChat::Proof { proof: t.prove(key, Role::Dialler) })).await?;
    let frame = framed.next().await.ok_or_else(|| anyhow::anyhow!("closed by `{chat}` after the proof"))??;
    match cluster::decode::<FromChat>(frame.freeze())? {
        cluster::Frame::Msg(FromChat::Welcome { .. }) => Ok(()),
        _ => anyhow::bail!("`{chat}` did not welcome this connector"),
    }
}

/// Feeds the authoritative re-join of every member whose room `chat` owns (possibly none), in chunks of
/// about [`cluster::REJOIN_CHUNK_BYTES`]; how many members it carried.
async fn send_rejoin<S>(sink: &mut S, client: &Shared, chat: &str, pending: &Pending) -> anyhow::Result<usize>
where
    S: futures_util::Sink<bytes::Bytes, Error = std::io::Error> + Unpin,
{
    let members = (client.owned)(chat);
    let total = members.len();
    let mut chunks = placement::chunks(members, cluster::REJOIN_CHUNK_BYTES).into_iter().peekable();
    while let Some(members) = chunks.next() {
        let more = chunks.peek().is_some();
        let req = ChatRequest::Rejoin { members, more };
        sink.feed(cluster::encode_msg(&ToChat::Request { id: pending.next_id(), req })).await?;
    }
    Ok(total)
}
