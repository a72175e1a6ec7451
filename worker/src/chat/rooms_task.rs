//! The rooms task of a chat server: the one owner of its [`RoomTable`].
//!
//! It reads the inbox the link tasks fill, answers on each link's bounded outbox and sends deliveries as
//! frames to the connectors that hold the recipients. It handles every request already queued (up to
//! [`DRAIN`]) before it sends their deliveries, merged per room and connector ([`Batches`]), and a busy
//! room sends each connector at most one frame per [`FLUSH_DELAY`] ([`Pacer`]): a connector then writes
//! each session once for many messages, while a quiet room's message goes at once. A connector whose
//! outbox is full loses that frame (counted), never the server.
//!
//! The task also follows the membership: rooms now owned by another chat server are forgotten, a join
//! for a room this server does not own is answered `NotOwner`, and a connector's members leave
//! (`onLeave` to the rest) only when [`Presence`] says it is gone (its link and the membership, each
//! with a grace), never on one membership alone. A connector's `Rejoin` replaces its members in the
//! rooms this server owns.
//!
//! It owns the rooms' [`History`] too: a send is stored (numbered with the room's epoch and offset)
//! before it is answered and pushed, and a join with `since` queues the member's missed messages before
//! anything live, or answers `recovered: false` when the history does not cover them. It ends when the shutdown token is cancelled or every link task is gone.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use pomelo_proto::cluster::{self, ChatReply, ChatRequest, FromChat, Since};
use pomelo_proto::control::{Membership, ServerType};
use pomelo_proto::route;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::batch::{Batch, Batches, Pacer};
use super::history::{History, HistoryLimits, MemoryHistory, Query, Stored};
use super::outbox::Outbox;
use super::presence::Presence;
use super::room_table::{Delivery, Limits, OnChat, RoomTable};
use super::server::ChatMetrics;

/// Requests handled at most before their deliveries are sent.
pub const DRAIN: usize = 256;
/// Most messages, and bytes of pushes, a join recovers (a connector queues at most 1024 packages and
/// 1 MiB per session); past either it answers `recovered: false`.
pub const MAX_REPLAY: usize = 500;
pub const MAX_REPLAY_BYTES: usize = 512 * 1024;
/// Most messages one `chat.chatHandler.history` answer carries.
pub const MAX_PAGE: usize = 200;
/// Deliveries waiting to be merged are sent at once past this many payload bytes.
const MAX_PENDING_BYTES: usize = 1 << 20;

/// What link tasks tell the rooms task.
pub(super) enum Inbox {
    Link { connector: Arc<str>, conn: u64, outbox: Outbox },
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

/// What the rooms task keeps within: rooms and members, and each room's history.
pub(super) struct Bounds {
    pub rooms: Limits,
    pub history: HistoryLimits,
}

pub(super) async fn rooms_task(
    id: String,
    rooms: RoomTable,
    mut membership: watch::Receiver<Arc<Membership>>,
    metrics: Arc<ChatMetrics>,
    mut inbox: mpsc::Receiver<Inbox>,
    stop: CancellationToken,
    bounds: Bounds,
) {
    let mut st = State {
        me: id,
        rooms: rooms.with_limits(bounds.rooms),
        history: Box::new(MemoryHistory::new(bounds.history)),
        links: HashMap::new(),
        presence: Presence::default(),
        chats: None,
        metrics,
    };
    let mut pacer = Pacer::new(flush_delay());
    let mut pending = Batches::default();
    let flush_at = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(flush_at);
    let check_at = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(check_at);
    loop {
        let wake = tokio::select! {
            _ = stop.cancelled() => return,
            changed = membership.changed() => {
                if changed.is_err() {
                    return;
                }
                let m = membership.borrow_and_update().clone();
                st.follow_membership(&m);
                None
            }
            msg = inbox.recv() => {
                let Some(msg) = msg else { return };
                st.on_inbox(msg, &mut pending);
                for _ in 1..DRAIN {
                    let Ok(msg) = inbox.try_recv() else { break };
                    st.on_inbox(msg, &mut pending);
                }
                if pending.bytes() >= MAX_PENDING_BYTES {
                    send_batches(&st.links, pending.take(), &st.metrics);
                }
                pace(&mut pacer, &mut pending, &st.links, &st.metrics)
            }
            _ = &mut flush_at, if !pending.is_empty() => pace(&mut pacer, &mut pending, &st.links, &st.metrics),
            _ = &mut check_at, if st.presence.next_deadline().is_some() => None,
        };
        let leaves = st.drop_gone_connectors();
        if !leaves.is_empty() {
            // What was waiting goes first, then the leaves: both at once, in that order.
            leaves.into_iter().for_each(|d| pending.add(d));
            send_batches(&st.links, pending.take(), &st.metrics);
        }
        if let Some(t) = wake {
            flush_at.as_mut().reset(t);
        }
        if let Some(t) = st.presence.next_deadline() {
            check_at.as_mut().reset(t);
        }
        st.metrics.rooms.store(st.rooms.room_count() as u64, Ordering::Relaxed);
        st.metrics.members.store(st.rooms.member_count() as u64, Ordering::Relaxed);
    }
}

type Links = HashMap<Arc<str>, (u64, Outbox)>;

/// What the rooms task owns.
struct State {
    me: String,
    rooms: RoomTable,
    history: Box<dyn History>,
    links: Links,
    presence: Presence,
    /// The chat servers of the last membership this server is in (`None` before: it cannot tell which
    /// rooms are its own, so it takes every room it is sent).
    chats: Option<Vec<String>>,
    metrics: Arc<ChatMetrics>,
}

impl State {
    fn owns(&self, rid: &str) -> bool {
        self.chats.as_ref().is_none_or(|c| route::owner(rid, c) == Some(self.me.as_str()))
    }

