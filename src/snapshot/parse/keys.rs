//! Key entries → compact [`KeyRecord`]s, and the digest index over them.
//!
//! Strings are borrowed from the document where they can be, what keys share (environments,
//! scope sets) is stored once, ids and names go to one shared text, and duplicate digests and
//! ids are found with the same compact [`HashIndex`] the snapshot looks keys up with.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::num::NonZeroU32;
use std::ops::Deref;

use bytes::Bytes;
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
use crate::snapshot::index::{digest_hash, HashIndex};
use crate::snapshot::{
    DigestKind, Environment, KeyRecord, KeyStatus, Quarantined, Restrictions, ScopeSet, Span,
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

/// Reads key entries one by one into compact records, storing once what keys share.
pub(super) struct KeysBuilder {
    have_pepper: bool,
    records: Vec<KeyRecord>,
    /// Each record's id in `text`, until the id headers are made from it.
    ids: Vec<Span>,
    text: String,
    environments: Vec<Environment>,
    environment_index: HashMap<Box<str>, u32>,
    scope_sets: Vec<ScopeSet>,
    /// Scope sets by their `x-scopes` text.
    scope_set_index: HashMap<Box<str>, u32>,
    /// The scopes of the key being read, space-separated (a buffer reused for every key).
    joined: String,
}

/// The keys in force, indexed.
pub(super) struct Keys {
    pub records: Vec<KeyRecord>,
    pub text: Bytes,
    pub environments: Vec<Environment>,
    pub scope_sets: Vec<ScopeSet>,
    pub by_sha256: HashIndex,
    pub by_hmac: HashIndex,
}

/// Why an entry would make the snapshot's text (ids and names, `u32` offsets) too long.
const TEXT_FULL: &str = "the snapshot's key ids and names exceed 4 GiB";

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

impl KeysBuilder {
    pub fn new(have_pepper: bool) -> Self {
        Self {
            have_pepper,
            records: Vec::new(),
            ids: Vec::new(),
            text: String::new(),
            environments: Vec::new(),
            environment_index: HashMap::new(),
            scope_sets: Vec::new(),
            scope_set_index: HashMap::new(),
            joined: String::new(),
        }
    }

    /// Read one key entry. Its partner is a slot in `partners`, resolved by [`Self::finish`].
    pub fn add(&mut self, text: &str, partners: &mut PartnerIds) -> Result<(), Failure> {
        let k: RawKey<'_> = serde_json::from_str(text).map_err(|e| match e.classify() {
            serde_json::error::Category::Data => {
                match serde_json::from_str::<serde::de::IgnoredAny>(text) {
                    Ok(_) => failure(entry_id(text).map(|id| format!("key {id}")), redact(&e)),
                    Err(_) => Failure::NotJson(e),
                }
            }
            _ => Failure::NotJson(e),
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
        let id = self
            .push_text(&k.id)
            .ok_or_else(|| fail(TEXT_FULL.into()))?;
        let name = match k.name.as_deref() {
            None => Span::NONE,
            Some(name) => self.push_text(name).ok_or_else(|| fail(TEXT_FULL.into()))?,
        };
        self.records.push(KeyRecord {
            digest,
            // Made from `text` once it is complete; a static placeholder costs nothing.
            id_header: HeaderValue::from_static(""),
            expires_at_ms,
            restrictions,
            name,
            partner,
            scopes,
            environment,
            rate_limit_per_minute,
            status,
            kind,
        });
        self.ids.push(id);
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

    /// Append to the shared text; `None` past what `u32` offsets reach.
    fn push_text(&mut self, s: &str) -> Option<Span> {
        let start = u32::try_from(self.text.len()).ok()?;
        let len = u32::try_from(s.len()).ok()?;
        start.checked_add(len).filter(|&end| end < u32::MAX)?;
        self.text.push_str(s);
        Some(Span { start, len })
    }

    fn id(&self, i: usize) -> &str {
        &self.text[self.ids[i].range()]
    }

    /// Resolve each record's partner slot through `partners` (its position in the snapshot,
    /// or why its keys are quarantined), quarantine every entry that shares its digest or id
    /// with another, and index the rest.
    pub fn finish(
        mut self,
        partners: &[Result<u32, String>],
        quarantined: &mut Vec<Quarantined>,
    ) -> Keys {
        let mut keep = Vec::with_capacity(self.records.len());
        for (i, record) in self.records.iter_mut().enumerate() {
            match &partners[record.partner as usize] {
                Ok(position) => {
                    record.partner = *position;
                    keep.push(true);
                }
                Err(reason) => {
                    let id = &self.text[self.ids[i].range()];
                    quarantined.push(q(format!("key {id}"), reason.as_str()));
                    keep.push(false);
                }
            }
        }
        if keep.contains(&false) {
            let mut k = keep.iter();
            self.records
                .retain(|_| *k.next().expect("one flag a record"));
            let mut k = keep.iter();
            self.ids.retain(|_| *k.next().expect("one flag an id"));
        }
        drop(keep);
        const SAME_DIGEST: u8 = 1;
        const SAME_ID: u8 = 2;
        let mut shared = vec![0u8; self.records.len()];
        let (mut by_sha256, mut by_hmac, duplicates) = index_digests(&self.records);
        for i in duplicates {
            shared[i as usize] |= SAME_DIGEST;
        }
        let ids = RandomState::new();
        let mut by_id = HashIndex::with_capacity(self.records.len());
        for i in 0..self.records.len() {
            let id = self.id(i);
            if let Err(first) =
                by_id.insert(ids.hash_one(id), i as u32, |j| self.id(j as usize) == id)
            {
                shared[i] |= SAME_ID;
                shared[first as usize] |= SAME_ID;
            }
        }
        drop(by_id);

        if shared.iter().any(|&s| s != 0) {
            for (i, &s) in shared.iter().enumerate() {
                let reason = if s & SAME_DIGEST != 0 {
                    "another entry has the same digest"
                } else if s & SAME_ID != 0 {
                    "the key id appears more than once"
                } else {
                    continue;
                };
                quarantined.push(q(format!("key {}", self.id(i)), reason));
            }
            let mut keep = shared.iter().map(|&s| s == 0);
            self.records.retain(|_| keep.next() == Some(true));
            let mut keep = shared.iter().map(|&s| s == 0);
            self.ids.retain(|_| keep.next() == Some(true));
            let duplicates;
            (by_sha256, by_hmac, duplicates) = index_digests(&self.records);
            debug_assert!(duplicates.is_empty());
        }

        self.text.shrink_to_fit();
        let text = Bytes::from(self.text.into_bytes());
        for (record, id) in self.records.iter_mut().zip(&self.ids) {
            record.id_header = HeaderValue::from_maybe_shared(text.slice(id.range()))
                .expect("validated ids are valid header values");
        }
        self.records.shrink_to_fit();
        Keys {
            records: self.records,
            text,
            environments: self.environments,
            scope_sets: self.scope_sets,
            by_sha256,
            by_hmac,
        }
    }
}

/// The digest indexes of `records`, and the positions of records whose digest another record
/// has too (of either kind). Duplicates after the first are left out of the indexes.
fn index_digests(records: &[KeyRecord]) -> (HashIndex, HashIndex, Vec<u32>) {
    let sha256 = records
        .iter()
        .filter(|r| r.kind == DigestKind::Sha256)
        .count();
    let mut by_sha256 = HashIndex::with_capacity(sha256);
    let mut by_hmac = HashIndex::with_capacity(records.len() - sha256);
    let mut duplicates = Vec::new();
    for (i, r) in records.iter().enumerate() {
        let index = match r.kind {
            DigestKind::Sha256 => &mut by_sha256,
            DigestKind::HmacSha256 => &mut by_hmac,
        };
        let same = |j: u32| records[j as usize].digest == r.digest;
        if let Err(first) = index.insert(digest_hash(&r.digest), i as u32, same) {
            duplicates.extend([i as u32, first]);
        }
    }
    if !by_sha256.is_empty() && !by_hmac.is_empty() {
        for (i, r) in records.iter().enumerate() {
            if r.kind == DigestKind::HmacSha256 {
                let same = |j: u32| records[j as usize].digest == r.digest;
                if let Some(other) = by_sha256.find(digest_hash(&r.digest), same) {
                    duplicates.extend([i as u32, other]);
                }
            }
        }
    }
    (by_sha256, by_hmac, duplicates)
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
