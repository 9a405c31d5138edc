//! `keygate.snapshot/v1` JSON → [`Snapshot`].
//!
//! Two kinds of failure, as the contract asks: a *document* error (not JSON, wrong schema, no
//! revision) rejects the whole document, so the caller keeps the snapshot in force; an *entry*
//! error (bad digest, unknown partner, duplicate digest or id, bad CIDR, …) quarantines only that
//! entry, which then acts as an absent key. Pure: no I/O beyond the reader it is given, no clock,
//! no logging (the caller logs the quarantine list).
//!
//! A document is read entry by entry ([`split`]) into one [`Builder`], whether it comes from a
//! file (never held whole in memory), from bytes, or as entries a sync client keeps: the same
//! checks, in the same order, whatever the source. Entries may come in any order (`keys` before
//! `partners` is legal JSON): a key names its partner by an interned id, resolved at the end.
//! A reload takes a key entry whose text is, byte for byte, one the snapshot in force was read
//! from as that record, unread (`snapshot::memo`); what depends on other entries (partners,
//! duplicates) is checked for it all the same.

mod keys;
mod split;

use std::collections::HashMap;
use std::io::Read;
use std::sync::Arc;

use http::HeaderValue;
use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::{DigestKind, Partner, PartnerStatus, Quarantined, Snapshot};
use crate::referrer::ReferrerError;
use crate::routes::RouteError;
use keys::KeysBuilder;
pub use split::ReadError;
use split::{Entries, List};

pub const SCHEMA: &str = "keygate.snapshot/v1";

/// Why a whole document was rejected. Never contains key material: only positions and names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DocumentError {
    #[error("not a JSON snapshot document: {0}")]
    Json(String),
    /// What was found, as [`DocumentError::schema`] shows it.
    #[error("schema is {0}, expected \"keygate.snapshot/v1\"")]
    Schema(String),
}

impl DocumentError {
    /// A schema other than keygate's. Named when it is one of keygate's own
    /// (`"keygate.snapshot/v2"`), only described otherwise: a document's text is never echoed
    /// into logs, since a field may hold a key by mistake.
    pub(crate) fn schema(found: Option<&str>) -> Self {
        let ours = |s: &str| {
            s.len() <= 32
                && s.strip_prefix("keygate.snapshot/")
                    .is_some_and(|v| v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.'))
        };
        DocumentError::Schema(match found {
            None => "missing".to_owned(),
            Some(s) if ours(s) => format!("{s:?}"),
            Some(s) => format!("another value ({} characters)", s.chars().count()),
        })
    }
}

/// A document's envelope, its entries left as unparsed JSON.
#[derive(Deserialize)]
pub(crate) struct RawDocument<'a> {
    pub schema: Option<String>,
    pub revision: u64,
    pub generated_at: Option<String>,
    #[serde(default, borrow)]
    pub partners: Vec<&'a RawValue>,
    #[serde(default, borrow)]
    pub keys: Vec<&'a RawValue>,
}

/// What is left of a document once its entries have been read: the two lists are empty, but
/// still checked to be lists (and each member present once).
#[derive(Deserialize)]
struct Envelope {
    schema: Option<String>,
    revision: u64,
    generated_at: Option<String>,
    #[serde(default, rename = "partners")]
    _partners: Vec<IgnoredAny>,
    #[serde(default, rename = "keys")]
    _keys: Vec<IgnoredAny>,
}

#[derive(Deserialize)]
struct RawPartner {
    id: String,
    #[serde(default)]
    org_id: Option<String>,
    status: String,
}

/// Parse and index a document. `pepper` verifies `hmac-sha256:` digests; without it such
/// entries are quarantined.
pub fn parse(bytes: &[u8], pepper: Option<Arc<[u8]>>) -> Result<Snapshot, DocumentError> {
    parse_with_base(bytes, pepper, None)
}

/// As [`parse`], sharing the keys that did not change with `base`, the snapshot in force (a
/// reload): only the chunks where a key changed are built. The result is the same as without.
pub fn parse_with_base(
    bytes: &[u8],
    pepper: Option<Arc<[u8]>>,
    base: Option<&Snapshot>,
) -> Result<Snapshot, DocumentError> {
    let mut builder = Builder::new(pepper, base, keys_in(bytes.len() as u64));
    let envelope = split::split_slice(bytes, &mut builder)?;
    builder.finish_envelope(&envelope)
}

