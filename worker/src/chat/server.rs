//! The chat server: the cluster RPC listener and one task per connector link, in front of the rooms
//! task ([`rooms_task`](super::rooms_task)).
//!
//! The accept task spawns a link task per connection. A link task checks the hello (connector id and
//! cluster token), then reads requests and passes them to the rooms task on a bounded channel
//! ([`INBOX`]), and writes what the rooms task puts in its outbox (answers and deliveries; bounded by frames and bytes, see `outbox.rs`). All
//! tasks end when the shutdown token is cancelled; a link's end is reported to the rooms task.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use pomelo_proto::cluster::{self, ChatError, ChatRequest, FromChat, Member, ToChat};
use pomelo_proto::control::{Membership, Stats};
use pomelo_proto::wire::Dictionary;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::outbox::{outbox, OUTBOX_BYTES};
use super::room_table::Limits;
use super::rooms_task::{rooms_task, Inbox};

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
    }
}

pub struct ChatServer {
    pub id: String,
    /// `maxRoomMembers` and `maxRooms`.
    pub limits: Limits,
    pub token: String,
    pub dict: Option<Arc<Dictionary>>,
    pub membership: watch::Receiver<Arc<Membership>>,
    pub metrics: Arc<ChatMetrics>,
    pub shutdown: CancellationToken,
    pub tasks: TaskTracker,
}

impl ChatServer {
    pub fn start(self, listener: TcpListener) {
        let (tx, rx) = mpsc::channel(INBOX);
        let stop = self.shutdown.clone();
        let token: Arc<str> = self.token.clone().into();
        let metrics = self.metrics.clone();
        let tasks = self.tasks.clone();
        let limits = self.limits;
        self.tasks.spawn(rooms_task(self.id, self.dict, self.membership, self.metrics, rx, stop.clone(), limits));
        tasks.clone().spawn(async move {
            let mut next = 0u64;
            let stopping = stop.clone();
            pomelo_proto::link::accept_loop(listener, stop, "rpc", |stream, peer| {
                next += 1;
                let conn = next;
                let (tx, token, metrics, stop) = (tx.clone(), token.clone(), metrics.clone(), stopping.clone());
                tasks.spawn(async move {
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        r = link(stream, conn, tx, token, metrics) => if let Err(e) = r {
                            tracing::info!("rpc link from {peer} closed: {e}");
                        }
                    }
                });
            })
            .await;
        });
    }
}

async fn link(
    stream: TcpStream,
    conn: u64,
    inbox: mpsc::Sender<Inbox>,
    token: Arc<str>,
    metrics: Arc<ChatMetrics>,
) -> anyhow::Result<()> {
    stream.set_nodelay(true).ok();
    let codec = pomelo_proto::link::cluster_codec();
    let (mut sink, mut stream) = Framed::new(stream, codec).split();
    let first = tokio::time::timeout(Duration::from_secs(5), stream.next()).await?;
    let frame = first.ok_or_else(|| anyhow::anyhow!("closed before hello"))??.freeze();
    let connector: Arc<str> = match cluster::decode::<ToChat>(frame)? {
        cluster::Frame::Msg(ToChat::Hello { connector, token: t }) if *t == *token => connector.into(),
        cluster::Frame::Msg(ToChat::Hello { connector, .. }) => {
            anyhow::bail!("{connector:?} sent a wrong cluster token")
        }
        _ => anyhow::bail!("the first frame was not a hello"),
    };
    let (out_tx, mut out_rx) = outbox(OUTBOX, OUTBOX_BYTES);
    out_tx.try_send(cluster::encode_msg(&FromChat::Welcome { chat: String::new() })).ok();
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
