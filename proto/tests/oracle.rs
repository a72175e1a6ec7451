//! Compares `pomelo_proto::wire` with Pomelo's own codec (npm `pomelo-protocol` 0.1.6, pinned in
//! `oracle/package-lock.json`), in both directions, through `node oracle/oracle.js`.
//!
//! Needs `cd oracle && npm ci`. Without `oracle/node_modules` the test is skipped with a message, unless
//! `CI` is set, in which case that is a failure.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use bytes::{Bytes, BytesMut};
use pomelo_proto::wire::{package, Decoded, Message, MessageType, PackageDecoder, PackageType, Route};
use serde_json::{json, Value};

struct Oracle {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Oracle {
    fn start() -> Option<Oracle> {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("oracle");
        if !root.join("node_modules").join("pomelo-protocol").exists() {
            if std::env::var_os("CI").is_some() {
                panic!("oracle/node_modules is missing and CI is set: run `cd oracle && npm ci` first");
            }
            println!(
                "SKIPPED: oracle/node_modules is missing; run `cd oracle && npm ci` to compare with pomelo-protocol"
            );
            return None;
        }
        let mut child = Command::new("node")
            .arg("oracle.js")
            .current_dir(&root)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("node must be on PATH to run the oracle");
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        Some(Oracle { child, stdin, stdout })
    }

