//! Room membership and fan-out as the connector's handler sees it: the [`Rooms`] trait, and
//! [`ClusterRooms`], its implementation for a cluster, where every room lives on the chat server that
//! the room-owner rule picks for it, reached through [`ChatClient`]. Failures (no chat server, timeout,
//! refused) become handler errors, which the client sees as `{"code":500}`. No tasks of its own.

use pomelo_proto::cluster::{ChatError, ChatReply, Member, Since};
use serde_json::{json, Value};

pub use super::rpc::Joined;
use super::rpc::{ChatClient, RpcError};
use crate::frontend::{BoxFuture, HandlerError, Session};

/// A chat message as `chat.chatHandler.send` hands it to the sender's room.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatSend {
    pub content: serde_json::Value,
    /// `"*"` for everyone, else a username in the room.
    pub target: String,
}

/// What `chat.chatHandler.history` asks for: the messages after `since`, or else the last `limit`
/// before `before` (the newest without it).
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryQuery {
    pub since: Option<Since>,
    pub before: Option<u64>,
    pub limit: u32,
}

/// Why a session could not enter its room.
#[derive(Debug, Clone, thiserror::Error)]
pub enum JoinError {
    /// The uid is already in the room (from another connector): the client sees `{code:500, error:true}`,
    /// as for a duplicate on this connector.
    #[error("already in the room")]
    Duplicate,
    /// A limit of the room's chat server (`maxRoomMembers`, `maxRooms`): the client sees `{code:500, message}`.
    #[error("{0}")]
    Full(String),
    #[error(transparent)]
    Failed(#[from] HandlerError),
}

/// Room membership and fan-out. The implementation keeps the one record of which room each session is
/// in: after a successful [`Rooms::join`], `send` and `leave` need only the session.
pub trait Rooms: Send + Sync + 'static {
    /// Adds the session to `member.rid`, pushes `onAdd` to the others, returns the usernames; with
    /// `since`, the messages after it are pushed to the session before live ones (or `recovered: false`).
    fn join<'a>(
        &'a self,
        session: &'a Session,
        member: Member,
        since: Option<Since>,
    ) -> BoxFuture<'a, Result<Joined, JoinError>>;
    /// Removes the session from its room (if any) and pushes `onLeave` to the rest.
    fn leave<'a>(&'a self, session: &'a Session) -> BoxFuture<'a, ()>;
    /// Pushes `onChat {msg, from, target}` to the session's room or to one member of it.
    fn send<'a>(&'a self, session: &'a Session, msg: ChatSend) -> BoxFuture<'a, Result<(), HandlerError>>;
    /// The stored messages of the session's room: `{epoch, offset, recovered, messages}`.
    fn history<'a>(&'a self, _session: &'a Session, _q: HistoryQuery) -> BoxFuture<'a, Result<Value, HandlerError>> {
        Box::pin(async { Err(HandlerError::new("this connector keeps no history")) })
    }
}

pub struct ClusterRooms {
    pub client: ChatClient,
}

impl Rooms for ClusterRooms {
    fn join<'a>(
        &'a self,
        _session: &'a Session,
        member: Member,
        since: Option<Since>,
    ) -> BoxFuture<'a, Result<Joined, JoinError>> {
        Box::pin(async move {
            let uid = member.uid.clone();
            match self.client.join(member, since).await {
                Ok(joined) => Ok(joined),
                Err(RpcError::Chat(ChatError::Duplicate { .. })) => Err(JoinError::Duplicate),
                Err(RpcError::Chat(ChatError::Full { msg })) => Err(JoinError::Full(msg)),
                Err(e) => {
                    tracing::warn!("enter of {uid:?} failed: {e}");
                    Err(JoinError::Failed(HandlerError::new(e.to_string())))
                }
            }
        })
    }

    fn leave<'a>(&'a self, session: &'a Session) -> BoxFuture<'a, ()> {
        Box::pin(self.client.leave(session.id()))
    }

    fn send<'a>(&'a self, session: &'a Session, msg: ChatSend) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            self.client.send(session.id(), msg.target, msg.content).await.map_err(|e| HandlerError::new(e.to_string()))
        })
    }

    fn history<'a>(&'a self, session: &'a Session, q: HistoryQuery) -> BoxFuture<'a, Result<Value, HandlerError>> {
        Box::pin(async move {
            match self.client.history(session.id(), q.since, q.before, q.limit).await {
                Ok(ChatReply::History { epoch, offset, recovered, messages }) => {
                    Ok(json!({"epoch": epoch, "offset": offset, "recovered": recovered, "messages": messages}))
                }
                Ok(_) => Err(HandlerError::new("unexpected answer to history")),
                Err(e) => Err(HandlerError::new(e.to_string())),
            }
        })
    }
}
