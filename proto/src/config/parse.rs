//! Walks the parsed YAML of `servers.yaml`, collecting every problem with its path and line.
//!
//! Each section is applied on top of defaults: `master` then `environments.<env>.master` (key by key);
//! `servers` is replaced as a whole by `environments.<env>.servers` when that is present. Every
//! environment is checked, not only the selected one, so a typo in `production` shows up in development.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde_yaml::{Mapping, Value};

use super::locate::{render, LineIndex, Seg};
use super::{ConfigError, LogConfig, MasterConfig, RestartPolicy, ServerSpec, DEFAULT_ENV};
use crate::control::ServerType;

const ROOT_KEYS: &[&str] = &["master", "servers", "environments"];
const ENV_KEYS: &[&str] = &["master", "servers"];
const MASTER_KEYS: &[&str] = &[
    "host",
    "controlPort",
    "admin",
    "adminToken",
    "restart",
    "stopGrace",
    "heartbeatInterval",
    "heartbeatTimeout",
    "startTimeout",
    "orphanTimeout",
    "logs",
    "runDir",
];
const RESTART_KEYS: &[&str] =
    &["backoffInitial", "backoffMultiplier", "backoffMax", "resetAfter", "maxRestarts", "window"];
const LOG_KEYS: &[&str] = &["dir", "maxSize", "keep"];
const SERVER_KEYS: &[&str] = &[
    "id",
    "host",
    "port",
    "clientPort",
    "args",
    "env",
    "autoRestart",
    "maxConnections",
    "heartbeat",
    "dictionary",
    "idleTimeout",
    "maxMessageSize",
    "maxRequestsPerSecond",
    "threads",
];

/// One environment: its name, effective master settings, where they came from, and its own servers.
type EnvSection = (String, MasterConfig, Vec<Seg>, Option<Vec<(ServerSpec, Vec<Seg>)>>);

struct Ctx {
    index: LineIndex,
    errors: Vec<ConfigError>,
}

impl Ctx {
    fn err(&mut self, path: &[Seg], message: impl Into<String>) {
        let e = ConfigError { line: self.index.line_of(path), path: render(path), message: message.into() };
        if !self.errors.contains(&e) {
            self.errors.push(e);
        }
    }

    /// The entries of a mapping whose keys are all strings in `allowed`; reports the others.
    fn entries<'v>(&mut self, value: &'v Value, path: &[Seg], allowed: &[&str]) -> Vec<(String, &'v Value)> {
        let Some(map) = self.mapping(value, path) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (k, v) in map {
            let Some(key) = k.as_str() else {
                self.err(path, format!("keys must be strings, found {}", describe(k)));
                continue;
            };
            if !allowed.contains(&key) {
                let p = child(path, key);
                let hint = suggest(key, allowed)
                    .map(|s| format!("; did you mean `{s}`?"))
                    .unwrap_or_else(|| format!("; expected one of: {}", allowed.join(", ")));
                self.err(&p, format!("unknown key `{key}`{hint}"));
                continue;
            }
            out.push((key.to_string(), v));
        }
        out
    }

    fn mapping<'v>(&mut self, value: &'v Value, path: &[Seg]) -> Option<&'v Mapping> {
        match value {
            Value::Mapping(m) => Some(m),
            Value::Null => None,
            other => {
                self.err(path, format!("expected a mapping, found {}", describe(other)));
                None
            }
        }
    }

    fn string(&mut self, v: &Value, path: &[Seg]) -> Option<String> {
        match v {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            other => {
                self.err(path, format!("expected a string, found {}", describe(other)));
                None
            }
        }
    }

    fn uint(&mut self, v: &Value, path: &[Seg], max: u64) -> Option<u64> {
        match v.as_u64() {
            Some(n) if n <= max => Some(n),
            Some(n) => {
                self.err(path, format!("{n} is too large (at most {max})"));
                None
            }
            None => {
                self.err(path, format!("expected a whole number, found {}", describe(v)));
                None
            }
        }
    }

    fn port(&mut self, v: &Value, path: &[Seg]) -> Option<u16> {
        self.uint(v, path, u16::MAX as u64).map(|n| n as u16)
    }

    fn boolean(&mut self, v: &Value, path: &[Seg]) -> Option<bool> {
        match v {
            Value::Bool(b) => Some(*b),
            other => {
                self.err(path, format!("expected true or false, found {}", describe(other)));
                None
            }
        }
    }

    fn duration(&mut self, v: &Value, path: &[Seg]) -> Option<Duration> {
        let text = match v {
            Value::String(s) => s.clone(),
            Value::Number(n) => {
                self.err(path, format!("`{n}` has no unit; write a duration such as `{n}s` or `{n}ms`"));
                return None;
            }
            other => {
                self.err(path, format!("expected a duration such as `10s`, found {}", describe(other)));
                return None;
            }
        };
        match humantime::parse_duration(text.trim()) {
            Ok(d) => Some(d),
            Err(e) => {
                self.err(path, format!("`{text}` is not a duration ({e}); write e.g. `500ms`, `10s`, `2m`"));
                None
            }
        }
    }

    fn size(&mut self, v: &Value, path: &[Seg]) -> Option<u64> {
        if let Some(n) = v.as_u64() {
            return Some(n);
        }
        let Some(text) = v.as_str() else {
            self.err(path, format!("expected a size such as `10MiB`, found {}", describe(v)));
            return None;
        };
        let t = text.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let mult: Option<u64> = match unit.trim() {
            "" | "B" => Some(1),
            "KiB" | "K" => Some(1 << 10),
            "MiB" | "M" => Some(1 << 20),
            "GiB" | "G" => Some(1 << 30),
            "KB" | "kB" => Some(1000),
            "MB" => Some(1_000_000),
            "GB" => Some(1_000_000_000),
            _ => None,
        };
        match (num.parse::<u64>().ok(), mult) {
            (Some(n), Some(m)) => Some(n.saturating_mul(m)),
            _ => {
                self.err(path, format!("`{text}` is not a size; write e.g. `512KiB`, `10MiB`"));
                None
            }
        }
    }
}

