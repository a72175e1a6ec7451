//! The room table of a chat server, as plain data: who is in which room, on which connector, in which session.
//!
//! Every operation returns the [`Delivery`]s it causes, one per connector that holds recipients, each with
//! a push encoded once; the server sends them. A room keeps its members grouped by connector (rebuilt
//! lazily after a join or leave), so a broadcast costs one encode and one shared session list per
//! connector, not a lookup per member. Nothing here does I/O, so the rules are unit-tested.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use pomelo_proto::cluster::{ChatError, Member};
use pomelo_proto::wire::protobuf::ProtoBundle;
use pomelo_proto::wire::{self, Dictionary};
use serde_json::json;

/// `onChat`'s body, with Pomelo's key order (`msg`, `from`, `target`), then the message's place in the
/// room's history (`epoch`, `offset`), which Pomelo clients ignore.
#[derive(serde::Serialize)]
pub struct OnChat<'a> {
    pub msg: &'a serde_json::Value,
    pub from: &'a str,
    pub target: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub epoch: &'a str,
    pub offset: u64,
}

/// One push for some sessions of one connector, all members of `room`.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    pub connector: Arc<str>,
    pub room: Arc<str>,
    pub sessions: Arc<[u64]>,
    pub payload: Bytes,
    /// An `onAdd`: it may wait longer to be merged than a message (see `batch::Pacer`).
    pub join: bool,
}

#[derive(Debug, Clone)]
struct Entry {
    username: String,
    connector: Arc<str>,
    session: u64,
}

/// Session ids of one room's members on each connector, in join order.
type Groups = Vec<(Arc<str>, Arc<[u64]>)>;

#[derive(Debug)]
struct Room {
    rid: Arc<str>,
    /// uids in the order they joined (the user list is shown in that order).
    order: Vec<String>,
    members: HashMap<String, Entry>,
    /// Every member grouped by connector; `None` after a change until the next broadcast.
    groups: Option<Groups>,
}

impl Room {
    fn new(rid: &str) -> Room {
        Room { rid: rid.into(), order: Vec::new(), members: HashMap::new(), groups: None }
    }

    fn remove(&mut self, uid: &str) -> Option<Entry> {
        let e = self.members.remove(uid)?;
        self.order.retain(|u| u != uid);
        self.groups = None;
        Some(e)
    }

    fn insert(&mut self, uid: String, e: Entry) {
        if self.members.insert(uid.clone(), e).is_none() {
            self.order.push(uid);
        }
        self.groups = None;
    }

    /// Members grouped by connector, optionally leaving one uid out.
    fn by_connector(&self, except: Option<&str>) -> Groups {
        let mut groups: Vec<(Arc<str>, Vec<u64>)> = Vec::new();
        for uid in &self.order {
            if Some(uid.as_str()) == except {
                continue;
            }
            let Some(e) = self.members.get(uid) else { continue };
            match groups.iter_mut().find(|(c, _)| *c == e.connector) {
                Some((_, s)) => s.push(e.session),
                None => groups.push((e.connector.clone(), vec![e.session])),
            }
        }
        groups.into_iter().map(|(c, s)| (c, s.into())).collect()
    }

    /// Every member grouped by connector, from the cache.
    fn groups(&mut self) -> &Groups {
        if self.groups.is_none() {
            self.groups = Some(self.by_connector(None));
        }
        self.groups.get_or_insert_with(Vec::new)
    }

    fn users(&self) -> Vec<String> {
        self.order.iter().filter_map(|u| self.members.get(u)).map(|e| e.username.clone()).collect()
    }
}

#[derive(Debug, Default)]
pub struct RoomTable {
    rooms: HashMap<String, Room>,
    dict: Option<Arc<Dictionary>>,
    /// Pushes of routes with a server proto are protobuf (servers.yaml `protobuf`).
    protobuf: pomelo_proto::wire::protobuf::Protobuf,
    members: usize,
    limits: Limits,
}

/// What one chat server holds at most (`maxRoomMembers`, `maxRooms` in servers.yaml). A join past either
/// is refused with [`ChatError::Full`]; a connector's re-join is not (its members were admitted before,
/// here or on the room's previous owner), so a restart or a moved room never evicts anyone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub room_members: usize,
    pub rooms: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            room_members: pomelo_proto::config::DEFAULT_MAX_ROOM_MEMBERS,
            rooms: pomelo_proto::config::DEFAULT_MAX_ROOMS,
        }
    }
}

fn push<T: serde::Serialize>(
    dict: Option<&Dictionary>,
    protobuf: Option<&ProtoBundle>,
    route: &str,
    body: &T,
) -> Option<Bytes> {
    match wire::encode_push_with(dict, protobuf, route, body) {
        Ok(b) => Some(b),
        Err(e) => {
            tracing::warn!("cannot encode {route} push: {e}");
            None
        }
    }
}

