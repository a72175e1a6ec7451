//! TLS on the cluster's own links, with the real binary (issue 14, "encrypted across hosts"): with
//! `clusterTls: true` the cluster chats end to end; a plain-text peer on the control or an RPC port gets
//! not one readable byte; a peer with a certificate of another CA is refused; the CA's key stays with the
//! master.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use pomelo_master::procstat;
use pomelo_proto::tls::{self, Authority, Material};
use serde_json::json;

use crate::harness::{wait_until, yaml, Cluster, SMALL};
use crate::pomelo_client::{login, try_login};

/// What a plain-text peer reads after sending `hello` as a frame: every byte until the server closes.
fn plain_hello(addr: SocketAddr, hello: serde_json::Value) -> (Vec<u8>, bool) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    let body = serde_json::to_vec(&hello).expect("json");
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend(body);
    let _ = s.write_all(&frame);
    s.set_read_timeout(Some(Duration::from_secs(8))).ok();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = loop {
        match s.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
            Err(_) => break false,
        }
    };
    (got, closed)
}

/// A TLS peer with `material`: Ok if it got through the TLS handshake and the server answered its hello.
fn tls_hello(addr: SocketAddr, material: &Material) -> Result<Vec<u8>, String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let connector = material.connector().map_err(|e| e.to_string())?;
        let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let mut s = tls::connect(Some(&connector), tcp, addr.ip()).await.map_err(|e| e.to_string())?;
        let body = serde_json::to_vec(&json!({"t": "hello", "id": "chat-1", "nonce": "ab".repeat(32)}))
            .map_err(|e| e.to_string())?;
        s.write_all(&(body.len() as u32).to_be_bytes()).await.map_err(|e| e.to_string())?;
        s.write_all(&body).await.map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; 4096];
        match tokio::time::timeout(Duration::from_secs(6), s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => Ok(buf[..n].to_vec()),
            Ok(Ok(_)) => Err("closed".into()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("no answer".into()),
        }
    })
}

#[test]
fn with_cluster_tls_the_cluster_chats_and_plain_or_foreign_peers_get_nothing() {
    let c = Cluster::start(&yaml(SMALL, "  clusterTls: true\n"));
    let running = c.wait_running();
    let gate: SocketAddr = c.server("gate-1")["addrs"]["client"].as_str().expect("gate").parse().expect("addr");

    // Chat end to end: every link (worker ↔ master, connector ↔ chat) is TLS now.
    let (mut a, reply) =
        wait_until(Duration::from_secs(10), "a login to work", || try_login(gate, "alice", "tls-room"));
    assert!(reply["users"].as_array().is_some_and(|u| u.len() == 1), "{reply}");
    let (mut b, reply) = login(gate, "bob", "tls-room");
    assert!(reply["users"].as_array().is_some_and(|u| u.len() == 2), "{reply}");
    let sent = a.request(
        "chat.chatHandler.send",
        json!({"rid": "tls-room", "content": "over tls", "from": "alice", "target": "*"}),
    );
    assert!(sent.get("code").is_none(), "{sent}");
    for cl in [&mut a, &mut b] {
        let got = cl.collect("onChat", 1, Duration::from_secs(5), Duration::from_millis(100));
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0]["msg"], "over tls");
    }

    // A plain-text peer: the control port and a chat server's RPC port read its hello as a TLS record,
    // answer at most a TLS alert (never a challenge) and close.
    let control: SocketAddr =
        c.master_json().and_then(|m| m["control_addr"].as_str()?.parse().ok()).expect("control address");
    let rpc: SocketAddr = c.server("chat-1")["addrs"]["rpc"].as_str().expect("rpc").parse().expect("addr");
    for (what, addr, hello) in [
        ("control", control, json!({"t": "hello", "id": "chat-1", "nonce": "ab".repeat(32)})),
        ("rpc", rpc, json!({"t": "hello", "connector": "connector-1", "nonce": "ab".repeat(32)})),
    ] {
        let started = Instant::now();
        let (got, closed) = plain_hello(addr, hello);
        let text = String::from_utf8_lossy(&got);
        assert!(closed, "the {what} port kept a plain-text peer for {:?}", started.elapsed());
        assert!(!text.contains("nonce") && !text.contains("challenge"), "{what} answered in plain text: {text}");
        assert!(got.len() < 64, "{what} sent {} bytes to a plain-text peer", got.len());
    }

    // A TLS peer with a certificate of another CA, trusting ours or not: refused either way.
    let ca_pem = std::fs::read_to_string(c.dir.path().join(".pomelo/tls/ca.pem")).expect("ca.pem");
    let other = tempfile::tempdir().expect("tempdir");
    let foreign =
        Authority::load_or_create(other.path()).expect("other ca").issue("chat-1", "127.0.0.1").expect("issue");
    assert!(tls_hello(control, &foreign).is_err(), "a peer of another CA talked to the master");
    let posing = Material { ca: ca_pem, ..foreign.clone() };
    assert!(tls_hello(control, &posing).is_err(), "the master accepted a client certificate of another CA");
    assert!(tls_hello(rpc, &posing).is_err(), "chat-1 accepted a client certificate of another CA");

    // The CA's key stays with the master: 0600 in the run directory, in no worker's environment.
    let ca_key = std::fs::read_to_string(c.dir.path().join(".pomelo/tls/ca.key")).expect("ca.key");
    let mode = std::fs::metadata(c.dir.path().join(".pomelo/tls/ca.key")).expect("meta").permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let key_body: String = ca_key.lines().filter(|l| !l.starts_with("-----")).collect();
    for (id, pid) in running {
        let env = procstat::environ(pid).expect("environment");
        let material = env.get(std::ffi::OsStr::new(tls::TLS_ENV)).expect("every worker has its TLS material");
        let m: Material = serde_json::from_str(&material.to_string_lossy()).expect("material");
        let body: String = m.key.lines().filter(|l| !l.starts_with("-----")).collect();
        assert_ne!(body, key_body, "{id} holds the CA's key");
        assert!(!m.ca.contains("PRIVATE"), "{id}");
        assert!(m.cert.contains("BEGIN CERTIFICATE") && m.key.contains("PRIVATE KEY"), "{id}");
    }
}

