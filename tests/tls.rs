//! TLS end to end, with certificates made in the test: an HTTPS client (rustls + hyper, HTTP/1.1
//! and h2 by ALPN) → keygate (`app::start`) → a real HTTPS upstream that records what it got and
//! the SNI it was sent. mTLS on the proxy and on ext_authz (tonic client), certificates rotated
//! on disk (renames and a Kubernetes-style symlink swap) served without a restart, a broken
//! replacement that keeps the old certificate, and upstream TLS failures as 502 / 504.

mod support;

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use serde_json::json;
use support::*;

const H1: &[&[u8]] = &[b"http/1.1"];
const H2: &[&[u8]] = &[b"h2"];

/// Every log line of this test binary (keygate's warnings included), to check what is said
/// about bad files, and that no key material is.
fn logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf: Arc<Mutex<Vec<u8>>> = Arc::default();
        let sink = buf.clone();
        let _ = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(move || Sink(sink.clone()))
            .try_init();
        buf
    })
    .clone()
}

struct Sink(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn log_text() -> String {
    String::from_utf8_lossy(&logs().lock().unwrap()).into_owned()
}

fn snapshot(key: &str) -> SnapshotDir {
    let snap = SnapshotDir::new();
    snap.write(
        &Doc::new(1)
            .partner("partner_acme", Some("org_1"), "active")
            .key("key_a", key, json!({})),
    );
    snap
}

fn show(p: &Path) -> String {
    p.display().to_string()
}

/// keygate's proxy over TLS with `pki`'s server certificate, in front of `upstream`.
fn tls_proxy(snap: &SnapshotDir, upstream: SocketAddr, pki: &Pki, more: &str) -> String {
    config_toml_proxy(
        &snap.path(),
        upstream,
        &format!(
            "tls_cert = {:?}\ntls_key = {:?}\n{more}",
            show(&pki.server_cert),
            show(&pki.server_key)
        ),
        "",
    )
}

/// Make the configured upstream an `https://` one.
fn https(toml: String) -> String {
    toml.replace("upstream = \"http://", "upstream = \"https://")
}

/// Make the configured upstream `https://localhost:<its port>`, the name its certificate has.
fn https_localhost(toml: String, upstream: SocketAddr) -> String {
    toml.replace(
        &format!("upstream = \"http://{upstream}\""),
        &format!("upstream = \"https://localhost:{}\"", upstream.port()),
    )
}

#[tokio::test]
async fn https_client_to_keygate_to_an_https_upstream() {
    logs();
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let upstream =
        Upstream::start_tls(pki.issue(&["api.upstream.test"], false).server_config(None)).await;
    let key = mint("sk_live_");
    let snap = snapshot(&key);
    let gate = Gate::start(&https(tls_proxy(
        &snap,
        upstream.addr,
        &pki,
        &format!(
            "upstream_ca_file = {:?}\nupstream_server_name = \"api.upstream.test\"\n",
            show(&pki.ca)
        ),
    )))
    .await;
    let served = std::fs::read(&pki.server_cert).unwrap();
    let served = rustls::pki_types::CertificateDer::pem_slice_iter(&served)
        .next()
        .unwrap()
        .unwrap()
        .to_vec();

    for (alpn, want) in [(H1, &b"http/1.1"[..]), (H2, &b"h2"[..])] {
        let client = pki.client_config(alpn, None);
        upstream.clear();
        // Allowed: reaches the upstream with identity headers, without the credential.
        let a = tls_send(
            gate.addr,
            &client,
            "GET",
            "/v1/analyses/1?x=1",
            &[
                ("authorization", &format!("Bearer {key}")),
                ("x-partner-id", "spoofed"),
            ],
        )
        .await
        .unwrap();
        assert_eq!(a.alpn.as_deref(), Some(want));
        assert_eq!(
            a.server_cert, served,
            "keygate serves its configured certificate"
        );
        assert_eq!(a.answer.status, 200, "{:?}", a.answer);
        assert_eq!(a.answer.header("x-upstream"), Some("yes"));
        let seen = upstream.last();
        assert_eq!(seen.target, "/v1/analyses/1?x=1");
        let h = |n: &str| seen.headers.get(n).map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(h("x-partner-id").as_deref(), Some("partner_acme"));
        assert_eq!(h("x-org-id").as_deref(), Some("org_1"));
        assert_eq!(h("x-key-id").as_deref(), Some("key_a"));
        assert_eq!(h("x-scopes").as_deref(), Some("analyses:read"));
        assert_eq!(h("x-forwarded-proto").as_deref(), Some("https"));
        assert!(
            h("authorization").is_none(),
            "the credential is not forwarded"
        );
        assert_eq!(seen.headers.get_all("x-partner-id").iter().count(), 1);

        // Denied: the contract's JSON, over TLS; the upstream sees nothing.
        let before = upstream.count();
        let a = tls_send(gate.addr, &client, "GET", "/v1/analyses/1", &[])
            .await
            .unwrap();
        assert_error(&a.answer, 401, "authentication_required");
        let wrong = mint("sk_live_");
        let a = tls_send(
            gate.addr,
            &client,
            "GET",
            "/v1/analyses/1",
            &[("x-api-key", &wrong)],
        )
        .await
        .unwrap();
        assert_error(&a.answer, 401, "invalid_api_key");
        assert_eq!(upstream.count(), before);
    }
    // Every upstream connection was TLS with the configured name as SNI.
    let sni = upstream.sni();
    assert!(!sni.is_empty());
    assert!(
        sni.iter()
            .all(|n| n.as_deref() == Some("api.upstream.test")),
        "{sni:?}"
    );
    gate.stop().await;
}

#[tokio::test]
async fn the_upstream_host_name_is_the_sni_and_connections_are_reused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let upstream = Upstream::start_tls(pki.issue(&["localhost"], false).server_config(None)).await;
    let key = mint("sk_live_");
    let snap = snapshot(&key);
    // Plain HTTP in front, one proxy thread: one pool, so reuse shows.
    let toml = config_toml_proxy(
        &snap.path(),
        upstream.addr,
        &format!("upstream_ca_file = {:?}\n", show(&pki.ca)),
        "[runtime]\nflavor = \"current_thread\"\n",
    );
    let toml = https_localhost(toml, upstream.addr);
    let gate = Gate::start(&toml).await;
    let c = client();
    for _ in 0..3 {
        let a = get(&c, &gate.url("/v1/analyses/1"), &[("x-api-key", &key)]).await;
        assert_eq!(a.status, 200, "{a:?}");
    }
    assert_eq!(upstream.count(), 3);
    assert_eq!(
        upstream.sni(),
        [Some("localhost".to_owned())],
        "one TLS connection, reused"
    );
    gate.stop().await;
}

