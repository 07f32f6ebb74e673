//! The page `runner local` serves at `/` on its METRICS_ADDR: every scenario
//! with its phase, health figures and, with PREVIEW on, its worker's
//! `/preview.jpg`, reloading itself every [`REFRESH_SECS`].
//!
//! Previews are fetched through the supervisor (`/scenarios/{uuid}/preview.jpg`):
//! a viewer needs no access to the workers' own ports, which listen on
//! loopback only. A worker's port is found from its process (the TCP socket
//! it listens on, in `/proc`), never from anything a request says.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::process;
use super::state::{Record, StateStore};

/// Seconds between the page's reloads.
pub const REFRESH_SECS: u32 = 5;
/// Longest wait for a worker's answer.
const WORKER_TIMEOUT: Duration = Duration::from_secs(3);
/// Largest worker answer read (a preview is far smaller).
const MAX_ANSWER: u64 = 4 << 20;

/// What the page reads: the state store, and the last frame counts seen, to
/// turn counters into rates.
pub struct Page {
    state: Arc<StateStore>,
    preview: bool,
    samples: Mutex<HashMap<u32, Sample>>,
}

/// A worker's processed-frame count at one moment.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub at: Instant,
    pub processed: f64,
}

/// The health figures of one scenario as the page shows them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Figures {
    /// Frames processed per second since the previous look (or, at the
    /// first look, since the worker started).
    pub fps: Option<f64>,
    /// Seconds since the camera last delivered a frame.
    pub last_frame_age: Option<f64>,
    pub restarts: u32,
}

/// One line of the page.
#[derive(Debug, Clone)]
pub struct Row {
    pub uuid: String,
    pub phase: &'static str,
    /// A worker runs for it now.
    pub live: bool,
    pub figures: Figures,
}

impl Page {
    pub fn new(state: Arc<StateStore>, preview: bool) -> Arc<Page> {
        Arc::new(Page {
            state,
            preview,
            samples: Mutex::new(HashMap::new()),
        })
    }

    pub fn routes(self: Arc<Self>) -> Router {
        Router::new()
            .route("/", get(index))
            .route("/scenarios/{uuid}/preview.jpg", get(preview))
            .with_state(self)
    }

    /// The figures of one scenario: what the state store knows (restarts)
    /// and what its live worker's `/metrics` says (processed frames, the
    /// last frame's age). The one place that decides where figures come from.
    async fn figures(&self, record: &Record, pid: Option<u32>) -> Figures {
        let mut figures = Figures {
            restarts: record.restarts,
            ..Figures::default()
        };
        let Some(pid) = pid else {
            return figures;
        };
        let Some(text) = worker_get(pid, "/metrics")
            .await
            .ok()
            .filter(|a| a.status == 200)
            .map(|a| String::from_utf8_lossy(&a.body).into_owned())
        else {
            return figures;
        };
        let now = Instant::now();
        let processed = metric_value(&text, "vap_worker_frames_processed_total");
        figures.last_frame_age = metric_value(&text, "vap_worker_seconds_since_last_frame");
        if let Some(processed) = processed {
            let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
            let since_start = record
                .started_at
                .map(|s| (chrono::Utc::now() - s).num_milliseconds() as f64 / 1000.0);
            figures.fps = rate(samples.get(&pid).copied(), processed, now, since_start);
            samples.insert(pid, Sample { at: now, processed });
        }
        figures
    }

    async fn rows(&self) -> Result<Vec<Row>, String> {
        let records = self.state.all().map_err(|e| e.to_string())?;
        let mut rows = Vec::with_capacity(records.len());
        let mut live_pids = HashSet::new();
        for r in &records {
            let pid = live_pid(r);
            live_pids.extend(pid);
            rows.push(Row {
                uuid: r.uuid.clone(),
                phase: r.phase.map_or("Queued", |p| p.as_str()),
                live: pid.is_some(),
                figures: self.figures(r, pid).await,
            });
        }
        self.samples
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|pid, _| live_pids.contains(pid));
        Ok(rows)
    }
}

/// The PID of the scenario's worker while that very process runs.
fn live_pid(r: &Record) -> Option<u32> {
    r.pid.filter(|&pid| {
        r.phase.is_some_and(|p| p.is_live()) && process::is_running(pid, r.pid_start)
    })
}

