//! The filesystem seam: every file operation of the storage crate (segments, indexes,
//! and the durable-file module's logs, record files, atomic replaces, directory fsyncs
//! and the lock) goes through an [`Fs`] and the [`FsFile`]s it opens.
//!
//! Two implementations:
//!
//! - [`RealFs`]: the operating system's, the same system calls as before the seam
//!   (`pread`, `pwrite`, `fdatasync`, `fsync`, `fallocate`, `flock`, `statvfs`, and an
//!   `fsync` of a directory opened read-only). One virtual call per operation, next to
//!   a system call, costs nothing measurable.
//! - [`crate::sim::SimFs`]: an in-memory disk for deterministic simulation, which
//!   knows what is synced and what only written, so a simulated power loss keeps only
//!   what a real disk would be guaranteed to keep, and which fails the operations it
//!   is told to fail.
//!
//! The trait is object safe and small on purpose: what the storage crate needs, in the
//! terms of POSIX, so that the durability argument of each file (ARCHITECTURE.md,
//! "Segment storage") reads the same against either implementation.

use std::ffi::OsString;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, OnceLock};

/// How [`Fs::open`] opens a file. Every mode but `Read` opens for reading and writing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenMode {
    /// An existing file, read only.
    Read,
    /// An existing file.
    ReadWrite,
    /// Created when missing, kept as it is otherwise.
    Create,
    /// Created; `AlreadyExists` when it exists.
    CreateNew,
    /// Created when missing, emptied otherwise.
    Truncate,
}

/// What [`Fs::metadata`] tells of a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Metadata {
    pub is_dir: bool,
    /// Bytes of a file (0 for a directory).
    pub len_bytes: u64,
}

/// Free and total bytes of the filesystem holding a path (what `statvfs` tells an
/// unprivileged writer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Space {
    pub free_bytes: u64,
    pub total_bytes: u64,
}

/// A filesystem. Paths are absolute or relative to the process's working directory,
/// as with `std::fs`.
pub trait Fs: Send + Sync + fmt::Debug {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn FsFile>>;
    /// Renames a file within a directory (replacing `to`). Durable only once the
    /// directory is synced ([`Fs::sync_dir`]).
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes a file. Durable only once the directory is synced.
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Creates a directory and its missing parents. Each new entry is durable only once
    /// its parent is synced.
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// The names in a directory (files and directories), in no particular order.
    fn read_dir(&self, dir: &Path) -> io::Result<Vec<OsString>>;
    /// Makes the creations, renames and removals in `dir` durable (`fsync` of the
    /// directory).
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    fn metadata(&self, path: &Path) -> io::Result<Metadata>;
    /// Free and total space of the filesystem holding `path`.
    fn space(&self, path: &Path) -> io::Result<Space>;
    /// A value nobody can predict (a segment's nonce). A simulated disk draws it from
    /// its seed, so a run replays byte for byte.
    fn unique_u64(&self, salt: u64) -> u64;

    /// The whole content of a file.
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        self.open(path, OpenMode::Read)?.read_all()
    }

    /// Whether `path` exists (errors other than "not found" count as existing, as
    /// `Path::exists` does not: the caller then fails on its next operation instead).
    fn exists(&self, path: &Path) -> bool {
        !matches!(self.metadata(path), Err(e) if e.kind() == io::ErrorKind::NotFound)
    }
}

/// An open file. Positional reads and writes only: one writer and any number of
/// readers share a file without a seek position.
pub trait FsFile: Send + Sync + fmt::Debug {
    /// Reads at most `buf.len()` bytes at `offset`; 0 at the end of the file.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Writes all of `buf` at `offset`, growing the file when it ends there or before.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Bytes of the file.
    fn len_bytes(&self) -> io::Result<u64>;
    /// Cuts or extends (with zeros) the file.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Reserves `len` bytes from `offset` (`fallocate`, mode 0): the file grows to at
    /// least `offset + len`, with zeros.
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()>;
    /// `fdatasync`: the data written so far (and a new size) is durable.
    fn sync_data(&self) -> io::Result<()>;
    /// `fsync`: like `sync_data`, with all metadata.
    fn sync_all(&self) -> io::Result<()>;
    /// Takes an exclusive advisory lock without waiting (`flock(LOCK_EX | LOCK_NB)`):
    /// `Ok(false)` when another open file holds it. Released when this file is closed,
    /// however its owner ends.
    fn try_lock_exclusive(&self) -> io::Result<bool>;

