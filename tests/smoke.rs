//! The shortest end-to-end path: one allowed request through the real proxy to a real upstream.

mod support;

use serde_json::json;
use support::*;

#[tokio::test]
async fn allowed_request_reaches_upstream_with_identity() {
    for flavor in ["thread_per_core", "multi_thread", "current_thread"] {
        allowed_request_with_runtime(flavor).await;
    }
}

async fn allowed_request_with_runtime(flavor: &str) {
    let upstream = Upstream::start().await;
    let snap = SnapshotDir::new();
    let key = mint("sk_live_");
    snap.write(
        &Doc::new(1)
            .partner("partner_acme", Some("org_1"), "active")
            .key(
                "key_a",
                &key,
                json!({"scopes": ["analyses:write", "analyses:read"]}),
            ),
    );
    let runtime = format!("[runtime]\nflavor = \"{flavor}\"\nworker_threads = 2\n");
    let gate = Gate::start(&config_toml(&snap.path(), upstream.addr, &runtime)).await;
    let auth = format!("Bearer {key}");
    // Several connections, so that with two proxy threads both serve some.
    for _ in 0..8 {
        let a = get(
            &client(),
            &gate.url("/v1/analyses/7"),
            &[("authorization", &auth)],
        )
        .await;
        assert_eq!(a.status, 200, "{flavor}: {:?}", a.body);
    }
    let c = client();
    let a = get(
        &c,
        &gate.url("/v1/analyses/7?x=1"),
        &[("authorization", &auth)],
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.header("x-upstream"), Some("yes"));
    assert!(
        a.header("x-upstream-secret").is_none(),
        "Connection-listed response header leaked"
    );
    let seen = upstream.last();
    assert_eq!(seen.target, "/v1/analyses/7?x=1");
    assert_eq!(seen.headers["x-partner-id"], "partner_acme");
    assert_eq!(seen.headers["x-org-id"], "org_1");
    assert_eq!(seen.headers["x-key-id"], "key_a");
    assert_eq!(seen.headers["x-key-environment"], "live");
    assert_eq!(seen.headers["x-scopes"], "analyses:read analyses:write");
    assert!(seen.headers.get("authorization").is_none());
    assert_eq!(
        seen.headers["x-request-id"],
        a.header("x-request-id").unwrap()
    );
    gate.stop().await;
}
