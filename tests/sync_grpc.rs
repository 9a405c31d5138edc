//! `keygate.sync.v1` end to end, with real keygates: a file → a hub (`[sync_server]`) → two
//! sidecars (`source = "grpc"`). Revocations reach both in well under a second; a hub restart
//! is survived and resumed with deltas, not a full resend; a sidecar restarted from its cache
//! asks only for what changed; the hub's token is enforced; staleness is counted end to end.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use support::control_plane::{Behaviour, ControlPlane};
use support::*;

fn doc(revision: u64, a: (&str, &str), b: (&str, &str)) -> Doc {
    Doc::new(revision)
        .partner("partner_acme", Some("org_1"), "active")
        .key("key_a", a.0, json!({ "status": a.1 }))
        .key("key_b", b.0, json!({ "status": b.1 }))
}

const HUB: &str = "[sync_server]\nheartbeat_interval = \"200ms\"\n";

fn hub_config(snap: &SnapshotDir, upstream: SocketAddr, listen: &str, more: &str) -> String {
    config_toml(
        &snap.path(),
        upstream,
        &format!("{HUB}listen = \"{listen}\"\n{more}"),
    )
}

fn sidecar_config(hub: SocketAddr, upstream: SocketAddr, more: &str) -> String {
    config_toml_source(
        &format!(
            "source = \"grpc\"\nurl = \"http://{hub}\"\nidle_timeout = \"1s\"\nbackoff_max = \"200ms\"\nconnect_timeout = \"300ms\"\n{more}\n"
        ),
        upstream,
        "",
    )
}