#[test]
fn operator_certificates_are_used_and_the_master_needs_no_ca_key() {
    // The operator's PKI: a CA whose key stays here, and a certificate per server and for the master.
    let pki = tempfile::tempdir().expect("tempdir");
    let ca = Authority::load_or_create(&pki.path().join("ca")).expect("operator ca");
    let certs = pki.path().join("certs");
    std::fs::create_dir(&certs).expect("certs dir");
    for id in ["master", "gate-1", "connector-1", "connector-2", "chat-1", "chat-2"] {
        let m = ca.issue(id, "127.0.0.1").expect("issue");
        std::fs::write(certs.join(format!("{id}.pem")), &m.cert).expect("cert");
        std::fs::write(certs.join(format!("{id}.key")), &m.key).expect("key");
        std::fs::set_permissions(certs.join(format!("{id}.key")), std::fs::Permissions::from_mode(0o600))
            .expect("mode");
    }
    let extra =
        format!("  clusterTls: {{ca: {}, certs: {}}}\n", pki.path().join("ca/ca.pem").display(), certs.display());
    let c = Cluster::start(&yaml(SMALL, &extra));
    let running = c.wait_running();
    let gate: SocketAddr = c.server("gate-1")["addrs"]["client"].as_str().expect("gate").parse().expect("addr");
    let (mut a, _) = wait_until(Duration::from_secs(10), "a login to work", || try_login(gate, "alice", "pki-room"));
    let (mut b, reply) = login(gate, "bob", "pki-room");
    assert!(reply["users"].as_array().is_some_and(|u| u.len() == 2), "{reply}");
    let sent = a
        .request("chat.chatHandler.send", json!({"rid": "pki-room", "content": "pki", "from": "alice", "target": "*"}));
    assert!(sent.get("code").is_none(), "{sent}");
    for cl in [&mut a, &mut b] {
        let got = cl.collect("onChat", 1, Duration::from_secs(5), Duration::from_millis(100));
        assert_eq!(got.len(), 1, "{got:?}");
    }
    // Each worker was given its own certificate from the directory; the master made no CA of its own.
    for (id, pid) in running {
        let env = procstat::environ(pid).expect("environment");
        let m: Material =
            serde_json::from_str(&env[std::ffi::OsStr::new(tls::TLS_ENV)].to_string_lossy()).expect("tls");
        let want = std::fs::read_to_string(certs.join(format!("{id}.pem"))).expect("cert");
        assert_eq!(m.cert, want, "{id} got another certificate");
    }
    assert!(!c.dir.path().join(".pomelo/tls").exists(), "the master created a CA of its own");
    // A peer with a certificate the master would have issued from its own CA is a stranger here.
    let control: SocketAddr =
        c.master_json().and_then(|m| m["control_addr"].as_str()?.parse().ok()).expect("control address");
    let other = tempfile::tempdir().expect("tempdir");
    let foreign = Authority::load_or_create(other.path()).expect("ca").issue("chat-1", "127.0.0.1").expect("issue");
    assert!(tls_hello(control, &foreign).is_err(), "a certificate of another CA was accepted");
}
