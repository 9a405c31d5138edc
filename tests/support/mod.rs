//! Test harness: a real upstream that records what it receives, snapshot files written the way
//! operators write them (atomic rename), a real keygate started through `app::start` on
//! `127.0.0.1:0`, and real clients (hyper, and raw TCP for shapes hyper would not send).
//! Nothing here sleeps to wait for readiness: addresses come back from bound listeners, and
//! conditions are polled with a deadline.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub use keygate::app::App;

pub mod control_plane;
pub mod h2_frames;

// ---------------------------------------------------------------------------------------------
// Upstream

/// One request as the upstream saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    /// The request target exactly as received (path and query).
    pub target: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// A real HTTP/1.1 upstream on 127.0.0.1:0 that records every request.
///
/// Behaviour by path: `/slow/<ms>` answers after a delay; `/status/<n>` answers with status n;
/// `/big/<n>` answers a body of n bytes; every answer says which request it was
/// (`x-upstream-seq`, from 1);
/// `/stream/<n>` answers n chunks of 1 KiB; `/ws` accepts an upgrade and echoes bytes; anything
/// else answers 200 `{"ok":true}` with an `x-upstream: yes` header and a `connection: x-upstream-secret`
/// hop-by-hop trap (`x-upstream-secret` must not reach the client).
pub struct Upstream {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Over TLS: one entry per completed handshake, the SNI the client sent (if any).
    sni: Arc<Mutex<Vec<Option<String>>>>,
}

impl Upstream {
    pub async fn start() -> Self {
        Self::serve(None).await
    }

    /// The same upstream over TLS (HTTP/1.1) with `config`.
    pub async fn start_tls(config: rustls::ServerConfig) -> Self {
        Self::serve(Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))).await
    }

    async fn serve(tls: Option<tokio_rustls::TlsAcceptor>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let sni: Arc<Mutex<Vec<Option<String>>>> = Arc::default();
        let (record, names) = (seen.clone(), sni.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let record = record.clone();
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let record = record.clone();
                    async move { Ok::<_, Infallible>(upstream_answer(req, record).await) }
                });
                let (tls, names) = (tls.clone(), names.clone());
                tokio::spawn(async move {
                    let http = hyper::server::conn::http1::Builder::new();
                    match tls {
                        None => {
                            let _ = http
                                .serve_connection(TokioIo::new(stream), service)
                                .with_upgrades()
                                .await;
                        }
                        Some(tls) => {
                            let Ok(stream) = tls.accept(stream).await else {
                                return;
                            };
                            let name = stream.get_ref().1.server_name().map(str::to_owned);
                            names.lock().unwrap().push(name);
                            let _ = http
                                .serve_connection(TokioIo::new(stream), service)
                                .with_upgrades()
                                .await;
                        }
                    }
                });
            }
        });
        Upstream { addr, seen, sni }
    }

    /// Over TLS: the SNI of each connection, in order of their handshakes.
    pub fn sni(&self) -> Vec<Option<String>> {
        self.sni.lock().unwrap().clone()
    }

    /// Everything received so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// The last request received (panics when none).
    pub fn last(&self) -> Seen {
        self.seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("the upstream saw no request")
    }

    pub fn clear(&self) {
        self.seen.lock().unwrap().clear();
    }
}

