//! Process-level tests of users, authentication and permissions (issue 17): the real
//! binary on 127.0.0.235-244 (ports 27700-27799). A 3-node cluster with a bootstrap
//! administrator (`--admin-user`); a user with only `read` on namespace `a` cannot
//! publish there nor read namespace `b` (PermissionDenied naming user, namespace and
//! permission), a wrong password is Unauthenticated, a request forwarded by a node is
//! checked on the node it reaches, and no password reaches any broker log. Then AMQP
//! with pika: the same users over SASL PLAIN, and the vhost permissions.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;
use eventtermq_proto::v1 as pb;

const HOSTS: [&str; 3] = ["127.0.0.235", "127.0.0.236", "127.0.0.237"];
const PORT: u16 = 27700;
const AMQP_HOST: &str = "127.0.0.238";
const AMQP_NODE_PORT: u16 = 27710;

const ADMIN_PASSWORD: &str = "admin-pw-7Qz4c1r9";
const READER_PASSWORD: &str = "reader-pw-K2m8x0w5";
const WRONG_PASSWORD: &str = "wrong-pw-V6b3n7j1";
const NEW_READER_PASSWORD: &str = "reader-pw2-Q9d3s6t1";
/// The change-password test's single node.
const CHANGE_HOST: &str = "127.0.0.81";
const CHANGE_PORT: u16 = 28100;

fn password_file(dir: &Path, name: &str, password: &str) -> PathBuf {
    let f = dir.join(format!("{name}.password"));
    std::fs::write(&f, format!("{password}\n")).unwrap();
    f
}

/// The CLI as `user` (`EVENTTERMQ_USER`, `EVENTTERMQ_PASSWORD_FILE`), as a pod would run it.
fn cli_as(host: &str, port: u16, user: &str, password_file: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(["--host", host, "--port", &port.to_string()])
        .args(args)
        .env("EVENTTERMQ_USER", user)
        .env("EVENTTERMQ_PASSWORD_FILE", password_file)
        .output()
        .expect("run cli")
}

/// `create-user NAME` as the administrator, the password on stdin.
fn create_user(host: &str, port: u16, admin_file: &Path, name: &str, password: &str) -> Output {
    let mut child = Command::new(BIN)
        .args(["--host", host, "--port", &port.to_string(), "create-user", name])
        .env("EVENTTERMQ_USER", "admin")
        .env("EVENTTERMQ_PASSWORD_FILE", admin_file)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(format!("{password}\n").as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

/// The node's `/metrics` text.
fn scrape(host: &str, port: u16) -> String {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect((host, port)).unwrap();
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {host}\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text
}

fn ok(o: &Output, what: &str) {
    assert!(o.status.success(), "{what} failed: {}{}", stdout(o), stderr(o));
}

/// Refused with exit 1 and a message holding every word.
fn refused(o: &Output, what: &str, words: &[&str]) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "{what}: expected exit 1, got {:?}: {}{err}", o.status, stdout(o));
    for w in words {
        assert!(err.contains(w), "{what}: {w:?} not in: {err}");
    }
}

/// A request as a node would forward it: marked forwarded, naming its caller
/// (the cluster runs on the tests' trusted network, so the mark is taken).
async fn forged_forward_publish(host: &str, caller: &str) -> tonic::Status {
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{host}:{PORT}")).unwrap().connect().await.unwrap();
    let mut client = pb::messaging_client::MessagingClient::new(channel);
    let mut req = tonic::Request::new(pb::PublishRequest {
        namespace: "a".into(),
        topic: "t".into(),
        messages: vec![pb::Message { data: b"forwarded".to_vec().into(), ..Default::default() }],
        ..Default::default()
    });
    req.metadata_mut().insert("eventter-forwarded", "1".parse().unwrap());
    req.metadata_mut().insert("eventter-caller", caller.parse().unwrap());
    client.publish(req).await.expect_err("a forwarded publish for a reader must be refused")
}

