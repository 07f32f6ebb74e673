//! YOLOv4-tiny (80 COCO classes) run with OpenCV's DNN module on the CPU.
//!
//! The network takes the frame stretched to a square of `input_size` pixels,
//! RGB scaled to 0–1. Each of its two YOLO output layers is a matrix with one
//! row per anchor box: `[cx, cy, w, h, objectness, score per class…]`, the box
//! normalised to 0–1 of the frame; OpenCV already multiplies each class score
//! by the objectness. Rows are kept when their best class score reaches the
//! confidence threshold, then non-maximum suppression runs per class.

use std::path::{Path, PathBuf};

use opencv::core::{self, Mat, Rect, Scalar, Size, Vector};
use opencv::dnn;
use opencv::prelude::*;

use super::settings::{ClassFilter, InputSize, Threshold};
use super::{DetectError, Detector, clip_box, frame_size, round_confidence};
use crate::messages::Detection;

pub const CFG_FILE: &str = "yolov4-tiny.cfg";
pub const WEIGHTS_FILE: &str = "yolov4-tiny.weights";
pub const NAMES_FILE: &str = "coco.names";
/// Size of the upstream Darknet release of yolov4-tiny.weights. OpenCV reads
/// a truncated weights file without complaint, so the size is checked first.
pub const WEIGHTS_BYTES: u64 = 24_251_276;

const FETCH_HINT: &str = "run scripts/fetch-model to fetch YOLOv4-tiny, or point MODEL_DIR at a directory with yolov4-tiny.cfg, yolov4-tiny.weights and coco.names";

#[derive(Debug, Clone)]
pub struct YoloConfig {
    /// Directory with yolov4-tiny.cfg, yolov4-tiny.weights and coco.names.
    pub model_dir: PathBuf,
    pub confidence: Threshold,
    pub nms: Threshold,
    pub input_size: InputSize,
    pub classes: ClassFilter,
}

pub struct YoloDetector {
    net: dnn::Net,
    outputs: Vector<String>,
    classes: Vec<String>,
    wanted: Vec<bool>,
    confidence: f32,
    nms: f32,
    input_size: i32,
}

// SAFETY: the network is owned by exactly one detector, which is used from
// one thread at a time; OpenCV's Net keeps no thread-local state.
unsafe impl Send for YoloDetector {}

impl YoloDetector {
    /// Loads the model from `config.model_dir` and checks it with one
    /// inference: a missing, truncated or unreadable file is an error naming it.
    pub fn load(config: &YoloConfig) -> Result<Self, DetectError> {
        let dir = &config.model_dir;
        let names_path = dir.join(NAMES_FILE);
        let cfg_path = dir.join(CFG_FILE);
        let weights_path = dir.join(WEIGHTS_FILE);

        let names = std::fs::read_to_string(&names_path).map_err(|e| model_file(&names_path, e))?;
        let classes = class_names(&names);
        if classes.is_empty() {
            return Err(model_file(&names_path, "lists no class names"));
        }
        std::fs::metadata(&cfg_path).map_err(|e| model_file(&cfg_path, e))?;
        let size = std::fs::metadata(&weights_path)
            .map_err(|e| model_file(&weights_path, e))?
            .len();
        if size != WEIGHTS_BYTES {
            return Err(model_file(
                &weights_path,
                format!(
                    "has {size} bytes, not the {WEIGHTS_BYTES} of YOLOv4-tiny's weights (truncated or another model)"
                ),
            ));
        }
        let wanted = class_mask(&classes, &config.classes)?;

        let mut net =
            dnn::read_net_from_darknet(&cfg_path, &path_str(&weights_path)).map_err(|e| {
                model_file(
                    &cfg_path,
                    format!("cannot be loaded by OpenCV: {}", e.message),
                )
            })?;
        net.set_preferable_backend(dnn::DNN_BACKEND_OPENCV)?;
        net.set_preferable_target(dnn::DNN_TARGET_CPU)?;
        let outputs = net.get_unconnected_out_layers_names()?;
        let mut detector = YoloDetector {
            net,
            outputs,
            classes,
            wanted,
            confidence: config.confidence.get(),
            nms: config.nms.get(),
            input_size: config.input_size.get(),
        };
        detector.self_check(&weights_path)?;
        Ok(detector)
    }

    /// The class names the model reports, in its order.
    pub fn class_names(&self) -> &[String] {
        &self.classes
    }

    fn forward(&mut self, frame: &Mat) -> Result<Vector<Mat>, DetectError> {
        let side = self.input_size;
        let blob = dnn::blob_from_image(
            frame,
            1.0 / 255.0,
            Size::new(side, side),
            Scalar::default(),
            true,
            false,
            core::CV_32F,
        )?;
        self.net.set_input(&blob, "", 1.0, Scalar::default())?;
        let mut outs = Vector::<Mat>::new();
        self.net.forward(&mut outs, &self.outputs)?;
        Ok(outs)
    }

