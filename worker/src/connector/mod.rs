//! The connector: `connector.entryHandler.enter {username, rid, since?}`, `chat.chatHandler.send` and
//! `chat.chatHandler.history {rid, since?, before?, limit?}`, as in chatofpomelo-websocket plus room
//! history (issue 16), with room membership behind the [`Rooms`] trait. `enter` answers `{users}` plus
//! where the room's history is (`epoch`, `offset`) and, with `since: {epoch, offset}`, `recovered`: the
//! missed messages are pushed first, or `false` says they are lost.
//!
//! - [`Connector`] (this file) is the handler: it checks what the client sent, binds the session's uid
//!   and hands joins, sends and leaves to its [`Rooms`];
//! - [`rooms`]: the [`Rooms`] trait and [`ClusterRooms`], its implementation over cluster RPC;
//! - [`rpc`]: [`ChatClient`], calls with timeouts, following the membership, and the one record of
//!   which room each session is in; `link` (private): one task per chat server (connect with backoff,
//!   authoritative re-joins, request ids and pending answers, deliveries);
//! - [`placement`]: the pure rules of which chat server holds which members;
//! - [`metrics`]: the RPC counters and latency histogram.
//!
//! Client input is checked here, before any RPC: names that could pass for another user or forge log
//! lines, and bodies nested deeper than [`MAX_DEPTH`], are refused with a clear `{"code":500, message}`.
//!
//! The handler has no tasks of its own: it runs in the calling connection's task, and a session's leave
//! runs from its `on_close`. The RPC tasks belong to [`ChatClient`] and end with the shutdown token.

mod link;
pub mod metrics;
pub mod placement;
pub mod rooms;
pub mod rpc;

use std::sync::Arc;

use pomelo_proto::cluster::{Member, Since};
use serde_json::{json, Value};

pub use rooms::{ChatSend, ClusterRooms, HistoryQuery, JoinError, Joined, Rooms};
pub use rpc::ChatClient;

use metrics::RpcMetrics;

use crate::frontend::{BoxFuture, Handler, HandlerError, Request, Session};
use crate::routes::{ENTER, HISTORY, SEND};

/// Longest username or room name accepted by default (`maxNameLength`; the demo client allows 20 characters).
pub const MAX_NAME_BYTES: usize = pomelo_proto::config::DEFAULT_MAX_NAME_BYTES;

/// Deepest body accepted (arrays and objects inside each other). A chat message travels two levels
/// deeper inside the cluster request, and every decoder on the way allows 127; refusing at 32 leaves a
/// wide margin and costs no real client anything.
pub const MAX_DEPTH: usize = 32;

/// Why a name cannot be a username or room id: `*` joins them into the uid (`username*rid`), so it would
/// let one user appear as another; control characters forge log lines; bidirectional controls make one
/// name look like another.
fn name_problem(name: &str) -> Option<&'static str> {
    name.chars().find_map(|c| match c {
        '*' => Some("'*'"),
        c if c.is_control() => Some("control characters"),
        '\u{200e}' | '\u{200f}' | '\u{061c}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' => {
            Some("bidirectional control characters")
        }
        _ => None,
    })
}

/// How deeply arrays and objects nest in `v` (a scalar is 0), without recursion.
fn depth(v: &Value) -> usize {
    let mut max = 0;
    let mut stack = vec![(v, 0usize)];
    while let Some((v, d)) = stack.pop() {
        let children: Box<dyn Iterator<Item = &Value>> = match v {
            Value::Array(a) => Box::new(a.iter()),
            Value::Object(o) => Box::new(o.values()),
            _ => continue,
        };
        max = max.max(d + 1);
        stack.extend(children.map(|c| (c, d + 1)));
    }
    max
}

/// An optional `since: {epoch, offset}` in a body; `Err` says what is wrong with it.
fn since(body: &Value) -> Result<Option<Since>, String> {
    let s = match body.get("since") {
        None | Some(Value::Null) => return Ok(None),
        Some(s) => s,
    };
    let epoch = s.get("epoch").and_then(Value::as_str).filter(|e| e.len() <= MAX_NAME_BYTES);
    match (epoch, s.get("offset").and_then(Value::as_u64)) {
        (Some(epoch), Some(offset)) => Ok(Some(Since { epoch: epoch.to_string(), offset })),
        _ => {
            Err(format!("since must be {{epoch: a string of at most {MAX_NAME_BYTES} bytes, offset: a whole number}}"))
        }
    }
}

/// Messages one `history` request asks for unless it says.
pub const HISTORY_PAGE: u32 = 50;

/// A refusal the client can show: `{code: 500, message}`.
fn refused(message: String) -> Value {
    json!({"code": 500, "message": message})
}

pub struct Connector {
    rooms: Arc<dyn Rooms>,
    metrics: Arc<RpcMetrics>,
    max_name: usize,
}

impl Connector {
    pub fn new(rooms: Arc<dyn Rooms>) -> Connector {
        Connector::with_metrics(rooms, Arc::default())
    }

    /// A connector that counts the requests it refuses in `metrics` (`requests_refused_total`).
    pub fn with_metrics(rooms: Arc<dyn Rooms>, metrics: Arc<RpcMetrics>) -> Connector {
        Connector { rooms, metrics, max_name: MAX_NAME_BYTES }
    }

