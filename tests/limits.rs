//! Resource limits on the real proxy: connections past `limits.max_connections` are reset at
//! once (not queued), counted in /metrics, and their places come back when connections close.

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn connections_past_the_limit_are_reset_at_once_and_counted() {
    // header_read_timeout is long enough that idle connections stay open during the test.
    let (gate, key, upstream, _snap) = reader_gate(
        "header_read_timeout = \"10s\"",
        "[limits]\nmax_connections = 2\n",
    )
    .await;

    // Two idle connections take both places (the proxy has accepted them once it answers on
    // one: send a request on the first and keep it open).
    let mut first = TcpStream::connect(gate.addr).await.unwrap();
    let request = format!("GET /v1/analyses/1 HTTP/1.1\r\nHost: api\r\nX-API-Key: {key}\r\n\r\n");
    first.write_all(request.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = first.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let _second = TcpStream::connect(gate.addr).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    while gate
        .metric("keygate_connections_open{front=\"proxy\"}")
        .await
        != Some(2.0)
    {
        assert!(
            Instant::now() < deadline,
            "two connections never showed as open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The third is reset at once: no answer, no wait.
    let started = Instant::now();
    let read = tokio::time::timeout(Duration::from_secs(2), async {
        // The reset may already come back to the connect.
        let mut third = TcpStream::connect(gate.addr).await?;
        let _ = third.write_all(request.as_bytes()).await;
        third.read(&mut buf).await
    })
    .await;
    match read {
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(n)) => panic!(
            "the connection past the limit was answered: {:?}",
            String::from_utf8_lossy(&buf[..n])
        ),
        Err(_) => panic!("the connection past the limit hung instead of being reset"),
    }
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(
        gate.metric(
            "keygate_connections_refused_total{front=\"proxy\",reason=\"max_connections\"}"
        )
        .await,
        Some(1.0)
    );
    assert_eq!(
        upstream.count(),
        1,
        "only the first request reached the upstream"
    );

    // A place comes back when a connection closes.
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let n = match TcpStream::connect(gate.addr).await {
            Ok(mut next) => {
                let _ = next.write_all(request.as_bytes()).await;
                next.read(&mut buf).await.unwrap_or(0)
            }
            Err(_) => 0, // reset: not yet
        };
        if String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no place came back after a connection closed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        gate.metric(
            "keygate_connections_refused_total{front=\"proxy\",reason=\"max_connections\"}"
        )
        .await
            >= Some(1.0)
    );
    gate.stop().await;
}

/// A connection from `source` (any 127.0.0.0/8 address is this host) that sends `request` and
/// tells whether it was answered 200 (`false`: reset or closed unanswered, as past a limit).
async fn answered_from(source: &str, gate: &Gate, request: &str) -> (bool, Option<TcpStream>) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let Ok(mut stream) = socket.connect(gate.addr).await else {
        return (false, None);
    };
    let mut buf = vec![0u8; 4096];
    let read = tokio::time::timeout(Duration::from_secs(2), async {
        stream.write_all(request.as_bytes()).await?;
        stream.read(&mut buf).await
    })
    .await
    .expect("answered or reset, not left hanging");
    match read {
        Ok(n) if String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200") => {
            (true, Some(stream))
        }
        _ => (false, None),
    }
}

#[tokio::test]
async fn connections_past_the_limit_per_address_are_reset_but_not_others_or_trusted_proxies() {
    let proxy = "trusted_proxies = [\"127.0.0.3\"]\nmax_connections_per_ip = 2\nheader_read_timeout = \"10s\"";
    let (gate, key, upstream, _snap) = reader_gate(proxy, "").await;
    let request = format!("GET /v1/analyses/1 HTTP/1.1\r\nHost: api\r\nX-API-Key: {key}\r\n\r\n");
    let mut held = Vec::new();
    for _ in 0..2 {
        let (ok, stream) = answered_from("127.0.0.1", &gate, &request).await;
        assert!(ok, "the address's first two connections are served");
        held.extend(stream);
    }
    let started = Instant::now();
    assert!(
        !answered_from("127.0.0.1", &gate, &request).await.0,
        "a third from the address is reset"
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "at once, not queued"
    );
    // Another address has places of its own; a trusted proxy speaks for many clients.
    let (ok, other) = answered_from("127.0.0.2", &gate, &request).await;
    assert!(ok);
    held.extend(other);
    for _ in 0..3 {
        let (ok, stream) = answered_from("127.0.0.3", &gate, &request).await;
        assert!(ok, "a trusted proxy is not limited per address");
        held.extend(stream);
    }
    let refused = |reason: &str| {
        format!("keygate_connections_refused_total{{front=\"proxy\",reason=\"{reason}\"}}")
    };
    assert_eq!(
        gate.metric(&refused("max_connections_per_ip")).await,
        Some(1.0)
    );
    assert_eq!(gate.metric(&refused("max_connections")).await, Some(0.0));
    assert_eq!(
        gate.metric("keygate_connections_open{front=\"proxy\"}")
            .await,
        Some(6.0)
    );

    // A place comes back to the address when one of its connections closes.
    drop(held.remove(0));
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let (ok, stream) = answered_from("127.0.0.1", &gate, &request).await;
        if ok {
            held.extend(stream);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no place came back to the address"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        upstream.count(),
        7,
        "only the connections let in reached the upstream"
    );
    gate.stop().await;
}

