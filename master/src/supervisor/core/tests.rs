//! The core's rules without processes: registration and adoption in every order, reloads, stops and the
//! shutdown deadline. `Sim` plays the shell: it feeds events, answers spawns with pids and keeps time.

use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use pomelo_proto::config::{Topology, DEFAULT_ENV};
use pomelo_proto::control::{Membership, ToWorker};

use super::*;
use crate::command::{Command, CommandError};
use crate::view::Phase;

const TOKEN: &str = "cluster-token-for-tests";
const EPOCH: u64 = 1_700_000_000_000;
pub(super) const ALL: &str = "servers:\n  gate:\n    - {id: gate-1, clientPort: 0}\n  connector:\n    - {id: conn-1, port: 0, clientPort: 0}\n    - {id: conn-2, port: 0, clientPort: 0}\n  chat:\n    - {id: chat-1, port: 0}\n    - {id: chat-2, port: 0}\n";
const IDS: [&str; 5] = ["gate-1", "conn-1", "conn-2", "chat-1", "chat-2"];

fn yaml(servers: &str) -> String {
    format!("master:\n  stopGrace: 2s\n  heartbeatTimeout: 4s\n  startTimeout: 10s\n{servers}")
}

pub(super) struct Sim {
    pub core: Core,
    pub now: Instant,
    next_conn: u64,
    next_pid: u32,
    /// Effects seen so far, in order.
    pub log: Vec<Effect>,
}

impl Sim {
    /// A master for `servers`, adopting `adopt` (id → pid); spawns are answered with fresh pids.
    pub fn new(servers: &str, adopt: &[(&str, u32)]) -> Sim {
        Sim::build(servers, adopt, &[])
    }

    /// As [`new`](Self::new), with external servers an earlier master had running.
    pub fn build(servers: &str, adopt: &[(&str, u32)], rejoin: &[&str]) -> Sim {
        let text = yaml(servers);
        let topology = Topology::parse(Path::new("servers.yaml"), &text, DEFAULT_ENV).expect("valid");
        let setup = Setup {
            topology,
            cluster_token: TOKEN.into(),
            control_addr: "127.0.0.1:1".parse().expect("addr"),
            admin_addr: "127.0.0.1:2".parse().expect("addr"),
            master_pid: 10,
            epoch: EPOCH,
            cores: 4,
            run_dir: "/run".into(),
            log_dir: "/logs".into(),
            adopt: adopt.iter().map(|(id, pid)| (id.to_string(), *pid)).collect(),
            rejoin: rejoin.iter().map(|id| id.to_string()).collect(),
            text: Some(text),
        };
        let now = Instant::now();
        let (core, effects) = Core::new(setup, now, || 0.0);
        let mut sim = Sim { core, now, next_conn: 0, next_pid: 1000, log: vec![] };
        sim.absorb(effects);
        sim
    }

    /// Records effects and answers every spawn with a new pid, as the shell does.
    fn absorb(&mut self, effects: Vec<Effect>) -> Vec<Effect> {
        let mut all = vec![];
        let mut queue = std::collections::VecDeque::from(effects);
        while let Some(e) = queue.pop_front() {
            if let Effect::Spawn(spec) = &e {
                self.next_pid += 1;
                let ev = Event::Spawned { id: spec.worker.server.id.clone(), result: Ok(self.next_pid) };
                queue.extend(self.core.on_event(ev, self.now));
            }
            all.push(e);
        }
        self.log.extend(all.clone());
        all
    }

    pub fn ev(&mut self, event: Event) -> Vec<Effect> {
        let effects = self.core.on_event(event, self.now);
        self.absorb(effects)
    }

    pub fn advance(&mut self, d: Duration) -> Vec<Effect> {
        self.now += d;
        self.ev(Event::Tick)
    }

    /// Every linked worker heartbeats.
    pub fn beat(&mut self) {
        let links: Vec<(u64, String)> =
            self.core.slots.iter().filter_map(|s| Some((s.link?, s.server.spec.id.clone()))).collect();
        for (conn, id) in links {
            self.ev(Event::Heartbeat { conn, id, stats: Default::default() });
        }
    }

