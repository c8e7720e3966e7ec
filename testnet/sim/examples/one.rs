//! Runs one chaos scenario and prints its report: `cargo run --release -p dwcp-sim --example
//! one -- <nodes> <byzantine> <strategy> <seed>`.

use dwcp_sim::{Scenario, Strategy};

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let n: usize = a.get(1).and_then(|s| s.parse().ok()).unwrap_or(4);
    let f: usize = a.get(2).and_then(|s| s.parse().ok()).unwrap_or(1);
    let st: Strategy = a.get(3).and_then(|s| s.parse().ok()).unwrap_or(Strategy::Silence);
    let seed: u64 = a.get(4).and_then(|s| s.parse().ok()).unwrap_or(1);
    let r = dwcp_sim::run(&Scenario::chaos(n, f, st, seed));
    println!(
        "passed={} live={} {} violations={:?} seqs={} reqs={} msgs={} rejected={} max_view={} offenders={} quarantined={}",
        r.passed(),
        r.live,
        r.liveness_detail,
        r.violations,
        r.committed_seqs,
        r.requests_committed,
        r.messages,
        r.rejected_messages,
        r.max_view,
        r.offenders,
        r.quarantined_byzantine
    );
}
