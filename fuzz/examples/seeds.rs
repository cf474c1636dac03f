//! Writes the seed corpora in `fuzz/seeds/<target>/` from real encodings (entries, meta
//! files, a built snapshot, Raft RPCs, gossip sync payloads and datagrams of a live
//! two-node cluster, segment files of a real store). Run from `fuzz/` with
//! `cargo run --example seeds` after changing a format; the output is committed.
//! `cargo run --example seeds -- storage` rewrites only the segment store's seeds.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use eventtermq_broker::clock::Clock;
use eventtermq_broker::cluster_state::raft::encode;
use eventtermq_broker::cluster_state::{
    Command, CommandResponse, ConsumerGroupSpec, ExchangeType, NodeRecord, NodeState, StateMachineStore, TopicSpec,
    TypeConfig,
};
use eventtermq_broker::error::{ErrorCode, RequestError};
use eventtermq_broker::membership::{Membership, MembershipConfig};
use eventtermq_broker::transport::mem::MemNetwork;
use eventtermq_broker::transport::Network;
use eventtermq_storage::durable::encode_record;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
use openraft::{BasicNode, CommittedLeaderId, EntryPayload, LogId, Vote};
use tokio_util::sync::CancellationToken;

type Entry = openraft::Entry<TypeConfig>;

fn log_id(term: u64, index: u64) -> LogId<u64> {
    LogId::new(CommittedLeaderId::new(term, 1), index)
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_record(payload, &mut out).expect("seed payloads are small");
    out
}

fn cat(mode: u8, parts: &[&[u8]]) -> Vec<u8> {
    let mut out = vec![mode];
    out.extend(parts.join(&b"\0\0|"[..]));
    out
}

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new("seeds").join(target);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join(name), bytes).unwrap();
}

fn commands() -> Vec<Command> {
    let spec = TopicSpec {
        shards: 3,
        replication_factor: 2,
        retention_ms: 86_400_000,
        default_exchange_type: ExchangeType::Topic,
        segment_size_max_bytes: 0,
        min_insync_replicas: 0,
    ..Default::default()
    };
    vec![
        Command::CreateNamespace { name: "orders".into() },
        Command::CreateTopic { namespace: "orders".into(), name: "created".into(), spec },
        Command::CreateConsumerGroup {
            namespace: "orders".into(),
            name: "billing".into(),
            spec: ConsumerGroupSpec { bindings: vec![], size: 2, since_unix_ms: 1_700_000_000_000, ..Default::default() },
        },
        Command::SetNode { id: 2, record: NodeRecord { address: "10.0.0.2:7000".into(), state: NodeState::Alive } },
        Command::DeleteTopic { namespace: "orders".into(), name: "created".into() },
        Command::RemoveNode { id: 2 },
        Command::DeleteNamespace { name: "orders".into(), cascade: true },
    ]
}

fn entries() -> Vec<Entry> {
    let nodes: BTreeMap<u64, BasicNode> = (1..=3).map(|i| (i, BasicNode::new(format!("10.0.0.{i}:7000")))).collect();
    let membership = openraft::Membership::new(vec![BTreeSet::from([1, 2, 3])], nodes);
    let mut out = vec![
        Entry { log_id: log_id(1, 0), payload: EntryPayload::Blank },
        Entry { log_id: log_id(1, 1), payload: EntryPayload::Membership(membership) },
    ];
    for (i, cmd) in commands().into_iter().enumerate() {
        out.push(Entry { log_id: log_id(2, i as u64 + 2), payload: EntryPayload::Normal(cmd) });
    }
    out
}

/// Records the datagrams a node sends.
struct Recorder {
    inner: Arc<dyn Network>,
    sent: Arc<Mutex<Vec<Bytes>>>,
}

impl Network for Recorder {
    fn channel(&self, addr: &str) -> tonic::transport::Channel {
        self.inner.channel(addr)
    }
    fn data_channel(&self, addr: &str) -> tonic::transport::Channel {
        self.inner.data_channel(addr)
    }
    fn send_datagram(&self, addr: &str, data: Bytes) {
        self.sent.lock().unwrap().push(data.clone());
        self.inner.send_datagram(addr, data);
    }
}

