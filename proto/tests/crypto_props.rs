//! Property tests of the decoders added for useCrypto and the JS clients' protobuf strings: any bytes
//! given to `ClientKey::verify`, any `sys.rsa`, and any run of packages given to
//! `ProtoBundle::js_strings` give a result, never a panic; and what `js_strings` returns, when it changes
//! anything, still holds whole packages that a decoder reads to the end.

use bytes::{Bytes, BytesMut};
use pomelo_proto::wire::crypto::ClientKey;
use pomelo_proto::wire::protobuf::ProtoBundle;
use pomelo_proto::wire::{encode_push, Decoded, PackageDecoder};
use proptest::prelude::*;
use serde_json::json;

fn key() -> ClientKey {
    let n = format!("c{}", "3".repeat(255));
    ClientKey::from_handshake(Some(&json!({"rsa_n": n, "rsa_e": 65537}))).expect("a key").expect("some")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn verify_takes_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..300), sig in "[0-9a-f]{0,300}") {
        let k = key();
        prop_assert!(k.verify(&bytes).is_err());
        let body = format!(r#"{{"a":{},"__crypto__":"{sig}"}}"#, String::from_utf8_lossy(&bytes).len());
        prop_assert!(k.verify(body.as_bytes()).is_err(), "no signature of ours to match");
    }

    #[test]
    fn any_rsa_object_is_a_key_or_an_error(n in "[0-9a-fx]{0,600}", e in any::<i64>(), es in "[0-9a-z]{0,20}") {
        let _ = ClientKey::from_handshake(Some(&json!({"rsa_n": n, "rsa_e": e})));
        let _ = ClientKey::from_handshake(Some(&json!({"rsa_n": n, "rsa_e": es})));
        let _ = ClientKey::from_handshake(Some(&json!({"rsa_n": e, "rsa_e": n})));
    }

    #[test]
    fn js_strings_keeps_packages_whole(
        msgs in proptest::collection::vec("\\PC{0,12}", 1..5),
        junk in proptest::collection::vec(any::<u8>(), 0..40),
    ) {
        let b = ProtoBundle::new(Some(r#"{"onChat": {"required string msg": 1, "repeated string to": 2}}"#), None)
            .expect("protos");
        let mut all = Vec::new();
        for m in &msgs {
            let body = b.encode("onChat", &json!({"msg": m, "to": [m, "x"]})).expect("route").expect("fits");
            all.extend_from_slice(&encode_push(None, "onChat", &body).expect("push"));
        }
        let whole = all.len();
        if let Some(js) = b.js_strings(None, &Bytes::from(all.clone())) {
            let decoder = PackageDecoder::new(1 << 20);
            let mut buf = BytesMut::from(&js[..]);
            let mut n = 0;
            while let Ok(Decoded::Package(_)) = decoder.decode(&mut buf) {
                n += 1;
            }
            prop_assert_eq!((n, buf.len()), (msgs.len(), 0));
        }
        // Damaged input: still no panic, and the tail it cannot read is kept as it was.
        all.extend_from_slice(&junk);
        let mut cut = all.clone();
        cut.truncate(whole / 2);
        let _ = b.js_strings(None, &Bytes::from(all));
        let _ = b.js_strings(None, &Bytes::from(cut));
    }
}
