//! Byte formats of the segment and index files (all integers little endian).
//!
//! - File header, 28 bytes, at the start of `<id>.seg` and `<id>.idx`:
//!   `magic [u8; 6]` (`EMQSEG` or `EMQIDX`), `version u16` (1), `segment id u64`,
//!   `nonce u64` (random, chosen when the segment is created), `crc32c u32` of the
//!   first 24 bytes.
//! - Record frame, 24 bytes + payload: `len u32` (bytes after the checksum field:
//!   16 + payload length), `crc32c u32` of those bytes, `offset u64`,
//!   `timestamp_ms i64`, `payload`.
//! - Index entry, 28 bytes: `offset u64`, `position u64` (of the record's frame in the
//!   segment file), `timestamp_ms i64`, `crc32c u32` of the first 24 bytes.
//! - Seal trailer, 40 bytes, after the last record of a sealed segment:
//!   `magic [u8; 8]` (`EMQ-SEAL`), `nonce u64` (the segment header's), `record_count u64`,
//!   `records_len u64` (bytes of all record frames), `checksum u32` (crc32c of all record
//!   frames), `crc32c u32` of the first 36 bytes. Read as a record frame, its first four
//!   bytes are a length far above the maximum, so a scan never mistakes it for a record.
//!
//! Decoders tell "need more bytes" ([`Decoded::Incomplete`]) from "invalid"
//! ([`CodecError`]) and never panic, whatever the bytes.

use bytes::Bytes;

use crate::durable::{checksum, verify_checksum, ChecksumMismatch};
use crate::Record;

/// Bytes of a file header.
pub const FILE_HEADER_LEN: usize = 28;
/// Bytes of a record frame before the payload.
pub const FRAME_HEADER_LEN: usize = 24;
/// Bytes of an index entry.
pub const INDEX_ENTRY_LEN: usize = 28;
/// Bytes of a seal trailer.
pub const TRAILER_LEN: usize = 40;
/// Largest payload a record may carry: the one limit of every framed record a node
/// writes ([`crate::durable::RECORD_PAYLOAD_MAX_BYTES`]). A length field above it is
/// garbage (or a seal trailer), not a record that is still being written.
pub use crate::durable::RECORD_PAYLOAD_MAX_BYTES;
/// Format version written in file headers.
pub const FORMAT_VERSION: u16 = 1;

const SEGMENT_MAGIC: [u8; 6] = *b"EMQSEG";
const INDEX_MAGIC: [u8; 6] = *b"EMQIDX";
const TRAILER_MAGIC: [u8; 8] = *b"EMQ-SEAL";
/// Bytes of a frame covered by its `len` and checksum: offset and timestamp.
const FRAME_FIXED_LEN: usize = 16;

/// Result of decoding a value at the start of a buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decoded<T> {
    /// A complete, valid value that used the given number of bytes.
    Complete(T, usize),
    /// The buffer ends inside the value: at least `needed` more bytes are required
    /// (exactly `needed` once the length of the value is known).
    Incomplete { needed: usize },
}

/// The bytes are not a valid value (as opposed to too few bytes).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("record length field {len} is out of range (16..={max})", max = FRAME_FIXED_LEN + RECORD_PAYLOAD_MAX_BYTES)]
    BadLength { len: u32 },
    #[error("checksum mismatch (stored {stored:08x}, computed {computed:08x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("bad magic bytes")]
    BadMagic,
    #[error("unsupported format version {version}")]
    UnsupportedVersion { version: u16 },
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[at..at + 4]);
    u32::from_le_bytes(b)
}

fn u64_at(buf: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[at..at + 8]);
    u64::from_le_bytes(b)
}

fn check(stored: u32, covered: &[u8]) -> Result<(), CodecError> {
    verify_checksum(stored, covered)
        .map_err(|ChecksumMismatch { stored, computed }| CodecError::Checksum { stored, computed })
}

// ---------------------------------------------------------------------------------------
// File header
// ---------------------------------------------------------------------------------------

/// Which file a header starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    Segment,
    Index,
}

/// The header at the start of a segment or index file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileHeader {
    pub kind: FileKind,
    pub segment_id: u64,
    /// Random value chosen at creation: ties the index file and the seal trailer to this
    /// incarnation of the segment, and cannot be forged by payload bytes (a client never
    /// sees it).
    pub nonce: u64,
}

pub fn encode_header(out: &mut Vec<u8>, h: &FileHeader) {
    let start = out.len();
    out.extend_from_slice(match h.kind {
        FileKind::Segment => &SEGMENT_MAGIC,
        FileKind::Index => &INDEX_MAGIC,
    });
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&h.segment_id.to_le_bytes());
    out.extend_from_slice(&h.nonce.to_le_bytes());
    let crc = checksum(&out[start..]);
    out.extend_from_slice(&crc.to_le_bytes());
}

