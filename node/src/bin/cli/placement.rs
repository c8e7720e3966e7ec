//! `dwcp-cli placement ...` (manual sections 5.1, 5.3 and 8.5) and the placement part of
//! `dwcp-cli vm create`.

use std::time::Duration;

use clap::{Subcommand, ValueEnum};
use dwcp_protocol::api::{
    AvoidMode, AvoidNodeRequest, AvoidView, ConstraintView, PlacedVm, PlacementStats,
    SetSolverRequest, SolverSettingsView,
};

use super::{Api, print_json, table};

/// `placement` subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum PlacementCmd {
    /// Statistics of this node's placement decisions: time, optimality gap against the lower
    /// bound, share of constraint evaluations, decision counts.
    SolverStats,
    /// Constraints placement applies: built-in limits, avoided nodes, rules.
    ListConstraints {
        /// Only this type.
        #[arg(long = "type", value_enum)]
        of_type: Option<ConstraintType>,
    },
    /// Keep this node's placement off a node for a while (local to this node: other nodes'
    /// placement is not affected).
    AvoidNode {
        /// Node id, peer id or unique hex prefix.
        #[arg(long)]
        node: String,
        /// How long, e.g. 30m, 1h, 2h30m (at most 30 days).
        #[arg(long, value_parser = parse_duration)]
        duration: Duration,
        /// `hard`: never placed on; `soft`: placed on only when no other node fits.
        #[arg(long, value_enum, default_value_t = Mode::Hard)]
        mode: Mode,
    },
    /// Nodes avoided now.
    ListAvoided,
    /// Solver settings: time budget and target optimality of re-plans.
    SetSolver {
        /// Time budget, e.g. 5s.
        #[arg(long, value_parser = parse_duration)]
        max_time: Option<Duration>,
        /// Stop improving at this ratio of lower bound to hosts used, in (0, 1].
        #[arg(long, value_parser = parse_optimality)]
        target_optimality: Option<f64>,
    },
}

/// `list-constraints --type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum ConstraintType {
    /// Limits every decision applies.
    Builtin,
    /// Avoided nodes.
    Avoid,
    /// Affinity rules.
    Affinity,
    /// Anti-affinity rules.
    AntiAffinity,
}

impl ConstraintType {
    fn as_str(self) -> &'static str {
        match self {
            Self::Builtin => "builtin",
            Self::Avoid => "avoid",
            Self::Affinity => "affinity",
            Self::AntiAffinity => "anti-affinity",
        }
    }
}

/// `avoid-node --mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Mode {
    /// Never placed on until it expires.
    Hard,
    /// Placed on only when nothing else fits.
    Soft,
}

/// A duration such as `90s`, `30m`, `1h` or `2h30m`.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| format!("`{s}` is not a duration (e.g. 30s, 15m, 1h, 2h30m): {e}"))?;
    if d.is_zero() {
        return Err("the duration must be positive".into());
    }
    Ok(d)
}

/// A target optimality in (0, 1].
pub(crate) fn parse_optimality(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a number"))?;
    if v > 0.0 && v <= 1.0 {
        Ok(v)
    } else {
        Err(format!("target optimality must be in (0, 1], got {v}"))
    }
}

fn ms(d: Duration) -> String {
    humantime::format_duration(Duration::from_millis(d.as_millis() as u64)).to_string()
}

