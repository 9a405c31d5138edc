//! The shipped `deploy/nginx/keygate.conf`, run by a real nginx (from the distribution) in front
//! of a real upstream, asking a real keygate's `/authz`: the upstream receives keygate's
//! identity headers and no credential; clients receive keygate's own denials.
//! Needs `nginx` on the PATH (`.ci/run` installs it); it fails, rather than skips, without it.

mod support;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use support::*;

struct Nginx {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Start nginx with the shipped server block, its addresses pointed at this test's processes.
async fn start_nginx(api: SocketAddr, authz: SocketAddr) -> (Nginx, SocketAddr) {
    let shipped = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/nginx/keygate.conf"
    ))
    .expect("deploy/nginx/keygate.conf");
    let port = free_port();
    let server = shipped
        .replace("server 127.0.0.1:3000;", &format!("server {api};"))
        .replace("server 127.0.0.1:9192;", &format!("server {authz};"))
        .replace("listen 8080;", &format!("listen 127.0.0.1:{port};"));
    assert_ne!(
        server, shipped,
        "the shipped addresses changed: update this test"
    );
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    std::fs::write(dir.path().join("keygate.conf"), server).unwrap();
    std::fs::write(
        dir.path().join("nginx.conf"),
        format!(
            "daemon off;\nmaster_process off;\nerror_log {d}/error.log;\npid {d}/nginx.pid;\n\
             events {{ worker_connections 64; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
             include {d}/keygate.conf;\n}}\n"
        ),
    )
    .unwrap();
    let nginx = std::env::var("NGINX").unwrap_or_else(|_| {
        if std::path::Path::new("/usr/sbin/nginx").exists() {
            "/usr/sbin/nginx".into()
        } else {
            "nginx".into()
        }
    });
    let child = Command::new(&nginx)
        .args(["-p", &d.to_string(), "-c", &format!("{d}/nginx.conf")])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {nginx} ({e}): apt-get install -y nginx"));
    let n = Nginx { child, _dir: dir };
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let start = Instant::now();
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "nginx did not start listening"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (n, addr)
}

