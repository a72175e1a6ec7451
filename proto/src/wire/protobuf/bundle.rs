//! A cluster's protobuf setting as the servers use it: both protos files compiled, the handshake's
//! `sys.protos` object written once, and the body codec per route.
//!
//! `serverProtos.json` encodes what the server sends (pushes by their route, responses by the route of
//! the request they answer); `clientProtos.json` decodes what clients send (requests and notifies by
//! route). A route without a proto keeps JSON bodies, both ways, as in Pomelo. Pure, no I/O.

use std::sync::Arc;

use serde_json::value::RawValue;
use serde_json::Value;

use super::{handshake, DecodeError, EncodeError, Protos, ProtosError, Strings};

/// The largest protos file accepted (each of the two): it travels in every handshake without a cache.
pub const MAX_PROTOS_BYTES: usize = 256 * 1024;

/// Compiled protos of one cluster (see the module docs). Build with [`ProtoBundle::new`]; share as `Arc`.
#[derive(Debug)]
pub struct ProtoBundle {
    server: Protos,
    client: Protos,
    version: String,
    /// `{"server":…,"client":…,"version":"…"}`, byte for byte what Pomelo's protobuf component sends.
    handshake: Box<RawValue>,
}

/// Which file a [`BundleError`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Server,
    Client,
}

impl Side {
    pub fn file_key(self) -> &'static str {
        match self {
            Side::Server => "serverProtos",
            Side::Client => "clientProtos",
        }
    }
}

/// A protos file that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {error}", side.file_key())]
pub struct BundleError {
    pub side: Side,
    pub error: ProtosError,
}

impl ProtoBundle {
    /// Compiles the two files' texts (`None` for a file that is not there: `{}`).
    pub fn new(server: Option<&str>, client: Option<&str>) -> Result<ProtoBundle, BundleError> {
        let compile = |text: Option<&str>, side| {
            handshake::parsed_json(text.unwrap_or("{}")).map_err(|error| BundleError { side, error })
        };
        let (server, server_json) = compile(server, Side::Server)?;
        let (client, client_json) = compile(client, Side::Client)?;
        let version = handshake::version(&client_json, &server_json);
        let version_json = serde_json::to_string(&version).unwrap_or_default();
        let text = format!(r#"{{"server":{server_json},"client":{client_json},"version":{version_json}}}"#);
        let handshake = RawValue::from_string(text)
            .map_err(|e| BundleError { side: Side::Server, error: ProtosError::BadJson { message: e.to_string() } })?;
        Ok(ProtoBundle { server, client, version, handshake })
    }

    /// `sys.protos.version`: base64 of the MD5 of both parsed files (what clients cache).
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The handshake's `sys.protos` object.
    pub fn handshake_json(&self) -> &RawValue {
        &self.handshake
    }

    /// Whether a client that sent `protoVersion` already holds these protos (Pomelo compares it with
    /// `!==`, so only the same string counts; `0`, a number or nothing means it has none).
    pub fn client_has(&self, proto_version: Option<&Value>) -> bool {
        matches!(proto_version, Some(Value::String(v)) if *v == self.version)
    }

    /// Routes the server encodes with a proto.
    pub fn encodes(&self, route: &str) -> bool {
        self.server.has_route(route)
    }

    /// Routes the server decodes with a proto.
    pub fn decodes(&self, route: &str) -> bool {
        self.client.has_route(route)
    }

    /// The body the server sends for `route`: `None` when the route has no proto (send JSON).
    pub fn encode(&self, route: &str, body: &Value) -> Option<Result<Vec<u8>, EncodeError>> {
        self.encode_with(route, body, Strings::Utf8)
    }

    /// [`ProtoBundle::encode`] writing strings in `mode` ([`Strings::Cesu8`] for a JS browser client).
    pub fn encode_with(&self, route: &str, body: &Value, mode: Strings) -> Option<Result<Vec<u8>, EncodeError>> {
        self.encodes(route).then(|| {
            let mut out = Vec::new();
            self.server.encode_with(route, body, &mut out, mode).map(|()| out)
        })
    }

    /// A client's body for `route`: `None` when the route has no proto (read JSON). Strings are read
    /// as CESU-8 or UTF-8 alike, so the JS client's emoji (surrogate pairs) arrive as real characters.
    pub fn decode(&self, route: &str, body: &[u8]) -> Option<Result<Value, DecodeError>> {
        self.decodes(route).then(|| self.client.decode_with(route, body, Strings::Cesu8))
    }
}

impl ProtoBundle {
    /// The JS browser client's copy of `packages` (one or more whole packages, as a chat server delivers
    /// them): its protobuf decoder has no 4-byte UTF-8 branch, so strings with characters beyond U+FFFF
    /// are rewritten as CESU-8 surrogate pairs, which it reads as the same characters. `None` when
    /// nothing needs it (no 4-byte UTF-8 sequence anywhere: the common case, found with one scan); the
    /// caller then sends the shared bytes. A package it cannot read is kept as it is.
    pub fn js_strings(&self, dict: Option<&crate::wire::Dictionary>, packages: &bytes::Bytes) -> Option<bytes::Bytes> {
        use crate::wire::{Message, MessageType, PackageType, Route};
        if !packages.iter().any(|&b| b >= 0xf0) {
            return None;
        }
        let mut out = bytes::BytesMut::with_capacity(packages.len() + 64);
        let mut at = 0;
        while packages.len() - at >= 4 {
            let h = &packages[at..at + 4];
            let len = (usize::from(h[1]) << 16) | (usize::from(h[2]) << 8) | usize::from(h[3]);
            if packages.len() - at - 4 < len {
                break;
            }
            let whole = packages.slice(at..at + 4 + len);
            at += 4 + len;
            let rewritten = (whole[0] == PackageType::Data.as_u8())
                .then(|| Message::decode(&whole.slice(4..)).ok())
                .flatten()
                .filter(|m| m.kind == MessageType::Push)
                .and_then(|m| {
                    let route = match &m.route {
                        Some(Route::Plain(r)) => r.clone(),
                        Some(Route::Code(c)) => dict?.route(*c)?.to_owned(),
                        None => return None,
                    };
                    let value = self.server.decode(&route, &m.body).ok()?;
                    let mut body = Vec::with_capacity(m.body.len() + 8);
                    self.server.encode_with(&route, &value, &mut body, Strings::Cesu8).ok()?;
                    Message { body: body.into(), ..m }.encode_package().ok()
                });
            match rewritten {
                Some(p) => out.extend_from_slice(&p),
                None => out.extend_from_slice(&whole),
            }
        }
        out.extend_from_slice(&packages[at..]);
        Some(out.freeze())
    }
}

/// The bodies of a server: JSON, or protobuf where `protos` has the route.
pub type Protobuf = Option<Arc<ProtoBundle>>;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    const SERVER: &str =
        r#"{"onChat": {"required string msg": 1, "required string from": 2, "required string target": 3}}"#;
    const CLIENT: &str = r#"{"chat.chatHandler.send": {"required string rid": 1, "required string content": 2}}"#;

