//! The one reader of `/proc` in pomelo-rs, on the `procfs` crate (the kernel's real ticks per second and
//! page size, not assumed ones). The supervisor samples its workers with it, the dashboard's `/metrics`
//! reads the master's own figures, the CLI and the tests check liveness, and the bench measures the
//! cluster's CPU and memory. Plain functions and one small map; no tasks.
//!
//! - [`sample`]: CPU seconds, RSS and open files of a pid; [`ProcSampler`] turns CPU totals into a rate.
//! - [`alive`], [`cmdline`], [`environ`]: liveness (not a zombie), argv, environment of a pid; [`pids`].
//! - [`self_reading`]: the master's own process figures for the Prometheus `process_*` series.
//! - [`machine_cpu`]: busy and total CPU seconds of the whole machine.

use std::collections::HashMap;
use std::ffi::OsString;
use std::time::Instant;

use procfs::process::{LimitValue, Process};
use procfs::{CurrentSI, KernelStats};

/// One reading.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcSample {
    /// User + system CPU time so far.
    pub cpu_seconds: f64,
    /// CPU use since the previous sample, in percent of one core.
    pub cpu_percent: f64,
    pub rss_bytes: u64,
    pub open_fds: u64,
}

fn process(pid: u32) -> Option<Process> {
    Process::new(i32::try_from(pid).ok()?).ok()
}

fn ticks_per_second() -> f64 {
    procfs::ticks_per_second().max(1) as f64
}

/// CPU seconds, RSS and open files of `pid` (`cpu_percent` left 0); `None` if it is gone.
pub fn sample(pid: u32) -> Option<ProcSample> {
    let p = process(pid)?;
    let stat = p.stat().ok()?;
    Some(ProcSample {
        cpu_seconds: (stat.utime + stat.stime) as f64 / ticks_per_second(),
        cpu_percent: 0.0,
        rss_bytes: stat.rss * procfs::page_size(),
        open_fds: p.fd_count().map(|n| n as u64).unwrap_or(0),
    })
}

/// The most the open-file limit is raised to, whatever the hard limit (which may be "unlimited").
pub const MAX_OPEN_FILES: u64 = 1 << 20;

/// Raises this process's open-file limit (soft) to its hard limit, at most [`MAX_OPEN_FILES`], so idle
/// sockets or many workers' pipes do not run the master out of files at the default 1024; children inherit
/// it. Returns (before, after).
pub fn raise_open_files() -> std::io::Result<(u64, u64)> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(std::io::Error::from)?;
    let target = hard.min(MAX_OPEN_FILES);
    if soft < target {
        setrlimit(Resource::RLIMIT_NOFILE, target, hard).map_err(std::io::Error::from)?;
    }
    Ok((soft, getrlimit(Resource::RLIMIT_NOFILE).map_err(std::io::Error::from)?.0))
}

/// This process's open-file limit (soft), or 0 if it cannot be read.
pub fn open_files_limit() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).map(|(soft, _)| soft).unwrap_or(0)
}

/// Whether `pid` is alive and not a zombie.
pub fn alive(pid: u32) -> bool {
    process(pid).is_some_and(|p| p.is_alive())
}

/// The command line of `pid`; empty if it cannot be read.
pub fn cmdline(pid: u32) -> Vec<String> {
    process(pid).and_then(|p| p.cmdline().ok()).unwrap_or_default()
}

/// The environment of `pid`; `None` if it cannot be read (gone, or another user's).
pub fn environ(pid: u32) -> Option<HashMap<OsString, OsString>> {
    process(pid)?.environ().ok()
}

/// When `pid` started, in clock ticks since boot (`/proc/PID/stat` field 22): with the pid, it names one
/// process for good, since a reused pid starts later.
pub fn start_ticks(pid: u32) -> Option<u64> {
    process(pid)?.stat().ok().map(|s| s.starttime)
}

/// The executable `pid` runs (`/proc/PID/exe`), without the ` (deleted)` the kernel adds once the file
/// was replaced on disk.
pub fn exe(pid: u32) -> Option<std::path::PathBuf> {
    let p = process(pid)?.exe().ok()?;
    let text = p.to_string_lossy();
    Some(text.strip_suffix(" (deleted)").map(std::path::PathBuf::from).unwrap_or(p))
}

/// Whether two paths name the same file: equal as written, or once both are resolved.
pub fn same_path(a: &std::path::Path, b: &std::path::Path) -> bool {
    a == b || a.canonicalize().is_ok_and(|a| b.canonicalize().is_ok_and(|b| a == b))
}

/// Whether `pid` runs the executable `exe` (the same path, or the same file once both are resolved);
/// `Err` says what it runs instead.
pub fn runs(pid: u32, exe: &std::path::Path) -> Result<(), String> {
    match self::exe(pid) {
        Some(e) if same_path(&e, exe) => Ok(()),
        Some(e) => Err(format!("it runs {}, not {}", e.display(), exe.display())),
        None => Err("its executable cannot be read".into()),
    }
}

