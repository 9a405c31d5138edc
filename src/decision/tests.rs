//! Table tests for `decide`: every check of the contract table, and the order between them.
//!
//! Each case names the key it presents (by label; the fixture mints the secrets), the request,
//! and the expected verdict. A snapshot is written as JSON and parsed the way a source would.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

use super::*;
use crate::config::from_toml;
use crate::credential::{mint, Found};
use crate::path::{normalize, PathOptions};
use crate::snapshot::parse::parse_rfc3339_ms;

/// `expires_at` of the `expiring` key.
const EXPIRY: &str = "2030-01-01T00:00:00Z";

fn expiry_ms() -> i64 {
    parse_rfc3339_ms(EXPIRY).unwrap()
}

/// The default clock: an hour before [`EXPIRY`].
fn now_ms() -> i64 {
    expiry_ms() - 3_600_000
}

const PREFIXES: &str = r#"
environment = "live"

[[key_prefixes]]
prefix = "sk_live_"
environment = "live"

[[key_prefixes]]
prefix = "sk_test_"
environment = "test"

[[key_prefixes]]
prefix = "imp_"
environment = "live"
checksum = false
"#;

/// The policy without `environment` and prefixes.
const REST: &str = r#"
[snapshot]
path = "does-not-exist.json"

[admin]
listen = "127.0.0.1:0"

[idempotency]
required = true

[[routes.rule]]
route = "POST /v1/analyses"
scopes = ["analyses:write"]

[[routes.rule]]
route = "GET /v1/analyses/**"
scopes = ["analyses:read"]

[[routes.rule]]
route = "DELETE /v1/analyses/*"
scopes = ["analyses:write", "analyses:admin"]
"#;

/// The main policy: prefixes, route rules, idempotency required.
fn main_policy() -> String {
    format!("{PREFIXES}{REST}")
}

fn policy(text: &str) -> Arc<Policy> {
    from_toml(text)
        .unwrap_or_else(|e| panic!("test policy is invalid: {e}"))
        .policy
}

fn sha256(key: &str) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(key.as_bytes())))
}

/// A key with a wrong checksum: the last checksum digit changed.
fn corrupt_checksum(key: &str) -> String {
    let mut s = key.to_owned();
    let last = s.pop().unwrap();
    s.push(if last == '0' { '1' } else { '0' });
    s
}

/// The secrets presented by the cases, by label, and the snapshot holding their digests.
struct Fixture {
    secrets: HashMap<&'static str, String>,
    snapshot: Snapshot,
}

impl Fixture {
    fn secret(&self, label: &str) -> &str {
        self.secrets
            .get(label)
            .unwrap_or_else(|| panic!("no secret labelled {label}"))
    }
}

