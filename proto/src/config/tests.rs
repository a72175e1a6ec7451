use std::path::Path;
use std::time::Duration;

use super::*;

fn parse(text: &str) -> Result<Topology, ConfigErrors> {
    Topology::parse(Path::new("servers.yaml"), text, DEFAULT_ENV)
}

#[test]
fn the_default_servers_yaml_is_valid() {
    let text = include_str!("../../../servers.yaml");
    let t = parse(text).expect("default servers.yaml must be valid");
    let ids: Vec<&str> = t.servers.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["gate-server-1", "connector-server-1", "connector-server-2", "chat-server-1", "chat-server-2"]);
    assert_eq!(t.servers[0].client_port, Some(3014));
    assert_eq!(t.servers[0].heartbeat, None);
    assert!(!t.servers[0].use_dict);
    assert_eq!(t.servers[1].heartbeat, Some(Duration::from_secs(3)));
    assert!(t.servers[1].use_dict);
    assert_eq!(t.master.restart.max_restarts, 5);
    assert_eq!(t.master.stop_grace, Duration::from_secs(10));
    let prod = Topology::parse(Path::new("servers.yaml"), text, "production").expect("production valid");
    assert_eq!(prod.master.stop_grace, Duration::from_secs(30));
    assert_eq!(prod.servers.len(), 5);
}

#[test]
fn reports_every_problem_with_its_line() {
    let text = "\
master:
  controlPort: 3005
  stopGrace: 10
  heartbeatTimout: 5s
servers:
  chat:
    - id: chat-1
      port: 6050
    - id: chat-1
      port: 6050
  connector:
    - id: conn-1
      port: 4050
  lobby:
    - id: x
";
    let err = parse(text).expect_err("invalid");
    let lines: Vec<(Option<usize>, &str)> = err.errors.iter().map(|e| (e.line, e.message.as_str())).collect();
    let find = |needle: &str| {
        err.errors
            .iter()
            .find(|e| e.message.contains(needle))
            .unwrap_or_else(|| panic!("no error containing {needle:?} in {lines:?}"))
    };
    assert_eq!(find("has no unit").line, Some(3));
    assert_eq!(find("did you mean `heartbeatTimeout`").line, Some(4));
    assert_eq!(find("duplicate id `chat-1`").line, Some(9));
    assert_eq!(find("port 6050 is already used").line, Some(10));
    assert_eq!(find("needs a `clientPort`").line, Some(12));
    assert_eq!(find("unknown server type `lobby`").line, Some(14));
    assert_eq!(err.errors.len(), 6, "{lines:?}");
    let shown = err.to_string();
    assert!(shown.contains("servers.yaml:9: servers.chat[1].id: duplicate id"), "{shown}");
}

#[test]
fn syntax_errors_have_a_line() {
    let err = parse("servers:\n  chat: [\n").expect_err("invalid");
    assert_eq!(err.errors.len(), 1);
    assert!(err.errors[0].line.is_some());
    assert!(err.errors[0].message.contains("not valid YAML"));
}

#[test]
fn environments_override_master_and_replace_servers() {
    let text = "\
master: {controlPort: 1000}
servers:
  chat: [{id: c1, port: 1}]
environments:
  test:
    master: {controlPort: 0, admin: '127.0.0.1:0'}
    servers:
      chat: [{id: t1, port: 0}, {id: t2, port: 0}]
  broken:
    master: {stopGrace: soon}
";
    let t = Topology::parse(Path::new("s.yaml"), text, "development");
    let err = t.expect_err("the broken environment is reported even in development");
    assert!(err.errors[0].message.contains("`soon` is not a duration"), "{err}");
    let text = text.replace("stopGrace: soon", "stopGrace: 1s");
    let t = Topology::parse(Path::new("s.yaml"), &text, "test").expect("valid");
    assert_eq!(t.master.control_port, 0);
    assert_eq!(t.servers.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(), ["t1", "t2"]);
    let err = Topology::parse(Path::new("s.yaml"), &text, "staging").expect_err("unknown env");
    assert!(err.errors[0].message.contains("`staging` is not defined"));
}

#[test]
fn frontend_only_keys_are_refused_on_chat_servers() {
    let err = parse("servers:\n  chat:\n    - id: c\n      port: 1\n      clientPort: 2\n      heartbeat: 3s\n")
        .expect_err("invalid");
    assert_eq!(err.errors.len(), 2, "{err}");
    assert_eq!(err.errors[0].line, Some(5));
    assert_eq!(err.errors[1].line, Some(6));
}

