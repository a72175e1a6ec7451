//! The keys of `servers.yaml`, one table row per key: its name and how its value is read into the
//! settings. The defaults are here too ([`default_master`], [`default_server`]), so adding a key is one
//! row (plus its default). The allowed-key lists behind "unknown key, did you mean" are the tables'
//! names, in table order. Pure; every problem goes to the [`Ctx`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde_yaml::Value;

use super::locate::Seg;
use super::walk::{child, describe, item, set, Ctx};
use super::{LogConfig, MasterConfig, RestartPolicy, ServerSpec, SslFiles};
use crate::control::ServerType;

pub(super) const ROOT_KEYS: &[&str] = &["master", "servers", "environments", "protobuf", "dictionary"];
pub(super) const ENV_KEYS: &[&str] = &["master", "servers"];

/// One key: its name, and how its value (at the path given) is read into `T`.
struct Row<T>(&'static str, fn(&mut Ctx, &mut T, &Value, &[Seg]));

/// Reads the mapping `value` into `target` through `rows`; unknown keys are reported with a suggestion.
fn apply<T>(ctx: &mut Ctx, target: &mut T, value: &Value, path: &[Seg], rows: &[Row<T>]) {
    let names: Vec<&str> = rows.iter().map(|r| r.0).collect();
    for (key, v) in ctx.entries(value, path, &names) {
        if let Some(row) = rows.iter().find(|r| r.0 == key) {
            (row.1)(ctx, target, v, &child(path, &key));
        }
    }
}

const MASTER: &[Row<MasterConfig>] = &[
    Row("host", |c, m, v, p| set(&mut m.host, c.string(v, p))),
    Row("controlPort", |c, m, v, p| set(&mut m.control_port, c.port(v, p))),
    Row("admin", |c, m, v, p| {
        if let Some(s) = c.string(v, p) {
            match s.parse::<SocketAddr>() {
                Ok(a) => m.admin = a,
                Err(_) => c.err(p, format!("`{s}` is not an address; write e.g. `127.0.0.1:7001`")),
            }
        }
    }),
    Row("adminToken", |c, m, v, p| {
        if let Some(s) = c.string(v, p) {
            if s.len() < 16 {
                c.err(p, "an admin token must be at least 16 characters");
            } else {
                m.admin_token = Some(s);
            }
        }
    }),
    Row("adminHosts", |c, m, v, p| {
        if let Some(hosts) = host_list(c, v, p, valid_host_name, "a host name (letters, digits, `-` and `.`)") {
            m.admin_hosts = hosts;
        }
    }),
    Row("clusterTls", |c, m, v, p| match v {
        Value::Bool(b) => m.cluster_tls = Some(*b),
        Value::Mapping(_) => {
            let mut f = super::ClusterTlsFiles::default();
            apply(c, &mut f, v, p, CLUSTER_TLS);
            if f.ca.as_os_str().is_empty() || f.certs.as_os_str().is_empty() {
                c.err(p, "`clusterTls` as a mapping needs both `ca` (a PEM file) and `certs` (a directory)");
            } else {
                m.cluster_tls = Some(true);
                m.cluster_tls_files = Some(f);
            }
        }
        other => c.err(p, format!("expected true, false or {{ca, certs}}, found {}", describe(other))),
    }),
    Row("restart", |c, m, v, p| apply(c, &mut m.restart, v, p, RESTART)),
    Row("stopGrace", |c, m, v, p| set(&mut m.stop_grace, c.duration(v, p))),
    Row("heartbeatInterval", |c, m, v, p| set(&mut m.heartbeat_interval, c.duration(v, p))),
    Row("heartbeatTimeout", |c, m, v, p| set(&mut m.heartbeat_timeout, c.duration(v, p))),
    Row("startTimeout", |c, m, v, p| set(&mut m.start_timeout, c.duration(v, p))),
    Row("orphanTimeout", |c, m, v, p| set(&mut m.orphan_timeout, c.duration(v, p))),
    Row("logs", |c, m, v, p| apply(c, &mut m.logs, v, p, LOGS)),
    Row("runDir", |c, m, v, p| set(&mut m.run_dir, c.string(v, p).map(PathBuf::from))),
    Row("ssh", |c, m, v, p| super::ssh::apply_ssh(c, &mut m.ssh, v, p)),
    Row("externalHosts", |c, m, v, p| {
        let valid = |h: &str| valid_host_name(h) || h.parse::<std::net::IpAddr>().is_ok();
        if let Some(hosts) = host_list(c, v, p, valid, "a host (an address or a name)") {
            m.external_hosts = hosts;
        }
    }),
];

const RESTART: &[Row<RestartPolicy>] = &[
    Row("backoffInitial", |c, r, v, p| set(&mut r.backoff_initial, c.duration(v, p))),
    Row("backoffMultiplier", |c, r, v, p| match v.as_f64() {
        Some(x) if (1.0..=10.0).contains(&x) => r.backoff_multiplier = x,
        _ => c.err(p, "expected a number from 1 to 10"),
    }),
    Row("backoffMax", |c, r, v, p| set(&mut r.backoff_max, c.duration(v, p))),
    Row("resetAfter", |c, r, v, p| set(&mut r.reset_after, c.duration(v, p))),
    Row("maxRestarts", |c, r, v, p| set(&mut r.max_restarts, c.uint(v, p, 10_000).map(|n| n as u32))),
    Row("window", |c, r, v, p| set(&mut r.window, c.duration(v, p))),
];

const LOGS: &[Row<LogConfig>] = &[
    Row("dir", |c, l, v, p| set(&mut l.dir, c.string(v, p).map(PathBuf::from))),
    Row("maxSize", |c, l, v, p| match c.size(v, p) {
        Some(n) if n >= 4096 => l.max_bytes = n,
        Some(_) => c.err(p, "a log file must be allowed at least 4KiB"),
        None => {}
    }),
    Row("keep", |c, l, v, p| set(&mut l.keep, c.uint(v, p, 100).map(|n| n as u32))),
];

/// A list of hosts, each passing `valid` (else reported as not `what`); `None` if it is not a list.
fn host_list(c: &mut Ctx, v: &Value, p: &[Seg], valid: impl Fn(&str) -> bool, what: &str) -> Option<Vec<String>> {
    let Value::Sequence(items) = v else {
        c.err(p, format!("expected a list of hosts, found {}", describe(v)));
        return None;
    };
    let mut hosts = Vec::new();
    for (i, h) in items.iter().enumerate() {
        let at = item(p, i);
        match c.string(h, &at) {
            Some(h) if valid(&h) => hosts.push(h),
            Some(h) => c.err(&at, format!("`{h}` is not {what}")),
            None => {}
        }
    }
    Some(hosts)
}

/// A DNS name the admin server may be reached by (no port, no scheme).
fn valid_host_name(h: &str) -> bool {
    !h.is_empty() && h.len() <= 253 && h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

pub(super) fn default_master() -> MasterConfig {
    MasterConfig {
        host: "127.0.0.1".into(),
        control_port: 3005,
        admin: SocketAddr::from(([127, 0, 0, 1], 7001)),
        admin_token: None,
        admin_hosts: Vec::new(),
        cluster_tls: None,
        cluster_tls_files: None,
        restart: RestartPolicy::default(),
        stop_grace: Duration::from_secs(10),
        heartbeat_interval: Duration::from_secs(1),
        heartbeat_timeout: Duration::from_secs(5),
        start_timeout: Duration::from_secs(10),
        orphan_timeout: Duration::from_secs(60),
        logs: LogConfig { dir: PathBuf::from("logs"), max_bytes: 10 << 20, keep: 3 },
        run_dir: PathBuf::from(".pomelo"),
        ssh: Default::default(),
        external_hosts: Vec::new(),
    }
}

/// Reads a `master` section on top of `m`, key by key.
pub(super) fn apply_master(ctx: &mut Ctx, m: &mut MasterConfig, value: &Value, path: &[Seg]) {
    apply(ctx, m, value, path, MASTER);
}

/// A server entry being read: its settings so far, and whether it named an `id`.
struct Draft {
    spec: ServerSpec,
    has_id: bool,
}

/// Whether a frontend-only `key` may be set here; reports it on a chat server.
fn frontend_key(c: &mut Ctx, d: &Draft, key: &str, p: &[Seg]) -> bool {
    let t = d.spec.server_type;
    if !t.is_frontend() {
        c.err(p, format!("`{key}` applies to frontends (gate, connector), not to {t} servers"));
    }
    t.is_frontend()
}

/// Whether a `key` of the given type only may be set here; reports it on another type.
fn typed_key(c: &mut Ctx, d: &Draft, only: ServerType, key: &str, p: &[Seg]) -> bool {
    let t = d.spec.server_type;
    if t != only {
        c.err(p, format!("`{key}` applies to {only} servers, not to {t} servers"));
    }
    t == only
}

const HISTORY: &[Row<super::HistoryConfig>] = &[
    Row("backend", |c, h, v, p| match c.string(v, p).as_deref() {
        Some("memory") => h.backend = super::HistoryBackend::Memory,
        Some("disk") => h.backend = super::HistoryBackend::Disk,
        Some("redis") => h.backend = super::HistoryBackend::Redis,
        Some(other) => c.err(p, format!("`{other}` is not a history backend: use `memory`, `disk` or `redis`")),
        None => {}
    }),
    Row("dir", |c, h, v, p| match c.string(v, p) {
        Some(d) if d.is_empty() => c.err(p, "must not be empty"),
        Some(d) => h.dir = Some(PathBuf::from(d)),
        None => {}
    }),
    Row("url", |c, h, v, p| match c.string(v, p) {
        // This build's Redis client has no TLS: a rediss:// URL would only fail at the first send.
        Some(u) if u.starts_with("rediss://") => c.err(
            p,
            "rediss:// (TLS) is not supported by this build: use redis:// on a trusted network or through a tunnel",
        ),
        Some(u) if !["redis://", "redis+unix://", "unix://"].iter().any(|s| u.starts_with(s)) => {
            c.err(p, format!("`{u}` is not a Redis URL (redis://host:port[/db], unix://path)"))
        }
        Some(u) => h.url = Some(u),
        None => {}
    }),
    Row("prefix", |c, h, v, p| match c.string(v, p) {
        Some(s) if s.len() > 64 => c.err(p, "must be at most 64 bytes"),
        Some(s) => h.prefix = s,
        None => {}
    }),
    Row("maxMessages", |c, h, v, p| match c.uint(v, p, 100_000) {
        Some(0) => c.err(p, "must be at least 1"),
        Some(n) => h.max_messages = n as usize,
        None => {}
    }),
    Row("maxAge", |c, h, v, p| match c.duration(v, p) {
        Some(d) if d < Duration::from_secs(1) || d > Duration::from_secs(86_400) => c.err(p, "must be from 1s to 24h"),
        Some(d) => h.max_age = d,
        None => {}
    }),
];

const CLUSTER_TLS: &[Row<super::ClusterTlsFiles>] = &[
    Row("ca", |c, f, v, p| set(&mut f.ca, c.string(v, p).map(PathBuf::from))),
    Row("certs", |c, f, v, p| set(&mut f.certs, c.string(v, p).map(PathBuf::from))),
];

const SSL: &[Row<SslFiles>] = &[
    Row("cert", |c, s, v, p| set(&mut s.cert, c.string(v, p).map(PathBuf::from))),
    Row("key", |c, s, v, p| set(&mut s.key, c.string(v, p).map(PathBuf::from))),
];

/// `protobuf: {serverProtos, clientProtos}`: the two files' paths, as written.
#[derive(Default)]
pub(super) struct ProtobufPaths {
    pub(super) server: Option<String>,
    pub(super) client: Option<String>,
}

const PROTOBUF: &[Row<ProtobufPaths>] = &[
    Row("serverProtos", |c, s, v, p| s.server = c.string(v, p)),
    Row("clientProtos", |c, s, v, p| s.client = c.string(v, p)),
];

/// Reads the `protobuf` section's paths (the files are read and compiled by the caller).
pub(super) fn protobuf_paths(ctx: &mut Ctx, value: &Value, path: &[Seg]) -> ProtobufPaths {
    let mut paths = ProtobufPaths::default();
    apply(ctx, &mut paths, value, path, PROTOBUF);
    if paths.server.is_none() && paths.client.is_none() && ctx.mapping(value, path).is_some() {
        ctx.err(path, "`protobuf` needs `serverProtos`, `clientProtos` or both (JSON files, as in Pomelo's config/)");
    }
    paths
}

const SERVER: &[Row<Draft>] = &[
    Row("ssl", |c, d, v, p| {
        if d.spec.server_type == ServerType::Chat {
            c.err(p, "`ssl` applies to gate and connector servers (their client ports), not to chat servers");
            return;
        }
        let mut ssl = SslFiles::default();
        apply(c, &mut ssl, v, p, SSL);
        if ssl.cert.as_os_str().is_empty() || ssl.key.as_os_str().is_empty() {
            c.err(p, "`ssl` needs both `cert` and `key` (PEM files)");
        } else {
            d.spec.ssl = Some(ssl);
        }
    }),
    Row("id", |c, d, v, p| {
        if let Some(id) = c.string(v, p) {
            d.has_id = true;
            if id.is_empty() || id.len() > 64 || !id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
                c.err(p, format!("`{id}` is not a valid id: use 1 to 64 of A-Z a-z 0-9 - _ ."));
            }
            if id == crate::auth::MASTER_ID {
                c.err(p, format!("`{id}` is the master's own name (its certificate and key): pick another id"));
            }
            d.spec.id = id;
        }
    }),
    Row("host", |c, d, v, p| set(&mut d.spec.host, c.string(v, p))),
    Row("port", |c, d, v, p| d.spec.port = c.port(v, p)),
    Row("clientHost", |c, d, v, p| {
        if typed_key(c, d, ServerType::Connector, "clientHost", p) {
            match c.string(v, p) {
                Some(h)
                    if h.is_empty() || h.len() > 253 || h.chars().any(|ch| ch.is_whitespace() || ch.is_control()) =>
                {
                    c.err(p, "not a host name or address")
                }
                h => d.spec.client_host = h,
            }
        }
    }),
    Row("clientPort", |c, d, v, p| {
        let t = d.spec.server_type;
        if !t.is_frontend() {
            c.err(p, format!("{t} servers have no clients; only gate and connector take a clientPort"));
        }
        d.spec.client_port = c.port(v, p);
    }),
    Row("args", |c, d, v, p| match v {
        Value::String(a) => d.spec.args = a.split_whitespace().map(String::from).collect(),
        Value::Sequence(items) => {
            for (i, a) in items.iter().enumerate() {
                if let Some(a) = c.string(a, &item(p, i)) {
                    d.spec.args.push(a);
                }
            }
        }
        other => c.err(p, format!("expected a string or a list, found {}", describe(other))),
    }),
    Row("env", |c, d, v, p| {
        let Some(map) = c.mapping(v, p) else { return };
        for (k, ev) in map {
            let name = k.as_str().unwrap_or_default().to_string();
            let ep = child(p, &name);
            let val = match ev {
                Value::String(x) => Some(x.clone()),
                Value::Number(n) => Some(n.to_string()),
                Value::Bool(b) => Some(b.to_string()),
                other => {
                    c.err(&ep, format!("expected a string, found {}", describe(other)));
                    None
                }
            };
            if name.is_empty() || name.contains('=') {
                c.err(&ep, "not a valid environment variable name");
            } else if let Some(val) = val {
                d.spec.env.insert(name, val);
            }
        }
    }),
    Row("supervise", |c, d, v, p| match c.string(v, p).as_deref() {
        Some("master") => d.spec.external = false,
        Some("external") => d.spec.external = true,
        Some(other) => c.err(p, format!("`{other}` is not a supervisor: use `master` (the default) or `external`")),
        None => {}
    }),
    Row("autoRestart", |c, d, v, p| set(&mut d.spec.auto_restart, c.boolean(v, p))),
    Row("maxConnections", |c, d, v, p| {
        if frontend_key(c, d, "maxConnections", p) {
            match c.uint(v, p, 1_000_000) {
                Some(0) => c.err(p, "must be at least 1"),
                Some(n) => d.spec.max_connections = n as usize,
                None => {}
            }
        }
    }),
    Row("heartbeat", |c, d, v, p| {
        if !frontend_key(c, d, "heartbeat", p) {
            return;
        }
        match v {
            Value::Bool(false) | Value::Null => d.spec.heartbeat = None,
            _ => match c.duration(v, p) {
                Some(t) if t >= Duration::from_millis(100) => d.spec.heartbeat = Some(t),
                Some(_) => c.err(p, "at least 100ms, or `false` for none"),
                None => {}
            },
        }
    }),
    Row("dictionary", |c, d, v, p| {
        if frontend_key(c, d, "dictionary", p) {
            set(&mut d.spec.use_dict, c.boolean(v, p));
        }
    }),
    Row("idleTimeout", |c, d, v, p| {
        if frontend_key(c, d, "idleTimeout", p) {
            set(&mut d.spec.idle_timeout, c.duration(v, p));
        }
    }),
    Row("maxMessageSize", |c, d, v, p| {
        if frontend_key(c, d, "maxMessageSize", p) {
            match c.size(v, p) {
                Some(n) if (1024..=super::MAX_MAX_MESSAGE_BYTES as u64).contains(&n) => {
                    d.spec.max_message_bytes = n as usize
                }
                Some(_) => c.err(p, "between 1KiB and 1MiB"),
                None => {}
            }
        }
    }),
    Row("maxRequestsPerSecond", |c, d, v, p| {
        if frontend_key(c, d, "maxRequestsPerSecond", p) {
            match c.uint(v, p, 1_000_000) {
                Some(0) => c.err(p, "must be at least 1"),
                Some(n) => d.spec.max_requests_per_second = n as u32,
                None => {}
            }
        }
    }),
    Row("useCrypto", |c, d, v, p| {
        if frontend_key(c, d, "useCrypto", p) {
            set(&mut d.spec.use_crypto, c.boolean(v, p));
        }
    }),
    Row("checkClient", |c, d, v, p| {
        if !frontend_key(c, d, "checkClient", p) {
            return;
        }
        let Some(map) = c.mapping(v, p) else { return };
        for (k, val) in map {
            let at = child(p, &k.as_str().map(String::from).unwrap_or_default());
            let (Some(ty), Some(min)) = (k.as_str(), c.string(val, &at)) else {
                c.err(&at, "expected `client type: minimum version`, e.g. `js-websocket: 0.0.1`");
                continue;
            };
            if crate::wire::handshake::parse_version(&min).is_none() {
                c.err(&at, format!("`{min}` is not a version: use numbers and dots, e.g. 1.2.0"));
            } else {
                d.spec.check_client.insert(ty.to_string(), min);
            }
        }
    }),
    Row("maxNameLength", |c, d, v, p| {
        if typed_key(c, d, ServerType::Connector, "maxNameLength", p) {
            match c.uint(v, p, super::MAX_MAX_NAME_BYTES as u64) {
                Some(0) => c.err(p, "must be at least 1"),
                Some(n) => d.spec.max_name_bytes = n as usize,
                None => {}
            }
        }
    }),
    Row("maxRoomMembers", |c, d, v, p| {
        if typed_key(c, d, ServerType::Chat, "maxRoomMembers", p) {
            match c.uint(v, p, 1_000_000) {
                Some(0) => c.err(p, "must be at least 1"),
                Some(n) => d.spec.max_room_members = n as usize,
                None => {}
            }
        }
    }),
    Row("maxRooms", |c, d, v, p| {
        if typed_key(c, d, ServerType::Chat, "maxRooms", p) {
            match c.uint(v, p, 10_000_000) {
                Some(0) => c.err(p, "must be at least 1"),
                Some(n) => d.spec.max_rooms = n as usize,
                None => {}
            }
        }
    }),
    Row("history", |c, d, v, p| {
        if typed_key(c, d, ServerType::Chat, "history", p) {
            let mut h = super::HistoryConfig::default();
            apply(c, &mut h, v, p, HISTORY);
            use super::HistoryBackend::{Disk, Redis};
            if h.backend == Redis && h.url.is_none() {
                c.err(p, "the `redis` backend needs `url`");
            }
            if h.backend != Disk && h.dir.is_some() {
                c.err(p, "`dir` is for the `disk` backend");
            }
            if h.backend != Redis && h.url.is_some() {
                c.err(p, "`url` is for the `redis` backend");
            }
            d.spec.history = Some(h);
        }
    }),
    Row("threads", |c, d, v, p| match c.uint(v, p, 256) {
        Some(0) => c.err(p, "must be at least 1"),
        Some(n) => d.spec.threads = Some(n as usize),
        None => {}
    }),
];

/// A server of type `t` before its entry is read: the defaults of every key.
pub(super) fn default_server(t: ServerType) -> ServerSpec {
    ServerSpec {
        id: String::new(),
        server_type: t,
        host: "127.0.0.1".into(),
        port: None,
        client_port: None,
        client_host: None,
        args: Vec::new(),
        env: BTreeMap::new(),
        auto_restart: true,
        max_connections: 10_000,
        heartbeat: (t == ServerType::Connector).then(|| Duration::from_secs(3)),
        use_dict: t == ServerType::Connector,
        idle_timeout: Duration::from_secs(90),
        max_message_bytes: super::DEFAULT_MAX_MESSAGE_BYTES,
        max_requests_per_second: super::DEFAULT_REQUESTS_PER_SECOND,
        check_client: BTreeMap::new(),
        max_name_bytes: super::DEFAULT_MAX_NAME_BYTES,
        max_room_members: super::DEFAULT_MAX_ROOM_MEMBERS,
        max_rooms: super::DEFAULT_MAX_ROOMS,
        history: None,
        threads: None,
        external: false,
        protobuf: None,
        dictionary: Vec::new(),
        use_crypto: false,
        ssl: None,
    }
}

/// Reads one server entry; `None` when it has no id (it is then left out of the duplicate checks).
fn parse_server(ctx: &mut Ctx, t: ServerType, value: &Value, path: &[Seg]) -> Option<ServerSpec> {
    let mut d = Draft { spec: default_server(t), has_id: false };
    if !matches!(value, Value::Mapping(_)) {
        // Reports what the entry is instead of a mapping.
        ctx.entries(value, path, &[]);
        if value.is_null() {
            ctx.err(path, "empty server entry; it needs at least an `id`");
        }
        return None;
    }
    apply(ctx, &mut d, value, path, SERVER);
    let s = d.spec;
    if !d.has_id {
        ctx.err(path, "missing `id`");
    }
    if t.is_frontend() && s.client_port.is_none() {
        ctx.err(path, format!("{t} `{}` needs a `clientPort` (0 picks a free one)", s.id));
    }
    if t != ServerType::Gate && s.port.is_none() {
        ctx.err(path, format!("{t} `{}` needs a `port` for cluster RPC (0 picks a free one)", s.id));
    }
    // An entry with other problems still takes part in the duplicate checks.
    d.has_id.then_some(s)
}

/// Parses a `servers` section; returns the servers in file order with their paths.
pub(super) fn parse_servers(ctx: &mut Ctx, value: &Value, path: &[Seg]) -> Vec<(ServerSpec, Vec<Seg>)> {
    let mut out = Vec::new();
    let Some(map) = ctx.mapping(value, path) else {
        return out;
    };
    for (k, list) in map {
        let name = k.as_str().unwrap_or_default();
        let p = child(path, name);
        let Some(t) = ServerType::parse(name) else {
            ctx.err(&p, format!("unknown server type `{name}`; expected gate, connector or chat"));
            continue;
        };
        match list {
            Value::Sequence(items) => {
                for (i, entry) in items.iter().enumerate() {
                    let ip = item(&p, i);
                    if let Some(s) = parse_server(ctx, t, entry, &ip) {
                        out.push((s, ip));
                    }
                }
            }
            Value::Null => {}
            other => ctx.err(&p, format!("expected a list of servers, found {}", describe(other))),
        }
    }
    out
}