fn deliveries(room: &Arc<str>, groups: &Groups, payload: Option<Bytes>, join: bool) -> Vec<Delivery> {
    let Some(payload) = payload else { return Vec::new() };
    groups
        .iter()
        .map(|(connector, sessions)| Delivery {
            connector: connector.clone(),
            room: room.clone(),
            sessions: sessions.clone(),
            payload: payload.clone(),
            join,
        })
        .collect()
}

impl RoomTable {
    pub fn new(dict: Option<Arc<Dictionary>>) -> RoomTable {
        RoomTable { rooms: HashMap::new(), dict, protobuf: None, members: 0, limits: Limits::default() }
    }

    /// Encodes pushes of the routes `protos` has as protobuf.
    pub fn with_protobuf(mut self, protos: pomelo_proto::wire::protobuf::Protobuf) -> RoomTable {
        self.protobuf = protos;
        self
    }

    pub fn with_limits(mut self, limits: Limits) -> RoomTable {
        self.limits = limits;
        self
    }

    /// Why a new member may not join `rid` now, if a limit says so.
    fn over_limit(&self, rid: &str) -> Option<String> {
        match self.rooms.get(rid) {
            Some(room) if room.members.len() >= self.limits.room_members => {
                Some(format!("room is full ({} members)", self.limits.room_members))
            }
            None if self.rooms.len() >= self.limits.rooms => {
                Some(format!("this chat server holds its maximum of {} rooms", self.limits.rooms))
            }
            _ => None,
        }
    }

    pub fn room_count(&self) -> usize {
        self.rooms.len()
    }

    pub fn member_count(&self) -> usize {
        self.members
    }

    /// Adds a member; `onAdd` goes to the others. Joining twice from the same session is harmless.
    pub fn join(&mut self, connector: &Arc<str>, m: Member) -> Result<(Vec<String>, Vec<Delivery>), ChatError> {
        let again = self.rooms.get(&m.rid).and_then(|r| r.members.get(&m.uid)).is_some();
        if !again {
            if let Some(msg) = self.over_limit(&m.rid) {
                return Err(ChatError::Full { msg });
            }
        }
        let room = self.rooms.entry(m.rid.clone()).or_insert_with(|| Room::new(&m.rid));
        if let Some(e) = room.members.get(&m.uid) {
            if &e.connector == connector && e.session == m.session {
                return Ok((room.users(), Vec::new()));
            }
            return Err(ChatError::Duplicate { uid: m.uid });
        }
        room.insert(
            m.uid.clone(),
            Entry { username: m.username.clone(), connector: connector.clone(), session: m.session },
        );
        self.members += 1;
        let payload = push(
            self.dict.as_deref(),
            self.protobuf.as_deref(),
            "onAdd",
            &json!({"route": "onAdd", "user": m.username}),
        );
        let out = deliveries(&room.rid, &room.by_connector(Some(&m.uid)), payload, true);
        Ok((room.users(), out))
    }

    /// A connector's authoritative re-join: `members` are *all* of its members in the rooms `owns`
    /// accepts. Listed members missing here are added without telling anyone (they were in the room
    /// before: on another owner, or on this one before it restarted); that connector's members here that
    /// are not listed are ghosts (a join that timed out, a leave lost with a link) and leave with
    /// `onLeave` to the rest. Members of rooms this server does not own are ignored.
    pub fn rejoin(&mut self, connector: &Arc<str>, members: Vec<Member>, owns: impl Fn(&str) -> bool) -> Vec<Delivery> {
        let mut ghosts: Vec<(String, String)> = Vec::new();
        {
            // A listed uid on another session of the same connector is replaced in place, not a ghost.
            let listed: HashSet<&str> = members.iter().map(|m| m.uid.as_str()).collect();
            for (rid, room) in &mut self.rooms {
                let gone: Vec<String> = room
                    .members
                    .iter()
                    .filter(|(u, e)| &e.connector == connector && !listed.contains(u.as_str()))
                    .map(|(u, _)| u.clone())
                    .collect();
                for uid in gone {
                    if let Some(e) = room.remove(&uid) {
                        ghosts.push((rid.clone(), e.username));
                    }
                }
            }
        }
        self.members -= ghosts.len();
        for m in members.into_iter().filter(|m| owns(&m.rid)) {
            let room = self.rooms.entry(m.rid.clone()).or_insert_with(|| Room::new(&m.rid));
            if !room.members.contains_key(&m.uid) {
                self.members += 1;
            }
            room.insert(m.uid, Entry { username: m.username, connector: connector.clone(), session: m.session });
        }
        let mut out = Vec::new();
        for (rid, username) in ghosts {
            out.extend(self.after_leave(&rid, &username));
        }
        out
    }

