//! `check` without a network: the mapping of every deny reason to a `CheckResponse`, a panic
//! turned into a denial, and the request fields Envoy may send in more than one shape
//! (`header_map` instead of `headers`, IPv4-mapped peers, forwarded-for chains, request ids).
//! Requests are serialized and answers decoded with prost, so [`wire`]'s reading and writing is
//! checked against prost's own; `wire.rs`'s own tests check the reading field by field.

use std::collections::HashMap;

use envoy_types::ext_authz::v3::pb::{
    CheckRequest, CheckResponse, HeaderAppendAction, HeaderValueOption, HttpResponse,
};
use envoy_types::pb::envoy::config::core::v3::{
    address, Address, HeaderMap, HeaderValue, SocketAddress,
};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Peer, Request};
use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
use prost::Message as _;
use serde_json::json;
use sha2::{Digest as _, Sha256};

use super::*;
use crate::config::from_toml;
use crate::credential::mint;
use crate::path::PathError;

const CONFIG: &str = r#"
environment = "live"

[[key_prefixes]]
prefix = "sk_live_"
environment = "live"

[snapshot]
path = "does-not-exist.json"

[admin]
listen = "127.0.0.1:0"

[[routes.rule]]
route = "GET /v1/analyses/**"
scopes = ["analyses:read"]
"#;

/// `check` of the serialized request, its answer decoded: a gRPC message of exactly one
/// `CheckResponse`.
async fn check(state: &ExtAuthzState, req: &CheckRequest) -> CheckResponse {
    decode(&super::check(state, &req.encode_to_vec()).await)
}

fn decode(message: &[u8]) -> CheckResponse {
    assert_eq!(message[0], 0, "not compressed");
    let len = u32::from_be_bytes(message[1..5].try_into().unwrap()) as usize;
    assert_eq!(
        message.len(),
        5 + len,
        "the prefix gives the message's length"
    );
    CheckResponse::decode(&message[5..]).expect("a CheckResponse")
}

fn denied(reason: &DenyReason, request_id: &str, names: &HeaderNames) -> CheckResponse {
    decode(&super::denied(reason, request_id, names, None))
}

struct Fixture {
    state: ExtAuthzState,
    /// A key of partner_acme (org_1) with `analyses:read`.
    ok: String,
    /// A key of partner_solo (no org) usable only from 203.0.113.0/24.
    near: String,
}

/// `extra` is appended to the configuration; `trusted` are `ext_authz.trusted_proxies`.
fn fixture(extra: &str, trusted: &[&str]) -> Fixture {
    let settings = from_toml(&format!("{CONFIG}{extra}")).unwrap();
    let (ok, near) = (mint("sk_live_"), mint("sk_live_"));
    let hash = |k: &str| format!("sha256:{}", hex::encode(Sha256::digest(k.as_bytes())));
    let doc = json!({
        "schema": "keygate.snapshot/v1",
        "revision": 1,
        "partners": [
            {"id": "partner_acme", "org_id": "org_1", "status": "active"},
            {"id": "partner_solo", "status": "active"},
        ],
        "keys": [
            {"id": "key_ok", "hash": hash(&ok), "partner_id": "partner_acme",
             "environment": "live", "scopes": ["analyses:read"], "status": "active"},
            {"id": "key_near", "hash": hash(&near), "partner_id": "partner_solo",
             "environment": "live", "scopes": ["analyses:read"], "status": "active",
             "allowed_cidrs": ["203.0.113.0/24"]},
        ],
    });
    let store = Arc::new(SnapshotStore::new());
    store
        .publish(crate::snapshot::parse(doc.to_string().as_bytes(), None).unwrap())
        .unwrap();
    let telemetry = crate::telemetry::Telemetry::new(10, crate::config::DecisionLog::None);
    let state = ExtAuthzState {
        settings: FrontSettings {
            listen: "127.0.0.1:0".parse().unwrap(),
            trusted_proxies: trusted.iter().map(|c| c.parse().unwrap()).collect(),
            tls: None,
            header_read_timeout: std::time::Duration::from_secs(10),
        },
        policy: settings.policy,
        names: settings.headers,
        store,
        limits: Arc::new(crate::ratelimit::RateLimits::new(settings.rate_limit)),
        usage: Arc::new(crate::usage::Usage::new(0)),
        closing: tokio::sync::watch::channel(false).1,
        shard: telemetry.shard(crate::telemetry::Front::ExtAuthz),
        connections: telemetry.connections(crate::telemetry::Front::ExtAuthz),
        resources: crate::config::Limits::default(),
        buffers: Arc::new(super::Buffers::new(Default::default())),
    };
    Fixture { state, ok, near }
}

