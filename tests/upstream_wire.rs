//! The proxy's HTTP/1.1 client against an upstream that writes exact bytes: answers framed
//! every legal way reach the client whole; answers framed ambiguously (the shapes that
//! desynchronize a connection) become 502 `upstream_unavailable` and their connection is never
//! used again; uploads are framed by what the body is; an early answer to an upload is not lost.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the scripted upstream does with one request.
#[derive(Clone)]
struct Reply {
    bytes: Vec<u8>,
    /// Close the connection after writing.
    close: bool,
    /// Write one byte at a time.
    trickle: bool,
    /// Answer as soon as the head is in, without reading the body.
    early: bool,
    /// Written 100 ms after the reply, unasked.
    later: Option<Vec<u8>>,
}

fn reply(bytes: &[u8]) -> Reply {
    Reply {
        bytes: bytes.to_vec(),
        close: false,
        trickle: false,
        early: false,
        later: None,
    }
}

const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nclean";

/// An upstream answering its n-th request (over all connections) with `script(n, request)`.
struct Scripted {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    requests: Arc<Mutex<Vec<Vec<u8>>>>,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Read from `s` into `buf` until `needle` is in it; `false` if the stream ended first.
async fn fill_until(s: &mut TcpStream, buf: &mut Vec<u8>, needle: &[u8]) -> bool {
    let mut chunk = [0u8; 4096];
    while find(buf, needle).is_none() {
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    true
}

/// The end of the request at the front of `buf` (head, and a Content-Length or chunked body).
fn request_end(buf: &[u8], head_only: bool) -> Option<usize> {
    let head_end = find(buf, b"\r\n\r\n")? + 4;
    if head_only {
        return Some(head_end);
    }
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    if head.contains("\r\ntransfer-encoding: chunked") {
        return find(&buf[head_end..], b"\r\n0\r\n\r\n")
            .map(|i| head_end + i + 7)
            .or_else(|| {
                buf[head_end..]
                    .starts_with(b"0\r\n\r\n")
                    .then_some(head_end + 5)
            });
    }
    let len = head
        .split("\r\n")
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    (buf.len() >= head_end + len).then_some(head_end + len)
}

impl Scripted {
    async fn start(script: impl Fn(usize, &[u8]) -> Reply + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let requests: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        let script = Arc::new(script);
        let (count, record) = (connections.clone(), requests.clone());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let (record, script) = (record.clone(), script.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 8192];
                    loop {
                        // Peek at the next reply to know whether to wait for the body.
                        let n = record.lock().unwrap().len();
                        let early = script(n, b"").early;
                        while let Some(end) = request_end(&buf, early) {
                            let request: Vec<u8> = buf.drain(..end).collect();
                            let n = {
                                let mut r = record.lock().unwrap();
                                r.push(request.clone());
                                r.len() - 1
                            };
                            let r = script(n, &request);
                            let written = if r.trickle {
                                let mut ok = true;
                                for b in &r.bytes {
                                    ok &= s.write_all(&[*b]).await.is_ok();
                                    tokio::time::sleep(Duration::from_micros(200)).await;
                                }
                                ok
                            } else {
                                s.write_all(&r.bytes).await.is_ok()
                            };
                            if !written || r.close {
                                return;
                            }
                            if let Some(later) = r.later {
                                tokio::time::sleep(Duration::from_millis(100)).await;
                                let _ = s.write_all(&later).await;
                            }
                        }
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                });
            }
        });
        Scripted {
            addr,
            connections,
            requests,
        }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    fn request(&self, n: usize) -> String {
        String::from_utf8_lossy(&self.requests.lock().unwrap()[n]).into_owned()
    }
}

struct Fx {
    up: Scripted,
    gate: Gate,
    _snap: SnapshotDir,
    key: String,
}

