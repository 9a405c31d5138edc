//! `rate_limit.backend = "redis"`: two keygates share one allowance through a real
//! `redis-server`; with Redis stopped, each falls back to its local limiter (limits still hold,
//! per replica) and shares again once Redis is back.

mod support;

use std::time::Duration;

use serde_json::json;
use support::*;

/// Send requests with `probe` until Redis (not the local fallback) has decided one.
async fn wait_answered(gate: &Gate, probe: &str) {
    use std::sync::atomic::Ordering::Relaxed;
    let redis = gate.app().limits.redis.as_ref().expect("redis backend");
    let before = redis.stats.answered.load(Relaxed);
    for _ in 0..200 {
        assert_eq!(status(gate, probe).await, 200);
        if redis.stats.answered.load(Relaxed) > before {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("Redis never decided for this replica");
}

async fn status(gate: &Gate, key: &str) -> u16 {
    get(
        &client(),
        &gate.url("/v1/analyses/1"),
        &[("x-api-key", key)],
    )
    .await
    .status
}

#[tokio::test]
async fn two_replicas_share_one_allowance_and_fall_back_to_local_limits() {
    let mut redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    let snap = SnapshotDir::new();
    let (shared, during, after, probe) = (
        mint("sk_live_"),
        mint("sk_live_"),
        mint("sk_live_"),
        mint("sk_live_"),
    );
    snap.write(
        &Doc::new(1)
            .partner("partner_acme", None, "active")
            .key("key_shared", &shared, json!({"rate_limit_per_minute": 4}))
            .key("key_during", &during, json!({"rate_limit_per_minute": 2}))
            .key("key_after", &after, json!({"rate_limit_per_minute": 3}))
            .key(
                "key_probe",
                &probe,
                json!({"rate_limit_per_minute": 100000}),
            ),
    );
    let extra = format!(
        "[rate_limit]\nbackend = \"redis\"\n[redis]\nurl = \"{}\"\ntimeout = \"100ms\"\nkey_prefix = \"test{}:\"\n",
        redis.url(),
        std::process::id()
    );
    let a = Gate::start(&config_toml(&snap.path(), upstream.addr, &extra)).await;
    let b = Gate::start(&config_toml(&snap.path(), upstream.addr, &extra)).await;
    // Both connect in the background: wait until each has had Redis decide once.
    wait_answered(&a, &probe).await;
    wait_answered(&b, &probe).await;

    // 4 per minute in all: alternating replicas, the fifth request is refused wherever it lands.
    let mut seen = Vec::new();
    for i in 0..6 {
        let g = if i % 2 == 0 { &a } else { &b };
        seen.push(status(g, &shared).await);
    }
    assert_eq!(
        seen,
        [200, 200, 200, 200, 429, 429],
        "one allowance for the fleet"
    );
    let refused = get(
        &client(),
        &b.url("/v1/analyses/1"),
        &[("x-api-key", &shared)],
    )
    .await;
    assert_error(&refused, 429, "rate_limited");
    assert_eq!(refused.header("x-ratelimit-limit"), Some("4"));
    assert!(
        refused
            .header("retry-after")
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1
    );

    // Redis goes away: each replica enforces the limit on its own (never fails open, never
    // refuses everything), and answers stay fast (redis.timeout = 100 ms).
    redis.stop().await;
    assert_eq!(
        a.metric("keygate_ratelimit_redis_degraded").await,
        Some(0.0)
    );
    let t = std::time::Instant::now();
    assert_eq!(
        [
            status(&a, &during).await,
            status(&a, &during).await,
            status(&a, &during).await
        ],
        [200, 200, 429]
    );
    assert_eq!(
        [
            status(&b, &during).await,
            status(&b, &during).await,
            status(&b, &during).await
        ],
        [200, 200, 429],
        "the other replica's local allowance is its own"
    );
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "fallback took {:?}",
        t.elapsed()
    );
    assert_eq!(
        a.metric("keygate_ratelimit_redis_degraded").await,
        Some(1.0)
    );

    // Redis is back (same port, empty): the replicas share again by themselves.
    redis.restart().await;
    wait_answered(&a, &probe).await;
    wait_answered(&b, &probe).await;
    assert_eq!(
        [
            status(&a, &after).await,
            status(&b, &after).await,
            status(&a, &after).await,
            status(&b, &after).await
        ],
        [200, 200, 200, 429],
        "one allowance for the fleet again"
    );
    assert_eq!(
        a.metric("keygate_ratelimit_redis_degraded").await,
        Some(0.0)
    );
    assert!(
        a.metric("keygate_ratelimit_redis_fallbacks_total")
            .await
            .unwrap()
            >= 3.0
    );
    a.stop().await;
    b.stop().await;
}

async fn post(gate: &Gate, path: &str, key: &str, idem: Option<&str>, body: &str) -> Answer {
    let mut headers = vec![("x-api-key", key)];
    if let Some(i) = idem {
        headers.push(("idempotency-key", i));
    }
    send(&client(), "POST", &gate.url(path), &headers, body).await
}

/// One partner's key allowed to read and write analyses, in `snap`.
fn one_writer(snap: &SnapshotDir) -> String {
    let key = mint("sk_live_");
    snap.write(&Doc::new(1).partner("partner_acme", None, "active").key(
        "key_a",
        &key,
        json!({"scopes": ["analyses:read", "analyses:write"]}),
    ));
    key
}

/// `[idempotency]` on Redis (with `more` in that section), records under `<prefix><pid>:`.
fn idempotency_on(redis: &RedisServer, prefix: &str, more: &str, timeout: &str) -> String {
    format!(
        "[idempotency]\nbackend = \"redis\"\n{more}[redis]\nurl = \"{}\"\ntimeout = \"{timeout}\"\nkey_prefix = \"{prefix}{}:\"\n",
        redis.url(),
        std::process::id()
    )
}

/// Wait until `gate` has its Redis connection: idempotent requests are refused (503) until then.
async fn until_connected(gate: &Gate, key: &str) {
    for i in 0..100 {
        let probe = post(gate, "/v1/analyses", key, Some(&format!("probe-{i}")), "{}").await;
        if probe.status == 200 {
            return;
        }
        assert_error(&probe, 503, "idempotency_unavailable");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("never connected to Redis");
}

#[tokio::test]
async fn idempotency_records_are_shared_and_fail_closed_without_redis() {
    let mut redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    let snap = SnapshotDir::new();
    let key = one_writer(&snap);
    let extra = idempotency_on(&redis, "idem", "", "200ms");
    let a = Gate::start(&config_toml(&snap.path(), upstream.addr, &extra)).await;
    let b = Gate::start(&config_toml(&snap.path(), upstream.addr, &extra)).await;
    // Until both are connected, idempotent requests are refused (503), not run unguarded.
    for g in [&a, &b] {
        until_connected(g, &key).await;
    }
    upstream.clear();

    // A retry that lands on the other replica is replayed; the upstream ran once.
    let first = post(&a, "/v1/analyses", &key, Some("order-9"), r#"{"n":1}"#).await;
    assert_eq!(first.status, 200);
    let retry = post(&b, "/v1/analyses", &key, Some("order-9"), r#"{"n":1}"#).await;
    assert_eq!(retry.status, 200);
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    assert_eq!(
        retry.header("x-upstream-seq"),
        first.header("x-upstream-seq")
    );
    assert_eq!(retry.body, first.body);
    assert_eq!(upstream.count(), 1);
    let other = post(&b, "/v1/analyses", &key, Some("order-9"), r#"{"n":2}"#).await;
    assert_error(&other, 422, "idempotency_key_reused");

    // In flight on one replica: 409 on the other.
    let slow = {
        let (url, key) = (a.url("/slow/700"), key.clone());
        tokio::spawn(async move {
            send(
                &client(),
                "POST",
                &url,
                &[("x-api-key", &key), ("idempotency-key", "slow-1")],
                "{}",
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let during = post(&b, "/slow/700", &key, Some("slow-1"), "{}").await;
    assert_error(&during, 409, "idempotency_key_in_use");
    assert_eq!(slow.await.unwrap().status, 200);
    let after = post(&b, "/slow/700", &key, Some("slow-1"), "{}").await;
    assert_eq!(after.header("idempotent-replayed"), Some("true"));
    assert_eq!(upstream.count(), 2);

    // Redis down: idempotent requests are refused, quickly, and never reach the upstream;
    // requests without an Idempotency-Key are not affected.
    redis.stop().await;
    let t = std::time::Instant::now();
    let refused = post(&a, "/v1/analyses", &key, Some("order-10"), "{}").await;
    assert_error(&refused, 503, "idempotency_unavailable");
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!(upstream.count(), 2);
    assert_eq!(post(&a, "/v1/analyses", &key, None, "{}").await.status, 200);

    // Back: service resumes by itself.
    redis.restart().await;
    let mut back = false;
    for i in 0..100 {
        if post(&b, "/v1/analyses", &key, Some(&format!("after-{i}")), "{}")
            .await
            .status
            == 200
        {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        back,
        "idempotent requests did not work again after Redis came back"
    );
    a.stop().await;
    b.stop().await;
}

/// Redis frozen while an idempotent request asks for its record: the request is refused (503),
/// and the record its SET leaves once Redis runs it again is freed, so the retry runs instead
/// of being told 409 for the record's life. The in-flight record lives minutes, not the ttl.
#[tokio::test]
async fn a_record_left_by_a_refused_request_is_freed_once_redis_answers() {
    let redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    let snap = SnapshotDir::new();
    let key = one_writer(&snap);
    let extra = idempotency_on(&redis, "stall", "ttl = \"1h\"\n", "100ms");
    let gate = Gate::start(&config_toml(&snap.path(), upstream.addr, &extra)).await;
    until_connected(&gate, &key).await;
    upstream.clear();

    redis.pause();
    let refused = post(&gate, "/v1/analyses", &key, Some("order-77"), "{}").await;
    assert_error(&refused, 503, "idempotency_unavailable");
    // Longer than any wait on Redis of the request's own: the release must still run.
    tokio::time::sleep(Duration::from_millis(700)).await;
    redis.resume();
    // Once Redis has run what was queued, the retry runs (it is not 409 for an hour).
    let mut ran = None;
    for _ in 0..50 {
        let retry = post(&gate, "/v1/analyses", &key, Some("order-77"), "{}").await;
        if retry.status == 200 {
            ran = Some(retry);
            break;
        }
        assert_error(&retry, 409, "idempotency_key_in_use");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ran.is_some(), "the key stayed in use after Redis came back");
    assert_eq!(upstream.count(), 1);

    // An in-flight record lives minutes, not idempotency.ttl.
    let slow = {
        let (url, key) = (gate.url("/slow/500"), key.clone());
        tokio::spawn(async move {
            send(
                &client(),
                "POST",
                &url,
                &[("x-api-key", &key), ("idempotency-key", "slow-9")],
                "{}",
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let record = format!(
        "stall{}:idem:key_a:{}",
        std::process::id(),
        hex::encode("slow-9")
    );
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let pttl: i64 = redis::cmd("PTTL")
        .arg(&record)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        (600_000..=660_000).contains(&pttl),
        "in flight for {pttl} ms"
    );
    assert_eq!(slow.await.unwrap().status, 200);
    // Answered: the record is kept for idempotency.ttl.
    let pttl: i64 = redis::cmd("PTTL")
        .arg(&record)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(pttl > 3_500_000, "kept for {pttl} ms");
    gate.stop().await;
}