async fn upstream_answer(
    mut req: Request<Incoming>,
    record: Arc<Mutex<Vec<Seen>>>,
) -> Response<Full<Bytes>> {
    let target = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let on_upgrade = (target == "/ws").then(|| hyper::upgrade::on(&mut req));
    let method = req.method().to_string();
    let headers = req.headers().clone();
    let body = if on_upgrade.is_some() {
        Bytes::new()
    } else {
        req.into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default()
    };
    let seq = {
        let mut r = record.lock().unwrap();
        r.push(Seen {
            method,
            target: target.clone(),
            headers,
            body,
        });
        r.len()
    };
    if let Some(on_upgrade) = on_upgrade {
        tokio::spawn(async move {
            if let Ok(upgraded) = on_upgrade.await {
                let mut io = TokioIo::new(upgraded);
                let mut buf = [0u8; 1024];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
        return Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .body(Full::new(Bytes::new()))
            .unwrap();
    }
    if let Some(ms) = target
        .strip_prefix("/slow/")
        .and_then(|s| s.parse::<u64>().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let status = target
        .strip_prefix("/status/")
        .and_then(|s| s.parse::<u16>().ok())
        .and_then(|n| StatusCode::from_u16(n).ok())
        .unwrap_or(StatusCode::OK);
    let body = match target
        .strip_prefix("/big/")
        .and_then(|s| s.parse::<usize>().ok())
    {
        Some(n) => Bytes::from(vec![b'x'; n]),
        None => Bytes::from_static(b"{\"ok\":true}"),
    };
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("x-upstream", "yes")
        .header("x-upstream-seq", seq.to_string())
        .header("x-upstream-secret", "must-not-leak")
        .header("connection", "x-upstream-secret")
        .body(Full::new(body))
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// Snapshots

/// `sha256:<hex>` of a key.
pub fn digest(key: &str) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(key.as_bytes())))
}

/// Mint a key with the contract's format.
pub fn mint(prefix: &str) -> String {
    keygate::credential::mint(prefix)
}

/// A snapshot document under construction.
#[derive(Clone)]
pub struct Doc {
    pub revision: u64,
    pub partners: Vec<serde_json::Value>,
    pub keys: Vec<serde_json::Value>,
}

impl Doc {
    pub fn new(revision: u64) -> Self {
        Doc {
            revision,
            partners: Vec::new(),
            keys: Vec::new(),
        }
    }

    pub fn partner(mut self, id: &str, org: Option<&str>, status: &str) -> Self {
        self.partners
            .push(serde_json::json!({"id": id, "org_id": org, "status": status}));
        self
    }

    /// Add a key record for `secret`; `extra` fields are merged over the defaults
    /// (partner `partner_acme`, environment `live`, scopes `analyses:read`, active).
    pub fn key(mut self, id: &str, secret: &str, extra: serde_json::Value) -> Self {
        let mut k = serde_json::json!({
            "id": id,
            "name": id,
            "prefix": &secret[..secret.len().min(12)],
            "hash": digest(secret),
            "partner_id": "partner_acme",
            "environment": "live",
            "scopes": ["analyses:read"],
            "status": "active",
            "created_at": "2026-01-15T10:30:00Z",
            "expires_at": null,
        });
        if let (Some(base), Some(extra)) = (k.as_object_mut(), extra.as_object()) {
            for (f, v) in extra {
                base.insert(f.clone(), v.clone());
            }
        }
        self.keys.push(k);
        self
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(&serde_json::json!({
            "schema": "keygate.snapshot/v1",
            "revision": self.revision,
            "generated_at": "2026-11-22T06:00:00Z",
            "partners": self.partners,
            "keys": self.keys,
        }))
        .unwrap()
    }
}

/// A temporary directory holding `keys.json`.
pub struct SnapshotDir {
    pub dir: tempfile::TempDir,
}

impl SnapshotDir {
    pub fn new() -> Self {
        SnapshotDir {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join("keys.json")
    }

    /// Replace the snapshot atomically (write a sibling, rename over), as operators should.
    pub fn write(&self, doc: &Doc) {
        self.write_text(&doc.to_json());
    }

    pub fn write_text(&self, text: &str) {
        let tmp = self
            .dir
            .path()
            .join(format!(".keys.json.{}", rand_suffix()));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.path()).unwrap();
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

// ---------------------------------------------------------------------------------------------
// keygate

/// The TOML keygate runs with in tests: live environment, prefixes for live and test keys, one
/// scoped route, admin on. `extra` is appended (later keys of a table must not repeat).
pub fn config_toml(snapshot: &Path, upstream: SocketAddr, extra: &str) -> String {
    config_toml_proxy(snapshot, upstream, "", extra)
}

/// [`config_toml`] with `proxy_extra` added inside the `[proxy]` table (e.g.
/// `trusted_proxies = ["127.0.0.1/32"]` or `max_headers = 20`), since `[proxy]` cannot be
/// opened twice.
pub fn config_toml_proxy(
    snapshot: &Path,
    upstream: SocketAddr,
    proxy_extra: &str,
    extra: &str,
) -> String {
    format!(
        r#"
environment = "live"

[[key_prefixes]]
prefix = "sk_live_"
environment = "live"
checksum = true

[[key_prefixes]]
prefix = "sk_test_"
environment = "test"
checksum = true

[[key_prefixes]]
prefix = "legacy_"
environment = "live"
checksum = false

[snapshot]
path = {path:?}
poll_interval = "200ms"

[proxy]
listen = "127.0.0.1:0"
upstream = "http://{upstream}"
upstream_timeout = "2s"
connect_timeout = "1s"
header_read_timeout = "1s"
{proxy_extra}

[admin]
listen = "127.0.0.1:0"

[[routes.rule]]
route = "POST /v1/analyses"
scopes = ["analyses:write"]

[[routes.rule]]
route = "GET /v1/analyses/**"
scopes = ["analyses:read"]

{extra}
"#,
        path = snapshot.display().to_string(),
    )
}

/// The test configuration with its `[snapshot]` table replaced by `snapshot_table` (the table's
/// keys, without the header): for the http and grpc sources.
pub fn config_toml_source(snapshot_table: &str, upstream: SocketAddr, extra: &str) -> String {
    let base = config_toml(Path::new("unused.json"), upstream, extra);
    let start = base.find("[snapshot]\n").unwrap();
    let end = start + base[start..].find("\n\n").unwrap();
    format!(
        "{}[snapshot]\n{snapshot_table}{}",
        &base[..start],
        &base[end..]
    )
}

/// A running keygate in this process (through `app::start`).
pub struct Gate {
    pub app: Option<App>,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
}

impl Gate {
    pub async fn start(toml: &str) -> Self {
        Self::start_with_env(toml, &[]).await
    }

    /// Start with `env` as the environment that `*_env` keys are read from.
    pub async fn start_with_env(toml: &str, env: &[(&str, &str)]) -> Self {
        let lookup = |k: &str| {
            env.iter()
                .find(|(name, _)| *name == k)
                .map(|(_, v)| (*v).to_owned())
        };
        let settings =
            keygate::config::from_toml_with_env(toml, &lookup).expect("test config is valid");
        let app = keygate::app::start(settings).await.expect("keygate starts");
        Gate {
            addr: app.proxy_addr.expect("proxy configured"),
            admin: app.admin_addr.expect("admin configured"),
            app: Some(app),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// The revision in force, if any.
    pub fn revision(&self) -> Option<u64> {
        self.app
            .as_ref()
            .unwrap()
            .store
            .current()
            .as_ref()
            .map(|s| s.revision)
    }

    /// Wait (with a deadline) until revision `rev` is in force.
    pub async fn wait_revision(&self, rev: u64) {
        let ok = eventually(Duration::from_secs(5), || self.revision() == Some(rev)).await;
        assert!(
            ok,
            "revision {rev} not in force; current {:?}",
            self.revision()
        );
    }

    pub fn app(&self) -> &App {
        self.app.as_ref().unwrap()
    }

    /// The value of a metric line (`name` with its labels, as printed) from `/metrics`.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let a = get(&client(), &format!("http://{}/metrics", self.admin), &[]).await;
        assert_eq!(a.status, 200);
        let text = String::from_utf8_lossy(&a.body).to_string();
        text.lines().find_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            (k == name).then(|| v.parse().unwrap())
        })
    }

    /// `/readyz`: status and JSON body.
    pub async fn ready(&self) -> (u16, serde_json::Value) {
        let a = get(&client(), &format!("http://{}/readyz", self.admin), &[]).await;
        (a.status, a.json())
    }

    pub async fn stop(mut self) {
        if let Some(app) = self.app.take() {
            app.shutdown().await;
        }
    }
}

/// Poll `cond` every 10 ms until it holds or `deadline` passes.
pub async fn eventually(deadline: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Clients

/// A parsed answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The `error.code` of a keygate error body.
    pub fn code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }
}

pub type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub fn h2_client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// Send one request with hyper. `headers` are added as given (repeats allowed).
pub async fn send(
    client: &HttpClient,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Answer {
    let mut b = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b.body(Full::new(Bytes::from(body.to_owned()))).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .expect("answer within 10 s")
        .expect("request sent");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        headers,
        body,
    }
}

pub async fn get(client: &HttpClient, url: &str, headers: &[(&str, &str)]) -> Answer {
    send(client, "GET", url, headers, "").await
}

/// Write raw bytes to `addr` and read one HTTP/1.1 response (up to the body's Content-Length,
/// or until the server closes). For request shapes a well-behaved client would not produce.
pub async fn raw(addr: SocketAddr, request: &[u8]) -> Answer {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut buf = Vec::new();
    let read = async {
        let mut chunk = [0u8; 4096];
        loop {
            let n = stream.read(&mut chunk).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(a) = parse_response(&buf) {
                return Some(a);
            }
        }
        parse_response(&buf)
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("raw answer within 10 s")
        .unwrap_or_else(|| panic!("no HTTP response: {:?}", String::from_utf8_lossy(&buf)))
}

/// Write raw bytes (e.g. several pipelined requests) to `addr` and read up to `n` responses, in
/// order, until the server closes or 10 s pass. Fewer than `n` come back when the server closes
/// the connection early.
pub async fn raw_many(addr: SocketAddr, request: &[u8], n: usize) -> Vec<Answer> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut buf = Vec::new();
    let mut out = Vec::new();
    let read = async {
        let mut chunk = [0u8; 4096];
        while out.len() < n {
            while let Some((a, used)) = parse_one(&buf) {
                out.push(a);
                buf.drain(..used);
                if out.len() == n {
                    return;
                }
            }
            let got = stream.read(&mut chunk).await.unwrap_or(0);
            if got == 0 {
                return;
            }
            buf.extend_from_slice(&chunk[..got]);
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), read).await;
    out
}

/// Parse a complete HTTP/1.1 response with a Content-Length body.
pub fn parse_response(buf: &[u8]) -> Option<Answer> {
    parse_one(buf).map(|(a, _)| a)
}

/// [`parse_response`], and how many bytes of `buf` the response took.
fn parse_one(buf: &[u8]) -> Option<(Answer, usize)> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&buf[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let mut headers = HeaderMap::new();
    let mut map = BTreeMap::new();
    for line in lines.filter(|l| !l.is_empty()) {
        let (k, v) = line.split_once(':')?;
        map.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        headers.append(
            http::HeaderName::from_bytes(k.trim().as_bytes()).ok()?,
            http::HeaderValue::from_str(v.trim()).ok()?,
        );
    }
    let len: usize = map
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if buf.len() < end + len {
        return None;
    }
    let answer = Answer {
        status,
        headers,
        body: Bytes::copy_from_slice(&buf[end..end + len]),
    };
    Some((answer, end + len))
}

/// Assert a keygate error answer: status, code, JSON shape, request id, content type.
pub fn assert_error(a: &Answer, status: u16, code: &str) {
    assert_eq!(
        a.status,
        status,
        "status for {code}: body {:?}",
        String::from_utf8_lossy(&a.body)
    );
    let j = a.json();
    let e = &j["error"];
    assert_eq!(e["code"], code, "{j}");
    assert!(e["type"].is_string() && e["message"].is_string(), "{j}");
    let rid = a
        .header("x-request-id")
        .expect("x-request-id on every answer");
    assert_eq!(e["request_id"], rid, "body and header request ids agree");
    assert_eq!(a.header("content-type"), Some("application/json"));
    assert_eq!(
        j.as_object().unwrap().len(),
        1,
        "only `error` at the top level"
    );
    assert_eq!(
        e.as_object().unwrap().len(),
        4,
        "type, code, message, request_id: {j}"
    );
}

// ---------------------------------------------------------------------------------------------
// Usage reports

/// A usage-report receiver (`usage.report_url`): records the batches it accepts (2xx, with
/// `Authorization: Bearer usage-token`); answers 503 while `failing`.
pub struct UsageReceiver {
    pub addr: std::net::SocketAddr,
    pub accepted: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
    pub attempts: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    pub failing: std::sync::Arc<std::sync::atomic::AtomicBool>,
    server: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl UsageReceiver {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let r = UsageReceiver {
            addr: listener.local_addr().unwrap(),
            accepted: Default::default(),
            attempts: Default::default(),
            failing: Default::default(),
            server: Default::default(),
        };
        r.serve(listener);
        r
    }

    /// Go away: the listener and every open connection are closed (connections refused).
    pub fn stop(&self) {
        if let Some(h) = self.server.lock().unwrap().take() {
            h.abort();
        }
    }

    /// Come back on the same address, with what was accepted before.
    pub async fn restart(&self) {
        self.stop();
        let listener = loop {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        self.serve(listener);
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        use std::sync::atomic::Ordering::SeqCst;
        let (accepted, attempts, failing) = (
            self.accepted.clone(),
            self.attempts.clone(),
            self.failing.clone(),
        );
        let handle = tokio::spawn(async move {
            // Connections live in this task's set, so aborting it closes them too.
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (accepted, attempts, failing) =
                    (accepted.clone(), attempts.clone(), failing.clone());
                let service =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let (accepted, attempts, failing) =
                            (accepted.clone(), attempts.clone(), failing.clone());
                        async move {
                            use http_body_util::BodyExt;
                            attempts.fetch_add(1, SeqCst);
                            let auth = req.headers().get("authorization").cloned();
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let status = if failing.load(SeqCst) {
                                503
                            } else {
                                assert_eq!(auth.unwrap(), "Bearer usage-token");
                                accepted
                                    .lock()
                                    .unwrap()
                                    .push(serde_json::from_slice(&body).unwrap());
                                204
                            };
                            Ok::<_, std::convert::Infallible>(
                                http::Response::builder()
                                    .status(status)
                                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                                    .unwrap(),
                            )
                        }
                    });
                connections.spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
                );
            }
        });
        *self.server.lock().unwrap() = Some(handle);
    }

    /// Requests of `key_id` over the accepted batches, and whether any batch id came twice.
    pub fn requests(&self, key_id: &str) -> (u64, bool) {
        let accepted = self.accepted.lock().unwrap();
        let mut ids = std::collections::HashSet::new();
        let mut dup = false;
        let mut n = 0;
        for b in accepted.iter() {
            dup |= !ids.insert(b["batch_id"].as_str().unwrap().to_owned());
            for k in b["keys"].as_array().unwrap() {
                if k["key_id"] == key_id {
                    n += k["requests"].as_u64().unwrap();
                }
            }
        }
        (n, dup)
    }
}

