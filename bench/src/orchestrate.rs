//! The orchestrator: finds the cluster through its admin API, starts the generator processes (this same
//! binary, `pomelo-bench gen`), keeps them in step, samples the cluster's CPU and RSS from `/proc` at
//! every boundary, and writes the report.
//!
//! Children talk JSON lines on stdout and take commands on stdin (see `shard.rs`). One reader thread per
//! child forwards its lines to a channel; every wait on that channel is bounded. A step starts at the same
//! monotonic instant in every child. After a step, if its p99 latency passed `stop_p99_ms` or deliveries
//! went missing, the rising rate stops there. Children are killed (by the pid this process started) if
//! they do not exit after `finish`.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::cluster::{self, Admin, Usage};
use crate::report::{self, StepResult};
use crate::shard::now_us;
use crate::spec::Spec;
use crate::track::{Counts, StepCounts};

/// How a run is driven, beyond the spec.
pub struct Options {
    pub scenario: String,
    pub admin: Admin,
    /// Stop rising steps once a step's p99 passes this (ms).
    pub stop_p99_ms: Option<f64>,
    /// Stop rising steps once a step loses deliveries.
    pub stop_on_missing: bool,
    /// Kill -9 a connector once everyone is in (see [`kill_connector`]).
    pub kill_connector: bool,
}

struct Gen {
    child: Child,
    stdin: ChildStdin,
}

type Lines = mpsc::Receiver<(usize, Value)>;

fn spawn_generators(spec: &Spec) -> anyhow::Result<(Vec<Gen>, Lines)> {
    let exe = std::env::current_exe().context("cannot find this executable")?;
    let json = serde_json::to_string(spec)?;
    let (tx, rx) = mpsc::channel();
    let mut gens = Vec::new();
    for i in 0..spec.procs {
        let mut child = Command::new(&exe)
            .args(["gen", "--shard", &i.to_string(), "--spec", &json])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot start a generator process")?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            bail!("generator pipes missing");
        };
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    if tx.send((i as usize, v)).is_err() {
                        return;
                    }
                }
            }
        });
        gens.push(Gen { child, stdin });
    }
    Ok((gens, rx))
}

/// Waits for one `ev` line from every generator, within `bound`.
fn collect(rx: &Lines, n: usize, ev: &str, bound: Duration) -> anyhow::Result<Vec<Value>> {
    let deadline = Instant::now() + bound;
    let mut got: Vec<Option<Value>> = vec![None; n];
    while got.iter().any(Option::is_none) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((i, v)) if v["ev"] == ev => got[i] = Some(v),
            Ok(_) => {}
            Err(_) => bail!("generators did not all report `{ev}` within {bound:?}"),
        }
    }
    Ok(got.into_iter().flatten().collect())
}

fn tell(gens: &mut [Gen], line: &str) {
    for g in gens.iter_mut() {
        // A generator that died is noticed when its report does not come.
        let _ = writeln!(g.stdin, "{line}");
        let _ = g.stdin.flush();
    }
}

fn merged_counts(reports: &[Value]) -> Counts {
    let mut c = Counts::default();
    for r in reports {
        if let Ok(x) = serde_json::from_value::<Counts>(r["counts"].clone()) {
            c.merge(&x);
        }
    }
    c
}

fn merged_step(reports: &[Value], key: &str) -> StepCounts {
    let mut s = StepCounts::default();
    for r in reports {
        if let Ok(x) = serde_json::from_value::<StepCounts>(r[key].clone()) {
            s.merge(&x);
        }
    }
    s
}

struct Sampler {
    servers: Vec<cluster::Proc>,
    gens: Vec<u32>,
}

impl Sampler {
    fn servers(&self) -> Usage {
        cluster::total(self.servers.iter().map(|p| p.pid))
    }
    fn gens(&self) -> Usage {
        cluster::total(self.gens.iter().copied())
    }
    fn per_server(&self) -> Value {
        let v: Vec<Value> = self
            .servers
            .iter()
            .map(|p| json!({"id": p.id, "type": p.kind, "pid": p.pid, "usage": cluster::usage(p.pid)}))
            .collect();
        json!(v)
    }
}

