//! One connector→chat-server link: a task that connects (with backoff), says hello, re-joins the members
//! whose rooms that chat server owns, then writes queued requests and reads answers and deliveries.
//!
//! Requests reach the task on a bounded queue ([`QUEUE`]); each one waiting for its answer is held in
//! [`Pending`] (at most [`MAX_PENDING`], inserted in one place). Deliveries go straight to the sessions
//! through the client's `deliver` closure. When the link breaks, everyone waiting on it gets an error at
//! once; the task ends when its `stop` token (a child of the shutdown token) is cancelled.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use pomelo_proto::cluster::{self, ChatError, ChatReply, ChatRequest, FromChat, Member, ToChat};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{Framed, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;

use super::rpc::{lock, ChatClient};

/// Requests queued for one chat server.
const QUEUE: usize = 8 * 1024;
/// Requests awaiting an answer on one link.
const MAX_PENDING: usize = 64 * 1024;

/// Where a request's answer goes.
pub(crate) type Reply = oneshot::Sender<Result<ChatReply, ChatError>>;

/// What the link task is asked to send.
pub(crate) enum Queued {
    /// A request whose answer someone awaits.
    Request(ChatRequest, Reply),
    /// Members to re-join on this chat server (no answer awaited).
    Rejoin(Vec<Member>),
}

/// The link as the client's map holds it.
pub(crate) struct Link {
    pub(crate) addr: SocketAddr,
    pub(crate) pid: u32,
    pub(crate) tx: mpsc::Sender<Queued>,
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

    fn take(&self, id: u64) -> Option<Reply> {
        lock(&self.waiting).remove(&id)
    }

    /// Whoever waits on this connection gets an error now rather than a timeout later.
    fn fail_all(&self) {
        lock(&self.waiting).clear();
    }
}

pub(crate) fn spawn(client: ChatClient, chat: String, addr: SocketAddr, pid: u32, stop: CancellationToken) -> Link {
    let (tx, rx) = mpsc::channel(QUEUE);
    let s = stop.clone();
    tokio::spawn(async move { run(client, chat, addr, rx, s).await });
    Link { addr, pid, tx, stop }
}

async fn run(
    client: ChatClient,
    chat: String,
    addr: SocketAddr,
    mut rx: mpsc::Receiver<Queued>,
    stop: CancellationToken,
) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            r = connect_and_serve(&client, &chat, addr, &mut rx) => r,
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
    client: &ChatClient,
    chat: &str,
    addr: SocketAddr,
    rx: &mut mpsc::Receiver<Queued>,
) -> anyhow::Result<()> {
    let inner = &client.inner;
    let stream = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)).await??;
    stream.set_nodelay(true).ok();
    let codec = LengthDelimitedCodec::builder().max_frame_length(cluster::MAX_FRAME).new_codec();
    let (mut sink, mut stream) = Framed::new(stream, codec).split();
    let hello = ToChat::Hello { connector: inner.connector.clone(), token: inner.token.clone() };
    sink.send(cluster::encode_msg(&hello)).await?;
    // Everything this chat server owns is re-joined before any new request reaches it.
    let members = client.members_owned_by(chat);
    let pending = Pending::default();
    if !members.is_empty() {
        tracing::info!("re-joining {} members on `{chat}`", members.len());
        let req = ToChat::Request { id: 0, req: ChatRequest::Rejoin { members } };
        sink.send(cluster::encode_msg(&req)).await?;
    }
    tracing::info!("rpc link to `{chat}` at {addr} up");
    let deliver = inner.deliver.clone();
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
                cluster::Frame::Msg(FromChat::Welcome { .. }) => {}
            }
        }
        anyhow::bail!("closed by the chat server")
    };
    let writer = async {
        while let Some(first) = rx.recv().await {
            let mut next = Some(first);
            // Write what else is queued in the same syscall.
            while let Some(q) = next.take().or_else(|| rx.try_recv().ok()) {
                let (id, req) = match q {
                    Queued::Request(req, reply) => match pending.insert(reply) {
                        Some(id) => (id, req),
                        None => continue,
                    },
                    Queued::Rejoin(members) => (pending.next_id(), ChatRequest::Rejoin { members }),
                };
                sink.feed(cluster::encode_msg(&ToChat::Request { id, req })).await?;
            }
            sink.flush().await?;
        }
        anyhow::Ok(())
    };
    let r = tokio::select! { r = reader => r, r = writer => r };
    pending.fail_all();
    r
}
