//! YOLOv4-tiny (80 COCO classes) run by ONNX Runtime on the CPU, int8.
//!
//! scripts/fetch-model converts the Darknet release to ONNX and quantises it
//! to int8 (scripts/yolo-onnx.py), and puts ONNX Runtime's C library beside
//! it; the worker loads that library at start-up. The library's code and the
//! model file are mapped read-only, so workers on one node share those pages.
//!
//! The network takes the frame stretched to a square of `input_size` pixels,
//! RGB scaled to 0–1 (OpenCV's `blobFromImage`). Its outputs are the raw
//! convolutions in front of the Darknet `[yolo]` layers, one per layer of the
//! .cfg in order: `3 × (5 + classes)` channels on a grid, per anchor
//! `[tx, ty, tw, th, objectness, class logits…]`. Decoding follows Darknet
//! (and OpenCV's region layer): the box centre is
//! `(cell + sigmoid(t) × scale_x_y − (scale_x_y − 1) / 2) / grid`, the size
//! `exp(t) × anchor / input`, a class score `sigmoid(objectness) ×
//! sigmoid(logit)`. Boxes whose best wanted class score reaches the confidence
//! threshold are kept, then non-maximum suppression runs per class.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use opencv::core::{self, Mat, Rect, Scalar, Size, Vector};
use opencv::dnn;
use opencv::prelude::*;
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::TensorRef;

use super::settings::{ClassFilter, InputSize, Threshold};
use super::{DetectError, Detector, clip_box, frame_size, round_confidence};
use crate::messages::Detection;

pub const CFG_FILE: &str = "yolov4-tiny.cfg";
pub const NAMES_FILE: &str = "coco.names";
/// The int8 network scripts/fetch-model makes from the Darknet files.
pub const ONNX_FILE: &str = "yolov4-tiny-int8.onnx";
/// ONNX Runtime's C library (PyPI's onnxruntime 1.22.1), loaded at start-up.
pub const RUNTIME_FILE: &str = "libonnxruntime.so.1.22.1";
const INPUT: &str = "images";

const FETCH_HINT: &str = "run scripts/fetch-model to fetch and convert YOLOv4-tiny, or point MODEL_DIR at a directory with yolov4-tiny.cfg, coco.names, yolov4-tiny-int8.onnx and libonnxruntime.so.1.22.1";

#[derive(Debug, Clone)]
pub struct YoloConfig {
    /// Directory with the files scripts/fetch-model prepares.
    pub model_dir: PathBuf,
    pub confidence: Threshold,
    pub nms: Threshold,
    pub input_size: InputSize,
    pub classes: ClassFilter,
}

/// One Darknet `[yolo]` layer: the anchors (pixels of the network input)
/// its output's three boxes per cell use, and its centre scale.
#[derive(Debug, Clone, PartialEq)]
struct Head {
    anchors: Vec<(f32, f32)>,
    scale_xy: f32,
}

pub struct YoloDetector {
    session: Session,
    outputs: Vec<String>,
    heads: Vec<Head>,
    classes: Vec<String>,
    wanted: Vec<bool>,
    confidence: f32,
    nms: f32,
    input_size: i32,
}

impl YoloDetector {
    /// Loads the model from `config.model_dir` with `threads` inference
    /// threads and checks it with one inference: a missing, truncated or
    /// unreadable file is an error naming it.
    pub fn load(config: &YoloConfig, threads: u32) -> Result<Self, DetectError> {
        let dir = &config.model_dir;
        let names_path = dir.join(NAMES_FILE);
        let cfg_path = dir.join(CFG_FILE);
        let onnx_path = dir.join(ONNX_FILE);
        let runtime_path = dir.join(RUNTIME_FILE);

        let names = std::fs::read_to_string(&names_path).map_err(|e| model_file(&names_path, e))?;
        let classes = class_names(&names);
        if classes.is_empty() {
            return Err(model_file(&names_path, "lists no class names"));
        }
        let cfg = std::fs::read_to_string(&cfg_path).map_err(|e| model_file(&cfg_path, e))?;
        let heads = yolo_heads(&cfg).map_err(|e| model_file(&cfg_path, e))?;
        std::fs::metadata(&onnx_path).map_err(|e| model_file(&onnx_path, e))?;
        let wanted = class_mask(&classes, &config.classes)?;

        load_runtime(&runtime_path)?;
        let threads = usize::try_from(threads).unwrap_or(1);
        let session = ort_call(&onnx_path, || {
            Session::builder()?
                .with_optimization_level(GraphOptimizationLevel::Level3)?
                .with_intra_threads(threads)?
                .with_inter_threads(1)?
                .commit_from_file(&onnx_path)
        })?;
        let outputs: Vec<String> = session.outputs.iter().map(|o| o.name.clone()).collect();
        if outputs.len() != heads.len() {
            return Err(model_file(
                &onnx_path,
                format!(
                    "has {} outputs, not one per [yolo] layer of {CFG_FILE} ({}); rerun scripts/fetch-model",
                    outputs.len(),
                    heads.len()
                ),
            ));
        }
        let mut detector = YoloDetector {
            session,
            outputs,
            heads,
            classes,
            wanted,
            confidence: config.confidence.get(),
            nms: config.nms.get(),
            input_size: config.input_size.get(),
        };
        detector.self_check(&onnx_path)?;
        release_freed_heap();
        Ok(detector)
    }

