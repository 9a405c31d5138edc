//! Key entries → compact [`KeyRecord`]s, and the digest index over them.
//!
//! Strings are borrowed from the document where they can be, what keys share (environments,
//! scope sets) is stored once, ids and names go to their chunk's text, and duplicate digests
//! and ids are found with the same compact [`HashIndex`] the snapshot looks keys up with.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::num::NonZeroU32;
use std::ops::Deref;
use std::sync::Arc;

use http::HeaderValue;
use serde::de::{Deserializer, Visitor};
use serde::Deserialize;

use super::{
    entry_id, header, is_id, parse_digest, parse_rfc3339_ms, q, redact, referrer_problem,
    route_problem, PartnerIds,
};
use crate::config::{is_scope, parse_cidr};
use crate::referrer::{ReferrerPattern, ReferrerSet};
use crate::routes::{RoutePattern, RouteTable};
use crate::snapshot::chunk::{chunk_bits, chunk_of, Chunk};
use crate::snapshot::index::{digest_hash, HashIndex};
use crate::snapshot::memo::{Fingerprint, Memo, Remembered};
use crate::snapshot::{
    DigestKind, Environment, KeyRecord, KeyStatus, Quarantined, Restrictions, ScopeSet, Snapshot,
    Span,
};

/// A key entry as the document has it. Strings are borrowed from the document (see [`Text`]):
/// a million entries are read without a million times ten small allocations.
#[derive(Deserialize)]
struct RawKey<'a> {
    #[serde(borrow)]
    id: Text<'a>,
    #[serde(default, borrow)]
    name: Option<Text<'a>>,
    #[serde(borrow)]
    hash: Text<'a>,
    #[serde(borrow)]
    partner_id: Text<'a>,
    #[serde(borrow)]
    environment: Text<'a>,
    #[serde(default, borrow)]
    scopes: Vec<Text<'a>>,
    #[serde(borrow)]
    status: Text<'a>,
    #[serde(default, borrow)]
    expires_at: Option<Text<'a>>,
    #[serde(default)]
    rate_limit_per_minute: Option<u32>,
    #[serde(default, borrow)]
    allowed_cidrs: Option<Vec<Text<'a>>>,
    #[serde(default, borrow)]
    allowed_referrers: Option<Vec<Text<'a>>>,
    #[serde(default, borrow)]
    allowed_routes: Option<Vec<Text<'a>>>,
}

/// A JSON string: borrowed from the document, or owned when it had to be unescaped. (serde's
/// own `Cow<str>` is always owned inside an `Option` or a `Vec`.)
struct Text<'a>(Cow<'a, str>);

impl Deref for Text<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct TextVisitor;
        impl<'de> Visitor<'de> for TextVisitor {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Borrowed(s)))
            }
            fn visit_str<E>(self, s: &str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(s.to_owned())))
            }
            fn visit_string<E>(self, s: String) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(s)))
            }
        }
        d.deserialize_str(TextVisitor)
    }
}

/// Reads key entries one by one into compact records, storing once what keys share, and puts
/// each in its chunk's bucket: a reference to the same key in the snapshot in force when there
/// is one, else the new record.
pub(super) struct KeysBuilder<'b> {
    have_pepper: bool,
    /// The snapshot in force, when its positions (partners, environments, scope sets) and
    /// chunk count are kept: its chunks can be shared.
    base: Option<&'b Snapshot>,
    /// The base's memo, when an entry it remembers reads the same now as it did then (the same
    /// pepper): an entry with the same text is that record, not read again.
    recall: Option<&'b Memo>,
    /// Where in `recall` the next entry is looked for first: after the last one.
    cursor: usize,
    /// Expected entries that did not come since one was last found at `cursor`: past one,
    /// the document is taken not to be in the order of the one in force, and no entry is
    /// expected (each miss costs a fingerprint) until one is found at `cursor` again.
    out_of_step: u32,
    /// Entries taken by their fingerprint.
    recalled: usize,
    /// The key entries that made an item of a bucket, in the document's order: the next
    /// reload's memo.
    read: Vec<Read>,
    chunk_bits: u32,
    /// By chunk.
    buckets: Vec<Bucket>,
    environments: Vec<Environment>,
    environment_index: HashMap<Box<str>, u32>,
    scope_sets: Vec<ScopeSet>,
    /// Scope sets by their `x-scopes` text.
    scope_set_index: HashMap<Box<str>, u32>,
    /// The scopes of the key being read, space-separated (a buffer reused for every key).
    joined: String,
}

