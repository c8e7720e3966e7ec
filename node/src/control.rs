//! The control service (`/dwcp/control/3.0.0`): requests other nodes send this node
//! directly. Today: create a VM their placement chose this node for.
//!
//! Who may ask: the sender is the libp2p peer of the stream, authenticated by noise or TLS
//! with its node key, so its [`NodeId`] is known without a signature on the request (see
//! `dwcp_protocol::control`). Only `ready` members of this node's cluster (signed
//! announcement known, heartbeats fresh) are served; the request's `cluster_id` must match.
//! This node's own VM backend then admits the VM only if it fits what is left of the donated
//! share, whatever the sender believed.

use std::sync::Arc;

use dwcp_net::InboundRequest;
use dwcp_protocol::{
    NodeId,
    control::{ControlErrorCode, ControlRequest, ControlResponse},
};
use tracing::{debug, info, warn};

use crate::{daemon::Shared, vms::VmError};

/// Serves one control request on its own task (a VM create waits for QEMU to start; the
/// event loop must not).
pub fn on_request(shared: Arc<Shared>, r: InboundRequest) {
    tokio::spawn(async move {
        let InboundRequest {
            peer, data, reply, ..
        } = r;
        let answer = serve(&shared, peer, &data).await;
        let label = match &answer {
            ControlResponse::VmCreated(_) => "created",
            ControlResponse::AmstAccepted { .. } => "amst_accepted",
            ControlResponse::AmstStatus(_) => "amst_status",
            ControlResponse::Refused { code, .. } => code.as_str(),
        };
        shared
            .metrics
            .itp_control_requests
            .with_label_values(&[label])
            .inc();
        if let Err(e) = shared.client().respond(reply, answer.encode()).await {
            debug!(%peer, error = %e, "control answer not sent");
        }
    });
}

/// The refusal for a request that names another cluster than this node's.
fn other_cluster(shared: &Shared, cluster_id: &str) -> Option<ControlResponse> {
    (cluster_id != shared.cluster_id()).then(|| {
        ControlResponse::refused(
            ControlErrorCode::NotMember,
            format!(
                "cluster `{cluster_id}` is not this node's (`{}`)",
                shared.cluster_id()
            ),
        )
    })
}

async fn serve(shared: &Shared, peer: dwcp_net::PeerId, data: &[u8]) -> ControlResponse {
    let Ok(from) = NodeId::from_peer_id(&peer) else {
        return ControlResponse::refused(
            ControlErrorCode::NotMember,
            "the sender's peer id is not a DWCP node key",
        );
    };
    if !shared
        .placement_view()
        .iter()
        .any(|n| n.id == from && n.announced && !n.is_self)
    {
        warn!(%from, "control request from a node that is not a ready member");
        return ControlResponse::refused(
            ControlErrorCode::NotMember,
            format!(
                "node {} is not a ready member of cluster {}",
                from.short(),
                shared.cluster_id()
            ),
        );
    }
    let req = match ControlRequest::decode(data) {
        Ok(r) => r,
        Err(e) => {
            warn!(%from, error = %e, "bad control request");
            return ControlResponse::refused(ControlErrorCode::BadRequest, e.to_string());
        }
    };
    match req {
        ControlRequest::AmstOffer {
            cluster_id,
            transfer,
            purpose,
            ..
        } => {
            if let Some(refusal) = other_cluster(shared, &cluster_id) {
                return refusal;
            }
            shared.amst().on_offer(from, peer, transfer, purpose)
        }
        ControlRequest::AmstStatus { cluster_id } => {
            if let Some(refusal) = other_cluster(shared, &cluster_id) {
                return refusal;
            }
            // Bounded to stay far inside the control frame (64 KiB) and the decoder's limits.
            let mut st = shared.amst().status();
            st.active.truncate(32);
            st.recent.truncate(16);
            ControlResponse::AmstStatus(Box::new(st))
        }
        ControlRequest::CreateVm {
            cluster_id,
            vm,
            decision,
        } => {
            if let Some(refusal) = other_cluster(shared, &cluster_id) {
                return refusal;
            }
            let agreed = match crate::placement::check_decision(shared, &vm, decision.as_deref()) {
                Ok(a) => a,
                Err(why) => {
                    warn!(%from, %why, "refused a peer's vm: no valid placement decision");
                    return ControlResponse::refused(ControlErrorCode::NotAgreed, why);
                }
            };
            let Some(_slot) = shared.placement.control_slot() else {
                return ControlResponse::refused(
                    ControlErrorCode::Unavailable,
                    "too many forwarded creates in progress; try again",
                );
            };
            let name = vm.name.clone();
            match shared
                .vms
                .create(vm, agreed.as_ref().map(|a| a.decision.vm))
                .await
            {
                Ok(v) => {
                    info!(vm = %v.id, %name, %from, "vm created for a peer's placement");
                    if let Some(a) = agreed {
                        crate::placement::created(shared, a);
                    }
                    ControlResponse::VmCreated(v)
                }
                Err(e) => {
                    let code = match &e {
                        VmError::BadRequest(_) => ControlErrorCode::BadRequest,
                        VmError::DoesNotFit(_) => ControlErrorCode::DoesNotFit,
                        VmError::Unavailable(_) | VmError::Conflict(_) => {
                            ControlErrorCode::Unavailable
                        }
                        VmError::NotFound(_) | VmError::Internal(_) => ControlErrorCode::Internal,
                    };
                    info!(%from, %name, error = %e, "refused a peer's vm");
                    ControlResponse::refused(code, e.to_string())
                }
            }
        }
    }
}
