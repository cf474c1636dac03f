//! The node id: a random u64 chosen once and kept in `<dir>/id`.

use std::io::Write;
use std::path::Path;

use super::NodeError;

pub fn load_or_create(dir: &Path, requested: Option<u64>) -> Result<u64, NodeError> {
    let path = dir.join("id");
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let persisted: u64 = text.trim().parse().map_err(|_| {
                NodeError::Config(format!(
                    "{}: does not hold a node id (expected a decimal u64, got {:?})",
                    path.display(),
                    text.trim()
                ))
            })?;
            if let Some(r) = requested {
                if r != persisted {
                    return Err(NodeError::Config(format!(
                        "--id: {r} differs from the id {persisted} persisted in {}; a data directory belongs to one node",
                        path.display()
                    )));
                }
            }
            Ok(persisted)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
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
            // Write-then-rename so a crash never leaves a half-written id behind.
            let tmp = dir.join("id.tmp");
            let mut f = std::fs::File::create(&tmp)?;
            writeln!(f, "{id}")?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(dir)?.sync_all()?;
            Ok(id)
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_is_persisted_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let id = load_or_create(dir.path(), None).unwrap();
        assert_eq!(load_or_create(dir.path(), None).unwrap(), id);
        assert_eq!(load_or_create(dir.path(), Some(id)).unwrap(), id);
        let err = load_or_create(dir.path(), Some(id.wrapping_add(1))).unwrap_err();
        assert!(err.to_string().contains("--id"), "{err}");
    }

    #[test]
    fn explicit_id_is_used_on_first_start() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load_or_create(dir.path(), Some(42)).unwrap(), 42);
        assert_eq!(load_or_create(dir.path(), None).unwrap(), 42);
    }
}
