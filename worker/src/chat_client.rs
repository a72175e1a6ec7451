//! A connector's side of cluster RPC: links to every live chat server, and the record of which of its
//! sessions is in which room.
//!
//! Connectors are the source of truth for membership. Each link task connects (with backoff) to one chat
//! server, re-joins the members of the rooms that server owns every time it (re)connects, then carries
//! requests and hands deliveries to the sessions. A watcher task follows the master's membership: it opens
//! links to new chat servers, closes links to gone ones, reconnects to restarted ones, and re-joins members
//! whose room changed owner. Requests time out after [`REQUEST_TIMEOUT`]; the caller turns failures into
//! `{"code":500}`. Everything stops with the shutdown token.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use pomelo_proto::cluster::{self, ChatError, ChatReply, ChatRequest, FromChat, Member, ToChat};
use pomelo_proto::control::{Membership, ServerType, Stats};
use pomelo_proto::route;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::codec::{Framed, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;

pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests queued for one chat server.
const QUEUE: usize = 8 * 1024;
/// Requests awaiting an answer on one link.
const MAX_PENDING: usize = 64 * 1024;

/// Hands a pre-encoded package to sessions of this connector.
pub type Deliver = Arc<dyn Fn(&[u64], Bytes) + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    #[error("no chat server is running")]
    NoChatServer,
    #[error("chat server `{0}` did not answer within {REQUEST_TIMEOUT:?}")]
    Timeout(String),
    #[error("chat server `{0}` is unreachable or overloaded")]
    Unavailable(String),
    #[error(transparent)]
    Chat(#[from] ChatError),
}

#[derive(Debug, Default)]
pub struct RpcMetrics {
    requests: AtomicU64,
    errors: AtomicU64,
    deliveries_in: AtomicU64,
    latency_us_sum: AtomicU64,
    /// Cumulative counts for the latency buckets in [`LATENCY_BUCKETS_MS`].
    latency_buckets: [AtomicU64; 8],
}

/// Upper bounds (ms) of the RPC latency histogram buckets.
pub const LATENCY_BUCKETS_MS: [f64; 8] = [0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 100.0, 1000.0];

impl RpcMetrics {
    fn observe(&self, d: Duration) {
        let ms = d.as_secs_f64() * 1000.0;
        self.latency_us_sum.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
        for (i, le) in LATENCY_BUCKETS_MS.iter().enumerate() {
            if ms <= *le {
                self.latency_buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Writes `rpc_requests_total`, `rpc_errors_total`, the latency histogram as
    /// `rpc_latency_seconds_bucket_<seconds>` (cumulative), `_sum` and `_count`.
    pub fn snapshot(&self, out: &mut Stats) {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        out.insert("rpc_requests_total".into(), g(&self.requests));
        out.insert("rpc_errors_total".into(), g(&self.errors));
        out.insert("rpc_deliveries_in_total".into(), g(&self.deliveries_in));
        for (i, le) in LATENCY_BUCKETS_MS.iter().enumerate() {
            out.insert(format!("rpc_latency_seconds_bucket_{}", le / 1000.0), g(&self.latency_buckets[i]));
        }
        out.insert("rpc_latency_seconds_sum".into(), g(&self.latency_us_sum) / 1e6);
        out.insert("rpc_latency_seconds_count".into(), g(&self.requests) - g(&self.errors));
    }
}

/// Where a request's answer goes.
type Reply = oneshot::Sender<Result<ChatReply, ChatError>>;
/// A request waiting for its link, and who waits for the answer (none for fire-and-forget re-joins).
type Queued = (ChatRequest, Option<Reply>);

type Pending = Arc<Mutex<HashMap<u64, Reply>>>;

struct Link {
    addr: SocketAddr,
    pid: u32,
    tx: mpsc::Sender<Queued>,
    stop: CancellationToken,
}

struct Inner {
    connector: String,
    token: String,
    deliver: Deliver,
    metrics: Arc<RpcMetrics>,
    links: Mutex<HashMap<String, Link>>,
    /// session → member, for every session that entered a room.
    members: Mutex<HashMap<u64, Member>>,
    /// The live chat servers, in membership order.
    chats: Mutex<Vec<String>>,
    shutdown: CancellationToken,
}

#[derive(Clone)]
pub struct ChatClient {
    inner: Arc<Inner>,
}

impl ChatClient {
    pub fn start(
        connector: String,
        token: String,
        deliver: Deliver,
        metrics: Arc<RpcMetrics>,
        mut membership: watch::Receiver<Arc<Membership>>,
        shutdown: CancellationToken,
    ) -> ChatClient {
        let inner = Arc::new(Inner {
            connector,
            token,
            deliver,
            metrics,
            links: Mutex::new(HashMap::new()),
            members: Mutex::new(HashMap::new()),
            chats: Mutex::new(Vec::new()),
            shutdown: shutdown.clone(),
        });
        let client = ChatClient { inner };
        let c = client.clone();
        tokio::spawn(async move {
            loop {
                let m = membership.borrow_and_update().clone();
                c.follow(&m);
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    r = membership.changed() => if r.is_err() { return },
                }
            }
        });
        client
    }

    fn owner(&self, rid: &str) -> Option<String> {
        let chats = self.inner.chats.lock().ok()?;
        route::rendezvous(rid, chats.iter().map(String::as_str)).map(String::from)
    }

    /// Sends a request to the chat server that owns `rid` and waits for the answer.
    async fn call(&self, rid: &str, req: ChatRequest) -> Result<ChatReply, RpcError> {
        let started = Instant::now();
        self.inner.metrics.requests.fetch_add(1, Ordering::Relaxed);
        let r = self.call_inner(rid, req).await;
        match &r {
            Ok(_) => self.inner.metrics.observe(started.elapsed()),
            Err(_) => {
                self.inner.metrics.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        r
    }

    async fn call_inner(&self, rid: &str, req: ChatRequest) -> Result<ChatReply, RpcError> {
        let owner = self.owner(rid).ok_or(RpcError::NoChatServer)?;
        let (tx, rx) = oneshot::channel();
        let queue = {
            let links = self.inner.links.lock().map_err(|_| RpcError::NoChatServer)?;
            links.get(&owner).map(|l| l.tx.clone()).ok_or(RpcError::NoChatServer)?
        };
        queue.try_send((req, Some(tx))).map_err(|_| RpcError::Unavailable(owner.clone()))?;
        match tokio::time::timeout(REQUEST_TIMEOUT, rx).await {
            Ok(Ok(r)) => Ok(r?),
            Ok(Err(_)) => Err(RpcError::Unavailable(owner)),
            Err(_) => Err(RpcError::Timeout(owner)),
        }
    }

    /// Enters a room; the user names in it on success.
    pub async fn join(&self, member: Member) -> Result<Vec<String>, RpcError> {
        let rid = member.rid.clone();
        let session = member.session;
        if let Ok(mut m) = self.inner.members.lock() {
            m.insert(session, member.clone());
        }
        match self.call(&rid, ChatRequest::Join { member }).await {
            Ok(ChatReply::Users { users }) => Ok(users),
            Ok(ChatReply::Done) => Ok(Vec::new()),
            Err(e) => {
                if let Ok(mut m) = self.inner.members.lock() {
                    m.remove(&session);
                }
                Err(e)
            }
        }
    }

    /// Leaves whatever room the session is in (on close, kick or heartbeat timeout).
    pub async fn leave(&self, session: u64) {
        let member = self.inner.members.lock().ok().and_then(|mut m| m.remove(&session));
        if let Some(member) = member {
            let rid = member.rid.clone();
            if let Err(e) = self.call(&rid, ChatRequest::Leave { member }).await {
                tracing::warn!("leave of session {session} from `{rid}` not delivered: {e}");
            }
        }
    }

    /// `chat.chatHandler.send` for the room of `session`.
    pub async fn send(&self, session: u64, target: String, content: serde_json::Value) -> Result<(), RpcError> {
        let member = self.inner.members.lock().ok().and_then(|m| m.get(&session).cloned());
        let member = member.ok_or_else(|| ChatError::Other { msg: "enter a room first".into() })?;
        let req = ChatRequest::Send { rid: member.rid.clone(), from: member.username, target, content };
        self.call(&member.rid, req).await.map(|_| ())
    }

    /// Members whose rooms `chat` owns, given the live chat servers.
    fn members_owned_by(&self, chat: &str, chats: &[String]) -> Vec<Member> {
        let Ok(members) = self.inner.members.lock() else { return Vec::new() };
        members
            .values()
            .filter(|m| route::rendezvous(&m.rid, chats.iter().map(String::as_str)) == Some(chat))
            .cloned()
            .collect()
    }

    /// Applies a membership: links follow the live chat servers; moved rooms are re-joined.
    fn follow(&self, m: &Membership) {
        let live: Vec<(String, SocketAddr, u32)> =
            m.of_type(ServerType::Chat).filter_map(|s| Some((s.id.clone(), s.addrs.rpc?, s.pid))).collect();
        let new_chats: Vec<String> = live.iter().map(|(id, ..)| id.clone()).collect();
        let old_chats = match self.inner.chats.lock() {
            Ok(mut c) => std::mem::replace(&mut *c, new_chats.clone()),
            Err(_) => return,
        };
        let Ok(mut links) = self.inner.links.lock() else { return };
        links.retain(|id, l| {
            let keep = live.iter().any(|(i, a, p)| i == id && *a == l.addr && *p == l.pid);
            if !keep {
                l.stop.cancel();
            }
            keep
        });
        for (id, addr, pid) in &live {
            if !links.contains_key(id) {
                links.insert(id.clone(), self.spawn_link(id.clone(), *addr, *pid));
            }
        }
        drop(links);
        if old_chats == new_chats {
            return;
        }
        // Rooms whose owner changed, on links that stayed up, are re-joined on their new owner now;
        // new and restarted links re-join their share when they connect.
        let Ok(links) = self.inner.links.lock() else { return };
        let mut moved: HashMap<String, Vec<Member>> = HashMap::new();
        if let Ok(members) = self.inner.members.lock() {
            for m in members.values() {
                let was = route::rendezvous(&m.rid, old_chats.iter().map(String::as_str));
                let now = route::rendezvous(&m.rid, new_chats.iter().map(String::as_str));
                if let (Some(now), true) = (now, was != now) {
                    moved.entry(now.to_string()).or_default().push(m.clone());
                }
            }
        }
        for (chat, members) in moved {
            if let Some(l) = links.get(&chat) {
                tracing::info!("{} members' rooms moved to `{chat}`: re-joining them there", members.len());
                let _ = l.tx.try_send((ChatRequest::Rejoin { members }, None));
            }
        }
    }

    fn spawn_link(&self, chat: String, addr: SocketAddr, pid: u32) -> Link {
        let (tx, rx) = mpsc::channel(QUEUE);
        let stop = self.inner.shutdown.child_token();
        let c = self.clone();
        let s = stop.clone();
        tokio::spawn(async move { c.run_link(chat, addr, rx, s).await });
        Link { addr, pid, tx, stop }
    }

    async fn run_link(self, chat: String, addr: SocketAddr, mut rx: mpsc::Receiver<Queued>, stop: CancellationToken) {
        let mut backoff = Duration::from_millis(50);
        loop {
            let result = tokio::select! {
                _ = stop.cancelled() => return,
                r = self.connect_and_serve(&chat, addr, &mut rx) => r,
            };
            if let Err(e) = result {
                tracing::warn!("rpc link to `{chat}` at {addr}: {e}; reconnecting in {backoff:?}");
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    async fn connect_and_serve(
        &self,
        chat: &str,
        addr: SocketAddr,
        rx: &mut mpsc::Receiver<Queued>,
    ) -> anyhow::Result<()> {
        let stream = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)).await??;
        stream.set_nodelay(true).ok();
        let codec = LengthDelimitedCodec::builder().max_frame_length(cluster::MAX_FRAME).new_codec();
        let (mut sink, mut stream) = Framed::new(stream, codec).split();
        let hello = ToChat::Hello { connector: self.inner.connector.clone(), token: self.inner.token.clone() };
        sink.send(cluster::encode_msg(&hello)).await?;
        // Everything this chat server owns is re-joined before any new request reaches it.
        let chats = self.inner.chats.lock().map(|c| c.clone()).unwrap_or_default();
        let members = self.members_owned_by(chat, &chats);
        let pending: Pending = Arc::new(Mutex::new(HashMap::new()));
        let mut next_id = 1u64;
        if !members.is_empty() {
            tracing::info!("re-joining {} members on `{chat}`", members.len());
            let req = ToChat::Request { id: 0, req: ChatRequest::Rejoin { members } };
            sink.send(cluster::encode_msg(&req)).await?;
        }
        tracing::info!("rpc link to `{chat}` at {addr} up");
        let deliver = self.inner.deliver.clone();
        let metrics = self.inner.metrics.clone();
        let reader_pending = pending.clone();
        let reader = async move {
            while let Some(frame) = stream.next().await {
                match cluster::decode::<FromChat>(frame?.freeze())? {
                    cluster::Frame::Deliver { sessions, payload } => {
                        metrics.deliveries_in.fetch_add(sessions.len() as u64, Ordering::Relaxed);
                        deliver(&sessions, payload);
                    }
                    cluster::Frame::Msg(FromChat::Response { id, result }) => {
                        let waiter = reader_pending.lock().ok().and_then(|mut p| p.remove(&id));
                        if let Some(w) = waiter {
                            let _ = w.send(result);
                        }
                    }
                    cluster::Frame::Msg(FromChat::Welcome { .. }) => {}
                }
            }
            anyhow::bail!("closed by the chat server")
        };
        let writer = async {
            while let Some((req, reply)) = rx.recv().await {
                let id = next_id;
                next_id += 1;
                if let Some(reply) = reply {
                    if let Ok(mut p) = pending.lock() {
                        if p.len() >= MAX_PENDING {
                            let _ = reply.send(Err(ChatError::Other { msg: "too many requests in flight".into() }));
                            continue;
                        }
                        p.insert(id, reply);
                    }
                }
                sink.feed(cluster::encode_msg(&ToChat::Request { id, req })).await?;
                while let Ok((req, reply)) = rx.try_recv() {
                    let id = next_id;
                    next_id += 1;
                    if let (Some(reply), Ok(mut p)) = (reply, pending.lock()) {
                        p.insert(id, reply);
                    }
                    sink.feed(cluster::encode_msg(&ToChat::Request { id, req })).await?;
                }
                sink.flush().await?;
            }
            anyhow::Ok(())
        };
        let r = tokio::select! { r = reader => r, r = writer => r };
        // Whoever waits on this link gets an error now rather than a timeout later.
        if let Ok(mut p) = pending.lock() {
            p.clear();
        }
        r
    }
}