async fn fx(script: impl Fn(usize, &[u8]) -> Reply + Send + Sync + 'static) -> Fx {
    let up = Scripted::start(script).await;
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
    // One thread, one pool: a connection left in the pool would be the next request's.
    let gate = Gate::start(&config_toml(
        &snap.path(),
        up.addr,
        "[runtime]\nflavor = \"current_thread\"\n",
    ))
    .await;
    Fx {
        up,
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

    async fn get(&self) -> Answer {
        let auth = format!("Bearer {}", self.key);
        get(
            &client(),
            &self.gate.url("/v1/analyses/1"),
            &[("authorization", &auth)],
        )
        .await
    }
}

#[tokio::test]
async fn ambiguously_framed_answers_are_502_and_their_connection_is_never_reused() {
    let bad: &[&[u8]] = &[
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n5\r\nclean\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\ncleanX",
        b"HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\n\r\nclean",
        b"HTTP/1.1 200 OK\r\ncontent-length: abc\r\n\r\nclean",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n5\r\nclean\r\n0\r\n\r\n",
        b"HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nclean\r\n0\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nbad header line\r\n\r\n",
        b"SSH-2.0-OpenSSH_9.2\r\n\r\n",
    ];
    let cases: Vec<Vec<u8>> = bad.iter().map(|b| b.to_vec()).collect();
    let script_cases = cases.clone();
    // Even requests get a bad answer, odd ones a good one.
    let f = fx(move |n, _| {
        if n % 2 == 0 {
            reply(&script_cases[(n / 2) % script_cases.len()])
        } else {
            reply(OK)
        }
    })
    .await;
    for case in &cases {
        let a = f.get().await;
        assert_error(&a, 502, "upstream_unavailable");
        let before = f.up.connections();
        let a = f.get().await;
        assert_eq!(
            (a.status, &a.body[..]),
            (200, &b"clean"[..]),
            "after {:?}",
            String::from_utf8_lossy(case)
        );
        assert_eq!(
            f.up.connections(),
            before + 1,
            "the connection that carried {:?} was used again",
            String::from_utf8_lossy(case)
        );
    }
    f.gate.stop().await;
}

#[tokio::test]
async fn an_oversized_answer_head_is_502() {
    let huge = format!(
        "HTTP/1.1 200 OK\r\nx-big: {}\r\ncontent-length: 0\r\n\r\n",
        "a".repeat(70_000)
    );
    let many: String = (0..200).map(|i| format!("x-{i}: v\r\n")).collect();
    let many = format!("HTTP/1.1 200 OK\r\n{many}content-length: 0\r\n\r\n");
    let answers = [huge, many];
    let f = fx(move |n, _| reply(answers[n % 2].as_bytes())).await;
    for _ in 0..2 {
        assert_error(&f.get().await, 502, "upstream_unavailable");
    }
    f.gate.stop().await;
}

#[tokio::test]
async fn answers_framed_every_legal_way_reach_the_client_whole() {
    let answers: Vec<(Reply, &str)> = vec![
        (
            reply(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n1\r\n \r\n6\r\nworld!\r\n0\r\nx-sum: 1\r\n\r\n"),
            "hello world!",
        ),
        (
            Reply { trickle: true, ..reply(b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\nx-a: 1\r\n\r\nhello there") },
            "hello there",
        ),
        (
            Reply { trickle: true, ..reply(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n") },
            "abc",
        ),
        (
            reply(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </s.css>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\nrealone"),
            "realone",
        ),
        (
            Reply { close: true, ..reply(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil the end") },
            "until the end",
        ),
        (
            Reply { close: true, ..reply(b"HTTP/1.0 200 OK\r\ncontent-length: 6\r\n\r\nold v1") },
            "old v1",
        ),
    ];
    let script: Vec<Reply> = answers.iter().map(|(r, _)| r.clone()).collect();
    let f = fx(move |n, _| script[n % script.len()].clone()).await;
    for (r, body) in &answers {
        let a = f.get().await;
        assert_eq!(a.status, 200, "{:?}", String::from_utf8_lossy(&r.bytes));
        assert_eq!(
            std::str::from_utf8(&a.body).unwrap(),
            *body,
            "{:?}",
            String::from_utf8_lossy(&r.bytes)
        );
        assert!(
            a.header("link").is_none(),
            "an interim answer's header leaked"
        );
    }
    f.gate.stop().await;
}

#[tokio::test]
async fn a_head_answer_leaves_its_connection_clean_for_the_next_request() {
    let f = fx(|_, request| {
        if request.starts_with(b"HEAD") {
            // A length, and no body, as HEAD answers go.
            reply(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n")
        } else {
            reply(OK)
        }
    })
    .await;
    let answers = raw_many(
        f.gate.addr,
        &[
            f.req("HEAD /v1/analyses/1", ""),
            f.req("GET /v1/analyses/1", ""),
        ]
        .concat(),
        2,
    )
    .await;
    assert_eq!(answers.len(), 2);
    assert_eq!(answers[0].status, 200);
    assert_eq!(answers[0].header("content-length"), Some("5"));
    assert_eq!(
        (answers[1].status, &answers[1].body[..]),
        (200, &b"clean"[..])
    );
    assert_eq!(f.up.connections(), 1, "the connection was reused");
    f.gate.stop().await;
}

#[tokio::test]
async fn a_truncated_answer_never_looks_complete_and_its_connection_is_dropped() {
    let f = fx(|n, _| {
        if n == 0 {
            Reply {
                close: true,
                ..reply(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhalf!")
            }
        } else {
            reply(OK)
        }
    })
    .await;
    let mut s = TcpStream::connect(f.gate.addr).await.unwrap();
    s.write_all(&f.req("GET /v1/analyses/1", "")).await.unwrap();
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "the client was left hanging");
    // A 502 when the end showed before anything went out, else the head and the 5 bytes that
    // came: never a complete 10-byte body.
    let text = String::from_utf8_lossy(&got);
    if text.starts_with("HTTP/1.1 502") {
        assert!(
            text.contains("upstream_unavailable") && !text.contains("half!"),
            "{text}"
        );
    } else {
        let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        assert!(
            body.len() < 10,
            "a truncated answer looked complete: {text}"
        );
    }
    let a = f.get().await;
    assert_eq!((a.status, &a.body[..]), (200, &b"clean"[..]));
    f.gate.stop().await;
}

#[tokio::test]
async fn uploads_are_framed_by_what_their_body_is() {
    let f = fx(|_, _| reply(OK)).await;
    // A chunked upload stays chunked (its own Content-Length, were there one, is refused with
    // 400 before this: tests/attacks.rs).
    let mut r = f.req("POST /v1/analyses/1", "Transfer-Encoding: chunked\r\n");
    r.extend_from_slice(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n");
    assert_eq!(raw(f.gate.addr, &r).await.status, 200);
    let up = f.up.request(0).to_ascii_lowercase();
    assert!(up.contains("transfer-encoding: chunked\r\n"), "{up}");
    assert!(!up.contains("content-length"), "{up}");
    assert!(
        up.ends_with("\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
        "{up}"
    );
    // A sized upload keeps its size.
    let mut r = f.req("POST /v1/analyses/1", "Content-Length: 11\r\n");
    r.extend_from_slice(b"hello world");
    assert_eq!(raw(f.gate.addr, &r).await.status, 200);
    let up = f.up.request(1).to_ascii_lowercase();
    assert!(up.contains("content-length: 11\r\n"), "{up}");
    assert!(!up.contains("transfer-encoding"), "{up}");
    assert!(up.ends_with("\r\n\r\nhello world"), "{up}");
    // An empty POST says so.
    let r = f.req("POST /v1/analyses/1", "Content-Length: 0\r\n");
    assert_eq!(raw(f.gate.addr, &r).await.status, 200);
    let up = f.up.request(2).to_ascii_lowercase();
    assert!(up.contains("content-length: 0\r\n"), "{up}");
    // A GET carries no framing at all.
    assert_eq!(f.get().await.status, 200);
    let up = f.up.request(3).to_ascii_lowercase();
    assert!(
        !up.contains("content-length") && !up.contains("transfer-encoding"),
        "{up}"
    );
    f.gate.stop().await;
}

#[tokio::test]
async fn an_early_answer_to_an_upload_reaches_the_client() {
    let f = fx(|_, _| Reply {
        early: true,
        close: true,
        ..reply(b"HTTP/1.1 413 Content Too Large\r\ncontent-length: 8\r\nconnection: close\r\n\r\ntoo big!")
    })
    .await;
    // The client sends its head and the start of a large body, then waits.
    let mut s = TcpStream::connect(f.gate.addr).await.unwrap();
    s.write_all(&f.req("POST /v1/analyses/1", "Content-Length: 10000000\r\n"))
        .await
        .unwrap();
    s.write_all(&[b'x'; 4096]).await.unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        while !String::from_utf8_lossy(&got).contains("too big!") {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "no answer while the upload was unfinished");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.ends_with("too big!"), "{text}");
    f.gate.stop().await;
}

/// Read from `s` until `needle` has arrived (within 5 s).
async fn read_until(s: &mut TcpStream, got: &mut Vec<u8>, needle: &str) {
    let mut chunk = [0u8; 4096];
    let waited = tokio::time::timeout(Duration::from_secs(5), async {
        while !String::from_utf8_lossy(got).contains(needle) {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    assert!(
        waited.is_ok() && String::from_utf8_lossy(got).contains(needle),
        "{needle:?} never came: {:?}",
        String::from_utf8_lossy(got)
    );
}

#[tokio::test]
async fn an_upstream_answering_while_it_reads_gets_the_rest_of_the_upload() {
    // Answers at once with a chunked head, then echoes each piece of the upload as it comes.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let Ok((mut s, _)) = listener.accept().await else {
            return;
        };
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        if !fill_until(&mut s, &mut buf, b"\r\n\r\n").await {
            return;
        }
        let head_end = find(&buf, b"\r\n\r\n").unwrap() + 4;
        buf.drain(..head_end);
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            .await;
        loop {
            // Echo every complete piece ("ping1", "ping2") as its own chunk.
            for word in ["ping1", "ping2"] {
                if let Some(at) = find(&buf, word.as_bytes()) {
                    buf.drain(..at + word.len());
                    let _ = s.write_all(format!("5\r\n{word}\r\n").as_bytes()).await;
                    if word == "ping2" {
                        // The upload's last chunk read before the answer ends and the socket
                        // closes: closed with bytes unread, it would send a reset, which can
                        // overtake the answer's last bytes on their way to keygate.
                        if !fill_until(&mut s, &mut buf, b"0\r\n\r\n").await {
                            return;
                        }
                        let _ = s.write_all(b"0\r\n\r\n").await;
                        return;
                    }
                }
            }
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    });
    let f = fx(|_, _| reply(OK)).await;
    // Point a second keygate at the echoing upstream, with the same key.
    let gate = Gate::start(&config_toml(&f._snap.path(), addr, "")).await;
    let mut s = TcpStream::connect(gate.addr).await.unwrap();
    s.write_all(&f.req("POST /v1/analyses/1", "Transfer-Encoding: chunked\r\n"))
        .await
        .unwrap();
    s.write_all(b"5\r\nping1\r\n").await.unwrap();
    let mut got = Vec::new();
    read_until(&mut s, &mut got, "ping1").await;
    s.write_all(b"5\r\nping2\r\n0\r\n\r\n").await.unwrap();
    read_until(&mut s, &mut got, "ping2").await;
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
    gate.stop().await;
    f.gate.stop().await;
}

#[tokio::test]
async fn bytes_after_an_answer_retire_its_connection() {
    let f = fx(|n, _| match n {
        // A second answer glued to the first.
        0 => reply(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\ncleanHTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nPOISON"),
        // A stray body sent after the answer, once the connection is idle in the pool.
        2 => Reply {
            later: Some(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nPOISON".to_vec()),
            ..reply(OK)
        },
        _ => reply(OK),
    })
    .await;
    for i in 0..4 {
        let a = f.get().await;
        assert_eq!((a.status, &a.body[..]), (200, &b"clean"[..]), "request {i}");
        // Let the stray bytes of request 2 arrive while its connection is idle.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Request 0's connection had bytes left over: request 1 needed a new one. Request 2's got
    // bytes while idle: request 3 needed a new one too.
    assert_eq!(f.up.connections(), 3);
    f.gate.stop().await;
}

#[tokio::test]
async fn a_get_or_head_with_a_chunked_body_is_refused() {
    let f = fx(|_, _| reply(OK)).await;
    // In any case: keygate's routes (and many servers) take `get` for `GET`.
    for method in ["GET", "HEAD", "get", "Head"] {
        let mut r = f.req(
            &format!("{method} /v1/analyses/1"),
            "Transfer-Encoding: chunked\r\n",
        );
        r.extend_from_slice(b"3b\r\nGET /admin HTTP/1.1\r\nHost: api.example\r\nx-key-id: key_evil\r\n\r\n\r\n0\r\n\r\n");
        // Read the head only: a HEAD's answer has a length and no body.
        let mut s = TcpStream::connect(f.gate.addr).await.unwrap();
        s.write_all(&r).await.unwrap();
        let mut got = Vec::new();
        read_until(&mut s, &mut got, "\r\n\r\n").await;
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 400"), "{method}: {text}");
    }
    let mut r = f.req("GET /v1/analyses/1", "Transfer-Encoding: chunked\r\n");
    r.extend_from_slice(b"0\r\n\r\n");
    assert_error(&raw(f.gate.addr, &r).await, 400, "invalid_request");
    assert!(
        f.up.requests.lock().unwrap().is_empty(),
        "the upstream saw a request"
    );
    // With a length, a GET body goes up framed by it.
    let mut r = f.req("GET /v1/analyses/1", "Content-Length: 4\r\n");
    r.extend_from_slice(b"body");
    assert_eq!(raw(f.gate.addr, &r).await.status, 200);
    let up = f.up.request(0).to_ascii_lowercase();
    assert!(
        up.contains("content-length: 4\r\n") && up.ends_with("\r\n\r\nbody"),
        "{up}"
    );
    f.gate.stop().await;
}

/// A request its Idempotency-Key guards (read whole for replay) is never sent twice: the
/// upstream that reads it on a reused connection and closes without answering may have run it.
/// Not with a body (a PUT), nor without (a DELETE is idempotent by its method, not always in
/// practice): 502, and a retry asks again.
#[tokio::test]
async fn a_guarded_request_is_not_sent_again_after_a_silent_close() {
    // 0 and 2: GETs that leave a connection in the pool; 1 and 3: read, then closed unanswered.
    let f = fx(|n, _| match n {
        1 | 3 => Reply {
            close: true,
            ..reply(b"")
        },
        _ => reply(OK),
    })
    .await;
    let auth = format!("Bearer {}", f.key);
    for (method, key, body) in [("PUT", "put-1", "{\"v\":1}"), ("DELETE", "del-1", "")] {
        assert_eq!(f.get().await.status, 200);
        let before = f.up.requests.lock().unwrap().len();
        let a = send(
            &client(),
            method,
            &f.gate.url("/v1/analyses/1"),
            &[("authorization", &auth), ("idempotency-key", key)],
            body,
        )
        .await;
        assert_error(&a, 502, "upstream_unavailable");
        assert_eq!(
            f.up.requests.lock().unwrap().len(),
            before + 1,
            "the {method} was sent again"
        );
        assert!(f
            .up
            .request(before)
            .starts_with(&format!("{method} /v1/analyses/1 ")));
    }
    f.gate.stop().await;
}
