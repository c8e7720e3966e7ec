//! The CI seed set: a handful of seeds at n = 4 and n = 7 over every strategy, and the
//! determinism self-check. Fast in debug builds.

use super::*;

fn short(mut s: Scenario) -> Scenario {
    s.fault_phase_ms = 20_000;
    s.liveness_phase_ms = 200_000;
    s.drain_ms = 180_000;
    s
}

/// Trace hashes of the n = 4 CI seeds (one per strategy, in `Strategy::ALL` order), as the
/// build that the long safety sweeps ran on computes them (testnet/sim/README.md). A change
/// that only makes the simulator faster must leave them as they are. If a deliberate change
/// to an engine or the simulator moves them, the recorded sweeps no longer describe the code:
/// update these and the README, and run the sweeps again.
const SWEPT_ENGINE_FINGERPRINT: [&str; 8] = [
    "744e7d01fa29a4a95bdd0f0c8271efd2bc74ec7c9fff26c8c5bcedbd38876dcc",
    "18c3c118084eb9a5ccc3230fb75422059cc5bbd3533f0d211479cc98b7c8b496",
    "418669f4885b6ccff4f94f4dc068439a8befe4d10a1932bbb1839128e9c6c12b",
    "834ce8537f296a903d23d58e02e30ab0ba02643f274a483127be2f26d0de23c4",
    "58343eb1814795e6280d5b81ee6210f619cba25b49db1ff2a7f8209785aae3ee",
    "c2e4d527eb96595380cc592be82d10392bbcce1ae85086c40a11e685c187bba3",
    "bd44fda72350d9e83e551b281f055624d305c53835125ac4a0e460c4012841e4",
    "e55636eac8ee80ce564c8a84cc578ff764c9e4e4bda6fbc9e290de2dd5fd6cd4",
];

#[test]
fn ci_seeds_n4_every_strategy_are_safe_and_live() {
    for (k, strategy) in Strategy::ALL.into_iter().enumerate() {
        let r = run(&short(Scenario::chaos(4, 1, strategy, 100 + k as u64))).unwrap();
        assert_eq!(
            r.trace_hash, SWEPT_ENGINE_FINGERPRINT[k],
            "n=4 {strategy:?}: the run differs from the swept build's"
        );
        assert!(
            r.passed(),
            "n=4 {strategy:?} seed {}: {:?} {}",
            r.seed,
            r.violations,
            r.liveness_detail
        );
        assert!(r.requests_committed > 0);
        // Every honest node's reputation table was compared after each sequence number.
        assert!(r.reputation_tables_compared > r.committed_seqs);
        if strategy.provable() {
            assert_eq!(
                r.quarantined_byzantine, 1,
                "{strategy:?}: offender not quarantined"
            );
        }
        if strategy == Strategy::LieCapacity {
            assert_eq!(r.penalised_byzantine, 1, "capacity liar not penalised");
        }
        if strategy == Strategy::Forge {
            assert!(
                r.rejected_messages > 0,
                "forged messages must be rejected at decoding"
            );
        }
    }
}

#[test]
fn ci_seeds_n7_are_safe_and_live() {
    for (k, strategy) in [
        Strategy::Equivocate,
        Strategy::Silence,
        Strategy::ConflictingDigest,
    ]
    .into_iter()
    .enumerate()
    {
        let r = run(&short(Scenario::chaos(7, 2, strategy, 200 + k as u64))).unwrap();
        assert!(
            r.passed(),
            "n=7 {strategy:?} seed {}: {:?} {}",
            r.seed,
            r.violations,
            r.liveness_detail
        );
    }
}

#[test]
fn same_seed_same_trace() {
    let s = short(Scenario::chaos(4, 1, Strategy::Equivocate, 7));
    let a = self_check(&s).unwrap();
    let other = run(&short(Scenario::chaos(4, 1, Strategy::Equivocate, 8)))
        .unwrap()
        .trace_hash;
    assert_ne!(a, other, "different seeds give different traces");
}

#[test]
fn fault_free_latency_is_about_four_one_way_delays() {
    let r = run(&Scenario::measure(4, 50, 1, 20_000, 1)).unwrap();
    assert!(r.passed());
    let mut l = r.consensus_latency_ms.clone();
    l.sort_unstable();
    // Proposal -> prepare -> commit: 3 one-way delays (150 ms) at 50 ms links.
    assert_eq!(l[l.len() / 2], 150);
}

#[test]
fn impossible_scenarios_are_errors_not_panics() {
    let mut s = Scenario::chaos(0, 0, Strategy::Silence, 1);
    assert!(matches!(run(&s), Err(SimError::Committee(_))));
    s = Scenario::chaos(4, 1, Strategy::Silence, 1);
    s.consensus.checkpoint_interval = 0;
    assert!(matches!(run(&s), Err(SimError::Config(_))));
}

#[test]
fn ci_seeds_with_epochs_are_safe_live_and_rotate_committees() {
    // Every 100 decisions the committee is recomputed (same nodes, new order: primaries
    // rotate) and a new engine continues the log; Byzantine members stay in it.
    for (k, strategy) in [
        Strategy::Equivocate,
        Strategy::Silence,
        Strategy::VoteAgainst,
        Strategy::Replay,
    ]
    .into_iter()
    .enumerate()
    {
        let mut s = short(Scenario::chaos(4, 1, strategy, 300 + k as u64));
        s.epoch_length = 100;
        let r = run(&s).unwrap();
        assert!(
            r.passed(),
            "epochs {strategy:?} seed {}: {:?} {}",
            r.seed,
            r.violations,
            r.liveness_detail
        );
        assert!(
            r.max_epoch >= 2,
            "{strategy:?}: only {} epochs ({} decisions)",
            r.max_epoch,
            r.committed_seqs
        );
    }
    let mut s = short(Scenario::chaos(4, 1, Strategy::Equivocate, 9));
    s.epoch_length = 100;
    self_check(&s).unwrap();
}

