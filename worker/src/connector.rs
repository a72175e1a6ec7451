//! The connector: `connector.entryHandler.enter {username, rid}` and `chat.chatHandler.send`, as in
//! chatofpomelo-websocket, with room membership behind the [`Rooms`] trait. [`LocalRooms`] keeps rooms
//! in this process (the whole chat on one connector); the cluster version replaces it with RPC to the
//! room's chat server. No tasks of its own: everything runs in the calling connection's task, and a
//! session's leave runs from its `on_close`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use pomelo_proto::wire::Dictionary;
use serde_json::{json, Value};

use crate::frontend::{BoxFuture, FrontendConfig, Handler, HandlerError, Request, Session};

pub const ENTER: &str = "connector.entryHandler.enter";
pub const SEND: &str = "chat.chatHandler.send";

/// Longest username or room name accepted (the demo client allows 20 characters).
pub const MAX_NAME_BYTES: usize = 64;

/// Every handler route of the demo's server types: the dictionary (codes 3, 2, 1 after sorting).
pub fn chat_dictionary() -> Dictionary {
    let routes = crate::gate::ROUTES.iter().chain([ENTER, SEND].iter());
    Dictionary::build(routes.copied(), Vec::<String>::new()).expect("three routes fit in a dictionary")
}

/// A chat message as `chat.chatHandler.send` hands it to the room.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatSend {
    /// The sender's room (from the session, as Pomelo does).
    pub rid: String,
    /// The sender's username (uid without `*rid`).
    pub from: String,
    pub content: Value,
    /// `"*"` for everyone, else a username in the room.
    pub target: String,
}

/// Why a session could not enter its room.
#[derive(Debug, Clone, thiserror::Error)]
pub enum JoinError {
    /// The uid is already in the room (from another connector): the client sees `{code:500, error:true}`,
    /// as for a duplicate on this connector.
    #[error("already in the room")]
    Duplicate,
    #[error(transparent)]
    Failed(#[from] HandlerError),
}

/// Room membership and fan-out, local or remote.
pub trait Rooms: Send + Sync + 'static {
    /// Adds the session to room `rid` as `uid`, pushes `onAdd` to the others, returns the usernames.
    fn join<'a>(
        &'a self,
        session: &'a Session,
        uid: &'a str,
        rid: &'a str,
    ) -> BoxFuture<'a, Result<Vec<String>, JoinError>>;
    /// Removes the member and pushes `onLeave` to the rest.
    fn leave<'a>(&'a self, session: &'a Session, uid: &'a str, rid: &'a str) -> BoxFuture<'a, ()>;
    /// Pushes `onChat {msg, from, target}` to the room or to one member.
    fn send<'a>(&'a self, session: &'a Session, msg: ChatSend) -> BoxFuture<'a, Result<(), HandlerError>>;
}

pub struct Connector {
    rooms: Arc<dyn Rooms>,
}

impl Connector {
    pub fn new(rooms: Arc<dyn Rooms>) -> Connector {
        Connector { rooms }
    }

    /// Pomelo demo connector settings: heartbeat 3 s, the chat dictionary.
    pub fn frontend_config() -> FrontendConfig {
        FrontendConfig::connector(Arc::new(chat_dictionary()))
    }

    async fn enter(&self, session: Session, body: Value) -> Result<Value, HandlerError> {
        let field = |k: &str| match body.get(k) {
            Some(Value::String(s)) if !s.is_empty() && s.len() <= MAX_NAME_BYTES => Ok(s.clone()),
            _ => Err(HandlerError::new(format!("enter needs a non-empty {k} of at most {MAX_NAME_BYTES} bytes"))),
        };
        let (username, rid) = (field("username")?, field("rid")?);
        let uid = format!("{username}*{rid}");
        if !session.registry().get_by_uid(&uid).is_empty() {
            return Ok(duplicate_name());
        }
        session.bind(&uid).map_err(|e| HandlerError::new(e.to_string()))?;
        session.set("rid", Value::String(rid.clone()));
        match self.rooms.join(&session, &uid, &rid).await {
            Ok(users) => Ok(json!({"users": users})),
            Err(JoinError::Duplicate) => Ok(duplicate_name()),
            Err(JoinError::Failed(e)) => Err(e),
        }
    }

    async fn send(&self, session: Session, body: Value) -> Result<Value, HandlerError> {
        let (Some(uid), Some(Value::String(rid))) = (session.uid(), session.get("rid")) else {
            return Err(HandlerError::new("send before enter"));
        };
        let from = username_of(&uid).to_owned();
        let target = match body.get("target") {
            Some(Value::String(t)) => t.clone(),
            _ => return Err(HandlerError::new("send needs a target")),
        };
        let content = body.get("content").cloned().unwrap_or(Value::Null);
        self.rooms.send(&session, ChatSend { rid, from, content, target }).await?;
        // Pomelo answers `{route: msg.route}`, which serialises as `{}`.
        Ok(json!({}))
    }
}

