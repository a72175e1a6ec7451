//! CPU, memory and open files of a process, read from `/proc`.

use std::collections::HashMap;
use std::time::Instant;

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

/// Remembers the previous CPU reading per pid to turn totals into a rate.
#[derive(Debug, Default)]
pub struct ProcSampler {
    last: HashMap<u32, (Instant, f64)>,
    ticks_per_second: f64,
    page_size: u64,
}

impl ProcSampler {
    pub fn new() -> ProcSampler {
        ProcSampler { last: HashMap::new(), ticks_per_second: 100.0, page_size: 4096 }
    }

    /// Reads `pid`; `None` if it is gone.
    pub fn sample(&mut self, pid: u32, now: Instant) -> Option<ProcSample> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let rest = stat.rsplit_once(')')?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // After the command: state(0) ... utime(11) stime(12) ... rss(21).
        let utime: f64 = fields.get(11)?.parse().ok()?;
        let stime: f64 = fields.get(12)?.parse().ok()?;
        let rss_pages: u64 = fields.get(21)?.parse().ok()?;
        let cpu_seconds = (utime + stime) / self.ticks_per_second;
        let cpu_percent = match self.last.insert(pid, (now, cpu_seconds)) {
            Some((t, prev)) if now > t => 100.0 * (cpu_seconds - prev).max(0.0) / now.duration_since(t).as_secs_f64(),
            _ => 0.0,
        };
        let open_fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count() as u64).unwrap_or(0);
        Some(ProcSample { cpu_seconds, cpu_percent, rss_bytes: rss_pages * self.page_size, open_fds })
    }

    /// Forgets pids not in `live`, so the map stays as small as the cluster.
    pub fn retain(&mut self, live: &[u32]) {
        self.last.retain(|pid, _| live.contains(pid));
    }
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
}
