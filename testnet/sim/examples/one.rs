//! Runs chaos scenarios and prints one line per seed: `cargo run --release -p dwcp-sim
//! --example one -- <nodes> <byzantine> <strategy|all> <first-seed> [<count> [<observers>
//! <epoch-length>]]`.

use dwcp_sim::{Scenario, Strategy};

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let n: usize = a.get(1).and_then(|s| s.parse().ok()).unwrap_or(4);
    let f: usize = a.get(2).and_then(|s| s.parse().ok()).unwrap_or(1);
    let st: Option<Strategy> = a.get(3).and_then(|s| s.parse().ok());
    let seed: u64 = a.get(4).and_then(|s| s.parse().ok()).unwrap_or(1);
    let count: u64 = a.get(5).and_then(|s| s.parse().ok()).unwrap_or(1);
    let observers: usize = a.get(6).and_then(|s| s.parse().ok()).unwrap_or(0);
    let epoch_length: u64 = a.get(7).and_then(|s| s.parse().ok()).unwrap_or(0);
    let mut failed = 0;
    for seed in seed..seed + count {
        let st = st.unwrap_or(Strategy::ALL[(seed % 8) as usize]);
        let mut s = Scenario::chaos(n, f, st, seed);
        s.observers = observers;
        s.epoch_length = epoch_length;
        let r = match dwcp_sim::run(&s) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(2);
            }
        };
        if !r.passed() {
            failed += 1;
        }
        println!(
            "seed={seed} {} passed={} live={} {} violations={:?} seqs={} reqs={} msgs={} rejected={} max_view={} offenders={} quarantined={} penalised={} trace={}",
            st.name(),
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
            r.quarantined_byzantine,
            r.penalised_byzantine,
            &r.trace_hash[..16]
        );
    }
    println!("failed {failed}/{count}");
}