/// `(label, key id, partner id, secret, extra record fields)`.
type KeySpec = (&'static str, &'static str, &'static str, String, Value);

fn fixture() -> Fixture {
    let live = || mint("sk_live_");
    let specs: Vec<KeySpec> = vec![
        (
            "ok",
            "key_ok",
            "partner_acme",
            live(),
            json!({"scopes": ["analyses:write", "analyses:read"]}),
        ),
        (
            "beta",
            "key_beta",
            "partner_beta",
            live(),
            json!({"scopes": ["analyses:read", "analyses:write"]}),
        ),
        (
            "reader",
            "key_reader",
            "partner_acme",
            live(),
            json!({"scopes": ["analyses:read"]}),
        ),
        (
            "writer",
            "key_writer",
            "partner_acme",
            live(),
            json!({"scopes": ["analyses:write"]}),
        ),
        (
            "revoked",
            "key_revoked",
            "partner_acme",
            live(),
            json!({"status": "revoked"}),
        ),
        (
            "revoked_expired",
            "key_revoked_expired",
            "partner_acme",
            live(),
            json!({"status": "revoked", "expires_at": "2020-01-01T00:00:00Z"}),
        ),
        (
            "expiring",
            "key_expiring",
            "partner_acme",
            live(),
            json!({"expires_at": EXPIRY, "scopes": ["analyses:read"]}),
        ),
        (
            "expired_suspended",
            "key_expired_suspended",
            "partner_suspended",
            live(),
            json!({"expires_at": "2020-01-01T00:00:00Z"}),
        ),
        (
            "suspended",
            "key_suspended",
            "partner_suspended",
            live(),
            json!({}),
        ),
        (
            "deactivated",
            "key_deactivated",
            "partner_deactivated",
            live(),
            json!({}),
        ),
        ("unpaid", "key_unpaid", "partner_unpaid", live(), json!({})),
        (
            "suspended_cidr",
            "key_suspended_cidr",
            "partner_suspended",
            live(),
            json!({"allowed_cidrs": ["203.0.113.0/24"]}),
        ),
        (
            "cidr",
            "key_cidr",
            "partner_acme",
            live(),
            json!({"allowed_cidrs": ["203.0.113.0/24", "2001:db8::/32", "::ffff:192.0.2.0/120"],
                   "scopes": ["analyses:read"]}),
        ),
        (
            "cidr_referrer",
            "key_cidr_referrer",
            "partner_acme",
            live(),
            json!({"allowed_cidrs": ["203.0.113.0/24"],
                   "allowed_referrers": ["https://app.example.com/*"]}),
        ),
        (
            "referrer",
            "key_referrer",
            "partner_acme",
            live(),
            json!({"allowed_referrers": ["https://app.example.com/*"], "scopes": ["analyses:read"]}),
        ),
        (
            "referrer_routes",
            "key_referrer_routes",
            "partner_acme",
            live(),
            json!({"allowed_referrers": ["https://app.example.com/*"],
                   "allowed_routes": ["GET /v1/analyses/**"], "scopes": ["analyses:read"]}),
        ),
        (
            "routes",
            "key_routes",
            "partner_acme",
            live(),
            json!({"allowed_routes": ["GET /v1/analyses/**"], "scopes": ["analyses:read"]}),
        ),
        (
            "test_env",
            "key_test_env",
            "partner_acme",
            mint("sk_test_"),
            json!({"environment": "test"}),
        ),
        (
            "record_test_env",
            "key_record_test_env",
            "partner_acme",
            live(),
            json!({"environment": "test"}),
        ),
        (
            "record_test_env_revoked",
            "key_record_test_env_revoked",
            "partner_acme",
            live(),
            json!({"environment": "test", "status": "revoked"}),
        ),
        (
            "badsum",
            "key_badsum",
            "partner_acme",
            corrupt_checksum(&live()),
            json!({"scopes": ["analyses:read"]}),
        ),
        (
            "imported",
            "key_imported",
            "partner_acme",
            "imp_legacy-0001".into(),
            json!({"scopes": ["analyses:read"]}),
        ),
        (
            "quarantined_revoked",
            "key_quarantined_revoked",
            "partner_acme",
            live(),
            json!({"status": "revoked", "allowed_cidrs": ["not-a-cidr"]}),
        ),
    ];

    let mut secrets = HashMap::new();
    let mut keys = Vec::new();
    for (label, id, partner, secret, extra) in specs {
        let mut record = json!({
            "id": id,
            "hash": sha256(&secret),
            "partner_id": partner,
            "environment": "live",
            "scopes": [],
            "status": "active",
        });
        for (k, v) in extra.as_object().unwrap() {
            record[k] = v.clone();
        }
        keys.push(record);
        assert!(
            secrets.insert(label, secret).is_none(),
            "label {label} twice"
        );
    }
    // Presented, never stored.
    secrets.insert("unknown", live());
    secrets.insert("unknown_test", mint("sk_test_"));
    secrets.insert("unknown_prefix", mint("pk_live_"));
    secrets.insert("test_env_badsum", corrupt_checksum(&mint("sk_test_")));
    secrets.insert("revoked_badsum", corrupt_checksum(&secrets["revoked"]));

    let doc = json!({
        "schema": "keygate.snapshot/v1",
        "revision": 7,
        "partners": [
            {"id": "partner_acme", "org_id": "org_1", "status": "active"},
            {"id": "partner_beta", "status": "active"},
            {"id": "partner_suspended", "status": "suspended"},
            {"id": "partner_deactivated", "status": "deactivated"},
            {"id": "partner_unpaid", "status": "payment_required"},
        ],
        "keys": keys,
    });
    let snapshot = crate::snapshot::parse(doc.to_string().as_bytes(), None).unwrap();
    let quarantined: Vec<&str> = snapshot
        .quarantined
        .iter()
        .map(|q| q.entry.as_str())
        .collect();
    assert_eq!(quarantined, ["key key_quarantined_revoked"]);
    Fixture { secrets, snapshot }
}

#[derive(Debug, Clone, Copy)]
enum Cred {
    /// The secret with this label, as a bearer token.
    Key(&'static str),
    /// No key offered.
    Missing,
    /// A key offered but not usable (two keys, a malformed one).
    Unusable,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Want {
    Allow {
        key: &'static str,
        partner: &'static str,
    },
    /// Denied with this `code`.
    Deny(&'static str),
    /// `scope_required` naming this scope.
    Scope(&'static str),
}

#[derive(Debug, Clone, Copy)]
struct Case {
    name: &'static str,
    cred: Cred,
    method: &'static str,
    /// Raw request path, normalized here as a front would.
    path: &'static str,
    ip: Option<&'static str>,
    referer: Option<&'static str>,
    origin: Option<&'static str>,
    idempotency_key: Option<&'static str>,
    method_override: Option<&'static str>,
    url_override: Option<&'static str>,
    /// Milliseconds relative to [`now_ms`]'s `EXPIRY`; `None` = the default clock.
    at_expiry_plus: Option<i64>,
    /// Decide without a snapshot in force.
    no_snapshot: bool,
    want: Want,
}

const BASE: Case = Case {
    name: "",
    cred: Cred::Key("ok"),
    method: "GET",
    path: "/v1/analyses/an_1",
    ip: Some("198.51.100.7"),
    referer: None,
    origin: None,
    idempotency_key: None,
    method_override: None,
    url_override: None,
    at_expiry_plus: None,
    no_snapshot: false,
    want: Want::Allow {
        key: "key_ok",
        partner: "partner_acme",
    },
};

/// What `decide` answered, in the table's terms.
#[derive(Debug, PartialEq)]
enum Got {
    Allow { key: String, partner: String },
    Deny(&'static str),
    Scope(String),
}

impl From<Want> for Got {
    fn from(w: Want) -> Self {
        match w {
            Want::Allow { key, partner } => Got::Allow {
                key: key.into(),
                partner: partner.into(),
            },
            Want::Deny(code) => Got::Deny(code),
            Want::Scope(s) => Got::Scope(s.into()),
        }
    }
}

/// Run `cases` against `policy` and the fixture; report every failing case at once.
fn run(fixture: &Fixture, policy: &Policy, cases: &[Case]) {
    let mut failures = Vec::new();
    for case in cases {
        let got = verdict(fixture, policy, case);
        if got != Got::from(case.want) {
            failures.push(format!(
                "{}: want {:?}, got {:?}",
                case.name, case.want, got
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

fn verdict(fixture: &Fixture, policy: &Policy, case: &Case) -> Got {
    let path = normalize(case.path, PathOptions::default());
    let credential = match case.cred {
        Cred::Key(label) => Credential::Present {
            key: fixture.secret(label),
            found: Found {
                authorization: true,
                api_key: false,
            },
        },
        Cred::Missing => Credential::Missing,
        Cred::Unusable => Credential::Unusable,
    };
    let facts = RequestFacts {
        method: case.method,
        path: path.as_ref().map_err(|e| *e),
        host: Some("api.example.com"),
        client_ip: case.ip.map(|ip| ip.parse::<IpAddr>().unwrap()),
        credential,
        referer: case.referer.map(str::as_bytes),
        origin: case.origin.map(str::as_bytes),
        idempotency_key: case.idempotency_key.map(str::as_bytes),
        method_override: case.method_override.map(str::as_bytes),
        url_override: case.url_override.map(str::as_bytes),
    };
    let now = case.at_expiry_plus.map_or_else(now_ms, |d| expiry_ms() + d);
    let snapshot = (!case.no_snapshot).then_some(&fixture.snapshot);
    match decide(snapshot, policy, &facts, now) {
        Verdict::Allow(a) => {
            // The allow borrows the record and partner of the snapshot it was decided on.
            assert!(std::ptr::eq(
                a.partner,
                fixture.snapshot.partner(a.key) as *const _
            ));
            Got::Allow {
                key: a.key.id().to_string(),
                partner: a.partner.id.to_string(),
            }
        }
        Verdict::Deny(DenyReason::ScopeRequired(scope)) => {
            let reason = DenyReason::ScopeRequired(scope.clone());
            assert_eq!(reason.code(), "scope_required");
            assert!(
                reason.message().contains(&*scope),
                "the message names the scope: {}",
                reason.message()
            );
            Got::Scope(scope.to_string())
        }
        Verdict::Deny(DenyReason::AuthenticationRequired { key_presented }) => {
            // The client is told `error="invalid_token"` exactly when it offered a key.
            assert_eq!(key_presented, matches!(case.cred, Cred::Unusable));
            Got::Deny("authentication_required")
        }
        Verdict::Deny(reason) => Got::Deny(reason.code()),
    }
}

#[test]
fn each_check_of_the_contract() {
    use Want::*;
    let f = fixture();
    let p = policy(&main_policy());
    let cases = [
        // Allow: the record and partner of the presented key.
        Case {
            name: "allow ok",
            ..BASE
        },
        Case {
            name: "allow another partner's key",
            cred: Cred::Key("beta"),
            want: Allow {
                key: "key_beta",
                partner: "partner_beta",
            },
            ..BASE
        },
        // 0. invalid_path
        Case {
            name: "encoded slash",
            path: "/v1/analyses%2Fan_1",
            want: Deny("invalid_path"),
            ..BASE
        },
        Case {
            name: "dot-dot above the root",
            path: "/../v1/analyses/an_1",
            want: Deny("invalid_path"),
            ..BASE
        },
        // 1. authentication_required
        Case {
            name: "missing credential",
            cred: Cred::Missing,
            want: Deny("authentication_required"),
            ..BASE
        },
        Case {
            name: "unusable credential (two keys, a malformed key)",
            cred: Cred::Unusable,
            want: Deny("authentication_required"),
            ..BASE
        },
        // 2. key_environment_mismatch
        Case {
            name: "prefix of another environment",
            cred: Cred::Key("test_env"),
            want: Deny("key_environment_mismatch"),
            ..BASE
        },
        Case {
            name: "prefix of another environment, key not in snapshot",
            cred: Cred::Key("unknown_test"),
            want: Deny("key_environment_mismatch"),
            ..BASE
        },
        Case {
            name: "record of another environment",
            cred: Cred::Key("record_test_env"),
            want: Deny("key_environment_mismatch"),
            ..BASE
        },
        // 3. invalid_api_key
        Case {
            name: "unknown prefix",
            cred: Cred::Key("unknown_prefix"),
            want: Deny("invalid_api_key"),
            ..BASE
        },
        Case {
            name: "bad checksum, even though its digest is in the snapshot",
            cred: Cred::Key("badsum"),
            want: Deny("invalid_api_key"),
            ..BASE
        },
        Case {
            name: "checksum = false prefix skips the checksum",
            cred: Cred::Key("imported"),
            want: Allow {
                key: "key_imported",
                partner: "partner_acme",
            },
            ..BASE
        },
        Case {
            name: "digest not in snapshot",
            cred: Cred::Key("unknown"),
            want: Deny("invalid_api_key"),
            ..BASE
        },
        Case {
            name: "quarantined key acts as absent",
            cred: Cred::Key("quarantined_revoked"),
            want: Deny("invalid_api_key"),
            ..BASE
        },
        // 4. key_revoked
        Case {
            name: "revoked",
            cred: Cred::Key("revoked"),
            want: Deny("key_revoked"),
            ..BASE
        },
        // 5. key_expired
        Case {
            name: "expires_at == now",
            cred: Cred::Key("expiring"),
            at_expiry_plus: Some(0),
            want: Deny("key_expired"),
            ..BASE
        },
        Case {
            name: "expires_at < now",
            cred: Cred::Key("expiring"),
            at_expiry_plus: Some(1),
            want: Deny("key_expired"),
            ..BASE
        },
        Case {
            name: "one ms before expires_at",
            cred: Cred::Key("expiring"),
            at_expiry_plus: Some(-1),
            want: Allow {
                key: "key_expiring",
                partner: "partner_acme",
            },
            ..BASE
        },
        // 6. partner status
        Case {
            name: "partner deactivated",
            cred: Cred::Key("deactivated"),
            want: Deny("account_deactivated"),
            ..BASE
        },
        Case {
            name: "partner suspended",
            cred: Cred::Key("suspended"),
            want: Deny("partner_suspended"),
            ..BASE
        },
        Case {
            name: "partner payment_required",
            cred: Cred::Key("unpaid"),
            want: Deny("insufficient_credits"),
            ..BASE
        },
        // 7. ip_not_allowed
        Case {
            name: "client inside allowed_cidrs",
            cred: Cred::Key("cidr"),
            ip: Some("203.0.113.9"),
            want: Allow {
                key: "key_cidr",
                partner: "partner_acme",
            },
            ..BASE
        },
        Case {
            name: "IPv6 client inside allowed_cidrs",
            cred: Cred::Key("cidr"),
            ip: Some("2001:db8::1"),
            want: Allow {
                key: "key_cidr",
                partner: "partner_acme",
            },
            ..BASE
        },
        Case {
            name: "IPv4-mapped IPv6 client inside an IPv4 CIDR",
            cred: Cred::Key("cidr"),
            ip: Some("::ffff:203.0.113.9"),
            want: Allow {
                key: "key_cidr",
                partner: "partner_acme",
            },
            ..BASE
        },
        Case {
            name: "IPv4 client inside an IPv4-mapped IPv6 CIDR",
            cred: Cred::Key("cidr"),
            ip: Some("192.0.2.200"),
            want: Allow {
                key: "key_cidr",
                partner: "partner_acme",
            },
            ..BASE
        },
        Case {
            name: "IPv4-mapped client inside an IPv4-mapped IPv6 CIDR",
            cred: Cred::Key("cidr"),
            ip: Some("::ffff:192.0.2.200"),
            want: Allow {
                key: "key_cidr",
                partner: "partner_acme",
            },
            ..BASE
        },
        Case {
            name: "IPv4-mapped IPv6 client outside",
            cred: Cred::Key("cidr"),
            ip: Some("::ffff:198.51.100.7"),
            want: Deny("ip_not_allowed"),
            ..BASE
        },
        Case {
            name: "client outside allowed_cidrs",
            cred: Cred::Key("cidr"),
            ip: Some("203.0.114.1"),
            want: Deny("ip_not_allowed"),
            ..BASE
        },
        Case {
            name: "client IP unknown",
            cred: Cred::Key("cidr"),
            ip: None,
            want: Deny("ip_not_allowed"),
            ..BASE
        },
        Case {
            name: "client IP unknown, no CIDR restriction",
            ip: None,
            ..BASE
        },
        // 8. referrer_not_allowed
        Case {
            name: "referer allowed",
            cred: Cred::Key("referrer"),
            referer: Some("https://app.example.com/dashboard"),
            want: Allow {
                key: "key_referrer",
                partner: "partner_acme",
            },
            ..BASE
        },
        Case {
            name: "origin allowed",
            cred: Cred::Key("referrer"),
            origin: Some("https://app.example.com"),
            want: Allow {
                key: "key_referrer",
                partner: "partner_acme",
            },
            ..BASE
        },
        Case {
            name: "referer outside",
            cred: Cred::Key("referrer"),
            referer: Some("https://evil.example.net/dashboard"),
            want: Deny("referrer_not_allowed"),
            ..BASE
        },
        Case {
            name: "referer allowed, origin outside",
            cred: Cred::Key("referrer"),
            referer: Some("https://app.example.com/dashboard"),
            origin: Some("https://evil.example.net"),
            want: Deny("referrer_not_allowed"),
            ..BASE
        },
        Case {
            name: "no referer and no origin",
            cred: Cred::Key("referrer"),
            want: Deny("referrer_not_allowed"),
            ..BASE
        },
        // 9. route_not_allowed
        Case {
            name: "inside the key's allowed_routes",
            cred: Cred::Key("routes"),
            want: Allow {
                key: "key_routes",
                partner: "partner_acme",
            },
            ..BASE
        },
        Case {
            name: "outside the key's allowed_routes",
            cred: Cred::Key("routes"),
            method: "GET",
            path: "/v1/reports/r_1",
            want: Deny("route_not_allowed"),
            ..BASE
        },
        Case {
            name: "method outside the key's allowed_routes",
            cred: Cred::Key("routes"),
            method: "DELETE",
            path: "/v1/analyses/an_1",
            idempotency_key: Some("idem-1"),
            want: Deny("route_not_allowed"),
            ..BASE
        },
        // 10. scope_required
        Case {
            name: "reader cannot POST",
            cred: Cred::Key("reader"),
            method: "POST",
            path: "/v1/analyses",
            idempotency_key: Some("idem-1"),
            want: Scope("analyses:write"),
            ..BASE
        },
        Case {
            name: "first missing scope, in the route's order",
            cred: Cred::Key("reader"),
            method: "DELETE",
            path: "/v1/analyses/an_1",
            idempotency_key: Some("idem-1"),
            want: Scope("analyses:write"),
            ..BASE
        },
        Case {
            name: "second scope missing",
            cred: Cred::Key("writer"),
            method: "DELETE",
            path: "/v1/analyses/an_1",
            idempotency_key: Some("idem-1"),
            want: Scope("analyses:admin"),
            ..BASE
        },
        Case {
            name: "unmatched route allowed by default",
            cred: Cred::Key("reader"),
            path: "/v2/anything",
            want: Allow {
                key: "key_reader",
                partner: "partner_acme",
            },
            ..BASE
        },
        // HEAD is matched by GET routes, for route scopes and for allowed_routes.
        Case {
            name: "HEAD needs the GET route's scope",
            cred: Cred::Key("writer"),
            method: "HEAD",
            want: Scope("analyses:read"),
            ..BASE
        },
        Case {
            name: "HEAD with the GET route's scope",
            cred: Cred::Key("reader"),
            method: "HEAD",
            want: Allow {
                key: "key_reader",
                partner: "partner_acme",
            },
            ..BASE
        },
        Case {
            name: "HEAD inside allowed_routes GET",
            cred: Cred::Key("routes"),
            method: "HEAD",
            want: Allow {
                key: "key_routes",
                partner: "partner_acme",
            },
            ..BASE
        },
        // A trailing slash is ignored for matching.
        Case {
            name: "trailing slash matches POST /v1/analyses (scope)",
            cred: Cred::Key("reader"),
            method: "POST",
            path: "/v1/analyses/",
            idempotency_key: Some("idem-1"),
            want: Scope("analyses:write"),
            ..BASE
        },
        Case {
            name: "trailing slash matches POST /v1/analyses (allow)",
            method: "POST",
            path: "/v1/analyses/",
            idempotency_key: Some("idem-1"),
            ..BASE
        },
        Case {
            name: "dot segments and repeated slashes normalize before matching",
            cred: Cred::Key("reader"),
            method: "POST",
            path: "//v1/./x/../analyses",
            idempotency_key: Some("idem-1"),
            want: Scope("analyses:write"),
            ..BASE
        },
        // 11. idempotency_key_required
        Case {
            name: "POST without Idempotency-Key",
            method: "POST",
            path: "/v1/analyses",
            want: Deny("idempotency_key_required"),
            ..BASE
        },
        Case {
            name: "POST with an empty Idempotency-Key",
            method: "POST",
            path: "/v1/analyses",
            idempotency_key: Some(""),
            want: Deny("idempotency_key_required"),
            ..BASE
        },
        // 0. A method override naming another method is refused before anything else.
        Case {
            name: "GET overridden to DELETE",
            cred: Cred::Key("reader"),
            method_override: Some("DELETE"),
            want: Deny("invalid_request"),
            ..BASE
        },
        Case {
            name: "an override before the credential",
            cred: Cred::Missing,
            method_override: Some("PUT"),
            want: Deny("invalid_request"),
            ..BASE
        },
        Case {
            name: "repeated overrides",
            method_override: Some(""),
            want: Deny("invalid_request"),
            ..BASE
        },
        Case {
            name: "an override naming the request's own method",
            method_override: Some(" get "),
            ..BASE
        },
        // 0. So is a URL override naming another path: the upstream may route by it.
        Case {
            name: "X-Original-URL naming another path",
            url_override: Some("/v1/admin"),
            want: Deny("invalid_request"),
            ..BASE
        },
        Case {
            name: "a URL override before the credential",
            cred: Cred::Missing,
            url_override: Some("/v1/admin"),
            want: Deny("invalid_request"),
            ..BASE
        },
        Case {
            name: "a URL override that normalizes elsewhere",
            url_override: Some("/v1/analyses/an_1/../../admin"),
            want: Deny("invalid_request"),
            ..BASE
        },
        Case {
            name: "a URL override that is an absolute URL of another path",
            url_override: Some("https://api.example.com/v1/admin?x=1"),
            want: Deny("invalid_request"),
            ..BASE
        },
        Case {
            name: "a URL override that is an absolute URL without a path",
            url_override: Some("HTTP://api.example.com?x=1"),
            want: Deny("invalid_request"),
            ..BASE
        },
        Case {
            name: "an absolute URL override whose authority a fragment ends",
            url_override: Some("http://api.example.com#/v1/analyses/an_1"),
            want: Deny("invalid_request"),
            ..BASE
        },
        Case {
            name: "an absolute URL override whose authority a backslash ends",
            url_override: Some("http://api.example.com\\v1\\analyses\\an_1"),
            want: Deny("invalid_request"),
            ..BASE
        },
        Case {
            name: "a network-path URL override",
            url_override: Some("//evil.example/v1/analyses/an_1"),
            want: Deny("invalid_request"),
            ..BASE
        },
        Case {
            name: "a URL override of another scheme",
            url_override: Some("ftp://api.example.com/v1/analyses/an_1"),
            want: Deny("invalid_request"),
            ..BASE
        },
        Case {
            name: "an empty URL override (servers route it to /)",
            url_override: Some(" "),
            want: Deny("invalid_request"),
            ..BASE
        },
        Case {
            name: "a URL override that is the request's own absolute URL (ingress-nginx auth-url)",
            url_override: Some("https://api.example.com/v1/analyses/an_1?page=2"),
            ..BASE
        },
        Case {
            name: "a URL override with a path the request could not have",
            url_override: Some("/v1/analyses/an_1%2F..%2F..%2Fadmin"),
            want: Deny("invalid_request"),
            ..BASE
        },
        Case {
            name: "repeated URL overrides",
            url_override: Some(""),
            want: Deny("invalid_request"),
            ..BASE
        },
        Case {
            name: "a URL override naming the request's own path, another query",
            url_override: Some(" /v1/analyses/%61n_1/?page=2 "),
            ..BASE
        },
        // The field reaches the upstream as sent: one that would have to be resolved names
        // no path keygate can vouch for (RFC 3986 reads the first as /v1/admin/analyses/an_1).
        // A method that is no token names no request (what a check front is told may be
        // anything): refused before any rule could fail to match it.
        Case {
            name: "an empty method",
            method: "",
            want: Deny("invalid_request"),
            ..BASE
        },
        Case {
            name: "a method with a space",
            method: "DELETE ",
            want: Deny("invalid_request"),
            ..BASE
        },
        Case {
            name: "an extension method, a token",
            method: "PROPFIND",
            ..BASE
        },
        Case {
            name: "a URL override with segments to resolve, even to the request's path",
            url_override: Some("/v1/admin//../analyses/an_1"),
            want: Deny("invalid_request"),
            ..BASE
        },
        Case {
            name: "a URL override with an encoded dot segment",
            url_override: Some("/v1/admin/%2e%2e/analyses/an_1"),
            want: Deny("invalid_request"),
            ..BASE
        },
        Case {
            name: "a URL override with an empty segment",
            url_override: Some("/v1//analyses/an_1"),
            want: Deny("invalid_request"),
            ..BASE
        },
        Case {
            name: "POST with two Idempotency-Keys as Envoy joins them",
            method: "POST",
            path: "/v1/analyses",
            idempotency_key: Some("idem-1,idem-2"),
            want: Deny("idempotency_key_required"),
            ..BASE
        },
        Case {
            name: "POST with Idempotency-Key",
            method: "POST",
            path: "/v1/analyses",
            idempotency_key: Some("idem-1"),
            ..BASE
        },
        Case {
            name: "GET without Idempotency-Key",
            ..BASE
        },
        Case {
            name: "DELETE without Idempotency-Key",
            method: "DELETE",
            path: "/v2/anything",
            want: Deny("idempotency_key_required"),
            ..BASE
        },
    ];
    run(&f, &p, &cases);
}

/// For each adjacent pair of checks, a request failing both gets the earlier code.
#[test]
fn first_failing_check_wins() {
    use Want::*;
    let f = fixture();
    let p = policy(&main_policy());
    let cases = [
        Case {
            name: "0 before 1: bad path and no credential",
            path: "/v1/%2e%2e/%2e%2e/..",
            cred: Cred::Missing,
            want: Deny("invalid_path"),
            ..BASE
        },
        Case {
            name: "0 before 3: bad path and unknown key",
            path: "/v1/a%5Cb",
            cred: Cred::Key("unknown"),
            want: Deny("invalid_path"),
            ..BASE
        },
        Case {
            name: "1 before snapshot_unavailable",
            cred: Cred::Unusable,
            no_snapshot: true,
            want: Deny("authentication_required"),
            ..BASE
        },
        Case {
            name: "2 before 3: other environment's prefix with a bad checksum",
            cred: Cred::Key("test_env_badsum"),
            want: Deny("key_environment_mismatch"),
            ..BASE
        },
        Case {
            name: "2 before 4: record of another environment, revoked",
            cred: Cred::Key("record_test_env_revoked"),
            want: Deny("key_environment_mismatch"),
            ..BASE
        },
        Case {
            name: "3 before 4: revoked key with a bad checksum",
            cred: Cred::Key("revoked_badsum"),
            want: Deny("invalid_api_key"),
            ..BASE
        },
        Case {
            name: "3 before 4: quarantined revoked key",
            cred: Cred::Key("quarantined_revoked"),
            want: Deny("invalid_api_key"),
            ..BASE
        },
        Case {
            name: "4 before 5: revoked and expired",
            cred: Cred::Key("revoked_expired"),
            want: Deny("key_revoked"),
            ..BASE
        },
        Case {
            name: "5 before 6: expired key of a suspended partner",
            cred: Cred::Key("expired_suspended"),
            want: Deny("key_expired"),
            ..BASE
        },
        Case {
            name: "6 before 7: suspended partner, disallowed IP",
            cred: Cred::Key("suspended_cidr"),
            ip: Some("198.51.100.7"),
            want: Deny("partner_suspended"),
            ..BASE
        },
        Case {
            name: "7 before 8: disallowed IP and referrer",
            cred: Cred::Key("cidr_referrer"),
            ip: Some("198.51.100.7"),
            referer: Some("https://evil.example.net/"),
            want: Deny("ip_not_allowed"),
            ..BASE
        },
        Case {
            name: "8 before 9: disallowed referrer and route",
            cred: Cred::Key("referrer_routes"),
            path: "/v1/reports/r_1",
            want: Deny("referrer_not_allowed"),
            ..BASE
        },
        Case {
            name: "9 before 10: route outside allowed_routes needing a missing scope",
            cred: Cred::Key("routes"),
            method: "POST",
            path: "/v1/analyses",
            idempotency_key: Some("idem-1"),
            want: Deny("route_not_allowed"),
            ..BASE
        },
        Case {
            name: "10 before 11: missing scope and no Idempotency-Key",
            cred: Cred::Key("reader"),
            method: "POST",
            path: "/v1/analyses",
            want: Scope("analyses:write"),
            ..BASE
        },
    ];
    run(&f, &p, &cases);
}

/// No snapshot in force: `snapshot_unavailable` comes after the credential and the checks on the
/// key's shape (which need no snapshot), and before any lookup.
#[test]
fn snapshot_unavailable_position() {
    use Want::*;
    let f = fixture();
    let p = policy(&main_policy());
    let none = Case {
        no_snapshot: true,
        ..BASE
    };
    let cases = [
        Case {
            name: "valid-looking key",
            want: Deny("snapshot_unavailable"),
            ..none
        },
        Case {
            name: "unknown but well-formed key: no lookup without a snapshot",
            cred: Cred::Key("unknown"),
            want: Deny("snapshot_unavailable"),
            ..none
        },
        Case {
            name: "bad path first",
            path: "/a%00b",
            want: Deny("invalid_path"),
            ..none
        },
        Case {
            name: "missing credential first",
            cred: Cred::Missing,
            want: Deny("authentication_required"),
            ..none
        },
        Case {
            name: "other environment's prefix first",
            cred: Cred::Key("unknown_test"),
            want: Deny("key_environment_mismatch"),
            ..none
        },
        Case {
            name: "bad checksum first",
            cred: Cred::Key("badsum"),
            want: Deny("invalid_api_key"),
            ..none
        },
        Case {
            name: "unknown prefix first",
            cred: Cred::Key("unknown_prefix"),
            want: Deny("invalid_api_key"),
            ..none
        },
    ];
    run(&f, &p, &cases);
}

#[test]
fn unmatched_deny_and_no_idempotency_requirement() {
    use Want::*;
    let f = fixture();
    let p = policy(&main_policy().replace(
        "[idempotency]\nrequired = true\n",
        "[routes]\nunmatched = \"deny\"\n",
    ));
    assert_eq!(p.unmatched, Unmatched::Deny);
    assert!(!p.idempotency_required);
    let cases = [
        Case {
            name: "unmatched route",
            path: "/v2/anything",
            want: Deny("route_not_allowed"),
            ..BASE
        },
        Case {
            name: "unmatched method on a matched path",
            method: "PUT",
            path: "/v1/analyses",
            want: Deny("route_not_allowed"),
            ..BASE
        },
        Case {
            name: "matched route",
            ..BASE
        },
        Case {
            name: "matched route with a trailing slash",
            method: "POST",
            path: "/v1/analyses/",
            ..BASE
        },
        Case {
            name: "HEAD matched by a GET route",
            method: "HEAD",
            ..BASE
        },
        Case {
            name: "a matched route still needs its scope",
            cred: Cred::Key("writer"),
            want: Scope("analyses:read"),
            ..BASE
        },
        Case {
            name: "POST without Idempotency-Key when not required",
            method: "POST",
            path: "/v1/analyses",
            ..BASE
        },
        Case {
            name: "8 before unmatched deny: disallowed referrer",
            cred: Cred::Key("referrer"),
            path: "/v2/anything",
            want: Deny("referrer_not_allowed"),
            ..BASE
        },
    ];
    run(&f, &p, &cases);
}

/// `routes.case_sensitive = false`, for upstreams that route ignoring case (Express, ASP.NET
/// Core): a scoped route and a key's `allowed_routes` cover every spelling of their literals.
/// With the default, the same spellings are other routes: unmatched, or outside the key's list.
#[test]
fn route_letter_case() {
    use Want::*;
    let f = fixture();
    let text = |case_sensitive: bool| {
        main_policy().replace(
            "[idempotency]\nrequired = true\n",
            &format!("[routes]\ncase_sensitive = {case_sensitive}\n"),
        )
    };
    let writing = Case {
        name: "POST /V1/ANALYSES with a read-only key",
        cred: Cred::Key("reader"),
        method: "POST",
        path: "/V1/ANALYSES",
        ..BASE
    };
    let listed = Case {
        name: "a key's allowed_routes, spelled otherwise",
        cred: Cred::Key("routes"),
        path: "/V1/Analyses/an_1",
        ..BASE
    };
    let insensitive = policy(&text(false));
    assert_eq!(insensitive.route_case, crate::routes::Case::Insensitive);
    let cases = [
        Case {
            want: Scope("analyses:write"),
            ..writing
        },
        Case {
            want: Allow {
                key: "key_routes",
                partner: "partner_acme",
            },
            ..listed
        },
        Case {
            name: "the most specific rule still wins: DELETE /v1/analyses/* needs admin",
            cred: Cred::Key("ok"),
            method: "DELETE",
            path: "/v1/ANALYSES/an_1",
            want: Scope("analyses:admin"),
            ..BASE
        },
    ];
    run(&f, &insensitive, &cases);
    let sensitive = policy(&text(true));
    let cases = [
        Case {
            name: "POST /V1/ANALYSES is unmatched when case matters",
            want: Allow {
                key: "key_reader",
                partner: "partner_acme",
            },
            ..writing
        },
        Case {
            want: Deny("route_not_allowed"),
            ..listed
        },
    ];
    run(&f, &sensitive, &cases);
}

#[test]
fn without_prefix_rules_no_shape_checks() {
    use Want::*;
    let f = fixture();
    let p = policy(&format!("environment = \"live\"\n{REST}"));
    assert!(p.prefixes.is_empty());
    let cases = [
        Case {
            name: "imported key",
            cred: Cred::Key("imported"),
            want: Allow {
                key: "key_imported",
                partner: "partner_acme",
            },
            ..BASE
        },
        Case {
            name: "bad checksum is not checked",
            cred: Cred::Key("badsum"),
            want: Allow {
                key: "key_badsum",
                partner: "partner_acme",
            },
            ..BASE
        },
        Case {
            name: "a test-looking key is judged by its record",
            cred: Cred::Key("test_env"),
            want: Deny("key_environment_mismatch"),
            ..BASE
        },
        Case {
            name: "unknown prefix is just an unknown key",
            cred: Cred::Key("unknown_prefix"),
            want: Deny("invalid_api_key"),
            ..BASE
        },
        Case {
            name: "unknown key without a snapshot",
            cred: Cred::Key("unknown_prefix"),
            no_snapshot: true,
            want: Deny("snapshot_unavailable"),
            ..BASE
        },
    ];
    run(&f, &p, &cases);
}

#[test]
fn allow_carries_the_record() {
    let f = fixture();
    let p = policy(&main_policy());
    let key = f.secret("ok");
    let path = normalize("/v1/analyses/an_1", PathOptions::default()).unwrap();
    let facts = RequestFacts {
        method: "GET",
        path: Ok(&path),
        host: None,
        client_ip: None,
        credential: Credential::Present {
            key,
            found: Found::default(),
        },
        referer: None,
        origin: None,
        idempotency_key: None,
        method_override: None,
        url_override: None,
    };
    let Verdict::Allow(allow) = decide(Some(&f.snapshot), &p, &facts, now_ms()) else {
        panic!("expected an allow");
    };
    assert_eq!(allow.key.id(), "key_ok");
    assert_eq!(&*allow.environment.name, "live");
    assert_eq!(allow.environment.header, "live");
    assert_eq!(allow.scopes.header, "analyses:read analyses:write");
    assert_eq!(&*allow.partner.id, "partner_acme");
    assert_eq!(allow.partner.org_id.as_deref(), Some("org_1"));
}

#[test]
fn is_mutating_methods() {
    for (method, want) in [
        ("POST", true),
        ("PUT", true),
        ("PATCH", true),
        ("DELETE", true),
        ("GET", false),
        ("HEAD", false),
        ("OPTIONS", false),
        ("post", true),
        ("Delete", true),
        ("get", false),
    ] {
        assert_eq!(is_mutating(method), want, "{method}");
    }
}
