//! The rooms task of a chat server: the one owner of its [`RoomTable`].
//!
//! It reads the inbox the link tasks fill, answers on each link's bounded outbox and sends deliveries as
//! frames to the connectors that hold the recipients. It handles every request already queued (up to
//! [`DRAIN`]) before it sends their deliveries, merged per room and connector ([`Batches`]), and a busy
//! room sends each connector at most one frame per [`FLUSH_DELAY`] ([`Pacer`]): a connector then writes
//! each session once for many messages, while a quiet room's message goes at once. A connector whose
//! outbox is full loses that frame (counted), never the server. The task also follows the membership:
//! a connector that leaves it loses its members (`onLeave` to the rest) and rooms now owned by another
//! chat server are forgotten. It ends when the shutdown token is cancelled or every link task is gone.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use pomelo_proto::cluster::{self, ChatReply, ChatRequest, FromChat};
use pomelo_proto::control::{Membership, ServerType};
use pomelo_proto::route;
use pomelo_proto::wire::Dictionary;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::batch::{Batch, Batches, Pacer};
use super::room_table::{Delivery, RoomTable};
use super::server::ChatMetrics;

/// Requests handled at most before their deliveries are sent.
pub const DRAIN: usize = 256;
/// Deliveries waiting to be merged are sent at once past this many payload bytes.
const MAX_PENDING_BYTES: usize = 1 << 20;

/// What link tasks tell the rooms task.
pub(super) enum Inbox {
    Link { connector: Arc<str>, conn: u64, outbox: mpsc::Sender<Bytes> },
    Unlink { connector: Arc<str>, conn: u64 },
    Request { connector: Arc<str>, conn: u64, id: u64, req: ChatRequest },
}

/// A room sends a connector at most one frame per this long (see [`Pacer`]); `POMELO_CHAT_FLUSH_US` in a
/// chat server's environment overrides it (microseconds, 0 = send at once, at most 100 ms). A merged
/// frame costs the connector one write per session for many messages; the wait is the most it adds to a
/// message's latency, and only in a room that sent something less than this long ago.
pub const FLUSH_DELAY: Duration = Duration::from_millis(2);

fn flush_delay() -> Duration {
    let Ok(v) = std::env::var("POMELO_CHAT_FLUSH_US") else { return FLUSH_DELAY };
    match v.trim().parse::<u64>() {
        Ok(us) if us <= 100_000 => Duration::from_micros(us),
        Ok(_) => {
            tracing::warn!("POMELO_CHAT_FLUSH_US={v} is over 100000 (100 ms); using 100 ms");
            Duration::from_millis(100)
        }
        Err(_) => {
            tracing::warn!("POMELO_CHAT_FLUSH_US={v:?} is not a whole number of microseconds; using {FLUSH_DELAY:?}");
            FLUSH_DELAY
        }
    }
}

pub(super) async fn rooms_task(
    id: String,
    dict: Option<Arc<Dictionary>>,
    mut membership: watch::Receiver<Arc<Membership>>,
    metrics: Arc<ChatMetrics>,
    mut inbox: mpsc::Receiver<Inbox>,
    stop: CancellationToken,
) {
    let mut rooms = RoomTable::new(dict);
    let mut links: Links = HashMap::new();
    let mut pacer = Pacer::new(flush_delay());
    let mut pending = Batches::default();
    let flush_at = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(flush_at);
    loop {
        let wake = tokio::select! {
            _ = stop.cancelled() => return,
            changed = membership.changed() => {
                if changed.is_err() {
                    return;
                }
                let m = membership.borrow_and_update().clone();
                let deliveries = follow_membership(&id, &m, &mut rooms);
                // What was waiting goes first, then the leaves: both at once, in that order.
                deliveries.into_iter().for_each(|d| pending.add(d));
                send_batches(&links, pending.take(), &metrics);
                None
            }
            msg = inbox.recv() => {
                let Some(msg) = msg else { return };
                on_inbox(msg, &mut rooms, &mut links, &metrics, &mut pending);
                for _ in 1..DRAIN {
                    let Ok(msg) = inbox.try_recv() else { break };
                    on_inbox(msg, &mut rooms, &mut links, &metrics, &mut pending);
                }
                if pending.bytes() >= MAX_PENDING_BYTES {
                    send_batches(&links, pending.take(), &metrics);
                }
                pace(&mut pacer, &mut pending, &links, &metrics)
            }
            _ = &mut flush_at, if !pending.is_empty() => pace(&mut pacer, &mut pending, &links, &metrics),
        };
        if let Some(t) = wake {
            flush_at.as_mut().reset(t);
        }
        metrics.rooms.store(rooms.room_count() as u64, Ordering::Relaxed);
        metrics.members.store(rooms.member_count() as u64, Ordering::Relaxed);
    }
}

