//! `dwcp-node`: the DWCP node daemon.
//!
//! ```text
//! dwcp-node init [--system] [--config FILE] [--data-dir DIR] [overrides]   write config + identity
//! dwcp-node run  [--config FILE] [overrides]                              run until SIGINT/SIGTERM
//! dwcp-node id   [--config FILE]                                          print the node id
//! ```

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use dwcp_node::{
    config::{AccelSetting, LogFormat, NodeConfig, Paths},
    daemon, identity,
};

#[derive(Debug, Parser)]
#[command(name = "dwcp-node", version, about = "DWCP volunteer node daemon")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Write a configuration file and create the node's identity key.
    Init {
        /// Use the system service paths (/etc/dwcp/node.yaml, /var/lib/dwcp).
        #[arg(long)]
        system: bool,
        /// Overwrite an existing configuration file (the identity key is never overwritten).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        common: Common,
    },
    /// Run the node until SIGINT or SIGTERM.
    Run {
        /// Write the effective configuration (file plus overrides) as YAML to this path.
        #[arg(long, value_name = "FILE")]
        dump_config: Option<PathBuf>,
        /// Exit right after loading the configuration (with --dump-config, for tests).
        #[arg(long)]
        immediate_shutdown: bool,
        #[command(flatten)]
        common: Common,
    },
    /// Print this node's id and libp2p peer id.
    Id {
        #[command(flatten)]
        common: Common,
    },
}

/// Options shared by every subcommand: where the config is, and values that override it.
#[derive(Debug, Args)]
struct Common {
    /// Configuration file (default: /etc/dwcp/node.yaml as root, the user's config dir otherwise).
    #[arg(long, short, env = "DWCP_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory (identity, database).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Cluster id.
    #[arg(long)]
    cluster_id: Option<String>,
    /// Region.
    #[arg(long)]
    region: Option<String>,
    /// Bootstrap peer multiaddr (repeatable; replaces the configured list).
    #[arg(long)]
    bootstrap: Vec<String>,
    /// libp2p listen multiaddr (repeatable; replaces the configured list).
    #[arg(long)]
    listen: Vec<String>,
    /// API bind address.
    #[arg(long)]
    api_bind: Option<SocketAddr>,
    /// Prometheus bind address.
    #[arg(long)]
    metrics_bind: Option<SocketAddr>,
    /// Heartbeat interval, e.g. `1s`.
    #[arg(long, value_parser = humantime::parse_duration)]
    heartbeat_interval: Option<Duration>,
    /// Silence after which a peer is unreachable, e.g. `5s`.
    #[arg(long, value_parser = humantime::parse_duration)]
    unreachable_after: Option<Duration>,
    /// State-sync anti-entropy interval (`ass.gossip.interval`), e.g. `1s`.
    #[arg(long, value_parser = humantime::parse_duration)]
    ass_interval: Option<Duration>,
    /// How often our heartbeat is written into the cluster document
    /// (`ass.consistency.max_staleness`), e.g. `10s`.
    #[arg(long, value_parser = humantime::parse_duration)]
    ass_max_staleness: Option<Duration>,
    /// Log filter, e.g. `info` or `dwcp_node=debug`.
    #[arg(long)]
    log_level: Option<String>,
    /// Log as JSON lines.
    #[arg(long)]
    log_json: bool,
    /// Hypervisor accelerator: auto (probe KVM), kvm or tcg.
    #[arg(long, value_enum)]
    hypervisor_accel: Option<AccelSetting>,
    /// Lend no VM capacity (no QEMU needed).
    #[arg(long)]
    no_hypervisor: bool,
}

