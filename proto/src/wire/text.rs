//! Emoji that work with Pomelo's JS client, which Pomelo never managed.
//!
//! The JS client (pomelo-protocol's `strencode`) writes each UTF-16 code unit as UTF-8, so a character
//! outside the Basic Multilingual Plane (most emoji) arrives as two 3-byte surrogates (CESU-8), which is
//! not UTF-8: [`cesu8_to_utf8`] joins them into the real 4-byte character. Its `strdecode` has no 4-byte
//! branch, so a proper UTF-8 emoji from a server comes out garbled: [`escape_non_bmp`] writes such
//! characters in JSON as `\uD83D\uDE00` escapes instead, which every JSON parser (the JS client's
//! `JSON.parse`, serde_json, libpomelo2's jansson) reads back as the same character. Since the escaped
//! form means the same to every client, a push is still encoded once for all of them.

/// `bytes` with every CESU-8 surrogate pair turned into its UTF-8 character, if that makes it UTF-8;
/// `None` if it is not valid even then (a lone surrogate, or other invalid bytes).
pub fn cesu8_to_utf8(bytes: &[u8]) -> Option<Vec<u8>> {
    let surrogate = |b: &[u8], lo: u8, hi: u8| -> Option<u32> {
        match *b {
            [0xED, b1, b2, ..] if (lo..=hi).contains(&b1) && b2 & 0xC0 == 0x80 => {
                Some(0xD000 | (u32::from(b1 & 0x3F) << 6) | u32::from(b2 & 0x3F))
            }
            _ => None,
        }
    };
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let rest = &bytes[i..];
        if let (Some(high), Some(low)) =
            (surrogate(rest, 0xA0, 0xAF), rest.get(3..).and_then(|r| surrogate(r, 0xB0, 0xBF)))
        {
            let c = 0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00);
            let ch = char::from_u32(c)?;
            let mut buf = [0u8; 4];
            out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
            i += 6;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    std::str::from_utf8(&out).ok()?;
    Some(out)
}

/// JSON text with every character above U+FFFF written as a `\uXXXX\uXXXX` surrogate escape. Such
/// characters can only stand inside JSON strings, so this is a byte-level rewrite; JSON without any is
/// returned untouched.
pub fn escape_non_bmp(json: Vec<u8>) -> Vec<u8> {
    if !json.iter().any(|b| *b >= 0xF0) {
        return json;
    }
    let Ok(text) = std::str::from_utf8(&json) else { return json };
    let mut out = String::with_capacity(json.len() + 16);
    for ch in text.chars() {
        if u32::from(ch) > 0xFFFF {
            let mut units = [0u16; 2];
            for u in ch.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{u:04X}"));
            }
        } else {
            out.push(ch);
        }
    }
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn surrogate_pairs_become_characters_and_lone_ones_are_refused() {
        // U+1F600 as two CESU-8 surrogates (D83D DE00).
        let cesu = [b"{\"c\":\"a".as_slice(), &[0xED, 0xA0, 0xBD, 0xED, 0xB8, 0x80], b"\"}"].concat();
        assert_eq!(cesu8_to_utf8(&cesu).as_deref(), Some("{\"c\":\"a\u{1F600}\"}".as_bytes()));
        assert_eq!(cesu8_to_utf8("plain é 世界".as_bytes()).as_deref(), Some("plain é 世界".as_bytes()));
        assert_eq!(cesu8_to_utf8(&[0xED, 0xA0, 0xBD]), None, "a lone high surrogate");
        assert_eq!(cesu8_to_utf8(&[0xED, 0xB8, 0x80, 0xED, 0xA0, 0xBD]), None, "a pair in the wrong order");
        assert_eq!(cesu8_to_utf8(&[0xFF]), None);
    }

    #[test]
    fn non_bmp_characters_are_escaped_and_read_back_the_same() {
        let json = serde_json::to_vec(&serde_json::json!({"msg": "hi 😀 é 世界 🎉"})).expect("json");
        let escaped = escape_non_bmp(json.clone());
        let text = String::from_utf8(escaped.clone()).expect("utf8");
        assert!(
            text.contains("\\uD83D\\uDE00") && text.contains("\\uD83C\\uDF89") && text.contains("é 世界"),
            "{text}"
        );
        assert!(!escaped.iter().any(|b| *b >= 0xF0), "no 4-byte sequence left");
        let back: serde_json::Value = serde_json::from_slice(&escaped).expect("still JSON");
        assert_eq!(back["msg"], "hi 😀 é 世界 🎉");
        let plain = serde_json::to_vec(&serde_json::json!({"msg": "no emoji"})).expect("json");
        assert_eq!(escape_non_bmp(plain.clone()), plain);
    }
}