    /// Fills `buf` from `offset`; `UnexpectedEof` when the file ends first.
    fn read_exact_at(&self, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match self.read_at(buf, offset) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "failed to fill whole buffer")),
                Ok(n) => {
                    buf = &mut buf[n..];
                    offset += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The whole file.
    fn read_all(&self) -> io::Result<Vec<u8>> {
        let len = usize::try_from(self.len_bytes()?).map_err(io::Error::other)?;
        let mut buf = vec![0u8; len];
        self.read_exact_at(&mut buf, 0)?;
        Ok(buf)
    }
}

/// The operating system's filesystem.
#[derive(Clone, Copy, Debug, Default)]
pub struct RealFs;

impl RealFs {
    /// The one shared instance, as an `Arc<dyn Fs>` (what configurations hold).
    pub fn shared() -> Arc<dyn Fs> {
        static REAL: OnceLock<Arc<dyn Fs>> = OnceLock::new();
        REAL.get_or_init(|| Arc::new(RealFs)).clone()
    }
}

impl Fs for RealFs {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn FsFile>> {
        let mut o = OpenOptions::new();
        o.read(true);
        match mode {
            OpenMode::Read => {}
            OpenMode::ReadWrite => {
                o.write(true);
            }
            OpenMode::Create => {
                o.write(true).create(true).truncate(false);
            }
            OpenMode::CreateNew => {
                o.write(true).create_new(true);
            }
            OpenMode::Truncate => {
                o.write(true).create(true).truncate(true);
            }
        }
        Ok(Box::new(RealFile(o.open(path)?)))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir_all(path)
    }

    fn read_dir(&self, dir: &Path) -> io::Result<Vec<OsString>> {
        std::fs::read_dir(dir)?.map(|e| e.map(|e| e.file_name())).collect()
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }

    fn metadata(&self, path: &Path) -> io::Result<Metadata> {
        let m = std::fs::metadata(path)?;
        Ok(Metadata { is_dir: m.is_dir(), len_bytes: if m.is_dir() { 0 } else { m.len() } })
    }

    fn space(&self, path: &Path) -> io::Result<Space> {
        let st = rustix::fs::statvfs(path)?;
        let block = st.f_frsize.max(1);
        Ok(Space { free_bytes: st.f_bavail.saturating_mul(block), total_bytes: st.f_blocks.saturating_mul(block) })
    }

    fn unique_u64(&self, salt: u64) -> u64 {
        use std::hash::{BuildHasher, Hasher};
        // The standard library's hash keys come from the OS's random source.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(salt);
        h.write_u32(std::process::id());
        if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
            h.write_u128(t.as_nanos());
        }
        h.finish()
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        std::fs::read(path)
    }
}

/// A file of [`RealFs`].
#[derive(Debug)]
pub struct RealFile(File);

impl FsFile for RealFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.0.read_at(buf, offset)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_exact_at(buf, offset)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_all_at(buf, offset)
    }

    fn len_bytes(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }

    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        rustix::fs::fallocate(&self.0, rustix::fs::FallocateFlags::empty(), offset, len).map_err(io::Error::from)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }

    fn sync_all(&self) -> io::Result<()> {
        self.0.sync_all()
    }

    fn try_lock_exclusive(&self) -> io::Result<bool> {
        match rustix::fs::flock(&self.0, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(true),
            Err(rustix::io::Errno::WOULDBLOCK) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}
