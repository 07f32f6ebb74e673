//! The operational HTTP endpoints every long-running subcommand serves:
//! `/metrics` (Prometheus text format), `/healthz` and `/readyz`, and
//! whatever routes a subcommand adds ([`bind_with`]).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// What the probes report. `Err` carries the reason shown in the response body.
pub trait Probes: Send + Sync + 'static {
    fn healthy(&self) -> Result<(), String>;
    fn ready(&self) -> Result<(), String>;
    /// Called before each scrape, to refresh gauges computed from the clock.
    fn before_scrape(&self) {}
}

struct AppState {
    registry: Registry,
    probes: Arc<dyn Probes>,
}

/// Binds `addr` (port 0 picks a free port) and returns the bound address and
/// the server future.
pub async fn bind(
    addr: SocketAddr,
    registry: Registry,
    probes: Arc<dyn Probes>,
) -> std::io::Result<(SocketAddr, impl Future<Output = std::io::Result<()>>)> {
    bind_with(addr, registry, probes, Router::new()).await
}

/// [`bind`], also serving the routes of `more` (a worker's `/preview.jpg`,
/// `runner local`'s page).
pub async fn bind_with(
    addr: SocketAddr,
    registry: Registry,
    probes: Arc<dyn Probes>,
    more: Router,
) -> std::io::Result<(SocketAddr, impl Future<Output = std::io::Result<()>>)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let state = Arc::new(AppState { registry, probes });
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
        .merge(more);
    Ok((bound, async move { axum::serve(listener, app).await }))
}

async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    state.probes.before_scrape();
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &state.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

fn probe_response(result: Result<(), String>) -> (StatusCode, String) {
    match result {
        Ok(()) => (StatusCode::OK, "ok\n".to_string()),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
    }
}

async fn healthz(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    probe_response(state.probes.healthy())
}

async fn readyz(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    probe_response(state.probes.ready())
}
