//! The DWCP local testnet: real `dwcp-bootstrap` and `dwcp-node` processes on one machine.
//!
//! [`local::up`] starts one bootstrap peer and N nodes on 127.0.0.1 with distinct ports and
//! data dirs under one directory, waits until every node lists all N as `ready`, and writes
//! `<dir>/testnet.json`. [`local::status`] and [`local::down`] read that file. The binary
//! `dwcp-testnet` exposes them as `up`, `status` and `down`, next to the benchmarks and the
//! simulator. With [`local::UpOptions::wan`] every process runs in its own network namespace
//! and node-to-node traffic crosses the `dwcp-wan` link emulator ([`wan`]).
#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod local;
pub mod partition;
pub mod wan;
