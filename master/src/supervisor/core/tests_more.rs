//! The core's reload, stop and shutdown rules.

use std::time::Duration;

use nix::sys::signal::Signal;

use super::super::*;
use super::{ids, memberships, reply, signals, spawns, Sim, ALL};
use crate::command::{Command, CommandError, UNCHANGED};
use crate::view::Phase;

fn with_master(servers: &str) -> String {
    format!("master:\n  stopGrace: 2s\n  heartbeatTimeout: 4s\n  startTimeout: 10s\n{servers}")
}

fn up() -> Sim {
    let mut s = Sim::new(ALL, &[]);
    for id in ["gate-1", "conn-1", "conn-2", "chat-1", "chat-2"] {
        s.register(id);
    }
    s
}

fn reload(s: &mut Sim, forced: bool, servers: &str) -> Vec<Effect> {
    s.ev(Event::Reload { forced, text: Ok(with_master(servers)) })
}

#[test]
fn a_file_event_reloads_only_when_the_content_changed() {
    let mut s = up();
    let e = reload(&mut s, false, ALL);
    assert_eq!(reply(&e), Ok(UNCHANGED.into()), "same content: nothing to do");
    assert_eq!(s.core.reloads, 0);
    let more = format!("{ALL}    - {{id: chat-3, port: 0}}\n");
    let e = reload(&mut s, false, &more);
    assert_eq!(reply(&e), Ok("added: chat-3; removed: none; restarted: none; unchanged: 5".into()));
    assert_eq!(spawns(&e), ["chat-3"]);
    assert_eq!(s.core.reloads, 1);
    // A second event for the same save is nothing.
    assert_eq!(reply(&reload(&mut s, false, &more)), Ok(UNCHANGED.into()));
    // SIGHUP, `pomelo-rs reload` and POST /api/reload force one.
    let e = reload(&mut s, true, &more);
    assert_eq!(reply(&e), Ok("added: none; removed: none; restarted: none; unchanged: 6".into()));
    assert_eq!(s.core.reloads, 2);
}

#[test]
fn an_invalid_file_changes_nothing_and_the_old_content_clears_the_error() {
    let mut s = up();
    let before = s.core.pids();
    let e = reload(&mut s, false, "servers:\n  chat:\n    - {id: chat-1, port: 0, colour: red}\n");
    assert!(matches!(reply(&e), Err(CommandError::InvalidConfig(m)) if m.contains("unknown key `colour`")));
    assert!(s.core.view(s.now, 1).master.config_error.is_some());
    assert_eq!(s.core.pids(), before);
    assert!(spawns(&e).is_empty() && signals(&e).is_empty());
    // The file goes back to what runs: that is a change from the last content read.
    let e = reload(&mut s, false, ALL);
    assert_eq!(reply(&e), Ok("added: none; removed: none; restarted: none; unchanged: 5".into()));
    assert!(s.core.view(s.now, 2).master.config_error.is_none());
    // An unreadable file is an error too, and its error is shown.
    let e = s.ev(Event::Reload { forced: true, text: Err("No such file or directory".into()) });
    assert!(matches!(reply(&e), Err(CommandError::InvalidConfig(m)) if m.contains("cannot read it")));
}

#[test]
fn a_server_re_added_while_it_is_stopping_comes_back_with_its_new_spec_after_it_exits() {
    let mut s = up();
    let pid = s.pid("chat-2");
    let without = ALL.replace("    - {id: chat-2, port: 0}\n", "");
    let e = reload(&mut s, false, &without);
    assert_eq!(signals(&e), [(pid, Signal::SIGTERM), (pid, Signal::SIGCONT)]);
    assert_eq!(s.phase("chat-2"), Phase::Stopping);
    assert!(memberships(&e).iter().all(|(_, m)| !ids(m).contains(&"chat-2")), "out of the membership at once");
    let back = format!("{without}    - {{id: chat-2, port: 0, env: {{X: '1'}}}}\n");
    let e = reload(&mut s, false, &back);
    assert!(spawns(&e).is_empty(), "not while the old one runs");
    assert!(signals(&e).is_empty(), "already signalled");
    let e = s.advance(Duration::from_secs(1));
    assert!(e.is_empty(), "{e:?}");
    let e = s.ev(Event::Exited { id: "chat-2".into(), pid, status: ExitStatus::Code { code: 0 } });
    let spawned: Vec<_> = e.iter().filter_map(|e| if let Effect::Spawn(x) = e { Some(x) } else { None }).collect();
    assert_eq!(spawned.len(), 1);
    assert_eq!(spawned[0].worker.server.env.get("X").map(String::as_str), Some("1"), "the new spec");
    assert_eq!(s.core.view(s.now, 1).servers.iter().map(|v| v.id.as_str()).collect::<Vec<_>>().last(), Some(&"chat-2"));
}

