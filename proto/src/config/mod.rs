//! `servers.yaml`: the schema, its validation, and the validated [`Topology`] the master runs.
//!
//! Loading is two stages, as linkerd2-proxy and Horust do it: the text is parsed into YAML values, then
//! `parse` walks them, collecting *every* problem (unknown keys, missing fields, bad durations, duplicate
//! ids and ports) with its line, before anything binds or spawns. A file with any problem yields
//! [`ConfigErrors`] and no topology; the caller changes nothing.
//!
//! - `parse`: the document walk (root keys, environments, which one is selected);
//! - `schema`: one table row per key, and the defaults;
//! - `walk`: the shared `Ctx` (problems with lines, key checks with "did you mean", value coercions);
//! - `rules`: the checks across keys (master timings, unique ids and ports);
//! - `locate`: from a path such as `servers.chat[1].port` to its line.

mod locate;
mod parse;
mod rules;
mod schema;
mod ssh;
mod walk;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::control::ServerType;

pub use locate::Seg;
pub use ssh::{SshConfig, SshTarget};

/// Default `maxMessageSize`: the largest package body a client may send.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// Largest `maxMessageSize` accepted: a push of it must fit a session's queue several times over.
pub const MAX_MAX_MESSAGE_BYTES: usize = 1 << 20;
/// Default `maxRequestsPerSecond` per session.
pub const DEFAULT_REQUESTS_PER_SECOND: u32 = 500;
/// Default `maxNameLength` (bytes of a username or room id; connectors).
pub const DEFAULT_MAX_NAME_BYTES: usize = 64;
/// Largest `maxNameLength` accepted.
pub const MAX_MAX_NAME_BYTES: usize = 1024;
/// Default `maxRoomMembers` (chat servers): a join reply of this many short names is about 150 KB.
pub const DEFAULT_MAX_ROOM_MEMBERS: usize = 10_000;
/// Default `maxRooms` per chat server.
pub const DEFAULT_MAX_ROOMS: usize = 100_000;

fn default_max_name() -> usize {
    DEFAULT_MAX_NAME_BYTES
}

fn default_max_room_members() -> usize {
    DEFAULT_MAX_ROOM_MEMBERS
}

fn default_max_rooms() -> usize {
    DEFAULT_MAX_ROOMS
}

fn default_max_message() -> usize {
    DEFAULT_MAX_MESSAGE_BYTES
}

fn default_requests_per_second() -> u32 {
    DEFAULT_REQUESTS_PER_SECOND
}

/// The environment used when `--env` is not given.
pub const DEFAULT_ENV: &str = "development";

/// One problem in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// 1-based line, when the problem can be placed.
    pub line: Option<usize>,
    /// Where in the document, e.g. `servers.chat[1].port`.
    pub path: String,
    pub message: String,
}

/// Every problem found in one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors {
    pub file: PathBuf,
    pub errors: Vec<ConfigError>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.errors.len();
        write!(f, "{} has {} problem{}:", self.file.display(), n, if n == 1 { "" } else { "s" })?;
        for e in &self.errors {
            write!(f, "\n  {}", self.file.display())?;
            if let Some(line) = e.line {
                write!(f, ":{line}")?;
            }
            if e.path.is_empty() {
                write!(f, ": {}", e.message)?;
            } else {
                write!(f, ": {}: {}", e.path, e.message)?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Restart policy: exponential backoff with jitter inside an intensity limit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RestartPolicy {
    /// First delay after a crash.
    pub backoff_initial: Duration,
    /// Multiplier per consecutive crash.
    pub backoff_multiplier: f64,
    /// Ceiling of the delay.
    pub backoff_max: Duration,
    /// Uptime after which a server counts as healthy again and the backoff resets.
    pub reset_after: Duration,
    /// At most this many restarts within `window`; one more and the server is `failed`.
    pub max_restarts: u32,
    pub window: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            backoff_initial: Duration::from_millis(100),
            backoff_multiplier: 2.0,
            backoff_max: Duration::from_secs(15),
            reset_after: Duration::from_secs(30),
            max_restarts: 5,
            window: Duration::from_secs(60),
        }
    }
}

