//! Network partitions of a loopback testnet with iptables (Linux, root). A `--wan` testnet
//! is cut in its link emulator instead ([`crate::wan::partition`]); the rest of this text is
//! about loopback testnets.
//!
//! Every node listens on its own loopback address and port. A QUIC dial goes out of the
//! listening UDP socket, so source address and port name the node at both ends of every QUIC
//! packet. TCP does not: measured on the testnet, libp2p's TCP dials often leave from
//! 127.0.0.1 and an ephemeral port (port reuse is not applied), which names no node, so a
//! TCP connection dialled across the cut would survive it. Partitions are therefore only
//! reliable on a testnet whose nodes listen on QUIC only (`up --quic-only`,
//! [`crate::local::UpOptions::quic_only`]; `bench statesync --partition` does that).
//! [`install`] puts DROP rules for every pair of groups into a dedicated chain, jumped to from
//! `INPUT` (loopback packets pass `INPUT` once on delivery), matching by port (TCP and UDP)
//! and by address. [`heal`] removes the jump and the chain; `down` and the benchmarks call it
//! too, also on failure. The bootstrap peer belongs to the first group (it relays gossip, so
//! leaving it on both sides would bridge the partition).
//!

use std::process::Command;

use anyhow::{Context, bail};

use crate::local::Testnet;

/// The chain of a testnet: named after its bootstrap port, so two testnets do not collide.
pub fn chain_name(t: &Testnet) -> String {
    format!("DWCP-TN-{}", t.bootstrap.p2p_port)
}

fn ipt(args: &[&str]) -> anyhow::Result<std::process::Output> {
    Command::new("iptables")
        .args(["-w", "5"])
        .args(args)
        .output()
        .context("running iptables (is it installed, and are we root?)")
}