/// The proxy with one reader key, `proxy` added to `[proxy]` (a `header_read_timeout` there
/// replaces the test configuration's 1 s) and `extra` after it.
async fn reader_gate(proxy: &str, extra: &str) -> (Gate, String, Upstream, SnapshotDir) {
    let upstream = Upstream::start().await;
    let snap = SnapshotDir::new();
    let key = mint("sk_live_");
    snap.write(&Doc::new(1).partner("partner_acme", None, "active").key(
        "key_a",
        &key,
        json!({"scopes": ["analyses:read"]}),
    ));
    let mut toml = config_toml_proxy(&snap.path(), upstream.addr, proxy, extra);
    if proxy.contains("header_read_timeout") {
        toml = toml.replacen("header_read_timeout = \"1s\"\n", "", 1);
    }
    (Gate::start(&toml).await, key, upstream, snap)
}

async fn h2_gate(limits: &str) -> (Gate, String, Upstream, SnapshotDir) {
    reader_gate("", limits).await
}

fn h2_get(gate: &Gate, key: &str) -> http::Request<()> {
    http::Request::get(format!("http://{}/v1/analyses/1", gate.addr))
        .header("x-api-key", key)
        .body(())
        .unwrap()
}

/// The proxy's h2c advertises `limits.http2_max_concurrent_streams` to clients.
#[tokio::test]
async fn http2_stream_limit_is_advertised() {
    let (gate, key, _upstream, _snap) =
        h2_gate("[limits]\nhttp2_max_concurrent_streams = 7\n").await;
    let tcp = TcpStream::connect(gate.addr).await.unwrap();
    let (mut client, mut conn) = h2::client::handshake(tcp).await.unwrap();
    let (resp, _) = client.send_request(h2_get(&gate, &key), true).unwrap();
    let resp = tokio::select! {
        r = resp => r.unwrap(),
        e = &mut conn => panic!("the connection ended first: {e:?}"),
    };
    assert_eq!(resp.status(), 200);
    assert_eq!(conn.max_concurrent_send_streams(), 7);
    // An open HTTP/2 connection would hold shutdown for the whole drain.
    drop((client, conn));
    gate.stop().await;
}

/// HTTP/2 "rapid reset": a client that opens streams and cancels them at once is cut off with
/// GOAWAY (ENHANCE_YOUR_CALM) once `limits.http2_max_pending_accept_reset_streams` is passed,
/// instead of making keygate start work it never answers.
#[tokio::test]
async fn http2_rapid_reset_flood_closes_the_connection() {
    let (gate, key, _upstream, _snap) =
        h2_gate("[limits]\nhttp2_max_pending_accept_reset_streams = 5\n").await;
    let tcp = TcpStream::connect(gate.addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    let driver = tokio::spawn(conn);
    let mut client = client;
    for _ in 0..500 {
        client = match client.ready().await {
            Ok(c) => c,
            Err(_) => break,
        };
        match client.send_request(h2_get(&gate, &key), false) {
            Ok((_, mut stream)) => stream.send_reset(h2::Reason::CANCEL),
            Err(_) => break,
        }
    }
    let ended = tokio::time::timeout(Duration::from_secs(5), driver)
        .await
        .expect("the connection was not closed within 5 s of the flood")
        .unwrap();
    let e = ended.expect_err("the connection ended cleanly, not by GOAWAY");
    // The GOAWAY is read, or the client is still writing its flood when the server closes.
    let closed_by_server = e.is_io()
        && matches!(
            e.get_io().map(std::io::Error::kind),
            Some(std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset)
        );
    assert!(
        e.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM) || closed_by_server,
        "closed for another reason: {e:?}"
    );
    gate.stop().await;
}

