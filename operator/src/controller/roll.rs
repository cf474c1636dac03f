//! Operator-ordered rolling update of an EventterCluster: the decision, as a pure
//! function of the broker pods (revision, readiness), the StatefulSet's update
//! revision, the Raft leader and whether the brokers are healthy. The cluster
//! reconciler does the IO (list the pods, transfer leadership, evict one pod).
//!
//! The StatefulSet has `updateStrategy: OnDelete`: a changed pod template replaces
//! no pod by itself; the operator evicts one pod per step (the Eviction API, so the
//! PodDisruptionBudget applies) and the StatefulSet controller creates it again on the
//! new revision. Order: Raft followers first, highest ordinal first; the leader last,
//! after its leadership was handed to a broker already on the new revision. Each step
//! waits until every pod is Ready (a restarted broker is ready only once it caught up
//! with the Raft log and the open segments it holds) and the brokers report every
//! member alive with a leader. A segment's primary on the evicted pod is closed by
//! the broker's own SIGTERM path (its successor opens on other nodes) before it stops.

/// A broker pod as the roll sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodView {
    pub name: String,
    pub ordinal: i32,
    /// Its `controller-revision-hash` label (`None`: not labelled yet).
    pub revision: Option<String>,
    /// The pod's Ready condition is True.
    pub ready: bool,
    /// It has a deletion timestamp (stopping).
    pub terminating: bool,
    /// Its broker is not running and last exited with this (see [`exit_note`]), e.g. a
    /// refusal to start on a data directory of a newer format.
    pub exited: Option<String>,
}

/// Most characters of a broker's termination message shown in the status.
pub const EXIT_NOTE_CHARS_MAX: usize = 600;

/// What the status says about a broker container that exited: its status and the last
/// non-empty line of its termination message (with `FallbackToLogsOnError`, the tail of
/// its log: the broker's last line says why it stopped), at most
/// [`EXIT_NOTE_CHARS_MAX`] characters. Pure.
pub fn exit_note(exit_code: i32, message: Option<&str>) -> String {
    let line = message.and_then(|m| m.lines().rev().map(str::trim).find(|l| !l.is_empty()));
    match line {
        None => format!("its broker exited with status {exit_code}"),
        Some(line) => {
            let mut kept: String = line.chars().take(EXIT_NOTE_CHARS_MAX).collect();
            if kept.len() < line.len() {
                kept.push_str("...");
            }
            format!("its broker exited with status {exit_code}: {kept}")
        }
    }
}

/// What this pass does about the roll.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Every pod runs the update revision.
    Done,
    /// Nothing now; the reason (shown in the status).
    Wait(String),
    /// Hand Raft leadership from the leader's pod `from` to node `to_node` (on pod
    /// `to_pod`, already on the new revision), then evict `from`.
    HandOverLeadership { from: String, to_pod: String, to_node: u64 },
    /// Evict `pod`; `leader` when it leads Raft (only when no broker can take over).
    Evict { pod: String, leader: bool },
}

/// The roll's inputs besides the pods.
#[derive(Clone, Debug, Default)]
pub struct Cluster<'a> {
    /// The StatefulSet's `status.updateRevision`.
    pub update_revision: &'a str,
    /// Pods the StatefulSet should have (its `spec.replicas`).
    pub replicas: i32,
    /// The Raft leader's pod, as the brokers report it.
    pub leader_pod: Option<&'a str>,
    /// Node id of each alive broker, by pod name.
    pub nodes: &'a [(String, u64)],
    /// Why the brokers are not healthy (a member not alive, no leader, unreachable),
    /// `None` when they are.
    pub brokers_unhealthy: Option<&'a str>,
}

/// How many pods run the update revision, of how many.
pub fn rolled(pods: &[PodView], update_revision: &str, replicas: i32) -> (usize, usize) {
    let updated = pods.iter().filter(|p| p.revision.as_deref() == Some(update_revision) && !p.terminating).count();
    (updated.min(replicas.max(0) as usize), replicas.max(0) as usize)
}

