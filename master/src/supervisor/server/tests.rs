use std::path::Path;
use std::time::{Duration, Instant};

use pomelo_proto::config::{Topology, DEFAULT_ENV};

use super::*;

fn setup() -> (Server, MasterConfig) {
    let t =
        Topology::parse(Path::new("s.yaml"), "servers:\n  chat: [{id: c1, port: 0}]\n", DEFAULT_ENV).expect("valid");
    (Server::new(t.servers[0].clone()), t.master)
}

const S: Duration = Duration::from_secs(1);

#[test]
fn starts_registers_and_runs() {
    let (mut s, cfg) = setup();
    let t0 = Instant::now();
    assert_eq!(s.start(t0, &cfg), vec![Action::Spawn]);
    s.on_spawned(42, t0);
    assert_eq!(s.phase(), Phase::Starting);
    s.on_registered(t0 + S);
    assert_eq!(s.phase(), Phase::Running);
    assert!(s.on_tick(t0 + 2 * S, &cfg).is_empty());
}

#[test]
fn a_crash_backs_off_then_respawns() {
    let (mut s, cfg) = setup();
    let t0 = Instant::now();
    s.start(t0, &cfg);
    s.on_spawned(42, t0);
    s.on_registered(t0);
    let a = s.on_exit(ExitStatus::Signal { signal: 9, name: "SIGKILL".into() }, t0 + S, &cfg, 0.0);
    assert_eq!(s.phase(), Phase::Backoff);
    assert!(matches!(&a[0], Action::Log(m) if m.contains("killed by SIGKILL") && m.contains("100 ms")));
    assert!(s.on_tick(t0 + S + Duration::from_millis(50), &cfg).is_empty());
    assert_eq!(s.on_tick(t0 + S + Duration::from_millis(100), &cfg), vec![Action::Spawn]);
    assert_eq!(s.phase(), Phase::Starting);
    assert_eq!(s.restarts.total, 1);
}

#[test]
fn crash_loop_ends_failed_and_a_person_can_start_it_again() {
    let (mut s, cfg) = setup();
    let mut now = Instant::now();
    s.start(now, &cfg);
    for _ in 0..5 {
        s.on_spawned(1, now);
        s.on_exit(ExitStatus::Code { code: 1 }, now, &cfg, 0.0);
        assert_eq!(s.phase(), Phase::Backoff);
        now += Duration::from_secs(2);
        assert_eq!(s.on_tick(now, &cfg), vec![Action::Spawn]);
    }
    s.on_spawned(1, now);
    s.on_exit(ExitStatus::Code { code: 1 }, now, &cfg, 0.0);
    assert_eq!(s.phase(), Phase::Failed);
    assert!(s.on_tick(now + Duration::from_secs(100), &cfg).is_empty(), "failed stays failed");
    assert_eq!(s.start(now, &cfg), vec![Action::Spawn]);
}

#[test]
fn missed_heartbeats_kill_a_hung_worker() {
    let (mut s, cfg) = setup();
    let t0 = Instant::now();
    s.start(t0, &cfg);
    s.on_spawned(7, t0);
    s.on_registered(t0);
    s.on_heartbeat(t0 + S);
    assert!(s.on_tick(t0 + 5 * S, &cfg).is_empty());
    let a = s.on_tick(t0 + 6 * S, &cfg);
    assert_eq!(a.last(), Some(&Action::Kill));
    assert!(s.on_tick(t0 + 7 * S, &cfg).is_empty(), "killed once, not on every tick");
    let a = s.on_exit(ExitStatus::Signal { signal: 9, name: "SIGKILL".into() }, t0 + 7 * S, &cfg, 0.0);
    assert!(matches!(&a[0], Action::Log(m) if m.contains("after missed heartbeats")));
    assert_eq!(s.phase(), Phase::Backoff);
}

#[test]
fn stop_terminates_then_kills_after_grace() {
    let (mut s, cfg) = setup();
    let t0 = Instant::now();
    s.start(t0, &cfg);
    s.on_spawned(7, t0);
    s.on_registered(t0);
    assert_eq!(s.stop(t0, &cfg, AfterStop::Stay), vec![Action::Terminate]);
    assert_eq!(s.phase(), Phase::Stopping);
    assert!(s.on_tick(t0 + 9 * S, &cfg).is_empty());
    assert_eq!(s.on_tick(t0 + 10 * S, &cfg).last(), Some(&Action::Kill));
    s.on_exit(ExitStatus::Signal { signal: 9, name: "SIGKILL".into() }, t0 + 10 * S, &cfg, 0.0);
    assert_eq!(s.phase(), Phase::Stopped);
    assert_eq!(s.restarts.total, 0, "a stop is not a restart");
}

#[test]
fn restart_by_hand_respawns_after_exit_and_counts() {
    let (mut s, cfg) = setup();
    let t0 = Instant::now();
    s.start(t0, &cfg);
    s.on_spawned(7, t0);
    s.on_registered(t0);
    assert_eq!(s.restart(t0, &cfg), vec![Action::Terminate]);
    let a = s.on_exit(ExitStatus::Code { code: 0 }, t0 + S, &cfg, 0.0);
    assert!(a.contains(&Action::Spawn));
    assert_eq!(s.restarts.total, 1);
    assert_eq!(s.phase(), Phase::Starting);
}

#[test]
fn a_worker_that_never_registers_is_killed() {
    let (mut s, cfg) = setup();
    let t0 = Instant::now();
    s.start(t0, &cfg);
    s.on_spawned(7, t0);
    assert_eq!(s.on_tick(t0 + cfg.start_timeout, &cfg).last(), Some(&Action::Kill));
}
