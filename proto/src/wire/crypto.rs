//! Pomelo's `useCrypto`: a client that sent an RSA public key in its handshake (`sys.rsa = {rsa_n, rsa_e}`)
//! signs every request body, and the server checks the signature.
//!
//! The JS client signs `JSON.stringify(msg)` (RSASSA-PKCS1-v1_5 with SHA-256, hex) and sends
//! `JSON.stringify` of the same object with `__crypto__` added as its last key. So the signed text is the
//! body itself with that member taken out: [`ClientKey::verify`] checks exactly the bytes the client
//! signed, in its key order and its number format, without re-serialising anything. The body must be
//! JSON (a route with a client proto has no place for `__crypto__`). Keys of 1024 to 8192 bits, as the
//! JS client's 1024-bit ones. Pure, no I/O.

use ring::signature::{RsaPublicKeyComponents, RSA_PKCS1_1024_8192_SHA256_FOR_LEGACY_USE_ONLY};
use serde_json::Value;

use super::text::cesu8_to_utf8;

/// The field that carries the signature.
pub const FIELD: &str = "__crypto__";

/// Longest `rsa_n` accepted, in hex digits (8192 bits).
const MAX_N_HEX: usize = 8192 / 4;

/// Why a handshake's `sys.rsa` is not a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("sys.rsa.rsa_n is not a hex number of 1024 to 8192 bits")]
    BadModulus,
    #[error("sys.rsa.rsa_e is not an odd exponent of at least 3 (a number, or a hex string)")]
    BadExponent,
}

/// Why a body's signature does not hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the body is not a JSON object")]
    NotJson,
    #[error("no __crypto__ signature (the client sent a key in its handshake)")]
    Missing,
    #[error("__crypto__ is not a hex string")]
    NotHex,
    #[error("the signature does not match the body and the client's key")]
    Mismatch,
}

/// A client's public key from its handshake.
#[derive(Debug, Clone)]
pub struct ClientKey(RsaPublicKeyComponents<Vec<u8>>);

/// Big-endian bytes of a hex number (an odd number of digits has an implied leading 0).
fn unhex(hex: &str) -> Option<Vec<u8>> {
    if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let padded = if hex.len() % 2 == 1 { format!("0{hex}") } else { hex.to_owned() };
    (0..padded.len()).step_by(2).map(|i| u8::from_str_radix(&padded[i..i + 2], 16).ok()).collect()
}

/// [`unhex`] without leading zeros, as RSA key components are given to ring.
fn hex_bytes(hex: &str) -> Option<Vec<u8>> {
    unhex(hex.trim_start_matches('0'))
}

impl ClientKey {
    /// The key in `sys.rsa`, `None` when there is none (the JS client sends `rsa: {}` without
    /// `encrypt`). `rsa_e` is a number, or a hex string (Pomelo reads it with `toString(16)`).
    pub fn from_handshake(rsa: Option<&Value>) -> Result<Option<ClientKey>, KeyError> {
        let Some(Value::Object(rsa)) = rsa else { return Ok(None) };
        let Some(n) = rsa.get("rsa_n") else { return Ok(None) };
        let n = n.as_str().filter(|n| n.len() <= MAX_N_HEX).and_then(hex_bytes).ok_or(KeyError::BadModulus)?;
        if !(1024..=8192).contains(&(n.len() * 8)) {
            return Err(KeyError::BadModulus);
        }
        let e = match rsa.get("rsa_e") {
            Some(Value::Number(e)) => e.as_u64().map(|e| format!("{e:x}")),
            Some(Value::String(e)) => Some(e.clone()),
            _ => None,
        };
        let e = e.filter(|e| e.len() <= 16).and_then(|e| hex_bytes(&e)).ok_or(KeyError::BadExponent)?;
        let odd = e.last().is_some_and(|b| b & 1 == 1);
        if !odd || (e.len() == 1 && e[0] < 3) || e.len() > 4 {
            return Err(KeyError::BadExponent);
        }
        Ok(Some(ClientKey(RsaPublicKeyComponents { n, e })))
    }