/// Whether `pid` holds a socket listening on `addr` (its own fds against the TCP tables of its network
/// namespace).
pub fn listens_on(pid: u32, addr: std::net::SocketAddr) -> bool {
    use procfs::process::FDTarget;
    let Some(p) = process(pid) else { return false };
    let Ok(fds) = p.fd() else { return false };
    let inodes: std::collections::HashSet<u64> = fds
        .filter_map(|fd| match fd.ok()?.target {
            FDTarget::Socket(inode) => Some(inode),
            _ => None,
        })
        .collect();
    let tables = p.tcp().unwrap_or_default().into_iter().chain(p.tcp6().unwrap_or_default());
    tables.into_iter().any(|e| {
        e.state == procfs::net::TcpState::Listen
            && inodes.contains(&e.inode)
            && e.local_address.port() == addr.port()
            && (e.local_address.ip() == addr.ip() || e.local_address.ip().is_unspecified())
    })
}

/// Every pid in `/proc` now.
pub fn pids() -> Vec<u32> {
    let Ok(all) = procfs::process::all_processes() else { return Vec::new() };
    all.filter_map(|p| u32::try_from(p.ok()?.pid()).ok()).collect()
}

/// Remembers the previous CPU reading per pid to turn totals into a rate.
#[derive(Debug, Default)]
pub struct ProcSampler {
    last: HashMap<u32, (Instant, f64)>,
}

impl ProcSampler {
    pub fn new() -> ProcSampler {
        ProcSampler::default()
    }

    /// Reads `pid`; `None` if it is gone.
    pub fn sample(&mut self, pid: u32, now: Instant) -> Option<ProcSample> {
        let mut s = sample(pid)?;
        s.cpu_percent = match self.last.insert(pid, (now, s.cpu_seconds)) {
            Some((t, prev)) if now > t => 100.0 * (s.cpu_seconds - prev).max(0.0) / now.duration_since(t).as_secs_f64(),
            _ => 0.0,
        };
        Some(s)
    }

    /// Forgets pids not in `live`, so the map stays as small as the cluster.
    pub fn retain(&mut self, live: &[u32]) {
        self.last.retain(|pid, _| live.contains(pid));
    }
}

/// What `/proc/self` says, or `None` where it cannot be read.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct SelfReading {
    pub cpu_seconds: f64,
    pub rss_bytes: f64,
    pub virtual_bytes: f64,
    pub threads: f64,
    pub start_time_seconds: f64,
    pub open_fds: Option<f64>,
    pub max_fds: Option<f64>,
}

/// This process's figures, as the Prometheus client libraries report them.
pub fn self_reading() -> Option<SelfReading> {
    let me = Process::myself().ok()?;
    let stat = me.stat().ok()?;
    let ticks = ticks_per_second();
    let boot = procfs::boot_time_secs().ok()? as f64;
    let max_fds = me.limits().ok().and_then(|l| match l.max_open_files.soft_limit {
        LimitValue::Value(v) => Some(v as f64),
        LimitValue::Unlimited => None,
    });
    Some(SelfReading {
        cpu_seconds: (stat.utime + stat.stime) as f64 / ticks,
        rss_bytes: (stat.rss * procfs::page_size()) as f64,
        virtual_bytes: stat.vsize as f64,
        threads: stat.num_threads as f64,
        start_time_seconds: boot + stat.starttime as f64 / ticks,
        open_fds: me.fd_count().ok().map(|n| n as f64),
        max_fds,
    })
}

/// Busy and total CPU seconds of the whole machine since boot (idle and iowait are not busy); zeros if
/// `/proc/stat` cannot be read.
pub fn machine_cpu() -> (f64, f64) {
    let Ok(stats) = KernelStats::current() else { return (0.0, 0.0) };
    let c = stats.total;
    let idle = c.idle + c.iowait.unwrap_or(0);
    let total = c.user + c.nice + c.system + idle + c.irq.unwrap_or(0) + c.softirq.unwrap_or(0) + c.steal.unwrap_or(0);
    let t = ticks_per_second();
    ((total - idle) as f64 / t, total as f64 / t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let mut s = ProcSampler::new();
        let me = std::process::id();
        let a = s.sample(me, Instant::now()).expect("own stat");
        assert!(a.rss_bytes > 1 << 20, "rss {}", a.rss_bytes);
        assert!(a.open_fds >= 3);
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let b = s.sample(me, Instant::now()).expect("own stat");
        assert!(b.cpu_seconds >= a.cpu_seconds);
        assert!(s.sample(u32::MAX - 1, Instant::now()).is_none());
    }

    #[test]
    fn liveness_argv_environment_and_self() {
        let me = std::process::id();
        assert!(alive(me));
        assert!(!alive(u32::MAX - 1));
        assert!(!cmdline(me).is_empty());
        assert!(cmdline(u32::MAX - 1).is_empty());
        assert!(environ(me).is_some_and(|e| !e.is_empty()));
        assert!(pids().contains(&me));
        let r = self_reading().expect("/proc/self is readable");
        assert!(r.rss_bytes > 0.0 && r.threads >= 1.0);
        assert!(r.open_fds.is_some_and(|n| n >= 3.0));
        assert!(r.start_time_seconds > 1.5e9, "{}", r.start_time_seconds);
        let (busy, total) = machine_cpu();
        assert!(total > 0.0 && busy <= total, "{busy} {total}");
    }

    #[test]
    fn a_reaped_child_is_not_alive_and_a_zombie_is_not_either() {
        let mut child = std::process::Command::new("sleep").arg("0").spawn().expect("spawn sleep");
        let pid = child.id();
        // Exited but not reaped yet: a zombie, which does not count as alive.
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        while alive(pid) && Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(!alive(pid), "a zombie counts as gone");
        child.wait().expect("reap");
        assert!(!alive(pid));
    }
}
