//! Pomelo's client protocol, byte for byte (pomelo-protocol 0.1.6 and the hybrid connector).
//!
//! - [`package`]: `type | u24 length | body` packages, a streaming, size-capped decoder, and a borrowed
//!   [`package::peek`].
//! - [`message`]: the DATA body: flag, varint id, plain or dictionary-coded route, body; owned
//!   ([`Message::decode`]) or borrowed ([`Message::peek`]).
//! - [`handshake`]: the client's request and the server's reply, with Pomelo's key order.
//! - [`dictionary`]: route ↔ code table and its `dictVersion`.
//! - [`digest`]: the MD5 and base64 behind `dictVersion`.
//! - [`crypto`]: `useCrypto`, the RSA signatures of a client that sent a key.
//!
//! Everything here is pure: no I/O, no tasks, nothing to shut down. Decoding is total: any bytes give a
//! value or an error, never a panic. Encoders return complete packages as [`bytes::Bytes`], so one
//! encoded push can be shared by any number of sessions.

pub mod crypto;
pub mod dictionary;
pub mod digest;
pub mod handshake;
pub mod message;
pub mod package;
pub mod protobuf;
pub mod text;

use bytes::Bytes;
use serde::Serialize;

pub use dictionary::Dictionary;
pub use message::{Message, MessageError, MessageRef, MessageType, Route, RouteRef};
pub use package::{Decoded, Package, PackageDecoder, PackageError, PackageRef, PackageType};

/// `{"reason":"..."}` as a KICK package.
pub fn kick(reason: &str) -> Bytes {
    #[derive(Serialize)]
    struct Kick<'a> {
        reason: &'a str,
    }
    let body = serde_json::to_vec(&Kick { reason }).unwrap_or_default();
    // A reason long enough to overflow 16 MiB is a bug; send a kick without a reason rather than nothing.
    package::encode(PackageType::Kick, &body).unwrap_or_else(|_| package::empty(PackageType::Kick))
}

/// The route a server sends for `route`: its code if the dictionary has it, else the string
/// (Pomelo compresses a push route only when it is in the dictionary).
pub fn outgoing_route(dict: Option<&Dictionary>, route: &str) -> Route {
    match dict.and_then(|d| d.code(route)) {
        Some(code) => Route::Code(code),
        None => Route::Plain(route.to_owned()),
    }
}

/// A whole PUSH package (header included), encoded once, to share between sessions.
pub fn encode_push(dict: Option<&Dictionary>, route: &str, body: &[u8]) -> Result<Bytes, MessageError> {
    Message::push(outgoing_route(dict, route), Bytes::copy_from_slice(body)).encode_package()
}

/// [`encode_push`] with a JSON body, serialized compactly as `JSON.stringify` does.
pub fn encode_push_json<T: Serialize + ?Sized>(
    dict: Option<&Dictionary>,
    route: &str,
    body: &T,
) -> Result<Bytes, MessageError> {
    // Non-BMP characters as escapes: see `text` (the JS client cannot decode 4-byte UTF-8).
    let body = text::escape_non_bmp(serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec()));
    encode_push(dict, route, &body)
}

