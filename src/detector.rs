//! Detectors turn a frame into detections. The worker knows only the
//! [`Detector`] trait; adding a model means adding an implementation here and
//! a variant of [`Model`], and touches neither capture nor publishing.

use opencv::core::{Mat, Rect, Size, Vector};
use opencv::imgproc;
use opencv::objdetect::HOGDescriptor;
use opencv::prelude::*;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use crate::cli::Model;
use crate::messages::Detection;

#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    #[error("the frame is empty")]
    EmptyFrame,
    #[error("OpenCV failed while detecting: {0}")]
    OpenCv(#[from] opencv::Error),
}

pub trait Detector: Send {
    /// Detections in pixel coordinates of `frame`.
    fn detect(&mut self, frame: &Mat) -> Result<Vec<Detection>, DetectError>;
}

/// Builds the detector `model` names.
pub fn build(model: Model, seed: Option<u64>) -> Result<Box<dyn Detector>, DetectError> {
    Ok(match model {
        Model::Mock => Box::new(MockDetector::new(seed)),
        Model::Hog => Box::new(HogDetector::new()?),
    })
}

fn frame_size(frame: &Mat) -> Result<(i32, i32), DetectError> {
    let (w, h) = (frame.cols(), frame.rows());
    if w <= 0 || h <= 0 {
        return Err(DetectError::EmptyFrame);
    }
    Ok((w, h))
}

/// Plausible synthetic detections, as the original service produced: up to
/// three objects from a small class list, confidence in [0.3, 0.99], boxes
/// inside the frame. The same seed gives the same sequence.
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

/// OpenCV's built-in HOG + linear SVM people detector (no weights to
/// download). Frames wider than [`HOG_MAX_WIDTH`] are scaled down first and
/// the boxes scaled back to source pixels.
pub struct HogDetector {
    hog: HOGDescriptor,
}

pub const HOG_MAX_WIDTH: i32 = 640;

impl HogDetector {
    pub fn new() -> Result<Self, DetectError> {
        let mut hog = HOGDescriptor::default()?;
        hog.set_svm_detector(HOGDescriptor::get_default_people_detector()?);
        Ok(HogDetector { hog })
    }
}

// SAFETY: the descriptor is owned by exactly one detector, which is used
// from one thread at a time; OpenCV's HOGDescriptor keeps no thread-local state.
unsafe impl Send for HogDetector {}

impl Detector for HogDetector {
    fn detect(&mut self, frame: &Mat) -> Result<Vec<Detection>, DetectError> {
        let (w, h) = frame_size(frame)?;
        let scale = if w > HOG_MAX_WIDTH {
            f64::from(HOG_MAX_WIDTH) / f64::from(w)
        } else {
            1.0
        };
        let mut resized = Mat::default();
        let input = if scale < 1.0 {
            imgproc::resize(
                frame,
                &mut resized,
                Size::new(0, 0),
                scale,
                scale,
                imgproc::INTER_AREA,
            )?;
            &resized
        } else {
            frame
        };
        let mut found = Vector::<Rect>::new();
        let mut weights = Vector::<f64>::new();
        self.hog.detect_multi_scale_weights(
            input,
            &mut found,
            &mut weights,
            0.0,
            Size::new(8, 8),
            Size::new(0, 0),
            1.05,
            2.0,
            false,
        )?;
        Ok(found
            .iter()
            .zip(weights.iter())
            .map(|(r, weight)| hog_detection(r, weight, scale, w, h))
            .collect())
    }
}

/// Maps a HOG hit (in scaled pixels, with its SVM margin) to a detection in
/// source pixels, clipped to the frame.
fn hog_detection(r: Rect, weight: f64, scale: f64, w: i32, h: i32) -> Detection {
    let back = |v: i32| (f64::from(v) / scale).round() as i32;
    let x0 = back(r.x).clamp(0, w);
    let y0 = back(r.y).clamp(0, h);
    let x1 = back(r.x + r.width).clamp(0, w);
    let y1 = back(r.y + r.height).clamp(0, h);
    let confidence = (1.0 / (1.0 + (-weight).exp())) as f32;
    Detection {
        class: "person".to_string(),
        confidence: (confidence * 1000.0).round() / 1000.0,
        bbox: [x0, y0, x1, y1],
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

    #[test]
    fn hog_boxes_scale_back_and_clip_to_the_frame() {
        let d = hog_detection(Rect::new(10, 20, 64, 128), 1.0, 0.5, 100, 200);
        assert_eq!(d.bbox, [20, 40, 100, 200]);
        assert!(d.confidence > 0.5 && d.confidence < 1.0);
    }

    #[test]
    fn empty_frames_are_an_error() {
        let mut mock = MockDetector::new(Some(1));
        assert!(matches!(
            mock.detect(&Mat::default()),
            Err(DetectError::EmptyFrame)
        ));
    }
}
