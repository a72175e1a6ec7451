//! `pomelo-bench summary REPORT.json...`: the figures of each report against the bar of issue 7, one
//! block per scenario, as text. Reads the reports `run` wrote; recognizes the scenario by its name.
//!
//! - rooms-100: every delivery arrives, p99 ≤ 25 ms.
//! - many-rooms: no connection lost, no delivery missing, p99 ≤ 25 ms.
//! - big-room: server CPU per delivery ≤ 0.45 µs at the highest sustained step (no delivery missing,
//!   p99 ≤ 100 ms).
//! - idle: every connection made and kept, heartbeats answered, server RSS ≤ 5 KiB per connection above
//!   the empty cluster.
//! - overflow: the connector refuses what passes `maxConnections`, the others keep working.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::Context;
use serde_json::Value;

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

/// `figure (≤ bar: ok / N× over)`.
fn against(figure: f64, bar: f64, unit: &str) -> String {
    if figure <= bar {
        format!("{figure:.3} {unit} (bar {bar} {unit}: met, {:.2}× the bar)", figure / bar)
    } else {
        format!("{figure:.3} {unit} (bar {bar} {unit}: MISSED by {:.2}×)", figure / bar)
    }
}

fn yes(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}

/// The last measured step (the only one, for a fixed-rate scenario).
fn last_step(r: &Value) -> Value {
    r["steps"].as_array().and_then(|s| s.iter().rev().find(|s| s["warmup"] != true).cloned()).unwrap_or(Value::Null)
}

fn step_line(s: &Value) -> String {
    let l = &s["latency_ms"];
    format!(
        "{} msg/s per client: {} of {} deliveries ({} missing, {} dup), {:.0}/s, p50 {} p99 {} max {} ms (from the write: p50 {} p99 {} max {}), server {:.3} µs/delivery, generator {:.3} µs/delivery, machine {:.0}% busy, send lag max {} ms",
        s["rate_per_client"],
        s["deliveries_received"],
        s["deliveries_expected"],
        s["missing"],
        s["duplicates"],
        f(&s["deliveries_per_sec"]),
        l["p50"],
        l["p99"],
        l["max"],
        s["latency_from_write_ms"]["p50"],
        s["latency_from_write_ms"]["p99"],
        s["latency_from_write_ms"]["max"],
        f(&s["server_cpu_us_per_delivery"]),
        f(&s["generator_cpu_us_per_delivery"]),
        f(&s["machine_cpu_busy"]) * 100.0,
        s["max_send_lag_ms"],
    )
}

fn connections_line(r: &Value) -> String {
    let c = &r["connections"];
    format!(
        "connections: {} of {} made in {:.1} s ({} failed, {} lost), heartbeats {} sent / {} received / {} timed out",
        c["made"],
        c["attempted"],
        f(&c["connect_secs"]),
        c["failed"],
        c["lost"],
        r["heartbeats"]["sent"],
        r["heartbeats"]["received"],
        r["heartbeats"]["timeouts"]
    )
}

/// How long the logins took, against the 3 s bar.
fn login_line(r: &Value) -> String {
    let c = &r["connections"];
    let secs = f(&c["connect_secs"]);
    format!(
        "  {} of {} logged in (gate, connector, enter) in {secs:.2} s: {:.0} logins/s, p99 {} ms; bar: all in {}\n",
        c["made"],
        c["attempted"],
        f(&c["connects_per_sec"]),
        c["connect_time_ms"]["p99"],
        against(secs, 3.0, "s")
    )
}

/// `(id, pid)` of every cluster process in a sample.
fn pids(v: &Value) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = v
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| (p["id"].as_str().unwrap_or("?").to_string(), p["pid"].as_u64().unwrap_or(0)))
        .collect();
    out.sort();
    out
}

/// Whether the run measured what it claims: every client connected and entered, every planned message
/// was written, and no server process died or was replaced (its CPU and RSS would be missing).
fn validity(r: &Value) -> String {
    let clients = r["params"]["clients"].as_u64().unwrap_or(0);
    let made = r["connections"]["made"].as_u64().unwrap_or(0);
    let failed = r["connections"]["failed"].as_u64().unwrap_or(u64::MAX);
    let send_errors: u64 =
        r["steps"].as_array().into_iter().flatten().map(|s| s["send_errors"].as_u64().unwrap_or(u64::MAX)).sum();
    // A connector killed on purpose (`--kill-connector`) is left out: every other pid must stay.
    let victim = r["kill"]["victim"].as_str();
    let others = |v: &Value| pids(v).into_iter().filter(|(id, _)| Some(id.as_str()) != victim).collect::<Vec<_>>();
    let before = others(&r["server"]["processes_empty"]);
    let stable = !before.is_empty() && before == others(&r["server"]["processes_end"]);
    format!(
        "  run: {made} of {clients} clients connected ({}), {send_errors} send errors ({}), same server pids start to end ({})\n",
        yes(made == clients && failed == 0),
        yes(send_errors == 0),
        yes(stable)
    )
}