// ---------------------------------------------------------------------------------------------
// Redis

/// A snapshot of one active key, `key_a` of `partner_acme` (no org, no limits), and its secret.
pub fn one_key_snapshot() -> (SnapshotDir, String) {
    let snap = SnapshotDir::new();
    let key = mint("sk_live_");
    snap.write(&Doc::new(1).partner("partner_acme", None, "active").key(
        "key_a",
        &key,
        serde_json::json!({}),
    ));
    (snap, key)
}

/// A real `redis-server` (Debian's package; `scripts/test` installs it) on a free loopback port,
/// nothing persisted. Killed when dropped; [`RedisServer::stop`] and [`RedisServer::restart`]
/// make outages.
pub struct RedisServer {
    pub port: u16,
    child: Option<std::process::Child>,
}

impl RedisServer {
    pub async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut r = RedisServer { port, child: None };
        r.restart().await;
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Start (again) on the same port and wait until it answers PING.
    pub async fn restart(&mut self) {
        let bin = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let child = std::process::Command::new(&bin)
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {bin} ({e}): apt-get install redis-server"));
        self.child = Some(child);
        let start = Instant::now();
        loop {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)).await {
                let mut buf = [0u8; 16];
                if s.write_all(b"PING\r\n").await.is_ok() {
                    if let Ok(n) = s.read(&mut buf).await {
                        if buf[..n].starts_with(b"+PONG") {
                            return;
                        }
                    }
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "redis-server did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kill it (an outage), and wait until the port refuses connections.
    pub async fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl RedisServer {
    /// Freeze the server (SIGSTOP): connections stay open, commands go unanswered.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Thaw a paused server (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("redis-server running").id();
        let ok = std::process::Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} {pid} failed");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// TLS

/// A throwaway PKI written as PEM files: a CA, a server certificate for 127.0.0.1 and a client
/// certificate, both signed by the CA.
pub struct Pki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// The server certificate and key, DER, for a rustls server in the test.
    pub server_der: (Vec<u8>, Vec<u8>),
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

/// A certificate this PKI issued, and its key.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    pub cert_der: Vec<u8>,
    pub key_der: Vec<u8>,
}

impl Issued {
    /// A rustls server (HTTP/1.1) with this certificate; requiring client certificates signed
    /// by `client_ca` when given.
    pub fn server_config(&self, client_ca: Option<&Pki>) -> rustls::ServerConfig {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = match client_ca {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                roots.add(ca.ca_der()).unwrap();
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .unwrap();
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(
                vec![CertificateDer::from(self.cert_der.clone())],
                PrivateKeyDer::try_from(self.key_der.clone()).unwrap(),
            )
            .unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        config
    }

    /// Write the certificate and key to `cert` and `key`, each atomically (a temp file renamed
    /// over), the certificate first.
    pub fn write_to(&self, cert: &Path, key: &Path) {
        for (path, text) in [(cert, &self.cert_pem), (key, &self.key_pem)] {
            let tmp = path.with_extension(format!("tmp{}", rand_suffix()));
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, path).unwrap();
        }
    }
}

impl Pki {
    pub fn new(dir: &Path) -> Self {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "keygate test CA");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let write = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let mut pki = Pki {
            ca: write("ca.pem", &ca_cert.pem()),
            server_cert: PathBuf::new(),
            server_key: PathBuf::new(),
            client_cert: PathBuf::new(),
            client_key: PathBuf::new(),
            server_der: (Vec::new(), Vec::new()),
            issuer,
        };
        let server = pki.issue(&["127.0.0.1"], false);
        let client = pki.issue(&["keygate-sidecar"], true);
        pki.server_cert = write("server.pem", &server.cert_pem);
        pki.server_key = write("server-key.pem", &server.key_pem);
        pki.client_cert = write("client.pem", &client.cert_pem);
        pki.client_key = write("client-key.pem", &client.key_pem);
        pki.server_der = (server.cert_der, server.key_der);
        pki
    }

    /// A new certificate for `names` (IP addresses or DNS names) signed by this CA; a client
    /// certificate when `client`.
    pub fn issue(&self, names: &[&str], client: bool) -> Issued {
        self.issue_with(names, client, None)
    }

    /// A server certificate for `names` valid until midnight UTC of `(year, month, day)`.
    pub fn issue_until(&self, names: &[&str], (y, m, d): (i32, u8, u8)) -> Issued {
        self.issue_with(names, false, Some(rcgen::date_time_ymd(y, m, d)))
    }

    fn issue_with(
        &self,
        names: &[&str],
        client: bool,
        not_after: Option<time::OffsetDateTime>,
    ) -> Issued {
        let key = rcgen::KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = rcgen::CertificateParams::new(names).unwrap();
        if client {
            params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        }
        if let Some(at) = not_after {
            params.not_after = at;
        }
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().to_vec(),
            key_der: key.serialize_der(),
        }
    }