/// A virtual-hosted https upstream routes by `Host`: with `upstream_host = "upstream"` it gets
/// its own authority whatever the client addressed (HTTP/1.1 `Host`, an absolute-form target,
/// HTTP/2's `:authority`, HTTP/1.0 with none), exactly once, and the name its certificate
/// carries when it is reached by address; the client's host goes on in `X-Forwarded-Host`. By
/// default the client's `Host` is kept.
#[tokio::test]
async fn upstream_host_sends_the_upstreams_own_authority() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let upstream = Upstream::start_tls(pki.issue(&["localhost"], false).server_config(None)).await;
    let key = mint("sk_live_");
    let snap = snapshot(&key);
    let toml = |host: &str| {
        let more = format!("upstream_ca_file = {:?}\n{host}", show(&pki.ca));
        https_localhost(
            config_toml_proxy(&snap.path(), upstream.addr, &more, ""),
            upstream.addr,
        )
    };
    let own = format!("localhost:{}", upstream.addr.port());
    let seen_host = |seen: &support::Seen| {
        let hosts: Vec<_> = seen.headers.get_all("host").iter().collect();
        assert_eq!(hosts.len(), 1, "{:?}", seen.headers);
        let forwarded = seen
            .headers
            .get("x-forwarded-host")
            .map(|v| v.to_str().unwrap().to_owned());
        (hosts[0].to_str().unwrap().to_owned(), forwarded)
    };

    let gate = Gate::start(&toml("upstream_host = \"upstream\"\n")).await;
    let client_host = gate.addr.to_string();
    for c in [client(), h2_client()] {
        let a = get(&c, &gate.url("/v1/analyses/1"), &[("x-api-key", &key)]).await;
        assert_eq!(a.status, 200, "{a:?}");
        assert_eq!(
            seen_host(&upstream.last()),
            (own.clone(), Some(client_host.clone()))
        );
    }
    let spoofed = format!(
        "GET http://evil.example/v1/analyses/1 HTTP/1.1\r\nHost: evil.example\r\nX-Api-Key: {key}\r\n\r\n"
    );
    assert_eq!(raw(gate.addr, spoofed.as_bytes()).await.status, 200);
    assert_eq!(
        seen_host(&upstream.last()),
        (own.clone(), Some("evil.example".into()))
    );
    let no_host = format!("GET /v1/analyses/1 HTTP/1.0\r\nX-Api-Key: {key}\r\n\r\n");
    assert_eq!(raw(gate.addr, no_host.as_bytes()).await.status, 200);
    assert_eq!(seen_host(&upstream.last()), (own.clone(), None));
    gate.stop().await;

    // Reached by address, named by `upstream_server_name`: that name, with the port.
    let by_address = toml("upstream_host = \"upstream\"\nupstream_server_name = \"localhost\"\n")
        .replace("https://localhost:", "https://127.0.0.1:");
    let gate = Gate::start(&by_address).await;
    let a = get(
        &client(),
        &gate.url("/v1/analyses/1"),
        &[("x-api-key", &key)],
    )
    .await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(seen_host(&upstream.last()).0, own);
    gate.stop().await;

    let gate = Gate::start(&toml("")).await;
    let a = get(
        &client(),
        &gate.url("/v1/analyses/1"),
        &[("x-api-key", &key)],
    )
    .await;
    assert_eq!(a.status, 200, "{a:?}");
    let client_host = gate.addr.to_string();
    assert_eq!(
        seen_host(&upstream.last()),
        (client_host.clone(), Some(client_host))
    );
    gate.stop().await;
}