/// Frames per second from the previous sample, or over the worker's life
/// when there is none yet.
pub fn rate(
    previous: Option<Sample>,
    processed: f64,
    now: Instant,
    since_start_secs: Option<f64>,
) -> Option<f64> {
    match previous {
        Some(p) if processed >= p.processed => {
            let secs = now.saturating_duration_since(p.at).as_secs_f64();
            (secs >= 0.5).then(|| (processed - p.processed) / secs)
        }
        _ => since_start_secs
            .filter(|s| *s >= 1.0)
            .map(|s| processed / s),
    }
}

/// The value of an unlabelled series in Prometheus text format.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

async fn index(State(page): State<Arc<Page>>) -> Response {
    match page.rows().await {
        Ok(rows) => (
            [(header::CACHE_CONTROL, "no-store")],
            Html(render(&rows, page.preview, REFRESH_SECS)),
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot read the state store: {e}\n"),
        )
            .into_response(),
    }
}

async fn preview(State(page): State<Arc<Page>>, Path(uuid): Path<String>) -> Response {
    let not_found = |why: String| (StatusCode::NOT_FOUND, format!("{why}\n")).into_response();
    if !page.preview {
        return not_found("the preview is off; start runner local with PREVIEW=true".into());
    }
    let Ok(uuid) = uuid::Uuid::parse_str(&uuid) else {
        return not_found(format!("{uuid:?} is not a scenario UUID"));
    };
    let record = match page.state.get(&uuid.to_string()) {
        Ok(Some(r)) => r,
        Ok(None) => return not_found(format!("no scenario {uuid}")),
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    };
    let Some(pid) = live_pid(&record) else {
        return not_found(format!("scenario {uuid} has no running worker"));
    };
    match worker_get(pid, "/preview.jpg").await {
        Ok(answer) => (
            StatusCode::from_u16(answer.status).unwrap_or(StatusCode::BAD_GATEWAY),
            [
                (
                    header::CONTENT_TYPE,
                    if answer.status == 200 {
                        "image/jpeg"
                    } else {
                        "text/plain; charset=utf-8"
                    },
                ),
                (header::CACHE_CONTROL, "no-store"),
            ],
            answer.body,
        )
            .into_response(),
        Err(e) => (
            StatusCode::BAD_GATEWAY,
            format!("scenario {uuid}'s worker did not answer: {e}\n"),
        )
            .into_response(),
    }
}

/// The page: one card per scenario.
pub fn render(rows: &[Row], preview: bool, refresh_secs: u32) -> String {
    let mut html = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"{refresh_secs}\">\
         <title>vap-runner local</title><style>{}</style></head><body>\
         <h1>vap-runner local: {} scenario{}</h1>\n<div class=\"grid\">\n",
        style(),
        rows.len(),
        if rows.len() == 1 { "" } else { "s" }
    );
    for row in rows {
        let f = &row.figures;
        let fps = f.fps.map_or("–".to_string(), |v| format!("{v:.1}"));
        let age = f
            .last_frame_age
            .map_or("–".to_string(), |v| format!("{v:.1} s"));
        let picture = if !row.live {
            "<div class=\"none\">no worker running</div>".to_string()
        } else if preview {
            format!(
                "<img src=\"/scenarios/{uuid}/preview.jpg\" alt=\"preview of {uuid}\">",
                uuid = escape(&row.uuid)
            )
        } else {
            "<div class=\"none\">preview off (PREVIEW=false)</div>".to_string()
        };
        let _ = writeln!(
            html,
            "<div class=\"card\" id=\"s-{uuid}\">{picture}<div class=\"id\">{uuid}</div>\
             <table><tr><th>phase</th><td class=\"phase {phase_class}\">{phase}</td></tr>\
             <tr><th>processed fps</th><td>{fps}</td></tr>\
             <tr><th>last frame</th><td>{age}</td></tr>\
             <tr><th>restarts</th><td>{restarts}</td></tr></table></div>",
            uuid = escape(&row.uuid),
            phase = row.phase,
            phase_class = row.phase.to_ascii_lowercase(),
            restarts = f.restarts,
        );
    }
    let _ = writeln!(
        html,
        "</div><p class=\"foot\">Reloads every {refresh_secs} s. \
         Figures from each worker's /metrics; previews at most {} pixels on their longer side.</p></body></html>",
        crate::worker::preview::MAX_SIDE
    );
    html
}

/// The page's fixed layout, in CSS pixels: cards of one size in rows, so
/// that where each preview shows is known ([`preview_rect`]).
pub mod layout {
    pub const MARGIN: u32 = 16;
    pub const HEADER: u32 = 40;
    pub const GAP: u32 = 12;
    pub const INSET: u32 = 9; // border 1 + padding 8
    pub const PREVIEW_W: u32 = 320;
    pub const PREVIEW_H: u32 = 240;
    pub const CARD_W: u32 = PREVIEW_W + 2 * INSET;
    pub const CARD_H: u32 = PREVIEW_H + 2 * INSET + 104;
}

