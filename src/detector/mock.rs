//! Plausible synthetic detections, as the original service produced.

use opencv::core::Mat;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use super::{DetectError, Detector, frame_size};
use crate::messages::Detection;

/// Up to three objects from a small class list, confidence in [0.3, 0.99],
/// boxes inside the frame. The same seed gives the same sequence.
pub struct MockDetector {
    rng: StdRng,
}

const MOCK_CLASSES: &[&str] = &["person", "car", "bicycle", "truck", "dog"];

impl MockDetector {
    pub fn new(seed: Option<u64>) -> Self {
        let rng = match seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::seed_from_u64(rand::random()),
        };
        MockDetector { rng }
    }

    /// Detections for a frame of `width` × `height` pixels.
    pub fn detect_size(&mut self, width: i32, height: i32) -> Vec<Detection> {
        let count = self.rng.random_range(0..=3);
        (0..count)
            .map(|_| {
                let class = MOCK_CLASSES[self.rng.random_range(0..MOCK_CLASSES.len())];
                let bw = self
                    .rng
                    .random_range((width / 12).max(1)..=(width / 3).max(1));
                let bh = self
                    .rng
                    .random_range((height / 8).max(1)..=(height / 2).max(1));
                let x = self.rng.random_range(0..=(width - bw));
                let y = self.rng.random_range(0..=(height - bh));
                let confidence: f32 = self.rng.random_range(0.30..0.99);
                Detection {
                    class: class.to_string(),
                    confidence: (confidence * 100.0).round() / 100.0,
                    bbox: [x, y, x + bw, y + bh],
                }
            })
            .collect()
    }
}

impl Detector for MockDetector {
    fn detect(&mut self, frame: &Mat) -> Result<Vec<Detection>, DetectError> {
        let (w, h) = frame_size(frame)?;
        Ok(self.detect_size(w, h))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mock_detections_are_plausible_and_reproducible() {
        let mut a = MockDetector::new(Some(7));
        let mut b = MockDetector::new(Some(7));
        let mut total = 0;
        for _ in 0..200 {
            let da = a.detect_size(768, 576);
            assert_eq!(da, b.detect_size(768, 576));
            for d in &da {
                assert!(MOCK_CLASSES.contains(&d.class.as_str()));
                assert!((0.0..=1.0).contains(&d.confidence));
                let [x0, y0, x1, y1] = d.bbox;
                assert!(0 <= x0 && x0 < x1 && x1 <= 768, "{:?}", d.bbox);
                assert!(0 <= y0 && y0 < y1 && y1 <= 576, "{:?}", d.bbox);
            }
            total += da.len();
        }
        assert!(total > 100, "mock should detect something most of the time");
    }
}
