//! View monotonicity: a node's view never decreases.

use super::Violation;

/// Last view seen per node.
#[derive(Debug)]
pub struct ViewMonotonic {
    last: Vec<u64>,
}

impl ViewMonotonic {
    /// For `n` nodes.
    pub fn new(n: usize) -> Self {
        Self { last: vec![0; n] }
    }

    /// Checks node `node`'s current view.
    pub fn check(&mut self, at_ms: u64, node: usize, view: u64) -> Result<(), Violation> {
        let last = &mut self.last[node];
        if view < *last {
            return Err(Violation {
                invariant: "view-monotonic",
                detail: format!("node {node}: view {last} -> {view}"),
                at_ms,
            });
        }
        *last = view;
        Ok(())
    }

    /// Highest view of any node.
    pub fn max(&self) -> u64 {
        self.last.iter().copied().max().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decreasing_view_is_caught() {
        let mut v = ViewMonotonic::new(2);
        v.check(0, 0, 3).unwrap();
        assert!(v.check(1, 0, 2).is_err());
        v.check(1, 1, 1).unwrap();
    }
}
