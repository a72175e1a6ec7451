//! Editing servers.yaml while the cluster runs.

use std::time::{Duration, Instant};

use crate::harness::{alive, signal, wait_until, yaml, Cluster};

const BASE: &str = "  gate:\n    - {id: gate-1, clientPort: 0}\n  connector:\n    - {id: connector-1, port: 0, clientPort: 0}\n  chat:\n    - {id: chat-1, port: 0}\n";

/// Saves like an editor: write a temp file, rename it over the original.
fn save(c: &Cluster, text: &str) {
    let tmp = c.dir.path().join(".servers.yaml.tmp");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, c.config()).expect("rename");
}

fn ids(c: &Cluster) -> Vec<String> {
    c.servers().iter().map(|s| s["id"].as_str().unwrap_or("").to_string()).collect()
}

#[test]
fn added_servers_start_within_two_seconds_of_the_save() {
    let c = Cluster::start(&yaml(BASE, ""));
    c.wait_running();
    let more = format!("{BASE}    - {{id: chat-2, port: 0}}\n")
        .replace("  chat:\n", "    - {id: connector-2, port: 0, clientPort: 0}\n  chat:\n");
    let saved = Instant::now();
    save(&c, &yaml(&more, ""));
    wait_until(Duration::from_secs(2), "chat-2 and connector-2 running", || {
        let s = c.servers();
        let up = |id: &str| s.iter().any(|x| x["id"] == id && x["state"] == "running");
        (up("chat-2") && up("connector-2")).then_some(())
    });
    eprintln!("added servers running {:?} after the save", saved.elapsed());
    assert_eq!(ids(&c), ["gate-1", "connector-1", "connector-2", "chat-1", "chat-2"], "file order");
    let out = c.run(&["list"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.lines().any(|l| l.starts_with("chat-2") && l.contains("running")), "{table}");
    assert!(table.lines().any(|l| l.starts_with("connector-2") && l.contains("running")), "{table}");
    assert_eq!(c.worker_pids().len(), 5);
}

#[test]
fn removed_servers_stop_and_leave_no_process() {
    let two = format!("{BASE}    - {{id: chat-2, port: 0}}\n");
    let c = Cluster::start(&yaml(&two, ""));
    let running = c.wait_running();
    let pid = running.iter().find(|(id, _)| id == "chat-2").map(|(_, p)| *p).expect("chat-2");
    save(&c, &yaml(BASE, ""));
    wait_until(Duration::from_secs(10), "chat-2 gone from the API", || {
        (!ids(&c).contains(&"chat-2".into())).then_some(())
    });
    wait_until(Duration::from_secs(5), "chat-2's process gone", || (!alive(pid)).then_some(()));
    assert_eq!(c.worker_pids().len(), 3);
    let (status, _) = c.http("GET", "/api/servers/chat-2", Some(&c.token()));
    assert_eq!(status, 404);
}

#[test]
fn a_changed_server_is_restarted_and_the_others_are_untouched() {
    let c = Cluster::start(&yaml(BASE, ""));
    let before = c.wait_running();
    let changed = BASE.replace("{id: chat-1, port: 0}", "{id: chat-1, port: 0, env: {CHAT_FLAVOUR: lime}}");
    save(&c, &yaml(&changed, ""));
    let old = before.iter().find(|(id, _)| id == "chat-1").map(|(_, p)| *p).expect("chat-1");
    wait_until(Duration::from_secs(10), "chat-1 restarted", || {
        let s = c.server("chat-1");
        (s["state"] == "running" && s["pid"].as_u64().is_some_and(|p| p as u32 != old)).then_some(())
    });
    let new_pid = c.server("chat-1")["pid"].as_u64().expect("pid") as u32;
    let env = pomelo_master::procstat::environ(new_pid).expect("environ");
    assert_eq!(env.get(std::ffi::OsStr::new("CHAT_FLAVOUR")).and_then(|v| v.to_str()), Some("lime"), "the new spec");
    for (id, pid) in before.iter().filter(|(id, _)| id != "chat-1") {
        assert_eq!(c.server(id)["pid"].as_u64(), Some(*pid as u64), "{id} untouched");
    }
}

#[test]
fn an_invalid_file_changes_nothing_and_the_error_is_visible() {
    let c = Cluster::start(&yaml(BASE, ""));
    let before = c.wait_running();
    let broken = format!("{BASE}    - {{id: chat-2, port: 0, colour: red}}\n    - {{id: chat-1, port: 0}}\n");
    save(&c, &yaml(&broken, ""));
    let err = wait_until(Duration::from_secs(5), "config_error in the API", || {
        c.api("/api/servers")["master"]["config_error"].as_str().map(String::from)
    });
    assert!(err.contains("unknown key `colour`"), "{err}");
    assert!(err.contains("duplicate id `chat-1`"), "{err}");
    assert!(err.contains(":22: servers.chat[1].colour"), "with lines: {err}");
    assert!(err.contains(":23: servers.chat[2].id"), "with lines: {err}");
    let (status, body) = c.post("/api/reload");
    assert_eq!(status, 422, "{body}");
    assert!(body["detail"].as_str().unwrap_or("").contains("unknown key `colour`"));
    let out = c.run(&["reload"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing was changed"), "{out:?}");
    let mut after = c.wait_running();
    let mut b = before.clone();
    after.sort();
    b.sort();
    assert_eq!(after, b, "nothing changed");
    // A valid file clears the error.
    save(&c, &yaml(BASE, ""));
    wait_until(Duration::from_secs(5), "the error cleared", || {
        c.api("/api/servers")["master"]["config_error"].is_null().then_some(())
    });
}

#[test]
fn ten_rapid_saves_give_one_consistent_result() {
    let c = Cluster::start(&yaml(BASE, ""));
    c.wait_running();
    let mut last = String::new();
    for n in 1..=10 {
        let extra: String = (2..=(n % 4) + 2).map(|k| format!("    - {{id: chat-{k}, port: 0}}\n")).collect();
        last = format!("{BASE}{extra}");
        save(&c, &yaml(&last, ""));
        std::thread::sleep(Duration::from_millis(30));
    }
    // The last save had n = 10: chat-2, chat-3 and chat-4 besides chat-1.
    let want = ["gate-1", "connector-1", "chat-1", "chat-2", "chat-3", "chat-4"];
    wait_until(Duration::from_secs(10), "the last file's servers, all running", || {
        let s = c.servers();
        (s.len() == want.len() && s.iter().all(|x| x["state"] == "running")).then_some(())
    });
    assert_eq!(ids(&c), want);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(c.worker_pids().len(), want.len(), "no stray or duplicate processes");
    assert!(last.contains("chat-4"));
}

#[test]
fn sighup_and_the_reload_command_apply_the_file() {
    let c = Cluster::start(&yaml(BASE, ""));
    c.wait_running();
    // Written in place without a rename, then SIGHUP (the watcher may also see it; either way one result).
    std::fs::write(c.config(), yaml(&format!("{BASE}    - {{id: chat-2, port: 0}}\n"), "")).expect("write");
    signal(c.master_pid().expect("pid"), 1);
    c.wait_state("chat-2", "running", Duration::from_secs(5));
    std::fs::write(c.config(), yaml(BASE, "")).expect("write");
    let out = c.run(&["reload"]);
    assert!(out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("removed: chat-2") || said.contains("unchanged: 3"), "{said}");
    wait_until(Duration::from_secs(10), "chat-2 removed", || (!ids(&c).contains(&"chat-2".into())).then_some(()));
}

#[test]
fn rooms_moving_to_an_added_chat_server_keep_their_members() {
    use crate::pomelo_client::try_login;
    use serde_json::json;
    let base = "  gate:\n    - {id: gate-1, clientPort: 0}\n  connector:\n    - {id: connector-1, port: 0, clientPort: 0}\n    - {id: connector-2, port: 0, clientPort: 0}\n  chat:\n    - {id: chat-1, port: 0}\n";
    let c = Cluster::start(&yaml(base, ""));
    c.wait_running();
    let gate = c.server("gate-1")["addrs"]["client"].as_str().expect("gate").parse().expect("addr");
    // A room that chat-2 will own once it exists.
    let rid = (0..)
        .map(|i| format!("hall{i}"))
        .find(|r| pomelo_proto::route::rendezvous(r, ["chat-1", "chat-2"].into_iter()) == Some("chat-2"))
        .expect("a room for chat-2");
    let mut users: Vec<_> = (0..6)
        .map(|i| {
            let (cl, reply) = wait_until(Duration::from_secs(10), "login", || try_login(gate, &format!("m{i}"), &rid));
            assert_eq!(reply["users"].as_array().map(Vec::len), Some(i + 1));
            cl
        })
        .collect();
    save(&c, &yaml(&format!("{base}    - {{id: chat-2, port: 0}}\n"), ""));
    c.wait_state("chat-2", "running", Duration::from_secs(5));
    // The room is rebuilt on chat-2 and forgotten on chat-1, with every member.
    wait_until(Duration::from_secs(10), "the room on chat-2 with all 6 members", || {
        let m = |id: &str| c.server(id)["stats"]["members"].as_f64().unwrap_or(-1.0);
        (m("chat-2") == 6.0 && m("chat-1") == 0.0).then_some(())
    });
    for u in users.iter_mut() {
        u.drain_pushes(Duration::from_millis(20));
    }
    let r = users[0]
        .request("chat.chatHandler.send", json!({"rid": rid, "content": "moved?", "from": "m0", "target": "*"}));
    assert_eq!(r, json!({}));
    for (i, u) in users.iter_mut().enumerate() {
        let got = u.collect("onChat", 1, Duration::from_secs(3), Duration::from_millis(30));
        assert_eq!(got.len(), 1, "member {i}: {got:?}");
        let b = &got[0];
        assert_eq!((&b["msg"], &b["from"], &b["target"]), (&json!("moved?"), &json!("m0"), &json!("*")), "member {i}");
        // The new owner has no history of the room (memory backend): a new epoch, from offset 1.
        assert_eq!(b["offset"], 1, "member {i}: {b}");
    }
    // The gate uses a connector added to the file at once.
    let more = format!("{base}    - {{id: chat-2, port: 0}}\n")
        .replace("  chat:\n", "    - {id: connector-3, port: 0, clientPort: 0}\n  chat:\n");
    save(&c, &yaml(&more, ""));
    c.wait_state("connector-3", "running", Duration::from_secs(5));
    let addr3: std::net::SocketAddr =
        c.server("connector-3")["addrs"]["client"].as_str().expect("addr").parse().expect("addr");
    wait_until(Duration::from_secs(5), "the gate to send someone to connector-3", || {
        (0..60).find_map(|i| {
            let mut g = crate::pomelo_client::Client::connect(gate);
            let e = g.request("gate.gateHandler.queryEntry", json!({"uid": format!("probe{i}")}));
            (e["port"].as_u64() == Some(addr3.port() as u64)).then_some(())
        })
    });
}

#[test]
fn a_changed_connector_drains_its_clients_with_a_reason() {
    use crate::pomelo_client::try_login;
    let c = Cluster::start(&yaml(BASE, ""));
    c.wait_running();
    let gate = c.server("gate-1")["addrs"]["client"].as_str().expect("gate").parse().expect("addr");
    let (mut client, reply) = wait_until(Duration::from_secs(10), "login", || try_login(gate, "dora", "lobby"));
    assert_eq!(reply["users"][0], "dora");
    save(
        &c,
        &yaml(
            &BASE.replace(
                "{id: connector-1, port: 0, clientPort: 0}",
                "{id: connector-1, port: 0, clientPort: 0, maxConnections: 500}",
            ),
            "",
        ),
    );
    assert!(client.wait_closed(Duration::from_secs(10)), "the connector closed the session");
    let kick = client.kicked.clone().expect("a KICK package came before the close");
    assert!(kick["reason"].as_str().is_some_and(|r| !r.is_empty()), "{kick}");
    c.wait_state("connector-1", "running", Duration::from_secs(10));
    let (_again, reply) = wait_until(Duration::from_secs(10), "login again", || try_login(gate, "dora", "lobby"));
    assert_eq!(reply["users"][0], "dora");
}

/// How many reloads the master has logged: file-change triggers, and applied reloads of any kind.
fn reloads(c: &Cluster) -> (usize, usize) {
    let out = c.master_output();
    (out.matches("servers.yaml changed: reloading").count(), out.matches("servers.yaml applied").count())
}

#[test]
fn reading_the_file_and_running_list_cause_no_reload_and_an_edit_reloads_once() {
    let c = Cluster::start(&yaml(BASE, ""));
    c.wait_running();
    // Let the watcher see whatever starting the cluster did to the directory.
    std::thread::sleep(Duration::from_millis(800));
    let before = reloads(&c);
    for _ in 0..5 {
        let text = std::fs::read_to_string(c.config()).expect("read servers.yaml");
        assert!(text.contains("connector-1"));
        let out = c.run(&["list"]);
        assert!(out.status.success(), "{out:?}");
    }
    // Well past the watcher's debounce, and long enough for a reload loop to show many times over.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(reloads(&c), before, "reads reloaded:\n{}", c.master_output());
    save(&c, &yaml(&format!("{BASE}    - {{id: chat-2, port: 0}}\n"), ""));
    c.wait_state("chat-2", "running", Duration::from_secs(5));
    std::thread::sleep(Duration::from_secs(2));
    let after = reloads(&c);
    assert_eq!(after, (before.0 + 1, before.1 + 1), "one edit, one reload:\n{}", c.master_output());
    // The edited file read again (as every CLI command does) is still no reload.
    let out = c.run(&["list"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("chat-2"), "{out:?}");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(reloads(&c), after);
}
