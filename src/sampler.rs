//! Time-based frame sampling: of the frames a source delivers, the first one at
//! or after each multiple of 1/VIDEO_FPS seconds is processed; the rest are
//! dropped. For files the clock is the media timestamp, for live sources the
//! time since the worker started reading.

use std::time::Duration;

/// Timestamps within this distance before a due time count as on time, so a
/// frame stamped 499.9999 ms is taken for the 500 ms slot.
const TOLERANCE_SECS: f64 = 0.000_5;

#[derive(Debug, Clone)]
pub struct Sampler {
    period: f64,
    next_due: f64,
}

impl Sampler {
    pub fn new(period: Duration) -> Self {
        Sampler {
            period: period.as_secs_f64(),
            next_due: 0.0,
        }
    }

    /// Decides whether the frame at `at` (seconds on the source's clock) is
    /// processed, and if so moves the next due time past it.
    pub fn offer(&mut self, at: f64) -> bool {
        if !at.is_finite() || at + TOLERANCE_SECS < self.next_due {
            return false;
        }
        let slot = ((at + TOLERANCE_SECS) / self.period).floor();
        self.next_due = (slot + 1.0) * self.period;
        true
    }
}

/// Repairs a source clock that stalls or runs backwards (as corrupt files and
/// some streams do): a timestamp not after the previous one is replaced by the
/// previous one plus one nominal frame interval.
#[derive(Debug, Clone)]
pub struct MonotonicClock {
    frame_interval: f64,
    last: Option<f64>,
}

impl MonotonicClock {
    pub fn new(nominal_fps: f64) -> Self {
        let fps = if nominal_fps.is_finite() && nominal_fps > 0.0 && nominal_fps < 1000.0 {
            nominal_fps
        } else {
            25.0
        };
        MonotonicClock {
            frame_interval: 1.0 / fps,
            last: None,
        }
    }