/// Where worker logs go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogConfig {
    /// Relative paths are relative to the directory of servers.yaml.
    pub dir: PathBuf,
    /// A log file is rotated when it reaches this size.
    pub max_bytes: u64,
    /// Rotated files kept (`<id>.log.1` .. `<id>.log.N`).
    pub keep: u32,
}

/// The `master` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MasterConfig {
    /// The address workers use to reach the control port.
    pub host: String,
    /// Control port (workers register here); 0 picks a free one.
    pub control_port: u16,
    /// Admin HTTP listener (dashboard, API, /metrics).
    pub admin: SocketAddr,
    /// Admin token from the file; `POMELO_ADMIN_TOKEN` or a generated token otherwise.
    pub admin_token: Option<String>,
    /// Host names (besides IP literals and `localhost`) the admin server answers to in `Host`.
    #[serde(default)]
    pub admin_hosts: Vec<String>,
    /// TLS on control and RPC links: on, off, or (unset) on exactly when some host is not loopback.
    #[serde(default)]
    pub cluster_tls: Option<bool>,
    /// `clusterTls: {ca, certs}`: the operator's CA certificate and a directory of per-server certificates
    /// (`<id>.pem`, `<id>.key`; `master.pem`/`master.key` for the master) instead of the CA the master keeps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_tls_files: Option<ClusterTlsFiles>,
    pub restart: RestartPolicy,
    /// SIGTERM, then this long, then SIGKILL.
    pub stop_grace: Duration,
    /// How often workers heartbeat.
    pub heartbeat_interval: Duration,
    /// No heartbeat for this long and the worker counts as hung: it is killed and restarted.
    pub heartbeat_timeout: Duration,
    /// A spawned worker that has not registered by then is killed and restarted.
    pub start_timeout: Duration,
    /// A worker with no master for this long stops by itself.
    pub orphan_timeout: Duration,
    pub logs: LogConfig,
    /// Runtime state (pid files, tokens); relative to the directory of servers.yaml.
    pub run_dir: PathBuf,
    /// How servers on other hosts are started (`master.ssh`).
    #[serde(default)]
    pub ssh: SshConfig,
    /// `externalHosts`: every server on these hosts is `supervise: external` (a platform starts it).
    #[serde(default)]
    pub external_hosts: Vec<String>,
}

/// A chat server's `history`: where each room's messages are kept, and how many for how long.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryConfig {
    pub backend: HistoryBackend,
    /// Messages kept per room (`maxMessages`).
    pub max_messages: usize,
    /// Messages older than this are forgotten (`maxAge`).
    pub max_age: Duration,
    /// `disk`: the directory of the store (`dir`, relative to servers.yaml's; default `<runDir>/history`);
    /// the file is `<dir>/<server id>.redb`. Absolute once the topology is loaded.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// `redis`: the server (`url`: `redis://[user:password@]host:port[/db]`, or `unix://path`).
    #[serde(default)]
    pub url: Option<String>,
    /// `redis`: what every key starts with (`prefix`), so clusters can share a Redis.
    #[serde(default)]
    pub prefix: String,
}

/// Where a room's history is kept (`history.backend`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HistoryBackend {
    /// A ring per room in the chat server's memory: lost with the process.
    #[default]
    Memory,
    /// An embedded store (redb) on the chat server's host, committed before a send is answered.
    Disk,
    /// Redis Streams: shared by every chat server, so history follows a room to its new owner.
    Redis,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            backend: HistoryBackend::Memory,
            max_messages: 1000,
            max_age: Duration::from_secs(300),
            dir: None,
            url: None,
            prefix: "pomelo:".into(),
        }
    }
}

