//! Agreement: no two honest nodes commit different batches at the same sequence number.

use std::collections::BTreeMap;

use dwcp_consensus::Digest;

use super::Violation;

/// The first digest an honest node committed at each sequence number.
#[derive(Debug, Default)]
pub struct Agreement {
    decided: BTreeMap<u64, (Digest, usize)>,
}

impl Agreement {
    /// Records that honest node `node` committed `digest` at `seq`.
    pub fn check(
        &mut self,
        at_ms: u64,
        node: usize,
        seq: u64,
        digest: Digest,
    ) -> Result<(), Violation> {
        match self.decided.get(&seq) {
            None => {
                self.decided.insert(seq, (digest, node));
                Ok(())
            }
            Some((d, _)) if *d == digest => Ok(()),
            Some((d, first)) => Err(Violation {
                invariant: "agreement",
                detail: format!(
                    "seq {seq}: node {first} committed {d:?}, node {node} committed {digest:?}"
                ),
                at_ms,
            }),
        }
    }

    /// Highest sequence number any honest node committed.
    pub fn highest(&self) -> u64 {
        self.decided.keys().next_back().copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflicting_commits_are_caught() {
        let mut a = Agreement::default();
        a.check(0, 0, 1, Digest([1; 32])).unwrap();
        a.check(1, 1, 1, Digest([1; 32])).unwrap();
        let v = a.check(2, 2, 1, Digest([2; 32])).unwrap_err();
        assert_eq!(v.invariant, "agreement");
    }
}