#[test]
fn ci_seeds_with_committees_drawn_from_a_larger_pool_hand_over_safely() {
    // Seven nodes, committees of four: every epoch (100 decisions) members hand over to nodes
    // that were observers, which caught up by fetching certificates. The Byzantine node is
    // drawn from all seven, so it sits on some committees and not others. Honest nodes leave
    // and rejoin (or go unready and ready) during the faults, and committees come from the
    // committed membership and reputation (`committee::next_committee`).
    let mut churned = 0;
    for (k, strategy) in [Strategy::Equivocate, Strategy::Delay, Strategy::Forge]
        .into_iter()
        .enumerate()
    {
        let mut s = short(Scenario::chaos(4, 1, strategy, 400 + k as u64));
        s.epoch_length = 100;
        s.observers = 3;
        let r = run(&s).unwrap();
        assert!(
            r.passed(),
            "pool {strategy:?} seed {}: {:?} {}",
            r.seed,
            r.violations,
            r.liveness_detail
        );
        assert!(
            r.membership_changes >= 2,
            "{strategy:?}: {} membership changes in {} epochs",
            r.membership_changes,
            r.max_epoch
        );
        churned += r.membership_ops;
        // Every honest node checked the link ending each epoch it finished, as a node
        // joining later would (2f+1 checkpoint signatures of the ending committee on the
        // next committee and the state it starts from).
        assert!(
            r.epoch_links_verified >= 4 * (r.max_epoch.saturating_sub(1)),
            "{strategy:?}: {} links verified in {} epochs",
            r.epoch_links_verified,
            r.max_epoch
        );
        eprintln!(
            "pool {strategy:?}: membership ops {}, quarantine exclusions {}",
            r.membership_ops, r.quarantine_exclusions
        );
    }
    assert!(churned > 0, "no membership operation committed");
}

#[test]
fn ci_seeds_a_quarantined_equivocator_is_left_out_of_the_next_committee() {
    // The committees of epochs after the equivocator's quarantine are computed from the
    // committed reputation table: a quarantined member is not chosen again (with enough
    // other eligible nodes), and no committee ever holds more than f Byzantine members
    // (`committee_fault_bound`, checked at every epoch). Whether the equivocator gets to
    // equivocate depends on the seed (it must sit in a committee while it is active), so
    // several seeds run: every one that offended must end quarantined, and at least one
    // must show the exclusion.
    let mut excluded = 0;
    let mut offended = 0;
    for seed in 8..=11 {
        let mut s = short(Scenario::chaos(4, 1, Strategy::Equivocate, seed));
        s.epoch_length = 100;
        s.observers = 3;
        let r = run(&s).unwrap();
        assert!(
            r.passed(),
            "seed {seed}: {:?} {}",
            r.violations,
            r.liveness_detail
        );
        if r.offenders > 0 {
            offended += 1;
            assert_eq!(r.quarantined_byzantine, 1, "seed {seed}: not quarantined");
        }
        if r.quarantine_exclusions >= 1 {
            excluded += 1;
        }
    }
    assert!(offended >= 1, "no seed had the equivocator offend");
    assert!(excluded >= 1, "no seed left the quarantined member out");
}

#[test]
fn ci_seed_475_at_n16_silent_byzantine_nodes_cannot_strand_honest_ones_between_views() {
    // Found by the n = 16 sweep: with the 5 Byzantine replicas silent, 3 honest replicas
    // gathered 2f+1 view changes for view 1 and moved on to view 2, while the 8 others,
    // missing some of those view changes, never started their view-change timer (fewer than
    // f+1 asked for view 2 to pull them along): no view had a quorum again. A view change
    // for a later view now counts towards the timer (section 4.4).
    let r = run(&Scenario::chaos(16, 5, Strategy::Silence, 475)).unwrap();
    assert!(r.passed(), "{:?} {}", r.violations, r.liveness_detail);
    assert!(
        r.max_view >= 2,
        "the split happened (max view {})",
        r.max_view
    );
}

#[test]
fn ci_seed_a_late_joiner_installs_a_certified_snapshot_and_refuses_a_lying_one() {
    // Committees of 4 from 7 nodes, epochs of 100. Node 6 starts 120 s after the faults
    // stop, 13 epochs behind, further than the 8 ended engines its peers keep. It asks the
    // Byzantine node first (vote-against: the first to send it later-epoch traffic), which
    // serves a snapshot with a forged membership: refused. The next peer's snapshot checks
    // out through the chain of epoch links from genesis; node 6 installs it, catches up and
    // ends at the same sequence number as everyone (the liveness check).
    let mut s = Scenario::chaos(4, 1, Strategy::VoteAgainst, 2);
    s.epoch_length = 100;
    s.observers = 3;
    s.late_joiner = true;
    let r = run(&s).unwrap();
    assert!(r.passed(), "{:?} {}", r.violations, r.liveness_detail);
    assert!(r.transfers_installed >= 1, "no snapshot installed");
    assert!(
        r.transfers_refused >= 1,
        "the lying snapshot was not refused"
    );
}
