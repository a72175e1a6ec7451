//! The restart policy: exponential backoff with jitter inside an intensity limit.
//!
//! Pure: callers pass the time, so every rule is unit-tested without processes or sleeping.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use pomelo_proto::config::RestartPolicy;

/// What the policy says after a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Wait this long, then start again.
    Backoff(Duration),
    /// Too many restarts within the window: give up until a person restarts it.
    GiveUp,
}

/// Crash history of one server.
#[derive(Debug, Clone, Default)]
pub struct RestartTracker {
    /// When each restart within the window happened (bounded by `max_restarts + 1`).
    recent: VecDeque<Instant>,
    /// Crashes since the server was last healthy for `reset_after`.
    consecutive: u32,
    /// Restarts since the master started, for display.
    pub total: u64,
}

impl RestartTracker {
    /// Records a crash of a server that had been up for `uptime`; `jitter` in [0, 1) spreads restarts.
    pub fn on_crash(&mut self, policy: &RestartPolicy, now: Instant, uptime: Duration, jitter: f64) -> Verdict {
        if uptime >= policy.reset_after {
            self.consecutive = 0;
        }
        while self.recent.front().is_some_and(|t| now.duration_since(*t) > policy.window) {
            self.recent.pop_front();
        }
        if self.recent.len() >= policy.max_restarts as usize {
            return Verdict::GiveUp;
        }
        self.recent.push_back(now);
        self.total += 1;
        let exp = policy.backoff_multiplier.powi(self.consecutive.min(64) as i32);
        let base = policy.backoff_initial.as_secs_f64() * exp;
        let capped = base.min(policy.backoff_max.as_secs_f64());
        self.consecutive = self.consecutive.saturating_add(1);
        // Jitter takes off up to a fifth of the delay, so servers that crashed together restart apart.
        let delay = capped * (1.0 - 0.2 * jitter.clamp(0.0, 1.0));
        Verdict::Backoff(Duration::from_secs_f64(delay))
    }

    /// A person asked for a start: forget the crash history, keep the total.
    pub fn clear(&mut self) {
        self.recent.clear();
        self.consecutive = 0;
    }

    /// Counts a restart that was asked for (not a crash).
    pub fn count_manual(&mut self) {
        self.total += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RestartPolicy {
        RestartPolicy::default()
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_and_then_gives_up() {
        let p = RestartPolicy { max_restarts: 100, ..policy() };
        let mut t = RestartTracker::default();
        let now = Instant::now();
        let delays: Vec<Duration> = (0..10)
            .map(|i| match t.on_crash(&p, now + Duration::from_millis(i), Duration::ZERO, 0.0) {
                Verdict::Backoff(d) => d,
                Verdict::GiveUp => panic!("gave up early"),
            })
            .collect();
        assert_eq!(delays[0], Duration::from_millis(100));
        assert_eq!(delays[1], Duration::from_millis(200));
        assert_eq!(delays[2], Duration::from_millis(400));
        assert_eq!(delays[8], Duration::from_secs(15));
        assert_eq!(delays[9], Duration::from_secs(15));
    }

    #[test]
    fn intensity_limit_then_window_slides() {
        let p = policy();
        let mut t = RestartTracker::default();
        let now = Instant::now();
        for i in 0..5 {
            assert!(matches!(t.on_crash(&p, now + Duration::from_secs(i), Duration::ZERO, 0.5), Verdict::Backoff(_)));
        }
        assert_eq!(t.on_crash(&p, now + Duration::from_secs(6), Duration::ZERO, 0.5), Verdict::GiveUp);
        // 61 s after the first crash it has slid out of the window.
        assert!(matches!(t.on_crash(&p, now + Duration::from_secs(61), Duration::ZERO, 0.5), Verdict::Backoff(_)));
        assert_eq!(t.total, 6);
    }

    #[test]
    fn healthy_uptime_resets_the_backoff_and_jitter_shortens_it() {
        let p = RestartPolicy { max_restarts: 100, ..policy() };
        let mut t = RestartTracker::default();
        let now = Instant::now();
        for _ in 0..4 {
            t.on_crash(&p, now, Duration::ZERO, 0.0);
        }
        let v = t.on_crash(&p, now, Duration::from_secs(31), 1.0);
        assert_eq!(v, Verdict::Backoff(Duration::from_millis(80)));
    }
}
