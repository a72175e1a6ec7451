//! The connector's [`Rooms`] for a cluster: every room lives on the chat server that rendezvous hashing
//! picks for it, reached through [`ChatClient`]. Failures (no chat server, timeout, refused) become
//! handler errors, which the client sees as `{"code":500}`.

use pomelo_proto::cluster::{ChatError, Member};

use crate::chat_client::{ChatClient, RpcError};
use crate::connector::{ChatSend, JoinError, Rooms};
use crate::frontend::{BoxFuture, HandlerError, Session};

pub struct ClusterRooms {
    pub client: ChatClient,
}

fn username_of(uid: &str) -> &str {
    uid.split('*').next().unwrap_or(uid)
}

impl Rooms for ClusterRooms {
    fn join<'a>(
        &'a self,
        session: &'a Session,
        uid: &'a str,
        rid: &'a str,
    ) -> BoxFuture<'a, Result<Vec<String>, JoinError>> {
        Box::pin(async move {
            let member = Member {
                rid: rid.to_string(),
                uid: uid.to_string(),
                username: username_of(uid).to_string(),
                session: session.id(),
            };
            match self.client.join(member).await {
                Ok(users) => Ok(users),
                Err(e) => {
                    // Not in a room after all: the client may try `enter` again on this session.
                    session.unbind();
                    if matches!(e, RpcError::Chat(ChatError::Duplicate { .. })) {
                        return Err(JoinError::Duplicate);
                    }
                    tracing::warn!("enter of `{uid}` failed: {e}");
                    Err(JoinError::Failed(HandlerError::new(e.to_string())))
                }
            }
        })
    }

    fn leave<'a>(&'a self, session: &'a Session, _uid: &'a str, _rid: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(self.client.leave(session.id()))
    }

    fn send<'a>(&'a self, session: &'a Session, msg: ChatSend) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            self.client.send(session.id(), msg.target, msg.content).await.map_err(|e| HandlerError::new(e.to_string()))
        })
    }
}
