//! Idempotent replay in the proxy front: the first answer to a mutating request with an
//! `Idempotency-Key` is replayed to retries (`Idempotent-Replayed: true`) without reaching the
//! upstream; 409 while the first is in flight; 422 for the same key with another request; 5xx,
//! oversized answers and expired records are not replayed; the upstream is called exactly once
//! however many retries race.

mod support;

use std::time::Duration;

use serde_json::json;
use support::*;

struct Setup {
    upstream: Upstream,
    gate: Gate,
    key: String,
    other: String,
    _snap: SnapshotDir,
}

async fn setup(idempotency: &str) -> Setup {
    let upstream = Upstream::start().await;
    let snap = SnapshotDir::new();
    let (key, other) = (mint("sk_live_"), mint("sk_live_"));
    let scopes = json!({"scopes": ["analyses:read", "analyses:write"]});
    snap.write(
        &Doc::new(1)
            .partner("partner_acme", None, "active")
            .key("key_a", &key, scopes.clone())
            .key("key_b", &other, scopes),
    );
    let gate = Gate::start(&config_toml(
        &snap.path(),
        upstream.addr,
        &format!("[idempotency]\n{idempotency}\n"),
    ))
    .await;
    Setup {
        upstream,
        gate,
        key,
        other,
        _snap: snap,
    }
}

async fn post(gate: &Gate, path: &str, key: &str, idem: Option<&str>, body: &str) -> Answer {
    let mut headers = vec![("x-api-key", key)];
    if let Some(i) = idem {
        headers.push(("idempotency-key", i));
    }
    send(&client(), "POST", &gate.url(path), &headers, body).await
}

