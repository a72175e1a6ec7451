//! `checkClient` in servers.yaml (issue 17): a frontend refuses a client type older than its minimum
//! version with handshake code 501, as Pomelo's `checkClient` hook did, over TCP and WebSocket alike;
//! other types pass.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use pomelo_proto::wire::package::{self, Decoded, PackageDecoder, PackageType};
use serde_json::{json, Value};

use crate::harness::{yaml, Cluster};

/// The handshake reply's `code` for a raw TCP client of `ty`/`version`.
fn tcp_handshake_code(addr: SocketAddr, ty: &str, version: Option<&str>) -> Value {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    let mut sys = json!({"type": ty});
    if let Some(v) = version {
        sys["version"] = json!(v);
    }
    let body = json!({"sys": sys, "user": {}}).to_string();
    s.write_all(&package::encode(PackageType::Handshake, body.as_bytes()).expect("encode")).expect("send");
    let decoder = PackageDecoder::new(1 << 20);
    let mut buf = bytes::BytesMut::new();
    loop {
        if let Ok(Decoded::Package(p)) = decoder.decode(&mut buf) {
            assert_eq!(p.kind, PackageType::Handshake);
            let v: Value = serde_json::from_slice(&p.body).expect("json");
            return v["code"].clone();
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).expect("read");
        assert!(n > 0, "closed before the handshake reply");
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[test]
fn check_client_refuses_old_client_versions_with_501() {
    let servers = "  gate:\n    - {id: gate-1, clientPort: 0}\n  connector:\n    - {id: connector-1, port: 0, clientPort: 0, checkClient: {js-websocket: 0.0.2, desktop: 1.10.0}}\n  chat:\n    - {id: chat-1, port: 0}\n";
    let c = Cluster::start(&yaml(servers, ""));
    c.wait_running();
    let addr: SocketAddr = c.server("connector-1")["addrs"]["client"].as_str().expect("client").parse().expect("addr");
    assert_eq!(tcp_handshake_code(addr, "js-websocket", Some("0.0.1")), 501, "older than the minimum");
    assert_eq!(tcp_handshake_code(addr, "js-websocket", None), 501, "no version for a type with a minimum");
    assert_eq!(tcp_handshake_code(addr, "js-websocket", Some("0.0.2")), 200);
    assert_eq!(tcp_handshake_code(addr, "desktop", Some("1.9.9")), 501, "1.9.9 is older than 1.10.0");
    assert_eq!(tcp_handshake_code(addr, "desktop", Some("1.10")), 200);
    assert_eq!(tcp_handshake_code(addr, "unity", None), 200, "a type without a rule passes");
    // The gate has no rule: the same old client logs in there.
    let gate: SocketAddr = c.server("gate-1")["addrs"]["client"].as_str().expect("gate").parse().expect("addr");
    assert_eq!(tcp_handshake_code(gate, "js-websocket", Some("0.0.1")), 200);
}