/// The scenario's server CPU per delivery against the floor measured in the same run (`floor` report).
fn floor_line(s: &Value, floor: &Value) -> String {
    let (server, writer) = (f(&s["server_cpu_us_per_delivery"]), f(&floor["writer_cpu_us_per_delivery"]));
    let p = &floor["params"];
    format!(
        "  floor: one write() per delivery costs {writer:.3} µs (reader {:.3} µs) at {} connections and {:.0}/s: server CPU per delivery is {:.2}× the floor\n",
        f(&floor["reader_cpu_us_per_delivery"]),
        p["connections"],
        f(&floor["deliveries_per_sec"]),
        server / writer
    )
}

/// The text block for one report (with the floor measured beside it, if any).
pub fn block_with(r: &Value, floor: Option<&Value>) -> String {
    let mut out = block(r);
    if let Some(fl) = floor {
        out.push_str(&floor_line(&last_step(r), fl));
    }
    out
}

/// The text block for one report.
pub fn block(r: &Value) -> String {
    let name = r["scenario"].as_str().unwrap_or("?");
    let mut out = format!("== {name}\n  {}\n", connections_line(r));
    if name != "overflow" {
        out.push_str(&validity(r));
    }
    let s = last_step(r);
    let lost = r["connections"]["lost"].as_u64().unwrap_or(u64::MAX);
    let p99 = f(&s["latency_ms"]["p99"]);
    match name {
        "rooms-100" | "many-rooms" => {
            let _ = writeln!(out, "  {}", step_line(&s));
            let missing = s["missing"].as_u64().unwrap_or(u64::MAX);
            let _ = writeln!(
                out,
                "  bar: deliveries missing {missing} ({}), p99 {}",
                yes(missing == 0),
                against(p99, 25.0, "ms")
            );
            if name == "many-rooms" {
                let _ = writeln!(out, "  bar: connections lost {lost} ({})", yes(lost == 0));
            }
        }
        "big-room" => {
            let steps: Vec<&Value> =
                r["steps"].as_array().into_iter().flatten().filter(|s| s["warmup"] != true).collect();
            for s in &steps {
                let _ = writeln!(out, "  {}", step_line(s));
            }
            let best = steps
                .iter()
                .rev()
                .find(|s| s["missing"] == 0 && s["send_errors"] == 0 && f(&s["latency_ms"]["p99"]) <= 100.0);
            match best {
                Some(b) => {
                    let us = f(&b["server_cpu_us_per_delivery"]);
                    let _ = writeln!(
                        out,
                        "  highest sustained: {} msg/s per client, {:.0} deliveries/s; bar: server CPU {}",
                        b["rate_per_client"],
                        f(&b["deliveries_per_sec"]),
                        against(us, 0.45, "µs/delivery")
                    );
                }
                None => out.push_str("  no step was sustained (p99 ≤ 100 ms, nothing missing): bar MISSED\n"),
            }
        }
        "idle" => {
            let srv = &r["server"];
            let per = f(&srv["rss_per_connection_bytes"]) / 1024.0;
            let made = r["connections"]["made"].as_u64().unwrap_or(0);
            let hb = &r["heartbeats"];
            let timeouts = hb["timeouts"].as_u64().unwrap_or(u64::MAX);
            let (hb_sent, hb_received) = (hb["sent"].as_u64().unwrap_or(0), hb["received"].as_u64().unwrap_or(0));
            let answered = timeouts == 0 && hb_sent > 0 && hb_received >= hb_sent;
            let _ = writeln!(
                out,
                "  held {:.0} s; server RSS {:.1} MiB empty, {:.1} MiB with the clients",
                f(&s["secs"]),
                f(&srv["rss_empty_bytes"]) / 1048576.0,
                f(&srv["rss_after_steps_bytes"]) / 1048576.0
            );
            let _ = writeln!(
                out,
                "  bar: {made} connections held ({}), none lost ({}), heartbeats answered ({}), RSS {}",
                yes(made >= 100_000),
                yes(lost == 0),
                yes(answered),
                against(per, 5.0, "KiB/connection")
            );
        }
        "login-storm-kill" => {
            out.push_str(&login_line(r));
            let k = &r["kill"];
            let after_restart = f(&k["last_back_secs_after_restart"]);
            let (lost, back) = (k["lost"].as_u64().unwrap_or(u64::MAX), k["rejoined"].as_u64().unwrap_or(0));
            let untouched = k["others_same_pids"] == true && k["lost_elsewhere"] == 0 && k["heartbeat_timeouts"] == 0;
            let missing = s["missing"].as_u64().unwrap_or(u64::MAX);
            let _ = writeln!(
                out,
                "  kill -9 of {} ({} clients): restarted after {:.2} s; {back} of {lost} back in their rooms {:.2} s after the kill (p50 {} p99 {} ms, {} login tries)",
                k["victim"],
                k["victim_clients"],
                f(&k["restart_secs"]),
                f(&k["last_back_secs_after_kill"]),
                k["rejoin_time_ms"]["p50"],
                k["rejoin_time_ms"]["p99"],
                k["rejoin_attempts"]
            );
            let _ = writeln!(out, "  {}", step_line(&s));
            let _ = writeln!(
                out,
                "  bar: all back ({}) within 3 s of the restart: {}; gate and the other servers untouched ({}); chat after it: {missing} missing ({})",
                yes(lost > 0 && back == lost),
                against(after_restart.max(0.0), 3.0, "s"),
                yes(untouched),
                yes(missing == 0)
            );
        }
        "login-storm" => out.push_str(&login_line(r)),
        "overflow" => {
            let refused: f64 = r["server"]["servers"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|s| s["stats"]["refused_total"].as_f64().unwrap_or(0.0))
                .sum();
            let c = &r["connections"];
            let _ = writeln!(
                out,
                "  {} made, {} failed, {} refused by the connector (refused_total), {} lost",
                c["made"], c["failed"], refused, c["lost"]
            );
        }
        _ => {
            let _ = writeln!(out, "  {}", step_line(&s));
        }
    }
    out
}

