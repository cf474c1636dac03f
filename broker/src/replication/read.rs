//! Reading segments: an open segment's confirmed records from its primary, a closed
//! segment from any node that holds a complete copy, locally when this node is one.
//!
//! A local sealed copy whose records fail their checksum is never served: the read goes
//! to another complete copy, and the damaged one is quarantined (set aside by the
//! store) when another exists, which makes the keeper report it lost and fetch it
//! again.

use std::time::Duration;

use eventtermq_storage::{Record, StorageError};

use super::{from_wire, lock, storage_error, Segments};
use crate::cluster_state::{SegmentId, SegmentRecord};
use crate::error::{ErrorCode, RequestError};
pub use crate::peers::ReadRequest;

/// Records read from a segment, and how far the segment is readable.
#[derive(Debug, Default)]
pub struct ReadResult {
    /// Where the read started: the request's `from`, or later when the records from
    /// there up to this offset were stored before the request's `since_unix_ms`.
    pub start: u64,
    pub records: Vec<Record>,
    /// Offset up to which the segment is readable now.
    pub end_offset: u64,
    /// The segment is closed and `end_offset` is final.
    pub closed: bool,
}

impl Segments {
    /// Serves a read from this node's copy: the primary of an open segment serves its
    /// confirmed records (waiting up to `wait` for more), a sealed copy serves all.
    pub async fn read_local(&self, id: SegmentId, req: ReadRequest) -> Result<ReadResult, RequestError> {
        let from = req.from;
        if let Some(primary) = self.primary(id) {
            let mut confirmed = primary.confirmed();
            if *confirmed.borrow() <= from {
                let _ = tokio::time::timeout(req.wait, confirmed.wait_for(|c| *c > from)).await;
            }
            let end = *confirmed.borrow();
            if end <= from {
                // Nothing new (the wait ended): no read, no trip to the blocking pool.
                return Ok(ReadResult { start: from, records: Vec::new(), end_offset: end, closed: false });
            }
            let reader = self.store().reader(id).map_err(storage_error)?;
            let (start, records) = blocking_read(reader, req, end).await?;
            return Ok(ReadResult { start, records, end_offset: end, closed: false });
        }
        match self.store().info(id) {
            Some(info) if info.sealed => {
                let reader = self.store().reader(id).map_err(storage_error)?;
                match read_blocking(reader, req, info.next_offset).await? {
                    Ok((start, records)) => {
                        Ok(ReadResult { start, records, end_offset: info.next_offset, closed: true })
                    }
                    Err(e @ StorageError::Corrupt { .. }) => {
                        self.corrupt_copy(id, req, &e).await;
                        Err(RequestError::new(
                            ErrorCode::CorruptCopy,
                            format!("segment_id: node {}'s copy of segment {id} is damaged: {e}", self.cluster().id),
                        ))
                    }
                    Err(e) => Err(storage_error(e)),
                }
            }
            Some(info) => self.read_partial_copy(id, info.next_offset, req).await,
            None => Err(RequestError::new(
                ErrorCode::NotReady,
                format!("segment_id: segment {id} has no readable copy on node {}", self.cluster().id),
            )),
        }
    }

    /// Serves the records an unsealed copy of a *closed* segment holds below the
    /// agreed end: every copy of a segment is a prefix of the one log its primary
    /// wrote, so a shorter copy (a replica that was behind, a copy being fetched) has
    /// the same records as the complete ones, and can stand in when those are damaged
    /// or unreachable. Answers `closed: false` with its own end: a reader must not take
    /// it for the segment's end.
    async fn read_partial_copy(
        &self,
        id: SegmentId,
        local_next: u64,
        req: ReadRequest,
    ) -> Result<ReadResult, RequestError> {
        let from = req.from;
        let agreed_next = {
            let st = self.cluster().state.read();
            st.state.segments.get(&id).filter(|s| !s.is_open()).map(|s| s.next_offset)
        };
        let end = match agreed_next {
            Some(agreed) if from < local_next.min(agreed) => local_next.min(agreed),
            _ => {
                return Err(RequestError::new(
                    ErrorCode::NotReady,
                    format!("segment_id: node {} holds no readable record {from} of segment {id}", self.cluster().id),
                ))
            }
        };
        let reader = self.store().reader(id).map_err(storage_error)?;
        let (start, records) = blocking_read(reader, req, end).await?;
        Ok(ReadResult { start, records, end_offset: end, closed: false })
    }

