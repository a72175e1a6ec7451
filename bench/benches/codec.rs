//! Criterion micro-benchmarks of the Pomelo wire codec: packages and messages, encode and decode, at the
//! sizes the chat sends (a 64-byte content in `chat.chatHandler.send`, an `onChat` push).

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pomelo_proto::wire::{self, package, Decoded, Message, PackageDecoder, PackageType, Route};

const SEND_BODY: &[u8] =
    br#"{"rid":"r7","content":"1234.56.0.987654321.xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx","from":"b1234","target":"*"}"#;
const CHAT_BODY: &[u8] =
    br#"{"msg":"1234.56.0.987654321.xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx","from":"b1234","target":"*"}"#;

fn packages(c: &mut Criterion) {
    let mut g = c.benchmark_group("package");
    g.throughput(Throughput::Elements(1));
    g.bench_function("encode_data_100B", |b| b.iter(|| package::encode(PackageType::Data, black_box(SEND_BODY))));
    g.bench_function("empty_heartbeat", |b| b.iter(|| package::empty(black_box(PackageType::Heartbeat))));
    // 64 packages back to back, as one TCP read brings them.
    let mut stream = BytesMut::new();
    for _ in 0..64 {
        package::encode_into(&mut stream, PackageType::Data, SEND_BODY).expect("encode");
    }
    let stream = stream.freeze();
    let decoder = PackageDecoder::new(64 * 1024);
    g.throughput(Throughput::Elements(64));
    g.bench_function("decode_stream_64", |b| {
        b.iter(|| {
            let mut buf = BytesMut::from(&stream[..]);
            let mut n = 0;
            while let Ok(Decoded::Package(p)) = decoder.decode(&mut buf) {
                n += p.body.len();
            }
            n
        })
    });
    g.finish();
}

fn messages(c: &mut Criterion) {
    let mut g = c.benchmark_group("message");
    g.throughput(Throughput::Elements(1));
    let body = Bytes::from_static(SEND_BODY);
    g.bench_function("request_encode_package", |b| {
        b.iter(|| Message::request(black_box(300), Route::Code(1), body.clone()).encode_package())
    });
    let encoded = Message::request(300, Route::Code(1), body.clone()).encode().expect("encode");
    g.bench_function("request_decode", |b| b.iter(|| Message::decode(black_box(&encoded))));
    let plain = Message::push(Route::Plain("onChat".into()), Bytes::from_static(CHAT_BODY)).encode().expect("encode");
    g.bench_function("push_decode_plain_route", |b| b.iter(|| Message::decode(black_box(&plain))));
    let content = serde_json::json!("1234.56.0.987654321.xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx");
    g.bench_function("on_chat_encode_push_json", |b| {
        b.iter(|| {
            let v = serde_json::json!({"msg": black_box(&content), "from": "b1234", "target": "*"});
            wire::encode_push_json(None, "onChat", &v)
        })
    });
    g.bench_function("send_body_parse_json", |b| {
        b.iter(|| serde_json::from_slice::<serde_json::Value>(black_box(SEND_BODY)))
    });
    g.finish();
}

criterion_group!(benches, packages, messages);
criterion_main!(benches);
