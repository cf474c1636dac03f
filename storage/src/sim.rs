//! A simulated disk: an in-memory [`Fs`] for deterministic simulation (TigerBeetle's
//! VOPR, FoundationDB's simulation), which knows what a power loss may take away.
//!
//! What it models:
//!
//! - **Written is not durable.** Per file it keeps what the process sees (the page
//!   cache) and what is on the disk (synced), with the writes and size changes in
//!   between, oldest first. [`SimFs::power_loss`] keeps the synced content plus a
//!   seeded random prefix of those unsynced operations (a disk writes back in the
//!   background too), of which the last may be **torn** at a seeded random byte, and
//!   may have its new size reach the disk without its data (zeros): what ext4 can
//!   leave after a crash.
//! - **Directory entries need a directory fsync.** A create, rename or removal is
//!   durable once its directory is synced ([`Fs::sync_dir`]); a power loss keeps a
//!   seeded random prefix of the others, in order (as a journaling filesystem
//!   commits them), and loses the rest: a new file vanishes, a removed one comes back,
//!   a rename is undone. A file whose directory entry is lost is lost whole, however
//!   well its data was synced; so is everything under a directory whose own entry is.
//! - **A process that dies** ([`SimFs::process_died`], kill -9) loses nothing written:
//!   the page cache survives; its open files and their locks are gone (every later
//!   operation on them fails with `EBADF`), as the kernel closes a dead process's files.
//! - **Faults on demand**: [`SimFs::fail`] makes operations matching a path pattern
//!   fail with `EIO` or `ENOSPC` (after letting some through, a number of times or for
//!   good); [`SimFs::set_capacity_bytes`] makes writes beyond a capacity fail with
//!   `ENOSPC` and is what [`Fs::space`] reports (so a watermark sees it coming);
//!   [`SimFs::flip_bit`] damages a file at rest (in the page cache and on the disk).
//!
//! What it does not model: reordering of unsynced writes within a file (they reach the
//! disk as a prefix), damage that a sync does not report (a lying disk), latency (every
//! operation completes at once: a simulation's time is tokio's), sparse files and
//! block-granular space (space is counted in bytes of file length), and renames of
//! directories or across directories (the storage crate does neither; they are refused).
//!
//! Everything random comes from the seed given to [`SimFs::new`]: the same operations
//! in the same order give the same bytes, the same faults and the same crashes.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::fs::{Fs, FsFile, Metadata, OpenMode, Space};

/// `EIO`, `ENOSPC` and `EBADF`, as Linux numbers them (the kinds the broker reacts to
/// come from these: `ENOSPC` is `ErrorKind::StorageFull`).
const EIO: i32 = 5;
const EBADF: i32 = 9;
const ENOSPC: i32 = 28;

/// Capacity of a simulated disk unless set otherwise: large enough never to fill.
pub const DEFAULT_CAPACITY_BYTES: u64 = 1 << 40;

/// A small, fast, seedable generator (SplitMix64): the simulation's only source of
/// randomness, so that a seed replays exactly. Public for the simulator's schedule.
#[derive(Clone, Debug)]
pub struct SimRng(u64);