fn child(path: &[Seg], key: &str) -> Vec<Seg> {
    let mut p = path.to_vec();
    p.push(Seg::Key(key.to_string()));
    p
}

fn item(path: &[Seg], i: usize) -> Vec<Seg> {
    let mut p = path.to_vec();
    p.push(Seg::Index(i));
    p
}

fn describe(v: &Value) -> String {
    match v {
        Value::Null => "nothing".into(),
        Value::Bool(b) => format!("`{b}`"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("the string `{s}`"),
        Value::Sequence(_) => "a list".into(),
        Value::Mapping(_) => "a mapping".into(),
        Value::Tagged(t) => format!("a value tagged {}", t.tag),
    }
}

/// The allowed key closest to a misspelt one, if any is close.
fn suggest<'a>(key: &str, allowed: &[&'a str]) -> Option<&'a str> {
    let lower = key.to_ascii_lowercase().replace(['-', '_'], "");
    allowed
        .iter()
        .map(|a| (edit_distance(&lower, &a.to_ascii_lowercase()), *a))
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, a)| a)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

fn default_master() -> MasterConfig {
    MasterConfig {
        host: "127.0.0.1".into(),
        control_port: 3005,
        admin: SocketAddr::from(([127, 0, 0, 1], 7001)),
        admin_token: None,
        restart: RestartPolicy::default(),
        stop_grace: Duration::from_secs(10),
        heartbeat_interval: Duration::from_secs(1),
        heartbeat_timeout: Duration::from_secs(5),
        start_timeout: Duration::from_secs(10),
        orphan_timeout: Duration::from_secs(60),
        logs: LogConfig { dir: PathBuf::from("logs"), max_bytes: 10 << 20, keep: 3 },
        run_dir: PathBuf::from(".pomelo"),
    }
}

