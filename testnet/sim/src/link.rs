//! Link model: one-way latency by region pair with jitter, or a uniform latency.

use rand::RngExt;
use rand_chacha::ChaCha8Rng;

/// Number of regions in the regional model.
pub(crate) const REGIONS: usize = 3;

/// One-way latency between regions, ms (eu, us, asia): roughly public-internet medians.
const REGION_MS: [[u64; REGIONS]; REGIONS] = [[8, 45, 110], [45, 8, 80], [110, 80, 8]];

/// How long a message takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkModel {
    /// Nodes spread over three regions; latency from a fixed eu/us/asia table (8-110 ms) plus up to 20% jitter.
    Regions,
    /// The same one-way latency on every link, no jitter.
    Uniform {
        /// One-way latency, ms.
        one_way_ms: u64,
    },
}

impl LinkModel {
    pub(crate) fn delay(&self, rng: &mut ChaCha8Rng, from: usize, to: usize) -> u64 {
        match self {
            Self::Regions => {
                let base = REGION_MS[from % REGIONS][to % REGIONS];
                base + rng.random_range(0..=base / 5)
            }
            Self::Uniform { one_way_ms } => *one_way_ms,
        }
    }
}