    /// Reads a segment from wherever a readable copy is: locally if this node is its
    /// primary or holds a sealed copy, else from the primary (open) or a node in
    /// `done` (closed).
    pub async fn read(&self, id: SegmentId, seg: &SegmentRecord, req: ReadRequest) -> Result<ReadResult, RequestError> {
        let me = self.cluster().id;
        let local_ok = if seg.is_open() {
            self.primary(id).is_some()
        } else {
            seg.done.contains(&me)
                && self.store().info(id).is_some_and(|i| i.sealed && i.next_offset == seg.next_offset)
        };
        if local_ok {
            match self.read_local(id, req).await {
                // Not served; another complete copy may have the records.
                Err(e) if e.code == ErrorCode::CorruptCopy => {}
                r => return r,
            }
        }
        let candidates: Vec<u64> = if seg.is_open() {
            vec![seg.primary]
        } else {
            // Live nodes first; this node's own copy is not (yet) complete.
            let st = self.cluster().state.read();
            let mut c: Vec<u64> = seg.done.iter().copied().filter(|n| *n != me).collect();
            c.sort_by_key(|n| !st.state.node_alive(*n));
            c
        };
        let mut last_err =
            RequestError::new(ErrorCode::NotReady, format!("segment_id: segment {id} has no readable copy yet"));
        match self.read_from(id, &candidates, req).await {
            Ok(r) => return Ok(r),
            Err(e) => last_err = e.unwrap_or(last_err),
        }
        if seg.is_open() {
            return Err(last_err);
        }
        // No complete copy could serve it: a shorter copy may hold the record, here or
        // on a replica that is not done (see `read_partial_copy`).
        if !local_ok && self.store().info(id).is_some() {
            if let Ok(r) = self.read_local(id, req.waiting(Duration::ZERO)).await {
                return Ok(r);
            }
        }
        let partial: Vec<u64> = seg.replicas.iter().copied().filter(|n| *n != me && !seg.done.contains(n)).collect();
        match self.read_from(id, &partial, req.waiting(Duration::ZERO)).await {
            Ok(r) => Ok(r),
            Err(e) => Err(e.unwrap_or(last_err)),
        }
    }

    /// Asks `nodes` in turn; the first answer with records (or the first answer at all)
    /// wins. `Err(None)`: nobody to ask.
    async fn read_from(
        &self,
        id: SegmentId,
        nodes: &[u64],
        req: ReadRequest,
    ) -> Result<ReadResult, Option<RequestError>> {
        let mut last_err = None;
        for &node in nodes {
            let Ok(addr) = self.node_addr(node) else { continue };
            match self.peers().read_segment(node, &addr, id, req).await {
                Ok(r) => {
                    return Ok(ReadResult {
                        // A node that knows no time bound answers 0: it read from `from`.
                        start: r.from_offset.max(req.from),
                        records: r.records.into_iter().map(from_wire).collect(),
                        end_offset: r.end_offset,
                        closed: r.closed,
                    });
                }
                Err(e) => {
                    let msg = format!("reading segment {id} from node {node}: {e}");
                    last_err = Some(RequestError::new(ErrorCode::NotReady, msg))
                }
            }
        }
        Err(last_err)
    }

    /// A read of this node's sealed copy of `id` failed its checksum (`err`). Sets the
    /// copy aside when another node has a complete one: the keeper then reports it
    /// lost and fetches it again. The only complete copy is kept: setting it aside
    /// would make its good records unreadable too, with nothing to replace them.
    async fn corrupt_copy(&self, id: SegmentId, req: ReadRequest, err: &StorageError) {
        // Concurrent reads of the damaged copy all come here, and by now one of them may
        // have replaced it: only a copy that still fails is set aside.
        let still_damaged = match (self.store().info(id), self.store().reader(id)) {
            (Some(info), Ok(reader)) if info.sealed => {
                matches!(read_blocking(reader, req, info.next_offset).await, Ok(Err(StorageError::Corrupt { .. })))
            }
            _ => false,
        };
        if !still_damaged {
            return;
        }
        let me = self.cluster().id;
        let other_copy = {
            let st = self.cluster().state.read();
            st.state.segments.get(&id).is_some_and(|s| !s.is_open() && s.done.iter().any(|n| *n != me))
        };
        if !other_copy {
            if lock(&self.inner.corrupt_kept).insert(id) {
                tracing::error!(segment_id = id, error = %err,
                    "this node's copy of a segment is damaged and no other node has a complete one: \
                     keeping it for an operator (its damaged records are not served)");
            }
            return;
        }
        lock(&self.inner.corrupt_kept).remove(&id);
        match self.store().quarantine(id, &err.to_string()) {
            Ok(_) => tracing::warn!(
                segment_id = id,
                "damaged local copy set aside; reading from another copy and fetching a good one"
            ),
            Err(e) => tracing::warn!(segment_id = id, error = %e, "setting a damaged local copy aside failed"),
        }
    }
}

async fn blocking_read(
    reader: eventtermq_storage::SegmentReader,
    req: ReadRequest,
    until: u64,
) -> Result<(u64, Vec<Record>), RequestError> {
    read_blocking(reader, req, until).await?.map_err(storage_error)
}

/// Reads off the async runtime (see [`ReadRequest`]): where the read started, and the
/// records from there below `until`. The outer error is the blocking task's, the
/// inner the storage's.
async fn read_blocking(
    reader: eventtermq_storage::SegmentReader,
    req: ReadRequest,
    until: u64,
) -> Result<Result<(u64, Vec<Record>), StorageError>, RequestError> {
    crate::clock::spawn_blocking(move || {
        let start = match req.since_unix_ms {
            since if since > 0 && req.from < until => reader.offset_for_time(since)?.clamp(req.from, until),
            _ => req.from,
        };
        Ok((start, reader.read(start, until, req.max_bytes)?))
    })
    .await
    .map_err(|e| RequestError::new(ErrorCode::Internal, e.to_string()))
}
