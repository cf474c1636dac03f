//! `eventtermq bench control-plane`: starts three brokers (this very binary) on
//! loopback addresses and measures what the README reports. Results are printed as
//! JSON lines; nothing here asserts a timing.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use eventtermq_proto::v1 as pb;

use super::args::BenchCommand;
use super::commands::Ctx;
use super::{admin_client, CliError};

/// Bound on every wait of the benchmark (formation, failover, readiness).
const WAIT_MAX: Duration = Duration::from_secs(60);
const POLL_INTERVAL: Duration = Duration::from_millis(5);

pub async fn run(ctx: &Ctx, cmd: BenchCommand) -> Result<(), CliError> {
    match cmd {
        BenchCommand::ControlPlane { hosts, count, concurrency, bench_dir } => {
            if hosts.len() != 3 {
                return Err(CliError::Usage("--hosts: give exactly three addresses".into()));
            }
            let port: u16 =
                ctx.addr.rsplit_once(':').and_then(|(_, p)| p.parse().ok()).unwrap_or(crate::config::DEFAULT_PORT);
            let tmp;
            let dir = match bench_dir {
                Some(d) => d,
                None => {
                    tmp = std::env::temp_dir().join(format!("eventtermq-bench-{}", std::process::id()));
                    tmp.clone()
                }
            };
            let result = control_plane(&hosts, port, &dir, &ctx.namespace, count, concurrency).await;
            let _ = std::fs::remove_dir_all(&dir);
            result
        }
        BenchCommand::DataPath(args) => super::bench_data::run(ctx, args).await,
    }
}

pub(super) struct Proc {
    pub(super) child: Child,
    pub(super) host: String,
}