/// Waits (at most 60 s) until every server of the cluster is running.
pub fn wait_running(admin: &Admin) -> anyhow::Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let view = cluster::servers(admin);
        if let Ok(v) = &view {
            if cluster::not_running(v).is_empty() && cluster::gate_addr(v).is_ok() {
                return Ok(v.clone());
            }
        }
        if Instant::now() > deadline {
            let why = match view {
                Ok(v) => format!("not running: {}", cluster::not_running(&v).join(", ")),
                Err(e) => e.to_string(),
            };
            bail!("the cluster is not ready after 60 s ({why})");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn run(mut spec: Spec, opts: &Options) -> anyhow::Result<Value> {
    let admin = &opts.admin;
    let view = wait_running(admin)?;
    spec.gate = cluster::gate_addr(&view)?;
    spec.check().map_err(anyhow::Error::msg)?;
    let mut sampler = Sampler { servers: cluster::procs(&view), gens: Vec::new() };
    std::thread::sleep(Duration::from_millis(500));
    let empty = sampler.servers();
    let empty_each = sampler.per_server();
    let own_start = cluster::usage(std::process::id()).unwrap_or_default();

    let (mut gens, rx) = spawn_generators(&spec)?;
    sampler.gens = gens.iter().map(|g| g.child.id()).collect();
    let t_connect = Instant::now();
    let per_proc = f64::from(spec.clients) / f64::from(spec.procs);
    let bound = Duration::from_secs_f64(
        per_proc / (spec.connect_rate / f64::from(spec.procs)) + 4.0 * spec.stage_timeout + 30.0,
    );
    let result = drive(&spec, opts, admin, &mut gens, &rx, &mut sampler, bound, t_connect);
    for g in &mut gens {
        let deadline = Instant::now() + Duration::from_secs(15);
        while matches!(g.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if matches!(g.child.try_wait(), Ok(None)) {
            eprintln!("pomelo-bench: generator {} did not exit; killing it", g.child.id());
            let _ = g.child.kill();
            let _ = g.child.wait();
        }
    }
    let (steps, ready, fin, connect_secs, connected, after, gen_total, view_end, kill) = result?;
    let own = cluster::usage(std::process::id()).unwrap_or_default();
    Ok(report::build(report::Inputs {
        scenario: &opts.scenario,
        spec: &spec,
        ready: &ready,
        fin: &fin,
        connect_secs,
        steps,
        server_empty: empty,
        server_connected: connected,
        server_after: after,
        server_each_empty: empty_each,
        server_each_end: sampler.per_server(),
        gen_cpu_secs: gen_total,
        orchestrator_cpu_secs: own.cpu_secs - own_start.cpu_secs,
        view_end: &view_end,
        kill,
    }))
}

type Driven = (Vec<StepResult>, Counts, Counts, f64, Usage, Usage, f64, Value, Option<Value>);

/// Asks every generator for its counts so far.
fn counts_now(gens: &mut [Gen], rx: &Lines) -> anyhow::Result<Counts> {
    tell(gens, "counts");
    Ok(merged_counts(&collect(rx, gens.len(), "counts", Duration::from_secs(10))?))
}

/// The connector holding the most clients is killed (SIGKILL, by the pid the master reports); then
/// this waits (at most 60 s) until the master has it running again and every client that was on it is
/// back in its room (the generators log them in again through the gate: `client::rejoin`). Returns
/// what it saw, with monotonic times (µs) so the generators' rejoin times compare: how long the restart
/// took, when the last client was back after the kill and after the restart, and whether anything else
/// was touched (the other servers' pids, clients lost on other connectors).
fn kill_connector(admin: &Admin, gens: &mut [Gen], rx: &Lines, ready: &Counts) -> anyhow::Result<Value> {
    let view = cluster::servers(admin)?;
    let connectors: Vec<&Value> = view["servers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["type"] == "connector" && s["state"] == "running")
        .collect();
    let held = |s: &Value| s["addrs"]["client"].as_str().and_then(|a| ready.made_by_connector.get(a)).copied();
    let victim = connectors.iter().max_by_key(|s| held(s).unwrap_or(0)).context("no running connector")?;
    let (id, addr) = (victim["id"].as_str().unwrap_or("?").to_string(), victim["addrs"]["client"].clone());
    let pid = victim["pid"].as_u64().context("the connector has no pid")? as i32;
    let clients = held(victim).unwrap_or(0);
    let others: Vec<cluster::Proc> = cluster::procs(&view).into_iter().filter(|p| p.id != id).collect();
    let before = counts_now(gens, rx)?;

    let kill_us = now_us();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL)
        .with_context(|| format!("cannot kill {id} (pid {pid})"))?;
    eprintln!("pomelo-bench: killed {id} (pid {pid}, {clients} clients)");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut restart_us = None;
    let counts = loop {
        if restart_us.is_none() {
            let v = cluster::servers(admin)?;
            let back = v["servers"].as_array().into_iter().flatten().any(|s| {
                s["id"] == id.as_str() && s["state"] == "running" && s["pid"].as_u64().is_some_and(|p| p as i32 != pid)
            });
            if back {
                restart_us = Some(now_us());
            }
        }
        let counts = counts_now(gens, rx)?;
        let lost = counts.lost - before.lost;
        let settled = counts.rejoined + counts.rejoin_failed - before.rejoined - before.rejoin_failed;
        let lost_here = addr.as_str().and_then(|a| counts.lost_by_connector.get(a)).copied().unwrap_or(0);
        if restart_us.is_some() && lost_here >= clients && settled >= lost {
            break counts;
        }
        if Instant::now() > deadline {
            eprintln!(
                "pomelo-bench: after 60 s: {lost} lost, {settled} back or given up; restarted: {}",
                restart_us.is_some()
            );
            break counts;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let view_after = cluster::servers(admin)?;
    let after: Vec<cluster::Proc> = cluster::procs(&view_after).into_iter().filter(|p| p.id != id).collect();
    let unchanged = others.iter().all(|p| after.iter().any(|a| a.id == p.id && a.pid == p.pid));
    let elsewhere = |c: &Counts| -> u64 {
        c.lost_by_connector.iter().filter(|(a, _)| Some(a.as_str()) != addr.as_str()).map(|(_, n)| n).sum()
    };
    let lost_elsewhere = elsewhere(&counts) - elsewhere(&before);
    let secs = |from: u64, to: u64| (to as f64 - from as f64) / 1e6;
    let last = counts.last_rejoin_us;
    let out = json!({
        "victim": id,
        "victim_addr": addr,
        "victim_clients": clients,
        "restart_secs": restart_us.map(|r| secs(kill_us, r)),
        "lost": counts.lost - before.lost,
        "lost_elsewhere": lost_elsewhere,
        "rejoined": counts.rejoined - before.rejoined,
        "rejoin_failed": counts.rejoin_failed - before.rejoin_failed,
        "rejoin_attempts": counts.rejoin_attempts - before.rejoin_attempts,
        "first_rejoin_error": counts.first_rejoin_error,
        "last_back_secs_after_kill": (last > kill_us).then(|| secs(kill_us, last)),
        // Negative: the last client was back (on another connector) before the restart.
        "last_back_secs_after_restart": restart_us.filter(|_| last > kill_us).map(|r| secs(r, last)),
        "rejoin_time_ms": crate::report::percentiles_ms(&counts.rejoin_us),
        "entered_by_connector": counts.made_by_connector,
        "others_same_pids": unchanged,
        "others": others,
        "heartbeat_timeouts": counts.heartbeat_timeouts,
    });
    eprintln!("pomelo-bench: kill: {out}");
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn drive(
    spec: &Spec,
    opts: &Options,
    admin: &Admin,
    gens: &mut [Gen],
    rx: &Lines,
    sampler: &mut Sampler,
    bound: Duration,
    t_connect: Instant,
) -> anyhow::Result<Driven> {
    let n = gens.len();
    let gen_start = sampler.gens();
    let ready_reports = collect(rx, n, "ready", bound)?;
    let connect_secs = t_connect.elapsed().as_secs_f64();
    let ready = merged_counts(&ready_reports);
    eprintln!(
        "pomelo-bench: {} of {} clients connected in {connect_secs:.1} s ({} failed)",
        ready.made,
        ready.attempted,
        ready.attempted - ready.made
    );
    std::thread::sleep(Duration::from_millis(500));
    let connected = sampler.servers();
    let kill = match opts.kill_connector {
        true => Some(kill_connector(admin, gens, rx, &ready)?),
        false => None,
    };
    if kill.is_some() {
        // The steps' server CPU counts the restarted connector, not the dead one.
        sampler.servers = cluster::procs(&cluster::servers(admin)?);
    }
    let mut steps = Vec::new();
    for (k, step) in spec.steps.iter().enumerate() {
        let start_us = now_us() + 300_000;
        tell(gens, &format!("step {k} {start_us}"));
        std::thread::sleep(Duration::from_micros(start_us.saturating_sub(now_us())));
        let (s0, g0, t0, m0) = (sampler.servers(), sampler.gens(), Instant::now(), cluster::machine_cpu());
        let wait = Duration::from_secs_f64(step.secs + spec.grace + 30.0);
        let reports = collect(rx, n, "step", wait)?;
        let (s1, g1, wall) = (sampler.servers(), sampler.gens(), t0.elapsed().as_secs_f64());
        let m1 = cluster::machine_cpu();
        let counts = merged_step(&reports, "step");
        let mut r = StepResult::new(
            k,
            step.clone(),
            counts,
            &ready,
            s1.cpu_secs - s0.cpu_secs,
            g1.cpu_secs - g0.cpu_secs,
            wall,
        );
        r.machine_busy = (m1.0 - m0.0) / (m1.1 - m0.1).max(1e-9);
        eprintln!("pomelo-bench: {}", r.summary());
        let stop = !step.warmup
            && (opts.stop_p99_ms.is_some_and(|m| r.p99_ms() > m) || (opts.stop_on_missing && r.missing() > 0));
        steps.push(r);
        if stop && k + 1 < spec.steps.len() {
            eprintln!("pomelo-bench: stopping the rising rate after step {k}");
            break;
        }
    }
    let after = sampler.servers();
    let gen_total = sampler.gens().cpu_secs - gen_start.cpu_secs;
    let view_end = cluster::servers(admin).unwrap_or(Value::Null);
    tell(gens, "finish");
    let fin_reports = collect(rx, n, "final", Duration::from_secs(30))?;
    let fin = merged_counts(&fin_reports);
    // Final counts include deliveries that arrived after their step was reported.
    let finals: Vec<StepCounts> = (0..steps.len())
        .map(|k| {
            let per: Vec<Value> = fin_reports.iter().map(|r| json!({"s": r["steps"][k]})).collect();
            merged_step(&per, "s")
        })
        .collect();
    let steps = steps.into_iter().zip(finals).map(|(r, f)| r.with_final(f, &ready)).collect();
    Ok((steps, ready, fin, connect_secs, connected, after, gen_total, view_end, kill))
}