    /// Longest username or room id, in bytes (`maxNameLength`).
    pub fn with_max_name(mut self, bytes: usize) -> Connector {
        self.max_name = bytes;
        self
    }

    async fn enter(&self, session: Session, body: Value) -> Result<Value, HandlerError> {
        let max = self.max_name;
        let field = |k: &str| match body.get(k) {
            Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
            _ => Err(HandlerError::new(format!("enter needs a non-empty {k} of at most {max} bytes"))),
        };
        let (username, rid) = (field("username")?, field("rid")?);
        for (what, name) in [("username", &username), ("rid", &rid)] {
            if name.len() > max {
                self.metrics.refused();
                // `maxNameLength`; `error: true` as for a taken name: the demo client asks for another name.
                let message = format!("a {what} may be at most {max} bytes (maxNameLength)");
                return Ok(json!({"code": 500, "error": true, "message": message}));
            }
            if let Some(bad) = name_problem(name) {
                self.metrics.refused();
                tracing::debug!(session = session.id(), "enter refused: {what} {name:?} contains {bad}");
                // `error: true` as for a taken name: the demo client asks for another name.
                return Ok(json!({"code": 500, "error": true, "message": format!("a {what} cannot contain {bad}")}));
            }
        }
        let since = match since(&body) {
            Ok(s) => s,
            Err(e) => {
                self.metrics.refused();
                return Ok(refused(e));
            }
        };
        let uid = format!("{username}*{rid}");
        if !session.registry().get_by_uid(&uid).is_empty() {
            return Ok(duplicate_name());
        }
        session.bind(&uid).map_err(|e| HandlerError::new(e.to_string()))?;
        let member = Member { rid, uid, username, session: session.id() };
        match self.rooms.join(&session, member, since).await {
            Ok(j) => {
                let mut reply = json!({"users": j.users});
                if let Some(at) = j.at {
                    reply["epoch"] = json!(at.epoch);
                    reply["offset"] = json!(at.offset);
                }
                if let Some(r) = j.recovered {
                    reply["recovered"] = json!(r);
                }
                if j.paged {
                    reply["paged"] = json!(true);
                }
                Ok(reply)
            }
            Err(e) => {
                // Not in a room after all: the client may try `enter` again on this session.
                session.unbind();
                match e {
                    JoinError::Duplicate => Ok(duplicate_name()),
                    JoinError::Full(msg) => {
                        self.metrics.refused();
                        Ok(refused(msg))
                    }
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

    async fn history(&self, session: Session, body: Value) -> Result<Value, HandlerError> {
        let Some(uid) = session.uid() else { return Err(HandlerError::new("history before enter")) };
        let own = uid.split_once('*').map_or("", |(_, r)| r);
        match body.get("rid") {
            None | Some(Value::Null) => {}
            Some(Value::String(r)) if r == own => {}
            Some(_) => return Ok(refused("history is kept for your own room only".into())),
        }
        let since = match since(&body) {
            Ok(s) => s,
            Err(e) => return Ok(refused(e)),
        };
        let before = body.get("before").and_then(Value::as_u64);
        let limit =
            body.get("limit").and_then(Value::as_u64).map_or(HISTORY_PAGE, |l| l.min(u64::from(u32::MAX)) as u32);
        self.rooms.history(&session, HistoryQuery { since, before, limit }).await
    }
}

impl Handler for Connector {
    fn routes(&self) -> Vec<String> {
        [ENTER, SEND, HISTORY].iter().map(|r| r.to_string()).collect()
    }

    fn handle<'a>(&'a self, req: Request) -> BoxFuture<'a, Result<Value, HandlerError>> {
        Box::pin(async move {
            if depth(&req.body) > MAX_DEPTH {
                self.metrics.refused();
                tracing::debug!(
                    session = req.session.id(),
                    "{} refused: body nested deeper than {MAX_DEPTH}",
                    req.route
                );
                return Ok(refused(format!("the message is nested deeper than {MAX_DEPTH} levels")));
            }
            match req.route.as_str() {
                ENTER => self.enter(req.session, req.body).await,
                SEND => self.send(req.session, req.body).await,
                HISTORY => self.history(req.session, req.body).await,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_pass_for_others_are_refused() {
        for ok in ["alice", "Ann Lee", "中文", "émile", "r-1_x"] {
            assert_eq!(name_problem(ok), None, "{ok:?}");
        }
        for bad in ["alice*x", "a\nb", "nul\0", "tab\t", "\u{202e}ecila", "a\u{2066}b", "\u{200f}x", "del\u{7f}"] {
            assert!(name_problem(bad).is_some(), "{bad:?}");
        }
    }

    #[test]
    fn depth_counts_nesting_without_recursion() {
        assert_eq!(depth(&json!("x")), 0);
        assert_eq!(depth(&json!({"a": [1, {"b": []}]})), 4);
        let mut v = json!(0);
        for _ in 0..100_000 {
            v = Value::Array(vec![v]);
        }
        assert_eq!(depth(&v), 100_000);
        // Dropping a value this deep recurses in serde_json; leak it, this is a test.
        std::mem::forget(v);
    }
}
