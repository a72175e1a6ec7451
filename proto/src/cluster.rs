//! Cluster RPC between connectors and chat servers.
//!
//! One TCP link per connector–chat pair, opened by the connector, framed by
//! [`crate::link::cluster_codec`]. It opens with the handshake of [`crate::auth`] over the link key of the
//! pair: [`ToChat::Hello`] (connector id, nonce), [`FromChat::Challenge`] (the chat server's nonce and
//! proof), [`ToChat::Proof`] only if that proof holds, then [`FromChat::Welcome`]; frames before the welcome
//! are capped at [`crate::auth::HANDSHAKE_MAX_FRAME`]. A frame's first byte says what follows:
//!
//! - `J` + JSON: a [`ToChat`] (connector → chat) or [`FromChat`] (chat → connector) message;
//! - `D` + binary: a delivery, chat → connector: `u32 n | n × u64 session id | payload`, where the payload
//!   is a complete Pomelo package encoded **once** by the chat server; the connector hands the same
//!   [`Bytes`] to every session named, without copying it.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

/// What [`decode`] fails with: the one frame error of every link.
pub use crate::link::FrameError;

/// A re-join is split into frames of about this many bytes of members, far below [`crate::link::CLUSTER_MAX_FRAME`], so no
/// number of members can make it unsendable.
pub const REJOIN_CHUNK_BYTES: usize = 512 << 10;

