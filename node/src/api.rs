//! The local HTTP API (axum) the CLI, the tray GUI and the testnet talk to, and the separate
//! Prometheus endpoint. JSON shapes are in [`dwcp_protocol::api`].
//!
//! | method and path | answer |
//! | --- | --- |
//! | `GET /v1/cluster/status` | [`ClusterStatus`] |
//! | `GET /v1/cluster/health` | [`ClusterHealth`] |
//! | `GET /v1/nodes` | `[NodeInfo]`, this node first |
//! | `GET /v1/nodes/{id}` | [`NodeInfo`] (id: hex node id, peer id, or a unique hex prefix) |
//! | `GET /v1/nodes/{id}/metrics` | [`NodeMetrics`] |
//! | `GET /metrics` (metrics port) | Prometheus text |

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{Path, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
};
use dwcp_protocol::{
    NodeId,
    api::{ApiError, ClusterHealth, ClusterStatus, NodeInfo, NodeMetrics},
};

use crate::daemon::Shared;

/// An error answer: a status code and one line of text.
struct Failure(StatusCode, String);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (self.0, Json(ApiError { error: self.1 })).into_response()
    }
}

fn err(code: StatusCode, msg: impl Into<String>) -> Response {
    Failure(code, msg.into()).into_response()
}

/// The API router.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/cluster/status", get(cluster_status))
        .route("/v1/cluster/health", get(cluster_health))
        .route("/v1/nodes", get(nodes))
        .route("/v1/nodes/{id}", get(node))
        .route("/v1/nodes/{id}/metrics", get(node_metrics))
        .fallback(|| async { err(StatusCode::NOT_FOUND, "no such endpoint") })
        .with_state(shared)
}

/// The Prometheus router.
pub fn metrics_router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|State(s): State<Arc<Shared>>| async move {
                s.refresh_gauges();
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4",
                    )],
                    s.metrics.render(),
                )
            }),
        )
        .with_state(shared)
}

async fn cluster_status(State(s): State<Arc<Shared>>) -> Json<ClusterStatus> {
    Json(s.cluster_status())
}

async fn cluster_health(State(s): State<Arc<Shared>>) -> Json<ClusterHealth> {
    Json(s.cluster_health())
}

async fn nodes(State(s): State<Arc<Shared>>) -> Json<Vec<NodeInfo>> {
    Json(s.node_rows())
}

/// Resolves a node given as hex id, peer id or unique hex prefix (at least 4 characters).
fn resolve(s: &Shared, text: &str) -> Result<NodeInfo, Failure> {
    let rows = s.node_rows();
    if let Ok(id) = text.parse::<NodeId>() {
        return rows
            .into_iter()
            .find(|r| r.id == id)
            .ok_or_else(|| Failure(StatusCode::NOT_FOUND, format!("unknown node {text}")));
    }
    if text.len() >= 4 && text.chars().all(|c| c.is_ascii_hexdigit()) {
        let lower = text.to_ascii_lowercase();
        let mut hits: Vec<NodeInfo> = rows
            .into_iter()
            .filter(|r| r.id.to_string().starts_with(&lower))
            .collect();
        return match hits.len() {
            1 => Ok(hits.remove(0)),
            0 => Err(Failure(
                StatusCode::NOT_FOUND,
                format!("unknown node {text}"),
            )),
            n => Err(Failure(
                StatusCode::BAD_REQUEST,
                format!("{n} nodes match prefix {text}"),
            )),
        };
    }
    Err(Failure(
        StatusCode::BAD_REQUEST,
        format!("`{text}` is not a node id, peer id or hex prefix"),
    ))
}

async fn node(State(s): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    match resolve(&s, &id) {
        Ok(r) => Json(r).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn node_metrics(State(s): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    match resolve(&s, &id) {
        Ok(r) => Json::<NodeMetrics>(s.node_metrics(&r)).into_response(),
        Err(e) => e.into_response(),
    }
}
