//! What a person sees: a worker's `/preview.jpg` (off unless PREVIEW=true)
//! and `runner local`'s page of scenarios with their previews, opened in
//! headless Chromium and checked on the screenshot.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use opencv::core::Vector;
use opencv::prelude::*;
use vap_runner::local::page::preview_rect;
use vap_runner::worker::preview::{BOX_BGR, MAX_SIDE};

use crate::common::local::LocalBed;
use crate::common::{self, http_get, http_get_bytes, wait_for};

const A: &str = "550e8400-e29b-41d4-a716-44665544a001";
const B: &str = "550e8400-e29b-41d4-a716-44665544a002";
const Q: &str = "550e8400-e29b-41d4-a716-44665544a003";

/// The screenshot's size in CSS pixels (device scale 1).
const PAGE_W: u32 = 1100;
const PAGE_H: u32 = 900;

fn decode_jpeg(bytes: &[u8]) -> Mat {
    assert!(bytes.starts_with(&[0xff, 0xd8]), "not a JPEG");
    let image =
        opencv::imgcodecs::imdecode(&Vector::from_slice(bytes), opencv::imgcodecs::IMREAD_COLOR)
            .expect("a JPEG OpenCV decodes");
    assert!(!image.empty(), "the JPEG decodes to an empty image");
    image
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_serves_its_preview_only_when_asked_to() {
    // Off by default: the port serves metrics, not pictures.
    let (worker, addr) = common::spawn_clip_worker(A, "vtest.avi", &[]);
    common::wait_metrics(&addr, "a processed frame", |text| {
        common::metric_value(text, "vap_worker_frames_processed_total").is_some_and(|n| n > 0.0)
    })
    .await;
    let (status, body) = http_get(&addr, "/preview.jpg").await;
    assert_eq!(status, 404, "{body}");
    assert!(
        body.contains("PREVIEW=true"),
        "says how to turn it on: {body}"
    );
    common::terminate(worker, "the worker");

    let (worker, addr) = common::spawn_clip_worker(A, "vtest.avi", &[("PREVIEW", "true")]);
    let jpeg = wait_for("a preview", Duration::from_secs(60), || {
        let addr = addr.clone();
        async move {
            tokio::net::TcpStream::connect(&addr).await.ok()?;
            let (status, body) = http_get_bytes(&addr, "/preview.jpg").await;
            (status == 200).then_some(body)
        }
    })
    .await;
    let image = decode_jpeg(&jpeg);
    // vtest.avi is 768x576: scaled to 640 on its longer side.
    assert_eq!((image.cols(), image.rows()), (MAX_SIDE, 480));
    let (_, metrics) = http_get(&addr, "/metrics").await;
    assert!(common::metric(&metrics, "vap_worker_preview_requests_total") >= 1.0);
    assert!(common::metric(&metrics, "vap_worker_preview_encodings_total") >= 1.0);
    common::terminate(worker, "the worker");
}

/// `runner local`'s page in headless Chromium: the two running scenarios
/// (clips that last 80 s at their own pace)
/// show their previews (pictures, with the boxes' colour seen on each),
/// the queued one shows none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_page_shows_every_scenario_with_its_preview() {
    let bed = LocalBed::new("local-page").await;
    let file = bed.logs.path().join("scenarios.yaml");
    let entry = |uuid: &str, clip: &str| {
        format!(
            "- scenario_uuid: {uuid}\n  camera_url: {}\n",
            common::media(clip)
        )
    };
    std::fs::write(
        &file,
        entry(A, "vtest.avi") + &entry(B, "vtest.avi") + &entry(Q, "tree.avi"),
    )
    .unwrap();
    let file_arg = file.display().to_string();
    let mut local = bed.start(&[
        ("SCENARIOS_FILE", file_arg.as_str()),
        ("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1"),
        ("SINK", "stdout"),
        ("REALTIME", "true"),
        ("MAX_WORKERS", "2"),
        ("PREVIEW", "true"),
    ]);
    let addr = wait_for("the page's address", Duration::from_secs(30), || {
        local.assert_running();
        let addr = local.metrics_addr();
        async move { addr }
    })
    .await;
    let page = wait_for(
        "A and B running with figures on the page",
        Duration::from_secs(60),
        || {
            local.assert_running();
            let addr = addr.clone();
            async move {
                let (status, page) = http_get(&addr, "/").await;
                let ready = |u: &str| {
                    card(&page, u).is_some_and(|c| c.contains(">Running<") && !c.contains(">–<"))
                };
                (status == 200 && ready(A) && ready(B)).then_some(page)
            }
        },
    )
    .await;
    // Cards in queue order: A and B run (MAX_WORKERS=2), Q waits.
    let order: Vec<usize> = [A, B, Q]
        .iter()
        .map(|u| {
            page.find(&format!("id=\"s-{u}\""))
                .expect("a card per scenario")
        })
        .collect();
    assert!(order[0] < order[1] && order[1] < order[2], "queue order");
    assert!(
        card(&page, Q).is_some_and(|c| c.contains(">Queued<")),
        "{page}"
    );

    // Previews come through the supervisor.
    let (status, jpeg) = http_get_bytes(&addr, &format!("/scenarios/{A}/preview.jpg")).await;
    assert_eq!(status, 200);
    decode_jpeg(&jpeg);
    for path in [
        format!("/scenarios/{Q}/preview.jpg"),
        "/scenarios/not-a-uuid/preview.jpg".to_string(),
        "/scenarios/550e8400-e29b-41d4-a716-446655440999/preview.jpg".to_string(),
    ] {
        assert_eq!(http_get(&addr, &path).await.0, 404, "{path}");
    }

    // The screenshot: each running card's preview is a picture, and each
    // shows the boxes' colour at least once (the mock detector finds
    // something on most frames, not all); the queued card's stays dark.
    let shots = tempfile::tempdir().unwrap();
    let mut boxed = [false; 2];
    let mut attempt = 0;
    let mut last = None;
    wait_for(
        "both previews on the page, each with a drawn box",
        Duration::from_secs(60),
        || {
            local.assert_running();
            attempt += 1;
            let png = shots.path().join(format!("page-{attempt}.png"));
            let pixels = screenshot(&format!("http://{addr}/"), &png);
            let regions: Vec<Region> = (0..3)
                .map(|i| Region::of(&pixels, preview_rect(i, PAGE_W)))
                .collect();
            for (i, r) in regions[..2].iter().enumerate() {
                assert!(
                    r.spread > 20.0,
                    "card {i}'s preview is blank on {}: {r:?}",
                    png.display()
                );
                boxed[i] |= r.box_pixels > 30;
            }
            assert!(
                regions[2].spread < 20.0 && regions[2].box_pixels == 0,
                "the queued card shows no picture: {:?}",
                regions[2]
            );
            last = Some(png);
            let done = boxed.iter().all(|b| *b);
            async move { done.then_some(()) }
        },
    )
    .await;
    if let (Ok(dir), Some(png)) = (std::env::var("PREVIEW_SCREENSHOT_DIR"), last) {
        std::fs::copy(&png, Path::new(&dir).join("local-page.png")).unwrap();
    }
    assert!(local.terminate().success(), "{}", local.log_tail());
}

