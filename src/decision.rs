//! The one decision: `decide(snapshot, policy, facts, now) -> Verdict`.
//!
//! Every front (reverse proxy, ext_authz, forward-auth) builds [`RequestFacts`] from its wire
//! format and asks this function; none decides anything itself. Pure: no I/O, no clock (`now` is
//! an argument), no logging, no allocation on the allow path. Checks run in the contract's order
//! and the first that fails wins. Mutable per-key state (rate limits) lives beside it, in the
//! fronts' shared state, not here.

use std::net::IpAddr;

use crate::config::{Policy, Unmatched};
use crate::credential::{has_valid_checksum, Credential};
use crate::deny::DenyReason;
use crate::path::{NormalizedPath, PathError};
use crate::snapshot::{
    Environment, KeyRecord, KeyStatus, Partner, PartnerStatus, ScopeSet, Snapshot,
};

/// What a front knows about a request, already extracted from the wire.
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts<'a> {
    pub method: &'a str,
    /// The normalized path (the one that is also forwarded), or why it was refused.
    pub path: Result<&'a NormalizedPath, PathError>,
    pub host: Option<&'a str>,
    /// The client as established by the front (peer, or `X-Forwarded-For` via trusted proxies).
    /// `None` when it could not be established: any `allowed_cidrs` then refuses.
    pub client_ip: Option<IpAddr>,
    pub credential: Credential<'a>,
    pub referer: Option<&'a [u8]>,
    pub origin: Option<&'a [u8]>,
    pub idempotency_key: Option<&'a [u8]>,
    /// The method a method-override field (`X-HTTP-Method-Override`, …) asks for, if any was
    /// sent (a repeat yields an empty value).
    pub method_override: Option<&'a [u8]>,
    /// The URL a URL-override field (`X-Original-URL`, `X-Rewrite-URL`) names, if any was sent
    /// (a repeat yields an empty value).
    pub url_override: Option<&'a [u8]>,
}

impl<'a> RequestFacts<'a> {
    /// Facts of a request whose fields were read in one walk ([`crate::headers::Read`], by the
    /// proxy and forward-auth fronts): the credential from its fields, and referrer, origin and
    /// idempotency key each only when sent exactly once (a repeat yields an empty value, which
    /// matches no referrer pattern and is no idempotency key: repeats are refused, never
    /// resolved by picking one).
    pub fn from_read(
        method: &'a str,
        path: &'a Result<NormalizedPath, PathError>,
        host: Option<&'a str>,
        client_ip: Option<IpAddr>,
        read: &crate::headers::Read<'a>,
    ) -> Self {
        RequestFacts {
            method,
            path: path.as_ref().map_err(|e| *e),
            host,
            client_ip,
            credential: read.credential(),
            referer: read.referer.single(),
            origin: read.origin.single(),
            idempotency_key: read.idempotency_key.single(),
            method_override: read.method_override.single(),
            url_override: read.url_override.single(),
        }
    }
}

/// The wall clock in Unix milliseconds: what fronts pass as `now` (the coarse clock of
/// [`crate::clock`]: a scheduler tick behind).
pub fn now_ms() -> i64 {
    crate::clock::wall_ms()
}

/// The answer. An allow borrows from the snapshot the decision was made on.
#[derive(Debug)]
pub enum Verdict<'s> {
    Allow(Allow<'s>),
    Deny(DenyReason),
}

/// The key and what it shares with other keys, resolved once for the fronts.
#[derive(Debug, Clone, Copy)]
pub struct Allow<'s> {
    pub key: &'s KeyRecord,
    pub partner: &'s Partner,
    pub environment: &'s Environment,
    pub scopes: &'s ScopeSet,
}

/// Methods that change state, for the idempotency check. Case-insensitive: hyper passes `post`
/// through as its own method, and frameworks that upper-case methods would run it as a POST.
pub fn is_mutating(method: &str) -> bool {
    ["POST", "PUT", "PATCH", "DELETE"]
        .iter()
        .any(|m| m.eq_ignore_ascii_case(method))
}

/// Decide one request. `snapshot` is `None` when none is in force (or it is too stale to use).
pub fn decide<'s>(
    snapshot: Option<&'s Snapshot>,
    policy: &Policy,
    facts: &RequestFacts<'_>,
    now_ms: i64,
) -> Verdict<'s> {
    decide_attributed(snapshot, policy, facts, now_ms).0
}

