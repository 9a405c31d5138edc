//! The ext_authz listener's gRPC framing, driven with raw HTTP/2 frames (the `h2` crate) against
//! the real keygate: a call that is not well-framed gRPC gets a gRPC error (compressed flag,
//! `grpc-encoding`, wrong content type or method, truncated, empty or doubled message,
//! `grpc-timeout` passed), a Check split across DATA frames or many on one connection are
//! answered like any other, and every other path still reaches tonic (health, unknown methods).
//! A well-framed Check is never a gRPC error, also when it is too large, too slow, or arrives
//! while others hold the buffers: see also `tests/ext_authz.rs`.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use envoy_types::ext_authz::v3::pb::{CheckRequest, CheckResponse, HttpResponse};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
use prost::Message as _;
use serde_json::json;
use support::*;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const CHECK: &str = "/envoy.service.auth.v3.Authorization/Check";

async fn start() -> (Gate, SnapshotDir, String, SocketAddr, Upstream) {
    start_with("").await
}

/// [`start`] with more `[ext_authz]` settings.
async fn start_with(ext_authz: &str) -> (Gate, SnapshotDir, String, SocketAddr, Upstream) {
    let upstream = Upstream::start().await;
    let snap = SnapshotDir::new();
    let key = mint("sk_live_");
    snap.write(
        &Doc::new(1)
            .partner("partner_acme", Some("org_1"), "active")
            .key("key_ok", &key, json!({})),
    );
    let gate = Gate::start(&config_toml(
        &snap.path(),
        upstream.addr,
        &format!("[ext_authz]\nlisten = \"127.0.0.1:0\"\n{ext_authz}"),
    ))
    .await;
    let addr = gate.app.as_ref().unwrap().ext_authz_addr.unwrap();
    (gate, snap, key, addr, upstream)
}

fn check_request(key: &str) -> Vec<u8> {
    check_request_with_body(key, 0)
}

/// A Check whose request carries a body of `n` bytes (Envoy's `with_request_body`).
fn check_request_with_body(key: &str, n: usize) -> Vec<u8> {
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                http: Some(HttpRequest {
                    method: "GET".into(),
                    path: "/v1/analyses/1".into(),
                    host: "api.example.com".into(),
                    headers: [("x-api-key".to_owned(), key.to_owned())].into(),
                    body: "b".repeat(n),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
    .encode_to_vec()
}

/// A gRPC message: flags, big-endian length, the message.
fn framed(flags: u8, message: &[u8]) -> Vec<u8> {
    let mut m = vec![flags];
    m.extend_from_slice(&(message.len() as u32).to_be_bytes());
    m.extend_from_slice(message);
    m
}

async fn connect(addr: SocketAddr) -> h2::client::SendRequest<Bytes> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    send
}

/// An answer: HTTP status, `grpc-status` (from the headers of a trailers-only answer, else the
/// trailers), the response body, and the response headers.
struct Answer {
    http: u16,
    grpc: Option<String>,
    body: Vec<u8>,
    headers: http::HeaderMap,
}

impl Answer {
    fn check_response(&self) -> CheckResponse {
        assert_eq!(self.headers["content-type"], "application/grpc");
        assert_eq!(self.body[0], 0);
        let len = u32::from_be_bytes(self.body[1..5].try_into().unwrap()) as usize;
        assert_eq!(self.body.len(), 5 + len);
        CheckResponse::decode(&self.body[5..]).unwrap()
    }
}

/// Send one call: `method` to `path` with `headers`, the body as separate DATA frames (the
/// stream left open after the last one unless `end`), and read the whole answer.
async fn call(
    send: &mut h2::client::SendRequest<Bytes>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    frames: &[&[u8]],
    end: bool,
) -> Answer {
    let (response, stream) = open(send, method, path, headers, frames, end).await;
    let answer = read_answer(response).await;
    drop(stream);
    answer
}

/// Begin a call: its head and `frames` sent, the stream left open unless `end`.
async fn open(
    send: &h2::client::SendRequest<Bytes>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    frames: &[&[u8]],
    end: bool,
) -> (h2::client::ResponseFuture, h2::SendStream<Bytes>) {
    let mut req = http::Request::builder()
        .method(method)
        .uri(format!("http://keygate{path}"))
        .header("te", "trailers");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let mut ready = send.clone().ready().await.unwrap();
    let (response, mut stream) = ready
        .send_request(req.body(()).unwrap(), frames.is_empty() && end)
        .unwrap();
    for (i, f) in frames.iter().enumerate() {
        let last = i + 1 == frames.len();
        stream
            .send_data(Bytes::copy_from_slice(f), last && end)
            .unwrap();
    }
    (response, stream)
}

/// The whole answer to a call.
async fn read_answer(response: h2::client::ResponseFuture) -> Answer {
    let response = tokio::time::timeout(Duration::from_secs(20), response)
        .await
        .expect("an answer")
        .unwrap();
    let (parts, mut body) = response.into_parts();
    let mut data = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        body.flow_control().release_capacity(chunk.len()).unwrap();
        data.extend_from_slice(&chunk);
    }
    let trailers = body.trailers().await.unwrap();
    let status = |h: &http::HeaderMap| h.get("grpc-status").map(|v| v.to_str().unwrap().to_owned());
    let grpc = status(&parts.headers).or_else(|| trailers.as_ref().and_then(status));
    Answer {
        http: parts.status.as_u16(),
        grpc,
        body: data,
        headers: parts.headers,
    }
}