impl Common {
    fn apply(&self, c: &mut NodeConfig) {
        if let Some(v) = &self.data_dir {
            c.node.data_dir = v.clone();
        }
        if let Some(v) = &self.cluster_id {
            c.cluster.id = v.clone();
        }
        if let Some(v) = &self.region {
            c.node.region = v.clone();
        }
        if !self.bootstrap.is_empty() {
            c.cluster.bootstrap = self.bootstrap.clone();
        }
        if !self.listen.is_empty() {
            c.network.listen = self.listen.clone();
        }
        if let Some(v) = self.api_bind {
            c.api.rest.bind = v;
        }
        if let Some(v) = self.metrics_bind {
            c.monitoring.prometheus.bind = v;
        }
        if let Some(v) = self.heartbeat_interval {
            c.network.heartbeat_interval = v;
        }
        if let Some(v) = self.unreachable_after {
            c.network.unreachable_after = v;
        }
        if let Some(v) = self.ass_interval {
            c.ass.gossip.interval = v;
        }
        if let Some(v) = self.ass_max_staleness {
            c.ass.consistency.max_staleness = v;
        }
        if let Some(v) = &self.log_level {
            c.monitoring.log.level = v.clone();
        }
        if self.log_json {
            c.monitoring.log.format = LogFormat::Json;
        }
        if let Some(a) = self.hypervisor_accel {
            c.hypervisor.accel = a;
        }
        if self.no_hypervisor {
            c.hypervisor.enabled = false;
        }
    }

    fn paths(&self, system: bool) -> anyhow::Result<Paths> {
        let mut p = if system {
            Paths::system()
        } else {
            Paths::default_for_user()?
        };
        if let Some(c) = &self.config {
            p.config = c.clone();
        }
        Ok(p)
    }

    /// Loads the config file and applies overrides; fills the default data dir.
    fn load(&self) -> anyhow::Result<NodeConfig> {
        let paths = self.paths(false)?;
        if !paths.config.exists() {
            bail!(
                "no configuration at {}; run `dwcp-node init` first (or pass --config)",
                paths.config.display()
            );
        }
        let mut c = NodeConfig::load(&paths.config)?;
        self.apply(&mut c);
        if c.node.data_dir.as_os_str().is_empty() {
            c.node.data_dir = paths.data_dir;
        }
        c.validate()
    }
}

fn init_logging(c: &NodeConfig) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&c.monitoring.log.level));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match c.monitoring.log.format {
        LogFormat::Json => b.json().init(),
        LogFormat::Text => b.init(),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Init {
            system,
            force,
            common,
        } => {
            let paths = common.paths(system)?;
            if paths.config.exists() && !force {
                bail!(
                    "{} already exists; pass --force to overwrite it (the identity is kept)",
                    paths.config.display()
                );
            }
            let mut c = NodeConfig::default();
            c.node.data_dir = paths.data_dir.clone();
            common.apply(&mut c);
            let c = c.validate()?;
            if let Some(dir) = paths.config.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            std::fs::write(&paths.config, c.to_yaml()?)
                .with_context(|| format!("writing {}", paths.config.display()))?;
            let key = identity::load_or_create(&c.node.data_dir.join(identity::IDENTITY_FILE))?;
            println!("config:   {}", paths.config.display());
            println!("data dir: {}", c.node.data_dir.display());
            println!("node id:  {}", key.node_id());
            println!("peer id:  {}", key.node_id().to_peer_id()?);
            Ok(())
        }
        Cmd::Id { common } => {
            let c = common.load()?;
            let key = identity::load(&c.node.data_dir.join(identity::IDENTITY_FILE))?;
            println!("{}", key.node_id());
            println!("{}", key.node_id().to_peer_id()?);
            Ok(())
        }
        Cmd::Run {
            dump_config,
            immediate_shutdown,
            common,
        } => {
            let c = common.load()?;
            if let Some(p) = dump_config {
                std::fs::write(&p, c.to_yaml()?)
                    .with_context(|| format!("writing {}", p.display()))?;
            }
            if immediate_shutdown {
                return Ok(());
            }
            init_logging(&c);
            let key = identity::load_or_create(&c.node.data_dir.join(identity::IDENTITY_FILE))?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            let data_dir = c.node.data_dir.clone();
            rt.block_on(daemon::run(
                daemon::NodeSetup {
                    config: c,
                    key,
                    data_dir,
                },
                dwcp_node::shutdown_signal(),
            ))
        }
    }
}
