//! Pomelo's message layer, the body of a DATA package:
//! `flag:1 | [id: base-128 LE varint] | [route] | body`.
//!
//! Pure encode/decode, no I/O. Decoding is total: any byte string gives a [`Message`] or a
//! [`MessageError`], never a panic. [`Message::peek`] is the decoder itself, borrowing: a [`MessageRef`]
//! into the caller's bytes with no allocation; [`Message::decode`] owns what it returns.

use bytes::{BufMut, Bytes, BytesMut};

use super::package::{self, PackageError, PackageType, HEADER_LEN};

/// Most bytes a message id may take (pomelo-protocol's `MSG_ID_MAX_BYTES`).
pub const MAX_ID_BYTES: usize = 5;
/// Longest plain route: its length is one byte.
pub const MAX_ROUTE_LEN: usize = 255;

const FLAG_COMPRESS_ROUTE: u8 = 0x01;
const FLAG_GZIP: u8 = 0x10;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageType {
    Request = 0,
    Notify = 1,
    Response = 2,
    Push = 3,
}

impl MessageType {
    pub fn from_bits(b: u8) -> Option<MessageType> {
        Some(match b {
            0 => MessageType::Request,
            1 => MessageType::Notify,
            2 => MessageType::Response,
            3 => MessageType::Push,
            _ => return None,
        })
    }

    pub fn has_id(self) -> bool {
        matches!(self, MessageType::Request | MessageType::Response)
    }

    pub fn has_route(self) -> bool {
        !matches!(self, MessageType::Response)
    }
}

/// A route as it travels: a string, or a dictionary code.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Route {
    Plain(String),
    Code(u16),
}

/// A route borrowed from the bytes it was decoded from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RouteRef<'a> {
    Plain(&'a str),
    Code(u16),
}

impl RouteRef<'_> {
    pub fn to_owned(self) -> Route {
        match self {
            RouteRef::Plain(s) => Route::Plain(s.to_owned()),
            RouteRef::Code(c) => Route::Code(c),
        }
    }
}

/// A message borrowed from the DATA body it was decoded from; the fields are [`Message`]'s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageRef<'a> {
    pub kind: MessageType,
    pub id: u32,
    pub route: Option<RouteRef<'a>>,
    pub gzip: bool,
    pub body: &'a [u8],
}

/// One message. `route` is `None` exactly for responses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub kind: MessageType,
    /// Request and response ids; 0 for notify and push.
    pub id: u32,
    pub route: Option<Route>,
    /// Flag bit 4. Pomelo 2.2.7 never sets it; kept so a decode/encode round trip is exact.
    pub gzip: bool,
    pub body: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    #[error("empty message")]
    Empty,
    #[error("unknown message type {0} in flag byte")]
    UnknownType(u8),
    #[error("message id is truncated or longer than 5 bytes")]
    BadId,
    #[error("message id does not fit in 32 bits")]
    IdOverflow,
    #[error("message route is truncated")]
    TruncatedRoute,
    #[error("message route is not UTF-8")]
    RouteNotUtf8,
    #[error("route of {0} bytes is over 255")]
    RouteTooLong(usize),
    #[error("a {0:?} message needs a route")]
    MissingRoute(MessageType),
    #[error(transparent)]
    Package(#[from] PackageError),
}

impl Message {
    pub fn request(id: u32, route: Route, body: impl Into<Bytes>) -> Message {
        Message { kind: MessageType::Request, id, route: Some(route), gzip: false, body: body.into() }
    }
    pub fn notify(route: Route, body: impl Into<Bytes>) -> Message {
        Message { kind: MessageType::Notify, id: 0, route: Some(route), gzip: false, body: body.into() }
    }
    pub fn response(id: u32, body: impl Into<Bytes>) -> Message {
        Message { kind: MessageType::Response, id, route: None, gzip: false, body: body.into() }
    }
    pub fn push(route: Route, body: impl Into<Bytes>) -> Message {
        Message { kind: MessageType::Push, id: 0, route: Some(route), gzip: false, body: body.into() }
    }

    /// Bytes this message takes when encoded.
    pub fn encoded_len(&self) -> usize {
        let id = if self.kind.has_id() { varint_len(self.id) } else { 0 };
        let route = match (&self.route, self.kind.has_route()) {
            (Some(Route::Code(_)), true) => 2,
            (Some(Route::Plain(s)), true) => 1 + s.len(),
            _ => 0,
        };
        1 + id + route + self.body.len()
    }

