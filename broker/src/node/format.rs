//! The data directory's format marker: `<dir>/FORMAT`.
//!
//! A data directory outlives the binary that wrote it: a node is upgraded by starting a
//! newer binary on it, and may be downgraded the same way. A binary that met files of a
//! format it does not know would take them for damage (a segment with an unknown
//! version is set aside as corrupt), and on a downgrade of every node that throws data
//! away. So before anything else in the directory is opened (after the directory lock)
//! the node reads this marker and decides, with the pure [`decide`]:
//!
//! - no marker and no data: a new directory; the marker is written (this binary's format);
//! - no marker but data (`id`, `raft/`, `segments/`): written by a release from before
//!   the marker, which all wrote format 1; the marker is written;
//! - a format this binary reads but older than the one it writes: the marker is raised
//!   to this binary's format before anything is written in it, so an older binary that
//!   cannot read the new files refuses the directory instead of misreading it;
//! - a format newer than this binary reads: refused ("downgrade refused"), nothing
//!   changed, exit status [`REFUSED_EXIT_STATUS`];
//! - a format older than this binary reads: refused likewise ("upgrade through ... first").
//!
//! The marker is a record file of the durable-file module (one framed, checksummed
//! record, replaced atomically) holding `key value` lines: `format N` and `written_by
//! eventtermq X.Y.Z`. Readers ignore keys they do not know, so later releases may add
//! some; the `format` line itself never changes meaning.

use std::path::{Path, PathBuf};

use eventtermq_storage::durable;
use eventtermq_storage::fs::Fs;

use super::NodeError;

/// Name of the marker in the data directory.
pub const FORMAT_FILE: &str = "FORMAT";

/// The data-directory format this binary writes. Raise it (and add the release to
/// [`RELEASES`]) with any change to a file in the data directory that an older binary
/// would misread: the segment codec's `FORMAT_VERSION`, the Raft log's or snapshot's
/// encoding, the layout of the directory.
pub const DATA_FORMAT: u32 = 1;
/// The oldest data-directory format this binary reads (and raises to [`DATA_FORMAT`]).
pub const DATA_FORMAT_READ_MIN: u32 = 1;

/// The first release that wrote each format, oldest first: named in a refusal so that
/// the user knows which release to go through.
pub const RELEASES: &[(u32, &str)] = &[(1, "0.1.0")];

/// The process exit status of a broker that refuses a directory's format (README,
/// "Upgrades and downgrades"); other refusals to start exit 1.
pub const REFUSED_EXIT_STATUS: u8 = 4;

/// Who wrote a directory without a marker.
const PRE_MARKER_WRITER: &str = "a release from before the format marker (eventtermq 0.1.0)";

/// This binary, as the marker names it.
pub fn this_binary() -> String {
    format!("eventtermq {}", env!("CARGO_PKG_VERSION"))
}

/// What a binary reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Compat {
    pub writes: u32,
    pub reads_from: u32,
}

impl Compat {
    /// This binary's.
    pub const THIS: Compat = Compat { writes: DATA_FORMAT, reads_from: DATA_FORMAT_READ_MIN };
}

/// The content of a marker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Marker {
    pub format: u32,
    pub written_by: String,
}

impl Marker {
    fn encode(&self) -> String {
        format!("format {}\nwritten_by {}\n", self.format, self.written_by)
    }

    fn parse(payload: &[u8]) -> Result<Marker, String> {
        let text = std::str::from_utf8(payload).map_err(|_| "not UTF-8 text".to_string())?;
        let (mut format, mut written_by) = (None, None);
        for line in text.lines() {
            let (key, value) = line.split_once(' ').unwrap_or((line, ""));
            match key {
                "format" => {
                    format = Some(value.trim().parse::<u32>().map_err(|_| format!("format \"{value}\" is no number"))?)
                }
                "written_by" => written_by = Some(value.trim().to_string()),
                // A later release's addition.
                _ => {}
            }
        }
        let format = format.ok_or_else(|| "no \"format\" line".to_string())?;
        Ok(Marker { format, written_by: written_by.unwrap_or_else(|| "an unnamed release".to_string()) })
    }
}

