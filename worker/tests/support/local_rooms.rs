//! [`LocalRooms`]: the connector's [`Rooms`] with every room in this process (the whole chat on one
//! connector), so the handler and the frontend are tested without chat servers. It keeps its own record
//! of each session's room, as the cluster's `ChatClient` does. No tasks.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use pomelo_proto::cluster::{Member, Since};
use pomelo_worker::connector::{ChatSend, JoinError, Joined, Rooms};
use pomelo_worker::frontend::{BoxFuture, FrontendConfig, HandlerError, Session};
use pomelo_worker::routes::chat_dictionary;
use serde_json::json;

/// Pomelo demo connector settings: heartbeat 3 s, the chat dictionary.
pub fn connector_config() -> FrontendConfig {
    FrontendConfig::connector(Arc::new(chat_dictionary()))
}

#[derive(Default)]
struct Table {
    /// A room is its members in join order.
    rooms: HashMap<String, Vec<(Member, Session)>>,
    /// session id → its member.
    sessions: HashMap<u64, Member>,
}

#[derive(Default)]
pub struct LocalRooms {
    table: Mutex<Table>,
}

impl LocalRooms {
    pub fn new() -> LocalRooms {
        LocalRooms::default()
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Members of a room (uids), for tests.
    pub fn members(&self, rid: &str) -> Vec<String> {
        self.lock().rooms.get(rid).map(|m| m.iter().map(|(m, _)| m.uid.clone()).collect()).unwrap_or_default()
    }
}

impl Rooms for LocalRooms {
    fn join<'a>(
        &'a self,
        session: &'a Session,
        member: Member,
        _since: Option<Since>,
    ) -> BoxFuture<'a, Result<Joined, JoinError>> {
        let push = session.registry().encode_push("onAdd", &json!({"route": "onAdd", "user": member.username}));
        let mut t = self.lock();
        t.sessions.insert(session.id(), member.clone());
        let members = t.rooms.entry(member.rid.clone()).or_default();
        if let Some(push) = push {
            for (_, s) in members.iter() {
                s.push_bytes(push.clone());
            }
        }
        members.push((member, session.clone()));
        let users = members.iter().map(|(m, _)| m.username.clone()).collect();
        Box::pin(std::future::ready(Ok(Joined { users, ..Joined::default() })))
    }

    fn leave<'a>(&'a self, session: &'a Session) -> BoxFuture<'a, ()> {
        let mut t = self.lock();
        if let Some(member) = t.sessions.remove(&session.id()) {
            let push = session.registry().encode_push("onLeave", &json!({"route": "onLeave", "user": member.username}));
            if let Some(members) = t.rooms.get_mut(&member.rid) {
                members.retain(|(m, s)| !(m.uid == member.uid && s.id() == session.id()));
                if let Some(push) = push {
                    for (_, s) in members.iter() {
                        s.push_bytes(push.clone());
                    }
                }
                if members.is_empty() {
                    t.rooms.remove(&member.rid);
                }
            }
        }
        Box::pin(std::future::ready(()))
    }

    fn send<'a>(&'a self, session: &'a Session, msg: ChatSend) -> BoxFuture<'a, Result<(), HandlerError>> {
        let t = self.lock();
        let out = match t.sessions.get(&session.id()) {
            None => Err(HandlerError::new("enter a room first")),
            Some(from) => {
                let body = json!({"msg": msg.content, "from": from.username, "target": msg.target});
                match session.registry().encode_push("onChat", &body) {
                    None => Err(HandlerError::new("onChat push cannot be encoded")),
                    Some(push) => {
                        let members = t.rooms.get(&from.rid).map(Vec::as_slice).unwrap_or_default();
                        if msg.target == "*" {
                            for (_, s) in members {
                                s.push_bytes(push.clone());
                            }
                            Ok(())
                        } else {
                            let tuid = format!("{}*{}", msg.target, from.rid);
                            match members.iter().find(|(m, _)| m.uid == tuid) {
                                Some((_, s)) => {
                                    s.push_bytes(push);
                                    Ok(())
                                }
                                None => Err(HandlerError::new(format!("no user {tuid} in the room"))),
                            }
                        }
                    }
                }
            }
        };
        Box::pin(std::future::ready(out))
    }
}