#[test]
fn users_permissions_and_no_password_in_the_logs() {
    let base = test_dir("users_grpc");
    let admin_file = password_file(&base, "admin", ADMIN_PASSWORD);
    let reader_file = password_file(&base, "reader", READER_PASSWORD);
    let wrong_file = password_file(&base, "wrong", WRONG_PASSWORD);
    let admin_flag = admin_file.to_str().unwrap();
    let seed = format!("{}:{PORT}", HOSTS[0]);
    let mut nodes = vec![Broker::start_with(
        HOSTS[0],
        PORT,
        &base.join("n0"),
        &["--admin-user", "admin", "--admin-password-file", admin_flag],
    )];
    for (i, h) in HOSTS.iter().enumerate().skip(1) {
        nodes.push(Broker::start(h, PORT, &base.join(format!("n{i}")), std::slice::from_ref(&seed)));
    }
    let admin = |host: &str, args: &[&str]| cli_as(host, PORT, "admin", &admin_file, args);
    eventually(Duration::from_secs(60), "3 ALIVE nodes and the bootstrap admin", || {
        let o = admin(HOSTS[2], &["dump"]);
        let users = admin(HOSTS[2], &["list-users"]);
        o.status.success()
            && alive_count(&stdout(&o)) == 3
            && users.status.success()
            && stdout(&users).contains("admin")
    });
    // The bootstrap admin exists: no credentials is Unauthenticated now, on every node.
    for h in HOSTS {
        refused(&cli(h, PORT, &["list-namespaces"]), "no credentials", &["Unauthenticated", "credentials required"]);
    }
    for ns in ["a", "b"] {
        ok(&admin(HOSTS[0], &["create-namespace", ns]), "create-namespace");
        ok(&admin(HOSTS[1], &["--namespace", ns, "create-topic", "t", "--replication-factor", "3"]), "create-topic");
        ok(&admin(HOSTS[2], &["--namespace", ns, "create-consumer-group", "g", "--bind", "t"]), "create-group");
    }
    ok(&create_user(HOSTS[1], PORT, &admin_file, "reader", READER_PASSWORD), "create-user reader");
    refused(&create_user(HOSTS[1], PORT, &admin_file, "reader", "x"), "create-user twice", &["AlreadyExists (3004)"]);
    let o = admin(HOSTS[2], &["--namespace", "a", "set-permissions", "reader", "--read", ".*", "--configure", "("]);
    refused(&o, "a bad pattern", &["(1009)", "configure:", "regular expression"]);
    ok(&admin(HOSTS[2], &["--namespace", "a", "set-permissions", "reader", "--read", ".*"]), "set-permissions");
    let o = admin(HOSTS[0], &["--namespace", "nope", "set-permissions", "reader", "--read", ".*"]);
    refused(&o, "permissions on a missing namespace", &["NotFound (2001)"]);
    ok(&admin(HOSTS[0], &["--namespace", "a", "publish", "t", "m1"]), "admin publish");

    let reader = |host: &str, args: &[&str]| cli_as(host, PORT, "reader", &reader_file, args);
    for h in HOSTS {
        // Read on a: yes (the group runs on one node: the others relay the subscription).
        let o = reader(h, &["--namespace", "a", "subscribe", "g", "--max-messages", "0", "--wait", "1s"]);
        ok(&o, "reader subscribes to a/g");
        // Publish to a: no.
        let o = reader(h, &["--namespace", "a", "publish", "t", "denied"]);
        refused(&o, "reader publishes to a", &["PermissionDenied", "\"reader\"", "\"a\"", "write"]);
        // Read b: no.
        let o = reader(h, &["--namespace", "b", "subscribe", "g", "--max-messages", "1", "--wait", "1s"]);
        refused(&o, "reader reads b", &["PermissionDenied", "\"reader\"", "\"b\"", "read"]);
        // Administration: no.
        refused(
            &reader(h, &["create-namespace", "c"]),
            "reader creates a namespace",
            &["PermissionDenied", "administrator"],
        );
        // A wrong password.
        let o = cli_as(h, PORT, "reader", &wrong_file, &["--namespace", "a", "list-topics"]);
        refused(&o, "a wrong password", &["Unauthenticated", "wrong user name or password"]);
    }
    let o = cli(HOSTS[2], PORT, &["--namespace", "a", "subscribe", "g", "--max-messages", "1", "--wait", "1s"]);
    refused(&o, "subscribe without credentials", &["Unauthenticated"]);
    let o = reader(HOSTS[1], &["--namespace", "a", "subscribe", "g", "--max-messages", "1", "--wait", "10s"]);
    ok(&o, "reader reads a/g");
    assert!(stdout(&o).contains("\"data\""), "{}", stdout(&o));
    // list-namespaces shows the reader its own namespaces only.
    let o = reader(HOSTS[0], &["list-namespaces"]);
    ok(&o, "reader lists namespaces");
    assert_eq!(stdout(&o).trim(), "a");

    // A forwarded request is checked on the node it reaches, as the caller it names.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    for h in HOSTS {
        let status = rt.block_on(forged_forward_publish(h, "user reader"));
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
        assert!(status.message().contains("\"reader\"") && status.message().contains("write"), "{status:?}");
        let status = rt.block_on(forged_forward_publish(h, "user nobody"));
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    }

    let o = admin(HOSTS[0], &["list-users", "--output", "json"]);
    ok(&o, "list-users");
    let users: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(users["users"][0]["name"], "admin");
    assert_eq!(users["users"][0]["admin"], true);
    assert_eq!(users["users"][1]["permissions"]["a"]["read"], ".*");
    assert!(!stdout(&o).contains("argon2"), "no hash shown: {}", stdout(&o));
    // A deleted user is no one.
    ok(&admin(HOSTS[2], &["delete-user", "reader"]), "delete-user");
    refused(&reader(HOSTS[0], &["--namespace", "a", "list-topics"]), "a deleted user", &["Unauthenticated"]);

    let text = scrape(HOSTS[0], PORT + 2);
    assert!(text.contains("eventtermq_auth_failures_total{reason=\"wrong_password\"}"), "{text}");
    assert!(text.contains("eventtermq_auth_failures_total{reason=\"permission_denied\"}"), "{text}");
    for n in &nodes {
        let log = n.log();
        assert!(log.contains("authentication failed"), "each node logs failures: {}", n.dir.display());
        for secret in [ADMIN_PASSWORD, READER_PASSWORD, WRONG_PASSWORD, "$argon2"] {
            assert!(!log.contains(secret), "{secret:?} in the log of {}", n.dir.display());
        }
    }
    assert!(nodes[0].log().contains("created the bootstrap administrator"));
}

