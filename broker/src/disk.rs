//! The free-space watermark of a node's data directory, as RabbitMQ's disk alarm and
//! Kafka's log-dir failure handling do it: below the watermark the node takes no more
//! segment data (publishes on its primaries, records from other primaries, fetched
//! copies), before any write fails for want of space. Raft (small writes: commands,
//! votes, snapshots of the cluster state) keeps the room under the watermark, so the
//! cluster state keeps working while data writes are refused.
//!
//! - [`Watermark`] and [`Level`] are the pure decisions: where the watermark is, and
//!   whether a node is low (with hysteresis, so that the little space a node gives back
//!   once it stops writing, a sealed segment's reserve, does not flip it back and forth).
//! - [`Disk`] is the node's shared view: atomics the data path reads on every write
//!   (one load each, no system call), charged with what is written, and refreshed from
//!   `statvfs` every [`CHECK_INTERVAL`] by [`watch`] (every [`IDLE_CHECK_INTERVAL`]
//!   while nothing is written), which also logs each crossing and
//!   reports it in the cluster state, where placement and the primaries of other nodes
//!   see it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::cluster::Cluster;
use crate::cluster_state::{Command, DiskLow, NodeId};
use crate::error::{ErrorCode, RequestError};

/// How often the free space is read. At the fastest write rate measured (W1: about
/// 117 MB/s per node) this is about 12 MB between two reads; writes in between are
/// charged against the last reading, so the watermark holds anyway.
pub const CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// How often the free space is read while this node writes no segment data, is above
/// its watermark and its report is in the cluster state: only something else filling
/// the filesystem can move it then. The first write after such a pause reads it at
/// once. An idle node's wake-ups cost CPU (see bench/scale.md), so it does not read
/// ten times a second for nothing.
pub const IDLE_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// How often the reported state is compared with the cluster state when nothing
/// crossed (a report that failed, e.g. without a leader, is retried this often).
const REPORT_RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// Once low, a node is back above only with this much more than its watermark
/// (percent of it, and at least [`RECOVERY_MARGIN_MIN_BYTES`]): stopping to write
/// gives some space back (a sealed segment returns its preallocated reserve, up to 1 MiB by
/// default), which must not reopen segments on the node at once.
pub const RECOVERY_MARGIN_PERCENT: u64 = 25;
pub const RECOVERY_MARGIN_MIN_BYTES: u64 = 4 * 1024 * 1024;

/// The watermark setting: `free_min_bytes`, or `free_min_percent` of the filesystem's
/// size when that is more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watermark {
    pub free_min_bytes: u64,
    /// 0-100; 0: only the byte form counts.
    pub free_min_percent: u8,
}

impl Watermark {
    /// Default `--disk-free-min-bytes`, 64 MiB: what may be written between two
    /// readings at full speed (about 12 MB, see [`CHECK_INTERVAL`]) several times over,
    /// plus what Raft needs below it (a snapshot is written beside the old one before
    /// the rename, and log compaction copies the kept entries), plus a segment's
    /// reserve; small next to any real volume (1 % of 6.4 GiB). RabbitMQ's default
    /// disk limit is 50 MB, for the same reasons.
    pub const DEFAULT_FREE_MIN_BYTES: u64 = 64 * 1024 * 1024;

    /// The watermark on a filesystem of `total_bytes`.
    pub fn min_free_bytes(&self, total_bytes: u64) -> u64 {
        let percent = u64::from(self.free_min_percent.min(100));
        let of_total = (u128::from(total_bytes) * u128::from(percent) / 100) as u64;
        self.free_min_bytes.max(of_total)
    }
}

impl Default for Watermark {
    fn default() -> Self {
        Self { free_min_bytes: Self::DEFAULT_FREE_MIN_BYTES, free_min_percent: 0 }
    }
}

/// Whether a node is below its watermark, and when that changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Above,
    Below,
}

impl Level {
    /// The level after a reading of `free_bytes` against the watermark `min_bytes`:
    /// below under it; back above only past it plus the recovery margin.
    pub fn next(self, free_bytes: u64, min_bytes: u64) -> Level {
        match self {
            Level::Above if free_bytes < min_bytes => Level::Below,
            Level::Below if free_bytes >= recovered_at(min_bytes) => Level::Above,
            same => same,
        }
    }
}