    /// Checks a request body's `__crypto__` and returns the body without it (what the handler sees,
    /// as in Pomelo, which deletes the field).
    pub fn verify(&self, body: &[u8]) -> Result<Value, SignatureError> {
        // The JS client writes emoji as CESU-8 surrogate pairs, but signed the string's UTF-8.
        let joined;
        let body = match std::str::from_utf8(body) {
            Ok(_) => body,
            Err(_) => {
                joined = cesu8_to_utf8(body).ok_or(SignatureError::NotJson)?;
                &joined[..]
            }
        };
        let Ok(Value::Object(mut obj)) = serde_json::from_slice::<Value>(body) else {
            return Err(SignatureError::NotJson);
        };
        let sig = match obj.remove(FIELD) {
            Some(Value::String(s)) => s,
            Some(_) => return Err(SignatureError::NotHex),
            None => return Err(SignatureError::Missing),
        };
        if sig.is_empty() || sig.len() > MAX_N_HEX + 2 {
            return Err(SignatureError::NotHex);
        }
        let sig_bytes = unhex(&sig).ok_or(SignatureError::NotHex)?;
        let signed = strip_member(body, &sig).ok_or(SignatureError::Mismatch)?;
        self.0
            .verify(&RSA_PKCS1_1024_8192_SHA256_FOR_LEGACY_USE_ONLY, &signed, &sig_bytes)
            .map_err(|_| SignatureError::Mismatch)?;
        Ok(Value::Object(obj))
    }
}