    /// The class names the model reports, in its order.
    pub fn class_names(&self) -> &[String] {
        &self.classes
    }

    /// Runs the network on `frame` and decodes every head's boxes whose
    /// score reaches `threshold` (normalised to the frame).
    fn infer(&mut self, frame: &Mat, threshold: f32) -> Result<Vec<Candidate>, DetectError> {
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
        let side = side as usize;
        let input =
            TensorRef::from_array_view(([1usize, 3, side, side], blob.data_typed::<f32>()?))
                .map_err(runtime_error)?;
        let outputs = self
            .session
            .run(ort::inputs![INPUT => input])
            .map_err(runtime_error)?;
        let mut candidates = Vec::new();
        for (name, head) in self.outputs.iter().zip(&self.heads) {
            let (shape, data) = outputs[name.as_str()]
                .try_extract_tensor::<f32>()
                .map_err(runtime_error)?;
            let grid =
                Grid::of(shape, head.anchors.len(), self.classes.len()).ok_or_else(|| {
                    DetectError::Runtime(format!(
                        "output {name} has shape {shape:?}, not 1×{}×H×W",
                        head.anchors.len() * (self.classes.len() + 5)
                    ))
                })?;
            decode(
                data,
                grid,
                head,
                side as f32,
                &self.wanted,
                threshold,
                &mut candidates,
            );
        }
        Ok(candidates)
    }

    /// One inference on a grey frame: every output must hold finite
    /// numbers, or the model file is corrupt.
    fn self_check(&mut self, onnx: &Path) -> Result<(), DetectError> {
        let grey = Mat::new_rows_cols_with_default(
            self.input_size,
            self.input_size,
            core::CV_8UC3,
            Scalar::all(127.0),
        )?;
        let kept = self.infer(&grey, 0.0).map_err(|e| model_file(onnx, e))?;
        if kept.iter().any(|c| {
            ![c.score, c.cx, c.cy, c.w, c.h]
                .iter()
                .all(|v| v.is_finite())
        }) {
            return Err(model_file(onnx, "gives non-finite outputs (corrupt model)"));
        }
        Ok(())
    }
}

impl Detector for YoloDetector {
    fn detect(&mut self, frame: &Mat) -> Result<Vec<Detection>, DetectError> {
        let (w, h) = frame_size(frame)?;
        let candidates = self.infer(frame, self.confidence)?;
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

/// Loads ONNX Runtime's library once per process; a missing or unusable
/// library is an error naming it.
fn load_runtime(path: &Path) -> Result<(), DetectError> {
    static LOADED: OnceLock<Result<(), String>> = OnceLock::new();
    std::fs::metadata(path).map_err(|e| model_file(path, e))?;
    LOADED
        .get_or_init(|| {
            ort_call(path, || {
                ort::init_from(path.display().to_string())
                    .with_name("vap-runner")
                    .with_telemetry(false)
                    .commit()
            })
            .map(|_| ())
            .map_err(|e| e.to_string())
        })
        .clone()
        .map_err(DetectError::Runtime)
}

/// Runs a call into ONNX Runtime that loads `file`; its errors, and the
/// panic `ort` raises when the library cannot be loaded, name the file.
fn ort_call<T>(file: &Path, call: impl FnOnce() -> ort::Result<T>) -> Result<T, DetectError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(call)) {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(model_file(file, format!("cannot be loaded: {e}"))),
        Err(_) => Err(model_file(file, "cannot be loaded as ONNX Runtime 1.22")),
    }
}

