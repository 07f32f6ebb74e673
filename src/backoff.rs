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

    #[test]
    fn doubles_up_to_the_cap_with_jitter_in_the_upper_half() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        assert_eq!(b.next_delay(1.0), Duration::from_millis(100));
        assert_eq!(b.next_delay(1.0), Duration::from_millis(200));
        assert_eq!(b.next_delay(0.0), Duration::from_millis(200));
        assert_eq!(b.next_delay(1.0), Duration::from_millis(800));
        assert_eq!(b.next_delay(1.0), Duration::from_secs(1));
        assert_eq!(b.next_delay(1.0), Duration::from_secs(1));
        assert_eq!(b.attempts(), 6);
        b.reset();
        assert_eq!(b.next_delay(0.5), Duration::from_millis(75));
    }
}
