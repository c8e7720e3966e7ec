//! Node-to-node control requests, carried by the `/dwcp/control/3.0.0` request-response
//! service (`dwcp_net::Service::Control`, frames of at most 64 KiB).
//!
//! Today one request exists: create a VM that the asking node placed here.
//!
//! # Authentication
//!
//! These messages are **not** wrapped in a [`crate::SignedEnvelope`]. A request travels on
//! one libp2p stream between two peers, and the stream's connection is authenticated by
//! noise (TCP) or TLS (QUIC) with the node's ed25519 key, so the receiver knows the sender's
//! [`crate::NodeId`] from the connection itself. The receiver then admits only `ready`
//! members of its own cluster (and checks `cluster_id`). A signature would add proof that
//! can be shown to third parties; nothing relays or keeps these requests as evidence, so it
//! would cost a message kind and a signature per request for no check the receiver lacks.
//!
//! # Encoding
//!
//! Plain CBOR (ciborium) of [`ControlRequest`] / [`ControlResponse`], size-checked before
//! decoding ([`MAX_CONTROL_MESSAGE`]), no trailing bytes, then bounds-checked.

use serde::{Deserialize, Serialize};

use crate::{
    api::{VmCreateRequest, VmView},
    envelope::{from_cbor_exact, to_cbor},
    messages::MAX_CLUSTER_ID_LEN,
};

/// Largest encoded request or response (the control service's frame limit is 64 KiB).
pub const MAX_CONTROL_MESSAGE: usize = 60 * 1024;
/// Longest path (image, kernel, initrd) in a forwarded VM request.
pub const MAX_PATH_LEN: usize = 4096;
/// Longest kernel command line in a forwarded VM request.
pub const MAX_CMDLINE_LEN: usize = 4096;
/// Longest VM name.
pub const MAX_VM_NAME_LEN: usize = 64;
/// Longest error message in a response.
pub const MAX_MESSAGE_LEN: usize = 4096;

/// A request from one node to another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlRequest {
    /// Create and start this VM here: the sender's placement chose this node.
    CreateVm {
        /// The sender's cluster (must be the receiver's).
        cluster_id: String,
        /// The VM.
        vm: VmCreateRequest,
    },
}

/// Why a control request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlErrorCode {
    /// The sender is not a ready member of the receiver's cluster.
    NotMember,
    /// The request is malformed or breaks a bound.
    BadRequest,
    /// The VM does not fit what is left of the receiver's donated share.
    DoesNotFit,
    /// The receiver runs no VMs (no hypervisor) or is too busy.
    Unavailable,
    /// The receiver failed while creating the VM.
    Internal,
}

impl ControlErrorCode {
    /// A short label for metrics and logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::NotMember => "not_member",
            Self::BadRequest => "bad_request",
            Self::DoesNotFit => "does_not_fit",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
        }
    }
}

/// The answer to a [`ControlRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlResponse {
    /// The VM was created and started on the receiver.
    VmCreated(VmView),
    /// Refused, with the reason.
    Refused {
        /// What kind of refusal.
        code: ControlErrorCode,
        /// One line for the operator.
        message: String,
    },
}