/// Why a body could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error(transparent)]
    Message(#[from] MessageError),
    #[error(transparent)]
    Protobuf(#[from] protobuf::EncodeError),
    #[error("not JSON: {0}")]
    Json(String),
}

/// The body the server sends under `route` (a push's route, or a response's request route): Pomelo
/// protobuf when `protos` has a proto for it, else JSON as [`encode_push_json`] writes it.
pub fn encode_body<T: Serialize + ?Sized>(
    protos: Option<&protobuf::ProtoBundle>,
    route: &str,
    body: &T,
) -> Result<Vec<u8>, BodyError> {
    encode_body_with(protos, route, body, protobuf::Strings::Utf8)
}

/// [`encode_body`] writing protobuf strings in `mode` (JSON always escapes characters beyond U+FFFF).
pub fn encode_body_with<T: Serialize + ?Sized>(
    protos: Option<&protobuf::ProtoBundle>,
    route: &str,
    body: &T,
    mode: protobuf::Strings,
) -> Result<Vec<u8>, BodyError> {
    if let Some(p) = protos.filter(|p| p.encodes(route)) {
        let value = serde_json::to_value(body).map_err(|e| BodyError::Json(e.to_string()))?;
        return p.encode_with(route, &value, mode).unwrap_or_else(|| Ok(Vec::new())).map_err(BodyError::from);
    }
    Ok(text::escape_non_bmp(serde_json::to_vec(body).map_err(|e| BodyError::Json(e.to_string()))?))
}

/// [`encode_push_json`] with protobuf bodies for the routes `protos` has.
pub fn encode_push_with<T: Serialize + ?Sized>(
    dict: Option<&Dictionary>,
    protos: Option<&protobuf::ProtoBundle>,
    route: &str,
    body: &T,
) -> Result<Bytes, BodyError> {
    if protos.is_some_and(|p| p.encodes(route)) {
        return Ok(encode_push(dict, route, &encode_body(protos, route, body)?)?);
    }
    Ok(encode_push_json(dict, route, body)?)
}

/// A whole RESPONSE package for request `id`.
pub fn encode_response(id: u32, body: &[u8]) -> Result<Bytes, MessageError> {
    Message::response(id, Bytes::copy_from_slice(body)).encode_package()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn kick_worked_bytes() {
        let k = kick("kick");
        assert_eq!(&k[..4], &[0x05, 0x00, 0x00, 0x11]);
        assert_eq!(&k[4..], br#"{"reason":"kick"}"#);
        assert_eq!(&kick("say \"hi\"")[4..], br#"{"reason":"say \"hi\""}"#);
    }

    #[test]
    fn pushes_compress_only_dictionary_routes() {
        let d = Dictionary::build(["chat.chatHandler.send"], ["onPing"]).unwrap();
        let p = encode_push_json(Some(&d), "onAdd", &serde_json::json!({"route":"onAdd","user":"bob"})).unwrap();
        assert_eq!(&p[..11], &[0x04, 0x00, 0x00, 0x25, 0x06, 0x05, b'o', b'n', b'A', b'd', b'd']);
        let p = encode_push(Some(&d), "onPing", b"{}").unwrap();
        assert_eq!(&p[..], &[0x04, 0x00, 0x00, 0x05, 0x07, 0x00, 0x02, b'{', b'}']);
        let p = encode_push(None, "onPing", b"").unwrap();
        assert_eq!(&p[4..], &[0x06, 0x06, b'o', b'n', b'P', b'i', b'n', b'g']);
    }

    #[test]
    fn pushes_with_a_proto_are_protobuf_the_rest_json() {
        let p = protobuf::ProtoBundle::new(Some(r#"{"onChat": {"required string msg": 1}}"#), None).unwrap();
        let chat = encode_push_with(None, Some(&p), "onChat", &serde_json::json!({"msg": "hi", "extra": 1})).unwrap();
        assert_eq!(&chat[4..], &[0x06, 0x06, b'o', b'n', b'C', b'h', b'a', b't', 0x0a, 0x02, b'h', b'i']);
        let add = encode_push_with(None, Some(&p), "onAdd", &serde_json::json!({"user": "😀"})).unwrap();
        assert_eq!(&add[4..], &encode_push_json(None, "onAdd", &serde_json::json!({"user": "😀"})).unwrap()[4..]);
        assert!(encode_push_with(None, Some(&p), "onChat", &serde_json::json!({"other": 1})).is_err());
        assert!(encode_push_with(None, Some(&p), "onChat", &serde_json::json!([1])).is_err());
    }

    #[test]
    fn response_bytes() {
        let r = encode_response(300, b"{}").unwrap();
        assert_eq!(&r[..], &[0x04, 0x00, 0x00, 0x05, 0x04, 0xac, 0x02, b'{', b'}']);
    }
}
