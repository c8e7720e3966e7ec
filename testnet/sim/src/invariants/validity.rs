//! Validity: every committed request was submitted by its (signing) client, and every
//! decision's commit certificate verifies against the committee.

use std::collections::BTreeSet;

use dwcp_consensus::{Committee, Decision};
use dwcp_protocol::NodeId;

use super::Violation;

/// Requests submitted so far, by `(client, nonce)`.
#[derive(Debug, Default)]
pub struct Validity {
    submitted: BTreeSet<(NodeId, u64)>,
}

impl Validity {
    /// Records a request a client signed and sent.
    pub fn submitted(&mut self, client: NodeId, nonce: u64) {
        self.submitted.insert((client, nonce));
    }

    /// Checks a decision delivered by an honest node. `verify_cert` makes it check the
    /// certificate's signatures too (done once per sequence number: it is costly).
    pub fn check(
        &self,
        at_ms: u64,
        node: usize,
        d: &Decision,
        committee: &Committee,
        verify_cert: bool,
    ) -> Result<(), Violation> {
        for r in &d.requests {
            if !self.submitted.contains(&(r.signer(), r.nonce)) {
                return Err(Violation {
                    invariant: "validity",
                    detail: format!(
                        "node {node} seq {}: request ({:?}, {}) was never submitted",
                        d.seq,
                        r.signer(),
                        r.nonce
                    ),
                    at_ms,
                });
            }
        }
        if verify_cert {
            match d.certificate.verify(committee) {
                Ok(cb) if cb.slot.seq == d.seq && cb.slot.digest == d.digest => {}
                Ok(_) => {
                    return Err(Violation {
                        invariant: "validity",
                        detail: format!("seq {}: certificate for another slot", d.seq),
                        at_ms,
                    });
                }
                Err(e) => {
                    return Err(Violation {
                        invariant: "validity",
                        detail: format!("seq {}: certificate does not verify: {e}", d.seq),
                        at_ms,
                    });
                }
            }
        }
        Ok(())
    }
}