#[tokio::test]
async fn nginx_auth_request_with_the_shipped_config() {
    let upstream = Upstream::start().await;
    let snap = SnapshotDir::new();
    let (reader, solo) = (mint("sk_live_"), mint("sk_live_"));
    snap.write(
        &Doc::new(1)
            .partner("partner_acme", Some("org_1"), "active")
            .partner("partner_solo", None, "active")
            .key("key_reader", &reader, json!({}))
            .key("key_solo", &solo, json!({"partner_id": "partner_solo"})),
    );
    let extra = "[authz_http]\nlisten = \"127.0.0.1:0\"\ntrusted_proxies = [\"127.0.0.1/32\"]\n";
    let gate = Gate::start(&config_toml(&snap.path(), upstream.addr, extra)).await;
    let authz = gate.app.as_ref().unwrap().authz_http_addr.unwrap();
    let (_nginx, addr) = start_nginx(upstream.addr, authz).await;
    let url = |p: &str| format!("http://{addr}{p}");
    let c = client();

    // Allowed: identity in, credential and spoofs out.
    let a = get(
        &c,
        &url("/v1/analyses/1?q=2"),
        &[
            ("authorization", &format!("Bearer {reader}")),
            ("x-partner-id", "partner_evil"),
        ],
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", String::from_utf8_lossy(&a.body));
    let seen = upstream.last();
    assert_eq!(seen.target, "/v1/analyses/1?q=2");
    assert_eq!(seen.headers["x-partner-id"], "partner_acme");
    assert_eq!(seen.headers.get_all("x-partner-id").iter().count(), 1);
    assert_eq!(seen.headers["x-org-id"], "org_1");
    assert_eq!(seen.headers["x-key-id"], "key_reader");
    assert_eq!(seen.headers["x-scopes"], "analyses:read");
    assert!(seen.headers.get("authorization").is_none());
    assert_eq!(
        seen.headers["x-request-id"],
        a.header("x-request-id").unwrap()
    );

    // The credential goes only where the key was: an API's own Basic credentials next to an
    // X-API-Key pass, a second X-API-Key next to a Bearer key too.
    upstream.clear();
    let a = get(
        &c,
        &url("/v1/analyses/1"),
        &[
            ("x-api-key", &reader),
            ("authorization", "Basic dXNlcjpwdw=="),
        ],
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", String::from_utf8_lossy(&a.body));
    let seen = upstream.last();
    assert!(
        seen.headers.get("x-api-key").is_none(),
        "{:?}",
        seen.headers
    );
    assert_eq!(seen.headers["authorization"], "Basic dXNlcjpwdw==");
    upstream.clear();
    let a = get(
        &c,
        &url("/v1/analyses/1"),
        &[
            ("authorization", &format!("Bearer {reader}")),
            ("x-api-key", &reader),
        ],
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", String::from_utf8_lossy(&a.body));
    let seen = upstream.last();
    assert!(
        seen.headers.get("authorization").is_none(),
        "{:?}",
        seen.headers
    );
    assert!(
        seen.headers.get("x-api-key").is_none(),
        "{:?}",
        seen.headers
    );

    // A partner without an org: a client's x-org-id does not pass.
    upstream.clear();
    let a = get(
        &c,
        &url("/v1/analyses/1"),
        &[("x-api-key", &solo), ("x-org-id", "org_spoofed")],
    )
    .await;
    assert_eq!(a.status, 200);
    let seen = upstream.last();
    assert!(seen.headers.get("x-org-id").is_none(), "{:?}", seen.headers);
    assert!(seen.headers.get("x-api-key").is_none());

    // Denied: keygate's own answers, whatever the status, and nothing upstream.
    upstream.clear();
    let a = get(&c, &url("/v1/analyses/1"), &[]).await;
    assert_error(&a, 401, "authentication_required");
    assert_eq!(
        a.header("www-authenticate"),
        Some("Bearer realm=\"keygate\"")
    );
    let a = send(
        &c,
        "POST",
        &url("/v1/analyses"),
        &[("x-api-key", &reader)],
        "{}",
    )
    .await;
    assert_error(&a, 403, "scope_required");
    let a = get(&c, &url("/v1/analyses%2F1"), &[("x-api-key", &reader)]).await;
    assert_error(&a, 400, "invalid_path");
    let a = get(
        &c,
        &url("/v1/analyses/1"),
        &[("x-api-key", &mint("sk_live_"))],
    )
    .await;
    assert_error(&a, 401, "invalid_api_key");
    assert_eq!(upstream.count(), 0, "a denied request reached the upstream");
    // Each denial was decided and counted once: the second ask (error_page) was told the first
    // answer again, by its name.
    let counted =
        |code: &str| format!("keygate_requests_total{{front=\"authz_http\",code=\"{code}\"}}");
    for code in [
        "authentication_required",
        "scope_required",
        "invalid_path",
        "invalid_api_key",
    ] {
        assert_eq!(gate.metric(&counted(code)).await, Some(1.0), "{code}");
    }
    // A client cannot name a denial of its own for the check: nginx clears the header there.
    let a = get(
        &c,
        &url("/v1/analyses/1"),
        &[("x-keygate-retell", "made-up"), ("x-api-key", &reader)],
    )
    .await;
    assert_eq!(a.status, 200);
    upstream.clear();
    // nginx passes the client's path on as sent (`proxy_pass` without a URI, `$request_uri`):
    // one with segments to resolve is refused, since the API might resolve them otherwise
    // than keygate (`/v1/admin//../x` is `/v1/admin/x` to RFC 3986).
    for p in [
        "/v1/admin/../analyses/1",
        "/v1//analyses/1",
        "/v1/admin/%2e%2e/analyses/1",
        "/v1/admin//../analyses/1",
    ] {
        let a = get(&c, &url(p), &[("x-api-key", &reader)]).await;
        assert_error(&a, 400, "invalid_path");
    }
    assert_eq!(upstream.count(), 0, "a refused path reached the upstream");
    gate.stop().await;
}