/// As [`decide`], also naming the key the request was decided for, when the presented key was
/// found in the snapshot (so a denial at checks 4–11 can be counted against it).
pub fn decide_attributed<'s>(
    snapshot: Option<&'s Snapshot>,
    policy: &Policy,
    facts: &RequestFacts<'_>,
    now_ms: i64,
) -> (Verdict<'s>, Option<&'s KeyRecord>) {
    match check(snapshot, policy, facts, now_ms) {
        Ok(allow) => {
            let key = allow.key;
            (Verdict::Allow(allow), Some(key))
        }
        Err((reason, key)) => (Verdict::Deny(reason), key),
    }
}

fn check<'s>(
    snapshot: Option<&'s Snapshot>,
    policy: &Policy,
    facts: &RequestFacts<'_>,
    now_ms: i64,
) -> Result<Allow<'s>, (DenyReason, Option<&'s KeyRecord>)> {
    let unattributed = |reason| (reason, None);
    let (snapshot, record, path) = find(snapshot, policy, facts).map_err(unattributed)?;
    check_record(snapshot, record, policy, facts, path, now_ms).map_err(|r| (r, Some(record)))
}

/// The path and query a URL-override field names: the field itself, or what follows the
/// authority of an absolute `http(s)://` URL (ingress-nginx's `auth-url` sends
/// `$scheme://$http_host$request_uri`; servers take its path), `/` if nothing does. `None` for
/// what parsers read differently: an authority ended by `?`, `#` or `\` (RFC 3986 and PHP's
/// `parse_url` end it at `#`, WHATWG's URL also at `\`), or a network-path reference
/// (`//host/path`, whose path `parse_url` reads as `/path`).
fn override_target(url: &str) -> Option<&str> {
    if url.starts_with("//") {
        return None;
    }
    for scheme in ["http://", "https://"] {
        let Some(rest) = url
            .get(..scheme.len())
            .filter(|s| s.eq_ignore_ascii_case(scheme))
            .map(|_| &url[scheme.len()..])
        else {
            continue;
        };
        return match rest.find(['/', '?', '#', '\\']) {
            None => Some("/"),
            Some(at) if rest.as_bytes()[at] == b'/' => Some(&rest[at..]),
            Some(_) => None,
        };
    }
    Some(url)
}