/// As [`parse_with_base`], reading the document from `reader` a block at a time: the document
/// is never held whole, only the entry being read and what the index keeps of the others.
/// `len` (the file's size, say) only sizes what is built.
pub fn parse_reader(
    reader: impl Read,
    pepper: Option<Arc<[u8]>>,
    base: Option<&Snapshot>,
    len: u64,
) -> Result<Snapshot, ReadError> {
    let mut builder = Builder::new(pepper, base, keys_in(len));
    let envelope = split::split_reader(reader, &mut builder)?;
    Ok(builder.finish_envelope(&envelope)?)
}

/// About how many keys a document of `len` bytes holds (entries are 250 to 450 bytes).
fn keys_in(len: u64) -> usize {
    usize::try_from(len / 400).unwrap_or(usize::MAX)
}

/// Index a document given as its parts: each partner and key entry as the JSON object the
/// document holds. The gRPC sync client calls this with entries it keeps by id and updates with
/// deltas.
pub fn build(
    revision: u64,
    generated_at: Option<String>,
    raw_partners: &[&RawValue],
    raw_keys: &[&RawValue],
    pepper: Option<Arc<[u8]>>,
) -> Snapshot {
    build_with_base(revision, generated_at, raw_partners, raw_keys, pepper, None)
}

/// As [`build`], sharing the keys that did not change with `base`, the snapshot in force.
pub fn build_with_base(
    revision: u64,
    generated_at: Option<String>,
    raw_partners: &[&RawValue],
    raw_keys: &[&RawValue],
    pepper: Option<Arc<[u8]>>,
    base: Option<&Snapshot>,
) -> Snapshot {
    let mut builder = Builder::new(pepper, base, raw_keys.len());
    let lists = [(List::Partners, raw_partners), (List::Keys, raw_keys)];
    for (list, entries) in lists {
        for (position, raw) in entries.iter().enumerate() {
            // A `RawValue` is JSON already: its entry can be quarantined, never refused as
            // not JSON.
            let _ = builder.entry(list, position, raw.get());
        }
    }
    builder.finish(revision, generated_at)
}

/// A partner id as keys and partner entries name it, interned: keys may come before the
/// partner entries they name.
#[derive(Default)]
pub(super) struct PartnerIds {
    slots: HashMap<Box<str>, u32>,
    ids: Vec<Box<str>>,
}

impl PartnerIds {
    /// The positions of `partners` (a snapshot's), kept. A placeholder's position is kept but
    /// not its id (it has none).
    fn seeded(partners: &[Partner]) -> Self {
        let mut ids = PartnerIds::default();
        for (i, p) in partners.iter().enumerate() {
            if !p.id.is_empty() {
                ids.slots.insert(p.id.clone(), i as u32);
            }
            ids.ids.push(p.id.clone());
        }
        ids
    }

    pub fn slot(&mut self, id: &str) -> u32 {
        if let Some(&slot) = self.slots.get(id) {
            return slot;
        }
        let slot = self.ids.len() as u32;
        self.ids.push(id.into());
        self.slots.insert(id.into(), slot);
        slot
    }
}

/// What the document says about one partner id.
enum PartnerEntry {
    /// Named by keys only, or only by entries that were quarantined.
    Missing,
    One(Partner),
    /// Two valid entries with this id: neither is trusted.
    Ambiguous,
}

/// A document being read, entry by entry, in any order.
/// Entries read between two yields of the building thread (see `Builder::entry`).
const YIELD_EVERY: usize = 256;

pub(super) struct Builder<'b> {
    pepper: Option<Arc<[u8]>>,
    /// Partner ids by position (the snapshot's partner positions): a reload starts from the
    /// positions of the snapshot in force, so that the records it shares still name the right
    /// partner.
    partner_ids: PartnerIds,
    /// By partner position.
    partners: Vec<PartnerEntry>,
    keys: KeysBuilder<'b>,
    quarantined: Vec<Quarantined>,
    /// Key entries that failed a check made after their partner's: quarantined for their
    /// partner instead, if it turns out missing or ambiguous (the order today's checks run in).
    pending: Vec<(u32, Quarantined)>,
}

impl Entries for Builder<'_> {
    fn entry(&mut self, list: List, position: usize, text: &str) -> Result<(), DocumentError> {
        pace(position);
        match list {
            List::Partners => self.partner(position, text),
            List::Keys => self.key(position, text),
        }
    }

    fn expected(&mut self, list: List, rest: &[u8]) -> Option<usize> {
        match list {
            List::Partners => None,
            List::Keys => self.keys.expected(rest),
        }
    }

    fn expected_entry(&mut self, list: List, position: usize) -> Result<(), DocumentError> {
        pace(position);
        debug_assert_eq!(list, List::Keys, "only key entries are expected");
        self.keys.add_expected();
        Ok(())
    }
}

