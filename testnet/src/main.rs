//! `dwcp-testnet`: run DWCP on one machine.

mod bench;
mod cmd_local;
#[cfg(feature = "sim")]
mod sim;
#[cfg(feature = "sim")]
mod sim_statesync;

use clap::{Parser, Subcommand};

#[cfg(feature = "sim")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "dwcp-testnet",
    version,
    about = "Local DWCP testnet, benchmarks and simulator"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Start a bootstrap peer and N nodes on 127.0.0.1 (or, with --wan, in network
    /// namespaces joined by the WAN emulator) and wait until they form a mesh.
    Up(cmd_local::UpArgs),
    /// Add one node to a running loopback testnet, as a volunteer who installs later (same
    /// cluster, bootstrap peer and consensus settings; it starts from nothing).
    Join(cmd_local::JoinArgs),
    /// Show the testnet's processes and what each node reports.
    Status(cmd_local::DirArgs),
    /// Stop every process of the testnet (by pid).
    Down(cmd_local::DirArgs),
    /// Cut the testnet into groups with iptables DROP rules (root), e.g. --groups 0-9/10-19;
    /// on a --wan testnet the emulator cuts the links.
    Partition(cmd_local::PartitionArgs),
    /// Remove the partition rules.
    Heal(cmd_local::DirArgs),
    /// Benchmarks: our engine side by side with its anchors, in one run.
    #[command(subcommand)]
    Bench(bench::BenchCmd),
    /// The deterministic simulator: the node's cores on a virtual clock, under attack.
    #[cfg(feature = "sim")]
    #[command(subcommand)]
    Sim(sim::SimCmd),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Up(a) => cmd_local::up(a),
        Cmd::Join(a) => cmd_local::join(a),
        Cmd::Status(a) => cmd_local::status(a),
        Cmd::Down(a) => cmd_local::down(a),
        Cmd::Partition(a) => cmd_local::partition(a),
        Cmd::Heal(a) => cmd_local::heal(a),
        Cmd::Bench(b) => b.run(),
        #[cfg(feature = "sim")]
        Cmd::Sim(s) => s.run(),
    }
}
