//! The proxy's upstream connection pool against a raw upstream that counts connections:
//! connections are reused, and one the upstream closed while idle (its keep-alive timeout
//! shorter than ours) is never used for a request — the next request gets a fresh connection,
//! not a 502.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// An HTTP/1.1 upstream that answers each request with `ok` and, when `close_after` is set,
/// closes the connection that long after each answer.
async fn counting_upstream(close_after: Option<Duration>) -> (SocketAddr, Arc<AtomicUsize>) {
    let (addr, connections, _) = counting_upstream_requests(close_after).await;
    (addr, connections)
}

/// As [`counting_upstream`], also counting the request heads received.
async fn counting_upstream_requests(
    close_after: Option<Duration>,
) -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(AtomicUsize::new(0));
    let count = connections.clone();
    let heads = requests.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            count.fetch_add(1, Ordering::SeqCst);
            let heads = heads.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let n = match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    buf.extend_from_slice(&chunk[..n]);
                    // One answer per complete request head (the tests send no bodies).
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        // A body, if any, is `content-length: 2` in these tests.
                        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                        let body = if head.contains("content-length: 2") {
                            2
                        } else {
                            0
                        };
                        if buf.len() < end + 4 + body {
                            break;
                        }
                        buf.drain(..end + 4 + body);
                        heads.fetch_add(1, Ordering::SeqCst);
                        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: text/plain\r\n\r\nok";
                        if s.write_all(answer).await.is_err() {
                            return;
                        }
                        if let Some(d) = close_after {
                            tokio::time::sleep(d).await;
                            return; // drops the socket: the upstream closes an idle connection
                        }
                    }
                }
            });
        }
    });
    (addr, connections, requests)
}

async fn gate_for(upstream: SocketAddr) -> (Gate, SnapshotDir, String) {
    let (snap, key) = one_key_snapshot();
    // One proxy thread, so every request shares one pool.
    let runtime = "[runtime]\nflavor = \"current_thread\"\n";
    let gate = Gate::start(&config_toml(&snap.path(), upstream, runtime)).await;
    (gate, snap, key)
}

#[tokio::test]
async fn upstream_connections_are_reused() {
    let (upstream, connections) = counting_upstream(None).await;
    let (gate, _snap, key) = gate_for(upstream).await;
    let c = client();
    for _ in 0..10 {
        let a = get(&c, &gate.url("/v1/x"), &[("x-api-key", &key)]).await;
        assert_eq!(a.status, 200);
        assert_eq!(a.body.as_ref(), b"ok");
    }
    assert_eq!(
        connections.load(Ordering::SeqCst),
        1,
        "ten sequential requests, one upstream connection"
    );
    gate.stop().await;
}

#[tokio::test]
async fn a_connection_the_upstream_closed_while_idle_is_not_used() {
    let (upstream, connections) = counting_upstream(Some(Duration::from_millis(20))).await;
    let (gate, _snap, key) = gate_for(upstream).await;
    let c = client();
    for i in 0..5 {
        let a = get(&c, &gate.url("/v1/x"), &[("x-api-key", &key)]).await;
        assert_eq!(
            a.status, 200,
            "request {i} after the upstream closed the idle connection"
        );
        // Let the upstream close the connection that served it.
        tokio::time::sleep(Duration::from_millis(80)).await;
    }
    assert_eq!(
        connections.load(Ordering::SeqCst),
        5,
        "a fresh connection each time"
    );
    gate.stop().await;
}

/// The hardest case: the upstream closes right after each answer, without saying so
/// (`Connection: close` absent). Back-to-back requests race that close.
#[tokio::test]
async fn an_upstream_closing_right_after_each_answer() {
    let (upstream, _connections) = counting_upstream(Some(Duration::ZERO)).await;
    let (gate, _snap, key) = gate_for(upstream).await;
    let c = client();
    let mut statuses = Vec::new();
    for _ in 0..50 {
        statuses.push(
            get(&c, &gate.url("/v1/x"), &[("x-api-key", &key)])
                .await
                .status,
        );
    }
    let failed = statuses.iter().filter(|s| **s != 200).count();
    assert_eq!(failed, 0, "{statuses:?}");
    gate.stop().await;
}

/// A request with a body is never sent twice: on a connection that dies under it, the client
/// gets 502 and the upstream saw it at most once.
#[tokio::test]
async fn a_post_is_never_replayed() {
    let (upstream, _connections, requests) = counting_upstream_requests(Some(Duration::ZERO)).await;
    let (gate, _snap, key) = gate_for(upstream).await;
    let c = client();
    let mut ok = 0;
    for _ in 0..30 {
        let a = send(&c, "POST", &gate.url("/v1/x"), &[("x-api-key", &key)], "{}").await;
        match a.status {
            200 => ok += 1,
            502 => assert_error(&a, 502, "upstream_unavailable"),
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(
        requests.load(Ordering::SeqCst),
        ok,
        "every POST the upstream received was answered once"
    );
    gate.stop().await;
}
