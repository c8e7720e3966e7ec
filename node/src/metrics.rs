//! The node's Prometheus metrics: one [`Registry`] per node (no global statics), fed by the
//! daemon from events. Names follow the operations manual (section 4.2) where it names them,
//! and `dwcp_<subsystem>_<what>_<unit>` otherwise. Every metric is documented in
//! `docs/metrics.md`.

use prometheus::{
    Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

/// All metrics of one node.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// The registry `/metrics` serves.
    pub registry: Registry,
    /// `dwcp_cluster_workers_ready`: nodes whose heartbeats are fresh, this one included.
    pub workers_ready: IntGauge,
    /// `dwcp_cluster_nodes_known`: nodes in the membership table, this one included.
    pub nodes_known: IntGauge,
    /// `dwcp_cluster_nodes_unreachable`: known nodes that went silent.
    pub nodes_unreachable: IntGauge,
    /// `dwcp_net_peers_connected`: peers with an open libp2p connection.
    pub peers_connected: IntGauge,
    /// `dwcp_net_routing_table_size`: Kademlia routing table entries.
    pub routing_table_size: IntGauge,
    /// `dwcp_gossip_mesh_peers{topic}`: gossipsub mesh size per topic.
    pub mesh_peers: IntGaugeVec,
    /// `dwcp_gossip_messages_received_total{topic}`: gossip messages accepted.
    pub gossip_received: IntCounterVec,
    /// `dwcp_gossip_messages_rejected_total{topic,reason}`: gossip messages dropped as invalid.
    pub gossip_rejected: IntCounterVec,
    /// `dwcp_gossip_messages_ignored_total{topic,reason}`: valid but unwanted (stale, other
    /// cluster, unknown topic).
    pub gossip_ignored: IntCounterVec,
    /// `dwcp_gossip_messages_published_total{topic}`: messages this node published.
    pub gossip_published: IntCounterVec,
    /// `dwcp_gossip_publish_errors_total`: publishes that failed (e.g. no peers yet).
    pub gossip_publish_errors: IntCounter,
    /// `dwcp_net_events_dropped_total`: network events dropped because the node's queue was
    /// full.
    pub events_dropped: IntGauge,
    /// `dwcp_node_uptime_seconds`.
    pub uptime_seconds: IntGauge,
    /// `dwcp_build_info{version}`: always 1.
    pub build_info: IntGaugeVec,
    /// `dwcp_vm_count_total{state}`: VMs on this node by state (manual 4.3.1).
    pub vm_count: IntGaugeVec,
    /// `dwcp_hypervisor_info{accel,cpu_model,cgroup}`: 1 when the hypervisor runs, with the
    /// accelerator in use (`kvm` or `tcg`).
    pub hypervisor_info: IntGaugeVec,
    /// `dwcp_itp_decisions_total{result}`: placement decisions (`placed`, `rejected`).
    pub itp_decisions: IntCounterVec,
    /// `dwcp_itp_decision_duration_seconds`: wall time of one placement decision.
    pub itp_decision_seconds: Histogram,
    /// `dwcp_itp_optimality_gap`: the last decision's gap to the lower bound.
    pub itp_optimality_gap: Gauge,
    /// `dwcp_itp_constraint_eval_share`: share of the last decision's evaluations that were
    /// constraint checks.
    pub itp_constraint_eval_share: Gauge,
    /// `dwcp_itp_hosts_filtered_total{reason}`: nodes left out of decisions, by reason.
    pub itp_filtered: IntCounterVec,
    /// `dwcp_itp_forwarded_total{result}`: creates forwarded to the chosen node.
    pub itp_forwarded: IntCounterVec,
    /// `dwcp_itp_control_requests_total{result}`: forwarded creates received.
    pub itp_control_requests: IntCounterVec,
    /// `dwcp_itp_avoided_nodes`: nodes this node's placement avoids now.
    pub itp_avoided_nodes: IntGauge,
}

