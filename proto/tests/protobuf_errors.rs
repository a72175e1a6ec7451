//! `pomelo_proto::wire::protobuf` on bad input: every bad proto, value and body is a clear error that
//! names the place, and the bounds hold (nesting depth, lengths past the input, 10-byte varints, 2^53).

#![allow(clippy::unwrap_used)]

use pomelo_proto::wire::protobuf::{DecodeErrorKind, EncodeErrorKind, Protos, ProtosError, MAX_DEPTH};
use serde_json::{json, Value};

fn compile_err(v: Value) -> ProtosError {
    Protos::compile(&v).unwrap_err()
}

#[test]
fn bad_protos_are_named() {
    assert!(matches!(compile_err(json!([])), ProtosError::NotAnObjectOfRoutes { found: "an array" }));
    assert!(matches!(compile_err(json!({"r": 3})), ProtosError::NotAnObject { ref path, .. } if path == "r"));
    for key in
        ["required uInt32", "required  uInt32 a", "needed uInt32 a", "required uInt32 a b", "message", "map uInt32 a"]
    {
        let e = compile_err(json!({"r": {key: 1}}));
        assert!(matches!(e, ProtosError::BadKey { key: ref k, .. } if k == key), "{key}: {e}");
    }
    for tag in [json!(0), json!(-1), json!(1.5), json!("1"), json!(1 << 28)] {
        let e = compile_err(json!({"r": {"required uInt32 a": tag}}));
        assert!(matches!(e, ProtosError::BadTag { .. }), "{e}");
    }
    let e = compile_err(json!({"r": {"message M": {"required uInt32 a": 3, "optional string b": 3}}}));
    assert_eq!(e.to_string(), "r.M: tag 3 is used by both b and a; give each field its own tag");
    let e = compile_err(json!({"r": {"required uInt32 a": 1, "optional string a": 2}}));
    assert!(matches!(e, ProtosError::DuplicateField { .. }), "{e}");
    let e = compile_err(json!({"r": {"required uInt32 __tags": 1}}));
    assert!(matches!(e, ProtosError::ReservedName { .. }), "{e}");
    let e = compile_err(json!({"r": {"message M": {"repeated Missing xs": 1}}}));
    assert!(e.to_string().starts_with("r.M.xs: unknown type Missing"), "{e}");
    // A message declared in another route is not visible either.
    let e = compile_err(json!({"a": {"message X": {}}, "b": {"required X x": 1}}));
    assert!(matches!(e, ProtosError::UnknownType { ref ty, .. } if ty == "X"), "{e}");
    let deep = (0..MAX_DEPTH + 2).fold(json!({}), |acc, _| json!({"message M": acc}));
    assert!(matches!(compile_err(json!({"r": deep})), ProtosError::TooDeep { .. }));
    assert!(Protos::parse("{\"r\": ").is_err());
    // What compiles: scalars, nested and root references, a root message used by a route.
    let p = Protos::parse(
        r#"{"r": {"message M": {"optional N n": 1}, "optional M m": 1}, "message N": {"optional N n": 1}}"#,
    )
    .unwrap();
    assert!(p.has_route("r") && !p.has_route("message N") && !p.has_route("x"));
    assert_eq!(p.routes().collect::<Vec<_>>(), ["r"]);
}

#[test]
fn bad_values_are_named() {
    let p = Protos::compile(&json!({"r": {
        "required uInt32 u": 1, "optional sInt32 s": 2, "optional string t": 3, "optional bool b": 4,
        "repeated M ms": 5, "optional float f": 6, "message M": {"required string name": 1}
    }}))
    .unwrap();
    let err = |v: Value| p.encode("r", &v).unwrap_err();
    assert_eq!(err(json!({})).to_string(), "r.u: required field is missing");
    assert_eq!(err(json!({"u": null})).kind, EncodeErrorKind::WrongType { expected: "a number", found: "null" });
    assert_eq!(err(json!({"u": "12"})).kind, EncodeErrorKind::WrongType { expected: "a number", found: "a string" });
    assert!(matches!(err(json!({"u": -1})).kind, EncodeErrorKind::OutOfRange { .. }));
    assert!(matches!(err(json!({"u": (1u64 << 53) + 1})).kind, EncodeErrorKind::OutOfRange { .. }));
    assert!(matches!(err(json!({"u": 1e21})).kind, EncodeErrorKind::OutOfRange { .. }));
    assert!(matches!(err(json!({"u": 1, "s": (1i64 << 52) + 1})).kind, EncodeErrorKind::OutOfRange { .. }));
    assert!(matches!(err(json!({"u": 1, "s": i64::MIN})).kind, EncodeErrorKind::OutOfRange { .. }));
    assert_eq!(err(json!({"u": 1, "t": 5})).path, "r.t");
    assert_eq!(
        err(json!({"u": 1, "b": 1})).kind,
        EncodeErrorKind::WrongType { expected: "a boolean", found: "a number" }
    );
    assert_eq!(err(json!({"u": 1, "f": "x"})).path, "r.f");
    assert_eq!(
        err(json!({"u": 1, "ms": {}})).kind,
        EncodeErrorKind::WrongType { expected: "an array", found: "an object" }
    );
    assert_eq!(err(json!({"u": 1, "ms": [{"name": "a"}, {}]})).to_string(), "r.ms[1].name: required field is missing");
    assert_eq!(err(json!({"u": 1, "ms": [3]})).path, "r.ms[0]");
    assert_eq!(err(json!([1])).kind, EncodeErrorKind::WrongType { expected: "an object", found: "an array" });
    assert_eq!(p.encode("nope", &json!({})).unwrap_err().kind, EncodeErrorKind::UnknownRoute);
    // Fractions truncate as JS parseInt does; optional null is absent.
    assert_eq!(p.encode("r", &json!({"u": 3.9, "s": -2.5, "t": null})).unwrap(), [0x10, 0x03, 0x08, 0x03]);
    // A failed encode leaves the buffer as it was.
    let mut out = vec![9u8];
    assert!(p.encode_into("r", &json!({"u": 1, "ms": [{"name": "a"}, {}]}), &mut out).is_err());
    assert_eq!(out, [9]);
}