const GRPC: (&str, &str) = ("content-type", "application/grpc");

/// Calls no `CheckResponse` can answer get a gRPC error, each with the status a gRPC server
/// owes them, in a trailers-only answer (no message).
#[tokio::test]
async fn calls_that_are_not_well_framed_grpc_get_grpc_errors() {
    let (gate, _snap, key, addr, _up) = start().await;
    let mut send = connect(addr).await;
    let message = check_request(&key);
    let whole = framed(0, &message);
    let mut two = whole.clone();
    two.extend_from_slice(&whole);
    let (compressed, flags) = (framed(1, &message), framed(2, &message));
    // (what, method, headers, body frames, end the stream, HTTP status, grpc-status)
    type Row<'a> = (
        &'a str,
        &'a str,
        Vec<(&'a str, &'a str)>,
        Vec<&'a [u8]>,
        bool,
        u16,
        &'a str,
    );
    let table: Vec<Row> = vec![
        (
            "compressed flag",
            "POST",
            vec![GRPC],
            vec![&compressed],
            true,
            200,
            "13",
        ),
        (
            "unknown flags",
            "POST",
            vec![GRPC],
            vec![&flags],
            true,
            200,
            "13",
        ),
        (
            "grpc-encoding",
            "POST",
            vec![GRPC, ("grpc-encoding", "gzip")],
            vec![&whole],
            true,
            200,
            "12",
        ),
        (
            "no content type",
            "POST",
            vec![],
            vec![&whole],
            true,
            415,
            "13",
        ),
        (
            "JSON content type",
            "POST",
            vec![("content-type", "application/json")],
            vec![&whole],
            true,
            415,
            "13",
        ),
        (
            "grpc+json",
            "POST",
            vec![("content-type", "application/grpc+json")],
            vec![&whole],
            true,
            415,
            "13",
        ),
        ("GET", "GET", vec![GRPC], vec![], true, 405, "12"),
        ("empty body", "POST", vec![GRPC], vec![], true, 200, "13"),
        (
            "half a prefix",
            "POST",
            vec![GRPC],
            vec![&whole[..3]],
            true,
            200,
            "13",
        ),
        (
            "truncated",
            "POST",
            vec![GRPC],
            vec![&whole[..whole.len() - 1]],
            true,
            200,
            "13",
        ),
        (
            "two messages",
            "POST",
            vec![GRPC],
            vec![&two],
            true,
            200,
            "13",
        ),
        (
            "a second message in its own frame",
            "POST",
            vec![GRPC],
            vec![&whole, &whole[..6]],
            true,
            200,
            "13",
        ),
    ];
    for (what, method, headers, frames, end, http, grpc) in table {
        let a = call(&mut send, method, CHECK, &headers, &frames, end).await;
        assert_eq!((a.http, a.grpc.as_deref()), (http, Some(grpc)), "{what}");
        assert!(a.body.is_empty(), "{what}: trailers-only");
        if what == "grpc-encoding" {
            assert_eq!(a.headers["grpc-accept-encoding"], "identity");
        }
    }
    // The connection still serves Checks after all that.
    let a = call(&mut send, "POST", CHECK, &[GRPC], &[&whole], true).await;
    assert_eq!((a.http, a.grpc.as_deref()), (200, Some("0")));
    gate.stop().await;
}