    pub fn pid(&self, id: &str) -> u32 {
        self.core.pid_of(id).expect("has a pid")
    }

    /// `id` registers with the pid the master holds for it and the current spec; returns the conn.
    pub fn register(&mut self, id: &str) -> (u64, Vec<Effect>) {
        let pid = self.pid(id);
        self.register_as(id, pid, None)
    }

    pub fn register_as(&mut self, id: &str, pid: u32, spec_hash: Option<String>) -> (u64, Vec<Effect>) {
        self.next_conn += 1;
        let conn = self.next_conn;
        let spec = self.core.topo.server(id).expect("in the file").clone();
        let reg = Registration {
            conn,
            id: id.into(),
            server_type: spec.server_type,
            pid,
            spec_hash: spec_hash.unwrap_or_else(|| spec.fingerprint()),
            addrs: Default::default(),
            // From the server's own host, as a real worker connects.
            peer: std::net::SocketAddr::new(spec.host.parse().unwrap_or([127, 0, 0, 1].into()), 9),
            peer_local: spec.is_local(),
            host_addrs: Vec::new(),
        };
        (conn, self.ev(Event::Registered { reg, holder_alive: false }))
    }

    pub fn phase(&self, id: &str) -> Phase {
        self.core.slots[self.core.index(id).expect("slot")].server.phase()
    }
}

pub(super) fn spawns(effects: &[Effect]) -> Vec<String> {
    effects
        .iter()
        .filter_map(|e| if let Effect::Spawn(s) = e { Some(s.worker.server.id.clone()) } else { None })
        .collect()
}

pub(super) fn memberships(effects: &[Effect]) -> Vec<(u64, Membership)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Send { conn, msg: ToWorker::Membership(m) } => Some((*conn, m.clone())),
            _ => None,
        })
        .collect()
}

pub(super) fn ids(m: &Membership) -> Vec<&str> {
    m.servers.iter().map(|s| s.id.as_str()).collect()
}

pub(super) fn signals(effects: &[Effect]) -> Vec<(u32, Signal)> {
    effects
        .iter()
        .filter_map(|e| if let Effect::Signal { pid, signal } = e { Some((*pid, *signal)) } else { None })
        .collect()
}

pub(super) fn reply(effects: &[Effect]) -> Result<String, CommandError> {
    effects.iter().find_map(|e| if let Effect::Reply(r) = e { Some(r.clone()) } else { None }).expect("a reply")
}

fn rejected(effects: &[Effect]) -> Option<String> {
    effects.iter().find_map(|e| match e {
        Effect::Send { msg: ToWorker::Rejected { reason }, .. } => Some(reason.clone()),
        _ => None,
    })
}

/// Every permutation of `items` (Heap's algorithm).
fn permutations<T: Clone>(items: &[T]) -> Vec<Vec<T>> {
    fn go<T: Clone>(k: usize, a: &mut Vec<T>, out: &mut Vec<Vec<T>>) {
        if k <= 1 {
            out.push(a.clone());
            return;
        }
        for i in 0..k {
            go(k - 1, a, out);
            let j = if k % 2 == 0 { i } else { 0 };
            a.swap(j, k - 1);
        }
    }
    let mut a = items.to_vec();
    let mut out = vec![];
    go(a.len(), &mut a, &mut out);
    out
}

fn adopt_all() -> Vec<(&'static str, u32)> {
    IDS.iter().enumerate().map(|(n, id)| (*id, 500 + n as u32)).collect()
}

#[test]
fn a_fresh_master_spawns_every_server_and_announces_each_registration() {
    let mut s = Sim::new(ALL, &[]);
    assert_eq!(spawns(&s.log), IDS);
    let (c1, e) = s.register("chat-1");
    assert!(matches!(&e[0], Effect::Send { conn, msg: ToWorker::Welcome { master_pid: 10, .. } } if *conn == c1));
    let m = memberships(&e);
    assert_eq!(m.len(), 2, "the current membership with the welcome, then the new one: {m:?}");
    assert_eq!(ids(&m[1].1), ["chat-1"]);
    let (_, e) = s.register("conn-1");
    let m = memberships(&e);
    assert_eq!(ids(&m.last().expect("sent").1), ["conn-1", "chat-1"], "file order");
    assert!(m.iter().all(|(_, m)| m.epoch == EPOCH));
    assert!(m.windows(2).all(|w| w[0].1.version <= w[1].1.version));
    assert_eq!(s.phase("conn-1"), Phase::Running);
}