#[tokio::test]
async fn upstream_client_certificate_for_an_upstream_that_requires_one() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let upstream =
        Upstream::start_tls(pki.issue(&["127.0.0.1"], false).server_config(Some(&pki))).await;
    let key = mint("sk_live_");
    let snap = snapshot(&key);
    let toml = |identity: bool| {
        let mut more = format!("upstream_ca_file = {:?}\n", show(&pki.ca));
        if identity {
            more.push_str(&format!(
                "upstream_client_cert = {:?}\nupstream_client_key = {:?}\n",
                show(&pki.client_cert),
                show(&pki.client_key)
            ));
        }
        https(config_toml_proxy(&snap.path(), upstream.addr, &more, ""))
    };
    let with = Gate::start(&toml(true)).await;
    let a = get(
        &client(),
        &with.url("/v1/analyses/1"),
        &[("x-api-key", &key)],
    )
    .await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(upstream.count(), 1);
    with.stop().await;

    let without = Gate::start(&toml(false)).await;
    let a = get(
        &client(),
        &without.url("/v1/analyses/1"),
        &[("x-api-key", &key)],
    )
    .await;
    assert_error(&a, 502, "upstream_unavailable");
    assert_eq!(upstream.count(), 1, "nothing reached the upstream");
    without.stop().await;
}

