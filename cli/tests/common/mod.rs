//! Helpers shared by the process-level tests: the real `eventtermq` binary on
//! 127.0.0.x addresses, driven through its CLI.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_eventtermq");

/// `--insecure-trusted-network` as an environment variable.
pub const TRUSTED_NETWORK_ENV: &str = "EVENTTERMQ_INSECURE_TRUSTED_NETWORK";

/// A broker process that is killed (SIGKILL) when dropped.
pub struct Broker {
    pub child: Option<Child>,
    pub host: String,
    pub port: u16,
    pub dir: PathBuf,
    pub join: Vec<String>,
    pub extra: Vec<String>,
}

impl Broker {
    pub fn start(host: &str, port: u16, dir: &Path, join: &[String]) -> Broker {
        let mut b =
            Broker { child: None, host: host.into(), port, dir: dir.into(), join: join.to_vec(), extra: vec![] };
        b.spawn();
        b
    }

    pub fn start_with(host: &str, port: u16, dir: &Path, extra: &[&str]) -> Broker {
        let mut b = Broker { child: None, host: host.into(), port, dir: dir.into(), join: vec![], extra: vec![] };
        b.extra = extra.iter().map(|s| s.to_string()).collect();
        b.spawn();
        b
    }

    pub fn spawn(&mut self) {
        let mut cmd = Command::new(BIN);
        cmd.args(["--dir", self.dir.to_str().unwrap(), "--host", &self.host, "--advertise-host", &self.host])
            .args(["--port", &self.port.to_string()])
            .args([
                "--election-timeout-min-ms",
                "300",
                "--election-timeout-max-ms",
                "600",
                "--heartbeat-interval-ms",
                "100",
            ])
            .env("RUST_LOG", "info,eventtermq_broker::node=debug,openraft=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::from(self.log_file()));
        for j in &self.join {
            cmd.args(["--join", j]);
        }
        cmd.args(&self.extra);
        // The tests' clusters run on loopback addresses of this machine (the seed's
        // trusted network), unless a test gives them a secret (cli/tests/security.rs).
        if !self.extra.iter().any(|a| a == "--cluster-secret-file") {
            cmd.env(TRUSTED_NETWORK_ENV, "true");
        }
        self.child = Some(cmd.spawn().expect("start broker"));
    }

    /// The broker's log, `<dir>.log`: appended to by every start, so a test that
    /// restarts nodes keeps what each run printed.
    pub fn log_file(&self) -> std::fs::File {
        std::fs::OpenOptions::new().create(true).append(true).open(self.dir.with_extension("log")).unwrap()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.with_extension("log")).unwrap_or_default()
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let c = self.child.as_mut().expect("running");
        Command::new("kill").args(["-TERM", &c.id().to_string()]).status().unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = c.try_wait().unwrap() {
                self.child = None;
                return status;
            }
            assert!(Instant::now() < deadline, "broker did not exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn cli(host: &str, port: u16, args: &[&str]) -> Output {
    Command::new(BIN).args(["--host", host, "--port", &port.to_string()]).args(args).output().expect("run cli")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A fresh directory under the target's test scratch space; kept after the run so
/// the brokers' logs (`<dir>/n*.log`) can be read after a failure.
pub fn test_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Polls `f` every 100 ms until it returns true or `timeout` passes.
pub fn eventually(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    eventually_explained(timeout, what, || if f() { Ok(()) } else { Err(String::new()) });
}

/// [`eventually`] for a check that says what it saw: the panic shows its last answer.
pub fn eventually_explained(timeout: Duration, what: &str, mut f: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    while Instant::now() < deadline {
        match f() {
            Ok(()) => return,
            Err(seen) => last = seen,
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let seen = if last.is_empty() { String::new() } else { format!("; last seen: {last}") };
    panic!("timed out after {timeout:?} waiting for: {what}{seen}");
}

pub fn alive_count(dump: &str) -> usize {
    dump.matches("state: ALIVE").count()
}

/// Starts three nodes as the seed page does: the first alone, the others joining it.
pub fn three_nodes(base: &Path, hosts: [&str; 3], port: u16) -> Vec<Broker> {
    let seed = format!("{}:{port}", hosts[0]);
    hosts
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let dir = base.join(format!("n{i}"));
            let join = if i == 0 { vec![] } else { vec![seed.clone()] };
            Broker::start(h, port, &dir, &join)
        })
        .collect()
}

/// Waits until the three nodes on `hosts` are ALIVE, then creates topic `t`
/// (replication factor 3) and group `g` bound to it.
pub fn create_topic_and_group(hosts: [&str; 3], port: u16) {
    eventually(Duration::from_secs(30), "3 ALIVE nodes", || {
        let o = cli(hosts[2], port, &["dump"]);
        o.status.success() && alive_count(&stdout(&o)) == 3
    });
    let o = cli(hosts[0], port, &["create-topic", "t", "--replication-factor", "3"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = cli(hosts[1], port, &["create-consumer-group", "g", "--bind", "t"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// The `grpc.health.v1` status of `service` on a node, if it answers.
pub fn health(host: &str, port: u16, service: &str) -> Option<i32> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://{host}:{port}")).ok()?.connect().await.ok()?;
        let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
        let req = tonic_health::pb::HealthCheckRequest { service: service.to_string() };
        client.check(req).await.ok().map(|r| r.into_inner().status)
    })
}

/// The data of each message `subscribe` printed, in order.
pub fn subscribe(host: &str, port: u16, group: &str, extra: &[&str]) -> Vec<String> {
    let mut args = vec!["subscribe", group];
    args.extend_from_slice(extra);
    let o = cli(host, port, &args);
    assert!(o.status.success(), "subscribe failed: {}", stderr(&o));
    stdout(&o)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
            for key in ["topic", "segment_id", "offset"] {
                assert!(v.get(key).is_some(), "{key} missing in {l}");
            }
            let data = v["message"]["data"].as_str().unwrap();
            use base64::Engine as _;
            String::from_utf8(base64::engine::general_purpose::STANDARD.decode(data).unwrap()).unwrap()
        })
        .collect()
}

/// A tmpfs mounted on a directory, unmounted when dropped (also when the test fails).
pub struct Tmpfs {
    pub dir: PathBuf,
}

impl Tmpfs {
    pub fn mount(dir: &Path, size: &str) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let o = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if !o.status.success() {
            return Err(format!("mount -t tmpfs on {}: {}", dir.display(), stderr(&o).trim()));
        }
        Ok(Tmpfs { dir: dir.to_path_buf() })
    }

    /// Bytes free, as `df` tells.
    pub fn available(&self) -> u64 {
        let o = Command::new("df").args(["-B1", "--output=avail"]).arg(&self.dir).output().unwrap();
        stdout(&o).lines().nth(1).and_then(|l| l.trim().parse().ok()).unwrap_or_else(|| panic!("{}", stdout(&o)))
    }

    pub fn resize(&self, size: &str) {
        let o = Command::new("mount").args(["-o", &format!("remount,size={size}")]).arg(&self.dir).output().unwrap();
        assert!(o.status.success(), "remount {}: {}", self.dir.display(), stderr(&o));
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount").arg(&self.dir).status().is_ok_and(|s| s.success());
        if !ok {
            // Still busy (a process that has not exited yet): detach it now, freed once idle.
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

/// The pika version the AMQP tests use.
pub const PIKA: &str = "pika>=1.3,<2";

/// A directory holding pika, installed with pip on first use.
pub fn pika_path() -> PathBuf {
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let dir = PathBuf::from(home).join(".cache/eventtermq/pylib");
    let has_pika = || {
        Command::new("python3").env("PYTHONPATH", &dir).args(["-c", "import pika"]).status().is_ok_and(|s| s.success())
    };
    if !has_pika() {
        let o = Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--target"])
            .arg(&dir)
            .arg(PIKA)
            // Debian's python3 refuses pip installs (PEP 668) unless told; --target
            // keeps it out of the system's packages anyway.
            .env("PIP_BREAK_SYSTEM_PACKAGES", "1")
            .output()
            .expect("python3 -m pip");
        assert!(o.status.success(), "pip install {PIKA} failed: {}", String::from_utf8_lossy(&o.stderr));
    }
    assert!(has_pika(), "pika not importable from {}", dir.display());
    dir
}
