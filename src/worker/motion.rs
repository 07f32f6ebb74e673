//! Detect on change (`DETECT_ON_CHANGE`): a cheap motion test that decides
//! whether the detector runs on a sampled frame. Each frame is shrunk to a
//! small grey image (area averaging, which also evens out sensor grain) and
//! compared with the one the detector last ran on; when too few pixels
//! changed, the frame repeats the last detections and its result says
//! `"unchanged": true`. Comparing with the last *detected* frame, not the
//! previous one, lets slow change add up until it counts, and the detector
//! runs at least every [`ChangeTest::refresh`] frames whatever the scene does.

use opencv::core::{Mat, Size};
use opencv::imgproc;
use opencv::prelude::*;

/// Width of the grey image compared, in pixels (its height keeps the frame's
/// aspect): a person a few dozen pixels tall in a 720p frame still covers a
/// few of its pixels.
pub const WIDTH: i32 = 96;

/// How much one grey pixel (0–255) must differ to count as changed: above
/// what sensor grain and compression leave after averaging.
pub const PIXEL_DELTA: u8 = 10;

/// Changed pixels, as a share of the image, that make a frame changed.
pub const CHANGED_SHARE: f64 = 0.002;

/// The pure decision: whether `current` differs from `reference` (grey
/// images of the same size, one byte per pixel) in more than `share` of
/// their pixels by more than `delta` each. Images of different sizes (a
/// camera that changed resolution) always differ.
pub fn changed(reference: &[u8], current: &[u8], delta: u8, share: f64) -> bool {
    if reference.len() != current.len() || current.is_empty() {
        return true;
    }
    let differing = reference
        .iter()
        .zip(current)
        .filter(|(a, b)| a.abs_diff(**b) > delta)
        .count();
    differing as f64 > share * current.len() as f64
}

/// Whether the detector runs on each frame, remembering the small grey image
/// of the last frame it ran on.
pub struct ChangeTest {
    reference: Option<Vec<u8>>,
    unchanged_in_a_row: u32,
    refresh: u32,
}

impl ChangeTest {
    /// `refresh`: the most frames in a row that may repeat detections.
    pub fn new(refresh: u32) -> Self {
        ChangeTest {
            reference: None,
            unchanged_in_a_row: 0,
            refresh: refresh.max(1),
        }
    }

    /// The most frames in a row that repeat detections.
    pub fn refresh(&self) -> u32 {
        self.refresh
    }

    /// True when the detector must run on `frame`; a frame whose small image
    /// cannot be made is treated as changed.
    pub fn must_detect(&mut self, frame: &Mat) -> bool {
        let Ok(small) = small_grey(frame) else {
            self.reference = None;
            return true;
        };
        let run = match &self.reference {
            None => true,
            Some(_) if self.unchanged_in_a_row >= self.refresh => true,
            Some(reference) => changed(reference, &small, PIXEL_DELTA, CHANGED_SHARE),
        };
        if run {
            self.reference = Some(small);
            self.unchanged_in_a_row = 0;
        } else {
            self.unchanged_in_a_row += 1;
        }
        run
    }
}

/// The frame shrunk to [`WIDTH`] pixels wide by area averaging, in grey.
fn small_grey(frame: &Mat) -> opencv::Result<Vec<u8>> {
    let (width, height) = (frame.cols(), frame.rows());
    if width <= 0 || height <= 0 {
        return Err(opencv::Error::new(opencv::core::StsBadArg, "empty frame"));
    }
    let size = Size::new(WIDTH, (height * WIDTH / width).max(1));
    let mut small = Mat::default();
    imgproc::resize(frame, &mut small, size, 0.0, 0.0, imgproc::INTER_AREA)?;
    let mut grey = Mat::default();
    if small.channels() == 1 {
        grey = small;
    } else {
        imgproc::cvt_color_def(&small, &mut grey, imgproc::COLOR_BGR2GRAY)?;
    }
    Ok(grey.data_bytes()?.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_image_or_grain_is_unchanged() {
        let a = vec![100u8; 96 * 54];
        assert!(!changed(&a, &a, PIXEL_DELTA, CHANGED_SHARE));
        let grain: Vec<u8> = (0..a.len()).map(|i| 100 + (i % 7) as u8).collect();
        assert!(!changed(&a, &grain, PIXEL_DELTA, CHANGED_SHARE));
        let darker = vec![95u8; a.len()];
        assert!(!changed(&a, &darker, PIXEL_DELTA, CHANGED_SHARE));
    }

    #[test]
    fn a_small_object_entering_is_a_change() {
        let a = vec![100u8; 96 * 54]; // 5184 pixels; 0.2 % is 10.4
        let mut b = a.clone();
        for pixel in b.iter_mut().take(11) {
            *pixel = 180;
        }
        assert!(changed(&a, &b, PIXEL_DELTA, CHANGED_SHARE));
        let mut c = a.clone();
        for pixel in c.iter_mut().take(10) {
            *pixel = 180;
        }
        assert!(
            !changed(&a, &c, PIXEL_DELTA, CHANGED_SHARE),
            "10 pixels are not enough"
        );
    }

    #[test]
    fn the_threshold_is_strictly_above_delta() {
        let a = vec![100u8; 100];
        let at = vec![110u8; 100];
        let above = vec![111u8; 100];
        assert!(!changed(&a, &at, 10, 0.0));
        assert!(changed(&a, &above, 10, 0.0));
        assert!(changed(&above, &a, 10, 0.0), "in either direction");
    }

    #[test]
    fn different_sizes_or_nothing_are_changes() {
        assert!(changed(&[1, 2, 3], &[1, 2], PIXEL_DELTA, CHANGED_SHARE));
        assert!(changed(&[], &[], PIXEL_DELTA, CHANGED_SHARE));
    }

    fn frame(value: f64) -> Mat {
        Mat::new_rows_cols_with_default(
            72,
            128,
            opencv::core::CV_8UC3,
            opencv::core::Scalar::all(value),
        )
        .unwrap()
    }

    #[test]
    fn the_first_frame_runs_then_only_changes_and_refreshes() {
        let mut test = ChangeTest::new(3);
        assert!(test.must_detect(&frame(50.0)), "nothing to compare with");
        assert!(!test.must_detect(&frame(50.0)));
        assert!(!test.must_detect(&frame(52.0)));
        assert!(test.must_detect(&frame(90.0)), "a change");
        assert!(!test.must_detect(&frame(90.0)));
        assert!(!test.must_detect(&frame(90.0)));
        assert!(!test.must_detect(&frame(90.0)));
        assert!(
            test.must_detect(&frame(90.0)),
            "three repeats, then a refresh"
        );
        assert!(!test.must_detect(&frame(90.0)));
        assert!(
            test.must_detect(&Mat::default()),
            "a frame that cannot be shrunk"
        );
        assert!(test.must_detect(&frame(90.0)), "and no reference after it");
    }

    #[test]
    fn slow_drift_adds_up_against_the_last_detected_frame() {
        let mut test = ChangeTest::new(100);
        assert!(test.must_detect(&frame(50.0)));
        let runs: Vec<bool> = (1..=6)
            .map(|step| test.must_detect(&frame(50.0 + 4.0 * step as f64)))
            .collect();
        // 54, 58 within 10 of 50; 62 is not: it runs and becomes the reference.
        assert_eq!(runs, [false, false, true, false, false, true]);
    }
}