#[tokio::test]
async fn mtls_on_the_proxy_refuses_clients_without_a_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let other = tempfile::tempdir().unwrap();
    let stranger = Pki::new(other.path());
    let upstream = Upstream::start().await;
    let key = mint("sk_live_");
    let snap = snapshot(&key);
    let gate = Gate::start(&tls_proxy(
        &snap,
        upstream.addr,
        &pki,
        &format!("client_ca = {:?}\n", show(&pki.ca)),
    ))
    .await;
    let auth = [("x-api-key", key.as_str())];

    for alpn in [H1, H2] {
        let anonymous = pki.client_config(alpn, None);
        let refused = tls_send(gate.addr, &anonymous, "GET", "/v1/analyses/1", &auth).await;
        assert!(refused.is_err(), "no client certificate: {refused:?}");

        // A certificate from another CA is refused too.
        let foreign = pki.client_config(alpn, Some((&stranger.client_cert, &stranger.client_key)));
        let refused = tls_send(gate.addr, &foreign, "GET", "/v1/analyses/1", &auth).await;
        assert!(
            refused.is_err(),
            "a foreign client certificate: {refused:?}"
        );
        assert_eq!(upstream.count(), 0);

        let known = pki.client_config(alpn, Some((&pki.client_cert, &pki.client_key)));
        let a = tls_send(gate.addr, &known, "GET", "/v1/analyses/1", &auth)
            .await
            .unwrap();
        assert_eq!(a.answer.status, 200, "{:?}", a.answer);
        assert_eq!(upstream.count(), 1);
        upstream.clear();
    }
    gate.stop().await;
}

/// The TLS proxy on each runtime layout (the tests above run the default, thread_per_core).
#[tokio::test]
async fn tls_termination_on_every_runtime_flavor() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let upstream = Upstream::start().await;
    let key = mint("sk_live_");
    let snap = snapshot(&key);
    for flavor in ["multi_thread", "current_thread", "thread_per_core"] {
        let toml = config_toml_proxy(
            &snap.path(),
            upstream.addr,
            &format!(
                "tls_cert = {:?}\ntls_key = {:?}\n",
                show(&pki.server_cert),
                show(&pki.server_key)
            ),
            &format!("[runtime]\nflavor = {flavor:?}\nworker_threads = 2\n"),
        );
        let gate = Gate::start(&toml).await;
        for alpn in [H1, H2] {
            let c = pki.client_config(alpn, None);
            for _ in 0..4 {
                let a = tls_send(
                    gate.addr,
                    &c,
                    "GET",
                    "/v1/analyses/1",
                    &[("x-api-key", &key)],
                )
                .await
                .unwrap();
                assert_eq!(a.answer.status, 200, "{flavor}: {:?}", a.answer);
            }
        }
        gate.stop().await;
    }
}

