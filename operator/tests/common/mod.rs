//! Fixtures shared by the integration tests.
#![allow(dead_code)]

use eventter_operator::crd::{EventterCluster, EventterClusterSpec};

/// The EventterCluster the golden files and reconciler tests are built from.
pub fn cluster() -> EventterCluster {
    let spec: EventterClusterSpec = serde_json::from_value(serde_json::json!({
        "replicas": 3,
        "image": "localhost/eventtermq:0.1.0",
        "imagePullPolicy": "Never",
        "storage": {"size": "1Gi", "storageClassName": "standard"},
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
        "broker": {"electionTimeoutMinMs": 400, "electionTimeoutMaxMs": 800, "deadNodeRemovalMs": 60000},
        "pod": {
            "labels": {"team": "messaging"},
            "annotations": {"example.com/scrape": "true"},
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "mq", "effect": "NoSchedule"}],
            "nodeSelector": {"kubernetes.io/os": "linux"},
            "priorityClassName": "high"
        }
    }))
    .unwrap();
    let mut cluster = EventterCluster::new("emq", spec);
    cluster.metadata.namespace = Some("messaging".into());
    cluster.metadata.uid = Some("5d0c7c1e-0000-4000-8000-000000000001".into());
    cluster.metadata.generation = Some(1);
    cluster
}

pub mod api_server;
pub mod fake_broker;

use eventter_operator::crd::{Topic, TopicSpec};

/// A Topic in namespace `messaging` of cluster `emq`, with the operator's finalizer.
pub fn topic(spec: serde_json::Value) -> Topic {
    let spec: TopicSpec = serde_json::from_value(spec).unwrap();
    let mut topic = Topic::new("orders", spec);
    topic.metadata.namespace = Some("messaging".into());
    topic.metadata.uid = Some("5d0c7c1e-0000-4000-8000-000000000002".into());
    topic.metadata.generation = Some(2);
    topic.metadata.resource_version = Some("100".into());
    topic.metadata.finalizers = Some(vec!["eventter.io/topic".into()]);
    topic
}