/// Why control bytes were not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlDecodeError {
    /// Longer than [`MAX_CONTROL_MESSAGE`].
    #[error("control message of {0} bytes exceeds the {MAX_CONTROL_MESSAGE}-byte limit")]
    TooLarge(usize),
    /// Not a well-formed message.
    #[error("malformed control message: {0}")]
    Malformed(String),
    /// Bytes after the message.
    #[error("{0} trailing bytes after the control message")]
    TrailingBytes(usize),
    /// A field breaks its bound.
    #[error("control message field `{0}` is out of bounds")]
    OutOfBounds(&'static str),
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ControlDecodeError> {
    if bytes.len() > MAX_CONTROL_MESSAGE {
        return Err(ControlDecodeError::TooLarge(bytes.len()));
    }
    from_cbor_exact(bytes).map_err(|(e, trailing)| {
        if trailing > 0 {
            ControlDecodeError::TrailingBytes(trailing)
        } else {
            ControlDecodeError::Malformed(e)
        }
    })
}

fn check(field: &'static str, s: Option<&str>, max: usize) -> Result<(), ControlDecodeError> {
    match s {
        Some(s) if s.len() > max => Err(ControlDecodeError::OutOfBounds(field)),
        _ => Ok(()),
    }
}

impl ControlRequest {
    /// The request's bytes.
    pub fn encode(&self) -> Vec<u8> {
        to_cbor(self)
    }

    /// Decodes and bounds-checks bytes from a peer.
    pub fn decode(bytes: &[u8]) -> Result<Self, ControlDecodeError> {
        let r: Self = decode(bytes)?;
        r.validate()?;
        Ok(r)
    }

    /// Checks the bounds of every field.
    pub fn validate(&self) -> Result<(), ControlDecodeError> {
        match self {
            ControlRequest::CreateVm { cluster_id, vm } => {
                check("cluster_id", Some(cluster_id), MAX_CLUSTER_ID_LEN)?;
                check("vm.name", Some(&vm.name), MAX_VM_NAME_LEN)?;
                check("vm.image", vm.image.as_deref(), MAX_PATH_LEN)?;
                check("vm.kernel", vm.kernel.as_deref(), MAX_PATH_LEN)?;
                check("vm.initrd", vm.initrd.as_deref(), MAX_PATH_LEN)?;
                check("vm.cmdline", vm.cmdline.as_deref(), MAX_CMDLINE_LEN)?;
                Ok(())
            }
        }
    }
}

impl ControlResponse {
    /// The response's bytes.
    pub fn encode(&self) -> Vec<u8> {
        to_cbor(self)
    }

    /// Decodes and bounds-checks bytes from a peer.
    pub fn decode(bytes: &[u8]) -> Result<Self, ControlDecodeError> {
        let r: Self = decode(bytes)?;
        match &r {
            ControlResponse::VmCreated(v) => {
                check("vm.id", Some(&v.id), 64)?;
                check("vm.name", Some(&v.name), MAX_VM_NAME_LEN)?;
                check("vm.state", Some(&v.state), 32)?;
                check("vm.accel", Some(&v.accel), 32)?;
            }
            ControlResponse::Refused { message, .. } => {
                check("message", Some(message), MAX_MESSAGE_LEN)?;
            }
        }
        Ok(r)
    }

    /// A refusal, its message cut to [`MAX_MESSAGE_LEN`] bytes (at a character boundary).
    pub fn refused(code: ControlErrorCode, message: impl Into<String>) -> Self {
        let mut message = message.into();
        if message.len() > MAX_MESSAGE_LEN {
            let mut end = MAX_MESSAGE_LEN;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
        }
        ControlResponse::Refused { code, message }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NodeKey;

    fn vm() -> VmCreateRequest {
        VmCreateRequest {
            name: "web-1".into(),
            vcpus: 2,
            memory_mib: 512,
            image: None,
            disk_mib: None,
            kernel: Some("/boot/vmlinuz".into()),
            initrd: None,
            cmdline: Some("console=ttyS0".into()),
        }
    }

    #[test]
    fn round_trips_and_refuses_bad_bytes() {
        let r = ControlRequest::CreateVm {
            cluster_id: "c".into(),
            vm: vm(),
        };
        let b = r.encode();
        assert_eq!(ControlRequest::decode(&b).unwrap(), r);
        let mut trailing = b.clone();
        trailing.push(0);
        assert_eq!(
            ControlRequest::decode(&trailing),
            Err(ControlDecodeError::TrailingBytes(1))
        );
        assert!(matches!(
            ControlRequest::decode(b"junk"),
            Err(ControlDecodeError::Malformed(_))
        ));
        assert_eq!(
            ControlRequest::decode(&vec![0; MAX_CONTROL_MESSAGE + 1]),
            Err(ControlDecodeError::TooLarge(MAX_CONTROL_MESSAGE + 1))
        );
        let long = ControlRequest::CreateVm {
            cluster_id: "c".into(),
            vm: VmCreateRequest {
                kernel: Some("/".repeat(MAX_PATH_LEN + 1)),
                ..vm()
            },
        };
        assert_eq!(
            ControlRequest::decode(&long.encode()),
            Err(ControlDecodeError::OutOfBounds("vm.kernel"))
        );

        let view = VmView {
            id: "ab".repeat(16),
            name: "web-1".into(),
            state: "running".into(),
            node: NodeKey::from_secret_bytes([3; 32]).node_id(),
            vcpus: 2,
            memory_mib: 512,
            memory_size: 512 << 20,
            pid: Some(42),
            accel: "tcg".into(),
            stats: None,
        };
        let ok = ControlResponse::VmCreated(view);
        assert_eq!(ControlResponse::decode(&ok.encode()).unwrap(), ok);
        let no = ControlResponse::refused(ControlErrorCode::DoesNotFit, "é".repeat(4000));
        let ControlResponse::Refused { message, .. } = &no else {
            panic!()
        };
        assert!(message.len() <= MAX_MESSAGE_LEN);
        assert_eq!(ControlResponse::decode(&no.encode()).unwrap(), no);
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = ControlRequest::decode(&bytes);
            let _ = ControlResponse::decode(&bytes);
        }
    }
}