fn apply_master(ctx: &mut Ctx, m: &mut MasterConfig, value: &Value, path: &[Seg]) {
    for (key, v) in ctx.entries(value, path, MASTER_KEYS) {
        let p = child(path, &key);
        match key.as_str() {
            "host" => set(&mut m.host, ctx.string(v, &p)),
            "controlPort" => set(&mut m.control_port, ctx.port(v, &p)),
            "admin" => {
                if let Some(s) = ctx.string(v, &p) {
                    match s.parse::<SocketAddr>() {
                        Ok(a) => m.admin = a,
                        Err(_) => ctx.err(&p, format!("`{s}` is not an address; write e.g. `127.0.0.1:7001`")),
                    }
                }
            }
            "adminToken" => {
                if let Some(s) = ctx.string(v, &p) {
                    if s.len() < 16 {
                        ctx.err(&p, "an admin token must be at least 16 characters");
                    } else {
                        m.admin_token = Some(s);
                    }
                }
            }
            "restart" => {
                for (rk, rv) in ctx.entries(v, &p, RESTART_KEYS) {
                    let rp = child(&p, &rk);
                    let r = &mut m.restart;
                    match rk.as_str() {
                        "backoffInitial" => set(&mut r.backoff_initial, ctx.duration(rv, &rp)),
                        "backoffMax" => set(&mut r.backoff_max, ctx.duration(rv, &rp)),
                        "resetAfter" => set(&mut r.reset_after, ctx.duration(rv, &rp)),
                        "window" => set(&mut r.window, ctx.duration(rv, &rp)),
                        "maxRestarts" => set(&mut r.max_restarts, ctx.uint(rv, &rp, 10_000).map(|n| n as u32)),
                        "backoffMultiplier" => match rv.as_f64() {
                            Some(x) if (1.0..=10.0).contains(&x) => r.backoff_multiplier = x,
                            _ => ctx.err(&rp, "expected a number from 1 to 10"),
                        },
                        _ => {}
                    }
                }
            }
            "stopGrace" => set(&mut m.stop_grace, ctx.duration(v, &p)),
            "heartbeatInterval" => set(&mut m.heartbeat_interval, ctx.duration(v, &p)),
            "heartbeatTimeout" => set(&mut m.heartbeat_timeout, ctx.duration(v, &p)),
            "startTimeout" => set(&mut m.start_timeout, ctx.duration(v, &p)),
            "orphanTimeout" => set(&mut m.orphan_timeout, ctx.duration(v, &p)),
            "logs" => {
                for (lk, lv) in ctx.entries(v, &p, LOG_KEYS) {
                    let lp = child(&p, &lk);
                    match lk.as_str() {
                        "dir" => set(&mut m.logs.dir, ctx.string(lv, &lp).map(PathBuf::from)),
                        "maxSize" => match ctx.size(lv, &lp) {
                            Some(n) if n >= 4096 => m.logs.max_bytes = n,
                            Some(_) => ctx.err(&lp, "a log file must be allowed at least 4KiB"),
                            None => {}
                        },
                        "keep" => set(&mut m.logs.keep, ctx.uint(lv, &lp, 100).map(|n| n as u32)),
                        _ => {}
                    }
                }
            }
            "runDir" => set(&mut m.run_dir, ctx.string(v, &p).map(PathBuf::from)),
            _ => {}
        }
    }
}

fn set<T>(slot: &mut T, v: Option<T>) {
    if let Some(v) = v {
        *slot = v;
    }
}

/// Checks the master settings that depend on each other.
fn check_master(ctx: &mut Ctx, m: &MasterConfig, path: &[Seg]) {
    let r = &m.restart;
    if r.backoff_max < r.backoff_initial {
        ctx.err(&child(&child(path, "restart"), "backoffMax"), "must not be shorter than backoffInitial");
    }
    if r.max_restarts == 0 {
        ctx.err(&child(&child(path, "restart"), "maxRestarts"), "must be at least 1");
    }
    if m.heartbeat_interval.is_zero() {
        ctx.err(&child(path, "heartbeatInterval"), "must be longer than 0s");
    }
    if m.heartbeat_timeout <= m.heartbeat_interval {
        ctx.err(&child(path, "heartbeatTimeout"), "must be longer than heartbeatInterval");
    }
    if m.orphan_timeout < m.heartbeat_timeout {
        ctx.err(&child(path, "orphanTimeout"), "must not be shorter than heartbeatTimeout");
    }
}

