//! The node's process-level tests: real node daemons on loopback, driven through their HTTP API
//! and the `dwcp-cli` binary. One test binary for all of them, because each binary links the
//! whole node (libp2p, tract, libvirt, automerge): seven binaries cost seven links and
//! gigabytes of disk for nothing; nextest still runs every test in its own process.
// Tests may unwrap: a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod common;

mod amst;
mod cli;
mod compaction;
mod consensus;
mod epochs;
mod monitoring;
mod pba;
mod placement;
mod statesync;
mod vm;
mod vm_decisions;
