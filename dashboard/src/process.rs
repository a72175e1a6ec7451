//! The master's own process metrics, under the names every Prometheus client library uses:
//! `process_cpu_seconds_total`, `process_resident_memory_bytes`, `process_virtual_memory_bytes`,
//! `process_open_fds`, `process_max_fds`, `process_threads`, `process_start_time_seconds`.
//!
//! Only the registration lives here: the figures come from `pomelo_master::procstat::self_reading` at
//! scrape time (the master and the admin server are one process). If `/proc` cannot be read, the CPU and
//! memory figures the supervisor already sampled are used instead.

use pomelo_master::procstat;
use pomelo_master::view::MasterView;
use prometheus::{Counter, Gauge, Registry};

/// Adds the master's process metrics to `registry`.
pub fn register(registry: &Registry, master: &MasterView) -> prometheus::Result<()> {
    let reading = procstat::self_reading();
    let cpu = reading.map_or(master.cpu_seconds, |r| r.cpu_seconds);
    let c = Counter::new("process_cpu_seconds_total", "Total user and system CPU time spent in seconds.")?;
    c.inc_by(if cpu.is_finite() { cpu.max(0.0) } else { 0.0 });
    registry.register(Box::new(c))?;
    let rss = reading.map_or(master.rss_bytes as f64, |r| r.rss_bytes);
    let mut gauges = vec![("process_resident_memory_bytes", "Resident memory size in bytes.", rss)];
    if let Some(r) = reading {
        gauges.push(("process_virtual_memory_bytes", "Virtual memory size in bytes.", r.virtual_bytes));
        gauges.push(("process_threads", "Number of OS threads in the process.", r.threads));
        gauges.push((
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            r.start_time_seconds,
        ));
        if let Some(n) = r.open_fds {
            gauges.push(("process_open_fds", "Number of open file descriptors.", n));
        }
        if let Some(n) = r.max_fds {
            gauges.push(("process_max_fds", "Maximum number of open file descriptors.", n));
        }
    }
    for (name, help, v) in gauges {
        let g = Gauge::new(name, help)?;
        g.set(v);
        registry.register(Box::new(g))?;
    }
    Ok(())
}