/// Where card `index`'s preview is on a page `page_width` pixels wide:
/// `[x, y, width, height]`.
pub fn preview_rect(index: usize, page_width: u32) -> [u32; 4] {
    use layout::*;
    let per_row = ((page_width.saturating_sub(2 * MARGIN) + GAP) / (CARD_W + GAP)).max(1) as usize;
    let (col, row) = ((index % per_row) as u32, (index / per_row) as u32);
    [
        MARGIN + col * (CARD_W + GAP) + INSET,
        MARGIN + HEADER + row * (CARD_H + GAP) + INSET,
        PREVIEW_W,
        PREVIEW_H,
    ]
}

fn style() -> String {
    use layout::*;
    format!(
        "*{{box-sizing:border-box}}\
         body{{font-family:sans-serif;margin:{MARGIN}px;background:#f4f4f4;color:#222}}\
         h1{{font-size:18px;height:{h1}px;line-height:{h1}px;margin:0 0 {GAP}px;overflow:hidden;white-space:nowrap}}\
         .grid{{display:flex;flex-wrap:wrap;gap:{GAP}px}}\
         .card{{background:#fff;border:1px solid #ccc;padding:{pad}px;width:{CARD_W}px;height:{CARD_H}px;overflow:hidden}}\
         .card img,.none{{width:{PREVIEW_W}px;height:{PREVIEW_H}px;object-fit:contain;background:#111;display:block}}\
         .none{{color:#aaa;text-align:center;line-height:{PREVIEW_H}px;font-size:13px}}\
         .id{{font-family:monospace;font-size:12px;margin:6px 0}}\
         table{{font-size:13px;border-collapse:collapse}}\
         th{{text-align:left;font-weight:normal;color:#666;padding-right:12px}}\
         .running{{color:#080}}.failed{{color:#b00}}.foot{{color:#666;font-size:12px}}",
        h1 = HEADER - GAP,
        pad = INSET - 1,
    )
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A worker's answer to a GET.
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

/// GETs `path` from the HTTP port of the worker process `pid`.
async fn worker_get(pid: u32, path: &str) -> Result<Answer, String> {
    let addr = tokio::task::spawn_blocking(move || listening_addr(pid))
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("worker {pid} listens on no TCP port"))?;
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut raw = Vec::new();
        stream.take(MAX_ANSWER).read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw = tokio::time::timeout(WORKER_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("no answer from {addr} within {WORKER_TIMEOUT:?}"))?
        .map_err(|e| format!("{addr}: {e}"))?;
    parse_answer(&raw).ok_or_else(|| format!("{addr} gave no HTTP answer"))
}

/// Status and body of an HTTP/1.x response without chunked encoding.
pub fn parse_answer(raw: &[u8]) -> Option<Answer> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let status = head
        .strip_prefix("HTTP/1.")?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(Answer {
        status,
        body: raw[end + 4..].to_vec(),
    })
}