/// A Check whose message arrives in pieces (the prefix split too) is answered like one in a
/// single frame; many Checks on one connection at once each get their own answer.
#[tokio::test]
async fn split_messages_and_many_checks_on_one_connection() {
    let (gate, _snap, key, addr, _up) = start().await;
    let mut send = connect(addr).await;
    let whole = framed(0, &check_request(&key));
    let ok = |a: &Answer| {
        assert_eq!((a.http, a.grpc.as_deref()), (200, Some("0")));
        let r = a.check_response();
        assert_eq!(r.status.unwrap().code, 0);
        let Some(HttpResponse::OkResponse(ok)) = r.http_response else {
            panic!("not an allow")
        };
        ok.headers
            .iter()
            .map(|h| h.header.clone().unwrap())
            .find(|h| h.key == "x-key-id")
            .unwrap()
            .value
    };
    for cuts in [vec![2], vec![5], vec![3, 9, 20], (1..whole.len()).collect()] {
        let mut frames: Vec<&[u8]> = Vec::new();
        let mut at = 0;
        for c in cuts.iter().copied().chain([whole.len()]) {
            frames.push(&whole[at..c]);
            at = c;
        }
        let a = call(&mut send, "POST", CHECK, &[GRPC], &frames, true).await;
        assert_eq!(ok(&a), "key_ok", "{cuts:?}");
    }
    // An allow and a denial, 50 of each, all in flight on one connection.
    let denied = framed(0, &check_request("sk_live_nope"));
    let calls = (0..100).map(|i| {
        let mut send = send.clone();
        let body = if i % 2 == 0 {
            whole.clone()
        } else {
            denied.clone()
        };
        async move {
            (
                i,
                call(&mut send, "POST", CHECK, &[GRPC], &[&body], true).await,
            )
        }
    });
    for (i, a) in futures_join_all(calls).await {
        if i % 2 == 0 {
            assert_eq!(ok(&a), "key_ok");
        } else {
            let r = a.check_response();
            assert_eq!(r.status.unwrap().code, 16, "a denial is a CheckResponse");
            assert!(matches!(
                r.http_response,
                Some(HttpResponse::DeniedResponse(_))
            ));
        }
    }
    gate.stop().await;
}

