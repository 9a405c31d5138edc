//! The proxy's HTTP/1.1 server side against raw clients and an upstream that writes exact
//! bytes: the upstream's fields reach the client as it sent them (keygate's own values win),
//! trailers only to a client that asks, refusals keep the contract, and a connection whose
//! client goes away or goes silent mid-upload never outlives `limits.idle_timeout`.

mod support;

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::json;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// An upstream running `serve` on each connection it accepts.
async fn upstream<F, Fut>(serve: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(serve(s));
        }
    });
    addr
}

/// Read a request head from `s`; what came after it.
async fn read_head(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while find(&buf, b"\r\n\r\n").is_none() {
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let end = find(&buf, b"\r\n\r\n").unwrap() + 4;
    Some(buf.split_off(end))
}

/// An upstream answering every request (read with a body of `Content-Length`) with `answer`.
async fn answering(answer: &'static [u8]) -> SocketAddr {
    // Requests here carry no body, and come one at a time.
    upstream(move |mut s| async move {
        while read_head(&mut s).await.is_some() {
            if s.write_all(answer).await.is_err() {
                return;
            }
        }
    })
    .await
}

/// An upstream that answers a request as soon as its head is in, leaving the answer's body
/// open, then reads the upload as it comes (`reads`) or never (holding the connection for
/// longer than any test).
async fn answering_early(answer: &'static [u8], reads: bool) -> SocketAddr {
    upstream(move |mut s| async move {
        if read_head(&mut s).await.is_none() {
            return;
        }
        let _ = s.write_all(answer).await;
        if !reads {
            tokio::time::sleep(Duration::from_secs(60)).await;
            return;
        }
        let mut chunk = [0u8; 4096];
        while let Ok(n) = s.read(&mut chunk).await {
            if n == 0 {
                return;
            }
        }
    })
    .await
}

struct Fx {
    gate: Gate,
    _snap: SnapshotDir,
    key: String,
}

async fn fx(up: SocketAddr, extra: &str) -> Fx {
    let snap = SnapshotDir::new();
    let key = mint("sk_live_");
    snap.write(
        &Doc::new(1)
            .partner("partner_acme", Some("org_1"), "active")
            .key(
                "key_1",
                &key,
                json!({"scopes": ["analyses:read", "analyses:write"]}),
            ),
    );
    let gate = Gate::start(&config_toml(&snap.path(), up, extra)).await;
    Fx {
        gate,
        _snap: snap,
        key,
    }
}

impl Fx {
    fn req(&self, line: &str, headers: &str) -> Vec<u8> {
        format!(
            "{line} HTTP/1.1\r\nHost: api.example\r\nAuthorization: Bearer {}\r\n{headers}\r\n",
            self.key
        )
        .into_bytes()
    }
}

/// Everything `s` sends until it closes (or `within` passes).
async fn read_all(s: &mut TcpStream, within: Duration) -> Vec<u8> {
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    let _ = tokio::time::timeout(within, async {
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    got
}

/// Start an upload of `length` bytes (the head and a first byte) and read the answer until
/// `until` has come.
async fn upload_until_answered(f: &Fx, length: u64, until: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(f.gate.addr).await.unwrap();
    let head = format!("Content-Length: {length}\r\n");
    s.write_all(&f.req("POST /v1/analyses/1", &head))
        .await
        .unwrap();
    s.write_all(b"x").await.unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    while find(&got, until).is_none() {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk))
            .await
            .expect("the early answer")
            .unwrap();
        assert!(n > 0, "closed before the early answer");
        got.extend_from_slice(&chunk[..n]);
    }
    s
}

/// Wait (up to 8 s) until the proxy holds no connection.
async fn no_connection_left(f: &Fx, what: &str) {
    let open = "keygate_connections_open{front=\"proxy\"}";
    let deadline = Instant::now() + Duration::from_secs(8);
    while f.gate.metric(open).await != Some(0.0) {
        assert!(Instant::now() < deadline, "{what}: still open after 8 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn the_upstreams_fields_pass_as_sent_and_keygates_own_win() {
    let up = answering(
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nX-Multi: a\r\nx-multi: b\r\nDate: Mon, 01 Jan 2024 00:00:00 GMT\r\nx-request-id: made-upstream\r\nX-Request-ID: made-upstream-too\r\nConnection: keep-alive, x-hop\r\nx-hop: 1\r\n\r\nok",
    )
    .await;
    let f = fx(up, "").await;
    let bearer = format!("Bearer {}", f.key);
    for c in [client(), h2_client()] {
        let a = get(
            &c,
            &f.gate.url("/v1/analyses/1"),
            &[("authorization", &bearer)],
        )
        .await;
        assert_eq!(a.status, 200, "{a:?}");
        assert_eq!(&a.body[..], b"ok");
        let multi: Vec<_> = a.headers.get_all("x-multi").iter().collect();
        assert_eq!(multi, ["a", "b"], "{a:?}");
        let dates: Vec<_> = a.headers.get_all("date").iter().collect();
        assert_eq!(dates, ["Mon, 01 Jan 2024 00:00:00 GMT"], "{a:?}");
        let ids: Vec<_> = a.headers.get_all("x-request-id").iter().collect();
        assert_eq!(ids.len(), 1, "{a:?}");
        assert_ne!(
            ids[0], "made-upstream",
            "the upstream's request id won: {a:?}"
        );
        assert!(a.headers.get("x-hop").is_none(), "{a:?}");
    }
    // On the wire: each field once, the length keygate's.
    let mut s = TcpStream::connect(f.gate.addr).await.unwrap();
    s.write_all(&f.req("GET /v1/analyses/1", "Connection: close\r\n"))
        .await
        .unwrap();
    let text = String::from_utf8(read_all(&mut s, Duration::from_secs(5)).await).unwrap();
    assert_eq!(text.matches("content-length: 2\r\n").count(), 1, "{text}");
    assert_eq!(
        text.to_ascii_lowercase().matches("\r\ndate:").count(),
        1,
        "{text}"
    );
    assert!(text.contains("X-Multi: a\r\nx-multi: b\r\n"), "{text}");
    let lower = text.to_ascii_lowercase();
    assert_eq!(lower.matches("\r\nx-request-id:").count(), 1, "{text}");
    assert!(!lower.contains("made-upstream"), "{text}");
    f.gate.stop().await;
}

/// The client's fields reach the upstream as it spelled them and in its order, less every
/// field keygate takes out, in whatever case it came: hop-by-hop ones and those `Connection`
/// lists, spoofed identity and forwarding fields (`_` spellings too), the credential, and the
/// client's framing fields (keygate frames the body itself).
#[tokio::test]
async fn the_clients_fields_go_upstream_as_spelled_less_what_keygate_takes_out() {
    let (heads_tx, mut heads) = tokio::sync::mpsc::unbounded_channel::<String>();
    let up = upstream(move |mut s| {
        let heads_tx = heads_tx.clone();
        async move {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            while find(&buf, b"\r\n\r\n").is_none() {
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let _ = heads_tx.send(String::from_utf8_lossy(&buf).into_owned());
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await;
        }
    })
    .await;
    let f = fx(up, "").await;
    let sent = format!(
        "GET /v1/analyses/1?q=1 HTTP/1.1\r\nhOST: api.example\r\nX-Custom: 1\r\n\
         X-API-KEY: {key}\r\nX-PARTNER-ID: partner_evil\r\nx_key_id: key_evil\r\n\
         X-Scopes: admin\r\nCONNECTION: X-Drop, close\r\nX-DROP: 1\r\nKeep-Alive: 5\r\n\
         te: trailers\r\nX-Forwarded-For: 6.6.6.6\r\nX_Forwarded_Host: evil.example\r\n\
         FORWARDED: for=6.6.6.6\r\nX-REQUEST-ID: client-id-1\r\ncontent-LENGTH: 0\r\n\
         x-CUSTOM: 2\r\n\r\n",
        key = f.key
    );
    let mut s = TcpStream::connect(f.gate.addr).await.unwrap();
    s.write_all(sent.as_bytes()).await.unwrap();
    let answer = String::from_utf8(read_all(&mut s, Duration::from_secs(5)).await).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let head = tokio::time::timeout(Duration::from_secs(5), heads.recv())
        .await
        .unwrap()
        .unwrap();
    let lower = head.to_ascii_lowercase();
    assert!(
        head.starts_with("GET /v1/analyses/1?q=1 HTTP/1.1\r\nhOST: api.example\r\nX-Custom: 1\r\n"),
        "{head}"
    );
    assert!(head.contains("\r\nx-CUSTOM: 2\r\n"), "{head}");
    for gone in [
        f.key.as_str(),
        "evil",
        "admin",
        "x-drop",
        "keep-alive",
        "\r\nte:",
        "connection",
        "6.6.6.6",
        "forwarded:",
        "x_forwarded",
    ] {
        assert!(!lower.contains(gone), "{gone:?} went upstream: {head}");
    }
    for (name, value) in [
        ("x-partner-id", "partner_acme"),
        ("x-key-id", "key_1"),
        ("x-forwarded-for", "127.0.0.1"),
        ("x-forwarded-host", "api.example"),
        ("x-request-id", "client-id-1"),
        ("content-length", "0"),
    ] {
        let field = format!("\r\n{name}: {value}\r\n");
        assert_eq!(lower.matches(&field).count(), 1, "{field:?}: {head}");
        let named = format!("\r\n{name}:");
        assert_eq!(lower.matches(&named).count(), 1, "{named:?}: {head}");
    }
    f.gate.stop().await;
}

#[tokio::test]
async fn trailers_reach_only_a_client_that_asks_for_them() {
    let up = answering(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-trail\r\n\r\n5\r\nhello\r\n0\r\nx-trail: 1\r\ncontent-length: 987654\r\nx-key-id: made-up\r\nX_Request_Id: made-up\r\nconnection: close\r\n\r\n",
    )
    .await;
    // Also an answer to an idempotent request that streams on (no length: not kept for retries).
    let f = fx(up, "[idempotency]\n").await;
    let requests = [
        ("GET /v1/analyses/1", "", ""),
        ("GET /v1/analyses/1", "TE: trailers\r\n", ""),
        (
            "POST /v1/analyses",
            "Idempotency-Key: trail-1\r\nContent-Length: 1\r\n",
            "x",
        ),
        (
            "POST /v1/analyses",
            "TE: trailers\r\nIdempotency-Key: trail-2\r\nContent-Length: 1\r\n",
            "x",
        ),
    ];
    for (line, fields, body) in requests {
        let want = fields.starts_with("TE");
        let mut s = TcpStream::connect(f.gate.addr).await.unwrap();
        let mut request = f.req(line, &format!("{fields}Connection: close\r\n"));
        request.extend_from_slice(body.as_bytes());
        s.write_all(&request).await.unwrap();
        let text = String::from_utf8(read_all(&mut s, Duration::from_secs(5)).await).unwrap();
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(text.contains("\r\n5\r\nhello\r\n0\r\n"), "{text}");
        assert_eq!(text.contains("x-trail: 1\r\n"), want, "{fields:?}: {text}");
        assert!(!text.contains("987654"), "a length in the trailers: {text}");
        assert!(
            !text.contains("made-up"),
            "an identity field in the trailers: {text}"
        );
        assert!(!text.ends_with("connection: close\r\n\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\n"), "{text}");
    }
    f.gate.stop().await;
}

/// An upstream answer that breaks off (a malformed chunk) before any of it reached the client
/// is a 502 with the request's id, not a connection closed without a word; once some of it
/// went out, the connection is cut.
#[tokio::test]
async fn an_answer_broken_before_any_of_it_went_out_is_502() {
    // (A body that stops short of its length is seen to end only at the next read, and what
    // came before it has gone out by then.)
    for answer in [
        &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokXX"[..],
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nokay\r\n0\r\n\r\n",
    ] {
        let up = upstream(move |mut s| async move {
            if read_head(&mut s).await.is_some() {
                let _ = s.write_all(answer).await;
            }
        })
        .await;
        // Also an idempotent request's answer, which streams on (it has no length).
        let f = fx(up, "[idempotency]\n").await;
        for (line, fields) in [
            ("GET /v1/analyses/1", ""),
            (
                "POST /v1/analyses",
                "Idempotency-Key: broken-k\r\nContent-Length: 0\r\n",
            ),
        ] {
            let mut s = TcpStream::connect(f.gate.addr).await.unwrap();
            let fields = format!("{fields}X-Request-Id: broken-1\r\n");
            s.write_all(&f.req(line, &fields)).await.unwrap();
            let text = String::from_utf8(read_all(&mut s, Duration::from_secs(5)).await).unwrap();
            let a = parse_response(text.as_bytes()).unwrap_or_else(|| panic!("{text}"));
            assert_error(&a, 502, "upstream_unavailable");
            assert_eq!(a.header("x-request-id"), Some("broken-1"), "{text}");
            assert_eq!(a.json()["error"]["request_id"], "broken-1", "{text}");
            assert!(!text.contains("okXX") && !text.contains("okay"), "{text}");
        }
        // Counted as the upstream errors they are.
        let errors = r#"keygate_upstream_errors_total{kind="unavailable"}"#;
        assert_eq!(f.gate.metric(errors).await, Some(2.0));
        f.gate.stop().await;
    }
    // 200 KB of 300 said: most of it went out before the end showed, and the client's
    // connection is cut after it (nothing can be said after a head that went out).
    let up = upstream(|mut s| async move {
        if read_head(&mut s).await.is_some() {
            let _ = s
                .write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 300000\r\nConnection: close\r\n\r\n",
                )
                .await;
            let _ = s.write_all(&vec![b'x'; 200_000]).await;
        }
    })
    .await;
    let f = fx(up, "").await;
    let mut s = TcpStream::connect(f.gate.addr).await.unwrap();
    s.write_all(&f.req("GET /v1/analyses/1", "")).await.unwrap();
    let got = read_all(&mut s, Duration::from_secs(5)).await;
    assert!(got.starts_with(b"HTTP/1.1 200"), "{:?}", &got[..40]);
    assert!(got.len() < 300_000, "{}", got.len());
    assert!(find(&got, b"upstream_unavailable").is_none());
    f.gate.stop().await;
}

/// Answers without a body keep a `Content-Length` only where it means something and only if
/// it is one number, so that an HTTP/2 client (which checks) gets them too.
#[tokio::test]
async fn bodyless_answers_carry_only_a_sound_length() {
    let up = upstream(|mut s| async move {
        while read_head(&mut s).await.is_some() {
            let _ = s
                .write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 3\r\n\r\n")
                .await;
        }
    })
    .await;
    let f = fx(up, "").await;
    let bearer = format!("Bearer {}", f.key);
    for c in [client(), h2_client()] {
        let a = get(
            &c,
            &f.gate.url("/v1/analyses/1"),
            &[("authorization", &bearer)],
        )
        .await;
        assert_eq!(a.status, 204, "{a:?}");
        assert!(a.headers.get("content-length").is_none(), "{a:?}");
    }
    f.gate.stop().await;
    let up = upstream(|mut s| async move {
        while read_head(&mut s).await.is_some() {
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 5\r\n\r\n")
                .await;
        }
    })
    .await;
    let f = fx(up, "").await;
    let bearer = format!("Bearer {}", f.key);
    for c in [client(), h2_client()] {
        let url = f.gate.url("/v1/analyses/1");
        let a = send(&c, "HEAD", &url, &[("authorization", &bearer)], "").await;
        assert_eq!(a.status, 200, "{a:?}");
        assert!(a.headers.get("content-length").is_none(), "{a:?}");
    }
    f.gate.stop().await;
}

#[tokio::test]
async fn refusals_keep_the_contract() {
    let up = answering(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
    let f = fx(up, "").await;
    // HTTP/1.1 without Host (RFC 9112 §3.2).
    let a = raw(
        f.gate.addr,
        format!(
            "GET /v1/analyses/1 HTTP/1.1\r\nAuthorization: Bearer {}\r\n\r\n",
            f.key
        )
        .as_bytes(),
    )
    .await;
    assert_error(&a, 400, "invalid_request");
    // Two Hosts, in any spelling: a server behind keygate might route by the other one.
    for hosts in ["Host: a\r\nHost: b\r\n", "Host: a\r\nhOST: a\r\n"] {
        let a = raw(
            f.gate.addr,
            format!(
                "GET /v1/analyses/1 HTTP/1.1\r\n{hosts}Authorization: Bearer {}\r\n\r\n",
                f.key
            )
            .as_bytes(),
        )
        .await;
        assert_error(&a, 400, "invalid_request");
    }
    // A HEAD refusal says how long the GET's would be, and sends no body.
    let get = raw(
        f.gate.addr,
        b"GET /v1/analyses/1 HTTP/1.1\r\nHost: a\r\n\r\n",
    )
    .await;
    assert_error(&get, 401, "authentication_required");
    let mut s = TcpStream::connect(f.gate.addr).await.unwrap();
    s.write_all(b"HEAD /v1/analyses/1 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let text = String::from_utf8(read_all(&mut s, Duration::from_secs(5)).await).unwrap();
    assert!(text.starts_with("HTTP/1.1 401"), "{text}");
    let length = format!("content-length: {}\r\n", get.body.len());
    assert!(text.contains(&length), "{text}");
    assert!(
        text.ends_with("\r\n\r\n"),
        "a body after a HEAD answer: {text}"
    );
    // So does a HEAD whose head is refused before a request is made of it.
    for (request, status) in [
        (&b"HEAD /a#b HTTP/1.1\r\nHost: a\r\n\r\n"[..], "400"),
        (b"HEAD /a HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "400"),
        // Empty lines before the request line are skipped (a stray CRLF after a body).
        (b"\r\n\r\nHEAD /a#b HTTP/1.1\r\nHost: a\r\n\r\n", "400"),
    ] {
        let mut s = TcpStream::connect(f.gate.addr).await.unwrap();
        s.write_all(request).await.unwrap();
        let text = String::from_utf8(read_all(&mut s, Duration::from_secs(5)).await).unwrap();
        assert!(text.starts_with(&format!("HTTP/1.1 {status}")), "{text}");
        assert!(text.contains("content-length: "), "{text}");
        assert!(
            text.ends_with("\r\n\r\n"),
            "a body after a HEAD answer: {text}"
        );
    }
    let mut s = TcpStream::connect(f.gate.addr).await.unwrap();
    let big = format!(
        "HEAD /a HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    s.write_all(big.as_bytes()).await.unwrap();
    let text = String::from_utf8(read_all(&mut s, Duration::from_secs(5)).await).unwrap();
    assert!(text.starts_with("HTTP/1.1 431"), "{text}");
    assert!(
        text.ends_with("\r\n\r\n"),
        "a body after a HEAD answer: {text}"
    );
    f.gate.stop().await;
}

/// A client whose upload breaks (malformed chunks, or cut short) gets 400 `invalid_request`,
/// not a 502 that would blame the upstream.
#[tokio::test]
async fn a_broken_upload_is_the_clients_fault() {
    // Reads whatever comes and never answers: only the client's body can end the exchange.
    let up = upstream(|mut s| async move {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = s.read(&mut chunk).await {
            if n == 0 {
                return;
            }
        }
    })
    .await;
    let f = fx(up, "").await;
    for (headers, body, half_close) in [
        (
            "Transfer-Encoding: chunked\r\n",
            &b"5\r\nhelloXX\r\n0\r\n\r\n"[..],
            false,
        ),
        ("Transfer-Encoding: chunked\r\n", b"zz\r\nhello\r\n", false),
        ("Content-Length: 100\r\n", b"hello", true),
    ] {
        let mut s = TcpStream::connect(f.gate.addr).await.unwrap();
        s.write_all(&f.req("POST /v1/analyses/1", headers))
            .await
            .unwrap();
        s.write_all(body).await.unwrap();
        if half_close {
            s.shutdown().await.unwrap();
        }
        let got = read_all(&mut s, Duration::from_secs(5)).await;
        let a = parse_response(&got)
            .unwrap_or_else(|| panic!("{headers:?}: {:?}", String::from_utf8_lossy(&got)));
        assert_error(&a, 400, "invalid_request");
        assert_eq!(a.header("connection"), Some("close"), "{headers:?}");
    }
    f.gate.stop().await;
}

/// An upstream that answers at once and keeps its body open while it reads the upload (a
/// streaming handler): a client that then goes silent, or away, must not hold its connection,
/// its place and an upstream connection for ever.
#[tokio::test]
async fn a_client_gone_silent_or_away_mid_upload_lets_its_connection_go() {
    let up = answering_early(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
        true,
    )
    .await;
    let f = fx(up, "[limits]\nidle_timeout = \"1s\"\n").await;
    for away in [false, true] {
        let mut s = upload_until_answered(&f, 1_000_000, b"hello").await;
        let started = Instant::now();
        if away {
            drop(s);
        } else {
            // Silent: the connection must be closed by keygate.
            read_all(&mut s, Duration::from_secs(8)).await;
            assert!(
                started.elapsed() < Duration::from_secs(7),
                "a silent client mid-upload was not closed after the idle timeout"
            );
        }
        no_connection_left(
            &f,
            if away {
                "a client gone"
            } else {
                "a silent client"
            },
        )
        .await;
    }
    f.gate.stop().await;
}

/// The same with the upload stuck: the upstream stops reading it, so the upload (in its own
/// task) waits on the upstream while the connection waits on the answer. When the client then
/// goes silent, the deadline must still reach whichever task can close the connection.
#[tokio::test]
async fn a_silent_client_is_closed_while_its_upload_is_stuck_upstream() {
    let up = answering_early(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
        false,
    )
    .await;
    let f = fx(up, "[limits]\nidle_timeout = \"1s\"\n").await;
    let mut s = upload_until_answered(&f, 100_000_000, b"\r\n\r\n").await;
    // Push the upload until every buffer on the way is full, then go silent.
    let block = vec![b'x'; 64 * 1024];
    let pushing = Instant::now();
    while pushing.elapsed() < Duration::from_secs(1) {
        if tokio::time::timeout(Duration::from_millis(200), s.write_all(&block))
            .await
            .is_err()
        {
            break;
        }
    }
    no_connection_left(&f, "a silent client with its upload stuck upstream").await;
    drop(s);
    f.gate.stop().await;
}