fn parse_server(ctx: &mut Ctx, t: ServerType, value: &Value, path: &[Seg]) -> Option<ServerSpec> {
    let frontend = t.is_frontend();
    let mut s = ServerSpec {
        id: String::new(),
        server_type: t,
        host: "127.0.0.1".into(),
        port: None,
        client_port: None,
        args: Vec::new(),
        env: BTreeMap::new(),
        auto_restart: true,
        max_connections: 10_000,
        heartbeat: (t == ServerType::Connector).then(|| Duration::from_secs(3)),
        use_dict: t == ServerType::Connector,
        idle_timeout: Duration::from_secs(90),
        max_message_bytes: super::DEFAULT_MAX_MESSAGE_BYTES,
        max_requests_per_second: super::DEFAULT_REQUESTS_PER_SECOND,
        threads: None,
    };
    let mut has_id = false;
    let entries = ctx.entries(value, path, SERVER_KEYS);
    if !matches!(value, Value::Mapping(_)) {
        if value.is_null() {
            ctx.err(path, "empty server entry; it needs at least an `id`");
        }
        return None;
    }
    for (key, v) in entries {
        let p = child(path, &key);
        match key.as_str() {
            "id" => {
                if let Some(id) = ctx.string(v, &p) {
                    has_id = true;
                    if id.is_empty()
                        || id.len() > 64
                        || !id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                    {
                        ctx.err(&p, format!("`{id}` is not a valid id: use 1 to 64 of A-Z a-z 0-9 - _ ."));
                    }
                    s.id = id;
                }
            }
            "host" => set(&mut s.host, ctx.string(v, &p)),
            "port" => s.port = ctx.port(v, &p),
            "clientPort" => {
                if !frontend {
                    ctx.err(&p, format!("{t} servers have no clients; only gate and connector take a clientPort"));
                }
                s.client_port = ctx.port(v, &p);
            }
            "args" => match v {
                Value::String(a) => s.args = a.split_whitespace().map(String::from).collect(),
                Value::Sequence(items) => {
                    for (i, a) in items.iter().enumerate() {
                        if let Some(a) = ctx.string(a, &item(&p, i)) {
                            s.args.push(a);
                        }
                    }
                }
                other => ctx.err(&p, format!("expected a string or a list, found {}", describe(other))),
            },
            "env" => {
                if let Some(map) = ctx.mapping(v, &p) {
                    for (k, ev) in map {
                        let name = k.as_str().unwrap_or_default().to_string();
                        let ep = child(&p, &name);
                        let val = match ev {
                            Value::String(x) => Some(x.clone()),
                            Value::Number(n) => Some(n.to_string()),
                            Value::Bool(b) => Some(b.to_string()),
                            other => {
                                ctx.err(&ep, format!("expected a string, found {}", describe(other)));
                                None
                            }
                        };
                        if name.is_empty() || name.contains('=') {
                            ctx.err(&ep, "not a valid environment variable name");
                        } else if let Some(val) = val {
                            s.env.insert(name, val);
                        }
                    }
                }
            }
            "autoRestart" => set(&mut s.auto_restart, ctx.boolean(v, &p)),
            "maxConnections"
            | "heartbeat"
            | "dictionary"
            | "idleTimeout"
            | "maxMessageSize"
            | "maxRequestsPerSecond"
                if !frontend =>
            {
                ctx.err(&p, format!("`{key}` applies to frontends (gate, connector), not to {t} servers"));
            }
            "maxConnections" => match ctx.uint(v, &p, 1_000_000) {
                Some(0) => ctx.err(&p, "must be at least 1"),
                Some(n) => s.max_connections = n as usize,
                None => {}
            },
            "heartbeat" => match v {
                Value::Bool(false) | Value::Null => s.heartbeat = None,
                _ => match ctx.duration(v, &p) {
                    Some(d) if d >= Duration::from_millis(100) => s.heartbeat = Some(d),
                    Some(_) => ctx.err(&p, "at least 100ms, or `false` for none"),
                    None => {}
                },
            },
            "dictionary" => set(&mut s.use_dict, ctx.boolean(v, &p)),
            "idleTimeout" => set(&mut s.idle_timeout, ctx.duration(v, &p)),
            "maxMessageSize" => match ctx.size(v, &p) {
                Some(n) if (1024..=super::MAX_MAX_MESSAGE_BYTES as u64).contains(&n) => {
                    s.max_message_bytes = n as usize
                }
                Some(_) => ctx.err(&p, "between 1KiB and 1MiB"),
                None => {}
            },
            "maxRequestsPerSecond" => match ctx.uint(v, &p, 1_000_000) {
                Some(0) => ctx.err(&p, "must be at least 1"),
                Some(n) => s.max_requests_per_second = n as u32,
                None => {}
            },
            "threads" => match ctx.uint(v, &p, 256) {
                Some(0) => ctx.err(&p, "must be at least 1"),
                Some(n) => s.threads = Some(n as usize),
                None => {}
            },
            _ => {}
        }
    }
    if !has_id {
        ctx.err(path, "missing `id`");
    }
    if frontend && s.client_port.is_none() {
        ctx.err(path, format!("{t} `{}` needs a `clientPort` (0 picks a free one)", s.id));
    }
    if t != ServerType::Gate && s.port.is_none() {
        ctx.err(path, format!("{t} `{}` needs a `port` for cluster RPC (0 picks a free one)", s.id));
    }
    // An entry with other problems still takes part in the duplicate checks.
    has_id.then_some(s)
}

