//! `keygate.snapshot/v1` JSON → [`Snapshot`].
//!
//! Two kinds of failure, as the contract asks: a *document* error (not JSON, wrong schema, no
//! revision) rejects the whole document, so the caller keeps the snapshot in force; an *entry*
//! error (bad digest, unknown partner, duplicate digest or id, bad CIDR, …) quarantines only that
//! entry, which then acts as an absent key. Pure: no I/O, no clock, no logging (the caller logs
//! the quarantine list).

mod keys;

use std::collections::HashMap;
use std::sync::Arc;

use http::HeaderValue;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::{DigestKind, Partner, PartnerStatus, Quarantined, Snapshot};
use crate::referrer::ReferrerError;
use crate::routes::RouteError;
use keys::KeysBuilder;

type EntryError = (Option<String>, String);

pub const SCHEMA: &str = "keygate.snapshot/v1";

/// Why a whole document was rejected. Never contains key material: only positions and names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DocumentError {
    #[error("not a JSON snapshot document: {0}")]
    Json(String),
    #[error("schema is {0:?}, expected \"keygate.snapshot/v1\"")]
    Schema(String),
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
    let text = std::str::from_utf8(bytes).map_err(|_| DocumentError::Json("not UTF-8".into()))?;
    let doc: RawDocument<'_> =
        serde_json::from_str(text).map_err(|e| DocumentError::Json(redact(&e)))?;
    match doc.schema.as_deref() {
        Some(SCHEMA) => {}
        Some(other) => return Err(DocumentError::Schema(other.to_owned())),
        None => return Err(DocumentError::Schema(String::new())),
    }
    Ok(build(
        doc.revision,
        doc.generated_at,
        &doc.partners,
        &doc.keys,
        pepper,
    ))
}

/// Index a document given as its parts: each partner and key entry as the JSON object the
/// document holds. [`parse`] calls this after reading the envelope; the gRPC sync client calls
/// it with entries it keeps by id and updates with deltas.
pub fn build(
    revision: u64,
    generated_at: Option<String>,
    raw_partners: &[&RawValue],
    raw_keys: &[&RawValue],
    pepper: Option<Arc<[u8]>>,
) -> Snapshot {
    let mut quarantined = Vec::new();
    let partners = parse_partners(raw_partners, &mut quarantined);
    let mut partner_index: HashMap<&str, Option<u32>> = HashMap::new();
    for (i, p) in partners.iter().enumerate() {
        partner_index
            .entry(&p.id)
            .and_modify(|slot| *slot = None) // a duplicate id: neither entry is trusted
            .or_insert(Some(i as u32));
    }
    for (id, slot) in &partner_index {
        if slot.is_none() {
            quarantined.push(q(
                format!("partner {id}"),
                "the partner id appears more than once",
            ));
        }
    }

    // First pass: each key on its own.
    let mut keys = KeysBuilder::new(&partner_index, pepper.is_some(), raw_keys.len());
    for (pos, raw) in raw_keys.iter().enumerate() {
        if let Err((entry, reason)) = keys.add(raw) {
            quarantined.push(q(entry.unwrap_or_else(|| format!("keys[{pos}]")), reason))
        }
    }
    // Second pass: duplicates make every entry involved ambiguous.
    let keys = keys.finish(&mut quarantined);
    quarantined.sort_by(|a, b| a.entry.cmp(&b.entry).then(a.reason.cmp(&b.reason)));

    Snapshot {
        revision,
        generated_at: generated_at.map(String::into_boxed_str),
        partners,
        environments: keys.environments,
        scope_sets: keys.scope_sets,
        keys: keys.records,
        quarantined,
        text: keys.text,
        by_sha256: keys.by_sha256,
        by_hmac: keys.by_hmac,
        pepper,
    }
}

/// serde's messages quote offending values (`invalid type: string "…"`). A snapshot holds no
/// keys, but a misplaced digest or a key pasted into the wrong field must not reach a log either:
/// quoted text is replaced by `"…"`.
fn redact(e: &serde_json::Error) -> String {
    let text = e.to_string();
    let mut out = String::with_capacity(text.len());
    let mut quoted = false;
    for c in text.chars() {
        match (c, quoted) {
            ('"', false) => {
                out.push_str("\"…");
                quoted = true;
            }
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

fn entry_id(raw: &RawValue) -> Option<String> {
    #[derive(Deserialize)]
    struct JustId {
        id: String,
    }
    serde_json::from_str::<JustId>(raw.get())
        .ok()
        .map(|j| j.id)
        .filter(|id| is_id(id))
}

fn parse_partners(raw: &[&RawValue], quarantined: &mut Vec<Quarantined>) -> Vec<Partner> {
    let mut out = Vec::with_capacity(raw.len());
    for (pos, value) in raw.iter().enumerate() {
        let label = || {
            entry_id(value)
                .map(|id| format!("partner {id}"))
                .unwrap_or_else(|| format!("partners[{pos}]"))
        };
        let p: RawPartner = match serde_json::from_str(value.get()) {
            Ok(p) => p,
            Err(e) => {
                quarantined.push(q(label(), redact(&e)));
                continue;
            }
        };
        if !is_id(&p.id) {
            quarantined.push(q(label(), "id must be 1-128 of A-Z a-z 0-9 _ - . :"));
            continue;
        }
        let status = match p.status.as_str() {
            "active" => PartnerStatus::Active,
            "suspended" => PartnerStatus::Suspended,
            "deactivated" => PartnerStatus::Deactivated,
            "payment_required" => PartnerStatus::PaymentRequired,
            _ => {
                quarantined.push(q(
                    label(),
                    "status must be \"active\", \"suspended\", \"deactivated\" or \"payment_required\"",
                ));
                continue;
            }
        };
        if let Some(org) = p.org_id.as_deref() {
            if !is_id(org) {
                quarantined.push(q(label(), "org_id must be 1-128 of A-Z a-z 0-9 _ - . :"));
                continue;
            }
        }
        out.push(Partner {
            id_header: header(&p.id),
            org_header: p.org_id.as_deref().map(header),
            id: p.id.into_boxed_str(),
            org_id: p.org_id.map(String::into_boxed_str),
            status,
        });
    }
    out
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
