//! The fixed-size decoders of the segment store: index entries, the seal trailer and
//! the file header (`eventtermq_storage::codec`).
//!
//! Input: one mode byte, then either raw bytes decoded as a sequence of index entries,
//! and as a trailer and a header at the start (even mode), or bytes taken as field values
//! that the target encodes and decodes again (odd mode).
//!
//! Asserts: never panics; whatever decodes re-encodes to the same bytes; `Incomplete`
//! asks for exactly the missing bytes of the fixed size; a flipped bit in an encoded
//! value is rejected.
#![no_main]

use eventtermq_storage::codec::{
    decode_header, decode_index_entry, decode_trailer, encode_header, encode_index_entry, encode_trailer, Decoded,
    FileHeader, FileKind, IndexEntry, SealTrailer, FILE_HEADER_LEN, INDEX_ENTRY_LEN, TRAILER_LEN,
};
use libfuzzer_sys::fuzz_target;

fn u64_at(b: &[u8], i: usize) -> u64 {
    let mut x = [0u8; 8];
    for (k, v) in x.iter_mut().enumerate() {
        *v = b.get(i + k).copied().unwrap_or(0);
    }
    u64::from_le_bytes(x)
}

fn fixed<T: PartialEq + std::fmt::Debug>(
    bytes: &[u8],
    size: usize,
    decode: fn(&[u8]) -> Result<Decoded<T>, eventtermq_storage::codec::CodecError>,
    encode: fn(&mut Vec<u8>, &T),
) {
    match decode(bytes) {
        Ok(Decoded::Complete(v, used)) => {
            assert_eq!(used, size);
            let mut again = Vec::new();
            encode(&mut again, &v);
            assert_eq!(again, &bytes[..size], "a decoded value does not re-encode to its bytes");
        }
        Ok(Decoded::Incomplete { needed }) => assert_eq!(needed, size - bytes.len()),
        Err(_) => assert!(bytes.len() >= size.min(6)),
    }
}

fn round_trip<T: PartialEq + std::fmt::Debug + Copy>(
    v: T,
    flip: usize,
    decode: fn(&[u8]) -> Result<Decoded<T>, eventtermq_storage::codec::CodecError>,
    encode: fn(&mut Vec<u8>, &T),
) {
    let mut bytes = Vec::new();
    encode(&mut bytes, &v);
    assert_eq!(decode(&bytes), Ok(Decoded::Complete(v, bytes.len())));
    let bit = flip % (bytes.len() * 8);
    bytes[bit / 8] ^= 1 << (bit % 8);
    assert!(decode(&bytes).is_err(), "a flipped bit was not detected");
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    if mode & 1 == 0 {
        for chunk in rest.chunks(INDEX_ENTRY_LEN) {
            fixed(chunk, INDEX_ENTRY_LEN, decode_index_entry, encode_index_entry);
        }
        fixed(&rest[..rest.len().min(TRAILER_LEN)], TRAILER_LEN, decode_trailer, encode_trailer);
        fixed(&rest[..rest.len().min(FILE_HEADER_LEN)], FILE_HEADER_LEN, decode_header, encode_header);
    } else {
        let flip = u64_at(rest, 40) as usize;
        let entry =
            IndexEntry { offset: u64_at(rest, 0), position: u64_at(rest, 8), timestamp_ms: u64_at(rest, 16) as i64 };
        round_trip(entry, flip, decode_index_entry, encode_index_entry);
        let trailer = SealTrailer {
            nonce: u64_at(rest, 0),
            record_count: u64_at(rest, 8),
            records_len: u64_at(rest, 16),
            checksum: u64_at(rest, 24) as u32,
        };
        round_trip(trailer, flip, decode_trailer, encode_trailer);
        let kind = if mode & 2 == 0 { FileKind::Segment } else { FileKind::Index };
        let header = FileHeader { kind, segment_id: u64_at(rest, 0), nonce: u64_at(rest, 8) };
        round_trip(header, flip, decode_header, encode_header);
    }
});