/// Seeds of the segment store targets: frames, index entries, trailers and whole segment
/// directories written by a real `Store`.
fn storage_seeds() {
    use eventtermq_storage::codec::{encode_header, encode_trailer, FileHeader, FileKind, SealTrailer};
    use eventtermq_storage::{Config, Store};

    for t in ["storage_record", "storage_index", "storage_segment_open"] {
        let _ = fs::remove_dir_all(Path::new("seeds").join(t));
    }
    let interval = 64u32;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), Config { index_interval_bytes: interval, ..Config::default() }).unwrap();
    let mut w = store.create(7).unwrap();
    let payloads: Vec<Bytes> = (0..12u8).map(|i| Bytes::from(vec![b'a' + i; 5 + 9 * i as usize])).collect();
    w.append(1_700_000_000_000, &payloads[..5]).unwrap();
    w.append(1_700_000_000_100, &payloads[5..]).unwrap();
    w.sync().unwrap();
    let seg_name = format!("{:020}.seg", 7);
    let idx_name = format!("{:020}.idx", 7);
    let open_seg = fs::read(dir.path().join(&seg_name)).unwrap();
    let open_idx = fs::read(dir.path().join(&idx_name)).unwrap();
    w.seal().unwrap();
    let sealed_seg = fs::read(dir.path().join(&seg_name)).unwrap();
    let sealed_idx = fs::read(dir.path().join(&idx_name)).unwrap();
    let header_len = eventtermq_storage::codec::FILE_HEADER_LEN;
    let trailer_len = eventtermq_storage::codec::TRAILER_LEN;

    // storage_record
    let frames = &open_seg[header_len..];
    write("storage_record", "frames", &cat(0, &[frames]));
    write("storage_record", "torn", &cat(0, &[&frames[..frames.len() - 7]]));
    write("storage_record", "lines", &cat(1, &[b"first\nsecond message\n\nlast"]));

    // storage_index
    write("storage_index", "entries", &cat(0, &[&open_idx[header_len..]]));
    write("storage_index", "trailer", &cat(0, &[&sealed_seg[sealed_seg.len() - trailer_len..]]));
    write("storage_index", "header", &cat(0, &[&open_seg[..header_len]]));
    let mut values = Vec::new();
    encode_header(&mut values, &FileHeader { kind: FileKind::Index, segment_id: 7, nonce: 42 });
    encode_trailer(&mut values, &SealTrailer { nonce: 42, record_count: 3, records_len: 99, checksum: 5 });
    write("storage_index", "values", &cat(1, &[&values]));

    // storage_segment_open: the mode's bits 3-7 are the index interval / 16.
    let m = (interval / 16) as u8 * 8;
    write("storage_segment_open", "open", &cat(m, &[&open_seg, &open_idx]));
    write("storage_segment_open", "open_no_index", &cat(m, &[&open_seg]));
    write("storage_segment_open", "torn", &cat(m, &[&open_seg[..open_seg.len() - 11], &open_idx]));
    write("storage_segment_open", "sealed", &cat(m, &[&sealed_seg, &sealed_idx]));
    write("storage_segment_open", "sealed_no_index", &cat(m, &[&sealed_seg]));
    write("storage_segment_open", "built", &cat(m | 1, &[b"one\ntwo\nthree\nfour"]));
    write("storage_segment_open", "built_sealed", &cat(m | 3, &[b"one\ntwo\nthree\nfour"]));
    write("storage_segment_open", "built_sealed_index", &cat(m | 7, &[b"one\ntwo\nthree", &open_idx[header_len..]]));
}