impl Proc {
    /// Fails when the broker exited, e.g. because another one already listens on its
    /// address (the bench would then measure that one).
    pub(super) fn check_running(&mut self) -> Result<(), CliError> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(CliError::Usage(format!(
                "the broker on {} exited ({status}); is another one listening there already?",
                self.host
            ))),
            Err(e) => Err(CliError::Usage(format!("broker on {}: {e}", self.host))),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(super) fn spawn(host: &str, port: u16, dir: &Path, join: Option<&str>, extra: &[String]) -> Result<Proc, CliError> {
    let exe = std::env::current_exe().map_err(|e| CliError::Usage(e.to_string()))?;
    let mut cmd = Command::new(exe);
    cmd.args(["--dir", &dir.to_string_lossy(), "--host", host, "--advertise-host", host, "--port", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(
            std::fs::create_dir_all(dir)
                .and_then(|()| std::fs::File::create(dir.with_extension("log")))
                .map(Stdio::from)
                .unwrap_or_else(|_| Stdio::null()),
        );
    if let Some(j) = join {
        cmd.args(["--join", j]);
    }
    cmd.args(extra);
    let child = cmd.spawn().map_err(|e| CliError::Usage(format!("cannot start broker: {e}")))?;
    Ok(Proc { child, host: host.to_string() })
}

async fn dump(addr: &str) -> Option<pb::DumpResponse> {
    let mut c = admin_client(addr).ok()?;
    c.dump(pb::DumpRequest { stale: true }).await.ok().map(|r| r.into_inner())
}

fn alive(d: &pb::DumpResponse) -> usize {
    d.state.as_ref().map(|s| s.nodes.iter().filter(|n| n.state == pb::NodeState::Alive as i32).count()).unwrap_or(0)
}

pub(super) async fn wait_alive(addr: &str, n: usize) -> Result<Duration, CliError> {
    let t0 = Instant::now();
    while t0.elapsed() < WAIT_MAX {
        if dump(addr).await.is_some_and(|d| alive(&d) >= n) {
            return Ok(t0.elapsed());
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
    Err(CliError::Usage(format!("{addr}: {n} ALIVE nodes not reached within {WAIT_MAX:?}")))
}

pub(super) fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU time (user + system) a process has used so far, in milliseconds; 0 when it is
/// gone. On a shared machine this tells whether a change saved work, where wall-clock
/// figures mostly tell how busy the neighbours were.
pub(super) fn cpu_ms(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0 };
    // Fields after the command name (which may hold spaces), from field 3 on.
    let Some((_, rest)) = stat.rsplit_once(')') else { return 0 };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    (ticks(11) + ticks(12)) * 1000 / CLOCK_TICKS_PER_S
}

/// `sysconf(_SC_CLK_TCK)`, which is 100 on every Linux architecture this runs on.
const CLOCK_TICKS_PER_S: u64 = 100;

async fn control_plane(
    hosts: &[String],
    port: u16,
    dir: &Path,
    namespace: &str,
    count: usize,
    concurrency: usize,
) -> Result<(), CliError> {
    let addr = |h: &str| format!("{h}:{port}");
    let seed = addr(&hosts[0]);
    let node_dir = |i: usize| -> PathBuf { dir.join(format!("n{i}")) };
    let mut procs = vec![spawn(&hosts[0], port, &node_dir(0), None, &[])?];
    wait_alive(&seed, 1).await?;
    procs.push(spawn(&hosts[1], port, &node_dir(1), Some(&seed), &[])?);
    wait_alive(&seed, 2).await?;
    procs.push(spawn(&hosts[2], port, &node_dir(2), Some(&seed), &[])?);
    let formation = wait_alive(&addr(&hosts[2]), 3).await?;
    for p in &mut procs {
        p.check_running()?;
    }
    println!(
        "{}",
        serde_json::json!({"bench": "formation", "third_start_to_3_alive_ms": formation.as_secs_f64() * 1e3})
    );

    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss: Vec<u64> = procs.iter().map(|p| rss_kib(p.child.id())).collect();
    println!("{}", serde_json::json!({"bench": "idle-rss", "rss_kib": rss}));

    create_topics(&addr(&hosts[1]), namespace, count, concurrency).await?;

    // Failover: kill -9 the leader, then write on a survivor until accepted.
    let leader = dump(&seed).await.map(|d| d.leader_id).unwrap_or(0);
    let mut leader_proc = None;
    for (i, h) in hosts.iter().enumerate() {
        if dump(&addr(h)).await.is_some_and(|d| d.node_id == leader) {
            leader_proc = Some(i);
        }
    }
    let li = leader_proc.ok_or_else(|| CliError::Usage("no leader found".into()))?;
    let survivor = addr(&procs[(li + 1) % 3].host);
    let mut client = admin_client(&survivor)?;
    let killed = procs.remove(li);
    let t0 = Instant::now();
    drop(killed); // SIGKILL
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let name = format!("failover-{}-{attempt}", std::process::id());
        let mut req = tonic::Request::new(pb::CreateNamespaceRequest { name });
        req.set_timeout(Duration::from_millis(500));
        if client.create_namespace(req).await.is_ok() {
            break;
        }
        if t0.elapsed() > WAIT_MAX {
            return Err(CliError::Usage("no write accepted after killing the leader".into()));
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
    println!(
        "{}",
        serde_json::json!({"bench": "failover", "kill9_leader_to_next_write_ms": t0.elapsed().as_secs_f64() * 1e3})
    );
    Ok(())
}

/// Creates `count` topics from `concurrency` concurrent clients against one node.
async fn create_topics(addr: &str, namespace: &str, count: usize, concurrency: usize) -> Result<(), CliError> {
    let run_id: u32 = rand::random();
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let mut client = admin_client(addr)?;
        let (next, ns) = (next.clone(), namespace.to_string());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    return Ok::<_, tonic::Status>(latencies);
                }
                let topic = pb::Topic {
                    name: format!("bench-{run_id:08x}-{i}"),
                    shards: 1,
                    replication_factor: 3,
                    default_exchange_type: "fanout".into(),
                    ..Default::default()
                };
                let t0 = Instant::now();
                client.create_topic(pb::CreateTopicRequest { namespace: ns.clone(), topic: Some(topic) }).await?;
                latencies.push(t0.elapsed());
            }
        }));
    }
    let mut latencies: Vec<Duration> = Vec::with_capacity(count);
    for t in tasks {
        let l = t.await.map_err(|e| CliError::Usage(e.to_string()))?.map_err(|s| CliError::from_status(s, addr))?;
        latencies.extend(l);
    }
    let elapsed = started.elapsed();
    latencies.sort();
    let pct = |p: f64| {
        let i = ((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1));
        latencies.get(i).copied().unwrap_or_default()
    };
    println!(
        "{}",
        serde_json::json!({
            "bench": "create-topic",
            "count": latencies.len(),
            "concurrency": concurrency,
            "per_second": (latencies.len() as f64 / elapsed.as_secs_f64()).round(),
            "p50_ms": pct(0.50).as_secs_f64() * 1e3,
            "p99_ms": pct(0.99).as_secs_f64() * 1e3,
        })
    );
    Ok(())
}