#[test]
fn amqp_logins_and_vhost_permissions() {
    let base = test_dir("users_amqp");
    let admin_file = password_file(&base, "admin", ADMIN_PASSWORD);
    let node = Broker::start_with(
        AMQP_HOST,
        AMQP_NODE_PORT,
        &base.join("n0"),
        &["--admin-user", "admin", "--admin-password-file", admin_file.to_str().unwrap()],
    );
    let admin = |args: &[&str]| cli_as(AMQP_HOST, AMQP_NODE_PORT, "admin", &admin_file, args);
    eventually(Duration::from_secs(30), "the node and its bootstrap admin", || {
        let o = admin(&["list-users"]);
        o.status.success() && stdout(&o).contains("admin")
    });
    for ns in ["a", "b"] {
        ok(&admin(&["create-namespace", ns]), "create-namespace");
        ok(&admin(&["--namespace", ns, "create-topic", "t", "--replication-factor", "1"]), "create-topic");
        ok(&admin(&["--namespace", ns, "create-consumer-group", "g", "--bind", "t"]), "create-group");
    }
    ok(&create_user(AMQP_HOST, AMQP_NODE_PORT, &admin_file, "reader", READER_PASSWORD), "create-user");
    ok(&admin(&["--namespace", "a", "set-permissions", "reader", "--read", ".*"]), "set-permissions");
    ok(&admin(&["--namespace", "a", "publish", "t", "for-amqp"]), "publish");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/users/pika_users.py");
    let port = (AMQP_NODE_PORT + 1).to_string();
    let o = Command::new("timeout")
        .args(["120", "python3", script, AMQP_HOST, &port, "reader", READER_PASSWORD, WRONG_PASSWORD])
        .env("PYTHONPATH", pika_path())
        .output()
        .unwrap();
    assert!(o.status.success(), "pika checks failed:\n{}\n{}", stdout(&o), stderr(&o));
    let out = stdout(&o);
    for line in [
        "wrong password refused",
        "guest refused",
        "read permitted",
        "publish refused",
        "declare refused",
        "vhost b refused",
    ] {
        assert!(out.contains(line), "{line:?} not in:\n{out}");
    }
    // Users survive a restart (the Raft log replayed; snapshots are unit-tested).
    let mut node = node;
    assert!(node.terminate().success());
    node.spawn();
    eventually(Duration::from_secs(30), "the restarted node knows its users", || {
        let o = admin(&["list-users"]);
        o.status.success() && stdout(&o).contains("reader")
    });
    refused(
        &cli(AMQP_HOST, AMQP_NODE_PORT, &["list-namespaces"]),
        "no credentials after a restart",
        &["Unauthenticated"],
    );
    let log = node.log();
    let failures: Vec<&str> = log.lines().filter(|l| l.contains("authentication failed")).collect();
    assert!(failures.iter().any(|l| l.contains("amqp") && l.contains("wrong_password")), "{log}");
    for secret in [ADMIN_PASSWORD, READER_PASSWORD, WRONG_PASSWORD, "$argon2"] {
        assert!(!log.contains(secret), "{secret:?} in the broker's log");
    }
}