type Links = HashMap<Arc<str>, (u64, mpsc::Sender<Bytes>)>;

/// Sends what may go now; when the rest may go.
fn pace(
    pacer: &mut Pacer,
    pending: &mut Batches,
    links: &Links,
    metrics: &ChatMetrics,
) -> Option<tokio::time::Instant> {
    if pending.is_empty() {
        return None;
    }
    let (ready, next) = pacer.ready(pending, tokio::time::Instant::now());
    send_batches(links, ready, metrics);
    next
}

fn on_inbox(msg: Inbox, rooms: &mut RoomTable, links: &mut Links, metrics: &ChatMetrics, batches: &mut Batches) {
    match msg {
        Inbox::Link { connector, conn, outbox } => {
            links.insert(connector, (conn, outbox));
        }
        Inbox::Unlink { connector, conn } => {
            if links.get(&connector).is_some_and(|(c, _)| *c == conn) {
                links.remove(&connector);
            }
        }
        Inbox::Request { connector, conn, id: req_id, req } => {
            metrics.requests.fetch_add(1, Ordering::Relaxed);
            let (result, deliveries) = handle(rooms, &connector, req, metrics);
            if result.is_err() {
                metrics.rpc_errors.fetch_add(1, Ordering::Relaxed);
            }
            if let Some((c, out)) = links.get(&connector) {
                if *c == conn {
                    let frame = cluster::encode_msg(&FromChat::Response { id: req_id, result });
                    if out.try_send(frame).is_err() {
                        metrics.frames_dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            for d in deliveries {
                batches.add(d);
            }
        }
    }
}

fn handle(
    rooms: &mut RoomTable,
    connector: &Arc<str>,
    req: ChatRequest,
    metrics: &ChatMetrics,
) -> (Result<ChatReply, cluster::ChatError>, Vec<Delivery>) {
    match req {
        ChatRequest::Join { member } => match rooms.join(connector, member) {
            Ok((users, d)) => (Ok(ChatReply::Users { users }), d),
            Err(e) => (Err(e), Vec::new()),
        },
        ChatRequest::Leave { member } => (Ok(ChatReply::Done), rooms.leave(connector, &member)),
        ChatRequest::Send { rid, from, target, content } => {
            metrics.messages_in.fetch_add(1, Ordering::Relaxed);
            match rooms.send(&rid, &from, &target, &content) {
                Ok(d) => (Ok(ChatReply::Done), d),
                Err(e) => (Err(e), Vec::new()),
            }
        }
        ChatRequest::Rejoin { members } => {
            rooms.rejoin(connector, members);
            (Ok(ChatReply::Done), Vec::new())
        }
    }
}

/// Drops members of connectors that left the membership and rooms that moved to another chat server.
fn follow_membership(me: &str, m: &Membership, rooms: &mut RoomTable) -> Vec<Delivery> {
    let chats: Vec<&str> = route::chat_servers(m).map(|s| s.id.as_str()).collect();
    let connectors: Vec<&str> = m.of_type(ServerType::Connector).map(|s| s.id.as_str()).collect();
    let mut out = Vec::new();
    // Until this server is in the membership it cannot tell which rooms are its own.
    if !chats.contains(&me) {
        return out;
    }
    for c in rooms.connectors() {
        if !connectors.contains(&c.as_ref()) {
            tracing::info!("connector `{c}` left the cluster: its members leave their rooms");
            out.extend(rooms.drop_connector(&c));
        }
    }
    let moved = rooms.retain(|rid| route::owner(rid, &chats) == Some(me));
    if moved > 0 {
        tracing::info!("{moved} rooms moved to other chat servers");
    }
    out
}

fn send_batches(links: &Links, batches: Vec<Batch>, metrics: &ChatMetrics) {
    for b in batches {
        let Some((_, out)) = links.get(&b.connector) else {
            metrics.frames_dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let n = b.deliveries();
        if out.try_send(cluster::encode_deliver_parts(&b.sessions, &b.payloads)).is_ok() {
            metrics.deliveries_out.fetch_add(n, Ordering::Relaxed);
        } else {
            metrics.frames_dropped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("connector `{}` is not keeping up: {n} deliveries were dropped", b.connector);
        }
    }
}
