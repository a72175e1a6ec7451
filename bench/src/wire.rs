//! The client side of Pomelo's protocol, as cheap as a load generator needs it.
//!
//! Outgoing packages are built with `pomelo_proto::wire` (handshake, ACK, heartbeat, requests). Incoming
//! bytes are parsed by the server's own decoder in its borrowed form, so nothing is allocated and the
//! bench measures the parser the server uses: [`next_package`] is `wire::package::peek` over a plain
//! slice, and [`classify`] sorts what `Message::peek` reads: a response is its id and body, a push its
//! route and body. The
//! message content carries `sender.seq.step.due_us.lag_us.` and [`parse_chat`] reads those five numbers
//! straight out of the `onChat` JSON, which the chat server writes with `msg` first. No I/O here.

use bytes::Bytes;
use pomelo_proto::wire::{package, Message, MessageRef, MessageType, PackageType, Route, RouteRef};

pub const GATE_ROUTE: &str = "gate.gateHandler.queryEntry";
pub const ENTER_ROUTE: &str = "connector.entryHandler.enter";
pub const SEND_ROUTE: &str = "chat.chatHandler.send";

/// Largest package this client accepts (the server's pushes are small).
pub const MAX_BODY: usize = 1 << 20;

/// The client's handshake, as the JS websocket client sends it.
pub fn handshake() -> Bytes {
    let body = br#"{"sys":{"type":"pomelo-bench","version":"0.1.0","rsa":{},"protoVersion":0},"user":{}}"#;
    package::encode(PackageType::Handshake, body).unwrap_or_else(|_| package::empty(PackageType::Handshake))
}

pub fn ack() -> Bytes {
    package::empty(PackageType::HandshakeAck)
}

pub fn heartbeat() -> Bytes {
    package::empty(PackageType::Heartbeat)
}

/// A request package (`None` only for a route over 255 bytes, which this client never makes).
pub fn request(id: u32, route: Route, body: Vec<u8>) -> Option<Bytes> {
    Message::request(id, route, body).encode_package().ok()
}

/// A package split off the front of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pkg<'a> {
    pub kind: u8,
    pub body: &'a [u8],
}

/// The next whole package in `buf` and the bytes it took; `Ok(None)` if more bytes are needed.
pub fn next_package(buf: &[u8]) -> Result<Option<(Pkg<'_>, usize)>, String> {
    let peeked = package::peek(buf, MAX_BODY).map_err(|e| e.to_string())?;
    Ok(peeked.map(|(p, n)| (Pkg { kind: p.kind.as_u8(), body: p.body }, n)))
}

/// A DATA body, classified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Data<'a> {
    Response {
        id: u32,
        body: &'a [u8],
    },
    /// `route` is the route string, or empty for a dictionary-coded route.
    Push {
        route: &'a [u8],
        code: Option<u16>,
        body: &'a [u8],
    },
    Other,
}

pub fn classify(body: &[u8]) -> Data<'_> {
    match Message::peek(body) {
        Ok(MessageRef { kind: MessageType::Response, id, body, .. }) => Data::Response { id, body },
        Ok(MessageRef { kind: MessageType::Push, route: Some(route), body, .. }) => match route {
            RouteRef::Plain(r) => Data::Push { route: r.as_bytes(), code: None, body },
            RouteRef::Code(c) => Data::Push { route: &[], code: Some(c), body },
        },
        _ => Data::Other,
    }
}

/// What a chat message's content carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub sender: u32,
    pub seq: u32,
    pub step: u32,
    /// When the message was due (latency counts from here: no coordinated omission).
    pub sent_us: u64,
    /// How late the generator wrote it (due → write): latency minus this is the cluster's and the kernel's.
    pub lag_us: u64,
}

/// Writes the content of a message: the stamp, then `x` up to `payload` bytes.
pub fn content(s: Stamp, payload: usize) -> String {
    let mut c = format!("{}.{}.{}.{}.{}.", s.sender, s.seq, s.step, s.sent_us, s.lag_us);
    if c.len() < payload {
        c.extend(std::iter::repeat_n('x', payload - c.len()));
    }
    c
}

/// The `chat.chatHandler.send` body.
pub fn send_body(rid: &str, content: &str, from: &str) -> Vec<u8> {
    format!(r#"{{"rid":"{rid}","content":"{content}","from":"{from}","target":"*"}}"#).into_bytes()
}

/// Reads the stamp out of an `onChat` body `{"msg":"<stamp>...`.
pub fn parse_chat(body: &[u8]) -> Option<Stamp> {
    let rest = body.strip_prefix(br#"{"msg":""#)?;
    let mut nums = [0u64; 5];
    let mut pos = 0;
    for n in &mut nums {
        let digits = rest.get(pos..)?.iter().take_while(|b| b.is_ascii_digit()).count();
        if digits == 0 || digits > 19 || rest.get(pos + digits) != Some(&b'.') {
            return None;
        }
        for &b in &rest[pos..pos + digits] {
            *n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
        }
        pos += digits + 1;
    }
    Some(Stamp {
        sender: u32::try_from(nums[0]).ok()?,
        seq: u32::try_from(nums[1]).ok()?,
        step: u32::try_from(nums[2]).ok()?,
        sent_us: nums[3],
        lag_us: nums[4],
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use pomelo_proto::wire::encode_push;

    #[test]
    fn packages_split_and_classify() {
        let mut buf = heartbeat().to_vec();
        buf.extend_from_slice(&pomelo_proto::wire::encode_response(300, b"{}").unwrap());
        let push = encode_push(None, "onChat", br#"{"msg":"7.3.1.123456.20.xxx","from":"b7","target":"*"}"#).unwrap();
        buf.extend_from_slice(&push);
        buf.extend_from_slice(&[4, 0, 0]);
        let (p, n) = next_package(&buf).unwrap().unwrap();
        assert_eq!((p.kind, n), (3, 4));
        let (p, n2) = next_package(&buf[n..]).unwrap().unwrap();
        assert_eq!(classify(p.body), Data::Response { id: 300, body: b"{}" });
        let (p, n3) = next_package(&buf[n + n2..]).unwrap().unwrap();
        let Data::Push { route, code: None, body } = classify(p.body) else { panic!("push") };
        assert_eq!(route, b"onChat");
        assert_eq!(parse_chat(body), Some(Stamp { sender: 7, seq: 3, step: 1, sent_us: 123456, lag_us: 20 }));
        assert_eq!(next_package(&buf[n + n2 + n3..]).unwrap(), None);
        assert!(next_package(&[9, 0, 0, 0]).is_err());
    }

    #[test]
    fn content_round_trips_through_the_chat_body() {
        let s = Stamp { sender: 1999, seq: 42, step: 0, sent_us: 9_876_543_210, lag_us: 1_234 };
        let c = content(s, 100);
        assert_eq!(c.len(), 100);
        let body = format!(r#"{{"msg":"{c}","from":"b1999","target":"*"}}"#);
        assert_eq!(parse_chat(body.as_bytes()), Some(s));
        assert_eq!(parse_chat(br#"{"msg":"hello","from":"x"}"#), None);
        assert_eq!(parse_chat(br#"{"msg":"1.2.3"#), None);
        let compressed = [0x07, 0x00, 0x05, b'{', b'}'];
        assert!(matches!(classify(&compressed), Data::Push { code: Some(5), .. }));
    }
}