/// The HTML of scenario `uuid`'s card.
fn card<'a>(page: &'a str, uuid: &str) -> Option<&'a str> {
    let start = page.find(&format!("id=\"s-{uuid}\""))?;
    let len = page[start..].find("</table>")?;
    Some(&page[start..start + len])
}

/// RGB pixels of a `PAGE_W`×`PAGE_H` screenshot.
struct Pixels(Vec<u8>);

/// What one preview region of a screenshot holds.
#[derive(Debug)]
struct Region {
    /// Standard deviation of the brightness: near 0 for a flat box.
    spread: f64,
    /// Pixels of the boxes' colour.
    box_pixels: usize,
}

impl Region {
    fn of(pixels: &Pixels, [x, y, w, h]: [u32; 4]) -> Region {
        assert!(x + w <= PAGE_W && y + h <= PAGE_H, "region off the page");
        let [b, g, r] = BOX_BGR.map(|c| c as i32);
        let (mut sum, mut sq, mut n, mut box_pixels) = (0.0, 0.0, 0.0, 0);
        for row in y..y + h {
            for col in x..x + w {
                let i = ((row * PAGE_W + col) * 3) as usize;
                let px = [pixels.0[i], pixels.0[i + 1], pixels.0[i + 2]].map(i32::from);
                let luma = f64::from(px[0] + px[1] + px[2]) / 3.0;
                sum += luma;
                sq += luma * luma;
                n += 1.0;
                // JPEG moves colours a little.
                if (px[0] - r).abs() < 60 && (px[1] - g).abs() < 60 && (px[2] - b).abs() < 60 {
                    box_pixels += 1;
                }
            }
        }
        let mean = sum / n;
        Region {
            spread: (sq / n - mean * mean).max(0.0).sqrt(),
            box_pixels,
        }
    }
}

/// Opens `url` in headless Chromium, saves the screenshot at `png` and
/// returns its pixels (decoded by FFmpeg).
fn screenshot(url: &str, png: &Path) -> Pixels {
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
            &format!("--user-data-dir={}", profile.path().display()),
            &format!("--window-size={PAGE_W},{PAGE_H}"),
            &format!("--screenshot={}", png.display()),
            url,
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run chromium ({e}); install Debian's chromium (scripts/deps does)")
        });
    assert!(
        out.status.success() && png.exists(),
        "chromium took no screenshot: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(png)
        .args(["-f", "rawvideo", "-pix_fmt", "rgb24", "-"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run ffmpeg ({e}); scripts/deps installs it"));
    assert!(
        bytes.status.success(),
        "ffmpeg cannot decode {}: {}",
        png.display(),
        String::from_utf8_lossy(&bytes.stderr)
    );
    let bytes = bytes.stdout;
    assert_eq!(
        bytes.len(),
        (PAGE_W * PAGE_H * 3) as usize,
        "the screenshot is {PAGE_W}x{PAGE_H}"
    );
    Pixels(bytes)
}
