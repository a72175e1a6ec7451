//! When a chat server decides that a connector is gone and drops its members (`onLeave` to the rest).
//!
//! A membership alone is not enough: a new master publishes memberships while adopted workers are still
//! re-registering, so a live connector can be missing from one for seconds. A link alone is not enough
//! either: a connector closes its link when *its* membership briefly lacks this chat server. The rule:
//!
//! - a connector whose RPC link is up is present, whatever the membership says (its own re-joins are
//!   authoritative for its members, so nothing drifts while it is linked);
//! - a connector with no link that is also absent from the membership for [`ABSENT_GRACE`] is gone:
//!   a crashed or stopped connector loses its link at once and the master announces it gone within
//!   moments, so its members get `onLeave` about a second after it died;
//! - a connector with no link for [`LINKLESS_GRACE`] is gone even if the membership still lists it (a
//!   master that has not noticed, a network split); if it comes back, its re-join restores its members.
//!
//! Absence counts only once this server is in the membership itself (before that it may be a stale or
//! partial view). Plain data: the rooms task feeds it events with `now` and asks who is gone.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

/// No link and absent from the membership for this long: gone.
pub const ABSENT_GRACE: Duration = Duration::from_secs(1);
/// No link for this long: gone, whatever the membership says.
pub const LINKLESS_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, Default, Clone, Copy)]
struct State {
    /// Since when it has had no link (`None`: linked).
    unlinked: Option<Instant>,
    /// Since when it has been missing from the membership (`None`: listed, or not known yet).
    absent: Option<Instant>,
}

impl State {
    fn deadline(&self) -> Option<Instant> {
        let unlinked = self.unlinked?;
        let linkless = unlinked + LINKLESS_GRACE;
        Some(match self.absent {
            Some(absent) => linkless.min(unlinked.max(absent) + ABSENT_GRACE),
            None => linkless,
        })
    }
}

#[derive(Debug, Default)]
pub struct Presence {
    conns: HashMap<Arc<str>, State>,
}

impl Presence {
    pub fn linked(&mut self, connector: &Arc<str>) {
        self.conns.entry(connector.clone()).or_default().unlinked = None;
    }

    pub fn unlinked(&mut self, connector: &Arc<str>, now: Instant) {
        self.conns.entry(connector.clone()).or_default().unlinked.get_or_insert(now);
    }

    /// A membership this server is in: `listed` are its connectors; `holders` are the connectors that
    /// hold members here (tracked from now on even if never linked in this process).
    pub fn membership(&mut self, listed: &[&str], holders: &[Arc<str>], now: Instant) {
        for h in holders {
            self.conns.entry(h.clone()).or_insert(State { unlinked: Some(now), absent: None });
        }
        for (c, s) in &mut self.conns {
            if listed.contains(&c.as_ref()) {
                s.absent = None;
            } else {
                s.absent.get_or_insert(now);
            }
        }
    }

    /// The connectors gone at `now`; they are forgotten (a later link starts afresh).
    pub fn gone(&mut self, now: Instant) -> Vec<Arc<str>> {
        let gone: Vec<Arc<str>> =
            self.conns.iter().filter(|(_, s)| s.deadline().is_some_and(|d| d <= now)).map(|(c, _)| c.clone()).collect();
        for c in &gone {
            self.conns.remove(c);
        }
        gone
    }

    /// When the next connector may be gone, if any can be.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.conns.values().filter_map(State::deadline).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> Arc<str> {
        s.into()
    }

    #[test]
    fn a_linked_connector_survives_any_membership() {
        let t0 = Instant::now();
        let mut p = Presence::default();
        p.linked(&c("c1"));
        p.membership(&[], &[c("c1")], t0);
        assert!(p.gone(t0 + LINKLESS_GRACE * 10).is_empty(), "a transient membership drops no one");
        assert_eq!(p.next_deadline(), None);
    }

    #[test]
    fn a_dead_connector_is_gone_a_grace_after_it_lost_its_link_and_its_place() {
        let t0 = Instant::now();
        let mut p = Presence::default();
        p.linked(&c("c1"));
        p.membership(&["c1"], &[c("c1")], t0);
        p.unlinked(&c("c1"), t0);
        let t1 = t0 + Duration::from_millis(100);
        p.membership(&[], &[c("c1")], t1);
        assert_eq!(p.next_deadline(), Some(t1 + ABSENT_GRACE));
        assert!(p.gone(t1 + ABSENT_GRACE - Duration::from_millis(1)).is_empty());
        assert_eq!(p.gone(t1 + ABSENT_GRACE), [c("c1")]);
        assert!(p.gone(t1 + LINKLESS_GRACE).is_empty(), "forgotten once gone");
    }

    #[test]
    fn a_link_back_within_the_grace_keeps_the_members() {
        let t0 = Instant::now();
        let mut p = Presence::default();
        p.linked(&c("c1"));
        p.unlinked(&c("c1"), t0);
        p.membership(&[], &[c("c1")], t0);
        p.linked(&c("c1"));
        assert!(p.gone(t0 + LINKLESS_GRACE * 2).is_empty());
    }

    #[test]
    fn linkless_but_listed_is_gone_only_after_the_long_grace() {
        let t0 = Instant::now();
        let mut p = Presence::default();
        p.membership(&["c1"], &[c("c1")], t0);
        assert!(p.gone(t0 + ABSENT_GRACE * 2).is_empty(), "still listed");
        p.membership(&["c1"], &[c("c1")], t0 + Duration::from_secs(5));
        assert_eq!(p.gone(t0 + LINKLESS_GRACE), [c("c1")]);
    }
}