/// Free bytes a low node needs to be above again.
pub fn recovered_at(min_bytes: u64) -> u64 {
    let margin = (u128::from(min_bytes) * u128::from(RECOVERY_MARGIN_PERCENT) / 100) as u64;
    let margin = margin.max(RECOVERY_MARGIN_MIN_BYTES);
    min_bytes.saturating_add(margin)
}

/// Whether `incoming_bytes` more may be written with `free_bytes` free: the write must
/// leave the watermark's room untouched.
pub fn admits(level: Level, free_bytes: u64, min_bytes: u64, incoming_bytes: u64) -> bool {
    level == Level::Above && free_bytes.saturating_sub(incoming_bytes) >= min_bytes
}

/// Free and total bytes of a filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Space {
    pub free_bytes: u64,
    pub total_bytes: u64,
}

/// Reads the space of the filesystem holding `dir`: what an unprivileged writer may
/// use (`f_bavail`, without the blocks reserved for root).
pub fn space_of(dir: &Path) -> std::io::Result<Space> {
    let st = rustix::fs::statvfs(dir)?;
    let block = st.f_frsize.max(1);
    Ok(Space { free_bytes: st.f_bavail.saturating_mul(block), total_bytes: st.f_blocks.saturating_mul(block) })
}

/// What `dump` shows of this node's disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskStatus {
    pub free_bytes: u64,
    pub free_min_bytes: u64,
    pub below: bool,
}

/// This node's view of its data directory's free space. Cheap to clone.
#[derive(Clone)]
pub struct Disk {
    inner: Arc<Inner>,
}

struct Inner {
    node: NodeId,
    dir: PathBuf,
    /// Read at every reading; changed only by [`Disk::set_watermark`].
    watermark: Mutex<Watermark>,
    /// Reads the filesystem: `statvfs` of `dir`, or a fake in tests.
    source: SpaceSource,
    /// The last reading, minus what was written since.
    free_bytes: AtomicU64,
    min_bytes: AtomicU64,
    below: AtomicBool,
    /// Bumped by [`watch`] at each crossing: see [`Disk::level_changes`].
    level_changes: crate::watch::Sender<()>,
    /// Segment data was written since [`watch`] last looked; the first such write
    /// after it looked wakes it ([`IDLE_CHECK_INTERVAL`]).
    written: AtomicBool,
    first_write: tokio::sync::Notify,
}

/// Where readings come from.
pub type SpaceSource = Box<dyn Fn() -> std::io::Result<Space> + Send + Sync>;

impl Disk {
    /// Reads the space of `dir` once, so that the first write already has a reading.
    pub fn open(node: NodeId, dir: &Path, watermark: Watermark) -> std::io::Result<Disk> {
        let path = dir.to_path_buf();
        Disk::with_source(node, dir, watermark, Box::new(move || space_of(&path)))
    }

    /// Like [`Disk::open`], with readings from `source` (`dir` only names it).
    pub fn with_source(node: NodeId, dir: &Path, watermark: Watermark, source: SpaceSource) -> std::io::Result<Disk> {
        let space = source()?;
        let min = watermark.min_free_bytes(space.total_bytes);
        let below = Level::Above.next(space.free_bytes, min) == Level::Below;
        let disk = Disk {
            inner: Arc::new(Inner {
                node,
                dir: dir.to_path_buf(),
                watermark: Mutex::new(watermark),
                source,
                free_bytes: AtomicU64::new(space.free_bytes),
                min_bytes: AtomicU64::new(min),
                below: AtomicBool::new(below),
                level_changes: crate::watch::channel(()).0,
                written: AtomicBool::new(false),
                first_write: tokio::sync::Notify::new(),
            }),
        };
        if below {
            tracing::warn!(free_bytes = space.free_bytes, free_min_bytes = min, dir = %dir.display(),
                "the data directory is below its free-space watermark at startup: this node takes no segment data until space is freed");
        }
        Ok(disk)
    }

    /// Tells of every crossing of the watermark (as [`watch`] sees it, within one
    /// [`CHECK_INTERVAL`] while data is written, one [`IDLE_CHECK_INTERVAL`] while
    /// not): the keeper acts on this node's level without looking at it on a timer.
    pub fn level_changes(&self) -> crate::watch::Receiver<()> {
        self.inner.level_changes.subscribe()
    }

    fn level(&self) -> Level {
        if self.inner.below.load(Ordering::Relaxed) {
            Level::Below
        } else {
            Level::Above
        }
    }

