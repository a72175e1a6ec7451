//! Room membership and fan-out as the connector's handler sees it: the [`Rooms`] trait, and
//! [`ClusterRooms`], its implementation for a cluster, where every room lives on the chat server that
//! the room-owner rule picks for it, reached through [`ChatClient`]. Failures (no chat server, timeout,
//! refused) become handler errors, which the client sees as `{"code":500}`. No tasks of its own.

use pomelo_proto::cluster::{ChatError, Member};

use super::rpc::{ChatClient, RpcError};
use crate::frontend::{BoxFuture, HandlerError, Session};

/// A chat message as `chat.chatHandler.send` hands it to the sender's room.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatSend {
    pub content: serde_json::Value,
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
    /// A limit of the room's chat server (`maxRoomMembers`, `maxRooms`): the client sees `{code:500, message}`.
    #[error("{0}")]
    Full(String),
    #[error(transparent)]
    Failed(#[from] HandlerError),
}

/// Room membership and fan-out. The implementation keeps the one record of which room each session is
/// in: after a successful [`Rooms::join`], `send` and `leave` need only the session.
pub trait Rooms: Send + Sync + 'static {
    /// Adds the session to `member.rid`, pushes `onAdd` to the others, returns the usernames.
    fn join<'a>(&'a self, session: &'a Session, member: Member) -> BoxFuture<'a, Result<Vec<String>, JoinError>>;
    /// Removes the session from its room (if any) and pushes `onLeave` to the rest.
    fn leave<'a>(&'a self, session: &'a Session) -> BoxFuture<'a, ()>;
    /// Pushes `onChat {msg, from, target}` to the session's room or to one member of it.
    fn send<'a>(&'a self, session: &'a Session, msg: ChatSend) -> BoxFuture<'a, Result<(), HandlerError>>;
}

pub struct ClusterRooms {
    pub client: ChatClient,
}

impl Rooms for ClusterRooms {
    fn join<'a>(&'a self, _session: &'a Session, member: Member) -> BoxFuture<'a, Result<Vec<String>, JoinError>> {
        Box::pin(async move {
            let uid = member.uid.clone();
            match self.client.join(member).await {
                Ok(users) => Ok(users),
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
}
