//! Every code of the contract's decision table, produced by the real proxy in front of a real
//! upstream: exact status, JSON shape, `WWW-Authenticate` / `Retry-After`, and the upstream
//! seeing nothing for a denial and exactly keygate's identity headers for an allow.

mod support;

use serde_json::json;
use support::*;

/// Keys of every kind, in one snapshot.
struct Fixture {
    ok: String,
    writer: String,
    no_org: String,
    test_env_prefix: String,
    test_env_record: String,
    revoked: String,
    expired: String,
    deactivated: String,
    suspended: String,
    payment: String,
    cidr_out: String,
    cidr_in: String,
    referrer: String,
    routes: String,
    legacy: String,
    orphan: String,
    // Two failing checks at once: the first in the table must win.
    revoked_expired: String,
    revoked_gone: String,
    expired_paused: String,
    gone_far: String,
}

fn fixture() -> (Fixture, Doc) {
    let f = Fixture {
        ok: mint("sk_live_"),
        writer: mint("sk_live_"),
        no_org: mint("sk_live_"),
        test_env_prefix: mint("sk_test_"),
        test_env_record: mint("sk_live_"),
        revoked: mint("sk_live_"),
        expired: mint("sk_live_"),
        deactivated: mint("sk_live_"),
        suspended: mint("sk_live_"),
        payment: mint("sk_live_"),
        cidr_out: mint("sk_live_"),
        cidr_in: mint("sk_live_"),
        referrer: mint("sk_live_"),
        routes: mint("sk_live_"),
        legacy: format!("legacy_{}", &mint("x")[1..]),
        orphan: mint("sk_live_"),
        revoked_expired: mint("sk_live_"),
        revoked_gone: mint("sk_live_"),
        expired_paused: mint("sk_live_"),
        gone_far: mint("sk_live_"),
    };
    let doc = Doc::new(7)
        .partner("partner_acme", Some("org_1"), "active")
        .partner("partner_solo", None, "active")
        .partner("partner_gone", Some("org_2"), "deactivated")
        .partner("partner_paused", Some("org_3"), "suspended")
        .partner("partner_broke", Some("org_4"), "payment_required")
        .key("key_ok", &f.ok, json!({}))
        .key(
            "key_writer",
            &f.writer,
            json!({"scopes": ["analyses:write", "analyses:read"]}),
        )
        .key("key_solo", &f.no_org, json!({"partner_id": "partner_solo"}))
        .key(
            "key_test",
            &f.test_env_prefix,
            json!({"environment": "test"}),
        )
        .key(
            "key_wrong_env",
            &f.test_env_record,
            json!({"environment": "test"}),
        )
        .key("key_revoked", &f.revoked, json!({"status": "revoked"}))
        .key(
            "key_expired",
            &f.expired,
            json!({"expires_at": "2020-01-01T00:00:00Z"}),
        )
        .key(
            "key_gone",
            &f.deactivated,
            json!({"partner_id": "partner_gone"}),
        )
        .key(
            "key_paused",
            &f.suspended,
            json!({"partner_id": "partner_paused"}),
        )
        .key(
            "key_broke",
            &f.payment,
            json!({"partner_id": "partner_broke"}),
        )
        .key(
            "key_far",
            &f.cidr_out,
            json!({"allowed_cidrs": ["203.0.113.0/24"]}),
        )
        .key(
            "key_near",
            &f.cidr_in,
            json!({"allowed_cidrs": ["127.0.0.0/8"]}),
        )
        .key(
            "key_web",
            &f.referrer,
            json!({"allowed_referrers": ["https://app.example.com/*"]}),
        )
        .key(
            "key_ro",
            &f.routes,
            json!({"allowed_routes": ["GET /v1/analyses/**"]}),
        )
        .key("key_legacy", &f.legacy, json!({}))
        .key(
            "key_orphan",
            &f.orphan,
            json!({"partner_id": "partner_nobody"}),
        )
        .key(
            "key_revoked_expired",
            &f.revoked_expired,
            json!({"status": "revoked", "expires_at": "2020-01-01T00:00:00Z"}),
        )
        .key(
            "key_revoked_gone",
            &f.revoked_gone,
            json!({"status": "revoked", "partner_id": "partner_gone"}),
        )
        .key(
            "key_expired_paused",
            &f.expired_paused,
            json!({"expires_at": "2020-01-01T00:00:00Z", "partner_id": "partner_paused"}),
        )
        .key(
            "key_gone_far",
            &f.gone_far,
            json!({"partner_id": "partner_gone", "allowed_cidrs": ["203.0.113.0/24"]}),
        );
    (f, doc)
}

