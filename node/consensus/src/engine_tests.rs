//! Engine command tests: each step of the protocol asserts the exact commands emitted, citing
//! the section of Castro and Liskov, "Practical Byzantine Fault Tolerance", OSDI'99.

use dwcp_protocol::{NodeId, NodeKey, SignedEnvelope, Timestamp, Verified};

use crate::{
    CommitCertificate, Committee, ConsensusMsg, Digest, PrePrepare, Request, Slot,
    check_equivocation,
    engine::{Command, Config, Engine, Input, Offence},
};

fn key(i: usize) -> NodeKey {
    NodeKey::from_secret_bytes([i as u8 + 1; 32])
}

fn committee(n: usize) -> Committee {
    Committee::new(0, (0..n).map(|i| key(i).node_id()).collect()).unwrap()
}

fn cfg() -> Config {
    Config {
        checkpoint_interval: 2,
        log_window: 4,
        ..Config::default()
    }
}

fn engine(i: usize, n: usize) -> Engine {
    Engine::new(cfg(), key(i), committee(n)).unwrap()
}

fn t(ms: u64) -> Timestamp {
    Timestamp(ms)
}

fn request(client: usize, nonce: u64) -> Verified<Request> {
    Verified::sign(
        &key(client),
        Request {
            nonce,
            op: vec![nonce as u8; 4],
        },
    )
    .unwrap()
}

fn signed(i: usize, m: ConsensusMsg) -> Verified<ConsensusMsg> {
    Verified::sign(&key(i), m).unwrap()
}

fn open(env: &SignedEnvelope) -> Verified<ConsensusMsg> {
    env.clone().verify::<ConsensusMsg>().unwrap()
}

fn drain(e: &mut Engine) -> Vec<Command> {
    std::iter::from_fn(|| e.poll_command()).collect()
}

/// The message inside a `Broadcast`, or panics.
fn broadcast(c: &Command) -> ConsensusMsg {
    match c {
        Command::Broadcast(env) => open(env).into_message(),
        other => panic!("expected a broadcast, got {other:?}"),
    }
}

fn header(
    i: usize,
    view: u64,
    seq: u64,
    batch: &[Verified<Request>],
    time: u64,
) -> (SignedEnvelope, Slot) {
    let envs: Vec<SignedEnvelope> = batch.iter().map(|r| r.envelope().clone()).collect();
    let slot = Slot {
        view,
        seq,
        digest: Digest::of_batch(&envs),
    };
    let h = signed(
        i,
        ConsensusMsg::PrePrepare(PrePrepare {
            slot,
            time: t(time),
        }),
    );
    (h.envelope().clone(), slot)
}

fn proposal(
    i: usize,
    view: u64,
    seq: u64,
    batch: &[Verified<Request>],
    time: u64,
) -> (Verified<ConsensusMsg>, SignedEnvelope, Slot) {
    let (h, slot) = header(i, view, seq, batch, time);
    let envs = batch.iter().map(|r| r.envelope().clone()).collect();
    (
        signed(
            i,
            ConsensusMsg::Proposal {
                header: h.clone(),
                batch: envs,
            },
        ),
        h,
        slot,
    )
}

#[test]
fn primary_proposes_a_request_section_4_2() {
    // 4.2: "the primary assigns a sequence number n to the request and multicasts a
    // pre-prepare message with m piggybacked to the other replicas".
    let mut p = engine(0, 4);
    let r = request(9, 1);
    p.handle(t(1_000), Input::Request(r.clone()));
    let cmds = drain(&mut p);
    assert_eq!(cmds.len(), 1, "{cmds:?}");
    let ConsensusMsg::Proposal { header, batch } = broadcast(&cmds[0]) else {
        panic!("not a proposal")
    };
    assert_eq!(batch, vec![r.envelope().clone()]);
    let h = open(&header);
    assert_eq!(h.signer(), key(0).node_id());
    let slot = Slot {
        view: 0,
        seq: 1,
        digest: Digest::of_batch(&batch),
    };
    assert_eq!(
        *h.message(),
        ConsensusMsg::PrePrepare(PrePrepare {
            slot,
            time: t(1_000)
        })
    );
}

#[test]
fn backup_relays_request_then_prepares_section_4_1_and_4_2() {
    let mut b = engine(1, 4);
    let r = request(9, 1);
    b.handle(t(0), Input::Request(r.clone()));
    let cmds = drain(&mut b);
    // 4.1: a backup that receives a request relays it to the primary.
    assert!(
        matches!(&cmds[..], [Command::Send { to, envelope }] if *to == key(0).node_id() && envelope == r.envelope())
    );
    // 4.2: a backup accepts the pre-prepare and multicasts <PREPARE, v, n, d, i>.
    let (prop, h, slot) = proposal(0, 0, 1, std::slice::from_ref(&r), 0);
    b.handle(t(5), Input::Message(prop));
    let cmds = drain(&mut b);
    assert_eq!(cmds.len(), 1, "{cmds:?}");
    assert_eq!(
        broadcast(&cmds[0]),
        ConsensusMsg::Prepare { slot, header: h }
    );
}

#[test]
fn prepared_then_committed_delivers_a_verifiable_certificate_section_4_2() {
    let mut b = engine(1, 4);
    let r = request(9, 1);
    let (prop, h, slot) = proposal(0, 0, 1, std::slice::from_ref(&r), 0);
    b.handle(t(0), Input::Message(prop));
    drain(&mut b);
    // prepared(m, v, n, i): the pre-prepare plus 2f = 2 prepares from distinct backups (ours
    // and replica 2's). Then the replica multicasts <COMMIT, v, n, D(m), i>.
    b.handle(
        t(1),
        Input::Message(signed(
            2,
            ConsensusMsg::Prepare {
                slot,
                header: h.clone(),
            },
        )),
    );
    let cmds = drain(&mut b);
    assert_eq!(cmds.len(), 1, "{cmds:?}");
    assert_eq!(broadcast(&cmds[0]), ConsensusMsg::Commit(slot));
    // committed-local: 2f+1 = 3 commits (ours, 2 and 3). Execution emits the decision.
    b.handle(t(2), Input::Message(signed(2, ConsensusMsg::Commit(slot))));
    assert!(drain(&mut b).is_empty());
    b.handle(t(3), Input::Message(signed(3, ConsensusMsg::Commit(slot))));
    let cmds = drain(&mut b);
    assert_eq!(cmds.len(), 1, "{cmds:?}");
    let Command::Deliver(d) = &cmds[0] else {
        panic!("expected a decision: {cmds:?}")
    };
    assert_eq!((d.seq, d.view, d.digest), (1, 0, slot.digest));
    assert_eq!(d.requests, vec![r]);
    // Anyone who knows the committee can check the certificate.
    let cb = d.certificate.verify(&committee(4)).unwrap();
    assert_eq!(cb.slot, slot);
    assert_eq!(cb.voters.len(), 3);
    // A certificate missing a vote, or checked against another committee, fails.
    let mut short = d.certificate.clone();
    short.commits.pop();
    assert!(short.verify(&committee(4)).is_err());
    assert!(
        d.certificate
            .verify(&Committee::new(0, (4..8).map(|i| key(i).node_id()).collect()).unwrap())
            .is_err()
    );
    assert_eq!(b.last_executed(), 1);
}