fn username_of(uid: &str) -> &str {
    uid.split('*').next().unwrap_or(uid)
}

impl Handler for Connector {
    fn routes(&self) -> Vec<String> {
        [ENTER, SEND].iter().map(|r| r.to_string()).collect()
    }

    fn handle<'a>(&'a self, req: Request) -> BoxFuture<'a, Result<Value, HandlerError>> {
        Box::pin(async move {
            match req.route.as_str() {
                ENTER => self.enter(req.session, req.body).await,
                SEND => self.send(req.session, req.body).await,
                other => Err(HandlerError::new(format!("connector has no route {other}"))),
            }
        })
    }

    fn on_close<'a>(&'a self, session: Session) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            if let (Some(uid), Some(Value::String(rid))) = (session.uid(), session.get("rid")) {
                self.rooms.leave(&session, &uid, &rid).await;
            }
        })
    }
}

struct Member {
    uid: String,
    session: Session,
}

/// Rooms held in this process: a room is its members in join order.
#[derive(Default)]
pub struct LocalRooms {
    rooms: Mutex<HashMap<String, Vec<Member>>>,
}

impl LocalRooms {
    pub fn new() -> LocalRooms {
        LocalRooms::default()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Vec<Member>>> {
        self.rooms.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Members of a room, for tests and the dashboard.
    pub fn members(&self, rid: &str) -> Vec<String> {
        self.lock().get(rid).map(|m| m.iter().map(|m| m.uid.clone()).collect()).unwrap_or_default()
    }
}

impl Rooms for LocalRooms {
    fn join<'a>(
        &'a self,
        session: &'a Session,
        uid: &'a str,
        rid: &'a str,
    ) -> BoxFuture<'a, Result<Vec<String>, JoinError>> {
        let user = username_of(uid);
        let push = session.registry().encode_push("onAdd", &json!({"route": "onAdd", "user": user}));
        let mut rooms = self.lock();
        let members = rooms.entry(rid.to_owned()).or_default();
        if let Some(push) = push {
            for m in members.iter() {
                m.session.push_bytes(push.clone());
            }
        }
        members.push(Member { uid: uid.to_owned(), session: session.clone() });
        let users = members.iter().map(|m| username_of(&m.uid).to_owned()).collect();
        Box::pin(std::future::ready(Ok(users)))
    }

    fn leave<'a>(&'a self, session: &'a Session, uid: &'a str, rid: &'a str) -> BoxFuture<'a, ()> {
        let push = session.registry().encode_push("onLeave", &json!({"route": "onLeave", "user": username_of(uid)}));
        let mut rooms = self.lock();
        if let Some(members) = rooms.get_mut(rid) {
            members.retain(|m| !(m.uid == uid && m.session.id() == session.id()));
            if let Some(push) = push {
                for m in members.iter() {
                    m.session.push_bytes(push.clone());
                }
            }
            if members.is_empty() {
                rooms.remove(rid);
            }
        }
        Box::pin(std::future::ready(()))
    }

    fn send<'a>(&'a self, session: &'a Session, msg: ChatSend) -> BoxFuture<'a, Result<(), HandlerError>> {
        let body = json!({"msg": msg.content, "from": msg.from, "target": msg.target});
        let out = match session.registry().encode_push("onChat", &body) {
            None => Err(HandlerError::new("onChat push cannot be encoded")),
            Some(push) => {
                let rooms = self.lock();
                let members = rooms.get(&msg.rid).map(Vec::as_slice).unwrap_or_default();
                if msg.target == "*" {
                    for m in members {
                        m.session.push_bytes(push.clone());
                    }
                    Ok(())
                } else {
                    let tuid = format!("{}*{}", msg.target, msg.rid);
                    match members.iter().find(|m| m.uid == tuid) {
                        Some(m) => {
                            m.session.push_bytes(push);
                            Ok(())
                        }
                        None => Err(HandlerError::new(format!("no user {tuid} in the room"))),
                    }
                }
            }
        };
        Box::pin(std::future::ready(out))
    }
}

/// The demo's answer when the name is already in the room: `{code: 500, error: true}`.
fn duplicate_name() -> Value {
    json!({"code": 500, "error": true})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dictionary_codes_match_the_demo() {
        let d = chat_dictionary();
        assert_eq!(d.code(SEND), Some(1));
        assert_eq!(d.code(ENTER), Some(2));
        assert_eq!(d.code(crate::gate::QUERY_ENTRY), Some(3));
        assert_eq!(username_of("bob*r1"), "bob");
    }
}