    #[test]
    fn handshake_object_and_version() {
        let b = ProtoBundle::new(Some(SERVER), Some(CLIENT)).unwrap();
        let parsed: Value = serde_json::from_str(b.handshake_json().get()).unwrap();
        assert_eq!(parsed["version"], json!(b.version()));
        assert_eq!(parsed["server"]["onChat"]["msg"], json!({"option": "required", "type": "string", "tag": 1}));
        assert!(b.handshake_json().get().starts_with(r#"{"server":{"onChat":{"msg":"#));
        assert!(b.client_has(Some(&json!(b.version()))));
        assert!(!b.client_has(Some(&json!(0))));
        assert!(!b.client_has(None));
        let empty = ProtoBundle::new(None, None).unwrap();
        assert_eq!(
            empty.handshake_json().get(),
            format!(r#"{{"server":{{}},"client":{{}},"version":"{}"}}"#, empty.version())
        );
    }

    #[test]
    fn routes_without_a_proto_stay_json() {
        let b = ProtoBundle::new(Some(SERVER), Some(CLIENT)).unwrap();
        assert!(b.encode("onAdd", &json!({})).is_none());
        assert!(b.decode("connector.entryHandler.enter", b"{}").is_none());
        let bytes = b.encode("onChat", &json!({"msg": "hi", "from": "bob", "target": "*"})).unwrap().unwrap();
        // Fields in the object's key order, as pomelo-protobuf writes them (serde_json's is sorted).
        assert_eq!(bytes, [0x12, 3, b'b', b'o', b'b', 0x0a, 2, b'h', b'i', 0x1a, 1, b'*']);
        assert!(b.encode("onChat", &json!({"msg": "hi"})).unwrap().is_err(), "required fields missing");
        let req = [0x0a, 1, b'r', 0x12, 6, 0xed, 0xa0, 0xbd, 0xed, 0xb8, 0x80];
        assert_eq!(b.decode("chat.chatHandler.send", &req).unwrap().unwrap(), json!({"rid": "r", "content": "😀"}));
    }

    #[test]
    fn js_clients_get_surrogate_pairs_in_protobuf_pushes() {
        let b = ProtoBundle::new(Some(SERVER), None).unwrap();
        let push = |msg: &str| {
            let body = b.encode("onChat", &json!({"msg": msg, "from": "bob", "target": "*"})).unwrap().unwrap();
            crate::wire::encode_push(None, "onChat", &body).unwrap()
        };
        assert_eq!(b.js_strings(None, &push("héllo 中文")), None, "nothing beyond U+FFFF: the shared bytes");
        let mut two = push("a😀").to_vec();
        two.extend_from_slice(&crate::wire::encode_push(None, "onAdd", r#"{"user":"😀"}"#.as_bytes()).unwrap());
        let js = b.js_strings(None, &bytes::Bytes::from(two)).unwrap();
        let decoder = crate::wire::PackageDecoder::new(1 << 20);
        let mut buf = bytes::BytesMut::from(&js[..]);
        let mut bodies = Vec::new();
        while let Ok(crate::wire::Decoded::Package(p)) = decoder.decode(&mut buf) {
            bodies.push(crate::wire::Message::decode(&p.body).unwrap().body);
        }
        assert_eq!(bodies.len(), 2);
        let chat = b.server.decode_with("onChat", &bodies[0], Strings::Cesu8).unwrap();
        assert_eq!(chat["msg"], "a😀");
        let cesu = [b'a', 0xed, 0xa0, 0xbd, 0xed, 0xb8, 0x80];
        assert!(bodies[0].windows(cesu.len()).any(|w| w == cesu), "{:02x?}", &bodies[0][..]);
        assert_eq!(&bodies[1][..], r#"{"user":"😀"}"#.as_bytes(), "a JSON push is left as it is");
    }

    #[test]
    fn bad_files_name_their_side() {
        let e = ProtoBundle::new(Some(SERVER), Some(r#"{"a.b.c": {"required strin x": 1}}"#)).unwrap_err();
        assert_eq!(e.side, Side::Client);
        assert!(e.to_string().starts_with("clientProtos: "), "{e}");
        assert_eq!(ProtoBundle::new(Some("[1]"), None).unwrap_err().side, Side::Server);
    }
}
