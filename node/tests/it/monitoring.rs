//! The operators' documentation of metrics stays true: every `dwcp_*` family a running node
//! exports is described in `docs/metrics.md`, and every metric the alerting rules
//! (`docs/monitoring/alerts.yaml`, unit-tested by promtool in `scripts/test.sh`) read is one
//! of those documented.

use std::collections::BTreeSet;

use crate::common::{RunningNode, loopback_config};

fn repo_file(rel: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every `dwcp_[a-z0-9_]+` word in `text`.
fn metric_words(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("dwcp_") {
        let word: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        rest = &rest[i + word.len()..];
        out.insert(word);
    }
    out
}

/// The metric names `docs/metrics.md` documents: the first column of its tables (one or
/// more names).
fn documented() -> BTreeSet<String> {
    repo_file("docs/metrics.md")
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split_once(" |"))
        .flat_map(|(first_column, _)| metric_words(first_column))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_exported_and_alerted_metric_is_documented() {
    let docs = documented();
    assert!(docs.len() > 50, "{docs:?}");

    let dir = tempfile::tempdir().unwrap();
    let node = RunningNode::start(loopback_config("monitoring-test"), dir.path()).await;
    let text = reqwest::get(format!("{}/metrics", node.metrics))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    node.stop().await;
    let exported: BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# HELP "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with("dwcp_"))
        .map(str::to_string)
        .collect();
    assert!(exported.contains("dwcp_pbft_stalled"), "{exported:?}");
    let undocumented: Vec<_> = exported.difference(&docs).collect();
    assert!(
        undocumented.is_empty(),
        "exported but not in docs/metrics.md: {undocumented:?}"
    );

    let alerts = repo_file("docs/monitoring/alerts.yaml");
    let rules: serde_yaml_ng::Value = serde_yaml_ng::from_str(&alerts).unwrap();
    let mut read = BTreeSet::new();
    let mut names = 0;
    for group in rules["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            let name = rule["alert"].as_str().unwrap();
            let expr = rule["expr"].as_str().unwrap();
            assert!(
                ["critical", "high", "medium"]
                    .contains(&rule["labels"]["severity"].as_str().unwrap()),
                "{name}"
            );
            assert!(rule["annotations"]["summary"].as_str().is_some(), "{name}");
            names += 1;
            for m in metric_words(expr) {
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| m.strip_suffix(s))
                    .filter(|b| docs.contains(*b))
                    .map_or(m.clone(), str::to_string);
                read.insert(base);
            }
        }
    }
    assert!(names >= 10, "{names} rules");
    let unknown: Vec<_> = read.difference(&docs).collect();
    assert!(
        unknown.is_empty(),
        "alerts read metrics not in docs/metrics.md: {unknown:?}"
    );
}
