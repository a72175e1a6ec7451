//! Compares `pomelo_proto::wire::protobuf` with Pomelo's own protobuf codec, through
//! `node oracle/protobuf.js`: npm `pomelo-protobuf` 0.4.0 (the server side and the browser client's copy)
//! and `pinus-protobuf` 1.7.4 (for `bool`, `uInt64`, `sInt64`), pinned in `oracle/package-lock.json`.
//! Every case goes both ways: our bytes equal theirs, we decode their bytes as they do, they decode
//! ours as we do.
//!
//! Needs `cd oracle && npm ci`. Without the packages the test is skipped with a message, unless `CI` is
//! set, in which case that is a failure.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use pomelo_proto::wire::protobuf::{handshake, EncodeErrorKind, Protos, ProtosError, Strings};
use serde_json::{json, Map, Value};

struct Oracle {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Oracle {
    fn start() -> Option<Oracle> {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("oracle");
        let modules = root.join("node_modules");
        if !modules.join("pomelo-protobuf").exists() || !modules.join("pinus-protobuf").exists() {
            if std::env::var_os("CI").is_some() {
                panic!("oracle/node_modules lacks pomelo-protobuf or pinus-protobuf and CI is set: run `cd oracle && npm ci` first");
            }
            println!(
                "SKIPPED: oracle/node_modules lacks pomelo-protobuf or pinus-protobuf; run `cd oracle && npm ci` to compare with it"
            );
            return None;
        }
        let mut child = Command::new("node")
            .arg("protobuf.js")
            .current_dir(&root)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("node must be on PATH to run the oracle");
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        Some(Oracle { child, stdin, stdout })
    }

    /// One command; returns the whole answer (which may carry "error").
    fn raw(&mut self, cmd: &Value) -> Value {
        writeln!(self.stdin, "{cmd}").unwrap();
        self.stdin.flush().unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("oracle answered {line:?}: {e}"))
    }

    fn ask(&mut self, cmd: Value) -> Value {
        let v = self.raw(&cmd);
        assert!(v.get("error").is_none(), "oracle failed on {cmd}: {v}");
        v
    }

    /// Their bytes for `msg` (empty where the JS returns null).
    fn encode(&mut self, lib: &str, protos: &Value, route: &str, msg: &Value) -> Vec<u8> {
        let v = self.ask(json!({"op":"encode","lib":lib,"protos":protos,"route":route,"msg":msg}));
        v["hex"].as_str().map(unhex).unwrap_or_default()
    }

    /// Their decoding of `bytes`, normalised.
    fn decode(&mut self, lib: &str, protos: &Value, route: &str, bytes: &[u8]) -> Value {
        let v = self.ask(json!({"op":"decode","lib":lib,"protos":protos,"route":route,"hex":hex(bytes)}));
        normalise(&v["msg"])
    }
}

