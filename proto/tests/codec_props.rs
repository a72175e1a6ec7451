//! Property tests of `pomelo_proto::wire`: decoding is total (random and truncated bytes never panic)
//! and encode → decode round-trips for packages, messages and several packages in one buffer; the
//! borrowed `package::peek` splits random bytes exactly as the streaming decoder does.

use bytes::{Bytes, BytesMut};
use pomelo_proto::wire::handshake::HandshakeRequest;
use pomelo_proto::wire::{package, Decoded, Message, MessageType, PackageDecoder, PackageType, Route};
use proptest::prelude::*;

fn package_type() -> impl Strategy<Value = PackageType> {
    (1u8..=5).prop_map(|b| PackageType::from_u8(b).expect("1..=5 are package types"))
}

fn route() -> impl Strategy<Value = Route> {
    prop_oneof![any::<u16>().prop_map(Route::Code), "[a-zA-Z.中]{0,60}".prop_map(Route::Plain)]
}

fn message() -> impl Strategy<Value = Message> {
    (0u8..4, any::<u32>(), route(), any::<bool>(), proptest::collection::vec(any::<u8>(), 0..300)).prop_map(
        |(t, id, route, gzip, body)| {
            let kind = MessageType::from_bits(t).expect("0..4 are message types");
            Message {
                kind,
                id: if kind.has_id() { id } else { 0 },
                route: kind.has_route().then_some(route),
                gzip,
                body: Bytes::from(body),
            }
        },
    )
}

/// Decodes everything it can; returns the packages and whether it stopped on an error.
fn drain(dec: &PackageDecoder, buf: &mut BytesMut) -> (Vec<package::Package>, bool) {
    let mut out = Vec::new();
    loop {
        match dec.decode(buf) {
            Ok(Decoded::Package(p)) => out.push(p),
            Ok(Decoded::NeedMore) => return (out, false),
            Err(_) => return (out, true),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600), cap in 0usize..2000) {
        let dec = PackageDecoder::new(cap);
        let mut buf = BytesMut::from(&bytes[..]);
        let (pkgs, _) = drain(&dec, &mut buf);
        for p in &pkgs {
            prop_assert!(p.body.len() <= cap);
            let _ = Message::decode(&p.body);
            let _ = HandshakeRequest::parse(&p.body);
        }
        let _ = Message::decode(&Bytes::from(bytes.clone()));
        let _ = HandshakeRequest::parse(&bytes);
        let _ = dec.decode_all(&bytes);
        // The borrowed peek sees exactly what the decoder splits off, package after package.
        let mut at = 0;
        for p in &pkgs {
            let (r, n) = package::peek(&bytes[at..], cap).expect("peek agrees").expect("whole");
            prop_assert_eq!((r.kind, r.body), (p.kind, &p.body[..]));
            at += n;
        }
        prop_assert!(!matches!(package::peek(&bytes[at..], cap), Ok(Some(_))));
    }

    #[test]
    fn messages_round_trip(m in message()) {
        let enc = m.encode().expect("routes are under 256 bytes");
        prop_assert_eq!(enc.len(), m.encoded_len());
        prop_assert_eq!(Message::decode(&enc).expect("decodes"), m.clone());
        let pkg = m.encode_package().expect("fits");
        let mut buf = BytesMut::from(&pkg[..]);
        match PackageDecoder::default().decode(&mut buf) {
            Ok(Decoded::Package(p)) => {
                prop_assert_eq!(p.kind, PackageType::Data);
                prop_assert_eq!(Message::decode(&p.body).expect("decodes"), m);
            }
            other => prop_assert!(false, "expected a package, got {:?}", other),
        }
    }

    #[test]
    fn truncated_messages_error_or_decode_without_panic(m in message(), cut in 0usize..400) {
        let enc = m.encode().expect("fits");
        let cut = cut.min(enc.len());
        let _ = Message::decode(&enc.slice(..cut));
    }

    #[test]
    fn package_streams_round_trip_in_any_chunking(
        pkgs in proptest::collection::vec((package_type(), proptest::collection::vec(any::<u8>(), 0..200)), 0..8),
        chunk in 1usize..50,
    ) {
        let mut wire = Vec::new();
        for (k, b) in &pkgs {
            wire.extend_from_slice(&package::encode(*k, b).expect("small"));
        }
        // All in one buffer.
        let all = PackageDecoder::default().decode_all(&wire).expect("whole packages");
        prop_assert_eq!(all.len(), pkgs.len());
        // Fed in chunks, as a TCP stream arrives.
        let dec = PackageDecoder::new(200);
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for c in wire.chunks(chunk) {
            buf.extend_from_slice(c);
            let (mut p, err) = drain(&dec, &mut buf);
            prop_assert!(!err);
            got.append(&mut p);
        }
        prop_assert!(buf.is_empty());
        let want: Vec<_> = pkgs.iter().map(|(k, b)| (*k, b.clone())).collect();
        let got: Vec<_> = got.into_iter().map(|p| (p.kind, p.body.to_vec())).collect();
        prop_assert_eq!(got, want);
        // Any strict prefix of a non-empty stream is incomplete, never an error or a phantom package.
        if !wire.is_empty() {
            let cut = wire.len() - 1;
            let mut buf = BytesMut::from(&wire[..cut]);
            let (p, err) = drain(&PackageDecoder::default(), &mut buf);
            prop_assert!(!err);
            prop_assert_eq!(p.len(), pkgs.len() - 1);
        }
    }
}
