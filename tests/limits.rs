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
    let upstream = Upstream::start().await;
    let snap = SnapshotDir::new();
    let key = mint("sk_live_");
    snap.write(&Doc::new(1).partner("partner_acme", None, "active").key(
        "key_a",
        &key,
        json!({"scopes": ["analyses:read"]}),
    ));
    // header_read_timeout is long enough that idle connections stay open during the test.
    let toml = config_toml_proxy(
        &snap.path(),
        upstream.addr,
        "",
        "[limits]\nmax_connections = 2\n",
    )
    .replace(
        "header_read_timeout = \"1s\"",
        "header_read_timeout = \"10s\"",
    );
    let gate = Gate::start(&toml).await;

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
    let mut third = TcpStream::connect(gate.addr).await.unwrap();
    let _ = third.write_all(request.as_bytes()).await;
    let read = tokio::time::timeout(Duration::from_secs(2), third.read(&mut buf)).await;
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
        gate.metric("keygate_connections_refused_total{front=\"proxy\"}")
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
        let mut next = TcpStream::connect(gate.addr).await.unwrap();
        let _ = next.write_all(request.as_bytes()).await;
        let n = next.read(&mut buf).await.unwrap_or(0);
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
        gate.metric("keygate_connections_refused_total{front=\"proxy\"}")
            .await
            >= Some(1.0)
    );
    gate.stop().await;
}