impl Drop for Oracle {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

/// A double the oracle carries exactly: `{"$f64": "<bits>"}`.
fn f64_tag(x: f64) -> Value {
    json!({"$f64": format!("{:016x}", x.to_bits())})
}

/// Numbers become `"#<f64 bits>"` (so 5 and 5.0 compare equal, -0.0 and 0 do not); the oracle's
/// `$f64` tags are read back; NaN and infinities become null, as our decoder (and JSON.stringify) has them.
fn normalise(v: &Value) -> Value {
    let num = |x: f64| if x.is_finite() { Value::String(format!("#{:016x}", x.to_bits())) } else { Value::Null };
    match v {
        Value::Number(n) => num(n.as_f64().unwrap()),
        Value::Array(a) => Value::Array(a.iter().map(normalise).collect()),
        Value::Object(o) => {
            if let (1, Some(Value::String(h))) = (o.len(), o.get("$f64")) {
                return num(f64::from_bits(u64::from_str_radix(h, 16).unwrap()));
            }
            Value::Object(o.iter().map(|(k, v)| (k.clone(), normalise(v))).collect::<Map<_, _>>())
        }
        other => other.clone(),
    }
}

fn protos() -> Value {
    json!({
        "all.types": {
            "required uInt32 u": 1, "required sInt32 s": 2, "required int32 i": 3, "required double d": 4,
            "required float f": 5, "required string str": 6, "optional Inner inner": 7,
            "repeated Inner inners": 8, "repeated uInt32 us": 9, "repeated sInt32 ss": 10,
            "repeated int32 is": 11, "repeated double ds": 12, "repeated float fs": 13,
            "repeated string strs": 14, "optional uInt32 far": 300, "optional uInt32 farthest": 268435455,
            "message Inner": {
                "required string name": 1, "optional uInt32 n": 2, "repeated Leaf leaves": 3,
                "message Leaf": {"optional sInt32 x": 1, "repeated string tags": 2}
            }
        },
        "root.ref": {"required Shared a": 1, "repeated Shared b": 2, "optional uInt32 n": 3},
        "message Shared": {"optional string t": 1, "optional Shared next": 2},
        "keys.order": {"required uInt32 b": 1, "required uInt32 10": 2, "required uInt32 9": 3, "optional uInt32 a": 4},
        "onEmpty": {"optional uInt32 x": 1, "repeated uInt32 xs": 2}
    })
}

fn pinus_protos() -> Value {
    json!({
        "pinus.types": {
            "required bool b": 1, "optional uInt64 u": 2, "optional sInt64 s": 3, "repeated bool bs": 4,
            "repeated uInt64 us": 5, "repeated sInt64 ss": 6, "optional string t": 7
        }
    })
}

const U: [u64; 12] =
    [0, 1, 127, 128, 300, 16383, 16384, (1 << 31) - 1, (1 << 32) - 1, 1 << 32, 1_700_000_000_123, 1 << 53];
const S: [i64; 14] = [
    0,
    1,
    -1,
    63,
    -64,
    64,
    -65,
    (1 << 31) - 1,
    -(1 << 31),
    (1 << 32) - 1,
    -(1 << 32),
    1_700_000_000_123,
    1 << 52,
    -(1 << 52),
];
const D: [f64; 11] =
    [0.0, -0.0, 0.1, -2.5, 1.0 / 3.0, 1e300, -1e-300, 5e-324, f64::MAX, 123456789.125, 9007199254740993.0];
/// f32 edge cases: max, overflow to infinity, smallest subnormal, underflow, ties to even up and down.
const F: [f64; 13] = [
    0.0,
    -0.0,
    0.1,
    -0.1,
    1.0 / 3.0,
    3.4028234663852886e38,
    1e39,
    1.401298464324817e-45,
    1e-46,
    1.0 + 1.0 / 16777216.0,
    1.0 + 3.0 / 16777216.0,
    -7.25,
    16777217.0,
];

fn strings() -> Vec<String> {
    vec![
        String::new(),
        "a".into(),
        "héllo".into(),
        "中文字符".into(),
        "😀👍🏽 family 👨‍👩‍👧".into(),
        "nul\u{0}inside".into(),
        "x".repeat(200),
        "é".repeat(9000),
    ]
}

fn all_types_cases() -> Vec<Value> {
    let strs = strings();
    let mut out = Vec::new();
    for i in 0..U.len().max(S.len()).max(D.len()).max(F.len()).max(strs.len()) {
        let s = &strs[i % strs.len()];
        out.push(json!({
            "u": U[i % U.len()], "s": S[i % S.len()], "i": S[(i + 5) % S.len()], "d": D[i % D.len()],
            "f": F[i % F.len()], "str": s,
        }));
    }
    out.push(json!({
        "u": 1, "s": -1, "i": -1, "d": 0.5, "f": 0.5, "str": "nested",
        "inner": {"name": "x".repeat(130), "n": 7, "leaves": [{"x": -3, "tags": ["a", "😀"]}, {}, {"tags": []}]},
        "inners": [{"name": ""}, {"name": "é".repeat(9000), "leaves": [{"x": 1u64 << 40}]}],
        "us": U.to_vec(), "ss": S.to_vec(), "is": S.to_vec(), "ds": D.to_vec(), "fs": F.to_vec(),
        "strs": strs, "far": 1, "farthest": 2, "unknown": {"ignored": true},
    }));
    out.push(json!({"u": 0, "s": 0, "i": 0, "d": 0, "f": 0, "str": "", "inner": {"name": "", "leaves": []},
        "inners": [], "us": [], "ss": [], "is": [], "ds": [], "fs": [], "strs": []}));
    out
}

/// Both directions for one message: bytes equal, each side decodes the other's bytes the same way.
fn check(o: &mut Oracle, lib: &str, protos_json: &Value, route: &str, msg: &Value) {
    let ours = Protos::compile(protos_json).unwrap();
    let mine = ours.encode(route, msg).unwrap_or_else(|e| panic!("{route} {msg}: {e}"));
    let theirs = o.encode(lib, protos_json, route, msg);
    assert_eq!(hex(&mine), hex(&theirs), "{lib} encoding of {route} {msg}");
    let we_read_theirs = normalise(&ours.decode(route, &theirs).unwrap());
    assert_eq!(we_read_theirs, o.decode(lib, protos_json, route, &theirs), "{lib} decoding of {route} {msg}");
    assert_eq!(o.decode(lib, protos_json, route, &mine), normalise(&ours.decode(route, &mine).unwrap()));
}

#[test]
fn every_type_and_edge_value_matches_pomelo_protobuf_both_ways() {
    let Some(mut o) = Oracle::start() else { return };
    let p = protos();
    let cases = all_types_cases();
    for msg in &cases {
        check(&mut o, "pomelo", &p, "all.types", msg);
    }
    // The float field rounds as the JS does: 0.1 comes back as 0.10000000149011612.
    let ours = Protos::compile(&p).unwrap();
    let back = ours.decode("all.types", &ours.encode("all.types", &cases[1]).unwrap()).unwrap();
    assert_eq!(back["f"], json!(0.0));
    let back = ours.decode("all.types", &ours.encode("all.types", &cases[2]).unwrap()).unwrap();
    assert_eq!(back["f"], json!(0.10000000149011612));
    assert_eq!(back["str"], json!("héllo"));
    assert!(cases.len() >= 14);
}

#[test]
fn root_messages_recursion_key_order_and_empty_bodies_match() {
    let Some(mut o) = Oracle::start() else { return };
    let p = protos();
    let deep = (0..20).fold(json!({"t": "leaf"}), |acc, i| json!({"t": format!("level {i}"), "next": acc}));
    for msg in [
        json!({"a": {}}),
        json!({"a": {"t": "😀", "next": {"t": "two", "next": {}}}, "b": [{"t": "b0"}, {}, {"next": {"t": "b2"}}]}),
        json!({"a": deep, "n": 5}),
    ] {
        check(&mut o, "pomelo", &p, "root.ref", &msg);
    }
    // JS for-in order: array-index keys first, ascending, then the rest.
    check(&mut o, "pomelo", &p, "keys.order", &json!({"b": 1, "10": 2, "9": 3, "a": 4}));
    let mine = Protos::compile(&p).unwrap().encode("keys.order", &json!({"b": 1, "10": 2, "9": 3})).unwrap();
    assert_eq!(hex(&mine), "1803100208 01".replace(' ', ""));
    // Nothing to write: the JS returns null, Pomelo sends an empty body, both decode it as {}.
    for msg in [json!({}), json!({"xs": []}), json!({"xs": null})] {
        check(&mut o, "pomelo", &p, "onEmpty", &msg);
    }
    assert_eq!(Protos::compile(&p).unwrap().decode("onEmpty", &[]).unwrap(), json!({}));
}

#[test]
fn pinus_bool_and_64_bit_types_match_pinus_protobuf_both_ways() {
    let Some(mut o) = Oracle::start() else { return };
    let p = pinus_protos();
    let mut cases = vec![
        json!({"b": true}),
        json!({"b": false, "t": "pinus"}),
        json!({"b": true, "bs": [true, false, true], "us": U.to_vec(), "ss": S.to_vec(), "t": "x".repeat(40)}),
    ];
    for (u, s) in U.iter().zip(S.iter()) {
        cases.push(json!({"b": false, "u": u, "s": s, "t": "padding for the JS buffer"}));
    }
    for msg in &cases {
        check(&mut o, "pinus", &p, "pinus.types", msg);
    }
    // The dialect shared with pomelo-protobuf 0.4.0 gives pinus' bytes too.
    for msg in all_types_cases() {
        check(&mut o, "pinus", &protos(), "all.types", &msg);
    }
}

#[test]
fn the_browser_clients_bytes_decode_as_pomelo_decodes_them() {
    let Some(mut o) = Oracle::start() else { return };
    let p = protos();
    let ours = Protos::compile(&p).unwrap();
    for msg in all_types_cases() {
        // The browser copy writes wire type 2 on varints and CESU-8 strings (an emoji is two 3-byte
        // surrogates): the server's decoder (and ours) read them anyway, emoji as U+FFFD, alike.
        let theirs = o.encode("client", &p, "all.types", &msg);
        assert!(!theirs.is_empty());
        let want = o.decode("pomelo", &p, "all.types", &theirs);
        assert_eq!(normalise(&ours.decode("all.types", &theirs).unwrap()), want, "client bytes of {msg}");
        // And the browser client reads our bytes as it reads Pomelo's (which are ours: see above).
        let mine = ours.encode("all.types", &msg).unwrap();
        let client_reads = o.decode("client", &p, "all.types", &mine);
        if !msg.to_string().chars().any(|c| c as u32 > 0xffff) {
            assert_eq!(client_reads, normalise(&ours.decode("all.types", &mine).unwrap()), "{msg}");
        }
    }
}

#[test]
fn nan_and_infinity_from_js_decode_to_null() {
    let Some(mut o) = Oracle::start() else { return };
    let p = protos();
    let ours = Protos::compile(&p).unwrap();
    for x in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let msg = json!({"u": 1, "s": 1, "i": 1, "d": f64_tag(x), "f": f64_tag(x), "str": "non-finite",
            "ds": [f64_tag(x), 1.5], "fs": [f64_tag(x), 2.5]});
        let theirs = o.encode("pomelo", &p, "all.types", &msg);
        let back = ours.decode("all.types", &theirs).unwrap();
        assert_eq!(
            (&back["d"], &back["f"], &back["ds"], &back["fs"]),
            (&json!(null), &json!(null), &json!([null, 1.5]), &json!([null, 2.5]))
        );
        assert_eq!(normalise(&back), o.decode("pomelo", &p, "all.types", &theirs));
    }
}