fn hub_addr(g: &Gate) -> SocketAddr {
    g.app().sync_addr.expect("sync_server configured")
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

fn stat(g: &Gate, which: &str) -> u64 {
    use std::sync::atomic::Ordering::Relaxed;
    let s = &g.app().store.stats;
    match which {
        "applied" => s.reloads_applied.load(Relaxed),
        "deltas" => s.deltas_applied.load(Relaxed),
        _ => unreachable!(),
    }
}

/// `stat` once it has settled (a counter moves just after the snapshot it counts is published).
async fn settled(g: &Gate, which: &str, want: u64) -> u64 {
    eventually(Duration::from_secs(2), || stat(g, which) == want).await;
    stat(g, which)
}

/// Wait until `key` is refused by every gate; the time it took.
async fn refused_everywhere(gates: &[&Gate], key: &str, within: Duration) -> Duration {
    let t = Instant::now();
    for g in gates {
        loop {
            if status(g, key).await == 401 {
                break;
            }
            assert!(t.elapsed() < within, "still allowed after {within:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    t.elapsed()
}

#[tokio::test]
async fn file_to_hub_to_two_sidecars_and_a_hub_restart_resumes_with_deltas() {
    let upstream = Upstream::start().await;
    let (a, b) = (mint("sk_live_"), mint("sk_live_"));
    let snap = SnapshotDir::new();
    snap.write(&doc(1, (&a, "active"), (&b, "active")));
    let hub = Gate::start(&hub_config(&snap, upstream.addr, "127.0.0.1:0", "")).await;
    let addr = hub_addr(&hub);
    let s1 = Gate::start(&sidecar_config(addr, upstream.addr, "")).await;
    let s2 = Gate::start(&sidecar_config(addr, upstream.addr, "")).await;
    for s in [&s1, &s2] {
        assert_eq!(
            s.revision(),
            Some(1),
            "the first snapshot is in force at start"
        );
        assert_eq!(status(s, &a).await, 200);
        assert_eq!(s.ready().await.0, 200);
    }

    // Revoke a key in the hub's file: both sidecars refuse it within a second.
    snap.write(&doc(2, (&a, "revoked"), (&b, "active")));
    let took = refused_everywhere(&[&s1, &s2], &a, Duration::from_secs(1)).await;
    eprintln!("file → hub → 2 sidecars: {took:?}");
    for s in [&s1, &s2] {
        assert_eq!(s.revision(), Some(2));
        assert_eq!(
            settled(s, "deltas", 1).await,
            1,
            "the revocation came as a delta"
        );
        assert_eq!(
            settled(s, "applied", 2).await,
            2,
            "one full snapshot, one delta"
        );
    }

    // The hub goes away: the sidecars keep their snapshot and keep deciding.
    hub.stop().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for s in [&s1, &s2] {
        assert_eq!(status(s, &b).await, 200);
        assert_eq!(status(s, &a).await, 401);
    }

    // It comes back on the same address, at the same revision: the sidecars resume without a
    // full resend, and the next revocation arrives as a delta.
    let hub = Gate::start(&hub_config(&snap, upstream.addr, &addr.to_string(), "")).await;
    assert_eq!(hub_addr(&hub), addr);
    tokio::time::sleep(Duration::from_millis(600)).await;
    snap.write(&doc(3, (&a, "revoked"), (&b, "revoked")));
    refused_everywhere(&[&s1, &s2], &b, Duration::from_secs(3)).await;
    for s in [&s1, &s2] {
        assert_eq!(s.revision(), Some(3));
        assert_eq!(settled(s, "deltas", 2).await, 2, "resumed with a delta");
        assert_eq!(
            settled(s, "applied", 3).await,
            3,
            "no full snapshot after the restart"
        );
    }
    for g in [s1, s2, hub] {
        g.stop().await;
    }
}

/// A hub whose control plane is down at start serves its cached snapshot, and so must its
/// followers: the cache's document is the hub's document, as any source's is. (It was put in
/// force without one, so a new sidecar waited with nothing, and the control plane answering
/// again at the same revision changed nothing.)
#[tokio::test]
async fn a_hub_started_from_its_cache_serves_its_sidecars() {
    let upstream = Upstream::start().await;
    let (a, b) = (mint("sk_live_"), mint("sk_live_"));
    let cache = SnapshotDir::new();
    cache.write(&doc(5, (&a, "active"), (&b, "revoked")));
    let down = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let hub = Gate::start(&config_toml_source(
        &format!(
            "source = \"http\"\nurl = \"http://{down}/keys.json\"\nconnect_timeout = \"200ms\"\ncache_path = {:?}\n",
            cache.path().display().to_string()
        ),
        upstream.addr,
        &format!("{HUB}listen = \"127.0.0.1:0\"\n"),
    ))
    .await;
    assert_eq!(hub.revision(), Some(5), "the hub serves its cache");
    let s = Gate::start(&sidecar_config(hub_addr(&hub), upstream.addr, "")).await;
    s.wait_revision(5).await;
    assert_eq!(status(&s, &a).await, 200);
    assert_eq!(status(&s, &b).await, 401);
    hub.stop().await;
    s.stop().await;
}

#[tokio::test]
async fn a_sidecar_restarted_from_its_cache_asks_only_for_what_changed() {
    let upstream = Upstream::start().await;
    let (a, b) = (mint("sk_live_"), mint("sk_live_"));
    let snap = SnapshotDir::new();
    snap.write(&doc(1, (&a, "active"), (&b, "active")));
    let hub = Gate::start(&hub_config(&snap, upstream.addr, "127.0.0.1:0", "")).await;
    let addr = hub_addr(&hub);
    let dir = tempfile::tempdir().unwrap();
    let cache = format!(
        "cache_path = {:?}",
        dir.path().join("last-good.json").display().to_string()
    );

    let s = Gate::start(&sidecar_config(addr, upstream.addr, &cache)).await;
    assert_eq!(s.revision(), Some(1));
    s.stop().await;

    snap.write(&doc(2, (&a, "revoked"), (&b, "active")));
    hub.wait_revision(2).await;
    // The hub keeps the document it serves a moment after putting its snapshot in force.
    assert!(
        eventually(Duration::from_secs(5), || hub
            .app()
            .store
            .document()
            .is_some_and(|d| d.revision == 2))
        .await
    );
    let s = Gate::start(&sidecar_config(addr, upstream.addr, &cache)).await;
    s.wait_revision(2).await;
    assert_eq!(
        settled(&s, "deltas", 1).await,
        1,
        "from the cached revision 1, by a delta"
    );
    assert_eq!(status(&s, &a).await, 401);
    s.stop().await;

    // With the hub down, the cache (now at revision 2) is what the sidecar serves.
    hub.stop().await;
    let s = Gate::start(&sidecar_config(addr, upstream.addr, &cache)).await;
    assert_eq!(s.revision(), Some(2));
    assert_eq!(s.ready().await.0, 200);
    assert_eq!(status(&s, &a).await, 401);
    assert_eq!(status(&s, &b).await, 200);
    s.stop().await;
}

/// A hub over a file with two active keys (`a`, `b`), whose Watch needs the token
/// "hub-s3cret"; `more` goes into its `[sync_server]` table (and may open others after it).
async fn hub_with_token(more: &str) -> (Upstream, (String, String), SnapshotDir, Gate) {
    let upstream = Upstream::start().await;
    let (a, b) = (mint("sk_live_"), mint("sk_live_"));
    let snap = SnapshotDir::new();
    snap.write(&doc(1, (&a, "active"), (&b, "active")));
    let hub = Gate::start_with_env(
        &hub_config(
            &snap,
            upstream.addr,
            "127.0.0.1:0",
            &format!("token_env = \"HUB_TOKEN\"\n{more}"),
        ),
        &[("HUB_TOKEN", "hub-s3cret")],
    )
    .await;
    (upstream, (a, b), snap, hub)
}

/// A sidecar of `hub` presenting `token` (`snapshot.token_env`).
async fn sidecar_with_token(hub: SocketAddr, upstream: SocketAddr, token: &str) -> Gate {
    Gate::start_with_env(
        &sidecar_config(hub, upstream, "token_env = \"T\""),
        &[("T", token)],
    )
    .await
}

#[tokio::test]
async fn the_hub_refuses_a_sidecar_without_its_token() {
    let (upstream, (a, _), _snap, hub) = hub_with_token("").await;
    let addr = hub_addr(&hub);

    let none = Gate::start(&sidecar_config(addr, upstream.addr, "")).await;
    assert_eq!(none.revision(), None);
    let a_none = get(&client(), &none.url("/v1/analyses/1"), &[("x-api-key", &a)]).await;
    assert_error(&a_none, 503, "snapshot_unavailable");
    none.stop().await;

    let wrong = sidecar_with_token(addr, upstream.addr, "guess").await;
    assert_eq!(wrong.revision(), None);
    wrong.stop().await;

    let right = sidecar_with_token(addr, upstream.addr, "hub-s3cret").await;
    assert_eq!(right.revision(), Some(1));
    assert_eq!(status(&right, &a).await, 200);
    right.stop().await;
    hub.stop().await;
}

#[tokio::test]
async fn staleness_is_counted_from_the_hubs_own_source() {
    let upstream = Upstream::start().await;
    let (a, b) = (mint("sk_live_"), mint("sk_live_"));
    // The hub follows a control plane; the sidecar follows the hub.
    let cp = ControlPlane::start(&doc(1, (&a, "active"), (&b, "active")).to_json()).await;
    let hub = Gate::start(&config_toml_source(
        &format!(
            "source = \"http\"\nurl = \"{}\"\npoll_interval = \"100ms\"\nbackoff_max = \"200ms\"\n",
            cp.url()
        ),
        upstream.addr,
        &format!("{HUB}listen = \"127.0.0.1:0\"\n"),
    ))
    .await;
    let s = Gate::start(&sidecar_config(
        hub_addr(&hub),
        upstream.addr,
        "max_staleness = \"2s\"",
    ))
    .await;
    assert_eq!(status(&s, &a).await, 200);

    // The control plane fails. The hub's stream is alive and heartbeating, but what it holds
    // is no longer confirmed: the sidecar stops serving once that is older than 2 s.
    cp.set(Behaviour::Status(500));
    let t = Instant::now();
    while status(&s, &a).await != 503 {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the sidecar never went stale"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        t.elapsed() >= Duration::from_millis(1500),
        "stale too early: {:?}",
        t.elapsed()
    );
    assert_eq!(s.ready().await.0, 503);

    // The control plane recovers: so do the hub and, through it, the sidecar.
    cp.set(Behaviour::Serve);
    assert!(eventually(Duration::from_secs(5), || s.app().store.is_fresh()).await);
    assert_eq!(status(&s, &a).await, 200);
    s.stop().await;
    hub.stop().await;
}

#[tokio::test]
async fn a_change_without_a_new_revision_still_reaches_the_sidecars() {
    let upstream = Upstream::start().await;
    let (a, b) = (mint("sk_live_"), mint("sk_live_"));
    let snap = SnapshotDir::new();
    snap.write(&doc(4, (&a, "active"), (&b, "active")));
    let hub = Gate::start(&hub_config(&snap, upstream.addr, "127.0.0.1:0", "")).await;
    let s = Gate::start(&sidecar_config(hub_addr(&hub), upstream.addr, "")).await;
    assert_eq!(status(&s, &a).await, 200);
    // Edited by hand, revision unchanged: the hub applies it, and so must every sidecar.
    snap.write(&doc(4, (&a, "revoked"), (&b, "active")));
    refused_everywhere(&[&hub, &s], &a, Duration::from_secs(2)).await;
    assert_eq!(status(&s, &b).await, 200);

    // Edited again while the sidecar is away (the hub restarting): the sidecar resumes at
    // revision 4, but holds other content than the hub's revision 4, and must get the hub's.
    let addr = hub_addr(&hub);
    hub.stop().await;
    snap.write(&doc(4, (&a, "revoked"), (&b, "revoked")));
    let hub = Gate::start(&hub_config(&snap, upstream.addr, &addr.to_string(), "")).await;
    refused_everywhere(&[&hub, &s], &b, Duration::from_secs(5)).await;
    assert_eq!(s.revision(), Some(4));
    s.stop().await;
    hub.stop().await;
}

#[tokio::test]
async fn over_tls_with_client_certificates() {
    let upstream = Upstream::start().await;
    let (a, b) = (mint("sk_live_"), mint("sk_live_"));
    let snap = SnapshotDir::new();
    snap.write(&doc(1, (&a, "active"), (&b, "active")));
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let path = |p: &std::path::Path| p.display().to_string();
    let hub = Gate::start(&hub_config(
        &snap,
        upstream.addr,
        "127.0.0.1:0",
        &format!(
            "tls_cert = {:?}\ntls_key = {:?}\nclient_ca = {:?}\n",
            path(&pki.server_cert),
            path(&pki.server_key),
            path(&pki.ca)
        ),
    ))
    .await;
    let addr = hub_addr(&hub);
    let tls_sidecar = |identity: bool| {
        let mut more = format!("ca_file = {:?}\n", path(&pki.ca));
        if identity {
            more.push_str(&format!(
                "client_cert = {:?}\nclient_key = {:?}\n",
                path(&pki.client_cert),
                path(&pki.client_key)
            ));
        }
        sidecar_config(addr, upstream.addr, &more).replace("url = \"http://", "url = \"https://")
    };
    // The right CA and a client certificate: in sync, revocations included.
    let s = Gate::start(&tls_sidecar(true)).await;
    assert_eq!(s.revision(), Some(1));
    snap.write(&doc(2, (&a, "revoked"), (&b, "active")));
    refused_everywhere(&[&s], &a, Duration::from_secs(2)).await;
    s.stop().await;

    // No client certificate: the hub refuses the connection; nothing is loaded, and the
    // sidecar fails closed.
    let no_cert = Gate::start(&tls_sidecar(false)).await;
    assert_eq!(no_cert.revision(), None);
    assert_eq!(status(&no_cert, &b).await, 503);
    no_cert.stop().await;

    // Plain h2c to a TLS hub gets nothing either.
    let plain = Gate::start(&sidecar_config(addr, upstream.addr, "")).await;
    assert_eq!(plain.revision(), None);
    plain.stop().await;
    hub.stop().await;
}

/// Wait until `/metrics` of `g` shows `name` at `want`.
async fn metric_reaches(g: &Gate, name: &str, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let now = g.metric(name).await;
        if now == Some(want) {
            return;
        }
        assert!(Instant::now() < deadline, "{name} is {now:?}, not {want}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The hub's /metrics say who follows it, what it sent them, whom it refused: the sidecars'
/// Watch streams, full snapshots and deltas, wrong tokens, connections past
/// `limits.max_connections`.
#[tokio::test]
async fn the_hub_counts_its_watchers_what_it_sent_and_whom_it_refused() {
    let (upstream, (a, b), snap, hub) = hub_with_token("[limits]\nmax_connections = 2\n").await;
    let addr = hub_addr(&hub);
    let open = "keygate_connections_open{front=\"sync_server\"}";
    metric_reaches(&hub, "keygate_sync_watchers", 0.0).await;
    metric_reaches(&hub, open, 0.0).await;

    let wrong = sidecar_with_token(addr, upstream.addr, "guess").await;
    assert_eq!(wrong.revision(), None);
    wrong.stop().await;
    let refused = hub.metric("keygate_sync_unauthenticated_total").await;
    assert!(
        refused >= Some(1.0),
        "a wrong token is counted: {refused:?}"
    );
    metric_reaches(&hub, open, 0.0).await;

    let s1 = sidecar_with_token(addr, upstream.addr, "hub-s3cret").await;
    let s2 = sidecar_with_token(addr, upstream.addr, "hub-s3cret").await;
    metric_reaches(&hub, "keygate_sync_watchers", 2.0).await;
    metric_reaches(&hub, open, 2.0).await;
    metric_reaches(&hub, "keygate_sync_sent_total{event=\"full\"}", 2.0).await;
    assert_eq!(
        hub.metric("keygate_sync_unauthenticated_total").await,
        refused,
        "the right token is not counted"
    );

    // Both places are taken: a third connection is reset and counted.
    let third = tokio::time::timeout(Duration::from_secs(2), async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut c = tokio::net::TcpStream::connect(addr).await?;
        let _ = c.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
        c.read(&mut [0u8; 64]).await
    })
    .await
    .expect("the connection past the limit was reset, not left hanging");
    assert!(matches!(third, Ok(0) | Err(_)), "answered: {third:?}");
    metric_reaches(
        &hub,
        "keygate_connections_refused_total{front=\"sync_server\",reason=\"max_connections\"}",
        1.0,
    )
    .await;

    // A revocation goes out as one delta to each.
    snap.write(&doc(2, (&a, "revoked"), (&b, "active")));
    refused_everywhere(&[&s1, &s2], &a, Duration::from_secs(1)).await;
    metric_reaches(&hub, "keygate_sync_sent_total{event=\"delta\"}", 2.0).await;
    assert_eq!(
        hub.metric("keygate_sync_sent_total{event=\"full\"}").await,
        Some(2.0)
    );
    // Then a heartbeat every 200 ms of quiet on each.
    let beats = "keygate_sync_sent_total{event=\"heartbeat\"}";
    let deadline = Instant::now() + Duration::from_secs(3);
    while hub.metric(beats).await < Some(2.0) {
        assert!(Instant::now() < deadline, "no heartbeats counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    s1.stop().await;
    metric_reaches(&hub, "keygate_sync_watchers", 1.0).await;
    metric_reaches(&hub, open, 1.0).await;
    s2.stop().await;
    metric_reaches(&hub, "keygate_sync_watchers", 0.0).await;
    hub.stop().await;
}

/// An unused connection to the hub is told goodbye (GOAWAY) before it is closed, as on
/// keygate's other HTTP/2 fronts, so that a Watch a sidecar sends at that moment is refused
/// in a way it can tell, not cut off unseen.
#[tokio::test]
async fn an_unused_hub_connection_is_told_goodbye() {
    use support::h2_frames::*;
    let upstream = Upstream::start().await;
    let snap = SnapshotDir::new();
    snap.write(&doc(
        1,
        (&mint("sk_live_"), "active"),
        (&mint("sk_live_"), "active"),
    ));
    let limits = "\n[limits]\nidle_timeout = \"1s\"\n";
    let hub = Gate::start(&hub_config(&snap, upstream.addr, "127.0.0.1:0", limits)).await;
    let addr = hub_addr(&hub);
    let mut h2 = RawH2::connect(addr).await;
    h2.get(1, &addr.to_string(), "/grpc.health.v1.Health/Check", "")
        .await;
    h2.response_head(1).await;
    let used = Instant::now();
    // Looked at first when its first request was due (10 s after the accept), then every idle
    // period.
    h2.idle_goodbye(used, Duration::from_secs(9), Duration::from_secs(15))
        .await;
    hub.stop().await;
}

/// A hub that accepts the Watch and never answers it (no response headers): the sidecar gives
/// up on it after `idle_timeout` and calls again, as for a silent stream, and takes the
/// snapshot of a hub that answers.
#[tokio::test]
async fn a_watch_the_hub_never_answers_is_called_again() {
    let upstream = Upstream::start().await;
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = calls.clone();
    // Streams held, never answered.
    let held = Arc::new(std::sync::Mutex::new(Vec::new()));
    let addr = fake_hub(move |request, respond| {
        counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        held.lock().unwrap().push((request, respond));
    })
    .await;
    let gate = Gate::start(&sidecar_config(addr, upstream.addr, "")).await;
    let start = std::time::Instant::now();
    while calls.load(std::sync::atomic::Ordering::SeqCst) < 3 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the sidecar waits on an unanswered Watch"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(gate.revision(), None);
    gate.stop().await;
}

/// A TCP relay to `to`: what the client sends goes on at once; what comes back, `chunk` bytes
/// every `every` (a slow link from the hub).
async fn slow_relay(to: SocketAddr, chunk: usize, every: Duration) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(hub) = tokio::net::TcpStream::connect(to).await else {
                continue;
            };
            let (mut from_client, mut to_client) = client.into_split();
            let (mut from_hub, mut to_hub) = hub.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut from_client, &mut to_hub).await;
            });
            tokio::spawn(async move {
                let mut buf = vec![0u8; chunk];
                loop {
                    let n = match from_hub.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    if to_client.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(every).await;
                }
            });
        }
    });
    addr
}