    /// Appends the encoded message to `out`.
    pub fn encode_into(&self, out: &mut BytesMut) -> Result<(), MessageError> {
        let route = if self.kind.has_route() {
            let r = self.route.as_ref().ok_or(MessageError::MissingRoute(self.kind))?;
            if let Route::Plain(s) = r {
                if s.len() > MAX_ROUTE_LEN {
                    return Err(MessageError::RouteTooLong(s.len()));
                }
            }
            Some(r)
        } else {
            None
        };
        let mut flag = (self.kind as u8) << 1;
        if matches!(route, Some(Route::Code(_))) {
            flag |= FLAG_COMPRESS_ROUTE;
        }
        if self.gzip {
            flag |= FLAG_GZIP;
        }
        out.reserve(self.encoded_len());
        out.put_u8(flag);
        if self.kind.has_id() {
            put_varint(out, self.id);
        }
        match route {
            Some(Route::Code(c)) => out.put_u16(*c),
            Some(Route::Plain(s)) => {
                // Checked above: at most 255.
                out.put_u8(s.len() as u8);
                out.put_slice(s.as_bytes());
            }
            None => {}
        }
        out.put_slice(&self.body);
        Ok(())
    }

    pub fn encode(&self) -> Result<Bytes, MessageError> {
        let mut out = BytesMut::with_capacity(self.encoded_len());
        self.encode_into(&mut out)?;
        Ok(out.freeze())
    }

    /// Encodes the message wrapped in a DATA package, in one allocation, ready to share between sessions.
    pub fn encode_package(&self) -> Result<Bytes, MessageError> {
        let len = self.encoded_len();
        let mut out = BytesMut::with_capacity(HEADER_LEN + len);
        package::put_header(&mut out, PackageType::Data, len)?;
        self.encode_into(&mut out)?;
        Ok(out.freeze())
    }

    /// Decodes a DATA package body. The returned body shares `buf`'s memory.
    pub fn decode(buf: &Bytes) -> Result<Message, MessageError> {
        let m = Message::peek(buf)?;
        let at = buf.len() - m.body.len();
        Ok(Message {
            kind: m.kind,
            id: m.id,
            route: m.route.map(RouteRef::to_owned),
            gzip: m.gzip,
            body: buf.slice(at..),
        })
    }

    /// Decodes a DATA package body without allocating: everything borrows from `bytes`.
    #[inline]
    pub fn peek(bytes: &[u8]) -> Result<MessageRef<'_>, MessageError> {
        let (&flag, rest) = bytes.split_first().ok_or(MessageError::Empty)?;
        let kind_bits = (flag >> 1) & 0x07;
        let kind = MessageType::from_bits(kind_bits).ok_or(MessageError::UnknownType(kind_bits))?;
        let mut pos = 1;
        let mut id = 0;
        if kind.has_id() {
            let (v, n) = read_varint(rest)?;
            id = v;
            pos += n;
        }
        let mut route = None;
        if kind.has_route() {
            let rest = bytes.get(pos..).unwrap_or_default();
            if flag & FLAG_COMPRESS_ROUTE != 0 {
                let code = rest.get(..2).ok_or(MessageError::TruncatedRoute)?;
                route = Some(RouteRef::Code(u16::from_be_bytes([code[0], code[1]])));
                pos += 2;
            } else {
                let (&len, rest) = rest.split_first().ok_or(MessageError::TruncatedRoute)?;
                let raw = rest.get(..len as usize).ok_or(MessageError::TruncatedRoute)?;
                let s = std::str::from_utf8(raw).map_err(|_| MessageError::RouteNotUtf8)?;
                route = Some(RouteRef::Plain(s));
                pos += 1 + len as usize;
            }
        }
        let body = bytes.get(pos..).unwrap_or_default();
        Ok(MessageRef { kind, id, route, gzip: flag & FLAG_GZIP != 0, body })
    }
}