impl SimRng {
    pub fn new(seed: u64) -> Self {
        SimRng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, n)` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in `[lo, hi]`.
    pub fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi.saturating_sub(lo).saturating_add(1))
    }

    /// True with probability `numerator / denominator`.
    pub fn chance(&mut self, numerator: u64, denominator: u64) -> bool {
        self.below(denominator) < numerator
    }

    /// A generator for another purpose, independent of how much this one is used later.
    pub fn fork(&mut self) -> SimRng {
        SimRng::new(self.next_u64())
    }
}

/// The kinds of operation a fault rule can match.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsOp {
    /// Opening (and creating) a file.
    Open,
    Read,
    /// Writes, size changes and reservations.
    Write,
    /// `sync_data`, `sync_all` and directory syncs.
    Sync,
    /// Renames, removals, directory creation and listing.
    Namespace,
}

/// The error a fault rule returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultError {
    /// `EIO`: a failing disk.
    Io,
    /// `ENOSPC`: a full disk.
    NoSpace,
}

impl FaultError {
    fn to_io(self) -> io::Error {
        match self {
            FaultError::Io => io::Error::from_raw_os_error(EIO),
            FaultError::NoSpace => io::Error::from_raw_os_error(ENOSPC),
        }
    }
}

/// Makes matching operations fail: those on a path containing `path_contains` (every
/// path when empty) whose kind is in `ops` (every kind when empty). The first `skip`
/// matches go through, then `times` fail (`u64::MAX`: every one from then on).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FaultRule {
    pub path_contains: String,
    pub ops: Vec<FsOp>,
    pub skip: u64,
    pub times: u64,
    pub error: FaultError,
}

impl FaultRule {
    /// Every operation of kind `op` on a path containing `path_contains`, for good.
    pub fn always(path_contains: &str, op: FsOp, error: FaultError) -> Self {
        FaultRule { path_contains: path_contains.to_string(), ops: vec![op], skip: 0, times: u64::MAX, error }
    }

    fn matches(&self, path: &Path, op: FsOp) -> bool {
        (self.ops.is_empty() || self.ops.contains(&op))
            && (self.path_contains.is_empty() || path.to_string_lossy().contains(&self.path_contains))
    }
}

/// What a simulated power loss did, for the simulator's log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PowerLossReport {
    /// Unsynced file operations (writes, size changes) lost, of all there were.
    pub file_ops_lost: usize,
    pub file_ops_pending: usize,
    /// Files whose last surviving write was torn.
    pub torn_writes: usize,
    /// Unsynced directory operations lost, of all there were.
    pub dir_ops_lost: usize,
    pub dir_ops_pending: usize,
}

/// The in-memory simulated disk. Cheap to clone (shared): one per simulated machine.
#[derive(Clone)]
pub struct SimFs {
    shared: Arc<Mutex<State>>,
}

impl fmt::Debug for SimFs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.state();
        f.debug_struct("SimFs").field("files", &s.inodes.len()).field("epoch", &s.epoch).finish()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Node {
    Dir,
    File(u64),
}

/// A directory operation, in the directory `dir`, not yet durable.
#[derive(Clone, Debug)]
struct DirOp {
    dir: PathBuf,
    kind: DirOpKind,
}

#[derive(Clone, Debug)]
enum DirOpKind {
    Create { path: PathBuf, node: Node },
    Remove { path: PathBuf },
    Rename { from: PathBuf, to: PathBuf },
}

impl DirOpKind {
    fn apply(&self, names: &mut BTreeMap<PathBuf, Node>) {
        match self {
            DirOpKind::Create { path, node } => {
                names.insert(path.clone(), *node);
            }
            DirOpKind::Remove { path } => {
                names.remove(path);
            }
            DirOpKind::Rename { from, to } => {
                if let Some(node) = names.remove(from) {
                    names.insert(to.clone(), node);
                }
            }
        }
    }
}

/// A file operation not yet durable.
#[derive(Clone, Debug)]
enum Pending {
    Write { offset: u64, bytes: Vec<u8> },
    SetLen(u64),
}

impl Pending {
    fn apply(&self, data: &mut Vec<u8>) {
        match self {
            Pending::Write { offset, bytes } => write_into(data, *offset, bytes),
            Pending::SetLen(len) => data.resize(*len as usize, 0),
        }
    }
}

fn write_into(data: &mut Vec<u8>, offset: u64, bytes: &[u8]) {
    let start = offset as usize;
    let end = start + bytes.len();
    if data.len() < end {
        data.resize(end, 0);
    }
    data[start..end].copy_from_slice(bytes);
}

#[derive(Debug, Default)]
struct Inode {
    /// What the process sees.
    data: Vec<u8>,
    /// What is on the disk.
    durable: Vec<u8>,
    /// Operations since the last sync, oldest first.
    pending: Vec<Pending>,
    /// Open files of the current process.
    open_handles: u32,
}

struct State {
    rng: SimRng,
    /// The namespace the process sees: every file and directory by path.
    live: BTreeMap<PathBuf, Node>,
    /// The namespace on the disk.
    durable: BTreeMap<PathBuf, Node>,
    /// Directory operations not yet durable, oldest first.
    pending_dir_ops: Vec<DirOp>,
    inodes: BTreeMap<u64, Inode>,
    next_inode: u64,
    /// Incremented when the process dies: files opened before are closed.
    epoch: u64,
    /// Locked files: inode -> the handle holding the lock.
    locks: BTreeMap<u64, u64>,
    next_handle: u64,
    capacity_bytes: u64,
    /// Bytes of all files (their length as the process sees it).
    used_bytes: u64,
    rules: Vec<(FaultRule, u64)>,
}

fn err(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("{}: no such file or directory (simulated)", path.display()))
}

/// The directory holding `path`; `None` for a root.
fn parent(path: &Path) -> Option<&Path> {
    path.parent().filter(|p| !p.as_os_str().is_empty())
}

impl State {
    fn is_dir(&self, path: &Path) -> bool {
        match parent(path) {
            None => true,
            Some(_) => self.live.get(path) == Some(&Node::Dir),
        }
    }

    /// The first rule matching `(path, op)` that fails it, counting the match.
    fn fault(&mut self, path: &Path, op: FsOp) -> io::Result<()> {
        for (rule, seen) in &mut self.rules {
            if !rule.matches(path, op) {
                continue;
            }
            *seen += 1;
            if *seen > rule.skip && (rule.times == u64::MAX || *seen - rule.skip <= rule.times) {
                return Err(rule.error.to_io());
            }
        }
        Ok(())
    }

    fn dir_op(&mut self, dir: &Path, kind: DirOpKind) {
        kind.apply(&mut self.live);
        self.pending_dir_ops.push(DirOp { dir: dir.to_path_buf(), kind });
    }

    /// Charges `new_len - old_len` more bytes, or refuses with `ENOSPC`.
    fn grow(&mut self, old_len: u64, new_len: u64) -> io::Result<()> {
        if new_len > old_len {
            let more = new_len - old_len;
            if self.used_bytes.saturating_add(more) > self.capacity_bytes {
                return Err(err(ENOSPC));
            }
            self.used_bytes += more;
        } else {
            self.used_bytes = self.used_bytes.saturating_sub(old_len - new_len);
        }
        Ok(())
    }

    /// Frees files that no name (on the disk, in the process's view, or in a directory
    /// operation a power loss may still make durable) and no open file refers to any
    /// more. Without the pending operations, a file created and renamed away before
    /// its directory was synced came back at a power loss as a name without a file.
    fn collect_garbage(&mut self) {
        let mut referenced: std::collections::BTreeSet<u64> = std::collections::BTreeSet::new();
        let pending = self.pending_dir_ops.iter().filter_map(|op| match &op.kind {
            DirOpKind::Create { node, .. } => Some(node),
            _ => None,
        });
        for node in self.live.values().chain(self.durable.values()).chain(pending) {
            if let Node::File(ino) = node {
                referenced.insert(*ino);
            }
        }
        let gone: Vec<u64> = self
            .inodes
            .iter()
            .filter(|(ino, inode)| !referenced.contains(ino) && inode.open_handles == 0)
            .map(|(ino, _)| *ino)
            .collect();
        for ino in gone {
            if let Some(inode) = self.inodes.remove(&ino) {
                self.used_bytes = self.used_bytes.saturating_sub(inode.data.len() as u64);
            }
        }
    }

    fn new_epoch(&mut self) {
        self.epoch += 1;
        self.locks.clear();
        for inode in self.inodes.values_mut() {
            inode.open_handles = 0;
        }
    }
}

impl SimFs {
    /// An empty disk; everything random it does comes from `seed`.
    pub fn new(seed: u64) -> Self {
        SimFs {
            shared: Arc::new(Mutex::new(State {
                rng: SimRng::new(seed),
                live: BTreeMap::new(),
                durable: BTreeMap::new(),
                pending_dir_ops: Vec::new(),
                inodes: BTreeMap::new(),
                next_inode: 1,
                epoch: 0,
                locks: BTreeMap::new(),
                next_handle: 1,
                capacity_bytes: DEFAULT_CAPACITY_BYTES,
                used_bytes: 0,
                rules: Vec::new(),
            })),
        }
    }

    /// This disk as the `Arc<dyn Fs>` configurations take.
    pub fn as_fs(&self) -> Arc<dyn Fs> {
        Arc::new(self.clone())
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds a fault rule (see [`FaultRule`]).
    pub fn fail(&self, rule: FaultRule) {
        self.state().rules.push((rule, 0));
    }

    /// Removes every fault rule.
    pub fn clear_faults(&self) {
        self.state().rules.clear();
    }

    /// Writes that would take the files past `capacity_bytes` fail with `ENOSPC`.
    pub fn set_capacity_bytes(&self, capacity_bytes: u64) {
        self.state().capacity_bytes = capacity_bytes;
    }

    /// Bytes of all files.
    pub fn used_bytes(&self) -> u64 {
        self.state().used_bytes
    }

    /// The process using this disk died (kill -9): its open files are closed and their
    /// locks released; everything it wrote stays (in the page cache), synced or not.
    pub fn process_died(&self) {
        let mut s = self.state();
        s.new_epoch();
        s.collect_garbage();
    }

    /// The machine lost power: the process's files are closed, and the disk keeps what
    /// was synced plus a seeded random prefix of the rest (see the module's comment).
    pub fn power_loss(&self) -> PowerLossReport {
        let mut guard = self.state();
        let s = &mut *guard;
        let mut report = PowerLossReport::default();
        for inode in s.inodes.values_mut() {
            let n = inode.pending.len();
            report.file_ops_pending += n;
            let kept = s.rng.below(n as u64 + 1) as usize;
            for op in &inode.pending[..kept] {
                op.apply(&mut inode.durable);
            }
            report.file_ops_lost += n - kept;
            if kept < n && s.rng.chance(1, 2) {
                if let Pending::Write { offset, bytes } = &inode.pending[kept] {
                    // Torn: the first `cut` bytes reached the disk; sometimes the new
                    // size did too, with zeros where the rest of the data should be.
                    let cut = s.rng.below(bytes.len() as u64) as usize;
                    let end = *offset as usize + bytes.len();
                    if s.rng.chance(1, 2) && inode.durable.len() < end {
                        inode.durable.resize(end, 0);
                    }
                    write_into(&mut inode.durable, *offset, &bytes[..cut]);
                    report.torn_writes += 1;
                }
            }
            inode.pending.clear();
            inode.data.clone_from(&inode.durable);
        }
        let n = s.pending_dir_ops.len();
        report.dir_ops_pending = n;
        let kept = s.rng.below(n as u64 + 1) as usize;
        report.dir_ops_lost = n - kept;
        for op in s.pending_dir_ops.drain(..).take(kept) {
            op.kind.apply(&mut s.durable);
        }
        // A name whose directory's own entry was lost is lost with it.
        let orphans: Vec<PathBuf> = s
            .durable
            .keys()
            .filter(|p| p.ancestors().skip(1).any(|a| parent(a).is_some() && s.durable.get(a) != Some(&Node::Dir)))
            .cloned()
            .collect();
        for p in orphans {
            s.durable.remove(&p);
        }
        s.live = s.durable.clone();
        s.new_epoch();
        s.used_bytes = s.inodes.values().map(|i| i.data.len() as u64).sum();
        s.collect_garbage();
        report
    }

    /// Flips bit `bit` of the file at `path` at rest: in what the process reads and on
    /// the disk.
    pub fn flip_bit(&self, path: &Path, bit: u64) -> io::Result<()> {
        let mut s = self.state();
        let Some(Node::File(ino)) = s.live.get(path).copied() else { return Err(not_found(path)) };
        let inode = s.inodes.get_mut(&ino).ok_or_else(|| not_found(path))?;
        let byte = (bit / 8) as usize;
        if byte >= inode.data.len() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "bit past the end of the file"));
        }
        let mask = 1u8 << (bit % 8);
        inode.data[byte] ^= mask;
        if byte < inode.durable.len() {
            inode.durable[byte] ^= mask;
        }
        Ok(())
    }

    /// Flips one seeded random bit of one seeded random non-empty file whose path
    /// `select` accepts; the file and the bit, or `None` when no file qualifies.
    pub fn flip_random_bit(&self, select: impl Fn(&Path) -> bool) -> Option<(PathBuf, u64)> {
        let (path, bit) = {
            let mut s = self.state();
            let candidates: Vec<(PathBuf, u64)> = s
                .live
                .iter()
                .filter_map(|(p, n)| match n {
                    Node::File(ino) if select(p) => {
                        let len = s.inodes.get(ino).map_or(0, |i| i.data.len() as u64);
                        (len > 0).then(|| (p.clone(), len))
                    }
                    _ => None,
                })
                .collect();
            if candidates.is_empty() {
                return None;
            }
            let (path, len) = candidates[s.rng.below(candidates.len() as u64) as usize].clone();
            let bit = s.rng.below(len * 8);
            (path, bit)
        };
        self.flip_bit(&path, bit).ok()?;
        Some((path, bit))
    }

    /// Every file the process sees, with its length, by path.
    pub fn files(&self) -> Vec<(PathBuf, u64)> {
        let s = self.state();
        s.live
            .iter()
            .filter_map(|(p, n)| match n {
                Node::File(ino) => Some((p.clone(), s.inodes.get(ino).map_or(0, |i| i.data.len() as u64))),
                Node::Dir => None,
            })
            .collect()
    }

    /// Writes `bytes` as the whole content of `path`, synced with its directory entry
    /// (for tests that set a file up as if it had always been on the disk).
    pub fn put_durable(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        let f = self.open(path, OpenMode::Truncate)?;
        f.write_all_at(bytes, 0)?;
        f.sync_all()?;
        self.sync_dir(parent(path).unwrap_or(Path::new("/")))
    }

    fn handle(&self, s: &mut State, ino: u64, path: &Path, writable: bool) -> SimFile {
        let id = s.next_handle;
        s.next_handle += 1;
        if let Some(inode) = s.inodes.get_mut(&ino) {
            inode.open_handles += 1;
        }
        SimFile { fs: self.clone(), ino, epoch: s.epoch, id, path: path.to_path_buf(), writable }
    }
}

impl Fs for SimFs {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn FsFile>> {
        let mut s = self.state();
        s.fault(path, FsOp::Open)?;
        let existing = s.live.get(path).copied();
        let ino = match (existing, mode) {
            (Some(Node::Dir), _) => {
                return Err(io::Error::new(io::ErrorKind::IsADirectory, format!("{} is a directory", path.display())))
            }
            (Some(Node::File(_)), OpenMode::CreateNew) => {
                return Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("{} exists", path.display())))
            }
            (Some(Node::File(ino)), OpenMode::Truncate) => {
                let old = s.inodes.get(&ino).map_or(0, |i| i.data.len() as u64);
                s.grow(old, 0)?;
                if let Some(inode) = s.inodes.get_mut(&ino) {
                    inode.data.clear();
                    inode.pending.push(Pending::SetLen(0));
                }
                ino
            }
            (Some(Node::File(ino)), _) => ino,
            (None, OpenMode::Read | OpenMode::ReadWrite) => return Err(not_found(path)),
            (None, _) => {
                let Some(dir) = parent(path).filter(|d| s.is_dir(d)).map(Path::to_path_buf) else {
                    return Err(not_found(path));
                };
                let ino = s.next_inode;
                s.next_inode += 1;
                s.inodes.insert(ino, Inode::default());
                s.dir_op(&dir, DirOpKind::Create { path: path.to_path_buf(), node: Node::File(ino) });
                ino
            }
        };
        let writable = mode != OpenMode::Read;
        Ok(Box::new(self.handle(&mut s, ino, path, writable)))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut s = self.state();
        s.fault(to, FsOp::Namespace)?;
        match s.live.get(from) {
            Some(Node::File(_)) => {}
            Some(Node::Dir) => return Err(io::Error::new(io::ErrorKind::Unsupported, "simulated: directory rename")),
            None => return Err(not_found(from)),
        }
        let (Some(dir), Some(from_dir)) = (parent(to), parent(from)) else { return Err(not_found(to)) };
        if dir != from_dir {
            return Err(io::Error::new(io::ErrorKind::Unsupported, "simulated: rename across directories"));
        }
        if s.live.get(to) == Some(&Node::Dir) {
            return Err(io::Error::new(io::ErrorKind::IsADirectory, format!("{} is a directory", to.display())));
        }
        let dir = dir.to_path_buf();
        s.dir_op(&dir, DirOpKind::Rename { from: from.to_path_buf(), to: to.to_path_buf() });
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut s = self.state();
        s.fault(path, FsOp::Namespace)?;
        match s.live.get(path) {
            Some(Node::File(_)) => {}
            Some(Node::Dir) => {
                return Err(io::Error::new(io::ErrorKind::IsADirectory, format!("{} is a directory", path.display())))
            }
            None => return Err(not_found(path)),
        }
        let dir = parent(path).map(Path::to_path_buf).unwrap_or_default();
        s.dir_op(&dir, DirOpKind::Remove { path: path.to_path_buf() });
        Ok(())
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut s = self.state();
        s.fault(path, FsOp::Namespace)?;
        let missing: Vec<PathBuf> = path
            .ancestors()
            .take_while(|a| parent(a).is_some() && s.live.get(*a) != Some(&Node::Dir))
            .map(Path::to_path_buf)
            .collect();
        for dir in missing.iter().rev() {
            if let Some(Node::File(_)) = s.live.get(dir) {
                return Err(io::Error::new(io::ErrorKind::NotADirectory, format!("{} is a file", dir.display())));
            }
            let in_dir = parent(dir).map(Path::to_path_buf).unwrap_or_default();
            s.dir_op(&in_dir, DirOpKind::Create { path: dir.clone(), node: Node::Dir });
        }
        Ok(())
    }

    fn read_dir(&self, dir: &Path) -> io::Result<Vec<OsString>> {
        let mut s = self.state();
        s.fault(dir, FsOp::Namespace)?;
        if !s.is_dir(dir) {
            return Err(not_found(dir));
        }
        Ok(s.live
            .range(dir.to_path_buf()..)
            .take_while(|(p, _)| p.starts_with(dir))
            .filter(|(p, _)| p.parent() == Some(dir))
            .filter_map(|(p, _)| p.file_name().map(|n| n.to_os_string()))
            .collect())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut guard = self.state();
        let s = &mut *guard;
        s.fault(dir, FsOp::Sync)?;
        if !s.is_dir(dir) {
            return Err(not_found(dir));
        }
        let (mine, others): (Vec<DirOp>, Vec<DirOp>) = s.pending_dir_ops.drain(..).partition(|op| op.dir == dir);
        s.pending_dir_ops = others;
        for op in mine {
            op.kind.apply(&mut s.durable);
        }
        s.collect_garbage();
        Ok(())
    }

    fn metadata(&self, path: &Path) -> io::Result<Metadata> {
        let s = self.state();
        if parent(path).is_none() {
            return Ok(Metadata { is_dir: true, len_bytes: 0 });
        }
        match s.live.get(path) {
            Some(Node::Dir) => Ok(Metadata { is_dir: true, len_bytes: 0 }),
            Some(Node::File(ino)) => {
                Ok(Metadata { is_dir: false, len_bytes: s.inodes.get(ino).map_or(0, |i| i.data.len() as u64) })
            }
            None => Err(not_found(path)),
        }
    }

    fn space(&self, _path: &Path) -> io::Result<Space> {
        let s = self.state();
        Ok(Space { free_bytes: s.capacity_bytes.saturating_sub(s.used_bytes), total_bytes: s.capacity_bytes })
    }

    fn unique_u64(&self, salt: u64) -> u64 {
        self.state().rng.next_u64() ^ salt.rotate_left(32)
    }
}

/// An open file of a [`SimFs`].
pub struct SimFile {
    fs: SimFs,
    ino: u64,
    /// The process generation that opened it; stale after a death or power loss.
    epoch: u64,
    id: u64,
    path: PathBuf,
    writable: bool,
}

impl fmt::Debug for SimFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimFile").field("path", &self.path).field("ino", &self.ino).finish()
    }
}

impl SimFile {
    /// The disk's state, with this file's inode, when the file is still open.
    fn with<T>(&self, op: FsOp, f: impl FnOnce(&mut State, u64) -> io::Result<T>) -> io::Result<T> {
        let mut s = self.fs.state();
        if s.epoch != self.epoch {
            // The process that opened it is gone: its descriptors went with it.
            return Err(err(EBADF));
        }
        s.fault(&self.path, op)?;
        if op == FsOp::Write && !self.writable {
            return Err(err(EBADF));
        }
        f(&mut s, self.ino)
    }
}

fn inode(s: &mut State, ino: u64) -> io::Result<&mut Inode> {
    s.inodes.get_mut(&ino).ok_or_else(|| err(EBADF))
}

impl FsFile for SimFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.with(FsOp::Read, |s, ino| {
            let data = &inode(s, ino)?.data;
            let start = (offset as usize).min(data.len());
            let n = buf.len().min(data.len() - start);
            buf[..n].copy_from_slice(&data[start..start + n]);
            Ok(n)
        })
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.with(FsOp::Write, |s, ino| {
            let old = inode(s, ino)?.data.len() as u64;
            s.grow(old, old.max(offset + buf.len() as u64))?;
            let inode = inode(s, ino)?;
            write_into(&mut inode.data, offset, buf);
            inode.pending.push(Pending::Write { offset, bytes: buf.to_vec() });
            Ok(())
        })
    }

    fn len_bytes(&self) -> io::Result<u64> {
        self.with(FsOp::Read, |s, ino| Ok(inode(s, ino)?.data.len() as u64))
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.with(FsOp::Write, |s, ino| {
            let old = inode(s, ino)?.data.len() as u64;
            s.grow(old, len)?;
            let inode = inode(s, ino)?;
            inode.data.resize(len as usize, 0);
            inode.pending.push(Pending::SetLen(len));
            Ok(())
        })
    }

    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        self.with(FsOp::Write, |s, ino| {
            let old = inode(s, ino)?.data.len() as u64;
            let end = offset + len;
            if end <= old {
                return Ok(());
            }
            s.grow(old, end)?;
            let inode = inode(s, ino)?;
            inode.data.resize(end as usize, 0);
            inode.pending.push(Pending::SetLen(end));
            Ok(())
        })
    }

    fn sync_data(&self) -> io::Result<()> {
        self.with(FsOp::Sync, |s, ino| {
            let inode = inode(s, ino)?;
            for op in inode.pending.drain(..) {
                op.apply(&mut inode.durable);
            }
            Ok(())
        })
    }

    fn sync_all(&self) -> io::Result<()> {
        self.sync_data()
    }

    fn try_lock_exclusive(&self) -> io::Result<bool> {
        self.with(FsOp::Open, |s, ino| match s.locks.get(&ino) {
            Some(holder) if *holder != self.id => Ok(false),
            _ => {
                s.locks.insert(ino, self.id);
                Ok(true)
            }
        })
    }
}

impl Drop for SimFile {
    fn drop(&mut self) {
        let mut s = self.fs.state();
        if s.epoch != self.epoch {
            return;
        }
        if s.locks.get(&self.ino) == Some(&self.id) {
            s.locks.remove(&self.ino);
        }
        if let Some(inode) = s.inodes.get_mut(&self.ino) {
            inode.open_handles = inode.open_handles.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests;