#[tokio::test]
async fn a_retry_gets_the_first_answer_without_reaching_the_upstream() {
    let s = setup("").await;
    let first = post(
        &s.gate,
        "/v1/analyses",
        &s.key,
        Some("order-1"),
        r#"{"a":1}"#,
    )
    .await;
    assert_eq!(first.status, 200);
    assert_eq!(first.header("x-upstream-seq"), Some("1"));
    assert!(first.header("idempotent-replayed").is_none());

    let again = post(
        &s.gate,
        "/v1/analyses",
        &s.key,
        Some("order-1"),
        r#"{"a":1}"#,
    )
    .await;
    assert_eq!(again.status, 200);
    assert_eq!(
        again.header("x-upstream-seq"),
        Some("1"),
        "the first answer"
    );
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(again.body, first.body);
    assert_eq!(again.header("content-type"), Some("application/json"));
    assert!(
        again.header("x-upstream-secret").is_none(),
        "hop-by-hop stays stripped"
    );
    assert_ne!(again.header("x-request-id"), first.header("x-request-id"));
    assert_eq!(s.upstream.count(), 1);

    // The same Idempotency-Key for another request: refused, whatever differs.
    for (path, body) in [
        ("/v1/analyses", r#"{"a":2}"#),
        ("/v1/analyses?dry_run=1", r#"{"a":1}"#),
    ] {
        let a = post(&s.gate, path, &s.key, Some("order-1"), body).await;
        assert_error(&a, 422, "idempotency_key_reused");
    }
    let a = send(
        &client(),
        "PUT",
        &s.gate.url("/v1/analyses"),
        &[("x-api-key", &s.key), ("idempotency-key", "order-1")],
        r#"{"a":1}"#,
    )
    .await;
    assert_error(&a, 422, "idempotency_key_reused");
    assert_eq!(s.upstream.count(), 1);

    // Records belong to an API key: another key's request with the same Idempotency-Key runs.
    let b = post(
        &s.gate,
        "/v1/analyses",
        &s.other,
        Some("order-1"),
        r#"{"a":1}"#,
    )
    .await;
    assert_eq!(b.header("x-upstream-seq"), Some("2"));
    // And requests without one always run.
    for _ in 0..2 {
        post(&s.gate, "/v1/analyses", &s.key, None, r#"{"a":1}"#).await;
    }
    assert_eq!(s.upstream.count(), 4);

    // A replay never skips the decision: once the key is revoked, its retries are refused.
    let scopes = json!({"scopes": ["analyses:read", "analyses:write"], "status": "revoked"});
    s._snap.write(
        &Doc::new(2)
            .partner("partner_acme", None, "active")
            .key("key_a", &s.key, scopes),
    );
    s.gate.wait_revision(2).await;
    let a = post(
        &s.gate,
        "/v1/analyses",
        &s.key,
        Some("order-1"),
        r#"{"a":1}"#,
    )
    .await;
    assert_error(&a, 401, "key_revoked");
    s.gate.stop().await;
}

#[tokio::test]
async fn in_flight_is_409_and_racing_retries_reach_the_upstream_once() {
    let s = setup("").await;
    let gate = std::sync::Arc::new(s.gate);
    let first = {
        let (gate, key) = (gate.clone(), s.key.clone());
        tokio::spawn(async move { post(&gate, "/slow/600", &key, Some("slow-1"), "{}").await })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    let during = post(&gate, "/slow/600", &s.key, Some("slow-1"), "{}").await;
    assert_error(&during, 409, "idempotency_key_in_use");
    let first = first.await.unwrap();
    assert_eq!(first.status, 200);
    let after = post(&gate, "/slow/600", &s.key, Some("slow-1"), "{}").await;
    assert_eq!(after.header("idempotent-replayed"), Some("true"));
    assert_eq!(s.upstream.count(), 1);

    // Twenty identical requests at once: one reaches the upstream, the others are 409 or replays.
    let racers: Vec<_> = (0..20)
        .map(|_| {
            let (gate, key) = (gate.clone(), s.key.clone());
            tokio::spawn(async move { post(&gate, "/slow/200", &key, Some("race"), "{}").await })
        })
        .collect();
    let mut statuses = Vec::new();
    for r in racers {
        statuses.push(r.await.unwrap().status);
    }
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 409),
        "{statuses:?}"
    );
    assert_eq!(
        s.upstream.count(),
        2,
        "the upstream ran the raced request once"
    );
    match std::sync::Arc::try_unwrap(gate) {
        Ok(g) => g.stop().await,
        Err(_) => panic!("gate still shared"),
    }
}

#[tokio::test]
async fn server_errors_and_oversized_answers_are_not_replayed() {
    let s = setup("max_response_bytes = 1000").await;
    for path in ["/status/503", "/big/5000"] {
        let a = post(&s.gate, path, &s.key, Some(path), "{}").await;
        assert!(
            a.status == 503 || a.body.len() == 5000,
            "{path}: {}",
            a.status
        );
        let again = post(&s.gate, path, &s.key, Some(path), "{}").await;
        assert!(
            again.header("idempotent-replayed").is_none(),
            "{path} was replayed"
        );
        assert_eq!(again.body.len(), a.body.len());
    }
    assert_eq!(s.upstream.count(), 4, "every try ran");
    // A 429 from the upstream says the request was not processed: not replayed.
    post(&s.gate, "/status/429", &s.key, Some("busy"), "{}").await;
    let again = post(&s.gate, "/status/429", &s.key, Some("busy"), "{}").await;
    assert!(again.header("idempotent-replayed").is_none());
    assert_eq!(s.upstream.count(), 6);
    // A client error is an answer like any other: replayed.
    post(&s.gate, "/status/409", &s.key, Some("conflict"), "{}").await;
    let again = post(&s.gate, "/status/409", &s.key, Some("conflict"), "{}").await;
    assert_eq!(
        (again.status, again.header("idempotent-replayed")),
        (409, Some("true"))
    );
    // A small answer under the cap is kept.
    post(&s.gate, "/big/900", &s.key, Some("small"), "{}").await;
    let again = post(&s.gate, "/big/900", &s.key, Some("small"), "{}").await;
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(again.body.len(), 900);
    assert_eq!(s.upstream.count(), 8);
    s.gate.stop().await;
}

#[tokio::test]
async fn records_expire_and_large_bodies_are_refused() {
    let s = setup("ttl = \"300ms\"\nmax_request_bytes = 100").await;
    post(&s.gate, "/v1/analyses", &s.key, Some("t"), "{}").await;
    let again = post(&s.gate, "/v1/analyses", &s.key, Some("t"), "{}").await;
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    tokio::time::sleep(Duration::from_millis(400)).await;
    let later = post(&s.gate, "/v1/analyses", &s.key, Some("t"), "{}").await;
    assert!(later.header("idempotent-replayed").is_none(), "expired");
    assert_eq!(s.upstream.count(), 2);

    // A body too large to fingerprint is refused when it asks for idempotency…
    let big = "x".repeat(200);
    let a = post(&s.gate, "/v1/analyses", &s.key, Some("big"), &big).await;
    assert_error(&a, 413, "request_too_large");
    // …and streamed as usual when it does not.
    let a = post(&s.gate, "/v1/analyses", &s.key, None, &big).await;
    assert_eq!(a.status, 200);
    assert_eq!(s.upstream.last().body.len(), 200);
    s.gate.stop().await;
}

#[tokio::test]
async fn a_slow_upstream_gets_504_but_runs_once_and_its_answer_is_replayed() {
    let upstream = Upstream::start().await;
    let (snap, key) = one_key_snapshot();
    // upstream_timeout is 2 s in the test configuration.
    let gate = Gate::start(&config_toml(&snap.path(), upstream.addr, "")).await;
    let first = post(&gate, "/slow/2600", &key, Some("pay-1"), "{}").await;
    assert_error(&first, 504, "upstream_timeout");
    // The request went on upstream: a retry meanwhile is told it is in flight…
    let during = post(&gate, "/slow/2600", &key, Some("pay-1"), "{}").await;
    assert_error(&during, 409, "idempotency_key_in_use");
    // …and once it is done, gets its answer, without a second execution.
    tokio::time::sleep(Duration::from_millis(900)).await;
    let after = post(&gate, "/slow/2600", &key, Some("pay-1"), "{}").await;
    assert_eq!(after.status, 200);
    assert_eq!(after.header("idempotent-replayed"), Some("true"));
    assert_eq!(upstream.count(), 1, "the mutation ran once");
    gate.stop().await;
}

#[tokio::test]
async fn replay_off_forwards_every_retry() {
    let s = setup("replay = false").await;
    for _ in 0..3 {
        let a = post(&s.gate, "/v1/analyses", &s.key, Some("k"), "{}").await;
        assert!(a.header("idempotent-replayed").is_none());
    }
    assert_eq!(s.upstream.count(), 3);
    s.gate.stop().await;
}

#[tokio::test]
async fn only_max_in_flight_idempotent_requests_are_held_at_once() {
    let s = setup("max_in_flight = 1").await;
    let gate = std::sync::Arc::new(s.gate);
    let first = {
        let (gate, key) = (gate.clone(), s.key.clone());
        tokio::spawn(async move { post(&gate, "/slow/500", &key, Some("one"), "{}").await })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    let second = post(&gate, "/slow/500", &s.key, Some("two"), "{}").await;
    assert_error(&second, 503, "idempotency_unavailable");
    assert_eq!(second.header("retry-after"), Some("1"));
    // Requests without an Idempotency-Key hold nothing and are not limited by it.
    assert_eq!(
        post(&gate, "/v1/analyses", &s.key, None, "{}").await.status,
        200
    );
    assert_eq!(first.await.unwrap().status, 200);
    let third = post(&gate, "/slow/10", &s.key, Some("three"), "{}").await;
    assert_eq!(third.status, 200, "the place was given back");
    match std::sync::Arc::try_unwrap(gate) {
        Ok(g) => g.stop().await,
        Err(_) => panic!("gate still shared"),
    }
}

#[tokio::test]
async fn one_key_cannot_take_every_idempotent_place() {
    let s = setup("max_in_flight = 2\nmax_in_flight_per_key = 1").await;
    let gate = std::sync::Arc::new(s.gate);
    let first = {
        let (gate, key) = (gate.clone(), s.key.clone());
        tokio::spawn(async move { post(&gate, "/slow/500", &key, Some("one"), "{}").await })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    // The same key's second request waits for its first; another key's runs beside it.
    let second = post(&gate, "/slow/10", &s.key, Some("two"), "{}").await;
    assert_error(&second, 503, "idempotency_unavailable");
    assert_eq!(second.header("retry-after"), Some("1"));
    let other = post(&gate, "/slow/10", &s.other, Some("two"), "{}").await;
    assert_eq!(other.status, 200, "another key was refused a place");
    assert_eq!(first.await.unwrap().status, 200);
    let again = post(&gate, "/slow/10", &s.key, Some("two"), "{}").await;
    assert_eq!(again.status, 200, "the key's place was given back");
    match std::sync::Arc::try_unwrap(gate) {
        Ok(g) => g.stop().await,
        Err(_) => panic!("gate still shared"),
    }
}

/// What [`Raw`] answers for a path: the head, then body pieces, each after a pause (ms).
type RawAnswer = fn(&str) -> (&'static str, Vec<(u64, &'static str)>);

/// An upstream on raw TCP that answers each request on its own connection, as `answer` says
/// for the request's path: a head, then body pieces each after a pause. Counts requests.
struct Raw {
    addr: std::net::SocketAddr,
    count: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Raw {
    async fn start(answer: RawAnswer) -> Raw {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = count.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let counted = counted.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    // The head, then as much body as it declares.
                    let head_end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    while buf.len() < head_end + len {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let path = head.split(' ').nth(1).unwrap_or("/").to_owned();
                    let (answer_head, pieces) = answer(&path);
                    if s.write_all(answer_head.as_bytes()).await.is_err() {
                        return;
                    }
                    for (pause, piece) in pieces {
                        tokio::time::sleep(Duration::from_millis(pause)).await;
                        if s.write_all(piece.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                    let _ = s.shutdown().await;
                });
            }
        });
        Raw { addr, count }
    }

    fn count(&self) -> usize {
        self.count.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Answers without a `Content-Length` are kept like any other when they end soon and small:
/// a 204 (which may not carry one), a chunked answer (Go's and Node's way with a body built as
/// it is written); a retry is replayed, and one racing the first is 409, not run again. A
/// stream that goes on (server-sent events) goes to the client unkept.
#[tokio::test]
async fn answers_without_a_length_are_kept_when_they_end_soon() {
    let raw = Raw::start(|path| match path {
        "/v1/things/1" => ("HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n", vec![]),
        "/v1/things" => (
            "HTTP/1.1 201 Created\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n",
            vec![(300, "b\r\n{\"id\":\"t1\"}\r\n"), (0, "0\r\n\r\n")],
        ),
        _ => (
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n",
            vec![
                (0, "7\r\ndata: 1\r\n"),
                (700, "7\r\ndata: 2\r\n"),
                (700, "7\r\ndata: 3\r\n"),
                (700, "0\r\n\r\n"),
            ],
        ),
    })
    .await;
    let snap = SnapshotDir::new();
    let key = mint("sk_live_");
    snap.write(&Doc::new(1).partner("partner_acme", None, "active").key(
        "key_a",
        &key,
        json!({"scopes": ["analyses:write"]}),
    ));
    let gate = Gate::start(&config_toml(&snap.path(), raw.addr, "")).await;
    let base = gate.url("");
    let call = |method: &'static str, path: &'static str, idem: &'static str| {
        let (url, key) = (format!("{base}{path}"), key.clone());
        async move {
            let headers = [("x-api-key", key.as_str()), ("idempotency-key", idem)];
            send(&client(), method, &url, &headers, "{}").await
        }
    };

    // A 204 to a DELETE: kept, and replayed.
    let a = call("DELETE", "/v1/things/1", "del-1").await;
    assert_eq!(a.status, 204);
    let again = call("DELETE", "/v1/things/1", "del-1").await;
    assert_eq!(
        (again.status, again.header("idempotent-replayed")),
        (204, Some("true"))
    );
    assert_eq!(raw.count(), 1, "the DELETE ran again");

    // A chunked 201: a retry while it is in flight is 409; one after it, replayed.
    let first = tokio::spawn(call("POST", "/v1/things", "make-1"));
    tokio::time::sleep(Duration::from_millis(150)).await;
    let racing = call("POST", "/v1/things", "make-1").await;
    assert_error(&racing, 409, "idempotency_key_in_use");
    let a = first.await.unwrap();
    assert_eq!((a.status, &a.body[..]), (201, &b"{\"id\":\"t1\"}"[..]));
    let again = call("POST", "/v1/things", "make-1").await;
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(again.body, a.body);
    assert_eq!(raw.count(), 2, "the POST ran again");

    // An event stream that goes on past the wait: passed on whole, not kept; a retry while it
    // streams is 409 (not run beside it), one after it runs.
    let first = tokio::spawn(call("POST", "/v1/events", "events-1"));
    tokio::time::sleep(Duration::from_millis(1400)).await;
    let racing = call("POST", "/v1/events", "events-1").await;
    assert_error(&racing, 409, "idempotency_key_in_use");
    let a = first.await.unwrap();
    assert_eq!(&a.body[..], b"data: 1data: 2data: 3");
    let again = call("POST", "/v1/events", "events-1").await;
    assert!(again.header("idempotent-replayed").is_none());
    assert_eq!(raw.count(), 4);
    gate.stop().await;
}

/// A mutating request with an Idempotency-Key and `Upgrade` fields is replayed like any: it is
/// not switched (its `Upgrade` goes as a hop-by-hop field does), so the key guards it.
#[tokio::test]
async fn upgrade_fields_do_not_bypass_replay() {
    let s = setup("").await;
    let headers = [
        ("x-api-key", s.key.as_str()),
        ("idempotency-key", "up-1"),
        ("connection", "upgrade"),
        ("upgrade", "websocket"),
    ];
    let url = s.gate.url("/v1/analyses");
    let first = send(&client(), "POST", &url, &headers, "{}").await;
    assert_eq!(first.status, 200);
    let again = send(&client(), "POST", &url, &headers, "{}").await;
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(s.upstream.count(), 1, "the retry ran again");
    assert!(s.upstream.last().headers.get("upgrade").is_none());
    s.gate.stop().await;
}

/// Refusals of the replay path (another request under the key, a body too large) spent the
/// key's allowance like any request: they say where it stands, as every answer past the rate
/// limit does.
#[tokio::test]
async fn replay_refusals_carry_the_rate_limit_headers() {
    let s = setup("max_request_bytes = 100\n[rate_limit]\ndefault_per_minute = 100").await;
    let first = post(&s.gate, "/v1/analyses", &s.key, Some("rl-1"), "{\"n\":1}").await;
    assert_eq!(first.status, 200);
    assert_eq!(first.header("x-ratelimit-limit"), Some("100"));
    let reused = post(&s.gate, "/v1/analyses", &s.key, Some("rl-1"), "{\"n\":2}").await;
    assert_error(&reused, 422, "idempotency_key_reused");
    assert_eq!(reused.header("x-ratelimit-limit"), Some("100"));
    assert_eq!(reused.header("x-ratelimit-remaining"), Some("98"));
    let large = post(
        &s.gate,
        "/v1/analyses",
        &s.key,
        Some("rl-2"),
        &"x".repeat(200),
    )
    .await;
    assert_error(&large, 413, "request_too_large");
    assert_eq!(large.header("x-ratelimit-remaining"), Some("97"));
    s.gate.stop().await;
}

/// An Idempotency-Key is kept with its answer: one longer than 255 bytes is refused (400), not
/// stored; 255 bytes are fine.
#[tokio::test]
async fn idempotency_keys_over_255_bytes_are_refused() {
    let s = setup("").await;
    let long = "k".repeat(256);
    let a = post(&s.gate, "/v1/analyses", &s.key, Some(&long), "{}").await;
    assert_error(&a, 400, "invalid_request");
    assert_eq!(s.upstream.count(), 0);
    let longest = "k".repeat(255);
    let a = post(&s.gate, "/v1/analyses", &s.key, Some(&longest), "{}").await;
    assert_eq!(a.status, 200);
    let again = post(&s.gate, "/v1/analyses", &s.key, Some(&longest), "{}").await;
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    s.gate.stop().await;
}