/// The address the process `pid` listens on for TCP (IPv4): the socket
/// inodes among its open files, looked up in its network namespace's table.
fn listening_addr(pid: u32) -> Option<SocketAddr> {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    let inodes: HashSet<u64> = fds
        .flatten()
        .filter_map(|fd| {
            let target = std::fs::read_link(fd.path()).ok()?;
            let target = target.to_str()?;
            target
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect();
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).ok()?;
    listening(&table, &inodes).map(SocketAddr::V4)
}

/// The first listening socket of `/proc/net/tcp` whose inode is one of
/// `inodes`; one bound to every address is reached on loopback.
pub fn listening(table: &str, inodes: &HashSet<u64>) -> Option<SocketAddrV4> {
    const LISTEN: &str = "0A";
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.get(3) != Some(&LISTEN) || !inodes.contains(&f.get(9)?.parse().ok()?) {
            return None;
        }
        let (ip, port) = f.get(1)?.split_once(':')?;
        // The kernel prints the address as a host-order u32 in hex.
        let ip = Ipv4Addr::from(u32::from_str_radix(ip, 16).ok()?.swap_bytes());
        let ip = if ip.is_unspecified() {
            Ipv4Addr::LOCALHOST
        } else {
            ip
        };
        Some(SocketAddrV4::new(ip, u16::from_str_radix(port, 16).ok()?))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1111 1 0000000000000000 100 0 0 10 0\n\
   1: 00000000:A1B2 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2222 1 0000000000000000 100 0 0 10 0\n\
   2: 0100007F:C350 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 3333 1 0000000000000000 20 4 30 10 -1\n";

    #[test]
    fn a_workers_port_is_the_listening_socket_it_owns() {
        let mine = |i: &[u64]| i.iter().copied().collect::<HashSet<u64>>();
        assert_eq!(
            listening(TCP, &mine(&[1111])),
            Some("127.0.0.1:8080".parse().unwrap())
        );
        // Bound to every address: reached on loopback.
        assert_eq!(
            listening(TCP, &mine(&[9, 2222])),
            Some(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0xA1B2))
        );
        // A connected socket is not a port to ask; others' sockets are not ours.
        assert_eq!(listening(TCP, &mine(&[3333])), None);
        assert_eq!(listening(TCP, &mine(&[])), None);
    }

    #[test]
    fn answers_are_split_into_status_and_body() {
        let a =
            parse_answer(b"HTTP/1.0 200 OK\r\ncontent-type: image/jpeg\r\n\r\n\xff\xd8").unwrap();
        assert_eq!((a.status, a.body.as_slice()), (200, &b"\xff\xd8"[..]));
        let a = parse_answer(b"HTTP/1.1 503 Service Unavailable\r\n\r\n").unwrap();
        assert_eq!((a.status, a.body.len()), (503, 0));
        assert!(parse_answer(b"SSH-2.0-OpenSSH\r\n").is_none());
    }

    #[test]
    fn figures_come_from_the_workers_metrics() {
        let text = "# TYPE vap_worker_frames_processed counter\n\
                    vap_worker_frames_processed_total 42\n\
                    vap_worker_seconds_since_last_frame 0.25\n";
        assert_eq!(
            metric_value(text, "vap_worker_frames_processed_total"),
            Some(42.0)
        );
        assert_eq!(
            metric_value(text, "vap_worker_seconds_since_last_frame"),
            Some(0.25)
        );
        assert_eq!(metric_value(text, "vap_worker_frames_processed"), None);
    }

    #[test]
    fn fps_is_the_rate_since_the_last_look_or_since_start() {
        let t0 = Instant::now();
        let then = Sample {
            at: t0,
            processed: 10.0,
        };
        let now = t0 + Duration::from_secs(5);
        assert_eq!(rate(Some(then), 20.0, now, Some(100.0)), Some(2.0));
        // No earlier look, or a restarted counter: the average since start.
        assert_eq!(rate(None, 20.0, now, Some(10.0)), Some(2.0));
        assert_eq!(rate(Some(then), 4.0, now, Some(2.0)), Some(2.0));
        // Too soon to tell.
        assert_eq!(rate(Some(then), 11.0, t0, None), None);
        assert_eq!(rate(None, 1.0, now, Some(0.2)), None);
    }

    fn row(uuid: &str, phase: &'static str, live: bool) -> Row {
        Row {
            uuid: uuid.into(),
            phase,
            live,
            figures: Figures {
                fps: live.then_some(2.04),
                last_frame_age: live.then_some(0.31),
                restarts: 1,
            },
        }
    }

    #[test]
    fn previews_sit_in_rows_of_fixed_cards() {
        assert_eq!(preview_rect(0, 1100), [25, 65, 320, 240]);
        assert_eq!(preview_rect(1, 1100), [375, 65, 320, 240]);
        assert_eq!(preview_rect(3, 1100), [25, 439, 320, 240]);
        // A page narrower than one card still has one per row.
        assert_eq!(preview_rect(1, 200), [25, 439, 320, 240]);
    }

    #[test]
    fn the_page_shows_previews_of_live_workers_only_when_on() {
        let rows = [
            row("550e8400-e29b-41d4-a716-446655440001", "Running", true),
            row("550e8400-e29b-41d4-a716-446655440002", "Queued", false),
        ];
        let page = render(&rows, true, 5);
        assert!(page.contains("content=\"5\""));
        assert!(
            page.contains(
                "<img src=\"/scenarios/550e8400-e29b-41d4-a716-446655440001/preview.jpg\""
            )
        );
        assert!(!page.contains("446655440002/preview.jpg"));
        assert!(page.contains("<td>2.0</td>") && page.contains("<td>0.3 s</td>"));
        assert!(page.contains("no worker running"));
        let off = render(&rows, false, 5);
        assert!(!off.contains("<img") && off.contains("PREVIEW=false"));
        assert!(page.contains("width:338px;height:362px"));
        assert_eq!(
            escape("<a href=\"x\">&"),
            "&lt;a href=&quot;x&quot;&gt;&amp;"
        );
    }
}
