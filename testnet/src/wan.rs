//! The testnet on emulated WAN links (`dwcp-testnet up --wan <profile>`, Linux, root).
//!
//! Host 0 is the bootstrap peer, host `i + 1` is node `i`. Every host gets its own network
//! namespace `dwcp-tn<tag>-<host>` with two interfaces:
//!
//! - `wan0` (`10.233.0.<host + 1>/24`), a TUN device of the `dwcp-wan` emulator, a child
//!   process (`dwcp-wan run --netns ... --control <dir>/wan.sock`) that outlives `up` and
//!   moves every packet between hosts through the profile's delay, jitter, loss, rate and
//!   queue. libp2p (TCP and QUIC) listens only there, so all node-to-node traffic crosses
//!   the emulator.
//! - `mgmt0`, one end of a veth pair whose other end (`dtn<tag>m<host>`) stays in the host's
//!   namespace: a point-to-point management link, `10.234.<s>.1` on the host side and
//!   `10.234.<s>.<host + 2>` inside, which carries the node's API and metrics to the host
//!   without delay or loss. The namespace has no default route, so a node cannot reach
//!   another node's management address (not even with IP forwarding on the host: the
//!   namespace has no route to it); management traffic never bypasses the emulator between
//!   nodes.
//!
//! Partitions are cut in the emulator through its control socket (`cut A B`), which drops
//! every packet, TCP or QUIC, whatever port a dial uses; no iptables rule is needed.
//!
//! Everything is recorded in `testnet.json` ([`WanEntry`]; also in `wan.json`, written before
//! the first namespace is created, so that `down` cleans up after an `up` that was killed
//! half way) and removed by [`teardown`] (called by `down`, and by `up` when it fails half
//! way): the emulator stops (its TUNs go with it), the namespaces are deleted after killing
//! whatever still runs inside, and the host-side veths disappear with them.

use std::{
    fs,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, anyhow, bail};
use dwcp_wan::Profile;
use serde::{Deserialize, Serialize};

/// The libp2p port every host listens on (TCP and QUIC): each namespace has its own ports.
pub const P2P_PORT: u16 = 4001;
/// Metrics port of the bootstrap peer on its management address.
pub const BOOTSTRAP_METRICS_PORT: u16 = 9100;
/// Name of the management interface inside each namespace.
pub const MGMT_IFACE: &str = "mgmt0";
/// Most hosts (bootstrap peer + nodes) the emulator takes.
pub const MAX_HOSTS: usize = 200;

/// The WAN part of `testnet.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WanEntry {
    /// The profile as given to `up --wan`.
    pub profile: String,
    /// What the profile means (RTT, rate, loss, jitter).
    pub summary: String,
    /// The emulator process (`dwcp-wan run`).
    pub emulator_pid: u32,
    /// Its control socket.
    pub control: PathBuf,
    /// Its log.
    pub log: PathBuf,
    /// Namespaces: host 0 is the bootstrap peer, host `i + 1` node `i`.
    pub namespaces: Vec<String>,
    /// Host-side ends of the management veths, one per namespace.
    pub mgmt_links: Vec<String>,
    /// Management subnet, `10.234.<s>.0/24`: host side `.1`, host `h` at `.<h + 2>`.
    pub mgmt_subnet: u8,
}

impl WanEntry {
    /// Management address of host `h` (inside its namespace).
    pub fn mgmt_ip(&self, h: usize) -> String {
        mgmt_ip(self.mgmt_subnet, h)
    }

    /// Namespace of node `i`.
    pub fn node_namespace(&self, i: usize) -> Option<&str> {
        self.namespaces.get(i + 1).map(String::as_str)
    }
}

fn mgmt_ip(subnet: u8, h: usize) -> String {
    format!("10.234.{subnet}.{}", h + 2)
}

/// The WAN address of host `h` (the bootstrap peer is host 0, node `i` host `i + 1`).
pub fn wan_ip(h: usize) -> String {
    dwcp_wan::host_addr(h).to_string()
}

/// Parses a profile the way the emulator will, making a trace file's path absolute (the
/// emulator runs with another working directory). Returns the spec to pass on and a summary.
pub fn resolve_profile(spec: &str) -> anyhow::Result<(String, String)> {
    let mut items = Vec::new();
    for item in spec.split(',') {
        match item.trim().strip_prefix("trace:") {
            Some(path) => {
                let abs = fs::canonicalize(path)
                    .with_context(|| format!("trace file {path} of profile {spec:?}"))?;
                items.push(format!("trace:{}", abs.display()));
            }
            None => items.push(item.trim().to_owned()),
        }
    }
    let resolved = items.join(",");
    let p = Profile::parse(&resolved).with_context(|| format!("WAN profile {spec:?}"))?;
    Ok((resolved, summary(&p)))
}