/// Parses the `servers` section; returns the servers in file order with their paths.
fn parse_servers(ctx: &mut Ctx, value: &Value, path: &[Seg]) -> Vec<(ServerSpec, Vec<Seg>)> {
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

/// Duplicate ids and ports across the servers and the master's own listeners.
fn check_unique(ctx: &mut Ctx, master: &MasterConfig, servers: &[(ServerSpec, Vec<Seg>)], mpath: &[Seg]) {
    let mut ids: HashMap<&str, &[Seg]> = HashMap::new();
    let norm = |h: &str| if super::is_local_host(h) { "local".to_string() } else { h.to_string() };
    let mut ports: HashMap<(String, u16), String> = HashMap::new();
    if master.control_port != 0 {
        ports.insert((norm(&master.host), master.control_port), "the master's controlPort".into());
    }
    if master.admin.port() != 0 {
        let host = master.admin.ip().to_string();
        ports.entry((norm(&host), master.admin.port())).or_insert_with(|| "the master's admin address".into());
        if master.admin.port() == master.control_port && super::is_local_host(&master.host) {
            ctx.err(&child(mpath, "admin"), "uses the same port as controlPort");
        }
    }
    for (s, path) in servers {
        if let Some(first) = ids.get(s.id.as_str()) {
            let line = ctx.index.line_of(first).map(|l| format!(" at line {l}")).unwrap_or_default();
            ctx.err(&child(path, "id"), format!("duplicate id `{}` (first used{line})", s.id));
        } else {
            ids.insert(&s.id, path);
        }
        for (field, port) in [("port", s.port), ("clientPort", s.client_port)] {
            let Some(port) = port.filter(|p| *p != 0) else { continue };
            let owner = format!("{} `{}`", field, s.id);
            if let Some(first) = ports.get(&(norm(&s.host), port)) {
                ctx.err(&child(path, field), format!("port {port} is already used by {first}"));
            } else {
                ports.insert((norm(&s.host), port), owner);
            }
        }
    }
}

pub(super) fn parse(text: &str, env: &str) -> Result<(MasterConfig, Vec<ServerSpec>), Vec<ConfigError>> {
    let mut ctx = Ctx { index: LineIndex::build(text), errors: Vec::new() };
    let doc: Value = match serde_yaml::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            return Err(vec![ConfigError {
                line: e.location().map(|l| l.line()),
                path: String::new(),
                message: format!("not valid YAML: {e}"),
            }])
        }
    };
    if doc.is_null() {
        return Err(vec![ConfigError { line: None, path: String::new(), message: "the file is empty".into() }]);
    }
    let root = ctx.entries(&doc, &[], ROOT_KEYS);
    let get = |k: &str| root.iter().find(|(key, _)| key == k).map(|(_, v)| *v);

    let mpath = vec![Seg::Key("master".into())];
    let mut base_master = default_master();
    if let Some(m) = get("master") {
        apply_master(&mut ctx, &mut base_master, m, &mpath);
    }
    let spath = vec![Seg::Key("servers".into())];
    let base_servers = get("servers").map(|v| parse_servers(&mut ctx, v, &spath));

    // Every environment is checked; the selected one is kept.
    let mut envs: Vec<EnvSection> = Vec::new();
    let epath = vec![Seg::Key("environments".into())];
    if let Some(e) = get("environments") {
        if let Some(map) = ctx.mapping(e, &epath) {
            for (k, v) in map {
                let name = k.as_str().unwrap_or_default().to_string();
                let p = child(&epath, &name);
                let mut m = base_master.clone();
                let mut servers = None;
                let mut mp = mpath.clone();
                for (key, ev) in ctx.entries(v, &p, ENV_KEYS) {
                    let kp = child(&p, &key);
                    if key == "master" {
                        apply_master(&mut ctx, &mut m, ev, &kp);
                        mp = kp;
                    } else {
                        servers = Some(parse_servers(&mut ctx, ev, &kp));
                    }
                }
                envs.push((name, m, mp, servers));
            }
        }
    }
    let mut selected = None;
    if !envs.iter().any(|(n, ..)| n == DEFAULT_ENV) {
        envs.insert(0, (DEFAULT_ENV.to_string(), base_master.clone(), mpath.clone(), None));
    }
    for (name, master, mp, servers) in envs {
        let servers = servers.or_else(|| base_servers.clone()).unwrap_or_default();
        check_master(&mut ctx, &master, &mp);
        check_unique(&mut ctx, &master, &servers, &mp);
        if name == env {
            selected = Some((master, servers.into_iter().map(|(s, _)| s).collect::<Vec<_>>()));
        }
    }
    if selected.is_none() {
        ctx.err(&epath, format!("environment `{env}` is not defined in `environments`"));
    }
    if base_servers.is_none() && ctx.errors.is_empty() {
        if let Some((_, servers)) = &selected {
            if servers.is_empty() {
                ctx.err(&[], "no `servers` section: list at least one server");
            }
        }
    }
    match selected {
        Some(sel) if ctx.errors.is_empty() => Ok(sel),
        _ => {
            ctx.errors.sort_by_key(|e| e.line.unwrap_or(usize::MAX));
            Err(ctx.errors)
        }
    }
}