/// Bytes of the base-128 varint for `v`.
pub fn varint_len(mut v: u32) -> usize {
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

/// Little-endian base-128: low 7 bits first, high bit set when more bytes follow.
pub fn put_varint(out: &mut BytesMut, mut v: u32) {
    while v >= 0x80 {
        out.put_u8((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    out.put_u8(v as u8);
}

/// Reads a varint of at most 5 bytes; returns the value and the bytes used.
#[inline]
pub fn read_varint(bytes: &[u8]) -> Result<(u32, usize), MessageError> {
    let mut v: u64 = 0;
    for (i, &b) in bytes.iter().take(MAX_ID_BYTES).enumerate() {
        v |= u64::from(b & 0x7f) << (7 * i);
        if b < 0x80 {
            return u32::try_from(v).map(|v| (v, i + 1)).map_err(|_| MessageError::IdOverflow);
        }
    }
    Err(MessageError::BadId)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>().join(" ")
    }

    #[test]
    fn varints() {
        for (v, want) in [
            (1u32, &[0x01u8][..]),
            (127, &[0x7f]),
            (128, &[0x80, 0x01]),
            (300, &[0xac, 0x02]),
            (16383, &[0xff, 0x7f]),
            (16384, &[0x80, 0x80, 0x01]),
            (1 << 21, &[0x80, 0x80, 0x80, 0x01]),
            (u32::MAX, &[0xff, 0xff, 0xff, 0xff, 0x0f]),
        ] {
            let mut out = BytesMut::new();
            put_varint(&mut out, v);
            assert_eq!(&out[..], want, "{v}");
            assert_eq!(varint_len(v), want.len());
            assert_eq!(read_varint(want), Ok((v, want.len())));
        }
        assert_eq!(read_varint(&[0x80, 0x80]), Err(MessageError::BadId));
        assert_eq!(read_varint(&[0x80, 0x80, 0x80, 0x80, 0x80, 0x01]), Err(MessageError::BadId));
        assert_eq!(read_varint(&[0xff, 0xff, 0xff, 0xff, 0x1f]), Err(MessageError::IdOverflow));
    }

    #[test]
    fn gate_request_worked_bytes() {
        let m = Message::request(1, Route::Plain("gate.gateHandler.queryEntry".into()), &br#"{"uid":"bob"}"#[..]);
        let p = m.encode_package().unwrap();
        assert_eq!(hex(&p[..7]), "04 00 00 2b 00 01 1b");
        assert_eq!(&p[7..34], b"gate.gateHandler.queryEntry");
        assert_eq!(hex(&p[34..]), "7b 22 75 69 64 22 3a 22 62 6f 62 22 7d");
        assert_eq!(Message::decode(&p.slice(4..)).unwrap(), m);
    }

    #[test]
    fn gate_response_worked_bytes() {
        let body = br#"{"code":200,"host":"127.0.0.1","port":3051}"#;
        let p = Message::response(1, &body[..]).encode_package().unwrap();
        assert_eq!(hex(&p[..6]), "04 00 00 2d 04 01");
        assert_eq!(hex(&p[6..12]), "7b 22 63 6f 64 65");
        assert_eq!(&p[6..], body);
    }

    #[test]
    fn compressed_request_worked_bytes() {
        let m = Message::request(1, Route::Code(2), &br#"{"username":"bob","rid":"r1"}"#[..]);
        let p = m.encode_package().unwrap();
        assert_eq!(
            hex(&p),
            "04 00 00 21 01 01 00 02 7b 22 75 73 65 72 6e 61 6d 65 22 3a 22 62 6f 62 22 2c 22 72 69 64 22 3a 22 72 31 22 7d"
        );
        let with_300 = Message { id: 300, ..m.clone() }.encode().unwrap();
        assert_eq!(hex(&with_300[..4]), "01 ac 02 00");
        assert_eq!(Message::decode(&p.slice(4..)).unwrap(), m);
    }

    #[test]
    fn push_and_error_worked_bytes() {
        let p = Message::push(Route::Plain("onAdd".into()), &br#"{"route":"onAdd","user":"bob"}"#[..])
            .encode_package()
            .unwrap();
        assert_eq!(hex(&p[..11]), "04 00 00 25 06 05 6f 6e 41 64 64");
        assert_eq!(hex(&p[11..15]), "7b 22 72 6f");
        let e = Message::response(7, &br#"{"code":500}"#[..]).encode_package().unwrap();
        assert_eq!(hex(&e[..6]), "04 00 00 0e 04 07");
        assert_eq!(&e[6..], br#"{"code":500}"#);
        let c = Message::push(Route::Code(0x1234), "").encode().unwrap();
        assert_eq!(hex(&c), "07 12 34");
        let n = Message::notify(Route::Code(1), "x").encode().unwrap();
        assert_eq!(hex(&n), "03 00 01 78");
    }

    #[test]
    fn decode_errors_and_edge_cases() {
        let d = |b: &[u8]| Message::decode(&Bytes::copy_from_slice(b));
        assert_eq!(d(&[]), Err(MessageError::Empty));
        assert_eq!(d(&[0x08]), Err(MessageError::UnknownType(4)));
        assert_eq!(d(&[0x00]), Err(MessageError::BadId));
        assert_eq!(d(&[0x00, 0x01]), Err(MessageError::TruncatedRoute));
        assert_eq!(d(&[0x00, 0x01, 0x03, b'a']), Err(MessageError::TruncatedRoute));
        assert_eq!(d(&[0x01, 0x01, 0x00]), Err(MessageError::TruncatedRoute));
        assert_eq!(d(&[0x02, 0x01, 0xff]), Err(MessageError::RouteNotUtf8));
        // Empty route and empty body are valid.
        let m = d(&[0x02, 0x00]).unwrap();
        assert_eq!(m.route, Some(Route::Plain(String::new())));
        assert!(m.body.is_empty());
        // A response ignores the compress bit and has no route.
        let m = d(&[0x05, 0x02, b'{', b'}']).unwrap();
        assert_eq!((m.kind, m.id, m.route, &m.body[..]), (MessageType::Response, 2, None, &b"{}"[..]));
        assert!(d(&[0x12, 0x00]).unwrap().gzip);
    }

    #[test]
    fn encode_refuses_what_pomelo_refuses() {
        let long = "x".repeat(256);
        assert_eq!(Message::notify(Route::Plain(long), "").encode(), Err(MessageError::RouteTooLong(256)));
        let m = Message { kind: MessageType::Push, id: 0, route: None, gzip: false, body: Bytes::new() };
        assert_eq!(m.encode(), Err(MessageError::MissingRoute(MessageType::Push)));
    }
}