/// What the directory holds, as far as the decision goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Found {
    /// No marker and nothing of a node's.
    Empty,
    /// No marker, but a node's files: from before the marker.
    Unmarked,
    Marked(Marker),
}

/// Why a directory is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RefusalKind {
    /// Written by a newer binary: going back would misread it.
    Newer,
    /// Written by a binary so old that this one no longer reads it.
    Older,
}

/// What [`decide`] tells the node to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The marker names this binary's format: nothing to write.
    Keep,
    /// Write a marker of this format before anything else is written (`from`: the
    /// format found, `None` for a new directory).
    Write {
        format: u32,
        from: Option<u32>,
    },
    Refuse {
        kind: RefusalKind,
        found: Marker,
    },
}

/// The pure decision (see the module's header).
pub fn decide(found: &Found, compat: Compat) -> Decision {
    let marker = match found {
        Found::Empty => return Decision::Write { format: compat.writes, from: None },
        Found::Unmarked => Marker { format: 1, written_by: PRE_MARKER_WRITER.to_string() },
        Found::Marked(m) => m.clone(),
    };
    if marker.format > compat.writes {
        Decision::Refuse { kind: RefusalKind::Newer, found: marker }
    } else if marker.format < compat.reads_from {
        Decision::Refuse { kind: RefusalKind::Older, found: marker }
    } else if marker.format < compat.writes || *found == Found::Unmarked {
        Decision::Write { format: compat.writes, from: Some(marker.format) }
    } else {
        Decision::Keep
    }
}

/// A directory this binary will not open: the message says why and what to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub dir: PathBuf,
    pub kind: RefusalKind,
    pub found: Marker,
    pub compat: Compat,
}

fn first_release(format: u32) -> Option<&'static str> {
    RELEASES.iter().find(|(f, _)| *f == format).map(|(_, v)| *v)
}

fn range(compat: Compat) -> String {
    if compat.reads_from == compat.writes {
        format!("format {}", compat.writes)
    } else {
        format!("formats {} to {}", compat.reads_from, compat.writes)
    }
}

impl std::error::Error for Refusal {}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message())
    }
}

impl Refusal {
    fn message(&self) -> String {
        let Refusal { dir, kind, found, compat } = self;
        let head = format!(
            "data directory {} has format {} (written by {}); this binary ({}) reads {}",
            dir.display(),
            found.format,
            found.written_by,
            this_binary(),
            range(*compat)
        );
        match kind {
            RefusalKind::Newer => format!(
                "{head}: downgrade refused, nothing in the directory was changed. Start this node with {} or a later \
                 release (on Kubernetes: set spec.image back to it); going back to this release needs a backup of the \
                 directory taken before the upgrade, or an empty directory joining the cluster as a new member with \
                 --join",
                found.written_by
            ),
            RefusalKind::Older => {
                let through = first_release(compat.reads_from)
                    .map(|v| format!("eventtermq {v}"))
                    .unwrap_or_else(|| format!("a release that writes format {}", compat.reads_from));
                format!(
                    "{head}: the format is too old for this release, nothing in the directory was changed. Upgrade \
                     through {through} or a later release that still reads format {} first (start this node with it \
                     once; it raises the directory to its format), then start this release",
                    found.format
                )
            }
        }
    }
}

/// Whether `dir` holds a node's files (what a release before the marker left).
fn holds_node_files(fs: &dyn Fs, dir: &Path) -> bool {
    ["id", "raft", "segments"].iter().any(|name| fs.exists(&dir.join(name)))
}

/// Reads the marker of `dir` (locked by the caller), decides, and writes the marker
/// when the decision says so. A refusal changes nothing.
pub fn check_and_mark(fs: &dyn Fs, dir: &Path) -> Result<(), NodeError> {
    check_and_mark_with(fs, dir, Compat::THIS)
}