/// Runs a full 4-replica cluster, delivering every command, until quiet.
struct Net {
    engines: Vec<Engine>,
    delivered: Vec<Vec<(u64, Digest)>>,
    reports: Vec<(NodeId, Offence)>,
    down: Vec<bool>,
    /// (sender, message name) of every message sent.
    sent: Vec<(usize, &'static str)>,
    /// Log digests delivered: (replica, seq) -> `Decision::state`.
    logs: std::collections::BTreeMap<(usize, u64), Digest>,
    /// With `Config::app_digests`: the application digest replica i reports at seq.
    app: fn(usize, u64) -> Digest,
}

impl Net {
    fn new(n: usize, cfg: Config) -> Self {
        let engines = (0..n)
            .map(|i| Engine::new(cfg.clone(), key(i), committee(n)).unwrap())
            .collect();
        Self {
            engines,
            delivered: vec![Vec::new(); n],
            reports: Vec::new(),
            down: vec![false; n],
            sent: Vec::new(),
            logs: Default::default(),
            app: |_, _| Digest::default(),
        }
    }

    fn index(&self, id: NodeId) -> usize {
        (0..self.engines.len())
            .find(|i| key(*i).node_id() == id)
            .unwrap()
    }

    fn run(&mut self, now: Timestamp) {
        loop {
            let mut msgs = Vec::new();
            for i in 0..self.engines.len() {
                while let Some(c) = self.engines[i].poll_command() {
                    if let Command::Broadcast(env) | Command::Send { envelope: env, .. } = &c
                        && let Ok(m) = env.clone().verify::<ConsensusMsg>()
                    {
                        self.sent.push((i, m.message().name()));
                    }
                    match c {
                        Command::Broadcast(env) => {
                            for j in 0..self.engines.len() {
                                if j != i {
                                    msgs.push((j, env.clone()));
                                }
                            }
                        }
                        Command::Send { to, envelope } => msgs.push((self.index(to), envelope)),
                        Command::Deliver(d) => {
                            self.delivered[i].push((d.seq, d.digest));
                            self.logs.insert((i, d.seq), d.state);
                            if self.engines[i].awaiting_app_state() == Some(d.seq) {
                                let app = (self.app)(i, d.seq);
                                assert!(self.engines[i].on_app_state(d.seq, app));
                            }
                        }
                        Command::ReportPeer { peer, offence } => self.reports.push((peer, offence)),
                        _ => {}
                    }
                }
            }
            if msgs.is_empty() {
                return;
            }
            for (j, env) in msgs {
                if !self.down[j] {
                    let input = match env.kind() {
                        dwcp_protocol::MessageKind::ConsensusRequest => {
                            Input::Request(env.clone().verify::<Request>().unwrap())
                        }
                        _ => Input::Message(open(&env)),
                    };
                    self.engines[j].handle(now, input);
                }
            }
        }
    }

    fn request_all(&mut self, now: Timestamp, r: &Verified<Request>) {
        for (i, e) in self.engines.iter_mut().enumerate() {
            if !self.down[i] {
                e.handle(now, Input::Request(r.clone()));
            }
        }
        self.run(now);
    }

