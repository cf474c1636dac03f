//! Safe scale-down of an EventterCluster: the decisions, as a pure function of the
//! StatefulSet's replicas, `spec.replicas`, the brokers' node list (ListNodes) and the
//! decommissions the operator started before. The cluster reconciler does the IO.
//!
//! Lowering `spec.replicas` removes the pods of the highest ordinals. Before their
//! pods go, the operator decommissions their brokers (DecommissionNode): the brokers
//! move segment primaries, copies and consumer groups to the nodes that stay. The
//! StatefulSet is lowered only past pods whose brokers are drained; a broker the
//! brokers refuse to decommission (the nodes left could not hold a topic's
//! replication factor) keeps the StatefulSet as it is. Raising `spec.replicas` again
//! takes back (cancels) the decommissions of the pods that now stay.

use eventtermq_proto::v1 as pb;

use crate::builders::pod_of_address;
use crate::crd::DecommissionedNode;

/// What one reconcile does about the StatefulSet's replicas.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScalePlan {
    /// StatefulSet replicas to apply now, if no decommission below is refused.
    pub replicas: i32,
    /// Brokers to decommission now: (pod, node id), highest ordinal first.
    pub decommission: Vec<(String, u64)>,
    /// Brokers whose decommission the operator started and whose pods now stay:
    /// (pod, node id) to take back.
    pub cancel: Vec<(String, u64)>,
    /// The leaving brokers and what each still holds (decommissions asked for in this
    /// pass show all counts 0 and not drained until the brokers report them).
    pub progress: Vec<DecommissionedNode>,
}

impl ScalePlan {
    /// Whether brokers are still being drained: check again soon.
    pub fn draining(&self) -> bool {
        self.progress.iter().any(|n| !n.drained)
    }
}

/// The ordinal of pod `<cluster>-<n>`, if it is one of the cluster's pods.
pub fn pod_ordinal(cluster_name: &str, pod: &str) -> Option<i32> {
    pod.strip_prefix(cluster_name)?.strip_prefix('-')?.parse().ok()
}

/// Decides a scale step. `current`: the StatefulSet's replicas now; `desired`:
/// `spec.replicas`; `nodes`: ListNodes' answer; `started`: the decommissions recorded
/// in the status (the operator's own). A broker is matched to its pod by the first
/// DNS label of its address, as the status's members are.
///
/// Pods `desired..current` leave. Each of their brokers not yet decommissioned is
/// decommissioned; a pod without any broker in the list (never joined, or already
/// removed) holds nothing. The StatefulSet goes down to the lowest ordinal from which
/// every leaving pod above holds nothing or is drained, never below `desired`.
pub fn plan(
    cluster_name: &str,
    current: i32,
    desired: i32,
    nodes: &[pb::Node],
    started: &[DecommissionedNode],
) -> ScalePlan {
    let ordinal_of = |node: &pb::Node| pod_ordinal(cluster_name, &pod_of_address(&node.address));
    let mut plan = ScalePlan::default();
    let mut lowest_kept = current.max(desired);
    let mut blocked_above = false;
    for ordinal in (desired..current).rev() {
        let pod = format!("{cluster_name}-{ordinal}");
        let mut done = true;
        for node in nodes.iter().filter(|n| ordinal_of(n) == Some(ordinal)) {
            let progress = match &node.drain {
                Some(drain) => DecommissionedNode {
                    pod: pod.clone(),
                    id: node.id.to_string(),
                    open_segments: drain.open_segments,
                    closed_segments: drain.closed_segments,
                    consumer_groups: drain.consumer_groups,
                    drained: drain.drained,
                },
                None => {
                    plan.decommission.push((pod.clone(), node.id));
                    DecommissionedNode { pod: pod.clone(), id: node.id.to_string(), ..DecommissionedNode::default() }
                }
            };
            done &= progress.drained;
            plan.progress.push(progress);
        }
        // The StatefulSet removes the highest ordinals first: a pod may go only when
        // it and every pod above it are done.
        if done && !blocked_above {
            lowest_kept = ordinal;
        } else {
            blocked_above = true;
        }
    }
    plan.replicas = lowest_kept;
    for recorded in started {
        let Ok(id) = recorded.id.parse::<u64>() else { continue };
        let Some(node) = nodes.iter().find(|n| n.id == id) else { continue };
        let stays = ordinal_of(node).is_some_and(|o| o < desired);
        if stays && node.drain.is_some() {
            plan.cancel.push((recorded.pod.clone(), id));
        }
    }
    plan
}

