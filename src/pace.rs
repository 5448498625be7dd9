//! A bandwidth cap for the data streams (`--max-rate`): the migration
//! takes no more of a link than it is given, as QEMU's `max-bandwidth`
//! does. Every data stream reserves its batch's wire bytes from one shared
//! schedule and waits until the link would have carried them, so the cap
//! holds for all streams together and the round rates (hence the policy's
//! predicted downtime) see the capped link.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The link's schedule: when it is next free.
#[derive(Debug)]
pub struct Pacer {
    bytes_per_sec: u64,
    next_free: Mutex<Option<Instant>>,
}

/// How much the link may run ahead of the clock: a burst this long is let
/// through at once, so a stream that paused does not wait for time the
/// link stood idle, and short batches are not delayed one by one.
const BURST: Duration = Duration::from_millis(5);

impl Pacer {
    /// `None` for a rate of 0 (no cap).
    pub fn new(bytes_per_sec: u64) -> Option<Pacer> {
        (bytes_per_sec > 0).then(|| Pacer {
            bytes_per_sec,
            next_free: Mutex::new(None),
        })
    }

    pub fn rate(&self) -> u64 {
        self.bytes_per_sec
    }

    /// Books `bytes` on the link at `now`; returns when the caller may
    /// send them (`now` or later).
    pub fn reserve(&self, bytes: u64, now: Instant) -> Instant {
        let cost = Duration::from_secs_f64(bytes as f64 / self.bytes_per_sec as f64);
        let mut next = self.next_free.lock().unwrap_or_else(|p| p.into_inner());
        // An idle link does not bank more than one burst of credit.
        let start = match *next {
            Some(t) if t + BURST > now => t,
            _ => now.checked_sub(BURST).unwrap_or(now),
        };
        let end = start + cost;
        *next = Some(end);
        // Sending may start once the bytes before them fit in the burst.
        end.checked_sub(BURST).map_or(now, |t| t.max(now))
    }

    /// Waits until `bytes` more may go on the link.
    pub async fn wait(&self, bytes: u64) {
        let at = self.reserve(bytes, Instant::now());
        tokio::time::sleep_until(at.into()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_rate_no_pacer() {
        assert!(Pacer::new(0).is_none());
    }

    #[test]
    fn a_steady_stream_goes_at_the_rate() {
        let p = Pacer::new(1_000_000).unwrap();
        let t0 = Instant::now();
        // 100 batches of 100 kB = 10 MB: the last may go 10 s after the
        // first began, less the two bursts of slack, whatever the caller's
        // clock says.
        let mut at = t0;
        for _ in 0..100 {
            at = p.reserve(100_000, t0);
        }
        let took = at - t0;
        assert!(took >= Duration::from_millis(9_989), "{took:?}");
        assert!(took <= Duration::from_millis(9_991), "{took:?}");
    }

    #[test]
    fn idle_time_is_not_banked_beyond_one_burst() {
        let p = Pacer::new(1_000_000).unwrap();
        let t0 = Instant::now();
        assert_eq!(p.reserve(1_000, t0), t0);
        // A minute of silence, then 1 MB at once: it still takes ~1 s.
        let later = t0 + Duration::from_secs(60);
        let first = p.reserve(500_000, later);
        let second = p.reserve(500_000, later);
        assert!(first <= later + Duration::from_millis(500));
        assert!(
            second - later >= Duration::from_millis(990),
            "{:?}",
            second - later
        );
    }

    #[test]
    fn small_batches_within_a_burst_go_at_once() {
        let p = Pacer::new(100_000_000).unwrap();
        let t0 = Instant::now();
        // 4 kB at 100 MB/s is 41 µs each: 100 of them fit in the 5 ms burst.
        for _ in 0..100 {
            assert_eq!(p.reserve(4096, t0), t0);
        }
    }
}
