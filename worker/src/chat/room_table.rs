//! The room table of a chat server, as plain data: who is in which room, on which connector, in which session.
//!
//! Every operation returns the [`Delivery`]s it causes, one per connector that holds recipients, each with
//! a push encoded once; the server sends them. A room keeps its members grouped by connector (rebuilt
//! lazily after a join or leave), so a broadcast costs one encode and one shared session list per
//! connector, not a lookup per member. Nothing here does I/O, so the rules are unit-tested.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use pomelo_proto::cluster::{ChatError, Member};
use pomelo_proto::wire::{self, Dictionary};
use serde_json::json;

/// `onChat`'s body, with Pomelo's key order (`msg`, `from`, `target`).
#[derive(serde::Serialize)]
struct OnChat<'a> {
    msg: &'a serde_json::Value,
    from: &'a str,
    target: &'a str,
}

/// One push for some sessions of one connector, all members of `room`.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    pub connector: Arc<str>,
    pub room: Arc<str>,
    pub sessions: Arc<[u64]>,
    pub payload: Bytes,
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
    members: usize,
}

fn push<T: serde::Serialize>(dict: Option<&Dictionary>, route: &str, body: &T) -> Option<Bytes> {
    match wire::encode_push_json(dict, route, body) {
        Ok(b) => Some(b),
        Err(e) => {
            tracing::warn!("cannot encode {route} push: {e}");
            None
        }
    }
}

fn deliveries(room: &Arc<str>, groups: &Groups, payload: Option<Bytes>) -> Vec<Delivery> {
    let Some(payload) = payload else { return Vec::new() };
    groups
        .iter()
        .map(|(connector, sessions)| Delivery {
            connector: connector.clone(),
            room: room.clone(),
            sessions: sessions.clone(),
            payload: payload.clone(),
        })
        .collect()
}

impl RoomTable {
    pub fn new(dict: Option<Arc<Dictionary>>) -> RoomTable {
        RoomTable { rooms: HashMap::new(), dict, members: 0 }
    }

    pub fn room_count(&self) -> usize {
        self.rooms.len()
    }

    pub fn member_count(&self) -> usize {
        self.members
    }

    /// Adds a member; `onAdd` goes to the others. Joining twice from the same session is harmless.
    pub fn join(&mut self, connector: &Arc<str>, m: Member) -> Result<(Vec<String>, Vec<Delivery>), ChatError> {
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
        let payload = push(self.dict.as_deref(), "onAdd", &json!({"route": "onAdd", "user": m.username}));
        let out = deliveries(&room.rid, &room.by_connector(Some(&m.uid)), payload);
        Ok((room.users(), out))
    }

    /// Adds members without telling anyone: they were already in the room on another owner.
    pub fn rejoin(&mut self, connector: &Arc<str>, members: Vec<Member>) {
        for m in members {
            let room = self.rooms.entry(m.rid.clone()).or_insert_with(|| Room::new(&m.rid));
            if !room.members.contains_key(&m.uid) {
                self.members += 1;
            }
            room.insert(m.uid, Entry { username: m.username, connector: connector.clone(), session: m.session });
        }
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
        let payload = push(self.dict.as_deref(), "onLeave", &json!({"route": "onLeave", "user": username}));
        deliveries(&room.rid.clone(), room.groups(), payload)
    }