/// Operator-provided cluster certificates (`clusterTls: {ca, certs}`), resolved against servers.yaml's directory.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterTlsFiles {
    pub ca: PathBuf,
    pub certs: PathBuf,
}

/// One server entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerSpec {
    /// TLS on the client port (`wss://` and TLS over TCP beside the plain ones): PEM files, resolved
    /// against the directory of servers.yaml.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssl: Option<SslFiles>,
    pub id: String,
    pub server_type: ServerType,
    pub host: String,
    /// Cluster RPC port (0: any free port).
    pub port: Option<u16>,
    /// Client port for frontends (0: any free port).
    pub client_port: Option<u16>,
    /// Connectors: the host the gate gives clients for this connector (`clientHost`), when clients reach
    /// it by another name than the cluster does (a public name, a NAT or load-balancer address); `host`
    /// otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_host: Option<String>,
    /// Extra command-line flags for the worker (`--log-level debug`, `--threads 2`).
    pub args: Vec<String>,
    /// Extra environment variables for the worker.
    pub env: BTreeMap<String, String>,
    /// Restart when it exits (default true).
    pub auto_restart: bool,
    /// Frontends: connections above this are refused.
    pub max_connections: usize,
    /// Frontends: heartbeat interval (connectors 3 s, gates none by default).
    pub heartbeat: Option<Duration>,
    /// Frontends: compress routes with the route dictionary (connectors on, gates off by default).
    pub use_dict: bool,
    /// Frontends: close a connection idle for this long when heartbeats are off.
    pub idle_timeout: Duration,
    /// Frontends: largest package body a client may send (`maxMessageSize`).
    #[serde(default = "default_max_message")]
    pub max_message_bytes: usize,
    /// Frontends: requests per second one session may send before it is kicked (`maxRequestsPerSecond`).
    #[serde(default = "default_requests_per_second")]
    pub max_requests_per_second: u32,
    /// Frontends: the oldest client version accepted per client type (`sys.type`; `*` for any other
    /// type); an older or missing version gets handshake code 501 (`checkClient`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub check_client: BTreeMap<String, String>,
    /// Frontends: `useCrypto`: a client that sends an RSA key in its handshake must sign every request.
    #[serde(default)]
    pub use_crypto: bool,
    /// Connectors: longest username or room id, in bytes (`maxNameLength`).
    #[serde(default = "default_max_name")]
    pub max_name_bytes: usize,
    /// Chat servers: most members one room may hold (`maxRoomMembers`).
    #[serde(default = "default_max_room_members")]
    pub max_room_members: usize,
    /// Chat servers: most rooms one chat server may hold (`maxRooms`).
    #[serde(default = "default_max_rooms")]
    pub max_rooms: usize,
    /// Chat servers: bounds of each room's history (`history`); `None` keeps the defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history: Option<HistoryConfig>,
    /// Runtime threads of the worker; `None` shares the machine's cores among its servers.
    pub threads: Option<usize>,
    /// `supervise: external`: a platform (systemd, Kubernetes) starts it; the master never spawns or signals it.
    #[serde(default)]
    pub external: bool,
    /// The root `protobuf` section's files, the same for every server: bodies of routes with a proto are
    /// Pomelo protobuf, the rest JSON. Part of the spec, so editing a file restarts the servers on reload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protobuf: Option<ProtobufTexts>,
    /// The root `dictionary` entries (Pomelo's `config/dictionary.json`), the same for every server: routes
    /// coded after the handler routes, so pushes such as `onChat` go out with a 2-byte code.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dictionary: Vec<String>,
}

/// The texts of `serverProtos.json` and `clientProtos.json` (either may be absent: `{}`), checked to
/// compile when servers.yaml was read.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProtobufTexts {
    pub server: Option<String>,
    pub client: Option<String>,
}