fn summary(p: &Profile) -> String {
    let rate = match p.rate_bps() {
        None => "unlimited".to_owned(),
        Some(r) if r >= 1e9 => format!("{:.3} Gbit/s", r / 1e9),
        Some(r) => format!("{:.3} Mbit/s", r / 1e6),
    };
    let trace = matches!(p.rate, dwcp_wan::Rate::Trace(_));
    format!(
        "rtt {} ms, jitter {} ms, rate {rate}{}, loss {:.3} % each way",
        p.rtt_ns as f64 / 1e6,
        p.jitter_ns as f64 / 1e6,
        if trace { " (trace mean)" } else { "" },
        p.loss.mean() * 100.0
    )
}

/// Checks what WAN mode needs: root, `ip netns`, `/dev/net/tun`.
pub fn check_available() -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("--wan needs root (network namespaces, veths and TUN devices)");
    }
    if !Path::new("/dev/net/tun").exists() {
        bail!("--wan needs /dev/net/tun");
    }
    ip(&["netns", "list"]).context("--wan needs `ip netns` (iproute2)")?;
    Ok(())
}

fn ip(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running `ip` (package iproute2)")?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A command that runs `program` inside namespace `ns` (`ip netns exec` execs the program,
/// so the child's pid is the program's).
pub fn command_in(ns: &str, program: &Path) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).arg(program);
    c
}

/// A short tag naming this testnet's namespaces and links: unique among existing ones.
fn pick_tag() -> anyhow::Result<String> {
    let existing = ip(&["netns", "list"])?;
    let seed = std::process::id() as u64
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
    for k in 0..64u64 {
        let tag = format!(
            "{:05x}",
            (seed.wrapping_add(k.wrapping_mul(0x9E37_79B9))) & 0xF_FFFF
        );
        if !existing.contains(&format!("dwcp-tn{tag}-")) {
            return Ok(tag);
        }
    }
    bail!("no free namespace tag")
}

/// A `10.234.<s>.0/24` subnet no interface of the host uses yet.
fn pick_subnet() -> anyhow::Result<u8> {
    let used = ip(&["-4", "-o", "addr", "show"])?;
    (0..=255u8)
        .find(|s| !used.contains(&format!("10.234.{s}.")))
        .ok_or_else(|| anyhow!("every 10.234.x.0/24 management subnet is in use"))
}

/// Creates the namespaces and management links for `hosts` hosts and starts the emulator.
/// On failure everything created so far is removed.
pub fn create(dir: &Path, hosts: usize, profile: &str, wan_bin: &Path) -> anyhow::Result<WanEntry> {
    check_available()?;
    if !(2..=MAX_HOSTS).contains(&hosts) {
        bail!("--wan takes 1..={} nodes", MAX_HOSTS - 1);
    }
    let (resolved, summary) = resolve_profile(profile)?;
    let tag = pick_tag()?;
    let subnet = pick_subnet()?;
    // Every name is chosen before anything is created and recorded in `<dir>/wan.json`, so
    // `down` can remove a half-built set-up even if `up` was killed before it wrote
    // `testnet.json`.
    let mut entry = WanEntry {
        profile: resolved,
        summary,
        emulator_pid: 0,
        control: dir.join("wan.sock"),
        log: dir.join("wan.log"),
        namespaces: (0..hosts).map(|h| format!("dwcp-tn{tag}-{h}")).collect(),
        mgmt_links: (0..hosts).map(|h| format!("dtn{tag}m{h}")).collect(),
        mgmt_subnet: subnet,
    };
    let r = write_record(dir, &entry).and_then(|()| build(&mut entry, wan_bin));
    match r.and_then(|()| write_record(dir, &entry)) {
        Ok(()) => Ok(entry),
        Err(e) => {
            teardown(&entry);
            remove_record(dir);
            Err(e)
        }
    }
}

/// The file recording a WAN set-up from before its first namespace is created until `down`.
pub const WAN_FILE: &str = "wan.json";

fn write_record(dir: &Path, e: &WanEntry) -> anyhow::Result<()> {
    let tmp = dir.join("wan.json.tmp");
    fs::write(&tmp, serde_json::to_vec_pretty(e)?)?;
    fs::rename(&tmp, dir.join(WAN_FILE))?;
    Ok(())
}

/// Reads `<dir>/wan.json`, if there is one.
pub fn read_record(dir: &Path) -> Option<WanEntry> {
    let text = fs::read_to_string(dir.join(WAN_FILE)).ok()?;
    serde_json::from_str(&text).ok()
}

/// Deletes `<dir>/wan.json`.
pub fn remove_record(dir: &Path) {
    let _ = fs::remove_file(dir.join(WAN_FILE));
}