#[test]
fn adoption_announces_nothing_until_every_adopted_worker_registered_in_every_order() {
    let orders = permutations(&IDS);
    assert_eq!(orders.len(), 120);
    for order in orders {
        let mut s = Sim::new(ALL, &adopt_all());
        assert!(spawns(&s.log).is_empty(), "adopted, not spawned");
        let mut conns = vec![];
        for (n, id) in order.iter().enumerate() {
            let (conn, e) = s.register(id);
            conns.push(conn);
            assert!(rejected(&e).is_none(), "{order:?}: {id} refused");
            let m = memberships(&e);
            if n + 1 < order.len() {
                assert!(m.is_empty(), "{order:?}: a membership after {id} while others are awaited: {m:?}");
            } else {
                assert_eq!(m.len(), IDS.len(), "{order:?}: one to every link");
                for (conn, m) in &m {
                    assert!(conns.contains(conn));
                    assert_eq!(ids(m), IDS, "{order:?}: the first membership has every server");
                    assert_eq!((m.epoch, m.version), (EPOCH, 1));
                }
            }
        }
        assert!(IDS.iter().all(|id| s.phase(id) == Phase::Running));
        assert!(spawns(&s.log).is_empty() && signals(&s.log).is_empty(), "{order:?}: nothing started or killed");
    }
}

#[test]
fn connectors_before_chats_and_chats_before_connectors_never_see_a_partial_membership() {
    for order in
        [["conn-1", "conn-2", "chat-1", "chat-2", "gate-1"], ["chat-1", "chat-2", "gate-1", "conn-1", "conn-2"]]
    {
        let mut s = Sim::new(ALL, &adopt_all());
        for id in order {
            s.register(id);
            s.advance(Duration::from_millis(100));
        }
        let all = memberships(&s.log);
        assert!(!all.is_empty());
        assert!(all.iter().all(|(_, m)| ids(m) == IDS), "{order:?}: {all:?}");
    }
}

#[test]
fn an_adopted_worker_missing_until_the_deadline_is_treated_as_crashed() {
    let mut s = Sim::new(ALL, &adopt_all());
    for id in ["gate-1", "conn-1", "conn-2", "chat-1"] {
        s.register(id);
    }
    // heartbeatTimeout 4s is the adoption deadline.
    for _ in 0..39 {
        s.beat();
        let e = s.advance(Duration::from_millis(100));
        assert!(memberships(&e).is_empty() && signals(&e).is_empty(), "still waiting: {e:?}");
    }
    s.beat();
    let e = s.advance(Duration::from_millis(100));
    assert_eq!(signals(&e), [(504, Signal::SIGKILL)], "the missing one is killed like a hung start");
    let m = memberships(&e);
    assert_eq!(m.len(), 4);
    assert!(m.iter().all(|(_, m)| ids(m) == ["gate-1", "conn-1", "conn-2", "chat-1"]));
    // The shell finds it gone; it restarts with backoff.
    let e = s.ev(Event::Exited { id: "chat-2".into(), pid: 504, status: ExitStatus::Unknown });
    assert!(spawns(&e).is_empty());
    assert_eq!(s.phase("chat-2"), Phase::Backoff);
    let e = s.advance(Duration::from_millis(100));
    assert_eq!(spawns(&e), ["chat-2"]);
    let (_, e) = s.register("chat-2");
    assert_eq!(ids(&memberships(&e).last().expect("announced").1), IDS);
}

#[test]
fn an_adopted_worker_found_gone_does_not_hold_the_membership() {
    let mut s = Sim::new(ALL, &adopt_all());
    for id in ["gate-1", "conn-1", "conn-2", "chat-1"] {
        assert!(memberships(&s.register(id).1).is_empty());
    }
    let e = s.ev(Event::Exited { id: "chat-2".into(), pid: 504, status: ExitStatus::Unknown });
    let m = memberships(&e);
    assert_eq!(m.len(), 4, "announced at once, without waiting for the deadline");
    assert!(m.iter().all(|(_, m)| ids(m) == ["gate-1", "conn-1", "conn-2", "chat-1"]));
}