/// Reads until the peer closes (or resets) the connection; `None` if it is still open after
/// `within`.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> Option<Duration> {
    drain_until_closed(stream, within).await.1
}

/// Reads what `s` sends until it closes or `within` passes: the bytes, and when it closed.
async fn drain_until_closed(s: &mut TcpStream, within: Duration) -> (Vec<u8>, Option<Duration>) {
    let started = Instant::now();
    let (mut all, mut buf) = (Vec::new(), vec![0u8; 65536]);
    loop {
        match tokio::time::timeout_at((started + within).into(), s.read(&mut buf)).await {
            Err(_) => return (all, None),
            Ok(Ok(0)) | Ok(Err(_)) => return (all, Some(started.elapsed())),
            Ok(Ok(n)) => all.extend_from_slice(&buf[..n]),
        }
    }
}

/// Shuts `gate` down and asserts that `s`, a connection waiting for its next request, is
/// closed within `at_once` and that the shutdown does not wait on it.
async fn stop_closes_at_once(gate: Gate, s: &mut TcpStream, at_once: Duration) {
    let stopping = tokio::spawn(gate.stop());
    let closed = closed_within(s, Duration::from_secs(5)).await;
    let closed = closed.expect("a connection between requests still open 5 s into the shutdown");
    assert!(closed < at_once, "closed {closed:?} into the shutdown");
    tokio::time::timeout(Duration::from_secs(5), stopping)
        .await
        .expect("the shutdown waited on a connection between requests")
        .unwrap();
}

