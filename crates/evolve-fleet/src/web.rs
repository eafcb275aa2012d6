//! The controller's HTTP side: the artifact store, and a read-only page for operators.
//!
//! - `GET /artifacts/<sha256>`: a stored patch (nodes verify what they receive);
//! - `GET /`: the newest rollout (`?id=` another): its waves, every node with its state and
//!   health, the reason of an abort; it refreshes itself every two seconds; nothing on it
//!   changes the fleet;
//! - `GET /api/status` (`?id=`): the same as JSON ([`RolloutStatus`]).
//!
//! Served with axum on tokio, the runtime etcd-client already needs.

use crate::artifact::ArtifactStore;
use crate::controller::{self, NodeRow, RolloutStatus};
use crate::decide::Standing;
use crate::store::Store;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use std::collections::HashMap;
use std::net::SocketAddr;

#[derive(Clone)]
struct Served {
    store: Store,
    artifacts: ArtifactStore,
}

/// Serves the artifacts and the page on `listener` until the task is dropped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    store: Store,
    artifacts: ArtifactStore,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/", get(page))
        .route("/api/status", get(api_status))
        .route("/artifacts/{sha}", get(artifact))
        .with_state(Served { store, artifacts });
    axum::serve(listener, app).await
}

/// Binds `addr` and serves in a task; the bound address.
pub async fn spawn(
    addr: SocketAddr,
    store: Store,
    artifacts: ArtifactStore,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(serve(listener, store, artifacts));
    Ok(bound)
}

async fn artifact(State(served): State<Served>, Path(sha): Path<String>) -> Response {
    let Ok(digest) = sha.parse::<evolve_trust::Digest>() else {
        return (StatusCode::BAD_REQUEST, "not a SHA-256 digest").into_response();
    };
    match served.artifacts.read(&digest) {
        Some(bytes) => {
            ([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response()
        }
        None => (StatusCode::NOT_FOUND, "no such artifact").into_response(),
    }
}

async fn api_status(
    State(served): State<Served>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    match controller::status(&served.store, query.get("id").map(String::as_str)).await {
        Ok(status) => axum::Json(status).into_response(),
        Err(e) => (StatusCode::NOT_FOUND, e.to_string()).into_response(),
    }
}

async fn page(
    State(served): State<Served>,
    Query(query): Query<HashMap<String, String>>,
) -> Html<String> {
    let body = match controller::status(&served.store, query.get("id").map(String::as_str)).await {
        Ok(status) => render(&status),
        Err(e) => format!("<p class=\"empty\">{}</p>", escape(&e.to_string())),
    };
    Html(format!(
        "<!doctype html><html><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"2\"><title>evolve fleet</title><style>{STYLE}</style>\
         </head><body><h1>evolve fleet</h1>{body}</body></html>"
    ))
}

const STYLE: &str = "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}\
td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}.healthy{color:#060}\
.failed,.aborted{color:#a00}.reverted{color:#555}.pending{color:#a60}.lost{color:#a0a}\
.current{font-weight:bold}";

/// Escapes text for HTML.
pub fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn node_cells(row: &NodeRow, standing: Option<&Standing>) -> (String, String, String) {
    let (class, text) = match (standing, &row.report) {
        (Some(Standing::Lost), _) => ("lost", "lost".to_string()),
        (_, Some(report)) => (
            match report.state.to_string().as_str() {
                "staged" | "applied" => "pending",
                other => match other {
                    "healthy" => "healthy",
                    "failed" => "failed",
                    _ => "reverted",
                },
            },
            report.state.to_string(),
        ),
        (_, None) if row.admitted => ("pending", "no report".into()),
        _ => ("", "not admitted".into()),
    };
    let cause = row
        .report
        .as_ref()
        .and_then(|r| r.processes.iter().find_map(|p| p.cause.clone()))
        .unwrap_or_default();
    (class.into(), text, cause)
}

/// The page's body for one rollout.
pub fn render(status: &RolloutStatus) -> String {
    let spec = &status.spec;
    let state = &status.state;
    let mut out = format!(
        "<h2 id=\"rollout\">rollout {} <span class=\"{}\" id=\"phase\">{}</span></h2>\
         <p>patch <code>{}</code> sha256:{} ({} bytes){}; selector {}; leader {}</p>",
        escape(&spec.id),
        state.phase,
        state.phase,
        escape(&spec.artifact.name),
        spec.artifact.sha256.short(),
        spec.artifact.size,
        spec.artifact
            .signature
            .as_ref()
            .map_or(", unsigned".to_string(), |s| format!(
                ", signed by {}",
                escape(&s.key_name)
            )),
        escape(&spec.selector.describe()),
        escape(status.leader.as_deref().unwrap_or("none")),
    );
    if let Some(reason) = &state.reason {
        out += &format!(
            "<p id=\"reason\" class=\"{}\">{}</p>",
            state.phase,
            escape(reason)
        );
    }
    out += "<h3>waves</h3><table id=\"waves\"><tr><th>step</th><th>status</th></tr>";
    for step in 0..spec.steps() {
        let status_text = if step < state.step || state.phase == crate::model::Phase::Completed {
            "passed"
        } else if step == state.step {
            "current"
        } else {
            "waiting"
        };
        out += &format!(
            "<tr class=\"{status_text}\"><td>{}</td><td>{status_text}</td></tr>",
            escape(&spec.step_name(step))
        );
    }
    let t = &status.tally;
    out += &format!(
        "</table><p id=\"tally\">{} selected; healthy {}, pending {}, failed {}, lost {} \
         (budget {})</p>",
        t.selected, t.healthy, t.pending, t.failed, t.lost, t.allowed
    );
    out += "<h3>nodes</h3><table id=\"nodes\"><tr><th>node</th><th>in rollout</th>\
            <th>state</th><th>processes</th><th>cause</th></tr>";
    for row in &status.nodes {
        let (class, text, cause) = node_cells(row, t.members.get(&row.name));
        let processes = row.report.as_ref().map_or(String::new(), |r| {
            r.processes
                .iter()
                .map(|p| format!("{} {}", p.pid, p.state))
                .collect::<Vec<_>>()
                .join(", ")
        });
        out += &format!(
            "<tr><td>{}</td><td>{}</td><td class=\"{class}\">{}</td><td>{}</td><td>{}</td></tr>",
            escape(&row.name),
            if row.admitted { "yes" } else { "no" },
            escape(&text),
            escape(&processes),
            escape(&cause)
        );
    }
    out += "</table><h3>history</h3><ol id=\"history\">";
    for transition in &state.transitions {
        out += &format!(
            "<li>{} — {} — {}</li>",
            transition.phase,
            escape(&spec.step_name(transition.step)),
            escape(&transition.why)
        );
    }
    out + "</ol>"
}