#[test]
fn a_removed_server_that_exits_is_forgotten_and_workers_json_rewritten() {
    let mut s = up();
    let pid = s.pid("chat-2");
    reload(&mut s, true, &ALL.replace("    - {id: chat-2, port: 0}\n", ""));
    let e = s.ev(Event::Exited { id: "chat-2".into(), pid, status: ExitStatus::Code { code: 0 } });
    let last = e.iter().rev().find_map(|e| if let Effect::WriteWorkers(m) = e { Some(m.clone()) } else { None });
    assert!(last.is_some_and(|m| m.len() == 4 && !m.contains_key("chat-2")));
    assert!(s.core.index("chat-2").is_none());
}

#[test]
fn restart_only_master_settings_are_kept_and_reported() {
    let mut s = up();
    let text = with_master(ALL).replace("stopGrace: 2s", "stopGrace: 1s\n  admin: 127.0.0.1:7777");
    let e = s.ev(Event::Reload { forced: false, text: Ok(text) });
    let r = reply(&e).expect("applied");
    assert!(r.ends_with("; not applied until the master restarts: admin"), "{r}");
    assert_eq!(s.core.topo.master.stop_grace, Duration::from_secs(1));
    assert_ne!(s.core.topo.master.admin.port(), 7777);
}

#[test]
fn commands_answer_and_refuse_as_before() {
    let mut s = up();
    let r = |s: &mut Sim, c| reply(&s.ev(Event::Command(c)));
    assert_eq!(r(&mut s, Command::Start("chat-1".into())), Err(CommandError::AlreadyThere("chat-1".into(), "running")));
    assert_eq!(r(&mut s, Command::Stop("nope".into())), Err(CommandError::UnknownServer("nope".into())));
    assert_eq!(r(&mut s, Command::Stop("chat-1".into())), Ok("chat-1 is stopping".into()));
    assert_eq!(r(&mut s, Command::Stop("chat-1".into())), Err(CommandError::AlreadyStopping("chat-1".into())));
    assert_eq!(r(&mut s, Command::Restart("chat-1".into())), Err(CommandError::AlreadyStopping("chat-1".into())));
    assert_eq!(r(&mut s, Command::Shutdown), Ok("stopping every server, then the master".into()));
    assert_eq!(r(&mut s, Command::Start("chat-1".into())), Err(CommandError::ShuttingDown));
    assert_eq!(reply(&reload(&mut s, true, ALL)), Err(CommandError::ShuttingDown));
}

#[test]
fn shutdown_stops_everything_and_finishes_when_the_last_exits() {
    let mut s = up();
    let pids = s.core.pids();
    let e = s.ev(Event::Shutdown);
    let terms: Vec<_> = signals(&e).into_iter().filter(|(_, sig)| *sig == Signal::SIGTERM).collect();
    assert_eq!(terms.len(), 5);
    assert!(!e.contains(&Effect::Finished));
    for (n, (id, pid)) in pids.iter().enumerate() {
        let e = s.ev(Event::Exited { id: id.clone(), pid: *pid, status: ExitStatus::Code { code: 0 } });
        assert_eq!(e.contains(&Effect::Finished), n == pids.len() - 1, "{id}");
        assert!(spawns(&e).is_empty(), "nothing restarts during shutdown");
    }
}

#[test]
fn shutdown_kills_after_the_grace_and_gives_up_at_the_deadline() {
    let mut s = up();
    let hung = s.pid("conn-1");
    s.ev(Event::Shutdown);
    for (id, pid) in s.core.pids() {
        if id != "conn-1" {
            s.ev(Event::Exited { id, pid, status: ExitStatus::Code { code: 0 } });
        }
    }
    let e = s.advance(Duration::from_millis(1900));
    assert!(signals(&e).is_empty());
    let e = s.advance(Duration::from_millis(100));
    assert_eq!(signals(&e), [(hung, Signal::SIGKILL)], "stopGrace 2s");
    let e = s.advance(Duration::from_millis(4900));
    assert!(!e.contains(&Effect::Finished), "still within grace + {SHUTDOWN_SLACK:?}");
    let e = s.advance(Duration::from_millis(100));
    assert!(e.contains(&Effect::Finished), "the deadline ends the wait: {e:?}");
}

