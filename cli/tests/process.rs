//! Process-level tests: the real `eventtermq` binary on 127.0.0.x addresses, driven
//! through its CLI exactly as the README and the seed page show.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn three_nodes_form_a_cluster_survive_kill_and_restart() {
    let tmp = test_dir("three_nodes");
    let hosts = ["127.0.0.21", "127.0.0.22", "127.0.0.23"];
    let port = 26100;
    let mut nodes = three_nodes(&tmp, hosts, port);

    eventually(Duration::from_secs(30), "3 ALIVE nodes in dump on node 3", || {
        let o = cli(hosts[2], port, &["dump"]);
        o.status.success() && alive_count(&stdout(&o)) == 3
    });
    let dump = stdout(&cli(hosts[2], port, &["dump"]));
    assert!(dump.starts_with("=== Cluster state ===\nindex: "), "{dump}");
    assert!(dump.contains("namespaces: <\n  name: \"default\"\n"), "{dump}");
    assert!(dump.contains("=== Segments ==="), "{dump}");
    for h in hosts {
        assert!(dump.contains(&format!("address: \"{h}:{port}\"")), "{dump}");
    }

    let o = cli(hosts[0], port, &["create-topic", "my-topic", "--shards", "1", "--replication-factor", "3"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).starts_with("{\"ok\": true, \"index\": "), "{}", stdout(&o));
    // Idempotent: the same spec again is ok; a different one is AlreadyExists.
    assert!(cli(hosts[1], port, &["create-topic", "my-topic"]).status.success());
    let o = cli(hosts[1], port, &["create-topic", "my-topic", "--shards", "2"]);
    assert!(!o.status.success() && stderr(&o).contains("AlreadyExists"), "{}", stderr(&o));

    let dump = stdout(&cli(hosts[2], port, &["dump"]));
    assert!(dump.contains("name: \"my-topic\"\n    shards: 1\n    replication_factor: 3\n"), "{dump}");

    // kill -9 of one node (the first, which bootstrapped and likely leads): writes resume.
    nodes[0].kill9();
    let killed_at = Instant::now();
    eventually(Duration::from_secs(20), "a write accepted after kill -9", || {
        cli(hosts[1], port, &["create-namespace", "after-kill"]).status.success()
    });
    eprintln!("write accepted {:?} after kill -9", killed_at.elapsed());
    assert!(cli(hosts[2], port, &["create-topic", "t2", "--namespace", "after-kill"]).status.success());

    // Restart the killed node; then stop everything and restart on the same dirs.
    nodes[0].spawn();
    eventually(Duration::from_secs(30), "restarted node sees the new namespace", || {
        stdout(&cli(hosts[0], port, &["list-namespaces"])).contains("after-kill")
    });
    // SIGTERM of the leader: it hands leadership over and the others see it LEFT.
    let dump: serde_json::Value =
        serde_json::from_str(&stdout(&cli(hosts[1], port, &["dump", "--output", "json"]))).unwrap();
    let leader_addr = dump["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == dump["leader_id"])
        .map(|n| n["address"].as_str().unwrap().to_string())
        .expect("leader in dump");
    let li = hosts.iter().position(|h| leader_addr == format!("{h}:{port}")).unwrap();
    let status = nodes[li].terminate();
    assert!(status.success(), "SIGTERM exit status {status}");
    let log = std::fs::read_to_string(nodes[li].dir.with_extension("log")).unwrap();
    assert!(log.contains("handed leadership over"), "leader log lacks the hand-over:\n{log}");
    let other = hosts[(li + 1) % 3];
    eventually(Duration::from_secs(30), "the stopped leader shows LEFT", || {
        stdout(&cli(other, port, &["dump"])).contains(&format!("address: \"{leader_addr}\"\n  state: LEFT"))
    });
    for n in nodes.iter_mut().filter(|n| n.child.is_some()) {
        let status = n.terminate();
        assert!(status.success(), "SIGTERM exit status {status}");
    }
    for n in nodes.iter_mut() {
        n.spawn();
    }
    eventually(Duration::from_secs(30), "state survives a full restart", || {
        let o = cli(hosts[1], port, &["dump"]);
        let d = stdout(&o);
        o.status.success()
            && d.contains("name: \"my-topic\"")
            && d.contains("name: \"after-kill\"")
            && d.contains("name: \"t2\"")
    });
    eventually(Duration::from_secs(30), "3 ALIVE after restart", || {
        alive_count(&stdout(&cli(hosts[1], port, &["dump"]))) == 3
    });
}