#[test]
fn a_spawned_server_registering_during_adoption_waits_for_the_membership_too() {
    let mut s = Sim::new(ALL, &[("conn-1", 501), ("chat-1", 503)]);
    assert_eq!(spawns(&s.log), ["gate-1", "conn-2", "chat-2"]);
    for id in ["gate-1", "conn-2", "chat-2", "conn-1"] {
        let (_, e) = s.register(id);
        assert!(memberships(&e).is_empty(), "{id}");
    }
    let (_, e) = s.register("chat-1");
    assert!(memberships(&e).iter().all(|(_, m)| ids(m) == IDS));
}

#[test]
fn an_adopted_worker_with_an_older_spec_is_restarted_after_it_registered() {
    let mut s = Sim::new(ALL, &adopt_all());
    for id in ["gate-1", "conn-1", "conn-2", "chat-1"] {
        s.register(id);
    }
    let (_, e) = s.register_as("chat-2", 504, Some("old".into()));
    assert_eq!(signals(&e), [(504, Signal::SIGTERM), (504, Signal::SIGCONT)]);
    assert_eq!(s.phase("chat-2"), Phase::Stopping);
    let e = s.ev(Event::Exited { id: "chat-2".into(), pid: 504, status: ExitStatus::Unknown });
    assert_eq!(spawns(&e), ["chat-2"]);
}

#[test]
fn registrations_are_refused_by_every_rule() {
    let mut s = Sim::new(ALL, &[]);
    let reg = |s: &mut Sim, id: &str, f: &dyn Fn(&mut Registration), alive: bool| {
        let spec = s.core.topo.server(id).cloned();
        let mut r = Registration {
            conn: 99,
            id: id.into(),
            server_type: spec.as_ref().map_or(pomelo_proto::control::ServerType::Chat, |s| s.server_type),
            pid: s.core.pid_of(id).unwrap_or(7),
            spec_hash: spec.map(|s| s.fingerprint()).unwrap_or_default(),
            addrs: Default::default(),
            peer: "127.0.0.1:9".parse().expect("addr"),
            peer_local: true,
            host_addrs: Vec::new(),
        };
        f(&mut r);
        let e = s.ev(Event::Registered { reg: r, holder_alive: alive });
        assert!(e.contains(&Effect::Close { conn: 99 }) || rejected(&e).is_none());
        rejected(&e)
    };
    let r = |s: &mut Sim, id, f: &dyn Fn(&mut Registration), alive| reg(s, id, f, alive).unwrap_or_default();
    assert!(r(&mut s, "chat-9", &|_| {}, false).contains("`chat-9` is not in servers.yaml"));
    let wrong = |r: &mut Registration| r.server_type = pomelo_proto::control::ServerType::Gate;
    assert_eq!(r(&mut s, "chat-1", &wrong, false), "`chat-1` is a chat server in servers.yaml");
    let pid = s.pid("chat-1");
    let other = |r: &mut Registration| r.pid = 4242;
    assert_eq!(r(&mut s, "chat-1", &other, true), format!("pid {pid} already serves `chat-1`"));
    // The pid it holds is dead: a newcomer with another pid is still not a process this master started
    // (security review H4: a registration never names a pid for the master to signal later).
    let refused = r(&mut s, "chat-1", &other, false);
    assert_eq!(refused, format!("pid 4242 is not the process this master started for `chat-1` (pid {pid})"));
    assert_eq!(s.pid("chat-1"), pid);
    s.ev(Event::Command(Command::Stop("chat-2".into())));
    let pid2 = s.pid("chat-2");
    s.ev(Event::Exited { id: "chat-2".into(), pid: pid2, status: ExitStatus::Code { code: 0 } });
    assert_eq!(r(&mut s, "chat-2", &|_| {}, false), "`chat-2` is stopped here");
    s.ev(Event::Shutdown);
    assert_eq!(r(&mut s, "conn-1", &|_| {}, false), "the master is shutting down");
}