fn check_and_mark_with(fs: &dyn Fs, dir: &Path, compat: Compat) -> Result<(), NodeError> {
    let path = dir.join(FORMAT_FILE);
    let found = match durable::read_record_file(fs, &path) {
        Ok(Some(payload)) => Found::Marked(Marker::parse(&payload).map_err(|why| damaged(&path, &why))?),
        Ok(None) if holds_node_files(fs, dir) => Found::Unmarked,
        Ok(None) => Found::Empty,
        Err(durable::FileError::Corrupt { reason, .. }) => return Err(damaged(&path, &reason)),
        Err(e) => return Err(NodeError::Storage(e.to_string())),
    };
    match decide(&found, compat) {
        Decision::Keep => {
            tracing::debug!(dir = %dir.display(), format = compat.writes, "data directory format");
            Ok(())
        }
        Decision::Write { format, from } => {
            let marker = Marker { format, written_by: this_binary() };
            durable::write_record_file(fs, &path, marker.encode().as_bytes())
                .map_err(|e| NodeError::Storage(e.to_string()))?;
            match from {
                None => tracing::info!(dir = %dir.display(), format, "new data directory: format marker written"),
                Some(old) => tracing::info!(dir = %dir.display(), from_format = old, format,
                    "data directory format marker written (upgraded in place)"),
            }
            Ok(())
        }
        Decision::Refuse { kind, found } => {
            Err(NodeError::DataFormat(Refusal { dir: dir.to_path_buf(), kind, found, compat }))
        }
    }
}