    fn timeout_all(&mut self, now: Timestamp) {
        for (i, e) in self.engines.iter_mut().enumerate() {
            if !self.down[i] {
                e.handle_timeout(now);
            }
        }
        self.run(now);
    }
}

#[test]
fn checkpoint_becomes_stable_and_truncates_the_log_section_4_3() {
    // K = 2: after executing n = 2 each replica multicasts <CHECKPOINT, 2, d, i>; with 2f+1
    // matching ones the checkpoint is stable and h moves to 2.
    let mut net = Net::new(4, cfg());
    net.request_all(t(0), &request(9, 1));
    assert_eq!(
        net.engines
            .iter()
            .map(Engine::low_watermark)
            .collect::<Vec<_>>(),
        vec![0; 4]
    );
    net.request_all(t(10), &request(9, 2));
    for e in &net.engines {
        assert_eq!((e.last_executed(), e.low_watermark()), (2, 2));
    }
    let first: Vec<_> = net.delivered[0].clone();
    assert_eq!(first.len(), 2);
    assert!(net.delivered.iter().all(|d| *d == first));
}

#[test]
fn stable_checkpoint_command_is_emitted_once_a_quorum_matches_section_4_3() {
    let mut b = engine(1, 4);
    let r1 = request(9, 1);
    let r2 = request(9, 2);
    let mut state = Digest::default();
    for (seq, r) in [(1u64, &r1), (2, &r2)] {
        let (prop, h, slot) = proposal(0, 0, seq, std::slice::from_ref(r), 0);
        b.handle(t(0), Input::Message(prop));
        b.handle(
            t(0),
            Input::Message(signed(2, ConsensusMsg::Prepare { slot, header: h })),
        );
        b.handle(t(0), Input::Message(signed(2, ConsensusMsg::Commit(slot))));
        b.handle(t(0), Input::Message(signed(3, ConsensusMsg::Commit(slot))));
        let cmds = drain(&mut b);
        for c in &cmds {
            if let Command::Deliver(d) = c {
                state = d.state;
            }
        }
        if seq == 2 {
            // The last command is our checkpoint message. It signs the log digest with the
            // executed-request windows and the (here absent) application digest folded in.
            state = crate::checkpoint_digest(&state, &b.clients_digest(), &Digest::default());
            assert_eq!(
                broadcast(cmds.last().unwrap()),
                ConsensusMsg::Checkpoint { seq: 2, state }
            );
        }
    }
    b.handle(
        t(1),
        Input::Message(signed(2, ConsensusMsg::Checkpoint { seq: 2, state })),
    );
    assert!(drain(&mut b).is_empty());
    b.handle(
        t(1),
        Input::Message(signed(3, ConsensusMsg::Checkpoint { seq: 2, state })),
    );
    let cmds = drain(&mut b);
    assert!(
        matches!(&cmds[..], [Command::StableCheckpoint { seq: 2, state: s }] if *s == state),
        "{cmds:?}"
    );
    assert_eq!(b.low_watermark(), 2);
    // Messages at or below h are now ignored (outside the watermarks).
    let (prop, _, _) = proposal(0, 0, 2, &[request(9, 7)], 0);
    b.handle(t(2), Input::Message(prop));
    assert!(drain(&mut b).is_empty());
}

#[test]
fn timeout_starts_view_change_with_prepared_certificates_section_4_4() {
    let mut b = engine(1, 4);
    let r = request(9, 1);
    b.handle(t(0), Input::Request(r.clone()));
    drain(&mut b);
    let (prop, h, slot) = proposal(0, 0, 1, std::slice::from_ref(&r), 0);
    b.handle(t(0), Input::Message(prop));
    b.handle(
        t(0),
        Input::Message(signed(
            2,
            ConsensusMsg::Prepare {
                slot,
                header: h.clone(),
            },
        )),
    );
    drain(&mut b);
    // The request has not executed when the 10 s timer expires: the backup moves to view 1
    // and multicasts <VIEW-CHANGE, 1, 0, C = {}, P = {P_m}, i>.
    assert_eq!(b.poll_timeout(), Some(t(1_000)), "resend tick first");
    b.handle_timeout(t(9_999));
    drain(&mut b);
    assert_eq!(b.view(), 0);
    b.handle_timeout(t(10_000));
    let cmds = drain(&mut b);
    assert!(
        matches!(cmds[0], Command::ViewChangeStarted { view: 1 }),
        "{cmds:?}"
    );
    let ConsensusMsg::ViewChange(vc) = broadcast(&cmds[1]) else {
        panic!("{cmds:?}")
    };
    assert_eq!(
        (vc.new_view, vc.stable_seq, vc.stable_proof.len()),
        (1, 0, 0)
    );
    // P travels as claims in the head and certificates in one proof part: the header and the
    // 2f = 2 prepare signatures (the backup's own and replica 2's), without the batch.
    assert_eq!(vc.prepared, vec![slot]);
    assert_eq!(vc.proof_parts, 1);
    let ConsensusMsg::ViewChangeProofs(part) = broadcast(&cmds[2]) else {
        panic!("{cmds:?}")
    };
    assert_eq!((part.new_view, part.first), (1, 0));
    let Command::Broadcast(head_env) = &cmds[1] else {
        unreachable!()
    };
    assert_eq!(part.head, Digest::of_envelope(head_env));
    assert_eq!(part.proofs.len(), 1);
    assert_eq!(part.proofs[0].pre_prepare, h);
    assert_eq!(part.proofs[0].prepares.len(), 2);
    assert!(!b.is_view_active());
}

#[test]
fn new_view_reproposes_prepared_batches_and_keeps_safety_section_4_4() {
    // Replica 0 (primary of view 0) goes silent after one slot is prepared at replicas 1-3 but
    // only committed at replica 1. The new primary (1) must re-propose the same batch at n=1.
    let mut net = Net::new(4, cfg());
    let r = request(9, 1);
    for e in net.engines.iter_mut() {
        e.handle(t(0), Input::Request(r.clone()));
    }
    // Deliver the proposal and all prepares, but only replica 1 gets the commits it needs.
    let mut queue: Vec<(usize, SignedEnvelope)> = Vec::new();
    let mut commits: Vec<(usize, SignedEnvelope)> = Vec::new();
    for _ in 0..4 {
        for i in 0..4 {
            while let Some(c) = net.engines[i].poll_command() {
                if let Command::Broadcast(env) = c {
                    let is_commit = matches!(open(&env).message(), ConsensusMsg::Commit(_));
                    for j in (0..4).filter(|j| *j != i) {
                        if is_commit {
                            commits.push((j, env.clone()));
                        } else {
                            queue.push((j, env.clone()));
                        }
                    }
                }
            }
        }
        for (j, env) in queue.drain(..) {
            net.engines[j].handle(t(1), Input::Message(open(&env)));
        }
    }
    for (j, env) in commits.drain(..) {
        if j == 1 {
            net.engines[1].handle(t(1), Input::Message(open(&env)));
        }
    }
    assert_eq!(net.engines[1].last_executed(), 1);
    assert_eq!(net.engines[2].last_executed(), 0);
    drain(&mut net.engines[1]);
    net.down[0] = true;
    net.timeout_all(t(10_000));
    for i in 1..4 {
        assert_eq!(net.engines[i].view(), 1, "replica {i}");
        assert!(net.engines[i].is_view_active(), "replica {i}");
        assert_eq!(net.engines[i].last_executed(), 1, "replica {i}");
    }
    // Everyone executed the same batch at n = 1 (the one replica 1 committed in view 0).
    let d1 = net.engines[1].committee().primary(1);
    assert_eq!(d1, key(1).node_id());
    assert!(net.delivered[2].iter().all(|x| x.0 == 1));
    assert_eq!(net.delivered[2], net.delivered[3]);
    // The cluster keeps going in view 1 without replica 0.
    net.request_all(t(10_100), &request(9, 2));
    for i in 1..4 {
        assert_eq!(net.engines[i].last_executed(), 2, "replica {i}");
    }
}

#[test]
fn f_plus_one_view_changes_make_a_replica_join_section_4_5_2() {
    let mut b = engine(3, 4);
    let vc = |i: usize| {
        signed(
            i,
            ConsensusMsg::ViewChange(crate::ViewChange {
                new_view: 2,
                stable_seq: 0,
                stable_proof: vec![],
                prepared: vec![],
                proof_parts: 0,
            }),
        )
    };
    b.handle(t(0), Input::Message(vc(1)));
    assert!(drain(&mut b).is_empty(), "f = 1 view change is not enough");
    b.handle(t(0), Input::Message(vc(2)));
    let cmds = drain(&mut b);
    assert!(
        matches!(cmds[0], Command::ViewChangeStarted { view: 2 }),
        "{cmds:?}"
    );
    assert!(matches!(broadcast(&cmds[1]), ConsensusMsg::ViewChange(v) if v.new_view == 2));
}

#[test]
fn view_changes_for_later_views_count_towards_the_view_change_timer_section_4_4() {
    // n = 7 (f = 2, 2f+1 = 5). Replica 6 joins view 1 after f+1 view changes for it (4.5.2),
    // then replica 4, which gathered 2f+1 view changes for view 1 (its own lost on the way
    // to replica 6), moves on to view 2. Replica 6 holds 4 view changes for view 1 (its own
    // included) and 1 for view 2: 5 replicas have left view 0, so its timer must run and
    // take it to view 2 on expiry.
    // Counting only exact matches left it without a timer for ever when the Byzantine
    // replicas stayed silent (n = 16 sweep, seed 475).
    let mut b = Engine::new(cfg(), key(6), committee(7)).unwrap();
    let vc = |i: usize, new_view: u64| {
        signed(
            i,
            ConsensusMsg::ViewChange(crate::ViewChange {
                new_view,
                stable_seq: 0,
                stable_proof: vec![],
                prepared: vec![],
                proof_parts: 0,
            }),
        )
    };
    for i in 1..=3 {
        b.handle(t(0), Input::Message(vc(i, 1)));
    }
    let cmds = drain(&mut b);
    assert!(
        cmds.iter()
            .any(|c| matches!(c, Command::ViewChangeStarted { view: 1 })),
        "{cmds:?}"
    );
    assert!(
        b.poll_timeout().is_none_or(|d| d.0 < 10_000),
        "no view-change timer yet: only 4 replicas left view 0"
    );
    b.handle(t(100), Input::Message(vc(4, 2)));
    let _ = drain(&mut b);
    b.handle_timeout(t(30_000));
    let cmds = drain(&mut b);
    assert!(
        cmds.iter()
            .any(|c| matches!(c, Command::ViewChangeStarted { view: 2 })),
        "the timer ran out and the replica moved to view 2: {cmds:?}"
    );
}

#[test]
fn equivocating_primary_is_reported_with_checkable_evidence() {
    let mut b = engine(1, 4);
    let (prop, h1, slot1) = proposal(0, 0, 1, &[request(9, 1)], 0);
    b.handle(t(0), Input::Message(prop));
    drain(&mut b);
    // Replica 2 was sent another batch for the same (v, n) and quotes that header.
    let (h2, slot2) = header(0, 0, 1, &[request(9, 2)], 0);
    b.handle(
        t(0),
        Input::Message(signed(
            2,
            ConsensusMsg::Prepare {
                slot: slot2,
                header: h2.clone(),
            },
        )),
    );
    let cmds = drain(&mut b);
    let [
        Command::ReportPeer {
            peer,
            offence: Offence::Equivocation { first, second },
        },
    ] = &cmds[..]
    else {
        panic!("{cmds:?}")
    };
    assert_eq!(*peer, key(0).node_id());
    assert_eq!((first, second), (&h1, &h2));
    let (who, _, view, seq) = check_equivocation(first, second).unwrap();
    assert_eq!((who, view, seq), (key(0).node_id(), 0, 1));
    assert_ne!(slot1.digest, slot2.digest);
    // The same header twice is not evidence.
    assert!(check_equivocation(&h1, &h1).is_err());
}

#[test]
fn proposal_with_wrong_digest_is_refused_and_reported() {
    let mut b = engine(1, 4);
    let (h, _) = header(0, 0, 1, &[request(9, 1)], 0);
    let bad = signed(
        0,
        ConsensusMsg::Proposal {
            header: h,
            batch: vec![request(9, 2).envelope().clone()],
        },
    );
    b.handle(t(0), Input::Message(bad));
    let cmds = drain(&mut b);
    assert!(
        matches!(
            &cmds[..],
            [Command::ReportPeer {
                offence: Offence::Invalid(_),
                ..
            }]
        ),
        "{cmds:?}"
    );
}

#[test]
fn lagging_replica_catches_up_from_commit_certificates() {
    let mut net = Net::new(4, cfg());
    net.down[3] = true;
    for nonce in 1..=3 {
        net.request_all(t(nonce * 10), &request(9, nonce));
    }
    assert_eq!(net.engines[3].last_executed(), 0);
    net.down[3] = false;
    for i in 0..3 {
        assert_eq!(net.engines[i].low_watermark(), 2);
    }
    // Replica 3 takes part in slot 4 but cannot execute it. The stable checkpoint at 4 (2f+1
    // signed checkpoint messages) tells it that it is behind: it fetches commit certificates
    // from a peer, verifies them and executes 1..=4 in order.
    net.request_all(t(100), &request(9, 4));
    assert_eq!(net.engines[3].last_executed(), 4);
    assert_eq!(net.engines[3].low_watermark(), 4);
    assert_eq!(net.delivered[3], net.delivered[0]);
}

#[test]
fn a_replica_that_catches_up_across_a_checkpoint_gets_its_proof_too_section_4_3() {
    // Replica 3 misses slots 1-4 and the checkpoint messages for 2 and 4 (K = 2). Its fetch
    // is answered with the commit certificates and, since they cover the peer's stable
    // checkpoint 4, with the 2f+1 signed checkpoint messages proving it: replica 3 makes 4
    // stable without any new checkpoint broadcast, and holds the proof (what an epoch link
    // needs).
    let mut net = Net::new(4, cfg());
    net.down[3] = true;
    for nonce in 1..=4 {
        net.request_all(t(nonce * 10), &request(9, nonce));
    }
    assert_eq!(net.engines[0].low_watermark(), 4);
    net.down[3] = false;
    net.engines[3].catch_up();
    net.run(t(100));
    let e3 = &net.engines[3];
    assert_eq!(e3.last_executed(), 4);
    assert_eq!(e3.low_watermark(), 4, "stable from the forwarded proof");
    let proof = e3.stable_proof_at(4).expect("the proof of 4");
    assert_eq!(
        crate::stable_proof_digest(e3.committee(), 4, proof),
        Some(net.engines[0].stable_checkpoint().1)
    );
}

#[test]
fn forged_certificate_is_rejected() {
    let mut net = Net::new(4, cfg());
    net.request_all(t(0), &request(9, 1));
    let cert: CommitCertificate = {
        let mut b = engine(1, 4);
        let r = request(9, 1);
        let (prop, h, slot) = proposal(0, 0, 1, std::slice::from_ref(&r), 0);
        b.handle(t(0), Input::Message(prop));
        b.handle(
            t(0),
            Input::Message(signed(2, ConsensusMsg::Prepare { slot, header: h })),
        );
        b.handle(t(0), Input::Message(signed(2, ConsensusMsg::Commit(slot))));
        b.handle(t(0), Input::Message(signed(3, ConsensusMsg::Commit(slot))));
        drain(&mut b)
            .into_iter()
            .find_map(|c| {
                if let Command::Deliver(d) = c {
                    Some(d.certificate)
                } else {
                    None
                }
            })
            .unwrap()
    };
    // Swap the batch: the digest no longer matches.
    let mut swapped = cert.clone();
    swapped.batch = vec![request(9, 5).envelope().clone()];
    assert!(swapped.verify(&committee(4)).is_err());
    // Duplicate a signer to fake a quorum.
    let mut dup = cert.clone();
    dup.commits[2] = dup.commits[1].clone();
    assert!(dup.verify(&committee(4)).is_err());
    assert!(cert.verify(&committee(4)).is_ok());
}

#[test]
fn large_messages_round_trip_through_the_envelope() {
    let batch: Vec<SignedEnvelope> = (0..100).map(|n| request(9, n).envelope().clone()).collect();
    let (h, _) = header(0, 0, 1, &[], 0);
    let m = signed(0, ConsensusMsg::Proposal { header: h, batch });
    let bytes = m.envelope().encode();
    let back = SignedEnvelope::decode_verified::<ConsensusMsg>(&bytes);
    assert!(back.is_ok(), "{} bytes: {:?}", bytes.len(), back.err());
}

#[test]
fn new_primary_fetches_a_batch_it_never_saw_section_4_4() {
    // The primary of view 0 sends its proposal only to replicas 2 and 3; they prepare it (the
    // slot is prepared there) and the primary dies before anything commits. The new primary
    // (replica 1) never saw the batch: the view changes carry only the header and prepare
    // signatures, so it re-proposes the digest and fetches the batch from a replica that
    // vouched for it; everyone then executes the original batch at n = 1.
    let mut net = Net::new(4, cfg());
    let r = request(9, 1);
    net.engines[0].handle(t(0), Input::Request(r.clone()));
    let cmds = drain(&mut net.engines[0]);
    let Command::Broadcast(prop) = &cmds[0] else {
        panic!("{cmds:?}")
    };
    for j in [2, 3] {
        net.engines[j].handle(t(1), Input::Message(open(prop)));
    }
    // Deliver the prepares of 2 and 3 to each other and to 1; drop every commit.
    let mut prepares = Vec::new();
    for j in [2, 3] {
        for c in drain(&mut net.engines[j]) {
            if let Command::Broadcast(env) = c
                && matches!(open(&env).message(), ConsensusMsg::Prepare { .. })
            {
                prepares.push((j, env));
            }
        }
    }
    for (from, env) in &prepares {
        for j in [1, 2, 3] {
            if j != *from {
                net.engines[j].handle(t(2), Input::Message(open(env)));
            }
        }
    }
    for j in 1..4 {
        drain(&mut net.engines[j]);
        // Every backup has the request waiting (so its request timer runs).
        net.engines[j].handle(t(3), Input::Request(r.clone()));
        drain(&mut net.engines[j]);
    }
    assert!((1..4).all(|j| net.engines[j].last_executed() == 0));
    net.down[0] = true;
    net.timeout_all(t(10_003));
    for i in 1..4 {
        assert_eq!(net.engines[i].view(), 1, "replica {i}");
        assert_eq!(net.engines[i].last_executed(), 1, "replica {i}");
    }
    let digest = Digest::of_batch(std::slice::from_ref(r.envelope()));
    for i in 1..4 {
        assert_eq!(net.delivered[i], vec![(1, digest)], "replica {i}");
    }
    assert!(
        net.sent
            .iter()
            .any(|(from, name)| *from == 1 && *name == "fetch-batch"),
        "the new primary fetched the batch: {:?}",
        net.sent
    );
}

#[test]
fn worst_case_view_change_at_n64_stays_under_the_payload_limit() {
    // n = 64 (f = 21), default K = 100 and L = 200: replica 2 has every slot of the window
    // prepared (200 prepared certificates of 42 prepares each) and nothing stable, the
    // largest P it can hold. Its view change (head and proof parts) and the new view built
    // from it must each fit, and the new primary must accept the certificates.
    const N: usize = 64;
    let cfg = Config::default();
    let window = cfg.log_window;
    let committee = committee(N);
    let q = committee.quorum();
    let limit = dwcp_protocol::MessageKind::Consensus.max_envelope();
    let mut b = Engine::new(cfg.clone(), key(2), committee.clone()).unwrap();
    let waiting = request(200, 0);
    b.handle(t(0), Input::Request(waiting.clone()));
    for seq in 1..=window {
        let r = request(200, seq);
        let (prop, h, slot) = proposal(0, 0, seq, std::slice::from_ref(&r), 0);
        b.handle(t(0), Input::Message(prop));
        // 2f - 1 prepares from other backups (its own is the 2f-th).
        for i in (3..N).take(q - 2) {
            let p = signed(
                i,
                ConsensusMsg::Prepare {
                    slot,
                    header: h.clone(),
                },
            );
            b.handle(t(0), Input::Message(p));
        }
    }
    drain(&mut b);
    b.handle_timeout(t(cfg.view_change_timeout_ms));
    let vc: Vec<SignedEnvelope> = drain(&mut b)
        .into_iter()
        .filter_map(|c| match c {
            Command::Broadcast(env) => Some(env),
            _ => None,
        })
        .collect();
    let ConsensusMsg::ViewChange(head) = open(&vc[0]).into_message() else {
        panic!("no view change")
    };
    assert_eq!(head.prepared.len(), window as usize);
    // The head and its parts, each broadcast once.
    assert_eq!(head.proof_parts as usize, vc.len() - 1);
    let mut proofs = 0;
    for env in &vc {
        let len = env.encode().len();
        // Comfortably under the limit: at most 5/8 of it.
        assert!(len <= limit * 5 / 8, "{len} bytes of {limit}");
        if let ConsensusMsg::ViewChangeProofs(p) = open(env).into_message() {
            assert_eq!(p.first as usize, proofs);
            proofs += p.proofs.len();
            assert!(p.proofs.iter().all(|c| c.prepares.len() == q - 1));
        }
    }
    assert_eq!(proofs, window as usize);

    // The primary of view 1 (replica 1) gets it and 2f empty view changes, accepts them all
    // and sends a new view re-proposing the 200 digests; it lacks every batch and asks for
    // them.
    let mut p1 = Engine::new(cfg.clone(), key(1), committee.clone()).unwrap();
    p1.handle(t(0), Input::Request(waiting));
    drain(&mut p1);
    for env in &vc {
        p1.handle(t(1), Input::Message(open(env)));
    }
    let mut out = drain(&mut p1);
    for i in (3..N).take(q - 1) {
        let m = ConsensusMsg::ViewChange(crate::ViewChange {
            new_view: 1,
            stable_seq: 0,
            stable_proof: vec![],
            prepared: vec![],
            proof_parts: 0,
        });
        p1.handle(t(1), Input::Message(signed(i, m)));
        out.extend(drain(&mut p1));
    }
    assert!(
        !out.iter().any(|c| matches!(c, Command::ReportPeer { .. })),
        "{out:?}"
    );
    let nv = out
        .iter()
        .find_map(|c| match c {
            Command::Broadcast(env) => match open(env).into_message() {
                ConsensusMsg::NewView(nv) => Some((env.encode().len(), nv)),
                _ => None,
            },
            _ => None,
        })
        .expect("a new view");
    assert!(nv.0 <= limit / 2, "new view of {} bytes", nv.0);
    assert_eq!(nv.1.proposals.len(), window as usize);
    let fetches = out
        .iter()
        .filter(|c| {
            matches!(c, Command::Send { envelope, .. }
                if matches!(open(envelope).message(), ConsensusMsg::FetchBatch { .. }))
        })
        .count();
    assert_eq!(fetches, window as usize);
}

#[test]
fn largest_view_change_head_fits_for_any_committee() {
    // The head's size does not depend on n beyond its checkpoint proof: 1024 claims and a
    // 256-member checkpoint proof (the most a message may carry) stay under half the limit.
    let claims: Vec<Slot> = (1..=crate::messages::MAX_PREPARED as u64)
        .map(|seq| Slot {
            view: u64::MAX / 2,
            seq,
            digest: Digest([0xAB; 32]),
        })
        .collect();
    let proof: Vec<SignedEnvelope> = (0..crate::messages::MAX_VOTES)
        .map(|i| {
            signed(
                i % 250,
                ConsensusMsg::Checkpoint {
                    seq: u64::MAX / 2,
                    state: Digest([7; 32]),
                },
            )
            .envelope()
            .clone()
        })
        .collect();
    let head = signed(
        0,
        ConsensusMsg::ViewChange(crate::ViewChange {
            new_view: u64::MAX / 2,
            stable_seq: u64::MAX / 2,
            stable_proof: proof,
            prepared: claims,
            proof_parts: 1024,
        }),
    );
    let len = head.envelope().encode().len();
    let limit = dwcp_protocol::MessageKind::Consensus.max_envelope();
    assert!(len <= limit / 2, "{len} bytes of {limit}");
}

#[test]
fn view_change_with_a_bad_certificate_is_dropped_when_o_needs_it_section_4_4() {
    // Replica 3 (Byzantine) claims slot 1 prepared in view 0 with a real header of primary
    // 0 but forged prepare signatures. The new primary (1) checks that certificate because
    // the claim is the highest for slot 1, drops replica 3's view change, reports it, and
    // sends its new view only once 2f+1 good view changes are in, with no trace of the claim.
    let mut p1 = engine(1, 4);
    let empty = |i: usize| {
        signed(
            i,
            ConsensusMsg::ViewChange(crate::ViewChange {
                new_view: 1,
                stable_seq: 0,
                stable_proof: vec![],
                prepared: vec![],
                proof_parts: 0,
            }),
        )
    };
    let (h, slot) = header(0, 0, 1, &[request(9, 1)], 0);
    let bad_head = signed(
        3,
        ConsensusMsg::ViewChange(crate::ViewChange {
            new_view: 1,
            stable_seq: 0,
            stable_proof: vec![],
            prepared: vec![slot],
            proof_parts: 1,
        }),
    );
    let forged = crate::VoteSignature {
        signer: 2,
        signature: vec![7; 64],
    };
    let bad_part = signed(
        3,
        ConsensusMsg::ViewChangeProofs(crate::ViewChangeProofs {
            new_view: 1,
            head: Digest::of_envelope(bad_head.envelope()),
            first: 0,
            proofs: vec![crate::PreparedProof {
                pre_prepare: h,
                prepares: vec![
                    forged.clone(),
                    crate::VoteSignature {
                        signer: 3,
                        ..forged
                    },
                ],
            }],
        }),
    );
    p1.handle(t(0), Input::Message(empty(2)));
    p1.handle(t(0), Input::Message(bad_head));
    p1.handle(t(0), Input::Message(bad_part));
    let cmds = drain(&mut p1);
    // f+1 view changes: replica 1 joins view 1; with its own that is 2f+1, but the chosen
    // certificate is forged: no new view, replica 3 reported.
    assert!(
        matches!(cmds[0], Command::ViewChangeStarted { view: 1 }),
        "{cmds:?}"
    );
    assert!(cmds.iter().any(|c| matches!(c,
        Command::ReportPeer { peer, offence: Offence::Invalid(_) } if *peer == key(3).node_id())));
    assert!(
        !cmds
            .iter()
            .any(|c| matches!(c, Command::Broadcast(e) if matches!(open(e).message(), ConsensusMsg::NewView(_)))),
        "{cmds:?}"
    );
    p1.handle(t(1), Input::Message(empty(0)));
    let cmds = drain(&mut p1);
    let nv = cmds
        .iter()
        .find_map(|c| match c {
            Command::Broadcast(e) => match open(e).into_message() {
                ConsensusMsg::NewView(nv) => Some(nv),
                _ => None,
            },
            _ => None,
        })
        .expect("a new view");
    assert!(
        nv.proposals.is_empty(),
        "the forged claim left no slot in O"
    );
    assert!(nv.view_changes.iter().all(|(n, _)| *n != key(3).node_id()));
    assert!(p1.is_view_active());
}

#[test]
fn replica_down_for_more_than_400_decisions_catches_up_section_4_3() {
    // Section 4.3: a replica that fell behind the stable checkpoint gets what it missed from
    // the others. Here that is the commit certificates its peers keep; they used to keep the
    // last 400 only, so a replica down for 450 decisions (13 s at the simulator's commit rate:
    // seed 32 at n = 7, `equivocate`) asked for slot 1, got slots 51.. and never executed
    // again. Peers now keep certificates up to a byte budget (64 MiB by default).
    let cfg = Config {
        max_batch: 1,
        ..Config::default()
    };
    let mut net = Net::new(4, cfg);
    net.down[3] = true;
    for nonce in 1..=450 {
        net.request_all(t(nonce), &request(9, nonce));
    }
    assert_eq!(net.engines[0].last_executed(), 450);
    assert_eq!(net.engines[0].low_watermark(), 400);
    assert_eq!(net.engines[3].last_executed(), 0);
    // Back up: replica 3 holds a request (slot 451 is far above its window, so it cannot
    // take part); at its next tick it is stalled and fetches, then keeps fetching while each
    // full reply advances it.
    net.down[3] = false;
    net.request_all(t(500), &request(9, 451));
    assert_eq!(net.engines[3].last_executed(), 0);
    net.timeout_all(t(1_500));
    assert_eq!(net.engines[3].last_executed(), 451);
    assert_eq!(net.delivered[3], net.delivered[0]);
}

#[test]
fn a_replica_behind_the_peers_retention_reports_the_gap_it_cannot_replay() {
    // Peers keep 8 KiB of certificates; replica 3 misses 40 decisions, so no peer holds
    // slot 1 any more: it cannot replay the log (the driver must transfer state), and says
    // where the gap is instead of silently fetching for ever.
    let cfg = Config {
        retained_certificate_bytes: 8 * 1024,
        max_batch: 1,
        ..Config::default()
    };
    let mut net = Net::new(4, cfg);
    net.down[3] = true;
    for nonce in 1..=40 {
        net.request_all(t(nonce), &request(9, nonce));
    }
    assert_eq!(net.engines[0].last_executed(), 40);
    net.down[3] = false;
    net.request_all(t(500), &request(9, 41));
    net.timeout_all(t(1_500));
    assert_eq!(net.engines[3].last_executed(), 0);
    let (needed, offered) = net.engines[3].catch_up_gap().expect("gap reported");
    assert_eq!(needed, 1);
    assert!(offered > 1, "first offered {offered}");
    // A replica that is caught up reports no gap.
    assert_eq!(net.engines[0].catch_up_gap(), None);
}

#[test]
fn retained_certificates_are_bounded_by_bytes_and_the_oldest_go_first() {
    let cfg = Config {
        retained_certificate_bytes: 8 * 1024,
        ..cfg()
    };
    let mut net = Net::new(4, cfg.clone());
    for nonce in 1..=20 {
        net.request_all(t(nonce), &request(9, nonce));
    }
    assert_eq!(net.engines[0].last_executed(), 20);
    // A fetch from slot 1 gets the newest certificates that fit the budget, up to slot 20.
    net.engines[0].handle(
        t(100),
        Input::Message(signed(3, ConsensusMsg::Fetch { from_seq: 1 })),
    );
    let cmds = drain(&mut net.engines[0]);
    // The decisions, then the proof of the stable checkpoint they cover (20).
    let [Command::Send { to, envelope }, proof @ ..] = &cmds[..] else {
        panic!("{cmds:?}")
    };
    assert_eq!(*to, key(3).node_id());
    assert_eq!(proof.len(), 3, "2f+1 checkpoint messages: {proof:?}");
    for c in proof {
        let Command::Send { envelope, .. } = c else {
            panic!("{c:?}")
        };
        assert!(matches!(
            open(envelope).into_message(),
            ConsensusMsg::Checkpoint { seq: 20, .. }
        ));
    }
    let ConsensusMsg::Decided(certs) = open(envelope).into_message() else {
        panic!("not a decided reply")
    };
    let seqs: Vec<u64> = certs.iter().filter_map(|c| c.seq_unverified()).collect();
    assert_eq!(seqs.last(), Some(&20));
    assert!(seqs.len() > 1 && seqs[0] > 1, "{seqs:?}");
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    let bytes: usize = certs
        .iter()
        .flat_map(|c| {
            std::iter::once(&c.pre_prepare)
                .chain(&c.batch)
                .chain(&c.commits)
        })
        .map(|e| e.encode().len())
        .sum();
    assert!(bytes <= cfg.retained_certificate_bytes, "{bytes}");
    // A budget of zero is refused.
    assert!(
        Config {
            retained_certificate_bytes: 0,
            ..Config::default()
        }
        .validate()
        .is_err()
    );
}

/// Five replicas' engines for `committee`, ending their epoch at `end`.
fn epoch_net(committee: &Committee, end: u64) -> Net {
    let engines = (0..5)
        .map(|i| {
            let mut e = Engine::new(cfg(), key(i), committee.clone()).unwrap();
            e.set_end(end).unwrap();
            e
        })
        .collect();
    Net {
        engines,
        delivered: vec![Vec::new(); 5],
        reports: Vec::new(),
        down: vec![false; 5],
        sent: Vec::new(),
        logs: Default::default(),
        app: |_, _| Digest::default(),
    }
}

#[test]
fn an_epoch_hands_its_log_to_the_next_committee_and_no_request_runs_twice() {
    // Epoch 0: replicas 0-3 (4 observes), ending at n = 4. Epoch 1: replicas 1-4 continue
    // the same log from n = 4 (its stable checkpoint without proof, like checkpoint 0 of the
    // genesis epoch), in views 2^32 and up.
    let c0 = committee(4);
    let c1 = Committee::new(1, (1..5).map(|i| key(i).node_id()).collect()).unwrap();
    let mut net = epoch_net(&c0, 4);
    for nonce in 1..=4 {
        net.request_all(t(nonce * 10), &request(9, nonce));
    }
    // The observer learns the decisions it did not vote on by fetching them.
    net.timeout_all(t(2_000));
    for (i, e) in net.engines.iter().enumerate() {
        assert_eq!(e.last_executed(), 4, "replica {i}");
        assert!(e.is_ended(), "replica {i}");
    }
    // An ended epoch proposes nothing more and starts no view change.
    net.request_all(t(3_000), &request(9, 5));
    net.timeout_all(t(60_000));
    assert!(net.engines.iter().all(|e| e.last_executed() == 4));
    assert!(net.engines.iter().all(|e| e.view() == 0));
    let old_slot = Slot {
        view: 0,
        seq: 3,
        digest: Digest::default(),
    };
    assert!(net.engines[0].covers(&ConsensusMsg::Commit(old_slot)));

    let handovers: Vec<_> = net.engines.iter().map(|e| e.handover().unwrap()).collect();
    assert!(handovers.windows(2).all(|w| w[0].state == w[1].state));
    let mut next = epoch_net(&c1, 8);
    for (i, h) in handovers.into_iter().enumerate() {
        let mut e = Engine::resume(cfg(), key(i), c1.clone(), h).unwrap();
        e.set_end(8).unwrap();
        next.engines[i] = e;
    }
    let e1 = &next.engines[1];
    assert_eq!(e1.view(), crate::first_view(1));
    assert_eq!(
        e1.primary(),
        key(1).node_id(),
        "2^32 mod 4 = 0: member 0 of epoch 1"
    );
    assert!(!e1.covers(&ConsensusMsg::Commit(old_slot)));
    assert!(e1.covers(&ConsensusMsg::Commit(Slot { seq: 5, ..old_slot })));
    assert!(!net.engines[1].covers(&ConsensusMsg::Commit(Slot { seq: 5, ..old_slot })));

    // A request executed in epoch 0 is not executed again; a new one commits at n = 5.
    next.request_all(t(61_000), &request(9, 3));
    assert!(next.delivered.iter().all(Vec::is_empty));
    next.request_all(t(61_010), &request(9, 6));
    for i in 1..5 {
        assert_eq!(next.engines[i].last_executed(), 5, "replica {i}");
    }
    assert_eq!(next.delivered[1], next.delivered[4]);

    // A view change inside epoch 1: its primary is down; the others move to view 2^32 + 1,
    // proving their stable checkpoint n = 4 with no signatures (the epoch's start).
    next.down[1] = true;
    next.request_all(t(61_100), &request(9, 7));
    next.timeout_all(t(80_000));
    for i in 2..5 {
        let e = &next.engines[i];
        assert_eq!(e.view(), crate::first_view(1) + 1, "replica {i}");
        assert!(e.is_view_active(), "replica {i}");
        assert_eq!(e.last_executed(), 6, "replica {i}");
    }
    // Replica 0 is outside the committee now: no vote of its counts.
    assert!(
        !next
            .sent
            .iter()
            .any(|(i, name)| *i == 0 && ["prepare", "commit", "view-change"].contains(name))
    );
}

#[test]
fn epochs_refuse_ends_and_starts_off_the_checkpoint_grid() {
    let mut e = engine(0, 4);
    assert!(e.set_end(3).is_err(), "K = 2");
    assert!(e.set_end(0).is_err());
    e.set_end(4).unwrap();
    assert_eq!(e.end(), Some(4));
    assert!(e.handover().is_none(), "not ended yet");
}

fn app_cfg() -> Config {
    Config {
        app_digests: true,
        ..cfg()
    }
}

#[test]
fn with_app_digests_a_checkpoint_waits_for_the_application_and_signs_its_state() {
    let mut b = Engine::new(app_cfg(), key(1), committee(4)).unwrap();
    b.set_end(2).unwrap();
    let mut log = Digest::default();
    for seq in [1u64, 2] {
        let r = request(9, seq);
        let (prop, h, slot) = proposal(0, 0, seq, std::slice::from_ref(&r), 0);
        b.handle(t(0), Input::Message(prop));
        b.handle(
            t(0),
            Input::Message(signed(2, ConsensusMsg::Prepare { slot, header: h })),
        );
        b.handle(t(0), Input::Message(signed(2, ConsensusMsg::Commit(slot))));
        b.handle(t(0), Input::Message(signed(3, ConsensusMsg::Commit(slot))));
        for c in drain(&mut b) {
            assert!(
                !matches!(&c, Command::Broadcast(env) if open(env).message().name() == "checkpoint"),
                "no checkpoint before the application's digest: {c:?}"
            );
            if let Command::Deliver(d) = c {
                log = d.state;
            }
        }
    }
    assert_eq!(b.last_executed(), 2);
    assert_eq!(b.awaiting_app_state(), Some(2));
    assert!(!b.is_ended(), "the end's checkpoint digest is not complete");
    assert!(b.handover().is_none());
    assert!(
        !b.on_app_state(1, Digest::default()),
        "not a waiting checkpoint"
    );
    let app = Digest::of("test-app", &[b"state after 2"]);
    assert!(b.on_app_state(2, app));
    assert!(!b.on_app_state(2, app), "only once");
    let signed_state = crate::checkpoint_digest(&log, &b.clients_digest(), &app);
    let cmds = drain(&mut b);
    assert!(
        matches!(&cmds[..], [c] if broadcast(c) == ConsensusMsg::Checkpoint { seq: 2, state: signed_state }),
        "{cmds:?}"
    );
    assert!(b.is_ended());
    let h = b.handover().unwrap();
    assert_eq!(
        h.state, signed_state,
        "the next epoch continues from the signed digest"
    );
    assert_eq!(h.clients_digest(), b.clients_digest());
}

#[test]
fn a_replica_whose_application_state_diverges_never_sees_its_checkpoint_stable() {
    let mut net = Net::new(4, app_cfg());
    net.app = |i, seq| {
        let who: &[u8] = if i == 3 { b"diverged" } else { b"honest" };
        Digest::of("test-app", &[who, &seq.to_be_bytes()])
    };
    net.request_all(t(0), &request(9, 1));
    net.request_all(t(10), &request(9, 2));
    for i in 0..3 {
        assert_eq!(net.engines[i].low_watermark(), 2, "replica {i}");
    }
    assert_eq!(net.engines[3].last_executed(), 2);
    assert_eq!(
        net.engines[3].low_watermark(),
        0,
        "2f+1 checkpoints certify another state than replica 3's"
    );
}

#[test]
fn an_epoch_link_certifies_the_next_committee_and_the_state_it_starts_from() {
    use crate::transfer::{EpochLink, TransferError, app_digest, verify_chain};
    let c0 = committee(4);
    let c1 = Committee::new(1, (1..5).map(|i| key(i).node_id()).collect()).unwrap();
    let mut net = epoch_net(&c0, 4);
    for (i, e) in net.engines.iter_mut().enumerate() {
        *e = Engine::new(app_cfg(), key(i), c0.clone()).unwrap();
        e.set_end(4).unwrap();
    }
    // Every replica's application state digest; at the epoch's end it names the next
    // committee (c1 = replicas 1-4, fixed by the test as `next_committee` would compute it).
    fn app(_: usize, seq: u64) -> Digest {
        let c1 = Committee::new(1, (1..5).map(|i| key(i).node_id()).collect()).unwrap();
        let state = Digest::of("test-app", &[&seq.to_be_bytes()]);
        app_digest(&state, (seq == 4).then_some(&c1))
    }
    net.app = app;
    for nonce in 1..=4 {
        net.request_all(t(nonce * 10), &request(9, nonce));
    }
    let e0 = &net.engines[0];
    assert!(e0.is_ended());
    let (seq, digest, proof) = e0.stable_checkpoint();
    assert_eq!(seq, 4);
    assert!(proof.len() >= 3);
    let link = EpochLink {
        seq: 4,
        log: net.logs[&(0, 4)],
        clients: e0.clients_digest(),
        app_state: Digest::of("test-app", &[&4u64.to_be_bytes()]),
        next: c1.clone(),
        proof: proof.to_vec(),
    };
    assert_eq!(link.digest(), digest);
    assert_eq!(link.verify(&c0, 4), Ok(c1.clone()));
    assert_eq!(
        verify_chain(&c0, std::slice::from_ref(&link), 4),
        Ok(c1.clone())
    );
    let h = e0.handover().unwrap();
    assert_eq!((h.state, h.clients_digest()), (link.digest(), link.clients));

    // Every lie is refused.
    let mut lie = link.clone();
    lie.app_state = Digest::of("test-app", &[b"another state"]);
    assert_eq!(lie.verify(&c0, 4), Err(TransferError::BadProof(4)));
    let mut lie = link.clone();
    lie.next = Committee::new(1, (0..4).map(|i| key(i).node_id()).collect()).unwrap();
    assert_eq!(lie.verify(&c0, 4), Err(TransferError::BadProof(4)));
    let mut lie = link.clone();
    lie.clients = Digest::default();
    assert_eq!(lie.verify(&c0, 4), Err(TransferError::BadProof(4)));
    let mut lie = link.clone();
    lie.proof.truncate(2);
    assert_eq!(
        lie.verify(&c0, 4),
        Err(TransferError::BadProof(4)),
        "2 < 2f+1"
    );
    let mut lie = link.clone();
    lie.proof.push(lie.proof[0].clone());
    lie.proof.remove(1);
    lie.proof.remove(1);
    assert_eq!(
        lie.verify(&c0, 4),
        Err(TransferError::BadProof(4)),
        "a signer twice"
    );
    assert!(matches!(
        link.verify(&c1, 4),
        Err(TransferError::WrongBoundary { .. })
    ));
    assert_eq!(link.verify(&c0, 0), Err(TransferError::NoEpochs));
    assert!(matches!(
        link.verify(&c0, 2),
        Err(TransferError::WrongBoundary { .. })
    ));
    assert!(verify_chain(&c0, &[], 4).is_err());
}