    /// The CA certificate, DER.
    pub fn ca_der(&self) -> rustls::pki_types::CertificateDer<'static> {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::from_pem_file(&self.ca).unwrap()
    }

    /// A rustls client trusting this CA only, offering `alpn`, presenting `identity` (PEM files)
    /// when given. Session resumption is off, so every connection shows the server's current
    /// certificate.
    pub fn client_config(
        &self,
        alpn: &[&[u8]],
        identity: Option<(&Path, &Path)>,
    ) -> Arc<rustls::ClientConfig> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let mut config = match identity {
            Some((cert, key)) => builder
                .with_client_auth_cert(
                    CertificateDer::pem_file_iter(cert)
                        .unwrap()
                        .map(Result::unwrap)
                        .collect(),
                    PrivateKeyDer::from_pem_file(key).unwrap(),
                )
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        config.resumption = rustls::client::Resumption::disabled();
        Arc::new(config)
    }
}

/// An answer over TLS, with what the handshake showed.
#[derive(Debug)]
pub struct TlsAnswer {
    pub answer: Answer,
    /// The protocol ALPN chose.
    pub alpn: Option<Vec<u8>>,
    /// The server's end-entity certificate, DER.
    pub server_cert: Vec<u8>,
}

/// The certificate `addr` serves on a new connection (checked against `config`'s roots for
/// 127.0.0.1), or why the handshake failed.
pub async fn served_certificate(
    addr: SocketAddr,
    config: &Arc<rustls::ClientConfig>,
) -> Result<Vec<u8>, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tls = tokio_rustls::TlsConnector::from(config.clone())
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (_, session) = tls.get_ref();
    Ok(session.peer_certificates().unwrap()[0].to_vec())
}