    /// One inference on a grey frame: the outputs must have one column per
    /// class plus five and hold finite numbers, or the files do not match.
    fn self_check(&mut self, weights: &Path) -> Result<(), DetectError> {
        let grey = Mat::new_rows_cols_with_default(
            self.input_size,
            self.input_size,
            core::CV_8UC3,
            Scalar::all(127.0),
        )?;
        let outs = self.forward(&grey)?;
        let columns = self.classes.len() as i32 + 5;
        for out in &outs {
            if out.cols() != columns {
                return Err(model_file(
                    weights,
                    format!(
                        "gives {} values per box, not the {columns} that {} classes need",
                        out.cols(),
                        self.classes.len()
                    ),
                ));
            }
            for r in 0..out.rows() {
                if out.at_row::<f32>(r)?.iter().any(|v| !v.is_finite()) {
                    return Err(model_file(
                        weights,
                        "gives non-finite outputs (corrupt weights)",
                    ));
                }
            }
        }
        Ok(())
    }
}

impl Detector for YoloDetector {
    fn detect(&mut self, frame: &Mat) -> Result<Vec<Detection>, DetectError> {
        let (w, h) = frame_size(frame)?;
        let outs = self.forward(frame)?;
        let mut candidates = Vec::new();
        for out in &outs {
            for r in 0..out.rows() {
                if let Some(c) = candidate(out.at_row::<f32>(r)?, &self.wanted, self.confidence) {
                    candidates.push(c);
                }
            }
        }
        let kept = suppress(&candidates, w, h, self.confidence, self.nms)?;
        Ok(kept
            .into_iter()
            .map(|c| Detection {
                class: self.classes[c.class].clone(),
                confidence: round_confidence(c.score),
                bbox: c.bbox(w, h),
            })
            .collect())
    }
}

/// One box the network proposes, normalised to the frame.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Candidate {
    class: usize,
    score: f32,
    cx: f32,
    cy: f32,
    w: f32,
    h: f32,
}

impl Candidate {
    /// `[x_min, y_min, x_max, y_max]` in pixels of a `w` × `h` frame, clipped.
    fn bbox(&self, w: i32, h: i32) -> [i32; 4] {
        let (fw, fh) = (f64::from(w), f64::from(h));
        let (cx, cy) = (f64::from(self.cx) * fw, f64::from(self.cy) * fh);
        let (bw, bh) = (f64::from(self.w) * fw, f64::from(self.h) * fh);
        clip_box(
            cx - bw / 2.0,
            cy - bh / 2.0,
            cx + bw / 2.0,
            cy + bh / 2.0,
            w,
            h,
        )
    }
}

/// The best wanted class of one output row, if its score reaches `threshold`.
fn candidate(row: &[f32], wanted: &[bool], threshold: f32) -> Option<Candidate> {
    let [cx, cy, w, h, _objectness, scores @ ..] = row else {
        return None;
    };
    let (class, score) = scores
        .iter()
        .zip(wanted)
        .enumerate()
        .filter(|(_, (_, wanted))| **wanted)
        .map(|(i, (s, _))| (i, *s))
        .max_by(|a, b| a.1.total_cmp(&b.1))?;
    (score >= threshold && score > 0.0).then_some(Candidate {
        class,
        score,
        cx: *cx,
        cy: *cy,
        w: *w,
        h: *h,
    })
}

/// Non-maximum suppression per class (OpenCV's NMSBoxes on source pixels);
/// the result is sorted by falling score.
fn suppress(
    candidates: &[Candidate],
    w: i32,
    h: i32,
    threshold: f32,
    nms: f32,
) -> Result<Vec<Candidate>, DetectError> {
    let mut kept = Vec::new();
    let mut classes: Vec<usize> = candidates.iter().map(|c| c.class).collect();
    classes.sort_unstable();
    classes.dedup();
    for class in classes {
        let of_class: Vec<&Candidate> = candidates.iter().filter(|c| c.class == class).collect();
        let boxes: Vector<Rect> = of_class
            .iter()
            .map(|c| {
                let [x0, y0, x1, y1] = c.bbox(w, h);
                Rect::new(x0, y0, x1 - x0, y1 - y0)
            })
            .collect();
        let scores: Vector<f32> = of_class.iter().map(|c| c.score).collect();
        let mut indices = Vector::<i32>::new();
        dnn::nms_boxes(&boxes, &scores, threshold, nms, &mut indices, 1.0, 0)?;
        kept.extend(indices.iter().map(|i| *of_class[i as usize]));
    }
    kept.sort_by(|a, b| b.score.total_cmp(&a.score));
    Ok(kept)
}

