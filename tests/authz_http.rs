//! The forward-auth front as its three callers use it: nginx `auth_request` (`/authz` with
//! `X-Original-URI`/`-Method`), Traefik `ForwardAuth` (`/authz` with `X-Forwarded-Uri`/`-Method`/
//! `-Host`) and Envoy `http_service` (`/authz` + the original path, original method). Same
//! decisions as the proxy, never a 5xx.

mod support;

use std::net::SocketAddr;

use serde_json::json;
use support::*;

struct Keys {
    reader: String,
    writer: String,
    solo: String,
    revoked: String,
}

async fn start(with_snapshot: bool) -> (Gate, SnapshotDir, Keys, SocketAddr) {
    let upstream = Upstream::start().await;
    let snap = SnapshotDir::new();
    let k = Keys {
        reader: mint("sk_live_"),
        writer: mint("sk_live_"),
        solo: mint("sk_live_"),
        revoked: mint("sk_live_"),
    };
    if with_snapshot {
        snap.write(&doc(&k));
    }
    let extra = "[authz_http]\nlisten = \"127.0.0.1:0\"\ntrusted_proxies = [\"127.0.0.1/32\"]\n";
    let gate = Gate::start(&config_toml(&snap.path(), upstream.addr, extra)).await;
    let addr = gate
        .app
        .as_ref()
        .unwrap()
        .authz_http_addr
        .expect("authz_http configured");
    (gate, snap, k, addr)
}

fn doc(k: &Keys) -> Doc {
    Doc::new(1)
        .partner("partner_acme", Some("org_1"), "active")
        .partner("partner_solo", None, "active")
        .key("key_reader", &k.reader, json!({}))
        .key(
            "key_writer",
            &k.writer,
            json!({"scopes": ["analyses:read", "analyses:write"]}),
        )
        .key(
            "key_solo",
            &k.solo,
            json!({"partner_id": "partner_solo", "allowed_cidrs": ["198.51.100.0/24"]}),
        )
        .key("key_revoked", &k.revoked, json!({"status": "revoked"}))
}