/// Runs a `placement` subcommand.
pub(crate) async fn run_placement(api: &Api, json: bool, cmd: PlacementCmd) -> anyhow::Result<()> {
    match cmd {
        PlacementCmd::SolverStats => {
            let s: PlacementStats = api.get("/v1/placement/stats").await?;
            if json {
                return print_json(&s);
            }
            println!(
                "Decisions:        {} placed, {} found no node",
                s.decisions, s.rejections
            );
            println!(
                "Forwarded:        {} creates to other nodes, {} refused or failed",
                s.forwarded, s.forward_failures
            );
            println!(
                "Decision time:    mean {:.3} ms, max {:.3} ms (measured by the node)",
                s.mean_decision_ms, s.max_decision_ms
            );
            match &s.last {
                Some(l) => {
                    println!(
                        "Last solve:       {} in {:.3} ms, {} evaluations",
                        l.solver, l.elapsed_ms, l.evaluations
                    );
                    println!(
                        "Optimality gap:   {:.1} % ({} nodes used, lower bound {:.2})",
                        l.optimality_gap * 100.0,
                        l.hosts_used,
                        l.lower_bound
                    );
                    println!(
                        "Constraint evaluation: {:.0} % of evaluations (resource {:.0} %, \
                         eligibility {:.0} %, anti-affinity {:.0} % of checks)",
                        l.constraint_eval_share * 100.0,
                        l.constraint_kind_share.resource * 100.0,
                        l.constraint_kind_share.eligibility * 100.0,
                        l.constraint_kind_share.anti_affinity * 100.0
                    );
                }
                None => println!("Last solve:       none yet"),
            }
            print_settings(&s.settings);
        }
        PlacementCmd::ListConstraints { of_type } => {
            let path = match of_type {
                Some(t) => format!("/v1/placement/constraints?type={}", t.as_str()),
                None => "/v1/placement/constraints".into(),
            };
            let c: Vec<ConstraintView> = api.get(&path).await?;
            if json {
                return print_json(&c);
            }
            table(
                &["ID", "KIND", "HARD", "DESCRIPTION"],
                c.into_iter()
                    .map(|c| vec![c.id, c.kind, c.hard.to_string(), c.description])
                    .collect(),
            );
        }
        PlacementCmd::AvoidNode {
            node,
            duration,
            mode,
        } => {
            let req = AvoidNodeRequest {
                node,
                duration_ms: duration.as_millis() as u64,
                mode: match mode {
                    Mode::Hard => AvoidMode::Hard,
                    Mode::Soft => AvoidMode::Soft,
                },
            };
            let v: AvoidView = api
                .post("/v1/placement/avoid", Some(serde_json::to_value(&req)?))
                .await?;
            if json {
                return print_json(&v);
            }
            println!(
                "avoiding node {} ({}) for {} in this node's placement",
                v.node,
                match v.mode {
                    AvoidMode::Hard => "hard",
                    AvoidMode::Soft => "soft",
                },
                ms(Duration::from_millis(v.remaining_ms))
            );
        }
        PlacementCmd::ListAvoided => {
            let v: Vec<AvoidView> = api.get("/v1/placement/avoid").await?;
            if json {
                return print_json(&v);
            }
            table(
                &["NODE", "MODE", "REMAINING"],
                v.into_iter()
                    .map(|a| {
                        vec![
                            a.node.to_string(),
                            match a.mode {
                                AvoidMode::Hard => "hard".into(),
                                AvoidMode::Soft => "soft".into(),
                            },
                            ms(Duration::from_millis(a.remaining_ms)),
                        ]
                    })
                    .collect(),
            );
        }
        PlacementCmd::SetSolver {
            max_time,
            target_optimality,
        } => {
            if max_time.is_none() && target_optimality.is_none() {
                anyhow::bail!("give --max-time, --target-optimality or both");
            }
            let req = SetSolverRequest {
                max_time_ms: max_time.map(|d| d.as_millis() as u64),
                target_optimality,
            };
            let s: SolverSettingsView = api
                .post("/v1/placement/solver", Some(serde_json::to_value(&req)?))
                .await?;
            if json {
                return print_json(&s);
            }
            print_settings(&s);
        }
    }
    Ok(())
}

fn print_settings(s: &SolverSettingsView) {
    println!(
        "Solver settings:  max time {}, target optimality {} (re-plans; online placement \
         scores at most 36 nodes and needs neither)",
        s.max_time_ms
            .map(|t| ms(Duration::from_millis(t)))
            .unwrap_or_else(|| "unbounded".into()),
        s.target_optimality
    );
}

/// Prints a placed VM's explanation after its table row.
pub(crate) fn print_placement(p: &PlacedVm) {
    println!("Placement: {}", p.placement.summary);
    for e in &p.placement.examples {
        println!("  filtered node {}: {}", e.node.short(), e.reason);
    }
    for s in &p.placement.soft_violations {
        println!("  soft rule broken: {s}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_optimality_parse_with_clear_errors() {
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("2h30m"), Ok(Duration::from_secs(9000)));
        let e = parse_duration("soon").unwrap_err();
        assert!(e.contains("`soon` is not a duration"), "{e}");
        assert!(parse_duration("0s").is_err());
        assert_eq!(parse_optimality("0.9"), Ok(0.9));
        assert!(parse_optimality("1.2").unwrap_err().contains("(0, 1]"));
        assert!(parse_optimality("x").is_err());
    }

    #[test]
    fn commands_parse_and_bad_input_is_named() {
        use clap::Parser;
        let c = super::super::Cli::try_parse_from([
            "dwcp-cli",
            "placement",
            "avoid-node",
            "--node",
            "abcd",
            "--duration",
            "1h",
            "--mode",
            "soft",
        ])
        .unwrap();
        assert!(matches!(
            c.cmd,
            super::super::Cmd::Placement(PlacementCmd::AvoidNode {
                mode: Mode::Soft,
                ..
            })
        ));
        let e = super::super::Cli::try_parse_from([
            "dwcp-cli",
            "placement",
            "avoid-node",
            "--node",
            "abcd",
            "--duration",
            "forever",
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("`forever` is not a duration"), "{e}");
        let c = super::super::Cli::try_parse_from([
            "dwcp-cli",
            "placement",
            "set-solver",
            "--max-time",
            "5s",
            "--target-optimality",
            "0.90",
        ])
        .unwrap();
        let super::super::Cmd::Placement(PlacementCmd::SetSolver {
            max_time,
            target_optimality,
        }) = c.cmd
        else {
            panic!("not set-solver")
        };
        assert_eq!(max_time, Some(Duration::from_secs(5)));
        assert_eq!(target_optimality, Some(0.9));
        let c = super::super::Cli::try_parse_from([
            "dwcp-cli", "vm", "create", "--name", "a", "--node", "ab12",
        ])
        .unwrap();
        assert!(matches!(
            c.cmd,
            super::super::Cmd::Vm(super::super::VmCmd::Create { node: Some(_), .. })
        ));
        assert!(
            super::super::Cli::try_parse_from([
                "dwcp-cli",
                "placement",
                "list-constraints",
                "--type",
                "sideways",
            ])
            .is_err()
        );
    }
}