/// Wait until a new connection to `addr` is served `want`.
async fn wait_for_certificate(addr: SocketAddr, client: &Arc<rustls::ClientConfig>, want: &[u8]) {
    let start = Instant::now();
    loop {
        if let Ok(cert) = served_certificate(addr, client).await {
            if cert == want {
                return;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the new certificate was not served within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_rotated_certificate_is_served_without_restart() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let upstream = Upstream::start().await;
    let key = mint("sk_live_");
    let snap = snapshot(&key);
    let tls = tempfile::tempdir().unwrap();
    let (cert, key_file) = (tls.path().join("tls.crt"), tls.path().join("tls.key"));
    let first = pki.issue_until(&["127.0.0.1"], (2031, 5, 17));
    first.write_to(&cert, &key_file);
    let gate = Gate::start(&config_toml_proxy(
        &snap.path(),
        upstream.addr,
        &format!(
            "tls_cert = {:?}\ntls_key = {:?}\n",
            show(&cert),
            show(&key_file)
        ),
        "",
    ))
    .await;
    let client = pki.client_config(H1, None);
    assert_eq!(
        served_certificate(gate.addr, &client).await.unwrap(),
        first.cert_der
    );
    // /metrics says when the certificate in force expires (2031-05-17T00:00:00Z).
    let expiry = "keygate_tls_certificate_expiration_timestamp_seconds{listener=\"proxy\"}";
    assert_eq!(gate.metric(expiry).await, Some(1_936_742_400.0));

    // An open connection keeps working across the rotation; new ones get the new certificate.
    let second = pki.issue_until(&["127.0.0.1"], (2032, 1, 9));
    second.write_to(&cert, &key_file);
    wait_for_certificate(gate.addr, &client, &second.cert_der).await;
    let a = tls_send(
        gate.addr,
        &client,
        "GET",
        "/v1/analyses/1",
        &[("x-api-key", &key)],
    )
    .await
    .unwrap();
    assert_eq!(a.answer.status, 200);
    assert_eq!(a.server_cert, second.cert_der);
    // …and the metric follows the rotation (2032-01-09T00:00:00Z).
    assert_eq!(gate.metric(expiry).await, Some(1_957_219_200.0));
    gate.stop().await;
}

/// A Kubernetes Secret volume: `tls.crt -> ..data/tls.crt`, `..data -> ..<timestamp>/`; an
/// update writes a new timestamped directory and renames a new `..data` link over the old one.
struct SecretVolume {
    dir: tempfile::TempDir,
    n: usize,
}

impl SecretVolume {
    fn new(first: &Issued) -> Self {
        let mut v = SecretVolume {
            dir: tempfile::tempdir().unwrap(),
            n: 0,
        };
        v.update(first);
        for name in ["tls.crt", "tls.key"] {
            std::os::unix::fs::symlink(format!("..data/{name}"), v.dir.path().join(name)).unwrap();
        }
        v
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn update(&mut self, issued: &Issued) {
        self.n += 1;
        let stamp = format!("..2026_11_22_06_00_{:02}.{}", self.n, self.n);
        let data = self.dir.path().join(&stamp);
        std::fs::create_dir(&data).unwrap();
        std::fs::write(data.join("tls.crt"), &issued.cert_pem).unwrap();
        std::fs::write(data.join("tls.key"), &issued.key_pem).unwrap();
        let tmp = self.dir.path().join("..data_tmp");
        std::os::unix::fs::symlink(&stamp, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.path().join("..data")).unwrap();
    }
}

#[tokio::test]
async fn a_kubernetes_secret_symlink_swap_is_followed() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let upstream = Upstream::start().await;
    let key = mint("sk_live_");
    let snap = snapshot(&key);
    let first = pki.issue(&["127.0.0.1"], false);
    let mut volume = SecretVolume::new(&first);
    let toml = |section: &str| {
        config_toml(
            &snap.path(),
            upstream.addr,
            &format!(
                "[{section}]\nlisten = \"127.0.0.1:0\"\ntls_cert = {:?}\ntls_key = {:?}\n",
                show(&volume.path("tls.crt")),
                show(&volume.path("tls.key"))
            ),
        )
    };
    // The proxy and ext_authz listeners both follow the same volume.
    let gate = Gate::start(&toml("ext_authz")).await;
    let ext = gate.app().ext_authz_addr.unwrap();
    let proxy = Gate::start(&config_toml_proxy(
        &snap.path(),
        upstream.addr,
        &format!(
            "tls_cert = {:?}\ntls_key = {:?}\n",
            show(&volume.path("tls.crt")),
            show(&volume.path("tls.key"))
        ),
        "",
    ))
    .await;
    let h1 = pki.client_config(H1, None);
    let h2 = pki.client_config(H2, None);
    assert_eq!(
        served_certificate(proxy.addr, &h1).await.unwrap(),
        first.cert_der
    );
    assert_eq!(served_certificate(ext, &h2).await.unwrap(), first.cert_der);

    let second = pki.issue(&["127.0.0.1"], false);
    volume.update(&second);
    wait_for_certificate(proxy.addr, &h1, &second.cert_der).await;
    wait_for_certificate(ext, &h2, &second.cert_der).await;
    proxy.stop().await;
    gate.stop().await;
}

#[tokio::test]
async fn a_broken_replacement_keeps_the_certificate_in_force() {
    let logs = logs();
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let upstream = Upstream::start().await;
    let key = mint("sk_live_");
    let snap = snapshot(&key);
    let tls = tempfile::tempdir().unwrap();
    let (cert, key_file) = (tls.path().join("tls.crt"), tls.path().join("tls.key"));
    let first = pki.issue(&["127.0.0.1"], false);
    first.write_to(&cert, &key_file);
    let gate = Gate::start(&config_toml_proxy(
        &snap.path(),
        upstream.addr,
        &format!(
            "tls_cert = {:?}\ntls_key = {:?}\n",
            show(&cert),
            show(&key_file)
        ),
        "",
    ))
    .await;
    let client = pki.client_config(H1, None);
    let warnings_about = |file: &Path| {
        let text = log_text();
        text.lines()
            .filter(|l| l.contains("WARN") && l.contains(&show(file)))
            .count()
    };

    // The new certificate is written, its key not yet: the pair does not match.
    let second = pki.issue(&["127.0.0.1"], false);
    std::fs::write(&cert, &second.cert_pem).unwrap();
    let warned = {
        let start = Instant::now();
        loop {
            if warnings_about(&key_file) > 0 {
                break true;
            }
            if start.elapsed() > Duration::from_secs(10) {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    assert!(warned, "a warning names the key file:\n{}", log_text());
    assert_eq!(
        served_certificate(gate.addr, &client).await.unwrap(),
        first.cert_der
    );
    let a = tls_send(
        gate.addr,
        &client,
        "GET",
        "/v1/analyses/1",
        &[("x-api-key", &key)],
    )
    .await
    .unwrap();
    assert_eq!(a.answer.status, 200, "still serving");

    // The key follows: the new pair is in force.
    std::fs::write(&key_file, &second.key_pem).unwrap();
    wait_for_certificate(gate.addr, &client, &second.cert_der).await;

    // A certificate file that is not PEM: warned about by name, the second pair stays. (The
    // key's warning above names the certificate too: a new warning is waited for.)
    let before = warnings_about(&cert);
    std::fs::File::create(&cert)
        .unwrap()
        .write_all(b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n")
        .unwrap();
    let start = Instant::now();
    while warnings_about(&cert) == before {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no warning:\n{}",
            log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        served_certificate(gate.addr, &client).await.unwrap(),
        second.cert_der
    );
    // Both refusals are counted, for an alert that does not read logs.
    assert_eq!(
        gate.metric("keygate_tls_reload_failures_total{listener=\"proxy\"}")
            .await,
        Some(2.0)
    );

    // An expired pair is put in force (rustls serves it), with a warning that clients will
    // refuse it.
    let expired = pki.issue_until(&["127.0.0.1"], (2020, 1, 1));
    expired.write_to(&cert, &key_file);
    let start = Instant::now();
    while !log_text().contains("the certificate served has expired") {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no warning of the expired certificate:\n{}",
            log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Nothing logged anywhere in this binary holds key material.
    let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    for issued in [&first, &second, &expired] {
        let body: String = issued
            .key_pem
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect();
        for chunk in body.as_bytes().chunks(12) {
            let chunk = std::str::from_utf8(chunk).unwrap();
            assert!(!text.contains(chunk), "key material in the logs");
        }
    }
    assert!(!text.contains("PRIVATE KEY"));
    gate.stop().await;
}

#[tokio::test]
async fn an_untrusted_upstream_certificate_is_502_and_a_silent_one_504() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let other = tempfile::tempdir().unwrap();
    let stranger = Pki::new(other.path());
    let key = mint("sk_live_");
    let snap = snapshot(&key);

    // Signed by a CA keygate does not trust.
    let upstream =
        Upstream::start_tls(stranger.issue(&["127.0.0.1"], false).server_config(None)).await;
    let gate = Gate::start(&https(config_toml_proxy(
        &snap.path(),
        upstream.addr,
        &format!("upstream_ca_file = {:?}\n", show(&pki.ca)),
        "",
    )))
    .await;
    let a = get(
        &client(),
        &gate.url("/v1/analyses/1"),
        &[("x-api-key", &key)],
    )
    .await;
    assert_error(&a, 502, "upstream_unavailable");
    assert_eq!(upstream.count(), 0);
    gate.stop().await;

    // Trusted, but for another name.
    let upstream =
        Upstream::start_tls(pki.issue(&["elsewhere.test"], false).server_config(None)).await;
    let gate = Gate::start(&https(config_toml_proxy(
        &snap.path(),
        upstream.addr,
        &format!("upstream_ca_file = {:?}\n", show(&pki.ca)),
        "",
    )))
    .await;
    let a = get(
        &client(),
        &gate.url("/v1/analyses/1"),
        &[("x-api-key", &key)],
    )
    .await;
    assert_error(&a, 502, "upstream_unavailable");
    assert_eq!(upstream.count(), 0);
    gate.stop().await;

    // Accepts TCP, never answers the handshake: 504 within connect_timeout (1 s in the test
    // configuration), not upstream_timeout (2 s).
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            open.push(s);
        }
    });
    let gate = Gate::start(&https(config_toml_proxy(
        &snap.path(),
        silent_addr,
        &format!("upstream_ca_file = {:?}\n", show(&pki.ca)),
        "",
    )))
    .await;
    let start = Instant::now();
    let a = get(
        &client(),
        &gate.url("/v1/analyses/1"),
        &[("x-api-key", &key)],
    )
    .await;
    assert_error(&a, 504, "upstream_timeout");
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(1900),
        "{took:?}"
    );
    held.abort();
    gate.stop().await;
}

mod ext_authz_tls {
    use super::*;
    use envoy_types::ext_authz::v3::pb::CheckRequest;
    use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
    use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
    use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
    use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

    fn check(key: &str) -> CheckRequest {
        CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(Request {
                    http: Some(HttpRequest {
                        method: "GET".into(),
                        path: "/v1/analyses/1".into(),
                        host: "api.example.com".into(),
                        headers: [("x-api-key".to_owned(), key.to_owned())].into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        }
    }

    async fn channel(addr: SocketAddr, pki: &Pki, identity: bool) -> Result<Channel, String> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(std::fs::read(&pki.ca).unwrap()))
            .domain_name("127.0.0.1");
        if identity {
            tls = tls.identity(Identity::from_pem(
                std::fs::read(&pki.client_cert).unwrap(),
                std::fs::read(&pki.client_key).unwrap(),
            ));
        }
        Channel::from_shared(format!("https://{addr}"))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect_timeout(Duration::from_secs(2))
            .connect()
            .await
            .map_err(|e| format!("{e:?}"))
    }

    #[tokio::test]
    async fn ext_authz_over_tls_with_client_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path());
        let upstream = Upstream::start().await;
        let key = mint("sk_live_");
        let snap = snapshot(&key);
        let gate = Gate::start(&config_toml(
            &snap.path(),
            upstream.addr,
            &format!(
                "[ext_authz]\nlisten = \"127.0.0.1:0\"\ntls_cert = {:?}\ntls_key = {:?}\nclient_ca = {:?}\n",
                show(&pki.server_cert),
                show(&pki.server_key),
                show(&pki.ca)
            ),
        ))
        .await;
        let addr = gate.app().ext_authz_addr.unwrap();

        let mut c = AuthorizationClient::new(channel(addr, &pki, true).await.unwrap());
        let r = c.check(check(&key)).await.unwrap().into_inner();
        assert_eq!(r.status.unwrap().code, 0, "allowed over mTLS");
        let r = c
            .check(check(&mint("sk_live_")))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            r.status.unwrap().code,
            16,
            "an unknown key: UNAUTHENTICATED"
        );

        // Without a client certificate: no Check gets through.
        let refused = match channel(addr, &pki, false).await {
            Err(_) => true,
            Ok(ch) => AuthorizationClient::new(ch)
                .check(check(&key))
                .await
                .is_err(),
        };
        assert!(refused, "a client without a certificate was answered");

        // Plain h2c to the TLS port gets nothing either.
        let plain = match Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(2))
            .connect()
            .await
        {
            Err(_) => true,
            Ok(ch) => AuthorizationClient::new(ch)
                .check(check(&key))
                .await
                .is_err(),
        };
        assert!(plain, "h2c was answered on the TLS port");

        // /metrics names this listener's certificate expiry (rcgen's default notAfter,
        // 4096-01-01), and no other listener's: the proxy here is plain HTTP.
        let expiry = |l: &str| {
            format!("keygate_tls_certificate_expiration_timestamp_seconds{{listener=\"{l}\"}}")
        };
        assert_eq!(
            gate.metric(&expiry("ext_authz")).await,
            Some(67_090_118_400.0)
        );
        assert_eq!(gate.metric(&expiry("proxy")).await, None);
        gate.stop().await;
    }
}