#[test]
fn change_password_replaces_the_old_one_and_keeps_permissions() {
    let base = test_dir("users_change_password");
    let admin_file = password_file(&base, "admin", ADMIN_PASSWORD);
    let old_file = password_file(&base, "reader", READER_PASSWORD);
    let new_file = password_file(&base, "reader-new", NEW_READER_PASSWORD);
    let node = Broker::start_with(
        CHANGE_HOST,
        CHANGE_PORT,
        &base.join("n0"),
        &["--admin-user", "admin", "--admin-password-file", admin_file.to_str().unwrap()],
    );
    let admin = |args: &[&str]| cli_as(CHANGE_HOST, CHANGE_PORT, "admin", &admin_file, args);
    eventually(Duration::from_secs(30), "the node and its bootstrap admin", || {
        let o = admin(&["list-users"]);
        o.status.success() && stdout(&o).contains("admin")
    });
    ok(&admin(&["--namespace", "default", "create-topic", "t", "--replication-factor", "1"]), "create-topic");
    ok(&create_user(CHANGE_HOST, CHANGE_PORT, &admin_file, "reader", READER_PASSWORD), "create-user");
    ok(&admin(&["set-permissions", "reader", "--configure", "^t$"]), "set-permissions");
    let reader = |file: &Path| cli_as(CHANGE_HOST, CHANGE_PORT, "reader", file, &["list-topics"]);
    ok(&reader(&old_file), "the old password before the change");
    // Only an administrator changes passwords; the reader cannot change its own.
    let new_flag = new_file.to_str().unwrap();
    let o = cli_as(
        CHANGE_HOST,
        CHANGE_PORT,
        "reader",
        &old_file,
        &["change-password", "reader", "--user-password-file", new_flag],
    );
    refused(&o, "change-password by a non-administrator", &["PermissionDenied", "changing a password"]);
    ok(&reader(&old_file), "the old password after a refused change");
    ok(&admin(&["change-password", "reader", "--user-password-file", new_flag]), "change-password");
    // The old password (verified and cached a moment ago) is refused from now on.
    refused(&reader(&old_file), "the old password", &["Unauthenticated", "wrong user name or password"]);
    let o = reader(&new_file);
    ok(&o, "the new password");
    assert!(stdout(&o).contains("\"t\"") || stdout(&o).contains(" t"), "permissions kept: {}", stdout(&o));
    let users = admin(&["list-users", "--output", "json"]);
    ok(&users, "list-users");
    assert!(stdout(&users).contains("^t$"), "permissions kept: {}", stdout(&users));
    refused(
        &admin(&["change-password", "nobody", "--user-password-file", new_flag]),
        "change-password of an unknown user",
        &["NotFound (2005)", "nobody"],
    );
    let empty = password_file(&base, "empty", "");
    let o = admin(&["change-password", "reader", "--user-password-file", empty.to_str().unwrap()]);
    assert_ne!(o.status.code(), Some(0), "an empty password must be refused: {}", stdout(&o));
    ok(&reader(&new_file), "the new password after a refused change");
    let log = node.log();
    for secret in [ADMIN_PASSWORD, READER_PASSWORD, NEW_READER_PASSWORD, "$argon2"] {
        assert!(!log.contains(secret), "{secret:?} in the broker's log");
    }
}

