//! The one retry policy of every loop that reconnects or retries: a stream to the registry
//! (the proxy's ingest stream, a watch), an ID lease, an accept that failed. A [`Backoff`]
//! says how long to wait (from `min`, growing by `growth` after each wait, never beyond
//! `max`); a [`Retry`] is one loop's state under it: the failures in a row and the next
//! wait. With several replicas of one service ([`crate::failover::Replicas`]) a failure
//! moves on to the next replica at once, and the loop backs off only once every replica
//! has failed in a row ([`Retry::failed`] returns no wait until then).
//!
//! The policy only counts and computes; the loop does its own sleeping (some sleep until a
//! shutdown deadline instead), so the policy is a plain value, testable without a clock.

use std::time::Duration;

/// How long a loop waits between tries: `min` first, then `growth` times the last wait,
/// at most `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The first wait, and the wait again after a success.
    pub min: Duration,
    /// The longest wait.
    pub max: Duration,
    /// What each wait is multiplied by for the next (1: a fixed wait).
    pub growth: u32,
}

impl Backoff {
    /// Waits from `min` doubling up to `max`.
    pub const fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            growth: 2,
        }
    }

    /// The same bounds, each wait `growth` times the last (at least 1).
    pub const fn growth(self, growth: u32) -> Self {
        Self {
            growth: if growth == 0 { 1 } else { growth },
            ..self
        }
    }

    /// The state of one loop over `replicas` replicas of one service (at least one); no
    /// failure yet.
    pub fn start(self, replicas: usize) -> Retry {
        Retry {
            policy: self,
            replicas: replicas.max(1) as u64,
            next: self.min,
            failures: 0,
        }
    }
}

/// One loop's retry state under a [`Backoff`]; see the module documentation.
#[derive(Debug, Clone)]
pub struct Retry {
    policy: Backoff,
    replicas: u64,
    /// The wait the next backoff takes.
    next: Duration,
    failures: u64,
}

impl Retry {
    /// A try succeeded (a stream opened, a batch was acknowledged): the failures in a row
    /// start over, and so does the wait.
    pub fn succeeded(&mut self) {
        self.failures = 0;
        self.next = self.policy.min;
    }

    /// A try failed (and the caller moved on to the next replica, if there is one). Returns
    /// how long to wait before the next try: `None` (try at once) while a replica is still
    /// untried in this round of failures, the next wait once every replica has failed in a
    /// row.
    pub fn failed(&mut self) -> Option<Duration> {
        self.failures += 1;
        if self.failures.is_multiple_of(self.replicas) {
            Some(self.backoff())
        } else {
            None
        }
    }

    /// The next wait, growing the one after it, without counting a failure: for a try
    /// that went wrong in a way no other replica would do better with (an answer that
    /// makes no sense).
    pub fn backoff(&mut self) -> Duration {
        let wait = self.next;
        self.next = wait
            .saturating_mul(self.policy.growth)
            .min(self.policy.max)
            .max(self.policy.min);
        wait
    }

    /// Failures in a row so far.
    pub fn failures(&self) -> u64 {
        self.failures
    }

    /// How many replicas the loop moves between.
    pub fn replicas(&self) -> u64 {
        self.replicas
    }

    /// Whether the latest failure is worth a log line: each in the first round (one per
    /// replica), then only the 2nd, 4th, 8th, ... so a long outage logs rarely.
    pub fn worth_logging(&self) -> bool {
        self.failures <= self.replicas || self.failures.is_power_of_two()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn one_replica_waits_after_every_failure_doubling_up_to_the_cap() {
        let mut r = Backoff::new(50 * MS, 400 * MS).start(1);
        let waits: Vec<_> = (0..6).map(|_| r.failed()).collect();
        let want = [50, 100, 200, 400, 400, 400].map(|n| Some(n * MS));
        assert_eq!(waits, want);
        assert_eq!(r.failures(), 6);
    }

    #[test]
    fn several_replicas_back_off_only_once_each_has_failed_in_a_row() {
        let mut r = Backoff::new(10 * MS, Duration::from_secs(1)).start(3);
        let waits: Vec<_> = (0..9).map(|_| r.failed()).collect();
        let want = [
            None,
            None,
            Some(10 * MS),
            None,
            None,
            Some(20 * MS),
            None,
            None,
            Some(40 * MS),
        ];
        assert_eq!(waits, want);
    }

    #[test]
    fn a_success_starts_the_failures_and_the_wait_over() {
        let mut r = Backoff::new(10 * MS, Duration::from_secs(1)).start(2);
        for _ in 0..5 {
            r.failed();
        }
        assert_eq!(r.failures(), 5);
        r.succeeded();
        assert_eq!(r.failures(), 0);
        // A full round again before the first wait, and the wait is the first one.
        assert_eq!(r.failed(), None);
        assert_eq!(r.failed(), Some(10 * MS));
    }

    #[test]
    fn growth_other_than_two_and_a_fixed_wait() {
        let mut r = Backoff::new(5 * MS, 100 * MS).growth(3).start(1);
        let waits: Vec<_> = (0..5).map(|_| r.failed()).collect();
        assert_eq!(waits, [5, 15, 45, 100, 100].map(|n| Some(n * MS)));
        let mut fixed = Backoff::new(50 * MS, 50 * MS).growth(1).start(1);
        for _ in 0..4 {
            assert_eq!(fixed.failed(), Some(50 * MS));
        }
        // Growth 0 would make the wait vanish: it is taken as 1.
        assert_eq!(Backoff::new(MS, MS).growth(0).growth, 1);
    }

    #[test]
    fn a_wait_without_a_failure_grows_but_does_not_count() {
        let mut r = Backoff::new(50 * MS, Duration::from_secs(1)).start(2);
        assert_eq!(r.backoff(), 50 * MS);
        assert_eq!(r.failures(), 0);
        assert_eq!(r.failed(), None);
        assert_eq!(r.failed(), Some(100 * MS));
    }

    #[test]
    fn zero_replicas_count_as_one_and_the_cap_saturates() {
        let huge = Duration::from_secs(u64::MAX);
        let mut r = Backoff::new(huge, Duration::MAX).start(0);
        assert_eq!(r.replicas(), 1);
        assert_eq!(r.failed(), Some(huge));
        assert_eq!(r.failed(), Some(Duration::MAX));
        assert_eq!(r.failed(), Some(Duration::MAX));
    }

    #[test]
    fn logs_the_first_round_then_at_powers_of_two() {
        let mut r = Backoff::new(MS, MS).start(3);
        let logged: Vec<u64> = (1..=20)
            .filter(|_| {
                r.failed();
                r.worth_logging()
            })
            .collect();
        assert_eq!(logged, [1, 2, 3, 4, 8, 16]);
        let mut one = Backoff::new(MS, MS).start(1);
        let logged: Vec<u64> = (1..=9)
            .filter(|_| {
                one.failed();
                one.worth_logging()
            })
            .collect();
        assert_eq!(logged, [1, 2, 4, 8]);
    }
}