/// Loading parses the whole model file on the heap and frees it again; hand
/// those pages back to the system instead of keeping them for later.
fn release_freed_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap memory to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn runtime_error(e: ort::Error) -> DetectError {
    DetectError::Runtime(e.to_string())
}

/// The `[yolo]` layers of a Darknet .cfg, in order: anchors picked by `mask`
/// and `scale_x_y` (1 when absent).
fn yolo_heads(cfg: &str) -> Result<Vec<Head>, String> {
    let mut sections: Vec<(String, Vec<(String, String)>)> = Vec::new();
    for line in cfg.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            sections.push((name.trim().to_string(), Vec::new()));
        } else if let (Some((key, value)), Some(section)) =
            (line.split_once('='), sections.last_mut())
        {
            section
                .1
                .push((key.trim().to_string(), value.trim().to_string()));
        }
    }
    let numbers = |text: &str| -> Result<Vec<f32>, String> {
        text.split(',')
            .map(|v| {
                v.trim()
                    .parse::<f32>()
                    .map_err(|_| format!("{text:?} is not a list of numbers"))
            })
            .collect()
    };
    let mut heads = Vec::new();
    for (_, keys) in sections.iter().filter(|(name, _)| name == "yolo") {
        let get = |key: &str| keys.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
        let anchors = numbers(get("anchors").ok_or("a [yolo] layer has no anchors")?)?;
        let mask = numbers(get("mask").ok_or("a [yolo] layer has no mask")?)?;
        let anchors = mask
            .iter()
            .map(|&m| {
                let i = m as usize * 2;
                anchors
                    .get(i..i + 2)
                    .map(|a| (a[0], a[1]))
                    .ok_or_else(|| format!("mask {m} names no anchor"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let scale_xy = get("scale_x_y")
            .map(&numbers)
            .transpose()?
            .map_or(1.0, |v| v[0]);
        heads.push(Head { anchors, scale_xy });
    }
    if heads.is_empty() {
        return Err("has no [yolo] layer".to_string());
    }
    Ok(heads)
}

/// The layout of one head's output: `boxes × (5 + classes)` channels of
/// `rows × cols` cells.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Grid {
    rows: usize,
    cols: usize,
    boxes: usize,
    classes: usize,
}

impl Grid {
    fn of(shape: &[i64], boxes: usize, classes: usize) -> Option<Grid> {
        let [1, channels, rows, cols] = *shape else {
            return None;
        };
        let (rows, cols) = (usize::try_from(rows).ok()?, usize::try_from(cols).ok()?);
        (usize::try_from(channels).ok()? == boxes * (classes + 5) && rows > 0 && cols > 0)
            .then_some(Grid {
                rows,
                cols,
                boxes,
                classes,
            })
    }
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Appends the boxes of one head whose best wanted class score reaches
/// `threshold`; `input` is the side of the network input in pixels.
fn decode(
    data: &[f32],
    grid: Grid,
    head: &Head,
    input: f32,
    wanted: &[bool],
    threshold: f32,
    out: &mut Vec<Candidate>,
) {
    let cells = grid.rows * grid.cols;
    let channel =
        |b: usize, c: usize, cell: usize| data[(b * (grid.classes + 5) + c) * cells + cell];
    let shift = (head.scale_xy - 1.0) / 2.0;
    for (b, &(anchor_w, anchor_h)) in head.anchors.iter().enumerate().take(grid.boxes) {
        for cell in 0..cells {
            let objectness = sigmoid(channel(b, 4, cell));
            // A class score is at most the objectness.
            if objectness < threshold || objectness <= 0.0 {
                continue;
            }
            let best = (0..grid.classes)
                .filter(|&k| wanted[k])
                .map(|k| (k, channel(b, 5 + k, cell)))
                .max_by(|a, b| a.1.total_cmp(&b.1));
            let Some((class, logit)) = best else {
                return;
            };
            let score = objectness * sigmoid(logit);
            if score < threshold || score <= 0.0 {
                continue;
            }
            let (row, col) = ((cell / grid.cols) as f32, (cell % grid.cols) as f32);
            out.push(Candidate {
                class,
                score,
                cx: (col + sigmoid(channel(b, 0, cell)) * head.scale_xy - shift) / grid.cols as f32,
                cy: (row + sigmoid(channel(b, 1, cell)) * head.scale_xy - shift) / grid.rows as f32,
                w: channel(b, 2, cell).exp() * anchor_w / input,
                h: channel(b, 3, cell).exp() * anchor_h / input,
            });
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn logit(p: f32) -> f32 {
        (p / (1.0 - p)).ln()
    }

    #[test]
    fn heads_are_decoded_as_darknet_does() {
        let head = Head {
            anchors: vec![(10.0, 14.0), (23.0, 27.0)],
            scale_xy: 1.05,
        };
        let grid = Grid::of(&[1, 2 * 8, 2, 3], 2, 3).unwrap();
        assert_eq!(Grid::of(&[1, 15, 2, 3], 2, 3), None);
        let cells = 6;
        let mut data = vec![-20.0f32; 2 * 8 * cells];
        let mut set =
            |b: usize, c: usize, cell: usize, v: f32| data[(b * 8 + c) * cells + cell] = v;
        // Box 1 in row 1, column 2 (cell 5): objectness 0.9, class 1 at 0.8.
        for (c, v) in [
            (0, 0.0),
            (1, 0.0),
            (2, 0.0),
            (3, 1.0f32.ln() + 2.0f32.ln()),
            (4, logit(0.9)),
        ] {
            set(1, c, 5, v);
        }
        set(1, 5, 5, logit(0.1));
        set(1, 6, 5, logit(0.8));
        set(1, 7, 5, logit(0.3));
        let all = [true, true, true];
        let mut out = Vec::new();
        decode(&data, grid, &head, 416.0, &all, 0.5, &mut out);
        assert_eq!(out.len(), 1, "{out:?}");
        let c = out[0];
        assert_eq!(c.class, 1);
        assert!((c.score - 0.72).abs() < 1e-5, "{c:?}");
        assert!(
            (c.cx - 2.5 / 3.0).abs() < 1e-6 && (c.cy - 1.5 / 2.0).abs() < 1e-6,
            "{c:?}"
        );
        assert!(
            (c.w - 23.0 / 416.0).abs() < 1e-6 && (c.h - 54.0 / 416.0).abs() < 1e-5,
            "{c:?}"
        );
        // Below the threshold, or only unwanted classes above it.
        out.clear();
        decode(&data, grid, &head, 416.0, &all, 0.75, &mut out);
        assert!(out.is_empty());
        decode(
            &data,
            grid,
            &head,
            416.0,
            &[true, false, true],
            0.2,
            &mut out,
        );
        assert_eq!((out.len(), out[0].class), (1, 2));
    }

    #[test]
    fn yolo_layers_come_from_the_cfg() {
        let cfg = "[net]\nwidth=416\n[convolutional]\nfilters=255\n[yolo]\nmask = 3,4,5\nanchors = 10,14,  23,27,  37,58,  81,82,  135,169,  344,319\nscale_x_y = 1.05\n[route]\nlayers=-4\n[yolo]\nmask = 0,1 # two\nanchors = 10,14, 23,27\n";
        let heads = yolo_heads(cfg).unwrap();
        assert_eq!(
            heads,
            [
                Head {
                    anchors: vec![(81.0, 82.0), (135.0, 169.0), (344.0, 319.0)],
                    scale_xy: 1.05
                },
                Head {
                    anchors: vec![(10.0, 14.0), (23.0, 27.0)],
                    scale_xy: 1.0
                }
            ]
        );
        assert!(yolo_heads("[net]\n").unwrap_err().contains("no [yolo]"));
        assert!(
            yolo_heads("[yolo]\nmask=7\nanchors=1,2\n")
                .unwrap_err()
                .contains("mask 7")
        );
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
        let text = YoloDetector::load(&config, 1).err().unwrap().to_string();
        assert!(
            text.contains(&dir.path().join(NAMES_FILE).display().to_string())
                && text.contains("scripts/fetch-model"),
            "{text}"
        );
        std::fs::write(dir.path().join(NAMES_FILE), "person\n").unwrap();
        std::fs::write(dir.path().join(CFG_FILE), "[net]\n").unwrap();
        let text = YoloDetector::load(&config, 1).err().unwrap().to_string();
        assert!(
            text.contains(&dir.path().join(CFG_FILE).display().to_string())
                && text.contains("no [yolo] layer"),
            "{text}"
        );
        std::fs::write(dir.path().join(CFG_FILE), "[yolo]\nmask=0\nanchors=10,14\n").unwrap();
        let text = YoloDetector::load(&config, 1).err().unwrap().to_string();
        assert!(
            text.contains(&dir.path().join(ONNX_FILE).display().to_string()),
            "{text}"
        );
    }
}