pub fn decode_header(buf: &[u8]) -> Result<Decoded<FileHeader>, CodecError> {
    if buf.len() < FILE_HEADER_LEN {
        return Ok(Decoded::Incomplete { needed: FILE_HEADER_LEN - buf.len() });
    }
    let kind = if buf[..6] == SEGMENT_MAGIC {
        FileKind::Segment
    } else if buf[..6] == INDEX_MAGIC {
        FileKind::Index
    } else {
        return Err(CodecError::BadMagic);
    };
    check(u32_at(buf, 24), &buf[..24])?;
    let version = u16::from_le_bytes([buf[6], buf[7]]);
    if version != FORMAT_VERSION {
        return Err(CodecError::UnsupportedVersion { version });
    }
    let header = FileHeader { kind, segment_id: u64_at(buf, 8), nonce: u64_at(buf, 16) };
    Ok(Decoded::Complete(header, FILE_HEADER_LEN))
}

// ---------------------------------------------------------------------------------------
// Record frames
// ---------------------------------------------------------------------------------------

/// The fixed part of a record frame, decoded without its payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// Bytes of the whole frame, header included.
    pub frame_len: usize,
    /// Stored checksum of the frame's bytes after the checksum field.
    pub crc: u32,
    pub offset: u64,
    pub timestamp_ms: i64,
}

impl FrameHeader {
    pub fn payload_len(&self) -> usize {
        self.frame_len - FRAME_HEADER_LEN
    }
}