/// A short-lived client certificate for an mTLS upstream is renewed in place (cert-manager,
/// a mesh): keygate's next connection to the upstream presents the new one, without restart.
#[tokio::test]
async fn a_renewed_upstream_client_certificate_is_used_without_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (trusted, untrusted) = (dir.path().join("trusted"), dir.path().join("other"));
    std::fs::create_dir_all(&trusted).unwrap();
    std::fs::create_dir_all(&untrusted).unwrap();
    let pki = Pki::new(&trusted);
    let other = Pki::new(&untrusted);
    let upstream =
        Upstream::start_tls(pki.issue(&["127.0.0.1"], false).server_config(Some(&pki))).await;
    let key = mint("sk_live_");
    let snap = snapshot(&key);
    // At first keygate holds a client certificate from a CA the upstream does not trust.
    let (cert, client_key) = (
        dir.path().join("client.pem"),
        dir.path().join("client-key.pem"),
    );
    other.issue(&["keygate"], true).write_to(&cert, &client_key);
    let more = format!(
        "upstream_ca_file = {:?}\nupstream_client_cert = {:?}\nupstream_client_key = {:?}\n",
        show(&pki.ca),
        show(&cert),
        show(&client_key)
    );
    let gate = Gate::start(&https(config_toml_proxy(
        &snap.path(),
        upstream.addr,
        &more,
        "",
    )))
    .await;
    let a = get(
        &client(),
        &gate.url("/v1/analyses/1"),
        &[("x-api-key", &key)],
    )
    .await;
    assert_error(&a, 502, "upstream_unavailable");

    // The renewal: a certificate the upstream trusts, written over the old files.
    pki.issue(&["keygate"], true).write_to(&cert, &client_key);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let a = get(
            &client(),
            &gate.url("/v1/analyses/1"),
            &[("x-api-key", &key)],
        )
        .await;
        if a.status == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the renewed client certificate was not used within 5 s: {a:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(upstream.count(), 1);
    gate.stop().await;
}

