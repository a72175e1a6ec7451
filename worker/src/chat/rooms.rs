//! Rooms on a chat server, as plain data: who is in which room, on which connector, in which session.
//!
//! Every operation returns the [`Delivery`]s it causes, one per connector that holds recipients, each with
//! a push encoded once; the server sends them. Nothing here does I/O, so the rules are unit-tested.

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

/// One push for some sessions of one connector.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    pub connector: Arc<str>,
    pub sessions: Vec<u64>,
    pub payload: Bytes,
}

#[derive(Debug, Clone)]
struct Entry {
    username: String,
    connector: Arc<str>,
    session: u64,
}

#[derive(Debug, Default)]
struct Room {
    /// uids in the order they joined (the user list is shown in that order).
    order: Vec<String>,
    members: HashMap<String, Entry>,
}

impl Room {
    fn remove(&mut self, uid: &str) -> Option<Entry> {
        let e = self.members.remove(uid)?;
        self.order.retain(|u| u != uid);
        Some(e)
    }

    /// Members grouped by connector, optionally leaving one uid out.
    fn by_connector(&self, except: Option<&str>) -> Vec<(Arc<str>, Vec<u64>)> {
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
        groups
    }

    fn users(&self) -> Vec<String> {
        self.order.iter().filter_map(|u| self.members.get(u)).map(|e| e.username.clone()).collect()
    }
}

#[derive(Debug, Default)]
pub struct Rooms {
    rooms: HashMap<String, Room>,
    dict: Option<Arc<Dictionary>>,
    members: usize,
}

impl Rooms {
    pub fn new(dict: Option<Arc<Dictionary>>) -> Rooms {
        Rooms { rooms: HashMap::new(), dict, members: 0 }
    }

    pub fn room_count(&self) -> usize {
        self.rooms.len()
    }

    pub fn member_count(&self) -> usize {
        self.members
    }

    fn push<T: serde::Serialize>(&self, route: &str, body: &T) -> Option<Bytes> {
        match wire::encode_push_json(self.dict.as_deref(), route, body) {
            Ok(b) => Some(b),
            Err(e) => {
                tracing::warn!("cannot encode {route} push: {e}");
                None
            }
        }
    }

    fn fan_out(&self, room: &Room, except: Option<&str>, payload: Option<Bytes>) -> Vec<Delivery> {
        let Some(payload) = payload else { return Vec::new() };
        room.by_connector(except)
            .into_iter()
            .map(|(connector, sessions)| Delivery { connector, sessions, payload: payload.clone() })
            .collect()
    }

    /// Adds a member; `onAdd` goes to the others. Joining twice from the same session is harmless.
    pub fn join(&mut self, connector: &Arc<str>, m: Member) -> Result<(Vec<String>, Vec<Delivery>), ChatError> {
        let room = self.rooms.entry(m.rid.clone()).or_default();
        if let Some(e) = room.members.get(&m.uid) {
            if &e.connector == connector && e.session == m.session {
                return Ok((room.users(), Vec::new()));
            }
            return Err(ChatError::Duplicate { uid: m.uid });
        }
        room.order.push(m.uid.clone());
        room.members.insert(
            m.uid.clone(),
            Entry { username: m.username.clone(), connector: connector.clone(), session: m.session },
        );
        self.members += 1;
        let room = &self.rooms[&m.rid];
        let payload = self.push("onAdd", &json!({"route": "onAdd", "user": m.username}));
        let deliveries = self.fan_out(room, Some(&m.uid), payload);
        Ok((room.users(), deliveries))
    }