#[test]
fn threads_are_optional_and_bounded() {
    let t = parse("servers:\n  chat: [{id: a, port: 0, threads: 4}, {id: b, port: 0}]\n").expect("valid");
    assert_eq!(t.servers.iter().map(|s| s.threads).collect::<Vec<_>>(), vec![Some(4), None]);
    let err = parse("servers:\n  chat:\n    - {id: a, port: 0, threads: 0}\n    - {id: b, port: 0, threads: 999}\n")
        .expect_err("invalid");
    assert_eq!(err.errors.len(), 2, "{err}");
    assert_eq!((err.errors[0].line, err.errors[1].line), (Some(3), Some(4)));
    assert_eq!(super::auto_threads(2, 5), 1);
    assert_eq!(super::auto_threads(16, 5), 3);
    assert_eq!(super::auto_threads(8, 0), 8);
}

#[test]
fn inconsistent_timeouts_are_refused() {
    let err = parse("master:\n  heartbeatInterval: 5s\n  heartbeatTimeout: 2s\nservers:\n  chat: [{id: c, port: 0}]\n")
        .expect_err("invalid");
    assert!(err.errors[0].message.contains("longer than heartbeatInterval"), "{err}");
    assert_eq!(err.errors[0].line, Some(3));
}

#[test]
fn room_and_name_limits_have_defaults_bounds_and_a_server_type() {
    let t = parse("servers:\n  connector: [{id: c, port: 0, clientPort: 0, maxNameLength: 20}]\n  chat: [{id: a, port: 0, maxRoomMembers: 500, maxRooms: 7}, {id: b, port: 0}]\n")
        .expect("valid");
    let by = |id: &str| t.servers.iter().find(|s| s.id == id).expect("server").clone();
    assert_eq!(by("c").max_name_bytes, 20);
    assert_eq!((by("a").max_room_members, by("a").max_rooms), (500, 7));
    assert_eq!(
        (by("b").max_room_members, by("b").max_rooms),
        (super::DEFAULT_MAX_ROOM_MEMBERS, super::DEFAULT_MAX_ROOMS)
    );
    let err = parse("servers:\n  connector:\n    - {id: c, port: 0, clientPort: 0, maxRoomMembers: 5}\n  chat:\n    - {id: a, port: 0, maxNameLength: 9}\n    - {id: b, port: 0, maxRooms: 0}\n")
        .expect_err("invalid");
    let text = err.to_string();
    assert_eq!(err.errors.len(), 3, "{err}");
    assert!(text.contains("`maxRoomMembers` applies to chat servers, not to connector servers"), "{text}");
    assert!(text.contains("`maxNameLength` applies to connector servers, not to chat servers"), "{text}");
    assert!(text.contains("must be at least 1"), "{text}");
}

