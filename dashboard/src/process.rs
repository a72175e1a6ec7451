//! The master's own process metrics, under the names every Prometheus client library uses:
//! `process_cpu_seconds_total`, `process_resident_memory_bytes`, `process_virtual_memory_bytes`,
//! `process_open_fds`, `process_max_fds`, `process_threads`, `process_start_time_seconds`.
//!
//! Read from `/proc/self` at scrape time (the master and the admin server are one process). If `/proc`
//! cannot be read, the CPU and memory figures the supervisor already sampled are used instead.

use pomelo_master::view::MasterView;
use prometheus::{Counter, Gauge, Registry};

/// What `/proc/self` says, or `None` where it cannot be read.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Reading {
    pub cpu_seconds: f64,
    pub rss_bytes: f64,
    pub virtual_bytes: f64,
    pub threads: f64,
    pub start_time_seconds: f64,
    pub open_fds: Option<f64>,
    pub max_fds: Option<f64>,
}

pub fn read() -> Option<Reading> {
    let me = procfs::process::Process::myself().ok()?;
    let stat = me.stat().ok()?;
    let ticks = procfs::ticks_per_second() as f64;
    let boot = procfs::boot_time_secs().ok()? as f64;
    let max_fds = me.limits().ok().and_then(|l| match l.max_open_files.soft_limit {
        procfs::process::LimitValue::Value(v) => Some(v as f64),
        procfs::process::LimitValue::Unlimited => None,
    });
    Some(Reading {
        cpu_seconds: (stat.utime + stat.stime) as f64 / ticks,
        rss_bytes: (stat.rss * procfs::page_size()) as f64,
        virtual_bytes: stat.vsize as f64,
        threads: stat.num_threads as f64,
        start_time_seconds: boot + stat.starttime as f64 / ticks,
        open_fds: me.fd_count().ok().map(|n| n as f64),
        max_fds,
    })
}

/// Adds the master's process metrics to `registry`.
pub fn register(registry: &Registry, master: &MasterView) -> prometheus::Result<()> {
    let reading = read();
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

#[cfg(test)]
mod tests {
    #[test]
    fn reads_this_process() {
        let r = super::read().expect("/proc/self is readable");
        assert!(r.rss_bytes > 0.0 && r.threads >= 1.0);
        assert!(r.open_fds.is_some_and(|n| n >= 3.0));
        assert!(r.start_time_seconds > 1.5e9, "{}", r.start_time_seconds);
    }
}
