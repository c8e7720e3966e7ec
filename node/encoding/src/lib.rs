//! HDE: page dedup, adaptive zstd with trained dictionaries, versioned frames (sans-IO)
#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod error;
pub mod frame;
pub mod level;
pub mod loopback;
pub mod message;
pub mod page;
pub mod qemu;
pub mod receiver;
pub mod sender;
pub mod stats;
pub mod store;
mod wire;

pub use error::{ConfigError, DecodeError, EncodeError, StoreError};
pub use message::{Limits, Message, Shape};
pub use page::{PAGE_SIZE, PageHash};
pub use receiver::{Receiver, ReceiverEvent};
pub use sender::{CompressJob, CompressedBatch, DictionaryConfig, Sender, SenderConfig, SenderOutput};
pub use stats::{ReceiveStats, TransferStats};
#[cfg(feature = "sled-store")]
pub use store::SledPageStore;
pub use store::{MemoryPageStore, PageStore};
#[cfg(test)]
mod tests;
