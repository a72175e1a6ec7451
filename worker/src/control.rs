//! The worker's end of the control link.
//!
//! [`run`] authenticates the master and registers with it, heartbeats with the worker's stats, publishes every membership it
//! receives, and returns why the worker should stop: the master said so, the master refused it, or no
//! master has answered for `orphan_timeout`. When the link drops it retries with a bounded backoff,
//! re-reading `master.json` in the run directory, so a master restarted on another port is found.
//!
//! Every connection opens with the handshake of [`pomelo_proto::auth`]: the worker sends its id and a
//! nonce, and proves its server key only after the peer has proved it holds the same key (which only
//! the master, deriving it from the cluster secret, can). A peer that cannot is a squatter on the control
//! port: the worker says nothing more to it, obeys nothing it sent, and keeps retrying as if no master
//! were there. Frames are capped at [`auth::HANDSHAKE_MAX_FRAME`] until the master has proved itself.
//!
//! Test hook: `POMELO_TEST_REGISTER_DELAY_MS` in a worker's environment (servers.yaml `env:`) makes it wait
//! that long between reaching a master and registering, on re-registrations only (never the first), so an
//! end-to-end test can force the order in which adopted workers register with a new master.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pomelo_proto::auth::{self, Key, LinkKind, Role, Transcript};
use pomelo_proto::config::WorkerSpec;
use pomelo_proto::control::{BoundAddrs, Membership, Stats, ToMaster, ToWorker};
use pomelo_proto::link::JsonFramed;
use pomelo_proto::tls;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Why the control loop ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// The master asked it to stop.
    Stop(String),
    /// The master refused the registration (unknown id, duplicate, wrong token).
    Rejected(String),
    /// No master for `orphan_timeout`.
    Orphaned,
    /// Shutdown from this process (a signal).
    Shutdown,
}

/// Something that adds its figures to the heartbeat.
pub type StatsSource = Arc<dyn Fn(&mut Stats) + Send + Sync>;

pub struct Link<'a> {
    pub spec: &'a WorkerSpec,
    /// This server's key (hex), as the master handed it.
    pub token: &'a str,
    pub addrs: BoundAddrs,
    pub membership: watch::Sender<Arc<Membership>>,
    pub stats: Vec<StatsSource>,
}

const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(1);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// The shortest silence from the master that ends a session (see [`session`]).
const MIN_SILENCE: Duration = Duration::from_secs(3);
/// The most [`register_delay`] waits: below the master's registration timeout, so the link survives it.
const MAX_REGISTER_DELAY: Duration = Duration::from_secs(4);

/// Test hook (see the module doc): how long a re-registration waits, from `POMELO_TEST_REGISTER_DELAY_MS`.
fn register_delay() -> Duration {
    let Ok(v) = std::env::var("POMELO_TEST_REGISTER_DELAY_MS") else { return Duration::ZERO };
    match v.trim().parse::<u64>() {
        Ok(ms) => Duration::from_millis(ms).min(MAX_REGISTER_DELAY),
        Err(_) => {
            tracing::warn!("POMELO_TEST_REGISTER_DELAY_MS={v:?} is not a whole number of milliseconds; ignoring it");
            Duration::ZERO
        }
    }
}

pub async fn run(link: Link<'_>, shutdown: CancellationToken) -> Exit {
    let Some(key) = Key::from_hex(link.token) else {
        return Exit::Rejected("the server key in the environment is not 64 hex digits".into());
    };
    let mut last_contact = Instant::now();
    let mut retry = RETRY_MIN;
    let mut warned = false;
    let started = Instant::now();
    let delay = register_delay();
    let mut registered = false;
    loop {
        for addr in candidates(link.spec) {
            let session =
                session(&link, &key, addr.clone(), &mut last_contact, &mut registered, delay, started, &shutdown);
            match session.await {
                Ok(exit) => return exit,
                Err(e) => {
                    if !warned {
                        tracing::warn!(
                            "no master at {addr}: {e}; retrying (orphaned after {:?})",
                            link.spec.orphan_timeout
                        );
                        warned = true;
                    }
                }
            }
            // A session that got as far as the master resets the backoff.
            if last_contact.elapsed() < RETRY_MAX {
                retry = RETRY_MIN;
                warned = false;
            }
        }
        if last_contact.elapsed() >= link.spec.orphan_timeout {
            tracing::warn!("no master for {:?}: stopping", link.spec.orphan_timeout);
            return Exit::Orphaned;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Exit::Shutdown,
            _ = tokio::time::sleep(retry) => {}
        }
        retry = (retry * 2).min(RETRY_MAX);
    }
}

/// The address from the spec, then the one in master.json if it differs.
fn candidates(spec: &WorkerSpec) -> Vec<String> {
    let mut out = vec![spec.control_addr.clone()];
    if spec.joined {
        return out;
    }
    if let Some(addr) = master_json_addr(&spec.run_dir) {
        if addr != spec.control_addr {
            out.insert(0, addr);
        }
    }
    out
}