struct Case<'a> {
    name: &'a str,
    method: &'a str,
    path: &'a str,
    headers: Vec<(&'a str, String)>,
    status: u16,
    code: &'a str,
}

/// The contract's `type` for each `code`.
fn type_of(code: &str) -> &'static str {
    match code {
        "invalid_path" | "idempotency_key_required" => "invalid_request_error",
        "authentication_required" | "invalid_api_key" | "key_revoked" | "key_expired" => {
            "authentication_error"
        }
        "insufficient_credits" => "payment_error",
        "rate_limited" => "rate_limit_error",
        "snapshot_unavailable" | "upstream_unavailable" | "upstream_timeout" => "api_error",
        _ => "permission_error",
    }
}

/// `k` with its last checksum character changed.
fn break_checksum(k: &str) -> String {
    let mut k = k.to_owned();
    let last = k.pop().unwrap();
    k.push(if last == 'A' { 'B' } else { 'A' });
    k
}

/// Whether `headers` offer a key at all, usable or not: a Bearer token or an API-key value.
fn offers_key(headers: &[(&str, String)]) -> bool {
    headers.iter().any(|(name, value)| match *name {
        "x-api-key" => !value.trim().is_empty(),
        "authorization" => value.split(',').any(|part| {
            let part = part.trim();
            part.len() > 7 && part[..7].eq_ignore_ascii_case("bearer ")
        }),
        _ => false,
    })
}

fn bearer(k: &str) -> (&'static str, String) {
    ("authorization", format!("Bearer {k}"))
}

fn api_key(k: &str) -> (&'static str, String) {
    ("x-api-key", k.to_owned())
}

/// The value of `name` the upstream saw, asserting it was sent at most once.
fn one(seen: &Seen, name: &str) -> Option<String> {
    let all: Vec<_> = seen.headers.get_all(name).iter().collect();
    assert!(all.len() <= 1, "{name} sent {} times", all.len());
    all.first().map(|v| v.to_str().unwrap().to_owned())
}