/// One request over a new TLS connection to `addr` (server name 127.0.0.1), in HTTP/2 when
/// ALPN chose `h2`, else HTTP/1.1. `Err` when the handshake or the exchange fails.
pub async fn tls_send(
    addr: SocketAddr,
    config: &Arc<rustls::ClientConfig>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<TlsAnswer, String> {
    let exchange = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let tls = tokio_rustls::TlsConnector::from(config.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let (_, session) = tls.get_ref();
        let alpn = session.alpn_protocol().map(<[u8]>::to_vec);
        let server_cert = session.peer_certificates().unwrap()[0].to_vec();
        let h2 = alpn.as_deref() == Some(b"h2");
        let mut b = Request::builder().method(method);
        b = if h2 {
            b.uri(format!("https://{addr}{path}"))
        } else {
            b.uri(path).header("host", addr.to_string())
        };
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b.body(Full::new(Bytes::new())).unwrap();
        let io = TokioIo::new(tls);
        let resp = if h2 {
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            sender.send_request(req).await
        } else {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            sender.send_request(req).await
        }
        .map_err(|e| format!("exchange: {e}"))?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok(TlsAnswer {
            answer: Answer {
                status,
                headers,
                body,
            },
            alpn,
            server_cert,
        })
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| "no answer within 10 s".to_owned())?
}