fn master_json_addr(run_dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(run_dir.join("master.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("control_addr")?.as_str().map(String::from)
}

/// One connection to the master. `Err` means try again; `Ok` means stop the worker.
#[allow(clippy::too_many_arguments)]
async fn session(
    link: &Link<'_>,
    key: &Key,
    addr: String,
    last_contact: &mut Instant,
    registered: &mut bool,
    delay: Duration,
    started: Instant,
    shutdown: &CancellationToken,
) -> Result<Exit, String> {
    let (stream, name) = dial(&addr).await?;
    if *registered && !delay.is_zero() {
        tracing::warn!("test hook POMELO_TEST_REGISTER_DELAY_MS: waiting {delay:?} before registering again");
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(Exit::Shutdown),
            _ = tokio::time::sleep(delay) => {}
        }
    }
    let spec = &link.spec.server;
    let (mut framed, t) = prove_master(stream, &name, &spec.id, key).await?;
    let t = t.transcript(&spec.id);
    let register = ToMaster::Register {
        id: spec.id.clone(),
        server_type: spec.server_type,
        pid: std::process::id(),
        proof: t.prove(key, Role::Dialler),
        spec_hash: spec.fingerprint(),
        addrs: link.addrs.clone(),
    };
    framed.send(&register).await.map_err(|e| e.to_string())?;
    let interval = match tokio::time::timeout(Duration::from_secs(5), framed.recv::<ToWorker>()).await {
        Ok(Ok(ToWorker::Welcome { heartbeat_interval_ms, master_pid })) => {
            tracing::info!("registered with the master (pid {master_pid}) at {addr}");
            *registered = true;
            Duration::from_millis(heartbeat_interval_ms.max(50))
        }
        Ok(Ok(ToWorker::Rejected { reason })) => return Ok(Exit::Rejected(reason)),
        Ok(Ok(other)) => return Err(format!("unexpected first message {other:?}")),
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => return Err("no answer to the registration within 5s".into()),
    };
    *last_contact = Instant::now();
    let mut tick = tokio::time::interval(interval);
    // The master acknowledges every heartbeat: a link that carries nothing back for this long is dead
    // even if its socket still takes writes (a partition drops packets without resetting anything).
    let silence = (interval * 5).max(MIN_SILENCE);
    let mut heard = Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                let _ = tokio::time::timeout(silence, framed.send(&ToMaster::Leaving { reason: "shutting down".into() })).await;
                return Ok(Exit::Shutdown);
            }
            _ = tick.tick() => {
                if heard.elapsed() > silence {
                    return Err(format!("the master has not answered for {:?}", heard.elapsed()));
                }
                let mut stats = Stats::new();
                stats.insert("uptime_seconds".into(), started.elapsed().as_secs_f64());
                own_process(&mut stats);
                for source in &link.stats {
                    source(&mut stats);
                }
                match tokio::time::timeout(silence, framed.send(&ToMaster::Heartbeat { stats })).await {
                    Ok(sent) => sent.map_err(|e| e.to_string())?,
                    Err(_) => return Err(format!("a heartbeat to the master did not go out within {silence:?}")),
                }
            }
            msg = framed.recv::<ToWorker>() => {
                heard = Instant::now();
                *last_contact = heard;
                match msg {
                    Ok(ToWorker::Membership(m)) => {
                        link.membership.send_replace(Arc::new(m));
                    }
                    Ok(ToWorker::Stop { reason }) => return Ok(Exit::Stop(reason)),
                    Ok(ToWorker::Rejected { reason }) => return Ok(Exit::Rejected(reason)),
                    Ok(ToWorker::HeartbeatAck
                        | ToWorker::Welcome { .. }
                        | ToWorker::Challenge { .. }
                        | ToWorker::Spec { .. }) => {}
                    Err(e) => return Err(format!("lost the master: {e}")),
                }
            }
        }
    }
}

