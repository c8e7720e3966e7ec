//! Errors of the hypervisor backends.

use std::path::PathBuf;

use crate::spec::VmId;

/// A VM request that does not fit the share the volunteer donated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ShareError {
    /// One resource would exceed the donated amount.
    #[error(
        "vm '{vm}' does not fit the donated share: {resource} needs {requested} {unit}, \
         donated {donated} {unit}, {in_use} {unit} already in use"
    )]
    Exceeds {
        /// The VM that was refused.
        vm: VmId,
        /// `vcpus`, `memory` or `disk`.
        resource: &'static str,
        /// Unit of the figures (`vCPUs`, `MiB`).
        unit: &'static str,
        /// What the VM asked for.
        requested: u64,
        /// What other defined VMs already hold.
        in_use: u64,
        /// What the volunteer donated.
        donated: u64,
    },
}

/// Errors from the QMP client.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QmpError {
    /// Socket I/O failed.
    #[error("qmp i/o")]
    Io(#[from] std::io::Error),
    /// QEMU closed the monitor (the process exited).
    #[error("qmp connection closed")]
    Closed,
    /// A message was larger than the decoder's limit.
    #[error("qmp message larger than {limit} bytes")]
    TooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// A message was not the JSON we expected.
    #[error("qmp protocol: {0}")]
    Protocol(String),
    /// QEMU answered with an error.
    #[error("qmp command '{command}' failed: {class}: {desc}")]
    Command {
        /// The command that failed.
        command: &'static str,
        /// QEMU's error class, e.g. `GenericError`.
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// No answer in time.
    #[error("qmp command '{command}' timed out")]
    Timeout {
        /// The command that timed out.
        command: &'static str,
    },
}

/// Errors of backend operations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The VM does not fit the donated share.
    #[error(transparent)]
    Share(#[from] ShareError),
    /// A VM spec or argument was invalid.
    #[error("invalid vm spec: {0}")]
    InvalidSpec(String),
    /// No VM with this id.
    #[error("no vm '{0}'")]
    NotFound(VmId),
    /// A VM with this id already exists.
    #[error("vm '{0}' already exists")]
    AlreadyExists(VmId),
    /// The VM is not in a state that allows the operation.
    #[error("vm '{vm}' is {state}, cannot {op}")]
    WrongState {
        /// The VM.
        vm: VmId,
        /// Its current state.
        state: String,
        /// The refused operation.
        op: &'static str,
    },
    /// The backend cannot do this at all.
    #[error("{backend} backend does not support {op}")]
    Unsupported {
        /// Backend name.
        backend: &'static str,
        /// Operation name.
        op: &'static str,
    },
    /// QEMU failed to start.
    #[error("qemu for vm '{vm}' failed to start: {detail}")]
    Spawn {
        /// The VM.
        vm: VmId,
        /// What QEMU printed or why it could not run.
        detail: String,
    },
    /// KVM was required by the config but the probe guest did not run.
    #[error("kvm is not usable: {0}")]
    KvmUnusable(String),
    /// A QMP exchange failed.
    #[error("qmp for vm '{vm}'")]
    Qmp {
        /// The VM.
        vm: VmId,
        /// The cause.
        #[source]
        source: QmpError,
    },
    /// An image failed verification or could not be handled.
    #[error("image {path}: {detail}")]
    Image {
        /// The image file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// An external tool (qemu-img) failed.
    #[error("{tool} failed: {detail}")]
    Tool {
        /// The tool.
        tool: &'static str,
        /// Its stderr or exit status.
        detail: String,
    },
    /// A state-dir record could not be read or written.
    #[error("vm record {path}: {detail}")]
    Record {
        /// The record file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// File-system or process I/O failed.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The libvirt library reported an error.
    #[error("libvirt: {0}")]
    Libvirt(String),
}

impl Error {
    /// Wraps an I/O error with what was being done.
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}
