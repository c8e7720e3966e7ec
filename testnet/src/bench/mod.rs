//! `dwcp-testnet bench <subsystem>`: benchmarks that run our engine side by side with its
//! anchors in one process and print a table (or JSON with `--json`).
//!
//! Each benchmark is one module with a `clap::Args` struct named `Args` and
//! `pub(crate) fn run(args: Args) -> anyhow::Result<()>`, behind its own cargo feature.

use clap::Subcommand;

// --- each subsystem adds `#[cfg(feature = "bench-x")] pub(crate) mod x;` below ---
#[cfg(feature = "bench-encoding")]
pub(crate) mod encoding;
#[cfg(feature = "bench-placement")]
pub(crate) mod placement;
#[cfg(feature = "bench-prediction")]
pub(crate) mod prediction;
#[cfg(feature = "bench-statesync")]
pub(crate) mod statesync;
#[cfg(feature = "bench-transport")]
pub(crate) mod transport;

/// The benchmarks.
#[derive(Debug, Subcommand)]
pub(crate) enum BenchCmd {
    // --- each subsystem adds `#[cfg(feature = "bench-x")] X(x::Args),` below ---
    /// ITP placement: lower bound, FFD, first fit, best fit, ours and the exact MILP.
    #[cfg(feature = "bench-placement")]
    Placement(placement::Args),
    /// PBA bandwidth forecasts: the LSTM, the engine and every baseline per source and horizon.
    #[cfg(feature = "bench-prediction")]
    Prediction(prediction::Args),
    /// HDE encoding: our encoder (default, adaptive), zstd -1/-3 and lz4 per memory image.
    #[cfg(feature = "bench-encoding")]
    Encoding(encoding::Args),
    /// AMST transport: adaptive multi-stream vs one connection and iperf3 on emulated WAN links.
    #[cfg(feature = "bench-transport")]
    Transport(transport::Args),
    /// ASS state sync on a real testnet: change propagation, convergence after a partition.
    #[cfg(feature = "bench-statesync")]
    Statesync(statesync::Args),
}

impl BenchCmd {
    pub(crate) fn run(self) -> anyhow::Result<()> {
        match self {
            // --- each subsystem adds `#[cfg(feature = "bench-x")] Self::X(a) => x::run(a),` below ---
            #[cfg(feature = "bench-placement")]
            Self::Placement(a) => placement::run(a),
            #[cfg(feature = "bench-prediction")]
            Self::Prediction(a) => prediction::run(a),
            #[cfg(feature = "bench-encoding")]
            Self::Encoding(a) => encoding::run(a),
            #[cfg(feature = "bench-transport")]
            Self::Transport(a) => transport::run(a),
            #[cfg(feature = "bench-statesync")]
            Self::Statesync(a) => statesync::run(a),
        }
    }
}