async fn ask(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> Answer {
    send(
        &client(),
        method,
        &format!("http://{addr}{path}"),
        headers,
        "",
    )
    .await
}

#[tokio::test]
async fn nginx_auth_request_style() {
    let (gate, _snap, k, addr) = start(true).await;
    let key = k.writer.as_str();
    let a = ask(
        addr,
        "GET",
        "/authz",
        &[
            ("x-original-uri", "/v1/analyses?limit=5"),
            ("x-original-method", "POST"),
            ("x-api-key", key),
        ],
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert!(a.body.is_empty());
    assert_eq!(a.header("x-partner-id"), Some("partner_acme"));
    assert_eq!(a.header("x-org-id"), Some("org_1"));
    assert_eq!(a.header("x-key-id"), Some("key_writer"));
    assert_eq!(a.header("x-key-environment"), Some("live"));
    assert_eq!(a.header("x-scopes"), Some("analyses:read analyses:write"));
    assert_eq!(a.header("x-request-id").map(str::len), Some(32));
    assert_eq!(
        a.header("x-envoy-auth-headers-to-remove"),
        Some("x-api-key")
    );
    // A credential header spelled with `_` is named for removal too.
    let a = ask(
        addr,
        "GET",
        "/authz",
        &[
            ("x-original-uri", "/v1/analyses"),
            ("x-original-method", "POST"),
            ("x-api-key", key),
            ("x_api_key", &k.reader),
        ],
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(
        a.header("x-envoy-auth-headers-to-remove"),
        Some("x-api-key,x_api_key")
    );

    // The method that is checked is the original one: POST needs analyses:write.
    let reader = format!("Bearer {}", k.reader);
    let a = ask(
        addr,
        "GET",
        "/authz",
        &[
            ("x-original-uri", "/v1/analyses"),
            ("x-original-method", "POST"),
            ("authorization", &reader),
        ],
    )
    .await;
    assert_error(&a, 403, "scope_required");

    // Codes and headers of the contract.
    let a = ask(
        addr,
        "GET",
        "/authz",
        &[
            ("x-original-uri", "/v1/analyses/1"),
            ("x-original-method", "GET"),
        ],
    )
    .await;
    assert_error(&a, 401, "authentication_required");
    assert_eq!(
        a.header("www-authenticate"),
        Some("Bearer realm=\"keygate\"")
    );
    let a = ask(
        addr,
        "GET",
        "/authz",
        &[
            ("x-original-uri", "/v1/analyses/1"),
            ("x-original-method", "GET"),
            ("x-api-key", &k.revoked),
        ],
    )
    .await;
    assert_error(&a, 401, "key_revoked");

    // The original path is normalized like the proxy's, but nginx forwards it as sent: one
    // with segments to resolve is refused (the upstream may resolve them otherwise).
    for (uri, status, code) in [
        ("/v1/analyses%2F1", 400, "invalid_path"),
        ("/v1/%61nalyses/1", 200, ""),
        ("/v1/x/../analyses/1", 400, "invalid_path"),
        ("/v1//analyses/1", 400, "invalid_path"),
        ("/%2e%2e/v1/analyses/1", 400, "invalid_path"),
    ] {
        let a = ask(
            addr,
            "GET",
            "/authz",
            &[
                ("x-original-uri", uri),
                ("x-original-method", "GET"),
                ("x-api-key", key),
            ],
        )
        .await;
        if status == 200 {
            assert_eq!(a.status, 200, "{uri}");
        } else {
            assert_error(&a, status, code);
        }
    }

    // Without the original method there is nothing safe to check.
    let a = ask(
        addr,
        "GET",
        "/authz",
        &[("x-original-uri", "/v1/analyses/1"), ("x-api-key", key)],
    )
    .await;
    assert_error(&a, 400, "invalid_request");
    gate.stop().await;
}

#[tokio::test]
async fn traefik_forward_auth_style() {
    let (gate, _snap, k, addr) = start(true).await;
    let a = ask(
        addr,
        "GET",
        "/authz",
        &[
            ("x-forwarded-uri", "/v1/analyses/3"),
            ("x-forwarded-method", "GET"),
            ("x-forwarded-host", "api.example.com"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-for", "198.51.100.7"),
            ("authorization", &format!("Bearer {}", k.solo)),
            ("x-org-id", "org_spoofed"),
            ("x_partner_id", "partner_evil"),
        ],
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.header("x-partner-id"), Some("partner_solo"));
    assert!(a.header("x-org-id").is_none(), "no org: none is invented");
    // The credential, and the spoofed identity headers keygate does not overwrite, go.
    let remove = a.header("x-envoy-auth-headers-to-remove").unwrap();
    let mut remove: Vec<&str> = remove.split(',').collect();
    remove.sort();
    assert_eq!(remove, ["authorization", "x-org-id", "x_partner_id"]);
    // Named also when the caller did not pass the client's on (Envoy's HTTP service sends only
    // its allowed_headers): the client may have sent it all the same.
    let a = ask(
        addr,
        "GET",
        "/authz",
        &[
            ("x-forwarded-uri", "/v1/analyses/3"),
            ("x-forwarded-method", "GET"),
            ("x-forwarded-for", "198.51.100.7"),
            ("authorization", &format!("Bearer {}", k.solo)),
        ],
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(
        a.header("x-envoy-auth-headers-to-remove"),
        Some("x-org-id,authorization")
    );

    // The client IP comes from X-Forwarded-For because the caller (127.0.0.1) is trusted.
    let a = ask(
        addr,
        "GET",
        "/authz",
        &[
            ("x-forwarded-uri", "/v1/analyses/3"),
            ("x-forwarded-method", "GET"),
            ("x-forwarded-for", "203.0.113.9"),
            ("x-api-key", &k.solo),
        ],
    )
    .await;
    assert_error(&a, 403, "ip_not_allowed");
    gate.stop().await;
}

#[tokio::test]
async fn a_client_cannot_steer_the_check_to_another_request() {
    let (gate, _snap, k, addr) = start(true).await;
    // Behind nginx, the client's own X-Forwarded-Uri reaches /authz next to nginx's
    // X-Original-URI; behind Traefik, the reverse. Disagreement is refused.
    for (orig, fwd) in [
        ("/v1/admin", "/v1/analyses/1"),
        ("/v1/analyses/1", "/v1/admin"),
    ] {
        let a = ask(
            addr,
            "GET",
            "/authz",
            &[
                ("x-original-uri", orig),
                ("x-forwarded-uri", fwd),
                ("x-original-method", "GET"),
                ("x-forwarded-method", "GET"),
                ("x-api-key", &k.reader),
            ],
        )
        .await;
        assert_error(&a, 400, "invalid_request");
    }
    for (orig, fwd) in [("GET", "POST"), ("POST", "GET")] {
        let a = ask(
            addr,
            "GET",
            "/authz",
            &[
                ("x-original-uri", "/v1/analyses"),
                ("x-original-method", orig),
                ("x-forwarded-method", fwd),
                ("x-api-key", &k.reader),
            ],
        )
        .await;
        assert_error(&a, 400, "invalid_request");
    }
    // An original method that is no method (empty, or not a token) names no request: it would
    // match no method's rule, and an unmatched request may be let through.
    for method in ["", "PO ST", "G(E)T"] {
        let a = ask(
            addr,
            "GET",
            "/authz",
            &[
                ("x-forwarded-uri", "/v1/analyses"),
                ("x-forwarded-method", method),
                ("x-api-key", &k.reader),
            ],
        )
        .await;
        assert_error(&a, 400, "invalid_request");
    }
    // An ask on `/authz/` in any spelling (`/authz//`, `/authz/.`) that names an original
    // request is nginx's or Traefik's, never a check of `/` with the ask's own method.
    for ask_path in ["/authz/", "/authz//", "/authz/.", "/authz/%2e"] {
        let a = ask(
            addr,
            "POST",
            ask_path,
            &[
                ("x-original-uri", "/v1/analyses"),
                ("x-original-method", "POST"),
                ("x-api-key", &k.reader),
            ],
        )
        .await;
        assert_error(&a, 403, "scope_required");
    }
    gate.stop().await;
}

#[tokio::test]
async fn envoy_http_service_style() {
    let (gate, _snap, k, addr) = start(true).await;
    let key = k.writer.as_str();
    let a = ask(
        addr,
        "POST",
        "/authz/v1/analyses?x=1",
        &[("x-api-key", key)],
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.header("x-key-id"), Some("key_writer"));
    let reader = k.reader.as_str();
    let a = ask(addr, "POST", "/authz/v1/analyses", &[("x-api-key", reader)]).await;
    assert_error(&a, 403, "scope_required");
    // The query never affects the decision; the path is normalized, and refused where Envoy
    // would forward segments unresolved.
    let a = ask(
        addr,
        "GET",
        "/authz/v1/%61nalyses/7?path=/v1/analyses",
        &[("x-api-key", reader)],
    )
    .await;
    assert_eq!(a.status, 200);
    let a = ask(
        addr,
        "GET",
        "/authz/v1//analyses/./7?path=/v1/analyses",
        &[("x-api-key", reader)],
    )
    .await;
    assert_error(&a, 400, "invalid_path");
    let a = ask(
        addr,
        "GET",
        "/authz/v1/analyses/%5C7",
        &[("x-api-key", reader)],
    )
    .await;
    assert_error(&a, 400, "invalid_path");
    // The root: Envoy asks on the prefix and "/", with or without a query.
    for root in ["/authz/", "/authz/?page=2"] {
        let a = ask(addr, "GET", root, &[("x-api-key", reader)]).await;
        assert_eq!(a.status, 200, "{root}: {:?}", a.body);
        assert_eq!(a.header("x-key-id"), Some("key_reader"));
        let a = ask(addr, "GET", root, &[]).await;
        assert_error(&a, 401, "authentication_required");
    }
    // nginx or Traefik asking on "/authz/" (a proxy_pass with a trailing slash) still have
    // their headers read, and a missing half is refused, not taken as a check of "/".
    let a = ask(
        addr,
        "GET",
        "/authz/",
        &[
            ("x-original-uri", "/v1/analyses"),
            ("x-original-method", "POST"),
            ("x-api-key", reader),
        ],
    )
    .await;
    assert_error(&a, 403, "scope_required");
    let a = ask(
        addr,
        "GET",
        "/authz/",
        &[("x-forwarded-method", "GET"), ("x-api-key", reader)],
    )
    .await;
    assert_error(&a, 400, "invalid_request");
    // Overrides naming another method or path than the one checked (or none) are refused here
    // too. Envoy's HTTP service joins a repeated field's values with commas: in its form
    // (`/authz/<path>`) an override with a comma counts as a repeat; not in nginx's (below).
    for (path, field) in [
        ("/authz/v1/analyses/1", ("x-http-method-override", "DELETE")),
        ("/authz/v1/analyses/1", ("x-original-url", "/v1/admin")),
        (
            "/authz/v1/analyses/1",
            ("x-original-url", "http://api.example/v1/admin"),
        ),
        ("/authz/v1/analyses/1", ("x-original-url", "")),
        (
            "/authz/v1/analyses/1,/v1/admin",
            ("x-original-url", "/v1/analyses/1,/v1/admin"),
        ),
    ] {
        let a = ask(addr, "GET", path, &[("x-api-key", reader), field]).await;
        assert_error(&a, 400, "invalid_request");
    }
    let a = ask(
        addr,
        "GET",
        "/authz",
        &[
            ("x-api-key", reader),
            ("x-original-method", "GET"),
            ("x-original-uri", "/v1/analyses/1?ids=1,2"),
            ("x-original-url", "/v1/analyses/1?ids=1,2"),
        ],
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    // ingress-nginx's auth-url sends the request's own URL, absolute: that is the path checked.
    let a = ask(
        addr,
        "GET",
        "/authz/v1/analyses/1",
        &[
            ("x-api-key", reader),
            ("x-original-url", "https://api.example/v1/analyses/1?page=2"),
        ],
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    // Anything else is not a check.
    let counted =
        |code: &str| format!("keygate_requests_total{{front=\"authz_http\",code=\"{code}\"}}");
    let malformed = gate.metric(&counted("invalid_request")).await;
    let a = ask(addr, "GET", "/v1/analyses/1", &[("x-api-key", reader)]).await;
    assert_eq!(a.status, 404);
    assert_eq!(a.json()["error"]["code"], "not_found");
    assert_eq!(a.json()["error"]["type"], "invalid_request_error");
    // Counted under the code its body says, not as a malformed ask.
    assert_eq!(gate.metric(&counted("not_found")).await, Some(1.0));
    assert_eq!(gate.metric(&counted("invalid_request")).await, malformed);
    gate.stop().await;
}

#[tokio::test]
async fn no_snapshot_is_403_never_5xx() {
    let (gate, snap, k, addr) = start(false).await;
    let a = ask(
        addr,
        "GET",
        "/authz/v1/analyses/1",
        &[("x-api-key", &k.reader)],
    )
    .await;
    assert_error(&a, 403, "snapshot_unavailable");
    snap.write(&doc(&k));
    gate.wait_revision(1).await;
    let a = ask(
        addr,
        "GET",
        "/authz/v1/analyses/1",
        &[("x-api-key", &k.reader)],
    )
    .await;
    assert_eq!(a.status, 200);
    gate.stop().await;
}
