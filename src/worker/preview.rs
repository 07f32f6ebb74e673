//! `/preview.jpg`: the latest processed frame with its detections drawn, for a
//! person checking what the model sees.
//!
//! Nothing is drawn or encoded until somebody asks. The detection thread only
//! moves the frame it has finished with into a one-slot [`Preview`] (a pointer
//! move; the previous frame's pixels are freed then instead of a frame
//! earlier), and a request scales it to at most [`MAX_SIDE`] pixels on its
//! longer side, draws the boxes and labels and encodes a JPEG. One encoding
//! serves every request until the next frame is processed, so a page that
//! polls fast costs at most one encoding per processed frame.
//!
//! Off by default (PREVIEW=false): the picture is camera content, served on
//! the unauthenticated metrics port (docs/security.md, "Preview").

use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use opencv::core::{Mat, Point, Rect, Scalar, Size, Vector};
use opencv::prelude::*;
use opencv::{imgcodecs, imgproc};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::messages::Detection;

/// Longest side of a preview in pixels; smaller frames keep their size.
pub const MAX_SIDE: i32 = 640;
/// JPEG quality of a preview (0–100).
pub const JPEG_QUALITY: i32 = 75;
/// Colour of boxes and label backgrounds, BGR: a saturated magenta that
/// camera pictures rarely contain, so boxes stand out.
pub const BOX_BGR: [f64; 3] = [255.0, 0.0, 255.0];

/// The last processed frame and its detections.
struct Latest {
    image: Mat,
    detections: Vec<Detection>,
    /// Processed frames so far: tells a cached encoding from a stale one.
    sequence: u64,
}

// SAFETY: a stored frame is never written again: the detection thread moves
// it in and replaces it whole, requests only read it (through an Arc).
// OpenCV's Mat buffers are reference-counted with atomic counts.
unsafe impl Send for Latest {}
unsafe impl Sync for Latest {}

/// A finished JPEG and the frame it shows.
struct Encoded {
    sequence: u64,
    jpeg: Arc<Vec<u8>>,
}

/// The handle the detection thread fills and `/preview.jpg` reads.
pub struct Preview {
    latest: Mutex<Option<Arc<Latest>>>,
    encoded: Mutex<Option<Encoded>>,
    metrics: PreviewMetrics,
}

struct PreviewMetrics {
    requests: Counter,
    encodings: Counter,
    encode_seconds: Histogram,
}

#[derive(Debug, thiserror::Error)]
pub enum PreviewError {
    #[error("no frame has been processed yet")]
    NoFrame,
    #[error("cannot draw or encode the preview: {0}")]
    OpenCv(#[from] opencv::Error),
}

impl Preview {
    /// A preview whose metrics (`vap_worker_preview_*`) are in `registry`.
    pub fn new(registry: &mut Registry) -> Preview {
        let metrics = PreviewMetrics {
            requests: Counter::default(),
            encodings: Counter::default(),
            encode_seconds: Histogram::new(exponential_buckets(0.000_5, 2.0, 12)),
        };
        registry.register(
            "preview_requests",
            "Requests of /preview.jpg",
            metrics.requests.clone(),
        );
        registry.register(
            "preview_encodings",
            "Previews drawn and encoded (at most one per processed frame)",
            metrics.encodings.clone(),
        );
        registry.register(
            "preview_encode_seconds",
            "Time to scale, draw and encode one preview",
            metrics.encode_seconds.clone(),
        );
        Preview {
            latest: Mutex::new(None),
            encoded: Mutex::new(None),
            metrics,
        }
    }

    /// Keeps `image` (moved, not copied) and its detections as the newest
    /// processed frame.
    pub fn keep(&self, image: Mat, detections: &[Detection]) {
        let mut latest = self.latest.lock().unwrap_or_else(|e| e.into_inner());
        let sequence = latest.as_ref().map_or(1, |l| l.sequence + 1);
        let replaced = latest.replace(Arc::new(Latest {
            image,
            detections: detections.to_vec(),
            sequence,
        }));
        drop(latest);
        drop(replaced); // frees the older frame outside the lock
    }

    /// The JPEG of the newest frame: the cached one when that frame was
    /// encoded before, else a new encoding. Blocking (OpenCV work).
    pub fn jpeg(&self) -> Result<Arc<Vec<u8>>, PreviewError> {
        self.metrics.requests.inc();
        let latest = self
            .latest
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or(PreviewError::NoFrame)?;
        // One encoding at a time: concurrent requests wait for it and share it.
        let mut encoded = self.encoded.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = encoded.as_ref().filter(|e| e.sequence == latest.sequence) {
            return Ok(e.jpeg.clone());
        }
        let started = Instant::now();
        let jpeg = Arc::new(render(&latest.image, &latest.detections)?);
        self.metrics.encodings.inc();
        self.metrics
            .encode_seconds
            .observe(started.elapsed().as_secs_f64());
        *encoded = Some(Encoded {
            sequence: latest.sequence,
            jpeg: jpeg.clone(),
        });
        Ok(jpeg)
    }