impl ProtobufTexts {
    /// Compiles them (they compiled when servers.yaml was read; this is for the worker that gets them).
    pub fn compile(&self) -> Result<crate::wire::protobuf::ProtoBundle, crate::wire::protobuf::BundleError> {
        crate::wire::protobuf::ProtoBundle::new(self.server.as_deref(), self.client.as_deref())
    }
}

impl ServerSpec {
    /// A stable fingerprint: a changed spec means the running worker must be restarted.
    /// (The `ssl` files' contents are not in it: restart the server after replacing them.)
    pub fn fingerprint(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        format!("{:08x}", crc32fast::hash(&json))
    }

    /// Whether this server runs on this machine (spawned by the master) or elsewhere.
    pub fn is_local(&self) -> bool {
        is_local_host(&self.host)
    }

    /// Who starts it: the master as a child, the master over ssh, or a platform.
    pub fn launch(&self) -> Launch {
        if self.external {
            Launch::External
        } else if self.is_local() {
            Launch::Local
        } else {
            Launch::Ssh
        }
    }
}

/// Who starts a server and may signal it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launch {
    /// A child of the master (signalled as a local process group).
    Local,
    /// Started by the master over ssh; stopped over its control link, or by a verified `kill` over ssh.
    Ssh,
    /// Started by a platform; the master only asks it to exit over its control link.
    External,
}

impl Launch {
    pub fn as_str(self) -> &'static str {
        match self {
            Launch::Local => "local",
            Launch::Ssh => "ssh",
            Launch::External => "external",
        }
    }
}

/// The address to listen on for `host`: an IP address as written, `localhost` as 127.0.0.1, and a DNS name as
/// what it resolves to (never every interface, which a name that does not parse used to mean).
pub fn bind_ip(host: &str) -> std::io::Result<std::net::IpAddr> {
    use std::net::ToSocketAddrs;
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return Ok(ip);
    }
    if host == "localhost" {
        return Ok(std::net::IpAddr::from([127, 0, 0, 1]));
    }
    let mut addrs: Vec<_> = (host, 0).to_socket_addrs()?.map(|a| a.ip()).collect();
    addrs.sort_by_key(|ip| ip.is_ipv6());
    addrs
        .first()
        .copied()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, format!("`{host}` resolves to no address")))
}

