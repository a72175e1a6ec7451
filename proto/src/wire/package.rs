//! Pomelo's package layer: `type:1 | length:3 (BE u24) | body`.
//!
//! Pure functions and a streaming [`PackageDecoder`] over a `BytesMut`; no I/O, no tasks. The decoder
//! checks the declared length against its cap *before* it reserves or splits anything, so a peer cannot
//! make the process allocate more than the cap per connection. [`peek`] reads the same header with the
//! same checks ([`peek_header`]) but only borrows: a [`PackageRef`] into the caller's slice, no allocation
//! (the load generator parses every package it receives with it).

use bytes::{BufMut, Bytes, BytesMut};

/// Bytes in a package header.
pub const HEADER_LEN: usize = 4;
/// Largest body the 3-byte length can express (16 MiB - 1).
pub const MAX_BODY_LEN: usize = 0x00FF_FFFF;

/// The five package types of pomelo-protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PackageType {
    Handshake = 1,
    HandshakeAck = 2,
    Heartbeat = 3,
    Data = 4,
    Kick = 5,
}

impl PackageType {
    pub fn from_u8(b: u8) -> Option<PackageType> {
        Some(match b {
            1 => PackageType::Handshake,
            2 => PackageType::HandshakeAck,
            3 => PackageType::Heartbeat,
            4 => PackageType::Data,
            5 => PackageType::Kick,
            _ => return None,
        })
    }

    pub fn as_u8(self) -> u8 {
        self as u8
    }
}

/// One decoded package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Package {
    pub kind: PackageType,
    pub body: Bytes,
}

impl Package {
    pub fn new(kind: PackageType, body: impl Into<Bytes>) -> Package {
        Package { kind, body: body.into() }
    }

    /// Encodes this package (fails only if the body is over 16 MiB - 1).
    pub fn encode(&self) -> Result<Bytes, PackageError> {
        encode(self.kind, &self.body)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PackageError {
    #[error("unknown package type {0} (Pomelo knows 1-5)")]
    UnknownType(u8),
    #[error("package body of {len} bytes is over the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
}

/// Writes the 4-byte header for a body of `len` bytes.
pub fn put_header(out: &mut BytesMut, kind: PackageType, len: usize) -> Result<(), PackageError> {
    if len > MAX_BODY_LEN {
        return Err(PackageError::TooLarge { len, max: MAX_BODY_LEN });
    }
    out.put_u8(kind.as_u8());
    // len <= 0xFF_FFFF, so the three low bytes of a u32 hold it exactly.
    let be = (len as u32).to_be_bytes();
    out.put_slice(&be[1..]);
    Ok(())
}

/// Encodes one package into `out`.
pub fn encode_into(out: &mut BytesMut, kind: PackageType, body: &[u8]) -> Result<(), PackageError> {
    out.reserve(HEADER_LEN + body.len());
    put_header(out, kind, body.len())?;
    out.put_slice(body);
    Ok(())
}

/// Encodes one package as shareable bytes.
pub fn encode(kind: PackageType, body: &[u8]) -> Result<Bytes, PackageError> {
    let mut out = BytesMut::with_capacity(HEADER_LEN + body.len());
    encode_into(&mut out, kind, body)?;
    Ok(out.freeze())
}

/// A package with an empty body (ACK, heartbeat): 4 bytes.
pub fn empty(kind: PackageType) -> Bytes {
    Bytes::copy_from_slice(&[kind.as_u8(), 0, 0, 0])
}

/// A package borrowed from the buffer it was found in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackageRef<'a> {
    pub kind: PackageType,
    pub body: &'a [u8],
}

/// The type and body length the header at the front of `buf` declares, the length checked against
/// `max_body`; `Ok(None)` while the header is incomplete (the type is checked as soon as it is there,
/// so garbage is refused early).
#[inline]
pub fn peek_header(buf: &[u8], max_body: usize) -> Result<Option<(PackageType, usize)>, PackageError> {
    let Some(header) = buf.get(..HEADER_LEN) else {
        if let Some(&t) = buf.first() {
            PackageType::from_u8(t).ok_or(PackageError::UnknownType(t))?;
        }
        return Ok(None);
    };
    let kind = PackageType::from_u8(header[0]).ok_or(PackageError::UnknownType(header[0]))?;
    let len = u32::from_be_bytes([0, header[1], header[2], header[3]]) as usize;
    if len > max_body {
        return Err(PackageError::TooLarge { len, max: max_body });
    }
    Ok(Some((kind, len)))
}

/// The whole package at the front of `buf`, borrowed, and the bytes it takes; `Ok(None)` if more bytes
/// are needed. The checks are [`PackageDecoder::decode`]'s.
#[inline]
pub fn peek(buf: &[u8], max_body: usize) -> Result<Option<(PackageRef<'_>, usize)>, PackageError> {
    let Some((kind, len)) = peek_header(buf, max_body.min(MAX_BODY_LEN))? else { return Ok(None) };
    Ok(buf.get(HEADER_LEN..HEADER_LEN + len).map(|body| (PackageRef { kind, body }, HEADER_LEN + len)))
}

/// Result of one decoding step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// A complete package was split off the front of the buffer.
    Package(Package),
    /// The buffer holds no complete package yet; it was not modified.
    NeedMore,
}

