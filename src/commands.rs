//! The subcommands, and [`cancel_on_signals`]: SIGTERM/SIGINT cancel the master's or the worker's token here, so the
//! crates only ever see a token.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use pomelo_master::runstate;
use pomelo_proto::config::{Topology, WorkerSpec};
use pomelo_proto::control::JoinCredential;
use tokio_util::sync::CancellationToken;

use crate::ConfigArgs;
use pomelo_master::admin_client as client;

fn load(cfg: &ConfigArgs) -> anyhow::Result<Topology> {
    Ok(Topology::load(&cfg.config, &cfg.env)?)
}

pub fn check(cfg: &ConfigArgs) -> anyhow::Result<ExitCode> {
    let t = load(cfg)?;
    println!("{} is valid ({} environment): {} servers", cfg.config.display(), t.env, t.servers.len());
    for s in &t.servers {
        println!("  {:<24} {:<10} {}", s.id, s.server_type.as_str(), ports(s.port, s.client_port));
    }
    for w in t.warnings() {
        eprintln!("warning: {w}");
    }
    Ok(ExitCode::SUCCESS)
}

fn ports(port: Option<u16>, client: Option<u16>) -> String {
    let mut out = Vec::new();
    if let Some(p) = port {
        out.push(format!("rpc {p}"));
    }
    if let Some(p) = client {
        out.push(format!("clients {p}"));
    }
    out.join(", ")
}

/// Set by `start -d` for the master it starts in the background: the master then logs into this file,
/// capped and rotated as `master.logs` says, and does not echo its workers' output (they have their own).
const MASTER_LOG_ENV: &str = "POMELO_MASTER_LOG";

fn init_logging(level: &str, file: Option<pomelo_master::logs::RotatingFile>) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    use std::io::IsTerminal;
    let fmt = tracing_subscriber::fmt().with_env_filter(filter).with_target(false);
    match file {
        Some(f) => fmt.with_writer(std::sync::Mutex::new(f)).with_ansi(false).init(),
        None => fmt.with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal()).init(),
    }
}