/// A client that connects and sends nothing, or only part of an HTTP/2 preface, is closed once
/// `proxy.header_read_timeout` (1 s here) passes, and its place comes back: silent sockets
/// cannot use up `limits.max_connections`.
#[tokio::test]
async fn silent_and_half_open_connections_are_closed_and_give_their_place_back() {
    let (gate, key, _upstream, _snap) = h2_gate("[limits]\nmax_connections = 2\n").await;
    let mut silent = TcpStream::connect(gate.addr).await.unwrap();
    let mut half = TcpStream::connect(gate.addr).await.unwrap();
    half.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    let (a, b) = tokio::join!(
        closed_within(&mut silent, Duration::from_secs(5)),
        closed_within(&mut half, Duration::from_secs(5))
    );
    let a = a.expect("a silent connection was still open after 5 s");
    let b = b.expect("a half-sent HTTP/2 preface was still open after 5 s");
    assert!(
        a >= Duration::from_millis(800) && b >= Duration::from_millis(800),
        "{a:?} {b:?}"
    );
    // Both places are back: two new clients are served.
    for _ in 0..2 {
        let mut s = TcpStream::connect(gate.addr).await.unwrap();
        let req = format!("GET /v1/analyses/1 HTTP/1.1\r\nHost: api\r\nX-API-Key: {key}\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = s.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    }
    gate.stop().await;
}

/// An HTTP/2 connection with nothing in flight for `limits.idle_timeout` says goodbye before it
/// closes: a GOAWAY (NO_ERROR) first, naming no stream yet (2^31-1) with a PING, so a request
/// the client sent at that moment is still served (here: one sent after the GOAWAY arrived,
/// before the PING's answer), then the final GOAWAY naming the last stream served, then the
/// close. Closing with only a FIN would leave such a request reset, and the client unable to
/// tell whether it was seen.
#[tokio::test]
async fn idle_http2_connections_say_goodbye_and_serve_what_crossed_it() {
    use support::h2_frames::*;
    let (gate, key, upstream, _snap) = h2_gate("[limits]\nidle_timeout = \"1s\"\n").await;
    let authority = gate.addr.to_string();
    let mut h2 = RawH2::connect(gate.addr).await;
    h2.get(1, &authority, "/v1/analyses/1", &key).await;
    let before = h2.response_head(1).await;
    assert!(before.iter().all(|f| f.kind != GOAWAY), "{before:?}");
    let used = Instant::now();

    // Unused from now on: the first GOAWAY comes an idle period or two later.
    h2.idle_goodbye(used, Duration::from_millis(800), Duration::from_secs(5))
        .await;

    // A request that crossed the GOAWAY is served in full.
    h2.get(3, &authority, "/v1/analyses/1", &key).await;
    h2.response_head(3).await;
    assert_eq!(upstream.count(), 2, "the upstream saw both requests");

    // The client answers the PING: the final GOAWAY names stream 3, then the connection closes.
    let last = h2.goodbye().await;
    assert_eq!(
        last,
        Some((3, 0)),
        "the final GOAWAY names the last stream served"
    );
    gate.stop().await;
}

/// A client that never answers the goodbye (no PING ack, no close) still loses its connection
/// once it has stayed unused for the grace period (here the idle period, which is shorter).
#[tokio::test]
async fn a_client_that_ignores_the_goodbye_is_closed_anyway() {
    use support::h2_frames::*;
    let (gate, key, _upstream, _snap) = h2_gate("[limits]\nidle_timeout = \"1s\"\n").await;
    let authority = gate.addr.to_string();
    let mut h2 = RawH2::connect(gate.addr).await;
    h2.get(1, &authority, "/v1/analyses/1", &key).await;
    let mut goaway = None;
    let started = Instant::now();
    while let Some(f) = h2.next(Duration::from_secs(6)).await {
        if f.kind == GOAWAY && goaway.is_none() {
            goaway = Some(started.elapsed());
        }
    }
    let goaway = goaway.expect("a GOAWAY before the close");
    let closed = started.elapsed();
    assert!(
        closed >= goaway + Duration::from_millis(800),
        "{goaway:?} {closed:?}"
    );
    let open = "keygate_connections_open{front=\"proxy\"}";
    let deadline = Instant::now() + Duration::from_secs(2);
    while gate.metric(open).await != Some(0.0) {
        assert!(Instant::now() < deadline, "its place did not come back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gate.stop().await;
}

/// A WebSocket tunnel keeps its connection's place (and is not cut as idle) for as long as it
/// is open, though its HTTP part ended with the 101.
#[tokio::test]
async fn an_upgraded_tunnel_keeps_its_place_and_outlives_the_idle_timeout() {
    let (gate, key, _upstream, _snap) =
        h2_gate("[limits]\nmax_connections = 1\nidle_timeout = \"1s\"\n").await;
    let mut ws = TcpStream::connect(gate.addr).await.unwrap();
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: api\r\nConnection: upgrade\r\nUpgrade: websocket\r\nX-API-Key: {key}\r\n\r\n"
    );
    ws.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = ws.read(&mut buf).await.unwrap();
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 101"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Still the only place: a second client is reset.
    let refused = tokio::time::timeout(Duration::from_secs(2), async {
        let mut s = TcpStream::connect(gate.addr).await?;
        let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await;
        s.read(&mut [0u8; 64]).await
    })
    .await
    .expect("the second client hung");
    assert!(matches!(refused, Ok(0) | Err(_)), "{refused:?}");
    // And the tunnel still echoes after the idle timeout.
    ws.write_all(b"ping").await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(2), ws.read(&mut buf))
        .await
        .expect("the tunnel was cut")
        .unwrap();
    assert_eq!(&buf[..n], b"ping");
    gate.stop().await;
}

/// A request whose client leaves before the answer (an HTTP/2 stream reset while the upstream
/// is still working) is still counted once, as status 499, with what was decided.
#[tokio::test]
async fn a_request_the_client_abandons_is_still_counted() {
    let (gate, key, upstream, _snap) = h2_gate("").await;
    let tcp = TcpStream::connect(gate.addr).await.unwrap();
    let (mut client, conn) = h2::client::handshake(tcp).await.unwrap();
    let driver = tokio::spawn(conn);
    let req = http::Request::get(format!("http://{}/slow/1500", gate.addr))
        .header("x-api-key", &key)
        .body(())
        .unwrap();
    let (resp, mut stream) = client.send_request(req, true).unwrap();
    let arrived = eventually(Duration::from_secs(3), || upstream.count() == 1).await;
    assert!(arrived, "the request never reached the upstream");
    stream.send_reset(h2::Reason::CANCEL);
    drop(resp);
    let metric = "keygate_requests_total{front=\"proxy\",code=\"allowed\"}";
    let deadline = Instant::now() + Duration::from_secs(3);
    while gate.metric(metric).await != Some(1.0) {
        assert!(
            Instant::now() < deadline,
            "an abandoned request was not counted: {:?}",
            gate.metric(metric).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let histogram = "keygate_request_duration_seconds_count{front=\"proxy\"}";
    assert_eq!(gate.metric(histogram).await, Some(1.0));
    drop((client, driver));
    gate.stop().await;
}

/// A client that asks for a large answer and stops reading it holds its connection (and an
/// upstream connection) only until a whole `limits.idle_timeout` passes with nothing moving.
#[tokio::test]
async fn a_client_that_stops_reading_is_closed_after_an_idle_period() {
    let (gate, key, upstream, _snap) = h2_gate("[limits]\nidle_timeout = \"1s\"\n").await;
    let mut s = TcpStream::connect(gate.addr).await.unwrap();
    let req = format!("GET /big/50000000 HTTP/1.1\r\nHost: api\r\nX-API-Key: {key}\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let arrived = eventually(Duration::from_secs(3), || upstream.count() == 1).await;
    assert!(arrived, "the request never reached the upstream");
    let open = "keygate_connections_open{front=\"proxy\"}";
    assert_eq!(gate.metric(open).await, Some(1.0));
    // Nothing read from here on: the answer stalls in the socket buffers.
    let deadline = Instant::now() + Duration::from_secs(8);
    while gate.metric(open).await != Some(0.0) {
        assert!(
            Instant::now() < deadline,
            "a client that stopped reading still held its connection after 8 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(s);
    gate.stop().await;
}

/// A request waiting longer than `limits.idle_timeout` for a slow upstream is not closed as
/// idle: only `proxy.upstream_timeout` bounds that wait.
#[tokio::test]
async fn a_request_waiting_on_a_slow_upstream_is_not_cut_as_idle() {
    let (gate, key, _upstream, _snap) = h2_gate("[limits]\nidle_timeout = \"500ms\"\n").await;
    let a = get(&client(), &gate.url("/slow/1800"), &[("x-api-key", &key)]).await;
    assert_eq!(a.status, 200, "{a:?}");
    gate.stop().await;
}

/// On shutdown a WebSocket tunnel gets the drain like a request in flight: it still carries
/// traffic after the listener closed, and shutdown waits for it (up to drain_timeout).
#[tokio::test]
async fn shutdown_drains_upgraded_tunnels_too() {
    let (mut gate, key, _upstream, _snap) = h2_gate("[shutdown]\ndrain_timeout = \"5s\"\n").await;
    let mut ws = TcpStream::connect(gate.addr).await.unwrap();
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: api\r\nConnection: upgrade\r\nUpgrade: websocket\r\nX-API-Key: {key}\r\n\r\n"
    );
    ws.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = ws.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 101"));

    let app = gate.app.take().unwrap();
    let stopping = tokio::spawn(app.shutdown());
    tokio::time::sleep(Duration::from_millis(500)).await;
    ws.write_all(b"still here").await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(2), ws.read(&mut buf))
        .await
        .expect("the tunnel was cut when shutdown began")
        .unwrap();
    assert_eq!(&buf[..n], b"still here");
    assert!(
        !stopping.is_finished(),
        "shutdown did not wait for the tunnel"
    );
    drop(ws);
    tokio::time::timeout(Duration::from_secs(3), stopping)
        .await
        .expect("shutdown did not end once the tunnel closed")
        .unwrap();
}

/// Shutdown over HTTP/2: the connection gets its GOAWAY at once, the request in flight (a slow
/// upstream) is still answered in full, the final GOAWAY names it, and keygate then stops.
#[tokio::test]
async fn shutdown_says_goodbye_to_http2_and_finishes_the_stream_in_flight() {
    use support::h2_frames::*;
    let (gate, key, upstream, _snap) = h2_gate("").await;
    let authority = gate.addr.to_string();
    let mut h2 = RawH2::connect(gate.addr).await;
    h2.get(1, &authority, "/slow/1500", &key).await;
    assert!(
        eventually(Duration::from_secs(5), || upstream.count() == 1).await,
        "the request never reached the upstream"
    );
    let stopping = Instant::now();
    let stopped = tokio::spawn(gate.stop());
    let first = h2.first_goaway(Duration::from_secs(5)).await;
    assert!(
        stopping.elapsed() < Duration::from_millis(1000),
        "{:?}",
        stopping.elapsed()
    );
    assert_eq!(first.goaway(), (0x7fff_ffff, 0));
    h2.response_head(1).await;
    assert!(
        stopping.elapsed() >= Duration::from_millis(1000),
        "answered before the upstream did"
    );
    assert_eq!(h2.goodbye().await, Some((1, 0)));
    tokio::time::timeout(Duration::from_secs(5), stopped)
        .await
        .expect("keygate stopped once its last stream was done")
        .unwrap();
}

/// One request's answer on a kept-alive HTTP/1.1 connection.
async fn get_kept_alive(s: &mut TcpStream, key: &str) {
    let req = format!("GET /v1/analyses/1 HTTP/1.1\r\nHost: api\r\nX-API-Key: {key}\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        !answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
}

/// A kept-alive HTTP/1.1 connection waits `proxy.header_read_timeout` (1 s here) for its next
/// request, counted from its last answer, not from its first: after requests 0.4 s apart (the
/// deadline's timer, armed for the first, fires early and is armed again for the last) it is
/// closed a whole timeout after the last answer, and not much later.
#[tokio::test]
async fn a_kept_alive_connection_is_closed_a_header_read_timeout_after_its_last_answer() {
    let (gate, key, _upstream, _snap) = h2_gate("").await;
    let mut s = TcpStream::connect(gate.addr).await.unwrap();
    for _ in 0..4 {
        get_kept_alive(&mut s, &key).await;
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    get_kept_alive(&mut s, &key).await;
    let closed = closed_within(&mut s, Duration::from_secs(5)).await;
    let closed = closed.expect("an idle kept-alive connection was still open after 5 s");
    assert!(
        closed >= Duration::from_millis(900) && closed < Duration::from_millis(2500),
        "closed {closed:?} after the last answer"
    );
    gate.stop().await;
}

/// At shutdown a kept-alive HTTP/1.1 connection waiting for its next request is closed at once,
/// not left to its header-read timeout or the drain's.
#[tokio::test]
async fn shutdown_closes_a_kept_alive_connection_between_requests_at_once() {
    let (gate, key, _upstream, _snap) = reader_gate("header_read_timeout = \"30s\"\n", "").await;
    let mut s = TcpStream::connect(gate.addr).await.unwrap();
    get_kept_alive(&mut s, &key).await;
    get_kept_alive(&mut s, &key).await;
    stop_closes_at_once(gate, &mut s, Duration::from_secs(2)).await;
}

/// A burst of pipelined requests, then silence: every request is answered and the connection
/// is closed a header-read timeout (1 s here) later, whatever the burst's length. Bursts just
/// long enough to spend tokio's per-task budget (127 or 254 answers, then the next read cut
/// short by it) once left the deadline and the stop signal looked at with no timer or waiter
/// registered: the connection stayed open until the idle timeout, and held up shutdown for the
/// whole drain.
#[tokio::test]
async fn a_pipelined_burst_then_silence_is_closed_a_header_read_timeout_later() {
    let (gate, _key, _upstream, _snap) = h2_gate("").await;
    let request = "GET /v1/analyses/1 HTTP/1.1\r\nHost: api\r\n\r\n";
    let bursts = [1, 126, 127, 128, 253, 254, 255];
    let runs = bursts.map(|k| {
        let addr = gate.addr;
        tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(request.repeat(k).as_bytes()).await.unwrap();
            let (all, closed) = drain_until_closed(&mut s, Duration::from_secs(6)).await;
            let answers = String::from_utf8_lossy(&all)
                .matches("HTTP/1.1 401")
                .count();
            (k, answers, closed)
        })
    });
    for run in runs {
        let (k, answers, closed) = run.await.unwrap();
        assert_eq!(answers, k, "a burst of {k}: {answers} answers");
        let closed = closed.unwrap_or_else(|| panic!("a burst of {k}: still open after 6 s"));
        assert!(
            closed < Duration::from_secs(3),
            "a burst of {k}: closed after {closed:?}"
        );
    }
    // The same burst, then a shutdown while the connection waits: closed at once.
    let mut s = TcpStream::connect(gate.addr).await.unwrap();
    s.write_all(request.repeat(127).as_bytes()).await.unwrap();
    let (mut all, mut buf) = (Vec::new(), vec![0u8; 65536]);
    while String::from_utf8_lossy(&all)
        .matches("HTTP/1.1 401")
        .count()
        < 127
    {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before the burst's last answer");
        all.extend_from_slice(&buf[..n]);
    }
    stop_closes_at_once(gate, &mut s, Duration::from_millis(900)).await;
}