#[test]
fn where_the_js_fails_silently_we_give_an_error() {
    let Some(mut o) = Oracle::start() else { return };
    // Missing required field: the JS logs and returns null.
    let p = protos();
    let r = o.ask(json!({"op":"encode","lib":"pomelo","protos":p,"route":"all.types","msg":{"u": 1}}));
    assert_eq!(r["hex"], Value::Null);
    assert!(r["logs"].to_string().contains("no property exist for required"), "{r}");
    let e = Protos::compile(&p).unwrap().encode("all.types", &json!({"u": 1})).unwrap_err();
    assert_eq!(e.kind, EncodeErrorKind::MissingRequired);
    assert_eq!(e.path, "all.types.s");

    // A route-level message is not visible inside its sibling: the JS writes the key and no value.
    let sibling =
        json!({"r": {"message A": {"required uInt32 x": 1}, "message B": {"required A a": 1}, "required B b": 1}});
    let theirs = o.encode("pomelo", &sibling, "r", &json!({"b": {"a": {"x": 5}}}));
    assert_eq!(hex(&theirs), "0a010a", "length 1 holding a bare key");
    assert!(matches!(Protos::compile(&sibling), Err(ProtosError::UnknownType { ref ty, .. }) if ty == "A"));

    // A negative uInt32: the JS throws.
    let r = o.raw(&json!({"op":"encode","lib":"pomelo","protos":p,"route":"onEmpty","msg":{"x": -1}}));
    assert!(r.get("error").is_some(), "{r}");
    let e = Protos::compile(&p).unwrap().encode("onEmpty", &json!({"x": -1})).unwrap_err();
    assert!(matches!(e.kind, EncodeErrorKind::OutOfRange { .. }), "{e}");

    // An unknown tag: the JS throws a TypeError; we name the tag.
    let r = o.raw(&json!({"op":"decode","lib":"pomelo","protos":p,"route":"onEmpty","hex":"1801"}));
    assert!(r.get("error").is_some(), "{r}");
    let e = Protos::compile(&p).unwrap().decode("onEmpty", &[0x18, 0x01]).unwrap_err();
    assert_eq!(e.to_string(), "onEmpty: byte 0: tag 3 is not a field of onEmpty");
}