#[test]
fn bad_input_is_rejected_with_a_clear_message_and_changes_nothing() {
    let tmp = test_dir("bad_input");
    let (host, port) = ("127.0.0.31", 26200);
    let _node = Broker::start(host, port, &tmp.join("n"), &[]);
    eventually(Duration::from_secs(20), "single node ready and recorded", || {
        alive_count(&stdout(&cli(host, port, &["dump"]))) == 1
    });
    let index_before = |_: ()| stdout(&cli(host, port, &["dump"])).lines().nth(1).map(str::to_string);
    let before = index_before(());

    let cases: &[(&[&str], &str)] = &[
        (&["create-topic", "my topic"], "name: \"my topic\" is not a valid name"),
        (&["create-topic", "t", "--shards", "0"], "shards: 0 is out of range"),
        (&["create-topic", "t", "--replication-factor", "8"], "replication_factor: 8 is out of range"),
        (
            &["create-topic", "t", "--default-exchange-type", "bogus"],
            "default_exchange_type: \"bogus\" is not an exchange type",
        ),
        (&["create-topic", "t", "--retention", "forever"], "retention: \"forever\" is not a duration"),
        (&["create-topic", "t", "--namespace", "missing"], "namespace: \"missing\" does not exist"),
        (&["delete-namespace", "default"], "cannot be deleted"),
        (&["delete-topic", "nope"], "topic \"nope\" does not exist"),
    ];
    for (args, message) in cases {
        let o = cli(host, port, args);
        assert!(!o.status.success(), "{args:?} should fail");
        assert!(stderr(&o).contains(message), "{args:?}: stderr {:?} lacks {message:?}", stderr(&o));
        assert!(stdout(&o).is_empty(), "{args:?} printed {:?}", stdout(&o));
    }
    assert_eq!(index_before(()), before, "rejected requests must not change the cluster state");
    assert!(!stdout(&cli(host, port, &["list-topics"])).contains("\"t\""));

    // Immutable field and shards decrease.
    assert!(cli(host, port, &["create-topic", "t", "--replication-factor", "1", "--shards", "2"]).status.success());
    let o = cli(host, port, &["update-topic", "t", "--replication-factor", "3"]);
    assert!(
        stderr(&o).contains("FailedPrecondition") && stderr(&o).contains("replication_factor: is immutable"),
        "{}",
        stderr(&o)
    );
    let o = cli(host, port, &["update-topic", "t", "--shards", "1"]);
    assert!(stderr(&o).contains("shards: can only go up"), "{}", stderr(&o));
    assert!(cli(host, port, &["update-topic", "t", "--shards", "4", "--retention", "24h"]).status.success());
    let topics = stdout(&cli(host, port, &["list-topics", "--output", "json"]));
    assert!(topics.contains("\"shards\":4") && topics.contains("\"retention\":\"1day\""), "{topics}");

    // A replication factor above the node count is accepted and flagged.
    assert!(cli(host, port, &["create-topic", "wide", "--replication-factor", "3"]).status.success());
    let dump = stdout(&cli(host, port, &["dump"]));
    assert!(dump.contains("name: \"wide\"") && dump.contains("under_replicated: true"), "{dump}");
    let topics = stdout(&cli(host, port, &["list-topics", "--output", "json"]));
    let topics: serde_json::Value = serde_json::from_str(topics.trim()).unwrap();
    let wide = topics["topics"].as_array().unwrap().iter().find(|t| t["name"] == "wide").unwrap();
    let fields = ["replication_factor", "retention", "shards", "under_replicated"].map(|k| wide[k].clone());
    assert_eq!(
        fields,
        [serde_json::json!(3), serde_json::json!("0s"), serde_json::json!(1), serde_json::json!(true)],
        "{wide}"
    );
}