/// Decides the next step of a roll.
pub fn next_step(pods: &[PodView], cluster: &Cluster) -> Decision {
    let old: Vec<&PodView> =
        pods.iter().filter(|p| p.revision.as_deref() != Some(cluster.update_revision) || p.terminating).collect();
    if old.is_empty() && pods.len() as i32 >= cluster.replicas {
        return Decision::Done;
    }
    if (pods.len() as i32) < cluster.replicas {
        return Decision::Wait(format!("{} of {} broker pods exist", pods.len(), cluster.replicas));
    }
    // A pod of an old revision whose broker does not start serves nothing by waiting:
    // it is replaced first. (This is how a roll back gets past a pod that refused the
    // new image, e.g. a downgrade refused: spec.image set back makes it an old pod.)
    if let Some(stuck) =
        old.iter().filter(|p| !p.ready && !p.terminating && p.exited.is_some()).max_by_key(|p| p.ordinal)
    {
        return Decision::Evict { pod: stuck.name.clone(), leader: cluster.leader_pod == Some(stuck.name.as_str()) };
    }
    let mut not_ready: Vec<&PodView> = pods.iter().filter(|p| p.terminating || !p.ready).collect();
    not_ready.sort_by_key(|p| p.ordinal);
    if let Some(pod) = not_ready.first() {
        let why = match (&pod.exited, pod.terminating) {
            (_, true) => "stopping".to_string(),
            (Some(exited), false) => format!("not ready: {exited}"),
            (None, false) => "not ready (catching up)".to_string(),
        };
        return Decision::Wait(format!("{} is {why}", pod.name));
    }
    if let Some(why) = cluster.brokers_unhealthy {
        return Decision::Wait(format!("brokers not healthy: {why}"));
    }
    let Some(leader) = cluster.leader_pod else {
        return Decision::Wait("no Raft leader known".to_string());
    };
    // Followers first, the highest ordinal first (the order a StatefulSet would take,
    // and the founding pods, the seeds of --join, last).
    if let Some(follower) = old.iter().filter(|p| p.name != leader).max_by_key(|p| p.ordinal) {
        return Decision::Evict { pod: follower.name.clone(), leader: false };
    }
    // Only the leader is left: hand over to a broker on the new revision, the lowest
    // ordinal among them.
    let mut targets: Vec<&PodView> =
        pods.iter().filter(|p| p.name != leader && p.revision.as_deref() == Some(cluster.update_revision)).collect();
    targets.sort_by_key(|p| p.ordinal);
    for target in targets {
        if let Some((_, id)) = cluster.nodes.iter().find(|(pod, _)| *pod == target.name) {
            return Decision::HandOverLeadership {
                from: leader.to_string(),
                to_pod: target.name.clone(),
                to_node: *id,
            };
        }
    }
    if pods.len() == 1 {
        // A single broker: nobody to hand over to.
        return Decision::Evict { pod: leader.to_string(), leader: true };
    }
    Decision::Wait(format!(
        "no broker on the new revision is known to the brokers to take over from the leader {leader}"
    ))
}

