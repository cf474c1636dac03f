//! The storage tests' view of a filesystem: the same test body runs against the real
//! one (in a temporary directory) and against a simulated disk ([`SimFs`]), through the
//! [`crate::fs::Fs`] seam, so the simulated disk is held to everything the real one is.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use crate::fs::{Fs, OpenMode, RealFs};
use crate::sim::SimFs;
use crate::Config;

pub(crate) struct Env {
    pub fs: Arc<dyn Fs>,
    pub sim: Option<SimFs>,
    /// Keeps the real temporary directories until the test ends.
    tmp: std::sync::Mutex<Vec<tempfile::TempDir>>,
    next: AtomicU32,
}

/// A directory of a test (`path()` like `tempfile::TempDir`'s).
pub(crate) struct TestDir(PathBuf);

impl TestDir {
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Env {
    pub fn real() -> Env {
        Env { fs: RealFs::shared(), sim: None, tmp: Default::default(), next: AtomicU32::new(0) }
    }

    pub fn sim() -> Env {
        let sim = SimFs::new(0x5eed);
        Env { fs: sim.as_fs(), sim: Some(sim), tmp: Default::default(), next: AtomicU32::new(0) }
    }

    /// A new, empty directory.
    pub fn tempdir(&self) -> TestDir {
        match &self.sim {
            None => {
                let t = tempfile::tempdir().unwrap();
                let p = t.path().to_path_buf();
                self.tmp.lock().unwrap().push(t);
                TestDir(p)
            }
            Some(sim) => {
                let p = PathBuf::from(format!("/tmp/t{}", self.next.fetch_add(1, Ordering::Relaxed)));
                sim.create_dir_all(&p).unwrap();
                TestDir(p)
            }
        }
    }

    /// A store configuration on this filesystem.
    pub fn config(&self) -> Config {
        Config { fs: self.fs.clone(), ..Config::default() }
    }

    pub fn read(&self, path: &Path) -> Vec<u8> {
        self.fs.read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
    }

    pub fn read_to_string(&self, path: &Path) -> String {
        String::from_utf8(self.read(path)).unwrap()
    }

    /// Replaces the file's content (what damage or a crash left there).
    pub fn write(&self, path: &Path, bytes: impl AsRef<[u8]>) {
        let f = self.fs.open(path, OpenMode::Truncate).unwrap();
        f.write_all_at(bytes.as_ref(), 0).unwrap();
    }

    pub fn len(&self, path: &Path) -> u64 {
        self.fs.metadata(path).unwrap().len_bytes
    }

    pub fn set_len(&self, path: &Path, len: u64) {
        self.fs.open(path, OpenMode::ReadWrite).unwrap().set_len(len).unwrap();
    }

    pub fn remove(&self, path: &Path) {
        self.fs.remove_file(path).unwrap();
    }

    pub fn rename(&self, from: &Path, to: &Path) {
        self.fs.rename(from, to).unwrap();
    }

    pub fn exists(&self, path: &Path) -> bool {
        self.fs.exists(path)
    }

    pub fn create_dir(&self, path: &Path) {
        self.fs.create_dir_all(path).unwrap();
    }

    /// Names in a directory.
    pub fn count(&self, dir: &Path) -> usize {
        self.fs.read_dir(dir).unwrap().len()
    }
}

/// Runs each test body (`fn name(e: &Env) { ... }`) once on the real filesystem and
/// once on a simulated disk: `name::real` and `name::sim`.
macro_rules! on_both {
    ($($(#[$meta:meta])* fn $name:ident($e:ident: &Env) $body:block)*) => {
        $(
            mod $name {
                #[allow(unused_imports)]
                use super::*;
                $(#[$meta])*
                fn body($e: &$crate::test_env::Env) $body
                #[test]
                fn real() {
                    body(&$crate::test_env::Env::real())
                }
                #[test]
                fn sim() {
                    body(&$crate::test_env::Env::sim())
                }
            }
        )*
    };
}
pub(crate) use on_both;
