//! The connector: `connector.entryHandler.enter {username, rid}` and `chat.chatHandler.send`, as in
//! chatofpomelo-websocket, with room membership behind the [`Rooms`] trait.
//!
//! - [`Connector`] (this file) is the handler: it checks what the client sent, binds the session's uid
//!   and hands joins, sends and leaves to its [`Rooms`];
//! - [`rooms`]: the [`Rooms`] trait and [`ClusterRooms`], its implementation over cluster RPC;
//! - [`rpc`]: [`ChatClient`], the links to the chat servers, request ids, pending answers and timeouts,
//!   and the one record of which room each session is in;
//! - [`placement`]: the pure rules of which chat server holds which members;
//! - [`metrics`]: the RPC counters and latency histogram.
//!
//! The handler has no tasks of its own: it runs in the calling connection's task, and a session's leave
//! runs from its `on_close`. The RPC tasks belong to [`ChatClient`] and end with the shutdown token.

mod link;
pub mod metrics;
pub mod placement;
pub mod rooms;
pub mod rpc;

use std::sync::Arc;

use pomelo_proto::cluster::Member;
use serde_json::{json, Value};

pub use rooms::{ChatSend, ClusterRooms, JoinError, Rooms};
pub use rpc::ChatClient;

use crate::frontend::{BoxFuture, Handler, HandlerError, Request, Session};
use crate::routes::{ENTER, SEND};

/// Longest username or room name accepted (the demo client allows 20 characters).
pub const MAX_NAME_BYTES: usize = 64;

pub struct Connector {
    rooms: Arc<dyn Rooms>,
}

impl Connector {
    pub fn new(rooms: Arc<dyn Rooms>) -> Connector {
        Connector { rooms }
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
        let member = Member { rid, uid, username, session: session.id() };
        match self.rooms.join(&session, member).await {
            Ok(users) => Ok(json!({"users": users})),
            Err(e) => {
                // Not in a room after all: the client may try `enter` again on this session.
                session.unbind();
                match e {
                    JoinError::Duplicate => Ok(duplicate_name()),
                    JoinError::Failed(e) => Err(e),
                }
            }
        }
    }

    async fn send(&self, session: Session, body: Value) -> Result<Value, HandlerError> {
        if session.uid().is_none() {
            return Err(HandlerError::new("send before enter"));
        }
        let target = match body.get("target") {
            Some(Value::String(t)) => t.clone(),
            _ => return Err(HandlerError::new("send needs a target")),
        };
        let content = body.get("content").cloned().unwrap_or(Value::Null);
        self.rooms.send(&session, ChatSend { content, target }).await?;
        // Pomelo answers `{route: msg.route}`, which serialises as `{}`.
        Ok(json!({}))
    }
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
            if session.uid().is_some() {
                self.rooms.leave(&session).await;
            }
        })
    }
}

/// The demo's answer when the name is already in the room: `{code: 500, error: true}`.
fn duplicate_name() -> Value {
    json!({"code": 500, "error": true})
}
