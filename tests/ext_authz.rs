//! The gRPC ext_authz front with a tonic client built from `envoy-types`: every code of the
//! decision table as a `CheckResponse` (never a gRPC error), the allow shape Envoy applies
//! (identity headers with `append = false` and `OVERWRITE_IF_EXISTS_OR_ADD`, headers to remove,
//! response headers, dynamic metadata), health following the snapshot, and a differential test
//! against the proxy and forward-auth fronts of the same keygate.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;

use envoy_types::ext_authz::v3::pb::{CheckRequest, CheckResponse, HttpResponse};
use envoy_types::pb::envoy::config::core::v3::{address, Address, SocketAddress};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Peer, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
use serde_json::json;
use support::*;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// Request headers of a table row.
type Headers<'a> = Vec<(&'a str, String)>;

const EXT: &str = "[ext_authz]\nlisten = \"127.0.0.1:0\"\n";

fn check_request(method: &str, path: &str, headers: &[(&str, &str)], peer: &str) -> CheckRequest {
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(Peer {
                address: Some(Address {
                    address: Some(address::Address::SocketAddress(SocketAddress {
                        address: peer.to_owned(),
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            }),
            request: Some(Request {
                http: Some(HttpRequest {
                    method: method.to_owned(),
                    path: path.to_owned(),
                    host: "api.example.com".to_owned(),
                    // Envoy's header map: one entry per name, repeats joined with a comma.
                    headers: headers.iter().fold(HashMap::new(), |mut map, (k, v)| {
                        map.entry(k.to_string())
                            .and_modify(|joined: &mut String| {
                                joined.push(',');
                                joined.push_str(v);
                            })
                            .or_insert_with(|| v.to_string());
                        map
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

async fn ask(addr: SocketAddr, req: CheckRequest) -> CheckResponse {
    let mut c = AuthorizationClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    c.check(req).await.expect("never a gRPC error").into_inner()
}

/// What a test needs to know of a CheckResponse.
struct Seen {
    grpc: i32,
    http: u16,
    code: String,
    body: serde_json::Value,
    set: HashMap<String, String>,
    remove: Vec<String>,
}

fn seen(r: &CheckResponse) -> Seen {
    let grpc = r.status.as_ref().unwrap().code;
    match r.http_response.as_ref().unwrap() {
        HttpResponse::OkResponse(ok) => {
            for h in &ok.headers {
                #[allow(deprecated)]
                let append = h.append.as_ref().map(|b| b.value);
                assert_eq!(append, Some(false), "append = false on {:?}", h.header);
                assert_eq!(
                    h.append_action, 2,
                    "OVERWRITE_IF_EXISTS_OR_ADD on {:?}",
                    h.header
                );
            }
            Seen {
                grpc,
                http: 200,
                code: String::new(),
                body: serde_json::Value::Null,
                set: ok
                    .headers
                    .iter()
                    .map(|h| h.header.clone().unwrap())
                    .map(|h| (h.key, h.value))
                    .collect(),
                remove: ok.headers_to_remove.clone(),
            }
        }
        HttpResponse::DeniedResponse(d) => {
            let body: serde_json::Value = serde_json::from_str(&d.body).unwrap();
            Seen {
                grpc,
                http: d.status.as_ref().unwrap().code as u16,
                code: body["error"]["code"].as_str().unwrap().to_owned(),
                body,
                set: d
                    .headers
                    .iter()
                    .map(|h| h.header.clone().unwrap())
                    .map(|h| (h.key, h.value))
                    .collect(),
                remove: Vec::new(),
            }
        }
        other => panic!("unexpected {other:?}"),
    }
}

struct Keys {
    ok: String,
    writer: String,
    solo: String,
    revoked: String,
    expired: String,
    suspended: String,
    payment: String,
    far: String,
    web: String,
    ro: String,
    test_env: String,
    deactivated: String,
}

fn keys() -> (Keys, Doc) {
    let k = Keys {
        ok: mint("sk_live_"),
        writer: mint("sk_live_"),
        solo: mint("sk_live_"),
        revoked: mint("sk_live_"),
        expired: mint("sk_live_"),
        suspended: mint("sk_live_"),
        payment: mint("sk_live_"),
        far: mint("sk_live_"),
        web: mint("sk_live_"),
        ro: mint("sk_live_"),
        test_env: mint("sk_test_"),
        deactivated: mint("sk_live_"),
    };
    let doc = Doc::new(1)
        .partner("partner_acme", Some("org_1"), "active")
        .partner("partner_solo", None, "active")
        .partner("partner_paused", None, "suspended")
        .partner("partner_broke", None, "payment_required")
        .partner("partner_gone", Some("org_2"), "deactivated")
        .key("key_ok", &k.ok, json!({}))
        .key(
            "key_writer",
            &k.writer,
            json!({"scopes": ["analyses:read", "analyses:write"]}),
        )
        .key("key_solo", &k.solo, json!({"partner_id": "partner_solo"}))
        .key("key_revoked", &k.revoked, json!({"status": "revoked"}))
        .key(
            "key_expired",
            &k.expired,
            json!({"expires_at": "2020-01-01T00:00:00Z"}),
        )
        .key(
            "key_paused",
            &k.suspended,
            json!({"partner_id": "partner_paused"}),
        )
        .key(
            "key_broke",
            &k.payment,
            json!({"partner_id": "partner_broke"}),
        )
        .key(
            "key_far",
            &k.far,
            json!({"allowed_cidrs": ["203.0.113.0/24"]}),
        )
        .key(
            "key_web",
            &k.web,
            json!({"allowed_referrers": ["https://app.example.com/*"]}),
        )
        .key(
            "key_gone",
            &k.deactivated,
            json!({"partner_id": "partner_gone"}),
        )
        .key(
            "key_ro",
            &k.ro,
            json!({"allowed_routes": ["GET /v1/analyses/**"]}),
        );
    (k, doc)
}

async fn start(extra: &str) -> (Gate, SnapshotDir, Keys, SocketAddr, Upstream) {
    let upstream = Upstream::start().await;
    let snap = SnapshotDir::new();
    let (k, doc) = keys();
    snap.write(&doc);
    let gate = Gate::start(&config_toml(
        &snap.path(),
        upstream.addr,
        &format!("{EXT}{extra}"),
    ))
    .await;
    let addr = gate
        .app
        .as_ref()
        .unwrap()
        .ext_authz_addr
        .expect("ext_authz configured");
    (gate, snap, k, addr, upstream)
}

#[tokio::test]
async fn every_code_as_a_check_response() {
    let (gate, _snap, k, addr, _up) = start("").await;
    let b = |key: &str| format!("Bearer {key}");
    let p = "/v1/analyses/1?x=%2F";
    let table: Vec<(&str, &str, Headers, i32, u16, &str)> = vec![
        (
            "GET",
            "/v1/analyses%2F1",
            vec![("authorization", b(&k.ok))],
            3,
            400,
            "invalid_path",
        ),
        ("GET", p, vec![], 16, 401, "authentication_required"),
        (
            "GET",
            p,
            vec![("authorization", format!("{}, {}", b(&k.ok), b(&k.ok)))],
            16,
            401,
            "authentication_required",
        ),
        (
            "GET",
            p,
            vec![("authorization", b(&k.test_env))],
            7,
            403,
            "key_environment_mismatch",
        ),
        (
            "GET",
            p,
            vec![("x-api-key", mint("sk_live_"))],
            16,
            401,
            "invalid_api_key",
        ),
        (
            "GET",
            p,
            vec![("authorization", b(&k.revoked))],
            16,
            401,
            "key_revoked",
        ),
        (
            "GET",
            p,
            vec![("authorization", b(&k.expired))],
            16,
            401,
            "key_expired",
        ),
        (
            "GET",
            p,
            vec![("authorization", b(&k.suspended))],
            7,
            403,
            "partner_suspended",
        ),
        (
            "GET",
            p,
            vec![("authorization", b(&k.deactivated))],
            7,
            403,
            "account_deactivated",
        ),
        (
            "GET",
            p,
            vec![("authorization", b(&k.payment))],
            7,
            402,
            "insufficient_credits",
        ),
        (
            "GET",
            p,
            vec![("authorization", b(&k.far))],
            7,
            403,
            "ip_not_allowed",
        ),
        (
            "GET",
            p,
            vec![("authorization", b(&k.web))],
            7,
            403,
            "referrer_not_allowed",
        ),
        (
            "POST",
            "/v1/analyses",
            vec![("authorization", b(&k.ro))],
            7,
            403,
            "route_not_allowed",
        ),
        (
            "POST",
            "/v1/analyses",
            vec![("authorization", b(&k.ok))],
            7,
            403,
            "scope_required",
        ),
        (
            "POST",
            "/v1/analyses?scope=analyses:write",
            vec![("authorization", b(&k.writer))],
            0,
            200,
            "",
        ),
        (
            "GET",
            p,
            vec![
                ("authorization", b(&k.web)),
                ("referer", "https://app.example.com/x".into()),
            ],
            0,
            200,
            "",
        ),
    ];
    for (method, path, headers, grpc, http, code) in &table {
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let s = seen(&ask(addr, check_request(method, path, &h, "127.0.0.1")).await);
        assert_eq!(
            (s.grpc, s.http, s.code.as_str()),
            (*grpc, *http, *code),
            "{method} {path} {headers:?}"
        );
        if *http != 200 {
            assert_eq!(s.set["content-type"], "application/json");
            assert_eq!(
                s.body["error"]["request_id"],
                s.set["x-request-id"].as_str()
            );
            assert_eq!(
                s.set.contains_key("www-authenticate"),
                *http == 401,
                "{code}"
            );
            // Two keys were offered: the client learns its token was not accepted.
            if headers.iter().any(|(_, v)| v.contains(", Bearer")) {
                assert_eq!(
                    s.set["www-authenticate"],
                    "Bearer realm=\"keygate\", error=\"invalid_token\""
                );
            }
            for (_, v) in headers {
                assert!(
                    v.len() < 20 || !s.body.to_string().contains(v.trim_start_matches("Bearer "))
                );
            }
        }
    }
    gate.stop().await;
}

/// With `[idempotency] required = true`: a mutating method without the header is 400
/// INVALID_ARGUMENT `idempotency_key_required`; with it (in the headers map), allowed.
#[tokio::test]
async fn idempotency_key_required_is_invalid_argument() {
    let (gate, _snap, k, addr, _up) = start("\n[idempotency]\nrequired = true\n").await;
    let auth = format!("Bearer {}", k.writer);
    let post = |extra: &[(&'static str, &'static str)]| {
        let mut h = vec![("authorization", auth.as_str())];
        h.extend_from_slice(extra);
        check_request("POST", "/v1/analyses?x=1", &h, "127.0.0.1")
    };
    let s = seen(&ask(addr, post(&[])).await);
    assert_eq!(
        (s.grpc, s.http, s.code.as_str()),
        (3, 400, "idempotency_key_required")
    );
    assert!(!s.set.contains_key("www-authenticate"));
    let s = seen(&ask(addr, post(&[("idempotency-key", "k-1")])).await);
    assert_eq!(s.grpc, 0);
    // Two, as Envoy passes them (joined with a comma): as missing, as on the proxy.
    let s = seen(&ask(addr, post(&[("idempotency-key", "k-1,k-2")])).await);
    assert_eq!(
        (s.grpc, s.http, s.code.as_str()),
        (3, 400, "idempotency_key_required")
    );
    gate.stop().await;
}

#[tokio::test]
async fn allow_shape_is_what_envoy_applies() {
    let (gate, _snap, k, addr, _up) = start("").await;
    let r = ask(
        addr,
        check_request(
            "GET",
            "/v1/analyses/1",
            &[
                ("x-api-key", &k.solo),
                ("authorization", "Basic dXNlcjpwYXNz"),
                ("x-org-id", "org_spoofed"),
                ("x_partner_id", "partner_evil"),
                ("x-partner-id", "partner_evil"),
                ("x-request-id", "trace-1"),
            ],
            "127.0.0.1",
        ),
    )
    .await;
    let s = seen(&r);
    assert_eq!(s.grpc, 0);
    assert_eq!(s.set["x-partner-id"], "partner_solo");
    assert_eq!(s.set["x-key-id"], "key_solo");
    assert_eq!(s.set["x-key-environment"], "live");
    assert_eq!(s.set["x-scopes"], "analyses:read");
    assert_eq!(s.set["x-request-id"], "trace-1");
    assert!(!s.set.contains_key("x-org-id"), "no org, none invented");
    let mut remove = s.remove.clone();
    remove.sort();
    assert_eq!(
        remove,
        ["x-api-key", "x-org-id", "x_partner_id"],
        "the credential found and unset spoofs"
    );
    let Some(HttpResponse::OkResponse(ok)) = &r.http_response else {
        unreachable!()
    };
    let resp_headers: Vec<_> = ok
        .response_headers_to_add
        .iter()
        .map(|h| h.header.clone().unwrap().key)
        .collect();
    assert_eq!(resp_headers, ["x-request-id"]);
    let meta = r.dynamic_metadata.as_ref().unwrap();
    let field = |f: &str| format!("{:?}", meta.fields[f].kind);
    assert!(field("partner_id").contains("partner_solo"));
    assert!(field("key_id").contains("key_solo"));
    assert!(field("org_id").contains("NullValue"));
    assert!(field("scopes").contains("analyses:read"));
    gate.stop().await;
}

#[tokio::test]
async fn no_snapshot_is_unavailable_and_health_follows() {
    let upstream = Upstream::start().await;
    let snap = SnapshotDir::new();
    let gate = Gate::start(&config_toml(&snap.path(), upstream.addr, EXT)).await;
    let addr = gate.app.as_ref().unwrap().ext_authz_addr.unwrap();
    let key = mint("sk_live_");
    let s = seen(
        &ask(
            addr,
            check_request("GET", "/v1/x", &[("x-api-key", &key)], "127.0.0.1"),
        )
        .await,
    );
    assert_eq!(
        (s.grpc, s.http, s.code.as_str()),
        (14, 503, "snapshot_unavailable")
    );
    assert_eq!(s.set["retry-after"], "1");

    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    let status = |svc: &str| HealthCheckRequest {
        service: svc.to_owned(),
    };
    let mut now = health.check(status("")).await.unwrap().into_inner().status;
    assert_eq!(now, ServingStatus::NotServing as i32);

    snap.write(
        &Doc::new(1)
            .partner("partner_acme", None, "active")
            .key("key_a", &key, json!({})),
    );
    gate.wait_revision(1).await;
    let start = std::time::Instant::now();
    while now != ServingStatus::Serving as i32
        && start.elapsed() < std::time::Duration::from_secs(3)
    {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        now = health
            .check(status("envoy.service.auth.v3.Authorization"))
            .await
            .unwrap()
            .into_inner()
            .status;
    }
    assert_eq!(now, ServingStatus::Serving as i32);
    let s = seen(
        &ask(
            addr,
            check_request("GET", "/v1/x", &[("x-api-key", &key)], "127.0.0.1"),
        )
        .await,
    );
    assert_eq!(s.grpc, 0);
    gate.stop().await;
}

#[tokio::test]
async fn a_check_without_http_attributes_is_a_denial_not_an_error() {
    let (gate, _snap, _k, addr, _up) = start("").await;
    let s = seen(&ask(addr, CheckRequest { attributes: None }).await);
    assert_eq!(
        (s.grpc, s.http, s.code.as_str()),
        (3, 400, "invalid_request")
    );
    gate.stop().await;
}

/// The request headers the upstream gets behind Envoy: those of the request, then the
/// CheckResponse's `headers` set (overwriting), then `headers_to_remove` removed; the order
/// Envoy's ext_authz filter applies them.
fn behind_envoy(request: &[(&str, &str)], ok: &Seen) -> HashMap<String, String> {
    let mut h: HashMap<String, String> = request
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.to_string()))
        .collect();
    h.extend(ok.set.clone());
    for name in &ok.remove {
        h.remove(name);
    }
    h
}

/// The request headers the upstream gets behind Envoy's `http_service` (deploy/envoy/
/// envoy-http.yaml): those of the request, then the 200's identity headers and request id set
/// (`allowed_upstream_headers`, overwriting), then `x-envoy-auth-headers-to-remove` removed.
fn behind_envoy_http(request: &[(&str, &str)], ok: &Answer) -> HashMap<String, String> {
    let mut h: HashMap<String, String> = request
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.to_string()))
        .collect();
    for name in COMPARED[..5].iter().chain(&["x-request-id"]) {
        if let Some(v) = ok.header(name) {
            h.insert(name.to_string(), v.to_owned());
        }
    }
    for name in ok
        .header("x-envoy-auth-headers-to-remove")
        .unwrap_or("")
        .split(',')
    {
        h.remove(name.trim());
    }
    h
}

/// Headers whose presence and value upstream must be the same through either front.
const COMPARED: [&str; 7] = [
    "x-partner-id",
    "x-org-id",
    "x-key-id",
    "x-key-environment",
    "x-scopes",
    "x-api-key",
    "authorization",
];

/// One table through the proxy, ext_authz and forward-auth (as Envoy's `http_service` asks)
/// of the same keygate: same verdict, code and, for an allow, the same identity and credential
/// headers upstream (spoofs included).
#[tokio::test]
async fn proxy_ext_authz_and_forward_auth_agree() {
    let (gate, _snap, k, addr, upstream) = start("[authz_http]\nlisten = \"127.0.0.1:0\"\n").await;
    let authz = gate.app().authz_http_addr.expect("authz_http configured");
    let bearer = |key: &str| format!("Bearer {key}");
    let spoofs = |key: &str| -> Headers {
        vec![
            ("x-api-key", key.to_owned()),
            ("x-org-id", "org_evil".into()),
            ("x-partner-id", "partner_evil".into()),
            ("x-key-id", "key_evil".into()),
            ("x-scopes", "admin".into()),
            ("x-request-id", "trace-42".into()),
        ]
    };
    let table: Vec<(&str, &str, Headers)> = vec![
        ("GET", "/v1/analyses/1", vec![("x-api-key", k.ok.clone())]),
        (
            "GET",
            "/v1/analyses/1?q=%2F..",
            vec![("x-api-key", k.ok.clone())],
        ),
        ("GET", "/v1/analyses/1", spoofs(&k.ok)),
        ("GET", "/v1/analyses/1", spoofs(&k.solo)),
        ("GET", "/v1/analyses/1", vec![]),
        ("GET", "/v1/analyses/1", vec![("x-api-key", "".into())]),
        (
            "GET",
            "/v1/analyses/1",
            vec![
                ("x-api-key", k.ok.clone()),
                ("authorization", bearer(&k.solo)),
            ],
        ),
        (
            "GET",
            "/v1/analyses/1",
            vec![
                ("x-api-key", k.ok.clone()),
                ("authorization", bearer(&k.ok)),
            ],
        ),
        (
            "GET",
            "/v1/analyses/1",
            vec![
                ("x-api-key", k.ok.clone()),
                ("authorization", "Basic dXNlcjpwYXNz".into()),
            ],
        ),
        // No key offered, one offered but unusable: both authentication_required, told apart
        // by `error="invalid_token"` alike on every front (Envoy joins the repeats).
        (
            "GET",
            "/v1/analyses/1",
            vec![
                ("authorization", "Basic dXNlcjpwYXNz".into()),
                ("authorization", "Basic b3RoZXI6cGFzcw==".into()),
            ],
        ),
        (
            "GET",
            "/v1/analyses/1",
            vec![
                ("authorization", bearer(&k.ok)),
                ("authorization", bearer(&k.solo)),
            ],
        ),
        (
            "GET",
            "/v1/analyses/1",
            vec![("authorization", format!("{} x", bearer(&k.ok)))],
        ),
        // A key offered in a third value: the proxy keeps two values, Envoy joins all three.
        (
            "GET",
            "/v1/analyses/1",
            vec![
                ("authorization", "Basic dXNlcjpwYXNz".into()),
                ("authorization", "Basic b3RoZXI6cGFzcw==".into()),
                ("authorization", bearer(&k.ok)),
            ],
        ),
        (
            "GET",
            "/v1/analyses/1",
            vec![
                ("x-api-key", "".into()),
                ("x-api-key", "".into()),
                ("x-api-key", k.ok.clone()),
            ],
        ),
        ("POST", "/v1/analyses", vec![("x-api-key", k.ok.clone())]),
        (
            "POST",
            "/v1/analyses/",
            vec![("x-api-key", k.writer.clone())],
        ),
        (
            "HEAD",
            "/v1/analyses/1",
            vec![("authorization", bearer(&k.ro))],
        ),
        (
            "DELETE",
            "/v1/analyses/1",
            vec![("authorization", bearer(&k.ro))],
        ),
        (
            "GET",
            "/v1/analyses/%2e%2e/%2e%2e/..",
            vec![("x-api-key", k.ok.clone())],
        ),
        ("GET", "/v1/%61nalyses/1", vec![("x-api-key", k.ro.clone())]),
        (
            "GET",
            "/v1/analyses/1",
            vec![("x-api-key", k.revoked.clone())],
        ),
        (
            "GET",
            "/v1/analyses/1",
            vec![("x-api-key", k.expired.clone())],
        ),
        (
            "GET",
            "/v1/analyses/1",
            vec![("x-api-key", k.test_env.clone())],
        ),
        (
            "GET",
            "/v1/analyses/1",
            vec![("x-api-key", k.suspended.clone())],
        ),
        (
            "GET",
            "/v1/analyses/1",
            vec![("x-api-key", k.payment.clone())],
        ),
        (
            "GET",
            "/v1/analyses/1",
            vec![("x-api-key", k.deactivated.clone())],
        ),
        (
            "GET",
            "/v1/analyses/1",
            vec![("x-api-key", mint("sk_live_"))],
        ),
        ("GET", "/v1/analyses/1", vec![("x-api-key", k.far.clone())]),
        ("GET", "/v1/analyses/1", vec![("x-api-key", k.web.clone())]),
        (
            "GET",
            "/v1/analyses/1",
            vec![
                ("x-api-key", k.web.clone()),
                ("origin", "https://app.example.com".into()),
            ],
        ),
        (
            "GET",
            "/v1/analyses/1",
            vec![
                ("x-api-key", k.web.clone()),
                ("referer", "https://evil.example.com/".into()),
            ],
        ),
        ("GET", "/v1/a;b", vec![("x-api-key", k.ok.clone())]),
        (
            "GET",
            "/v1/analyses/1",
            vec![
                ("x-api-key", k.ro.clone()),
                ("x-http-method-override", "DELETE".into()),
            ],
        ),
        (
            "GET",
            "/v1/analyses/1",
            vec![
                ("x-api-key", k.ro.clone()),
                ("x_http_method", "DELETE".into()),
            ],
        ),
        (
            "GET",
            "/v1/analyses/1",
            vec![
                ("x-api-key", k.ok.clone()),
                ("x-method-override", "GET".into()),
            ],
        ),
        (
            "GET",
            "/v1/analyses/1",
            vec![
                ("x-api-key", k.ok.clone()),
                ("x-original-url", "/v1/admin".into()),
            ],
        ),
        (
            "GET",
            "/v1/analyses/1",
            vec![
                ("x-api-key", k.ok.clone()),
                ("x_rewrite_url", "/v1/analyses/1/..".into()),
            ],
        ),
        (
            "GET",
            "/v1/analyses/1",
            vec![
                ("x-api-key", k.ok.clone()),
                ("X-Original-URL", "/v1/analyses//1?x=1".into()),
            ],
        ),
        (
            "GET",
            "/v1/analyses/1",
            vec![
                ("x-api-key", k.ok.clone()),
                ("x-original-url", "https://api.example/v1/analyses/1".into()),
            ],
        ),
        (
            "GET",
            "/v1/analyses/1",
            vec![("x-api-key", k.ok.clone()), ("x-rewrite-url", "".into())],
        ),
        // Two overrides that Envoy joins into the request's own path (the proxy and the
        // forward-auth front see two fields): a repeat on every front.
        (
            "GET",
            "/v1/analyses/1,/v1/admin",
            vec![
                ("x-api-key", k.ok.clone()),
                ("x-original-url", "/v1/analyses/1".into()),
                ("x-original-url", "/v1/admin".into()),
            ],
        ),
    ];
    for (method, path, headers) in &table {
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        upstream.clear();
        let via_proxy = send(&client(), method, &gate.url(path), &h, "").await;
        let via_ext = seen(&ask(addr, check_request(method, path, &h, "127.0.0.1")).await);
        let via_http = send(
            &client(),
            method,
            &format!("http://{authz}/authz{path}"),
            &h,
            "",
        )
        .await;
        let row = format!("{method} {path} {headers:?}");
        assert_eq!(via_proxy.status, via_ext.http, "{row}");
        assert_eq!(via_http.status, via_ext.http, "forward-auth: {row}");
        if via_ext.http == 200 {
            let up = upstream.last();
            let envoy = behind_envoy(&h, &via_ext);
            let envoy_http = behind_envoy_http(&h, &via_http);
            for name in COMPARED {
                assert_eq!(
                    up.headers.get(name).map(|v| v.to_str().unwrap()),
                    envoy.get(name).map(String::as_str),
                    "{name} for {row}"
                );
                assert_eq!(
                    up.headers.get(name).map(|v| v.to_str().unwrap()),
                    envoy_http.get(name).map(String::as_str),
                    "forward-auth: {name} for {row}"
                );
            }
            let sent_id = h.iter().find(|(k, _)| *k == "x-request-id");
            if let Some((_, id)) = sent_id {
                assert_eq!(up.headers["x-request-id"], *id, "{row}");
                assert_eq!(envoy["x-request-id"], *id, "{row}");
                assert_eq!(envoy_http["x-request-id"], *id, "forward-auth: {row}");
            }
            assert_eq!(up.headers.get_all("x-request-id").iter().count(), 1);
        } else {
            assert_eq!(upstream.count(), 0, "{row}");
            if method != &"HEAD" {
                assert_eq!(via_proxy.code(), via_ext.code, "{row}");
                assert_eq!(via_http.code(), via_ext.code, "forward-auth: {row}");
            }
            for name in ["www-authenticate", "retry-after"] {
                assert_eq!(
                    via_proxy.header(name),
                    via_ext.set.get(name).map(String::as_str),
                    "{name} for {row}"
                );
                assert_eq!(
                    via_http.header(name),
                    via_ext.set.get(name).map(String::as_str),
                    "forward-auth: {name} for {row}"
                );
            }
        }
    }

    // Where they part, on purpose: a path with segments to resolve. The proxy forwards what it
    // decided on; behind Envoy, nginx or Traefik the upstream gets the path as sent, and may
    // resolve it otherwise (`/v1/admin//../x` is `/v1/admin/x` to RFC 3986), so the check
    // fronts refuse it.
    let h = [("x-api-key", k.solo.as_str())];
    for path in [
        "/v1//analyses/./1",
        "/v1/admin/../analyses/1",
        "/v1/admin//../analyses/1",
        "/v1/admin/%2e%2e/analyses/1",
    ] {
        upstream.clear();
        let via_proxy = send(&client(), "GET", &gate.url(path), &h, "").await;
        assert_eq!(via_proxy.status, 200, "{path}");
        assert_eq!(upstream.last().target, "/v1/analyses/1", "{path}");
        let via_ext = seen(&ask(addr, check_request("GET", path, &h, "127.0.0.1")).await);
        assert_eq!(
            (via_ext.http, via_ext.code.as_str()),
            (400, "invalid_path"),
            "{path}"
        );
        let authz_url = format!("http://{authz}/authz{path}");
        let via_http = send(&client(), "GET", &authz_url, &h, "").await;
        assert_error(&via_http, 400, "invalid_path");
    }
    gate.stop().await;
}

/// Envoy keeps its gRPC channel open; shutting keygate down must not wait for it to close.
#[tokio::test]
async fn shutdown_does_not_wait_for_an_idle_grpc_channel() {
    let (gate, _snap, k, addr, _up) = start("").await;
    let mut c = AuthorizationClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let r = c
        .check(check_request(
            "GET",
            "/v1/analyses/1",
            &[("x-api-key", &k.ok)],
            "127.0.0.1",
        ))
        .await;
    assert_eq!(r.unwrap().into_inner().status.unwrap().code, 0);
    let start = std::time::Instant::now();
    tokio::time::timeout(std::time::Duration::from_secs(15), gate.stop())
        .await
        .expect("shutdown finished with a client channel still open");
    eprintln!("shutdown with an open channel took {:?}", start.elapsed());
    drop(c);
}

/// Envoy with `with_request_body` sends the body in the CheckRequest. One over tonic's default
/// 4 MiB decode limit must still get a CheckResponse: a gRPC error would be an allow under
/// `failure_mode_allow`.
#[tokio::test]
async fn a_large_check_request_is_decided_not_refused() {
    let (gate, _snap, k, addr, _up) = start("").await;
    for (key, grpc) in [(k.ok.as_str(), 0), ("sk_live_nope", 16)] {
        let mut req = check_request("POST", "/v1/analyses", &[("x-api-key", key)], "127.0.0.1");
        let http = req
            .attributes
            .as_mut()
            .and_then(|a| a.request.as_mut())
            .and_then(|r| r.http.as_mut())
            .unwrap();
        http.method = "GET".into();
        http.path = "/v1/analyses/1".into();
        http.body = "x".repeat(6 << 20);
        let r = ask(addr, req).await;
        assert_eq!(r.status.unwrap().code, grpc);
    }
    gate.stop().await;
}

/// Envoy's and Kubernetes' gRPC health checks can `Watch`: the stream says NOT_SERVING until a
/// snapshot is published, then SERVING, for the whole server and the Authorization service.
#[tokio::test]
async fn health_watch_turns_serving_when_a_snapshot_is_published() {
    let upstream = Upstream::start().await;
    let snap = SnapshotDir::new();
    let gate = Gate::start(&config_toml(&snap.path(), upstream.addr, EXT)).await;
    let addr = gate.app.as_ref().unwrap().ext_authz_addr.unwrap();
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut streams = Vec::new();
    for service in ["", "envoy.service.auth.v3.Authorization"] {
        let mut s = HealthClient::new(channel.clone())
            .watch(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .unwrap()
            .into_inner();
        let first = s.message().await.unwrap().unwrap().status;
        assert_eq!(first, ServingStatus::NotServing as i32, "{service:?}");
        streams.push(s);
    }
    let key = mint("sk_live_");
    snap.write(
        &Doc::new(1)
            .partner("partner_acme", None, "active")
            .key("key_a", &key, json!({})),
    );
    for mut s in streams {
        let next = tokio::time::timeout(std::time::Duration::from_secs(5), s.message())
            .await
            .expect("a status change within 5 s")
            .unwrap()
            .unwrap();
        assert_eq!(next.status, ServingStatus::Serving as i32);
    }
    gate.stop().await;
}

/// Shutdown with a health Watch open (gRPC clients watch health on every connection): the
/// stream says NOT_SERVING at once, Checks are still answered during shutdown.delay, then the
/// stream ends and shutdown completes without waiting out drain_timeout.
#[tokio::test]
async fn shutdown_ends_health_watches_instead_of_waiting_out_the_drain() {
    let (mut gate, _snap, k, addr, _up) =
        start("\n[shutdown]\ndelay = \"500ms\"\ndrain_timeout = \"20s\"\n").await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut watch = HealthClient::new(channel.clone())
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap().status;
    assert_eq!(first, ServingStatus::Serving as i32);

    let app = gate.app.take().unwrap();
    let started = std::time::Instant::now();
    let stopping = tokio::spawn(app.shutdown());
    let next = tokio::time::timeout(std::time::Duration::from_secs(2), watch.message())
        .await
        .expect("no status change within 2 s of shutdown")
        .unwrap()
        .unwrap();
    assert_eq!(next.status, ServingStatus::NotServing as i32);
    // Still deciding during the delay.
    let r = AuthorizationClient::new(channel.clone())
        .check(check_request(
            "GET",
            "/v1/analyses/1",
            &[("x-api-key", k.ok.as_str())],
            "127.0.0.1",
        ))
        .await
        .expect("a Check during shutdown.delay")
        .into_inner();
    assert_eq!(r.status.unwrap().code, 0);
    // The stream ends, and shutdown is done well before drain_timeout.
    let end = tokio::time::timeout(std::time::Duration::from_secs(5), watch.message())
        .await
        .expect("the health Watch stream did not end");
    assert!(!matches!(end, Ok(Some(_))), "{end:?}");
    drop(channel);
    tokio::time::timeout(std::time::Duration::from_secs(10), stopping)
        .await
        .expect("shutdown waited for the drain timeout")
        .unwrap();
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
}

/// Reads until the peer closes (or resets) the connection; `None` if still open after `within`.
async fn closed_within(
    stream: &mut tokio::net::TcpStream,
    within: std::time::Duration,
) -> Option<std::time::Duration> {
    use tokio::io::AsyncReadExt;
    let started = std::time::Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout_at((started + within).into(), stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => continue,
        }
    }
}

/// gRPC connections are held to the HTTP fronts' rules: one that sends half an HTTP/2 preface
/// and stops is closed once its first request is overdue (10 s), one left unused after its
/// Checks is closed an idle period later (`limits.idle_timeout`, checked from then on), though
/// keep-alive PINGs still flow on it, and a quiet health Watch stream whose client answers them
/// is not cut.
#[tokio::test]
async fn grpc_connections_that_hold_a_place_unused_are_closed() {
    use tokio::io::AsyncWriteExt;
    // Keep-alive PINGs well inside the idle period: a quiet stream in flight is kept while its
    // client answers them; an unused connection is not.
    let (gate, _snap, k, addr, _up) = start(
        "\n[limits]\nidle_timeout = \"1s\"\nhttp2_keep_alive_interval = \"200ms\"\nhttp2_keep_alive_timeout = \"1s\"\n",
    )
    .await;

    let mut half = tokio::net::TcpStream::connect(addr).await.unwrap();
    half.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();

    // A client that made a Check and then leaves its connection unused.
    let idle_channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let r = AuthorizationClient::new(idle_channel.clone())
        .check(check_request(
            "GET",
            "/v1/analyses/1",
            &[("x-api-key", k.ok.as_str())],
            "127.0.0.1",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.status.unwrap().code, 0);

    // A health Watch: a response stream that stays open.
    let watch_channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut watch = HealthClient::new(watch_channel.clone())
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.message().await.unwrap().unwrap().status,
        ServingStatus::Serving as i32
    );
    let open = "keygate_connections_open{front=\"ext_authz\"}";
    assert_eq!(gate.metric(open).await, Some(3.0));

    // Both the half preface and the unused connection are closed once the first-request
    // deadline (10 s) has passed and, for the used one, a whole idle period after it; the Watch
    // is not.
    let closed = closed_within(&mut half, std::time::Duration::from_secs(15)).await;
    let closed = closed.expect("a half-sent preface still held its connection after 15 s");
    assert!(closed >= std::time::Duration::from_secs(8), "{closed:?}");
    // Cut at its deadline: no goodbye's grace for a connection that never began a request.
    assert!(closed < std::time::Duration::from_secs(12), "{closed:?}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while gate.metric(open).await != Some(1.0) {
        assert!(
            std::time::Instant::now() < deadline,
            "the unused gRPC connection was not closed: {:?}",
            gate.metric(open).await
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let still = tokio::time::timeout(std::time::Duration::from_millis(300), watch.message()).await;
    assert!(still.is_err(), "the Watch stream ended: {still:?}");
    drop((watch, watch_channel, idle_channel));
    gate.stop().await;
}

/// Envoy keeps one HTTP/2 connection to its authorizer and sends every Check on it; if keygate
/// closed it for being unused without a word, a Check sent at that moment would fail, and with
/// `failure_mode_allow: false` the request it was for would be denied. So an unused connection
/// is told goodbye first: a GOAWAY naming no stream yet, then a PING; a Check that crossed the
/// GOAWAY is answered in full, and the final GOAWAY names it.
#[tokio::test]
async fn an_unused_grpc_connection_says_goodbye_and_answers_the_check_that_crossed_it() {
    use prost::Message;
    use std::time::{Duration, Instant};
    use support::h2_frames::*;
    let (gate, _snap, k, addr, _up) = start("\n[limits]\nidle_timeout = \"1s\"\n").await;
    let message = check_request(
        "GET",
        "/v1/analyses/1",
        &[("x-api-key", k.ok.as_str())],
        "127.0.0.1",
    )
    .encode_to_vec();
    let mut body = vec![0u8];
    body.extend_from_slice(&(message.len() as u32).to_be_bytes());
    body.extend_from_slice(&message);
    let authority = addr.to_string();
    let fields = [
        (":method", "POST"),
        (":scheme", "http"),
        (":authority", authority.as_str()),
        (":path", "/envoy.service.auth.v3.Authorization/Check"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ];
    // Reads stream `id`'s answer: its CheckResponse, once its trailers have ended it.
    async fn answer(h2: &mut RawH2, id: u32) -> CheckResponse {
        let mut data = Vec::new();
        loop {
            let f = h2.next(Duration::from_secs(5)).await.expect("the answer");
            assert!(!(f.kind == RST_STREAM && f.stream == id), "reset: {f:?}");
            if f.stream != id {
                continue;
            }
            if f.kind == DATA {
                data.extend_from_slice(&f.payload);
            }
            if f.kind == HEADERS && f.flags & END_STREAM != 0 {
                assert!(data.len() > 5, "no message before the trailers");
                return CheckResponse::decode(&data[5..]).unwrap();
            }
        }
    }
    let mut h2 = RawH2::connect(addr).await;
    h2.headers(1, &fields, false).await;
    h2.send(DATA, END_STREAM, 1, &body).await;
    let r = answer(&mut h2, 1).await;
    assert_eq!(r.status.unwrap().code, 0, "an allow");
    let used = Instant::now();

    // The connection is looked at first when its first request was due (10 s after the
    // accept), then every idle period: the GOAWAY comes 10 to 12 s from now.
    h2.idle_goodbye(used, Duration::from_secs(9), Duration::from_secs(15))
        .await;

    h2.headers(3, &fields, false).await;
    h2.send(DATA, END_STREAM, 3, &body).await;
    let r = answer(&mut h2, 3).await;
    assert_eq!(
        r.status.unwrap().code,
        0,
        "the Check that crossed the GOAWAY is allowed"
    );

    let last = h2.goodbye().await;
    assert_eq!(
        last,
        Some((3, 0)),
        "the final GOAWAY names the last Check answered"
    );
    gate.stop().await;
}