/// A reload shares the machine with the request threads: every few hundred entries (a few
/// hundred microseconds) it lets any runnable thread go first, so a request waits that long at
/// most instead of a scheduler slice of several milliseconds.
fn pace(position: usize) {
    if position % YIELD_EVERY == YIELD_EVERY - 1 {
        std::thread::yield_now();
    }
}

impl<'b> Builder<'b> {
    /// With `base`, the snapshot in force, its positions are kept and its unchanged keys
    /// shared, when it is compact and sized for about as many keys as `keys_hint`.
    fn new(pepper: Option<Arc<[u8]>>, base: Option<&'b Snapshot>, keys_hint: usize) -> Self {
        let base = base.filter(|b| {
            b.reusable && b.chunk_bits.abs_diff(super::chunk::chunk_bits(keys_hint)) <= 2
        });
        let partner_ids = PartnerIds::seeded(base.map_or(&[][..], |b| &b.partners));
        // An entry reads the same as when the base was built from it only under the same
        // pepper (without one, an HMAC digest is quarantined): else every entry is read again.
        let recall = base.is_some_and(|b| b.pepper.as_deref() == pepper.as_deref());
        Self {
            keys: KeysBuilder::new(pepper.is_some(), base, recall, keys_hint),
            pepper,
            partner_ids,
            partners: Vec::new(),
            quarantined: Vec::new(),
            pending: Vec::new(),
        }
    }

    fn key(&mut self, position: usize, text: &str) -> Result<(), DocumentError> {
        match self.keys.add(text, &mut self.partner_ids) {
            Ok(()) => Ok(()),
            Err(keys::Failure::NotJson(e)) => match not_json(List::Keys, position, text, e) {
                Ok(e) => {
                    // Not reached: `add` tells data errors in JSON apart already.
                    let entry = entry_id(text).map(|id| format!("key {id}"));
                    let entry = entry.unwrap_or_else(|| format!("keys[{position}]"));
                    self.quarantined.push(q(entry, redact(&e)));
                    Ok(())
                }
                Err(document) => Err(document),
            },
            Err(keys::Failure::Entry {
                entry,
                reason,
                partner,
            }) => {
                let q = q(entry.unwrap_or_else(|| format!("keys[{position}]")), reason);
                match partner {
                    None => self.quarantined.push(q),
                    Some(slot) => self.pending.push((slot, q)),
                }
                Ok(())
            }
        }
    }

    fn partner(&mut self, position: usize, text: &str) -> Result<(), DocumentError> {
        let label = || {
            entry_id(text)
                .map(|id| format!("partner {id}"))
                .unwrap_or_else(|| format!("partners[{position}]"))
        };
        let p: RawPartner = match serde_json::from_str(text) {
            Ok(p) => p,
            Err(e) => {
                let reason = redact(&not_json(List::Partners, position, text, e)?);
                self.quarantined.push(q(label(), reason));
                return Ok(());
            }
        };
        if !is_id(&p.id) {
            self.quarantined
                .push(q(label(), "id must be 1-128 of A-Z a-z 0-9 _ - . :"));
            return Ok(());
        }
        let status = match p.status.as_str() {
            "active" => PartnerStatus::Active,
            "suspended" => PartnerStatus::Suspended,
            "deactivated" => PartnerStatus::Deactivated,
            "payment_required" => PartnerStatus::PaymentRequired,
            _ => {
                self.quarantined.push(q(
                    label(),
                    "status must be \"active\", \"suspended\", \"deactivated\" or \"payment_required\"",
                ));
                return Ok(());
            }
        };
        if let Some(org) = p.org_id.as_deref() {
            if !is_id(org) {
                self.quarantined
                    .push(q(label(), "org_id must be 1-128 of A-Z a-z 0-9 _ - . :"));
                return Ok(());
            }
        }
        let slot = self.partner_ids.slot(&p.id) as usize;
        if self.partners.len() <= slot {
            self.partners
                .resize_with(slot + 1, || PartnerEntry::Missing);
        }
        self.partners[slot] = match self.partners[slot] {
            PartnerEntry::Missing => PartnerEntry::One(Partner {
                id_header: header(&p.id),
                org_header: p.org_id.as_deref().map(header),
                id: p.id.into_boxed_str(),
                org_id: p.org_id.map(String::into_boxed_str),
                status,
            }),
            PartnerEntry::One(_) | PartnerEntry::Ambiguous => PartnerEntry::Ambiguous,
        };
        Ok(())
    }