    /// Adds members without telling anyone: they were already in the room on another owner.
    pub fn rejoin(&mut self, connector: &Arc<str>, members: Vec<Member>) {
        for m in members {
            let room = self.rooms.entry(m.rid.clone()).or_default();
            if !room.members.contains_key(&m.uid) {
                room.order.push(m.uid.clone());
                self.members += 1;
            }
            room.members
                .insert(m.uid, Entry { username: m.username, connector: connector.clone(), session: m.session });
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
        let Some(room) = self.rooms.get(rid) else { return Vec::new() };
        if room.members.is_empty() {
            self.rooms.remove(rid);
            return Vec::new();
        }
        let payload = self.push("onLeave", &json!({"route": "onLeave", "user": username}));
        self.fan_out(room, None, payload)
    }

    /// `chat.chatHandler.send`: `onChat {msg, from, target}` to the whole room (sender included) or to the
    /// member whose user name is `target`.
    pub fn send(
        &self,
        rid: &str,
        from: &str,
        target: &str,
        content: &serde_json::Value,
    ) -> Result<Vec<Delivery>, ChatError> {
        let room = self.rooms.get(rid).ok_or_else(|| ChatError::Other { msg: format!("no room `{rid}`") })?;
        let payload = self.push("onChat", &OnChat { msg: content, from, target });
        if target == "*" {
            return Ok(self.fan_out(room, None, payload));
        }
        let uid = format!("{target}*{rid}");
        let (Some(e), Some(payload)) = (room.members.get(&uid), payload) else { return Ok(Vec::new()) };
        Ok(vec![Delivery { connector: e.connector.clone(), sessions: vec![e.session], payload }])
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
        let mut r = Rooms::new(None);
        let c1: Arc<str> = "c1".into();
        let c2: Arc<str> = "c2".into();
        let (users, d) = r.join(&c1, m("ann", "r", 1)).expect("join");
        assert_eq!(users, ["ann"]);
        assert!(d.is_empty());
        r.join(&c1, m("bob", "r", 2)).expect("join");
        let (users, d) = r.join(&c2, m("cy", "r", 7)).expect("join");
        assert_eq!(users, ["ann", "bob", "cy"]);
        assert_eq!(d.len(), 1, "one delivery for connector c1");
        assert_eq!(d[0].sessions, [1, 2]);
        assert!(d[0].payload.ends_with(br#"{"route":"onAdd","user":"cy"}"#));
        assert!(matches!(r.join(&c2, m("ann", "r", 9)), Err(ChatError::Duplicate { .. })));
        assert!(r.join(&c1, m("ann", "r", 1)).is_ok(), "the same session joining again is harmless");
        assert_eq!(r.member_count(), 3);
    }

    #[test]
    fn broadcast_includes_the_sender_and_private_reaches_one() {
        let mut r = Rooms::new(None);
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
        assert_eq!((&*d[0].connector, d[0].sessions.as_slice()), ("c2", &[2u64][..]));
        assert!(r.send("r", "ann", "eve", &json!("x")).expect("send").is_empty(), "eve is in another room");
    }

    #[test]
    fn a_gone_connector_leaves_and_the_rest_hear_on_leave() {
        let mut r = Rooms::new(None);
        let (c1, c2): (Arc<str>, Arc<str>) = ("c1".into(), "c2".into());
        r.join(&c1, m("ann", "r", 1)).expect("join");
        r.join(&c2, m("bob", "r", 2)).expect("join");
        r.join(&c2, m("cy", "solo", 3)).expect("join");
        let d = r.drop_connector("c2");
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].sessions, [1]);
        assert!(d[0].payload.ends_with(br#"{"route":"onLeave","user":"bob"}"#));
        assert_eq!(r.room_count(), 1, "the emptied room is gone");
        assert_eq!(r.member_count(), 1);
    }

    #[test]
    fn rejoin_is_silent_and_retain_drops_moved_rooms() {
        let mut r = Rooms::new(None);
        let c1: Arc<str> = "c1".into();
        r.rejoin(&c1, vec![m("ann", "r1", 1), m("bob", "r1", 2), m("cy", "r2", 3)]);
        r.rejoin(&c1, vec![m("ann", "r1", 1)]);
        assert_eq!(r.member_count(), 3);
        assert_eq!(r.retain(|rid| rid == "r1"), 1);
        assert_eq!((r.room_count(), r.member_count()), (1, 2));
        let d = r.leave(&c1, &m("ann", "r1", 99));
        assert!(d.is_empty(), "another session cannot remove ann");
        let d = r.leave(&c1, &m("ann", "r1", 1));
        assert_eq!(d[0].sessions, [2]);
    }
}
