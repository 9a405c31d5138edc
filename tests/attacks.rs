//! Adversarial tests of the reverse proxy's request path. Every attack asserts what the upstream
//! actually received (or that it received nothing): identity spoofing, hop-by-hop tricks, path and
//! route confusion, request smuggling, credential leaks, limits and timeouts, X-Forwarded-For,
//! upgrades and HTTP/2. Request shapes a well-behaved client would not produce go over raw TCP
//! ([`raw`]), so the bytes arrive exactly as written.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

// ---------------------------------------------------------------------------------------------
// Fixture

/// A keygate in front of a recording upstream, with one key per shape of record.
struct Fx {
    upstream: Upstream,
    _snap: SnapshotDir,
    gate: Gate,
    /// partner_acme (org_1), scopes analyses:read + analyses:write.
    full: String,
    /// partner_noorg (no org), scopes analyses:read.
    noorg: String,
    /// allowed_routes ["GET /v1/public/**"], both scopes.
    public: String,
    /// scope analyses:read only.
    read: String,
    /// no scopes.
    none: String,
    /// allowed_cidrs ["203.0.113.0/24"].
    cidr: String,
    /// allowed_referrers ["https://app.example.com/*"].
    referrer: String,
}

const FULL_SCOPES: &str = "analyses:read analyses:write";

async fn fx(extra: &str) -> Fx {
    fx_with("", extra).await
}

async fn fx_with(proxy_extra: &str, extra: &str) -> Fx {
    let upstream = Upstream::start().await;
    let addr = upstream.addr;
    fx_at(upstream, addr, proxy_extra, extra).await
}

/// `upstream` records; keygate forwards to `to` (usually `upstream.addr`).
async fn fx_at(upstream: Upstream, to: SocketAddr, proxy_extra: &str, extra: &str) -> Fx {
    let snap = SnapshotDir::new();
    let [full, noorg, public, read, none, cidr, referrer] =
        std::array::from_fn(|_| mint("sk_live_"));
    snap.write(
        &Doc::new(1)
            .partner("partner_acme", Some("org_1"), "active")
            .partner("partner_noorg", None, "active")
            .key(
                "key_full",
                &full,
                json!({"scopes": ["analyses:write", "analyses:read"]}),
            )
            .key(
                "key_noorg",
                &noorg,
                json!({"partner_id": "partner_noorg", "scopes": ["analyses:read"]}),
            )
            .key(
                "key_public",
                &public,
                json!({"scopes": ["analyses:read", "analyses:write"],
                       "allowed_routes": ["GET /v1/public/**"]}),
            )
            .key("key_read", &read, json!({"scopes": ["analyses:read"]}))
            .key("key_none", &none, json!({"scopes": []}))
            .key(
                "key_cidr",
                &cidr,
                json!({"allowed_cidrs": ["203.0.113.0/24"]}),
            )
            .key(
                "key_referrer",
                &referrer,
                json!({"allowed_referrers": ["https://app.example.com/*"]}),
            ),
    );
    let gate = Gate::start(&config_toml_proxy(&snap.path(), to, proxy_extra, extra)).await;
    Fx {
        upstream,
        _snap: snap,
        gate,
        full,
        noorg,
        public,
        read,
        none,
        cidr,
        referrer,
    }
}

/// `<line> HTTP/1.1` with a Host, the key as a Bearer token (if any), and `headers` (each line
/// ending in CRLF), then the blank line.
fn req(line: &str, key: Option<&str>, headers: &str) -> Vec<u8> {
    let auth = key
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    format!("{line} HTTP/1.1\r\nHost: api.example\r\n{auth}{headers}\r\n").into_bytes()
}

/// Every value of `name` the upstream saw.
fn all(seen: &Seen, name: &str) -> Vec<String> {
    seen.headers
        .get_all(name)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect()
}

/// The header names the upstream saw that equal `name` once `_` and `-` are folded together.
fn variants(seen: &Seen, name: &str) -> Vec<String> {
    let fold = |s: &str| s.to_ascii_lowercase().replace('_', "-");
    seen.headers
        .keys()
        .map(|k| k.as_str().to_owned())
        .filter(|k| fold(k) == fold(name))
        .collect()
}

/// Assert the upstream saw exactly one `name`, spelled exactly so, with value `want`.
fn assert_only(seen: &Seen, name: &str, want: &str) {
    assert_eq!(all(seen, name), [want], "{name} as the upstream saw it");
    assert_eq!(variants(seen, name), [name], "spellings of {name} upstream");
}

/// Send raw bytes, read until the server closes (or 5 s), and return everything it wrote.
async fn raw_all(addr: SocketAddr, request: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    out
}

/// Let any request still in flight land before asserting that none did.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(150)).await;
}

// ---------------------------------------------------------------------------------------------
// A raw upstream: records exact bytes and honours any `Upgrade` by carrying on speaking HTTP/1.1
// inside the tunnel (as an h2c-capable server would carry on speaking HTTP/2).

