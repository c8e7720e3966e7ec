//! Telling a stalled consensus from an idle one, and saying why (manual 5.2.2, "Consensus
//! Stall": "Last commit: 5 minutes ago, Pending proposals: 27, PBFT view: 15 (stuck)").
//!
//! PBFT gives up liveness, never safety, when more than f of the 3f+1 members are silent:
//! a volunteer committee that loses two of four members to closed laptops stops deciding
//! until one of them returns, and nothing in the protocol can (or should) vote them out
//! without their quorum. What an operator needs then is a plain answer to "is it stuck, and
//! why": `dwcp-cli consensus quorum-status` prints this diagnosis, and the gauges
//! `dwcp_pbft_stalled` and `dwcp_pbft_members_heard` carry it to Prometheus.
//!
//! Pure: the driver passes what it observed (ages in milliseconds, counts); no clock here.

use serde::{Deserialize, Serialize};

/// Why decisions stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cause", rename_all = "snake_case")]
pub enum StallCause {
    /// Fewer than 2f+1 members (this node included, when it is one) were heard from within
    /// the window: crashed, switched off, or cut off from this node by a partition. Decisions
    /// resume when enough of them are back.
    LostQuorum {
        /// Members heard from within the window.
        heard: usize,
        /// Members a decision needs (2f+1).
        quorum: usize,
    },
    /// A quorum is heard from, but the view is changing and no new view has completed: the
    /// members disagree on the view (view changes that do not reach 2f+1 for one view), or
    /// a faulty primary is being replaced.
    ViewChange,
    /// A quorum is heard from and the view is active, yet nothing commits: the primary may be
    /// withholding proposals (its backups' timers will replace it), or this node may not
    /// receive the decisions (an observer whose members do not answer its fetches).
    NoProgress,
}

/// A stall: how long decisions have stopped, and the likely cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stall {
    /// Milliseconds since this node last executed a decision (or started).
    pub quiet_ms: u64,
    /// Why.
    #[serde(flatten)]
    pub cause: StallCause,
}

/// What the diagnosis reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observed {
    /// Work is waiting: requests queued in the engine, this node's own requests not yet
    /// committed, or a view change in progress. An idle committee is not stalled.
    pub waiting: bool,
    /// Milliseconds since this node last executed a decision (or started).
    pub quiet_ms: u64,
    /// Committee members heard from within the window (this node included when a member).
    pub heard: usize,
    /// Members a decision needs (2f+1).
    pub quorum: usize,
    /// Whether the current view is active (not changing).
    pub view_active: bool,
}

/// How long without a decision, while work waits, counts as a stall: three view-change
/// timeouts, the time for a primary's timeout plus one failed view change (whose timer
/// doubles) before a new view commits.
#[must_use]
pub fn stall_after_ms(view_change_timeout_ms: u64) -> u64 {
    view_change_timeout_ms.saturating_mul(3)
}

/// The diagnosis: `None` while decisions flow or nothing waits.
#[must_use]
pub fn diagnose(o: &Observed, stall_after_ms: u64) -> Option<Stall> {
    if !o.waiting || o.quiet_ms < stall_after_ms {
        return None;
    }
    let cause = if o.heard < o.quorum {
        StallCause::LostQuorum {
            heard: o.heard,
            quorum: o.quorum,
        }
    } else if !o.view_active {
        StallCause::ViewChange
    } else {
        StallCause::NoProgress
    };
    Some(Stall {
        quiet_ms: o.quiet_ms,
        cause,
    })
}

impl std::fmt::Display for StallCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StallCause::LostQuorum { heard, quorum } => write!(
                f,
                "lost quorum: {heard} committee member(s) heard from recently, a decision needs {quorum}"
            ),
            StallCause::ViewChange => write!(
                f,
                "view change not completing: a quorum is reachable but no new view started"
            ),
            StallCause::NoProgress => write!(
                f,
                "no progress: a quorum is reachable and the view is active, but nothing commits here"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observed() -> Observed {
        Observed {
            waiting: true,
            quiet_ms: 40_000,
            heard: 4,
            quorum: 3,
            view_active: true,
        }
    }

    #[test]
    fn an_idle_committee_is_not_stalled_however_long_it_is_quiet() {
        let o = Observed {
            waiting: false,
            quiet_ms: u64::MAX,
            heard: 0,
            ..observed()
        };
        assert_eq!(diagnose(&o, 30_000), None);
    }

    #[test]
    fn waiting_less_than_the_threshold_is_not_a_stall() {
        let o = Observed {
            quiet_ms: 29_999,
            heard: 1,
            ..observed()
        };
        assert_eq!(diagnose(&o, 30_000), None);
        let o = Observed {
            quiet_ms: 30_000,
            ..o
        };
        assert!(diagnose(&o, 30_000).is_some());
    }

    #[test]
    fn fewer_members_heard_than_a_quorum_is_lost_quorum_whatever_the_view() {
        for view_active in [true, false] {
            let o = Observed {
                heard: 2,
                view_active,
                ..observed()
            };
            assert_eq!(
                diagnose(&o, 30_000),
                Some(Stall {
                    quiet_ms: 40_000,
                    cause: StallCause::LostQuorum {
                        heard: 2,
                        quorum: 3
                    }
                })
            );
        }
    }

    #[test]
    fn a_reachable_quorum_in_a_changing_view_is_a_view_change_stall() {
        let o = Observed {
            heard: 3,
            view_active: false,
            ..observed()
        };
        assert_eq!(
            diagnose(&o, 30_000).map(|s| s.cause),
            Some(StallCause::ViewChange)
        );
        let o = Observed {
            view_active: true,
            ..o
        };
        assert_eq!(
            diagnose(&o, 30_000).map(|s| s.cause),
            Some(StallCause::NoProgress)
        );
    }

    #[test]
    fn the_threshold_is_three_view_change_timeouts() {
        assert_eq!(stall_after_ms(10_000), 30_000);
        assert_eq!(stall_after_ms(u64::MAX), u64::MAX);
    }

    #[test]
    fn the_json_form_names_the_cause_and_its_counts() {
        let s = Stall {
            quiet_ms: 5,
            cause: StallCause::LostQuorum {
                heard: 2,
                quorum: 3,
            },
        };
        let v = serde_json::to_value(s).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"quiet_ms": 5, "cause": "lost_quorum", "heard": 2, "quorum": 3})
        );
        assert_eq!(serde_json::from_value::<Stall>(v).unwrap(), s);
        assert!(s.cause.to_string().contains("2 committee member(s)"));
    }
}