    fn ask(&mut self, cmd: Value) -> Value {
        writeln!(self.stdin, "{cmd}").unwrap();
        self.stdin.flush().unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("oracle answered {line:?}: {e}"));
        assert!(v.get("error").is_none(), "oracle failed on {cmd}: {v}");
        v
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

/// The messages every direction is checked with.
fn cases() -> Vec<Message> {
    let bodies = [
        r#"{"uid":"bob"}"#,
        "",
        r#"{"msg":"héllo 中文 😀","from":"bob","target":"*"}"#,
        r#"{"code":200,"host":"127.0.0.1","port":3051}"#,
    ];
    let ids = [1u32, 127, 128, 300, 16383, 16384, 1 << 21, (1 << 28) - 1];
    let routes = [
        Route::Plain("gate.gateHandler.queryEntry".into()),
        Route::Plain("onChat".into()),
        Route::Plain("房间.处理.发送".into()),
        Route::Plain(String::new()),
        Route::Code(2),
        Route::Code(0xffff),
    ];
    let mut out = Vec::new();
    for (i, body) in bodies.iter().enumerate() {
        let body = Bytes::from(body.to_string());
        for &id in &ids {
            out.push(Message::request(id, routes[i % routes.len()].clone(), body.clone()));
            out.push(Message::response(id, body.clone()));
        }
        for r in &routes {
            out.push(Message::request(7, r.clone(), body.clone()));
            out.push(Message::notify(r.clone(), body.clone()));
            out.push(Message::push(r.clone(), body.clone()));
        }
    }
    out
}

fn encode_cmd(m: &Message) -> Value {
    let (compress, route) = match &m.route {
        Some(Route::Code(c)) => (1, json!(c)),
        Some(Route::Plain(s)) => (0, json!(s)),
        None => (0, Value::Null),
    };
    let body = std::str::from_utf8(&m.body).unwrap();
    json!({"op":"msg_encode","id":m.id,"type":m.kind as u8,"compressRoute":compress,"route":route,"body":body})
}

#[test]
fn messages_match_pomelo_protocol_both_ways() {
    let Some(mut o) = Oracle::start() else { return };
    let cases = cases();
    for m in &cases {
        // Pomelo encodes → the same bytes as ours, and we decode them back to the same message.
        let theirs = unhex(o.ask(encode_cmd(m))["hex"].as_str().unwrap());
        let ours = m.encode().unwrap();
        assert_eq!(hex(&theirs), hex(&ours), "encoding of {m:?}");
        assert_eq!(&Message::decode(&Bytes::from(theirs)).unwrap(), m);

        // We encode → Pomelo decodes the same fields.
        let d = o.ask(json!({"op":"msg_decode","hex":hex(&ours)}));
        assert_eq!(d["type"], json!(m.kind as u8), "{m:?}");
        let want_id = if m.kind.has_id() { m.id } else { 0 };
        assert_eq!(d["id"], json!(want_id), "{m:?}");
        assert_eq!(d["body"], json!(std::str::from_utf8(&m.body).unwrap()), "{m:?}");
        match &m.route {
            Some(Route::Code(c)) => assert_eq!((d["compressRoute"].clone(), d["route"].clone()), (json!(1), json!(c))),
            Some(Route::Plain(s)) => assert_eq!((d["compressRoute"].clone(), d["route"].clone()), (json!(0), json!(s))),
            None => assert_eq!(d["route"], Value::Null),
        }
    }
    assert!(cases.len() > 80);
}

#[test]
fn packages_match_pomelo_protocol_both_ways() {
    let Some(mut o) = Oracle::start() else { return };
    let data =
        Message::push(Route::Plain("onAdd".into()), Bytes::from(r#"{"route":"onAdd","user":"bob"}"#)).encode().unwrap();
    let big = vec![b'x'; 70_000];
    let packages: Vec<(PackageType, Vec<u8>)> = vec![
        (PackageType::Handshake, pomelo_proto::wire::handshake::JS_CLIENT_HANDSHAKE.as_bytes().to_vec()),
        (PackageType::HandshakeAck, vec![]),
        (PackageType::Heartbeat, vec![]),
        (PackageType::Data, data.to_vec()),
        (PackageType::Kick, br#"{"reason":"kick"}"#.to_vec()),
        (PackageType::Data, big),
    ];
    let mut ours_all = BytesMut::new();
    let mut theirs_all = Vec::new();
    for (kind, body) in &packages {
        let theirs =
            unhex(o.ask(json!({"op":"pkg_encode","type":kind.as_u8(),"body":hex(body)}))["hex"].as_str().unwrap());
        let ours = package::encode(*kind, body).unwrap();
        assert_eq!(hex(&theirs), hex(&ours), "{kind:?}");
        ours_all.extend_from_slice(&ours);
        theirs_all.extend_from_slice(&theirs);
    }
    // Several packages in one buffer: Pomelo splits ours, we split theirs.
    let d = o.ask(json!({"op":"pkg_decode","hex":hex(&ours_all)}));
    let list = d["packages"].as_array().unwrap();
    assert_eq!(list.len(), packages.len());
    for ((kind, body), p) in packages.iter().zip(list) {
        assert_eq!(p["type"], json!(kind.as_u8()));
        assert_eq!(p["body"], json!(hex(body)));
    }
    let mut buf = BytesMut::from(&theirs_all[..]);
    let dec = PackageDecoder::default();
    for (kind, body) in &packages {
        match dec.decode(&mut buf).unwrap() {
            Decoded::Package(p) => assert_eq!((p.kind, &p.body[..]), (*kind, &body[..])),
            Decoded::NeedMore => panic!("expected a package"),
        }
    }
    assert!(buf.is_empty());
}

#[test]
fn worked_bytes_from_pomelo() {
    let Some(mut o) = Oracle::start() else { return };
    // Reference §1.10: the compressed enter request, as Pomelo's JS client encodes it.
    let m = o.ask(json!({"op":"msg_encode","id":1,"type":0,"compressRoute":1,"route":2,
        "body":"{\"username\":\"bob\",\"rid\":\"r1\"}"}));
    let p = o.ask(json!({"op":"pkg_encode","type":4,"body":m["hex"]}));
    let ours =
        Message::request(1, Route::Code(2), Bytes::from(r#"{"username":"bob","rid":"r1"}"#)).encode_package().unwrap();
    assert_eq!(p["hex"], json!(hex(&ours)));
    assert!(hex(&ours).starts_with("0400002101010002"));
    assert_eq!(Message::decode(&ours.slice(4..)).unwrap().kind, MessageType::Request);
}

/// Emoji through the JS client's own string codec (pomelo-protocol `strencode`/`strdecode`, which the
/// browser client bundles): what it sends (CESU-8) is read as the real characters, and what the server
/// sends (non-BMP escaped) it reads back unchanged, where plain UTF-8 emoji come out garbled.
#[test]
fn emoji_survive_the_js_clients_string_codec_both_ways() {
    let Some(mut o) = Oracle::start() else { return };
    let text = r#"{"content":"hi 😀 🎉 é 世界 𝄞","from":"bob"}"#;
    let sent = unhex(o.ask(json!({"op": "strencode", "text": text}))["hex"].as_str().unwrap());
    assert!(std::str::from_utf8(&sent).is_err(), "the JS client's bytes are CESU-8, not UTF-8");
    let read = pomelo_proto::wire::text::cesu8_to_utf8(&sent).expect("joined");
    assert_eq!(std::str::from_utf8(&read).unwrap(), text);

    let value: Value = serde_json::from_str(text).unwrap();
    let raw = serde_json::to_vec(&value).unwrap();
    let garbled = o.ask(json!({"op": "json_strdecode", "hex": hex(&raw)}));
    assert_ne!(garbled["value"], value, "plain UTF-8 emoji are garbled by strdecode: {garbled}");
    let escaped = pomelo_proto::wire::text::escape_non_bmp(raw);
    let shown = o.ask(json!({"op": "json_strdecode", "hex": hex(&escaped)}));
    assert_eq!(shown["value"], value, "escaped emoji read back unchanged: {shown}");
}