/// One line on the leaving brokers for the status (`None` when none leave).
pub fn summary(progress: &[DecommissionedNode]) -> Option<String> {
    if progress.is_empty() {
        return None;
    }
    let parts: Vec<String> = progress
        .iter()
        .map(|n| {
            if n.drained {
                format!("{} drained", n.pod)
            } else {
                format!(
                    "{}: {} open, {} closed segments, {} groups left",
                    n.pod, n.open_segments, n.closed_segments, n.consumer_groups
                )
            }
        })
        .collect();
    Some(format!("draining {}", parts.join("; ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: u64, ordinal: i32, drain: Option<(u64, u64, u64)>) -> pb::Node {
        pb::Node {
            id,
            address: format!("emq-{ordinal}.emq-nodes.mq.svc.cluster.local:16000"),
            state: pb::NodeState::Alive as i32,
            raft_role: "voter".into(),
            drain: drain.map(|(open, closed, groups)| pb::DrainProgress {
                open_segments: open,
                closed_segments: closed,
                consumer_groups: groups,
                drained: open + closed + groups == 0,
            }),
            ..pb::Node::default()
        }
    }

    fn five(drains: [Option<(u64, u64, u64)>; 5]) -> Vec<pb::Node> {
        drains.iter().enumerate().map(|(i, d)| node(i as u64 + 11, i as i32, *d)).collect()
    }

    fn started(pod: &str, id: u64) -> DecommissionedNode {
        DecommissionedNode { pod: pod.into(), id: id.to_string(), ..DecommissionedNode::default() }
    }

    #[test]
    fn no_change_or_scale_up_applies_spec_and_decommissions_nothing() {
        let nodes = five([None; 5]);
        for (current, desired) in [(5, 5), (3, 5), (0, 3)] {
            let plan = plan("emq", current, desired, &nodes, &[]);
            assert_eq!(plan.replicas, desired, "{current} -> {desired}");
            assert!(plan.decommission.is_empty() && plan.cancel.is_empty() && plan.progress.is_empty());
            assert!(!plan.draining());
        }
    }

    #[test]
    fn scale_down_decommissions_the_highest_ordinals_and_keeps_the_stateful_set() {
        let plan = plan("emq", 5, 3, &five([None; 5]), &[]);
        assert_eq!(plan.decommission, vec![("emq-4".to_string(), 15), ("emq-3".to_string(), 14)]);
        assert_eq!(plan.replicas, 5, "nothing drained yet");
        assert_eq!(plan.progress.len(), 2);
        assert!(plan.draining());
        assert!(plan.cancel.is_empty());
    }

    #[test]
    fn draining_nodes_are_not_decommissioned_again_and_show_their_progress() {
        let nodes = five([None, None, None, Some((2, 7, 1)), Some((0, 3, 0))]);
        let plan = plan("emq", 5, 3, &nodes, &[started("emq-4", 15), started("emq-3", 14)]);
        assert!(plan.decommission.is_empty());
        assert_eq!(plan.replicas, 5);
        assert_eq!(
            plan.progress[1],
            DecommissionedNode {
                pod: "emq-3".into(),
                id: "14".into(),
                open_segments: 2,
                closed_segments: 7,
                consumer_groups: 1,
                drained: false
            }
        );
        assert_eq!(
            summary(&plan.progress).unwrap(),
            "draining emq-4: 0 open, 3 closed segments, 0 groups left; emq-3: 2 open, 7 closed segments, 1 groups left"
        );
    }

    #[test]
    fn the_stateful_set_goes_down_past_drained_pods_from_the_top_only() {
        // emq-4 drained, emq-3 not: emq-4 may go.
        let nodes = five([None, None, None, Some((1, 0, 0)), Some((0, 0, 0))]);
        assert_eq!(plan("emq", 5, 3, &nodes, &[]).replicas, 4);
        // emq-3 drained, emq-4 not: the StatefulSet removes emq-4 first, so nothing goes.
        let nodes = five([None, None, None, Some((0, 0, 0)), Some((0, 1, 0))]);
        assert_eq!(plan("emq", 5, 3, &nodes, &[]).replicas, 5);
        let nodes = five([None, None, None, Some((0, 0, 0)), Some((0, 0, 0))]);
        let done = plan("emq", 5, 3, &nodes, &[]);
        assert_eq!(done.replicas, 3);
        assert!(!done.draining());
    }

    #[test]
    fn a_pod_without_a_broker_holds_nothing() {
        // emq-4 never joined (or was already removed); emq-3 is drained.
        let mut nodes = five([None, None, None, Some((0, 0, 0)), None]);
        nodes.pop();
        let plan = plan("emq", 5, 3, &nodes, &[]);
        assert_eq!(plan.replicas, 3);
        assert!(plan.decommission.is_empty());
    }

    #[test]
    fn raising_replicas_again_cancels_the_operators_decommissions_of_pods_that_stay() {
        let nodes = five([None, None, None, Some((2, 7, 1)), Some((0, 3, 0))]);
        // Back to 5: both stay.
        let plan5 = plan("emq", 5, 5, &nodes, &[started("emq-4", 15), started("emq-3", 14)]);
        assert_eq!(plan5.replicas, 5);
        assert_eq!(plan5.cancel, vec![("emq-4".to_string(), 15), ("emq-3".to_string(), 14)]);
        assert!(plan5.progress.is_empty());
        // To 4: emq-3 stays, emq-4 still leaves.
        let plan4 = plan("emq", 5, 4, &nodes, &[started("emq-4", 15), started("emq-3", 14)]);
        assert_eq!(plan4.cancel, vec![("emq-3".to_string(), 14)]);
        assert_eq!(plan4.replicas, 5);
        assert_eq!(plan4.progress.len(), 1);
        // A decommission the operator did not start (an administrator's) is left alone.
        let plan_admin = plan("emq", 5, 5, &nodes, &[]);
        assert!(plan_admin.cancel.is_empty());
    }

    #[test]
    fn pod_ordinals_belong_to_the_cluster() {
        assert_eq!(pod_ordinal("emq", "emq-12"), Some(12));
        assert_eq!(pod_ordinal("emq", "emq2-1"), None);
        assert_eq!(pod_ordinal("emq", "other-1"), None);
    }
}