/// The class names of a Darknet `.names` file, one a line.
fn class_names(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// Which class indices are reported; every name in `filter` must be known.
fn class_mask(classes: &[String], filter: &ClassFilter) -> Result<Vec<bool>, DetectError> {
    if filter.names().is_empty() {
        return Ok(vec![true; classes.len()]);
    }
    let mut wanted = vec![false; classes.len()];
    for name in filter.names() {
        let index = classes
            .iter()
            .position(|c| c.eq_ignore_ascii_case(name))
            .ok_or_else(|| DetectError::UnknownClass {
                class: name.clone(),
                known: classes.join(", "),
            })?;
        wanted[index] = true;
    }
    Ok(wanted)
}

fn model_file(path: &Path, problem: impl std::fmt::Display) -> DetectError {
    DetectError::ModelFile {
        path: path.to_path_buf(),
        problem: problem.to_string(),
        fix: FETCH_HINT,
    }
}

fn path_str(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(cx: f32, cy: f32, w: f32, h: f32, scores: &[f32]) -> Vec<f32> {
        let mut r = vec![cx, cy, w, h, 0.9];
        r.extend_from_slice(scores);
        r
    }

    #[test]
    fn rows_below_the_threshold_or_unwanted_are_dropped() {
        let all = [true, true, true];
        let r = row(0.5, 0.5, 0.2, 0.4, &[0.1, 0.7, 0.3]);
        let c = candidate(&r, &all, 0.5).unwrap();
        assert_eq!((c.class, c.score), (1, 0.7));
        assert!(candidate(&r, &all, 0.8).is_none());
        assert!(candidate(&r, &[true, false, true], 0.5).is_none());
        let c = candidate(&r, &[true, false, true], 0.2).unwrap();
        assert_eq!(c.class, 2);
        assert!(candidate(&[0.5, 0.5], &all, 0.5).is_none());
    }

    #[test]
    fn boxes_map_to_source_pixels_clipped_to_the_frame() {
        let c = Candidate {
            class: 0,
            score: 0.9,
            cx: 0.5,
            cy: 0.5,
            w: 0.25,
            h: 0.5,
        };
        assert_eq!(c.bbox(768, 576), [288, 144, 480, 432]);
        let edge = Candidate {
            cx: 0.02,
            cy: 0.98,
            w: 0.1,
            h: 0.1,
            ..c
        };
        assert_eq!(edge.bbox(100, 100), [0, 93, 7, 100]);
    }

    #[test]
    fn overlapping_boxes_of_one_class_are_merged_not_across_classes() {
        let a = Candidate {
            class: 0,
            score: 0.9,
            cx: 0.5,
            cy: 0.5,
            w: 0.2,
            h: 0.4,
        };
        let b = Candidate {
            score: 0.8,
            cx: 0.51,
            ..a
        };
        let other = Candidate {
            class: 2,
            score: 0.6,
            ..a
        };
        let far = Candidate {
            score: 0.7,
            cx: 0.1,
            ..a
        };
        let kept = suppress(&[b, a, other, far], 640, 480, 0.5, 0.45).unwrap();
        assert_eq!(kept, vec![a, far, other]);
    }

    #[test]
    fn class_filter_names_must_be_known() {
        let classes = class_names("person\nbicycle\n\ncar\n");
        assert_eq!(classes, ["person", "bicycle", "car"]);
        let mask = class_mask(&classes, &"car,Person".parse().unwrap()).unwrap();
        assert_eq!(mask, [true, false, true]);
        let err = class_mask(&classes, &"unicorn".parse().unwrap()).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("unicorn") && text.contains("person, bicycle, car"),
            "{text}"
        );
    }

    #[test]
    fn a_missing_model_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let config = YoloConfig {
            model_dir: dir.path().to_path_buf(),
            confidence: "0.5".parse().unwrap(),
            nms: "0.45".parse().unwrap(),
            input_size: InputSize::default(),
            classes: ClassFilter::default(),
        };
        let text = YoloDetector::load(&config).err().unwrap().to_string();
        assert!(
            text.contains(&dir.path().join(NAMES_FILE).display().to_string())
                && text.contains("scripts/fetch-model"),
            "{text}"
        );
        std::fs::write(dir.path().join(NAMES_FILE), "person\n").unwrap();
        std::fs::write(dir.path().join(CFG_FILE), "[net]\n").unwrap();
        std::fs::write(dir.path().join(WEIGHTS_FILE), b"short").unwrap();
        let text = YoloDetector::load(&config).err().unwrap().to_string();
        assert!(
            text.contains(&dir.path().join(WEIGHTS_FILE).display().to_string())
                && text.contains("truncated"),
            "{text}"
        );
    }
}
