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
        eventtermq_storage::durable::encode_record(line, &mut out).expect("fuzz inputs are within the record limit");
    }
    out
}

/// Frames every `\n`-separated line of `data` as a segment record (offsets 0, 1, ...,
/// timestamp = offset, valid checksums), so the fuzzer reaches what lies behind the
/// framing.
pub fn frame_records(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, line) in data.split(|b| *b == b'\n').enumerate() {
        eventtermq_storage::codec::encode_frame(&mut out, i as u64, i as i64, line);
    }
    out
}

/// A segment file: a valid header, the lines of `data` as records (see
/// [`frame_records`]) and, with `seal`, a valid seal trailer.
pub fn build_segment(id: u64, nonce: u64, data: &[u8], seal: bool) -> Vec<u8> {
    use eventtermq_storage::codec::{encode_header, encode_trailer, FileHeader, FileKind, SealTrailer};
    let mut out = Vec::new();
    encode_header(&mut out, &FileHeader { kind: FileKind::Segment, segment_id: id, nonce });
    let records = frame_records(data);
    out.extend_from_slice(&records);
    if seal {
        let record_count = data.split(|b| *b == b'\n').count() as u64;
        let trailer =
            SealTrailer { nonce, record_count, records_len: records.len() as u64, checksum: crc32c::crc32c(&records) };
        encode_trailer(&mut out, &trailer);
    }
    out
}

/// `entries` after a valid index file header.
pub fn with_index_header(id: u64, nonce: u64, entries: &[u8]) -> Vec<u8> {
    use eventtermq_storage::codec::{encode_header, FileHeader, FileKind};
    let mut out = Vec::new();
    encode_header(&mut out, &FileHeader { kind: FileKind::Index, segment_id: id, nonce });
    out.extend_from_slice(entries);
    out
}
