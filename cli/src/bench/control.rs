//! `eventtermq bench control-plane`: formation, idle memory, create-topic latency and
//! throughput, leader fail-over.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use eventtermq_proto::v1 as pb;

use super::{dump, rss_kib, spawn, wait_alive, POLL_INTERVAL, WAIT_MAX};
use crate::{admin_client, CliError};

pub(super) async fn control_plane(
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
    let li = leader_proc.ok_or_else(|| CliError::Failed("no leader found".into()))?;
    let survivor = addr(&procs[(li + 1) % 3].host);
    let mut client = admin_client(&survivor, None)?;
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
            return Err(CliError::Failed("no write accepted after killing the leader".into()));
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
        let mut client = admin_client(addr, None)?;
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
        let l = t.await.map_err(|e| CliError::Failed(e.to_string()))?.map_err(|s| CliError::from_status(s, addr))?;
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
