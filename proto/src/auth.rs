//! The cluster's keys and the mutual challenge-response that opens every control link (worker ↔ master)
//! and every cluster RPC link (connector ↔ chat server). Pure functions: no task, no I/O, nothing to shut
//! down; the links do the exchanges (`master/src/control.rs`, `worker/src/control.rs`,
//! `worker/src/chat/server.rs`, `worker/src/connector/link.rs`).
//!
//! # Keys
//!
//! - The **cluster secret** (`.pomelo/cluster-token`, mode 0600) is known to the master only. It never
//!   travels and no worker holds it.
//! - A **server key** `K(id) = HMAC-SHA256(secret, "pomelo-rs server key v1" ‖ id)` is what the master
//!   hands a worker at spawn (environment `POMELO_SERVER_KEY`, hex). It proves that one id and nothing
//!   else: a worker cannot compute another server's key.
//! - A **link key** `L(connector, chat) = HMAC-SHA256(K(chat), "pomelo-rs link key v1" ‖ connector)` is
//!   shared by one connector and one chat server. The chat server derives it from its own key and the
//!   name the connector claims; the connector cannot derive it, so the master puts it in the membership,
//!   *wrapped* for that connector: `L ⊕ HMAC-SHA256(K(connector), "pomelo-rs wrap v1" ‖ chat)`. Only the
//!   holder of `K(connector)` can unwrap it, so every worker may see every wrapped key.
//!
//! # Handshake (both link kinds)
//!
//! The side that dials (worker, connector) sends its id and a 32-byte nonce from the OS RNG; the side
//! that accepts (master, chat server) answers with its own nonce and a proof; the dialler checks it and
//! only then sends its own proof. A proof is `HMAC-SHA256(key, role ‖ transcript)` where the transcript
//! is the link kind, both ids and both nonces, each length-prefixed. So:
//!
//! - nothing secret is sent, and a proof is useless outside the connection it was made for (fresh nonces
//!   from both sides: no replay), for the other role (role label: no reflection) or the other link kind;
//! - the dialler proves nothing to a peer that has not proved itself first, so a squatter on a port
//!   learns a name and a random nonce, nothing it can reuse;
//! - proofs are compared in constant time ([`hmac::Mac::verify_slice`]).
//!
//! Not covered here: confidentiality and integrity after the handshake (no TLS yet); an active relay
//! between a worker and the real master sees the traffic.

use std::collections::BTreeMap;
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Bytes in a key and in a nonce.
pub const KEY_LEN: usize = 32;
/// Largest frame either side reads before the peer has proved itself.
pub const HANDSHAKE_MAX_FRAME: usize = 4 << 10;
/// How long a handshake may take, from the connection to the last proof.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections still in their handshake that one listener holds at once; more are closed at once.
pub const MAX_UNAUTHENTICATED: usize = 64;
/// The longest server id a handshake accepts.
pub const MAX_ID_LEN: usize = 128;
/// What the master calls itself in a control transcript.
pub const MASTER_ID: &str = "master";

/// A 32-byte key. Its `Debug` shows nothing of it.
#[derive(Clone, PartialEq, Eq)]
pub struct Key([u8; KEY_LEN]);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

impl Key {
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    /// A key from 64 hex digits, `None` otherwise.
    pub fn from_hex(s: &str) -> Option<Key> {
        unhex(s.trim()).and_then(|b| b.try_into().ok()).map(Key)
    }
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; KEY_LEN] {
    let mut mac = new_mac(key);
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

fn new_mac(key: &[u8]) -> HmacSha256 {
    // HMAC takes a key of any length.
    match HmacSha256::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC accepts keys of every length"),
    }
}

/// `K(id)`: the key the master hands the server `id`.
pub fn server_key(secret: &str, id: &str) -> Key {
    Key(hmac(secret.as_bytes(), &[b"pomelo-rs server key v1\0", id.as_bytes()]))
}