#[test]
fn id_mismatch_is_refused_at_start_up() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("n");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("id"), "12345\n").unwrap();
    let o = Command::new(BIN)
        .args(["--dir", dir.to_str().unwrap(), "--host", "127.0.0.41", "--port", "26300", "--id", "999"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--id: 999 differs from the id 12345"), "{}", stderr(&o));
}

#[test]
fn broker_without_dir_explains_what_is_missing() {
    let o = Command::new(BIN).output().unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--dir"), "{}", stderr(&o));
}

#[test]
fn cli_reports_unreachable_node() {
    let o = cli("127.0.0.42", 26400, &["dump"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("127.0.0.42:26400"), "{}", stderr(&o));
}

/// StatefulSet style: every node gets the same --join list (its own address included)
/// and --bootstrap-expect 3; they form one cluster with three voters.
#[test]
fn bootstrap_expect_forms_one_cluster_from_identical_flags() {
    let tmp = test_dir("bootstrap_expect");
    let hosts = ["127.0.0.51", "127.0.0.52", "127.0.0.53"];
    let port = 26600;
    let join = hosts.iter().map(|h| format!("{h}:{port}")).collect::<Vec<_>>().join(",");
    let _nodes: Vec<Broker> = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| {
            Broker::start_with(h, port, &tmp.join(format!("n{i}")), &["--join", &join, "--bootstrap-expect", "3"])
        })
        .collect();
    eventually(Duration::from_secs(30), "3 voters, same leader everywhere", || {
        let dumps: Vec<serde_json::Value> = hosts
            .iter()
            .filter_map(|h| serde_json::from_str(&stdout(&cli(h, port, &["dump", "--output", "json"]))).ok())
            .collect();
        dumps.len() == 3
            && dumps.iter().all(|d| {
                let nodes = d["nodes"].as_array().cloned().unwrap_or_default();
                nodes.len() == 3
                    && nodes.iter().all(|n| n["state"] == "ALIVE" && n["raft_role"] == "voter")
                    && d["leader_id"] == dumps[0]["leader_id"]
            })
    });
}

/// grpc.health.v1 answers on the broker port: overall SERVING, and the readiness
/// service SERVING once a leader is known.
#[test]
fn health_service_reports_serving() {
    let tmp = test_dir("health");
    let (host, port) = ("127.0.0.61", 26700);
    let _node = Broker::start(host, port, &tmp.join("n"), &[]);
    let check = |service: &str| health(host, port, service);
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    eventually(Duration::from_secs(20), "liveness SERVING", || check("") == Some(serving));
    eventually(Duration::from_secs(20), "readiness SERVING", || check("eventter.v1.Admin") == Some(serving));
}

/// Server reflection lists the client services, so grpcurl works without .proto files.
#[test]
fn reflection_lists_the_services() {
    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient, server_reflection_request::MessageRequest,
        server_reflection_response::MessageResponse, ServerReflectionRequest,
    };
    let tmp = test_dir("reflection");
    let (host, port) = ("127.0.0.62", 26710);
    let _node = Broker::start(host, port, &tmp.join("n"), &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let list = || {
        rt.block_on(async {
            let channel =
                tonic::transport::Endpoint::from_shared(format!("http://{host}:{port}")).ok()?.connect().await.ok()?;
            let mut client = ServerReflectionClient::new(channel);
            let req = ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            };
            let mut stream = client.server_reflection_info(tokio_stream::iter([req])).await.ok()?.into_inner();
            match stream.message().await.ok()??.message_response? {
                MessageResponse::ListServicesResponse(l) => {
                    Some(l.service.into_iter().map(|s| s.name).collect::<Vec<_>>())
                }
                _ => None,
            }
        })
    };
    eventually(Duration::from_secs(20), "reflection answers", || list().is_some());
    let services = list().unwrap();
    for want in ["eventter.v1.Admin", "eventter.v1.Messaging", "grpc.health.v1.Health"] {
        assert!(services.iter().any(|s| s == want), "{want} missing from {services:?}");
    }
    // The node-to-node service is for cluster members only: not shown to clients.
    assert!(!services.iter().any(|s| s.contains("internal")), "{services:?}");
}
