//! OpenCV's built-in HOG + linear SVM people detector (no weights to download).

use opencv::core::{Mat, Rect, Size, Vector};
use opencv::imgproc;
use opencv::objdetect::HOGDescriptor;
use opencv::prelude::*;

use super::{DetectError, Detector, clip_box, frame_size, round_confidence};
use crate::messages::Detection;

/// Frames wider than [`HOG_MAX_WIDTH`] are scaled down first and the boxes
/// scaled back to source pixels.
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
    let back = |v: i32| f64::from(v) / scale;
    let confidence = (1.0 / (1.0 + (-weight).exp())) as f32;
    Detection {
        class: "person".to_string(),
        confidence: round_confidence(confidence),
        bbox: clip_box(
            back(r.x),
            back(r.y),
            back(r.x + r.width),
            back(r.y + r.height),
            w,
            h,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hog_boxes_scale_back_and_clip_to_the_frame() {
        let d = hog_detection(Rect::new(10, 20, 64, 128), 1.0, 0.5, 100, 200);
        assert_eq!(d.bbox, [20, 40, 100, 200]);
        assert!(d.confidence > 0.5 && d.confidence < 1.0);
    }
}