/// True for loopback and unspecified hosts; other hosts are started on their own machines.
pub fn is_local_host(host: &str) -> bool {
    matches!(host, "localhost" | "0.0.0.0" | "::" | "::1")
        || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// A client port's certificate chain and private key (PEM files).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SslFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A validated `servers.yaml` for one environment.
#[derive(Debug, Clone, PartialEq)]
pub struct Topology {
    /// The file it came from.
    pub file: PathBuf,
    pub env: String,
    pub master: MasterConfig,
    /// Every server, in file order (types in the order they appear, entries in order).
    pub servers: Vec<ServerSpec>,
    /// Other files whose content is part of the configuration (the `protobuf` files), absolute: the master
    /// reloads when one of them is saved.
    pub watched: Vec<PathBuf>,
}

impl Topology {
    /// Reads, parses and validates `file` for `env`.
    pub fn load(file: &Path, env: &str) -> Result<Topology, ConfigErrors> {
        let text = std::fs::read_to_string(file).map_err(|e| ConfigErrors {
            file: file.to_path_buf(),
            errors: vec![ConfigError { line: None, path: String::new(), message: format!("cannot read it: {e}") }],
        })?;
        Topology::parse(file, &text, env)
    }

    /// Parses and validates `text` (named `file` in messages) for `env`.
    pub fn parse(file: &Path, text: &str, env: &str) -> Result<Topology, ConfigErrors> {
        let base = match file.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        parse::parse(text, env, &base)
            .map(|(master, servers, watched)| {
                let mut t = Topology { file: file.to_path_buf(), env: env.to_string(), master, servers, watched };
                let base = std::path::absolute(t.base_dir()).unwrap_or_else(|_| t.base_dir());
                for ssl in t.servers.iter_mut().filter_map(|s| s.ssl.as_mut()) {
                    ssl.cert = base.join(&ssl.cert);
                    ssl.key = base.join(&ssl.key);
                }
                let run_dir = base.join(&t.master.run_dir);
                for h in t.servers.iter_mut().filter_map(|s| s.history.as_mut()) {
                    if h.backend == HistoryBackend::Disk {
                        h.dir = Some(match &h.dir {
                            Some(d) => base.join(d),
                            None => run_dir.join("history"),
                        });
                    }
                }
                if let Some(f) = t.master.cluster_tls_files.as_mut() {
                    f.ca = base.join(&f.ca);
                    f.certs = base.join(&f.certs);
                }
                t
            })
            .map_err(|errors| ConfigErrors { file: file.to_path_buf(), errors })
    }

    /// The directory relative paths are resolved against.
    pub fn base_dir(&self) -> PathBuf {
        match self.file.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        }
    }

    pub fn run_dir(&self) -> PathBuf {
        self.base_dir().join(&self.master.run_dir)
    }

    /// Whether control and RPC links run over TLS: `clusterTls`, or by default whenever the master or any
    /// server is on a host that is not loopback.
    pub fn cluster_tls(&self) -> bool {
        self.master
            .cluster_tls
            .unwrap_or_else(|| !is_local_host(&self.master.host) || self.servers.iter().any(|s| !s.is_local()))
    }

    pub fn log_dir(&self) -> PathBuf {
        self.base_dir().join(&self.master.logs.dir)
    }

    /// What is valid but worth telling: a dictionary past 255 routes (libpomelo v1 reads codes with
    /// `& 0xff`, so its clients would get the wrong routes).
    pub fn warnings(&self) -> Vec<String> {
        let extra = self.servers.first().map(|s| &s.dictionary[..]).unwrap_or_default();
        match crate::wire::dictionary::chat_dictionary(extra) {
            Ok(d) if d.len() > crate::wire::dictionary::ONE_BYTE_CODES => vec![format!(
                "dictionary: {} routes; libpomelo v1 clients (cocos2d-x) read codes with `& 0xff` and mistake every \
                 route past 255",
                d.len()
            )],
            _ => Vec::new(),
        }
    }

    pub fn server(&self, id: &str) -> Option<&ServerSpec> {
        self.servers.iter().find(|s| s.id == id)
    }
}

/// What the master hands a worker at spawn time (as JSON in `POMELO_WORKER_SPEC`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerSpec {
    pub server: ServerSpec,
    /// The control address to try first.
    pub control_addr: String,
    /// Where the master writes `master.json`; a worker that lost its master re-reads the control address
    /// from there, so a restarted master on another port is still found.
    pub run_dir: PathBuf,
    pub heartbeat_interval: Duration,
    pub orphan_timeout: Duration,
    /// The master writes the worker's output here; a worker whose master is gone appends to it itself.
    pub log_file: PathBuf,
    pub log_max_bytes: u64,
    /// Runtime threads: the server's `threads`, or the cores shared among the servers of this machine.
    pub threads: usize,
    /// Set by a worker that took this spec with `--join`: the master's run directory is not on its host,
    /// so it dials `control_addr` only (never a `master.json` it would find at that path here).
    #[serde(default)]
    pub joined: bool,
    /// A chat server's rooms had other owners while it was away (stopped or failed while other chat servers
    /// ran): its `disk` history starts anew rather than continue with a silent gap.
    #[serde(default)]
    pub fresh_history: bool,
}

/// Runtime threads for a server without `threads`: this machine's cores shared among the servers it
/// runs (at least one each). More threads than cores only add wake-ups between them.
pub fn auto_threads(cores: usize, local_servers: usize) -> usize {
    (cores / local_servers.max(1)).max(1)
}

#[cfg(test)]
mod tests;
