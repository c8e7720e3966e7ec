//! A user-space WAN link emulator in the style of Mahimahi, for the testnet and benchmarks.
//!
//! This kernel has no `netem` (nor `fq`), so delay and loss cannot be added in the kernel.
//! Instead every emulated host is a network namespace with a TUN device (`wan0`,
//! `10.233.0.<i+1>/24`), and one emulator process moves IP packets between the TUNs. The
//! kernels' TCP stacks in the namespaces see a real link with:
//!
//! - one-way delay and jitter (jitter never reorders a link's packets),
//! - random loss or Gilbert-Elliott bursty loss,
//! - a rate limit with a bounded drop-tail queue (default one bandwidth-delay product),
//! - Mahimahi trace replay (one line per 1500-byte delivery opportunity, in ms),
//! - partitions, switched at run time.
//!
//! [`link`] is the pure decision engine, `(now, packet length) -> deliver at / drop`, unit
//! tested on a virtual clock with seeded randomness. [`emulator`] is the shell (namespaces,
//! TUNs, threads); [`selfcheck`] measures the result against the profile with real traffic.
//!
//! Profiles ([`profile::Profile::parse`]): `dc` (1 ms RTT, 10 Gbit/s), `internet` (100 ms RTT,
//! 100 Mbit/s, 0.5 % loss), `lossy` (same with 1 %), `trace:<file>`, and custom values such as
//! `rate=1gbit,rtt=20ms,loss=0.1%,jitter=1ms,queue=2mb,ge=p_gb/p_bg/loss_good/loss_bad`
//! (a preset may come first: `internet,loss=1%`).
//!
//! [`control`] is a Unix-socket control channel to a running `dwcp-wan run --control <path>`
//! (cut and heal links at run time); `dwcp-testnet up --wan` uses it with
//! [`Emulator::attach`], which adds the TUNs to namespaces the testnet created.
//!
//! Clean-up: namespaces are named `dwcpwan-<pid>-<run>x<host>`; the emulator deletes its own
//! on shutdown or drop (killing anything still running inside), and each start (and
//! `dwcp-wan cleanup`) deletes namespaces whose creating process is gone.
//!
//! Measured (this 2-core machine, `dwcp-wan selfcheck --profile <p> --seconds 5`, release):
//! see `testnet/wan/README.md` for the latest figures. The design forwards with one reader
//! thread per host and one writer thread per link direction; each packet costs one `read`,
//! one allocation and one `write`, so about 1 Gbit/s of 1500-byte packets is ~83 k packets/s
//! per direction.
#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod control;
pub mod emulator;
pub mod link;
pub mod profile;
pub mod selfcheck;
mod tun;

pub use emulator::{
    Emulator, EmulatorConfig, EmulatorError, cleanup_stale, host_addr, in_namespace,
};
pub use link::{Link, LinkConfig, LinkStats, Loss, Rate, Trace, Verdict};
pub use profile::Profile;