    /// The document is read: check its envelope, then index.
    fn finish_envelope(self, envelope: &[u8]) -> Result<Snapshot, DocumentError> {
        // serde skips unknown members without looking at their bytes; the whole document must
        // be UTF-8 all the same (the entries were checked as they came).
        std::str::from_utf8(envelope).map_err(|_| DocumentError::Json("not UTF-8".into()))?;
        let doc: Envelope =
            serde_json::from_slice(envelope).map_err(|e| DocumentError::Json(redact(&e)))?;
        match doc.schema.as_deref() {
            Some(SCHEMA) => {}
            other => return Err(DocumentError::schema(other)),
        }
        Ok(self.finish(doc.revision, doc.generated_at))
    }

    fn finish(mut self, revision: u64, generated_at: Option<String>) -> Snapshot {
        // Each partner position: its partner, or why its keys are quarantined (and a
        // placeholder no key in force names).
        self.partners
            .resize_with(self.partner_ids.ids.len(), || PartnerEntry::Missing);
        let mut partners = Vec::with_capacity(self.partners.len());
        let mut resolved = Vec::with_capacity(self.partners.len());
        let mut present = 0;
        for (entry, id) in self.partners.into_iter().zip(&self.partner_ids.ids) {
            let (partner, outcome) = match entry {
                PartnerEntry::One(p) => {
                    present += 1;
                    (p, Ok(()))
                }
                PartnerEntry::Missing => (
                    placeholder(),
                    Err("partner_id names no partner entry".to_owned()),
                ),
                PartnerEntry::Ambiguous => {
                    self.quarantined.push(q(
                        format!("partner {id}"),
                        "the partner id appears more than once",
                    ));
                    (placeholder(), Err(format!("partner {id} is ambiguous")))
                }
            };
            partners.push(partner);
            resolved.push(outcome);
        }
        for (slot, mut q) in self.pending {
            if let Err(reason) = &resolved[slot as usize] {
                q.reason.clone_from(reason);
            }
            self.quarantined.push(q);
        }
        let keys = self.keys.finish(&resolved, &mut self.quarantined);
        let mut quarantined = self.quarantined;
        quarantined.sort_by(|a, b| a.entry.cmp(&b.entry).then(a.reason.cmp(&b.reason)));

        Snapshot {
            revision,
            generated_at: generated_at.map(String::into_boxed_str),
            reusable: keys.compact && partners.len() <= 2 * present + 64,
            partners,
            environments: keys.environments,
            scope_sets: keys.scope_sets,
            quarantined,
            chunks: keys.chunks,
            chunk_bits: keys.chunk_bits,
            key_count: keys.key_count,
            has_sha256: keys.has_sha256,
            has_hmac: keys.has_hmac,
            pepper: self.pepper,
            memo: keys.memo,
            recalled: keys.recalled,
        }
    }
}

/// The partner at a position no key in force names (an id only quarantined keys name, or
/// that the document gives twice): no id (the document's text is not kept, it may be
/// anything), deactivated should anything look.
fn placeholder() -> Partner {
    Partner {
        id: "".into(),
        org_id: None,
        status: PartnerStatus::Deactivated,
        id_header: HeaderValue::from_static(""),
        org_header: None,
    }
}

/// An entry serde could not read. If it is not JSON at all the whole document is (a document
/// error); else `e` says why the entry is quarantined.
fn not_json(
    list: List,
    position: usize,
    text: &str,
    e: serde_json::Error,
) -> Result<serde_json::Error, DocumentError> {
    // A value of the wrong shape, or a lone surrogate escape in a string (JSON, but no Rust
    // string): the entry's error, if the entry is JSON.
    let syntax = match serde_json::from_str::<IgnoredAny>(text) {
        Ok(_) => return Ok(e),
        Err(syntax) => syntax,
    };
    Err(DocumentError::Json(format!(
        "{}[{position}]: {}",
        list.name(),
        redact(&syntax)
    )))
}

/// serde's messages quote offending values (`invalid type: string "…"`). A snapshot holds no
/// keys, but a misplaced digest or a key pasted into the wrong field must not reach a log either:
/// quoted text is replaced by `"…"`. (serde quotes as Rust's `Debug` does: a `"` inside is
/// escaped, `\"`, and does not end the quote.)
pub(crate) fn redact(e: &serde_json::Error) -> String {
    redact_text(&e.to_string())
}