/// The protocol ALPN agreed on is the one spoken: an HTTP/2 preface on a connection that
/// negotiated http/1.1 is not served as HTTP/2, nor an HTTP/1.1 request on an h2 one.
#[tokio::test]
async fn the_protocol_is_the_one_alpn_chose() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let upstream = Upstream::start().await;
    let key = mint("sk_live_");
    let snap = snapshot(&key);
    let gate = Gate::start(&tls_proxy(&snap, upstream.addr, &pki, "")).await;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();

    // Negotiates http/1.1, then speaks HTTP/2.
    let tcp = tokio::net::TcpStream::connect(gate.addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(pki.client_config(H1, None))
        .connect(name.clone(), tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let answered = async {
        let (mut client, conn) = h2::client::handshake(tls)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = http::Request::get("https://127.0.0.1/v1/analyses/1")
            .header("x-api-key", &key)
            .body(())
            .unwrap();
        let (resp, _) = client.send_request(req, true).map_err(|e| e.to_string())?;
        resp.await.map(|r| r.status()).map_err(|e| e.to_string())
    };
    let got = tokio::time::timeout(Duration::from_secs(5), answered)
        .await
        .expect("no answer and no close within 5 s");
    assert!(
        got.is_err(),
        "HTTP/2 was served on an http/1.1 connection: {got:?}"
    );

    // Negotiates h2, then sends an HTTP/1.1 request: no HTTP/1.1 answer.
    let tcp = tokio::net::TcpStream::connect(gate.addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(pki.client_config(H2, None))
        .connect(name, tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let req = format!("GET /v1/analyses/1 HTTP/1.1\r\nHost: a\r\nX-API-Key: {key}\r\n\r\n");
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf))
        .await
        .expect("no answer and no close within 5 s")
        .unwrap_or(0);
    assert!(
        !String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1"),
        "HTTP/1.1 was served on an h2 connection"
    );
    assert_eq!(upstream.count(), 0);
    gate.stop().await;
}
