//! `keygate demo`: see keygate work with nothing else running. It starts a built-in echo
//! upstream (answers with the method, path, query and headers it received, as JSON), mints a
//! sandbox key into a temporary snapshot, starts the proxy in front of the echo, and prints
//! ready-to-paste `curl` lines. Everything lives in a temporary directory removed on exit.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;

use bytes::Bytes;
use http::{header, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::keys::{self, CreateOptions};

/// Why the demo could not start.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("demo: {0}")]
    Io(#[from] std::io::Error),
    #[error("demo: {0}")]
    Keys(#[from] keys::KeysError),
    #[error("demo: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("demo: {0}")]
    App(#[from] crate::app::AppError),
}

/// Serve the echo upstream on `listener` forever: a JSON mirror of each request.
pub async fn echo_upstream(listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
            Ok::<_, Infallible>(echo(&req))
        });
        tokio::spawn(async move {
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn echo(req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let mut headers = serde_json::Map::new();
    for name in req.headers().keys() {
        let values: Vec<String> = req
            .headers()
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect();
        let value = match values.len() {
            1 => serde_json::Value::String(values.into_iter().next().unwrap_or_default()),
            _ => serde_json::Value::from(values),
        };
        headers.insert(name.as_str().to_owned(), value);
    }
    let body = serde_json::json!({
        "echo": "keygate demo upstream",
        "method": req.method().as_str(),
        "path": req.uri().path(),
        "query": req.uri().query(),
        "headers": headers,
    });
    let mut resp = Response::new(Full::new(Bytes::from(
        serde_json::to_string_pretty(&body).unwrap_or_default() + "\n",
    )));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Run the demo until `shutdown` resolves.
pub async fn run(listen: SocketAddr, shutdown: impl Future<Output = ()>) -> Result<(), DemoError> {
    // A new directory of a random name, only ours (0700), never one found there: another user
    // of the machine who made it first could have planted a snapshot holding their own key.
    let path = std::env::temp_dir().join(format!("keygate-demo-{:016x}", rand::random::<u64>()));
    std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700).create(&path)?;
    let dir = TempDir(path);
    let snapshot = dir.0.join("keys.json");
    let now = time::OffsetDateTime::now_utc();
    let created = keys::create(
        &snapshot,
        &CreateOptions {
            partner: "partner_demo".into(),
            environment: "sandbox".into(),
            scopes: vec!["analyses:read".into()],
            prefix: Some("sk_sandbox_".into()),
            name: Some("demo".into()),
            org: Some("org_demo".into()),
            expires_at: None,
            rate_limit_per_minute: None,
            pepper: None,
        },
        now,
    )?;

    let upstream = TcpListener::bind("127.0.0.1:0").await?;
    let upstream_addr = upstream.local_addr()?;
    tokio::spawn(echo_upstream(upstream));

    let toml = format!(
        r#"
environment = "sandbox"

[[key_prefixes]]
prefix = "sk_sandbox_"
environment = "sandbox"
checksum = true

[[key_prefixes]]
prefix = "sk_live_"
environment = "live"
checksum = true

[snapshot]
path = {snapshot:?}

[proxy]
listen = "{listen}"
upstream = "http://{upstream_addr}"

[[routes.rule]]
route = "POST /v1/analyses"
scopes = ["analyses:write"]

[[routes.rule]]
route = "GET /v1/analyses/**"
scopes = ["analyses:read"]

[log]
level = "warn"
"#,
        snapshot = snapshot.display().to_string(),
    );
    let settings = crate::config::from_toml(&toml)?;
    let app = crate::app::start(settings).await?;
    let addr = app.proxy_addr.expect("the demo configures the proxy");
    let key = &created.secret;
    let live_key = crate::credential::mint("sk_live_");
    println!(
        r#"keygate demo: proxy on http://{addr} in front of an echo upstream on http://{upstream_addr}
snapshot: {snapshot} (partner_demo, sandbox key {id} with scope analyses:read)

Allowed: the echo shows the identity headers keygate added (x-partner-id, x-key-id, x-scopes, …)
and no Authorization header:
  curl -s http://{addr}/v1/analyses/42 -H 'Authorization: Bearer {key}'

Denied, no key (401 authentication_required):
  curl -si http://{addr}/v1/analyses/42
Denied, missing scope (403 scope_required):
  curl -si -X POST http://{addr}/v1/analyses -H 'X-API-Key: {key}'
Denied, a live key at a sandbox gate (403 key_environment_mismatch):
  curl -si http://{addr}/v1/analyses/42 -H 'X-API-Key: {live_key}'
Denied, an encoded '/' path trick (400 invalid_path):
  curl -si 'http://{addr}/v1/analyses/42%2F..%2F..%2Fadmin' -H 'X-API-Key: {key}'

Revoke the key while this runs and watch the next request fail with key_revoked
(from a source checkout, `cargo run -- keys revoke …` does the same):
  keygate keys revoke --snapshot {snapshot} {id}

Press Ctrl-C to stop."#,
        snapshot = snapshot.display(),
        id = created.id,
    );
    shutdown.await;
    app.shutdown().await;
    Ok(())
}