/// The keys of one chunk, as read.
#[derive(Default)]
struct Bucket {
    /// Positions in the base's chunk of keys the document has unchanged.
    old: Vec<u32>,
    /// Keys new or changed since the base: when a chunk has no others (a first load), this
    /// becomes the chunk's own, not a copy.
    new: Vec<KeyRecord>,
    /// The id and name of each of `new`, in `text`.
    new_text: Vec<(Span, Span)>,
    /// The ids and names of `new`, until copied to the chunk's text: by bucket, so that each
    /// is freed as soon as its chunk is made.
    text: String,
}

/// A key entry that made an item of a bucket.
struct Read {
    fingerprint: Fingerprint,
    len: u32,
    chunk: u32,
    /// In the bucket's `old` or, plus [`NEW`], its `new`.
    item: u32,
}

const NEW: u32 = 1 << 31;

// A `Read` becomes its memo entry where it lies (`KeysBuilder::finish`): std collects a `Vec`
// mapped into one of another type in its own allocation when the two have one size and
// alignment.
const _: () = assert!(
    size_of::<Read>() == size_of::<Remembered>() && align_of::<Read>() == align_of::<Remembered>()
);

/// The keys in force, indexed.
pub(super) struct Keys {
    pub chunks: Box<[Arc<Chunk>]>,
    pub chunk_bits: u32,
    pub key_count: usize,
    pub has_sha256: bool,
    pub has_hmac: bool,
    pub environments: Vec<Environment>,
    pub scope_sets: Vec<ScopeSet>,
    /// Each table at most about twice what the keys in force use.
    pub compact: bool,
    pub memo: Memo,
    /// Key entries taken by their fingerprint, not read.
    pub recalled: usize,
}

const TEXT_FULL: &str = "the key ids and names of one chunk exceed 4 GiB";

/// Why a key entry was not added.
pub(super) enum Failure {
    /// serde could not read it: perhaps not JSON at all (see `super::not_json`).
    NotJson(serde_json::Error),
    Entry {
        /// `key <id>`, when it has a usable id.
        entry: Option<String>,
        reason: String,
        /// The partner slot, for a failure found after the partner check: if that partner
        /// turns out missing or ambiguous, that is the reason instead.
        partner: Option<u32>,
    },
}

fn failure(entry: Option<String>, reason: String) -> Failure {
    Failure::Entry {
        entry,
        reason,
        partner: None,
    }
}

impl<'b> KeysBuilder<'b> {
    /// A builder for about `keys_hint` keys. With `base` (the snapshot in force, its partner
    /// positions kept by the caller), unchanged keys are shared with it; with `recall` too,
    /// an entry whose text is that of one the base was built from is not read again.
    pub fn new(
        have_pepper: bool,
        base: Option<&'b Snapshot>,
        recall: bool,
        keys_hint: usize,
    ) -> Self {
        let chunk_bits = match base {
            Some(b) => b.chunk_bits,
            None => chunk_bits(keys_hint),
        };
        let mut builder = Self {
            have_pepper,
            base,
            recall: base.filter(|_| recall).map(|b| &b.memo),
            cursor: 0,
            out_of_step: 0,
            recalled: 0,
            read: Vec::with_capacity(keys_hint),
            chunk_bits,
            buckets: (0..1usize << chunk_bits)
                .map(|_| Bucket::default())
                .collect(),
            environments: Vec::new(),
            environment_index: HashMap::new(),
            scope_sets: Vec::new(),
            scope_set_index: HashMap::new(),
            joined: String::new(),
        };
        if let Some(base) = base {
            for (i, e) in base.environments.iter().enumerate() {
                builder.environment_index.insert(e.name.clone(), i as u32);
            }
            builder.environments = base.environments.clone();
            for (i, s) in base.scope_sets.iter().enumerate() {
                let text = s.header.to_str().expect("scope headers are visible ASCII");
                builder.scope_set_index.insert(text.into(), i as u32);
            }
            builder.scope_sets = base.scope_sets.clone();
            for (bucket, chunk) in builder.buckets.iter_mut().zip(&base.chunks) {
                bucket.old.reserve(chunk.records.len());
            }
        } else {
            // A first load: each chunk's records are read into what becomes the chunk, so
            // room for about as many as it will hold (growing it by doubling would leave
            // holes in the heap the size of the snapshot).
            let expected = keys_hint >> chunk_bits;
            let room = expected + expected / 8 + 4;
            for bucket in &mut builder.buckets {
                bucket.new.reserve_exact(room);
                bucket.new_text.reserve_exact(room);
            }
        }
        builder
    }