/// Join futures without another dependency: each spawned, awaited in order.
async fn futures_join_all<F>(fs: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = fs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

/// A call whose message has not arrived when its `grpc-timeout` passes ends with
/// DEADLINE_EXCEEDED instead of holding its stream; without one it would wait for the body.
#[tokio::test]
async fn grpc_timeout_is_honoured() {
    let (gate, _snap, key, addr, _up) = start().await;
    let mut send = connect(addr).await;
    let whole = framed(0, &check_request(&key));
    let a = call(
        &mut send,
        "POST",
        CHECK,
        &[GRPC, ("grpc-timeout", "100m")],
        &[&whole[..8]],
        false,
    )
    .await;
    assert_eq!((a.http, a.grpc.as_deref()), (200, Some("4")));
    // A Check that arrives in time is answered, the timeout notwithstanding.
    let a = call(
        &mut send,
        "POST",
        CHECK,
        &[GRPC, ("grpc-timeout", "10S")],
        &[&whole],
        true,
    )
    .await;
    assert_eq!((a.http, a.grpc.as_deref()), (200, Some("0")));
    assert_eq!(a.check_response().status.unwrap().code, 0);
    gate.stop().await;
}

/// Everything but Check still reaches tonic: health (Check and Watch, served over the same
/// connection as Checks) and UNIMPLEMENTED for unknown methods and services.
#[tokio::test]
async fn health_and_unknown_methods_are_tonics() {
    let (gate, _snap, key, addr, _up) = start().await;
    let mut send = connect(addr).await;
    for path in [
        "/envoy.service.auth.v3.Authorization/Nope",
        "/envoy.service.auth.v2.Authorization/Check",
        "/no.Such/Method",
    ] {
        let a = call(&mut send, "POST", path, &[GRPC], &[&framed(0, b"")], true).await;
        assert_eq!((a.http, a.grpc.as_deref()), (200, Some("12")), "{path}");
    }
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel.clone());
    for service in ["", "envoy.service.auth.v3.Authorization"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "no.such.Service".to_owned(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    // A Check on the channel that watches health.
    let mut watch = health
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
    let mut c =
        envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient::new(
            channel,
        );
    let r = c
        .check(CheckRequest::decode(&check_request(&key)[..]).unwrap())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.status.unwrap().code, 0);
    drop(watch);
    gate.stop().await;
}

/// The Check was allowed (an `OkResponse`).
fn assert_allowed(r: &CheckResponse) {
    assert!(
        matches!(r.http_response, Some(HttpResponse::OkResponse(_))),
        "{r:?}"
    );
}

/// Begin a Check with `first` (a piece of its message, or all of it with `end`).
async fn begin_check(
    send: &h2::client::SendRequest<Bytes>,
    first: &[u8],
    end: bool,
) -> (h2::client::ResponseFuture, h2::SendStream<Bytes>) {
    open(send, "POST", CHECK, &[GRPC], &[first], end).await
}

/// The `CheckResponse` of a Check answered with `grpc-status: 0`.
async fn check_answer(response: h2::client::ResponseFuture) -> CheckResponse {
    let a = read_answer(response).await;
    assert_eq!((a.http, a.grpc.as_deref()), (200, Some("0")));
    a.check_response()
}

/// A Check whose message is still arriving when keygate has read all there was is answered once
/// the rest comes (in a task of its own, not in the connection's turn); a client that gives up
/// on one (RST_STREAM) half-way disturbs nothing: the connection serves on.
#[tokio::test]
async fn a_check_arriving_in_pieces_over_time_and_one_reset_half_way() {
    let (gate, _snap, key, addr, _up) = start().await;
    let send = connect(addr).await;
    let whole = framed(0, &check_request(&key));
    let (head, rest) = whole.split_at(9);

    let (response, mut stream) = begin_check(&send, head, false).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    stream
        .send_data(Bytes::copy_from_slice(rest), true)
        .unwrap();
    let r = check_answer(response).await;
    assert_allowed(&r);

    let (response, mut stream) = begin_check(&send, head, false).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    stream.send_reset(h2::Reason::CANCEL);
    assert!(response.await.is_err());

    let (response, _stream) = begin_check(&send, &whole, true).await;
    let r = check_answer(response).await;
    assert_allowed(&r);
    gate.stop().await;
}

/// With rate limits on Redis, a Check waits for Redis in a task of its own; when Envoy gives up on
/// it (RST_STREAM, its timeout passed), the Check is dropped at once, not held until
/// `redis.timeout`: h2 stops counting a reset stream against `max_concurrent_streams`, so a task
/// left running for it would let a client pile up waiting Checks without limit. The request is
/// counted (as a client that left: status 499 in the decision log) the moment it is dropped.
#[tokio::test]
async fn a_check_waiting_on_redis_is_dropped_when_its_client_resets_it() {
    let redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    let snap = SnapshotDir::new();
    let key = mint("sk_live_");
    snap.write(&Doc::new(1).partner("partner_acme", None, "active").key(
        "key_ok",
        &key,
        json!({"rate_limit_per_minute": 1_000_000}),
    ));
    let extra = format!(
        "[ext_authz]\nlisten = \"127.0.0.1:0\"\n[rate_limit]\nbackend = \"redis\"\n[redis]\nurl = \"{}\"\ntimeout = \"30s\"\n",
        redis.url()
    );
    let gate = Gate::start(&config_toml(&snap.path(), upstream.addr, &extra)).await;
    let addr = gate.app.as_ref().unwrap().ext_authz_addr.unwrap();
    let send = connect(addr).await;
    let whole = framed(0, &check_request(&key));

    // Redis connects in the background: Check until it has decided one.
    let answered = || {
        let stats = &gate.app().limits.redis.as_ref().unwrap().stats;
        stats.answered.load(std::sync::atomic::Ordering::Relaxed)
    };
    let start = std::time::Instant::now();
    while answered() == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "Redis never decided"
        );
        let (response, _stream) = begin_check(&send, &whole, true).await;
        check_answer(response).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let counted = "keygate_requests_total{front=\"ext_authz\",code=\"allowed\"}";
    let before = gate.metric(counted).await.unwrap();
    let fallbacks = || {
        let stats = &gate.app().limits.redis.as_ref().unwrap().stats;
        stats.fallbacks.load(std::sync::atomic::Ordering::Relaxed)
    };
    let fell_back = fallbacks();
    redis.pause();
    let sent = std::time::Instant::now();
    let (response, mut stream) = begin_check(&send, &whole, true).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(gate.metric(counted).await, Some(before), "waits on Redis");
    stream.send_reset(h2::Reason::CANCEL);
    drop(response);
    while gate.metric(counted).await != Some(before + 1.0) {
        assert!(
            // Redis's own response timeout (2 s from the Check, whatever redis.timeout says)
            // is far off.
            sent.elapsed() < Duration::from_millis(1500),
            "the reset Check is still waiting on Redis"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Counted because it was dropped, not because Redis gave up and the local limiter decided.
    assert_eq!(fallbacks(), fell_back);
    redis.resume();
    gate.stop().await;
}

/// The denial in a `CheckResponse`: its HTTP status and the contract's code.
fn denial(r: &CheckResponse) -> (u32, String) {
    let Some(HttpResponse::DeniedResponse(d)) = &r.http_response else {
        panic!("not a denial: {r:?}")
    };
    let body: serde_json::Value = serde_json::from_str(&d.body).unwrap();
    let code = body["error"]["code"].as_str().unwrap().to_owned();
    (d.status.as_ref().unwrap().code as u32, code)
}

/// A CheckRequest too large to hold (413 `request_too_large`), one arriving while others hold
/// what keygate buffers (503 `overloaded`), one that does not arrive in time (400): each is
/// denied with a `CheckResponse`, never a gRPC error, which Envoy's `failure_mode_allow` would
/// turn into an allow. The connection serves on.
#[tokio::test]
async fn checks_too_large_or_too_slow_are_denied_not_errors() {
    let (gate, _snap, key, addr, _up) = start_with(
        "max_request_bytes = 400000\nmax_buffered_bytes = 600000\nread_timeout = \"500ms\"\n",
    )
    .await;
    let send = connect(addr).await;
    let small = framed(0, &check_request(&key));

    // Over max_request_bytes: denied at its prefix, before 64 MiB come (the stream stays open).
    let mut oversized = vec![0];
    oversized.extend_from_slice(&(400_001u32).to_be_bytes());
    let (response, _stream) = begin_check(&send, &oversized, false).await;
    let r = check_answer(response).await;
    assert_eq!(denial(&r), (413, "request_too_large".to_owned()));
    assert_eq!(r.status.unwrap().code, 7, "PERMISSION_DENIED");
    let counted = "keygate_requests_total{front=\"ext_authz\",code=\"request_too_large\"}";
    assert_eq!(gate.metric(counted).await, Some(1.0));

    // One arriving in pieces holds ~400 KB; another of 300 KB cannot be held beside it.
    let big = framed(0, &check_request_with_body(&key, 390_000));
    assert!(big.len() <= 400_005);
    let (held, rest) = big.split_at(350_000);
    let (a_response, mut a_stream) = begin_check(&send, held, false).await;
    let second = framed(0, &check_request_with_body(&key, 290_000));
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        // (Allowed until keygate has gathered the first one's pieces.)
        let (response, _stream) = begin_check(&send, &second, true).await;
        let r = check_answer(response).await;
        if matches!(r.http_response, Some(HttpResponse::DeniedResponse(_))) {
            // keygate's load, not the request's size: 503, to be retried.
            assert_eq!(denial(&r), (503, "overloaded".to_owned()));
            assert_eq!(r.status.as_ref().unwrap().code, 14, "UNAVAILABLE");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never denied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A Check in one frame is not held, and still passes.
    let (response, _stream) = begin_check(&send, &small, true).await;
    let r = check_answer(response).await;
    assert_allowed(&r);
    // The first one completes, and gives its room back: the second passes now.
    a_stream
        .send_data(Bytes::copy_from_slice(rest), true)
        .unwrap();
    let r = check_answer(a_response).await;
    assert_allowed(&r);
    let (response, _stream) = begin_check(&send, &second, true).await;
    let r = check_answer(response).await;
    assert_allowed(&r);

    // First frames of messages that wait for the rest are counted too: 40 of 16,000 bytes go
    // over 600 KB, and some are refused at once; the others wait, and are denied once
    // read_timeout passes.
    let mut declared = vec![0];
    declared.extend_from_slice(&300_000u32.to_be_bytes());
    declared.resize(16_000, b'x');
    let mut waiting = Vec::new();
    for _ in 0..40 {
        waiting.push(begin_check(&send, &declared, false).await);
    }
    let mut codes = Vec::new();
    for (response, _stream) in waiting {
        codes.push(denial(&check_answer(response).await).1);
    }
    let overloaded = codes.iter().filter(|c| *c == "overloaded").count();
    assert!((1..40).contains(&overloaded), "{codes:?}");
    assert!(
        codes
            .iter()
            .all(|c| c == "overloaded" || c == "invalid_request"),
        "{codes:?}"
    );
    // All given back: one in pieces passes again.
    let (response, mut stream) = begin_check(&send, held, false).await;
    stream
        .send_data(Bytes::copy_from_slice(rest), true)
        .unwrap();
    let r = check_answer(response).await;
    assert_allowed(&r);

    // Half a message, and then nothing: denied once read_timeout passes.
    let started = std::time::Instant::now();
    let (response, _stream) = begin_check(&send, &small[..small.len() / 2], false).await;
    let r = check_answer(response).await;
    assert_eq!(denial(&r), (400, "invalid_request".to_owned()));
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(450), "{waited:?}");
    // A grpc-timeout does not extend it.
    let (response, _stream) = open(
        &send,
        "POST",
        CHECK,
        &[GRPC, ("grpc-timeout", "1H")],
        &[&small[..9]],
        false,
    )
    .await;
    let r = check_answer(response).await;
    assert_eq!(denial(&r), (400, "invalid_request".to_owned()));
    gate.stop().await;
}
