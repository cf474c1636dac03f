//! The node id: a random u64 chosen once and kept in `<dir>/id`.
//!
//! The file is a record file of the storage crate's durable-file module: one framed
//! record `[u32 len][u32 crc32c][decimal id]`, replaced atomically. The checksum matters
//! here more than anywhere: a node that misreads its id rejoins the cluster as a second
//! member (one flipped bit turned 12450357857228966084 into 12440357857228966084).
//! So an id file that fails its checksum or does not parse stops the node with an error
//! that says what to do; it never becomes a new id.
//!
//! Files written before the checksum (plain decimal digits and a newline) are accepted
//! once and rewritten in the framed format.

use std::path::Path;

use eventtermq_storage::durable;
use eventtermq_storage::fs::Fs;

use super::NodeError;

const ID_FILE: &str = "id";

/// What to do about a damaged id file: the operator decides, the node does not guess.
fn damaged(dir: &Path, path: &Path, why: &str) -> NodeError {
    NodeError::Storage(format!(
        "{why}; refusing to start rather than risk joining the cluster under a wrong id. Restore {} from a \
         backup (or write the right id with --id after removing the file), or wipe the data directory {} \
         to rejoin the cluster as a new member",
        path.display(),
        dir.display()
    ))
}

/// A node id as stored: decimal digits of a non-zero u64 (0 is reserved, never chosen).
fn parse_id(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok().filter(|id| *id != 0)
}

/// The id in an id file written before the checksum: plain decimal digits, perhaps
/// followed by a newline (what the old code wrote). A framed file never looks like one:
/// its first byte is a length of at most 20.
fn parse_legacy(bytes: &[u8]) -> Option<u64> {
    parse_id(bytes.trim_ascii_end())
}

/// Writes the id file (a record file: tmp, fsync, rename, fsync of the directory).
fn store(fs: &dyn Fs, path: &Path, id: u64) -> Result<(), NodeError> {
    durable::write_record_file(fs, path, id.to_string().as_bytes()).map_err(|e| NodeError::Storage(e.to_string()))
}

/// The id persisted in `dir`, or a new one (`requested`, else random) persisted now.
/// `requested` must match a persisted id.
pub fn load_or_create(fs: &dyn Fs, dir: &Path, requested: Option<u64>) -> Result<u64, NodeError> {
    let path = dir.join(ID_FILE);
    let bytes = match durable::read_replaced_file(fs, &path) {
        Ok(Some(bytes)) => bytes,
        Ok(None) => return create(fs, &path, requested),
        Err(e) => return Err(NodeError::Storage(e.to_string())),
    };
    let (persisted, legacy) = match durable::decode_record_file(&bytes) {
        Ok(payload) => match parse_id(payload) {
            Some(id) => (id, false),
            None => {
                let why =
                    format!("{}: the node id file holds no node id (\"{}\")", path.display(), payload.escape_ascii());
                return Err(damaged(dir, &path, &why));
            }
        },
        // Not one framed record: either a file from before the checksum, or damage.
        Err(reason) => match parse_legacy(&bytes) {
            Some(id) => (id, true),
            None => {
                let why = format!("{}: the node id file is damaged ({reason})", path.display());
                return Err(damaged(dir, &path, &why));
            }
        },
    };
    if let Some(r) = requested {
        if r != persisted {
            return Err(NodeError::Config(format!(
                "--id: {r} differs from the id {persisted} persisted in {}; a data directory belongs to one node",
                path.display()
            )));
        }
    }
    if legacy {
        store(fs, &path, persisted)?;
        tracing::info!(file = %path.display(), id = persisted,
            "rewrote the node id file with a checksum (it held plain digits)");
    }
    Ok(persisted)
}