fn ipt_ok(args: &[&str]) -> anyhow::Result<()> {
    let out = ipt(args)?;
    if !out.status.success() {
        bail!(
            "iptables {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Parses `0-9/10-19` (or `0,2,4-6/1,3`) into groups of node indices below `n`. Every index
/// may appear in one group only; nodes in no group are not cut off from anyone.
pub fn parse_groups(spec: &str, n: usize) -> anyhow::Result<Vec<Vec<usize>>> {
    let mut seen = vec![false; n];
    let mut groups = Vec::new();
    for g in spec.split('/') {
        let mut group = Vec::new();
        for part in g.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (a, b) = match part.split_once('-') {
                Some((a, b)) => (a.trim().parse::<usize>()?, b.trim().parse::<usize>()?),
                None => {
                    let v = part.parse::<usize>()?;
                    (v, v)
                }
            };
            if a > b || b >= n {
                bail!("group range {part} is not within 0..{n}");
            }
            for (i, s) in seen.iter_mut().enumerate().take(b + 1).skip(a) {
                if std::mem::replace(s, true) {
                    bail!("node {i} is in two groups");
                }
                group.push(i);
            }
        }
        if group.is_empty() {
            bail!("empty group in {spec:?}");
        }
        groups.push(group);
    }
    if groups.len() < 2 {
        bail!("a partition needs at least two groups, e.g. 0-9/10-19");
    }
    Ok(groups)
}

/// The halves of an `n`-node testnet: `0-(n/2-1)/(n/2)-(n-1)`.
pub fn halves(n: usize) -> Vec<Vec<usize>> {
    vec![(0..n / 2).collect(), (n / 2..n).collect()]
}

struct Side {
    ports: Vec<String>,
    ips: Vec<String>,
}

/// The emulator's hosts of node groups: node `i` is host `i + 1`, the bootstrap peer (host
/// 0) joins the first group.
pub fn wan_host_groups(groups: &[Vec<usize>]) -> Vec<Vec<usize>> {
    groups
        .iter()
        .enumerate()
        .map(|(gi, g)| {
            let mut hosts: Vec<usize> = g.iter().map(|i| i + 1).collect();
            if gi == 0 {
                hosts.insert(0, 0);
            }
            hosts
        })
        .collect()
}

/// Installs DROP rules between every two groups (replacing any earlier partition of this
/// testnet). On failure the rules installed so far are removed. On a `--wan` testnet the
/// emulator cuts the links between the groups instead (no iptables; TCP and QUIC alike).
pub fn install(t: &Testnet, groups: &[Vec<usize>]) -> anyhow::Result<()> {
    if let Some(w) = &t.wan {
        let r = crate::wan::partition(w, &wan_host_groups(groups));
        if r.is_err() {
            let _ = crate::wan::heal(w);
        }
        return r;
    }
    if t.nodes.iter().any(|n| n.p2p_port == 0 || n.ip.is_empty()) {
        bail!("this testnet was started without per-node addresses; restart it with `up`");
    }
    let sides: Vec<Side> = groups
        .iter()
        .enumerate()
        .map(|(gi, g)| {
            let mut ports: Vec<String> = g
                .iter()
                .filter_map(|i| t.nodes.get(*i))
                .map(|n| n.p2p_port.to_string())
                .collect();
            let ips: Vec<String> = g
                .iter()
                .filter_map(|i| t.nodes.get(*i))
                .map(|n| n.ip.clone())
                .collect();
            if gi == 0 {
                ports.push(t.bootstrap.p2p_port.to_string());
            }
            Side { ports, ips }
        })
        .collect();
    heal(t)?;
    let r = install_rules(&chain_name(t), &sides);
    if r.is_err() {
        let _ = heal(t);
    }
    r
}

fn install_rules(chain: &str, sides: &[Side]) -> anyhow::Result<()> {
    ipt_ok(&["-N", chain])?;
    for (a, sa) in sides.iter().enumerate() {
        for (b, sb) in sides.iter().enumerate() {
            if a == b {
                continue;
            }
            // multiport takes at most 15 ports per match.
            for pa in sa.ports.chunks(15) {
                for pb in sb.ports.chunks(15) {
                    let (pa, pb) = (pa.join(","), pb.join(","));
                    for proto in ["tcp", "udp"] {
                        ipt_ok(&[
                            "-A",
                            chain,
                            "-p",
                            proto,
                            "-m",
                            "multiport",
                            "--sports",
                            &pa,
                            "-m",
                            "multiport",
                            "--dports",
                            &pb,
                            "-j",
                            "DROP",
                        ])?;
                    }
                }
            }
            let (ia, ib) = (sa.ips.join(","), sb.ips.join(","));
            if !ia.is_empty() && !ib.is_empty() {
                ipt_ok(&["-A", chain, "-s", &ia, "-d", &ib, "-j", "DROP"])?;
            }
        }
    }
    // A dial from a fresh socket (libp2p uses one for AutoNAT dial-backs and dials that do not
    // reuse the listen port) leaves from 127.0.0.1 and an ephemeral port, which names no node:
    // while the partition holds, such packets to or from a node's port are dropped too
    // (sub-chain `<chain>-I`: destination is a node port, source is not; `<chain>-O`: the
    // reverse).
    let all: Vec<String> = sides.iter().flat_map(|s| s.ports.iter().cloned()).collect();
    let (ci, co) = (format!("{chain}-I"), format!("{chain}-O"));
    ipt_ok(&["-N", &ci])?;
    ipt_ok(&["-N", &co])?;
    for ports in all.chunks(15) {
        let ports = ports.join(",");
        for proto in ["tcp", "udp"] {
            // (chain, which port matches, target)
            for (into, dir, target) in [
                (ci.as_str(), "--sports", "RETURN"),
                (co.as_str(), "--dports", "RETURN"),
                (chain, "--dports", ci.as_str()),
                (chain, "--sports", co.as_str()),
            ] {
                ipt_ok(&[
                    "-A",
                    into,
                    "-p",
                    proto,
                    "-m",
                    "multiport",
                    dir,
                    &ports,
                    "-j",
                    target,
                ])?;
            }
        }
    }
    ipt_ok(&["-A", &ci, "-j", "DROP"])?;
    ipt_ok(&["-A", &co, "-j", "DROP"])?;
    ipt_ok(&["-I", "INPUT", "-j", chain])?;
    Ok(())
}

/// Removes this testnet's partition rules, if there are any. Succeeds when there is nothing to
/// remove (also when iptables is not installed).
pub fn heal(t: &Testnet) -> anyhow::Result<()> {
    if let Some(w) = &t.wan {
        return crate::wan::heal(w);
    }
    let chain = chain_name(t);
    let exists = match ipt(&["-n", "-L", &chain]) {
        Ok(o) => o.status.success(),
        Err(_) => return Ok(()),
    };
    // Remove every jump, even if the chain listing failed for another reason.
    for _ in 0..16 {
        match ipt(&["-D", "INPUT", "-j", &chain]) {
            Ok(o) if o.status.success() => continue,
            _ => break,
        }
    }
    if exists {
        ipt_ok(&["-F", &chain])?;
        ipt_ok(&["-X", &chain])?;
    }
    for sub in [format!("{chain}-I"), format!("{chain}-O")] {
        if ipt(&["-n", "-L", &sub]).is_ok_and(|o| o.status.success()) {
            ipt_ok(&["-F", &sub])?;
            ipt_ok(&["-X", &sub])?;
        }
    }
    Ok(())
}

/// Whether this testnet's partition chain exists.
pub fn active(t: &Testnet) -> bool {
    if let Some(w) = &t.wan {
        return crate::wan::partitions(w).is_some_and(|p| !p.is_empty());
    }
    ipt(&["-n", "-L", &chain_name(t)]).is_ok_and(|o| o.status.success())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_parse_and_bad_specs_are_refused() {
        assert_eq!(
            parse_groups("0-2/3,5", 6).unwrap(),
            vec![vec![0, 1, 2], vec![3, 5]]
        );
        assert!(parse_groups("0-2", 6).is_err(), "one group");
        assert!(parse_groups("0-2/2-3", 6).is_err(), "node in two groups");
        assert!(parse_groups("0-2/3-6", 6).is_err(), "out of range");
        assert!(parse_groups("0-2//3", 6).is_err(), "empty group");
        assert_eq!(halves(5), vec![vec![0, 1], vec![2, 3, 4]]);
        assert_eq!(
            wan_host_groups(&[vec![0, 1], vec![2, 3]]),
            vec![vec![0, 1, 2], vec![3, 4]]
        );
    }
}
