//! `keygate.snapshot/v1` JSON → [`Snapshot`].
//!
//! Two kinds of failure, as the contract asks: a *document* error (not JSON, wrong schema, no
//! revision) rejects the whole document, so the caller keeps the snapshot in force; an *entry*
//! error (bad digest, unknown partner, duplicate digest or id, bad CIDR, …) quarantines only that
//! entry, which then acts as an absent key. Pure: no I/O, no clock, no logging (the caller logs
//! the quarantine list).

use std::collections::HashMap;
use std::sync::Arc;

use http::HeaderValue;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::{DigestMap, KeyRecord, KeyStatus, Partner, PartnerStatus, Quarantined, Snapshot};
use crate::config::{is_scope, parse_cidr};
use crate::referrer::{ReferrerError, ReferrerPattern, ReferrerSet};
use crate::routes::{RouteError, RoutePattern, RouteTable};

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

#[derive(Deserialize)]
struct RawKey {
    id: String,
    #[serde(default)]
    name: Option<String>,
    hash: String,
    partner_id: String,
    environment: String,
    #[serde(default)]
    scopes: Vec<String>,
    status: String,
    #[serde(default)]
    expires_at: Option<String>,
    #[serde(default)]
    rate_limit_per_minute: Option<u32>,
    #[serde(default)]
    allowed_cidrs: Option<Vec<String>>,
    #[serde(default)]
    allowed_referrers: Option<Vec<String>>,
    #[serde(default)]
    allowed_routes: Option<Vec<String>>,
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
    let mut candidates: Vec<(KeyRecord, super::DigestKind)> = Vec::with_capacity(raw_keys.len());
    for (pos, raw) in raw_keys.iter().enumerate() {
        match parse_key(raw, &partner_index, pepper.is_some()) {
            Ok(c) => candidates.push(c),
            Err((entry, reason)) => {
                quarantined.push(q(entry.unwrap_or_else(|| format!("keys[{pos}]")), reason))
            }
        }
    }

    // Second pass: duplicates make every entry involved ambiguous.
    let mut digest_count: HashMap<[u8; 32], u32> = HashMap::with_capacity(candidates.len());
    let mut id_count: HashMap<&str, u32> = HashMap::with_capacity(candidates.len());
    for (k, _) in &candidates {
        *digest_count.entry(k.digest).or_default() += 1;
        *id_count.entry(&k.id).or_default() += 1;
    }
    let mut duplicate_digest = Vec::new();
    let mut duplicate_id = Vec::new();
    for (i, (k, _)) in candidates.iter().enumerate() {
        if digest_count[&k.digest] > 1 {
            duplicate_digest.push(i);
        } else if id_count[&*k.id] > 1 {
            duplicate_id.push(i);
        }
    }
    drop(id_count);
    let mut drop_mask = vec![false; candidates.len()];
    for i in duplicate_digest {
        drop_mask[i] = true;
        let id = &candidates[i].0.id;
        quarantined.push(q(format!("key {id}"), "another entry has the same digest"));
    }
    for i in duplicate_id {
        drop_mask[i] = true;
        let id = &candidates[i].0.id;
        quarantined.push(q(format!("key {id}"), "the key id appears more than once"));
    }

    let mut keys = Vec::with_capacity(candidates.len());
    let mut by_sha256 = DigestMap::default();
    let mut by_hmac = DigestMap::default();
    for ((record, kind), dropped) in candidates.into_iter().zip(drop_mask) {
        if dropped {
            continue;
        }
        let index = keys.len() as u32;
        match kind {
            super::DigestKind::Sha256 => by_sha256.insert(record.digest, index),
            super::DigestKind::HmacSha256 => by_hmac.insert(record.digest, index),
        };
        keys.push(record);
    }
    quarantined.sort_by(|a, b| a.entry.cmp(&b.entry).then(a.reason.cmp(&b.reason)));

