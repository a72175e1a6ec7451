//! Routing helpers shared by every process: Pomelo's default `crc32` routing (so a uid lands where
//! Pomelo would put it) and rendezvous hashing for room → chat server. Pure functions.
//!
//! [`owner`] over [`chat_servers`] is *the* room-owner rule: connectors use it to send a room's requests
//! and re-joins, chat servers use it to decide which rooms are theirs. Nothing else computes it.

use crate::control::{Membership, ServerInfo, ServerType};

/// The chat servers that can own rooms: those of the membership with an RPC address, in membership order.
pub fn chat_servers(m: &Membership) -> impl Iterator<Item = &ServerInfo> {
    m.of_type(ServerType::Chat).filter(|s| s.addrs.rpc.is_some())
}

/// The chat server that owns room `rid` among `chats` (ids as [`chat_servers`] lists them): rendezvous
/// hashing, so adding or removing a chat server moves only the rooms it gains or loses.
pub fn owner<'a, S: AsRef<str> + 'a>(rid: &str, chats: impl IntoIterator<Item = &'a S>) -> Option<&'a str> {
    rendezvous(rid, chats.into_iter().map(AsRef::as_ref))
}

/// crc 0.2.0's `crc32(str)`: standard CRC-32 over the low byte of each UTF-16 code unit, as a signed i32.
pub fn pomelo_crc32(s: &str) -> i32 {
    let mut h = crc32fast::Hasher::new();
    let mut buf = [0u8; 64];
    let mut n = 0;
    for unit in s.encode_utf16() {
        buf[n] = (unit & 0xff) as u8;
        n += 1;
        if n == buf.len() {
            h.update(&buf);
            n = 0;
        }
    }
    h.update(&buf[..n]);
    h.finalize() as i32
}

/// `list[abs(crc32(key)) % n]` as Pomelo computes it (abs taken in i64, so i32::MIN cannot overflow).
/// `None` when `n` is 0.
pub fn pomelo_index(key: &str, n: usize) -> Option<usize> {
    if n == 0 {
        return None;
    }
    let abs = i64::from(pomelo_crc32(key)).unsigned_abs();
    // n fits in u64 on every platform Rust supports; the result is < n.
    Some((abs % n as u64) as usize)
}

/// Highest-random-weight hashing: the candidate whose (key, candidate) hash is largest. Adding or
/// removing a candidate only moves the keys that belonged to (or now belong to) it. Ties, which need
/// equal 64-bit hashes, go to the first candidate.
pub fn rendezvous<'a>(key: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let mut best: Option<(u64, &'a str)> = None;
    for c in candidates {
        let w = weight(key, c);
        if best.is_none_or(|(bw, _)| w > bw) {
            best = Some((w, c));
        }
    }
    best.map(|(_, c)| c)
}

/// A stable 64-bit mix of key and candidate (FNV-1a then a splitmix64 finalizer); stable across
/// processes and versions, unlike `std`'s `DefaultHasher`.
fn weight(key: &str, candidate: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes().chain([0xff]).chain(candidate.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn reference_examples() {
        assert_eq!(pomelo_crc32("r1"), 219023793);
        assert_eq!(pomelo_crc32("bob"), -171200192);
        assert_eq!(pomelo_index("r1", 3), Some(0));
        assert_eq!(pomelo_index("bob", 3), Some(2));
        assert_eq!(pomelo_index("bob", 0), None);
        assert_eq!(pomelo_crc32(""), 0);
    }

    #[test]
    fn low_bytes_of_utf16_units() {
        // U+4E2D (中) contributes 0x2D, the same as '-'.
        assert_eq!(pomelo_crc32("中"), pomelo_crc32("-"));
        // A long key crosses the internal buffer boundary.
        let long = "x".repeat(200);
        assert_eq!(pomelo_crc32(&long) as u32, crc32fast::hash(long.as_bytes()));
    }

    #[test]
    fn rendezvous_is_stable_and_moves_little() {
        let servers = ["chat-1", "chat-2", "chat-3"];
        assert_eq!(rendezvous("r1", std::iter::empty()), None);
        assert_eq!(rendezvous("r1", servers.iter().copied()), rendezvous("r1", servers.iter().rev().copied()));
        let mut per = [0usize; 3];
        let mut moved = 0;
        for i in 0..3000 {
            let key = format!("room{i}");
            let Some(a) = rendezvous(&key, servers.iter().copied()) else { panic!("no pick") };
            per[servers.iter().position(|s| *s == a).unwrap_or(0)] += 1;
            let b = rendezvous(&key, servers.iter().copied().filter(|s| *s != "chat-2"));
            if a != "chat-2" && Some(a) != b {
                moved += 1;
            }
        }
        assert_eq!(moved, 0, "removing chat-2 must only move chat-2's rooms");
        assert!(per.iter().all(|&n| n > 800), "roughly even spread: {per:?}");
    }
}
