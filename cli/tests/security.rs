//! Process-level tests of issue 17's first part: the real binary on 127.0.0.151-157
//! (ports 27200-27299), with TLS certificates generated here (rcgen; no key is
//! committed) and a cluster secret. What a user sees: a TLS cluster with a secret
//! that publishes and subscribes; clients without the CA, without a client
//! certificate or with another CA's refused at the handshake; the node-to-node
//! service refused to clients on every node (and a forward forged by one); a
//! certificate replaced on disk served without a restart (gRPC and AMQPS); nodes with
//! another secret kept out; and no secret in any log line. Then (127.0.0.63-65, ports
//! 28400-28402) client certificates as users: gRPC by certificate alone with the
//! user's permissions on every node, SASL EXTERNAL over AMQPS with pika, and the
//! refusals (a certificate of no user, an expired one, one of another user than the
//! password's, one without a CN), counted, logged once, and no key in any log.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::*;
use eventtermq_broker::transport::tls::{load_certs, ClientTls, ReloadingKey};
use eventtermq_proto::internal::v1::{internal_client::InternalClient, ReadIndexRequest};

const SECRET: &str = "process-test-cluster-secret-5b1f0c";

/// A test CA that issues node and client certificates into its directory.
struct Pki {
    dir: PathBuf,
    ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    ca_file: PathBuf,
}

impl Pki {
    fn new(dir: &Path) -> Pki {
        std::fs::create_dir_all(dir).unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, "eventtermq test CA");
        let ca = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap()).unwrap();
        let ca_file = dir.join("ca.crt");
        std::fs::write(&ca_file, ca.pem()).unwrap();
        Pki { dir: dir.into(), ca, ca_file }
    }

    /// A certificate for `names` (host names or IPs), for server and client use, and
    /// its key: written to `<name>.crt` and `<name>.key` (through a rename, as a
    /// Secret volume swaps its files).
    fn issue(&self, name: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params.extended_key_usages =
            vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        let (c, k) = (self.dir.join(format!("{name}.crt")), self.dir.join(format!("{name}.key")));
        for (path, pem) in [(&c, cert.pem()), (&k, key.serialize_pem())] {
            let tmp = path.with_extension("new");
            std::fs::write(&tmp, pem).unwrap();
            std::fs::rename(&tmp, path).unwrap();
        }
        (c, k)
    }

    /// A node's flags: a certificate for `names` issued as `name`, clients verified
    /// against this CA, and the cluster secret in `secret_file`.
    fn node_flags(&self, name: &str, names: &[&str], secret_file: &Path) -> Vec<String> {
        let (cert, key) = self.issue(name, names);
        [
            "--cluster-secret-file",
            &path(secret_file),
            "--tls-cert-file",
            &path(&cert),
            "--tls-key-file",
            &path(&key),
            "--tls-client-ca-file",
            &path(&self.ca_file),
        ]
        .map(String::from)
        .to_vec()
    }

    /// A client certificate with the subject common name `cn` (none: `None`) and a DNS
    /// name, valid until the start of `not_after` (year, month, day); written to
    /// `<name>.crt` and `<name>.key`.
    fn issue_client(&self, name: &str, cn: Option<&str>, not_after: (i32, u8, u8)) -> (PathBuf, PathBuf) {
        let mut params = rcgen::CertificateParams::new(vec![format!("{name}.clients.example")]).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = cn {
            params.distinguished_name.push(rcgen::DnType::CommonName, cn);
        }
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        let (c, k) = (self.dir.join(format!("{name}.crt")), self.dir.join(format!("{name}.key")));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }
}

/// The CLI with TLS from the environment (`EVENTTERMQ_TLS_*`), as a pod would set it.
fn tls_cli(host: &str, port: u16, ca: &Path, identity: Option<&(PathBuf, PathBuf)>, args: &[&str]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(["--host", host, "--port", &port.to_string()]).args(args).env("EVENTTERMQ_TLS_CA_FILE", ca);
    if let Some((cert, key)) = identity {
        cmd.env("EVENTTERMQ_TLS_CERT_FILE", cert).env("EVENTTERMQ_TLS_KEY_FILE", key);
    }
    cmd.output().expect("run cli")
}