#[test]
fn nesting_is_bounded_both_ways() {
    let p = Protos::compile(&json!({"r": {"optional N n": 1}, "message N": {"optional N n": 1}})).unwrap();
    let ok = (0..MAX_DEPTH - 1).fold(json!({}), |acc, _| json!({"n": acc}));
    let bytes = p.encode("r", &ok).unwrap();
    assert_eq!(p.decode("r", &bytes).unwrap(), ok);
    let too_deep = json!({ "n": ok });
    assert_eq!(p.encode("r", &too_deep).unwrap_err().kind, EncodeErrorKind::TooDeep);
    // The same nesting on the wire: key 0x0a, then a length, MAX_DEPTH times.
    let mut body: Vec<u8> = Vec::new();
    for level in 1..=MAX_DEPTH {
        let len = body.len() as u8;
        body.splice(0..0, [0x0a, len]);
        if level == MAX_DEPTH - 1 {
            assert_eq!(p.decode("r", &body).unwrap(), ok);
        }
    }
    assert_eq!(p.decode("r", &body).unwrap_err().kind, DecodeErrorKind::TooDeep);
}

#[test]
fn bad_bodies_are_errors_with_offsets() {
    let p = Protos::compile(&json!({"r": {
        "optional uInt32 u": 1, "optional string t": 2, "repeated uInt32 us": 3, "optional double d": 4,
        "optional M m": 5, "message M": {"optional uInt32 x": 1}
    }}))
    .unwrap();
    let kind = |b: &[u8]| p.decode("r", b).unwrap_err().kind;
    assert_eq!(kind(&[0x08]), DecodeErrorKind::Truncated);
    assert_eq!(kind(&[0x08, 0x80]), DecodeErrorKind::Truncated);
    assert_eq!(
        kind(&[0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]),
        DecodeErrorKind::VarintTooLarge(u64::MAX)
    );
    assert_eq!(
        kind(&[0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02]),
        DecodeErrorKind::VarintTooLong
    );
    assert_eq!(
        kind(&[0x08, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x00]),
        DecodeErrorKind::VarintTooLong
    );
    assert_eq!(
        kind(&[0x08, 0x81, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x10]),
        DecodeErrorKind::VarintTooLarge((1 << 53) + 1)
    );
    assert_eq!(
        p.decode("r", &[0x08, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x10]).unwrap(),
        json!({"u": 1u64 << 53})
    );
    assert_eq!(kind(&[0x12, 0x05, b'a']), DecodeErrorKind::Truncated);
    assert_eq!(kind(&[0x12, 0xff, 0xff, 0xff, 0xff, 0x0f]), DecodeErrorKind::Truncated);
    assert_eq!(kind(&[0x18, 0xff, 0xff, 0x03, 0x01]), DecodeErrorKind::Truncated, "a count beyond the input");
    assert_eq!(kind(&[0x21, 0, 0, 0]), DecodeErrorKind::Truncated);
    // A value may not run past the end of its message.
    assert_eq!(kind(&[0x2a, 0x01, 0x08, 0x05]), DecodeErrorKind::Truncated);
    let e = p.decode("r", &[0x08, 0x01, 0x2a, 0x02, 0x10, 0x01]).unwrap_err();
    assert_eq!(e.to_string(), "r: byte 4: tag 2 is not a field of r.M");
    assert_eq!(p.decode("x", &[]).unwrap_err().kind, DecodeErrorKind::UnknownRoute);
    // What the JS decoder accepts, we do: wire types ignored, last value wins, invalid UTF-8 replaced.
    assert_eq!(p.decode("r", &[0x0a, 0x01, 0x08, 0x02]).unwrap(), json!({"u": 2}));
    assert_eq!(p.decode("r", &[0x12, 0x03, 0xed, 0xa0, 0xbd]).unwrap(), json!({"t": "\u{fffd}\u{fffd}\u{fffd}"}));
    assert_eq!(p.decode("r", &[0x18, 0x01, 0x07, 0x18, 0x02, 0x08, 0x09]).unwrap(), json!({"us": [7, 8, 9]}));
    assert_eq!(p.decode("r", &[0x2a, 0x00]).unwrap(), json!({"m": {}}));
}