/// One line on the roll for the status (`kubectl get eventterclusters`, column Roll).
pub fn summary(pods: &[PodView], cluster: &Cluster, decision: &Decision) -> Option<String> {
    let (done, total) = rolled(pods, cluster.update_revision, cluster.replicas);
    let what = match decision {
        Decision::Done => return None,
        Decision::Wait(reason) => format!("waiting: {reason}"),
        Decision::Evict { pod, leader: false } => format!("next {pod} (follower)"),
        Decision::Evict { pod, leader: true } => format!("next {pod} (leader, alone)"),
        Decision::HandOverLeadership { from, to_pod, .. } => {
            format!("next {from} (leader): leadership to {to_pod} first")
        }
    };
    Some(format!("rolled {done} of {total}, {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NEW: &str = "emq-7d9";
    const OLD: &str = "emq-5c4";

    fn pod(ordinal: i32, revision: &str, ready: bool) -> PodView {
        PodView {
            name: format!("emq-{ordinal}"),
            ordinal,
            revision: Some(revision.to_string()),
            ready,
            terminating: false,
            exited: None,
        }
    }

    fn nodes(count: i32) -> Vec<(String, u64)> {
        (0..count).map(|i| (format!("emq-{i}"), 100 + i as u64)).collect()
    }

    fn cluster<'a>(leader: Option<&'a str>, nodes: &'a [(String, u64)]) -> Cluster<'a> {
        Cluster { update_revision: NEW, replicas: 3, leader_pod: leader, nodes, brokers_unhealthy: None }
    }

    #[test]
    fn all_pods_on_the_new_revision_is_done() {
        let pods = [pod(0, NEW, true), pod(1, NEW, true), pod(2, NEW, true)];
        let nodes = nodes(3);
        assert_eq!(next_step(&pods, &cluster(Some("emq-1"), &nodes)), Decision::Done);
        assert_eq!(summary(&pods, &cluster(Some("emq-1"), &nodes), &Decision::Done), None);
    }

    #[test]
    fn followers_go_first_highest_ordinal_first_then_the_leader_after_a_hand_over() {
        let nodes = nodes(3);
        let c = cluster(Some("emq-1"), &nodes);
        let mut pods = vec![pod(0, OLD, true), pod(1, OLD, true), pod(2, OLD, true)];
        assert_eq!(next_step(&pods, &c), Decision::Evict { pod: "emq-2".into(), leader: false });
        assert_eq!(summary(&pods, &c, &next_step(&pods, &c)).unwrap(), "rolled 0 of 3, next emq-2 (follower)");
        pods[2] = pod(2, NEW, true);
        // emq-1 leads: emq-0 is the next follower.
        assert_eq!(next_step(&pods, &c), Decision::Evict { pod: "emq-0".into(), leader: false });
        pods[0] = pod(0, NEW, true);
        let step = next_step(&pods, &c);
        assert_eq!(step, Decision::HandOverLeadership { from: "emq-1".into(), to_pod: "emq-0".into(), to_node: 100 });
        assert_eq!(summary(&pods, &c, &step).unwrap(), "rolled 2 of 3, next emq-1 (leader): leadership to emq-0 first");
        // Once leadership moved, the old leader is a follower like any other.
        let moved = cluster(Some("emq-0"), &nodes);
        assert_eq!(next_step(&pods, &moved), Decision::Evict { pod: "emq-1".into(), leader: false });
    }

    #[test]
    fn nothing_while_a_pod_is_not_ready_stopping_or_missing() {
        let nodes = nodes(3);
        let c = cluster(Some("emq-0"), &nodes);
        let pods = [pod(0, OLD, true), pod(1, OLD, true), pod(2, NEW, false)];
        assert_eq!(next_step(&pods, &c), Decision::Wait("emq-2 is not ready (catching up)".into()));
        assert_eq!(
            summary(&pods, &c, &next_step(&pods, &c)).unwrap(),
            "rolled 1 of 3, waiting: emq-2 is not ready (catching up)"
        );
        let mut stopping = pod(2, OLD, true);
        stopping.terminating = true;
        let pods = [pod(0, OLD, true), pod(1, OLD, true), stopping];
        assert_eq!(next_step(&pods, &c), Decision::Wait("emq-2 is stopping".into()));
        let pods = [pod(0, OLD, true), pod(1, OLD, true)];
        assert_eq!(next_step(&pods, &c), Decision::Wait("2 of 3 broker pods exist".into()));
    }

    #[test]
    fn a_broker_that_refuses_to_start_says_why_in_the_wait() {
        let nodes = nodes(3);
        let c = cluster(Some("emq-0"), &nodes);
        let log = "2026-12-06T20:00:00Z  INFO eventtermq: starting\n\
                   error: --dir: data directory /data has format 2 (written by eventtermq 0.2.0); downgrade refused\n\n";
        let mut refusing = pod(2, NEW, false);
        refusing.exited = Some(exit_note(4, Some(log)));
        let pods = [pod(0, OLD, true), pod(1, OLD, true), refusing];
        assert_eq!(
            next_step(&pods, &c),
            Decision::Wait(
                "emq-2 is not ready: its broker exited with status 4: error: --dir: data directory /data has format 2 \
                 (written by eventtermq 0.2.0); downgrade refused"
                    .into()
            )
        );
        assert_eq!(exit_note(137, None), "its broker exited with status 137");
        assert_eq!(exit_note(1, Some("\n  \n")), "its broker exited with status 1");
        let long = "x".repeat(EXIT_NOTE_CHARS_MAX + 10);
        let note = exit_note(1, Some(&long));
        assert!(note.ends_with(&format!("{}...", "x".repeat(10))), "{note}");
        assert_eq!(note.chars().count(), "its broker exited with status 1: ".len() + EXIT_NOTE_CHARS_MAX + 3);
    }

    #[test]
    fn a_pod_of_an_old_revision_whose_broker_does_not_start_is_replaced_first() {
        // spec.image set back after emq-2 refused the new one: emq-2 is now the old pod.
        let nodes = nodes(3);
        let c = cluster(Some("emq-0"), &nodes);
        let mut stuck = pod(2, OLD, false);
        stuck.exited = Some(exit_note(4, Some("error: --dir: ... downgrade refused")));
        let pods = [pod(0, NEW, true), pod(1, NEW, true), stuck.clone()];
        assert_eq!(next_step(&pods, &c), Decision::Evict { pod: "emq-2".into(), leader: false });
        // Unhealthy brokers do not hold it up either: it is one of the reasons.
        let unhealthy = Cluster { brokers_unhealthy: Some("emq-2 not alive"), ..cluster(Some("emq-0"), &nodes) };
        assert_eq!(next_step(&pods, &unhealthy), Decision::Evict { pod: "emq-2".into(), leader: false });
        // One that is merely catching up (never exited) is waited for.
        stuck.exited = None;
        let pods = [pod(0, NEW, true), pod(1, NEW, true), stuck];
        assert_eq!(next_step(&pods, &c), Decision::Wait("emq-2 is not ready (catching up)".into()));
    }

    #[test]
    fn nothing_while_the_brokers_are_unhealthy_or_leaderless() {
        let nodes = nodes(3);
        let pods = [pod(0, OLD, true), pod(1, OLD, true), pod(2, NEW, true)];
        let unhealthy =
            Cluster { brokers_unhealthy: Some("103 (emq-2...) is Suspect"), ..cluster(Some("emq-0"), &nodes) };
        assert_eq!(
            next_step(&pods, &unhealthy),
            Decision::Wait("brokers not healthy: 103 (emq-2...) is Suspect".into())
        );
        assert_eq!(next_step(&pods, &cluster(None, &nodes)), Decision::Wait("no Raft leader known".into()));
        // Done needs no healthy brokers: nothing is to be stopped.
        let done = [pod(0, NEW, true), pod(1, NEW, true), pod(2, NEW, true)];
        assert_eq!(next_step(&done, &unhealthy), Decision::Done);
    }

    #[test]
    fn the_leader_waits_for_a_known_broker_on_the_new_revision() {
        // The new brokers are not (yet) in the brokers' member list.
        let pods = [pod(0, NEW, true), pod(1, OLD, true), pod(2, NEW, true)];
        let known = [("emq-1".to_string(), 101)];
        let step = next_step(&pods, &cluster(Some("emq-1"), &known));
        assert!(matches!(step, Decision::Wait(ref why) if why.contains("take over from the leader emq-1")), "{step:?}");
        // The highest-ordinal target known is taken when the lowest is not.
        let known = [("emq-1".to_string(), 101), ("emq-2".to_string(), 102)];
        assert_eq!(
            next_step(&pods, &cluster(Some("emq-1"), &known)),
            Decision::HandOverLeadership { from: "emq-1".into(), to_pod: "emq-2".into(), to_node: 102 }
        );
    }

    #[test]
    fn a_single_broker_is_evicted_without_a_hand_over() {
        let nodes = nodes(1);
        let c = Cluster { replicas: 1, ..cluster(Some("emq-0"), &nodes) };
        assert_eq!(next_step(&[pod(0, OLD, true)], &c), Decision::Evict { pod: "emq-0".into(), leader: true });
    }

    #[test]
    fn a_pod_without_a_revision_label_counts_as_old() {
        let nodes = nodes(3);
        let mut unlabelled = pod(2, NEW, true);
        unlabelled.revision = None;
        let pods = [pod(0, NEW, true), pod(1, NEW, true), unlabelled];
        assert_eq!(
            next_step(&pods, &cluster(Some("emq-0"), &nodes)),
            Decision::Evict { pod: "emq-2".into(), leader: false }
        );
        assert_eq!(rolled(&pods, NEW, 3), (2, 3));
    }

    #[test]
    fn five_pods_roll_four_followers_before_the_leader() {
        let nodes = nodes(5);
        let c = Cluster { replicas: 5, ..cluster(Some("emq-2"), &nodes) };
        let mut pods: Vec<PodView> = (0..5).map(|i| pod(i, OLD, true)).collect();
        let mut order = Vec::new();
        loop {
            match next_step(&pods, &c) {
                Decision::Evict { pod: name, leader } => {
                    assert!(!leader);
                    let ordinal: usize = name.trim_start_matches("emq-").parse().unwrap();
                    pods[ordinal] = pod(ordinal as i32, NEW, true);
                    order.push(name);
                }
                Decision::HandOverLeadership { from, .. } => {
                    order.push(format!("hand over {from}"));
                    break;
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(order, ["emq-4", "emq-3", "emq-1", "emq-0", "hand over emq-2"]);
    }
}
