//! Liveness from the steps in flight. A loop marks each step it takes (one
//! reconcile, one attempt to store a command) with [`Watchdog::step`], and
//! `/healthz` fails while any step has run longer than the limit, so
//! Kubernetes restarts a process whose loop hangs (a lost wake-up, a call
//! without a timeout, a lock never released). A loop that waits — for a
//! message, a backoff delay, the next event — has no step in flight and is
//! never judged stuck, so an outage of Kafka or the API server, which every
//! step retries with backoff, fails `/readyz` or the metrics, not liveness.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub struct Watchdog {
    limit: Duration,
    /// The setting that sets the limit, named in the probe's message.
    setting: Option<&'static str>,
    next: AtomicU64,
    steps: Mutex<BTreeMap<u64, (&'static str, Instant)>>,
}

/// A step in flight; it ends when dropped.
pub struct Step<'a> {
    watchdog: &'a Watchdog,
    id: u64,
}

impl Drop for Step<'_> {
    fn drop(&mut self) {
        self.watchdog.lock().remove(&self.id);
    }
}

impl Watchdog {
    /// A watchdog judging steps against `limit`, which `setting` (when
    /// there is one) configures.
    pub fn new(limit: Duration, setting: Option<&'static str>) -> Self {
        Watchdog {
            limit,
            setting,
            next: AtomicU64::new(0),
            steps: Mutex::new(BTreeMap::new()),
        }
    }

    /// Marks a step of `what` (how the probe names it, e.g. "a reconcile")
    /// as in flight until the returned guard is dropped.
    pub fn step(&self, what: &'static str) -> Step<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(id, (what, Instant::now()));
        Step { watchdog: self, id }
    }

    /// `/healthz`'s verdict: the oldest step in flight, if it is too old.
    pub fn check(&self) -> Result<(), String> {
        let now = Instant::now();
        let ages: Vec<_> = self
            .lock()
            .values()
            .map(|(what, since)| (*what, now.saturating_duration_since(*since)))
            .collect();
        judge(&ages, self.limit, self.setting)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, (&'static str, Instant)>> {
        // A panic while holding the map leaves it usable.
        self.steps.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Stuck when the oldest step in flight has run longer than `limit`.
fn judge(ages: &[(&str, Duration)], limit: Duration, setting: Option<&str>) -> Result<(), String> {
    match ages.iter().max_by_key(|(_, age)| *age) {
        Some((what, age)) if *age > limit => Err(format!(
            "{what} has been running for {:.0} s, longer than the limit of {} s{}: the loop is stuck",
            age.as_secs_f64(),
            limit.as_secs(),
            setting.map(|s| format!(" ({s})")).unwrap_or_default()
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Duration = Duration::from_secs(300);

    #[test]
    fn stuck_only_when_the_oldest_step_is_past_the_limit() {
        assert_eq!(judge(&[], LIMIT, None), Ok(()), "nothing in flight");
        let fresh = ("a reconcile", Duration::from_secs(5));
        let at_limit = ("a reconcile", LIMIT);
        let old = ("storing a command", Duration::from_secs(301));
        assert_eq!(judge(&[fresh], LIMIT, None), Ok(()));
        assert_eq!(judge(&[at_limit], LIMIT, None), Ok(()));
        let verdict = judge(&[fresh, old, at_limit], LIMIT, Some("WATCHDOG")).unwrap_err();
        assert_eq!(
            verdict,
            "storing a command has been running for 301 s, longer than the limit of 300 s (WATCHDOG): the loop is stuck"
        );
        assert!(
            judge(&[old], LIMIT, None)
                .unwrap_err()
                .contains("the limit of 300 s: the loop")
        );
    }

    #[test]
    fn a_step_is_in_flight_until_dropped() {
        let dog = Watchdog::new(LIMIT, None);
        let first = dog.step("a reconcile");
        let second = dog.step("a reconcile");
        assert_eq!(dog.lock().len(), 2);
        drop(first);
        assert_eq!(dog.lock().len(), 1);
        drop(second);
        assert!(dog.lock().is_empty());
        assert!(dog.check().is_ok());
    }
}
