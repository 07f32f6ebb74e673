//! Admission: which waiting scenarios start now. A pure function, shared by the
//! Kubernetes operator and the local supervisor.
//!
//! Scenarios wait first come, first served by creation time (ties broken by
//! name, so every replica and every restart computes the same order); as many
//! start as there are free slots under MAX_WORKERS. At most MAX_QUEUED wait
//! beyond the free slots: a deploy that would queue one more is refused
//! ([`has_room`]), so a flood of distinct scenarios cannot grow the queue (and
//! the store behind it) without bound.

use chrono::{DateTime, Utc};

/// A scenario without a live worker that wants one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting<K> {
    pub key: K,
    pub created: DateTime<Utc>,
}

/// The outcome: who starts now, and the 1-based queue position of the rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision<K> {
    pub start: Vec<K>,
    pub queued: Vec<(K, u32)>,
}

/// Starts the oldest waiting scenarios while `live < max_workers`.
pub fn decide<K: Ord + Clone>(
    mut waiting: Vec<Waiting<K>>,
    live: usize,
    max_workers: usize,
) -> Decision<K> {
    waiting.sort_by(|a, b| a.created.cmp(&b.created).then_with(|| a.key.cmp(&b.key)));
    let free = max_workers.saturating_sub(live);
    let mut start = Vec::new();
    let mut queued = Vec::new();
    for (i, w) in waiting.into_iter().enumerate() {
        if i < free {
            start.push(w.key);
        } else {
            queued.push((w.key, (i - free + 1) as u32));
        }
    }
    Decision { start, queued }
}

/// Whether one more scenario may start waiting for a worker: `waiting`
/// scenarios want one and have none, `live` hold slots. It is refused when it
/// would leave more than `max_queued` waiting beyond the free slots.
pub fn has_room(waiting: usize, live: usize, max_workers: usize, max_queued: usize) -> bool {
    let free = max_workers.saturating_sub(live);
    (waiting + 1).saturating_sub(free) <= max_queued
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn room_in_the_queue() {
        // (waiting, live, max_workers, max_queued) → room for one more
        for (waiting, live, max_workers, max_queued, room) in [
            (0, 0, 1, 0, true),  // a free slot: it starts at once
            (0, 1, 1, 0, false), // no slot and no queue
            (0, 1, 1, 1, true),  // it queues first
            (1, 1, 1, 1, false), // the queue is full
            (2, 0, 4, 0, true),  // two wait for slots that are free
            (3, 0, 4, 0, true),  // the fourth free slot
            (4, 0, 4, 0, false), // every free slot taken by waiting ones
            (9, 4, 4, 10, true), // nine queued of ten
            (10, 4, 4, 10, false),
            (10, 6, 4, 10, false), // more live than allowed (the limit was lowered)
            (11, 2, 4, 10, true),  // two of the eleven take the free slots
            (12, 2, 4, 10, false),
        ] {
            assert_eq!(
                has_room(waiting, live, max_workers, max_queued),
                room,
                "waiting {waiting}, live {live}, MAX_WORKERS {max_workers}, MAX_QUEUED {max_queued}"
            );
        }
    }

    fn w(key: &str, second: u32) -> Waiting<String> {
        Waiting {
            key: key.to_string(),
            created: Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, second).unwrap(),
        }
    }

    #[test]
    fn oldest_first_up_to_the_free_slots() {
        let d = decide(vec![w("c", 3), w("a", 1), w("b", 2)], 1, 3);
        assert_eq!(d.start, vec!["a", "b"]);
        assert_eq!(d.queued, vec![("c".to_string(), 1)]);
    }

    #[test]
    fn nothing_starts_when_full_or_over() {
        let d = decide(vec![w("a", 1), w("b", 2)], 2, 2);
        assert!(d.start.is_empty());
        assert_eq!(d.queued, vec![("a".to_string(), 1), ("b".to_string(), 2)]);
        // More live than allowed (the limit was lowered): still nothing starts.
        assert!(decide(vec![w("a", 1)], 5, 2).start.is_empty());
    }

    #[test]
    fn ties_are_broken_by_name() {
        let d = decide(vec![w("b", 1), w("a", 1)], 0, 1);
        assert_eq!(d.start, vec!["a"]);
    }

    #[test]
    fn never_more_than_the_limit_whatever_the_input() {
        for live in 0..5 {
            for max in 1..5 {
                for n in 0..8 {
                    let waiting = (0..n).map(|i| w(&format!("s{i}"), i)).collect();
                    let d = decide(waiting, live, max);
                    assert!(live + d.start.len() <= max.max(live));
                    assert_eq!(d.start.len() + d.queued.len(), n as usize);
                }
            }
        }
    }
}