    /// If `rest` starts with the text of the entry after the last one taken from the base's
    /// memo (a document written in the same order as the one in force): that text's length.
    pub fn expected(&mut self, rest: &[u8]) -> Option<usize> {
        let memo = self.recall.filter(|_| self.out_of_step <= 1)?;
        let next = memo.get(self.cursor)?;
        let text = rest.get(..next.len as usize)?;
        if Fingerprint::of(text) == next.fingerprint {
            self.out_of_step = 0;
            Some(text.len())
        } else {
            self.out_of_step += 1;
            None
        }
    }

    /// The entry [`Self::expected`] found came, whole.
    pub fn add_expected(&mut self) {
        let memo = self.recall.expect("an entry was expected");
        self.recall(memo, self.cursor);
    }

    /// Take the record of the base's memo entry `at`, as read from the same text.
    fn recall(&mut self, memo: &Memo, at: usize) {
        let Remembered {
            fingerprint,
            len,
            chunk,
            position,
        } = memo.get(at).expect("a remembered entry");
        let bucket = &mut self.buckets[chunk as usize];
        self.read.push(Read {
            fingerprint,
            len,
            chunk,
            item: bucket.old.len() as u32,
        });
        bucket.old.push(position);
        self.recalled += 1;
        self.cursor = at + 1;
    }

