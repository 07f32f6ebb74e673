//! A one-slot hand-off between the capture thread and the detection thread.
//!
//! Files use [`Handoff::put_wait`]: the reader waits for the detector, so every
//! sampled frame is processed and the file goes as fast as detection allows.
//! Live sources use [`Handoff::put_latest`]: a newer frame replaces one not yet
//! taken, so results never fall behind the camera.

use std::sync::{Condvar, Mutex, MutexGuard};

pub struct Handoff<T> {
    state: Mutex<State<T>>,
    changed: Condvar,
}

struct State<T> {
    slot: Option<T>,
    closed: bool,
}

impl<T> Default for Handoff<T> {
    fn default() -> Self {
        Handoff {
            state: Mutex::new(State {
                slot: None,
                closed: false,
            }),
            changed: Condvar::new(),
        }
    }
}

impl<T> Handoff<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // A panic elsewhere cannot leave the slot half-written; keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until the slot is free, then fills it. False when closed.
    pub fn put_wait(&self, item: T) -> bool {
        let mut state = self.lock();
        while state.slot.is_some() && !state.closed {
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        if state.closed {
            return false;
        }
        state.slot = Some(item);
        self.changed.notify_all();
        true
    }

    /// Fills the slot at once, returning the item it replaced, if any.
    pub fn put_latest(&self, item: T) -> Option<T> {
        let mut state = self.lock();
        if state.closed {
            return None;
        }
        let replaced = state.slot.replace(item);
        self.changed.notify_all();
        replaced
    }

    /// Waits for an item; `None` once the hand-off is closed and empty.
    pub fn take(&self) -> Option<T> {
        let mut state = self.lock();
        loop {
            if let Some(item) = state.slot.take() {
                self.changed.notify_all();
                return Some(item);
            }
            if state.closed {
                return None;
            }
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// No more items will be put; an item already in the slot can still be taken.
    pub fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn put_wait_delivers_every_item_in_order() {
        let h = Arc::new(Handoff::default());
        let producer = {
            let h = h.clone();
            std::thread::spawn(move || {
                for i in 0..100 {
                    assert!(h.put_wait(i));
                }
                h.close();
            })
        };
        let mut got = Vec::new();
        while let Some(i) = h.take() {
            got.push(i);
        }
        producer.join().unwrap();
        assert_eq!(got, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn put_latest_replaces_the_unread_item() {
        let h = Handoff::default();
        assert_eq!(h.put_latest(1), None);
        assert_eq!(h.put_latest(2), Some(1));
        assert_eq!(h.take(), Some(2));
        h.put_latest(3);
        h.close();
        assert_eq!(h.take(), Some(3));
        assert_eq!(h.take(), None);
        assert!(!h.put_wait(4));
    }
}