    /// Takes `bytes` of segment data, or refuses with [`ErrorCode::DiskFull`] when
    /// that would go below the watermark (the node is then below it until a reading
    /// says otherwise). `what` names the refused write in the message (made only then).
    ///
    /// Normally two atomic loads. Near the watermark the estimate (the last reading
    /// minus what was written since) is checked against a new reading before refusing:
    /// it counts records written into a segment's preallocated reserve, which took no
    /// new space, so it runs ahead of the filesystem between readings.
    pub fn admit(&self, bytes: u64, what: impl FnOnce() -> String) -> Result<(), RequestError> {
        let fits = || {
            let (free, min) =
                (self.inner.free_bytes.load(Ordering::Relaxed), self.inner.min_bytes.load(Ordering::Relaxed));
            admits(self.level(), free, min, bytes)
        };
        if fits() || (self.level() == Level::Above && self.refresh().is_ok() && fits()) {
            self.charge(bytes);
            return Ok(());
        }
        self.inner.below.store(true, Ordering::Relaxed);
        Err(self.refusal(&what()))
    }

    /// Counts `bytes` written (or reserved) since the last reading.
    pub fn charge(&self, bytes: u64) {
        let _ =
            self.inner.free_bytes.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |f| Some(f.saturating_sub(bytes)));
        if !self.inner.written.load(Ordering::Relaxed) && !self.inner.written.swap(true, Ordering::Relaxed) {
            self.inner.first_write.notify_one();
        }
    }

    /// A write failed for want of space although the watermark admitted it (the
    /// watermark is too small for the write rate, or something else filled the disk):
    /// below at once, not at the next reading.
    pub fn out_of_space(&self) {
        self.inner.free_bytes.store(0, Ordering::Relaxed);
        self.inner.below.store(true, Ordering::Relaxed);
    }

    /// The refusal of a write of segment data on this node.
    pub fn refusal(&self, what: &str) -> RequestError {
        let s = self.status();
        RequestError::new(
            ErrorCode::DiskFull,
            format!(
                "node {}: {what} refused: {} free on the filesystem of its data directory {}, and its watermark is {} \
                 (--disk-free-min-bytes{}): below it, or it would be after this write; nothing was written; retry \
                 once space is freed",
                self.inner.node,
                bytes_text(s.free_bytes),
                self.inner.dir.display(),
                bytes_text(s.free_min_bytes),
                if self.watermark().free_min_percent > 0 { ", --disk-free-min-percent" } else { "" },
            ),
        )
    }

    fn watermark(&self) -> Watermark {
        *self.inner.watermark.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Changes the watermark; it counts from the next reading (within
    /// [`CHECK_INTERVAL`]). Tests use it to make a node's disk "fill" and "empty".
    pub fn set_watermark(&self, watermark: Watermark) {
        *self.inner.watermark.lock().unwrap_or_else(PoisonError::into_inner) = watermark;
    }

    pub fn status(&self) -> DiskStatus {
        DiskStatus {
            free_bytes: self.inner.free_bytes.load(Ordering::Relaxed),
            free_min_bytes: self.inner.min_bytes.load(Ordering::Relaxed),
            below: self.inner.below.load(Ordering::Relaxed),
        }
    }

    /// Reads the filesystem again; returns the level before and after.
    pub fn refresh(&self) -> std::io::Result<(Level, Level)> {
        let space = (self.inner.source)()?;
        let min = self.watermark().min_free_bytes(space.total_bytes);
        let before = self.level();
        let after = before.next(space.free_bytes, min);
        self.inner.free_bytes.store(space.free_bytes, Ordering::Relaxed);
        self.inner.min_bytes.store(min, Ordering::Relaxed);
        self.inner.below.store(after == Level::Below, Ordering::Relaxed);
        Ok((before, after))
    }

    /// What the cluster state should say of this node.
    fn report(&self) -> Option<DiskLow> {
        let s = self.status();
        s.below.then_some(DiskLow { free_bytes: s.free_bytes, free_min_bytes: s.free_min_bytes })
    }
}

/// `12.3 MiB (12897485 bytes)`.
pub fn bytes_text(bytes: u64) -> String {
    format!("{:.1} MiB ({bytes} bytes)", bytes as f64 / (1024.0 * 1024.0))
}

/// Reads the free space every [`CHECK_INTERVAL`] (every [`IDLE_CHECK_INTERVAL`] while
/// nothing is written, above the watermark, with the report in the state), logs each
/// crossing of the watermark, and keeps the cluster state's record of this node
/// (`disk_low`) in line with it.
pub async fn watch(disk: Disk, cluster: Cluster, stop: CancellationToken) {
    let mut fast = true;
    // What was last logged: a crossing the data path noticed first (a refused write)
    // is logged here too.
    let mut logged = disk.level();
    let mut read_failed = false;
    // The report in flight, and what was last sent when: a changed wish is sent at
    // once, the same one again (it failed, e.g. without a leader) after a pause.
    let mut in_flight: Option<tokio::task::JoinHandle<()>> = None;
    let mut last_sent: Option<(bool, tokio::time::Instant)> = None;
    loop {
        let wait = if fast { CHECK_INTERVAL } else { IDLE_CHECK_INTERVAL };
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
            _ = disk.inner.first_write.notified(), if !fast => {}
        }
        let written = disk.inner.written.swap(false, Ordering::Relaxed);
        match disk.refresh() {
            Ok(_) => read_failed = false,
            Err(e) if !read_failed => {
                read_failed = true;
                tracing::error!(dir = %disk.inner.dir.display(), error = %e,
                    "cannot read the free space of the data directory; keeping the last reading");
            }
            Err(_) => {}
        }
        let level = disk.level();
        if level != logged {
            log_crossing(&disk, level);
            logged = level;
            disk.inner.level_changes.send_replace(());
        }
        let want = disk.report();
        let recorded = cluster.state.read().state.disk_low.contains_key(&cluster.id);
        let idle = in_flight.as_ref().is_none_or(|r| r.is_finished());
        let resend = last_sent.is_none_or(|(low, at)| low != want.is_some() || at.elapsed() >= REPORT_RETRY_INTERVAL);
        if recorded != want.is_some() && idle && resend {
            last_sent = Some((want.is_some(), tokio::time::Instant::now()));
            let (disk, cluster) = (disk.clone(), cluster.clone());
            in_flight = Some(tokio::spawn(async move { report(&disk, &cluster).await }));
        }
        fast = written || level == Level::Below || recorded != want.is_some();
    }
}