    fn on_inbox(&mut self, msg: Inbox, batches: &mut Batches) {
        match msg {
            Inbox::Link { connector, conn, outbox } => {
                self.presence.linked(&connector);
                self.links.insert(connector, (conn, outbox));
            }
            Inbox::Unlink { connector, conn } => {
                if self.links.get(&connector).is_some_and(|(c, _)| *c == conn) {
                    self.links.remove(&connector);
                    self.presence.unlinked(&connector, Instant::now());
                }
            }
            Inbox::Request { connector, conn, id: req_id, req } => {
                self.metrics.requests.fetch_add(1, Ordering::Relaxed);
                let (result, deliveries) = self.handle(&connector, req);
                if result.is_err() {
                    self.metrics.rpc_errors.fetch_add(1, Ordering::Relaxed);
                }
                if let Some((c, out)) = self.links.get(&connector) {
                    if *c == conn {
                        let frame = cluster::encode_msg(&FromChat::Response { id: req_id, result });
                        if out.try_send(frame).is_err() {
                            self.metrics.frames_dropped.fetch_add(1, Ordering::Relaxed);
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
        &mut self,
        connector: &Arc<str>,
        req: ChatRequest,
    ) -> (Result<ChatReply, cluster::ChatError>, Vec<Delivery>) {
        match req {
            ChatRequest::Join { member, .. } if !self.owns(&member.rid) => {
                (Err(cluster::ChatError::NotOwner { rid: member.rid }), Vec::new())
            }
            ChatRequest::Join { member, since } => self.join(connector, member, since),
            ChatRequest::Leave { member } => (Ok(ChatReply::Done), self.rooms.leave(connector, &member)),
            ChatRequest::Send { rid, .. } if !self.owns(&rid) => {
                (Err(cluster::ChatError::NotOwner { rid }), Vec::new())
            }
            ChatRequest::Send { rid, from, target, content } => {
                self.metrics.messages_in.fetch_add(1, Ordering::Relaxed);
                if !self.rooms.has_room(&rid) {
                    return (Err(cluster::ChatError::Other { msg: format!("no room `{rid}`") }), Vec::new());
                }
                // A private message to no one is refused, not stored and answered `{}` as if delivered.
                if target != "*" && !self.rooms.has_user(&rid, &target) {
                    let msg = format!("no user {target:?} in room {rid:?}");
                    return (Err(cluster::ChatError::Other { msg }), Vec::new());
                }
                // Stored first: an answered send is in the history.
                let at = match self.history.append(&rid, &from, &target, &content, Instant::now()) {
                    Ok(at) => at,
                    Err(e) => return (Err(cluster::ChatError::Other { msg: e.to_string() }), Vec::new()),
                };
                let chat = OnChat { msg: &content, from: &from, target: &target, epoch: &at.epoch, offset: at.offset };
                match self.rooms.send(&rid, chat) {
                    Ok(d) => (Ok(ChatReply::Done), d),
                    Err(e) => (Err(e), Vec::new()),
                }
            }
            ChatRequest::History { rid, .. } if !self.owns(&rid) => {
                (Err(cluster::ChatError::NotOwner { rid }), Vec::new())
            }
            ChatRequest::History { rid, username, since, before, limit } => {
                let now = Instant::now();
                let at = self.history.position(&rid, now);
                let limit = (limit as usize).clamp(1, MAX_PAGE);
                let (recovered, got) = match since {
                    Some(s) => match self.history.read(&rid, &Query::Since(s), now) {
                        Some(m) => (true, m),
                        None => (false, Vec::new()),
                    },
                    None => (true, self.history.read(&rid, &Query::Before { before, limit }, now).unwrap_or_default()),
                };
                let messages = got
                    .iter()
                    .filter(|m| m.visible_to(&username))
                    .take(limit)
                    .map(|m| serde_json::json!({"msg": m.msg, "from": m.from, "target": m.target, "epoch": at.epoch, "offset": m.offset}))
                    .collect();
                (Ok(ChatReply::History { epoch: at.epoch, offset: at.offset, recovered, messages }), Vec::new())
            }
            ChatRequest::Rejoin { members, .. } => {
                let n = members.len();
                let chats = self.chats.clone();
                let me = self.me.clone();
                let owns = |rid: &str| chats.as_ref().is_none_or(|c| route::owner(rid, c) == Some(me.as_str()));
                let d = self.rooms.rejoin(connector, members, owns);
                tracing::debug!("{connector:?} re-joined {n} members ({} ghosts left)", d.len());
                (Ok(ChatReply::Done), d)
            }
        }
    }

    /// A join: the user list, where the room's history is, and with `since` the member's missed
    /// messages (queued before anything live reaches it) or `recovered: false`.
    fn join(
        &mut self,
        connector: &Arc<str>,
        member: cluster::Member,
        since: Option<Since>,
    ) -> (Result<ChatReply, cluster::ChatError>, Vec<Delivery>) {
        let (rid, uid, username) = (member.rid.clone(), member.uid.clone(), member.username.clone());
        let (users, mut out) = match self.rooms.join(connector, member) {
            Ok(r) => r,
            Err(e) => return (Err(e), Vec::new()),
        };
        let now = Instant::now();
        let at = self.history.position(&rid, now);
        let recovered = since.map(|s| {
            let Some(missed) = self.history.read(&rid, &Query::Since(s), now) else { return false };
            let Some((room, session)) = self.rooms.session_of(connector, &rid, &uid) else { return false };
            let chats = missed.iter().filter(|m| m.visible_to(&username)).map(|m: &Stored| OnChat {
                msg: &m.msg,
                from: &m.from,
                target: &m.target,
                epoch: &at.epoch,
                offset: m.offset,
            });
            let replay = self.rooms.replay(connector, &room, session, chats);
            // More than its queue holds would get the client kicked, and again on every retry: it is told
            // `recovered: false` and may page through `history` instead.
            if replay.len() > MAX_REPLAY || replay.iter().map(|d| d.payload.len()).sum::<usize>() > MAX_REPLAY_BYTES {
                return false;
            }
            out.extend(replay);
            true
        });
        (Ok(ChatReply::Users { users, epoch: at.epoch, offset: at.offset, recovered }), out)
    }

    /// Forgets rooms that moved to another chat server and tells [`Presence`] who is listed.
    fn follow_membership(&mut self, m: &Membership) {
        let chats: Vec<String> = route::chat_servers(m).map(|s| s.id.clone()).collect();
        // Until this server is in the membership it cannot tell which rooms are its own.
        if !chats.contains(&self.me) {
            return;
        }
        let connectors: Vec<&str> = m.of_type(ServerType::Connector).map(|s| s.id.as_str()).collect();
        self.presence.membership(&connectors, &self.rooms.connectors(), Instant::now());
        let me = self.me.clone();
        let moved = self.rooms.retain(|rid| route::owner(rid, &chats) == Some(me.as_str()));
        self.history.retain(&|rid| route::owner(rid, &chats) == Some(me.as_str()));
        if moved > 0 {
            tracing::info!("{moved} rooms moved to other chat servers");
        }
        // Rooms may have come here whose members a connector sent before this server owned them.
        if self.chats.as_ref().is_some_and(|old| *old != chats) {
            let ask = cluster::encode_msg(&FromChat::Rejoin { chats: chats.clone() });
            for (_, outbox) in self.links.values() {
                outbox.ask(ask.clone());
            }
        }
        self.chats = Some(chats);
    }

    /// Members of connectors that are gone leave their rooms; the `onLeave`s to send.
    fn drop_gone_connectors(&mut self) -> Vec<Delivery> {
        let mut out = Vec::new();
        for c in self.presence.gone(Instant::now()) {
            tracing::info!("connector {c:?} is gone (no link, not in the membership): its members leave their rooms");
            out.extend(self.rooms.drop_connector(&c));
        }
        out
    }
}

/// Sends what may go now; when the rest may go.
fn pace(pacer: &mut Pacer, pending: &mut Batches, links: &Links, metrics: &ChatMetrics) -> Option<Instant> {
    if pending.is_empty() {
        return None;
    }
    let (ready, next) = pacer.ready(pending, Instant::now());
    send_batches(links, ready, metrics);
    next
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
            out.lost(&b.sessions);
            tracing::warn!("connector {:?} is not keeping up: {n} deliveries were dropped", b.connector);
        }
    }
}
