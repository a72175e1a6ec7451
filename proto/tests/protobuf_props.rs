//! Property tests of `pomelo_proto::wire::protobuf`: for random protos and random values that fit them,
//! decode(encode(v)) == v (empty repeated fields come back absent, as in the JS codec); decoding random
//! or damaged bytes never panics; compiling random protos JSON never panics.

use pomelo_proto::wire::protobuf::{Protos, Strings};
use proptest::prelude::*;
use serde_json::{json, Map, Value};

const SCALARS: [&str; 9] = ["uInt32", "sInt32", "int32", "uInt64", "sInt64", "float", "double", "string", "bool"];
const MAX_SAFE: u64 = 1 << 53;

#[derive(Debug, Clone)]
struct FieldSpec {
    label: &'static str,
    /// An index into SCALARS, or SCALARS.len() for the nested message `M`.
    ty: usize,
}

fn field() -> impl Strategy<Value = FieldSpec> {
    (prop_oneof![Just("required"), Just("optional"), Just("repeated")], 0..=SCALARS.len())
        .prop_map(|(label, ty)| FieldSpec { label, ty })
}

/// A route `r` with up to 8 fields, which may use message `M` (declared in the route, up to 6 scalar
/// fields) and root message `Node` (recursive through `next`).
fn schema() -> impl Strategy<Value = (Vec<FieldSpec>, Vec<FieldSpec>, Vec<u32>)> {
    (
        proptest::collection::vec(field(), 0..8),
        proptest::collection::vec(
            field().prop_map(|mut f| {
                f.ty %= SCALARS.len();
                f
            }),
            0..6,
        ),
        proptest::collection::vec(1u32..(1 << 28), 16),
    )
}

fn type_name(ty: usize) -> &'static str {
    SCALARS.get(ty).copied().unwrap_or("M")
}

fn protos_json(route: &[FieldSpec], m: &[FieldSpec], tags: &[u32]) -> Value {
    // Distinct tags: the random ones, or the smallest free one where a random one repeats.
    let mut used = std::collections::BTreeSet::new();
    let mut tag = |i: usize| {
        let mut t = tags[i % tags.len()];
        if used.contains(&t) {
            t = (1..).find(|c| !used.contains(c)).unwrap_or(1);
        }
        used.insert(t);
        t
    };
    let mut msg = Map::new();
    for (i, f) in m.iter().enumerate() {
        msg.insert(format!("{} {} m{i}", f.label, type_name(f.ty)), json!(tag(i)));
    }
    let mut r = Map::new();
    for (i, f) in route.iter().enumerate() {
        r.insert(format!("{} {} f{i}", f.label, type_name(f.ty)), json!(i + 1));
    }
    r.insert("message M".into(), Value::Object(msg));
    r.insert("optional Node node".into(), json!(1000));
    json!({"r": r, "message Node": {"optional uInt32 v": 1, "optional Node next": 2}})
}

/// A value of scalar type `ty` drawn from `seed`, exactly representable after a round trip.
fn scalar(ty: usize, seed: u64, s: &str) -> Value {
    let signed = (seed % (MAX_SAFE + 1)) as i64 - (1 << 52);
    match SCALARS[ty] {
        "uInt32" | "uInt64" => json!(seed % (MAX_SAFE + 1)),
        "sInt32" | "int32" | "sInt64" => json!(signed.clamp(-(1 << 52), 1 << 52)),
        "float" => {
            let x = f32::from_bits(seed as u32);
            if x.is_finite() {
                json!(f64::from(x))
            } else {
                json!(0.5)
            }
        }
        "double" => {
            let x = f64::from_bits(seed);
            if x.is_finite() {
                json!(x)
            } else {
                json!(-1.5)
            }
        }
        "string" => json!(s),
        _ => json!(seed % 2 == 1),
    }
}