fn damaged(path: &Path, why: &str) -> NodeError {
    NodeError::Storage(format!(
        "{}: the data directory's format marker is damaged ({why}); refusing to start rather than guess which \
         release wrote the directory. If the directory was last used by a release up to eventtermq 0.1.0 (format 1), \
         remove the file: the node writes it again",
        path.display()
    ))
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use eventtermq_storage::fs::RealFs;

    const V1: Compat = Compat { writes: 1, reads_from: 1 };
    /// A later binary that writes format 3 and still reads 2.
    const V3: Compat = Compat { writes: 3, reads_from: 2 };

    fn marked(format: u32) -> Found {
        Found::Marked(Marker { format, written_by: format!("eventtermq test-{format}") })
    }

    #[test]
    fn decisions() {
        assert_eq!(decide(&Found::Empty, V1), Decision::Write { format: 1, from: None });
        assert_eq!(decide(&Found::Unmarked, V1), Decision::Write { format: 1, from: Some(1) });
        assert_eq!(decide(&marked(1), V1), Decision::Keep);
        assert!(
            matches!(decide(&marked(2), V1), Decision::Refuse { kind: RefusalKind::Newer, found } if found.format == 2)
        );
        assert_eq!(decide(&Found::Empty, V3), Decision::Write { format: 3, from: None });
        assert_eq!(decide(&marked(2), V3), Decision::Write { format: 3, from: Some(2) });
        assert_eq!(decide(&marked(3), V3), Decision::Keep);
        assert!(matches!(decide(&marked(4), V3), Decision::Refuse { kind: RefusalKind::Newer, .. }));
        assert!(matches!(decide(&marked(1), V3), Decision::Refuse { kind: RefusalKind::Older, .. }));
        // A directory from before the marker is format 1: too old for a binary reading 2+.
        assert!(matches!(
            decide(&Found::Unmarked, V3),
            Decision::Refuse { kind: RefusalKind::Older, found } if found.format == 1
        ));
    }

    #[test]
    fn refusal_messages_say_what_and_what_to_do() {
        let newer = Refusal {
            dir: "/data".into(),
            kind: RefusalKind::Newer,
            found: Marker { format: 2, written_by: "eventtermq 0.2.0".into() },
            compat: V1,
        };
        let msg = newer.to_string();
        for part in [
            "data directory /data has format 2",
            "written by eventtermq 0.2.0",
            "reads format 1",
            "downgrade refused",
            "nothing in the directory was changed",
            "Start this node with eventtermq 0.2.0 or a later release",
        ] {
            assert!(msg.contains(part), "{part:?} missing: {msg}");
        }
        let older = Refusal {
            dir: "/data".into(),
            kind: RefusalKind::Older,
            found: Marker { format: 1, written_by: "eventtermq 0.1.0".into() },
            compat: V3,
        };
        let msg = older.to_string();
        for part in ["has format 1", "reads formats 2 to 3", "Upgrade through", "still reads format 1 first"] {
            assert!(msg.contains(part), "{part:?} missing: {msg}");
        }
    }

    #[test]
    fn marker_round_trips_and_ignores_unknown_keys() {
        let m = Marker { format: 7, written_by: "eventtermq 9.9.9".into() };
        assert_eq!(Marker::parse(m.encode().as_bytes()), Ok(m));
        let later = b"format 2\nwritten_by eventtermq 0.3.0 (abc)\nconverted_from 1\n";
        assert_eq!(Marker::parse(later), Ok(Marker { format: 2, written_by: "eventtermq 0.3.0 (abc)".into() }));
        assert!(Marker::parse(b"written_by x\n").is_err());
        assert!(Marker::parse(b"format two\n").is_err());
    }

    #[test]
    fn new_and_unmarked_directories_get_the_marker() {
        let dir = tempfile::tempdir().unwrap();
        check_and_mark(&RealFs, dir.path()).unwrap();
        let payload = durable::read_record_file(&RealFs, &dir.path().join(FORMAT_FILE)).unwrap().unwrap();
        assert_eq!(Marker::parse(&payload), Ok(Marker { format: DATA_FORMAT, written_by: this_binary() }));

        let old = tempfile::tempdir().unwrap();
        fs::create_dir(old.path().join("raft")).unwrap();
        check_and_mark(&RealFs, old.path()).unwrap();
        assert!(old.path().join(FORMAT_FILE).exists());
        // Kept as it is on the next start.
        let before = fs::read(old.path().join(FORMAT_FILE)).unwrap();
        check_and_mark(&RealFs, old.path()).unwrap();
        assert_eq!(fs::read(old.path().join(FORMAT_FILE)).unwrap(), before);
    }

    #[test]
    fn newer_format_is_refused_and_nothing_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FORMAT_FILE);
        let newer = Marker { format: DATA_FORMAT + 1, written_by: "eventtermq 99.0.0".into() };
        durable::write_record_file(&RealFs, &path, newer.encode().as_bytes()).unwrap();
        let before = fs::read(&path).unwrap();
        let err = check_and_mark(&RealFs, dir.path()).unwrap_err();
        assert!(matches!(&err, NodeError::DataFormat(r) if r.kind == RefusalKind::Newer), "{err}");
        assert!(err.to_string().contains("downgrade refused"), "{err}");
        assert_eq!(fs::read(&path).unwrap(), before);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "nothing else written");
    }

    #[test]
    fn older_format_is_refused_by_a_binary_that_no_longer_reads_it() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("id"), "12345\n").unwrap();
        let err = check_and_mark_with(&RealFs, dir.path(), V3).unwrap_err();
        assert!(matches!(&err, NodeError::DataFormat(r) if r.kind == RefusalKind::Older), "{err}");
        assert!(!dir.path().join(FORMAT_FILE).exists());
    }

    #[test]
    fn damaged_marker_is_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        check_and_mark(&RealFs, dir.path()).unwrap();
        let path = dir.path().join(FORMAT_FILE);
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 2;
        bytes[last] ^= 1;
        fs::write(&path, &bytes).unwrap();
        let err = check_and_mark(&RealFs, dir.path()).unwrap_err();
        assert!(matches!(err, NodeError::Storage(_)), "{err}");
        assert!(err.to_string().contains("format marker is damaged"), "{err}");
        assert_eq!(fs::read(&path).unwrap(), bytes);
    }
}