fn path(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

/// A node-to-node call (ReadIndex) from a client over TLS, with `credential` as the
/// cluster credential metadata if given; its refusal.
async fn internal_call(host: &str, port: u16, tls: &ClientTls, credential: Option<&str>) -> tonic::Status {
    let addr = format!("{host}:{port}");
    let channel = eventtermq_broker::transport::tcp::connect_lazy(&addr, Duration::from_secs(3), Some(tls)).unwrap();
    let mut req = tonic::Request::new(ReadIndexRequest {});
    if let Some(c) = credential {
        req.metadata_mut().insert(eventtermq_broker::security::CLUSTER_CREDENTIAL_METADATA, c.parse().unwrap());
    }
    match InternalClient::new(channel).read_index(req).await {
        Ok(_) => panic!("{addr} answered a node-to-node call from a client"),
        Err(status) => status,
    }
}

/// A publish marked as forwarded by a node, sent by a client.
async fn forged_forward(host: &str, port: u16, tls: &ClientTls) -> tonic::Status {
    use eventtermq_proto::v1::{messaging_client::MessagingClient, PublishRequest};
    let addr = format!("{host}:{port}");
    let channel = eventtermq_broker::transport::tcp::connect_lazy(&addr, Duration::from_secs(3), Some(tls)).unwrap();
    let mut req = tonic::Request::new(PublishRequest { topic: "t".into(), ..Default::default() });
    req.metadata_mut().insert("eventter-forwarded", "1".parse().unwrap());
    match MessagingClient::new(channel).publish(req).await {
        Ok(_) => panic!("{addr} took a forwarded publish from a client"),
        Err(status) => status,
    }
}

/// The `/metrics` text of a node (plain HTTP on its metrics port).
fn scrape(host: &str, port: u16) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect((host, port)).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// The value of the first sample of `metric` (a name with labels) in `text`.
fn sample(text: &str, metric: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(metric)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{metric} not in the scrape:\n{text}"))
}

#[test]
fn a_tls_cluster_with_a_secret_serves_clients_and_refuses_outsiders() {
    let tmp = test_dir("security-cluster");
    let hosts = ["127.0.0.151", "127.0.0.152", "127.0.0.153"];
    let port = 27200;
    let pki = Pki::new(&tmp.join("pki"));
    let secret_file = tmp.join("cluster-secret");
    std::fs::write(&secret_file, format!("{SECRET}\n")).unwrap();
    let seed = format!("{}:{port}", hosts[0]);
    let nodes: Vec<Broker> = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let mut extra = pki.node_flags(&format!("node{i}"), &[h, "localhost"], &secret_file);
            if i > 0 {
                extra.extend(["--join".to_string(), seed.clone()]);
            }
            let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
            Broker::start_with(h, port, &tmp.join(format!("n{i}")), &extra)
        })
        .collect();
    let client = pki.issue("client", &["client.example"]);
    let cli = |host: &str, args: &[&str]| tls_cli(host, port, &pki.ca_file, Some(&client), args);

    eventually(Duration::from_secs(60), "3 ALIVE nodes over TLS", || {
        let o = cli(hosts[2], &["dump"]);
        o.status.success() && alive_count(&stdout(&o)) == 3
    });
    let o = cli(hosts[0], &["create-topic", "t", "--replication-factor", "3"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = cli(hosts[1], &["create-consumer-group", "g", "--bind", "t"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = cli(hosts[1], &["publish", "t", "m-{n}", "--count", "100"]);
    assert!(o.status.success(), "publish: {}", stderr(&o));
    let o = cli(hosts[2], &["subscribe", "g", "--max-messages", "100", "--wait", "10s"]);
    assert!(o.status.success(), "subscribe: {}", stderr(&o));
    assert_eq!(stdout(&o).lines().count(), 100, "{}", stdout(&o));

    // Plaintext to the TLS port, another CA, no client certificate: refused, nothing done.
    let o = common::cli(hosts[0], port, &["create-topic", "plain"]);
    assert_eq!(o.status.code(), Some(1), "plaintext to a TLS port did nothing, and says so: {}", stderr(&o));
    assert!(
        stderr(&o).contains("does not speak plaintext gRPC") && stderr(&o).contains("--tls-ca-file"),
        "{}",
        stderr(&o)
    );
    let o = common::cli(hosts[0], port, &["publish", "plain", "m", "--retry-for", "30s"]);
    assert_eq!(o.status.code(), Some(1), "not retried for 30 s: {}", stderr(&o));
    assert!(!stderr(&o).contains("retrying"), "{}", stderr(&o));
    let other = Pki::new(&tmp.join("other-pki"));
    let stranger = other.issue("stranger", &["client.example"]);
    let o = tls_cli(hosts[0], port, &other.ca_file, Some(&stranger), &["create-topic", "stranger"]);
    assert!(!o.status.success(), "a server of another CA was trusted: {}", stdout(&o));
    assert!(stderr(&o).contains("certificate"), "{}", stderr(&o));
    let o = tls_cli(hosts[0], port, &pki.ca_file, None, &["create-topic", "anonymous"]);
    assert!(!o.status.success(), "served without a client certificate: {}", stdout(&o));
    let topics = stdout(&cli(hosts[2], &["dump"]));
    for refused in ["plain", "stranger", "anonymous"] {
        assert!(!topics.contains(&format!("name: \"{refused}\"")), "{refused} was created:\n{topics}");
    }

    // The node-to-node service, and a forward forged by a client: refused on every node.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let identity = ReloadingKey::load(&client.0, &client.1, Duration::from_secs(3600)).unwrap();
        let tls = ClientTls::new(&pki.ca_file, Some(identity)).unwrap();
        for h in hosts {
            let s = internal_call(h, port, &tls, None).await;
            assert_eq!(s.code(), tonic::Code::Unauthenticated, "{h}: {s:?}");
            assert!(s.message().contains("cluster credential"), "{h}: {}", s.message());
            let s = internal_call(h, port, &tls, Some("a-guessed-credential")).await;
            assert_eq!(s.code(), tonic::Code::PermissionDenied, "{h}: {s:?}");
            let s = internal_call(h, port, &tls, Some(SECRET)).await;
            assert_eq!(s.code(), tonic::Code::PermissionDenied, "the secret itself is no credential: {s:?}");
            let s = forged_forward(h, port, &tls).await;
            assert_eq!(s.code(), tonic::Code::Unauthenticated, "{h}: {s:?}");
        }
    });
    for h in hosts {
        let text = scrape(h, port + 2);
        assert!(sample(&text, r#"eventtermq_internal_calls_refused_total{reason="missing"}"#) >= 2.0, "{h}");
        assert!(sample(&text, r#"eventtermq_internal_calls_refused_total{reason="wrong"}"#) >= 2.0, "{h}");
    }
    let text = scrape(hosts[0], port + 2);
    assert!(sample(&text, "eventtermq_tls_handshakes_failed_total") >= 2.0, "{text}");

    for (i, n) in nodes.iter().enumerate() {
        let log = n.log();
        assert!(log.contains("refused a node-to-node call"), "node {i} logged no refusal:\n{log}");
        assert!(!log.contains(SECRET), "node {i} logged the secret");
        assert!(!log.contains("a-guessed-credential"), "node {i} logged a presented credential");
    }
}

/// The leaf certificate a TLS port serves.
async fn served(host: &str, port: u16, tls: &ClientTls) -> Vec<u8> {
    let s = tls.connect(host, port).await.unwrap();
    s.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

#[test]
fn a_certificate_replaced_on_disk_is_served_without_a_restart_on_grpc_and_amqps() {
    let tmp = test_dir("security-reload");
    let (host, port) = ("127.0.0.154", 27210);
    let pki = Pki::new(&tmp.join("pki"));
    let (cert, key) = pki.issue("node", &[host]);
    let args = ["--tls-cert-file", &path(&cert), "--tls-key-file", &path(&key), "--tls-ca-file", &path(&pki.ca_file)];
    let mut args = args.to_vec();
    args.extend(["--tls-reload-interval-ms", "300"]);
    let node = Broker::start_with(host, port, &tmp.join("n"), &args);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let tls = rt.block_on(async { ClientTls::new(&pki.ca_file, None).unwrap() });
    let der = |p: &Path| load_certs("test", p).unwrap()[0].to_vec();
    let first = der(&cert);
    eventually(Duration::from_secs(20), "the certificate served", || {
        o_success(&tls_cli(host, port, &pki.ca_file, None, &["dump"]))
    });
    assert_eq!(rt.block_on(served(host, port, &tls)), first);
    assert_eq!(rt.block_on(served(host, port + 1, &tls)), first, "AMQPS serves the same certificate");

    // AMQP over TLS: the protocol header is answered with connection.start (a method frame).
    rt.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tls.connect(host, port + 1).await.unwrap();
        s.write_all(b"AMQP\x00\x00\x09\x01").await.unwrap();
        let mut frame_type = [0u8; 1];
        s.read_exact(&mut frame_type).await.unwrap();
        assert_eq!(frame_type[0], 1, "AMQPS did not answer with a method frame");
    });
    // Plaintext AMQP on the AMQPS port: no answer but a closed connection.
    {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect((host, port + 1)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        s.write_all(b"AMQP\x00\x00\x09\x01").unwrap();
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).unwrap_or(0);
        assert!(n == 0 || buf[0] == 0x15, "plaintext AMQP was answered: {:?}", &buf[..n]);
    }

    // cert-manager renews: new files in place of the old, no restart.
    pki.issue("node", &[host]);
    let second = der(&cert);
    assert_ne!(first, second);
    eventually(Duration::from_secs(10), "the new certificate served on gRPC and AMQPS", || {
        rt.block_on(async { served(host, port, &tls).await == second && served(host, port + 1, &tls).await == second })
    });
    let o = tls_cli(host, port, &pki.ca_file, None, &["dump"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(node.log().contains("TLS certificate and key reloaded"), "{}", node.log());
    assert_eq!(node.log().matches("node started").count(), 1, "the node restarted");
}

fn o_success(o: &Output) -> bool {
    o.status.success()
}

#[test]
fn only_nodes_with_the_cluster_secret_become_members() {
    let tmp = test_dir("security-members");
    let hosts = ["127.0.0.155", "127.0.0.156", "127.0.0.157"];
    let port = 27220;
    let seed = format!("{}:{port}", hosts[0]);

    // A node that joins others must say how members prove it: refused at the start.
    let o = Command::new(BIN)
        .args(["--dir", &path(&tmp.join("refused")), "--host", hosts[1], "--port", &port.to_string()])
        .args(["--join", &seed])
        .env_remove(TRUSTED_NETWORK_ENV)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--cluster-secret-file") && stderr(&o).contains("--insecure-trusted-network"));

    let ours = tmp.join("ours");
    std::fs::write(&ours, SECRET).unwrap();
    let theirs = tmp.join("theirs");
    std::fs::write(&theirs, "another-cluster-secret-0000").unwrap();
    let start = |i: usize, secret: &Path| {
        let mut extra = vec!["--cluster-secret-file".to_string(), path(secret)];
        if i > 0 {
            extra.extend(["--join".to_string(), seed.clone()]);
        }
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        Broker::start_with(hosts[i], port, &tmp.join(format!("n{i}")), &extra)
    };
    let first = start(0, &ours);
    let outsider = start(1, &theirs);
    let member = start(2, &ours);
    eventually(Duration::from_secs(30), "the member ALIVE", || {
        let o = cli(hosts[0], port, &["dump"]);
        o.status.success() && alive_count(&stdout(&o)) == 2
    });
    // Long enough for gossip and the leader's reconciliation to have let it in.
    std::thread::sleep(Duration::from_secs(3));
    let dump = stdout(&cli(hosts[2], port, &["dump"]));
    assert_eq!(alive_count(&dump), 2, "{dump}");
    assert!(!dump.contains(hosts[1]), "the outsider got in:\n{dump}");
    assert!(first.log().contains("reason=\"wrong\"") || first.log().contains("reason=wrong"), "{}", first.log());
    for n in [&first, &outsider, &member] {
        assert!(!n.log().contains(SECRET) && !n.log().contains("another-cluster-secret"), "{}", n.log());
    }

    // A client on a plaintext cluster: the node-to-node service refused too.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let status = rt.block_on(async {
        let channel = eventtermq_broker::transport::tcp::connect_lazy(&seed, Duration::from_secs(3), None).unwrap();
        InternalClient::new(channel).read_index(ReadIndexRequest {}).await.unwrap_err()
    });
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
}

/// The base64 lines of a PEM file's body (what a key leaked into a log would show).
fn pem_body_lines(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines().filter(|l| !l.starts_with("-----") && l.len() >= 16).map(str::to_string).collect()
}

#[test]
fn client_certificates_are_users_on_grpc_and_amqps() {
    const ADMIN_PASSWORD: &str = "cert-admin-pw-3Jd8q2Lx";
    const CAROL_PASSWORD: &str = "cert-carol-pw-unused-7Rw1";
    let tmp = test_dir("security-cert-users");
    let hosts = ["127.0.0.63", "127.0.0.64", "127.0.0.65"];
    let port = 28400;
    let pki = Pki::new(&tmp.join("pki"));
    let secret_file = tmp.join("cluster-secret");
    std::fs::write(&secret_file, format!("{SECRET}\n")).unwrap();
    let admin_file = tmp.join("admin.password");
    std::fs::write(&admin_file, format!("{ADMIN_PASSWORD}\n")).unwrap();
    // The flag: only with a client CA, and only its four values.
    for (args, words) in [
        (vec!["--tls-client-cert-user-from", "cn"], vec!["--tls-client-cert-user-from", "--tls-client-ca-file"]),
        (
            vec!["--tls-client-cert-user-from", "subject"],
            vec!["--tls-client-cert-user-from", "cn, san-dns, san-email, none"],
        ),
    ] {
        let o = Command::new(BIN)
            .args(["--dir", &path(&tmp.join("refused")), "--host", hosts[0], "--port", &port.to_string()])
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        for w in words {
            assert!(stderr(&o).contains(w), "{args:?}: {w:?} not in {}", stderr(&o));
        }
    }
    let seed = format!("{}:{port}", hosts[0]);
    let nodes: Vec<Broker> = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let mut extra = pki.node_flags(&format!("node{i}"), &[h], &secret_file);
            if i == 0 {
                extra.extend(["--admin-user".to_string(), "admin".into(), "--admin-password-file".into()]);
                extra.push(path(&admin_file));
            } else {
                extra.extend(["--join".to_string(), seed.clone()]);
            }
            let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
            Broker::start_with(h, port, &tmp.join(format!("n{i}")), &extra)
        })
        .collect();
    let far = (2100, 1, 1);
    let admin = pki.issue_client("admin", Some("admin"), far);
    let carol = pki.issue_client("carol", Some("carol"), far);
    let mallory = pki.issue_client("mallory", Some("mallory"), far);
    let expired = pki.issue_client("carol-expired", Some("carol"), (2021, 1, 1));
    let no_cn = pki.issue_client("no-cn", None, far);
    let as_cert =
        |host: &str, id: &(PathBuf, PathBuf), args: &[&str]| tls_cli(host, port, &pki.ca_file, Some(id), args);
    let ok = |o: Output, what: &str| assert!(o.status.success(), "{what}: {}{}", stdout(&o), stderr(&o));
    let refused = |o: Output, what: &str, words: &[&str]| {
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{what}: expected exit 1: {}{err}", stdout(&o));
        for w in words {
            assert!(err.contains(w), "{what}: {w:?} not in: {err}");
        }
    };

    // The administrator logs in by its certificate alone (no --user): on every node.
    eventually(Duration::from_secs(60), "3 ALIVE nodes and the bootstrap admin, by certificate", || {
        let users = as_cert(hosts[0], &admin, &["list-users"]);
        let dump = as_cert(hosts[2], &admin, &["dump"]);
        users.status.success() && stdout(&users).contains("admin") && alive_count(&stdout(&dump)) == 3
    });
    for ns in ["a", "b"] {
        ok(as_cert(hosts[0], &admin, &["create-namespace", ns]), "create-namespace");
        ok(as_cert(hosts[1], &admin, &["--namespace", ns, "create-topic", "t", "--replication-factor", "3"]), "topic");
        ok(as_cert(hosts[2], &admin, &["--namespace", ns, "create-consumer-group", "g", "--bind", "t"]), "group");
    }
    ok(as_cert(hosts[1], &admin, &["--namespace", "a", "create-topic", "u", "--replication-factor", "1"]), "topic u");
    let mut child = Command::new(BIN)
        .args(["--host", hosts[1], "--port", &port.to_string(), "create-user", "carol"])
        .env("EVENTTERMQ_TLS_CA_FILE", &pki.ca_file)
        .env("EVENTTERMQ_TLS_CERT_FILE", &admin.0)
        .env("EVENTTERMQ_TLS_KEY_FILE", &admin.1)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(format!("{CAROL_PASSWORD}\n").as_bytes()).unwrap();
    ok(child.wait_with_output().unwrap(), "create-user carol");
    let set = ["--namespace", "a", "set-permissions", "carol", "--write", "^t$", "--read", "^g$"];
    ok(as_cert(hosts[2], &admin, &set), "set-permissions");

    // carol by certificate: her permissions, on every node (a publish reaches the
    // topic's primary through the others, a subscription the group's node: forwarded
    // with her name and checked there).
    for (i, h) in hosts.iter().enumerate() {
        ok(
            as_cert(h, &carol, &["--namespace", "a", "publish", "t", &format!("by-cert-{i}")]),
            "carol publishes to a/t",
        );
        let o = as_cert(h, &carol, &["--namespace", "b", "publish", "t", "denied"]);
        refused(o, "carol publishes to b/t", &["PermissionDenied", "\"carol\"", "\"b\"", "write"]);
        let o = as_cert(h, &carol, &["--namespace", "a", "publish", "u", "denied"]);
        refused(o, "carol publishes to a/u", &["PermissionDenied", "\"carol\"", "\"a\"", "write"]);
        let o = as_cert(h, &carol, &["--namespace", "b", "subscribe", "g", "--max-messages", "1", "--wait", "1s"]);
        refused(o, "carol reads b/g", &["PermissionDenied", "\"carol\"", "\"b\"", "read"]);
        refused(as_cert(h, &carol, &["create-namespace", "c"]), "carol creates a namespace", &["administrator"]);
    }
    let o = as_cert(hosts[1], &carol, &["--namespace", "a", "subscribe", "g", "--max-messages", "3", "--wait", "10s"]);
    ok(o.clone(), "carol reads a/g");
    for i in 0..3 {
        use base64::Engine;
        let data = base64::engine::general_purpose::STANDARD.encode(format!("by-cert-{i}"));
        assert!(stdout(&o).contains(&format!("\"data\":\"{data}\"")), "by-cert-{i}: {}", stdout(&o));
    }

    // Refusals, on node 0: a certificate of no user, an expired one, one of another
    // user than the password's, one without a CN.
    let h = hosts[0];
    let list = ["--namespace", "a", "list-topics"];
    let o = as_cert(h, &mallory, &list);
    refused(o, "a certificate of no user", &["Unauthenticated", "\"mallory\"", "does not exist"]);
    let o = as_cert(h, &expired, &list);
    refused(o, "an expired certificate", &["Unauthenticated", "\"carol\"", "expired at 2021-01-01T00:00:00Z"]);
    let mut both = vec!["--user", "admin", "--password-file"];
    let admin_path = path(&admin_file);
    both.push(&admin_path);
    both.extend(list);
    let o = as_cert(h, &carol, &both);
    refused(o, "carol's certificate with admin's password", &["Unauthenticated", "\"carol\"", "\"admin\""]);
    let o = as_cert(h, &no_cn, &list);
    refused(o, "a certificate without a CN", &["Unauthenticated", "no subject common name (CN)"]);
    // A certificate that names no user still carries a password login (it is only the
    // transport's then), and the same user's certificate and password agree.
    ok(as_cert(h, &mallory, &both), "a password login on a certificate of no user");
    let mut same = vec!["--user", "carol", "--password-file"];
    let carol_file = tmp.join("carol.password");
    std::fs::write(&carol_file, CAROL_PASSWORD).unwrap();
    let carol_path = path(&carol_file);
    same.push(&carol_path);
    same.extend(["--namespace", "a", "list-topics"]);
    ok(as_cert(h, &carol, &same), "carol's certificate and carol's password");

    let text = scrape(h, port + 2);
    for reason in
        ["certificate_unknown_user", "certificate_expired", "certificate_user_mismatch", "certificate_no_user"]
    {
        let n = sample(&text, &format!("eventtermq_auth_failures_total{{reason=\"{reason}\"}}"));
        assert_eq!(n, 1.0, "{reason}: {text}");
    }
    assert!(sample(&text, r#"eventtermq_auth_failures_total{reason="permission_denied"}"#) >= 1.0, "{text}");
    let log = nodes[0].log();
    for reason in
        ["certificate_unknown_user", "certificate_expired", "certificate_user_mismatch", "certificate_no_user"]
    {
        let lines: Vec<&str> =
            log.lines().filter(|l| l.contains("authentication failed") && l.contains(reason)).collect();
        assert_eq!(lines.len(), 1, "{reason} logged once: {lines:#?}");
    }

    // AMQPS with pika: SASL EXTERNAL by certificate, and its refusals (on node 1).
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/security/pika_external.py");
    let o = Command::new("timeout")
        .args(["120", "python3", script, hosts[1], &(port + 1).to_string(), &path(&pki.ca_file)])
        .args([&path(&pki.dir), ADMIN_PASSWORD])
        .env("PYTHONPATH", pika_path())
        .output()
        .unwrap();
    assert!(o.status.success(), "pika checks failed:\n{}\n{}", stdout(&o), stderr(&o));
    let text = scrape(hosts[1], port + 2);
    for reason in ["certificate_unknown_user", "certificate_expired", "certificate_user_mismatch"] {
        let n = sample(&text, &format!("eventtermq_auth_failures_total{{reason=\"{reason}\"}}"));
        assert!(n >= 1.0, "{reason} over AMQP: {text}");
    }

    // No key, password or secret in any log line.
    let mut secrets: Vec<String> = vec![ADMIN_PASSWORD.into(), CAROL_PASSWORD.into(), SECRET.into()];
    for id in [&admin, &carol, &mallory, &expired, &no_cn] {
        secrets.extend(pem_body_lines(&id.1));
    }
    for i in 0..3 {
        secrets.extend(pem_body_lines(&pki.dir.join(format!("node{i}.key"))));
    }
    for (i, n) in nodes.iter().enumerate() {
        let log = n.log();
        for s in &secrets {
            assert!(!log.contains(s.as_str()), "node {i} logged key or password material: {s}");
        }
    }
}