/// Connects to the master at `addr` (`IP:PORT`, or `NAME:PORT` resolved now); returns the socket and the
/// name the master's certificate must carry.
async fn dial(addr: &str) -> Result<(TcpStream, String), String> {
    let (host, _) = addr.rsplit_once(':').ok_or_else(|| format!("`{addr}` is not HOST:PORT"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
    let target: SocketAddr = match addr.parse() {
        Ok(a) => a,
        Err(_) => tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::lookup_host(addr))
            .await
            .map_err(|_| format!("resolving {addr} timed out"))?
            .map_err(|e| format!("cannot resolve {addr}: {e}"))?
            .next()
            .ok_or_else(|| format!("{addr} resolves to no address"))?,
    };
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
    stream.set_nodelay(true).ok();
    Ok((stream, host))
}

/// The nonces of a handshake in which the master proved itself.
struct Proven {
    nonce: String,
    master_nonce: String,
}

impl Proven {
    fn transcript<'a>(&'a self, id: &'a str) -> Transcript<'a> {
        Transcript {
            kind: LinkKind::Control,
            dialler: id,
            acceptor: auth::MASTER_ID,
            dialler_nonce: &self.nonce,
            acceptor_nonce: &self.master_nonce,
        }
    }
}

/// TLS (if this worker has material) and the first half of the handshake: the hello, and the master's
/// challenge checked against `key`. `Err` means the peer is no master of this cluster, or went away.
async fn prove_master(
    stream: TcpStream,
    name: &str,
    id: &str,
    key: &Key,
) -> Result<(JsonFramed<tls::Stream>, Proven), String> {
    let stream = tokio::time::timeout(auth::HANDSHAKE_TIMEOUT, tls::worker_connect_to(stream, name))
        .await
        .map_err(|_| "no TLS handshake within 5s".to_string())?
        .map_err(|e| format!("TLS: {e}"))?;
    let mut framed = JsonFramed::handshake(stream);
    let nonce = auth::nonce().map_err(|e| e.to_string())?;
    framed.send(&ToMaster::Hello { id: id.to_string(), nonce: nonce.clone() }).await.map_err(|e| e.to_string())?;
    let (master_nonce, proof) = match tokio::time::timeout(auth::HANDSHAKE_TIMEOUT, framed.recv::<ToWorker>()).await {
        Ok(Ok(ToWorker::Challenge { nonce, proof })) => (nonce, proof),
        // Not even a `Rejected` is believed before the peer proves itself.
        Ok(Ok(_)) => return Err("the peer did not answer with a challenge: not a master of this cluster".into()),
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => return Err("no challenge within 5s".into()),
    };
    let proven = Proven { nonce, master_nonce };
    if !proven.transcript(id).verify(key, Role::Acceptor, &proof) {
        return Err("the peer could not prove it is this cluster's master".into());
    }
    framed.authenticated();
    Ok((framed, proven))
}

/// Why [`fetch_spec`] gave up.
#[derive(Debug)]
pub enum JoinError {
    /// The master answered and refused (not in servers.yaml, not external, wrong host).
    Refused(String),
    /// No master proved itself at the address within the time allowed.
    NoMaster(String),
}

/// `worker --join`: asks the master at `addr` for the spec of server `id`, proving `key`, until it
/// answers or `patience` runs out (retrying with a bounded backoff, for a platform that starts the
/// worker before the master).
pub async fn fetch_spec(addr: &str, id: &str, key: &Key, patience: Duration) -> Result<WorkerSpec, JoinError> {
    // A patience too large for the clock is forever (bounded by the platform, which sees no exit).
    let deadline = Instant::now().checked_add(patience);
    let mut retry = RETRY_MIN;
    let mut last = String::new();
    loop {
        match ask_spec(addr, id, key).await {
            Ok(Ok(spec)) => return Ok(spec),
            Ok(Err(reason)) => return Err(JoinError::Refused(reason)),
            Err(e) => {
                if e != last {
                    tracing::warn!("joining {addr}: {e}; retrying");
                    last = e;
                }
            }
        }
        if deadline.is_some_and(|d| Instant::now() + retry > d) {
            return Err(JoinError::NoMaster(format!("no master at {addr} answered within {patience:?}: {last}")));
        }
        tokio::time::sleep(retry).await;
        retry = (retry * 2).min(Duration::from_secs(5));
    }
}

/// One join attempt: `Ok(Err)` is the master's refusal, `Err` a reason to try again.
async fn ask_spec(addr: &str, id: &str, key: &Key) -> Result<Result<WorkerSpec, String>, String> {
    let (stream, name) = dial(addr).await?;
    let (mut framed, proven) = prove_master(stream, &name, id, key).await?;
    let proof = proven.transcript(id).prove(key, Role::Dialler);
    framed.send(&ToMaster::Join { id: id.to_string(), proof }).await.map_err(|e| e.to_string())?;
    match tokio::time::timeout(Duration::from_secs(10), framed.recv::<ToWorker>()).await {
        Ok(Ok(ToWorker::Spec { spec })) if spec.server.id == id => Ok(Ok(*spec)),
        Ok(Ok(ToWorker::Spec { spec })) => Err(format!("the master sent the spec of `{}`", spec.server.id)),
        Ok(Ok(ToWorker::Rejected { reason })) => Ok(Err(reason)),
        Ok(Ok(other)) => Err(format!("unexpected answer to a join: {other:?}")),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer to the join within 10s".into()),
    }
}

/// This process's own figures from `/proc/self`, so a master on another host can show them.
fn own_process(stats: &mut Stats) {
    let Ok(me) = procfs::process::Process::myself() else { return };
    if let Ok(st) = me.stat() {
        let tps = procfs::ticks_per_second().max(1) as f64;
        stats.insert("process_cpu_seconds_total".into(), (st.utime + st.stime) as f64 / tps);
        stats.insert("process_resident_memory_bytes".into(), (st.rss * procfs::page_size()) as f64);
    }
    if let Ok(n) = me.fd_count() {
        stats.insert("process_open_fds".into(), n as f64);
    }
}