#[test]
fn a_hung_worker_is_killed_and_leaves_the_membership() {
    let mut s = up();
    let pid = s.pid("chat-1");
    let e = s.advance(Duration::from_secs(4));
    assert!(signals(&e).contains(&(pid, Signal::SIGKILL)), "no heartbeat for heartbeatTimeout");
    let e = s.ev(Event::Exited {
        id: "chat-1".into(),
        pid,
        status: ExitStatus::Signal { signal: 9, name: "SIGKILL".into() },
    });
    let m = memberships(&e);
    assert!(!m.is_empty() && m.iter().all(|(_, m)| !ids(m).contains(&"chat-1")));
    assert_eq!(s.phase("chat-1"), Phase::Backoff);
}

/// H4: a registered remote server is stopped over its link; its pid is never signalled on this host.
#[test]
fn a_remote_server_is_stopped_over_its_link_and_never_signalled() {
    let mut s = Sim::new(
        "servers:\n  chat:\n    - {id: chat-1, port: 0}\n    - {id: chat-9, host: 10.255.0.9, port: 6059}\n",
        &[],
    );
    s.register("chat-1");
    let (conn, _) = s.register_as("chat-9", 4242, None);
    let mut effects = s.ev(Event::Command(Command::Stop("chat-9".into())));
    s.now += std::time::Duration::from_secs(30);
    effects.extend(s.ev(Event::Tick));
    effects.extend(s.ev(Event::Command(Command::Shutdown)));
    s.now += std::time::Duration::from_secs(30);
    effects.extend(s.ev(Event::Tick));
    assert!(!signals(&effects).iter().any(|(pid, _)| *pid == 4242), "{:?}", signals(&effects));
    assert!(
        effects.iter().any(|e| matches!(e, Effect::Send { conn: c, msg: ToWorker::Stop { .. } } if *c == conn)),
        "asked over its link: {effects:?}"
    );
}

/// A chat server whose history is its own disk keeps its rooms while it restarts (it stays in the
/// membership: they wait for it rather than start a new epoch elsewhere); one that was stopped while the
/// other chat server ran starts with its store emptied, since that one owned its rooms meanwhile.
#[test]
fn a_disk_chat_server_keeps_its_rooms_while_it_restarts_and_starts_anew_after_others_had_them() {
    let servers = ALL.replace("{id: chat-1, port: 0}", "{id: chat-1, port: 0, history: {backend: disk}}");
    let mut s = Sim::new(&servers, &[]);
    for id in ["gate-1", "conn-1", "conn-2", "chat-1", "chat-2"] {
        s.register(id);
    }
    let fresh = |e: &[Effect]| -> Vec<bool> {
        e.iter()
            .filter_map(|e| match e {
                Effect::Spawn(spec) if spec.worker.server.id == "chat-1" => Some(spec.worker.fresh_history),
                _ => None,
            })
            .collect()
    };
    let kill = |s: &mut Sim, id: &str| {
        let pid = s.pid(id);
        let conn = s.core.slots[s.core.index(id).expect("slot")].link.expect("linked");
        let mut e = s.ev(Event::Closed { conn, id: id.into() });
        e.extend(s.ev(Event::Exited {
            id: id.into(),
            pid,
            status: ExitStatus::Signal { signal: 9, name: "SIGKILL".into() },
        }));
        e
    };
    kill(&mut s, "chat-1");
    assert!(ids(s.core.membership()).contains(&"chat-1"), "kept while it restarts");
    let e = s.advance(Duration::from_secs(2));
    assert_eq!(fresh(&e), [false], "restarted with its history");
    s.register("chat-1");
    // A memory chat server killed leaves at once: its rooms move.
    kill(&mut s, "chat-2");
    assert!(!ids(s.core.membership()).contains(&"chat-2"));
    s.advance(Duration::from_secs(2));
    s.register("chat-2");
    // Stopped while chat-2 runs: it leaves, chat-2 takes its rooms, and it comes back with an empty store.
    let pid = s.pid("chat-1");
    s.ev(Event::Command(Command::Stop("chat-1".into())));
    s.ev(Event::Exited { id: "chat-1".into(), pid, status: ExitStatus::Code { code: 0 } });
    assert!(!ids(s.core.membership()).contains(&"chat-1"), "stopped: its rooms move");
    let e = s.ev(Event::Command(Command::Start("chat-1".into())));
    assert_eq!(fresh(&e), [true], "chat-2 owned its rooms meanwhile");
    s.register("chat-1");
    kill(&mut s, "chat-1");
    let e = s.advance(Duration::from_secs(2));
    assert_eq!(fresh(&e), [false], "a crash after that keeps the history again");
}