    /// Read one key entry. Its partner is a slot in `partners`, resolved by [`Self::finish`].
    pub fn add(&mut self, text: &str, partners: &mut PartnerIds) -> Result<(), Failure> {
        let fingerprint = Fingerprint::of(text.as_bytes());
        // Longer is never expected (`Remembered::len`).
        let len = u32::try_from(text.len()).unwrap_or(u32::MAX);
        if let Some(memo) = self.recall {
            // Documents are mostly written in the same order every time: the entry after the
            // last one is looked for first.
            match memo.find(self.cursor, &fingerprint) {
                // The text a record in force was read from: that record (`snapshot::memo`).
                Some(at) => {
                    if at == self.cursor {
                        self.out_of_step = 0;
                    }
                    self.recall(memo, at);
                    return Ok(());
                }
                // A changed entry most often takes the place of the one it replaces.
                None => self.cursor += 1,
            }
        }
        // A value of the wrong shape, or a string JSON allows and Rust cannot hold (a lone
        // surrogate escape, "\ud800"): the entry cannot be read, but if it is JSON the document
        // stands (the contract's entry error), so one bad name cannot stop every revocation.
        let k: RawKey<'_> = serde_json::from_str(text).map_err(|e| {
            match serde_json::from_str::<serde::de::IgnoredAny>(text) {
                Ok(_) => failure(entry_id(text).map(|id| format!("key {id}")), redact(&e)),
                Err(_) => Failure::NotJson(e),
            }
        })?;
        if !is_id(&k.id) {
            return Err(failure(
                None,
                "id must be 1-128 of A-Z a-z 0-9 _ - . :".into(),
            ));
        }
        let entry = || Some(format!("key {}", &*k.id));
        let (kind, digest) = parse_digest(&k.hash).map_err(|r| failure(entry(), r.into()))?;
        if kind == DigestKind::HmacSha256 && !self.have_pepper {
            return Err(failure(
                entry(),
                "hmac-sha256 digest, but no pepper is configured (snapshot.pepper_env)".into(),
            ));
        }
        let partner = partners.slot(&k.partner_id);
        let fail = |reason: String| Failure::Entry {
            entry: entry(),
            reason,
            partner: Some(partner),
        };
        if k.environment.is_empty()
            || !k
                .environment
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(fail(
                "environment must be letters, digits, '_' or '-'".into(),
            ));
        }
        let status = match &*k.status {
            "active" => KeyStatus::Active,
            "revoked" => KeyStatus::Revoked,
            _ => return Err(fail("status must be \"active\" or \"revoked\"".into())),
        };
        if let Some(i) = k.scopes.iter().position(|s| !is_scope(s)) {
            return Err(fail(format!(
                "scopes[{i}] is not a scope (1-128 visible ASCII characters, no ',')"
            )));
        }
        let expires_at_ms = match k.expires_at.as_deref() {
            None => i64::MAX,
            Some(s) => parse_rfc3339_ms(s).ok_or_else(|| {
                fail("expires_at is not an RFC 3339 time like \"2027-01-31T00:00:00Z\"".into())
            })?,
        };
        let rate_limit_per_minute = match k.rate_limit_per_minute {
            None => None,
            Some(n) => Some(
                NonZeroU32::new(n)
                    .ok_or_else(|| fail("rate_limit_per_minute must be more than 0".into()))?,
            ),
        };
        let restrictions = restrictions(
            k.allowed_cidrs.as_deref(),
            k.allowed_referrers.as_deref(),
            k.allowed_routes.as_deref(),
            &fail,
        )?;
        let mut scopes = k.scopes;
        scopes.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        scopes.dedup_by(|a, b| a.0 == b.0);
        let scopes = self
            .scope_set(&scopes)
            .map_err(|()| fail("scopes".into()))?;
        let environment = self.environment(&k.environment);
        let record = KeyRecord {
            digest,
            // Made from the chunk's text; a static placeholder costs nothing.
            id_header: HeaderValue::from_static(""),
            expires_at_ms,
            restrictions,
            name: Span::NONE,
            partner,
            scopes,
            environment,
            rate_limit_per_minute,
            status,
            kind,
        };
        let hash = digest_hash(&digest);
        let chunk = chunk_of(hash, self.chunk_bits);
        let bucket = &mut self.buckets[chunk];
        let chunk_number = chunk as u32;
        // The same key as in the snapshot in force: keep a reference to it, not a copy.
        if let Some(base) = self.base {
            let chunk = &base.chunks[chunk];
            if let Some(i) = chunk.position(kind, &digest, hash) {
                let old = &chunk.records[i as usize];
                if same(&record, &k.id, k.name.as_deref(), old, chunk) {
                    self.read.push(Read {
                        fingerprint,
                        len,
                        chunk: chunk_number,
                        item: bucket.old.len() as u32,
                    });
                    bucket.old.push(i);
                    return Ok(());
                }
            }
        }
        let id = push_text(&mut bucket.text, &k.id).ok_or_else(|| fail(TEXT_FULL.into()))?;
        let name = match k.name.as_deref() {
            None => Span::NONE,
            Some(name) => {
                push_text(&mut bucket.text, name).ok_or_else(|| fail(TEXT_FULL.into()))?
            }
        };
        self.read.push(Read {
            fingerprint,
            len,
            chunk: chunk_number,
            item: NEW | bucket.new.len() as u32,
        });
        bucket.new.push(record);
        bucket.new_text.push((id, name));
        Ok(())
    }

    /// The position of this (sorted, deduplicated) scope set, added if new.
    fn scope_set(&mut self, scopes: &[Text<'_>]) -> Result<u32, ()> {
        self.joined.clear();
        for (i, s) in scopes.iter().enumerate() {
            if i > 0 {
                self.joined.push(' ');
            }
            self.joined.push_str(s);
        }
        if let Some(&i) = self.scope_set_index.get(self.joined.as_str()) {
            return Ok(i);
        }
        let header = HeaderValue::from_str(&self.joined).map_err(|_| ())?;
        let i = self.scope_sets.len() as u32;
        self.scope_sets.push(ScopeSet {
            scopes: scopes.iter().map(|s| Box::from(&**s)).collect(),
            header,
        });
        self.scope_set_index.insert(self.joined.as_str().into(), i);
        Ok(i)
    }

    /// The position of this (validated) environment, added if new.
    fn environment(&mut self, name: &str) -> u32 {
        if let Some(&i) = self.environment_index.get(name) {
            return i;
        }
        let i = self.environments.len() as u32;
        self.environments.push(Environment {
            name: name.into(),
            header: header(name),
        });
        self.environment_index.insert(name.into(), i);
        i
    }

    /// Quarantine the keys whose partner `partners` does not resolve (by partner position:
    /// `Err` = why), then every other entry that shares its digest or id with another; make
    /// the chunks, sharing the base's where nothing changed, and the memo of the entries read.
    pub fn finish(
        self,
        partners: &[Result<(), String>],
        quarantined: &mut Vec<Quarantined>,
    ) -> Keys {
        let base_chunks: &[Arc<Chunk>] = self.base.map_or(&[], |b| &b.chunks);
        let buckets = self.buckets;
        let old_counts: Vec<u32> = buckets.iter().map(|b| b.old.len() as u32).collect();
        let id_of = |b: usize, bucket, item| id_in(base_chunks, b, bucket, item);

        // Why each item of each bucket is not a key in force; 0 = it is.
        const SAME_DIGEST: u8 = 1;
        const SAME_ID: u8 = 2;
        /// Quarantined here, for its partner: left out of the checks below.
        const ORPHAN: u8 = 4;
        let mut flags: Vec<Vec<u8>> = Vec::with_capacity(buckets.len());

        // Keys whose partner is missing or ambiguous. A base chunk whose partners are all
        // there has none.
        for (b, bucket) in buckets.iter().enumerate() {
            let mut f = vec![0u8; bucket.old.len() + bucket.new.len()];
            let orphans_in_base = base_chunks
                .get(b)
                .is_some_and(|c| c.partners.iter().any(|&p| partners[p as usize].is_err()));
            let old = bucket.old.iter().filter(|_| orphans_in_base);
            let old = old
                .map(|&i| &base_chunks[b].records[i as usize])
                .enumerate();
            let new = (bucket.new.iter().enumerate()).map(|(n, r)| (bucket.old.len() + n, r));
            for (j, r) in old.chain(new) {
                if let Err(reason) = &partners[r.partner as usize] {
                    let id = String::from_utf8_lossy(id_of(b, bucket, Item::of(bucket, j)));
                    quarantined.push(q(format!("key {id}"), reason.as_str()));
                    f[j] = ORPHAN;
                }
            }
            flags.push(f);
        }

        // The same digest, always in one chunk.
        // For a chunk of new SHA-256 keys only, all in force: its index, made here.
        let mut indexes: Vec<Option<HashIndex>> = Vec::with_capacity(buckets.len());
        let mut seen: Vec<u32> = Vec::new();
        for (b, (bucket, f)) in buckets.iter().zip(&mut flags).enumerate() {
            let n = f.len();
            let mut made = None;
            if bucket.new.is_empty() {
                // Only keys of the base chunk, whose digests differ: the same key twice.
                if let Some(chunk) = base_chunks.get(b).filter(|_| n > 1) {
                    seen.clear();
                    seen.resize(chunk.records.len(), u32::MAX);
                    for (j, &i) in bucket.old.iter().enumerate() {
                        if f[j] == ORPHAN {
                            continue;
                        }
                        match seen[i as usize] {
                            u32::MAX => seen[i as usize] = j as u32,
                            first => {
                                f[j] |= SAME_DIGEST;
                                f[first as usize] |= SAME_DIGEST;
                            }
                        }
                    }
                }
            } else {
                let digest = |j: u32| match Item::of(bucket, j as usize) {
                    Item::Old(i) => &base_chunks[b].records[bucket.old[i] as usize].digest,
                    Item::New(i) => &bucket.new[i].digest,
                };
                let mut index = HashIndex::with_capacity(n);
                let mut clean = true;
                for j in 0..n as u32 {
                    if f[j as usize] == ORPHAN {
                        clean = false;
                        continue;
                    }
                    let d = digest(j);
                    if let Err(first) = index.insert(digest_hash(d).index, j, |k| digest(k) == d) {
                        f[j as usize] |= SAME_DIGEST;
                        f[first as usize] |= SAME_DIGEST;
                        clean = false;
                    }
                }
                let sha256_only = bucket.new.iter().all(|r| r.kind == DigestKind::Sha256);
                if clean && bucket.old.is_empty() && sha256_only {
                    made = Some(index);
                }
            }
            indexes.push(made);
        }
        drop(seen);

        // The same id twice. The base's keys have different ids (it quarantined the others),
        // and the same base key twice has the same digest too (flagged above): two keys with
        // the same id are new keys, or a new key and a base key. So the new keys are indexed by
        // id and the base's looked up in that index, which costs nothing when no key is new.
        let ids = RandomState::new();
        // (bucket, item) of each new key: as `u32`s, since a reload that changes every key
        // holds one for every key, at the same time as the rest of what it builds.
        let new_keys: Vec<(u32, u32)> = (buckets.iter().zip(&flags).enumerate())
            .flat_map(|(b, (bucket, f))| {
                (bucket.old.len()..f.len())
                    .filter(|&j| f[j] & ORPHAN == 0)
                    .map(move |j| (b as u32, j as u32))
            })
            .collect();
        let new_key = |n: u32| {
            let (b, j) = new_keys[n as usize];
            (b as usize, j as usize)
        };
        let new_id = |n: u32| {
            let (b, j) = new_key(n);
            id_of(b, &buckets[b], Item::of(&buckets[b], j))
        };
        if !new_keys.is_empty() {
            let mut index = HashIndex::with_capacity(new_keys.len());
            for n in 0..new_keys.len() as u32 {
                let (b, j) = new_key(n);
                let id = new_id(n);
                if let Err(first) = index.insert(ids.hash_one(id), n, |m| new_id(m) == id) {
                    let (first_b, first_j) = new_key(first);
                    flags[b][j] |= SAME_ID;
                    flags[first_b][first_j] |= SAME_ID;
                }
            }
            for (b, bucket) in buckets.iter().enumerate() {
                for j in 0..bucket.old.len() {
                    if flags[b][j] & ORPHAN != 0 {
                        continue;
                    }
                    let id = id_of(b, bucket, Item::Old(j));
                    if let Some(n) = index.find(ids.hash_one(id), |m| new_id(m) == id) {
                        let (new_b, new_j) = new_key(n);
                        flags[b][j] |= SAME_ID;
                        flags[new_b][new_j] |= SAME_ID;
                    }
                }
            }
        }
        drop(new_keys);
        for (b, (bucket, f)) in buckets.iter().zip(&flags).enumerate() {
            for (j, &s) in f.iter().enumerate() {
                let reason = if s & ORPHAN != 0 {
                    continue;
                } else if s & SAME_DIGEST != 0 {
                    "another entry has the same digest"
                } else if s & SAME_ID != 0 {
                    "the key id appears more than once"
                } else {
                    continue;
                };
                let id = String::from_utf8_lossy(id_of(b, bucket, Item::of(bucket, j)));
                quarantined.push(q(format!("key {id}"), reason));
            }
        }

        // The chunks: the base's own where its keys are all there unchanged, else made. And
        // where each item of each bucket ends up in its chunk (`GONE`: quarantined), for the
        // memo.
        const GONE: u32 = u32::MAX;
        let empty = Arc::new(Chunk::default());
        let mut chunks = Vec::with_capacity(buckets.len());
        let mut places: Vec<Vec<u32>> = Vec::with_capacity(buckets.len());
        let (mut key_count, mut has_sha256, mut has_hmac) = (0, false, false);
        let mut used_environments = vec![false; self.environments.len()];
        let mut used_scope_sets = vec![false; self.scope_sets.len()];
        let parts = buckets.into_iter().zip(flags).zip(indexes);
        for (b, ((bucket, f), index)) in parts.enumerate() {
            let old_chunk = base_chunks.get(b);
            let all_kept = f.iter().all(|&s| s == 0);
            let (chunk, place) = if all_kept
                && bucket.new.is_empty()
                && old_chunk.is_some_and(|c| c.records.len() == bucket.old.len())
            {
                let place = bucket.old.clone();
                (old_chunk.expect("checked").clone(), place)
            } else if f.iter().all(|&s| s != 0) {
                (empty.clone(), vec![GONE; f.len()])
            } else if all_kept && bucket.old.is_empty() {
                // New keys only (a first load): the bucket's records become the chunk's.
                // Their ids and names too: the bucket's text is theirs, in their order.
                let place = (0..bucket.new.len() as u32).collect();
                let chunk = Chunk::with_text(bucket.new, bucket.text, &bucket.new_text, index);
                (chunk, place)
            } else {
                let mut records = Vec::with_capacity(f.len());
                let mut texts = Vec::with_capacity(f.len());
                let mut place = Vec::with_capacity(f.len());
                let mut f = f.into_iter();
                for &i in &bucket.old {
                    if f.next() == Some(0) {
                        let chunk = old_chunk.expect("old keys have a base chunk");
                        let old = &chunk.records[i as usize];
                        place.push(records.len() as u32);
                        records.push(copy(old));
                        texts.push((old.id(), chunk.name(old)));
                    } else {
                        place.push(GONE);
                    }
                }
                for (record, &(id, name)) in bucket.new.into_iter().zip(&bucket.new_text) {
                    if f.next() == Some(0) {
                        place.push(records.len() as u32);
                        texts.push((&bucket.text[id.range()], name_in(&bucket.text, name)));
                        records.push(record);
                    } else {
                        place.push(GONE);
                    }
                }
                (Chunk::new(records, texts.into_iter(), None), place)
            };
            for &e in chunk.environments.iter() {
                used_environments[e as usize] = true;
            }
            for &s in chunk.scope_sets.iter() {
                used_scope_sets[s as usize] = true;
            }
            has_sha256 |= !chunk.by_sha256.is_empty();
            has_hmac |= !chunk.by_hmac.is_empty();
            key_count += chunk.records.len();
            chunks.push(chunk);
            places.push(place);
        }

        // The entries whose records are in force, in the document's order: made from the
        // entries read, in their place (the two are the same size), so that a reload does not
        // hold both lists at once.
        let remembered: Vec<Remembered> = (self.read.into_iter())
            .filter_map(|read| {
                let item = match read.item.checked_sub(NEW) {
                    Some(new) => old_counts[read.chunk as usize] + new,
                    None => read.item,
                };
                let place = places[read.chunk as usize][item as usize];
                (place != GONE).then_some(Remembered {
                    fingerprint: read.fingerprint,
                    len: read.len,
                    chunk: read.chunk,
                    position: place,
                })
            })
            .collect();
        drop(places);

        let compact = |used: &[bool]| used.len() <= 2 * used.iter().filter(|&&u| u).count() + 64;
        Keys {
            compact: compact(&used_environments) && compact(&used_scope_sets),
            chunks: chunks.into_boxed_slice(),
            chunk_bits: self.chunk_bits,
            key_count,
            has_sha256,
            has_hmac,
            environments: self.environments,
            scope_sets: self.scope_sets,
            memo: Memo::new(remembered),
            recalled: self.recalled,
        }
    }
}

