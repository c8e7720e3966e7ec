//! Quarantine of equivocators: a node that sent provable misbehaviour (equivocation, votes
//! against committed certificates, capacity lies) is quarantined by every honest node within
//! `K` views of its first offence, and honest nodes are never quarantined. Each honest node
//! counts the `K` views on its own view count (views of ended epochs included, an epoch
//! change as one) from where it stood at the offence: view counts differ from node to node
//! (a node that sat out view changes as an observer counts fewer), so the offender's own
//! count is no common clock.

use std::collections::BTreeMap;

use super::Violation;

/// Tracks offences and quarantines.
#[derive(Debug)]
pub struct Quarantine {
    k_views: u64,
    /// Byzantine node -> every node's view count at its first detectable offence.
    first_offence: BTreeMap<usize, Vec<u64>>,
    /// (honest node, quarantined node) -> view when it happened.
    quarantined: BTreeMap<(usize, usize), u64>,
    honest: Vec<bool>,
}

impl Quarantine {
    /// `honest[i]` says whether node `i` is honest; `k_views` is the deadline.
    pub fn new(honest: Vec<bool>, k_views: u64) -> Self {
        Self {
            k_views,
            first_offence: BTreeMap::new(),
            quarantined: BTreeMap::new(),
            honest,
        }
    }

    /// A Byzantine node committed a detectable offence; `views[i]` is node `i`'s view count
    /// at that moment.
    pub fn offence(&mut self, node: usize, views: &[u64]) {
        self.first_offence
            .entry(node)
            .or_insert_with(|| views.to_vec());
    }

    /// Honest node `by` quarantined `node` at `view`. Quarantining an honest node is a violation.
    pub fn quarantined(
        &mut self,
        at_ms: u64,
        by: usize,
        node: usize,
        view: u64,
    ) -> Result<(), Violation> {
        if self.honest.get(node).copied().unwrap_or(false) {
            return Err(Violation {
                invariant: "quarantine",
                detail: format!("honest node {node} quarantined by {by}"),
                at_ms,
            });
        }
        self.quarantined.entry((by, node)).or_insert(view);
        Ok(())
    }

    /// Called at the end: every offender must be quarantined by every honest node, within
    /// `k_views` views of its first offence.
    pub fn check_end(&self, at_ms: u64) -> Result<(), Violation> {
        for (&bad, views) in &self.first_offence {
            for (by, honest) in self.honest.iter().enumerate() {
                if !honest {
                    continue;
                }
                let v0 = views.get(by).copied().unwrap_or(0);
                match self.quarantined.get(&(by, bad)) {
                    None => {
                        return Err(Violation {
                            invariant: "quarantine",
                            detail: format!(
                                "offender {bad} (first offence in view {v0}) never quarantined by {by}"
                            ),
                            at_ms,
                        });
                    }
                    Some(v) if v.saturating_sub(v0) > self.k_views => {
                        return Err(Violation {
                            invariant: "quarantine",
                            detail: format!(
                                "offender {bad} quarantined by {by} in view {v}, {} views after its offence",
                                v - v0
                            ),
                            at_ms,
                        });
                    }
                    Some(_) => {}
                }
            }
        }
        Ok(())
    }

    /// Offenders seen.
    pub fn offenders(&self) -> usize {
        self.first_offence.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_or_late_quarantine_and_framing_are_caught() {
        let mut q = Quarantine::new(vec![true, true, false], 3);
        q.offence(2, &[1, 1, 0]);
        q.quarantined(0, 0, 2, 2).unwrap();
        assert!(q.check_end(0).is_err(), "node 1 never quarantined it");
        q.quarantined(0, 1, 2, 9).unwrap();
        assert!(q.check_end(0).is_err(), "too late");
        assert!(
            q.quarantined(0, 0, 1, 1).is_err(),
            "honest node quarantined"
        );
        let mut ok = Quarantine::new(vec![true, false], 3);
        ok.offence(1, &[0, 0]);
        ok.quarantined(0, 0, 1, 2).unwrap();
        ok.check_end(0).unwrap();
        // Counted from the quarantining node's own view at the offence: node 0 was at view 5
        // then (the offender at 0), and quarantined at 8, within 3.
        let mut own = Quarantine::new(vec![true, false], 3);
        own.offence(1, &[5, 0]);
        own.quarantined(0, 0, 1, 8).unwrap();
        own.check_end(0).unwrap();
    }
}