/// `L(connector, chat)`, as the chat server derives it from its own key.
pub fn link_key(chat_key: &Key, connector: &str) -> Key {
    Key(hmac(&chat_key.0, &[b"pomelo-rs link key v1\0", connector.as_bytes()]))
}

fn pad(connector_key: &Key, chat: &str) -> [u8; KEY_LEN] {
    hmac(&connector_key.0, &[b"pomelo-rs wrap v1\0", chat.as_bytes()])
}

fn xor(a: &[u8; KEY_LEN], b: &[u8; KEY_LEN]) -> [u8; KEY_LEN] {
    std::array::from_fn(|i| a[i] ^ b[i])
}

/// The wrapped link keys the master publishes with chat server `chat`, one per connector (hex).
pub fn wrapped_link_keys<'a>(
    secret: &str,
    chat: &str,
    connectors: impl IntoIterator<Item = &'a str>,
) -> BTreeMap<String, String> {
    let chat_key = server_key(secret, chat);
    connectors
        .into_iter()
        .map(|c| {
            let link = link_key(&chat_key, c);
            (c.to_string(), hex(&xor(&link.0, &pad(&server_key(secret, c), chat))))
        })
        .collect()
}

/// The connector's side of [`wrapped_link_keys`]: `L(connector, chat)` from its wrapped form.
pub fn unwrap_link_key(connector_key: &Key, chat: &str, wrapped: &str) -> Option<Key> {
    let w = Key::from_hex(wrapped)?;
    Some(Key(xor(&w.0, &pad(connector_key, chat))))
}

/// HMAC-SHA256 of `parts` under `key`, hex: a tag for anything signed with a shared secret (the admin
/// server's session cookies).
pub fn tag_hex(key: &[u8], parts: &[&[u8]]) -> String {
    hex(&hmac(key, parts))
}

/// A fresh nonce from the OS RNG, hex.
pub fn nonce() -> std::io::Result<String> {
    let mut b = [0u8; KEY_LEN];
    getrandom::fill(&mut b).map_err(|e| std::io::Error::other(format!("no randomness from the OS: {e}")))?;
    Ok(hex(&b))
}

/// Which link a transcript belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkKind {
    Control,
    Rpc,
}

/// Who makes a proof.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The accepting side (master, chat server).
    Acceptor,
    /// The dialling side (worker, connector).
    Dialler,
}

/// What both proofs of one handshake cover.
#[derive(Debug, Clone, Copy)]
pub struct Transcript<'a> {
    pub kind: LinkKind,
    pub dialler: &'a str,
    pub acceptor: &'a str,
    pub dialler_nonce: &'a str,
    pub acceptor_nonce: &'a str,
}

impl Transcript<'_> {
    fn mac(&self, key: &Key, role: Role) -> HmacSha256 {
        let kind: &[u8] = match self.kind {
            LinkKind::Control => b"control",
            LinkKind::Rpc => b"rpc",
        };
        let role: &[u8] = match role {
            Role::Acceptor => b"acceptor",
            Role::Dialler => b"dialler",
        };
        let mut mac = new_mac(&key.0);
        mac.update(b"pomelo-rs handshake v1\0");
        for part in [role, kind, self.dialler.as_bytes(), self.acceptor.as_bytes()] {
            mac.update(&(part.len() as u32).to_be_bytes());
            mac.update(part);
        }
        for part in [self.dialler_nonce, self.acceptor_nonce] {
            mac.update(&(part.len() as u32).to_be_bytes());
            mac.update(part.as_bytes());
        }
        mac
    }

    /// The proof `role` sends, hex.
    pub fn prove(&self, key: &Key, role: Role) -> String {
        hex(&self.mac(key, role).finalize().into_bytes())
    }

    /// Whether `proof` is `role`'s proof under `key`, compared in constant time.
    pub fn verify(&self, key: &Key, role: Role, proof: &str) -> bool {
        match unhex(proof) {
            Some(p) => self.mac(key, role).verify_slice(&p).is_ok(),
            None => false,
        }
    }
}