    /// The `/preview.jpg` route.
    pub fn routes(self: Arc<Self>) -> Router {
        Router::new().route(
            "/preview.jpg",
            get(move || {
                let preview = self.clone();
                async move { respond(tokio::task::spawn_blocking(move || preview.jpeg()).await) }
            }),
        )
    }
}

fn respond(result: Result<Result<Arc<Vec<u8>>, PreviewError>, tokio::task::JoinError>) -> Response {
    match result {
        Ok(Ok(jpeg)) => (
            StatusCode::OK,
            [
                (header::CONTENT_TYPE, "image/jpeg"),
                (header::CACHE_CONTROL, "no-store"),
            ],
            jpeg.as_ref().clone(),
        )
            .into_response(),
        Ok(Err(PreviewError::NoFrame)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "1")],
            "no frame has been processed yet\n",
        )
            .into_response(),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "preview failed");
            (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response()
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

/// The `/preview.jpg` answer of a worker with PREVIEW=false.
pub fn disabled_routes() -> Router {
    Router::new().route(
        "/preview.jpg",
        get(|| async {
            (
                StatusCode::NOT_FOUND,
                "the preview is off; start the worker with PREVIEW=true to serve it\n",
            )
        }),
    )
}

/// Scales `image` to fit [`MAX_SIDE`], draws `detections` (in source
/// pixels) and encodes a JPEG.
pub fn render(image: &Mat, detections: &[Detection]) -> Result<Vec<u8>, PreviewError> {
    let (w, h) = (image.cols(), image.rows());
    let scale = fit_scale(w, h, MAX_SIDE);
    let mut small = Mat::default();
    if scale < 1.0 {
        let size = Size::new(scaled(w, scale).max(1), scaled(h, scale).max(1));
        imgproc::resize(image, &mut small, size, 0.0, 0.0, imgproc::INTER_AREA)?;
    } else {
        image.copy_to(&mut small)?;
    }
    let (sw, sh) = (small.cols(), small.rows());
    let colour = Scalar::new(BOX_BGR[0], BOX_BGR[1], BOX_BGR[2], 0.0);
    let black = Scalar::new(0.0, 0.0, 0.0, 0.0);
    let font = imgproc::FONT_HERSHEY_SIMPLEX;
    let font_scale = 0.6;
    for d in detections {
        let Some(rect) = box_in_preview(d.bbox, scale, sw, sh) else {
            continue;
        };
        imgproc::rectangle(&mut small, rect, colour, 2, imgproc::LINE_8, 0)?;
        let text = label(d);
        let mut baseline = 0;
        let size = imgproc::get_text_size(&text, font, font_scale, 1, &mut baseline)?;
        let (x, y) = label_origin(rect, size.height + baseline + 4, sh);
        let background = Rect::new(x, y, size.width + 4, size.height + baseline + 4);
        imgproc::rectangle(
            &mut small,
            background,
            colour,
            imgproc::FILLED,
            imgproc::LINE_8,
            0,
        )?;
        imgproc::put_text(
            &mut small,
            &text,
            Point::new(x + 2, y + size.height + 2),
            font,
            font_scale,
            black,
            1,
            imgproc::LINE_AA,
            false,
        )?;
    }
    let mut out = Vector::<u8>::new();
    let params = Vector::from_slice(&[imgcodecs::IMWRITE_JPEG_QUALITY, JPEG_QUALITY]);
    imgcodecs::imencode(".jpg", &small, &mut out, &params)?;
    Ok(out.to_vec())
}

/// The factor that brings a `w`×`h` frame's longer side down to `max_side`;
/// 1 when it already fits.
pub fn fit_scale(w: i32, h: i32, max_side: i32) -> f64 {
    let longest = w.max(h);
    if longest <= max_side || longest <= 0 {
        1.0
    } else {
        f64::from(max_side) / f64::from(longest)
    }
}

fn scaled(v: i32, scale: f64) -> i32 {
    (f64::from(v) * scale).round() as i32
}

/// A detection's box (`[x_min, y_min, x_max, y_max]` in source pixels) in
/// preview pixels, clipped to the `w`×`h` preview; `None` when nothing of it
/// is inside.
pub fn box_in_preview(bbox: [i32; 4], scale: f64, w: i32, h: i32) -> Option<Rect> {
    let x0 = scaled(bbox[0].min(bbox[2]), scale).clamp(0, w - 1);
    let y0 = scaled(bbox[1].min(bbox[3]), scale).clamp(0, h - 1);
    let x1 = scaled(bbox[0].max(bbox[2]), scale).clamp(0, w - 1);
    let y1 = scaled(bbox[1].max(bbox[3]), scale).clamp(0, h - 1);
    (x1 > x0 && y1 > y0).then(|| Rect::new(x0, y0, x1 - x0, y1 - y0))
}

/// Where a label of `height` pixels goes: above the box, or inside its top
/// when the box touches the top edge.
fn label_origin(rect: Rect, height: i32, preview_h: i32) -> (i32, i32) {
    let y = if rect.y >= height {
        rect.y - height
    } else {
        rect.y.min((preview_h - height).max(0))
    };
    (rect.x, y)
}

/// `person 95%`.
pub fn label(d: &Detection) -> String {
    format!(
        "{} {:.0}%",
        d.class,
        (d.confidence.clamp(0.0, 1.0) * 100.0).round()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use opencv::core::CV_8UC3;

    fn detection(bbox: [i32; 4]) -> Detection {
        Detection {
            class: "person".into(),
            confidence: 0.954,
            bbox,
        }
    }

    #[test]
    fn frames_shrink_to_the_longest_side_and_small_ones_stay() {
        assert_eq!(fit_scale(1920, 1080, 640), 1.0 / 3.0);
        assert_eq!(fit_scale(480, 960, 640), 2.0 / 3.0);
        assert_eq!(fit_scale(640, 480, 640), 1.0);
        assert_eq!(fit_scale(320, 240, 640), 1.0);
        assert_eq!(fit_scale(0, 0, 640), 1.0);
    }

    #[test]
    fn boxes_scale_and_clip_to_the_preview() {
        let r = box_in_preview([30, 60, 300, 600], 1.0 / 3.0, 640, 360).unwrap();
        assert_eq!((r.x, r.y, r.width, r.height), (10, 20, 90, 180));
        // Reversed corners and boxes reaching past the frame still draw.
        let r = box_in_preview([700, 400, -5, 10], 1.0, 640, 360).unwrap();
        assert_eq!((r.x, r.y, r.width, r.height), (0, 10, 639, 349));
        // A box wholly outside, or of no area, is skipped.
        assert!(box_in_preview([800, 10, 900, 20], 1.0, 640, 360).is_none());
        assert!(box_in_preview([10, 10, 10, 20], 1.0, 640, 360).is_none());
    }

    #[test]
    fn labels_sit_above_the_box_unless_it_touches_the_top() {
        assert_eq!(label_origin(Rect::new(5, 40, 10, 10), 16, 360), (5, 24));
        assert_eq!(label_origin(Rect::new(5, 3, 10, 10), 16, 360), (5, 3));
        assert_eq!(label(&detection([0, 0, 1, 1])), "person 95%");
    }

    fn grey(w: i32, h: i32) -> Mat {
        Mat::new_rows_cols_with_default(h, w, CV_8UC3, Scalar::all(128.0)).unwrap()
    }

    fn decode(jpeg: &[u8]) -> Mat {
        let buf = Vector::from_slice(jpeg);
        imgcodecs::imdecode(&buf, imgcodecs::IMREAD_COLOR).unwrap()
    }

    #[test]
    fn a_preview_is_small_and_shows_its_boxes() {
        let jpeg = render(&grey(1280, 720), &[detection([200, 200, 800, 600])]).unwrap();
        let image = decode(&jpeg);
        assert_eq!((image.cols(), image.rows()), (640, 360));
        // The box's left edge (x = 100 in the preview) has the box colour;
        // the middle of the box is still the frame.
        let edge = image.at_2d::<opencv::core::Vec3b>(200, 100).unwrap();
        assert!(edge[0] > 200 && edge[1] < 60 && edge[2] > 200, "{edge:?}");
        let inside = image.at_2d::<opencv::core::Vec3b>(200, 250).unwrap();
        assert!((inside[1] as i32 - 128).abs() < 10, "{inside:?}");
    }

    #[test]
    fn one_encoding_serves_until_the_next_frame() {
        let preview = Preview::new(&mut Registry::default());
        assert!(matches!(preview.jpeg(), Err(PreviewError::NoFrame)));
        preview.keep(grey(320, 240), &[]);
        let first = preview.jpeg().unwrap();
        let again = preview.jpeg().unwrap();
        assert!(Arc::ptr_eq(&first, &again));
        assert_eq!(preview.metrics.encodings.get(), 1);
        preview.keep(grey(320, 240), &[detection([10, 10, 100, 100])]);
        let next = preview.jpeg().unwrap();
        assert!(!Arc::ptr_eq(&first, &next));
        assert_eq!(preview.metrics.encodings.get(), 2);
        assert_eq!(preview.metrics.requests.get(), 4);
    }
}
