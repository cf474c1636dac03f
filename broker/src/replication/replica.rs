//! The replica side of a segment: records streamed by the primary are appended in the
//! order received and fsynced in groups; each fsync is answered with the offset below
//! which everything is durable here.

use std::time::Duration;

use eventtermq_proto::internal::v1::{ReplicateRequest, ReplicateResponse, SegmentStatusResponse};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use super::{from_wire, lock, storage_error, Segments};
use crate::cluster_state::SegmentId;
use crate::error::{ErrorCode, RequestError};

/// How long a replica waits for the cluster state to show a segment it is asked to
/// replicate (the primary may learn of the segment a moment before this node does).
const STATE_WAIT: Duration = Duration::from_secs(2);

/// How often an idle replication stream checks whether its segment was closed.
const CLOSED_CHECK_INTERVAL: Duration = Duration::from_secs(1);

pub type ReplicateStream = ReceiverStream<Result<ReplicateResponse, Status>>;

/// Serves one replication stream from a primary.
pub async fn handle_replicate(
    segments: Segments,
    mut inbound: Streaming<ReplicateRequest>,
) -> Result<ReplicateStream, Status> {
    let first = inbound.message().await?.ok_or_else(|| Status::invalid_argument("empty replication stream"))?;
    let id = first.segment_id;
    wait_until_replica(&segments, id).await?;
    if segments.is_frozen(id) {
        return Err(frozen(id).into());
    }
    let writer = segments.writer(id)?;
    let syncer = lock(&writer).syncer();
    let durable = {
        let s = syncer.clone();
        tokio::task::spawn_blocking(move || s.sync())
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(storage_error)?
    };
    let (out_tx, out_rx) = mpsc::channel(16);
    let _ = out_tx.send(Ok(ReplicateResponse { durable_offset: durable })).await;

    // One task appends what arrives and keeps one fsync in flight (group commit):
    // records that arrive during an fsync are fsynced together by the next one. Each
    // fsync is answered with the offset below which everything is durable here.
    tokio::spawn(async move {
        let mut durable = durable;
        let mut written = durable;
        let mut sync_task: Option<tokio::task::JoinHandle<Result<u64, eventtermq_storage::StorageError>>> = None;
        loop {
            if sync_task.is_none() && written > durable {
                let s = syncer.clone();
                sync_task = Some(tokio::task::spawn_blocking(move || s.sync()));
            }
            tokio::select! {
                r = async { sync_task.as_mut().expect("guarded").await }, if sync_task.is_some() => {
                    sync_task = None;
                    match r {
                        Ok(Ok(d)) => durable = d,
                        Ok(Err(e)) => {
                            let _ = out_tx.send(Err(storage_error(e).into())).await;
                            return;
                        }
                        Err(_) => return,
                    }
                    if out_tx.send(Ok(ReplicateResponse { durable_offset: durable })).await.is_err() {
                        return;
                    }
                }
                // A primary that died mid-stream may leave the connection hanging: stop
                // holding the writer once the segment is closed, so it can be sealed.
                m = tokio::time::timeout(CLOSED_CHECK_INTERVAL, inbound.message()) => {
                    let msg = match m {
                        Ok(Ok(Some(m))) => m,
                        Ok(_) => return,
                        Err(_) => {
                            let open = segments.cluster().state.read().state.segments.get(&id).is_some_and(|s| s.is_open());
                            if open && !segments.is_frozen(id) {
                                continue;
                            }
                            return;
                        }
                    };
                    if segments.is_frozen(id) {
                        let _ = out_tx.send(Err(frozen(id).into())).await;
                        return;
                    }
                    if msg.records.is_empty() {
                        continue;
                    }
                    let records: Vec<_> = msg.records.into_iter().map(from_wire).collect();
                    let appended = {
                        let mut w = lock(&writer);
                        w.append_records(&records).map(|()| w.next_offset())
                    };
                    match appended {
                        Ok(end) => written = end,
                        Err(e) => {
                            let _ = out_tx.send(Err(storage_error(e).into())).await;
                            return;
                        }
                    }
                }
            }
        }
    });
    Ok(ReceiverStream::new(out_rx))
}

fn frozen(id: SegmentId) -> RequestError {
    RequestError::new(ErrorCode::SegmentClosed, format!("segment {id} is being failed over; it takes no more records"))
}

/// Waits until this node's state shows `id` open with this node among its replicas.
async fn wait_until_replica(segments: &Segments, id: SegmentId) -> Result<(), RequestError> {
    let me = segments.cluster().id;
    let deadline = tokio::time::Instant::now() + STATE_WAIT;
    loop {
        {
            let st = segments.cluster().state.read();
            match st.state.segments.get(&id) {
                Some(s) if !s.is_open() => return Err(frozen(id)),
                Some(s) if s.replicas.contains(&me) && s.primary != me => return Ok(()),
                Some(_) => {
                    return Err(RequestError::new(
                        ErrorCode::NotPrimary,
                        format!("segment_id: node {me} is not a replica of segment {id}"),
                    ))
                }
                None => {}
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(RequestError::new(
                ErrorCode::SegmentNotFound,
                format!("segment_id: segment {id} is unknown here"),
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What this node holds of a segment; with `freeze`, it first stops taking records.
pub async fn status(segments: &Segments, id: SegmentId, freeze: bool) -> Result<SegmentStatusResponse, RequestError> {
    if freeze {
        segments.freeze(id);
    }
    let writer = lock(&segments.inner.writers).get(&id).cloned();
    if let Some(w) = writer {
        let s = tokio::task::spawn_blocking(move || {
            let mut w = lock(&w);
            w.sync().map(|next| (next, w.size_bytes()))
        })
        .await
        .map_err(|e| RequestError::new(ErrorCode::Internal, e.to_string()))?;
        let (next_offset, size_bytes) = s.map_err(storage_error)?;
        return Ok(SegmentStatusResponse { exists: true, next_offset, size_bytes, checksum: 0 });
    }
    Ok(match segments.store().info(id) {
        Some(info) => SegmentStatusResponse {
            exists: true,
            next_offset: info.next_offset,
            size_bytes: info.size_bytes,
            checksum: if info.sealed { info.checksum } else { 0 },
        },
        None => SegmentStatusResponse { exists: false, next_offset: 0, size_bytes: 0, checksum: 0 },
    })
}