#[tokio::main]
async fn main() {
    if std::env::args().any(|a| a == "storage") {
        storage_seeds();
        println!("storage seeds written to fuzz/seeds/");
        return;
    }
    let _ = fs::remove_dir_all("seeds");
    storage_seeds();
    let entries = entries();
    let jsons: Vec<Vec<u8>> = entries.iter().map(|e| serde_json::to_vec(e).unwrap()).collect();
    let log: Vec<u8> = jsons.iter().flat_map(|j| frame(j)).collect();

    // log_record
    write("log_record", "log", &cat(0, &[&log]));
    write("log_record", "torn", &cat(0, &[&log[..log.len() - 5]]));
    write("log_record", "lines", &cat(1, &[&jsons.join(&b'\n')]));

    // log_meta
    let vote = serde_json::to_vec(&Some(Vote::new_committed(4, 2))).unwrap();
    let committed = serde_json::to_vec(&Some(log_id(2, 6))).unwrap();
    let purged = serde_json::to_vec(&Some(log_id(1, 1))).unwrap();
    write("log_meta", "vote", &cat(0, &[&frame(&vote)]));
    write("log_meta", "committed", &cat(0, &[&frame(&committed)]));
    write("log_meta", "none", &cat(0, &[&frame(b"null")]));
    write("log_meta", "vote_json", &cat(1, &[&vote]));
    write("log_meta", "uncommitted_vote_json", &cat(1, &[&serde_json::to_vec(&Some(Vote::new(3, 1))).unwrap()]));

    // log_store_open
    write("log_store_open", "all", &cat(0, &[&log, &frame(&vote), &frame(&committed), &frame(&purged)]));
    write("log_store_open", "log_only", &cat(0, &[&log]));
    write("log_store_open", "lines", &cat(3, &[&jsons.join(&b'\n'), &vote, &committed]));

    // snapshot_file, snapshot_open: a real snapshot of a state built from the entries.
    let dir = tempfile::tempdir().unwrap();
    let (mut sm, _) = StateMachineStore::open(dir.path()).await.unwrap();
    sm.apply(entries.clone().into_iter().take(5)).await.unwrap();
    let snap = sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
    let file = fs::read(dir.path().join("snapshot")).unwrap();
    let json = snap.snapshot.get_ref().clone();
    for t in ["snapshot_file", "snapshot_open"] {
        write(t, "file", &cat(0, &[&file]));
        write(t, "json", &cat(1, &[&json]));
    }

    // raft_rpc
    let vote_req = VoteRequest::new(Vote::new(3, 2), Some(log_id(2, 8)));
    let append = AppendEntriesRequest::<TypeConfig> {
        vote: Vote::new_committed(2, 1),
        prev_log_id: Some(log_id(1, 1)),
        entries: entries[2..].to_vec(),
        leader_commit: Some(log_id(2, 4)),
    };
    let install = InstallSnapshotRequest::<TypeConfig> {
        vote: Vote::new_committed(2, 1),
        meta: snap.meta.clone(),
        offset: 0,
        data: json.clone(),
        done: true,
    };
    let rpcs: Vec<(u8, &str, Vec<u8>)> = vec![
        (0, "append", encode(&append)),
        (0, "heartbeat", encode(&AppendEntriesRequest::<TypeConfig> { entries: vec![], ..append.clone() })),
        (1, "vote", encode(&vote_req)),
        (2, "install", encode(&install)),
        (4, "append_ok", encode(&Ok::<_, openraft::error::RaftError<u64>>(AppendEntriesResponse::<u64>::Success))),
        (
            4,
            "append_conflict",
            encode(&Ok::<_, openraft::error::RaftError<u64>>(AppendEntriesResponse::<u64>::Conflict)),
        ),
        (
            5,
            "vote_reply",
            encode(&Ok::<_, openraft::error::RaftError<u64>>(VoteResponse::new(
                Vote::new(3, 2),
                Some(log_id(2, 8)),
                true,
            ))),
        ),
        (
            6,
            "install_reply",
            encode(&Ok::<_, openraft::error::RaftError<u64, openraft::error::InstallSnapshotError>>(
                InstallSnapshotResponse { vote: Vote::new_committed(2, 1) },
            )),
        ),
        (7, "write_ok", encode(&Ok::<_, RequestError>(CommandResponse { index: 9, result: Ok(()) }))),
        (7, "write_err", encode(&Err::<CommandResponse, _>(RequestError::new(ErrorCode::NoLeader, "not the leader")))),
    ];
    for (kind, name, bytes) in &rpcs {
        write("raft_rpc", name, &cat(*kind, &[bytes]));
    }
    for (i, cmd) in commands().iter().enumerate() {
        write("raft_rpc", &format!("command{i}"), &cat(3, &[&encode(cmd)]));
    }

    // gossip_sync, gossip_membership: a live two-node cluster on the in-memory network.
    let net = MemNetwork::new();
    let sent = Arc::new(Mutex::new(Vec::new()));
    let config =
        MembershipConfig { probe_period_ms: 100, probe_rtt_ms: 40, suspect_to_down_ms: 500, ..Default::default() };
    let shutdown = CancellationToken::new();
    let mut nodes = Vec::new();
    for (id, addr) in [(1u64, "n1:7000"), (2, "n2:7000")] {
        let (inner, listeners) = net.attach(addr);
        let network = Arc::new(Recorder { inner, sent: sent.clone() });
        let peers = eventtermq_broker::peers::Peers::new(network, Default::default());
        nodes.push(Membership::start(
            id,
            addr.into(),
            config.clone(),
            &Clock::System,
            peers,
            listeners.datagrams,
            shutdown.clone(),
        ));
    }
    let alone = nodes[1].handle_sync(Bytes::new()).await.unwrap();
    let merged = nodes[0].handle_sync(alone.clone()).await.unwrap();
    nodes[1].handle_sync(merged.clone()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    nodes[1].leave().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after_leave = nodes[0].handle_sync(Bytes::new()).await.unwrap();
    shutdown.cancel();
    write("gossip_sync", "one", &alone);
    write("gossip_sync", "two", &merged);
    write("gossip_sync", "left", &after_leave);

    let chunk = |kind: u8, b: &[u8]| {
        let mut v = vec![kind];
        v.extend_from_slice(&(b.len() as u16).to_le_bytes());
        v.extend_from_slice(b);
        v
    };
    let sent = sent.lock().unwrap().clone();
    let mut all = chunk(1, &merged);
    for (i, d) in sent.iter().enumerate() {
        if i < 24 {
            write("gossip_membership", &format!("datagram{i}"), &chunk(0, d));
        }
        all.extend(chunk(0, d));
    }
    write("gossip_membership", "sync_then_datagrams", &all);
    write("gossip_membership", "sync_left", &chunk(1, &after_leave));
    println!("{} gossip datagrams recorded; seeds written to fuzz/seeds/", sent.len());
}
