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
use super::history::{History, Query, Stored};
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

/// The pace while a room holds only `onAdd`s for a connector (`POMELO_CHAT_JOIN_US`, at most 100 ms,
/// never below the flush delay): the most a join notice waits, and only in a room that told that
/// connector something less than this long ago.
pub const JOIN_DELAY: Duration = Duration::from_millis(100);

/// `var` from the environment as microseconds, at most 100 ms; `default` when unset or unreadable.
fn delay_from_env(var: &str, default: Duration) -> Duration {
    let Ok(v) = std::env::var(var) else { return default };
    match v.trim().parse::<u64>() {
        Ok(us) if us <= 100_000 => Duration::from_micros(us),
        Ok(_) => {
            tracing::warn!("{var}={v} is over 100000 (100 ms); using 100 ms");
            Duration::from_millis(100)
        }
        Err(_) => {
            tracing::warn!("{var}={v:?} is not a whole number of microseconds; using {default:?}");
            default
        }
    }
}

/// What the rooms task keeps: rooms and members within their limits, and each room's history.
pub(super) struct Keeps {
    pub rooms: Limits,
    pub history: History,
}

pub(super) async fn rooms_task(
    id: String,
    rooms: RoomTable,
    mut membership: watch::Receiver<Arc<Membership>>,
    metrics: Arc<ChatMetrics>,
    mut inbox: mpsc::Receiver<Inbox>,
    stop: CancellationToken,
    keeps: Keeps,
) {
    let mut st = State {
        me: id,
        rooms: rooms.with_limits(keeps.rooms),
        history: keeps.history,
        held: Vec::new(),
        links: HashMap::new(),
        presence: Presence::default(),
        chats: None,
        metrics,
    };
    let mut pacer = Pacer::new(
        delay_from_env("POMELO_CHAT_FLUSH_US", FLUSH_DELAY),
        delay_from_env("POMELO_CHAT_JOIN_US", JOIN_DELAY),
    );
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
                st.on_inbox(msg, &mut pending).await;
                for _ in 1..DRAIN {
                    let Ok(msg) = inbox.try_recv() else { break };
                    st.on_inbox(msg, &mut pending).await;
                }
                // Group commit: every send drained is stored at once, then answered and delivered.
                st.settle(&mut pending).await;
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

/// A request's answer and deliveries, held while a send it follows (or is) waits to be stored.
struct Held {
    connector: Arc<str>,
    conn: u64,
    id: u64,
    result: Result<ChatReply, cluster::ChatError>,
    deliveries: Vec<Delivery>,
    /// The room of a staged send: it is answered `{}` and delivered only once its room's appends are stored.
    staged: Option<String>,
}

/// What the rooms task owns.
struct State {
    me: String,
    rooms: RoomTable,
    history: History,
    /// Answers and deliveries waiting for the history to store staged sends, in order.
    held: Vec<Held>,
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

    async fn on_inbox(&mut self, msg: Inbox, batches: &mut Batches) {
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
            Inbox::Request { connector, conn, id, req } => {
                self.metrics.requests.fetch_add(1, Ordering::Relaxed);
                let (result, deliveries, staged) = self.handle(&connector, req, batches).await;
                let held = Held { connector, conn, id, result, deliveries, staged };
                if self.held.is_empty() && held.staged.is_none() {
                    self.emit(held, batches);
                } else {
                    self.held.push(held);
                }
            }
        }
    }

    /// Stores the staged sends, then answers and delivers what was held, in order: a send whose room could
    /// not be stored is answered with the error and delivered to no one.
    async fn settle(&mut self, batches: &mut Batches) {
        if self.held.is_empty() && !self.history.staged() {
            return;
        }
        let failed = self.history.commit().await.err();
        for mut h in std::mem::take(&mut self.held) {
            if let (Some(f), Some(rid)) = (&failed, &h.staged) {
                if f.rooms.contains(rid) {
                    self.metrics.history_failures.fetch_add(1, Ordering::Relaxed);
                    h.result =
                        Err(cluster::ChatError::Other { msg: format!("the message could not be stored: {}", f.why) });
                    h.deliveries.clear();
                }
            }
            self.emit(h, batches);
        }
    }

    fn emit(&self, h: Held, batches: &mut Batches) {
        if h.result.is_err() {
            self.metrics.rpc_errors.fetch_add(1, Ordering::Relaxed);
        }
        if let Some((c, out)) = self.links.get(&h.connector) {
            if *c == h.conn {
                let frame = cluster::encode_msg(&FromChat::Response { id: h.id, result: h.result });
                if out.try_send(frame).is_err() {
                    self.metrics.frames_dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        for d in h.deliveries {
            batches.add(d);
        }
    }

    /// A request's answer, its deliveries, and the room of a staged send.
    async fn handle(
        &mut self,
        connector: &Arc<str>,
        req: ChatRequest,
        batches: &mut Batches,
    ) -> (Result<ChatReply, cluster::ChatError>, Vec<Delivery>, Option<String>) {
        let (r, d) = match req {
            ChatRequest::Join { member, .. } if !self.owns(&member.rid) => {
                (Err(cluster::ChatError::NotOwner { rid: member.rid }), Vec::new())
            }
            ChatRequest::Join { member, since } => {
                // What it recovers must be stored, and what it would miss live must be in what it recovers.
                if since.is_some() {
                    self.settle(batches).await;
                }
                self.join(connector, member, since).await
            }
            ChatRequest::Leave { member } => (Ok(ChatReply::Done), self.rooms.leave(connector, &member)),
            ChatRequest::Send { rid, .. } if !self.owns(&rid) => {
                (Err(cluster::ChatError::NotOwner { rid }), Vec::new())
            }
            ChatRequest::Send { rid, from, target, content } => {
                self.metrics.messages_in.fetch_add(1, Ordering::Relaxed);
                if !self.rooms.has_room(&rid) {
                    return (Err(cluster::ChatError::Other { msg: format!("no room `{rid}`") }), Vec::new(), None);
                }
                // A private message to no one is refused, not stored and answered `{}` as if delivered.
                if target != "*" && !self.rooms.has_user(&rid, &target) {
                    let msg = format!("no user {target:?} in room {rid:?}");
                    return (Err(cluster::ChatError::Other { msg }), Vec::new(), None);
                }
                // Numbered (and with memory stored) first: an answered send is in the history.
                let at = match self.history.append(&rid, &from, &target, &content).await {
                    Ok(at) => at,
                    Err(e) => {
                        self.metrics.history_failures.fetch_add(1, Ordering::Relaxed);
                        return (Err(cluster::ChatError::Other { msg: e.to_string() }), Vec::new(), None);
                    }
                };
                let chat = OnChat { msg: &content, from: &from, target: &target, epoch: &at.epoch, offset: at.offset };
                let staged = self.history.staged().then(|| rid.clone());
                return match self.rooms.send(&rid, chat) {
                    Ok(d) => (Ok(ChatReply::Done), d, staged),
                    Err(e) => (Err(e), Vec::new(), staged),
                };
            }
            ChatRequest::History { rid, .. } if !self.owns(&rid) => {
                (Err(cluster::ChatError::NotOwner { rid }), Vec::new())
            }
            ChatRequest::History { rid, username, since, before, limit } => {
                self.settle(batches).await;
                (self.history_page(&rid, &username, since, before, limit).await, Vec::new())
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
        };
        (r, d, None)
    }

    /// `chat.chatHandler.history`: what `username` may see after `since`, or the page before `before`.
    async fn history_page(
        &mut self,
        rid: &str,
        username: &str,
        since: Option<Since>,
        before: Option<u64>,
        limit: u32,
    ) -> Result<ChatReply, cluster::ChatError> {
        let failed = |e: super::history::HistoryError| cluster::ChatError::Other { msg: e.to_string() };
        let at = self.history.position(rid).await.map_err(failed)?;
        let limit = (limit as usize).clamp(1, MAX_PAGE);
        let (recovered, got) = match since {
            Some(s) => match self.history.read(rid, &Query::Since(s)).await.map_err(failed)? {
                Some(m) => (true, m),
                None => (false, Vec::new()),
            },
            None => (
                true,
                self.history.read(rid, &Query::Before { before, limit }).await.map_err(failed)?.unwrap_or_default(),
            ),
        };
        let messages = got
            .iter()
            .filter(|m| m.visible_to(username))
            .take(limit)
            .map(|m| serde_json::json!({"msg": m.msg, "from": m.from, "target": m.target, "epoch": at.epoch, "offset": m.offset}))
            .collect();
        Ok(ChatReply::History { epoch: at.epoch, offset: at.offset, recovered, messages })
    }

    /// A join: the user list, where the room's history is, and with `since` the member's missed
    /// messages (queued before anything live reaches it) or `recovered: false`. A history that cannot be
    /// read costs the join nothing but its recovery (`recovered: false`, an empty epoch).
    async fn join(
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
        let at = match self.history.position(&rid).await {
            Ok(at) => at,
            Err(e) => {
                tracing::warn!("room {rid:?}: {e}");
                Since { epoch: String::new(), offset: 0 }
            }
        };
        let mut paged = false;
        let recovered = match since {
            None => None,
            Some(_) if at.epoch.is_empty() => Some(false),
            Some(s) => {
                let missed = match self.history.read(&rid, &Query::Since(s)).await {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!("room {rid:?}: {e}");
                        None
                    }
                };
                Some(missed.is_some_and(|missed| {
                    let Some((room, session)) = self.rooms.session_of(connector, &rid, &uid) else { return false };
                    let chats = missed.iter().filter(|m| m.visible_to(&username)).map(|m: &Stored| OnChat {
                        msg: &m.msg,
                        from: &m.from,
                        target: &m.target,
                        epoch: &at.epoch,
                        offset: m.offset,
                    });
                    let replay = self.rooms.replay(connector, &room, session, chats);
                    // More than its queue holds would get the client kicked, and again on every retry: it is
                    // told `recovered: false, paged: true` and pages through `history` instead.
                    if replay.len() > MAX_REPLAY
                        || replay.iter().map(|d| d.payload.len()).sum::<usize>() > MAX_REPLAY_BYTES
                    {
                        paged = true;
                        return false;
                    }
                    out.extend(replay);
                    true
                }))
            }
        };
        (Ok(ChatReply::Users { users, epoch: at.epoch, offset: at.offset, recovered, paged }), out)
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