impl Metrics {
    /// Creates and registers every metric in a fresh registry.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let reg = crate::metrics::Reg(&registry);
        let workers_ready = reg.g(
            "dwcp_cluster_workers_ready",
            "Nodes whose heartbeats are fresh, this one included",
        )?;
        let nodes_known = reg.g("dwcp_cluster_nodes_known", "Nodes in the membership table")?;
        let nodes_unreachable = reg.g(
            "dwcp_cluster_nodes_unreachable",
            "Known nodes whose heartbeats stopped",
        )?;
        let peers_connected = reg.g("dwcp_net_peers_connected", "Peers with an open connection")?;
        let routing_table_size = reg.g(
            "dwcp_net_routing_table_size",
            "Kademlia routing table entries",
        )?;
        let mesh_peers = reg.gv(
            "dwcp_gossip_mesh_peers",
            "Gossipsub mesh peers per topic",
            &["topic"],
        )?;
        let gossip_received = reg.cv(
            "dwcp_gossip_messages_received_total",
            "Gossip messages accepted",
            &["topic"],
        )?;
        let gossip_rejected = reg.cv(
            "dwcp_gossip_messages_rejected_total",
            "Gossip messages rejected as invalid (sender penalised)",
            &["topic", "reason"],
        )?;
        let gossip_ignored = reg.cv(
            "dwcp_gossip_messages_ignored_total",
            "Gossip messages dropped without penalty",
            &["topic", "reason"],
        )?;
        let gossip_published = reg.cv(
            "dwcp_gossip_messages_published_total",
            "Gossip messages published",
            &["topic"],
        )?;
        let gossip_publish_errors = IntCounter::new(
            "dwcp_gossip_publish_errors_total",
            "Gossip publishes that failed (for example before any peer joined the topic)",
        )?;
        registry.register(Box::new(gossip_publish_errors.clone()))?;
        let events_dropped = reg.g(
            "dwcp_net_events_dropped_total",
            "Network events dropped because the node's bounded queue was full",
        )?;
        let uptime_seconds = reg.g("dwcp_node_uptime_seconds", "Seconds since the node started")?;
        let build_info = reg.gv(
            "dwcp_build_info",
            "Build information (always 1)",
            &["version"],
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let vm_count = reg.gv(
            "dwcp_vm_count_total",
            "VMs on this node by state",
            &["state"],
        )?;
        let hypervisor_info = reg.gv(
            "dwcp_hypervisor_info",
            "Hypervisor in use (1): accelerator, guest CPU model, cgroup mode",
            &["accel", "cpu_model", "cgroup"],
        )?;
        let itp_decisions = reg.cv(
            "dwcp_itp_decisions_total",
            "Placement decisions by result (placed, rejected)",
            &["result"],
        )?;
        let itp_decision_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "dwcp_itp_decision_duration_seconds",
                "Wall time of one placement decision, measured by the node",
            )
            .buckets(vec![
                0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.1, 0.5,
            ]),
        )?;
        registry.register(Box::new(itp_decision_seconds.clone()))?;
        let itp_optimality_gap = Gauge::new(
            "dwcp_itp_optimality_gap",
            "Last placement decision: (nodes used - lower bound) / nodes used",
        )?;
        registry.register(Box::new(itp_optimality_gap.clone()))?;
        let itp_constraint_eval_share = Gauge::new(
            "dwcp_itp_constraint_eval_share",
            "Last placement decision: share of evaluations that were constraint checks",
        )?;
        registry.register(Box::new(itp_constraint_eval_share.clone()))?;
        let itp_filtered = reg.cv(
            "dwcp_itp_hosts_filtered_total",
            "Nodes left out of placement decisions, by reason",
            &["reason"],
        )?;
        let itp_forwarded = reg.cv(
            "dwcp_itp_forwarded_total",
            "VM creates forwarded to the node placement chose, by result",
            &["result"],
        )?;
        let itp_control_requests = reg.cv(
            "dwcp_itp_control_requests_total",
            "Forwarded VM creates received from other nodes, by result",
            &["result"],
        )?;
        let itp_avoided_nodes = reg.g(
            "dwcp_itp_avoided_nodes",
            "Nodes this node's placement avoids now (placement avoid-node)",
        )?;
        Ok(Self {
            registry,
            workers_ready,
            nodes_known,
            nodes_unreachable,
            peers_connected,
            routing_table_size,
            mesh_peers,
            gossip_received,
            gossip_rejected,
            gossip_ignored,
            gossip_published,
            gossip_publish_errors,
            events_dropped,
            uptime_seconds,
            build_info,
            vm_count,
            hypervisor_info,
            itp_decisions,
            itp_decision_seconds,
            itp_optimality_gap,
            itp_constraint_eval_share,
            itp_filtered,
            itp_forwarded,
            itp_control_requests,
            itp_avoided_nodes,
        })
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        prometheus::TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# encoding metrics failed: {e}\n"))
    }

    /// Every sample as `name{labels}` -> value, for the JSON API.
    pub fn flatten(&self) -> std::collections::BTreeMap<String, f64> {
        let mut out = std::collections::BTreeMap::new();
        for fam in self.registry.gather() {
            for m in fam.get_metric() {
                let labels: Vec<String> = m
                    .get_label()
                    .iter()
                    .map(|l| format!("{}=\"{}\"", l.name(), l.value()))
                    .collect();
                let key = if labels.is_empty() {
                    fam.name().to_owned()
                } else {
                    format!("{}{{{}}}", fam.name(), labels.join(","))
                };
                let v = match fam.get_field_type() {
                    prometheus::proto::MetricType::COUNTER => m.get_counter().get_value(),
                    prometheus::proto::MetricType::GAUGE => m.get_gauge().get_value(),
                    _ => continue,
                };
                // JSON has no NaN (e.g. `dwcp_pba_prediction_accuracy` before any forecast
                // resolved): such a sample is left out rather than sent as null.
                if !v.is_finite() {
                    continue;
                }
                out.insert(key, v);
            }
        }
        out
    }
}