/// A message for `fields` from the random pool; returns the value to encode and the one expected back.
fn message(fields: &[FieldSpec], m: &[FieldSpec], pool: &mut impl Iterator<Item = (u64, String)>) -> (Value, Value) {
    let mut input = Map::new();
    let mut want = Map::new();
    for (i, f) in fields.iter().enumerate() {
        let name = format!("f{i}");
        let Some((seed, s)) = pool.next() else { break };
        let one = |pool: &mut dyn Iterator<Item = (u64, String)>, seed: u64, s: &str| -> Value {
            if f.ty < SCALARS.len() {
                scalar(f.ty, seed, s)
            } else {
                let mut inner = Map::new();
                for (j, g) in m.iter().enumerate() {
                    if g.label == "required" || seed >> (j % 64) & 1 == 1 {
                        let (sd, st) = pool.next().unwrap_or((j as u64, String::new()));
                        inner.insert(
                            format!("m{j}"),
                            if g.label == "repeated" { json!([scalar(g.ty, sd, &st)]) } else { scalar(g.ty, sd, &st) },
                        );
                    }
                }
                Value::Object(inner)
            }
        };
        match f.label {
            "repeated" => {
                let n = (seed % 4) as usize;
                let items: Vec<Value> = (0..n).map(|k| one(pool, seed.rotate_left(k as u32 * 7), &s)).collect();
                if !items.is_empty() {
                    want.insert(name.clone(), Value::Array(items.clone()));
                }
                input.insert(name, Value::Array(items));
            }
            label => {
                if label == "required" || seed % 3 != 0 {
                    let v = one(pool, seed, &s);
                    want.insert(name.clone(), v.clone());
                    input.insert(name, v);
                }
            }
        }
    }
    (Value::Object(input), Value::Object(want))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn decode_of_encode_is_the_value(
        (route, m, tags) in schema(),
        pool in proptest::collection::vec((any::<u64>(), "\\PC{0,12}"), 64),
        depth in 0usize..25,
    ) {
        let p = Protos::compile(&protos_json(&route, &m, &tags)).expect("generated protos compile");
        let mut it = pool.into_iter().cycle().take(4096);
        let (mut input, mut want) = message(&route, &m, &mut it);
        // A chain of root messages `depth` deep.
        let node = (0..depth).fold(json!({"v": depth}), |acc, i| json!({"v": i, "next": acc}));
        input["node"] = node.clone();
        want["node"] = node;
        let bytes = p.encode("r", &input).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let back = p.decode("r", &bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&back, &want, "bytes {:02x?}", bytes);
        // Damaged copies of good bytes: never a panic, and a truncated body is mostly an error.
        for cut in 0..bytes.len().min(40) {
            let _ = p.decode("r", &bytes[..cut]);
            let mut flipped = bytes.clone();
            flipped[cut] ^= 0x80 | (cut as u8);
            let _ = p.decode("r", &flipped);
        }
    }

    #[test]
    fn strings_round_trip_in_both_dialects(text in "\\PC{0,40}", raw in proptest::collection::vec(any::<u8>(), 0..60)) {
        let p = Protos::compile(&json!({"r": {"required string s": 1, "repeated string ss": 2}})).expect("compiles");
        let v = json!({"s": text, "ss": [text, "😀x"]});
        for mode in [Strings::Utf8, Strings::Cesu8] {
            let mut bytes = Vec::new();
            p.encode_with("r", &v, &mut bytes, mode).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(p.decode_with("r", &bytes, mode).map_err(|e| TestCaseError::fail(e.to_string()))?, v.clone());
            // Any bytes as a string: never a panic, and CESU-8 reading equals UTF-8 reading on valid UTF-8.
            let mut body = vec![0x0a];
            body.push(raw.len() as u8);
            body.extend_from_slice(&raw);
            let read = p.decode_with("r", &body, mode).map_err(|e| TestCaseError::fail(e.to_string()))?;
            if std::str::from_utf8(&raw).is_ok() {
                prop_assert_eq!(&read["s"], &json!(String::from_utf8_lossy(&raw)));
            }
        }
    }

    #[test]
    fn random_bytes_never_panic(
        (route, m, tags) in schema(),
        bytes in proptest::collection::vec(any::<u8>(), 0..400),
    ) {
        let p = Protos::compile(&protos_json(&route, &m, &tags)).expect("generated protos compile");
        let _ = p.decode("r", &bytes);
        let _ = p.decode("message Node", &bytes);
    }

    #[test]
    fn random_protos_never_panic(keys in proptest::collection::vec((prop_oneof![
        "(required|optional|repeated|message)( [a-zA-Z0-9]{0,6}){0,3}",
        "(required|optional|repeated) (uInt32|string|bool|M|N) [a-z0-9]{1,2}",
        "message (M|N)",
    ], -3i64..300), 0..12)) {
        let mut r = Map::new();
        for (k, tag) in &keys {
            let v = if k.starts_with("message") { json!({ "required uInt32 x": tag }) } else { json!(tag) };
            r.insert(k.clone(), v);
        }
        if let Ok(p) = Protos::compile(&json!({ "r": r })) {
            let _ = p.decode("r", &[0x08, 0x01, 0x12, 0x00]);
            let _ = p.encode("r", &json!({"x": 1}));
            // What compiles is reachable under its route.
            prop_assert!(p.has_route("r"));
        }
    }
}
