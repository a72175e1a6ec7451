//! Unit tests of `/metrics` rendering from hand-made views (the end-to-end test runs promtool on a real one).

use super::*;
use pomelo_master::view::MasterView;
use pomelo_proto::control::{BoundAddrs, ServerType, Stats};

fn server(id: &str, t: ServerType, state: Phase, stats: &[(&str, f64)]) -> ServerView {
    ServerView {
        id: id.into(),
        server_type: t,
        host: "127.0.0.1".into(),
        supervisor: "local".into(),
        port: None,
        client_port: None,
        addrs: BoundAddrs::default(),
        state,
        pid: (state == Phase::Running).then_some(4242),
        ssh_pid: None,
        adopted: false,
        uptime_secs: Some(12.5),
        restarts: 2,
        last_exit: None,
        cpu_percent: 1.5,
        cpu_seconds: 0.25,
        rss_bytes: 8 << 20,
        open_fds: 17,
        stats: stats.iter().map(|(k, v)| (k.to_string(), *v)).collect::<Stats>(),
        rates: Stats::new(),
    }
}

fn view(servers: Vec<ServerView>) -> ClusterView {
    ClusterView {
        seq: 1,
        master: MasterView {
            pid: 1,
            env: "development".into(),
            config: "servers.yaml".into(),
            control_addr: "127.0.0.1:1".into(),
            admin_addr: "127.0.0.1:2".into(),
            uptime_secs: 3.0,
            config_error: Some("line 3: bad".into()),
            cpu_seconds: 0.5,
            rss_bytes: 1 << 20,
            open_fds: 12,
            max_fds: 20000,
        },
        servers,
    }
}

fn lines<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
    text.lines().filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} "))).collect()
}

#[test]
fn one_series_per_server_for_every_fixed_family() {
    let v = view(vec![
        server("gate-1", ServerType::Gate, Phase::Running, &[("connections", 3.0), ("handshakes_total", 9.0)]),
        server("chat-1", ServerType::Chat, Phase::Failed, &[("rooms", 2.0), ("messages_in_total", 40.0)]),
    ]);
    let text = render(&v, 2).expect("render");
    for (name, ..) in FIXED.iter().chain([&("pomelo_server_state", Kind::Gauge, Source::Up, "")]) {
        let found = lines(&text, name);
        assert_eq!(found.len(), 2, "{name}: {found:?}\n{text}");
        assert!(found.iter().any(|l| l.contains("server_id=\"gate-1\",server_type=\"gate\"")), "{found:?}");
    }
    assert!(text.contains("# TYPE pomelo_server_restarts_total counter"));
    assert!(text.contains("pomelo_server_connections{server_id=\"gate-1\",server_type=\"gate\"} 3"));
    assert!(text.contains("pomelo_server_connections{server_id=\"chat-1\",server_type=\"chat\"} 0"));
    assert!(text.contains("pomelo_server_state{server_id=\"chat-1\",server_type=\"chat\",state=\"failed\"} 1"));
    assert!(text.contains("pomelo_server_up{server_id=\"chat-1\",server_type=\"chat\"} 0"));
    assert!(text.contains("pomelo_server_resident_memory_bytes{server_id=\"gate-1\",server_type=\"gate\"} 8388608"));
    assert!(text.contains("pomelo_cluster_servers{state=\"failed\"} 1"));
    assert!(text.contains("pomelo_master_config_error 1"));
    assert!(text.contains("pomelo_dashboard_sse_clients 2"));
    assert!(text.contains("process_cpu_seconds_total ") && text.contains("process_resident_memory_bytes "));
}

#[test]
fn removed_servers_leave_nothing_behind() {
    let two = view(vec![
        server("chat-1", ServerType::Chat, Phase::Running, &[]),
        server("chat-2", ServerType::Chat, Phase::Running, &[]),
    ]);
    assert!(render(&two, 0).expect("render").contains("chat-2"));
    let one = view(vec![server("chat-1", ServerType::Chat, Phase::Running, &[])]);
    assert!(!render(&one, 0).expect("render").contains("chat-2"));
}

#[test]
fn histograms_and_other_stats() {
    let v = view(vec![server(
        "connector-1",
        ServerType::Connector,
        Phase::Running,
        &[
            ("rpc_latency_seconds_bucket_0.01", 42.0),
            ("rpc_latency_seconds_bucket_0.1", 57.0),
            ("rpc_latency_seconds_count", 60.0),
            ("rpc_latency_seconds_sum", 1.5),
            ("queue_full_total", 4.0),
            ("sessions_pending", 2.0),
            ("Bad-Name", 1.0),
            ("weird_count", 1.0),
        ],
    )]);
    let text = render(&v, 0).expect("render");
    assert!(text.contains("# TYPE pomelo_server_rpc_latency_seconds histogram"), "{text}");
    let l = "server_id=\"connector-1\",server_type=\"connector\"";
    assert!(text.contains(&format!("pomelo_server_rpc_latency_seconds_bucket{{{l},le=\"0.01\"}} 42")), "{text}");
    assert!(text.contains(&format!("pomelo_server_rpc_latency_seconds_bucket{{{l},le=\"+Inf\"}} 60")), "{text}");
    assert!(text.contains(&format!("pomelo_server_rpc_latency_seconds_count{{{l}}} 60")));
    assert!(text.contains(&format!("pomelo_server_rpc_latency_seconds_sum{{{l}}} 1.5")));
    assert!(text.contains("# TYPE pomelo_server_queue_full_total counter"));
    assert!(text.contains(&format!("pomelo_server_sessions_pending{{{l}}} 2")));
    assert!(!text.contains("Bad-Name") && !text.contains("weird_count"), "{text}");
    assert!(!text.contains("pomelo_server_rpc_latency_seconds_bucket_0"), "no raw bucket keys as gauges");
}