/// Splits complete packages off the front of a buffer.
#[derive(Debug, Clone, Copy)]
pub struct PackageDecoder {
    max_body: usize,
}

impl Default for PackageDecoder {
    fn default() -> Self {
        PackageDecoder { max_body: MAX_BODY_LEN }
    }
}

impl PackageDecoder {
    /// A decoder that refuses bodies over `max_body` bytes (clamped to the protocol's 16 MiB - 1).
    pub fn new(max_body: usize) -> PackageDecoder {
        PackageDecoder { max_body: max_body.min(MAX_BODY_LEN) }
    }

    pub fn max_body(&self) -> usize {
        self.max_body
    }

    /// Decodes the next package. On an error the buffer is left as it was; the caller should drop the
    /// connection, since the stream can no longer be framed.
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Decoded, PackageError> {
        let Some((kind, len)) = peek_header(buf, self.max_body)? else { return Ok(Decoded::NeedMore) };
        if buf.len() < HEADER_LEN + len {
            // Reserve at most the declared (already capped) length, so reads land in one buffer.
            buf.reserve(HEADER_LEN + len - buf.len());
            return Ok(Decoded::NeedMore);
        }
        let mut frame = buf.split_to(HEADER_LEN + len);
        let body = frame.split_off(HEADER_LEN).freeze();
        Ok(Decoded::Package(Package { kind, body }))
    }

    /// Decodes every package in a buffer that must hold whole packages only (one WebSocket message).
    pub fn decode_all(&self, bytes: &[u8]) -> Result<Vec<Package>, DecodeAllError> {
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        loop {
            match self.decode(&mut buf)? {
                Decoded::Package(p) => out.push(p),
                Decoded::NeedMore if buf.is_empty() => return Ok(out),
                Decoded::NeedMore => return Err(DecodeAllError::Truncated(buf.len())),
            }
        }
    }
}

