//! How string fields are written and read: UTF-8 as Pomelo's server does, or CESU-8 as the JS browser
//! client does.
//!
//! The browser copy of pomelo-protobuf writes each UTF-16 code unit on its own, so an emoji arrives as
//! two 3-byte surrogates (CESU-8), and its reader has no 4-byte branch, so real UTF-8 emoji come out
//! garbled. [`Strings::Cesu8`] speaks its dialect both ways: pairs are joined into code points on
//! reading and characters beyond U+FFFF are split into pairs on writing; everything else is the same
//! as UTF-8. [`Strings::Utf8`] is pomelo-protobuf's server (Node's `Buffer`): invalid bytes read as
//! U+FFFD, a CESU-8 emoji as six of them. Which one a client gets is the connector's choice (by client
//! type); this module only does the bytes. Pure, no I/O.

/// The string dialect of one peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Strings {
    /// Standard UTF-8 (pomelo-protobuf's server side, libpomelo, pinus).
    #[default]
    Utf8,
    /// CESU-8: characters beyond U+FFFF as two 3-byte surrogates (the JS browser client).
    Cesu8,
}

/// The encoded length of `s`.
pub(super) fn encoded_len(s: &str, mode: Strings) -> usize {
    match mode {
        Strings::Utf8 => s.len(),
        // Each 4-byte UTF-8 character becomes 6 bytes.
        Strings::Cesu8 => s.len() + 2 * s.chars().filter(|&c| c as u32 > 0xffff).count(),
    }
}

/// Appends `s` in `mode`.
pub(super) fn put(out: &mut Vec<u8>, s: &str, mode: Strings) {
    if mode == Strings::Utf8 || s.is_ascii() || !s.chars().any(|c| c as u32 > 0xffff) {
        out.extend_from_slice(s.as_bytes());
        return;
    }
    for c in s.chars() {
        let u = c as u32;
        if u <= 0xffff {
            let mut b = [0u8; 4];
            out.extend_from_slice(c.encode_utf8(&mut b).as_bytes());
        } else {
            let v = u - 0x1_0000;
            for unit in [0xd800 | (v >> 10), 0xdc00 | (v & 0x3ff)] {
                out.extend_from_slice(&[
                    0xe0 | (unit >> 12) as u8,
                    0x80 | ((unit >> 6) & 0x3f) as u8,
                    0x80 | (unit & 0x3f) as u8,
                ]);
            }
        }
    }
}

/// A surrogate pair in CESU-8 at the start of `b`: the code point it stands for.
fn cesu8_pair(b: &[u8]) -> Option<char> {
    let [0xed, h1 @ 0xa0..=0xaf, h2 @ 0x80..=0xbf, 0xed, l1 @ 0xb0..=0xbf, l2 @ 0x80..=0xbf, ..] = *b else {
        return None;
    };
    let hi = 0xd000 | (u32::from(h1 & 0x3f) << 6) | u32::from(h2 & 0x3f);
    let lo = 0xd000 | (u32::from(l1 & 0x3f) << 6) | u32::from(l2 & 0x3f);
    char::from_u32(0x1_0000 + ((hi - 0xd800) << 10) + (lo - 0xdc00))
}

/// Reads `b` in `mode`; invalid bytes become U+FFFD as in `String::from_utf8_lossy` (and Node).
pub(super) fn read(b: &[u8], mode: Strings) -> String {
    if mode == Strings::Utf8 {
        return String::from_utf8_lossy(b).into_owned();
    }
    let mut out = String::with_capacity(b.len());
    let mut rest = b;
    loop {
        match std::str::from_utf8(rest) {
            Ok(s) => {
                out.push_str(s);
                return out;
            }
            Err(e) => {
                let (good, bad) = rest.split_at(e.valid_up_to());
                // `good` was just validated.
                out.push_str(std::str::from_utf8(good).unwrap_or_default());
                if let Some(c) = cesu8_pair(bad) {
                    out.push(c);
                    rest = &bad[6..];
                } else {
                    out.push('\u{fffd}');
                    match e.error_len() {
                        Some(n) => rest = &bad[n..],
                        None => return out,
                    }
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn cesu8_both_ways() {
        let s = "a😀é中👍🏽";
        let mut out = Vec::new();
        put(&mut out, s, Strings::Cesu8);
        assert_eq!(out.len(), encoded_len(s, Strings::Cesu8));
        assert_eq!(&out[1..7], &[0xed, 0xa0, 0xbd, 0xed, 0xb8, 0x80]);
        assert_eq!(read(&out, Strings::Cesu8), s);
        assert_eq!(read(&out[1..7], Strings::Utf8), "\u{fffd}".repeat(6));
        assert_eq!(read(s.as_bytes(), Strings::Cesu8), s, "real UTF-8 reads as itself");
        // A lone or reversed surrogate, and a cut pair, are U+FFFD as in UTF-8.
        assert_eq!(read(&[0xed, 0xa0, 0xbd, b'x'], Strings::Cesu8), "\u{fffd}\u{fffd}\u{fffd}x");
        for bad in [
            &[0xed, 0xb8, 0x80, 0xed, 0xa0, 0xbd][..],
            &[0xed, 0xa0, 0xbd, 0xed, 0xb8],
            &[0xf0, 0x9f],
            &[0xff, b'a', 0xc3],
        ] {
            assert_eq!(read(bad, Strings::Cesu8), String::from_utf8_lossy(bad), "{bad:02x?}");
        }
    }
}
