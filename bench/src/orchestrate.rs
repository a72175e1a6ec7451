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
    let result = drive(&spec, opts, admin, &mut gens, &rx, &sampler, bound, t_connect);
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
    let (steps, ready, fin, connect_secs, connected, after, gen_total, view_end) = result?;
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
    }))
}

type Driven = (Vec<StepResult>, Counts, Counts, f64, Usage, Usage, f64, Value);

#[allow(clippy::too_many_arguments)]
fn drive(
    spec: &Spec,
    opts: &Options,
    admin: &Admin,
    gens: &mut [Gen],
    rx: &Lines,
    sampler: &Sampler,
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
    Ok((steps, ready, fin, connect_secs, connected, after, gen_total, view_end))
}
