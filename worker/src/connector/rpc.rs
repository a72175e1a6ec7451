//! A connector's side of cluster RPC: [`ChatClient`], with one link to every live chat server, and the
//! record of which of its sessions is in which room (the only one: the handler asks it).
//!
//! Connectors are the source of truth for membership. A watcher task follows the master's membership:
//! it opens links to new chat servers, closes links to gone ones, reconnects to restarted ones, and on
//! *every* membership it receives (a new master, a new epoch, rooms that moved) asks each link for an
//! authoritative re-join, so whatever drifted (a ghost, a lost join or leave, a moved room) heals.
//! Each link task ([`link`](super::link)) connects with backoff, re-joins the members of the rooms its
//! chat server owns ([`placement`](super::placement)) every time it (re)connects, then carries requests
//! and hands deliveries to the sessions. Requests time out after [`REQUEST_TIMEOUT`]; the caller turns
//! failures into `{"code":500}`. A join that timed out or whose link broke is followed by a leave, so a
//! chat server that handles it late keeps no ghost. Everything stops with the shutdown token.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pomelo_proto::cluster::{ChatError, ChatReply, ChatRequest, Member, Since};
use pomelo_proto::control::Membership;
use pomelo_proto::route;
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::link::{self, lock, Link, Shared};
use super::metrics::RpcMetrics;
use super::placement;

pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

pub use super::link::{Deliver, Lost};

/// What a join answered: the user names, where the room's history is (`None` from a chat server that
/// keeps none), and whether `since` was recovered (`None` without `since`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Joined {
    pub users: Vec<String>,
    pub at: Option<Since>,
    pub recovered: Option<bool>,
    /// Not recovered only because the gap is too large to push: page through `history`.
    pub paged: bool,
}

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

