//! Detectors turn a frame into detections. The worker knows only the
//! [`Detector`] trait; adding a model means adding an implementation here and
//! a variant of [`Model`], and touches neither capture nor publishing.

mod hog;
mod mock;
pub mod settings;
mod yolo;

use std::path::PathBuf;

use opencv::core::Mat;
use opencv::prelude::*;

/// Which detector a worker runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Model {
    /// Plausible synthetic detections (reproducible with MOCK_SEED).
    Mock,
    /// OpenCV's built-in HOG people detector.
    Hog,
    /// YOLOv4-tiny (80 COCO classes), int8 through ONNX Runtime; files in MODEL_DIR.
    Yolo,
}

impl Model {
    /// The name used on the command line and in worker Pods' `MODEL`.
    pub fn as_str(self) -> &'static str {
        match self {
            Model::Mock => "mock",
            Model::Hog => "hog",
            Model::Yolo => "yolo",
        }
    }
}

pub use hog::{HOG_MAX_WIDTH, HogDetector};
pub use mock::MockDetector;
pub use settings::{ClassFilter, InputSize, Threshold};
pub use yolo::{YoloConfig, YoloDetector};

#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    #[error("the frame is empty")]
    EmptyFrame,
    #[error("OpenCV failed while detecting: {0}")]
    OpenCv(#[from] opencv::Error),
    #[error("model file {path}: {problem}; {fix}", path = path.display())]
    ModelFile {
        path: PathBuf,
        problem: String,
        fix: &'static str,
    },
    #[error("ONNX Runtime failed while detecting: {0}")]
    Runtime(String),
    #[error(
        "DETECT_CLASSES names {class:?}, which the model does not know; known classes are {known}"
    )]
    UnknownClass { class: String, known: String },
}

pub trait Detector: Send {
    /// Detections in pixel coordinates of `frame`.
    fn detect(&mut self, frame: &Mat) -> Result<Vec<crate::messages::Detection>, DetectError>;
}

/// Everything needed to build a worker's detector.
#[derive(Debug, Clone)]
pub struct DetectorConfig {
    pub model: Model,
    pub mock_seed: Option<u64>,
    pub yolo: YoloConfig,
    /// Inference threads: OpenCV's (process-wide, HOG) and ONNX Runtime's (YOLO).
    pub threads: u32,
}

/// Builds the detector `config.model` names. Loading a model file that is
/// missing or corrupt is an error naming the file, never a fallback.
pub fn build(config: &DetectorConfig) -> Result<Box<dyn Detector>, DetectError> {
    opencv::core::set_num_threads(i32::try_from(config.threads).unwrap_or(i32::MAX))?;
    Ok(match config.model {
        Model::Mock => Box::new(MockDetector::new(config.mock_seed)),
        Model::Hog => Box::new(HogDetector::new()?),
        Model::Yolo => Box::new(YoloDetector::load(&config.yolo, config.threads)?),
    })
}

fn frame_size(frame: &Mat) -> Result<(i32, i32), DetectError> {
    let (w, h) = (frame.cols(), frame.rows());
    if w <= 0 || h <= 0 {
        return Err(DetectError::EmptyFrame);
    }
    Ok((w, h))
}

/// A box given as floating-point corners, rounded and clipped to a
/// `w` × `h` frame: `[x_min, y_min, x_max, y_max]` in source pixels.
fn clip_box(x0: f64, y0: f64, x1: f64, y1: f64, w: i32, h: i32) -> [i32; 4] {
    let clip = |v: f64, max: i32| (v.round() as i32).clamp(0, max);
    [clip(x0, w), clip(y0, h), clip(x1, w), clip(y1, h)]
}

/// A confidence rounded to three decimals, as published.
fn round_confidence(confidence: f32) -> f32 {
    (confidence.clamp(0.0, 1.0) * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boxes_are_clipped_to_the_frame() {
        assert_eq!(
            clip_box(-5.2, 3.6, 120.4, 260.0, 100, 200),
            [0, 4, 100, 200]
        );
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