    pub fn observe(&mut self, reported: f64) -> f64 {
        let at = match self.last {
            Some(last) if !(reported.is_finite() && reported > last) => last + self.frame_interval,
            None if !reported.is_finite() || reported < 0.0 => 0.0,
            _ => reported,
        };
        self.last = Some(at);
        at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(fps_source: f64, frames: usize, fps_out: f64) -> usize {
        let mut sampler = Sampler::new(Duration::from_secs_f64(1.0 / fps_out));
        (0..frames)
            .filter(|i| sampler.offer(*i as f64 / fps_source))
            .count()
    }

    #[test]
    fn vtest_at_two_fps_gives_159_frames() {
        // vtest.avi: 795 frames at 10 fps (79.5 s).
        assert_eq!(count(10.0, 795, 2.0), 159);
    }

    #[test]
    fn fractional_rates_and_odd_source_rates() {
        assert_eq!(count(25.0, 250, 0.5), 5); // 10 s at one frame per 2 s
        assert_eq!(count(23.976, 240, 2.0), 20); // 0 .. 9.97 s: slots 0.0 .. 9.5 s
        assert_eq!(count(10.0, 100, 20.0), 100); // faster than the source: every frame
    }

    /// Frame timestamps in whole milliseconds, increasing by 1 to `max_gap`
    /// ms, from a fixed pseudo-random sequence.
    fn timestamps(seed: u64, frames: usize, max_gap: u64) -> Vec<u64> {
        let mut state = seed;
        let mut at = 0;
        (0..frames)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                at += 1 + (state >> 33) % max_gap;
                at
            })
            .collect()
    }

    /// The contract: a frame is taken exactly when it is the first at or after
    /// some multiple of the period, that is when a multiple lies in
    /// (previous frame, this frame].
    fn expected(stamps_ms: &[u64], period_ms: u64) -> Vec<bool> {
        let mut previous: Option<u64> = None;
        stamps_ms
            .iter()
            .map(|&t| {
                // The first frame (at 0 or later) is at or after the multiple 0.
                let taken = previous.is_none_or(|p| t / period_ms > p / period_ms);
                previous = Some(t);
                taken
            })
            .collect()
    }

    #[test]
    fn takes_the_first_frame_at_or_after_each_multiple_and_nothing_else() {
        for period_ms in [1, 40, 100, 333, 500, 1000, 2000] {
            for (seed, max_gap) in [(1, 10), (2, 90), (3, 400), (4, 2500)] {
                let stamps = timestamps(seed, 400, max_gap);
                let mut sampler = Sampler::new(Duration::from_millis(period_ms));
                let got: Vec<bool> = stamps
                    .iter()
                    .map(|&t| sampler.offer(t as f64 / 1000.0))
                    .collect();
                assert_eq!(
                    got,
                    expected(&stamps, period_ms),
                    "period {period_ms} ms, gaps up to {max_gap} ms"
                );
            }
        }
    }

    #[test]
    fn a_slot_is_taken_once() {
        let mut s = Sampler::new(Duration::from_millis(500));
        assert!(s.offer(0.0));
        assert!(!s.offer(0.0), "the same timestamp again");
        assert!(!s.offer(0.3));
        assert!(s.offer(0.5), "exactly on the multiple");
        assert!(!s.offer(0.5));
        assert!(!s.offer(0.2), "a timestamp from the past");
        assert!(
            s.offer(2.3),
            "a gap: one frame for all the missed multiples"
        );
        assert!(!s.offer(2.45));
        assert!(s.offer(2.5));
    }

    #[test]
    fn a_frame_just_before_a_multiple_is_on_time_but_not_earlier() {
        let mut s = Sampler::new(Duration::from_millis(500));
        assert!(s.offer(0.0));
        assert!(!s.offer(0.499));
        assert!(s.offer(0.4999999));
        assert!(!s.offer(0.5), "the 500 ms slot is taken");
        assert!(!s.offer(0.999));
        assert!(s.offer(1.0));
    }

    #[test]
    fn timestamps_that_are_not_numbers_are_dropped() {
        let mut s = Sampler::new(Duration::from_millis(500));
        for at in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            assert!(!s.offer(at), "{at}");
        }
        assert!(s.offer(0.0), "nothing was taken before");
    }

    #[test]
    fn clock_repair_keeps_time_moving_forward() {
        let mut clock = MonotonicClock::new(10.0);
        assert_eq!(clock.observe(0.0), 0.0);
        assert_eq!(clock.observe(0.1), 0.1);
        assert!((clock.observe(0.1) - 0.2).abs() < 1e-9);
        assert!((clock.observe(f64::NAN) - 0.3).abs() < 1e-9);
        assert_eq!(clock.observe(5.0), 5.0);
    }

    #[test]
    fn clock_output_always_increases() {
        let mut clock = MonotonicClock::new(25.0);
        let reported = [
            -1.0,
            0.0,
            0.04,
            0.04,
            0.02,
            f64::NAN,
            0.2,
            f64::INFINITY,
            0.3,
            0.1,
        ];
        let mut last = f64::NEG_INFINITY;
        for at in reported {
            let repaired = clock.observe(at);
            assert!(
                repaired.is_finite() && repaired > last,
                "{at} -> {repaired}"
            );
            assert!(repaired >= 0.0);
            last = repaired;
        }
    }

    #[test]
    fn a_nominal_rate_no_source_has_is_not_believed() {
        // A stalled clock still moves by a usual frame interval: not zero,
        // infinite or negative, and not the microseconds of a bogus header.
        for fps in [0.0, -10.0, f64::NAN, f64::INFINITY, 1.0e6] {
            let mut clock = MonotonicClock::new(fps);
            clock.observe(1.0);
            let step = clock.observe(1.0) - 1.0;
            assert!((0.001..=1.0).contains(&step), "{fps} fps: step {step}");
        }
    }
}