fn request(path: &str, headers: &[(&str, &str)], peer: Option<&str>) -> CheckRequest {
    CheckRequest {
        attributes: Some(AttributeContext {
            source: peer.map(|p| Peer {
                address: Some(Address {
                    address: Some(address::Address::SocketAddress(SocketAddress {
                        address: p.to_owned(),
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            }),
            request: Some(Request {
                http: Some(HttpRequest {
                    method: "GET".to_owned(),
                    path: path.to_owned(),
                    host: "api.example.com:8443".to_owned(),
                    headers: headers
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

/// The same request as Envoy sends it with `encode_raw_headers: true`: every header once per
/// value in `header_map`, values in `raw_value`.
fn raw(path: &str, headers: &[(&str, &str)], peer: &str) -> CheckRequest {
    let mut r = request(path, &[], Some(peer));
    let http = r
        .attributes
        .as_mut()
        .and_then(|a| a.request.as_mut())
        .and_then(|r| r.http.as_mut())
        .unwrap();
    http.header_map = Some(HeaderMap {
        headers: headers
            .iter()
            .map(|(k, v)| HeaderValue {
                key: k.to_string(),
                value: String::new(),
                raw_value: v.as_bytes().to_vec(),
            })
            .collect(),
    });
    r
}

/// gRPC code, HTTP status (200 for an allow), `code` of a denial, headers set, headers removed.
struct Seen {
    grpc: i32,
    http: i32,
    code: String,
    set: HashMap<String, String>,
    remove: Vec<String>,
}

fn seen(r: &CheckResponse) -> Seen {
    let grpc = r.status.as_ref().unwrap().code;
    let pairs = |hs: &[HeaderValueOption]| -> HashMap<String, String> {
        for h in hs {
            #[allow(deprecated)]
            let append = h.append.as_ref().map(|b| b.value);
            assert_eq!(append, Some(false), "{h:?}");
            assert_eq!(
                h.append_action,
                HeaderAppendAction::OverwriteIfExistsOrAdd as i32
            );
        }
        hs.iter()
            .map(|h| h.header.as_ref().unwrap())
            .map(|h| (h.key.clone(), h.value.clone()))
            .collect()
    };
    match r.http_response.as_ref().unwrap() {
        HttpResponse::OkResponse(ok) => {
            assert_eq!(grpc, 0);
            Seen {
                grpc,
                http: 200,
                code: String::new(),
                set: pairs(&ok.headers),
                remove: ok.headers_to_remove.clone(),
            }
        }
        HttpResponse::DeniedResponse(d) => {
            let body: serde_json::Value = serde_json::from_str(&d.body).unwrap();
            let set = pairs(&d.headers);
            assert_eq!(body["error"]["request_id"], set["x-request-id"].as_str());
            Seen {
                grpc,
                http: d.status.as_ref().unwrap().code,
                code: body["error"]["code"].as_str().unwrap().to_owned(),
                set,
                remove: Vec::new(),
            }
        }
        other => panic!("unexpected {other:?}"),
    }
}

/// Reason, gRPC code, HTTP status, a header that must come with it.
type Row = (DenyReason, i32, i32, Option<(&'static str, &'static str)>);

#[test]
fn every_reason_is_a_check_response_with_its_grpc_code() {
    let f = fixture("", &[]);
    let names = &f.state.names;
    let table: Vec<Row> = vec![
        (
            DenyReason::InvalidPath(PathError::NotAbsolute),
            3,
            400,
            None,
        ),
        (DenyReason::BadRequest("why"), 3, 400, None),
        (
            DenyReason::AuthenticationRequired {
                key_presented: false,
            },
            16,
            401,
            Some(("www-authenticate", "Bearer realm=\"keygate\"")),
        ),
        (
            DenyReason::AuthenticationRequired {
                key_presented: true,
            },
            16,
            401,
            Some((
                "www-authenticate",
                "Bearer realm=\"keygate\", error=\"invalid_token\"",
            )),
        ),
        (DenyReason::EnvironmentMismatch, 7, 403, None),
        (
            DenyReason::InvalidApiKey,
            16,
            401,
            Some((
                "www-authenticate",
                "Bearer realm=\"keygate\", error=\"invalid_token\"",
            )),
        ),
        (DenyReason::KeyRevoked, 16, 401, None),
        (DenyReason::KeyExpired, 16, 401, None),
        (DenyReason::AccountDeactivated, 7, 403, None),
        (DenyReason::PartnerSuspended, 7, 403, None),
        (DenyReason::InsufficientCredits, 7, 402, None),
        (DenyReason::IpNotAllowed, 7, 403, None),
        (DenyReason::ReferrerNotAllowed, 7, 403, None),
        (DenyReason::RouteNotAllowed, 7, 403, None),
        (
            DenyReason::ScopeRequired("analyses:write".into()),
            7,
            403,
            None,
        ),
        (DenyReason::IdempotencyKeyRequired, 3, 400, None),
        (
            DenyReason::RateLimited {
                retry_after_secs: 30,
            },
            8,
            429,
            Some(("retry-after", "30")),
        ),
        (
            DenyReason::SnapshotUnavailable,
            14,
            503,
            Some(("retry-after", "1")),
        ),
        (DenyReason::UpstreamUnavailable, 14, 502, None),
        (DenyReason::UpstreamTimeout, 14, 504, None),
        // The front's own: a CheckRequest too large, or the buffers full.
        (DenyReason::CheckTooLarge, 7, 413, None),
        (DenyReason::Overloaded, 14, 503, Some(("retry-after", "1"))),
    ];
    for (reason, grpc, http, header) in &table {
        let r = denied(reason, "req-1", names);
        let s = seen(&r);
        assert_eq!(
            (s.grpc, s.http, s.code.as_str()),
            (*grpc, *http, reason.code()),
            "{reason:?}"
        );
        assert_eq!(r.status.as_ref().unwrap().message, reason.code());
        assert_eq!(s.set["x-request-id"], "req-1");
        assert_eq!(s.set["content-type"], "application/json");
        let Some(HttpResponse::DeniedResponse(d)) = &r.http_response else {
            unreachable!()
        };
        assert_eq!(d.body.as_bytes(), reason.body("req-1").as_ref());
        // Exactly the contract's headers and the request id, nothing else.
        assert_eq!(s.set.len(), reason.headers().len() + 1, "{reason:?}");
        if let Some((name, value)) = header {
            assert_eq!(
                s.set.get(*name).map(String::as_str),
                Some(*value),
                "{reason:?}"
            );
        }
        assert!(r.dynamic_metadata.is_none());
    }
}

#[tokio::test]
async fn a_panic_is_a_denial_not_a_broken_stream() {
    let f = fixture("", &[]);
    let r = guarded(&f.state.names, async { panic!("a fault in check") }).await;
    let s = seen(&decode(&r));
    assert_eq!(
        (s.grpc, s.http, s.code.as_str()),
        (14, 503, "snapshot_unavailable")
    );
    let message = request("/", &[], None).encode_to_vec();
    let fine = guarded(&f.state.names, super::check(&f.state, &message)).await;
    assert_eq!(seen(&decode(&fine)).code, "authentication_required");
}

#[tokio::test]
async fn raw_header_map_is_read_like_the_headers_map() {
    let f = fixture("", &[]);
    let s = seen(
        &check(
            &f.state,
            &raw(
                "/v1/analyses/1",
                &[
                    ("x-api-key", &f.ok),
                    ("x-org-id", "spoof"),
                    ("x_key_id", "spoof"),
                ],
                "192.0.2.1",
            ),
        )
        .await,
    );
    assert_eq!(s.http, 200);
    assert_eq!(s.set["x-key-id"], "key_ok");
    assert_eq!(s.set["x-org-id"], "org_1");
    let mut remove = s.remove.clone();
    remove.sort();
    assert_eq!(remove, ["x-api-key", "x_key_id"], "x-org-id is overwritten");

    // Each value of a repeated header is its own entry: two keys are ambiguous.
    let s = seen(
        &check(
            &f.state,
            &raw(
                "/v1/analyses/1",
                &[("x-api-key", &f.ok), ("x-api-key", &f.near)],
                "192.0.2.1",
            ),
        )
        .await,
    );
    assert_eq!((s.grpc, s.code.as_str()), (16, "authentication_required"));
}

#[tokio::test]
async fn client_ip_comes_from_the_peer_and_forwarded_for_only_from_trusted_peers() {
    let untrusted = fixture("", &[]);
    let trusted = fixture("", &["10.0.0.0/8"]);
    // (fixture, peer, x-forwarded-for, expected code)
    let table: Vec<(&Fixture, Option<&str>, Option<&str>, &str)> = vec![
        (&untrusted, Some("203.0.113.9"), None, ""),
        (&untrusted, Some("::ffff:203.0.113.9"), None, ""),
        (&untrusted, Some("192.0.2.1"), None, "ip_not_allowed"),
        (&untrusted, None, None, "ip_not_allowed"),
        (&untrusted, Some("garbage"), None, "ip_not_allowed"),
        (
            &untrusted,
            Some("10.0.0.1"),
            Some("203.0.113.9"),
            "ip_not_allowed",
        ),
        (&trusted, Some("10.0.0.1"), Some("203.0.113.9"), ""),
        (
            &trusted,
            Some("10.0.0.1"),
            Some("203.0.113.9, 192.0.2.1"),
            "ip_not_allowed",
        ),
        (
            &trusted,
            Some("192.0.2.1"),
            Some("203.0.113.9"),
            "ip_not_allowed",
        ),
    ];
    for (f, peer, xff, code) in table {
        let mut headers = vec![("x-api-key", f.near.as_str())];
        headers.extend(xff.map(|x| ("x-forwarded-for", x)));
        let s = seen(&check(&f.state, &request("/v1/analyses/1", &headers, peer)).await);
        assert_eq!(s.code, code, "{peer:?} {xff:?}");
    }
}

#[tokio::test]
async fn request_id_is_the_callers_only_when_well_formed() {
    let f = fixture("", &[]);
    let id_of = async |v: Option<&str>| {
        let mut headers = vec![("x-api-key", f.ok.as_str())];
        headers.extend(v.map(|v| ("x-request-id", v)));
        let r = check(&f.state, &request("/v1/analyses/1", &headers, None)).await;
        let Some(HttpResponse::OkResponse(ok)) = &r.http_response else {
            panic!("{r:?}")
        };
        let on_response = ok.response_headers_to_add[0].header.clone().unwrap();
        assert_eq!(on_response.key, "x-request-id");
        let set = seen(&r).set["x-request-id"].clone();
        assert_eq!(set, on_response.value);
        set
    };
    assert_eq!(id_of(Some("trace-1:a/b")).await, "trace-1:a/b");
    for bad in [None, Some("has space"), Some("a, b"), Some("")] {
        let minted = id_of(bad).await;
        assert_eq!(minted.len(), 32, "{bad:?}");
        assert!(request_id::is_well_formed(minted.as_bytes()));
    }
}

#[tokio::test]
async fn forwarded_credentials_are_not_removed() {
    let f = fixture("\n[credentials]\nforward = true\n", &[]);
    let bearer = format!("Bearer {}", f.ok);
    let s = seen(
        &check(
            &f.state,
            &request(
                "/v1/analyses/1",
                &[("authorization", &bearer), ("x-partner-id", "spoof")],
                None,
            ),
        )
        .await,
    );
    assert_eq!(s.http, 200);
    assert!(s.remove.is_empty(), "{:?}", s.remove);
    assert_eq!(s.set["x-partner-id"], "partner_acme");
}

#[tokio::test]
async fn the_query_never_changes_the_decision() {
    let f = fixture("", &[]);
    for (path, code) in [
        ("/v1/analyses/1", ""),
        ("/v1/analyses/1?", ""),
        ("/v1/analyses/1?a=%2F..%2F&b=%00", ""),
        ("/v1/analyses/1?/../../admin", ""),
        ("/v1/analyses%2F1?x=1", "invalid_path"),
        ("/v1/../../x?y", "invalid_path"),
    ] {
        let s = seen(&check(&f.state, &request(path, &[("x-api-key", &f.ok)], None)).await);
        assert_eq!(s.code, code, "{path}");
    }
}

/// A method that is no HTTP method (a token, RFC 9110 §9.1) names no request: it would match
/// no method's rule, and pass under `routes.unmatched = "allow"` with no scope checked.
#[tokio::test]
async fn a_method_that_is_not_a_token_is_refused() {
    let f = fixture("", &[]);
    for method in ["", "DELETE ", "GE T", "GET\r\n", "(GET)"] {
        let mut req = request("/v1/analyses/1", &[("x-api-key", &f.ok)], None);
        let http = req.attributes.as_mut().unwrap().request.as_mut().unwrap();
        http.http.as_mut().unwrap().method = method.to_owned();
        let s = seen(&check(&f.state, &req).await);
        assert_eq!(
            (s.http, s.code.as_str()),
            (400, "invalid_request"),
            "{method:?}"
        );
    }
    // A method keygate has no rule for, spelled as a token, is decided like any.
    let mut req = request("/v1/analyses/1", &[("x-api-key", &f.ok)], None);
    let http = req.attributes.as_mut().unwrap().request.as_mut().unwrap();
    http.http.as_mut().unwrap().method = "PROPFIND".to_owned();
    assert_eq!(seen(&check(&f.state, &req).await).http, 200);
}

fn set(key: &str, value: &str) -> HeaderValueOption {
    #[allow(deprecated)]
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_owned(),
            value: value.to_owned(),
            raw_value: Vec::new(),
        }),
        append: Some(envoy_types::pb::google::protobuf::BoolValue { value: false }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        keep_empty_value: false,
    }
}

/// A header mutation written by [`Set::write`] is the `HeaderValueOption` prost writes, on the
/// one-byte-lengths path and the general one (long values, an empty value, a field number over
/// 15), at the boundary between them too.
#[test]
fn a_header_mutation_is_what_prost_encodes() {
    let long = "s".repeat(300);
    let at_boundary = "v".repeat(127 - 10 - "x-scopes".len()); // Set::len() = 127
    let past_boundary = format!("{at_boundary}w");
    let cases = [
        ("x-partner-id", "partner_acme"),
        ("x-scopes", ""),
        ("x-scopes", at_boundary.as_str()),
        ("x-scopes", past_boundary.as_str()),
        ("x-scopes", long.as_str()),
    ];
    assert_eq!(Set("x-scopes", &at_boundary).len(), 127);
    for tag in [2, 6, 16] {
        for (name, value) in cases {
            let mut buf = Vec::new();
            Set(name, value).write(tag, &mut Writer(&mut buf));
            let mut want = Vec::new();
            prost::encoding::message::encode(tag, &set(name, value), &mut want);
            assert_eq!(buf, want, "tag {tag}, {name}: {} bytes", value.len());
            assert_eq!(buf.len(), Set(name, value).field_len(tag));
        }
    }
}

/// The allow as prost would build it, field for field: identity headers, headers to remove
/// (credentials, then spoofed identity headers keygate does not overwrite, any case), the
/// request id on the response, and the metadata `Struct` (org null for a partner without one).
#[tokio::test]
async fn an_allow_is_exactly_the_check_response_envoy_reads() {
    use envoy_types::ext_authz::v3::pb::OkHttpResponse;
    use envoy_types::pb::google::protobuf::{value::Kind, ListValue, Struct, Value};
    let f = fixture("", &[]);
    let string = |s: &str| Value {
        kind: Some(Kind::StringValue(s.to_owned())),
    };
    let metadata = |partner: &str, org: Option<&str>, key: &str| Struct {
        fields: HashMap::from([
            ("partner_id".to_owned(), string(partner)),
            (
                "org_id".to_owned(),
                org.map_or(
                    Value {
                        kind: Some(Kind::NullValue(0)),
                    },
                    string,
                ),
            ),
            ("key_id".to_owned(), string(key)),
            ("key_environment".to_owned(), string("live")),
            (
                "scopes".to_owned(),
                Value {
                    kind: Some(Kind::ListValue(ListValue {
                        values: vec![string("analyses:read")],
                    })),
                },
            ),
        ]),
    };
    let allow =
        |set_headers: Vec<HeaderValueOption>, remove: &[&str], id: &str, m: Struct| CheckResponse {
            status: Some(envoy_types::pb::google::rpc::Status::default()),
            http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
                headers: set_headers,
                headers_to_remove: remove.iter().map(|s| s.to_string()).collect(),
                response_headers_to_add: vec![set("x-request-id", id)],
                ..Default::default()
            })),
            dynamic_metadata: Some(m),
        };
    let bearer = format!("bearer {}", f.ok);
    let got = check(
        &f.state,
        &request(
            "/v1/analyses/1",
            &[
                ("authorization", &bearer),
                ("x-request-id", "req-7"),
                ("X_Scopes", "spoof"),
                ("x-partner-id", "spoof"),
            ],
            None,
        ),
    )
    .await;
    let want = allow(
        vec![
            set("x-partner-id", "partner_acme"),
            set("x-key-id", "key_ok"),
            set("x-key-environment", "live"),
            set("x-scopes", "analyses:read"),
            set("x-request-id", "req-7"),
            set("x-org-id", "org_1"),
        ],
        &["authorization", "x_scopes"],
        "req-7",
        metadata("partner_acme", Some("org_1"), "key_ok"),
    );
    assert_eq!(got, want);

    let got = check(
        &f.state,
        &request(
            "/v1/analyses/1",
            &[
                ("x-api-key", &f.near),
                ("x-request-id", "req-8"),
                ("x-org-id", "spoof"),
            ],
            Some("203.0.113.9"),
        ),
    )
    .await;
    let want = allow(
        vec![
            set("x-partner-id", "partner_solo"),
            set("x-key-id", "key_near"),
            set("x-key-environment", "live"),
            set("x-scopes", "analyses:read"),
            set("x-request-id", "req-8"),
        ],
        &["x-org-id", "x-api-key"],
        "req-8",
        metadata("partner_solo", None, "key_near"),
    );
    assert_eq!(got, want);
    // Removed also when Envoy did not show it (`allowed_headers` without it): the client may
    // have sent it all the same.
    let got = check(
        &f.state,
        &request(
            "/v1/analyses/1",
            &[("x-api-key", &f.near), ("x-request-id", "req-8")],
            Some("203.0.113.9"),
        ),
    )
    .await;
    assert_eq!(got, want);
}

/// With rate limits on, the `X-RateLimit-*` headers follow the request id: on the client's
/// response of an allow, among the denial's headers of a 429.
#[tokio::test]
async fn rate_limit_headers_follow_the_request_id() {
    let f = fixture("\n[rate_limit]\ndefault_per_minute = 1\n", &[]);
    let ask = || request("/v1/analyses/1", &[("x-api-key", &f.ok)], None);
    let names = |hs: &[HeaderValueOption]| -> Vec<String> {
        hs.iter().map(|h| h.header.clone().unwrap().key).collect()
    };
    let first = check(&f.state, &ask()).await;
    let Some(HttpResponse::OkResponse(ok)) = &first.http_response else {
        panic!("{first:?}")
    };
    let added = &ok.response_headers_to_add;
    assert_eq!(
        names(added),
        [
            "x-request-id",
            "x-ratelimit-limit",
            "x-ratelimit-remaining",
            "x-ratelimit-reset"
        ]
    );
    assert_eq!(added[1].header.as_ref().unwrap().value, "1");
    assert_eq!(added[2].header.as_ref().unwrap().value, "0");
    let second = check(&f.state, &ask()).await;
    let s = seen(&second);
    assert_eq!((s.grpc, s.http, s.code.as_str()), (8, 429, "rate_limited"));
    let Some(HttpResponse::DeniedResponse(d)) = &second.http_response else {
        unreachable!()
    };
    let all = names(&d.headers);
    let id = all.iter().position(|n| n == "x-request-id").unwrap();
    assert_eq!(
        all[id..],
        [
            "x-request-id",
            "x-ratelimit-limit",
            "x-ratelimit-remaining",
            "x-ratelimit-reset"
        ]
    );
}

/// Bytes that are not a `CheckRequest` are still answered with a `CheckResponse`: a denial
/// (a gRPC error would be an allow under `failure_mode_allow`).
#[tokio::test]
async fn an_undecodable_check_request_is_a_denial() {
    let f = fixture("", &[]);
    let valid = request("/v1/analyses/1", &[("x-api-key", &f.ok)], None).encode_to_vec();
    // A length past the end; a varint that never ends; a string field sent as a varint.
    let mut truncated = valid.clone();
    truncated.pop();
    for bad in [truncated, vec![0x0a, 0xff], vec![0x0a, 0x02, 0x20, 0x01]] {
        assert!(CheckRequest::decode(&bad[..]).is_err(), "{bad:?}");
        let s = seen(&decode(&super::check(&f.state, &bad).await));
        assert_eq!(
            (s.grpc, s.http, s.code.as_str()),
            (3, 400, "invalid_request"),
            "{bad:?}"
        );
    }
}

/// A connection's IO that counts its writes and, like a `TcpStream`, writes vectored.
struct CountedWrites {
    io: tokio::io::DuplexStream,
    writes: Arc<std::sync::atomic::AtomicUsize>,
}

impl tokio::io::AsyncRead for CountedWrites {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for CountedWrites {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.poll_write_vectored(cx, &[std::io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.writes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let all: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
        std::pin::Pin::new(&mut self.io).poll_write(cx, &all)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A client that stops answering keep-alive PINGs (gone behind a silent network) is dropped:
/// a PING once the connection has been idle for `http2_keep_alive_interval`, no answer within
/// `http2_keep_alive_timeout`, closed. One that answers them is kept.
#[tokio::test]
async fn a_connection_that_does_not_answer_keep_alive_pings_is_closed() {
    let serve = |io| {
        let mut state = fixture("", &[]).state;
        state.resources.http2_keep_alive_interval = Duration::from_millis(100);
        state.resources.http2_keep_alive_timeout = Duration::from_millis(300);
        let others = crate::listen::Routed::new(
            tonic::service::Routes::default(),
            crate::listen::Activity::new(),
            "127.0.0.1:1".parse().unwrap(),
        );
        tokio::spawn(grpc::Connection::new(io, Arc::new(state), others))
    };

    let (client, server) = tokio::io::duplex(1 << 16);
    let served = serve(server);
    // The client's connection is never polled after the handshake: no PING is answered.
    let (_send, _connection) = h2::client::handshake(client).await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(5), served)
        .await
        .expect("closed within 5 s")
        .unwrap();
    assert!(ended.is_err(), "{ended:?}");

    let (client, server) = tokio::io::duplex(1 << 16);
    let served = serve(server);
    let (_send, connection) = h2::client::handshake(client).await.unwrap();
    tokio::spawn(connection);
    // A dozen PINGs or so, each answered.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !served.is_finished(),
        "closed though its PINGs were answered"
    );
}

/// Checks that arrive together on a connection are answered together, in one write, as
/// tonic's small answers were: an allow's `CheckResponse` is larger than what h2 copies into
/// its write buffer from an IO that writes vectored, and each such answer once cost a write
/// of its own.
#[tokio::test]
async fn checks_that_arrive_together_are_answered_in_one_write() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let f = fixture("", &[]);
    let state = Arc::new(f.state);
    let (client, server) = tokio::io::duplex(1 << 20);
    let writes = Arc::new(AtomicUsize::new(0));
    let io = CountedWrites {
        io: server,
        writes: writes.clone(),
    };
    let others = crate::listen::Routed::new(
        tonic::service::Routes::default(),
        crate::listen::Activity::new(),
        "127.0.0.1:1".parse().unwrap(),
    );
    tokio::spawn(grpc::Connection::new(io, state.clone(), others));
    let (mut client, connection) = h2::client::handshake(client).await.unwrap();
    tokio::spawn(connection);

    let ask = request("/v1/analyses/1", &[("x-api-key", &f.ok)], None).encode_to_vec();
    let mut message = vec![0];
    message.extend_from_slice(&(ask.len() as u32).to_be_bytes());
    message.extend_from_slice(&ask);
    let message = Bytes::from(message);
    let send = |client: &mut h2::client::SendRequest<Bytes>| {
        let req = http::Request::post(format!("http://keygate{}", grpc::CHECK))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap();
        let (answer, mut body) = client.send_request(req, false).unwrap();
        body.send_data(message.clone(), true).unwrap();
        answer
    };
    let allowed = |answer: h2::client::ResponseFuture| async move {
        let mut body = answer.await.unwrap().into_body();
        let mut message = Vec::new();
        while let Some(data) = body.data().await {
            message.extend_from_slice(&data.unwrap());
        }
        let trailers = body.trailers().await.unwrap().unwrap();
        assert_eq!(trailers["grpc-status"], "0");
        // Past h2's 256-byte threshold: the case this test is about.
        assert!(message.len() > 256, "{} bytes", message.len());
        let answer = decode(&message);
        assert!(
            matches!(answer.http_response, Some(HttpResponse::OkResponse(_))),
            "{answer:?}"
        );
    };
    // One Check first: the connection's settings are exchanged.
    allowed(send(&mut client)).await;

    let before = writes.load(Ordering::Relaxed);
    let answers: Vec<_> = (0..10).map(|_| send(&mut client)).collect();
    for answer in answers {
        allowed(answer).await;
    }
    let n = writes.load(Ordering::Relaxed) - before;
    assert!(
        n <= 2,
        "ten Checks sent together were answered in {n} writes"
    );
}
