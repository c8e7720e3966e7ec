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
//! | `GET /v1/vms` | `[VmView]` of this node |
//! | `POST /v1/vms` | [`VmCreateRequest`] -> [`VmView`] (422 when it does not fit the donated share) |
//! | `GET /v1/vms/{id}` | [`VmView`] with stats |
//! | `POST /v1/vms/{id}/{pause,resume,stop,start}` | [`VmView`] |
//! | `DELETE /v1/vms/{id}` | 204 |
//! | `GET /v1/vms/{id}/console?bytes=N` | [`VmConsole`] |
//! | `POST /v1/placement/vms` | [`PlacedVmCreateRequest`] -> [`PlacedVm`]: placed on a ready node (or the pinned `node`), created there, with the explanation (422 when no node can take it) |
//! | `GET /v1/placement/stats` | [`PlacementStats`] (`placement solver-stats`) |
//! | `GET /v1/placement/constraints?type=T` | `[ConstraintView]` (`placement list-constraints`; T: builtin, avoid, affinity, anti-affinity) |
//! | `GET /v1/placement/avoid` | `[AvoidView]` |
//! | `POST /v1/placement/avoid` | [`AvoidNodeRequest`] -> [`AvoidView`] (`placement avoid-node`; local to this node) |
//! | `POST /v1/placement/solver` | [`SetSolverRequest`] -> [`SolverSettingsView`] (`placement set-solver`) |
//! | `GET /v1/pba/metrics` | [`crate::pba::PbaStatus`] (`pba metrics`: accuracy, model or fallback, samples, retrain) |
//! | `GET /v1/pba/predictions?node=N` | `[`[`crate::pba::LinkPredictions`]`]`: every link, or node N's (`pba predictions`) |
//! | `POST /v1/pba/retrain` | [`crate::pba::RetrainRequest`] -> 202 [`crate::pba::RetrainStatus`] (`pba retrain`; 409 running, 422 with the reason it cannot run) |
//! | `GET /metrics` (metrics port) | Prometheus text |

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{Path, Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use dwcp_protocol::{
    NodeId,
    api::{
        ApiError, AvoidNodeRequest, AvoidView, ClusterHealth, ClusterStatus, ConstraintView,
        NodeInfo, NodeMetrics, PlacedVm, PlacedVmCreateRequest, PlacementStats, SetSolverRequest,
        SolverSettingsView, VmConsole, VmCreateRequest, VmView,
    },
};

use crate::{
    daemon::Shared,
    placement::{self, PlaceFailure},
    vms::{VmAction, VmError},
};
use dwcp_statesync::VmState;

/// An error answer: a status code and one line of text.
struct Failure(StatusCode, String);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (self.0, Json(ApiError { error: self.1 })).into_response()
    }
}

/// An error answer of any route (the statesync and consensus routes use it too).
pub(crate) fn err(code: StatusCode, msg: impl std::fmt::Display) -> Response {
    Failure(code, msg.to_string()).into_response()
}

/// The API router.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/cluster/status", get(cluster_status))
        .route("/v1/cluster/health", get(cluster_health))
        .route("/v1/nodes", get(nodes))
        .route("/v1/nodes/{id}", get(node))
        .route("/v1/nodes/{id}/metrics", get(node_metrics))
        .route("/v1/vms", get(vm_list).post(vm_create))
        .route("/v1/vms/{id}", get(vm_get).delete(vm_delete))
        .route("/v1/vms/{id}/console", get(vm_console))
        .route("/v1/vms/{id}/{action}", post(vm_action))
        .route("/v1/placement/vms", post(placement_create))
        .route("/v1/placement/stats", get(placement_stats))
        .route("/v1/placement/constraints", get(placement_constraints))
        .route(
            "/v1/placement/avoid",
            get(placement_avoided).post(placement_avoid),
        )
        .route("/v1/placement/solver", post(placement_solver))
        .merge(crate::statesync::routes())
        .merge(crate::consensus::routes())
        .merge(crate::pba::routes())
        .merge(crate::amst::routes())
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