/// Prints each report's block; a scenario's floor is `<scenario>-floor.json` beside its report.
pub fn run(files: &[PathBuf]) -> anyhow::Result<()> {
    let load = |path: &std::path::Path| -> anyhow::Result<Value> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} is not a report", path.display()))
    };
    for path in files {
        let r = load(path)?;
        let name = r["scenario"].as_str().unwrap_or("?");
        let floor = path.parent().map(|d| d.join(format!("{name}-floor.json"))).filter(|p| p.exists());
        let floor = floor.map(|p| load(&p)).transpose()?;
        print!("{}", block_with(&r, floor.as_ref()));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;

    fn report(name: &str, end_pid: u64, hb: (u64, u64)) -> Value {
        json!({
            "scenario": name,
            "params": {"clients": 2},
            "connections": {"made": 2, "attempted": 2, "failed": 0, "lost": 0, "connect_secs": 0.1},
            "heartbeats": {"sent": hb.0, "received": hb.1, "timeouts": 0},
            "server": {
                "processes_empty": [{"id": "c", "pid": 10}],
                "processes_end": [{"id": "c", "pid": end_pid}],
                "rss_per_connection_bytes": 1024.0, "rss_empty_bytes": 1.0, "rss_after_steps_bytes": 2.0,
            },
            "steps": [{"warmup": false, "secs": 1.0, "send_errors": 0, "missing": 0,
                       "latency_ms": {"p99": 1.0}, "max_send_lag_ms": 0.5}],
        })
    }

    #[test]
    fn the_floor_gives_the_ratio() {
        let mut r = report("rooms-100", 10, (1, 1));
        r["steps"][0]["server_cpu_us_per_delivery"] = json!(6.0);
        let floor = json!({"params": {"connections": 2000}, "deliveries_per_sec": 200000.0,
                           "writer_cpu_us_per_delivery": 4.8, "reader_cpu_us_per_delivery": 4.2});
        let b = block_with(&r, Some(&floor));
        assert!(b.contains("costs 4.800 µs") && b.contains("is 1.25× the floor"), "{b}");
        assert!(!block_with(&r, None).contains("floor"));
    }

    #[test]
    fn a_connector_killed_on_purpose_is_judged_by_its_clients_coming_back() {
        let kill = |back: u64, after_restart: f64, elsewhere: u64| {
            let mut r = report("login-storm-kill", 11, (1, 1));
            r["server"]["processes_empty"] = json!([{"id": "c", "pid": 10}, {"id": "gate", "pid": 5}]);
            r["server"]["processes_end"] = json!([{"id": "c", "pid": 11}, {"id": "gate", "pid": 5}]);
            r["kill"] = json!({"victim": "c", "victim_clients": 3, "lost": 3, "rejoined": back, "restart_secs": 0.3,
                               "last_back_secs_after_kill": after_restart + 0.3, "last_back_secs_after_restart": after_restart,
                               "lost_elsewhere": elsewhere, "others_same_pids": true, "heartbeat_timeouts": 0});
            block(&r)
        };
        let ok = kill(3, 2.0, 0);
        assert!(ok.contains("same server pids start to end (met)"), "the victim's new pid is expected: {ok}");
        assert!(ok.contains("all back (met) within 3 s of the restart: 2.000 s (bar 3 s: met"), "{ok}");
        assert!(ok.contains("untouched (met)") && ok.contains("0 missing (met)"), "{ok}");
        assert!(kill(2, 2.0, 0).contains("all back (MISSED)"));
        assert!(kill(3, 3.5, 0).contains("MISSED by 1.17×"));
        assert!(kill(3, 2.0, 1).contains("untouched (MISSED)"));
    }

    #[test]
    fn a_replaced_server_or_missing_heartbeats_fail_the_run() {
        let ok = block(&report("idle", 10, (5, 6)));
        assert!(ok.contains("same server pids start to end (met)"), "{ok}");
        assert!(ok.contains("heartbeats answered (met)"), "{ok}");
        let restarted = block(&report("idle", 11, (5, 6)));
        assert!(restarted.contains("same server pids start to end (MISSED)"), "{restarted}");
        let silent = block(&report("idle", 10, (0, 0)));
        assert!(silent.contains("heartbeats answered (MISSED)"), "{silent}");
    }
}