/// The handshake's `sys.protos`: the parsed form, byte for byte, in the file's own key order.
const SERVER_PROTOS: &str = r#"{
  "onChat": {"required string msg": 3, "required string from": 1, "optional string target": 2},
  "connector.entryHandler.enter": {
    "repeated User users": 2, "required uInt32 code": 1,
    "message User": {"optional sInt32 level": 7, "required string name": 1, "message Tag": {"optional string t": 1}},
    "message Aaa": {"optional uInt32 10": 10, "optional uInt32 9": 9}
  },
  "7": {"optional uInt32 2": 2, "optional uInt32 b": 1},
  "房间.推送": {"optional string 表情\"quoted\"😀\t\u0001\u007f": 4, "required double d": 268435455},
  "message Shared": {"optional Shared next": 2, "optional string t": 1},
  "onChat": {"required string msg": 3, "required string from": 1, "optional bool seen": 4}
}"#;

const CLIENT_PROTOS: &str =
    r#"{"chat.chatHandler.send": {"required string content": 1, "required string target": 2, "optional float at": 3}}"#;

#[test]
fn handshake_protos_and_version_match_pomelos_component() {
    let Some(mut o) = Oracle::start() else { return };
    let (server, server_json) = handshake::parsed_json(SERVER_PROTOS).unwrap();
    let (_, client_json) = handshake::parsed_json(CLIENT_PROTOS).unwrap();
    let theirs = o.ask(json!({"op":"parsed","client":CLIENT_PROTOS,"server":SERVER_PROTOS}));
    assert_eq!(server_json, theirs["server"].as_str().unwrap());
    assert_eq!(client_json, theirs["client"].as_str().unwrap());
    assert_eq!(handshake::version(&client_json, &server_json), theirs["version"].as_str().unwrap());
    // A missing file is {} on Pomelo's side.
    let one = o.ask(json!({"op":"parsed","client":null,"server":SERVER_PROTOS}));
    assert_eq!(handshake::version("{}", &server_json), one["version"].as_str().unwrap());
    // The repeated "onChat" key: JSON.parse keeps its first place and its last value.
    assert!(server_json.starts_with(r#"{"7":{"2":{"#), "{server_json}");
    assert!(
        server.has_route("onChat") && server_json.contains(r#""seen":{"option":"optional","type":"bool","tag":4}"#)
    );
    // The browser client can encode and decode with the parsed form: it is what the handshake sends.
    let parsed: Value = serde_json::from_str(&server_json).unwrap();
    assert!(parsed["connector.entryHandler.enter"]["__messages"]["User"]["__tags"]["7"] == json!("level"));
}

#[test]
fn emoji_survive_the_browser_client_with_cesu8_strings() {
    let Some(mut o) = Oracle::start() else { return };
    let p = json!({"chat": {"required string msg": 1, "repeated string tags": 2, "optional Who from": 3,
        "message Who": {"required string name": 1}}});
    let ours = Protos::compile(&p).unwrap();
    let mut non_bmp = 0;
    for s in strings() {
        let msg = json!({"msg": s, "tags": [s, "😀", "ok"], "from": {"name": s}});
        // Only string and message fields: the browser copy's keys are the server's, so bytes compare.
        let theirs = o.encode("client", &p, "chat", &msg);
        let mut mine = Vec::new();
        ours.encode_with("chat", &msg, &mut mine, Strings::Cesu8).unwrap();
        assert_eq!(hex(&mine), hex(&theirs), "{msg}");
        assert_eq!(ours.decode_with("chat", &theirs, Strings::Cesu8).unwrap(), msg, "the client's emoji, whole");
        assert_eq!(o.decode("client", &p, "chat", &mine), normalise(&msg), "the client reads ours whole");
        // Pomelo's way (UTF-8 to the browser client) garbles them, which is why the switch exists.
        if s.chars().any(|c| c as u32 > 0xffff) {
            non_bmp += 1;
            let utf8 = ours.encode("chat", &msg).unwrap();
            assert_ne!(o.decode("client", &p, "chat", &utf8), normalise(&msg));
            assert_ne!(ours.decode("chat", &theirs).unwrap(), msg);
        }
    }
    assert_eq!(non_bmp, 1);
}
