//! Usage per API key: requests allowed, denials by code, and when the key was last used, for
//! `GET /usage` on the admin listener.
//!
//! Kept off the hot path: one sharded map keyed by the key's digest bytes (no hashing, no
//! allocation once a key has been seen), relaxed atomic counters inside, and no lock that all
//! requests share. Denials before a key is identified (no credential, an unknown key, a bad
//! path…) have no key to count against and are counted per code on their own.

pub mod report;

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use dashmap::DashMap;

use crate::deny::{DenyReason, CODES};
use crate::snapshot::KeyRecord;

/// One key's counters.
pub struct KeyUsage {
    key_id: Box<str>,
    requests: AtomicU64,
    denials: [AtomicU64; CODES.len()],
    /// Unix milliseconds of the last allowed request; 0 = never.
    last_used_ms: AtomicI64,
}

impl KeyUsage {
    fn new(key_id: &str) -> Self {
        Self {
            key_id: key_id.into(),
            requests: AtomicU64::new(0),
            denials: std::array::from_fn(|_| AtomicU64::new(0)),
            last_used_ms: AtomicI64::new(0),
        }
    }
}

/// One key's cumulative counts at one moment.
#[derive(Debug, Clone)]
pub struct KeyTotals {
    pub state_key: u64,
    pub key_id: Box<str>,
    pub requests: u64,
    pub denials: [u64; CODES.len()],
    pub last_used_ms: i64,
}

/// Usage of every key seen since start.
pub struct Usage {
    keys: DashMap<u64, KeyUsage, std::hash::BuildHasherDefault<crate::ratelimit::PassThrough>>,
    unattributed: [AtomicU64; CODES.len()],
    started_ms: i64,
}

impl Usage {
    pub fn new(now_ms: i64) -> Self {
        Self {
            keys: DashMap::default(),
            unattributed: std::array::from_fn(|_| AtomicU64::new(0)),
            started_ms: now_ms,
        }
    }

    fn with_key<R>(&self, key: &KeyRecord, f: impl FnOnce(&KeyUsage) -> R) -> R {
        let state_key = key.state_key();
        if let Some(u) = self.keys.get(&state_key) {
            return f(&u);
        }
        let u = self
            .keys
            .entry(state_key)
            .or_insert_with(|| KeyUsage::new(key.id()));
        f(&u)
    }

    /// An allowed request by `key` at `now_ms`.
    pub fn allowed(&self, key: &KeyRecord, now_ms: i64) {
        self.with_key(key, |u| {
            u.requests.fetch_add(1, Ordering::Relaxed);
            u.last_used_ms.fetch_max(now_ms, Ordering::Relaxed);
        });
    }

    /// A denial, against `key` when the request's key was identified.
    pub fn denied(&self, key: Option<&KeyRecord>, reason: &DenyReason) {
        let i = reason.code_index();
        match key {
            Some(key) => self.with_key(key, |u| {
                u.denials[i].fetch_add(1, Ordering::Relaxed);
            }),
            None => {
                self.unattributed[i].fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Cumulative counts of every key seen, and of denials without a key.
    pub fn totals(&self) -> (Vec<KeyTotals>, [u64; CODES.len()]) {
        let keys = self
            .keys
            .iter()
            .map(|u| KeyTotals {
                state_key: *u.key(),
                key_id: u.key_id.clone(),
                requests: u.requests.load(Ordering::Relaxed),
                denials: std::array::from_fn(|i| u.denials[i].load(Ordering::Relaxed)),
                last_used_ms: u.last_used_ms.load(Ordering::Relaxed),
            })
            .collect();
        let unattributed = std::array::from_fn(|i| self.unattributed[i].load(Ordering::Relaxed));
        (keys, unattributed)
    }

    /// The `/usage` document, as JSON text: every key seen (by id), its requests, denials by
    /// code and last use, and the denials without a key. Written straight from the counts
    /// (no JSON tree): at 50,000 keys it is a few megabytes.
    pub fn report_json(&self) -> Vec<u8> {
        let (mut keys, unattributed) = self.totals();
        keys.sort_unstable_by(|a, b| a.key_id.cmp(&b.key_id));
        let report = Report {
            since: rfc3339(self.started_ms),
            keys: keys
                .iter()
                .map(|k| KeyReport {
                    key_id: &k.key_id,
                    requests: k.requests,
                    denied: ByCode(&k.denials),
                    last_used_at: (k.last_used_ms > 0).then(|| rfc3339(k.last_used_ms)),
                })
                .collect(),
            denied_without_key: ByCode(&unattributed),
        };
        serde_json::to_vec(&report).expect("counts serialize")
    }
}

#[derive(serde::Serialize)]
struct Report<'a> {
    since: String,
    keys: Vec<KeyReport<'a>>,
    denied_without_key: ByCode<'a>,
}

#[derive(serde::Serialize)]
struct KeyReport<'a> {
    key_id: &'a str,
    requests: u64,
    denied: ByCode<'a>,
    last_used_at: Option<String>,
}

/// Denials by code, as an object of the codes seen (`{}` when none).
struct ByCode<'a>(&'a [u64; CODES.len()]);

impl serde::Serialize for ByCode<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let seen = self.0.iter().filter(|n| **n > 0).count();
        let mut m = s.serialize_map(Some(seen))?;
        for (code, n) in CODES.iter().zip(self.0) {
            if *n > 0 {
                m.serialize_entry(code, n)?;
            }
        }
        m.end()
    }
}

pub(crate) fn rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}