fn redact_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let (mut quoted, mut escaped) = (false, false);
    for c in text.chars() {
        match (c, quoted) {
            ('"', false) => {
                out.push_str("\"…");
                quoted = true;
            }
            (_, true) if escaped => escaped = false,
            ('\\', true) => escaped = true,
            ('"', true) => {
                out.push('"');
                quoted = false;
            }
            (_, true) => {}
            (c, false) => out.push(c),
        }
    }
    out
}

fn q(entry: String, reason: impl Into<String>) -> Quarantined {
    Quarantined {
        entry,
        reason: reason.into(),
    }
}

/// Ids travel in headers and logs: a conservative alphabet keeps both safe.
fn is_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
}

fn header(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).expect("validated ids are valid header values")
}

fn entry_id(text: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct JustId {
        id: String,
    }
    serde_json::from_str::<JustId>(text)
        .ok()
        .map(|j| j.id)
        .filter(|id| is_id(id))
}

// Reasons name the field and position but never repeat its value: a key or digest pasted into
// the wrong field must not reach a log (the error types below quote the text they rejected).

fn referrer_problem(e: &ReferrerError) -> &'static str {
    match e {
        ReferrerError::Empty => "is empty",
        ReferrerError::InvalidCharacter(_) => {
            "contains whitespace, a control character or a non-ASCII character"
        }
        ReferrerError::MissingScheme(_) => "must start with http://, https:// or *://",
        ReferrerError::UnsupportedScheme(_) => "has a scheme other than http, https or *",
        ReferrerError::UserInfo(_) => "contains user info ('@')",
        ReferrerError::EmptyHost(_) => "has no host",
        ReferrerError::InvalidHost(_) => "has a host that is not a host name or IP address",
        ReferrerError::InvalidWildcard(_) => {
            "uses '*' in the host other than as a whole leading label (*.example.com)"
        }
        ReferrerError::InvalidPort(_) => "has a port that is not a number from 1 to 65535",
        ReferrerError::QueryOrFragment(_) => "contains a query or fragment",
    }
}

fn route_problem(e: &RouteError) -> String {
    match e {
        RouteError::Empty => "is empty".into(),
        RouteError::MissingMethod { .. } => {
            "has no method (write \"GET /path\" or \"* /path\")".into()
        }
        RouteError::MissingPath { .. } => "has no path after the method".into(),
        RouteError::BadMethod { .. } => "has a method that is not uppercase letters or '*'".into(),
        RouteError::NotAbsolute { .. } => "has a path that does not start with '/'".into(),
        RouteError::RestNotFinal { .. } => "has '**' before the last segment".into(),
        RouteError::BadWildcard { .. } => "has '*' inside a segment".into(),
        RouteError::InvalidPath { reason, .. } => format!("has an invalid path: {reason}"),
        RouteError::Duplicate { .. } => "list the same route twice".into(),
    }
}

fn parse_digest(s: &str) -> Result<(DigestKind, [u8; 32]), &'static str> {
    let (kind, hex_part) = if let Some(h) = s.strip_prefix("sha256:") {
        (DigestKind::Sha256, h)
    } else if let Some(h) = s.strip_prefix("hmac-sha256:") {
        (DigestKind::HmacSha256, h)
    } else {
        return Err("hash must be \"sha256:<hex>\" or \"hmac-sha256:<hex>\"");
    };
    const BAD: &str = "hash must end in 64 lowercase hex digits";
    if hex_part.len() != 64 {
        return Err(BAD);
    }
    // One pass that checks and decodes: a million digests are read at every load.
    let mut digest = [0u8; 32];
    let mut invalid = 0;
    for (byte, pair) in digest.iter_mut().zip(hex_part.as_bytes().chunks_exact(2)) {
        let (high, low) = (HEX[pair[0] as usize], HEX[pair[1] as usize]);
        invalid |= high | low;
        *byte = high << 4 | low;
    }
    if invalid & NOT_HEX != 0 {
        return Err(BAD);
    }
    Ok((kind, digest))
}

/// Marks a byte that is not a lowercase hex digit in [`HEX`].
const NOT_HEX: u8 = 0x10;

/// The value of each lowercase hex digit; [`NOT_HEX`] for every other byte.
const HEX: [u8; 256] = {
    let mut table = [NOT_HEX; 256];
    let mut i = 0;
    while i < 10 {
        table[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        table[b'a' as usize + i] = 10 + i as u8;
        i += 1;
    }
    table
};

/// RFC 3339 → Unix milliseconds.
pub fn parse_rfc3339_ms(s: &str) -> Option<i64> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}
