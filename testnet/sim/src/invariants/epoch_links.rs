//! Epoch links (`epoch_links`): the certified checkpoint that ends each epoch, as an honest
//! node holds it once it is stable, verifies against the committee that ended
//! ([`dwcp_consensus::transfer::EpochLink::verify`]) and names the committee every honest
//! node computed for the next epoch. So a node that joins later, knowing only the genesis
//! committee, could verify the chain of committees and the state each epoch starts from.

use dwcp_consensus::Committee;
use dwcp_consensus::transfer::EpochLink;

use super::Violation;

/// Checks honest node `node`'s `link` ending `ending`'s epoch; `expected` is the next
/// epoch's committee as the first honest node computed it.
pub fn check(
    at_ms: u64,
    node: usize,
    link: &EpochLink,
    ending: &Committee,
    epoch_length: u64,
    expected: Option<&Committee>,
) -> Result<(), Violation> {
    let violation = |detail: String| Violation {
        invariant: "epoch_links",
        detail,
        at_ms,
    };
    let next = link.verify(ending, epoch_length).map_err(|e| {
        violation(format!(
            "node {node}'s link ending epoch {} does not verify: {e}",
            ending.epoch()
        ))
    })?;
    if expected.is_some_and(|c| *c != next) {
        return Err(violation(format!(
            "node {node}'s link names another committee for epoch {}",
            next.epoch()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use dwcp_consensus::Digest;
    use dwcp_protocol::NodeKey;

    fn committee(epoch: u64, ids: std::ops::Range<u8>) -> Committee {
        Committee::new(
            epoch,
            ids.map(|i| NodeKey::from_secret_bytes([i; 32]).node_id())
                .collect(),
        )
        .unwrap()
    }

    #[test]
    fn a_link_without_a_quorum_of_checkpoint_signatures_is_a_violation() {
        let link = EpochLink {
            seq: 100,
            log: Digest::default(),
            clients: Digest::default(),
            app_state: Digest::default(),
            next: committee(1, 1..5),
            proof: Vec::new(),
        };
        let v = check(7, 2, &link, &committee(0, 1..5), 100, None).unwrap_err();
        assert_eq!((v.invariant, v.at_ms), ("epoch_links", 7));
        assert!(v.detail.contains("node 2"), "{}", v.detail);
    }
}
