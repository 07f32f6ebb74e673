//! Exponential backoff with jitter, for reconnecting to cameras and retrying
//! Kubernetes and Kafka calls.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            base,
            max: max.max(base),
            attempt: 0,
        }
    }

    /// Attempts made since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// The delay before attempt number `attempt` (counting from 0):
    /// `base * 2^attempt`, capped at `max`, scaled by `jitter` (expected in
    /// 0.0..=1.0) into the upper half, so retries from many workers spread out
    /// without ever waiting less than half the nominal delay.
    pub fn delay(&self, attempt: u32, jitter: f64) -> Duration {
        let factor = 2f64.powi(attempt.min(30) as i32);
        let nominal = (self.base.as_secs_f64() * factor).min(self.max.as_secs_f64());
        Duration::from_secs_f64(nominal * (0.5 + 0.5 * jitter.clamp(0.0, 1.0)))
    }

    /// The delay before the next attempt, counting the attempt.
    pub fn next_delay(&mut self, jitter: f64) -> Duration {
        let delay = self.delay(self.attempt, jitter);
        self.attempt = self.attempt.saturating_add(1);
        delay
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const JITTERS: [f64; 5] = [0.0, 0.25, 0.5, 0.75, 1.0];

    fn backoff() -> Backoff {
        Backoff::new(Duration::from_millis(100), Duration::from_secs(1))
    }

    /// The nominal delay of the doc comment: `base * 2^attempt`, capped at `max`.
    fn nominal(attempt: u32) -> Duration {
        Duration::from_millis(100)
            .saturating_mul(2u32.saturating_pow(attempt))
            .min(Duration::from_secs(1))
    }

    fn close(a: Duration, b: Duration) -> bool {
        a.abs_diff(b) <= Duration::from_micros(1)
    }

    #[test]
    fn delays_never_shrink_from_one_attempt_to_the_next() {
        let b = backoff();
        for jitter in JITTERS {
            for attempt in 1..64 {
                assert!(
                    b.delay(attempt, jitter) >= b.delay(attempt - 1, jitter),
                    "attempt {attempt}, jitter {jitter}"
                );
            }
        }
    }

    #[test]
    fn the_nominal_delay_starts_at_base_doubles_and_stops_at_the_cap() {
        let b = backoff();
        assert_eq!(b.delay(0, 1.0), Duration::from_millis(100));
        for attempt in 0..64 {
            assert!(close(b.delay(attempt, 1.0), nominal(attempt)), "{attempt}");
            assert!(b.delay(attempt, 1.0) <= Duration::from_secs(1));
        }
        assert_eq!(b.delay(u32::MAX, 1.0), Duration::from_secs(1));
    }

    #[test]
    fn jitter_stays_in_the_upper_half_of_the_nominal_delay() {
        let b = backoff();
        for attempt in [0, 1, 3, 10, 40] {
            let full = nominal(attempt);
            assert!(close(b.delay(attempt, 0.0), full / 2), "{attempt}");
            assert!(close(b.delay(attempt, 1.0), full), "{attempt}");
            let mut last = Duration::ZERO;
            for jitter in JITTERS {
                let d = b.delay(attempt, jitter);
                assert!(d >= last, "more jitter never waits less");
                assert!(d + Duration::from_micros(1) >= full / 2 && d <= full);
                last = d;
            }
            // Jitter outside 0.0..=1.0 is held to its ends.
            assert_eq!(b.delay(attempt, -3.0), b.delay(attempt, 0.0));
            assert_eq!(b.delay(attempt, 7.0), b.delay(attempt, 1.0));
        }
    }

    #[test]
    fn a_cap_below_the_base_is_the_base() {
        let b = Backoff::new(Duration::from_secs(2), Duration::from_secs(1));
        for attempt in 0..5 {
            assert_eq!(b.delay(attempt, 1.0), Duration::from_secs(2));
        }
    }

    #[test]
    fn next_delay_counts_attempts_and_reset_starts_over() {
        let mut b = backoff();
        for attempt in 0..6 {
            assert_eq!(b.attempts(), attempt);
            assert_eq!(b.next_delay(0.3), b.delay(attempt, 0.3));
        }
        assert_eq!(b.attempts(), 6);
        b.reset();
        assert_eq!(b.attempts(), 0);
        assert_eq!(b.next_delay(1.0), Duration::from_millis(100));
    }
}
