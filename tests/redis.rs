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
