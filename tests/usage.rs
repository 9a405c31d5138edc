//! `GET /usage` on the admin listener: per-key request counts, denials by code and
//! `last_used_at`, correct under concurrency and shared by every front.

mod support;

use std::time::Duration;

use serde_json::json;
use support::*;

#[tokio::test]
async fn usage_counts_every_front_under_concurrency() {
    let upstream = Upstream::start().await;
    let snap = SnapshotDir::new();
    let (a, revoked, limited) = (mint("sk_live_"), mint("sk_live_"), mint("sk_live_"));
    snap.write(
        &Doc::new(1)
            .partner("partner_acme", None, "active")
            .key("key_a", &a, json!({}))
            .key("key_revoked", &revoked, json!({"status": "revoked"}))
            .key("key_limited", &limited, json!({"rate_limit_per_minute": 5})),
    );
    let gate = std::sync::Arc::new(
        Gate::start(&config_toml(
            &snap.path(),
            upstream.addr,
            "[authz_http]\nlisten = \"127.0.0.1:0\"\n",
        ))
        .await,
    );
    let before = keygate::decision::now_ms();

    // 8 clients × 25 allowed requests, 8 × 5 with a revoked key, 8 × 2 with an unknown key.
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (gate, a, revoked) = (gate.clone(), a.clone(), revoked.clone());
            tokio::spawn(async move {
                let c = client();
                let url = gate.url("/v1/analyses/1");
                for _ in 0..25 {
                    assert_eq!(get(&c, &url, &[("x-api-key", &a)]).await.status, 200);
                }
                for _ in 0..5 {
                    assert_eq!(get(&c, &url, &[("x-api-key", &revoked)]).await.status, 401);
                }
                for _ in 0..2 {
                    let unknown = mint("sk_live_");
                    assert_eq!(get(&c, &url, &[("x-api-key", &unknown)]).await.status, 401);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    // The forward-auth front counts into the same usage.
    let authz = format!(
        "http://{}/authz/v1/analyses/1",
        gate.app().authz_http_addr.unwrap()
    );
    assert_eq!(
        get(&client(), &authz, &[("x-api-key", &a)]).await.status,
        200
    );
    // 5 allowed, then 3 rate limited.
    for i in 0..8 {
        let s = get(
            &client(),
            &gate.url("/v1/analyses/1"),
            &[("x-api-key", &limited)],
        )
        .await
        .status;
        assert_eq!(s, if i < 5 { 200 } else { 429 });
    }
    let after = keygate::decision::now_ms();

    let r = get(&client(), &format!("http://{}/usage", gate.admin), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let u = r.json();
    let key = |id: &str| {
        u["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["key_id"] == id)
            .unwrap_or_else(|| panic!("{id} missing: {u}"))
            .clone()
    };
    let ka = key("key_a");
    assert_eq!(ka["requests"], 201);
    assert_eq!(ka["denied"], json!({}));
    let last = time::OffsetDateTime::parse(
        ka["last_used_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let last_ms = (last.unix_timestamp_nanos() / 1_000_000) as i64;
    assert!(
        (before..=after).contains(&last_ms),
        "{last_ms} not in {before}..={after}"
    );

    let kr = key("key_revoked");
    assert_eq!(kr["requests"], 0);
    assert_eq!(kr["denied"], json!({"key_revoked": 40}));
    assert!(kr["last_used_at"].is_null(), "a refused key was not used");

    let kl = key("key_limited");
    assert_eq!(kl["requests"], 5);
    assert_eq!(kl["denied"], json!({"rate_limited": 3}));

    assert_eq!(u["denied_without_key"], json!({"invalid_api_key": 16}));
    // Never a secret or a digest: only ids.
    let text = u.to_string();
    for secret in [&a, &revoked, &limited] {
        assert!(!text.contains(secret.as_str()));
        assert!(!text.contains(&digest(secret)[7..]));
    }
    match std::sync::Arc::try_unwrap(gate) {
        Ok(g) => g.stop().await,
        Err(_) => panic!("gate still shared"),
    }
}

/// A snapshot of one key, `key_a`, and its secret.
fn one_key() -> (SnapshotDir, String) {
    let snap = SnapshotDir::new();
    let a = mint("sk_live_");
    snap.write(
        &Doc::new(1)
            .partner("partner_acme", None, "active")
            .key("key_a", &a, json!({})),
    );
    (snap, a)
}

/// `/usage` is written at most once a second (off the runtime's thread): asked again within
/// the second, the same document; after it, the counts since.
#[tokio::test]
async fn the_usage_document_is_written_at_most_once_a_second() {
    let upstream = Upstream::start().await;
    let (snap, a) = one_key();
    let gate = Gate::start(&config_toml(&snap.path(), upstream.addr, "")).await;
    let usage = || async {
        let r = get(&client(), &format!("http://{}/usage", gate.admin), &[]).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some("application/json"));
        r.json()
    };
    let requests = |u: &serde_json::Value| {
        u["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["key_id"] == "key_a")
            .map_or(0, |k| k["requests"].as_u64().unwrap())
    };
    let url = gate.url("/v1/analyses/1");
    assert_eq!(get(&client(), &url, &[("x-api-key", &a)]).await.status, 200);
    let first = usage().await;
    let written = std::time::Instant::now();
    assert_eq!(requests(&first), 1);
    assert_eq!(get(&client(), &url, &[("x-api-key", &a)]).await.status, 200);
    let again = usage().await;
    if written.elapsed() < Duration::from_millis(900) {
        assert_eq!(again, first, "written again within the second");
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(requests(&usage().await), 2);
    gate.stop().await;
}

#[tokio::test]
async fn usage_reports_arrive_once_through_a_receiver_outage_and_on_shutdown() {
    use std::sync::atomic::Ordering::SeqCst;
    let upstream = Upstream::start().await;
    let (snap, a) = one_key();
    let receiver = UsageReceiver::start().await;
    let usage = |interval: &str| {
        format!(
            "[usage]\nreport_url = \"http://{}/v1/usage\"\ntoken_env = \"USAGE_TOKEN\"\ninterval = \"{interval}\"\ntimeout = \"1s\"\n",
            receiver.addr
        )
    };
    let env = [("USAGE_TOKEN", "usage-token")];
    let gate = Gate::start_with_env(
        &config_toml(&snap.path(), upstream.addr, &usage("100ms")),
        &env,
    )
    .await;
    let hit = |n: usize| {
        let (url, a) = (gate.url("/v1/analyses/1"), a.clone());
        async move {
            for _ in 0..n {
                assert_eq!(get(&client(), &url, &[("x-api-key", &a)]).await.status, 200);
            }
        }
    };
    hit(10).await;
    assert!(
        eventually(std::time::Duration::from_secs(3), || receiver
            .requests("key_a")
            .0
            == 10)
        .await
    );

    // The receiver goes away (503s): batches queue up and are retried…
    receiver.failing.store(true, SeqCst);
    let tried = receiver.attempts.load(SeqCst);
    hit(7).await;
    assert!(
        eventually(std::time::Duration::from_secs(3), || receiver
            .attempts
            .load(SeqCst)
            >= tried + 3)
        .await
    );
    assert_eq!(receiver.requests("key_a").0, 10);
    hit(3).await;
    // …and when it is back, every count arrives, once.
    receiver.failing.store(false, SeqCst);
    assert!(
        eventually(std::time::Duration::from_secs(3), || receiver
            .requests("key_a")
            .0
            == 20)
        .await
    );
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(receiver.requests("key_a"), (20, false));

    // The receiver restarts (connections refused meanwhile, open ones cut): nothing is lost,
    // nothing counted twice.
    receiver.stop();
    tokio::task::yield_now().await;
    assert!(
        tokio::net::TcpStream::connect(receiver.addr).await.is_err(),
        "the receiver still accepts"
    );
    hit(6).await;
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    assert_eq!(receiver.requests("key_a").0, 20);
    receiver.restart().await;
    assert!(
        eventually(std::time::Duration::from_secs(5), || receiver
            .requests("key_a")
            .0
            == 26)
        .await
    );
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(receiver.requests("key_a"), (26, false));
    gate.stop().await;

    // A keygate that reports hourly still reports what it counted when it stops.
    let gate = Gate::start_with_env(
        &config_toml(&snap.path(), upstream.addr, &usage("1h")),
        &env,
    )
    .await;
    for _ in 0..4 {
        assert_eq!(
            get(&client(), &gate.url("/v1/analyses/1"), &[("x-api-key", &a)])
                .await
                .status,
            200
        );
    }
    assert_eq!(receiver.requests("key_a").0, 26);
    gate.stop().await;
    assert_eq!(
        receiver.requests("key_a"),
        (30, false),
        "flushed on shutdown"
    );
}