struct Inner {
    shared: Arc<Shared>,
    links: Mutex<HashMap<String, Link>>,
    /// session → member, for every session that entered a room: the one record of a session's room.
    members: Arc<Mutex<HashMap<u64, Member>>>,
    /// The live chat servers, in membership order.
    chats: Arc<Mutex<Vec<String>>>,
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
        lost: Lost,
        metrics: Arc<RpcMetrics>,
        mut membership: watch::Receiver<Arc<Membership>>,
        shutdown: CancellationToken,
    ) -> ChatClient {
        let members: Arc<Mutex<HashMap<u64, Member>>> = Arc::default();
        let chats: Arc<Mutex<Vec<String>>> = Arc::default();
        let (m, c) = (members.clone(), chats.clone());
        let owned = Box::new(move |chat: &str| {
            let chats = lock(&c).clone();
            placement::owned_by(chat, lock(&m).values(), &chats)
        });
        let c = chats.clone();
        let agrees = Box::new(move |theirs: &[String]| *lock(&c) == theirs);
        let shared = Arc::new(Shared { connector, token, deliver, lost, metrics, owned, agrees });
        let inner =
            Arc::new(Inner { shared, links: Mutex::new(HashMap::new()), members, chats, shutdown: shutdown.clone() });
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

    /// Sends a request to the chat server that owns `rid` and waits for the answer.
    async fn call(&self, rid: &str, req: ChatRequest) -> Result<ChatReply, RpcError> {
        let started = Instant::now();
        self.inner.shared.metrics.request();
        let r = self.call_inner(rid, req).await;
        match &r {
            Ok(_) => self.inner.shared.metrics.observe(started.elapsed()),
            Err(_) => self.inner.shared.metrics.error(),
        }
        r
    }

    async fn call_inner(&self, rid: &str, req: ChatRequest) -> Result<ChatReply, RpcError> {
        let owner = {
            let chats = lock(&self.inner.chats);
            placement::owner(rid, chats.iter()).ok_or(RpcError::NoChatServer)?.to_string()
        };
        let (tx, rx) = oneshot::channel();
        let queue = lock(&self.inner.links).get(&owner).map(|l| l.tx.clone()).ok_or(RpcError::NoChatServer)?;
        queue.try_send((req, Some(tx))).map_err(|_| RpcError::Unavailable(owner.clone()))?;
        match tokio::time::timeout(REQUEST_TIMEOUT, rx).await {
            Ok(Ok(r)) => Ok(r?),
            Ok(Err(_)) => Err(RpcError::Unavailable(owner)),
            Err(_) => Err(RpcError::Timeout(owner)),
        }
    }

    /// Enters a room (recovering what came after `since`, if given); the user names in it on success.
    pub async fn join(&self, member: Member, since: Option<Since>) -> Result<Joined, RpcError> {
        let rid = member.rid.clone();
        let session = member.session;
        lock(&self.inner.members).insert(session, member.clone());
        match self.call(&rid, ChatRequest::Join { member, since }).await {
            Ok(ChatReply::Users { users, epoch, offset, recovered, paged }) => {
                let at = (!epoch.is_empty()).then_some(Since { epoch, offset });
                Ok(Joined { users, at, recovered, paged })
            }
            Ok(_) => Ok(Joined::default()),
            Err(e) => {
                if let Some(member) = lock(&self.inner.members).remove(&session) {
                    if matches!(e, RpcError::Timeout(_) | RpcError::Unavailable(_)) {
                        // The chat server may still add it (it was slow, or the answer was lost): take it
                        // back. Should this leave be lost too, the next re-join removes the ghost.
                        self.fire(ChatRequest::Leave { member });
                    }
                }
                Err(e)
            }
        }
    }

    /// Queues a request nobody waits for on the link to the owner of its room, if there is room.
    fn fire(&self, req: ChatRequest) {
        let rid = match &req {
            ChatRequest::Join { member, .. } | ChatRequest::Leave { member } => member.rid.clone(),
            ChatRequest::Send { rid, .. } => rid.clone(),
            ChatRequest::Rejoin { .. } | ChatRequest::History { .. } => return,
        };
        let owner = placement::owner(&rid, lock(&self.inner.chats).iter()).map(String::from);
        let queue = owner.and_then(|o| lock(&self.inner.links).get(&o).map(|l| l.tx.clone()));
        if queue.is_none_or(|q| q.try_send((req, None)).is_err()) {
            tracing::debug!("a compensating leave in {rid:?} could not be queued; the next re-join covers it");
        }
    }

    /// Leaves whatever room the session is in (on close, kick or heartbeat timeout).
    pub async fn leave(&self, session: u64) {
        let member = lock(&self.inner.members).remove(&session);
        if let Some(member) = member {
            let rid = member.rid.clone();
            if let Err(e) = self.call(&rid, ChatRequest::Leave { member }).await {
                tracing::warn!("leave of session {session} from {rid:?} not delivered: {e}");
            }
        }
    }

    /// `chat.chatHandler.send` for the room of `session`.
    pub async fn send(&self, session: u64, target: String, content: serde_json::Value) -> Result<(), RpcError> {
        let member = lock(&self.inner.members).get(&session).cloned();
        let member = member.ok_or_else(|| ChatError::Other { msg: "enter a room first".into() })?;
        let req = ChatRequest::Send { rid: member.rid.clone(), from: member.username, target, content };
        self.call(&member.rid, req).await.map(|_| ())
    }

    /// `chat.chatHandler.history` in the room of `session`: the chat server's answer
    /// ([`ChatReply::History`]).
    pub async fn history(
        &self,
        session: u64,
        since: Option<Since>,
        before: Option<u64>,
        limit: u32,
    ) -> Result<ChatReply, RpcError> {
        let member = lock(&self.inner.members).get(&session).cloned();
        let member = member.ok_or_else(|| ChatError::Other { msg: "enter a room first".into() })?;
        let req = ChatRequest::History { rid: member.rid.clone(), username: member.username, since, before, limit };
        self.call(&member.rid, req).await
    }

    /// Applies a membership: links follow the live chat servers; every link that stayed up re-joins
    /// (new and restarted links re-join when they connect).
    fn follow(&self, m: &Membership) {
        let connector = &self.inner.shared.connector;
        let live: Vec<(String, SocketAddr, u32, Option<String>, String)> = route::chat_servers(m)
            .filter_map(|s| {
                let addr = s.addrs.rpc?;
                Some((s.id.clone(), addr, s.pid, s.link_keys.get(connector).cloned(), tls_name(&s.host, addr)))
            })
            .collect();
        let new_chats: Vec<String> = live.iter().map(|(id, ..)| id.clone()).collect();
        let old_chats = std::mem::replace(&mut *lock(&self.inner.chats), new_chats.clone());
        let mut links = lock(&self.inner.links);
        links.retain(|id, l| {
            let keep = live.iter().any(|(i, a, p, ..)| i == id && *a == l.addr && *p == l.pid);
            if !keep {
                l.stop.cancel();
            }
            keep
        });
        for l in links.values() {
            l.rejoin.notify_one();
        }
        for (id, addr, pid, wrapped, name) in &live {
            if !links.contains_key(id) {
                let stop = self.inner.shutdown.child_token();
                let shared = self.inner.shared.clone();
                let to = link::Peer { chat: id.clone(), addr: *addr, tls_name: name.clone() };
                links.insert(id.clone(), link::spawn(shared, to, *pid, wrapped.clone(), stop));
            }
        }
        if old_chats != new_chats {
            for (chat, members) in placement::moved(lock(&self.inner.members).values(), &old_chats, &new_chats) {
                tracing::info!("{} members' rooms moved to `{chat}`: its re-join takes them there", members.len());
            }
        }
    }
}

/// The name a chat server's certificate is checked against: its `host` (an address, or the DNS name
/// its certificate was issued for), or the address dialled when `host` is an unspecified address.
fn tls_name(host: &str, addr: SocketAddr) -> String {
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) if ip.is_unspecified() => addr.ip().to_string(),
        _ => host.to_string(),
    }
}