/// An item of a bucket, numbered old keys first.
#[derive(Clone, Copy)]
enum Item {
    Old(usize),
    New(usize),
}

impl Item {
    fn of(bucket: &Bucket, j: usize) -> Item {
        match j.checked_sub(bucket.old.len()) {
            None => Item::Old(j),
            Some(i) => Item::New(i),
        }
    }
}

/// The id of an item of bucket `b`: an old key's in the base chunk, or a new one's in the
/// bucket's text.
fn id_in<'a>(base_chunks: &'a [Arc<Chunk>], b: usize, bucket: &'a Bucket, item: Item) -> &'a [u8] {
    match item {
        Item::Old(i) => base_chunks[b].records[bucket.old[i] as usize].id_bytes(),
        Item::New(i) => bucket.text[bucket.new_text[i].0.range()].as_bytes(),
    }
}

/// Whether `record` (just read, with this id and name) is `old` (of the base chunk `chunk`) in
/// every respect a decision or an identity header can see. Positions (partner, environment,
/// scope set) are comparable because the builder kept the base's.
fn same(record: &KeyRecord, id: &str, name: Option<&str>, old: &KeyRecord, chunk: &Chunk) -> bool {
    // Every field named, so that a field added to `KeyRecord` must be added here too.
    let KeyRecord {
        digest,
        id_header: _, // the id, compared below as text
        expires_at_ms,
        restrictions,
        name: _, // a place in the chunk's text, compared below as text
        partner,
        scopes,
        environment,
        rate_limit_per_minute,
        status,
        kind,
    } = record;
    *digest == old.digest
        && *kind == old.kind
        && *status == old.status
        && *expires_at_ms == old.expires_at_ms
        && *rate_limit_per_minute == old.rate_limit_per_minute
        && *partner == old.partner
        && *scopes == old.scopes
        && *environment == old.environment
        && *restrictions == old.restrictions
        && id.as_bytes() == old.id_bytes()
        && name == chunk.name(old)
}

