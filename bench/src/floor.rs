//! `pomelo-bench floor`: what one TCP segment per delivery costs on this machine, the floor a chat
//! server's per-delivery CPU is compared with (issue 18).
//!
//! The writer (this process, one thread) holds `connections` loopback connections to a reader process
//! (`pomelo-bench floor-read`: epoll, through a current-thread tokio runtime) and does one `write()` of
//! `bytes` bytes per delivery, round-robin over the connections, paced at `rate` deliveries a second for
//! `secs` seconds. Nothing else: no framing, no queues, no wake-ups but its own pacing. Its CPU time per
//! delivery (the thread's own clock) is the floor; the reader's is reported beside it.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::time::{clock_gettime, ClockId};
use serde_json::{json, Value};

fn cpu(clock: ClockId) -> f64 {
    clock_gettime(clock).map_or(f64::NAN, |t| t.tv_sec() as f64 + t.tv_nsec() as f64 / 1e9)
}

/// Runs the writer against a reader of its own; the report (JSON).
pub fn run(connections: u32, rate: f64, secs: f64, bytes: usize) -> anyhow::Result<Value> {
    anyhow::ensure!(
        connections > 0 && rate > 0.0 && secs > 0.0 && bytes > 0,
        "connections, rate, secs and bytes must be above 0"
    );
    let exe = std::env::current_exe().context("this program's path")?;
    let mut child = Command::new(exe)
        .args(["floor-read", "--connections", &connections.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .context("start the reader")?;
    let mut lines = BufReader::new(child.stdout.take().context("the reader's stdout")?).lines();
    let mut line =
        || -> anyhow::Result<String> { lines.next().context("the reader ended early")?.context("read the reader") };
    let addr: SocketAddr = line()?.trim().parse().context("the reader's address")?;
    let mut socks = Vec::with_capacity(connections as usize);
    for _ in 0..connections {
        let s = TcpStream::connect(addr).context("connect to the reader")?;
        s.set_nodelay(true)?;
        socks.push(s);
    }
    anyhow::ensure!(line()? == "ready", "the reader did not accept every connection");
    let payload = vec![b'x'; bytes];
    let (t0, start) = (cpu(ClockId::CLOCK_THREAD_CPUTIME_ID), Instant::now());
    let (mut done, mut next) = (0u64, 0usize);
    // The longest the writer took to catch up with its schedule (it falls behind when the machine is full).
    let mut late = Duration::ZERO;
    loop {
        let elapsed = start.elapsed();
        if elapsed.as_secs_f64() >= secs {
            break;
        }
        let due = (rate * elapsed.as_secs_f64()) as u64;
        while done < due {
            socks[next].write_all(&payload).context("write")?;
            next = (next + 1) % socks.len();
            done += 1;
        }
        late = late.max(start.elapsed().saturating_sub(elapsed));
        std::thread::sleep(Duration::from_micros(200));
    }
    let (writer_cpu, wall) = (cpu(ClockId::CLOCK_THREAD_CPUTIME_ID) - t0, start.elapsed().as_secs_f64());
    drop(socks);
    let reader: Value = serde_json::from_str(&line()?).context("the reader's report")?;
    let _ = child.wait();
    let received = reader["bytes"].as_u64().unwrap_or(0);
    anyhow::ensure!(received == done * bytes as u64, "the reader got {received} bytes of {}", done * bytes as u64);
    let us = |cpu_s: f64| cpu_s * 1e6 / done.max(1) as f64;
    Ok(json!({
        "scenario": "floor",
        "params": {"connections": connections, "rate": rate, "secs": secs, "bytes": bytes},
        "deliveries": done,
        "deliveries_per_sec": done as f64 / wall,
        "writer_cpu_us_per_delivery": us(writer_cpu),
        "reader_cpu_us_per_delivery": us(reader["cpu_s"].as_f64().unwrap_or(f64::NAN)),
        "writer_longest_catch_up_ms": late.as_secs_f64() * 1e3,
    }))
}

/// The reader: prints its address, accepts `connections`, prints `ready`, reads every byte until each
/// connection closes, then prints `{"bytes", "cpu_s"}` (its CPU from `ready` on).
pub fn read(connections: u32) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_io().build()?;
    rt.block_on(async move {
        use tokio::io::AsyncReadExt;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let mut out = std::io::stdout();
        writeln!(out, "{}", l.local_addr()?)?;
        out.flush()?;
        let mut conns = Vec::with_capacity(connections as usize);
        for _ in 0..connections {
            conns.push(l.accept().await?.0);
        }
        let t0 = cpu(ClockId::CLOCK_PROCESS_CPUTIME_ID);
        writeln!(out, "ready")?;
        out.flush()?;
        let tasks: Vec<_> = conns
            .into_iter()
            .map(|mut s| {
                tokio::spawn(async move {
                    let (mut buf, mut n) = (vec![0u8; 16 * 1024], 0u64);
                    while let Ok(k) = s.read(&mut buf).await {
                        if k == 0 {
                            break;
                        }
                        n += k as u64;
                    }
                    n
                })
            })
            .collect();
        let mut bytes = 0;
        for t in tasks {
            bytes += t.await.unwrap_or(0);
        }
        writeln!(out, "{}", json!({"bytes": bytes, "cpu_s": cpu(ClockId::CLOCK_PROCESS_CPUTIME_ID) - t0}))?;
        out.flush()?;
        anyhow::Ok(())
    })
}
