//! The keys of a snapshot, in chunks by digest, so that a reload shares what did not change.
//!
//! A key's chunk is fixed by its digest (half of its hash, the index using the other), so a key
//! stays in the same chunk from one document to the next whatever the order of the entries, and
//! a reload that changes a few keys rebuilds only their chunks: every other chunk of the new
//! snapshot is the snapshot in force's own, behind an `Arc`. Each chunk holds its records, their
//! ids and names, and its own digest index; a lookup picks the chunk from the digest and probes
//! its index, one step more than a single index. No I/O, no parsing here.

use std::sync::Arc;

use bytes::Bytes;
use http::HeaderValue;

use super::index::{digest_hash, DigestHash, HashIndex};
use super::{DigestKind, KeyRecord, Span};

/// Keys a chunk is made for (between half and all of this): a reload that changes one key
/// rebuilds about this many (~3 MiB). Few chunks keep what a reload looks up in the snapshot in
/// force, and where a first load writes, in the CPU's caches: on the 2-core machine of
/// BENCHMARKS.md §5, a million-key reload took ~1.5 s longer with 4,096 chunks than with 64,
/// and ~0.3 s longer with 256.
/// (Unit tests use small chunks, so that a few thousand keys make many.)
pub(super) const KEYS_PER_CHUNK: usize = if cfg!(test) { 256 } else { 16384 };

/// At most 2¹⁶ chunks: the digest bytes that choose one.
pub(super) const MAX_CHUNK_BITS: u32 = 16;

/// The chunk count (as a power of two) for about `keys` keys.
pub(super) fn chunk_bits(keys: usize) -> u32 {
    (keys / KEYS_PER_CHUNK)
        .next_power_of_two()
        .trailing_zeros()
        .min(MAX_CHUNK_BITS)
}

/// Which of `1 << bits` chunks holds a digest: its hash's `chunk` half, independent of the
/// `index` half the chunk's index uses, so a chunk's index is as evenly filled as a single one
/// would be.
#[inline]
pub(super) fn chunk_of(hash: DigestHash, bits: u32) -> usize {
    let mask = (1usize << bits) - 1;
    hash.chunk as usize & mask
}

/// Some of a snapshot's keys, with their ids and names, indexed by digest.
#[derive(Debug, Default)]
pub(super) struct Chunk {
    pub records: Box<[KeyRecord]>,
    /// The ids and names of `records`, one allocation; the id headers share it.
    pub text: Bytes,
    pub by_sha256: HashIndex,
    pub by_hmac: HashIndex,
    /// The positions of the partners, environments and scope sets `records` name, each once:
    /// what a reload needs to know of a chunk it shares, without going through its records.
    pub partners: Box<[u32]>,
    pub environments: Box<[u32]>,
    pub scope_sets: Box<[u32]>,
}

impl Chunk {
    /// The record with this digest, stored as `kind`; the final comparison in constant time.
    #[inline]
    pub fn find(
        &self,
        kind: DigestKind,
        digest: &[u8; 32],
        hash: DigestHash,
    ) -> Option<&KeyRecord> {
        let i = self.position(kind, digest, hash)?;
        Some(&self.records[i as usize])
    }

    /// Where in `records` the record with this digest (and its `hash`), stored as `kind`, is.
    #[inline]
    pub fn position(&self, kind: DigestKind, digest: &[u8; 32], hash: DigestHash) -> Option<u32> {
        use subtle::ConstantTimeEq;
        let index = match kind {
            DigestKind::Sha256 => &self.by_sha256,
            DigestKind::HmacSha256 => &self.by_hmac,
        };
        index.find(hash.index, |i| {
            self.records[i as usize].digest.ct_eq(digest).into()
        })
    }

    /// The record's name, stored in this chunk's text.
    pub fn name(&self, record: &KeyRecord) -> Option<&str> {
        if record.name.len == Span::NONE.len {
            return None;
        }
        let bytes = &self.text[record.name.range()];
        Some(std::str::from_utf8(bytes).expect("names are stored as UTF-8"))
    }

    /// A chunk of `records` (digests unique), whose ids and names `texts` gives. The records'
    /// id headers and names are made to point into the chunk's own text. `sha256`, when the
    /// caller has it: the index of `records`, all SHA-256 digests, in this order.
    pub fn new<'t>(
        records: Vec<KeyRecord>,
        texts: impl Iterator<Item = (&'t str, Option<&'t str>)>,
        sha256: Option<HashIndex>,
    ) -> Arc<Chunk> {
        let mut text = String::new();
        let spans: Vec<(Span, Span)> = texts
            .map(|(id, name)| {
                let id = push(&mut text, id);
                (id, name.map_or(Span::NONE, |n| push(&mut text, n)))
            })
            .collect();
        Chunk::with_text(records, text, &spans, sha256)
    }

    /// As [`Chunk::new`], the records' ids and names being in `text` already, at `spans` (id,
    /// name) in the records' order: `text` becomes the chunk's own, not a copy of it.
    pub fn with_text(
        mut records: Vec<KeyRecord>,
        mut text: String,
        spans: &[(Span, Span)],
        sha256: Option<HashIndex>,
    ) -> Arc<Chunk> {
        debug_assert_eq!(records.len(), spans.len());
        text.shrink_to_fit();
        let text = Bytes::from(text.into_bytes());
        for (record, &(id, name)) in records.iter_mut().zip(spans) {
            record.name = name;
            record.id_header = HeaderValue::from_maybe_shared(text.slice(id.range()))
                .expect("validated ids are valid header values");
        }
        let (by_sha256, by_hmac) = match sha256 {
            Some(index) => (index, HashIndex::default()),
            None => index(&records),
        };
        let named = |position: fn(&KeyRecord) -> u32| {
            let mut named: Vec<u32> = records.iter().map(position).collect();
            named.sort_unstable();
            named.dedup();
            named.into_boxed_slice()
        };
        Arc::new(Chunk {
            partners: named(|r| r.partner),
            environments: named(|r| r.environment),
            scope_sets: named(|r| r.scopes),
            records: records.into_boxed_slice(),
            text,
            by_sha256,
            by_hmac,
        })
    }
}

/// The SHA-256 and HMAC-SHA-256 indexes of `records`.
fn index(records: &[KeyRecord]) -> (HashIndex, HashIndex) {
    let sha256 = records
        .iter()
        .filter(|r| r.kind == DigestKind::Sha256)
        .count();
    let mut by_sha256 = HashIndex::with_capacity(sha256);
    let mut by_hmac = HashIndex::with_capacity(records.len() - sha256);
    for (i, r) in records.iter().enumerate() {
        let index = match r.kind {
            DigestKind::Sha256 => &mut by_sha256,
            DigestKind::HmacSha256 => &mut by_hmac,
        };
        let inserted = index.insert(digest_hash(&r.digest).index, i as u32, |j| {
            records[j as usize].digest == r.digest
        });
        debug_assert!(inserted.is_ok(), "duplicates are quarantined before");
    }
    (by_sha256, by_hmac)
}

/// Append to a chunk's text. A chunk holds a few hundred keys' ids (≤ 128 bytes) and names:
/// its text is far from `u32` offsets' limit (and a whole document's new text is held below it
/// as it is read).
fn push(text: &mut String, s: &str) -> Span {
    let fits = |n: usize| u32::try_from(n).ok().filter(|&n| n < u32::MAX);
    let span = Span {
        start: fits(text.len()).expect("a chunk's text is below 4 GiB"),
        len: fits(s.len()).expect("a key's name is below 4 GiB"),
    };
    text.push_str(s);
    span
}