/// A record of the base, for a chunk rebuilt around it.
fn copy(r: &KeyRecord) -> KeyRecord {
    KeyRecord {
        digest: r.digest,
        id_header: r.id_header.clone(),
        expires_at_ms: r.expires_at_ms,
        restrictions: r.restrictions.clone(),
        name: r.name,
        partner: r.partner,
        scopes: r.scopes,
        environment: r.environment,
        rate_limit_per_minute: r.rate_limit_per_minute,
        status: r.status,
        kind: r.kind,
    }
}

/// The name at `name` in a bucket's text, if the key has one.
fn name_in(text: &str, name: Span) -> Option<&str> {
    (name.len != Span::NONE.len).then(|| &text[name.range()])
}

/// Append to a bucket's text; `None` past what `u32` offsets reach.
fn push_text(text: &mut String, s: &str) -> Option<Span> {
    let start = u32::try_from(text.len()).ok()?;
    let len = u32::try_from(s.len()).ok()?;
    start.checked_add(len).filter(|&end| end < u32::MAX)?;
    text.push_str(s);
    Some(Span { start, len })
}

/// A key's `allowed_*` lists; `None` when none restricts anything.
fn restrictions(
    cidrs: Option<&[Text<'_>]>,
    referrers: Option<&[Text<'_>]>,
    routes: Option<&[Text<'_>]>,
    fail: &impl Fn(String) -> Failure,
) -> Result<Option<Box<Restrictions>>, Failure> {
    let (cidrs, referrers, routes) = (
        cidrs.unwrap_or_default(),
        referrers.unwrap_or_default(),
        routes.unwrap_or_default(),
    );
    if cidrs.is_empty() && referrers.is_empty() && routes.is_empty() {
        return Ok(None);
    }
    let mut nets = Vec::with_capacity(cidrs.len());
    for (i, c) in cidrs.iter().enumerate() {
        nets.push(parse_cidr(c).ok_or_else(|| {
            fail(format!(
                "allowed_cidrs[{i}] is not a CIDR like \"10.0.0.0/8\" or an IP address"
            ))
        })?);
    }
    let mut patterns = Vec::with_capacity(referrers.len());
    for (i, r) in referrers.iter().enumerate() {
        patterns.push(
            ReferrerPattern::parse(r)
                .map_err(|e| fail(format!("allowed_referrers[{i}] {}", referrer_problem(&e))))?,
        );
    }
    let routes = if routes.is_empty() {
        None
    } else {
        let mut unique: Vec<(RoutePattern, ())> = Vec::with_capacity(routes.len());
        for (i, r) in routes.iter().enumerate() {
            let p = RoutePattern::parse(r)
                .map_err(|e| fail(format!("allowed_routes[{i}] {}", route_problem(&e))))?;
            if !unique.iter().any(|(x, ())| x.same_route(&p)) {
                unique.push((p, ()));
            }
        }
        Some(
            RouteTable::new(unique)
                .map_err(|e| fail(format!("allowed_routes {}", route_problem(&e))))?,
        )
    };
    Ok(Some(Box::new(Restrictions {
        cidrs: nets.into(),
        referrers: ReferrerSet::new(patterns),
        routes,
    })))
}