pub fn start(cfg: &ConfigArgs, daemon: bool) -> anyhow::Result<ExitCode> {
    let topology = load(cfg)?;
    let log_file = match std::env::var_os(MASTER_LOG_ENV) {
        Some(path) if !daemon => {
            let logs = &topology.master.logs;
            Some(pomelo_master::logs::RotatingFile::open(path.into(), logs.max_bytes, logs.keep)?)
        }
        _ => None,
    };
    let echo = log_file.is_none();
    if !daemon {
        // Before `prepare`, so what it says about workers it will not adopt is logged.
        init_logging("info", log_file);
    }
    for w in topology.warnings() {
        tracing::warn!("{w}");
    }
    let prepared = pomelo_master::prepare(topology)?;
    if daemon {
        return daemonize(cfg, &prepared.run_dir);
    }
    match pomelo_master::procstat::raise_open_files() {
        Ok((before, after)) if after > before => tracing::info!("open-file limit raised from {before} to {after}"),
        Ok((_, after)) => tracing::info!("open-file limit {after}"),
        Err(e) => tracing::warn!("cannot read or raise the open-file limit: {e}"),
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(run_master(prepared, echo))
}

async fn run_master(prepared: pomelo_master::Prepared, echo: bool) -> anyhow::Result<ExitCode> {
    let t = &prepared.topology;
    let token: Arc<str> = pomelo_master::runstate::admin_token(Some(t), &prepared.run_dir, true)?.into();
    let control_addr = SocketAddr::new(bind_ip(&t.master.host)?, t.master.control_port);
    let control = tokio::net::TcpListener::bind(control_addr)
        .await
        .with_context(|| format!("cannot listen on the control port {control_addr}; is another master running?"))?;
    let admin = tokio::net::TcpListener::bind(t.master.admin)
        .await
        .with_context(|| format!("cannot listen on the admin address {}", t.master.admin))?;
    let admin_addr = admin.local_addr()?;
    if !admin_addr.ip().is_loopback() {
        tracing::warn!(
            "the admin server listens on {admin_addr}, beyond this machine, over plain HTTP: the token and session \
             cookie cross the network in clear; prefer a loopback address behind an SSH tunnel or a TLS proxy"
        );
    }
    let token_source = if t.master.admin_token.is_some() {
        "from servers.yaml".to_string()
    } else if std::env::var("POMELO_ADMIN_TOKEN").is_ok_and(|v| !v.trim().is_empty()) {
        "from POMELO_ADMIN_TOKEN".to_string()
    } else {
        format!("in {}", prepared.run_dir.join("admin-token").display())
    };
    let hosts = t.master.admin_hosts.clone();
    let shutdown = CancellationToken::new();
    let running = pomelo_master::start(prepared, control, admin_addr, echo, shutdown.clone())?;
    tracing::info!(
        "master pid {} running; dashboard http://{admin_addr}/ (admin token {token_source}); Ctrl-C stops the cluster",
        std::process::id()
    );
    // The dashboard is one of the master's tasks: it stops with the control listener once every server has
    // stopped, and its drain is bounded (and warned about) with the rest.
    running.tasks.spawn(pomelo_dashboard::serve(admin, running.handle.clone(), token, hosts, running.services.clone()));
    cancel_on_signals(shutdown.clone(), "stopping the cluster");
    running.task.await.context("the supervisor task failed")?;
    tracing::info!("every server has stopped; master exiting");
    Ok(ExitCode::SUCCESS)
}

fn bind_ip(host: &str) -> anyhow::Result<std::net::IpAddr> {
    pomelo_proto::config::bind_ip(host).with_context(|| format!("cannot find an address to listen on for `{host}`"))
}

/// Starts `pomelo-rs start` again in the background and waits until its master is up.
fn daemonize(cfg: &ConfigArgs, run_dir: &Path) -> anyhow::Result<ExitCode> {
    use std::os::unix::process::CommandExt;
    let topology = load(cfg)?;
    let log_dir = topology.log_dir();
    pomelo_proto::files::create_dir(&log_dir)?;
    let log_path = log_dir.join("master.log");
    // Until its logger is up (and for a panic), the master's stderr goes here too.
    let log = pomelo_proto::files::open(&log_path, pomelo_proto::files::Mode::Append)
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    let exe = std::env::current_exe()?;
    let mut child = std::process::Command::new(exe)
        .arg("start")
        .arg("-c")
        .arg(&cfg.config)
        .arg("-e")
        .arg(&cfg.env)
        .env(MASTER_LOG_ENV, &log_path)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .context("cannot start the master in the background")?;
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if let Some(m) = runstate::read_master(run_dir).filter(|m| m.pid == pid) {
            println!("The cluster is running in the background: master pid {pid}, dashboard http://{}/", m.admin_addr);
            println!("Output: {}; stop it with `pomelo-rs stop`.", log_path.display());
            return Ok(ExitCode::SUCCESS);
        }
        if let Some(status) = child.try_wait()? {
            bail!("the master exited at once ({status}); see {}", log_path.display());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("the master (pid {pid}) did not come up within 15s; see {}", log_path.display())
}

pub fn stop(cfg: &ConfigArgs, ids: &[String]) -> anyhow::Result<ExitCode> {
    let m = client::find(&cfg.config)?;
    if ids.is_empty() {
        println!("Stopping the cluster (master pid {})...", m.pid);
        m.json("POST", "/api/shutdown")?;
        let deadline = Instant::now() + Duration::from_secs(120);
        while pomelo_master::child::alive(m.pid) {
            if Instant::now() > deadline {
                bail!("the master (pid {}) is still running after 120s", m.pid);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        println!("Stopped.");
        return Ok(ExitCode::SUCCESS);
    }
    each(&m, ids, "stop")
}

fn each(m: &client::Master, ids: &[String], verb: &str) -> anyhow::Result<ExitCode> {
    let mut failed = false;
    for id in ids {
        match m.json("POST", &format!("/api/servers/{id}/{verb}")) {
            Ok(v) => println!("{}", v.get("message").and_then(|s| s.as_str()).unwrap_or("ok")),
            Err(e) => {
                eprintln!("pomelo-rs: {id}: {e}");
                failed = true;
            }
        }
    }
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

pub fn restart(cfg: &ConfigArgs, ids: &[String], server_type: Option<&str>) -> anyhow::Result<ExitCode> {
    let m = client::find(&cfg.config)?;
    let mut targets = ids.to_vec();
    if let Some(t) = server_type {
        if pomelo_proto::control::ServerType::parse(t).is_none() {
            bail!("unknown type `{t}`; use gate, connector or chat");
        }
        let v = m.json("GET", "/api/servers")?;
        for s in v["servers"].as_array().into_iter().flatten() {
            if s["type"] == t {
                targets.push(s["id"].as_str().unwrap_or_default().to_string());
            }
        }
        if targets.is_empty() {
            bail!("no {t} servers in this cluster");
        }
    }
    if targets.is_empty() {
        bail!("name the servers to restart, or --type TYPE");
    }
    each(&m, &targets, "restart")
}

pub fn start_servers(cfg: &ConfigArgs, ids: &[String]) -> anyhow::Result<ExitCode> {
    let m = client::find(&cfg.config)?;
    if ids.is_empty() {
        bail!("name the servers to start");
    }
    each(&m, ids, "start")
}

pub fn reload(cfg: &ConfigArgs) -> anyhow::Result<ExitCode> {
    let m = client::find(&cfg.config)?;
    let r = m.call("POST", "/api/reload")?;
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap_or(serde_json::Value::Null);
    match r.status {
        200..=299 => {
            println!("{}", v["message"].as_str().unwrap_or("reloaded"));
            Ok(ExitCode::SUCCESS)
        }
        422 => {
            eprintln!("pomelo-rs: {}", v["detail"].as_str().unwrap_or(&r.body));
            Ok(ExitCode::from(2))
        }
        s => bail!("{} ({s})", v["detail"].as_str().unwrap_or(&r.body)),
    }
}

pub fn list(cfg: &ConfigArgs, json: bool) -> anyhow::Result<ExitCode> {
    let m = client::find(&cfg.config)?;
    let v = m.json("GET", "/api/servers")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    let master = &v["master"];
    println!(
        "master pid {}  env {}  uptime {}  admin http://{}/",
        master["pid"],
        master["env"].as_str().unwrap_or(""),
        human_secs(master["uptime_secs"].as_f64()),
        master["admin_addr"].as_str().unwrap_or("")
    );
    if let Some(err) = master["config_error"].as_str() {
        println!("servers.yaml was NOT applied: {err}");
    }
    println!(
        "{:<22} {:<10} {:<24} {:>8} {:<9} {:>9} {:>8} {:>9} {:>6}  PORTS",
        "ID", "TYPE", "HOST", "PID", "STATE", "UPTIME", "RESTARTS", "RSS", "CPU%"
    );
    for s in v["servers"].as_array().into_iter().flatten() {
        let pid = s["pid"].as_u64().map(|p| p.to_string()).unwrap_or_else(|| "-".into());
        let rss = s["rss_bytes"].as_u64().filter(|r| *r > 0).map(|r| format!("{:.1}M", r as f64 / 1048576.0));
        let mut ports = Vec::new();
        if let Some(a) = s["addrs"]["rpc"].as_str() {
            ports.push(format!("rpc {a}"));
        }
        if let Some(a) = s["addrs"]["client"].as_str() {
            ports.push(format!("clients {a}"));
        }
        println!(
            "{:<22} {:<10} {:<24} {:>8} {:<9} {:>9} {:>8} {:>9} {:>6.1}  {}",
            s["id"].as_str().unwrap_or(""),
            s["type"].as_str().unwrap_or(""),
            host_column(s),
            pid,
            s["state"].as_str().unwrap_or(""),
            human_secs(s["uptime_secs"].as_f64()),
            s["restarts"],
            rss.unwrap_or_else(|| "-".into()),
            s["cpu_percent"].as_f64().unwrap_or(0.0),
            ports.join(", ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn human_secs(s: Option<f64>) -> String {
    match s {
        None => "-".into(),
        Some(s) if s < 60.0 => format!("{s:.0}s"),
        Some(s) if s < 3600.0 => format!("{}m{:02}s", (s / 60.0) as u64, (s % 60.0) as u64),
        Some(s) => format!("{}h{:02}m", (s / 3600.0) as u64, ((s % 3600.0) / 60.0) as u64),
    }
}

/// Where a worker's spec and key come from.
pub enum SpecFrom {
    /// The environment of a child of the master.
    Env,
    /// One JSON line on stdin (started over ssh).
    Stdin,
    /// The master at `addr`, asked with the credential in `credential` (`supervise: external`).
    Join { addr: String, credential: PathBuf, patience: Duration },
}

/// `pomelo-rs credential ID`: the join credential of a `supervise: external` server.
pub fn credential(cfg: &ConfigArgs, id: &str, output: Option<&Path>) -> anyhow::Result<ExitCode> {
    let topology = load(cfg)?;
    let server = topology.server(id).with_context(|| format!("`{id}` is not in {}", cfg.config.display()))?;
    if server.launch() != pomelo_proto::config::Launch::External {
        bail!(
            "`{id}` is started by the master ({}): only `supervise: external` servers join",
            server.launch().as_str()
        );
    }
    let run_dir = topology.run_dir();
    let secret = runstate::secret(&run_dir, "cluster-token")
        .with_context(|| format!("cannot read the cluster secret in {}", run_dir.display()))?;
    let tls = match pomelo_master::cluster_authority(&topology)? {
        Some(ca) => Some(ca.issue(id, &server.host)?),
        None => None,
    };
    let key = pomelo_proto::auth::server_key(&secret, id).to_hex();
    let mut text = serde_json::to_string_pretty(&JoinCredential { id: id.to_string(), key, tls })?;
    text.push('\n');
    match output {
        Some(path) => {
            use std::io::Write;
            let mut f = pomelo_proto::files::open(path, pomelo_proto::files::Mode::Truncate)
                .with_context(|| format!("cannot write {}", path.display()))?;
            f.write_all(text.as_bytes())?;
            eprintln!("wrote the join credential of `{id}` to {} (mode 0600; keep it secret)", path.display());
        }
        None => print!("{text}"),
    }
    Ok(ExitCode::SUCCESS)
}

/// Reads a join credential (capped at 1 MiB) and checks it is for `id`. Symlinks are followed and a file
/// of root's is accepted (Kubernetes Secret volumes, systemd's `LoadCredential` are both), but not one
/// another user owns or anyone may write.
fn read_credential(path: &Path, id: &str) -> anyhow::Result<JoinCredential> {
    use std::io::Read;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let file = std::fs::File::open(path).with_context(|| format!("cannot read the credential {}", path.display()))?;
    let meta = file.metadata()?;
    let me = nix::unistd::getuid().as_raw();
    if meta.uid() != me && meta.uid() != 0 {
        bail!("{} belongs to uid {}, not to this user or root: refusing it", path.display(), meta.uid());
    }
    if meta.permissions().mode() & 0o002 != 0 {
        bail!("{} can be written by any user: refusing it (make it 0600)", path.display());
    }
    if meta.permissions().mode() & 0o004 != 0 {
        eprintln!("pomelo-rs: warning: {} can be read by any user; make it 0600", path.display());
    }
    let mut text = String::new();
    file.take(1 << 20).read_to_string(&mut text).with_context(|| format!("cannot read {}", path.display()))?;
    let c: JoinCredential =
        serde_json::from_str(&text).with_context(|| format!("{} is not a join credential", path.display()))?;
    if c.id != id {
        bail!("{} is the credential of `{}`, not of `{id}`", path.display(), pomelo_proto::link::printable(&c.id));
    }
    Ok(c)
}

/// `worker --join`: the spec from the master, with the control address it was reached at.
fn join(addr: &str, id: &str, key: &str, patience: Duration) -> anyhow::Result<WorkerSpec> {
    let key = pomelo_proto::auth::Key::from_hex(key).context("the credential's key is not 64 hex digits")?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let fetched = rt.block_on(pomelo_worker::control::fetch_spec(addr, id, &key, patience));
    match fetched {
        Ok(mut spec) => {
            spec.control_addr = addr.to_string();
            spec.joined = true;
            Ok(spec)
        }
        Err(pomelo_worker::control::JoinError::Refused(why)) => Err(Refused(why).into()),
        Err(pomelo_worker::control::JoinError::NoMaster(why)) => bail!("{why}"),
    }
}

/// The master refused this worker (exit 3, which a platform should not restart).
#[derive(Debug)]
pub struct Refused(pub String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the master refused it: {}", self.0)
    }
}

impl std::error::Error for Refused {}

pub fn worker(
    id: &str,
    server_type: Option<&str>,
    log_level: &str,
    threads: Option<usize>,
    how: SpecFrom,
) -> anyhow::Result<ExitCode> {
    let joined = matches!(how, SpecFrom::Join { .. });
    let (spec, token) = match how {
        SpecFrom::Stdin => {
            let given = read_stdin_spec()?;
            if let Some(tls) = given.tls {
                pomelo_proto::tls::give_worker_material(tls);
            }
            (given.spec, given.key)
        }
        SpecFrom::Env => {
            let json = std::env::var(pomelo_master::child::SPEC_ENV).with_context(|| {
                format!("`worker` is started by the master (no {} set), or with --join", pomelo_master::child::SPEC_ENV)
            })?;
            let spec: WorkerSpec =
                serde_json::from_str(&json).context("the worker spec from the master is malformed")?;
            (spec, std::env::var(pomelo_master::child::KEY_ENV).unwrap_or_default())
        }
        SpecFrom::Join { addr, credential, patience } => {
            let c = read_credential(&credential, id)?;
            if let Some(m) = &c.tls {
                pomelo_proto::tls::give_worker_material(serde_json::to_string(m)?);
            }
            // Its platform keeps its output (the journal, `kubectl logs`): stderr only, no log file.
            worker_logging(log_level, std::io::stderr);
            tracing::info!("`{id}` joining the master at {addr}");
            let spec = join(&addr, id, &c.key, patience)?;
            // servers.yaml's `env:` for this server, as a spawned worker gets it in its environment
            // (set here, before any runtime thread exists). Its `args` are the platform's to give.
            for (k, v) in &spec.server.env {
                std::env::set_var(k, v);
            }
            (spec, c.key)
        }
    };
    if spec.server.id != id || server_type.is_some_and(|t| t != spec.server.server_type.as_str()) {
        bail!("--id/--type do not match the spec from the master");
    }
    if !joined {
        let writer = pomelo_worker::logwriter::FallbackWriter::new(spec.log_file.clone(), spec.log_max_bytes);
        worker_logging(log_level, writer);
    }
    // One thread: no work stealing and no wake-ups between threads, which on a machine shared by several
    // servers costs more than it gives.
    // The master sized `spec.threads` by its own cores; on another host (ssh or joined) a server without
    // `threads` is sized by that host's.
    let remote = spec.joined || !spec.server.is_local();
    let own = || std::thread::available_parallelism().map_or(1, |n| n.get());
    let default = if remote && spec.server.threads.is_none() { own() } else { spec.threads };
    let rt = match threads.unwrap_or(default) {
        0 | 1 => tokio::runtime::Builder::new_current_thread().enable_all().build()?,
        n => tokio::runtime::Builder::new_multi_thread().worker_threads(n).enable_all().build()?,
    };
    let exit = rt.block_on(async {
        let stop = CancellationToken::new();
        cancel_on_signals(stop.clone(), "stopping");
        pomelo_worker::runtime::run(spec, token, stop).await
    })?;
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(match exit {
        pomelo_worker::control::Exit::Rejected(_) => ExitCode::from(3),
        _ => ExitCode::SUCCESS,
    })
}

/// A worker's log lines: `RUST_LOG` or `level`, plain text, to `writer`.
fn worker_logging<W>(level: &str, writer: W)
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer).with_ansi(false).with_target(false).init();
}

/// Cancels `token` on the first SIGTERM or SIGINT, logging which with `doing` ("SIGTERM: stopping"). The
/// one place the binary turns signals into shutdown; the crates only see the token. Call it inside the
/// runtime; the task it spawns ends with the first signal.
fn cancel_on_signals(token: CancellationToken, doing: &'static str) {
    use tokio::signal::unix::{signal, SignalKind};
    let (term, int) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()));
    let (Ok(mut term), Ok(mut int)) = (term, int) else {
        tracing::warn!("cannot listen for SIGTERM/SIGINT; stop this process with `pomelo-rs stop`");
        return;
    };
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: {doing}"),
            _ = int.recv() => tracing::info!("SIGINT: {doing}"),
        }
        token.cancel();
    });
}

/// The one line the master writes on ssh's stdin (spec and key), read with a cap.
fn read_stdin_spec() -> anyhow::Result<pomelo_master::ssh::StdinSpec> {
    use std::io::{BufRead, Read};
    const MAX: u64 = 1 << 20;
    let mut line = String::new();
    std::io::stdin().lock().take(MAX).read_line(&mut line).context("cannot read the spec on stdin")?;
    if !line.ends_with('\n') {
        bail!("no spec on stdin (one JSON line of at most 1 MiB, as the master writes it over ssh)");
    }
    serde_json::from_str(&line).context("the spec on stdin is malformed")
}

/// `HOST` in `list`: the host, and who starts it when that is not the master itself.
fn host_column(s: &serde_json::Value) -> String {
    let host = s["host"].as_str().unwrap_or("");
    match s["supervisor"].as_str() {
        Some(how @ ("ssh" | "external")) => format!("{host} ({how})"),
        _ => host.to_string(),
    }
}
