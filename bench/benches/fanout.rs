//! Criterion micro-benchmarks of the fan-out path: a chat server's `RoomTable::send` for a 200-member room
//! spread over 2 connectors, the delivery frame it sends each connector (`cluster::encode_deliver`), and
//! the connector's decoding of that frame (`cluster::decode`).

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pomelo_proto::cluster::{self, ChatRequest, FromChat, Member, ToChat};
use pomelo_worker::chat::room_table::{OnChat, RoomTable};
use pomelo_worker::routes::chat_dictionary;

const MEMBERS: u64 = 200;

fn room() -> RoomTable {
    let mut rooms = RoomTable::new(Some(Arc::new(chat_dictionary())));
    let connectors: [Arc<str>; 2] = ["connector-1".into(), "connector-2".into()];
    for i in 0..MEMBERS {
        let m = Member { rid: "big".into(), uid: format!("u{i}*big"), username: format!("u{i}"), session: i + 1 };
        rooms.join(&connectors[(i % 2) as usize], m).expect("join");
    }
    rooms
}

fn fan_out(c: &mut Criterion) {
    let mut rooms = room();
    let content = serde_json::json!("1234.56.0.987654321.xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx");
    let mut g = c.benchmark_group("fanout");
    g.throughput(Throughput::Elements(MEMBERS));
    g.bench_function("rooms_send_200_members_2_connectors", |b| {
        b.iter(|| rooms.send(black_box("big"), chat(&content)).expect("send"))
    });
    let deliveries = rooms.send("big", chat(&content)).expect("send");
    g.bench_function("rooms_send_and_encode_deliver", |b| {
        b.iter(|| {
            let d = rooms.send(black_box("big"), chat(&content)).expect("send");
            d.iter().map(|d| cluster::encode_deliver(&d.sessions, &d.payload).len()).sum::<usize>()
        })
    });
    let d = &deliveries[0];
    g.throughput(Throughput::Elements(d.sessions.len() as u64));
    g.bench_function("encode_deliver_100_sessions", |b| {
        b.iter(|| cluster::encode_deliver(black_box(&d.sessions), &d.payload))
    });
    let frame = cluster::encode_deliver(&d.sessions, &d.payload);
    g.bench_function("decode_deliver_100_sessions", |b| {
        b.iter(|| cluster::decode::<FromChat>(black_box(frame.clone())))
    });
    g.throughput(Throughput::Elements(1));
    let req = ToChat::Request {
        id: 77,
        req: ChatRequest::Send { rid: "big".into(), from: "u1".into(), target: "*".into(), content: content.clone() },
    };
    g.bench_function("encode_send_request", |b| b.iter(|| cluster::encode_msg(black_box(&req))));
    let req_frame = cluster::encode_msg(&req);
    g.bench_function("decode_send_request", |b| b.iter(|| cluster::decode::<ToChat>(black_box(req_frame.clone()))));
    g.finish();
}

criterion_group!(benches, fan_out);
criterion_main!(benches);

/// A broadcast from `u1` at a history position, as the rooms task hands it to the table.
fn chat(msg: &serde_json::Value) -> OnChat<'_> {
    OnChat { msg, from: "u1", target: "*", epoch: "0123456789abcdef-0", offset: 12345 }
}
