//! `dwcp-wan`: run the WAN emulator, check it against its profile, or clean up leftovers.

use anyhow::Context;
use clap::{Parser, Subcommand};
use dwcp_wan::{Emulator, EmulatorConfig, Profile, cleanup_stale, host_addr, selfcheck};

#[derive(Debug, Parser)]
#[command(
    name = "dwcp-wan",
    version,
    about = "User-space WAN link emulator (netns + TUN)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Create N hosts joined by emulated links and forward until Ctrl-C / SIGTERM.
    Run {
        /// Number of hosts (namespaces).
        #[arg(long, default_value_t = 2, conflicts_with = "netns")]
        hosts: usize,
        /// Use these existing namespaces (comma-separated; host i is the i-th) instead of
        /// creating them. The emulator adds only its TUNs, which go away when it stops.
        #[arg(long, value_delimiter = ',')]
        netns: Vec<String>,
        /// Serve the control channel (cut/restore/heal/partitions/stats) on this Unix socket.
        #[arg(long)]
        control: Option<std::path::PathBuf>,
        /// Profile: dc, internet, lossy, trace:<file>, or rate=..,rtt=..,loss=..
        #[arg(long, default_value = "internet")]
        wan: String,
        /// Seed of the loss and jitter draws.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Measure RTT, rate and loss through the emulator and compare with the profile.
    Selfcheck {
        /// Profile to check.
        #[arg(long, default_value = "internet")]
        wan: String,
        /// Seconds per iperf3 run.
        #[arg(long, default_value_t = 5)]
        seconds: u32,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete namespaces left behind by emulator processes that died.
    Cleanup,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Run {
            hosts,
            netns,
            control,
            wan,
            seed,
        } => {
            let profile = Profile::parse(&wan)?;
            let emu = if netns.is_empty() {
                Emulator::start(EmulatorConfig {
                    hosts,
                    profile,
                    seed,
                })
            } else {
                Emulator::attach(&netns, profile, seed)
            }
            .context("starting the emulator")?;
            let emu = std::sync::Arc::new(emu);
            for i in 0..emu.hosts() {
                println!("host {i}: netns {} addr {}", emu.namespace(i), host_addr(i));
            }
            let server = match &control {
                Some(path) => Some(
                    dwcp_wan::control::Server::start(path, std::sync::Arc::clone(&emu))
                        .with_context(|| format!("serving control socket {}", path.display()))?,
                ),
                None => None,
            };
            println!("forwarding; Ctrl-C or SIGTERM stops and removes everything");
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
                tokio::select! {
                    r = tokio::signal::ctrl_c() => r?,
                    _ = term.recv() => {}
                }
                anyhow::Ok(())
            })?;
            drop(server);
            let cpu = emu.cpu_seconds();
            // The control thread has stopped, so this is the last reference.
            match std::sync::Arc::try_unwrap(emu) {
                Ok(emu) => emu.shutdown(),
                Err(emu) => drop(emu),
            }
            println!("stopped (emulator used {cpu:.2} CPU seconds)");
        }
        Cmd::Selfcheck { wan, seconds, json } => {
            let profile = Profile::parse(&wan)?;
            let r = selfcheck::run(&profile, seconds, 1)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!("profile {}", r.profile);
                println!(
                    "{:<40} {:>12} {:>12} {:>10}  ok",
                    "check", "expected", "measured", "tol"
                );
                for c in &r.checks {
                    println!(
                        "{:<40} {:>12.3} {:>12.3} {:>10.3}  {}",
                        c.what, c.expected, c.measured, c.tolerance, c.ok
                    );
                }
                println!(
                    "emulator CPU during rate test: {:.2} cores; model loss {:.3}%; \
                     receiver UDP buffer drops {}; in-flight overflow drops {}; \
                     iperf3 sent {:.1} Mbit/s",
                    r.emulator_cores_at_rate,
                    r.model_loss_percent,
                    r.rcvbuf_errors,
                    r.overflow_drops,
                    r.offered_mbps
                );
            }
            anyhow::ensure!(r.ok(), "self-check failed");
        }
        Cmd::Cleanup => {
            for n in cleanup_stale() {
                println!("removed {n}");
            }
        }
    }
    Ok(())
}