fn create(fs: &dyn Fs, path: &Path, requested: Option<u64>) -> Result<u64, NodeError> {
    let id = match requested {
        Some(0) => return Err(NodeError::Config("--id: 0 is reserved; use a non-zero u64".into())),
        Some(id) => id,
        None => loop {
            let id: u64 = rand::random();
            if id != 0 {
                break id;
            }
        },
    };
    store(fs, path, id)?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use eventtermq_storage::fs::RealFs;

    #[test]
    fn id_is_persisted_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let id = load_or_create(&RealFs, dir.path(), None).unwrap();
        assert_eq!(load_or_create(&RealFs, dir.path(), None).unwrap(), id);
        assert_eq!(load_or_create(&RealFs, dir.path(), Some(id)).unwrap(), id);
        let err = load_or_create(&RealFs, dir.path(), Some(id.wrapping_add(1))).unwrap_err();
        assert!(err.to_string().contains("--id"), "{err}");
    }

    #[test]
    fn explicit_id_is_used_on_first_start() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load_or_create(&RealFs, dir.path(), Some(42)).unwrap(), 42);
        assert_eq!(load_or_create(&RealFs, dir.path(), None).unwrap(), 42);
    }

    #[test]
    fn missing_file_is_created_in_the_checksummed_format() {
        let dir = tempfile::tempdir().unwrap();
        let id = load_or_create(&RealFs, dir.path(), None).unwrap();
        assert_ne!(id, 0);
        let bytes = fs::read(dir.path().join(ID_FILE)).unwrap();
        assert_eq!(durable::decode_record_file(&bytes), Ok(id.to_string().as_bytes()));
        assert!(!durable::tmp_path(&dir.path().join(ID_FILE)).exists());
        assert!(matches!(
            load_or_create(&RealFs, tempfile::tempdir().unwrap().path(), Some(0)),
            Err(NodeError::Config(_))
        ));
    }

    #[test]
    fn plain_digits_are_migrated_once() {
        for old in ["12450357857228966084\n", "12450357857228966084", "7\r\n"] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join(ID_FILE);
            fs::write(&path, old).unwrap();
            let expected: u64 = old.trim().parse().unwrap();
            assert_eq!(load_or_create(&RealFs, dir.path(), None).unwrap(), expected, "{old:?}");
            let bytes = fs::read(&path).unwrap();
            assert_eq!(durable::decode_record_file(&bytes), Ok(expected.to_string().as_bytes()), "{old:?}");
            assert_eq!(load_or_create(&RealFs, dir.path(), Some(expected)).unwrap(), expected);
            assert_eq!(fs::read(&path).unwrap(), bytes, "migrated once, then left alone");
        }
    }

    #[test]
    fn plain_digits_with_another_requested_id_are_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(ID_FILE);
        fs::write(&path, "12345\n").unwrap();
        let err = load_or_create(&RealFs, dir.path(), Some(999)).unwrap_err();
        assert!(err.to_string().contains("--id: 999 differs from the id 12345"), "{err}");
        assert_eq!(fs::read(&path).unwrap(), b"12345\n");
    }

    #[test]
    fn every_flipped_bit_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let id = load_or_create(&RealFs, dir.path(), Some(12450357857228966084)).unwrap();
        let path = dir.path().join(ID_FILE);
        let good = fs::read(&path).unwrap();
        for bit in 0..good.len() * 8 {
            let mut bad = good.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            fs::write(&path, &bad).unwrap();
            let err = load_or_create(&RealFs, dir.path(), None).expect_err(&format!("bit {bit} accepted"));
            let msg = err.to_string();
            assert!(matches!(err, NodeError::Storage(_)), "bit {bit}: {msg}");
            assert!(msg.contains(&path.display().to_string()), "bit {bit}: {msg}");
            assert!(msg.contains("wipe the data directory") && msg.contains("Restore"), "bit {bit}: {msg}");
            assert_eq!(fs::read(&path).unwrap(), bad, "bit {bit}: a refused file is left as it is");
        }
        fs::write(&path, &good).unwrap();
        assert_eq!(load_or_create(&RealFs, dir.path(), None).unwrap(), id);
    }

    #[test]
    fn truncated_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        load_or_create(&RealFs, dir.path(), Some(12450357857228966084)).unwrap();
        let path = dir.path().join(ID_FILE);
        let good = fs::read(&path).unwrap();
        for len in 0..good.len() {
            fs::write(&path, &good[..len]).unwrap();
            let err = load_or_create(&RealFs, dir.path(), None).expect_err(&format!("{len} bytes accepted"));
            assert!(err.to_string().contains("node id file is damaged"), "{len} bytes: {err}");
        }
    }

    #[test]
    fn unparsable_content_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(ID_FILE);
        let framed = |payload: &[u8]| {
            let mut out = Vec::new();
            durable::encode_record(payload, &mut out).unwrap();
            out
        };
        let cases: Vec<Vec<u8>> = vec![
            b"".to_vec(),
            b"\n".to_vec(),
            b"0\n".to_vec(),
            b"12x45\n".to_vec(),
            b"99999999999999999999999\n".to_vec(),
            b"-5\n".to_vec(),
            framed(b"0"),
            framed(b"not a number"),
            framed(b"12345\n"),
            framed(b""),
        ];
        for bytes in cases {
            fs::write(&path, &bytes).unwrap();
            let err = load_or_create(&RealFs, dir.path(), None).expect_err(&format!("{bytes:?} accepted"));
            assert!(matches!(err, NodeError::Storage(_)), "{bytes:?}: {err}");
            assert!(err.to_string().contains("wipe the data directory"), "{bytes:?}: {err}");
            assert_eq!(fs::read(&path).unwrap(), bytes);
        }
    }
}
