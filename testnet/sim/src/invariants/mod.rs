//! Safety invariants, checked after every event of a run. One file each.

pub mod agreement;
pub mod committees;
pub mod epoch_links;
pub mod quarantine;
pub mod reputation_agreement;
pub mod validity;
pub mod view_monotonic;

/// A broken invariant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Which invariant.
    pub invariant: &'static str,
    /// What happened.
    pub detail: String,
    /// Virtual time, ms.
    pub at_ms: u64,
}
