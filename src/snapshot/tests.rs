//! Table tests for snapshot parsing (document errors, entry quarantine), lookup by digest, and
//! the store's publish rules.

use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

use super::*;
use crate::credential::mint;

fn sha256(key: &str) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(key.as_bytes())))
}

fn hmac_sha256(pepper: &[u8], key: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(pepper).unwrap();
    mac.update(key.as_bytes());
    format!("hmac-sha256:{}", hex::encode(mac.finalize().into_bytes()))
}

fn pepper(p: &str) -> Option<Arc<[u8]>> {
    Some(Arc::from(p.as_bytes()))
}

/// A key record with the required fields, then `extra` merged over them.
fn key(id: &str, hash: &str, extra: Value) -> Value {
    let mut k = json!({
        "id": id,
        "hash": hash,
        "partner_id": "partner_acme",
        "environment": "live",
        "scopes": ["analyses:read"],
        "status": "active",
    });
    for (name, v) in extra.as_object().unwrap() {
        k[name] = v.clone();
    }
    k
}

fn acme() -> Value {
    json!({"id": "partner_acme", "org_id": "org_1", "status": "active"})
}

fn doc(revision: u64, partners: Vec<Value>, keys: Vec<Value>) -> Vec<u8> {
    json!({
        "schema": "keygate.snapshot/v1",
        "revision": revision,
        "generated_at": "2026-11-22T06:00:00Z",
        "partners": partners,
        "keys": keys,
    })
    .to_string()
    .into_bytes()
}