/// Whether `method` is a token: one or more of RFC 9110's `tchar`.
fn is_method(method: &str) -> bool {
    !method.is_empty()
        && method
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Checks 0–3: the request's shape and the key's, up to finding its record.
fn find<'s, 'f>(
    snapshot: Option<&'s Snapshot>,
    policy: &Policy,
    facts: &RequestFacts<'f>,
) -> Result<(&'s Snapshot, &'s KeyRecord, &'f NormalizedPath), DenyReason> {
    // 0. The method must be one (a token, RFC 9110 §9.1): an empty or malformed one names no
    // request, and would match no method's rule. (The proxy's HTTP parsers ensure it; what the
    // check fronts are told may not.)
    if !is_method(facts.method) {
        return Err(DenyReason::BadRequest(
            "the request's method is not an HTTP method",
        ));
    }
    // The path must be unambiguous, and so must the method: the upstream may run the request
    // as the method a method-override field names, which is not the one decided on.
    let path = facts.path.map_err(DenyReason::InvalidPath)?;
    if let Some(asked) = facts.method_override {
        if !asked
            .trim_ascii()
            .eq_ignore_ascii_case(facts.method.as_bytes())
        {
            return Err(DenyReason::BadRequest(
                "a method-override header (X-HTTP-Method-Override, X-HTTP-Method, \
                 X-Method-Override) names another method: send the request with that method",
            ));
        }
    }

    // Nor may the path be another than the one decided on: some servers route by the URL a
    // URL-override field names. Naming the request's own path (its query aside) is harmless;
    // an empty one is not (servers that test for the field's presence route it to `/`). The
    // field reaches the upstream as sent, on every front: one with segments to resolve
    // (`/v1/admin//../x`) could be resolved there otherwise than here, so it names no path.
    if let Some(url) = facts.url_override {
        let same = std::str::from_utf8(url.trim_ascii())
            .ok()
            .and_then(override_target)
            .is_some_and(|url| {
                let (named, _query) = crate::path::split_target(url);
                crate::path::normalize(named, policy.path.as_sent())
                    .is_ok_and(|named| named.for_matching() == path.for_matching())
            });
        if !same {
            return Err(DenyReason::BadRequest(
                "a URL-override header (X-Original-URL, X-Rewrite-URL) names another path than \
                 the request's: send the request to that path",
            ));
        }
    }

    // 1. A usable credential.
    let key = match facts.credential {
        Credential::Present { key, .. } => key,
        Credential::Missing => {
            return Err(DenyReason::AuthenticationRequired {
                key_presented: false,
            })
        }
        Credential::Unusable => {
            return Err(DenyReason::AuthenticationRequired {
                key_presented: true,
            })
        }
    };

    // 2–3a. Shape of the key, before any lookup.
    if !policy.prefixes.is_empty() {
        let rule = policy
            .prefixes
            .classify(key)
            .ok_or(DenyReason::InvalidApiKey)?;
        if rule.environment != policy.environment {
            return Err(DenyReason::EnvironmentMismatch);
        }
        if rule.checksum && !has_valid_checksum(key, &rule.prefix) {
            return Err(DenyReason::InvalidApiKey);
        }
    }

    let snapshot = snapshot.ok_or(DenyReason::SnapshotUnavailable)?;

    // 3b. Known key (quarantined entries are absent), 2b. of this environment.
    let record = snapshot.find(key).ok_or(DenyReason::InvalidApiKey)?;
    Ok((snapshot, record, path))
}

/// Checks 2b and 4–11, for a key found in the snapshot.
fn check_record<'s>(
    snapshot: &'s Snapshot,
    record: &'s KeyRecord,
    policy: &Policy,
    facts: &RequestFacts<'_>,
    path: &NormalizedPath,
    now_ms: i64,
) -> Result<Allow<'s>, DenyReason> {
    let environment = snapshot.environment(record);
    if *environment.name != *policy.environment {
        return Err(DenyReason::EnvironmentMismatch);
    }

    // 4–5. Key lifecycle.
    if record.status == KeyStatus::Revoked {
        return Err(DenyReason::KeyRevoked);
    }
    if record.is_expired(now_ms) {
        return Err(DenyReason::KeyExpired);
    }

    // 6. The partner's account.
    let partner = snapshot.partner(record);
    match partner.status {
        PartnerStatus::Active => {}
        PartnerStatus::Deactivated => return Err(DenyReason::AccountDeactivated),
        PartnerStatus::Suspended => return Err(DenyReason::PartnerSuspended),
        PartnerStatus::PaymentRequired => return Err(DenyReason::InsufficientCredits),
    }

    // 7–8. Where the request comes from.
    if !record.allows_ip(facts.client_ip) {
        return Err(DenyReason::IpNotAllowed);
    }
    if !record.allows_referrer(facts.referer, facts.origin) {
        return Err(DenyReason::ReferrerNotAllowed);
    }

    // 9–10. What it asks for.
    let route_path = path.for_matching();
    if let Some(allowed) = record.allowed_routes() {
        if !allowed.matches_with(facts.method, route_path, policy.route_case) {
            return Err(DenyReason::RouteNotAllowed);
        }
    }
    let scopes = snapshot.scopes(record);
    match policy
        .routes
        .lookup_with(facts.method, route_path, policy.route_case)
    {
        Some(needed) => {
            if let Some(missing) = needed.iter().find(|s| !scopes.contains(s)) {
                return Err(DenyReason::ScopeRequired(missing.clone()));
            }
        }
        None if policy.unmatched == Unmatched::Deny => return Err(DenyReason::RouteNotAllowed),
        None => {}
    }

    // 11. Safe retries. A repeated Idempotency-Key names no one request: the proxy sees the
    // repeat, Envoy joins repeats with commas, so a comma counts as a repeat on every front.
    if policy.idempotency_required
        && is_mutating(facts.method)
        && facts
            .idempotency_key
            .is_none_or(|k| k.is_empty() || k.contains(&b','))
    {
        return Err(DenyReason::IdempotencyKeyRequired);
    }

    Ok(Allow {
        key: record,
        partner,
        environment,
        scopes,
    })
}

#[cfg(test)]
mod tests;
