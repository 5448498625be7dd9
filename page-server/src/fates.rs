//! What became of each recent two-phase session (resumed as pid N,
//! abandoned, or still pending), so a source whose `Restored` never
//! arrived after `Go` can ask with `Query` and learn whether a copy runs.
//! Bounded in count and age: an entry too old or pushed out reads as
//! unknown, which the source treats as "no copy here" — so the bounds must
//! be far above the source's reconnect timeout.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use ferry_proto::session::Fate;
use ferry_proto::SessionId;

/// Sessions remembered at most.
pub const DEFAULT_CAPACITY: usize = 1 << 16;
/// How long a session's fate is remembered.
pub const DEFAULT_TTL: Duration = Duration::from_secs(600);

/// The page server's memory of session fates. Pure: the caller passes the
/// time, so tests need no clock.
#[derive(Debug)]
pub struct Fates {
    cap: usize,
    ttl: Duration,
    /// Latest fate of each session, with the sequence number of the record
    /// that set it.
    map: HashMap<SessionId, (u64, Instant, Fate)>,
    /// Records, oldest first; one whose sequence no longer matches the map
    /// was overwritten and is skipped.
    order: VecDeque<(SessionId, u64)>,
    seq: u64,
}

impl Default for Fates {
    fn default() -> Self {
        Self::new(DEFAULT_CAPACITY, DEFAULT_TTL)
    }
}

impl Fates {
    pub fn new(cap: usize, ttl: Duration) -> Self {
        Self {
            cap: cap.max(1),
            ttl,
            map: HashMap::new(),
            order: VecDeque::new(),
            seq: 0,
        }
    }

    /// Records (or replaces) the fate of `id` at `now`.
    pub fn record(&mut self, id: SessionId, fate: Fate, now: Instant) {
        self.seq += 1;
        self.map.insert(id, (self.seq, now, fate));
        self.order.push_back((id, self.seq));
        self.evict(now);
    }

    /// The fate of `id`: [`Fate::Unknown`] if never recorded, expired or
    /// pushed out.
    pub fn get(&mut self, id: &SessionId, now: Instant) -> Fate {
        self.evict(now);
        self.map
            .get(id)
            .map(|(_, _, f)| f.clone())
            .unwrap_or(Fate::Unknown)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    fn evict(&mut self, now: Instant) {
        while let Some(&(id, seq)) = self.order.front() {
            let current = self.map.get(&id).filter(|(s, _, _)| *s == seq);
            let Some(&(_, at, _)) = current else {
                // Overwritten by a later record, which has its own entry.
                self.order.pop_front();
                continue;
            };
            if self.map.len() <= self.cap && now.saturating_duration_since(at) < self.ttl {
                break;
            }
            self.map.remove(&id);
            self.order.pop_front();
        }
        // Overwrites leave stale records behind; keep the queue bounded too.
        if self.order.len() > 2 * self.cap {
            let map = &self.map;
            self.order
                .retain(|(id, seq)| map.get(id).is_some_and(|(s, _, _)| s == seq));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> SessionId {
        SessionId([n; 16])
    }

    #[test]
    fn a_fate_is_remembered_and_replaced() {
        let t = Instant::now();
        let mut f = Fates::default();
        assert_eq!(f.get(&id(1), t), Fate::Unknown);
        f.record(id(1), Fate::Pending, t);
        assert_eq!(f.get(&id(1), t), Fate::Pending);
        f.record(id(1), Fate::Resumed { pid: 42 }, t);
        assert_eq!(f.get(&id(1), t), Fate::Resumed { pid: 42 });
        assert_eq!(f.get(&id(2), t), Fate::Unknown);
        assert_eq!(f.len(), 1);
    }

    #[test]
    fn old_fates_expire() {
        let t = Instant::now();
        let mut f = Fates::new(8, Duration::from_secs(600));
        f.record(id(1), Fate::Resumed { pid: 7 }, t);
        f.record(id(2), Fate::Pending, t + Duration::from_secs(300));
        let later = t + Duration::from_secs(599);
        assert_eq!(f.get(&id(1), later), Fate::Resumed { pid: 7 });
        let later = t + Duration::from_secs(600);
        assert_eq!(f.get(&id(1), later), Fate::Unknown);
        assert_eq!(f.get(&id(2), later), Fate::Pending);
        // A replacement restarts the clock.
        f.record(id(2), Fate::Resumed { pid: 8 }, later);
        let much_later = later + Duration::from_secs(599);
        assert_eq!(f.get(&id(2), much_later), Fate::Resumed { pid: 8 });
    }

    #[test]
    fn the_oldest_fates_are_pushed_out_at_capacity() {
        let t = Instant::now();
        let mut f = Fates::new(3, Duration::from_secs(600));
        for n in 1..=4 {
            f.record(id(n), Fate::Resumed { pid: n.into() }, t);
        }
        assert_eq!(f.len(), 3);
        assert_eq!(f.get(&id(1), t), Fate::Unknown);
        assert_eq!(f.get(&id(4), t), Fate::Resumed { pid: 4 });
        // Rewriting one session many times neither grows the map nor the
        // queue without bound, nor pushes the others out.
        for _ in 0..100 {
            f.record(id(4), Fate::Pending, t);
        }
        assert_eq!(f.len(), 3);
        assert!(f.order.len() <= 6);
        assert_eq!(f.get(&id(2), t), Fate::Resumed { pid: 2 });
    }
}