impl IntoResponse for VmError {
    fn into_response(self) -> Response {
        let code = match &self {
            VmError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            VmError::BadRequest(_) => StatusCode::BAD_REQUEST,
            VmError::DoesNotFit(_) => StatusCode::UNPROCESSABLE_ENTITY,
            VmError::NotFound(_) => StatusCode::NOT_FOUND,
            VmError::Conflict(_) => StatusCode::CONFLICT,
            VmError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Failure(code, self.to_string()).into_response()
    }
}

async fn vm_list(State(s): State<Arc<Shared>>) -> Result<Json<Vec<VmView>>, VmError> {
    Ok(Json(s.vms.list().await?))
}

async fn vm_create(
    State(s): State<Arc<Shared>>,
    Json(req): Json<VmCreateRequest>,
) -> Result<(StatusCode, Json<VmView>), PlaceFailure> {
    // With consensus on, even a VM created here is a committed decision first (host: this
    // node), so the cluster document knows every VM and where it runs.
    let agreed = placement::agree(&s, s.node_id(), &req).await?;
    match s
        .vms
        .create(req, agreed.as_ref().map(|a| a.decision.vm))
        .await
    {
        Ok(v) => {
            if let Some(a) = agreed {
                placement::created(&s, a);
            }
            Ok((StatusCode::CREATED, Json(v)))
        }
        Err(e) => {
            if let Some(a) = agreed {
                placement::spawn_next(&s, &a.decision, VmState::Failed);
            }
            Err(e.into())
        }
    }
}

async fn vm_get(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> Result<Json<VmView>, VmError> {
    Ok(Json(s.vms.get(&id).await?))
}

async fn vm_delete(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> Result<StatusCode, VmError> {
    s.vms.act(&id, VmAction::Delete).await?;
    // A VM with a committed placement gets a committed `stopped` decision (background).
    if s.consensus().is_some()
        && let Some(sync) = s.statesync()
        && let Ok(bytes) = hex::decode(&id)
        && let Ok(b) = <[u8; 16]>::try_from(bytes.as_slice())
        && let Ok(Some(r)) = sync.vm_record(dwcp_protocol::VmId::from_bytes(b)).await
        && r.host == Some(s.node_id())
        && !matches!(r.state, VmState::Stopped | VmState::Failed)
    {
        let prev = dwcp_statesync::VmDecision {
            vm: dwcp_protocol::VmId::from_bytes(b),
            decision_seq: r.decision_seq,
            spec: r.spec,
            host: r.host,
            state: r.state,
        };
        placement::spawn_next(&s, &prev, VmState::Stopped);
    }
    Ok(StatusCode::NO_CONTENT)
}

async fn vm_action(
    State(s): State<Arc<Shared>>,
    Path((id, action)): Path<(String, String)>,
) -> Response {
    let a = match action.as_str() {
        "pause" => VmAction::Pause,
        "resume" => VmAction::Resume,
        "stop" => VmAction::Stop,
        "start" => VmAction::Start,
        other => {
            return err(
                StatusCode::NOT_FOUND,
                format!("unknown vm action `{other}`"),
            );
        }
    };
    match s.vms.act(&id, a).await {
        Ok(Some(v)) => Json(v).into_response(),
        Ok(None) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => e.into_response(),
    }
}

#[derive(Debug, serde::Deserialize)]
struct ConsoleQuery {
    bytes: Option<usize>,
}

async fn vm_console(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    Query(q): Query<ConsoleQuery>,
) -> Result<Json<VmConsole>, VmError> {
    Ok(Json(
        s.vms.console(&id, q.bytes.unwrap_or(16 * 1024)).await?,
    ))
}

impl IntoResponse for PlaceFailure {
    fn into_response(self) -> Response {
        match self {
            PlaceFailure::Local(e) => e.into_response(),
            PlaceFailure::BadRequest(m) => err(StatusCode::BAD_REQUEST, m),
            PlaceFailure::NoNode(m) => err(StatusCode::UNPROCESSABLE_ENTITY, m),
            PlaceFailure::Refused(m) => err(StatusCode::BAD_GATEWAY, m),
            PlaceFailure::NotAgreed(m) => err(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("placement decision not agreed: {m}"),
            ),
        }
    }
}

async fn placement_create(
    State(s): State<Arc<Shared>>,
    Json(req): Json<PlacedVmCreateRequest>,
) -> Response {
    let pinned = match req.node.as_deref().map(|n| resolve(&s, n)) {
        None => None,
        Some(Ok(row)) if row.status == dwcp_protocol::api::PeerStatus::Ready => Some(row.id),
        Some(Ok(row)) => {
            return err(
                StatusCode::CONFLICT,
                format!("node {} is unreachable: its heartbeats stopped", row.id),
            );
        }
        Some(Err(e)) => return e.into_response(),
    };
    match s.placement.create(&s, req.vm, pinned).await {
        Ok((vm, placement)) => {
            (StatusCode::CREATED, Json(PlacedVm { vm, placement })).into_response()
        }
        Err(e) => e.into_response(),
    }
}

async fn placement_stats(State(s): State<Arc<Shared>>) -> Json<PlacementStats> {
    Json(s.placement.stats())
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ConstraintQuery {
    #[serde(rename = "type")]
    of_type: Option<String>,
}

async fn placement_constraints(
    State(s): State<Arc<Shared>>,
    Query(q): Query<ConstraintQuery>,
) -> Response {
    match s.placement.constraints(&s.metrics, q.of_type.as_deref()) {
        Ok(c) => Json::<Vec<ConstraintView>>(c).into_response(),
        Err(e) => err(StatusCode::BAD_REQUEST, e),
    }
}

async fn placement_avoided(State(s): State<Arc<Shared>>) -> Json<Vec<AvoidView>> {
    Json(s.placement.avoided(&s.metrics))
}

async fn placement_avoid(
    State(s): State<Arc<Shared>>,
    Json(req): Json<AvoidNodeRequest>,
) -> Response {
    let row = match resolve(&s, &req.node) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    match s.placement.avoid(
        &s.metrics,
        row.id,
        std::time::Duration::from_millis(req.duration_ms),
        req.mode,
    ) {
        Ok(v) => Json(v).into_response(),
        Err(e) => err(StatusCode::BAD_REQUEST, e),
    }
}

async fn placement_solver(
    State(s): State<Arc<Shared>>,
    Json(req): Json<SetSolverRequest>,
) -> Response {
    match s.placement.set_solver(&req) {
        Ok(v) => Json::<SolverSettingsView>(v).into_response(),
        Err(e) => err(StatusCode::BAD_REQUEST, e),
    }
}