fn entries(s: &Snapshot) -> Vec<(String, String)> {
    s.quarantined
        .iter()
        .map(|q| (q.entry.clone(), q.reason.clone()))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Document errors

#[test]
fn document_errors_reject_the_whole_document() {
    let good = String::from_utf8(doc(1, vec![acme()], vec![])).unwrap();
    let truncated = &good[..good.len() / 2];
    let cases: &[(&str, &[u8])] = &[
        ("not JSON", b"schema: keygate.snapshot/v1"),
        ("empty", b""),
        (
            "not UTF-8",
            b"{\"schema\": \"keygate.snapshot/v1\xff\", \"revision\": 1}",
        ),
        ("a JSON array", b"[]"),
        (
            "wrong schema",
            br#"{"schema": "keygate.snapshot/v2", "revision": 1}"#,
        ),
        ("missing schema", br#"{"revision": 1}"#),
        ("null schema", br#"{"schema": null, "revision": 1}"#),
        ("missing revision", br#"{"schema": "keygate.snapshot/v1"}"#),
        (
            "negative revision",
            br#"{"schema": "keygate.snapshot/v1", "revision": -1}"#,
        ),
        (
            "string revision",
            br#"{"schema": "keygate.snapshot/v1", "revision": "42"}"#,
        ),
        (
            "fractional revision",
            br#"{"schema": "keygate.snapshot/v1", "revision": 1.5}"#,
        ),
        (
            "keys not a list",
            br#"{"schema": "keygate.snapshot/v1", "revision": 1, "keys": {}}"#,
        ),
        ("truncated", truncated.as_bytes()),
        (
            "trailing garbage",
            br#"{"schema": "keygate.snapshot/v1", "revision": 1} {"#,
        ),
    ];
    for (name, bytes) in cases {
        match parse(bytes, None) {
            Err(DocumentError::Json(_) | DocumentError::Schema(_)) => {}
            Ok(s) => panic!("{name}: accepted as revision {}", s.revision),
        }
    }
    // The right variant for the schema cases, naming what was found.
    let schema = |doc: &[u8]| parse(doc, None).unwrap_err().to_string();
    assert_eq!(
        schema(br#"{"schema": "keygate.snapshot/v2", "revision": 1}"#),
        r#"schema is "keygate.snapshot/v2", expected "keygate.snapshot/v1""#
    );
    assert_eq!(
        schema(br#"{"revision": 1}"#),
        r#"schema is missing, expected "keygate.snapshot/v1""#
    );
    // Anything else is described, never echoed: a key pasted into the wrong field stays out of
    // the logs.
    let key = "sk_live_2EnVFPSaUjJg7xf0dcLP9b9oRDjVkZVT3sVMw5";
    let doc = format!(r#"{{"schema": "{key}", "revision": 1}}"#);
    assert_eq!(
        schema(doc.as_bytes()),
        r#"schema is another value (46 characters), expected "keygate.snapshot/v1""#
    );
    let from_document = crate::snapshot::document::Document::from_json(doc.as_bytes())
        .unwrap_err()
        .to_string();
    assert!(!from_document.contains(key), "{from_document}");
    // And the good document itself parses.
    assert_eq!(parse(good.as_bytes(), None).unwrap().revision, 1);
}

#[test]
fn document_errors_never_echo_key_material() {
    let secret = mint("sk_live_");
    let digest = sha256(&secret);
    for text in [
        format!(r#"{{"schema": "keygate.snapshot/v1", "revision": "{secret}"}}"#),
        format!(r#"{{"schema": "keygate.snapshot/v1", "revision": "{digest}"}}"#),
        format!(r#"{{"schema": "keygate.snapshot/v1", "revision": 1, "keys": "{secret}"}}"#),
        format!(r#"{{"schema": "keygate.snapshot/v1", "revision": 1, "{secret}": 1,"#),
        // A quote inside the value (escaped in serde's message) does not end the redaction.
        format!(r#"{{"schema": "keygate.snapshot/v1", "revision": "a\"{secret}"}}"#),
        format!(r#"{{"schema": "keygate.snapshot/v1", "revision": "\\\"{secret}\""}}"#),
        format!(r#"{{"schema": "{secret}", "revision": 1}}"#),
    ] {
        let err = parse(text.as_bytes(), None).unwrap_err().to_string();
        assert_no_secret(&err, &secret, &digest);
    }
}

/// Neither the key, nor its random body, nor the digest's hex appears in `text`.
fn assert_no_secret(text: &str, secret: &str, digest: &str) {
    if let Some(needle) = leaked(text, secret, digest) {
        panic!("{text:?} leaks {needle:?}");
    }
}

/// What part of the key or digest `text` repeats, if any.
fn leaked<'a>(text: &str, secret: &'a str, digest: &'a str) -> Option<&'a str> {
    let body = &secret["sk_live_".len()..];
    let hex = digest.rsplit(':').next().unwrap();
    [secret, body, &body[..16], hex, &hex[..16]]
        .into_iter()
        .find(|needle| text.contains(needle))
}

// ---------------------------------------------------------------------------------------------
// Entry errors: only the entry is quarantined; the rest stays usable.

struct EntryCase {
    name: &'static str,
    /// Partners besides `partner_acme`.
    partners: Vec<Value>,
    /// Keys besides `key_good`; built from the `bad` secret.
    keys: Vec<Value>,
    pepper: Option<Arc<[u8]>>,
    /// `(entry, a word of the reason)`, in the snapshot's (sorted) order.
    want: Vec<(&'static str, &'static str)>,
}

#[test]
fn entry_errors_quarantine_only_that_entry() {
    let good = mint("sk_live_");
    let bad = mint("sk_live_");
    let bad_hex = sha256(&bad)["sha256:".len()..].to_owned();
    let bad_key = |id: &str, extra: Value| key(id, &sha256(&bad), extra);
    let case = |name, keys, want| EntryCase {
        name,
        partners: vec![],
        keys,
        pepper: None,
        want,
    };

    let cases = vec![
        case(
            "bad hash prefix",
            vec![key("key_bad", &format!("md5:{bad_hex}"), json!({}))],
            vec![("key key_bad", "hash")],
        ),
        case(
            "hash without a prefix",
            vec![key("key_bad", &bad_hex, json!({}))],
            vec![("key key_bad", "hash")],
        ),
        case(
            "uppercase hex",
            vec![key(
                "key_bad",
                &format!("sha256:{}", bad_hex.to_uppercase()),
                json!({}),
            )],
            vec![("key key_bad", "lowercase hex")],
        ),
        case(
            "short hex",
            vec![key(
                "key_bad",
                &format!("sha256:{}", &bad_hex[..63]),
                json!({}),
            )],
            vec![("key key_bad", "64")],
        ),
        case(
            "long hex",
            vec![key("key_bad", &format!("sha256:{bad_hex}0"), json!({}))],
            vec![("key key_bad", "64")],
        ),
        case(
            "a letter past f",
            vec![key(
                "key_bad",
                &format!("sha256:{}g", &bad_hex[..63]),
                json!({}),
            )],
            vec![("key key_bad", "lowercase hex")],
        ),
        case(
            "64 bytes, not all ASCII",
            vec![key(
                "key_bad",
                &format!("sha256:{}é", &bad_hex[..62]),
                json!({}),
            )],
            vec![("key key_bad", "lowercase hex")],
        ),
        case(
            "unknown partner",
            vec![bad_key("key_bad", json!({"partner_id": "partner_nope"}))],
            vec![("key key_bad", "no partner entry")],
        ),
        EntryCase {
            name: "partner with a bad status, and its keys",
            partners: vec![json!({"id": "partner_frozen", "status": "frozen"})],
            keys: vec![bad_key("key_bad", json!({"partner_id": "partner_frozen"}))],
            pepper: None,
            want: vec![
                ("key key_bad", "no partner entry"),
                ("partner partner_frozen", "status"),
            ],
        },
        EntryCase {
            name: "partner with a bad org_id",
            partners: vec![json!({"id": "partner_org", "org_id": "org 1", "status": "active"})],
            keys: vec![bad_key("key_bad", json!({"partner_id": "partner_org"}))],
            pepper: None,
            want: vec![
                ("key key_bad", "no partner entry"),
                ("partner partner_org", "org_id"),
            ],
        },
        EntryCase {
            name: "partner without a status",
            partners: vec![json!({"id": "partner_nostatus"})],
            keys: vec![bad_key(
                "key_bad",
                json!({"partner_id": "partner_nostatus"}),
            )],
            pepper: None,
            want: vec![
                ("key key_bad", "no partner entry"),
                ("partner partner_nostatus", "status"),
            ],
        },
        EntryCase {
            name: "duplicate partner id: neither is trusted",
            partners: vec![
                json!({"id": "partner_dup", "status": "active"}),
                json!({"id": "partner_dup", "status": "suspended"}),
            ],
            keys: vec![bad_key("key_bad", json!({"partner_id": "partner_dup"}))],
            pepper: None,
            want: vec![
                ("key key_bad", "ambiguous"),
                ("partner partner_dup", "more than once"),
            ],
        },
        case(
            "two keys with the same digest: both",
            vec![bad_key("key_a", json!({})), bad_key("key_b", json!({}))],
            vec![("key key_a", "same digest"), ("key key_b", "same digest")],
        ),
        case(
            "a key with the same digest as a good key: both",
            vec![key("key_copy", &sha256(&good), json!({}))],
            vec![
                ("key key_copy", "same digest"),
                ("key key_good", "same digest"),
            ],
        ),
        case(
            "duplicate key id: both",
            vec![
                bad_key("key_dup", json!({})),
                key("key_dup", &sha256("another key"), json!({})),
            ],
            vec![
                ("key key_dup", "more than once"),
                ("key key_dup", "more than once"),
            ],
        ),
        case(
            "bad CIDR",
            vec![bad_key(
                "key_bad",
                json!({"allowed_cidrs": ["10.0.0.0/8", "10.0.0.0/33"]}),
            )],
            vec![("key key_bad", "allowed_cidrs")],
        ),
        case(
            "bad referrer pattern",
            vec![bad_key(
                "key_bad",
                json!({"allowed_referrers": ["app.example.com/*"]}),
            )],
            vec![("key key_bad", "allowed_referrers")],
        ),
        case(
            "referrer pattern with a partial wildcard",
            vec![bad_key(
                "key_bad",
                json!({"allowed_referrers": ["https://app*.example.com"]}),
            )],
            vec![("key key_bad", "allowed_referrers")],
        ),
        case(
            "bad route",
            vec![bad_key(
                "key_bad",
                json!({"allowed_routes": ["GET v1/analyses"]}),
            )],
            vec![("key key_bad", "allowed_routes")],
        ),
        case(
            "route with ** not last",
            vec![bad_key(
                "key_bad",
                json!({"allowed_routes": ["GET /v1/**/x"]}),
            )],
            vec![("key key_bad", "allowed_routes")],
        ),
        case(
            "bad expires_at",
            vec![bad_key("key_bad", json!({"expires_at": "2026-13-01"}))],
            vec![("key key_bad", "expires_at")],
        ),
        case(
            "expires_at without an offset",
            vec![bad_key(
                "key_bad",
                json!({"expires_at": "2026-12-01T00:00:00"}),
            )],
            vec![("key key_bad", "expires_at")],
        ),
        case(
            "unknown key status",
            vec![bad_key("key_bad", json!({"status": "disabled"}))],
            vec![("key key_bad", "status")],
        ),
        case(
            "scope with a space",
            vec![bad_key("key_bad", json!({"scopes": ["analyses read"]}))],
            vec![("key key_bad", "scope")],
        ),
        case(
            "scope with a comma",
            vec![bad_key("key_bad", json!({"scopes": ["a,b"]}))],
            vec![("key key_bad", "scope")],
        ),
        case(
            "empty scope",
            vec![bad_key("key_bad", json!({"scopes": [""]}))],
            vec![("key key_bad", "scope")],
        ),
        case(
            "rate limit 0",
            vec![bad_key("key_bad", json!({"rate_limit_per_minute": 0}))],
            vec![("key key_bad", "rate_limit_per_minute")],
        ),
        case(
            "negative rate limit",
            vec![bad_key("key_bad", json!({"rate_limit_per_minute": -5}))],
            vec![("key key_bad", "")],
        ),
        case(
            "hmac-sha256 without a pepper",
            vec![key("key_bad", &hmac_sha256(b"pepper", &bad), json!({}))],
            vec![("key key_bad", "pepper")],
        ),
        case(
            "bad environment",
            vec![bad_key("key_bad", json!({"environment": "li ve"}))],
            vec![("key key_bad", "environment")],
        ),
        case(
            "missing hash",
            vec![json!({"id": "key_bad", "partner_id": "partner_acme",
                        "environment": "live", "status": "active"})],
            vec![("key key_bad", "hash")],
        ),
        case(
            "bad id: named by position",
            vec![bad_key("key bad", json!({}))],
            vec![("keys[1]", "id")],
        ),
        case(
            "not an object: named by position",
            vec![json!("key_bad")],
            vec![("keys[1]", "")],
        ),
    ];

    let mut failures = Vec::new();
    for c in cases {
        let mut partners = vec![acme()];
        partners.extend(c.partners);
        let mut keys = vec![key("key_good", &sha256(&good), json!({}))];
        keys.extend(c.keys);
        let s = match parse(&doc(3, partners, keys), c.pepper) {
            Ok(s) => s,
            Err(e) => {
                failures.push(format!("{}: document rejected: {e}", c.name));
                continue;
            }
        };
        let got = entries(&s);
        let matches = got.len() == c.want.len()
            && got
                .iter()
                .zip(&c.want)
                .all(|((entry, reason), (want_entry, word))| {
                    entry == want_entry && reason.contains(word)
                });
        if !matches {
            failures.push(format!(
                "{}: quarantined {got:?}, want {:?}",
                c.name, c.want
            ));
        }
        if bad_key_found(&s, &bad) {
            failures.push(format!("{}: the bad entry is usable", c.name));
        }
        let good_usable = s.find(&good).map(|k| k.id()) == Some("key_good");
        let good_quarantined = c.want.iter().any(|(e, _)| *e == "key key_good");
        if good_usable == good_quarantined {
            failures.push(format!(
                "{}: key_good usable = {good_usable}, want {}",
                c.name, !good_quarantined
            ));
        }
        if !good_quarantined && s.key_count() != 1 {
            failures.push(format!("{}: {} keys in force", c.name, s.key_count()));
        }
        for (entry, reason) in &got {
            if reason.contains(&bad_hex) || entry.contains(&bad_hex) || reason.contains(&bad) {
                failures.push(format!("{}: {entry}: {reason:?} leaks", c.name));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// JSON allows a `\u` escape of a lone surrogate, which no Rust string can hold (a JavaScript
/// control plane writes one for a name cut in the middle of an emoji). The entry is unreadable,
/// not the document: a revocation in the same document must still apply. The same holds for
/// entries that arrive one by one (the sync client's `build`).
#[test]
fn a_lone_surrogate_escape_quarantines_only_its_entry() {
    let (good, bad, other) = (mint("sk_live_"), mint("sk_live_"), mint("sk_live_"));
    let text = String::from_utf8(doc(
        4,
        vec![
            acme(),
            json!({"id": "partner_x", "org_id": "LONE", "status": "active"}),
        ],
        vec![
            key("key_good", &sha256(&good), json!({})),
            key("key_bad", &sha256(&bad), json!({"name": "LONE"})),
            key(
                "key_other",
                &sha256(&other),
                json!({"partner_id": "partner_x"}),
            ),
        ],
    ))
    .unwrap()
    .replace("LONE", "\\ud800");
    assert!(text.contains(r#""name":"\ud800""#), "{text}");

    let check = |s: &Snapshot, how: &str| {
        assert_eq!(s.find(&good).map(|k| k.id()), Some("key_good"), "{how}");
        assert!(
            s.find(&bad).is_none(),
            "{how}: the unreadable key is usable"
        );
        assert!(
            s.find(&other).is_none(),
            "{how}: a key of the unreadable partner is usable"
        );
        let got = entries(s);
        let named: Vec<&str> = got.iter().map(|(e, _)| e.as_str()).collect();
        for want in ["partner partner_x", "key key_bad", "key key_other"] {
            assert!(
                named.contains(&want),
                "{how}: {want} not quarantined: {got:?}"
            );
        }
    };
    let s = parse(text.as_bytes(), None).expect("the document stands");
    assert_eq!(s.revision, 4);
    check(&s, "parse");

    #[derive(serde::Deserialize)]
    struct Lists<'a> {
        #[serde(borrow)]
        partners: Vec<&'a serde_json::value::RawValue>,
        #[serde(borrow)]
        keys: Vec<&'a serde_json::value::RawValue>,
    }
    let lists: Lists<'_> = serde_json::from_str(&text).expect("JSON, lone surrogate and all");
    let s = parse::build(4, None, &lists.partners, &lists.keys, None);
    check(&s, "build");
}

fn bad_key_found(s: &Snapshot, bad: &str) -> bool {
    s.find(bad).is_some()
}

/// A key (or a digest) pasted into the wrong field quarantines the entry, and neither the entry
/// nor the reason repeats it: both end up in logs and `keygate snapshot check` output.
#[test]
fn quarantine_reasons_never_echo_key_material() {
    let secret = mint("sk_live_");
    let digest = sha256(&secret);
    let fields = [
        json!({"rate_limit_per_minute": secret}),
        json!({"rate_limit_per_minute": digest}),
        json!({"expires_at": secret}),
        json!({"status": secret}),
        json!({"partner_id": secret}),
        json!({"allowed_cidrs": [secret]}),
        json!({"allowed_cidrs": [digest]}),
        json!({"allowed_referrers": [secret]}),
        json!({"allowed_referrers": [format!("https://{secret}@app.example.com/")]}),
        json!({"allowed_routes": [secret]}),
        json!({"allowed_routes": [format!("GET {secret}")]}),
        json!({"environment": digest}),
        json!({"scopes": [format!("{secret} x")]}),
        json!({"hash": secret}),
        json!({"hash": digest.to_uppercase()}),
        json!({"name": 1, "id": secret.replace('_', " ")}),
        json!({"rate_limit_per_minute": format!("\"{secret}")}),
        json!({"expires_at": format!("a\\\"{secret}")}),
    ];
    let mut leaks = Vec::new();
    for extra in &fields {
        let record = key("key_pasted", &sha256("some other key"), extra.clone());
        let s = parse(&doc(1, vec![acme()], vec![record]), None).unwrap();
        assert_eq!(s.quarantined.len(), 1, "{extra}: {:?}", s.quarantined);
        let q = &s.quarantined[0];
        let text = format!("{} {}", q.entry, q.reason);
        if leaked(&text, &secret, &digest).is_some() {
            leaks.push(format!("{extra}: {text}"));
        }
    }
    let partner = json!({"id": "partner_x", "status": secret});
    let s = parse(&doc(1, vec![acme(), partner], vec![]), None).unwrap();
    let text = format!("{:?}", s.quarantined);
    if leaked(&text, &secret, &digest).is_some() {
        leaks.push(format!("partner status: {text}"));
    }
    assert!(leaks.is_empty(), "leaks:\n{}", leaks.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// Lookup

#[test]
fn find_by_sha256_and_hmac() {
    let plain = mint("sk_live_");
    let peppered = mint("sk_live_");
    let absent = mint("sk_live_");
    let bytes = doc(
        1,
        vec![acme()],
        vec![
            key("key_plain", &sha256(&plain), json!({})),
            key(
                "key_peppered",
                &hmac_sha256(b"right pepper", &peppered),
                json!({}),
            ),
        ],
    );

    let right = parse(&bytes, pepper("right pepper")).unwrap();
    assert!(right.quarantined.is_empty(), "{:?}", right.quarantined);
    let wrong = parse(&bytes, pepper("wrong pepper")).unwrap();
    let none = parse(&bytes, None).unwrap();
    assert_eq!(
        entries(&none)
            .iter()
            .map(|(e, _)| e.as_str())
            .collect::<Vec<_>>(),
        ["key key_peppered"]
    );

    let id = |s: &Snapshot, k: &str| s.find(k).map(|r| r.id().to_string());
    let table: &[(&str, &Snapshot, &str, Option<&str>)] = &[
        ("sha256 hit", &right, &plain, Some("key_plain")),
        ("sha256 hit, no pepper", &none, &plain, Some("key_plain")),
        ("sha256 miss", &right, &absent, None),
        (
            "hmac hit, right pepper",
            &right,
            &peppered,
            Some("key_peppered"),
        ),
        ("hmac miss, wrong pepper", &wrong, &peppered, None),
        (
            "sha256 still found, wrong pepper",
            &wrong,
            &plain,
            Some("key_plain"),
        ),
        ("hmac miss, no pepper", &none, &peppered, None),
        ("hmac miss, absent key", &right, &absent, None),
        ("empty key", &right, "", None),
        (
            "key with a trailing space",
            &right,
            &format!("{plain} "),
            None,
        ),
    ];
    for (name, snapshot, presented, want) in table {
        assert_eq!(id(snapshot, presented).as_deref(), *want, "{name}");
    }
    // The digest a record is stored under is not itself a key.
    assert_eq!(id(&right, &sha256(&plain)), None);
    assert_eq!(id(&right, &sha256(&plain)["sha256:".len()..]), None);
}

/// An allow-list that names one route twice, however spelled, means the same as naming it once:
/// the key stays usable.
#[test]
fn repeated_allowed_routes_are_merged() {
    let secret = mint("sk_live_");
    for routes in [
        json!(["GET /v1/a", "GET /v1/a"]),
        json!(["GET /v1/a", "GET /v1/a/"]),
        json!(["GET /v1/a", "GET //v1/./a", "GET /v1/b/../a"]),
        json!(["* /v1/**", "GET /v1/a", "* /v1/x/../**"]),
    ] {
        let record = key("key_1", &sha256(&secret), json!({"allowed_routes": routes}));
        let s = parse(&doc(1, vec![acme()], vec![record]), None).unwrap();
        assert!(s.quarantined.is_empty(), "{routes}: {:?}", s.quarantined);
        let k = s.find(&secret).unwrap();
        let table = k.allowed_routes().unwrap();
        assert!(table.matches("GET", "/v1/a"), "{routes}");
        assert!(!table.matches("GET", "/v2/a"), "{routes}");
    }
    // Different methods on one path are different routes.
    let record = key(
        "key_1",
        &sha256(&secret),
        json!({"allowed_routes": ["GET /v1/a", "POST /v1/a"]}),
    );
    let s = parse(&doc(1, vec![acme()], vec![record]), None).unwrap();
    assert_eq!(s.find(&secret).unwrap().allowed_routes().unwrap().len(), 2);
}

#[test]
fn unknown_fields_are_ignored() {
    let secret = mint("sk_live_");
    let text = json!({
        "schema": "keygate.snapshot/v1",
        "revision": 9,
        "generated_at": "2026-11-22T06:00:00Z",
        "x_future": {"nested": [1, 2]},
        "partners": [
            {"id": "partner_acme", "status": "active", "tier": "gold", "x": null}
        ],
        "keys": [
            {
                "id": "key_1", "name": "Production", "prefix": "sk_live_4Fq9",
                "hash": sha256(&secret), "partner_id": "partner_acme", "environment": "live",
                "scopes": ["analyses:write", "analyses:read", "analyses:read"],
                "status": "active", "created_at": "2026-01-15T10:30:00Z",
                "last_used_at": "2026-11-21T00:00:00Z", "metadata": {"team": "x"},
                "expires_at": null, "rate_limit_per_minute": 1000,
                "allowed_cidrs": ["203.0.113.9"], "allowed_referrers": [], "allowed_routes": []
            }
        ]
    })
    .to_string();
    let s = parse(text.as_bytes(), None).unwrap();
    assert!(s.quarantined.is_empty(), "{:?}", s.quarantined);
    assert_eq!(s.revision, 9);
    assert_eq!(s.generated_at.as_deref(), Some("2026-11-22T06:00:00Z"));
    let k = s.find(&secret).expect("the key is in force");
    assert_eq!(k.id(), "key_1");
    assert_eq!(k.id_header, "key_1");
    assert_eq!(s.key_name(k), Some("Production"));
    assert_eq!(
        s.scopes(k).iter().collect::<Vec<_>>(),
        ["analyses:read", "analyses:write"],
        "sorted and deduplicated"
    );
    assert_eq!(s.scopes(k).header, "analyses:read analyses:write");
    assert_eq!(&*s.environment(k).name, "live");
    assert_eq!(s.environment(k).header, "live");
    assert_eq!(k.rate_limit_per_minute(), Some(1000));
    assert_eq!(k.expires_at_ms(), None);
    let restrictions = k.restrictions().expect("allowed_cidrs restricts");
    assert_eq!(restrictions.cidrs.len(), 1, "a bare address is a /32");
    assert!(k.allows_ip(Some("203.0.113.9".parse().unwrap())));
    assert!(!k.allows_ip(Some("203.0.113.10".parse().unwrap())));
    assert!(restrictions.referrers.is_empty());
    assert!(
        k.allowed_routes().is_none(),
        "an empty list means no restriction"
    );
    assert_eq!(s.partner(k).org_id, None);
    assert_eq!(s.partner(k).org_header, None);
}

// ---------------------------------------------------------------------------------------------
// The compact index

/// What keys share is stored once: the same scopes (in any order, repeated or not) are one
/// scope set with one header value, and one environment is one entry.
#[test]
fn keys_share_scope_sets_and_environments() {
    let (a, b, c) = (mint("sk_live_"), mint("sk_live_"), mint("sk_test_"));
    let bytes = doc(
        1,
        vec![acme()],
        vec![
            key(
                "key_a",
                &sha256(&a),
                json!({"scopes": ["x:write", "x:read"]}),
            ),
            key(
                "key_b",
                &sha256(&b),
                json!({"scopes": ["x:read", "x:write", "x:read"]}),
            ),
            key(
                "key_c",
                &sha256(&c),
                json!({"scopes": ["x:read"], "environment": "test"}),
            ),
        ],
    );
    let s = parse(&bytes, None).unwrap();
    assert!(s.quarantined.is_empty(), "{:?}", s.quarantined);
    let (a, b, c) = (
        s.find(&a).unwrap(),
        s.find(&b).unwrap(),
        s.find(&c).unwrap(),
    );
    assert!(std::ptr::eq(s.scopes(a), s.scopes(b)));
    assert_eq!(s.scopes(a).header, "x:read x:write");
    assert!(s.scopes(a).contains("x:write") && !s.scopes(a).contains("x:"));
    assert_eq!(s.scopes(c).header, "x:read");
    assert_eq!(s.scope_sets.len(), 2);
    assert!(std::ptr::eq(s.environment(a), s.environment(b)));
    assert_eq!(&*s.environment(c).name, "test");
    assert_eq!(s.environments.len(), 2);
    // No name, no restriction, no expiry, no rate limit: nothing stored for them.
    assert_eq!(s.key_name(a), None);
    assert!(a.restrictions().is_none());
    assert!(a.allows_ip(None));
    assert!(a.allows_referrer(None, None));
    assert_eq!((a.expires_at_ms(), a.rate_limit_per_minute()), (None, None));
    assert!(!a.is_expired(i64::MAX - 1));
}

#[test]
fn an_expiry_is_kept_to_the_millisecond() {
    let secret = mint("sk_live_");
    let record = key(
        "key_1",
        &sha256(&secret),
        json!({"expires_at": "2027-01-31T00:00:00.250Z"}),
    );
    let s = parse(&doc(1, vec![acme()], vec![record]), None).unwrap();
    let k = s.find(&secret).unwrap();
    let at = 1_801_353_600_250;
    assert_eq!(k.expires_at_ms(), Some(at));
    assert!(!k.is_expired(at - 1));
    assert!(k.is_expired(at));
}

/// Strings with JSON escapes are read as what they stand for, like any other.
#[test]
fn escaped_strings_are_unescaped() {
    let secret = mint("sk_live_");
    let text = format!(
        r#"{{"schema": "keygate.snapshot/v1", "revision": 1,
            "partners": [{{"id": "partner_acme", "status": "active"}}],
            "keys": [{{"id": "key\u005f1", "name": "caf\u00e9 \"one\"", "hash": "{}",
                       "partner_id": "partner\u005facme", "environment": "l\u0069ve",
                       "scopes": ["x:r\u0065ad"], "status": "act\u0069ve",
                       "allowed_cidrs": ["10.0.0.0\/8"]}}]}}"#,
        sha256(&secret)
    );
    let s = parse(text.as_bytes(), None).unwrap();
    assert!(s.quarantined.is_empty(), "{:?}", s.quarantined);
    let k = s.find(&secret).unwrap();
    assert_eq!(k.id(), "key_1");
    assert_eq!(s.key_name(k), Some("café \"one\""));
    assert_eq!(&*s.environment(k).name, "live");
    assert_eq!(s.scopes(k).header, "x:read");
    assert!(k.allows_ip(Some("10.1.2.3".parse().unwrap())));
}

/// Duplicate ids are found whatever the spelling of the id in the document, and duplicate
/// digests whatever the digest kind: every entry involved is ambiguous.
#[test]
fn duplicates_are_found_across_spellings_and_digest_kinds() {
    let secret = mint("sk_live_");
    let peppered = mint("sk_live_");
    let mac = hmac_sha256(b"pepper", &peppered);
    let same_bytes = format!("sha256:{}", &mac["hmac-sha256:".len()..]);
    let text = String::from_utf8(doc(
        1,
        vec![acme()],
        vec![
            key("key_1", &sha256(&secret), json!({})),
            key("key_ESCAPED", &sha256("another key"), json!({})),
            key("key_mac", &mac, json!({})),
            key("key_plain", &same_bytes, json!({})),
            key("key_ok", &sha256("a third key"), json!({})),
        ],
    ))
    .unwrap()
    .replace("key_ESCAPED", "key\\u005f1");
    let s = parse(text.as_bytes(), pepper("pepper")).unwrap();
    assert_eq!(
        entries(&s)
            .iter()
            .map(|(e, r)| format!("{e}: {r}"))
            .collect::<Vec<_>>(),
        [
            "key key_1: the key id appears more than once",
            "key key_1: the key id appears more than once",
            "key key_mac: another entry has the same digest",
            "key key_plain: another entry has the same digest",
        ]
    );
    assert_eq!(s.key_count(), 1);
    assert!(s.find(&secret).is_none() && s.find(&peppered).is_none());
    assert_eq!(s.find("a third key").map(KeyRecord::id), Some("key_ok"));
}

/// A million keys multiply this: a record has no heap allocation of its own, and stays small.
#[cfg(target_pointer_width = "64")]
#[test]
fn a_key_record_stays_small() {
    assert!(
        std::mem::size_of::<KeyRecord>() <= 120,
        "KeyRecord is {} bytes",
        std::mem::size_of::<KeyRecord>()
    );
}

// ---------------------------------------------------------------------------------------------
// Reading a document entry by entry

/// A reader that hands out a few bytes at a time, so every state of the reader's scan meets a
/// block boundary: inside a string, after a backslash, between entries, inside the envelope.
struct Trickle<'a> {
    bytes: &'a [u8],
    step: usize,
}

impl std::io::Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.step = self.step % 7 + 1;
        let n = self.step.min(buf.len()).min(self.bytes.len());
        buf[..n].copy_from_slice(&self.bytes[..n]);
        self.bytes = &self.bytes[n..];
        Ok(n)
    }
}

fn read_in_pieces(bytes: &[u8], pepper: Option<Arc<[u8]>>) -> Result<Snapshot, DocumentError> {
    parse::parse_reader(Trickle { bytes, step: 0 }, pepper, None, bytes.len() as u64).map_err(|e| {
        match e {
            parse::ReadError::Document(d) => d,
            parse::ReadError::Io(e) => panic!("{e}"),
        }
    })
}

/// What a test compares of two snapshots: revision, quarantine list, and who each key is.
fn summary(s: &Snapshot, secrets: &[&str]) -> (u64, Vec<(String, String)>, Vec<Option<String>>) {
    let found = secrets
        .iter()
        .map(|k| s.find(k).map(|r| format!("{} {}", r.id(), s.partner(r).id)))
        .collect();
    (s.revision, entries(s), found)
}

/// JSON objects may list their members in any order: keys before the partners they name are
/// read the same, with the same reasons for the same entries.
#[test]
fn keys_may_come_before_partners() {
    let (a, b, c, d) = (
        mint("sk_live_"),
        mint("sk_live_"),
        mint("sk_live_"),
        mint("sk_live_"),
    );
    let keys = json!([
        key("key_a", &sha256(&a), json!({})),
        key("key_b", &sha256(&b), json!({"partner_id": "partner_dup"})),
        // Two problems: the partner's, checked first, is the reason given.
        key(
            "key_c",
            &sha256(&c),
            json!({"partner_id": "partner_nope", "status": "x"})
        ),
        key(
            "key_d",
            &sha256(&d),
            json!({"partner_id": "partner_late", "status": "x"})
        ),
    ]);
    let partners = json!([
        acme(),
        {"id": "partner_dup", "status": "active"},
        {"id": "partner_dup", "status": "active"},
        {"id": "partner_late", "status": "active"},
    ]);
    let envelope = r#""schema": "keygate.snapshot/v1", "revision": 4"#;
    let keys_first = format!(r#"{{{envelope}, "keys": {keys}, "partners": {partners}}}"#);
    let partners_first = format!(r#"{{"partners": {partners}, {envelope}, "keys": {keys}}}"#);
    let secrets = [a.as_str(), &b, &c, &d];
    let want = (
        4,
        vec![
            (
                "key key_b".to_owned(),
                "partner partner_dup is ambiguous".to_owned(),
            ),
            (
                "key key_c".to_owned(),
                "partner_id names no partner entry".to_owned(),
            ),
            (
                "key key_d".to_owned(),
                "status must be \"active\" or \"revoked\"".to_owned(),
            ),
            (
                "partner partner_dup".to_owned(),
                "the partner id appears more than once".to_owned(),
            ),
        ],
        vec![Some("key_a partner_acme".to_owned()), None, None, None],
    );
    for text in [&keys_first, &partners_first] {
        let s = parse(text.as_bytes(), None).unwrap();
        assert_eq!(summary(&s, &secrets), want, "{text}");
        let s = read_in_pieces(text.as_bytes(), None).unwrap();
        assert_eq!(summary(&s, &secrets), want, "in pieces: {text}");
    }
}

/// Text that looks like structure inside strings, escapes, nesting inside entries and unknown
/// members: read from bytes, from a reader in pieces, and by serde whole, all the same.
#[test]
fn a_document_read_in_pieces_is_read_the_same() {
    let (a, b) = (mint("sk_live_"), mint("sk_live_"));
    let text = format!(
        r#" {{ "x_before": {{"keys": [1, {{"partners": "]"}}], "s": "\"[{{,"}},
            "keys" : [ {{"id": "key_\u0061", "name": "a \\\" ] }} , [ {{", "hash": "{}",
                      "partner_id": "partner_acme", "environment": "live", "scopes": [],
                      "status": "active", "metadata": {{"deep": [[[{{}}]]], "n": -1.5e3}}}} ,
                    "not an object" , 42 , null ,
                    {{"id": "key_b", "hash": "{}", "partner_id": "partner_acme",
                      "environment": "live", "status": "revoked"}} ],
            "partners": [{{"id": "partner_acme", "status": "active", "x": "\\"}}],
            "k\u0065ys_not": [ "ignored" ],
            "schema": "keygate.snapshot/v1", "revision": 12 }}
        "#,
        sha256(&a),
        sha256(&b)
    );
    let whole = parse(text.as_bytes(), None).unwrap();
    let pieces = read_in_pieces(text.as_bytes(), None).unwrap();
    let secrets = [a.as_str(), &b];
    assert_eq!(summary(&whole, &secrets), summary(&pieces, &secrets));
    assert_eq!(whole.find(&a).unwrap().id(), "key_a");
    assert_eq!(
        whole.key_name(whole.find(&a).unwrap()),
        Some("a \\\" ] } , [ {")
    );
    assert_eq!(whole.find(&b).unwrap().status, KeyStatus::Revoked);
    assert_eq!(
        entries(&whole)
            .iter()
            .map(|(e, _)| e.as_str())
            .collect::<Vec<_>>(),
        ["keys[1]", "keys[2]", "keys[3]"]
    );
    // The same entries, as serde reads the document whole.
    let raw: parse::RawDocument<'_> = serde_json::from_str(&text).unwrap();
    let built = build(12, None, &raw.partners, &raw.keys, None);
    assert_eq!(summary(&built, &secrets), summary(&whole, &secrets));
}

/// A document cut short anywhere, in its envelope or in the middle of an entry, is refused,
/// read whole or in pieces.
#[test]
fn a_document_cut_short_anywhere_is_refused() {
    let text = String::from_utf8(doc(
        2,
        vec![acme()],
        vec![
            key(
                "key_1",
                &sha256("one"),
                json!({"allowed_cidrs": ["10.0.0.0/8"]}),
            ),
            key(
                "key_2",
                &sha256("two"),
                json!({"name": "a \"quoted\" name"}),
            ),
        ],
    ))
    .unwrap();
    for cut in 0..text.len() {
        let short = &text.as_bytes()[..cut];
        assert!(parse(short, None).is_err(), "accepted cut at {cut}");
        assert!(
            read_in_pieces(short, None).is_err(),
            "accepted in pieces, cut at {cut}"
        );
    }
    assert!(read_in_pieces(text.as_bytes(), None).is_ok());
}

#[test]
fn a_read_error_is_not_a_document_error() {
    struct Failing;
    impl std::io::Read for Failing {
        fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
            Err(std::io::Error::other("disk on fire"))
        }
    }
    assert!(matches!(
        parse::parse_reader(Failing, None, None, 0),
        Err(parse::ReadError::Io(_))
    ));
}

mod split_property {
    use proptest::prelude::*;

    use super::*;

    /// A small document with what a reader of structure could stumble on.
    fn base() -> String {
        String::from_utf8(doc(
            3,
            vec![acme(), json!({"id": "p\\\"]", "status": "active"})],
            vec![
                key("key_1", &sha256("one"), json!({"name": "[{\"}],"})),
                key("key_2", &sha256("two"), json!({"partner_id": "partner_x"})),
                json!({"id": "key_3", "x": [[{"y": null}], true, -0.5]}),
            ],
        ))
        .unwrap()
    }

    /// Today's rule, serde reading the document whole: accepted or not, and then the same
    /// entries indexed.
    fn whole(bytes: &[u8]) -> Option<Snapshot> {
        let raw: parse::RawDocument<'_> = serde_json::from_slice(bytes).ok()?;
        std::str::from_utf8(bytes).ok()?;
        (raw.schema.as_deref() == Some(parse::SCHEMA))
            .then(|| build(raw.revision, None, &raw.partners, &raw.keys, None))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// Any edit of a document — a byte dropped, or one of JSON's structural bytes (or a
        /// byte that is not UTF-8) put anywhere — is accepted by the entry-by-entry read
        /// exactly when serde accepts the whole document, with the same result.
        #[test]
        fn the_entry_by_entry_read_agrees_with_serde(
            at in 0.0f64..1.0,
            edit in 0usize..13,
        ) {
            let mut bytes = base().into_bytes();
            let at = (at * bytes.len() as f64) as usize;
            let inserted = b"[]{},:\"\\ 0n\xff";
            match edit {
                12 => { bytes.remove(at.min(bytes.len() - 1)); }
                i => bytes.insert(at, inserted[i]),
            }
            let want = whole(&bytes).map(|s| summary(&s, &["one", "two"]));
            let got = parse(&bytes, None).ok().map(|s| summary(&s, &["one", "two"]));
            prop_assert_eq!(&got, &want, "{}", String::from_utf8_lossy(&bytes));
            let pieces = read_in_pieces(&bytes, None).ok().map(|s| summary(&s, &["one", "two"]));
            prop_assert_eq!(&pieces, &want);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A reload shares the keys that did not change

const MANY: usize = 20_000;

/// `MANY` keys (`k0`, `k1`, … are their secrets), of two partners; `edit` may change any.
fn many(revision: u64, edit: impl Fn(usize, &mut Value)) -> Vec<u8> {
    let keys = (0..MANY)
        .map(|i| {
            let mut k = key(
                &format!("key_{i}"),
                &sha256(&format!("k{i}")),
                json!({"name": format!("name {}", i % 7), "rate_limit_per_minute": 60}),
            );
            edit(i, &mut k);
            k
        })
        .filter(|k| !k.is_null())
        .collect();
    let partner_b = json!({"id": "partner_b", "status": "active"});
    doc(revision, vec![acme(), partner_b], keys)
}

/// What a decision or an identity header can see of key `secret` in `s`.
fn seen(s: &Snapshot, secret: &str) -> Option<String> {
    let r = s.find(secret)?;
    Some(format!(
        "{} {:?} {:?} {:?} {} {:?} {} {} {:?}",
        r.id(),
        r.status,
        r.rate_limit_per_minute(),
        r.expires_at_ms(),
        s.partner(r).id,
        s.partner(r).status,
        s.environment(r).header.to_str().unwrap(),
        s.scopes(r).header.to_str().unwrap(),
        s.key_name(r),
    ))
}

/// The chunks of `new` that are `old`'s own, and how many there are.
fn shared_chunks(old: &Snapshot, new: &Snapshot) -> (usize, usize) {
    let shared = old
        .chunks
        .iter()
        .zip(new.chunks.iter())
        .filter(|(a, b)| Arc::ptr_eq(a, b))
        .count();
    (shared, new.chunks.len())
}

fn chunk_holding(s: &Snapshot, secret: &str) -> usize {
    let digest: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
    chunk::chunk_of(index::digest_hash(&digest), s.chunk_bits)
}

#[test]
fn digests_that_begin_alike_are_spread_like_any_others() {
    // A fixture's digests, or a crafted document's: all alike but the last two bytes. Filed by
    // their first bytes they would make one probe chain of 20,000 in one chunk, and share one
    // rate-limit bucket.
    let digest = |i: usize| {
        let mut d = [0u8; 32];
        d[30..].copy_from_slice(&(i as u16).to_be_bytes());
        d
    };
    let keys = (0..MANY)
        .map(|i| {
            key(
                &format!("key_{i}"),
                &format!("sha256:{}", hex::encode(digest(i))),
                json!({}),
            )
        })
        .collect();
    let s = parse(&doc(1, vec![acme()], keys), None).unwrap();
    assert_eq!((s.key_count(), s.quarantined.len()), (MANY, 0));
    for i in 0..MANY {
        let r = s
            .probe(DigestKind::Sha256, &digest(i))
            .expect("every key is found");
        assert_eq!(r.id(), format!("key_{i}"));
    }
    assert_eq!(
        s.probe(DigestKind::Sha256, &digest(MANY)).map(|r| r.id()),
        None
    );
    // Spread over the chunks (MANY keys make dozens of test-sized ones)...
    let used = s.chunks.iter().filter(|c| !c.records.is_empty()).count();
    assert!(s.chunks.len() >= 32, "{} chunks", s.chunks.len());
    assert_eq!(used, s.chunks.len(), "every chunk holds some of the keys");
    // ...and filed within each as evenly as random digests would be: an unknown key's lookup
    // walks ~3 slots on average (the chunks are ~1/3 free), where keys filed by their first
    // bytes make it ~100 (one chain in each chunk) or thousands (one chain in all). (The mean, not the longest run: the longest depends on the
    // process's hash key, and at a chunk's fullest load a run of 100 happens by chance.)
    let (walked, slots) = s
        .chunks
        .iter()
        .map(|c| c.by_sha256.unknown_lookup_cost())
        .fold((0, 0), |(w, n), (cw, cn)| (w + cw, n + cn));
    let mean = walked as f64 / slots as f64;
    assert!(
        mean < 20.0,
        "an unknown key's lookup walks {mean:.1} slots on average"
    );
    // And every key has rate-limit and usage state of its own.
    let mut state: Vec<u64> = s
        .chunks
        .iter()
        .flat_map(|c| c.records.iter())
        .map(|r| r.state_key())
        .collect();
    state.sort_unstable();
    state.dedup();
    assert_eq!(state.len(), MANY);
}

#[test]
fn a_reload_shares_unchanged_keys_and_sees_every_change() {
    let old = parse(&many(1, |_, _| {}), None).unwrap();
    assert!(old.chunks.len() >= 32, "{} chunks", old.chunks.len());
    let changed = [1, 2, 3, 4, 5, 6, 7];
    let edited = many(2, |i, k| match i {
        1 => k["status"] = json!("revoked"),
        2 => k["rate_limit_per_minute"] = json!(1200),
        3 => *k = Value::Null, // removed
        4 => k["name"] = json!("renamed"),
        5 => k["partner_id"] = json!("partner_b"),
        6 => k["scopes"] = json!(["analyses:write"]),
        7 => k["allowed_cidrs"] = json!(["10.0.0.0/8"]),
        _ => {}
    });
    // And one key added (at the front: the order of entries does not matter).
    let mut text = String::from_utf8(edited).unwrap();
    let added = key("key_new", &sha256("k_new"), json!({}));
    text = text.replacen(r#""keys":["#, &format!(r#""keys":[{added},"#), 1);
    let new = parse_with_base(text.as_bytes(), None, Some(&old)).unwrap();
    let fresh = parse(text.as_bytes(), None).unwrap();
    assert!(new.quarantined.is_empty(), "{:?}", new.quarantined);
    assert_eq!(new.key_count(), MANY);

    // Every key reads as it does in a snapshot built from nothing, the changed ones included.
    let secrets: Vec<String> = (0..MANY)
        .map(|i| format!("k{i}"))
        .chain(["k_new".to_owned()])
        .collect();
    for secret in &secrets {
        assert_eq!(seen(&new, secret), seen(&fresh, secret), "{secret}");
    }
    let field = |s: &Snapshot, secret: &str| seen(s, secret).unwrap();
    assert_eq!(new.find("k1").unwrap().status, KeyStatus::Revoked);
    assert_eq!(new.find("k2").unwrap().rate_limit_per_minute(), Some(1200));
    assert!(new.find("k3").is_none());
    assert_eq!(new.key_name(new.find("k4").unwrap()), Some("renamed"));
    assert!(field(&new, "k5").contains("partner_b"));
    assert_eq!(new.scopes(new.find("k6").unwrap()).header, "analyses:write");
    assert!(!new
        .find("k7")
        .unwrap()
        .allows_ip(Some([192, 0, 2, 1].into())));
    assert!(new.find("k_new").is_some());
    // The snapshot in force while the reload was built is untouched.
    assert_eq!(old.find("k1").unwrap().status, KeyStatus::Active);
    assert_eq!(old.find("k2").unwrap().rate_limit_per_minute(), Some(60));
    assert!(old.find("k3").is_some() && old.find("k_new").is_none());

    // Only the chunks of changed keys are new; the others are the old snapshot's own.
    let mut touched: Vec<usize> = changed
        .iter()
        .map(|i| chunk_holding(&new, &format!("k{i}")))
        .chain([chunk_holding(&new, "k_new")])
        .collect();
    touched.sort_unstable();
    touched.dedup();
    for &c in &touched {
        assert!(!Arc::ptr_eq(&old.chunks[c], &new.chunks[c]), "chunk {c}");
    }
    let (shared, all) = shared_chunks(&old, &new);
    assert_eq!(
        shared,
        all - touched.len(),
        "{shared} of {all} chunks shared"
    );
    let unchanged = chunk_holding(&new, "k0");
    if !touched.contains(&unchanged) {
        assert!(std::ptr::eq(
            old.find("k0").unwrap(),
            new.find("k0").unwrap()
        ));
    }

    // A partner's status changes no key record: every chunk is shared, and every key of that
    // partner sees the new status.
    let suspended = text.replacen(
        r#"{"id":"partner_b","status":"active"}"#,
        r#"{"id":"partner_b","status":"suspended"}"#,
        1,
    );
    assert_ne!(suspended, text);
    let next = parse_with_base(suspended.as_bytes(), None, Some(&new)).unwrap();
    assert_eq!(shared_chunks(&new, &next), (all, all));
    assert_eq!(
        next.partner(next.find("k5").unwrap()).status,
        PartnerStatus::Suspended
    );
    assert_eq!(
        new.partner(new.find("k5").unwrap()).status,
        PartnerStatus::Active
    );
}

/// Sharing never lets an old record escape what makes it ambiguous or orphaned in the new
/// document: a new entry with an unchanged key's digest or id, or its partner gone.
#[test]
fn a_reload_quarantines_unchanged_keys_it_must() {
    let old = parse(&many(1, |_, _| {}), None).unwrap();
    // And the entries taken from the old snapshot by their unchanged text (`snapshot::memo`),
    // which go through the same checks as those read.
    let cases: Vec<(&str, Vec<u8>, &[&str], usize)> = vec![
        (
            "another entry with k10's digest",
            many(2, |i, k| {
                if i == 11 {
                    k["hash"] = json!(sha256("k10"));
                }
            }),
            &["key key_10", "key key_11"],
            MANY - 1,
        ),
        (
            "another entry with key_20's id, in another chunk",
            many(2, |i, k| {
                if i == 21 {
                    k["id"] = json!("key_20");
                }
            }),
            &["key key_20", "key key_20"],
            MANY - 1,
        ),
        (
            "two other entries with key_40's id",
            many(2, |i, k| {
                if i == 41 || i == 42 {
                    k["id"] = json!("key_40");
                }
            }),
            &["key key_40", "key key_40", "key key_40"],
            MANY - 2,
        ),
        (
            "partner_acme gone",
            String::from_utf8(many(2, |i, k| {
                if i > 0 {
                    k["partner_id"] = json!("partner_b");
                }
            }))
            .unwrap()
            .replacen(
                r#"{"id":"partner_acme","org_id":"org_1","status":"active"},"#,
                "",
                1,
            )
            .into_bytes(),
            &["key key_0"],
            1,
        ),
        (
            "the same entry twice",
            String::from_utf8(many(2, |_, _| {}))
                .unwrap()
                .replacen(
                    r#""keys":["#,
                    &format!(
                        r#""keys":[{},"#,
                        key(
                            "key_30",
                            &sha256("k30"),
                            json!({"name": "name 2", "rate_limit_per_minute": 60})
                        )
                    ),
                    1,
                )
                .into_bytes(),
            &["key key_30", "key key_30"],
            MANY + 1,
        ),
    ];
    for (name, text, want, recalled) in cases {
        let new = parse_with_base(&text, None, Some(&old)).unwrap();
        let fresh = parse(&text, None).unwrap();
        assert_eq!(new.recalled_entries(), recalled, "{name}");
        let got: Vec<&str> = new.quarantined.iter().map(|q| q.entry.as_str()).collect();
        assert_eq!(got, want, "{name}: {:?}", new.quarantined);
        assert_eq!(new.quarantined, fresh.quarantined, "{name}");
        assert_eq!(new.key_count(), fresh.key_count(), "{name}");
        for i in [0, 10, 11, 20, 21, 30, 31, 40, 41, 42] {
            let secret = format!("k{i}");
            assert_eq!(
                seen(&new, &secret),
                seen(&fresh, &secret),
                "{name}: {secret}"
            );
        }
    }
}

/// The text of the key entry with this id in `text` (a document as `doc` writes it), replaced
/// by what `edit` makes of it.
fn edit_entry(text: &str, id: &str, edit: impl Fn(&str) -> String) -> String {
    let at = text.find(&format!(r#""id":"{id}","#)).expect("the id");
    let start = text[..at].rfind('{').unwrap();
    let end = at + text[at..].find('}').unwrap() + 1;
    format!(
        "{}{}{}",
        &text[..start],
        edit(&text[start..end]),
        &text[end..]
    )
}

/// The keys of `many` (the first ones, which the tests change, and every 50th) read in `new` as
/// in `fresh`, a snapshot of the same document built from nothing, and the same entries are
/// quarantined for the same reasons.
fn assert_same_keys(new: &Snapshot, fresh: &Snapshot, what: &str) {
    assert_eq!(entries(new), entries(fresh), "{what}");
    assert_eq!(new.key_count(), fresh.key_count(), "{what}");
    for i in (0..MANY).filter(|i| *i < 50 || i % 50 == 0) {
        let secret = format!("k{i}");
        assert_eq!(seen(new, &secret), seen(fresh, &secret), "{what}: {secret}");
    }
}

/// A reload takes each entry whose text is, byte for byte, that of an entry the snapshot in
/// force was built from, without reading it again (`snapshot::memo`): in any order, with every
/// chunk shared and every key as a snapshot of the document built from nothing has it.
#[test]
fn a_reload_takes_entries_whose_text_did_not_change() {
    let old = parse(&many(1, |_, _| {}), None).unwrap();
    assert_eq!(old.recalled_entries(), 0);
    let all = old.chunks.len();
    let same = many(2, |_, _| {});
    let new = parse_with_base(&same, None, Some(&old)).unwrap();
    assert_eq!(new.recalled_entries(), MANY);
    assert_eq!(shared_chunks(&old, &new), (all, all));
    assert_same_keys(&new, &parse(&same, None).unwrap(), "unchanged");

    // The entries in the reverse order: found by their fingerprint, not their place.
    let mut reversed: Value = serde_json::from_slice(&same).unwrap();
    reversed["keys"].as_array_mut().unwrap().reverse();
    let reversed = reversed.to_string().into_bytes();
    let next = parse_with_base(&reversed, None, Some(&new)).unwrap();
    assert_eq!(next.recalled_entries(), MANY);
    assert_eq!(shared_chunks(&new, &next), (all, all));
    assert_same_keys(&next, &parse(&reversed, None).unwrap(), "reversed");
}

/// An entry that differs from the one in force in a single byte is read again: whatever the
/// byte changes is seen, and the other entries are still taken as they were.
#[test]
fn an_entry_changed_in_one_byte_is_read_again() {
    let old = parse(&many(1, |_, _| {}), None).unwrap();
    let text = String::from_utf8(many(2, |_, _| {})).unwrap();
    let one_byte = |from: &'static str, to: &'static str| {
        assert_eq!(from.len(), to.len());
        move |entry: &str| {
            assert_eq!(entry.matches(from).count(), 1, "{from} in {entry}");
            entry.replacen(from, to, 1)
        }
    };
    let hash_5 = sha256("k5");
    let last = &hash_5[hash_5.len() - 1..];
    let other = if last == "0" { "1" } else { "0" };
    let changed_hash = format!("{}{other}", &hash_5[..hash_5.len() - 1]);
    let cases: Vec<(&str, String)> = vec![
        (
            "a rate limit",
            edit_entry(&text, "key_1", one_byte(":60,", ":61,")),
        ),
        (
            "a name",
            edit_entry(&text, "key_2", one_byte("name 2", "name 3")),
        ),
        (
            "a status that is not one",
            edit_entry(&text, "key_3", one_byte("\"active\"", "\"activf\"")),
        ),
        (
            "an id, now another key's",
            edit_entry(&text, "key_4", one_byte("\"key_4\"", "\"key_7\"")),
        ),
        (
            "a digest",
            edit_entry(&text, "key_5", |e| e.replacen(&hash_5, &changed_hash, 1)),
        ),
        (
            "a partner, now one without an entry",
            edit_entry(&text, "key_6", one_byte("partner_acme", "partner_acmf")),
        ),
    ];
    for (what, edited) in cases {
        assert_eq!(edited.len(), text.len(), "{what}");
        let new = parse_with_base(edited.as_bytes(), None, Some(&old)).unwrap();
        assert_eq!(new.recalled_entries(), MANY - 1, "{what}");
        assert_same_keys(&new, &parse(edited.as_bytes(), None).unwrap(), what);
    }

    // A byte that changes no record (a space between members): read again, and found the
    // same, so its chunk is shared; the next reload takes it by its new text.
    let spaced = edit_entry(&text, "key_8", |e| e.replacen(",", ", ", 1));
    let new = parse_with_base(spaced.as_bytes(), None, Some(&old)).unwrap();
    assert_eq!(new.recalled_entries(), MANY - 1);
    assert_eq!(
        shared_chunks(&old, &new),
        (old.chunks.len(), old.chunks.len())
    );
    let next = parse_with_base(spaced.as_bytes(), None, Some(&new)).unwrap();
    assert_eq!(next.recalled_entries(), MANY);
}

/// A key revoked, restored and revoked again, each document read against the one before: every
/// reload sees the change, and takes the other entries as they were.
#[test]
fn a_key_revoked_and_restored_over_reloads_is_seen_each_time() {
    let mut in_force = parse(&many(1, |_, _| {}), None).unwrap();
    for (revision, revoked) in [(2, true), (3, false), (4, true), (5, true)] {
        let text = many(revision, |i, k| {
            if i == 9 && revoked {
                k["status"] = json!("revoked");
            }
        });
        let next = parse_with_base(&text, None, Some(&in_force)).unwrap();
        let status = next.find("k9").unwrap().status;
        assert_eq!(status == KeyStatus::Revoked, revoked, "revision {revision}");
        let unread = if revision == 5 { MANY } else { MANY - 1 };
        assert_eq!(next.recalled_entries(), unread, "revision {revision}");
        assert_same_keys(&next, &parse(&text, None).unwrap(), "a revocation");
        in_force = next;
    }
}

/// Without the pepper an HMAC digest was read under, the same text does not read the same (no
/// pepper quarantines it): a reload under another pepper, or none, reads every entry again.
#[test]
fn a_pepper_change_reads_every_entry_again() {
    let peppered = mint("sk_live_");
    let text = String::from_utf8(many(1, |_, _| {})).unwrap();
    let entry = key("key_hmac", &hmac_sha256(b"one", &peppered), json!({}));
    let text = text.replacen(r#""keys":["#, &format!(r#""keys":[{entry},"#), 1);
    let text = text.as_bytes();
    let old = parse(text, pepper("one")).unwrap();
    assert!(old.find(&peppered).is_some());
    for (what, other, unread) in [
        ("none", None, 0),
        ("another", pepper("two"), 0),
        ("the same", pepper("one"), MANY + 1),
    ] {
        let new = parse_with_base(text, other.clone(), Some(&old)).unwrap();
        let fresh = parse(text, other).unwrap();
        assert_eq!(new.recalled_entries(), unread, "{what}");
        assert_same_keys(&new, &fresh, what);
        assert_eq!(
            new.find(&peppered).map(|r| r.id().to_owned()),
            fresh.find(&peppered).map(|r| r.id().to_owned()),
            "{what}"
        );
    }
    let unpeppered = parse_with_base(text, None, Some(&old)).unwrap();
    assert_eq!(
        entries(&unpeppered),
        [(
            "key key_hmac".to_owned(),
            "hmac-sha256 digest, but no pepper is configured (snapshot.pepper_env)".to_owned()
        )]
    );
}

/// A store publishing documents one after the other shares their unchanged keys.
#[test]
fn publishing_json_shares_with_the_snapshot_in_force() {
    let store = SnapshotStore::new();
    store.publish_json(&many(1, |_, _| {}), None).unwrap();
    let first = store.current_arc().unwrap();
    let revoked = many(2, |i, k| {
        if i == 1 {
            k["status"] = json!("revoked")
        }
    });
    store.publish_json(&revoked, None).unwrap();
    let second = store.current_arc().unwrap();
    let (shared, all) = shared_chunks(&first, &second);
    assert_eq!(shared, all - 1);
    assert_eq!(second.find("k1").unwrap().status, KeyStatus::Revoked);
    assert_eq!(first.find("k1").unwrap().status, KeyStatus::Active);
}

// ---------------------------------------------------------------------------------------------
// Publishing

fn snapshot_with(revision: u64, bad_ids: &[&str]) -> Snapshot {
    let keys = bad_ids
        .iter()
        .map(|id| key(id, "sha256:nothex", json!({})))
        .collect();
    parse(&doc(revision, vec![acme()], keys), None).unwrap()
}

fn fresh_ids(q: Vec<Quarantined>) -> Vec<String> {
    q.into_iter().map(|q| q.entry).collect()
}

#[test]
fn publish_refuses_a_lower_revision() {
    let store = SnapshotStore::new();
    assert!(store.current().is_none());
    assert!(store.loaded_at().is_none());

    let table: &[(u64, Result<(), PublishError>, u64)] = &[
        (5, Ok(()), 5),
        (
            4,
            Err(PublishError::RevisionRegressed {
                offered: 4,
                current: 5,
            }),
            5,
        ),
        (5, Ok(()), 5),
        (6, Ok(()), 6),
        (
            0,
            Err(PublishError::RevisionRegressed {
                offered: 0,
                current: 6,
            }),
            6,
        ),
    ];
    for (offered, want, in_force) in table {
        let got = store.publish(snapshot_with(*offered, &[])).map(|_| ());
        assert_eq!(&got, want, "publish revision {offered}");
        let current = store.current_arc().expect("a snapshot is in force");
        assert_eq!(current.revision, *in_force, "after offering {offered}");
        assert!(store.loaded_at().is_some());
    }
}

#[test]
fn publish_returns_only_newly_quarantined_entries() {
    let store = SnapshotStore::new();
    let steps: &[(u64, &[&str], &[&str])] = &[
        (1, &["key_a"], &["key key_a"]),
        (2, &["key_a"], &[]),
        (2, &["key_a", "key_b"], &["key key_b"]),
        (3, &["key_b"], &[]),
        (4, &[], &[]),
        (5, &["key_a", "key_b"], &["key key_a", "key key_b"]),
    ];
    for (revision, bad, want) in steps {
        let fresh = store.publish(snapshot_with(*revision, bad)).unwrap();
        assert_eq!(fresh_ids(fresh), *want, "revision {revision} with {bad:?}");
    }
    // A refused publish changes nothing, not even what counts as already logged.
    assert!(store.publish(snapshot_with(1, &["key_c"])).is_err());
    let fresh = store
        .publish(snapshot_with(6, &["key_a", "key_c"]))
        .unwrap();
    assert_eq!(fresh_ids(fresh), ["key key_c"]);
}

#[test]
fn a_request_keeps_its_snapshot_across_a_swap() {
    let secret = mint("sk_live_");
    let store = SnapshotStore::new();
    let with_key = doc(
        1,
        vec![acme()],
        vec![key("key_1", &sha256(&secret), json!({}))],
    );
    store.publish(parse(&with_key, None).unwrap()).unwrap();
    let held = store.current_arc().unwrap();
    store
        .publish(parse(&doc(2, vec![acme()], vec![]), None).unwrap())
        .unwrap();
    assert!(held.find(&secret).is_some(), "the old revision is intact");
    assert_eq!(held.revision, 1);
    let now = store.current_arc().unwrap();
    assert_eq!(now.revision, 2);
    assert!(now.find(&secret).is_none());
}

#[test]
fn canonical_ip_unmaps_ipv4_mapped_addresses() {
    let cases = [
        ("::ffff:203.0.113.7", "203.0.113.7"),
        ("203.0.113.7", "203.0.113.7"),
        ("2001:db8::1", "2001:db8::1"),
        ("::1", "::1"),
        // IPv4-compatible (deprecated) addresses are not IPv4-mapped.
        ("::203.0.113.7", "::203.0.113.7"),
    ];
    for (input, want) in cases {
        let got = canonical_ip(input.parse().unwrap());
        assert_eq!(got, want.parse::<IpAddr>().unwrap(), "{input}");
    }
}

#[test]
fn deep_unknown_members_are_skipped_at_any_depth() {
    // A control plane's metadata nested deeper than serde's limit for typed values: skipped, as
    // serde skips it, in an entry and in the envelope alike.
    let deep = format!("{}1{}", "[".repeat(300), "]".repeat(300));
    let secret = mint("sk_live_");
    let mut k = key("key_deep", &sha256(&secret), json!({}));
    k["meta"] = serde_json::from_str(&deep).unwrap_or(Value::Null);
    let text = String::from_utf8(doc(1, vec![acme()], vec![k])).unwrap();
    let text = text.replacen("\"meta\":null", &format!("\"meta\":{deep}"), 1);
    let text = text.replacen('{', &format!("{{\"x-deep\":{deep},"), 1);
    assert!(text.contains(&deep), "the fixture holds the deep value");
    for s in [
        parse(text.as_bytes(), None).unwrap(),
        read_in_pieces(text.as_bytes(), None).unwrap(),
    ] {
        assert_eq!(s.find(&secret).map(|r| r.id()), Some("key_deep"));
    }
}

#[test]
fn a_document_that_is_not_utf8_anywhere_is_refused() {
    let secret = mint("sk_live_");
    let text = doc(
        1,
        vec![acme()],
        vec![key("key_1", &sha256(&secret), json!({}))],
    );
    // An unknown top-level member, which serde would skip without reading it as text.
    let mut bytes = b"{\"x-note\":\"caf\xff\",".to_vec();
    bytes.extend_from_slice(&text[1..]);
    for result in [parse(&bytes, None), read_in_pieces(&bytes, None)] {
        assert!(
            matches!(result, Err(DocumentError::Json(_))),
            "{:?}",
            result.map(|s| s.revision)
        );
    }
}