    /// `chat.chatHandler.send`: `onChat {msg, from, target}` to the whole room (sender included) or to the
    /// member whose user name is `target`.
    pub fn send(
        &mut self,
        rid: &str,
        from: &str,
        target: &str,
        content: &serde_json::Value,
    ) -> Result<Vec<Delivery>, ChatError> {
        let room = self.rooms.get_mut(rid).ok_or_else(|| ChatError::Other { msg: format!("no room `{rid}`") })?;
        let payload = push(self.dict.as_deref(), "onChat", &OnChat { msg: content, from, target });
        if target == "*" {
            return Ok(deliveries(&room.rid.clone(), room.groups(), payload));
        }
        let uid = format!("{target}*{rid}");
        let (Some(e), Some(payload)) = (room.members.get(&uid), payload) else { return Ok(Vec::new()) };
        Ok(vec![Delivery {
            connector: e.connector.clone(),
            room: room.rid.clone(),
            sessions: Arc::from([e.session]),
            payload,
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
mod tests {
    use super::*;

    fn m(name: &str, rid: &str, session: u64) -> Member {
        Member { rid: rid.into(), uid: format!("{name}*{rid}"), username: name.into(), session }
    }

    #[test]
    fn join_pushes_on_add_to_the_others_and_lists_users_in_order() {
        let mut r = RoomTable::new(None);
        let c1: Arc<str> = "c1".into();
        let c2: Arc<str> = "c2".into();
        let (users, d) = r.join(&c1, m("ann", "r", 1)).expect("join");
        assert_eq!(users, ["ann"]);
        assert!(d.is_empty());
        r.join(&c1, m("bob", "r", 2)).expect("join");
        let (users, d) = r.join(&c2, m("cy", "r", 7)).expect("join");
        assert_eq!(users, ["ann", "bob", "cy"]);
        assert_eq!(d.len(), 1, "one delivery for connector c1");
        assert_eq!(&d[0].sessions[..], [1, 2]);
        assert!(d[0].payload.ends_with(br#"{"route":"onAdd","user":"cy"}"#));
        assert!(matches!(r.join(&c2, m("ann", "r", 9)), Err(ChatError::Duplicate { .. })));
        assert!(r.join(&c1, m("ann", "r", 1)).is_ok(), "the same session joining again is harmless");
        assert_eq!(r.member_count(), 3);
    }

    #[test]
    fn broadcast_includes_the_sender_and_private_reaches_one() {
        let mut r = RoomTable::new(None);
        let (c1, c2): (Arc<str>, Arc<str>) = ("c1".into(), "c2".into());
        r.join(&c1, m("ann", "r", 1)).expect("join");
        r.join(&c2, m("bob", "r", 2)).expect("join");
        r.join(&c2, m("eve", "other", 3)).expect("join");
        let d = r.send("r", "ann", "*", &json!("hi")).expect("send");
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].payload.as_ptr(), d[1].payload.as_ptr(), "encoded once, shared");
        assert!(d[0].payload.ends_with(br#"{"msg":"hi","from":"ann","target":"*"}"#));
        let d = r.send("r", "ann", "bob", &json!("psst")).expect("send");
        assert_eq!(d.len(), 1);
        assert_eq!((&*d[0].connector, &d[0].sessions[..]), ("c2", &[2u64][..]));
        assert!(r.send("r", "ann", "eve", &json!("x")).expect("send").is_empty(), "eve is in another room");
    }

    #[test]
    fn broadcasts_follow_joins_and_leaves() {
        let mut r = RoomTable::new(None);
        let c1: Arc<str> = "c1".into();
        r.join(&c1, m("ann", "r", 1)).expect("join");
        assert_eq!(&r.send("r", "ann", "*", &json!("a")).expect("send")[0].sessions[..], [1]);
        r.join(&c1, m("bob", "r", 2)).expect("join");
        let d = r.send("r", "ann", "*", &json!("b")).expect("send");
        assert_eq!((&d[0].sessions[..], &*d[0].room), (&[1u64, 2][..], "r"));
        r.leave(&c1, &m("ann", "r", 1));
        assert_eq!(&r.send("r", "bob", "*", &json!("c")).expect("send")[0].sessions[..], [2]);
    }

    #[test]
    fn a_gone_connector_leaves_and_the_rest_hear_on_leave() {
        let mut r = RoomTable::new(None);
        let (c1, c2): (Arc<str>, Arc<str>) = ("c1".into(), "c2".into());
        r.join(&c1, m("ann", "r", 1)).expect("join");
        r.join(&c2, m("bob", "r", 2)).expect("join");
        r.join(&c2, m("cy", "solo", 3)).expect("join");
        let d = r.drop_connector("c2");
        assert_eq!(d.len(), 1);
        assert_eq!(&d[0].sessions[..], [1]);
        assert!(d[0].payload.ends_with(br#"{"route":"onLeave","user":"bob"}"#));
        assert_eq!(r.room_count(), 1, "the emptied room is gone");
        assert_eq!(r.member_count(), 1);
    }

    #[test]
    fn rejoin_is_silent_and_retain_drops_moved_rooms() {
        let mut r = RoomTable::new(None);
        let c1: Arc<str> = "c1".into();
        r.rejoin(&c1, vec![m("ann", "r1", 1), m("bob", "r1", 2), m("cy", "r2", 3)]);
        r.rejoin(&c1, vec![m("ann", "r1", 1)]);
        assert_eq!(r.member_count(), 3);
        assert_eq!(r.retain(|rid| rid == "r1"), 1);
        assert_eq!((r.room_count(), r.member_count()), (1, 2));
        let d = r.leave(&c1, &m("ann", "r1", 99));
        assert!(d.is_empty(), "another session cannot remove ann");
        let d = r.leave(&c1, &m("ann", "r1", 1));
        assert_eq!(&d[0].sessions[..], [2]);
    }
}
