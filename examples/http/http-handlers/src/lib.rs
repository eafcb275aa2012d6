//! The http example's request handling: axum handlers, a middleware and a trait impl. The async
//! functions whose bodies a fix may change are `#[evolve::hot] async fn`: a patch built from an
//! edited copy of this crate replaces them in the running server, requests already in flight
//! finish on the code they started with, and new requests run the new code. Every response says
//! which version served it (`v1` here; a patch's edit changes it).

use axum::extract::{Path, Request, State};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use tokio::sync::{watch, Notify};

/// The service's shared state.
#[derive(Debug)]
pub struct App {
    /// The gate's generation: a slow request waits until it changes (`POST /release`).
    gate: watch::Sender<u64>,
    /// Requests the middleware saw start and not yet finish.
    in_flight: AtomicU64,
    /// Requests answered.
    served: AtomicU64,
    /// Slow requests parked at the gate.
    waiting: AtomicU64,
    /// Notified by `POST /shutdown`.
    shutdown: Notify,
}

impl App {
    /// A service with no request seen yet.
    pub fn new() -> Arc<App> {
        Arc::new(App {
            gate: watch::channel(0).0,
            in_flight: AtomicU64::new(0),
            served: AtomicU64::new(0),
            waiting: AtomicU64::new(0),
            shutdown: Notify::new(),
        })
    }

    /// Lets every slow request parked now go on.
    pub fn release(&self) {
        self.gate.send_modify(|generation| *generation += 1);
    }

    /// Waits until the gate is released after this call began.
    async fn gate_released(&self) {
        let mut gate = self.gate.subscribe();
        let arrived = *gate.borrow_and_update();
        self.waiting.fetch_add(1, Relaxed);
        // The sender lives as long as `self`: the wait ends only by a release.
        let _ = gate.wait_for(|generation| *generation != arrived).await;
        self.waiting.fetch_sub(1, Relaxed);
    }

    /// Resolves when `POST /shutdown` arrives.
    pub async fn shutdown_requested(&self) {
        self.shutdown.notified().await;
    }
}

/// A one-line description of a part of the service.
pub trait Describe {
    /// The description.
    fn describe(&self) -> String;
}

impl Describe for App {
    fn describe(&self) -> String {
        format!(
            "in_flight {} waiting {} served {}",
            self.in_flight.load(Relaxed),
            self.waiting.load(Relaxed),
            self.served.load(Relaxed)
        )
    }
}

/// The version `GET /version` reports.
#[evolve::hot]
pub fn version() -> &'static str {
    "1.0.0"
}

/// `GET /hello`: a quick answer.
#[evolve::hot]
pub async fn hello(app: &App) -> String {
    tokio::task::yield_now().await;
    let _ = app;
    "hello v1\n".to_string()
}

/// `GET /slow/{id}`: waits for `POST /release`, then answers with `id` and this code's version.
#[evolve::hot]
pub async fn slow(app: &App, id: u64) -> String {
    app.gate_released().await;
    format!("slow {id} v1\n")
}

#[evolve::hot]
impl App {
    /// `GET /stats`: the service's counters.
    pub async fn stats(&self) -> String {
        tokio::task::yield_now().await;
        format!("{} version {}\n", self.describe(), version())
    }
}

/// The middleware: counts requests in flight and answered, and names the version that served
/// the request in the `x-served-by` header.
#[evolve::hot]
pub async fn track(app: &App, request: Request, next: Next) -> Response {
    app.in_flight.fetch_add(1, Relaxed);
    let mut response = next.run(request).await;
    app.in_flight.fetch_sub(1, Relaxed);
    app.served.fetch_add(1, Relaxed);
    response
        .headers_mut()
        .insert("x-served-by", HeaderValue::from_static("track v1"));
    response
}

/// The service's routes.
///
/// ```no_run
/// # async fn serve() -> std::io::Result<()> {
/// let app = http_handlers::App::new();
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
/// axum::serve(listener, http_handlers::router(app)).await
/// # }
/// ```
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/hello", get(hello_route))
        .route("/slow/{id}", get(slow_route))
        .route("/stats", get(stats_route))
        .route("/version", get(|| async { format!("{}\n", version()) }))
        .route("/release", post(release_route))
        .route("/shutdown", post(shutdown_route))
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            track_layer,
        ))
        .with_state(app)
}

async fn hello_route(State(app): State<Arc<App>>) -> String {
    hello(&app).await
}

async fn slow_route(State(app): State<Arc<App>>, Path(id): Path<u64>) -> String {
    slow(&app, id).await
}

async fn stats_route(State(app): State<Arc<App>>) -> String {
    app.stats().await
}

async fn release_route(State(app): State<Arc<App>>) -> &'static str {
    app.release();
    "released\n"
}

async fn shutdown_route(State(app): State<Arc<App>>) -> &'static str {
    app.shutdown.notify_one();
    "bye\n"
}

async fn track_layer(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    track(&app, request, next).await
}