/// `body` with its `"__crypto__":"<sig>"` member taken out, with the comma that joined it: the text the
/// client signed. `None` if the member is not written as `JSON.stringify` writes it.
fn strip_member(body: &[u8], sig: &str) -> Option<Vec<u8>> {
    let member = format!("\"{FIELD}\":\"{sig}\"");
    let at = body.windows(member.len()).rposition(|w| w == member.as_bytes())?;
    let end = at + member.len();
    let mut out = Vec::with_capacity(body.len());
    if at > 0 && body[at - 1] == b',' {
        out.extend_from_slice(&body[..at - 1]);
        out.extend_from_slice(&body[end..]);
    } else if body.get(end) == Some(&b',') {
        out.extend_from_slice(&body[..at]);
        out.extend_from_slice(&body[end + 1..]);
    } else {
        out.extend_from_slice(&body[..at]);
        out.extend_from_slice(&body[end..]);
    }
    Some(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keys_from_the_handshake() {
        assert!(ClientKey::from_handshake(None).unwrap().is_none());
        assert!(ClientKey::from_handshake(Some(&json!({}))).unwrap().is_none(), "the JS client's rsa: {{}}");
        let n = format!("c{}", "3".repeat(255));
        assert!(ClientKey::from_handshake(Some(&json!({"rsa_n": n, "rsa_e": 65537}))).unwrap().is_some());
        assert!(ClientKey::from_handshake(Some(&json!({"rsa_n": n, "rsa_e": "10001"}))).unwrap().is_some());
        let bad = |rsa: Value| ClientKey::from_handshake(Some(&rsa)).unwrap_err();
        assert_eq!(bad(json!({"rsa_n": "abc", "rsa_e": 65537})), KeyError::BadModulus, "far too short");
        assert_eq!(bad(json!({"rsa_n": format!("x{n}"), "rsa_e": 65537})), KeyError::BadModulus);
        assert_eq!(bad(json!({"rsa_n": "f".repeat(4096), "rsa_e": 65537})), KeyError::BadModulus);
        assert_eq!(bad(json!({"rsa_n": n, "rsa_e": 65536})), KeyError::BadExponent);
        assert_eq!(bad(json!({"rsa_n": n, "rsa_e": 1})), KeyError::BadExponent);
        assert_eq!(bad(json!({"rsa_n": n})), KeyError::BadExponent);
    }

    #[test]
    fn the_signed_text_is_the_body_without_the_member() {
        let s = |b: &str| String::from_utf8(strip_member(b.as_bytes(), "ab").unwrap()).unwrap();
        assert_eq!(s(r#"{"a":1,"__crypto__":"ab"}"#), r#"{"a":1}"#);
        assert_eq!(s(r#"{"__crypto__":"ab"}"#), "{}");
        assert_eq!(s(r#"{"__crypto__":"ab","a":1}"#), r#"{"a":1}"#);
        assert!(strip_member(br#"{"__crypto__": "ab"}"#, "ab").is_none());
    }

    /// Signs `text` as the JS client does and appends `__crypto__` as its last key.
    pub(crate) fn signed_body(text: &str) -> (Value, String) {
        use ring::signature::{RsaKeyPair, RSA_PKCS1_SHA256};
        let kp = RsaKeyPair::from_pkcs8(include_bytes!("../../../tests/fixtures/client-rsa-2048.pk8")).unwrap();
        let public: RsaPublicKeyComponents<Vec<u8>> = kp.public().into();
        let n: String = public.n.iter().map(|b| format!("{b:02x}")).collect();
        let mut sig = vec![0; kp.public().modulus_len()];
        kp.sign(&RSA_PKCS1_SHA256, &ring::rand::SystemRandom::new(), text.as_bytes(), &mut sig).unwrap();
        let sig: String = sig.iter().map(|b| format!("{b:02x}")).collect();
        let body = if text == "{}" {
            format!(r#"{{"__crypto__":"{sig}"}}"#)
        } else {
            format!(r#"{},"__crypto__":"{sig}"}}"#, &text[..text.len() - 1])
        };
        (json!({"rsa_n": n, "rsa_e": 65537}), body)
    }

    #[test]
    fn signatures_of_the_text_the_client_signed() {
        // Key order and number format as the client wrote them, which serde_json would change.
        let text = r#"{"rid":"r","content":"héllo 中文 😀","n":1.50e1,"a":{"z":1,"b":2}}"#;
        let (rsa, body) = signed_body(text);
        let key = ClientKey::from_handshake(Some(&rsa)).unwrap().unwrap();
        let want: Value = serde_json::from_str(text).unwrap();
        assert_eq!(key.verify(body.as_bytes()), Ok(want.clone()));
        // As the JS client sends it: the emoji as a CESU-8 surrogate pair.
        let utf8 = body.as_bytes();
        let at = utf8.windows(4).position(|w| w == [0xf0, 0x9f, 0x98, 0x80]).unwrap();
        let mut sent = utf8[..at].to_vec();
        sent.extend_from_slice(&[0xed, 0xa0, 0xbd, 0xed, 0xb8, 0x80]);
        sent.extend_from_slice(&utf8[at + 4..]);
        assert_eq!(key.verify(&sent), Ok(want));
        assert_eq!(key.verify(body.replace("héllo", "hello").as_bytes()), Err(SignatureError::Mismatch));
        assert_eq!(key.verify(text.as_bytes()), Err(SignatureError::Missing));
        assert_eq!(key.verify(b"[1]"), Err(SignatureError::NotJson));
        assert_eq!(key.verify(br#"{"__crypto__":"xyz"}"#), Err(SignatureError::NotHex));
        let (_, empty) = signed_body("{}");
        assert_eq!(key.verify(empty.as_bytes()), Ok(json!({})));
        // Another key's signature of the same text does not pass.
        let other = ClientKey::from_handshake(Some(&json!({"rsa_n": format!("c{}", "3".repeat(511)), "rsa_e": 65537})))
            .unwrap()
            .unwrap();
        assert_eq!(other.verify(body.as_bytes()), Err(SignatureError::Mismatch));
    }
}