#[test]
fn ssh_settings_are_read_per_host_and_checked_with_lines() {
    let text = "\
master:
  ssh:
    user: pomelo
    identity: /etc/pomelo/id
    options: [ConnectTimeout=5]
    bin: /usr/local/bin/pomelo-rs
    hosts:
      10.0.0.2: { user: chat, dir: /srv/chat, options: [Port=2222] }
servers:
  chat:
    - { id: chat-1, host: 10.0.0.2, port: 6050, supervise: external }
";
    let t = parse(text).expect("valid");
    let h = t.master.ssh.for_host("10.0.0.2");
    assert_eq!(h.user.as_deref(), Some("chat"));
    assert_eq!(h.dir.as_deref(), Some("/srv/chat"));
    assert_eq!(h.bin.as_deref(), Some("/usr/local/bin/pomelo-rs"));
    assert_eq!(h.options, ["ConnectTimeout=5", "Port=2222"]);
    assert_eq!(t.master.ssh.for_host("10.0.0.3").user.as_deref(), Some("pomelo"));
    assert_eq!(t.servers[0].launch(), Launch::External);

    let bad = "\
master:
  ssh:
    user: -oProxyCommand=x
    options: [\"ProxyCommand=sh -c x\"]
    bin: \"a;b\"
    hots: {}
servers:
  chat:
    - { id: chat-1, host: 10.0.0.2, port: 6050, supervise: platform }
";
    let e = parse(bad).expect_err("invalid").to_string();
    for (line, what) in
        [(3, "not a user name"), (4, "not an ssh option"), (5, "not a path"), (6, "hosts"), (9, "supervisor")]
    {
        assert!(e.contains(&format!("servers.yaml:{line}:")) && e.contains(what), "{what} at {line} in {e}");
    }
}

#[test]
fn tls_and_admin_settings_are_checked_with_their_lines() {
    let text = "\
master:
  clusterTls: yes please
  adminHosts: [admin.example.com, 'bad host!']
servers:
  connector:
    - {id: c-1, port: 3150, clientPort: 3010, ssl: {cert: tls/cert.pem}}
  chat:
    - {id: chat-1, port: 6050, ssl: {cert: a.pem, key: b.pem}}
";
    let err = parse(text).expect_err("invalid");
    let find = |needle: &str| {
        err.errors.iter().find(|e| e.message.contains(needle)).unwrap_or_else(|| panic!("no `{needle}` in {err:?}"))
    };
    assert_eq!(find("expected true, false or {ca, certs}").line, Some(2));
    assert_eq!(find("is not a host name").line, Some(3));
    assert_eq!(find("needs both `cert` and `key`").line, Some(6));
    assert_eq!(find("applies to gate and connector servers").line, Some(8));

    let ok = "\
master:
  clusterTls: true
  adminHosts: [admin.example.com]
servers:
  connector:
    - {id: c-1, port: 3150, clientPort: 3010, ssl: {cert: tls/cert.pem, key: /etc/k.pem}}
  chat:
    - {id: chat-1, port: 6050, host: 127.0.0.1}
";
    let t = Topology::parse(Path::new("/srv/chat/servers.yaml"), ok, DEFAULT_ENV).expect("valid");
    assert!(t.cluster_tls());
    assert_eq!(t.master.admin_hosts, ["admin.example.com"]);
    let ssl = t.servers[0].ssl.as_ref().expect("ssl");
    assert_eq!(ssl.cert, Path::new("/srv/chat/tls/cert.pem"), "relative to servers.yaml");
    assert_eq!(ssl.key, Path::new("/etc/k.pem"));
    let local = parse("servers:\n  chat:\n    - {id: chat-1, port: 6050}\n").expect("valid");
    assert!(!local.cluster_tls(), "off on one machine by default");
    let remote = parse("servers:\n  chat:\n    - {id: chat-1, port: 6050, host: 10.0.0.2}\n").expect("valid");
    assert!(remote.cluster_tls(), "on by default across hosts");
}

#[test]
fn a_host_name_binds_its_address_never_every_interface() {
    let ip = |s: &str| s.parse::<std::net::IpAddr>().expect("ip");
    assert_eq!(bind_ip("localhost").expect("localhost"), ip("127.0.0.1"));
    assert_eq!(bind_ip("10.1.2.3").expect("literal"), ip("10.1.2.3"));
    assert_eq!(bind_ip("0.0.0.0").expect("explicit"), ip("0.0.0.0"), "every interface only when asked for");
    assert!(bind_ip("no-such-host.invalid").is_err(), "a name that does not resolve is an error");
}

#[test]
fn client_host_is_for_connectors_and_defaults_to_host() {
    let text = "\
servers:
  connector:
    - {id: c-1, host: 10.0.0.5, port: 3150, clientPort: 3010, clientHost: chat.example.com}
    - {id: c-2, host: 10.0.0.6, port: 3150, clientPort: 3010}
";
    let t = parse(text).expect("valid");
    assert_eq!(t.servers[0].client_host.as_deref(), Some("chat.example.com"));
    assert_eq!(t.servers[1].client_host, None);
    let bad = "\
servers:
  chat:
    - {id: chat-1, port: 6050, clientHost: chat.example.com}
  connector:
    - {id: c-1, port: 3150, clientPort: 3010, clientHost: 'two words'}
";
    let e = parse(bad).expect_err("invalid").to_string();
    for (line, what) in [(3, "applies to connector servers"), (5, "not a host name")] {
        assert!(e.contains(&format!("servers.yaml:{line}:")) && e.contains(what), "{what} at {line} in {e}");
    }
}

#[test]
fn external_hosts_make_every_server_there_external() {
    let text = "\
master:
  externalHosts: [10.0.0.7, chat-0.chat.pomelo.svc.cluster.local]
servers:
  chat:
    - {id: chat-a, host: 10.0.0.7, port: 6050}
    - {id: chat-b, host: 10.0.0.8, port: 6050}
    - {id: chat-c, host: chat-0.chat.pomelo.svc.cluster.local, port: 6050}
";
    let t = parse(text).expect("valid");
    let launch: Vec<Launch> = t.servers.iter().map(|s| s.launch()).collect();
    assert_eq!(launch, [Launch::External, Launch::Ssh, Launch::External]);
    let e = parse("master:\n  externalHosts: ['not a host']\nservers:\n  chat:\n    - {id: c, port: 1}\n")
        .expect_err("invalid")
        .to_string();
    assert!(e.contains("servers.yaml:2:") && e.contains("not a host"), "{e}");
}

#[test]
fn cluster_tls_takes_operator_files() {
    let t =
        parse("master:\n  clusterTls: {ca: pki/ca.pem, certs: pki/certs}\nservers:\n  chat:\n    - {id: c, port: 1}\n")
            .expect("valid");
    assert!(t.cluster_tls());
    let f = t.master.cluster_tls_files.expect("files");
    assert!(f.ca.ends_with("pki/ca.pem") && f.certs.ends_with("pki/certs"), "{f:?}");
    let e = parse("master:\n  clusterTls: {ca: pki/ca.pem, cert: x}\nservers:\n  chat:\n    - {id: c, port: 1}\n")
        .expect_err("invalid")
        .to_string();
    assert!(e.contains("servers.yaml:2:") && e.contains("needs both"), "{e}");
}

#[test]
fn history_is_for_chat_servers_and_bounded() {
    let t =
        parse("servers:\n  chat:\n    - {id: c, port: 1, history: {maxMessages: 50, maxAge: 10m}}\n").expect("valid");
    let h = t.servers[0].history.clone().expect("history");
    assert_eq!((h.max_messages, h.max_age, h.backend), (50, Duration::from_secs(600), super::HistoryBackend::Memory));
    let t = parse(
        "servers:\n  chat:\n    - {id: c, port: 1, history: {backend: disk}}\n    - {id: d, port: 2, history: \
         {backend: disk, dir: h}}\n    - {id: e, port: 3, history: {backend: redis, url: 'redis://127.0.0.1:6399'}}\n",
    )
    .expect("valid");
    let dir = |i: usize| t.servers[i].history.as_ref().and_then(|h| h.dir.clone()).expect("a dir");
    assert!(dir(0).is_absolute() && dir(0).ends_with(".pomelo/history"), "{:?}", dir(0));
    assert!(dir(1).is_absolute() && dir(1).ends_with("h"), "{:?}", dir(1));
    let h = t.servers[2].history.clone().expect("history");
    assert_eq!(
        (h.backend, h.url.as_deref(), h.prefix.as_str()),
        (super::HistoryBackend::Redis, Some("redis://127.0.0.1:6399"), "pomelo:")
    );
    let bad = "\
servers:
  chat:
    - {id: c, port: 1, history: {backend: tape, maxMessages: 0, maxAge: 2d}}
    - {id: r, port: 4, history: {backend: redis}}
    - {id: s, port: 5, history: {backend: redis, url: 'http://x'}}
    - {id: t, port: 6, history: {dir: x, url: 'redis://x'}}
  connector:
    - {id: k, port: 2, clientPort: 3, history: {maxMessages: 5}}
";
    let e = parse(bad).expect_err("invalid").to_string();
    for (line, what) in [
        (3, "not a history backend"),
        (3, "at least 1"),
        (8, "applies to chat servers"),
        (4, "needs `url`"),
        (5, "not a Redis URL"),
        (6, "`dir` is for the `disk`"),
        (6, "`url` is for the `redis`"),
    ] {
        assert!(e.contains(&format!("servers.yaml:{line}:")) && e.contains(what), "{what} at {line} in {e}");
    }
    // TLS to Redis is refused when the file is read, not at the first send.
    let e = parse("servers:\n  chat:\n    - {id: c, port: 1, history: {backend: redis, url: 'rediss://r:6380'}}\n")
        .expect_err("invalid")
        .to_string();
    assert!(e.contains("servers.yaml:3:") && e.contains("rediss:// (TLS) is not supported"), "{e}");
}

#[test]
fn the_id_master_is_reserved() {
    let e = parse("servers:\n  chat:\n    - {id: master, port: 1}\n").expect_err("invalid").to_string();
    assert!(e.contains("servers.yaml:3:") && e.contains("the master's own name"), "{e}");
}

#[test]
fn protobuf_files_are_read_compiled_and_given_to_every_server() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("servers.yaml");
    let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).expect("write");
    let yaml = |protobuf: &str| {
        format!(
            "{protobuf}\nservers:\n  gate:\n    - {{id: g, clientPort: 0}}\n  connector:\n    - {{id: c, port: 0, clientPort: 0}}\n  chat:\n    - {{id: h, port: 0}}\n"
        )
    };
    let chat = r#"{"onChat": {"required string msg": 1, "required string from": 2, "optional uInt32 offset": 5}}"#;
    write("serverProtos.json", chat);
    write("clientProtos.json", r#"{"chat.chatHandler.send": {"required string content": 1}}"#);
    let t = Topology::parse(
        &file,
        &yaml("protobuf: {serverProtos: serverProtos.json, clientProtos: clientProtos.json}"),
        DEFAULT_ENV,
    )
    .expect("valid");
    for s in &t.servers {
        let texts = s.protobuf.as_ref().expect("every server has the protos");
        assert_eq!(texts.server.as_deref(), Some(chat));
        assert!(texts.compile().expect("compiles").decodes("chat.chatHandler.send"));
    }
    // Only one of the two files is fine; neither is not.
    let t = Topology::parse(&file, &yaml("protobuf: {serverProtos: serverProtos.json}"), DEFAULT_ENV).expect("valid");
    assert_eq!(t.servers[0].protobuf.as_ref().expect("protos").client, None);
    let errors = |protobuf: &str| {
        let e = Topology::parse(&file, &yaml(protobuf), DEFAULT_ENV).expect_err("refused");
        e.errors.iter().map(|e| format!("{}: {}", e.path, e.message)).collect::<Vec<_>>().join("\n")
    };
    assert!(errors("protobuf: {}").contains("needs `serverProtos`, `clientProtos` or both"));
    assert!(errors("protobuf: {serverProtos: missing.json}").contains("protobuf.serverProtos: cannot read"));
    write("bad.json", r#"{"onX": {"required strin x": 1}}"#);
    let e = errors("protobuf: {clientProtos: bad.json}");
    assert!(e.starts_with("protobuf.clientProtos: "), "{e}");
    // A proto the chat server's pushes cannot fit is refused now, not at the first message.
    write("strict.json", r#"{"onChat": {"required string msg": 1, "required uInt32 time": 2}}"#);
    let e = errors("protobuf: {serverProtos: strict.json}");
    assert!(e.contains("protobuf.serverProtos: ") && e.contains("the chat server sends onChat"), "{e}");
    write("big.json", &" ".repeat(crate::wire::protobuf::MAX_PROTOS_BYTES + 1));
    assert!(errors("protobuf: {serverProtos: big.json}").contains("at most"));
    assert!(errors("protobuf: {serverProtoz: x.json}").contains("serverProtoz"));
}

#[test]
fn dictionary_entries_follow_the_handler_routes_and_are_bounded() {
    let yaml = |dict: &str| {
        format!("{dict}\nservers:\n  gate:\n    - {{id: g, clientPort: 0}}\n  chat:\n    - {{id: h, port: 0}}\n")
    };
    let t = parse(&yaml("dictionary: [onChat, onAdd, onLeave]")).expect("valid");
    assert!(t.servers.iter().all(|s| s.dictionary == ["onChat", "onAdd", "onLeave"]));
    let d = crate::wire::dictionary::chat_dictionary(&t.servers[0].dictionary).expect("fits");
    assert_eq!((d.code("chat.chatHandler.history"), d.code("onChat"), d.code("onLeave")), (Some(4), Some(5), Some(7)));
    assert!(t.warnings().is_empty());
    // Past 255 routes: valid, with a warning for libpomelo v1; past 65,535: refused.
    let many = |n: usize| format!("dictionary: [{}]", (0..n).map(|i| format!("on{i}")).collect::<Vec<_>>().join(", "));
    let t = parse(&yaml(&many(252))).expect("valid");
    assert_eq!(t.warnings().len(), 1, "4 + 252 = 256 routes");
    assert!(t.warnings()[0].contains("libpomelo v1"), "{:?}", t.warnings());
    assert!(parse(&yaml(&many(251))).expect("valid").warnings().is_empty(), "255 routes fit one byte");
    let e = parse(&yaml(&many(65_532))).expect_err("too many");
    assert!(e.to_string().contains("at most 65535"), "{e}");
    assert!(parse(&yaml(&many(65_531))).is_ok(), "65,535 routes fit two bytes");
    let e = parse(&yaml("dictionary: [\"\", 3]")).expect_err("bad entries");
    assert!(e.to_string().contains("dictionary[0]") && e.to_string().contains("dictionary[1]"), "{e}");
    assert!(parse(&yaml("dictionary: onChat")).expect_err("not a list").to_string().contains("a list of routes"));
}