/// Reports this node's level to the cluster state now, if the state says otherwise (a
/// failure is logged; [`watch`] keeps trying).
pub async fn report(disk: &Disk, cluster: &Cluster) {
    let want = disk.report();
    if cluster.state.read().state.disk_low.contains_key(&cluster.id) == want.is_some() {
        return;
    }
    if let Err(e) = cluster.write(Command::SetDiskLow { node: cluster.id, low: want }).await {
        tracing::warn!(error = %e, "reporting this node's disk watermark to the cluster state failed; retrying");
    }
}

fn log_crossing(disk: &Disk, level: Level) {
    let s = disk.status();
    let dir = disk.inner.dir.display();
    match level {
        Level::Below => tracing::warn!(
            free_bytes = s.free_bytes, free_min_bytes = s.free_min_bytes, dir = %dir,
            "disk free space went below the watermark: this node refuses segment data (publishes, replication, copies) until it is above {} again",
            bytes_text(recovered_at(s.free_min_bytes))
        ),
        Level::Above => tracing::info!(
            free_bytes = s.free_bytes, free_min_bytes = s.free_min_bytes, dir = %dir,
            "disk free space is above the watermark again: this node takes segment data"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn the_watermark_is_the_larger_of_bytes_and_percent() {
        let w = Watermark { free_min_bytes: 64 * MIB, free_min_percent: 0 };
        assert_eq!(w.min_free_bytes(10_000 * MIB), 64 * MIB);
        let w = Watermark { free_min_bytes: 64 * MIB, free_min_percent: 5 };
        assert_eq!(w.min_free_bytes(10_000 * MIB), 500 * MIB);
        assert_eq!(w.min_free_bytes(100 * MIB), 64 * MIB, "5 % of a small disk is less than the bytes");
        let w = Watermark { free_min_bytes: 0, free_min_percent: 200 };
        assert_eq!(w.min_free_bytes(100 * MIB), 100 * MIB, "a percentage above 100 counts as 100");
        assert_eq!(Watermark { free_min_bytes: 1, free_min_percent: 100 }.min_free_bytes(u64::MAX), u64::MAX);
    }

    #[test]
    fn a_node_goes_below_under_the_watermark_and_back_above_only_past_the_margin() {
        let min = 64 * MIB;
        assert_eq!(recovered_at(min), 80 * MIB);
        assert_eq!(recovered_at(8 * MIB), 12 * MIB, "at least the minimum margin");
        assert_eq!(Level::Above.next(min, min), Level::Above, "exactly at the watermark is not below it");
        assert_eq!(Level::Above.next(min - 1, min), Level::Below);
        assert_eq!(Level::Below.next(min, min), Level::Below, "giving back a little does not flip it back");
        assert_eq!(Level::Below.next(80 * MIB - 1, min), Level::Below);
        assert_eq!(Level::Below.next(80 * MIB, min), Level::Above);
        assert_eq!(Level::Above.next(70 * MIB, min), Level::Above, "above stays above inside the margin");
        assert_eq!(recovered_at(u64::MAX), u64::MAX, "no overflow");
    }

    #[test]
    fn a_write_is_admitted_only_if_it_leaves_the_watermark_untouched() {
        let min = 64 * MIB;
        assert!(admits(Level::Above, 65 * MIB, min, MIB));
        assert!(!admits(Level::Above, 65 * MIB, min, MIB + 1));
        assert!(!admits(Level::Above, 10, min, 100), "no underflow");
        assert!(!admits(Level::Below, 1000 * MIB, min, 0), "a low node takes nothing until it is above again");
        assert!(admits(Level::Above, 0, 0, 0), "a zero watermark admits an empty write");
    }

    /// A disk whose readings the test sets.
    fn fake_disk(free: &Arc<AtomicU64>, min_bytes: u64) -> Disk {
        let f = free.clone();
        let source: SpaceSource =
            Box::new(move || Ok(Space { free_bytes: f.load(Ordering::Relaxed), total_bytes: 1000 * MIB }));
        let watermark = Watermark { free_min_bytes: min_bytes, free_min_percent: 0 };
        Disk::with_source(7, Path::new("/data"), watermark, source).unwrap()
    }

    #[test]
    fn writes_are_charged_until_the_next_reading_and_a_refusal_says_why() {
        let free = Arc::new(AtomicU64::new(70 * MIB));
        let disk = fake_disk(&free, 64 * MIB);
        disk.admit(4 * MIB, || "a publish".into()).unwrap();
        assert_eq!(disk.status().free_bytes, 66 * MIB, "charged");
        // The filesystem did not shrink (the records went into reserved space): a new
        // reading admits what the estimate alone would refuse.
        disk.admit(4 * MIB, || "a publish".into()).unwrap();
        assert_eq!(disk.status().free_bytes, 66 * MIB, "read again, then charged");
        free.store(66 * MIB, Ordering::Relaxed);
        let e = disk.admit(3 * MIB, || "a publish".into()).unwrap_err();
        assert_eq!(e.code, ErrorCode::DiskFull);
        for part in [
            "node 7: a publish refused",
            "66.0 MiB (69206016 bytes) free",
            "/data",
            "64.0 MiB",
            "--disk-free-min-bytes",
        ] {
            assert!(e.message.contains(part), "{part:?} in {e}");
        }
        assert!(disk.status().below);
        assert_eq!(disk.admit(0, || "x".into()).unwrap_err().code, ErrorCode::DiskFull, "below until read again");
        // Space returns, but only past the margin does the node take data again.
        free.store(79 * MIB, Ordering::Relaxed);
        assert_eq!(disk.refresh().unwrap(), (Level::Below, Level::Below));
        assert!(disk.admit(0, || "x".into()).is_err());
        free.store(80 * MIB, Ordering::Relaxed);
        assert_eq!(disk.refresh().unwrap(), (Level::Below, Level::Above));
        disk.admit(MIB, || "x".into()).unwrap();
        assert_eq!(disk.report(), None);
        disk.out_of_space();
        assert_eq!(disk.report(), Some(DiskLow { free_bytes: 0, free_min_bytes: 64 * MIB }));
    }

    #[test]
    fn the_free_space_of_a_real_directory_can_be_read() {
        let dir = tempfile::tempdir().unwrap();
        let space = space_of(dir.path()).unwrap();
        assert!(space.total_bytes >= space.free_bytes && space.total_bytes > 0, "{space:?}");
        assert!(space_of(&dir.path().join("missing")).is_err());
    }
}
