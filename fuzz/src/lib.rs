//! Helpers shared by the fuzz targets (see `fuzz_targets/`).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// One current-thread runtime per fuzzing process: the stores do their IO in
/// `spawn_blocking`, the gossip task is spawned on it.
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime"))
}

/// A fresh, empty directory for one input (the same path every time, emptied first).
/// Lives in /dev/shm when available: the stores fsync a lot.
pub fn scratch_dir() -> PathBuf {
    static ROOT: OnceLock<tempfile::TempDir> = OnceLock::new();
    let root = ROOT.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        let base = if shm.is_dir() { shm.to_path_buf() } else { std::env::temp_dir() };
        tempfile::Builder::new().prefix("eventtermq-fuzz-").tempdir_in(base).expect("scratch dir")
    });
    let dir = root.path().join("d");
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => panic!("cannot clear {}: {e}", dir.display()),
    }
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// Splits `data` into up to `n` parts at the separator `\0\0|` (missing parts are
/// `None`), so one input can describe several files.
pub fn split_parts(data: &[u8], n: usize) -> Vec<Option<&[u8]>> {
    const SEP: &[u8] = b"\0\0|";
    let mut parts = Vec::with_capacity(n);
    let mut rest = Some(data);
    while parts.len() < n {
        match rest {
            None => parts.push(None),
            Some(r) if parts.len() + 1 == n => {
                parts.push(Some(r));
                rest = None;
            }
            Some(r) => match r.windows(SEP.len()).position(|w| w == SEP) {
                Some(i) => {
                    parts.push(Some(&r[..i]));
                    rest = Some(&r[i + SEP.len()..]);
                }
                None => {
                    parts.push(Some(r));
                    rest = None;
                }
            },
        }
    }
    parts
}

/// Frames every `\n`-separated line of `data` as a log record (valid checksums, so
/// the fuzzer reaches the JSON and index checks behind the framing).
pub fn frame_lines(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for line in data.split(|b| *b == b'\n') {
        eventtermq::cluster_state::log_store::encode_record(line, &mut out);
    }
    out
}