/// Appends one record frame to `out`. Panics if the payload is larger than
/// [`RECORD_PAYLOAD_MAX_BYTES`] (the writer checks before framing).
pub fn encode_frame(out: &mut Vec<u8>, offset: u64, timestamp_ms: i64, payload: &[u8]) {
    assert!(payload.len() <= RECORD_PAYLOAD_MAX_BYTES, "record payload of {} bytes is too large", payload.len());
    let len = (FRAME_FIXED_LEN + payload.len()) as u32;
    let start = out.len();
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(&timestamp_ms.to_le_bytes());
    out.extend_from_slice(payload);
    let crc = checksum(&out[start + 8..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Appends the frame of `r` to `out` (see [`encode_frame`]).
pub fn encode_record(out: &mut Vec<u8>, r: &Record) {
    encode_frame(out, r.offset, r.timestamp_ms, &r.payload);
}

/// Decodes the fixed part of the frame at the start of `buf` and checks its length
/// field; the checksum is not verified (it covers the payload).
pub fn decode_frame_header(buf: &[u8]) -> Result<Decoded<FrameHeader>, CodecError> {
    if buf.len() >= 4 {
        let len = u32_at(buf, 0);
        if (len as usize) < FRAME_FIXED_LEN || len as usize > FRAME_FIXED_LEN + RECORD_PAYLOAD_MAX_BYTES {
            return Err(CodecError::BadLength { len });
        }
    }
    if buf.len() < FRAME_HEADER_LEN {
        return Ok(Decoded::Incomplete { needed: FRAME_HEADER_LEN - buf.len() });
    }
    let header = FrameHeader {
        frame_len: 8 + u32_at(buf, 0) as usize,
        crc: u32_at(buf, 4),
        offset: u64_at(buf, 8),
        timestamp_ms: u64_at(buf, 16) as i64,
    };
    Ok(Decoded::Complete(header, FRAME_HEADER_LEN))
}

/// Checks the checksum of a complete frame whose header is `h`.
pub fn verify_frame(h: &FrameHeader, frame: &[u8]) -> Result<(), CodecError> {
    check(h.crc, &frame[8..h.frame_len])
}

/// Decodes and verifies the record frame at the start of `buf`; the payload is copied.
pub fn decode_record(buf: &[u8]) -> Result<Decoded<Record>, CodecError> {
    let h = match decode_frame_header(buf)? {
        Decoded::Complete(h, _) => h,
        Decoded::Incomplete { needed } => {
            // With the length field present, the whole frame's size is known.
            let needed = if buf.len() >= 4 { 8 + u32_at(buf, 0) as usize - buf.len() } else { needed };
            return Ok(Decoded::Incomplete { needed });
        }
    };
    if buf.len() < h.frame_len {
        return Ok(Decoded::Incomplete { needed: h.frame_len - buf.len() });
    }
    verify_frame(&h, buf)?;
    let record = Record {
        offset: h.offset,
        timestamp_ms: h.timestamp_ms,
        payload: Bytes::copy_from_slice(&buf[FRAME_HEADER_LEN..h.frame_len]),
    };
    Ok(Decoded::Complete(record, h.frame_len))
}

// ---------------------------------------------------------------------------------------
// Index entries
// ---------------------------------------------------------------------------------------

/// One sparse index entry: the record `offset` starts at byte `position` of the
/// segment file and has `timestamp_ms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    pub offset: u64,
    pub position: u64,
    pub timestamp_ms: i64,
}

pub fn encode_index_entry(out: &mut Vec<u8>, e: &IndexEntry) {
    let start = out.len();
    out.extend_from_slice(&e.offset.to_le_bytes());
    out.extend_from_slice(&e.position.to_le_bytes());
    out.extend_from_slice(&e.timestamp_ms.to_le_bytes());
    let crc = checksum(&out[start..]);
    out.extend_from_slice(&crc.to_le_bytes());
}

pub fn decode_index_entry(buf: &[u8]) -> Result<Decoded<IndexEntry>, CodecError> {
    if buf.len() < INDEX_ENTRY_LEN {
        return Ok(Decoded::Incomplete { needed: INDEX_ENTRY_LEN - buf.len() });
    }
    check(u32_at(buf, 24), &buf[..24])?;
    let entry = IndexEntry { offset: u64_at(buf, 0), position: u64_at(buf, 8), timestamp_ms: u64_at(buf, 16) as i64 };
    Ok(Decoded::Complete(entry, INDEX_ENTRY_LEN))
}

// ---------------------------------------------------------------------------------------
// Seal trailer
// ---------------------------------------------------------------------------------------

/// What a sealed segment's trailer records about its records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SealTrailer {
    /// The segment header's nonce.
    pub nonce: u64,
    pub record_count: u64,
    /// Bytes of all record frames (the file is header + this + trailer).
    pub records_len: u64,
    /// crc32c of all record frames.
    pub checksum: u32,
}

pub fn encode_trailer(out: &mut Vec<u8>, t: &SealTrailer) {
    let start = out.len();
    out.extend_from_slice(&TRAILER_MAGIC);
    out.extend_from_slice(&t.nonce.to_le_bytes());
    out.extend_from_slice(&t.record_count.to_le_bytes());
    out.extend_from_slice(&t.records_len.to_le_bytes());
    out.extend_from_slice(&t.checksum.to_le_bytes());
    let crc = checksum(&out[start..]);
    out.extend_from_slice(&crc.to_le_bytes());
}

/// The nonce field of bytes laid out as a seal trailer, valid or not. Clients never see
/// a segment's nonce, so finding it there means the segment wrote a trailer: if the
/// trailer then fails its checks it is damaged, not record bytes of an unsealed segment.
pub fn trailer_nonce(buf: &[u8]) -> Option<u64> {
    (buf.len() >= 16).then(|| u64_at(buf, 8))
}

pub fn decode_trailer(buf: &[u8]) -> Result<Decoded<SealTrailer>, CodecError> {
    if buf.len() < TRAILER_LEN {
        return Ok(Decoded::Incomplete { needed: TRAILER_LEN - buf.len() });
    }
    if buf[..8] != TRAILER_MAGIC {
        return Err(CodecError::BadMagic);
    }
    check(u32_at(buf, 36), &buf[..36])?;
    let trailer = SealTrailer {
        nonce: u64_at(buf, 8),
        record_count: u64_at(buf, 16),
        records_len: u64_at(buf, 24),
        checksum: u32_at(buf, 32),
    };
    Ok(Decoded::Complete(trailer, TRAILER_LEN))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn record(offset: u64, ts: i64, payload: &[u8]) -> Record {
        Record { offset, timestamp_ms: ts, payload: Bytes::copy_from_slice(payload) }
    }

    #[test]
    fn record_frame_layout() {
        let mut buf = Vec::new();
        encode_record(&mut buf, &record(7, -3, b"abc"));
        assert_eq!(buf.len(), FRAME_HEADER_LEN + 3);
        assert_eq!(&buf[..4], &19u32.to_le_bytes());
        assert_eq!(&buf[4..8], &crc32c::crc32c(&buf[8..]).to_le_bytes());
        assert_eq!(&buf[8..16], &7u64.to_le_bytes());
        assert_eq!(&buf[16..24], &(-3i64).to_le_bytes());
        assert_eq!(decode_record(&buf), Ok(Decoded::Complete(record(7, -3, b"abc"), buf.len())));
    }

    #[test]
    fn record_decoder_classifies_short_and_bad_bytes() {
        let mut buf = Vec::new();
        encode_record(&mut buf, &record(1, 2, b"hello"));
        assert_eq!(decode_record(&[]), Ok(Decoded::Incomplete { needed: FRAME_HEADER_LEN }));
        assert_eq!(decode_record(&buf[..3]), Ok(Decoded::Incomplete { needed: FRAME_HEADER_LEN - 3 }));
        for cut in 4..buf.len() {
            assert_eq!(decode_record(&buf[..cut]), Ok(Decoded::Incomplete { needed: buf.len() - cut }));
        }
        for bit in 32..buf.len() * 8 {
            let mut bad = buf.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(matches!(decode_record(&bad), Err(CodecError::Checksum { .. })), "bit {bit}");
        }
        assert_eq!(decode_record(&[0; 30]), Err(CodecError::BadLength { len: 0 }));
        assert_eq!(decode_record(&[0xff; 4]), Err(CodecError::BadLength { len: u32::MAX }));
        // A seal trailer is never taken for a record.
        let mut trailer = Vec::new();
        encode_trailer(&mut trailer, &SealTrailer { nonce: 1, record_count: 2, records_len: 3, checksum: 4 });
        assert!(matches!(decode_record(&trailer), Err(CodecError::BadLength { .. })));
    }

    #[test]
    fn header_index_and_trailer_reject_damage() {
        let mut h = Vec::new();
        encode_header(&mut h, &FileHeader { kind: FileKind::Index, segment_id: 9, nonce: 77 });
        assert_eq!(h.len(), FILE_HEADER_LEN);
        let mut e = Vec::new();
        encode_index_entry(&mut e, &IndexEntry { offset: 1, position: 2, timestamp_ms: 3 });
        assert_eq!(e.len(), INDEX_ENTRY_LEN);
        let mut t = Vec::new();
        encode_trailer(&mut t, &SealTrailer { nonce: 1, record_count: 2, records_len: 3, checksum: 4 });
        assert_eq!(t.len(), TRAILER_LEN);
        for bit in 0..FILE_HEADER_LEN * 8 {
            let mut bad = h.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(decode_header(&bad).is_err(), "header bit {bit}");
        }
        for bit in 0..INDEX_ENTRY_LEN * 8 {
            let mut bad = e.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(decode_index_entry(&bad).is_err(), "entry bit {bit}");
        }
        for bit in 0..TRAILER_LEN * 8 {
            let mut bad = t.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(decode_trailer(&bad).is_err(), "trailer bit {bit}");
        }
        let mut v2 = h.clone();
        v2[6] = 2;
        let crc = crc32c::crc32c(&v2[..24]);
        v2[24..].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(decode_header(&v2), Err(CodecError::UnsupportedVersion { version: 2 }));
    }

    proptest! {
        #[test]
        fn record_round_trip(offset: u64, ts: i64, payload in proptest::collection::vec(any::<u8>(), 0..600), junk in proptest::collection::vec(any::<u8>(), 0..8)) {
            let r = Record { offset, timestamp_ms: ts, payload: Bytes::from(payload) };
            let mut buf = Vec::new();
            encode_record(&mut buf, &r);
            let len = buf.len();
            buf.extend_from_slice(&junk);
            prop_assert_eq!(decode_record(&buf), Ok(Decoded::Complete(r, len)));
            for cut in 0..len {
                let incomplete = matches!(decode_record(&buf[..cut]), Ok(Decoded::Incomplete { .. }));
                prop_assert!(incomplete);
            }
        }

        #[test]
        fn header_round_trip(index: bool, segment_id: u64, nonce: u64) {
            let h = FileHeader { kind: if index { FileKind::Index } else { FileKind::Segment }, segment_id, nonce };
            let mut buf = Vec::new();
            encode_header(&mut buf, &h);
            prop_assert_eq!(decode_header(&buf), Ok(Decoded::Complete(h, FILE_HEADER_LEN)));
        }

        #[test]
        fn index_entry_round_trip(offset: u64, position: u64, timestamp_ms: i64) {
            let e = IndexEntry { offset, position, timestamp_ms };
            let mut buf = Vec::new();
            encode_index_entry(&mut buf, &e);
            prop_assert_eq!(decode_index_entry(&buf), Ok(Decoded::Complete(e, INDEX_ENTRY_LEN)));
            prop_assert_eq!(decode_index_entry(&buf[..5]), Ok(Decoded::Incomplete { needed: INDEX_ENTRY_LEN - 5 }));
        }

        #[test]
        fn trailer_round_trip(nonce: u64, record_count: u64, records_len: u64, checksum: u32) {
            let t = SealTrailer { nonce, record_count, records_len, checksum };
            let mut buf = Vec::new();
            encode_trailer(&mut buf, &t);
            prop_assert_eq!(decode_trailer(&buf), Ok(Decoded::Complete(t, TRAILER_LEN)));
        }

        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_record(&bytes);
            let _ = decode_frame_header(&bytes);
            let _ = decode_index_entry(&bytes);
            let _ = decode_trailer(&bytes);
            let _ = decode_header(&bytes);
        }
    }
}
