//! `eventtermq bench`: starts three brokers (this very binary) on loopback addresses
//! and measures what the README reports: [`control`] the control plane, [`data`] the
//! data path, [`scale`] the cost of many topics, groups and subscribers, [`clients`] many
//! publishers and subscribers at once. Results are printed as JSON lines; nothing here asserts a timing. This
//! module holds what both share: starting and watching broker processes.

mod clients;
mod control;
mod data;
mod scale;
mod scrape;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use eventtermq_proto::v1 as pb;

use super::args::BenchCommand;
use super::Ctx;
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
                ctx.addr.rsplit_once(':').and_then(|(_, p)| p.parse().ok()).unwrap_or(eventtermq_api::defaults::PORT);
            let tmp;
            let dir = match bench_dir {
                Some(d) => d,
                None => {
                    tmp = std::env::temp_dir().join(format!("eventtermq-bench-{}", std::process::id()));
                    tmp.clone()
                }
            };
            let lock = lock_bench_dir(&dir)?;
            let result = control::control_plane(&hosts, port, &dir, &ctx.namespace, count, concurrency).await;
            let _ = std::fs::remove_dir_all(&dir);
            drop(lock);
            result
        }
        BenchCommand::Scale(args) => {
            let _lock = args.brokers.bench_dir.as_deref().map(lock_bench_dir).transpose()?;
            scale::run(ctx, args).await
        }
        BenchCommand::Clients(args) => {
            let _lock = args.brokers.bench_dir.as_deref().map(lock_bench_dir).transpose()?;
            clients::run(ctx, args).await
        }
        BenchCommand::DataPath(args) => {
            // Without --bench-dir the run makes a directory named after its own PID.
            let _lock = args.bench_dir.as_deref().map(lock_bench_dir).transpose()?;
            data::run(ctx, args).await
        }
    }
}

/// Makes `dir` this run's own before anything in it is touched: a second run with the
/// same `--bench-dir` would otherwise start brokers on a running bench's data and
/// remove the directory under it when done. (The brokers lock their own directories
/// inside it too.)
fn lock_bench_dir(dir: &Path) -> Result<eventtermq_storage::durable::DirLock, CliError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| CliError::Failed(format!("--bench-dir: cannot create {}: {e}", dir.display())))?;
    eventtermq_storage::durable::lock_dir(&eventtermq_storage::fs::RealFs, dir)
        .map_err(|e| CliError::Failed(format!("--bench-dir: {e}")))
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
            Ok(Some(status)) => Err(CliError::Failed(format!(
                "the broker on {} exited ({status}); is another one listening there already?",
                self.host
            ))),
            Err(e) => Err(CliError::Failed(format!("broker on {}: {e}", self.host))),
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
    let exe = std::env::current_exe().map_err(|e| CliError::Failed(e.to_string()))?;
    spawn_binary(&exe, host, port, dir, join, extra)
}

/// [`spawn`] with another broker binary (a bench comparing builds).
pub(super) fn spawn_binary(
    exe: &Path,
    host: &str,
    port: u16,
    dir: &Path,
    join: Option<&str>,
    extra: &[String],
) -> Result<Proc, CliError> {
    let mut cmd = Command::new(exe);
    cmd.args(["--dir", &dir.to_string_lossy(), "--host", host, "--advertise-host", host, "--port", &port.to_string()])
        // Its own brokers, on loopback addresses of this machine.
        .arg("--insecure-trusted-network")
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
    let child = cmd.spawn().map_err(|e| CliError::Failed(format!("cannot start broker: {e}")))?;
    Ok(Proc { child, host: host.to_string() })
}

pub(super) async fn dump(addr: &str) -> Option<pb::DumpResponse> {
    let mut c = admin_client(addr, None).ok()?;
    c.dump(pb::DumpRequest { stale: true, ..Default::default() }).await.ok().map(|r| r.into_inner())
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
    Err(CliError::Failed(format!("{addr}: {n} ALIVE nodes not reached within {WAIT_MAX:?}")))
}

/// Three brokers, the first founding the cluster and the others joining it, on
/// `hosts` at `port` (AMQP on `port` + 1, metrics on `port` + 2, then the
/// `--broker-arg`s), data under `dir/n0`..`n2`; `--broker-binary` or this executable.
/// Returns once all three are ALIVE.
pub(super) async fn start_three(
    brokers: &crate::args::BenchBrokers,
    hosts: &[String],
    port: u16,
    dir: &Path,
) -> Result<Three, CliError> {
    let exe = match &brokers.broker_binary {
        Some(b) => b.clone(),
        None => std::env::current_exe().map_err(|e| CliError::Failed(e.to_string()))?,
    };
    let mut extra =
        vec![format!("--amqp-port={}", port.saturating_add(1)), format!("--metrics-port={}", port.saturating_add(2))];
    extra.extend(brokers.broker_args.iter().cloned());
    let addrs: Vec<String> = hosts.iter().map(|h| format!("{h}:{port}")).collect();
    let dirs: Vec<PathBuf> = (0..3).map(|i| dir.join(format!("n{i}"))).collect();
    let mut procs = Vec::new();
    for (i, h) in hosts.iter().enumerate() {
        procs.push(spawn_binary(&exe, h, port, &dirs[i], (i > 0).then_some(addrs[0].as_str()), &extra)?);
        wait_alive(&addrs[0], i + 1).await?;
    }
    wait_alive(&addrs[2], 3).await?;
    for p in &mut procs {
        p.check_running()?;
    }
    Ok(Three { exe, extra, procs, addrs, dirs })
}

/// What [`start_three`] started.
pub(super) struct Three {
    /// The broker binary and the flags every broker got besides its own.
    pub exe: PathBuf,
    pub extra: Vec<String>,
    pub procs: Vec<Proc>,
    pub addrs: Vec<String>,
    pub dirs: Vec<PathBuf>,
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
