//! Per-key rate limits (check 12) on every front: the exact 429 after the allowance, with
//! `Retry-After` and `X-RateLimit-*`; the headers on allowed answers; one allowance per key
//! shared by all fronts; recovery at the sustained rate; the per-environment and default quotas;
//! refused requests never reach the upstream.

mod support;

use std::time::{Duration, Instant};

use envoy_types::ext_authz::v3::pb::{CheckRequest, HttpResponse};
use envoy_types::pb::envoy::config::core::v3::{address, Address, SocketAddress};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Peer, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
use serde_json::json;
use support::*;

const FRONTS: &str =
    "[ext_authz]\nlisten = \"127.0.0.1:0\"\n[authz_http]\nlisten = \"127.0.0.1:0\"\n";

fn check_request(key: &str) -> CheckRequest {
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(Peer {
                address: Some(Address {
                    address: Some(address::Address::SocketAddress(SocketAddress {
                        address: "127.0.0.1".to_owned(),
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            }),
            request: Some(Request {
                http: Some(HttpRequest {
                    method: "GET".into(),
                    path: "/v1/analyses/1".into(),
                    host: "api.example.com".into(),
                    headers: [("x-api-key".to_owned(), key.to_owned())].into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

/// (status, X-RateLimit-Limit, -Remaining, -Reset, Retry-After) from each front.
type Seen = (
    u16,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
);

async fn via_proxy(gate: &Gate, key: &str) -> Seen {
    let a = get(
        &client(),
        &gate.url("/v1/analyses/1"),
        &[("x-api-key", key)],
    )
    .await;
    let h = |n: &str| a.header(n).map(str::to_owned);
    (
        a.status,
        h("x-ratelimit-limit"),
        h("x-ratelimit-remaining"),
        h("x-ratelimit-reset"),
        h("retry-after"),
    )
}

async fn via_forward_auth(gate: &Gate, key: &str) -> Seen {
    let url = format!(
        "http://{}/authz/v1/analyses/1",
        gate.app().authz_http_addr.unwrap()
    );
    let a = get(&client(), &url, &[("x-api-key", key)]).await;
    let h = |n: &str| a.header(n).map(str::to_owned);
    (
        a.status,
        h("x-ratelimit-limit"),
        h("x-ratelimit-remaining"),
        h("x-ratelimit-reset"),
        h("retry-after"),
    )
}

async fn via_ext_authz(gate: &Gate, key: &str) -> Seen {
    let addr = gate.app().ext_authz_addr.unwrap();
    let mut c = AuthorizationClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let r = c.check(check_request(key)).await.unwrap().into_inner();
    let (status, headers) = match r.http_response.unwrap() {
        // Allowed: the client's response gets the headers through response_headers_to_add.
        HttpResponse::OkResponse(ok) => (200, ok.response_headers_to_add),
        HttpResponse::DeniedResponse(d) => (d.status.unwrap().code as u16, d.headers),
        other => panic!("{other:?}"),
    };
    let h = |n: &str| {
        headers
            .iter()
            .filter_map(|h| h.header.as_ref())
            .find(|h| h.key == n)
            .map(|h| h.value.clone())
    };
    (
        status,
        h("x-ratelimit-limit"),
        h("x-ratelimit-remaining"),
        h("x-ratelimit-reset"),
        h("retry-after"),
    )
}

fn s(v: &str) -> Option<String> {
    Some(v.to_owned())
}

#[tokio::test]
async fn the_allowance_is_exact_and_shared_by_every_front() {
    let upstream = Upstream::start().await;
    let snap = SnapshotDir::new();
    let (key, other) = (mint("sk_live_"), mint("sk_live_"));
    snap.write(
        &Doc::new(1)
            .partner("partner_acme", Some("org_1"), "active")
            .key("key_a", &key, json!({"rate_limit_per_minute": 6}))
            .key("key_b", &other, json!({"rate_limit_per_minute": 6})),
    );
    // 6 per minute, half a minute of burst: 3 at once, then one every 10 s.
    let gate = Gate::start(&config_toml(
        &snap.path(),
        upstream.addr,
        &format!("{FRONTS}[rate_limit]\nburst = \"30s\"\n"),
    ))
    .await;

    assert_eq!(
        via_proxy(&gate, &key).await,
        (200, s("6"), s("2"), s("10"), None)
    );
    assert_eq!(
        via_forward_auth(&gate, &key).await,
        (200, s("6"), s("1"), s("20"), None)
    );
    assert_eq!(
        via_ext_authz(&gate, &key).await,
        (200, s("6"), s("0"), s("30"), None)
    );
    // The fourth, whichever front it comes through, is refused: Retry-After is the 10 s until
    // the next slot.
    for seen in [
        via_proxy(&gate, &key).await,
        via_forward_auth(&gate, &key).await,
        via_ext_authz(&gate, &key).await,
    ] {
        let (status, limit, remaining, _, retry) = seen.clone();
        assert_eq!(
            (status, limit, remaining),
            (429, s("6"), s("0")),
            "{seen:?}"
        );
        let retry: u64 = retry.expect("Retry-After").parse().unwrap();
        assert!((9..=10).contains(&retry), "{seen:?}");
    }
    let a = get(
        &client(),
        &gate.url("/v1/analyses/1"),
        &[("x-api-key", &key)],
    )
    .await;
    assert_error(&a, 429, "rate_limited");
    assert_eq!(
        upstream.count(),
        1,
        "only the allowed proxy request reached the upstream"
    );
    // Counted and logged as what they were: denials with code rate_limited, on every front.
    let counted = |front: &str, code: &str| {
        format!("keygate_requests_total{{front=\"{front}\",code=\"{code}\"}}")
    };
    for (front, allowed, limited) in [
        ("proxy", 1.0, 2.0),
        ("authz_http", 1.0, 1.0),
        ("ext_authz", 1.0, 1.0),
    ] {
        assert_eq!(
            gate.metric(&counted(front, "allowed")).await,
            Some(allowed),
            "{front}"
        );
        assert_eq!(
            gate.metric(&counted(front, "rate_limited")).await,
            Some(limited),
            "{front}"
        );
    }
    // Another key has its own allowance.
    assert_eq!(via_proxy(&gate, &other).await.0, 200);
    gate.stop().await;
}

#[tokio::test]
async fn the_allowance_comes_back_at_the_sustained_rate() {
    let upstream = Upstream::start().await;
    let snap = SnapshotDir::new();
    let key = mint("sk_live_");
    snap.write(&Doc::new(1).partner("partner_acme", None, "active").key(
        "key_a",
        &key,
        json!({"rate_limit_per_minute": 600}),
    ));
    // 600 per minute with a burst of 0.5 s worth: 5 at once, then one every 100 ms.
    let gate = Gate::start(&config_toml(
        &snap.path(),
        upstream.addr,
        "[rate_limit]\nburst = \"500ms\"\n",
    ))
    .await;
    let t = Instant::now();
    let mut allowed = 0;
    while via_proxy(&gate, &key).await.0 == 200 {
        allowed += 1;
    }
    // Requests take time too; at most one slot can have come back meanwhile.
    let slack = (t.elapsed().as_millis() / 100) as i32 + 1;
    assert!(
        (5..=5 + slack).contains(&allowed),
        "allowed {allowed} (slack {slack})"
    );
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(via_proxy(&gate, &key).await.0, 200, "one slot per 100 ms");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (status, _, remaining, _, _) = via_proxy(&gate, &key).await;
    assert_eq!(
        (status, remaining),
        (200, s("4")),
        "the whole burst after 0.5 s idle"
    );
    gate.stop().await;
}

#[tokio::test]
async fn environment_and_default_quotas_apply_to_keys_without_their_own() {
    let upstream = Upstream::start().await;
    let snap = SnapshotDir::new();
    let (live, test, own) = (mint("sk_live_"), mint("sk_test_"), mint("sk_live_"));
    snap.write(
        &Doc::new(1)
            .partner("partner_acme", None, "active")
            .key("key_live", &live, json!({}))
            .key("key_test", &test, json!({"environment": "test"}))
            .key("key_own", &own, json!({"rate_limit_per_minute": 3})),
    );
    // This keygate serves the live environment; a test key is refused before any limit, so the
    // per-environment entry is checked on a live keygate with live keys: default 2, live 1.
    let gate = Gate::start(&config_toml(
        &snap.path(),
        upstream.addr,
        "[rate_limit]\ndefault_per_minute = 2\n[rate_limit.per_environment]\nlive = 1\n",
    ))
    .await;
    assert_eq!(via_proxy(&gate, &live).await.1, s("1"));
    assert_eq!(via_proxy(&gate, &live).await.0, 429);
    assert_eq!(
        via_proxy(&gate, &own).await.1,
        s("3"),
        "the key's own limit wins"
    );
    // Refused at check 2, before the limiter: never counted, never limited.
    assert_eq!(via_proxy(&gate, &test).await.0, 403);
    gate.stop().await;

    // Without any quota configured, a key without rate_limit_per_minute is not limited and
    // gets no X-RateLimit-* headers.
    let gate = Gate::start(&config_toml(&snap.path(), upstream.addr, "")).await;
    for _ in 0..20 {
        assert_eq!(via_proxy(&gate, &live).await, (200, None, None, None, None));
    }
    gate.stop().await;
}