fn build(e: &mut WanEntry, wan_bin: &Path) -> anyhow::Result<()> {
    let host_side = format!("10.234.{}.1", e.mgmt_subnet);
    for h in 0..e.namespaces.len() {
        let (ns, link) = (e.namespaces[h].clone(), e.mgmt_links[h].clone());
        ip(&["netns", "add", &ns])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        ip(&[
            "link", "add", &link, "type", "veth", "peer", "name", MGMT_IFACE, "netns", &ns,
        ])?;
        let inside = e.mgmt_ip(h);
        ip(&[
            "addr",
            "add",
            &host_side,
            "peer",
            &format!("{inside}/32"),
            "dev",
            &link,
        ])?;
        ip(&["link", "set", &link, "up"])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &inside,
            "peer",
            &format!("{host_side}/32"),
            "dev",
            MGMT_IFACE,
        ])?;
        ip(&["-n", &ns, "link", "set", MGMT_IFACE, "up"])?;
    }
    let log = fs::File::create(&e.log).with_context(|| format!("creating {}", e.log.display()))?;
    let mut child = Command::new(wan_bin)
        .arg("run")
        .arg("--netns")
        .arg(e.namespaces.join(","))
        .arg("--wan")
        .arg(&e.profile)
        .arg("--control")
        .arg(&e.control)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {}", wan_bin.display()))?;
    e.emulator_pid = child.id();
    // Ready when the control socket answers (the TUNs and their addresses exist by then).
    let started = Instant::now();
    loop {
        if let Ok(reply) = dwcp_wan::control::request(&e.control, "ping") {
            let want = format!("hosts={}", e.namespaces.len());
            if reply == want {
                return Ok(());
            }
            bail!("the emulator answered {reply:?}, expected {want:?}");
        }
        // Ask the child handle, not /proc: while the child execs, its cmdline can read
        // empty, and taking that for an exit tore the namespaces down under a live emulator.
        if let Ok(Some(status)) = child.try_wait() {
            bail!(
                "the WAN emulator exited during start-up ({status}); see {}",
                e.log.display()
            );
        }
        if started.elapsed() > Duration::from_secs(20) {
            bail!(
                "the WAN emulator did not answer within 20 s; see {}",
                e.log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Stops the emulator and removes every namespace and link of `e` (killing what still runs
/// inside). Ignores what is already gone; never fails.
pub fn teardown(e: &WanEntry) {
    if e.emulator_pid != 0 && crate::local::is_ours(e.emulator_pid) {
        crate::local::signal(e.emulator_pid, nix::sys::signal::Signal::SIGTERM);
        let t = Instant::now();
        while crate::local::is_ours(e.emulator_pid) && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(50));
        }
        if crate::local::is_ours(e.emulator_pid) {
            crate::local::signal(e.emulator_pid, nix::sys::signal::Signal::SIGKILL);
        }
    }
    for ns in &e.namespaces {
        if let Ok(pids) = ip(&["netns", "pids", ns]) {
            for pid in pids
                .split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok())
            {
                crate::local::signal(pid, nix::sys::signal::Signal::SIGKILL);
            }
        }
        let _ = ip(&["netns", "delete", ns]);
    }
    // The veths die with their namespace; delete any left (e.g. the namespace was gone).
    for link in &e.mgmt_links {
        if Path::new(&format!("/sys/class/net/{link}")).exists() {
            let _ = ip(&["link", "delete", link]);
        }
    }
    let _ = fs::remove_file(&e.control);
}

/// Whether namespace `ns` exists.
pub fn namespace_exists(ns: &str) -> bool {
    Path::new(&format!("/run/netns/{ns}")).exists()
}

/// Cuts every link between hosts of different groups (host indices), after healing.
pub fn partition(e: &WanEntry, host_groups: &[Vec<usize>]) -> anyhow::Result<()> {
    heal(e)?;
    for (ga, a) in host_groups.iter().enumerate() {
        for b in host_groups.iter().skip(ga + 1) {
            for &x in a {
                for &y in b {
                    dwcp_wan::control::request(&e.control, &format!("cut {x} {y}"))?;
                }
            }
        }
    }
    Ok(())
}

/// Restores every link.
pub fn heal(e: &WanEntry) -> anyhow::Result<()> {
    dwcp_wan::control::request(&e.control, "heal")?;
    Ok(())
}

/// The cut host pairs, as the emulator reports them (`None` if it does not answer).
pub fn partitions(e: &WanEntry) -> Option<Vec<(usize, usize)>> {
    let reply = dwcp_wan::control::request(&e.control, "partitions").ok()?;
    Some(
        reply
            .split_whitespace()
            .filter_map(|p| {
                let (a, b) = p.split_once('-')?;
                Some((a.parse().ok()?, b.parse().ok()?))
            })
            .collect(),
    )
}

/// The median ICMP RTT (ms) from host `from`'s namespace to host `to`'s WAN address, over
/// `count` pings 0.2 s apart, and how many were answered.
pub fn ping_ms(e: &WanEntry, from: usize, to: usize, count: u32) -> anyhow::Result<(f64, u32)> {
    let ns = e
        .namespaces
        .get(from)
        .ok_or_else(|| anyhow!("no host {from}"))?;
    let out = command_in(ns, Path::new("ping"))
        .args(["-n", "-c", &count.to_string(), "-i", "0.2", "-W", "2"])
        .arg(wan_ip(to))
        .stdin(Stdio::null())
        .output()
        .context("running ping (package iputils-ping)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut rtts: Vec<f64> = text
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.split_whitespace().next()?.parse().ok())
        .collect();
    rtts.sort_by(f64::total_cmp);
    let median = rtts.get(rtts.len() / 2).copied().unwrap_or(f64::NAN);
    Ok((median, u32::try_from(rtts.len()).unwrap_or(u32::MAX)))
}