/// A full snapshot that takes longer than `idle_timeout` to arrive whole is waited for while
/// its bytes keep coming: the hub cannot beat inside one message. (The client gave up on
/// every whole-message wait past `idle_timeout`, and called again for the whole document,
/// forever: a large snapshot over a modest link never arrived.)
#[tokio::test]
async fn a_full_snapshot_slower_than_idle_timeout_still_arrives() {
    let upstream = Upstream::start().await;
    let snap = SnapshotDir::new();
    let keys: Vec<String> = (0..8_000).map(|_| mint("sk_live_")).collect();
    let mut d = Doc::new(1).partner("partner_acme", Some("org_1"), "active");
    for (i, k) in keys.iter().enumerate() {
        d = d.key(
            &format!("key_{i:05}"),
            k,
            json!({"name": "a key with a name of some length"}),
        );
    }
    snap.write(&d);
    let hub = Gate::start(&hub_config(&snap, upstream.addr, "127.0.0.1:0", "")).await;
    // ~0.8 MB/s: the document (~2 MB) takes well over the sidecar's idle_timeout (1 s).
    let relay = slow_relay(hub_addr(&hub), 16 * 1024, Duration::from_millis(20)).await;
    let sidecar = Gate::start(&sidecar_config(relay, upstream.addr, "")).await;
    let start = Instant::now();
    while sidecar.revision() != Some(1) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the full snapshot never arrived"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status(&sidecar, &keys[7_999]).await, 200);
    sidecar.stop().await;
    hub.stop().await;
}