/// Whether a nonce the peer sent has the right shape (64 hex digits).
pub fn valid_nonce(n: &str) -> bool {
    n.len() == 2 * KEY_LEN && unhex(n).is_some()
}

/// Whether an id claimed before authentication is worth a key derivation: short and printable.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_ID_LEN && id.chars().all(|c| c.is_ascii_graphic())
}

/// An id from an unauthenticated peer, fit for a log line: escaped (no newline can forge a line) and
/// cut to 64 characters.
pub fn printable(id: &str) -> String {
    let mut s: String = id.chars().take(64).flat_map(char::escape_default).collect();
    if id.chars().nth(64).is_some() {
        s.push('…');
    }
    s
}

fn hex(b: &[u8]) -> String {
    const D: &[u8; 16] = b"0123456789abcdef";
    b.iter().flat_map(|x| [D[(x >> 4) as usize] as char, D[(x & 15) as usize] as char]).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    s.as_bytes().chunks(2).map(|p| Some(digit(p[0])? << 4 | digit(p[1])?)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t<'a>(dn: &'a str, an: &'a str) -> Transcript<'a> {
        Transcript {
            kind: LinkKind::Rpc,
            dialler: "connector-1",
            acceptor: "chat-1",
            dialler_nonce: dn,
            acceptor_nonce: an,
        }
    }

    #[test]
    fn keys_are_per_server_and_link_keys_meet() {
        let (a, b) = (server_key("s", "chat-1"), server_key("s", "chat-2"));
        assert_ne!(a, b);
        assert_ne!(server_key("s", "chat-1"), server_key("t", "chat-1"));
        assert_eq!(Key::from_hex(&a.to_hex()), Some(a.clone()));
        let wrapped = wrapped_link_keys("s", "chat-1", ["connector-1", "connector-2"]);
        let c1 = server_key("s", "connector-1");
        let got = unwrap_link_key(&c1, "chat-1", &wrapped["connector-1"]).expect("unwraps");
        assert_eq!(got, link_key(&a, "connector-1"));
        // connector-1 cannot use connector-2's wrapped key.
        let other = unwrap_link_key(&c1, "chat-1", &wrapped["connector-2"]).expect("hex");
        assert_ne!(other, link_key(&a, "connector-2"));
        assert_ne!(other, link_key(&a, "connector-1"));
    }

    #[test]
    fn proofs_bind_role_nonces_and_ids() {
        let key = server_key("s", "x");
        let (n1, n2) = (nonce().expect("rng"), nonce().expect("rng"));
        assert!(valid_nonce(&n1) && n1 != n2);
        let p = t(&n1, &n2).prove(&key, Role::Acceptor);
        assert!(t(&n1, &n2).verify(&key, Role::Acceptor, &p));
        assert!(!t(&n1, &n2).verify(&key, Role::Dialler, &p), "reflected");
        assert!(!t(&n1, &n1).verify(&key, Role::Acceptor, &p), "replayed with another nonce");
        assert!(!t(&n1, &n2).verify(&server_key("s", "y"), Role::Acceptor, &p), "another key");
        let mut other = t(&n1, &n2);
        other.dialler = "connector-2";
        assert!(!other.verify(&key, Role::Acceptor, &p), "another id");
        other = t(&n1, &n2);
        other.kind = LinkKind::Control;
        assert!(!other.verify(&key, Role::Acceptor, &p), "another link kind");
        assert!(!t(&n1, &n2).verify(&key, Role::Acceptor, "zz"));
    }

    #[test]
    fn ids_are_checked_and_printed_safely() {
        assert!(valid_id("chat-1"));
        assert!(!valid_id("x\ny") && !valid_id("") && !valid_id(&"a".repeat(MAX_ID_LEN + 1)));
        assert_eq!(printable("x\nFORGED"), "x\\nFORGED");
        assert_eq!(printable(&"A".repeat(1000)).len(), 64 + '…'.len_utf8());
    }
}