/// Creates metrics and registers them in one registry (what every subsystem's metrics
/// constructor needs; a name registered twice is an error).
pub(crate) struct Reg<'a>(pub(crate) &'a Registry);

impl Reg<'_> {
    /// Registers any metric and hands it back.
    pub(crate) fn register<M: prometheus::core::Collector + Clone + 'static>(
        &self,
        m: M,
    ) -> Result<M, prometheus::Error> {
        self.0.register(Box::new(m.clone()))?;
        Ok(m)
    }
    /// An integer gauge.
    pub(crate) fn g(&self, name: &str, help: &str) -> Result<IntGauge, prometheus::Error> {
        self.register(IntGauge::new(name, help)?)
    }
    /// Integer gauges by label.
    pub(crate) fn gv(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> Result<IntGaugeVec, prometheus::Error> {
        self.register(IntGaugeVec::new(Opts::new(name, help), labels)?)
    }
    /// A counter.
    pub(crate) fn c(&self, name: &str, help: &str) -> Result<IntCounter, prometheus::Error> {
        self.register(IntCounter::new(name, help)?)
    }
    /// Counters by label.
    pub(crate) fn cv(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> Result<IntCounterVec, prometheus::Error> {
        self.register(IntCounterVec::new(Opts::new(name, help), labels)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text_with_manual_names() {
        let m = Metrics::new().unwrap();
        m.workers_ready.set(3);
        m.gossip_rejected
            .with_label_values(&["t", "bad_signature"])
            .inc();
        let text = m.render();
        assert!(text.contains("# TYPE dwcp_cluster_workers_ready gauge"));
        assert!(text.contains("dwcp_cluster_workers_ready 3"));
        assert!(text.contains(
            "dwcp_gossip_messages_rejected_total{reason=\"bad_signature\",topic=\"t\"} 1"
        ));
        assert_eq!(m.flatten()["dwcp_cluster_workers_ready"], 3.0);
    }

    #[test]
    fn registries_are_per_node() {
        let a = Metrics::new().unwrap();
        let b = Metrics::new().unwrap();
        a.workers_ready.set(5);
        assert_eq!(b.workers_ready.get(), 0);
    }
}