/// A Watch from revision 0 (an empty WatchRequest) on `stream`, whose answer is never read.
async fn watch_unread(h2: &mut support::h2_frames::RawH2, authority: &str, stream: u32) {
    use support::h2_frames::{DATA, END_STREAM};
    let fields = [
        (":method", "POST"),
        (":scheme", "http"),
        (":authority", authority),
        (":path", "/keygate.sync.v1.Sync/Watch"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ];
    h2.headers(stream, &fields, false).await;
    h2.send(DATA, END_STREAM, stream, &[0, 0, 0, 0, 0]).await;
}

/// This process's resident memory, in bytes.
fn resident() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

/// Callers that take a full snapshot and never read it hold a reference to the hub's one copy
/// of the document, not a copy each. (tonic encoded each stream's message into a buffer of its
/// own, kept until the client read it: 40 such streams of a 5 MB document held 200 MB, a fleet
/// of sidecars all needing a full snapshot at once took one copy each.)
#[tokio::test]
async fn callers_that_do_not_read_share_the_hubs_copy_of_the_document() {
    use support::h2_frames::RawH2;
    let upstream = Upstream::start().await;
    let snap = SnapshotDir::new();
    let mut d = Doc::new(1).partner("partner_acme", Some("org_1"), "active");
    for i in 0..20_000 {
        d = d.key(
            &format!("key_{i:05}"),
            &mint("sk_live_"),
            json!({"name": "a key with a name of some length"}),
        );
    }
    snap.write(&d);
    let hub = Gate::start(&hub_config(&snap, upstream.addr, "127.0.0.1:0", "")).await;
    let addr = hub_addr(&hub);
    let document_bytes = std::fs::metadata(snap.path()).unwrap().len();
    assert!(document_bytes > 4_000_000, "{document_bytes}");
    // Each call: a Watch from revision 0 (an empty WatchRequest), then nothing read: after the
    // first 64 KiB of flow-control window, the hub can send no more.
    let mut h2 = RawH2::connect(addr).await;
    let authority = addr.to_string();
    watch_unread(&mut h2, &authority, 1).await;
    metric_reaches(&hub, "keygate_sync_watchers", 1.0).await;
    tokio::time::sleep(Duration::from_millis(500)).await; // the full document is made once
    let before = resident();
    for i in 1..40u32 {
        watch_unread(&mut h2, &authority, 1 + 2 * i).await;
    }
    metric_reaches(&hub, "keygate_sync_watchers", 40.0).await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let grew = resident().saturating_sub(before);
    eprintln!("39 unread full snapshots of {document_bytes} bytes: the hub grew by {grew} bytes");
    assert!(
        grew < 8 * document_bytes,
        "39 unread full snapshots of {document_bytes} bytes grew the hub by {grew} bytes"
    );
    drop(h2);
    hub.stop().await;
}

/// A hub whose snapshot is at revision 0 (which keygate.sync.v1 reads as "nothing"; the hub
/// logs an error saying so) serves nothing: its sidecars stay not ready (fail closed) until a
/// revision of 1 or more is in force.
#[tokio::test]
async fn a_hub_at_revision_0_serves_nothing_until_revision_1() {
    let upstream = Upstream::start().await;
    let (a, b) = (mint("sk_live_"), mint("sk_live_"));
    let snap = SnapshotDir::new();
    snap.write(&doc(0, (&a, "active"), (&b, "active")));
    let hub = Gate::start(&hub_config(&snap, upstream.addr, "127.0.0.1:0", "")).await;
    let sidecar = Gate::start(&sidecar_config(hub_addr(&hub), upstream.addr, "")).await;
    assert_eq!(sidecar.revision(), None);
    assert_eq!(sidecar.ready().await.0, 503);
    // Revision 1 is served at once.
    snap.write(&doc(1, (&a, "active"), (&b, "active")));
    let start = Instant::now();
    while sidecar.revision() != Some(1) {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "revision 1 never arrived"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status(&sidecar, &a).await, 200);
    sidecar.stop().await;
    hub.stop().await;
}

/// A Watch that reaches a hub as it starts gets the document the hub started with, not a hub
/// holding nothing yet (a heartbeat of revision 0): the hub takes its first call only once its
/// copy of the document is made (grpcio's test of a resuming caller once met the gap).
#[tokio::test]
async fn a_watch_as_the_hub_starts_gets_its_document() {
    use keygate::sync::proto::watch_response::Event;
    let upstream = Upstream::start().await;
    let snap = SnapshotDir::new();
    // Large enough that making the hub's copy takes a while.
    let mut d = Doc::new(3).partner("partner_acme", Some("org_1"), "active");
    for i in 0..20_000 {
        d = d.key(&format!("key_{i}"), &mint("sk_live_"), json!({}));
    }
    snap.write(&d);
    let hub = Gate::start(&hub_config(&snap, upstream.addr, "127.0.0.1:0", "")).await;
    let mut stream = watch(&hub, 3).await;
    let first = stream.message().await.unwrap().expect("a first message");
    match first.event {
        Some(Event::Full(full)) => assert_eq!(full.revision, 3),
        other => panic!("expected the document (no digest: sent whole), got {other:?}"),
    }
    hub.stop().await;
}

/// A hub whose every Watch says one thing and then fails (a hub crashing on each stream, one
/// that keeps sending what cannot apply) is called again ever later, up to `backoff_max`: one
/// message on a stream is not a stream that held, so it does not start the backoff over (it
/// did: such a hub was called every half second to second by every sidecar, forever).
#[tokio::test]
async fn a_hub_failing_each_watch_after_one_message_is_called_ever_later() {
    use keygate::sync::proto::{watch_response::Event, Heartbeat, WatchResponse};
    use prost::Message;
    use std::sync::Mutex;
    let upstream = Upstream::start().await;
    let calls: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let counted = calls.clone();
    let addr = fake_hub(move |_request, mut respond| {
        counted.lock().unwrap().push(Instant::now());
        let head = http::Response::builder()
            .header("content-type", "application/grpc")
            .body(())
            .unwrap();
        let Ok(mut send) = respond.send_response(head, false) else {
            return;
        };
        let message = WatchResponse {
            event: Some(Event::Heartbeat(Heartbeat {
                revision: 0,
                interval_ms: 200,
            })),
            confirmed_age_ms: None,
        }
        .encode_to_vec();
        let mut frame = vec![0u8];
        frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
        frame.extend_from_slice(&message);
        let _ = send.send_data(frame.into(), false);
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", "14".parse().unwrap());
        let _ = send.send_trailers(trailers);
    })
    .await;
    let config = sidecar_config(addr, upstream.addr, "")
        .replace("backoff_max = \"200ms\"", "backoff_max = \"10s\"");
    let gate = Gate::start(&config).await;
    let start = Instant::now();
    while calls.lock().unwrap().is_empty() {
        assert!(start.elapsed() < Duration::from_secs(5), "never called");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let first = calls.lock().unwrap()[0];
    tokio::time::sleep(Duration::from_millis(4500).saturating_sub(first.elapsed())).await;
    // Waits of 1, 2, 4 s (each between half and all of it): at most 4 calls in 4.5 s. Started
    // over after each message, the waits were all 0.5–1 s: at least 5.
    let made: Vec<Duration> = calls.lock().unwrap().iter().map(|t| *t - first).collect();
    assert!(made.len() >= 2, "called again: {made:?}");
    assert!(made.len() <= 4, "called again and again: {made:?}");
    assert_eq!(gate.revision(), None);
    gate.stop().await;
}

/// A hub shutting down ends its Watch streams as UNAVAILABLE, a status to call again on, not
/// OK (which says a call is complete: a client other than keygate's could stop there).
#[tokio::test]
async fn a_hub_shutting_down_ends_its_watches_as_unavailable() {
    use keygate::sync::proto::watch_response::Event;
    let upstream = Upstream::start().await;
    let (a, b) = (mint("sk_live_"), mint("sk_live_"));
    let snap = SnapshotDir::new();
    snap.write(&doc(1, (&a, "active"), (&b, "active")));
    let hub = Gate::start(&hub_config(&snap, upstream.addr, "127.0.0.1:0", "")).await;
    let mut stream = watch(&hub, 0).await;
    let first = stream.message().await.unwrap().expect("the document");
    assert!(matches!(first.event, Some(Event::Full(_))));
    let stopping = tokio::spawn(hub.stop());
    let ended = loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.message()).await {
            Ok(Ok(Some(_heartbeat))) => continue,
            Ok(other) => break other,
            Err(_) => panic!("the stream outlived the hub's shutdown"),
        }
    };
    match ended {
        Err(status) => assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}"),
        Ok(None) => panic!("the stream ended as complete (grpc-status 0)"),
        Ok(Some(_)) => unreachable!(),
    }
    stopping.await.unwrap();
}

/// A Watch of `hub` by tonic's client, as a caller holding `since_revision` (no digest).
async fn watch(
    hub: &Gate,
    since_revision: u64,
) -> tonic::Streaming<keygate::sync::proto::WatchResponse> {
    use keygate::sync::proto::{sync_client::SyncClient, WatchRequest};
    let mut client = SyncClient::connect(format!("http://{}", hub_addr(hub)))
        .await
        .unwrap()
        .max_decoding_message_size(64 << 20);
    let request = WatchRequest {
        since_revision,
        client: "test".into(),
        since_digest: Vec::new(),
    };
    client.watch(request).await.unwrap().into_inner()
}

/// A stand-in hub: an HTTP/2 server on 127.0.0.1 that hands every stream to `on_stream`.
async fn fake_hub<F>(on_stream: F) -> SocketAddr
where
    F: Fn(http::Request<h2::RecvStream>, h2::server::SendResponse<bytes::Bytes>)
        + Clone
        + Send
        + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let on_stream = on_stream.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(tcp).await else {
                    return;
                };
                while let Some(Ok((request, respond))) = conn.accept().await {
                    on_stream(request, respond);
                }
            });
        }
    });
    addr
}