/// Cuts bytes that hold whole packages into pieces of at most `max` bytes, each ending on a package
/// boundary, so each piece can be one WebSocket message (Pomelo clients decode every message as whole
/// packages). A package longer than `max` is a piece of its own; so is a malformed tail, whole, since
/// the bytes were encoded here and only the peer could mind. No copies: the pieces share `bytes`.
pub fn split_at_packages(mut bytes: Bytes, max: usize) -> impl Iterator<Item = Bytes> {
    std::iter::from_fn(move || {
        if bytes.is_empty() {
            return None;
        }
        let mut end = 0;
        while let Some(h) = bytes.get(end..end + HEADER_LEN) {
            let next = end + HEADER_LEN + u32::from_be_bytes([0, h[1], h[2], h[3]]) as usize;
            if next > bytes.len() || (end > 0 && next > max) {
                break;
            }
            end = next;
            if end >= max {
                break;
            }
        }
        if end == 0 {
            end = bytes.len();
        }
        Some(bytes.split_to(end))
    })
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeAllError {
    #[error(transparent)]
    Package(#[from] PackageError),
    #[error("{0} bytes of a truncated package at the end of the buffer")]
    Truncated(usize),
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn worked_bytes_of_empty_packages() {
        assert_eq!(&empty(PackageType::HandshakeAck)[..], &[2, 0, 0, 0]);
        assert_eq!(&empty(PackageType::Heartbeat)[..], &[3, 0, 0, 0]);
        assert_eq!(encode(PackageType::Heartbeat, b"").unwrap(), empty(PackageType::Heartbeat));
    }

    #[test]
    fn kick_worked_bytes() {
        let b = encode(PackageType::Kick, br#"{"reason":"kick"}"#).unwrap();
        assert_eq!(&b[..4], &[0x05, 0x00, 0x00, 0x11]);
        assert_eq!(&b[4..], br#"{"reason":"kick"}"#);
    }

    #[test]
    fn peek_borrows_what_decode_splits() {
        let mut buf = BytesMut::new();
        encode_into(&mut buf, PackageType::Heartbeat, b"").unwrap();
        encode_into(&mut buf, PackageType::Data, b"abc").unwrap();
        buf.extend_from_slice(&[4, 0, 0]);
        let (p, n) = peek(&buf, 16).unwrap().unwrap();
        assert_eq!((p.kind, p.body, n), (PackageType::Heartbeat, &b""[..], 4));
        let (p, n2) = peek(&buf[n..], 16).unwrap().unwrap();
        assert_eq!((p.kind, p.body, n2), (PackageType::Data, &b"abc"[..], 7));
        assert_eq!(peek(&buf[n + n2..], 16).unwrap(), None, "a partial header needs more");
        assert_eq!(peek(&[4, 0, 0, 5, b'x'], 16).unwrap(), None, "a partial body needs more");
        assert_eq!(peek(&[9], 16), Err(PackageError::UnknownType(9)));
        assert_eq!(peek(&[4, 0, 0, 17], 16), Err(PackageError::TooLarge { len: 17, max: 16 }));
        let mut d = BytesMut::from(&buf[..]);
        let decoder = PackageDecoder::new(16);
        assert_eq!(decoder.decode(&mut d).unwrap(), Decoded::Package(Package::new(PackageType::Heartbeat, "")));
        assert_eq!(decoder.decode(&mut d).unwrap(), Decoded::Package(Package::new(PackageType::Data, "abc")));
    }

    #[test]
    fn several_packages_in_one_buffer_and_partial_tail() {
        let mut buf = BytesMut::new();
        encode_into(&mut buf, PackageType::Heartbeat, b"").unwrap();
        encode_into(&mut buf, PackageType::Data, b"abc").unwrap();
        buf.extend_from_slice(&[4, 0, 0, 5, b'x']);
        let d = PackageDecoder::default();
        assert_eq!(d.decode(&mut buf).unwrap(), Decoded::Package(Package::new(PackageType::Heartbeat, "")));
        assert_eq!(d.decode(&mut buf).unwrap(), Decoded::Package(Package::new(PackageType::Data, "abc")));
        assert_eq!(d.decode(&mut buf).unwrap(), Decoded::NeedMore);
        assert_eq!(buf.len(), 5);
        buf.extend_from_slice(b"yzw!");
        assert_eq!(d.decode(&mut buf).unwrap(), Decoded::Package(Package::new(PackageType::Data, "xyzw!")));
        assert!(buf.is_empty());
    }

    #[test]
    fn cap_is_checked_before_allocating() {
        let d = PackageDecoder::new(10);
        let mut buf = BytesMut::from(&[4u8, 0xff, 0xff, 0xff][..]);
        assert_eq!(d.decode(&mut buf), Err(PackageError::TooLarge { len: 0xFF_FFFF, max: 10 }));
        assert!(buf.capacity() < 1024);
        let mut buf = BytesMut::from(&[4u8, 0, 0, 11][..]);
        assert!(d.decode(&mut buf).is_err());
        let mut buf = BytesMut::from(&[4u8, 0, 0, 10][..]);
        assert_eq!(d.decode(&mut buf), Ok(Decoded::NeedMore));
    }

    #[test]
    fn unknown_types_are_errors_even_before_the_header_is_complete() {
        let d = PackageDecoder::default();
        assert_eq!(d.decode(&mut BytesMut::from(&[0u8][..])), Err(PackageError::UnknownType(0)));
        assert_eq!(d.decode(&mut BytesMut::from(&[6u8, 0, 0, 0][..])), Err(PackageError::UnknownType(6)));
        assert_eq!(d.decode(&mut BytesMut::from(&[1u8, 0][..])), Ok(Decoded::NeedMore));
        assert_eq!(d.decode(&mut BytesMut::new()), Ok(Decoded::NeedMore));
    }

    #[test]
    fn decode_all_refuses_a_truncated_tail() {
        let d = PackageDecoder::default();
        assert_eq!(d.decode_all(&[3, 0, 0, 0, 3, 0, 0, 0]).unwrap().len(), 2);
        assert_eq!(d.decode_all(&[3, 0, 0, 0, 4, 0]), Err(DecodeAllError::Truncated(2)));
        assert!(d.decode_all(&[]).unwrap().is_empty());
    }

    #[test]
    fn split_at_packages_keeps_packages_whole_and_pieces_under_the_cap() {
        let mut buf = BytesMut::new();
        for len in [10usize, 20, 5, 100, 0, 30] {
            encode_into(&mut buf, PackageType::Data, &vec![b'x'; len]).unwrap();
        }
        let all = buf.freeze();
        let pieces: Vec<Bytes> = split_at_packages(all.clone(), 40).collect();
        let lens: Vec<usize> = pieces.iter().map(Bytes::len).collect();
        // 14+24 | 9 | 104 (alone, over the cap) | 4+34
        assert_eq!(lens, vec![38, 9, 104, 38]);
        let d = PackageDecoder::default();
        let n: usize = pieces.iter().map(|p| d.decode_all(p).unwrap().len()).sum();
        assert_eq!(n, 6);
        assert_eq!(pieces.concat(), all.to_vec());
        assert_eq!(split_at_packages(all.clone(), 1 << 20).collect::<Vec<_>>(), vec![all]);
        assert_eq!(split_at_packages(Bytes::from_static(&[4, 0, 0, 9, 1]), 2).count(), 1, "a bad tail is one piece");
        assert_eq!(split_at_packages(Bytes::new(), 10).count(), 0);
    }

    #[test]
    fn too_large_body_cannot_be_encoded() {
        let big = vec![0u8; MAX_BODY_LEN + 1];
        assert!(encode(PackageType::Data, &big).is_err());
    }
}