struct RawUpstream {
    addr: SocketAddr,
    /// Every request (head and body bytes, lossy UTF-8), including any inside a tunnel.
    requests: Arc<Mutex<Vec<String>>>,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// End of a chunked body starting at `pos` (trailers included), if all of it is in `buf`.
fn chunked_end(buf: &[u8], mut pos: usize) -> Option<usize> {
    loop {
        let line_end = pos + find(&buf[pos..], b"\r\n")?;
        let size = std::str::from_utf8(&buf[pos..line_end]).ok()?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        pos = line_end + 2;
        if size == 0 {
            loop {
                let le = pos + find(&buf[pos..], b"\r\n")?;
                let empty = le == pos;
                pos = le + 2;
                if empty {
                    return Some(pos);
                }
            }
        }
        if buf.len() < pos + size + 2 {
            return None;
        }
        pos += size + 2;
    }
}

/// End of the first complete request in `buf`, and whether it asks for an upgrade.
fn request_end(buf: &[u8]) -> Option<(usize, bool)> {
    let head_end = find(buf, b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let upgrade = head.contains("\r\nupgrade:");
    if head.contains("\r\ntransfer-encoding:") {
        return chunked_end(buf, head_end).map(|e| (e, upgrade));
    }
    let len = head
        .split("\r\n")
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    (buf.len() >= head_end + len).then_some((head_end + len, upgrade))
}

impl RawUpstream {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests: Arc<Mutex<Vec<String>>> = Arc::default();
        let record = requests.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let record = record.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        while let Some((end, upgrade)) = request_end(&buf) {
                            let r: Vec<u8> = buf.drain(..end).collect();
                            record
                                .lock()
                                .unwrap()
                                .push(String::from_utf8_lossy(&r).into_owned());
                            let answer: &[u8] = if upgrade {
                                b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: h2c\r\n\r\n"
                            } else {
                                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
                            };
                            if s.write_all(answer).await.is_err() {
                                return;
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
        RawUpstream { addr, requests }
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

// ---------------------------------------------------------------------------------------------
// Identity spoofing

const IDENTITY: [&str; 6] = [
    "x-partner-id",
    "x-org-id",
    "x-key-id",
    "x-key-environment",
    "x-scopes",
    "x-request-id",
];

/// Every spelling of `name` an attacker might try: cases, repeats, `_` for `-`.
fn spoofs(name: &str) -> String {
    let upper_first: String = name
        .split('-')
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect::<Vec<_>>()
        .join("-");
    let under = name.replace('-', "_");
    let under_title = upper_first.replace('-', "_");
    let mixed = name.replacen('-', "_", 1);
    [
        name.to_owned(),
        upper_first,
        name.to_ascii_uppercase(),
        name.to_owned(),
        under,
        under_title,
        mixed,
    ]
    .iter()
    .enumerate()
    .map(|(i, n)| format!("{n}: spoofed-{i}\r\n"))
    .collect()
}

#[tokio::test]
async fn identity_spoofs_in_every_spelling_are_replaced_by_keygates_values() {
    let f = fx("").await;
    let mut headers: String = IDENTITY.iter().map(|n| spoofs(n)).collect();
    // A malformed request id too (a space is not allowed).
    headers.push_str("X-Request-Id: not well formed\r\n");
    let a = raw(
        f.gate.addr,
        &req("GET /v1/analyses/1", Some(&f.full), &headers),
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let seen = f.upstream.last();
    assert_only(&seen, "x-partner-id", "partner_acme");
    assert_only(&seen, "x-org-id", "org_1");
    assert_only(&seen, "x-key-id", "key_full");
    assert_only(&seen, "x-key-environment", "live");
    assert_only(&seen, "x-scopes", FULL_SCOPES);
    // Several (and malformed) request ids: keygate mints its own, the same one both ways.
    let rid = a
        .header("x-request-id")
        .expect("x-request-id on the answer");
    assert_only(&seen, "x-request-id", rid);
    assert!(
        !rid.starts_with("spoofed") && rid != "not well formed",
        "{rid}"
    );
    assert_eq!(rid.len(), 32, "a minted id: {rid}");
    assert!(
        seen.headers.keys().all(|k| !k.as_str().contains('_')),
        "no underscore header reaches the upstream: {:?}",
        seen.headers.keys().collect::<Vec<_>>()
    );
    f.gate.stop().await;
}

#[tokio::test]
async fn request_id_alone_malformed_or_underscored_is_replaced() {
    let f = fx("").await;
    for (headers, keep) in [
        ("x-request-id: <script>\r\n", false),
        ("x-request-id: \"quoted\"\r\n", false),
        (&*format!("x-request-id: {}\r\n", "a".repeat(129)), false),
        ("x_request_id: smuggled-id\r\n", false),
        ("X-Request-ID: caller-id.1:2/3\r\n", true),
    ] {
        let a = raw(
            f.gate.addr,
            &req("GET /v1/analyses/1", Some(&f.full), headers),
        )
        .await;
        assert_eq!(a.status, 200, "{headers}");
        let seen = f.upstream.last();
        let rid = a.header("x-request-id").unwrap();
        assert_only(&seen, "x-request-id", rid);
        assert_eq!(rid == "caller-id.1:2/3", keep, "{headers} -> {rid}");
    }
    f.gate.stop().await;
}

#[tokio::test]
async fn org_spoof_vanishes_for_a_partner_without_org() {
    let f = fx("").await;
    let a = raw(
        f.gate.addr,
        &req(
            "GET /v1/analyses/1",
            Some(&f.noorg),
            &[spoofs("x-org-id"), spoofs("x-partner-id")].concat(),
        ),
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let seen = f.upstream.last();
    assert!(all(&seen, "x-org-id").is_empty(), "{:?}", seen.headers);
    assert!(variants(&seen, "x-org-id").is_empty(), "{:?}", seen.headers);
    assert_only(&seen, "x-partner-id", "partner_noorg");
    assert_only(&seen, "x-key-id", "key_noorg");
    assert_only(&seen, "x-scopes", "analyses:read");
    f.gate.stop().await;
}

#[tokio::test]
async fn denied_requests_with_spoofed_identity_reach_nothing() {
    let f = fx("").await;
    let spoof: String = IDENTITY.iter().map(|n| spoofs(n)).collect();
    let unknown = mint("sk_live_");
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (
            req("GET /v1/analyses/1", None, &spoof),
            401,
            "authentication_required",
        ),
        (
            req("GET /v1/analyses/1", Some(&unknown), &spoof),
            401,
            "invalid_api_key",
        ),
        (
            req("GET /v1/analyses/1", Some(&f.none), &spoof),
            403,
            "scope_required",
        ),
        (
            req("GET /v1/private", Some(&f.public), &spoof),
            403,
            "route_not_allowed",
        ),
    ];
    for (bytes, status, code) in cases {
        let a = raw(f.gate.addr, &bytes).await;
        assert_error(&a, status, code);
        assert!(
            !a.header("x-request-id").unwrap().starts_with("spoofed"),
            "a spoofed request id is not echoed"
        );
    }
    settle().await;
    assert_eq!(f.upstream.count(), 0, "{:?}", f.upstream.seen());
    f.gate.stop().await;
}

#[tokio::test]
async fn renamed_identity_headers_strip_their_own_spoofs() {
    let f = fx("[identity_headers]\npartner_id = \"x-tenant\"\nkey_id = \"X-Caller-Key\"\n").await;
    let headers = [spoofs("x-tenant"), spoofs("x-caller-key")].concat();
    let a = raw(
        f.gate.addr,
        &req("GET /v1/analyses/1", Some(&f.full), &headers),
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let seen = f.upstream.last();
    assert_only(&seen, "x-tenant", "partner_acme");
    assert_only(&seen, "x-caller-key", "key_full");
    assert_only(&seen, "x-org-id", "org_1");
    f.gate.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Hop-by-hop

#[tokio::test]
async fn connection_listing_identity_names_cannot_remove_keygates_values() {
    let f = fx("").await;
    for (headers, name, want) in [
        (
            "Connection: x-partner-id\r\nX-Partner-Id: evil\r\n",
            "x-partner-id",
            "partner_acme",
        ),
        (
            "Connection: close, X-Key-Id\r\nX-Key-Id: evil\r\n",
            "x-key-id",
            "key_full",
        ),
        (
            "Connection: x-scopes, x-org-id\r\nConnection: x-request-id\r\n",
            "x-scopes",
            FULL_SCOPES,
        ),
    ] {
        let a = raw(
            f.gate.addr,
            &req("GET /v1/analyses/1", Some(&f.full), headers),
        )
        .await;
        assert_eq!(a.status, 200, "{headers}");
        let seen = f.upstream.last();
        assert_only(&seen, name, want);
        assert_only(&seen, "x-partner-id", "partner_acme");
        assert_only(&seen, "x-org-id", "org_1");
        assert_only(&seen, "x-key-id", "key_full");
        assert_only(&seen, "x-request-id", a.header("x-request-id").unwrap());
        assert!(all(&seen, "connection").is_empty(), "{headers}");
    }
    f.gate.stop().await;
}

#[tokio::test]
async fn connection_listed_headers_are_removed_and_others_kept() {
    let f = fx("").await;
    let a = raw(
        f.gate.addr,
        &req(
            "GET /v1/analyses/1",
            Some(&f.full),
            "Connection: X-Custom,  x-other-hop \r\nX-Custom: 1\r\nx-other-hop: 2\r\nx-kept: 3\r\n",
        ),
    )
    .await;
    assert_eq!(a.status, 200);
    let seen = f.upstream.last();
    assert!(all(&seen, "x-custom").is_empty(), "{:?}", seen.headers);
    assert!(all(&seen, "x-other-hop").is_empty(), "{:?}", seen.headers);
    assert_eq!(all(&seen, "x-kept"), ["3"]);
    f.gate.stop().await;
}

#[tokio::test]
async fn hop_by_hop_request_headers_never_reach_upstream() {
    let f = fx("").await;
    let a = raw(
        f.gate.addr,
        &req(
            "GET /v1/analyses/1",
            Some(&f.full),
            "Keep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Authorization: Basic dXNlcjpwYXNz\r\n\
             Trailer: x-foo\r\nUpgrade: websocket\r\nProxy-Connection: keep-alive\r\n",
        ),
    )
    .await;
    assert_eq!(a.status, 200);
    let seen = f.upstream.last();
    for name in [
        "keep-alive",
        "te",
        "proxy-authorization",
        "trailer",
        "upgrade",
        "proxy-connection",
        "connection",
        "transfer-encoding",
    ] {
        assert!(all(&seen, name).is_empty(), "{name}: {:?}", seen.headers);
    }
    f.gate.stop().await;
}

#[tokio::test]
async fn upstream_connection_trap_never_reaches_the_client() {
    let f = fx("").await;
    let auth = format!("Bearer {}", f.full);
    let a = get(
        &client(),
        &f.gate.url("/v1/analyses/1"),
        &[("authorization", &auth)],
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(a.header("x-upstream"), Some("yes"));
    assert!(a.header("x-upstream-secret").is_none(), "{:?}", a.headers);
    assert!(a.header("connection").is_none(), "{:?}", a.headers);
    // The same over raw HTTP/1.1, where hyper's client cannot hide anything.
    let a = raw(f.gate.addr, &req("GET /v1/analyses/1", Some(&f.full), "")).await;
    assert!(a.header("x-upstream-secret").is_none(), "{:?}", a.headers);
    f.gate.stop().await;
}

#[tokio::test]
async fn chunked_request_trailers_are_not_forwarded() {
    let up = RawUpstream::start().await;
    let f = fx_at(Upstream::start().await, up.addr, "", "").await;
    let mut r = req(
        "POST /v1/analyses/1",
        Some(&f.full),
        "Transfer-Encoding: chunked\r\nTrailer: x-partner-id, x-key-id\r\nTE: trailers\r\n",
    );
    r.extend_from_slice(
        b"5\r\nhello\r\n0\r\nx-partner-id: partner_evil\r\nx-key-id: key_evil\r\n\r\n",
    );
    let a = raw(f.gate.addr, &r).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let got = up.requests();
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(got[0].contains("hello"), "the body is forwarded: {got:?}");
    assert!(
        !got[0].contains("partner_evil") && !got[0].contains("key_evil"),
        "a trailer spoofed identity upstream: {}",
        got[0]
    );
    f.gate.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Paths

/// What a request target must come to.
#[derive(Clone, Copy)]
enum Want {
    /// Allowed, and the upstream saw exactly this target.
    Forward(&'static str),
    /// Denied by keygate with this status and code; nothing reached the upstream.
    Deny(u16, &'static str),
}
use Want::*;

/// Send `method target` with `key` over raw HTTP/1.1 and check the outcome against `want`.
async fn check_target(f: &Fx, method: &str, target: &str, key: &str, want: &Want) {
    f.upstream.clear();
    let a = if method.eq_ignore_ascii_case("HEAD") {
        // A HEAD answer has a Content-Length but no body, which `raw` would wait for.
        let auth = format!("Bearer {key}");
        send(
            &client(),
            method,
            &f.gate.url(target),
            &[("authorization", &auth)],
            "",
        )
        .await
    } else {
        raw(
            f.gate.addr,
            &req(&format!("{method} {target}"), Some(key), ""),
        )
        .await
    };
    match want {
        Forward(seen) => {
            assert_eq!(
                a.status,
                200,
                "{method} {target}: {:?}",
                String::from_utf8_lossy(&a.body)
            );
            assert_eq!(f.upstream.count(), 1, "{method} {target}");
            let got = f.upstream.last();
            assert_eq!(got.target, *seen, "{method} {target}: target upstream");
            assert_eq!(got.method, method, "{method} {target}");
        }
        Deny(status, code) => {
            assert_eq!(
                a.status,
                *status,
                "{method} {target}: {:?}",
                String::from_utf8_lossy(&a.body)
            );
            if !method.eq_ignore_ascii_case("HEAD") {
                // (A HEAD answer has no body to carry the code.)
                assert_error(&a, *status, code);
            }
            settle().await;
            assert_eq!(
                f.upstream.count(),
                0,
                "{method} {target} was denied yet reached the upstream: {:?}",
                f.upstream.seen()
            );
        }
    }
}

const BAD: Want = Deny(400, "invalid_path");

#[tokio::test]
async fn paths_are_normalized_once_or_rejected() {
    let f = fx("").await;
    let table: &[(&str, Want)] = &[
        ("//admin", Forward("/admin")),
        ("/a/../admin", Forward("/admin")),
        ("/a/./b/../../admin", Forward("/admin")),
        ("/%2e%2e/admin", BAD),
        ("/..", BAD),
        ("/a/../../admin", BAD),
        ("/v1/%2e%2e/admin", Forward("/admin")),
        ("/v1/%2E./admin", Forward("/admin")),
        ("/v1/.%2e/admin", Forward("/admin")),
        ("/%2e/admin", Forward("/admin")),
        ("/a%2Fb", BAD),
        ("/a%2fb", BAD),
        ("/a/..%2f..%2fadmin", BAD),
        ("/a%252Fb", BAD),
        ("/a%252e%252e/admin", BAD),
        ("/a%5Cb", BAD),
        ("/a%5cb", BAD),
        ("/a\\b", BAD),
        ("/a\\..\\admin", BAD),
        ("/a;b", BAD),
        ("/a/..;/admin", BAD),
        ("/a%3Bb", BAD),
        ("/a%3bb", BAD),
        ("/a%00b", BAD),
        ("/a%0ab", BAD),
        ("/a%0D%0Ax-partner-id:%20evil", BAD),
        ("/a%1fb", BAD),
        ("/a%7fb", BAD),
        ("/a%zz", BAD),
        ("/a%4", BAD),
        ("/a%", BAD),
        ("/a%u002e", BAD),
        ("/v1/analyses/%41", Forward("/v1/analyses/A")),
        ("/v1/%61nalyses/1", Forward("/v1/analyses/1")),
        ("/a%2db%5f%7E", Forward("/a-b_~")),
        ("/a%3fb", Forward("/a%3Fb")),
        ("/a%23b", Forward("/a%23b")),
        ("/a%20b", Forward("/a%20b")),
        ("/a\"b{c}", Forward("/a%22b%7Bc%7D")),
        ("/a/./b/", Forward("/a/b/")),
        ("/a/b/..", Forward("/a/")),
        ("/a/b/.", Forward("/a/b/")),
        ("/", Forward("/")),
        // The query never affects the decision and is forwarded byte for byte.
        (
            "/v1/analyses/1?a=%2F&b=..",
            Forward("/v1/analyses/1?a=%2F&b=.."),
        ),
        (
            "/v1/analyses/1?p=/../admin&q=%00&r=%zz;s",
            Forward("/v1/analyses/1?p=/../admin&q=%00&r=%zz;s"),
        ),
        ("/a/../v1?x=1", Forward("/v1?x=1")),
        ("/a%2Fb?x=1", BAD),
    ];
    for (target, want) in table {
        check_target(&f, "GET", target, &f.full, want).await;
    }
    f.gate.stop().await;
}

#[tokio::test]
async fn options_star_and_connect_authority_form_are_invalid_paths() {
    let f = fx("").await;
    for line in ["OPTIONS *", "CONNECT evil.example:443"] {
        let a = raw(f.gate.addr, &req(line, Some(&f.full), "")).await;
        assert_error(&a, 400, "invalid_path");
    }
    settle().await;
    assert_eq!(f.upstream.count(), 0, "{:?}", f.upstream.seen());
    f.gate.stop().await;
}

#[tokio::test]
async fn absolute_form_is_forwarded_in_origin_form_with_its_authority_as_host() {
    let f = fx("").await;
    let a = raw(
        f.gate.addr,
        &req(
            "GET http://evil.example/v1/analyses/1?x=1",
            Some(&f.full),
            "",
        ),
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let seen = f.upstream.last();
    assert_eq!(seen.target, "/v1/analyses/1?x=1");
    // RFC 9112 §3.2.2: the authority of an absolute-form target replaces Host.
    assert_eq!(all(&seen, "host"), ["evil.example"]);
    // Absolute form normalizes the same way: no route bypass through it.
    check_target(
        &f,
        "GET",
        "http://evil.example/v1/public/../private",
        &f.public,
        &Deny(403, "route_not_allowed"),
    )
    .await;
    check_target(&f, "GET", "http://evil.example/%2e%2e/admin", &f.full, &BAD).await;
    f.gate.stop().await;
}

/// A raw `#fragment` is refused (`invalid_path`); were it ever let through, keygate must decide
/// on exactly the path it forwards.
#[tokio::test]
async fn raw_fragment_cannot_split_decision_from_forwarded_path() {
    let f = fx("").await;
    for (target, key, forwarded) in [
        ("/v1/public/x#/../../private", &f.public, "/v1/public/x"),
        ("/v1/analyses/1#/../../admin", &f.full, "/v1/analyses/1"),
        ("/v1/analyses/1?q=1#frag", &f.full, "/v1/analyses/1?q=1"),
    ] {
        f.upstream.clear();
        let a = raw(f.gate.addr, &req(&format!("GET {target}"), Some(key), "")).await;
        settle().await;
        if a.status == 200 {
            assert_eq!(f.upstream.last().target, forwarded, "{target}");
        } else {
            assert_error(&a, 400, "invalid_path");
            assert_eq!(f.upstream.count(), 0, "{target}");
        }
    }
    f.gate.stop().await;
}

/// Over HTTP/2 the `#` never reaches keygate (the HTTP library cuts `:path` there); what is
/// left is what is both decided on and forwarded.
#[tokio::test]
async fn h2_fragment_cannot_split_decision_from_forwarded_path() {
    use support::h2_frames::RawH2;
    let f = fx("").await;
    let mut h2 = RawH2::connect(f.gate.addr).await;
    for (stream, (path, key, forwarded)) in [
        ("/v1/public/x#/../../private", &f.public, "/v1/public/x"),
        ("/v1/analyses/1#/../../admin", &f.full, "/v1/analyses/1"),
    ]
    .into_iter()
    .enumerate()
    {
        f.upstream.clear();
        let stream = 1 + 2 * stream as u32;
        h2.get(stream, "api.example", path, key).await;
        let ok = h2.answered_200(stream).await;
        settle().await;
        match (ok, f.upstream.count()) {
            (false, 0) => {}
            (true, 1) => assert_eq!(f.upstream.last().target, forwarded, "{path}"),
            (ok, n) => panic!("{path}: answered 200 {ok}, {n} requests upstream"),
        }
    }
    drop(h2);
    f.gate.stop().await;
}

/// An empty path (`:path: ?x=1` over HTTP/2, `http://host?x=1` in absolute form) is decided as
/// "/" and goes upstream as "/?x=1": never as a request line without a path.
#[tokio::test]
async fn an_empty_path_goes_upstream_as_the_root() {
    use support::h2_frames::RawH2;
    let f = fx("").await;
    let a = raw(
        f.gate.addr,
        &req("GET http://api.example?x=2", Some(&f.full), ""),
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(f.upstream.last().target, "/?x=2");
    f.upstream.clear();
    let mut h2 = RawH2::connect(f.gate.addr).await;
    h2.get(1, "api.example", "?x=1", &f.full).await;
    assert!(h2.answered_200(1).await, "not answered 200");
    assert_eq!(f.upstream.count(), 1);
    assert_eq!(f.upstream.last().target, "/?x=1");
    drop(h2);
    f.gate.stop().await;
}

/// An HTTP/2 CONNECT with no `:authority` (h2 accepts one with no pseudo-header but its method)
/// has no path at all, even under a route that lets any method through: it is refused as an
/// invalid path, never decided or forwarded as `CONNECT /`.
#[tokio::test]
async fn an_h2_connect_without_authority_has_no_path_to_forward() {
    use support::h2_frames::RawH2;
    let f = fx("[[routes.rule]]\nroute = \"* /**\"\nscopes = []\n").await;
    let mut h2 = RawH2::connect(f.gate.addr).await;
    h2.get(1, "api.example", "/anything", &f.full).await;
    assert!(h2.answered_200(1).await, "the route lets a GET through");
    f.upstream.clear();
    h2.headers(3, &[(":method", "CONNECT"), ("x-api-key", &f.full)], true)
        .await;
    assert!(
        !h2.answered_200(3).await,
        "a CONNECT without a path answered 200"
    );
    settle().await;
    assert_eq!(f.upstream.count(), 0, "{:?}", f.upstream.seen());
    drop(h2);
    f.gate.stop().await;
}

#[tokio::test]
async fn raw_fragment_and_control_bytes_are_invalid_path() {
    let f = fx("").await;
    check_target(&f, "GET", "/v1/analyses/1#frag", &f.full, &BAD).await;
    // Raw control bytes in the target too, as their encoded forms are (the contract's table).
    for target in [
        "/v1/analyses/1\u{0}",
        "/v1/\u{1b}analyses/1",
        "/v1/analyses/1\u{7f}",
    ] {
        check_target(&f, "GET", target, &f.full, &BAD).await;
    }
    f.gate.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Route and scope bypass

#[tokio::test]
async fn allowed_routes_cannot_be_escaped() {
    let f = fx("").await;
    const ROUTE: Want = Deny(403, "route_not_allowed");
    // The key may only `GET /v1/public/**`.
    let table: &[(&str, &str, Want)] = &[
        ("GET", "/v1/public/x", Forward("/v1/public/x")),
        ("GET", "/v1/public", Forward("/v1/public")),
        ("GET", "/v1/public/", Forward("/v1/public/")),
        ("GET", "/v1//public//x", Forward("/v1/public/x")),
        ("GET", "/v1/%70ublic/x", Forward("/v1/public/x")),
        ("HEAD", "/v1/public/x", Forward("/v1/public/x")),
        ("GET", "/v1/public/../private", ROUTE),
        ("GET", "/v1/public/%2e%2e/private", ROUTE),
        ("GET", "/v1/public/.%2E/private", ROUTE),
        ("GET", "/v1/public/../../v1/private", ROUTE),
        ("GET", "/v1//private", ROUTE),
        ("GET", "/v1/publicx", ROUTE),
        ("GET", "/v1/public%20/x", ROUTE),
        // Paths are case-sensitive: `/V1/public` is another resource, and is refused.
        ("GET", "/V1/public", ROUTE),
        ("GET", "/v1/PUBLIC/x", ROUTE),
        ("GET", "/v1/public;/../private", BAD),
        ("GET", "/v1/public/..;/private", BAD),
        ("GET", "/v1/public;x/y", BAD),
        ("GET", "/v1/public/..%2fprivate", BAD),
        ("GET", "/v1/public%2f..%2fprivate", BAD),
        ("GET", "/v1/public/..%5cprivate", BAD),
        ("GET", "/v1/public\\..\\private", BAD),
        ("GET", "/v1/public/%252e%252e/private", BAD),
        ("GET", "/v1/public/x/../../../private", ROUTE),
        ("POST", "/v1/public/x", ROUTE),
        ("DELETE", "/v1/public/x", ROUTE),
        ("OPTIONS", "/v1/public/x", ROUTE),
    ];
    for (method, target, want) in table {
        check_target(&f, method, target, &f.public, want).await;
        // Whatever happened, nothing outside /v1/public reached the upstream.
        for s in f.upstream.seen() {
            assert!(
                s.target == "/v1/public" || s.target.starts_with("/v1/public/"),
                "{method} {target} reached the upstream as {}",
                s.target
            );
        }
    }
    f.gate.stop().await;
}

#[tokio::test]
async fn scopes_cannot_be_dodged_by_path_spelling() {
    let f = fx("").await;
    const SCOPE: Want = Deny(403, "scope_required");
    // `POST /v1/analyses` needs analyses:write; the key has only analyses:read.
    for target in [
        "/v1/analyses",
        "/v1/analyses/",
        "//v1/analyses",
        "/v1//analyses",
        "/v1/./analyses",
        "/v1/analyses/.",
        "/v1/x/../analyses",
        "/v1/%61nalyses",
        "/v1/analyses%2F",
        "/v1/analyses?x=1",
    ] {
        let want = if target.contains("%2F") { &BAD } else { &SCOPE };
        check_target(&f, "POST", target, &f.read, want).await;
    }
    let a = raw(f.gate.addr, &req("POST /v1/analyses/", Some(&f.read), "")).await;
    assert!(
        a.code().contains("analyses:write")
            || a.json()["error"]["message"]
                .as_str()
                .unwrap()
                .contains("analyses:write"),
        "the message names the scope: {:?}",
        a.json()
    );
    // `GET /v1/analyses/**` needs analyses:read, HEAD included; the key has no scope.
    for (method, target) in [
        ("GET", "/v1/analyses"),
        ("GET", "/v1/analyses/"),
        ("GET", "/v1/analyses/1"),
        ("HEAD", "/v1/analyses/1"),
        ("GET", "//v1//analyses//1"),
        ("GET", "/v1/x/../analyses/1"),
    ] {
        check_target(&f, method, target, &f.none, &SCOPE).await;
    }
    // With the scope, the same HEAD goes through.
    check_target(
        &f,
        "HEAD",
        "/v1/analyses/1",
        &f.read,
        &Forward("/v1/analyses/1"),
    )
    .await;
    // Paths are case-sensitive: `/V1/analyses` matches no rule and, with `unmatched = "allow"`,
    // is forwarded with its case intact (a case-insensitive upstream needs `unmatched = "deny"`).
    check_target(
        &f,
        "POST",
        "/V1/analyses",
        &f.read,
        &Forward("/V1/analyses"),
    )
    .await;
    f.gate.stop().await;
}

/// GET `path` with `fields` over HTTP/1.1 and over HTTP/2: refused 400 `invalid_request` by
/// both; the error's message.
async fn refused_over_both(f: &Fx, path: &str, fields: &[(&str, &str)]) -> String {
    let mut message = String::new();
    for c in [&client(), &h2_client()] {
        let a = send(c, "GET", &f.gate.url(path), fields, "").await;
        assert_error(&a, 400, "invalid_request");
        message = a.json()["error"]["message"].as_str().unwrap().to_owned();
    }
    message
}

/// Many servers run a request as the method an `X-HTTP-Method-Override` (or `X-HTTP-Method`,
/// `X-Method-Override`; CGI-style ones also with `_`) names: one naming another method than
/// the request's is refused, before anything reaches the upstream, over HTTP/1.1 and HTTP/2.
#[tokio::test]
async fn a_method_override_cannot_dodge_scopes_or_routes() {
    let f = fx("").await;
    for name in [
        "X-HTTP-Method-Override",
        "x-http-method",
        "X-Method-Override",
        "x_http_method_override",
    ] {
        let fields = [("x-api-key", &f.read[..]), (name, "DELETE")];
        let a = refused_over_both(&f, "/v1/analyses/1", &fields).await;
        assert!(a.contains("method-override"), "{a}");
        let a = send(
            &client(),
            "POST",
            &f.gate.url("/v1/public/x"),
            &[("x-api-key", &f.public), (name, "GET")],
            "{}",
        )
        .await;
        assert_error(&a, 400, "invalid_request");
    }
    settle().await;
    assert_eq!(f.upstream.count(), 0, "{:?}", f.upstream.seen());
    // Naming the request's own method changes nothing: allowed, and passed on.
    let a = send(
        &client(),
        "GET",
        &f.gate.url("/v1/analyses/1"),
        &[("x-api-key", &f.read), ("x-http-method-override", "get")],
        "",
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(all(&f.upstream.last(), "x-http-method-override"), ["get"]);
    // An empty one asks for nothing.
    let a = send(
        &client(),
        "GET",
        &f.gate.url("/v1/analyses/1"),
        &[("x-api-key", &f.read), ("x-http-method", "")],
        "",
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    f.gate.stop().await;
}

/// IIS's URL Rewrite, and PHP frameworks reading what it sets, route a request by the URL an
/// `X-Original-URL` or `X-Rewrite-URL` names: one naming another path than the request's would
/// reach a resource keygate never decided on. Refused before anything reaches the upstream,
/// over HTTP/1.1 and HTTP/2, in every spelling.
#[tokio::test]
async fn a_url_override_cannot_dodge_routes() {
    let f = fx("").await;
    for name in [
        "X-Original-URL",
        "x-rewrite-url",
        "x_original_url",
        "X-REWRITE-URL",
    ] {
        // key_public may only GET /v1/public/**. The field reaches the upstream as sent, so
        // one with segments to resolve is refused even when it resolves to the request's path:
        // RFC 3986 reads /v1/admin//../public/x as /v1/admin/public/x.
        for url in [
            "/v1/analyses/1",
            "/v1/public/x/../../analyses/1",
            "/v1/admin//../public/x",
            "/v1/admin/%2e%2e/public/x",
        ] {
            let fields = [("x-api-key", &f.public[..]), (name, url)];
            let a = refused_over_both(&f, "/v1/public/x", &fields).await;
            assert!(a.contains("URL-override"), "{a}");
        }
    }
    // An empty one: servers that test for the field's presence route the request to `/`.
    let a = send(
        &client(),
        "GET",
        &f.gate.url("/v1/public/x"),
        &[("x-api-key", &f.public), ("x-original-url", "")],
        "",
    )
    .await;
    assert_error(&a, 400, "invalid_request");
    // Two of them, even naming the request's path: which one a server reads is its own choice.
    let a = send(
        &client(),
        "GET",
        &f.gate.url("/v1/public/x"),
        &[
            ("x-api-key", &f.public),
            ("x-original-url", "/v1/public/x"),
            ("x-rewrite-url", "/v1/public/x"),
        ],
        "",
    )
    .await;
    assert_error(&a, 400, "invalid_request");
    settle().await;
    assert_eq!(f.upstream.count(), 0, "{:?}", f.upstream.seen());
    // Naming the request's own path, whatever its query or spelling, changes nothing: allowed,
    // and passed on.
    let a = send(
        &client(),
        "GET",
        &f.gate.url("/v1/public/x?page=1"),
        &[
            ("x-api-key", &f.public),
            ("x-original-url", "/v1/public/%78/?page=2"),
        ],
        "",
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let seen = f.upstream.last();
    assert_eq!(seen.target, "/v1/public/x?page=1");
    assert_eq!(all(&seen, "x-original-url"), ["/v1/public/%78/?page=2"]);
    f.gate.stop().await;
}

/// hyper keeps a lowercase method as the extension method `post` (methods are case-sensitive in
/// RFC 9110), but common upstream stacks upper-case it (Django's and Werkzeug's `request.method`
/// are `REQUEST_METHOD.upper()`), so `post` is POST to them and must need POST's scopes.
#[tokio::test]
async fn lowercase_method_does_not_dodge_scopes_or_routes() {
    let f = fx("").await;
    // Scope table: `POST /v1/analyses` needs analyses:write, `GET /v1/analyses/**` analyses:read.
    for (method, target, key) in [
        ("post", "/v1/analyses", &f.read),
        ("Post", "/v1/analyses", &f.read),
        ("get", "/v1/analyses/1", &f.none),
        ("head", "/v1/analyses/1", &f.none),
    ] {
        check_target(&f, method, target, key, &Deny(403, "scope_required")).await;
    }
    // allowed_routes: only `GET /v1/public/**`.
    check_target(
        &f,
        "post",
        "/v1/public/x",
        &f.public,
        &Deny(403, "route_not_allowed"),
    )
    .await;
    // With the scope, the request is forwarded as it came.
    check_target(
        &f,
        "post",
        "/v1/analyses",
        &f.full,
        &Forward("/v1/analyses"),
    )
    .await;
    f.gate.stop().await;
}

/// With `paths.allow_semicolon = true` (for Tomcat/Jetty/Spring upstreams, which drop
/// `;params` from a segment before routing), `/v1/analyses;x/1` is `/v1/analyses/1` upstream
/// and must need the same scope.
#[tokio::test]
async fn semicolon_parameters_do_not_dodge_scopes_when_allowed() {
    let f = fx("[paths]\nallow_semicolon = true\n").await;
    let scope = Deny(403, "scope_required");
    for target in [
        "/v1/analyses;jsessionid=x/1",
        "/v1/analyses;/1",
        "/v1;a=b/analyses/1",
        "/v1/analyses%3Bx/1",
    ] {
        check_target(&f, "GET", target, &f.none, &scope).await;
    }
    check_target(&f, "POST", "/v1/analyses;x", &f.read, &scope).await;
    // Segments that read as `..`, `.` or empty once parameters are dropped stay refused.
    for target in [
        "/v1/public/..;/private",
        "/v1/public/.;x/y",
        "/v1/;x/analyses",
    ] {
        check_target(&f, "GET", target, &f.public, &BAD).await;
    }
    // allowed_routes: `/v1/public;x/y` is `/v1/public/y` to such an upstream.
    check_target(
        &f,
        "GET",
        "/v1/public;x/y",
        &f.public,
        &Forward("/v1/public;x/y"),
    )
    .await;
    check_target(
        &f,
        "GET",
        "/v1/private;x/../public/y",
        &f.public,
        &Forward("/v1/public/y"),
    )
    .await;
    f.gate.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Smuggling

/// A request hidden in a body. With `key`, keygate would let it through were it ever parsed as a
/// request (so it must not be, when a front proxy could read it as body); without, keygate
/// denies it when it is parsed, so it reaching the upstream means the upstream parsed bytes
/// keygate never decided on.
fn smuggled(key: Option<&str>) -> String {
    let auth = key
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    format!(
        "GET /smuggled HTTP/1.1\r\nHost: api.example\r\n{auth}X-Partner-Id: partner_evil\r\n\r\n"
    )
}

/// No upstream request targets `/smuggled`, and there are at most `max` requests.
async fn assert_not_smuggled(f: &Fx, max: usize) {
    settle().await;
    let seen = f.upstream.seen();
    assert!(seen.len() <= max, "{seen:?}");
    for s in &seen {
        assert!(
            !s.target.contains("smuggled"),
            "a smuggled request reached the upstream: {s:?}"
        );
    }
}

#[tokio::test]
async fn content_length_and_chunked_together_never_smuggle() {
    let f = fx("").await;
    // A front proxy reading Content-Length takes all of this as one body: keygate must not
    // answer anything after the chunked body ends.
    let inner = smuggled(Some(&f.full));
    for (te, cl) in [
        ("Transfer-Encoding: chunked\r\n", "Content-Length: 4\r\n"),
        ("Transfer-Encoding: chunked\r\n", "Content-Length: 200\r\n"),
    ] {
        for order in [[te, cl], [cl, te]] {
            f.upstream.clear();
            // Read as chunked, the body ends at `0`; read by Content-Length it is the smuggled
            // request (or part of it). Either way the next bytes must not become a request.
            let mut r = req("POST /v1/analyses/1", Some(&f.full), &order.concat());
            r.extend_from_slice(format!("0\r\n\r\n{inner}{inner}").as_bytes());
            let answers = raw_many(f.gate.addr, &r, 3).await;
            assert!(!answers.is_empty(), "{order:?}: no answer");
            assert!(
                answers.len() == 1,
                "{order:?}: bytes after the body were read as more requests: {:?}",
                answers.iter().map(|a| a.status).collect::<Vec<_>>()
            );
            assert_not_smuggled(&f, 1).await;
        }
    }
    f.gate.stop().await;
}

#[tokio::test]
async fn content_length_and_chunked_together_is_400() {
    let f = fx("").await;
    let mut r = req(
        "POST /v1/analyses/1",
        Some(&f.full),
        "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
    );
    r.extend_from_slice(b"0\r\n\r\n");
    let a = raw(f.gate.addr, &r).await;
    assert_eq!(a.status, 400);
    settle().await;
    assert_eq!(f.upstream.count(), 0);
    f.gate.stop().await;
}

#[tokio::test]
async fn repeated_content_length_never_smuggles() {
    let f = fx("").await;
    let inner = smuggled(None);
    // Different values: refused outright (by hyper's parser, before keygate), nothing forwarded.
    let mut r = req(
        "POST /v1/analyses/1",
        Some(&f.full),
        "Content-Length: 5\r\nContent-Length: 6\r\n",
    );
    r.extend_from_slice(format!("hello!{inner}").as_bytes());
    let answers = raw_many(f.gate.addr, &r, 2).await;
    assert_eq!(answers.len(), 1, "one answer, then the connection closes");
    assert_eq!(answers[0].status, 400);
    assert_not_smuggled(&f, 0).await;
    // Same value twice: one body of that length at most, never a second request.
    f.upstream.clear();
    let mut r = req(
        "POST /v1/analyses/1",
        Some(&f.full),
        "Content-Length: 5\r\nContent-Length: 5\r\n",
    );
    r.extend_from_slice(format!("hello{inner}").as_bytes());
    let answers = raw_many(f.gate.addr, &r, 2).await;
    assert_not_smuggled(&f, 1).await;
    if let Some(first) = answers.first() {
        if first.status == 200 {
            assert_eq!(&f.upstream.last().body[..], b"hello");
        } else {
            assert_eq!(first.status, 400);
        }
    }
    f.gate.stop().await;
}

#[tokio::test]
async fn repeated_equal_content_length_is_400() {
    let f = fx("").await;
    let mut r = req(
        "POST /v1/analyses/1",
        Some(&f.full),
        "Content-Length: 5\r\nContent-Length: 5\r\n",
    );
    r.extend_from_slice(b"hello");
    let a = raw(f.gate.addr, &r).await;
    assert_eq!(a.status, 400);
    f.gate.stop().await;
}

#[tokio::test]
async fn odd_transfer_encodings_never_smuggle() {
    let f = fx("").await;
    let inner = smuggled(None);
    for te in [
        "Transfer-Encoding: chunked, identity\r\n",
        "Transfer-Encoding: xchunked\r\n",
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n",
        "Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n",
        "Transfer-Encoding: identity\r\n",
        "Transfer-Encoding: \tChunked \r\n",
        "Transfer-Encoding : chunked\r\n",
        "Transfer-Encoding: chunked\r\n x-folded: 1\r\n",
        "X-Foo: a\r\n Transfer-Encoding: chunked\r\n",
    ] {
        f.upstream.clear();
        let mut r = req("POST /v1/analyses/1", Some(&f.full), te);
        r.extend_from_slice(format!("5\r\nhello\r\n0\r\n\r\n{inner}").as_bytes());
        let answers = raw_many(f.gate.addr, &r, 2).await;
        assert!(!answers.is_empty(), "{te:?}: no answer");
        assert_not_smuggled(&f, 1).await;
        for s in f.upstream.seen() {
            assert_eq!(s.target, "/v1/analyses/1", "{te:?}");
            assert!(
                all(&s, "transfer-encoding").iter().all(|v| v == "chunked"),
                "{te:?}: the upstream saw {:?}",
                s.headers
            );
        }
        if answers[0].status == 200 {
            assert_eq!(&f.upstream.last().body[..], b"hello", "{te:?}");
        } else {
            assert_eq!(answers[0].status, 400, "{te:?}");
        }
    }
    f.gate.stop().await;
}

/// A credential header spelled with `_` (`X_API_Key`) is no credential to keygate, but a
/// CGI-style server reads it as `X-API-Key`: it never reaches the upstream beside the key
/// keygate checked, over HTTP/1.1 or HTTP/2.
#[tokio::test]
async fn a_credential_header_spelled_with_underscores_never_reaches_the_upstream() {
    let f = fx("").await;
    let r = req(
        "GET /v1/analyses/1",
        Some(&f.read),
        &format!(
            "X_API_Key: {}\r\nx_api_key: {}\r\nX.API.Key: {}\r\n",
            f.full, f.none, f.full
        ),
    );
    let a = raw(f.gate.addr, &r).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let seen = f.upstream.last();
    for name in ["x_api_key", "x.api.key"] {
        assert!(
            seen.headers.get(name).is_none(),
            "{name}: {:?}",
            seen.headers
        );
    }
    assert_eq!(seen.headers["x-key-id"], "key_read");
    let a = send(
        &h2_client(),
        "GET",
        &f.gate.url("/v1/analyses/1"),
        &[("x-api-key", &f.read), ("x_api_key", &f.full)],
        "",
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let seen = f.upstream.last();
    for name in ["x_api_key", "x-api-key"] {
        assert!(
            seen.headers.get(name).is_none(),
            "{name}: {:?}",
            seen.headers
        );
    }
    f.gate.stop().await;
}

/// CGI-style servers read `Transfer_Encoding` as `Transfer-Encoding`: passed on beside the
/// framing keygate sends, it would give them a second one (a body read two ways, a request
/// smuggled in it). Framing and hop-by-hop fields spelled with `_` never reach the upstream,
/// over HTTP/1.1 or HTTP/2.
#[tokio::test]
async fn framing_fields_spelled_with_underscores_never_reach_the_upstream() {
    let f = fx("").await;
    let inner = smuggled(None);
    let body = format!("0\r\n\r\n{inner}");
    let spellings = [
        format!(
            "Transfer_Encoding: chunked\r\nContent-Length: {}\r\n",
            body.len()
        ),
        format!("content_length: 0\r\nContent-Length: {}\r\n", body.len()),
        format!(
            "Keep_Alive: timeout=1\r\nPROXY_CONNECTION: close\r\nContent-Length: {}\r\n",
            body.len()
        ),
    ];
    let underscored = |s: &Seen| {
        s.headers
            .keys()
            .filter(|n| n.as_str().contains('_'))
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
    };
    for fields in &spellings {
        f.upstream.clear();
        let mut r = req("POST /v1/analyses/1", Some(&f.full), fields);
        r.extend_from_slice(body.as_bytes());
        let answers = raw_many(f.gate.addr, &r, 2).await;
        assert_eq!(answers.len(), 1, "{fields:?}");
        assert_eq!(answers[0].status, 200, "{fields:?}");
        assert_not_smuggled(&f, 1).await;
        let seen = f.upstream.last();
        assert_eq!(seen.body, body.as_bytes(), "{fields:?}");
        assert!(
            underscored(&seen).is_empty(),
            "{fields:?}: {:?}",
            seen.headers
        );
    }
    f.upstream.clear();
    let a = send(
        &h2_client(),
        "POST",
        &f.gate.url("/v1/analyses/1"),
        &[
            ("authorization", &format!("Bearer {}", f.full)),
            ("transfer_encoding", "chunked"),
            ("content_length", "0"),
        ],
        "hello",
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let seen = f.upstream.last();
    assert_eq!(&seen.body[..], b"hello");
    assert!(underscored(&seen).is_empty(), "{:?}", seen.headers);
    f.gate.stop().await;
}

/// User information in the authority (`http://user:pw@host/`, `Host: user@host`) is an error
/// (RFC 9110 §4.2.4), never a `Host` or `X-Forwarded-Host` for the upstream.
#[tokio::test]
async fn user_information_in_the_authority_is_refused() {
    let f = fx("").await;
    let bearer = format!("Authorization: Bearer {}\r\n", f.full);
    for request in [
        format!("GET http://user:pw@api.example/v1/analyses/1 HTTP/1.1\r\nHost: api.example\r\n{bearer}\r\n"),
        format!("GET /v1/analyses/1 HTTP/1.1\r\nHost: user@api.example\r\n{bearer}\r\n"),
    ] {
        let a = raw(f.gate.addr, request.as_bytes()).await;
        assert_error(&a, 400, "invalid_request");
    }
    let url = f
        .gate
        .url("/v1/analyses/1")
        .replace("http://", "http://user:pw@");
    let a = send(&h2_client(), "GET", &url, &[("x-api-key", &f.full)], "").await;
    assert_error(&a, 400, "invalid_request");
    settle().await;
    assert_eq!(f.upstream.count(), 0, "{:?}", f.upstream.seen());
    f.gate.stop().await;
}

#[tokio::test]
async fn two_host_headers_are_refused() {
    let f = fx("").await;
    let a = raw(
        f.gate.addr,
        &req(
            "GET /v1/analyses/1",
            Some(&f.full),
            "Host: internal.example\r\n",
        ),
    )
    .await;
    assert_error(&a, 400, "invalid_request");
    settle().await;
    assert_eq!(f.upstream.count(), 0);
    f.gate.stop().await;
}

#[tokio::test]
async fn a_pipelined_request_after_a_denied_one_is_decided_on_its_own() {
    let f = fx("").await;
    // Denied (no key), then allowed; then allowed, then denied.
    let mut r = req("GET /v1/analyses/1", None, "");
    r.extend(req("GET /v1/analyses/2", Some(&f.full), ""));
    r.extend(req("GET /v1/analyses/3", Some(&f.full), ""));
    r.extend(req("GET /v1/analyses/4", Some(&f.none), ""));
    let answers = raw_many(f.gate.addr, &r, 4).await;
    let statuses: Vec<u16> = answers.iter().map(|a| a.status).collect();
    assert_eq!(statuses, [401, 200, 200, 403]);
    assert_error(&answers[0], 401, "authentication_required");
    assert_error(&answers[3], 403, "scope_required");
    settle().await;
    let targets: Vec<String> = f.upstream.seen().into_iter().map(|s| s.target).collect();
    assert_eq!(targets, ["/v1/analyses/2", "/v1/analyses/3"]);
    f.gate.stop().await;
}

#[tokio::test]
async fn the_body_of_a_denied_request_is_never_read_as_a_request() {
    let f = fx("").await;
    let inner = smuggled(Some(&f.full));
    for expect in ["", "Expect: 100-continue\r\n"] {
        f.upstream.clear();
        // Denied: no key. Its body is a complete request with a valid key.
        let mut r = req(
            "POST /v1/analyses",
            None,
            &format!("{expect}Content-Length: {}\r\n", inner.len()),
        );
        r.extend_from_slice(inner.as_bytes());
        // Then an honest pipelined request.
        r.extend(req("GET /v1/analyses/2", Some(&f.full), ""));
        let answers = raw_many(f.gate.addr, &r, 3).await;
        assert!(!answers.is_empty(), "{expect:?}");
        assert_error(&answers[0], 401, "authentication_required");
        let statuses: Vec<u16> = answers.iter().map(|a| a.status).collect();
        // The honest request is answered, or the connection closed: never a third answer.
        assert!(
            statuses == [401, 200] || statuses == [401],
            "{expect:?}: {statuses:?}"
        );
        assert_not_smuggled(&f, 1).await;
        for s in f.upstream.seen() {
            assert_eq!(s.target, "/v1/analyses/2");
        }
    }
    f.gate.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Credentials

#[tokio::test]
async fn only_the_header_the_key_was_found_in_is_stripped() {
    let f = fx("").await;
    let basic = "Basic dXNlcjpwYXNz";
    let c = client();
    // Key in X-API-Key, an unrelated Basic Authorization: the Basic header goes on.
    let a = get(
        &c,
        &f.gate.url("/v1/analyses/1"),
        &[("x-api-key", &f.full), ("authorization", basic)],
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let seen = f.upstream.last();
    assert_eq!(all(&seen, "authorization"), [basic]);
    assert!(all(&seen, "x-api-key").is_empty());
    assert_only(&seen, "x-key-id", "key_full");
    // The same key in both: neither goes on.
    let bearer = format!("Bearer {}", f.full);
    let a = get(
        &c,
        &f.gate.url("/v1/analyses/1"),
        &[("x-api-key", &f.full), ("authorization", &bearer)],
    )
    .await;
    assert_eq!(a.status, 200);
    let seen = f.upstream.last();
    assert!(all(&seen, "authorization").is_empty(), "{:?}", seen.headers);
    assert!(all(&seen, "x-api-key").is_empty(), "{:?}", seen.headers);
    // No header anywhere carries the key.
    for (name, v) in seen.headers.iter() {
        assert!(
            !String::from_utf8_lossy(v.as_bytes()).contains(&f.full),
            "{name} carries the key upstream"
        );
    }
    f.gate.stop().await;
}

#[tokio::test]
async fn credentials_are_forwarded_when_configured() {
    let f = fx("[credentials]\nforward = true\n").await;
    let c = client();
    let bearer = format!("Bearer {}", f.full);
    let a = get(
        &c,
        &f.gate.url("/v1/analyses/1"),
        &[("authorization", &bearer)],
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(all(&f.upstream.last(), "authorization"), [bearer.as_str()]);
    let a = get(&c, &f.gate.url("/v1/analyses/1"), &[("x-api-key", &f.full)]).await;
    assert_eq!(a.status, 200);
    assert_eq!(all(&f.upstream.last(), "x-api-key"), [f.full.as_str()]);
    f.gate.stop().await;
}

#[tokio::test]
async fn denied_answers_never_echo_the_key() {
    let f = fx("").await;
    let unknown = mint("sk_live_");
    let test_env = mint("sk_test_");
    let mut bad_sum = mint("sk_live_");
    bad_sum.pop();
    bad_sum.push('!');
    let other = mint("sk_live_");
    let cases: Vec<(String, String)> = vec![
        (
            unknown.clone(),
            format!("Authorization: Bearer {unknown}\r\n"),
        ),
        (unknown.clone(), format!("X-API-Key: {unknown}\r\n")),
        (
            test_env.clone(),
            format!("Authorization: Bearer {test_env}\r\n"),
        ),
        (bad_sum.clone(), format!("X-API-Key: {bad_sum}\r\n")),
        (
            other.clone(),
            format!("Authorization: Bearer {}\r\nX-API-Key: {other}\r\n", f.full),
        ),
        (
            f.none.clone(),
            format!(
                "Authorization: Bearer {}\r\nX-Request-Id: {}\r\n",
                f.none, "k"
            ),
        ),
        (f.public.clone(), format!("X-API-Key: {}\r\n", f.public)),
        (f.cidr.clone(), format!("X-API-Key: {}\r\n", f.cidr)),
    ];
    for (key, headers) in cases {
        let r = req(
            "GET /v1/analyses/1",
            None,
            &format!("{headers}Connection: close\r\n"),
        );
        let bytes = raw_all(f.gate.addr, &r).await;
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.starts_with("HTTP/1.1 40"), "{text}");
        assert!(!text.contains(&key), "the answer echoes the key: {text}");
        // Nor a telling part of it (the body after the prefix).
        assert!(!text.contains(&key[8..20]), "{text}");
    }
    settle().await;
    assert_eq!(f.upstream.count(), 0);
    f.gate.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Limits and timeouts

#[tokio::test]
async fn oversized_header_sections_are_refused_before_any_decision() {
    let f = fx("").await;
    // One 20 KiB header (proxy.max_header_bytes is 16 KiB by default).
    let big = format!("X-Big: {}\r\n", "a".repeat(20 * 1024));
    let a = raw(f.gate.addr, &req("GET /v1/analyses/1", Some(&f.full), &big)).await;
    assert_eq!(a.status, 431, "one 20 KiB header");
    // 200 small headers (proxy.max_headers is 100 by default).
    let many: String = (0..200).map(|i| format!("X-H{i}: {i}\r\n")).collect();
    let a = raw(
        f.gate.addr,
        &req("GET /v1/analyses/1", Some(&f.full), &many),
    )
    .await;
    assert_eq!(a.status, 431, "200 headers");
    // A lower configured limit is the one enforced.
    settle().await;
    assert_eq!(f.upstream.count(), 0, "{:?}", f.upstream.seen());
    f.gate.stop().await;

    let f = fx_with("max_headers = 20", "").await;
    let some: String = (0..30).map(|i| format!("X-H{i}: {i}\r\n")).collect();
    let a = raw(
        f.gate.addr,
        &req("GET /v1/analyses/1", Some(&f.full), &some),
    )
    .await;
    assert_eq!(a.status, 431, "30 headers over max_headers = 20");
    let few: String = (0..10).map(|i| format!("X-H{i}: {i}\r\n")).collect();
    let a = raw(f.gate.addr, &req("GET /v1/analyses/1", Some(&f.full), &few)).await;
    assert_eq!(a.status, 200, "10 headers under the limit");
    assert_eq!(f.upstream.count(), 1);
    // The same over HTTP/2, whose head hyper reads.
    let key = f.full.clone();
    let fields = |n: usize| -> Vec<(String, String)> {
        (0..n)
            .map(|i| (format!("x-h{i}"), i.to_string()))
            .chain([("x-api-key".to_string(), key.clone())])
            .collect()
    };
    for (n, want) in [(30, 431), (10, 200)] {
        let fields = fields(n);
        let fields: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (&k[..], &v[..])).collect();
        let a = send(
            &h2_client(),
            "GET",
            &f.gate.url("/v1/analyses/1"),
            &fields,
            "",
        )
        .await;
        assert_eq!(a.status, want, "{n} headers over HTTP/2, max_headers = 20");
    }
    // 10 fields and 30 cookies, each a field of its own as HTTP/2 allows: 11 fields.
    let mut crumbs = fields(10);
    crumbs.extend((0..30).map(|i| ("cookie".to_string(), format!("c{i}=v"))));
    let crumbs: Vec<(&str, &str)> = crumbs.iter().map(|(k, v)| (&k[..], &v[..])).collect();
    let url = f.gate.url("/v1/analyses/1");
    let a = send(&h2_client(), "GET", &url, &crumbs, "").await;
    assert_eq!(a.status, 200, "cookie crumbs count as one field");
    assert_eq!(f.upstream.count(), 3);
    f.gate.stop().await;
}

/// Read until the server closes the connection (or errors); how long that took.
async fn time_until_closed(s: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    let closed = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {} // a 408 or similar may come first
            }
        }
    };
    tokio::time::timeout(limit, closed)
        .await
        .ok()
        .map(|_| start.elapsed())
}

#[tokio::test]
async fn a_stalled_request_line_is_dropped_after_the_header_read_timeout() {
    let f = fx("").await;
    let mut s = TcpStream::connect(f.gate.addr).await.unwrap();
    s.write_all(b"GET /v1/analy").await.unwrap();
    let took = time_until_closed(&mut s, Duration::from_secs(3))
        .await
        .expect("the connection is closed within 3 s (header_read_timeout = 1s)");
    assert!(
        took >= Duration::from_millis(500),
        "closed too early: {took:?}"
    );
    f.gate.stop().await;
}

#[tokio::test]
async fn a_trickled_header_section_is_dropped_after_the_header_read_timeout() {
    let f = fx("").await;
    let mut s = TcpStream::connect(f.gate.addr).await.unwrap();
    s.write_all(b"GET /v1/analyses/1 HTTP/1.1\r\nHost: a\r\n")
        .await
        .unwrap();
    // One header line every 200 ms: each read makes progress, the section never ends.
    let start = Instant::now();
    let mut closed_at = None;
    for i in 0..25 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if s.write_all(format!("X-Slow-{i}: x\r\n").as_bytes())
            .await
            .is_err()
        {
            closed_at = Some(start.elapsed());
            break;
        }
        let mut buf = [0u8; 256];
        if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_millis(1), s.read(&mut buf)).await {
            closed_at = Some(start.elapsed());
            break;
        }
    }
    let took = closed_at.expect("a slowloris client is cut off");
    assert!(took < Duration::from_secs(3), "cut off only after {took:?}");
    assert_eq!(f.upstream.count(), 0);
    f.gate.stop().await;
}

#[tokio::test]
async fn a_refused_upstream_is_502_upstream_unavailable() {
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let f = fx_at(Upstream::start().await, addr, "", "").await;
    let a = raw(f.gate.addr, &req("GET /v1/analyses/1", Some(&f.full), "")).await;
    assert_error(&a, 502, "upstream_unavailable");
    f.gate.stop().await;
}

#[tokio::test]
async fn a_slow_upstream_is_504_upstream_timeout_after_upstream_timeout() {
    let f = fx("").await;
    let start = Instant::now();
    let a = raw(f.gate.addr, &req("GET /slow/3000", Some(&f.full), "")).await;
    let took = start.elapsed();
    assert_error(&a, 504, "upstream_timeout");
    assert!(
        took >= Duration::from_millis(1800) && took < Duration::from_millis(2900),
        "upstream_timeout is 2 s; answered after {took:?}"
    );
    f.gate.stop().await;
}

/// Send `request` on `s` and read its answer; the connection stays open.
async fn exchange_on(s: &mut TcpStream, request: &[u8]) -> Answer {
    s.write_all(request).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).await.unwrap();
        assert!(
            n > 0,
            "closed before an answer: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
        if let Some(a) = parse_response(&buf) {
            return a;
        }
    }
}

// One timer serves a connection's requests, moved without re-arming (`keygate::deadline`): each
// wait must still get its whole timeout, counted from its own start, neither the first one's
// nor longer.

#[tokio::test]
async fn each_wait_for_a_head_on_a_kept_alive_connection_gets_the_whole_header_read_timeout() {
    let f = fx("").await;
    let mut s = TcpStream::connect(f.gate.addr).await.unwrap();
    let get = req("GET /v1/analyses/1", Some(&f.full), "");
    assert_eq!(exchange_on(&mut s, &get).await.status, 200);
    // Each request 700 ms after the last answer: 2.1 s in all, past the first wait's deadline
    // (header_read_timeout = 1s), and each within its own.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(exchange_on(&mut s, &get).await.status, 200);
    }
    let answered = Instant::now();
    s.write_all(b"GET /v1/analy").await.unwrap();
    time_until_closed(&mut s, Duration::from_secs(3))
        .await
        .expect("a stalled head is cut off");
    let took = answered.elapsed();
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_millis(1800),
        "header_read_timeout is 1 s from the last answer; closed after {took:?}"
    );
    f.gate.stop().await;
}

#[tokio::test]
async fn each_request_on_a_kept_alive_connection_gets_the_whole_upstream_timeout() {
    let f = fx("").await;
    let mut s = TcpStream::connect(f.gate.addr).await.unwrap();
    // Two answers of 1.5 s each, upstream_timeout = 2s: the first request's deadline passes
    // while the second is upstream, which has its own.
    for _ in 0..2 {
        let a = exchange_on(&mut s, &req("GET /slow/1500", Some(&f.full), "")).await;
        assert_eq!(a.status, 200, "{:?}", a.body);
    }
    let start = Instant::now();
    let a = exchange_on(&mut s, &req("GET /slow/3000", Some(&f.full), "")).await;
    let took = start.elapsed();
    assert_error(&a, 504, "upstream_timeout");
    assert!(
        took >= Duration::from_millis(1800) && took < Duration::from_millis(2900),
        "upstream_timeout is 2 s; answered after {took:?}"
    );
    // The connection goes on, with a deadline for its next request again.
    let a = exchange_on(&mut s, &req("GET /slow/1500", Some(&f.full), "")).await;
    assert_eq!(a.status, 200);
    f.gate.stop().await;
}

/// Send `head`, then each of `pieces` `gap` after the last (until a write fails: keygate may
/// answer and close first), then read the answer (or what came before the connection closed);
/// with how long after the last piece sent, and after the head, it came.
async fn drip(
    addr: SocketAddr,
    head: &[u8],
    pieces: &[&[u8]],
    gap: Duration,
) -> (Answer, Duration, Duration) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(head).await.unwrap();
    let sent_head = Instant::now();
    let mut last = sent_head;
    for piece in pieces {
        tokio::time::sleep(gap).await;
        if s.write_all(piece).await.is_err() {
            break;
        }
        last = Instant::now();
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
            .await
            .expect("an answer within 10 s")
            .unwrap_or(0);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(a) = parse_response(&buf) {
            return (a, last.elapsed(), sent_head.elapsed());
        }
        assert!(
            n > 0,
            "closed before an answer: {:?}",
            String::from_utf8_lossy(&buf)
        );
    }
}

/// upstream_timeout (2 s here) is the upstream's time to start answering: an upload that takes
/// longer, but keeps moving, goes through whole, streamed with a length or chunked. (One read
/// before it goes up, for an idempotent replay, must come whole within it: below.)
#[tokio::test]
async fn an_upload_slower_than_upstream_timeout_goes_through_while_it_moves() {
    let f = fx("").await;
    let pieces: Vec<Vec<u8>> = (0..8).map(|i| format!("piece{i}.").into_bytes()).collect();
    let whole: Vec<u8> = pieces.concat();
    let chunks: Vec<Vec<u8>> = pieces
        .iter()
        .map(|p| {
            [
                format!("{:x}\r\n", p.len()).into_bytes(),
                p.clone(),
                b"\r\n".to_vec(),
            ]
            .concat()
        })
        .chain([b"0\r\n\r\n".to_vec()])
        .collect();
    let length = format!("Content-Length: {}\r\n", whole.len());
    for (fields, sent) in [
        (length.clone(), &pieces),
        ("Transfer-Encoding: chunked\r\n".to_string(), &chunks),
    ] {
        f.upstream.clear();
        let head = req("POST /v1/analyses", Some(&f.full), &fields);
        let sent: Vec<&[u8]> = sent.iter().map(Vec::as_slice).collect();
        // 8 (or 9) pieces 400 ms apart: over 3 s.
        let (a, _, _) = drip(f.gate.addr, &head, &sent, Duration::from_millis(400)).await;
        assert_eq!(a.status, 200, "{fields:?}: {:?}", a.body);
        assert_eq!(f.upstream.last().body, whole, "{fields:?}");
    }
    f.gate.stop().await;
}

/// Once the body is all up, the upstream has upstream_timeout to answer, counted from then.
#[tokio::test]
async fn upstream_timeout_counts_from_the_last_piece_of_an_upload() {
    let f = fx("").await;
    let head = req("POST /slow/4000", Some(&f.full), "Content-Length: 6\r\n");
    let (a, after, _) = drip(
        f.gate.addr,
        &head,
        &[b"abc", b"def"],
        Duration::from_millis(1200),
    )
    .await;
    assert_error(&a, 504, "upstream_timeout");
    assert!(
        after >= Duration::from_millis(1800) && after < Duration::from_millis(3800),
        "upstream_timeout is 2 s from the body's end (the upstream answers after 4 s); \
         answered {after:?} after it"
    );
    f.gate.stop().await;
}

/// A client that stops sending its body gets 400 once upstream_timeout passes without a piece
/// (streamed): its fault, not the upstream's.
#[tokio::test]
async fn a_body_that_stops_coming_is_400_after_upstream_timeout() {
    let f = fx("").await;
    for fields in ["Content-Length: 100\r\n", "Transfer-Encoding: chunked\r\n"] {
        let head = req("POST /v1/analyses", Some(&f.full), fields);
        let piece: &[u8] = if fields.contains("chunked") {
            b"5\r\nhello\r\n"
        } else {
            b"hello"
        };
        let (a, after, _) = drip(f.gate.addr, &head, &[piece], Duration::from_millis(100)).await;
        assert_error(&a, 400, "invalid_request");
        assert!(
            a.json()["error"]["message"]
                .as_str()
                .unwrap()
                .contains("did not arrive in time"),
            "{fields:?}: {:?}",
            a.body
        );
        assert!(
            after >= Duration::from_millis(1800) && after < Duration::from_millis(5000),
            "{fields:?}: upstream_timeout is 2 s from the last piece; answered {after:?} after it"
        );
    }
    f.gate.stop().await;
}

/// A body read before it goes up (an Idempotency-Key's: it holds an admission and memory while
/// it comes) must arrive whole within upstream_timeout of the head, moving or not.
#[tokio::test]
async fn a_read_first_body_must_arrive_whole_within_upstream_timeout() {
    let f = fx("[idempotency]\n").await;
    let head = req(
        "POST /v1/analyses",
        Some(&f.full),
        "Content-Length: 40\r\nIdempotency-Key: trickle-1\r\n",
    );
    // 8 pieces of 5 bytes, 400 ms apart: moving, but 3.2 s in all.
    let pieces = [&b"piece"[..]; 8];
    let (a, _, after_head) = drip(f.gate.addr, &head, &pieces, Duration::from_millis(400)).await;
    assert_error(&a, 400, "invalid_request");
    assert!(
        a.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("did not arrive in time"),
        "{:?}",
        a.body
    );
    assert!(
        after_head >= Duration::from_millis(1800) && after_head < Duration::from_millis(5000),
        "upstream_timeout is 2 s from the head; answered {after_head:?} after it"
    );
    settle().await;
    assert_eq!(f.upstream.count(), 0);
    f.gate.stop().await;
}

// ---------------------------------------------------------------------------------------------
// X-Forwarded-For

#[tokio::test]
async fn an_untrusted_peer_cannot_claim_an_address() {
    let f = fx("").await;
    let claims = "X-Forwarded-For: 203.0.113.5\r\nX-Forwarded-For: 203.0.113.6\r\n\
                  X-Forwarded-Proto: https\r\nX-Forwarded-Host: admin.internal\r\n";
    let a = raw(
        f.gate.addr,
        &req("GET /v1/analyses/1", Some(&f.cidr), claims),
    )
    .await;
    assert_error(&a, 403, "ip_not_allowed");
    settle().await;
    assert_eq!(f.upstream.count(), 0);
    let a = raw(
        f.gate.addr,
        &req("GET /v1/analyses/1", Some(&f.full), claims),
    )
    .await;
    assert_eq!(a.status, 200);
    let seen = f.upstream.last();
    assert_eq!(all(&seen, "x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(all(&seen, "x-forwarded-proto"), ["http"]);
    assert_eq!(all(&seen, "x-forwarded-host"), ["api.example"]);
    f.gate.stop().await;
}

#[tokio::test]
async fn a_trusted_proxys_chain_is_believed_from_the_right() {
    let f = fx_with("trusted_proxies = [\"127.0.0.1/32\"]", "").await;
    let a = raw(
        f.gate.addr,
        &req(
            "GET /v1/analyses/1",
            Some(&f.cidr),
            "X-Forwarded-For: 203.0.113.5\r\n",
        ),
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(
        all(&f.upstream.last(), "x-forwarded-for"),
        ["203.0.113.5, 127.0.0.1"]
    );
    // A chain keygate cannot pass on as it came (listed in Connection, so not to be passed on;
    // a value with bytes that are not visible ASCII) goes on as the client decided on and the
    // peer: never only the peer, which the upstream might take for the client.
    for xff in [
        "Connection: X-Forwarded-For\r\nX-Forwarded-For: 203.0.113.5\r\n",
        "X-Forwarded-For: 1.1.1.1\u{a0}, 203.0.113.5\r\n",
    ] {
        f.upstream.clear();
        let a = raw(f.gate.addr, &req("GET /v1/analyses/1", Some(&f.cidr), xff)).await;
        assert_eq!(a.status, 200, "{xff:?}: {:?}", a.body);
        assert_eq!(
            all(&f.upstream.last(), "x-forwarded-for"),
            ["203.0.113.5, 127.0.0.1"],
            "{xff:?}"
        );
    }
    // The client is the rightmost untrusted hop: a forged allowed address further left is not.
    f.upstream.clear();
    for xff in [
        "X-Forwarded-For: 203.0.113.5, 198.51.100.7\r\n",
        "X-Forwarded-For: 203.0.113.5\r\nX-Forwarded-For: 198.51.100.7\r\n",
        "X-Forwarded-For: 203.0.113.5, garbage\r\n",
        "X-Forwarded-For: 203.0.113.5,,\r\n",
        "X-Forwarded-For: \r\n",
    ] {
        let a = raw(f.gate.addr, &req("GET /v1/analyses/1", Some(&f.cidr), xff)).await;
        assert_error(&a, 403, "ip_not_allowed");
    }
    settle().await;
    assert_eq!(f.upstream.count(), 0);
    f.gate.stop().await;
}

#[tokio::test]
async fn an_untrusted_peer_cannot_claim_an_address_in_other_spellings() {
    let f = fx("").await;
    let a = raw(
        f.gate.addr,
        &req(
            "GET /v1/analyses/1",
            Some(&f.full),
            "Forwarded: for=203.0.113.5;proto=https;host=admin.internal\r\n\
             X_Forwarded_For: 203.0.113.5\r\nx_forwarded_proto: https\r\n\
             X-Forwarded_Host: admin.internal\r\n",
        ),
    )
    .await;
    assert_eq!(a.status, 200);
    let seen = f.upstream.last();
    let text = format!("{:?}", seen.headers);
    assert!(!text.contains("203.0.113.5"), "{text}");
    assert!(!text.contains("admin.internal"), "{text}");
    assert_eq!(variants(&seen, "x-forwarded-for"), ["x-forwarded-for"]);
    f.gate.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Upgrades

/// Send an upgrade request and read the answer head; the stream stays open for the tunnel.
async fn upgrade(addr: SocketAddr, r: &[u8]) -> (TcpStream, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(r).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut byte))
            .await
            .expect("an answer head within 5 s")
            .unwrap();
        assert_eq!(
            n,
            1,
            "closed mid-head: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    (s, String::from_utf8_lossy(&head).into_owned())
}

const WS: &str = "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
                  Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";

#[tokio::test]
async fn websocket_upgrade_tunnels_bytes_both_ways() {
    let f = fx("").await;
    let (mut s, head) = upgrade(f.gate.addr, &req("GET /ws", Some(&f.full), WS)).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    for msg in [
        &b"hello"[..],
        b"\x81\x05world",
        b"GET /admin HTTP/1.1\r\n\r\n",
    ] {
        s.write_all(msg).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back))
            .await
            .expect("echo within 5 s")
            .unwrap();
        assert_eq!(back, msg);
    }
    let seen = f.upstream.last();
    assert_eq!(seen.target, "/ws");
    assert_eq!(all(&seen, "upgrade"), ["websocket"]);
    assert_eq!(all(&seen, "connection"), ["upgrade"]);
    assert_only(&seen, "x-key-id", "key_full");
    assert!(all(&seen, "authorization").is_empty());
    assert_eq!(f.upstream.count(), 1, "tunnel bytes are not requests");
    // The tunnel ends with the client's side; open, it would hold the stop for the whole drain.
    drop(s);
    f.gate.stop().await;
}

#[tokio::test]
async fn websocket_upgrade_without_a_key_is_401_and_no_tunnel() {
    let f = fx("").await;
    let (mut s, head) = upgrade(f.gate.addr, &req("GET /ws", None, WS)).await;
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    // Still HTTP afterwards: a request on the same connection gets an HTTP answer.
    let len: usize = head
        .to_ascii_lowercase()
        .split("\r\n")
        .find_map(|l| {
            l.strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.unwrap();
    s.write_all(&req("GET /ws", None, "")).await.unwrap();
    let mut buf = [0u8; 12];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert!(n == 0 || buf.starts_with(b"HTTP/1.1 401"), "{buf:?}");
    settle().await;
    assert_eq!(f.upstream.count(), 0);
    f.gate.stop().await;
}

/// `Upgrade: h2c` asks the upstream to switch the connection to HTTP/2: every request inside
/// would then bypass keygate (no decision, no identity headers, any path). keygate must not
/// forward an h2c upgrade (Envoy strips it too), only WebSocket.
#[tokio::test]
async fn h2c_upgrade_is_never_forwarded() {
    let up = RawUpstream::start().await;
    let f = fx_at(Upstream::start().await, up.addr, "", "").await;
    let (mut s, head) = upgrade(
        f.gate.addr,
        &req(
            "GET /v1/public/x",
            Some(&f.public),
            "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n\
             HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n",
        ),
    )
    .await;
    // Were a tunnel open, this would reach the upstream with no decision at all.
    if head.starts_with("HTTP/1.1 101") {
        let _ = s
            .write_all(b"GET /v1/private HTTP/1.1\r\nHost: a\r\nX-Partner-Id: partner_evil\r\n\r\n")
            .await;
        let mut buf = [0u8; 64];
        let _ = tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await;
    }
    settle().await;
    let got = up.requests();
    assert!(
        got.iter().all(|r| !r.contains("/v1/private")),
        "a request inside an h2c tunnel reached the upstream: {got:?}"
    );
    assert_eq!(got.len(), 1, "{got:?}");
    let first = got[0].to_ascii_lowercase();
    assert!(!first.contains("upgrade: h2c"), "{first}");
    assert!(!head.starts_with("HTTP/1.1 101"), "{head}");
    f.gate.stop().await;
}

// ---------------------------------------------------------------------------------------------
// HTTP/2 (h2c prior knowledge)

#[tokio::test]
async fn h2_identity_spoofs_are_replaced_like_h1() {
    let f = fx("").await;
    let c = h2_client();
    let auth = format!("Bearer {}", f.full);
    let mut headers: Vec<(&str, &str)> = vec![("authorization", &auth)];
    let spoof = [
        ("x-partner-id", "evil"),
        ("x-partner-id", "evil2"),
        ("x_partner_id", "evil3"),
        ("x.partner.id", "evil4"),
        ("x-org-id", "evil"),
        ("x.org.id", "evil"),
        ("x_org_id", "evil"),
        ("x-key-id", "evil"),
        ("x-key_id", "evil"),
        ("x-key-environment", "test"),
        ("x-scopes", "admin"),
        ("x_scopes", "admin"),
        ("x-request-id", "bad id"),
        ("x-api-key", "junk-but-unused"),
    ];
    headers.extend(spoof.iter().filter(|(n, _)| *n != "x-api-key"));
    let a = send(&c, "GET", &f.gate.url("/v1/analyses/1"), &headers, "").await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let seen = f.upstream.last();
    assert_only(&seen, "x-partner-id", "partner_acme");
    assert_only(&seen, "x-org-id", "org_1");
    assert_only(&seen, "x-key-id", "key_full");
    assert_only(&seen, "x-key-environment", "live");
    assert_only(&seen, "x-scopes", FULL_SCOPES);
    assert_only(&seen, "x-request-id", a.header("x-request-id").unwrap());
    assert!(all(&seen, "authorization").is_empty());
    for spelled in ["x.partner.id", "x.org.id", "x_partner_id"] {
        assert!(
            all(&seen, spelled).is_empty(),
            "{spelled} reached the upstream"
        );
    }
    // Without a key, over h2: denied and nothing forwarded.
    f.upstream.clear();
    let a = send(&c, "GET", &f.gate.url("/v1/analyses/1"), &spoof[..3], "").await;
    assert_error(&a, 401, "authentication_required");
    settle().await;
    assert_eq!(f.upstream.count(), 0);
    f.gate.stop().await;
}

/// HTTP/2 may send Cookie as one field per pair; the HTTP/1.1 upstream gets one line, joined
/// with "; " (RFC 9113 §8.2.3), so a server that keeps one Cookie line keeps the session.
#[tokio::test]
async fn h2_cookie_crumbs_reach_the_upstream_as_one_line() {
    let f = fx("").await;
    let c = h2_client();
    let a = send(
        &c,
        "GET",
        &f.gate.url("/v1/analyses/1"),
        &[
            ("x-api-key", &f.full),
            ("cookie", "a=1"),
            ("cookie", "b=2; c=3"),
        ],
        "",
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(all(&f.upstream.last(), "cookie"), ["a=1; b=2; c=3"]);
    f.gate.stop().await;
}

#[tokio::test]
async fn h2_paths_are_judged_like_h1() {
    let f = fx("").await;
    let c = h2_client();
    let table: &[(&str, &String, Want)] = &[
        ("/%2e%2e/admin", &f.full, BAD),
        ("/a%2Fb", &f.full, BAD),
        ("/a%00b", &f.full, BAD),
        ("/a;b", &f.full, BAD),
        ("/v1/%2e%2e/admin", &f.full, Forward("/admin")),
        ("//admin?x=%2F", &f.full, Forward("/admin?x=%2F")),
        (
            "/v1/public/../private",
            &f.public,
            Deny(403, "route_not_allowed"),
        ),
        ("/v1/public/x", &f.public, Forward("/v1/public/x")),
        ("/v1//analyses/1", &f.none, Deny(403, "scope_required")),
    ];
    for (path, key, want) in table {
        f.upstream.clear();
        let auth = format!("Bearer {key}");
        let a = send(
            &c,
            "GET",
            &f.gate.url(path),
            &[("authorization", &auth)],
            "",
        )
        .await;
        match want {
            Forward(target) => {
                assert_eq!(a.status, 200, "{path}: {:?}", a.body);
                assert_eq!(f.upstream.last().target, *target, "{path}");
            }
            Deny(status, code) => {
                assert_error(&a, *status, code);
                settle().await;
                assert_eq!(f.upstream.count(), 0, "{path}");
            }
        }
    }
    // A lowercase method over h2 needs the same scope as over h1.
    let auth = format!("Bearer {}", f.read);
    let a = send(
        &c,
        "post",
        &f.gate.url("/v1/analyses"),
        &[("authorization", &auth)],
        "",
    )
    .await;
    assert_error(&a, 403, "scope_required");
    f.gate.stop().await;
}

// ---------------------------------------------------------------------------------------------
// The upstream request line

/// RFC 9112 §3.2.1: a request to an origin server carries the origin form (`/path?query`); the
/// absolute form is for proxies. Servers differ on it: nginx takes the host from it over `Host`,
/// and `self.path` of Python's http.server (or `req.url` of a bare Node server) holds the whole
/// URL, which breaks routing and path-prefix checks upstream.
#[tokio::test]
async fn the_upstream_request_line_is_origin_form() {
    let up = RawUpstream::start().await;
    let f = fx_at(Upstream::start().await, up.addr, "", "").await;
    let a = raw(
        f.gate.addr,
        &req("GET //v1/analyses/1?x=%2F", Some(&f.full), ""),
    )
    .await;
    assert_eq!(a.status, 200);
    let a = raw(
        f.gate.addr,
        &req("GET http://evil.example/v1/analyses/2", Some(&f.full), ""),
    )
    .await;
    assert_eq!(a.status, 200);
    let got = up.requests();
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(
        got[0].starts_with("GET /v1/analyses/1?x=%2F HTTP/1.1\r\n"),
        "{}",
        got[0]
    );
    assert!(
        got[1].starts_with("GET /v1/analyses/2 HTTP/1.1\r\n"),
        "{}",
        got[1]
    );
    f.gate.stop().await;
}

/// A request that names no host (HTTP/1.0 without `Host`) still reaches the upstream with one,
/// as HTTP/1.1 requires.
#[tokio::test]
async fn the_upstream_request_always_has_a_host() {
    let up = RawUpstream::start().await;
    let f = fx_at(Upstream::start().await, up.addr, "", "").await;
    let r = format!(
        "GET /v1/analyses/1 HTTP/1.0\r\nAuthorization: Bearer {}\r\n\r\n",
        f.full
    );
    let a = raw(f.gate.addr, r.as_bytes()).await;
    assert_eq!(a.status, 200);
    let got = up.requests();
    assert_eq!(got.len(), 1, "{got:?}");
    let head = got[0].to_ascii_lowercase();
    assert_eq!(head.matches("\r\nhost:").count(), 1, "{head}");
    f.gate.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Referrers (a browser-only control, but it must not be fooled by URL tricks)

#[tokio::test]
async fn allowed_referrers_cannot_be_fooled() {
    let f = fx("").await;
    let table: &[(&str, u16)] = &[
        ("Referer: https://app.example.com/page\r\n", 200),
        ("Referer: HTTPS://APP.EXAMPLE.COM/page?x=1#f\r\n", 200),
        ("Origin: https://app.example.com\r\n", 200),
        ("Origin: https://app.example.com:443\r\n", 200),
        ("", 403),
        ("Referer: https://app.example.com.evil.com/\r\n", 403),
        (
            "Referer: https://evil.com/https://app.example.com/\r\n",
            403,
        ),
        (
            "Referer: https://evil.com/?r=https://app.example.com/\r\n",
            403,
        ),
        ("Referer: https://app.example.com@evil.com/\r\n", 403),
        ("Referer: https://evil.com\\@app.example.com/\r\n", 403),
        ("Referer: https://evil.com#@app.example.com/\r\n", 403),
        ("Referer: https://app.example.com./\r\n", 403),
        ("Referer: https://app%2eexample.com/\r\n", 403),
        ("Referer: https://app.example.com:8443/\r\n", 403),
        ("Referer: http://app.example.com/\r\n", 403),
        ("Referer: //app.example.com/\r\n", 403),
        ("Referer: app.example.com\r\n", 403),
        ("Referer: https://app.example.com/../x\r\n", 403),
        ("Origin: null\r\n", 403),
        ("Origin: https://app.example.com/\r\n", 403),
        (
            "Origin: https://evil.com\r\nReferer: https://app.example.com/\r\n",
            403,
        ),
        (
            "Origin: https://app.example.com\r\nReferer: https://evil.com/\r\n",
            403,
        ),
        (
            "Referer: https://app.example.com/\r\nReferer: https://evil.com/\r\n",
            403,
        ),
        (
            "Referer: https://evil.com/\r\nReferer: https://app.example.com/\r\n",
            403,
        ),
    ];
    for (headers, status) in table {
        f.upstream.clear();
        let a = raw(
            f.gate.addr,
            &req("GET /v1/analyses/1", Some(&f.referrer), headers),
        )
        .await;
        if *status == 200 {
            assert_eq!(a.status, 200, "{headers:?}");
            assert_eq!(f.upstream.count(), 1, "{headers:?}");
        } else {
            assert_error(&a, 403, "referrer_not_allowed");
            settle().await;
            assert_eq!(f.upstream.count(), 0, "{headers:?}");
        }
    }
    f.gate.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Idempotency

#[tokio::test]
async fn lowercase_mutating_methods_still_need_an_idempotency_key() {
    let f = fx("[idempotency]\nrequired = true\n").await;
    for method in ["POST", "post", "Put", "delete", "pAtCh"] {
        check_target(
            &f,
            method,
            "/v1/analyses",
            &f.full,
            &Deny(400, "idempotency_key_required"),
        )
        .await;
    }
    f.gate.stop().await;
}

// ---------------------------------------------------------------------------------------------
// The upstream connection pool

/// An upstream that answers HEAD with a body (a common bug), and makes that body a whole second
/// response. If keygate pooled the connection and read those bytes as the answer to the next
/// request, another client would get a response that was never its own.
#[tokio::test]
async fn leftover_upstream_bytes_never_answer_another_request() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while let Some((end, _)) = request_end(&buf) {
                        let head: Vec<u8> = buf.drain(..end).collect();
                        let answer: &[u8] = if head.starts_with(b"HEAD") {
                            b"HTTP/1.1 200 OK\r\ncontent-length: 50\r\n\r\n\
                              HTTP/1.1 200 OK\r\ncontent-length: 6\r\nx-poison: yes\r\n\r\nPOISON"
                        } else {
                            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nclean"
                        };
                        if s.write_all(answer).await.is_err() {
                            return;
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
    // One listener and one pool, so the second request could reuse the first's connection.
    let f = fx_at(
        Upstream::start().await,
        addr,
        "",
        "[runtime]\nflavor = \"multi_thread\"\n",
    )
    .await;
    let auth = format!("Bearer {}", f.full);
    let c = client();
    for _ in 0..3 {
        let a = send(
            &c,
            "HEAD",
            &f.gate.url("/v1/x"),
            &[("authorization", &auth)],
            "",
        )
        .await;
        assert_eq!(a.status, 200);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let b = raw(f.gate.addr, &req("GET /v1/y", Some(&f.full), "")).await;
        assert!(b.header("x-poison").is_none(), "{b:?}");
        assert_ne!(
            &b.body[..],
            b"POISON",
            "another request's answer was served"
        );
        if b.status == 200 {
            assert_eq!(&b.body[..], b"clean");
        } else {
            assert_error(&b, 502, "upstream_unavailable");
        }
    }
    f.gate.stop().await;
}

/// The recording upstream answers `/ws` with 101 whether or not it was asked to. When keygate
/// did not forward an upgrade (none asked, or an h2c one refused), that 101 must open no tunnel
/// to the client and must not leave a dead connection in the pool for the next request.
#[tokio::test]
async fn an_unrequested_upstream_101_opens_no_tunnel() {
    let f = fx("[runtime]\nflavor = \"multi_thread\"\n").await;
    for headers in [
        "",
        "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n",
    ] {
        let (mut s, head) = upgrade(f.gate.addr, &req("GET /ws", Some(&f.full), headers)).await;
        if head.starts_with("HTTP/1.1 101") {
            // Bytes written now must not reach the upstream's echo.
            let _ = s.write_all(b"ping").await;
            let mut buf = [0u8; 4];
            let echoed = tokio::time::timeout(Duration::from_millis(500), s.read_exact(&mut buf))
                .await
                .is_ok_and(|r| r.is_ok());
            assert!(!echoed, "{headers:?}: a tunnel was opened: {head}");
        }
        let a = raw(f.gate.addr, &req("GET /v1/analyses/1", Some(&f.full), "")).await;
        assert_eq!(a.status, 200, "{headers:?}: the next request still works");
    }
    f.gate.stop().await;
}