/// Assert that the upstream saw exactly the identity the snapshot `doc` gives `secret`, the
/// answer's request id, and no credential header.
fn assert_identity(doc: &Doc, secret: &str, seen: &Seen, answer: &Answer, what: &str) {
    let record = doc
        .keys
        .iter()
        .find(|k| k["hash"] == digest(secret))
        .unwrap_or_else(|| panic!("{what}: no record for the key"));
    let partner_id = record["partner_id"].as_str().unwrap();
    let partner = doc.partners.iter().find(|p| p["id"] == partner_id).unwrap();
    let mut scopes: Vec<&str> = record["scopes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    scopes.sort_unstable();
    let want = |v: &serde_json::Value| v.as_str().map(str::to_owned);
    assert_eq!(
        one(seen, "x-partner-id").as_deref(),
        Some(partner_id),
        "{what}"
    );
    assert_eq!(one(seen, "x-org-id"), want(&partner["org_id"]), "{what}");
    assert_eq!(one(seen, "x-key-id"), want(&record["id"]), "{what}");
    assert_eq!(
        one(seen, "x-key-environment"),
        want(&record["environment"]),
        "{what}"
    );
    assert_eq!(one(seen, "x-scopes"), Some(scopes.join(" ")), "{what}");
    let rid = answer
        .header("x-request-id")
        .expect("x-request-id answered");
    assert_eq!(one(seen, "x-request-id").as_deref(), Some(rid), "{what}");
    for cred in ["authorization", "x-api-key"] {
        assert!(seen.headers.get(cred).is_none(), "{what}: {cred} forwarded");
    }
}

async fn run_case(gate: &Gate, upstream: &Upstream, doc: &Doc, c: &Case<'_>) -> Answer {
    upstream.clear();
    let headers: Vec<(&str, &str)> = c.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let a = send(&client(), c.method, &gate.url(c.path), &headers, "").await;
    if c.status == 200 {
        assert_eq!(
            a.status,
            200,
            "{}: {:?}",
            c.name,
            String::from_utf8_lossy(&a.body)
        );
        assert_eq!(
            upstream.count(),
            1,
            "{}: exactly one upstream request",
            c.name
        );
        let secret = c
            .headers
            .iter()
            .find_map(|(k, v)| match *k {
                "x-api-key" => Some(v.as_str()),
                "authorization" => v.get(7..),
                _ => None,
            })
            .expect("an allowed case presents a key");
        let seen = upstream.last();
        assert_identity(doc, secret, &seen, &a, c.name);
        assert_eq!(seen.method, c.method, "{}", c.name);
        assert_eq!(seen.target, c.path, "{}", c.name);
    } else {
        assert_error(&a, c.status, c.code);
        assert_eq!(
            upstream.count(),
            0,
            "{}: a denial must not reach the upstream",
            c.name
        );
        // RFC 6750 via the contract: `error="invalid_token"` when a key was presented.
        let challenge = match c.code {
            "authentication_required" if !offers_key(&c.headers) => {
                Some("Bearer realm=\"keygate\"")
            }
            "authentication_required" | "invalid_api_key" | "key_revoked" | "key_expired" => {
                Some("Bearer realm=\"keygate\", error=\"invalid_token\"")
            }
            _ => None,
        };
        assert_eq!(a.header("www-authenticate"), challenge, "{}", c.name);
        for (_, v) in &c.headers {
            let text = String::from_utf8_lossy(&a.body);
            assert!(
                v.len() < 8 || !text.contains(v.trim_start_matches("Bearer ")),
                "{}: echoed the key",
                c.name
            );
        }
    }
    a
}

#[tokio::test]
async fn every_code_of_the_decision_table() {
    let upstream = Upstream::start().await;
    let snap = SnapshotDir::new();
    let (f, doc) = fixture();
    snap.write(&doc);
    let gate = Gate::start(&config_toml(&snap.path(), upstream.addr, "")).await;
    gate.wait_revision(7).await;

    let unknown = mint("sk_live_");
    let bad_checksum = break_checksum(&f.ok);
    let get = "GET";
    let p = "/v1/analyses/1";
    let cases = vec![
        Case {
            name: "bad path",
            method: get,
            path: "/v1/analyses%2F1",
            headers: vec![bearer(&f.ok)],
            status: 400,
            code: "invalid_path",
        },
        Case {
            name: "no credential",
            method: get,
            path: p,
            headers: vec![],
            status: 401,
            code: "authentication_required",
        },
        Case {
            name: "basic only",
            method: get,
            path: p,
            headers: vec![("authorization", "Basic dXNlcjpwYXNz".into())],
            status: 401,
            code: "authentication_required",
        },
        Case {
            name: "empty bearer",
            method: get,
            path: p,
            headers: vec![("authorization", "Bearer ".into())],
            status: 401,
            code: "authentication_required",
        },
        Case {
            name: "two Basic credentials",
            method: get,
            path: p,
            headers: vec![
                ("authorization", "Basic dXNlcjpwYXNz".into()),
                ("authorization", "Basic b3RoZXI6cGFzcw==".into()),
            ],
            status: 401,
            code: "authentication_required",
        },
        Case {
            name: "malformed bearer token",
            method: get,
            path: p,
            headers: vec![("authorization", format!("Bearer {} x", f.ok))],
            status: 401,
            code: "authentication_required",
        },
        Case {
            name: "malformed API key next to Basic",
            method: get,
            path: p,
            headers: vec![
                ("authorization", "Basic dXNlcjpwYXNz".into()),
                ("x-api-key", format!("{} x", f.ok)),
            ],
            status: 401,
            code: "authentication_required",
        },
        Case {
            name: "two different keys",
            method: get,
            path: p,
            headers: vec![bearer(&f.ok), api_key(&f.writer)],
            status: 401,
            code: "authentication_required",
        },
        Case {
            name: "two Authorization headers",
            method: get,
            path: p,
            headers: vec![bearer(&f.ok), bearer(&f.ok)],
            status: 401,
            code: "authentication_required",
        },
        Case {
            name: "test prefix at a live gate",
            method: get,
            path: p,
            headers: vec![bearer(&f.test_env_prefix)],
            status: 403,
            code: "key_environment_mismatch",
        },
        Case {
            name: "live prefix, test record",
            method: get,
            path: p,
            headers: vec![bearer(&f.test_env_record)],
            status: 403,
            code: "key_environment_mismatch",
        },
        Case {
            name: "unknown prefix",
            method: get,
            path: p,
            headers: vec![bearer("pk_other_0123456789")],
            status: 401,
            code: "invalid_api_key",
        },
        Case {
            name: "bad checksum",
            method: get,
            path: p,
            headers: vec![bearer(&bad_checksum)],
            status: 401,
            code: "invalid_api_key",
        },
        Case {
            name: "unknown key",
            method: get,
            path: p,
            headers: vec![api_key(&unknown)],
            status: 401,
            code: "invalid_api_key",
        },
        Case {
            name: "quarantined (no partner entry)",
            method: get,
            path: p,
            headers: vec![api_key(&f.orphan)],
            status: 401,
            code: "invalid_api_key",
        },
        Case {
            name: "revoked",
            method: get,
            path: p,
            headers: vec![bearer(&f.revoked)],
            status: 401,
            code: "key_revoked",
        },
        Case {
            name: "expired",
            method: get,
            path: p,
            headers: vec![bearer(&f.expired)],
            status: 401,
            code: "key_expired",
        },
        Case {
            name: "partner deactivated",
            method: get,
            path: p,
            headers: vec![bearer(&f.deactivated)],
            status: 403,
            code: "account_deactivated",
        },
        Case {
            name: "partner suspended",
            method: get,
            path: p,
            headers: vec![bearer(&f.suspended)],
            status: 403,
            code: "partner_suspended",
        },
        Case {
            name: "partner payment required",
            method: get,
            path: p,
            headers: vec![bearer(&f.payment)],
            status: 402,
            code: "insufficient_credits",
        },
        Case {
            name: "IP outside allowed_cidrs",
            method: get,
            path: p,
            headers: vec![bearer(&f.cidr_out)],
            status: 403,
            code: "ip_not_allowed",
        },
        Case {
            name: "IP inside allowed_cidrs",
            method: get,
            path: p,
            headers: vec![bearer(&f.cidr_in)],
            status: 200,
            code: "",
        },
        Case {
            name: "no referrer",
            method: get,
            path: p,
            headers: vec![bearer(&f.referrer)],
            status: 403,
            code: "referrer_not_allowed",
        },
        Case {
            name: "other referrer",
            method: get,
            path: p,
            headers: vec![
                bearer(&f.referrer),
                ("referer", "https://evil.example/x".into()),
            ],
            status: 403,
            code: "referrer_not_allowed",
        },
        Case {
            name: "allowed referrer",
            method: get,
            path: p,
            headers: vec![
                bearer(&f.referrer),
                ("referer", "https://app.example.com/page".into()),
            ],
            status: 200,
            code: "",
        },
        Case {
            name: "allowed origin",
            method: get,
            path: p,
            headers: vec![
                bearer(&f.referrer),
                ("origin", "https://app.example.com".into()),
            ],
            status: 200,
            code: "",
        },
        Case {
            name: "inside allowed_routes",
            method: get,
            path: p,
            headers: vec![bearer(&f.routes)],
            status: 200,
            code: "",
        },
        Case {
            name: "outside allowed_routes",
            method: "POST",
            path: "/v1/analyses",
            headers: vec![bearer(&f.routes)],
            status: 403,
            code: "route_not_allowed",
        },
        Case {
            name: "scope missing",
            method: "POST",
            path: "/v1/analyses",
            headers: vec![bearer(&f.ok)],
            status: 403,
            code: "scope_required",
        },
        Case {
            name: "scope present",
            method: "POST",
            path: "/v1/analyses",
            headers: vec![bearer(&f.writer)],
            status: 200,
            code: "",
        },
        Case {
            name: "legacy prefix without checksum",
            method: get,
            path: p,
            headers: vec![api_key(&f.legacy)],
            status: 200,
            code: "",
        },
        Case {
            name: "scheme in lower case",
            method: get,
            path: p,
            headers: vec![("authorization", format!("bearer {}", f.ok))],
            status: 200,
            code: "",
        },
        Case {
            name: "partner without org",
            method: get,
            path: p,
            headers: vec![api_key(&f.no_org)],
            status: 200,
            code: "",
        },
        // First failing check wins.
        Case {
            name: "bad path and no credential",
            method: get,
            path: "/v1/../../etc/passwd",
            headers: vec![],
            status: 400,
            code: "invalid_path",
        },
        Case {
            name: "two Authorization headers, different keys",
            method: get,
            path: p,
            headers: vec![bearer(&f.ok), bearer(&f.writer)],
            status: 401,
            code: "authentication_required",
        },
        Case {
            name: "test prefix with a bad checksum",
            method: get,
            path: p,
            headers: vec![bearer(&break_checksum(&f.test_env_prefix))],
            status: 403,
            code: "key_environment_mismatch",
        },
        Case {
            name: "revoked and expired",
            method: get,
            path: p,
            headers: vec![bearer(&f.revoked_expired)],
            status: 401,
            code: "key_revoked",
        },
        Case {
            name: "revoked key of a deactivated partner",
            method: get,
            path: p,
            headers: vec![bearer(&f.revoked_gone)],
            status: 401,
            code: "key_revoked",
        },
        Case {
            name: "expired key of a suspended partner",
            method: get,
            path: p,
            headers: vec![bearer(&f.expired_paused)],
            status: 401,
            code: "key_expired",
        },
        Case {
            name: "deactivated partner, IP outside",
            method: get,
            path: p,
            headers: vec![bearer(&f.gone_far)],
            status: 403,
            code: "account_deactivated",
        },
        Case {
            name: "outside allowed_routes and scope missing",
            method: "POST",
            path: "/v1/analyses",
            headers: vec![api_key(&f.routes)],
            status: 403,
            code: "route_not_allowed",
        },
    ];
    for c in &cases {
        let a = run_case(&gate, &upstream, &doc, c).await;
        if c.code == "scope_required" {
            let msg = a.json()["error"]["message"].as_str().unwrap().to_owned();
            assert!(msg.contains("analyses:write"), "{msg}");
        }
        if c.status != 200 {
            assert_eq!(a.json()["error"]["type"], type_of(c.code), "{}", c.name);
        }
    }
    gate.stop().await;
}

#[tokio::test]
async fn allowed_requests_carry_exactly_keygates_identity() {
    let upstream = Upstream::start().await;
    let snap = SnapshotDir::new();
    let (f, doc) = fixture();
    snap.write(&doc);
    let gate = Gate::start(&config_toml(&snap.path(), upstream.addr, "")).await;

    for (key, partner, org, id, scopes) in [
        (
            &f.writer,
            "partner_acme",
            Some("org_1"),
            "key_writer",
            "analyses:read analyses:write",
        ),
        (&f.no_org, "partner_solo", None, "key_solo", "analyses:read"),
    ] {
        upstream.clear();
        let a = get(
            &client(),
            &gate.url("/v1/analyses/1?q=1"),
            &[
                ("x-api-key", key),
                ("x-org-id", "org_spoofed"),
                ("x-request-id", "trace-123"),
            ],
        )
        .await;
        assert_eq!(a.status, 200);
        assert_eq!(
            a.header("x-request-id"),
            Some("trace-123"),
            "a well-formed caller id is kept"
        );
        let seen = upstream.last();
        assert_eq!(seen.headers["x-partner-id"], partner);
        assert_eq!(
            seen.headers.get("x-org-id").map(|v| v.to_str().unwrap()),
            org
        );
        assert_eq!(
            seen.headers.get_all("x-org-id").iter().count(),
            usize::from(org.is_some())
        );
        assert_eq!(seen.headers["x-key-id"], id);
        assert_eq!(seen.headers["x-key-environment"], "live");
        assert_eq!(seen.headers["x-scopes"], scopes);
        assert_eq!(seen.headers["x-request-id"], "trace-123");
        assert!(
            seen.headers.get("x-api-key").is_none() && seen.headers.get("authorization").is_none()
        );
        assert_eq!(seen.target, "/v1/analyses/1?q=1");
    }

    // A malformed caller request id is replaced, end to end.
    for bad in ["has spaces in it", &"x".repeat(200)] {
        let a = get(
            &client(),
            &gate.url("/v1/analyses/1"),
            &[("x-api-key", &f.ok), ("x-request-id", bad)],
        )
        .await;
        assert_eq!(a.status, 200);
        let rid = a.header("x-request-id").unwrap().to_owned();
        assert_ne!(rid, bad);
        assert_eq!(rid.len(), 32);
        assert_identity(&doc, &f.ok, &upstream.last(), &a, "replaced request id");
    }

    // The same over HTTP/2 (h2c, prior knowledge).
    upstream.clear();
    let a = get(
        &h2_client(),
        &gate.url("/v1/analyses/2"),
        &[("authorization", &format!("Bearer {}", f.ok))],
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(upstream.count(), 1);
    let seen = upstream.last();
    assert_identity(&doc, &f.ok, &seen, &a, "h2c");
    assert_eq!(seen.target, "/v1/analyses/2");
    let a = get(
        &h2_client(),
        &gate.url("/v1/analyses/2"),
        &[("x-api-key", &f.no_org), ("x-request-id", "h2-trace.1")],
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.header("x-request-id"), Some("h2-trace.1"));
    assert_identity(&doc, &f.no_org, &upstream.last(), &a, "h2c, no org");
    let denied = get(&h2_client(), &gate.url("/v1/analyses/2"), &[]).await;
    assert_error(&denied, 401, "authentication_required");
    assert_eq!(
        denied.header("www-authenticate"),
        Some("Bearer realm=\"keygate\"")
    );
    let denied = get(
        &h2_client(),
        &gate.url("/v1/analyses/2"),
        &[("x-api-key", &f.revoked)],
    )
    .await;
    assert_error(&denied, 401, "key_revoked");
    // A HEAD's refusal carries the refusal's fields and no body (DATA on an answer to HEAD
    // is a protocol error to an HTTP/2 client).
    for (headers, status) in [
        (vec![], 401),
        (vec![("x-api-key", f.revoked.as_str())], 401),
    ] {
        let denied = send(
            &h2_client(),
            "HEAD",
            &gate.url("/v1/analyses/2"),
            &headers,
            "",
        )
        .await;
        assert_eq!(denied.status, status);
        assert!(denied.body.is_empty());
        assert!(denied.header("www-authenticate").is_some());
        assert_eq!(denied.header("content-type"), Some("application/json"));
    }
    let allowed = send(
        &h2_client(),
        "HEAD",
        &gate.url("/v1/analyses/2"),
        &[("x-api-key", &f.ok)],
        "",
    )
    .await;
    assert_eq!(allowed.status, 200);
    assert!(allowed.body.is_empty());
    assert_eq!(upstream.count(), 3, "h2c denials reach nothing");
    gate.stop().await;
}

#[tokio::test]
async fn unmatched_routes_can_be_denied() {
    let upstream = Upstream::start().await;
    let snap = SnapshotDir::new();
    let (f, doc) = fixture();
    snap.write(&doc);
    let gate = Gate::start(&config_toml(
        &snap.path(),
        upstream.addr,
        "[routes]\nunmatched = \"deny\"\n",
    ))
    .await;
    let auth = [("authorization", format!("Bearer {}", f.writer))];
    let auth: Vec<(&str, &str)> = auth.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let a = get(&client(), &gate.url("/v1/other"), &auth).await;
    assert_error(&a, 403, "route_not_allowed");
    let a = get(&client(), &gate.url("/v1/analyses/9"), &auth).await;
    assert_eq!(a.status, 200, "a matched route is still allowed");
    assert_eq!(upstream.count(), 1);
    gate.stop().await;
}

/// `routes.case_sensitive = false`: an upstream that routes ignoring case (Express, ASP.NET
/// Core) runs `POST /V1/ANALYSES` as `POST /v1/analyses`, so it must need the same scope; the
/// normalized path goes upstream with its letter case kept.
#[tokio::test]
async fn routes_ignoring_case_cover_every_spelling() {
    let upstream = Upstream::start().await;
    let snap = SnapshotDir::new();
    let (f, doc) = fixture();
    snap.write(&doc);
    let gate = Gate::start(&config_toml(
        &snap.path(),
        upstream.addr,
        "[routes]\ncase_sensitive = false\n",
    ))
    .await;
    let as_key = |k: &str| [("x-api-key", k.to_owned())];
    for path in ["/V1/ANALYSES", "/v1/Analyses", "//V1/./analyses/"] {
        let auth = as_key(&f.ok);
        let a = send(
            &client(),
            "POST",
            &gate.url(path),
            &[(auth[0].0, &auth[0].1)],
            "{}",
        )
        .await;
        assert_error(&a, 403, "scope_required");
        let message = a.json()["error"]["message"].as_str().unwrap().to_owned();
        assert!(message.contains("analyses:write"), "{path}: {message}");
    }
    assert_eq!(upstream.count(), 0, "no spelling reached the upstream");
    let auth = as_key(&f.writer);
    let a = send(
        &client(),
        "POST",
        &gate.url("/V1/ANALYSES"),
        &[(auth[0].0, &auth[0].1)],
        "{}",
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(upstream.last().target, "/V1/ANALYSES", "the path as sent");
    // A key's allowed_routes cover every spelling too (GET /v1/analyses/** for key_ro).
    let auth = as_key(&f.routes);
    let a = get(
        &client(),
        &gate.url("/v1/ANALYSES/7"),
        &[(auth[0].0, &auth[0].1)],
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(upstream.last().target, "/v1/ANALYSES/7");
    let a = get(
        &client(),
        &gate.url("/V1/other"),
        &[(auth[0].0, &auth[0].1)],
    )
    .await;
    assert_error(&a, 403, "route_not_allowed");
    gate.stop().await;
}

#[tokio::test]
async fn idempotency_key_when_required() {
    let upstream = Upstream::start().await;
    let snap = SnapshotDir::new();
    let (f, doc) = fixture();
    snap.write(&doc);
    let gate = Gate::start(&config_toml(
        &snap.path(),
        upstream.addr,
        "[idempotency]\nrequired = true\n",
    ))
    .await;
    let auth = format!("Bearer {}", f.writer);
    let a = send(
        &client(),
        "POST",
        &gate.url("/v1/analyses"),
        &[("authorization", &auth)],
        "{}",
    )
    .await;
    assert_error(&a, 400, "idempotency_key_required");
    assert_eq!(
        a.json()["error"]["type"],
        type_of("idempotency_key_required")
    );
    assert_eq!(upstream.count(), 0);
    let a = send(
        &client(),
        "POST",
        &gate.url("/v1/analyses"),
        &[("authorization", &auth), ("idempotency-key", "k-1")],
        "{\"x\":1}",
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(
        upstream.last().body.as_ref(),
        b"{\"x\":1}",
        "the body streams through"
    );
    let a = get(
        &client(),
        &gate.url("/v1/analyses/1"),
        &[("authorization", &auth)],
    )
    .await;
    assert_eq!(a.status, 200, "GET needs no idempotency key");

    // Every mutating method needs one; an empty value is not a key.
    upstream.clear();
    for (method, headers) in [
        ("PUT", vec![("authorization", auth.as_str())]),
        ("PATCH", vec![("authorization", auth.as_str())]),
        ("DELETE", vec![("authorization", auth.as_str())]),
        (
            "POST",
            vec![("authorization", auth.as_str()), ("idempotency-key", "")],
        ),
    ] {
        let a = send(&client(), method, &gate.url("/v1/analyses"), &headers, "").await;
        assert_error(&a, 400, "idempotency_key_required");
    }
    assert_eq!(
        upstream.count(),
        0,
        "a refused mutation reached the upstream"
    );
    for method in ["HEAD", "OPTIONS"] {
        let a = send(
            &client(),
            method,
            &gate.url("/v1/analyses/1"),
            &[("authorization", &auth)],
            "",
        )
        .await;
        assert_eq!(a.status, 200, "{method} is not a mutation");
    }
    gate.stop().await;
}

#[tokio::test]
async fn no_snapshot_yet_is_503_then_serves_when_the_file_appears() {
    let upstream = Upstream::start().await;
    let snap = SnapshotDir::new();
    let gate = Gate::start(&config_toml(&snap.path(), upstream.addr, "")).await;
    let key = mint("sk_live_");
    let a = get(
        &client(),
        &gate.url("/v1/analyses/1"),
        &[("x-api-key", &key)],
    )
    .await;
    assert_error(&a, 503, "snapshot_unavailable");
    assert_eq!(a.json()["error"]["type"], type_of("snapshot_unavailable"));
    assert_eq!(a.header("retry-after"), Some("1"));
    // The credential is still checked first: no key is 401, not 503.
    let a = get(&client(), &gate.url("/v1/analyses/1"), &[]).await;
    assert_error(&a, 401, "authentication_required");
    let ready = get(&client(), &format!("http://{}/readyz", gate.admin), &[]).await;
    assert_eq!(ready.status, 503);

    snap.write(
        &Doc::new(1)
            .partner("partner_acme", None, "active")
            .key("key_a", &key, json!({})),
    );
    gate.wait_revision(1).await;
    let a = get(
        &client(),
        &gate.url("/v1/analyses/1"),
        &[("x-api-key", &key)],
    )
    .await;
    assert_eq!(a.status, 200);
    let ready = get(&client(), &format!("http://{}/readyz", gate.admin), &[]).await;
    assert_eq!(ready.status, 200);
    assert_eq!(ready.json()["revision"], 1);
    assert_eq!(upstream.count(), 1);
    gate.stop().await;
}

#[tokio::test]
async fn rate_limited_keys_get_429_with_retry_after() {
    let upstream = Upstream::start().await;
    let snap = SnapshotDir::new();
    let (limited, other) = (mint("sk_live_"), mint("sk_live_"));
    snap.write(
        &Doc::new(1)
            .partner("partner_acme", Some("org_1"), "active")
            .key("key_limited", &limited, json!({"rate_limit_per_minute": 2}))
            .key("key_other", &other, json!({"rate_limit_per_minute": 2})),
    );
    let gate = Gate::start(&config_toml(&snap.path(), upstream.addr, "")).await;
    let url = gate.url("/v1/analyses/1");
    for _ in 0..2 {
        assert_eq!(
            get(&client(), &url, &[("x-api-key", &limited)])
                .await
                .status,
            200
        );
    }
    let a = get(&client(), &url, &[("x-api-key", &limited)]).await;
    assert_error(&a, 429, "rate_limited");
    let retry: u64 = a
        .header("retry-after")
        .expect("429 carries Retry-After")
        .parse()
        .expect("Retry-After in seconds");
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    assert_eq!(
        upstream.count(),
        2,
        "the refused request reached the upstream"
    );
    // Buckets are per key.
    let a = get(&client(), &url, &[("x-api-key", &other)]).await;
    assert_eq!(a.status, 200, "another key's budget was spent");
    gate.stop().await;
}