    Snapshot {
        revision,
        generated_at: generated_at.map(String::into_boxed_str),
        partners,
        keys,
        quarantined,
        by_sha256,
        by_hmac,
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

type EntryError = (Option<String>, String);

fn parse_key(
    raw: &RawValue,
    partners: &HashMap<&str, Option<u32>>,
    have_pepper: bool,
) -> Result<(KeyRecord, super::DigestKind), EntryError> {
    let k: RawKey = serde_json::from_str(raw.get())
        .map_err(|e| (entry_id(raw).map(|id| format!("key {id}")), redact(&e)))?;
    if !is_id(&k.id) {
        return Err((None, "id must be 1-128 of A-Z a-z 0-9 _ - . :".into()));
    }
    let label = Some(format!("key {}", k.id));
    let fail = |reason: String| (label.clone(), reason);

    let (kind, digest) = parse_digest(&k.hash).map_err(|r| fail(r.into()))?;
    if kind == super::DigestKind::HmacSha256 && !have_pepper {
        return Err(fail(
            "hmac-sha256 digest, but no pepper is configured (snapshot.pepper_env)".into(),
        ));
    }
    let partner = match partners.get(k.partner_id.as_str()) {
        Some(Some(i)) => *i,
        Some(None) => return Err(fail(format!("partner {} is ambiguous", k.partner_id))),
        None => return Err(fail("partner_id names no partner entry".into())),
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
    let status = match k.status.as_str() {
        "active" => KeyStatus::Active,
        "revoked" => KeyStatus::Revoked,
        _ => return Err(fail("status must be \"active\" or \"revoked\"".into())),
    };
    let mut scopes = k.scopes;
    if let Some(i) = scopes.iter().position(|s| !is_scope(s)) {
        return Err(fail(format!(
            "scopes[{i}] is not a scope (1-128 visible ASCII characters, no ',')"
        )));
    }
    scopes.sort();
    scopes.dedup();
    let expires_at_ms = match k.expires_at.as_deref() {
        None => None,
        Some(s) => Some(parse_rfc3339_ms(s).ok_or_else(|| {
            fail("expires_at is not an RFC 3339 time like \"2027-01-31T00:00:00Z\"".into())
        })?),
    };
    if k.rate_limit_per_minute == Some(0) {
        return Err(fail("rate_limit_per_minute must be more than 0".into()));
    }
    let mut cidrs = Vec::new();
    for (i, c) in k.allowed_cidrs.unwrap_or_default().iter().enumerate() {
        cidrs.push(parse_cidr(c).ok_or_else(|| {
            fail(format!(
                "allowed_cidrs[{i}] is not a CIDR like \"10.0.0.0/8\" or an IP address"
            ))
        })?);
    }
    let mut referrers = Vec::new();
    for (i, r) in k.allowed_referrers.unwrap_or_default().iter().enumerate() {
        referrers.push(
            ReferrerPattern::parse(r)
                .map_err(|e| fail(format!("allowed_referrers[{i}] {}", referrer_problem(&e))))?,
        );
    }
    let allowed_routes = match k.allowed_routes {
        Some(list) if !list.is_empty() => {
            let mut patterns = Vec::with_capacity(list.len());
            for (i, r) in list.iter().enumerate() {
                let p = RoutePattern::parse(r)
                    .map_err(|e| fail(format!("allowed_routes[{i}] {}", route_problem(&e))))?;
                if !patterns
                    .iter()
                    .any(|(x, ()): &(RoutePattern, ())| x.same_route(&p))
                {
                    patterns.push((p, ()));
                }
            }
            Some(
                RouteTable::new(patterns)
                    .map_err(|e| fail(format!("allowed_routes {}", route_problem(&e))))?,
            )
        }
        _ => None,
    };
    let scopes_joined = scopes.join(" ");
    let record = KeyRecord {
        id_header: header(&k.id),
        environment_header: header(&k.environment),
        scopes_header: HeaderValue::from_str(&scopes_joined).map_err(|_| fail("scopes".into()))?,
        id: k.id.into_boxed_str(),
        name: k.name.map(String::into_boxed_str),
        partner,
        environment: k.environment.into_boxed_str(),
        scopes: scopes.into_iter().map(String::into_boxed_str).collect(),
        status,
        expires_at_ms,
        rate_limit_per_minute: k.rate_limit_per_minute,
        allowed_cidrs: cidrs.into(),
        allowed_referrers: ReferrerSet::new(referrers),
        allowed_routes,
        digest,
    };
    Ok((record, kind))
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

fn parse_digest(s: &str) -> Result<(super::DigestKind, [u8; 32]), &'static str> {
    let (kind, hex_part) = if let Some(h) = s.strip_prefix("sha256:") {
        (super::DigestKind::Sha256, h)
    } else if let Some(h) = s.strip_prefix("hmac-sha256:") {
        (super::DigestKind::HmacSha256, h)
    } else {
        return Err("hash must be \"sha256:<hex>\" or \"hmac-sha256:<hex>\"");
    };
    if hex_part.len() != 64
        || !hex_part
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return Err("hash must end in 64 lowercase hex digits");
    }
    let mut digest = [0u8; 32];
    hex::decode_to_slice(hex_part, &mut digest).map_err(|_| "hash is not hex")?;
    Ok((kind, digest))
}

/// RFC 3339 → Unix milliseconds.
pub fn parse_rfc3339_ms(s: &str) -> Option<i64> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}