/// The Kubernetes start (issue 17): every node with `--bootstrap-expect 3` and the
/// same `--admin-user`, each joining the others. Before founding the cluster a node
/// asks the others whether one exists already; those take no client before their
/// administrator exists (which needs the cluster), so that question is a node's, not
/// a client's. Then a fourth node, with the same flags, joins the running cluster,
/// which has users by then, and is added rather than founding a second one.
#[test]
fn nodes_with_an_admin_user_found_the_cluster_and_a_later_node_joins() {
    const HOSTS: [&str; 4] = ["127.0.0.83", "127.0.0.84", "127.0.0.85", "127.0.0.86"];
    const PORT: u16 = 28110;
    let base = test_dir("users_bootstrap_expect");
    let admin_file = password_file(&base, "admin", ADMIN_PASSWORD);
    let admin_flag = admin_file.to_str().unwrap().to_string();
    let start = |i: usize| {
        let mut extra = vec!["--bootstrap-expect", "3", "--admin-user", "admin", "--admin-password-file", &admin_flag];
        let seeds: Vec<String> = HOSTS[..3].iter().filter(|h| **h != HOSTS[i]).map(|h| format!("{h}:{PORT}")).collect();
        for s in &seeds {
            extra.extend(["--join", s.as_str()]);
        }
        Broker::start_with(HOSTS[i], PORT, &base.join(format!("n{i}")), &extra)
    };
    let mut nodes: Vec<Broker> = (0..3).map(start).collect();
    let admin = |host: &str, args: &[&str]| cli_as(host, PORT, "admin", &admin_file, args);
    eventually(Duration::from_secs(60), "3 ALIVE nodes founding one cluster with its administrator", || {
        let o = admin(HOSTS[2], &["dump"]);
        o.status.success()
            && alive_count(&stdout(&o)) == 3
            && stdout(&admin(HOSTS[0], &["list-users"])).contains("admin")
    });
    refused(&cli(HOSTS[1], PORT, &["list-namespaces"]), "no credentials", &["Unauthenticated"]);
    nodes.push(start(3));
    eventually(Duration::from_secs(60), "the fourth node added to the running cluster", || {
        let o = admin(HOSTS[3], &["dump"]);
        o.status.success() && alive_count(&stdout(&o)) == 4
    });
    let o = admin(HOSTS[3], &["list-users"]);
    ok(&o, "list-users on the fourth node");
    assert!(stdout(&o).contains("admin"), "the fourth node has the cluster's users: {}", stdout(&o));
    for n in &nodes {
        assert!(!n.log().contains(ADMIN_PASSWORD), "the password in the log of {}", n.dir.display());
    }
}