/// One member of a room as the connector knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub rid: String,
    /// `username*rid`, Pomelo's uid.
    pub uid: String,
    pub username: String,
    /// Session id on the connector.
    pub session: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum ToChat {
    /// First frame on a link: who the connector claims to be, and its nonce.
    Hello {
        connector: String,
        nonce: String,
    },
    /// The connector's proof, sent once the chat server's challenge checked out.
    Proof {
        proof: String,
    },
    Request {
        id: u64,
        req: ChatRequest,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ChatRequest {
    /// A user enters a room: `onAdd` to the others, answered with the room's user names and its
    /// history position. With `since`, the messages after it are pushed to the member first (answered
    /// `recovered: true`), or the reply says `recovered: false` when the history no longer covers them.
    Join {
        member: Member,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        since: Option<Since>,
    },
    /// A user leaves: `onLeave` to the others.
    Leave { member: Member },
    /// `chat.chatHandler.send`: to everyone (`target == "*"`, sender included) or to one user name.
    Send { rid: String, from: String, target: String, content: serde_json::Value },
    /// Every member of the connector whose room this chat server owns, sent on every new link and every
    /// membership the connector receives. Authoritative: it *replaces* that connector's members here
    /// (members missing here are added without `onAdd`; members of that connector not listed are ghosts
    /// and leave with `onLeave`). Split over several frames, all but the last with `more: true`.
    Rejoin {
        members: Vec<Member>,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        more: bool,
    },
    /// `chat.chatHandler.history`: stored messages of `rid` that `username` may see: after `since`, or
    /// else the last `limit` before `before` (or the newest).
    History {
        rid: String,
        username: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        since: Option<Since>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        before: Option<u64>,
        limit: u32,
    },
}

/// A place in a room's history: the room's epoch (a new one means history was lost) and the offset of
/// a message in it (the first message of an epoch is 1; 0 is "before any").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Since {
    pub epoch: String,
    pub offset: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum FromChat {
    /// The chat server's answer to a hello: its id, its nonce and its proof.
    Challenge {
        chat: String,
        nonce: String,
        proof: String,
    },
    Welcome {
        chat: String,
    },
    Response {
        id: u64,
        result: Result<ChatReply, ChatError>,
    },
    /// Deliveries to these sessions were dropped (this connector's outbox was full): the connector kicks
    /// them with a reason, and they recover from the room's history when they come back with `since`.
    Lost {
        sessions: Vec<u64>,
    },
    /// The set of chat servers changed and this one now reckons room ownership over `chats`: a connector
    /// that agrees sends its re-join (one that does not will re-join on its own membership change). Without
    /// it, a connector that learnt of the change first re-joined a chat server that did not own the rooms
    /// yet, and the rooms stayed empty.
    Rejoin {
        chats: Vec<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "r", rename_all = "snake_case")]
pub enum ChatReply {
    Users {
        users: Vec<String>,
        /// Where the room's history is now (empty epoch from a chat server that keeps none).
        #[serde(default, skip_serializing_if = "String::is_empty")]
        epoch: String,
        #[serde(default)]
        offset: u64,
        /// Whether the join's `since` was recovered; `None` without `since`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        recovered: Option<bool>,
        /// `recovered: false` because the gap is more than a join pushes, though the history covers it:
        /// the client pages through `chat.chatHandler.history` from its `since`.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        paged: bool,
    },
    Done,
    /// The answer to [`ChatRequest::History`]: `messages` are `onChat` bodies with their offsets, oldest first.
    History {
        epoch: String,
        offset: u64,
        recovered: bool,
        messages: Vec<serde_json::Value>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "e", rename_all = "snake_case")]
pub enum ChatError {
    #[error("`{uid}` is already in the room")]
    Duplicate { uid: String },
    #[error("this chat server does not own room `{rid}`")]
    NotOwner { rid: String },
    /// A configured limit (`maxRoomMembers`, `maxRooms`) refused a join; `msg` says which.
    #[error("{msg}")]
    Full { msg: String },
    #[error("{msg}")]
    Other { msg: String },
}

/// A decoded cluster frame.
#[derive(Debug, PartialEq)]
pub enum Frame<T> {
    Msg(T),
    Deliver { sessions: Vec<u64>, payload: Bytes },
}

pub fn encode_msg<T: Serialize>(msg: &T) -> Bytes {
    let mut out = BytesMut::with_capacity(128);
    out.put_u8(b'J');
    // Serializing these plain enums cannot fail.
    out.extend_from_slice(&serde_json::to_vec(msg).unwrap_or_default());
    out.freeze()
}

pub fn encode_deliver(sessions: &[u64], payload: &[u8]) -> Bytes {
    encode_deliver_parts(sessions, &[payload])
}

/// A delivery whose payload is several packages, written one after the other (the connector hands
/// them to each session as one write).
pub fn encode_deliver_parts<P: AsRef<[u8]>>(sessions: &[u64], parts: &[P]) -> Bytes {
    let len: usize = parts.iter().map(|p| p.as_ref().len()).sum();
    let mut out = BytesMut::with_capacity(5 + sessions.len() * 8 + len);
    out.put_u8(b'D');
    out.put_u32(sessions.len() as u32);
    for s in sessions {
        out.put_u64(*s);
    }
    for p in parts {
        out.extend_from_slice(p.as_ref());
    }
    out.freeze()
}

/// The request id of a `J` frame whose message did not decode (too deep, a field of the wrong type), so
/// that one request can be answered with an error instead of the link being closed. serde_json skips
/// the unknown fields without a recursion limit and without building them.
pub fn request_id(frame: &[u8]) -> Option<u64> {
    #[derive(Deserialize)]
    struct Head {
        t: String,
        id: u64,
    }
    let head: Head = serde_json::from_slice(frame.strip_prefix(b"J")?).ok()?;
    (head.t == "request").then_some(head.id)
}

/// Decodes a frame; the payload of a delivery shares the frame's memory.
pub fn decode<T: for<'de> Deserialize<'de>>(frame: Bytes) -> Result<Frame<T>, FrameError> {
    let mut buf = frame;
    if buf.is_empty() {
        return Err(FrameError::Empty);
    }
    match buf.get_u8() {
        b'J' => Ok(Frame::Msg(serde_json::from_slice(&buf)?)),
        b'D' => {
            if buf.len() < 4 {
                return Err(FrameError::Truncated);
            }
            let n = buf.get_u32() as usize;
            if buf.len() < n.saturating_mul(8) {
                return Err(FrameError::Truncated);
            }
            let sessions = (0..n).map(|_| buf.get_u64()).collect();
            Ok(Frame::Deliver { sessions, payload: buf })
        }
        t => Err(FrameError::Tag(t)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_and_deliveries_round_trip() {
        let m = ToChat::Request {
            id: 9,
            req: ChatRequest::Send {
                rid: "r".into(),
                from: "bob".into(),
                target: "*".into(),
                content: serde_json::json!("hi"),
            },
        };
        assert_eq!(decode::<ToChat>(encode_msg(&m)).expect("decode"), Frame::Msg(m));
        assert_eq!(encode_deliver_parts(&[7], &[&b"ab"[..], b"c"]), encode_deliver(&[7], b"abc"));
        let d = encode_deliver(&[1, 2, u64::MAX], b"\x04\x00\x00\x01x");
        match decode::<FromChat>(d).expect("decode") {
            Frame::Deliver { sessions, payload } => {
                assert_eq!(sessions, [1, 2, u64::MAX]);
                assert_eq!(&payload[..], b"\x04\x00\x00\x01x");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_request_too_deep_to_decode_still_has_its_id() {
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        let frame = format!(r#"J{{"t":"request","id":42,"req":{{"op":"send","rid":"r","content":{deep}}}}}"#);
        assert!(decode::<ToChat>(Bytes::from(frame.clone())).is_err(), "deeper than serde_json's limit");
        assert_eq!(request_id(frame.as_bytes()), Some(42));
        assert_eq!(request_id(br#"J{"t":"hello","id":1}"#), None);
        assert_eq!(request_id(b"J{"), None);
        assert_eq!(request_id(b"D\x00"), None);
        let r = ToChat::Request { id: 3, req: ChatRequest::Rejoin { members: vec![], more: false } };
        assert_eq!(
            String::from_utf8_lossy(&encode_msg(&r)[1..]),
            r#"{"t":"request","id":3,"req":{"op":"rejoin","members":[]}}"#
        );
    }

    #[test]
    fn bad_frames_are_errors_not_panics() {
        assert!(decode::<FromChat>(Bytes::new()).is_err());
        assert!(decode::<FromChat>(Bytes::from_static(b"X")).is_err());
        assert!(decode::<FromChat>(Bytes::from_static(b"D\x00\x00")).is_err());
        assert!(decode::<FromChat>(Bytes::from_static(b"D\xff\xff\xff\xff\x00")).is_err());
        assert!(decode::<FromChat>(Bytes::from_static(b"J{")).is_err());
    }
}