#[test]
fn a_late_exit_of_an_old_pid_does_not_touch_its_replacement() {
    let mut s = Sim::new(ALL, &[]);
    for id in IDS {
        s.register(id);
    }
    let old = s.pid("chat-1");
    let e = s.ev(Event::Command(Command::Restart("chat-1".into())));
    assert_eq!(reply(&e), Ok("chat-1 is restarting".into()));
    assert_eq!(signals(&e)[0], (old, Signal::SIGTERM));
    let e = s.ev(Event::Exited { id: "chat-1".into(), pid: old, status: ExitStatus::Code { code: 0 } });
    assert_eq!(spawns(&e), ["chat-1"]);
    let new = s.pid("chat-1");
    assert_ne!(new, old);
    s.register("chat-1");
    // The old process's exit, reported again (or an adopted pid polled late), changes nothing.
    let e = s.ev(Event::Exited { id: "chat-1".into(), pid: old, status: ExitStatus::Unknown });
    assert!(e.is_empty(), "{e:?}");
    assert_eq!((s.pid("chat-1"), s.phase("chat-1")), (new, Phase::Running));
    // Nor does the old link's close, arriving late: chat-1 stays in the membership.
    let e = s.ev(Event::Closed { conn: 4, id: "chat-1".into() });
    assert!(e.is_empty(), "{e:?}");
    assert!(ids(s.core.membership()).contains(&"chat-1"));
}

#[path = "tests_more.rs"]
mod more;

#[test]
fn an_external_server_made_local_is_asked_to_stop_never_signalled_then_spawned_here() {
    let ext = "servers:\n  chat:\n    - {id: chat-1, port: 0, supervise: external}\n";
    let mut sim = Sim::new(ext, &[]);
    assert!(spawns(&sim.log).is_empty(), "an external server is never spawned");
    // Its platform's process registers, claiming pid 4242 (any number: the master did not start it).
    let (conn, _) = sim.register_as("chat-1", 4242, None);
    assert_eq!(sim.phase("chat-1"), Phase::Running);
    let local = "servers:\n  chat:\n    - {id: chat-1, port: 0}\n";
    let out = sim.ev(Event::Reload { forced: true, text: Ok(yaml(local)) });
    assert!(signals(&out).is_empty(), "signalled a pid it did not start: {:?}", signals(&out));
    assert!(
        out.iter().any(|e| matches!(e, Effect::Send { conn: c, msg: ToWorker::Stop { .. } } if *c == conn)),
        "{out:?}"
    );
    assert!(spawns(&out).is_empty(), "spawned before the external process left");
    // The worker leaves (its link closes): now the master starts it as its own child.
    let out = sim.ev(Event::Closed { conn, id: "chat-1".into() });
    let out = [out, sim.advance(Duration::from_secs(1))].concat();
    assert_eq!(spawns(&out), ["chat-1"], "{out:?}");
    assert!(signals(&sim.log).iter().all(|(pid, _)| *pid != 4242));
    // And the grace running out signals nothing either.
    let out = sim.advance(Duration::from_secs(5));
    assert!(signals(&out).iter().all(|(pid, _)| *pid != 4242), "{out:?}");
}

#[test]
fn a_new_master_waits_for_the_external_servers_that_were_running_before_it_announces() {
    let servers = "servers:\n  connector:\n    - {id: connector-1, port: 0, clientPort: 0}\n  chat:\n    - {id: chat-1, port: 0, supervise: external}\n";
    let mut sim = Sim::build(servers, &[], &["chat-1"]);
    let (_, out) = sim.register("connector-1");
    assert!(memberships(&out).is_empty(), "announced before chat-1 re-registered: {out:?}");
    let (_, out) = sim.register_as("chat-1", 4242, None);
    let m = memberships(&out);
    assert!(!m.is_empty() && m.iter().all(|(_, m)| ids(m) == ["connector-1", "chat-1"]), "{m:?}");
    // Never coming back: the membership goes out without it at the deadline.
    let mut sim = Sim::build(servers, &[], &["chat-1"]);
    sim.register("connector-1");
    let out = sim.advance(Duration::from_secs(5));
    assert!(memberships(&out).iter().any(|(_, m)| ids(m) == ["connector-1"]), "{out:?}");
}