    /// Removes a member (only the session that joined); `onLeave` goes to the rest.
    pub fn leave(&mut self, connector: &Arc<str>, m: &Member) -> Vec<Delivery> {
        let Some(room) = self.rooms.get_mut(&m.rid) else { return Vec::new() };
        let same = room.members.get(&m.uid).is_some_and(|e| &e.connector == connector && e.session == m.session);
        if !same {
            return Vec::new();
        }
        room.remove(&m.uid);
        self.members -= 1;
        self.after_leave(&m.rid, &m.username)
    }

    fn after_leave(&mut self, rid: &str, username: &str) -> Vec<Delivery> {
        let Some(room) = self.rooms.get_mut(rid) else { return Vec::new() };
        if room.members.is_empty() {
            self.rooms.remove(rid);
            return Vec::new();
        }
        let payload = push(
            self.dict.as_deref(),
            self.protobuf.as_deref(),
            "onLeave",
            &json!({"route": "onLeave", "user": username}),
        );
        deliveries(&room.rid.clone(), room.groups(), payload, false)
    }

    pub fn has_room(&self, rid: &str) -> bool {
        self.rooms.contains_key(rid)
    }

    /// Whether `username` is a member of `rid` (the target of a private message).
    pub fn has_user(&self, rid: &str, username: &str) -> bool {
        self.rooms.get(rid).is_some_and(|r| r.members.contains_key(&format!("{username}*{rid}")))
    }

    /// The session of `uid` in `rid` on `connector`, if it is there.
    pub fn session_of(&self, connector: &Arc<str>, rid: &str, uid: &str) -> Option<(Arc<str>, u64)> {
        let room = self.rooms.get(rid)?;
        let e = room.members.get(uid).filter(|e| &e.connector == connector)?;
        Some((room.rid.clone(), e.session))
    }

    /// Pushes of stored messages to one session (a recovery), one delivery per message, in order.
    pub fn replay<'a>(
        &self,
        connector: &Arc<str>,
        room: &Arc<str>,
        session: u64,
        messages: impl IntoIterator<Item = OnChat<'a>>,
    ) -> Vec<Delivery> {
        let sessions: Arc<[u64]> = Arc::from([session]);
        messages
            .into_iter()
            .filter_map(|m| push(self.dict.as_deref(), self.protobuf.as_deref(), "onChat", &m))
            .map(|payload| Delivery {
                connector: connector.clone(),
                room: room.clone(),
                sessions: sessions.clone(),
                payload,
                join: false,
            })
            .collect()
    }

    /// `chat.chatHandler.send`: `onChat {msg, from, target, epoch, offset}` to the whole room (sender
    /// included) or to the member whose user name is `target`; `epoch` and `offset` are where the
    /// history stored it.
    pub fn send(&mut self, rid: &str, chat: OnChat<'_>) -> Result<Vec<Delivery>, ChatError> {
        let target = chat.target;
        let room = self.rooms.get_mut(rid).ok_or_else(|| ChatError::Other { msg: format!("no room `{rid}`") })?;
        let payload = push(self.dict.as_deref(), self.protobuf.as_deref(), "onChat", &chat);
        if target == "*" {
            return Ok(deliveries(&room.rid.clone(), room.groups(), payload, false));
        }
        let uid = format!("{target}*{rid}");
        let (Some(e), Some(payload)) = (room.members.get(&uid), payload) else { return Ok(Vec::new()) };
        Ok(vec![Delivery {
            connector: e.connector.clone(),
            room: room.rid.clone(),
            sessions: Arc::from([e.session]),
            payload,
            join: false,
        }])
    }

    /// Connectors that hold members.
    pub fn connectors(&self) -> Vec<Arc<str>> {
        let mut out: Vec<Arc<str>> = Vec::new();
        for e in self.rooms.values().flat_map(|r| r.members.values()) {
            if !out.contains(&e.connector) {
                out.push(e.connector.clone());
            }
        }
        out
    }

    /// A connector is gone: its members leave every room, and the others hear `onLeave`.
    pub fn drop_connector(&mut self, connector: &str) -> Vec<Delivery> {
        let mut left: Vec<(String, String)> = Vec::new();
        for (rid, room) in &mut self.rooms {
            let gone: Vec<String> =
                room.members.iter().filter(|(_, e)| &*e.connector == connector).map(|(u, _)| u.clone()).collect();
            for uid in gone {
                if let Some(e) = room.remove(&uid) {
                    left.push((rid.clone(), e.username));
                }
            }
        }
        self.members -= left.len();
        let mut out = Vec::new();
        for (rid, username) in left {
            out.extend(self.after_leave(&rid, &username));
        }
        out
    }

    /// Forgets rooms this server no longer owns (their members were re-joined on the new owner).
    pub fn retain(&mut self, mut owns: impl FnMut(&str) -> bool) -> usize {
        let before = self.rooms.len();
        let mut dropped_members = 0;
        self.rooms.retain(|rid, room| {
            let keep = owns(rid);
            if !keep {
                dropped_members += room.members.len();
            }
            keep
        });
        self.members -= dropped_members;
        before - self.rooms.len()
    }
}

#[cfg(test)]
mod tests;
