//! The `http` snapshot source against a test control plane (tests/support/control_plane.rs):
//! first load, ETag/304, revocation, every way a control plane fails (keygate keeps the last
//! good snapshot each time and recovers on its own), bearer token, https with a custom CA, the
//! cache at start-up, and `max_staleness`.

mod support;

use std::time::{Duration, Instant, SystemTime};

use serde_json::json;
use support::control_plane::{Behaviour, ControlPlane};
use support::*;

fn doc(revision: u64, key: &str, status: &str) -> String {
    Doc::new(revision)
        .partner("partner_acme", Some("org_1"), "active")
        .key("key_a", key, json!({ "status": status }))
        .to_json()
}

fn source(cp_url: &str, more: &str) -> String {
    format!(
        "source = \"http\"\nurl = \"{cp_url}\"\npoll_interval = \"100ms\"\nbackoff_max = \"200ms\"\nconnect_timeout = \"300ms\"\nread_timeout = \"400ms\"\n{more}\n"
    )
}

async fn status_of(gate: &Gate, key: &str) -> Answer {
    get(
        &client(),
        &gate.url("/v1/analyses/1"),
        &[("x-api-key", key)],
    )
    .await
}

#[tokio::test]
async fn first_load_then_304s_then_a_revocation_within_a_second() {
    let upstream = Upstream::start().await;
    let key = mint("sk_live_");
    let cp = ControlPlane::start(&doc(1, &key, "active")).await;
    let gate = Gate::start(&config_toml_source(
        &source(&cp.url(), ""),
        upstream.addr,
        "",
    ))
    .await;
    // The first poll happens before the listeners answer.
    assert_eq!(gate.revision(), Some(1));
    assert_eq!(status_of(&gate, &key).await.status, 200);

    // Unchanged: If-None-Match with the ETag, answered 304, which confirms freshness.
    let etag = cp.etag();
    assert!(
        eventually(Duration::from_secs(3), || cp
            .requests()
            .iter()
            .filter(|r| r.if_none_match.as_deref() == Some(&etag))
            .count()
            >= 3)
        .await
    );
    assert_eq!(
        gate.metric("keygate_snapshot_reloads_total{result=\"applied\"}")
            .await,
        Some(1.0),
        "a 304 must not rebuild the index"
    );
    assert!(
        gate.metric("keygate_snapshot_confirmations_total")
            .await
            .unwrap()
            >= 3.0
    );
    assert!(
        gate.metric("keygate_snapshot_unconfirmed_seconds")
            .await
            .unwrap()
            < 1.0
    );

    // Revoked at the control plane: refused within 1 s.
    cp.set_doc(&doc(2, &key, "revoked"));
    let t = Instant::now();
    loop {
        let a = status_of(&gate, &key).await;
        if a.status == 401 {
            assert_error(&a, 401, "key_revoked");
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "still allowed after 1 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(gate.revision(), Some(2));
    gate.stop().await;
}

#[tokio::test]
async fn every_control_plane_failure_keeps_the_last_good_snapshot_and_recovers() {
    let upstream = Upstream::start().await;
    let key = mint("sk_live_");
    let good = doc(5, &key, "active");
    let cp = ControlPlane::start(&good).await;
    let gate = Gate::start(&config_toml_source(
        &source(&cp.url(), "max_body_bytes = 65536"),
        upstream.addr,
        "",
    ))
    .await;
    assert_eq!(gate.revision(), Some(5));
    // A new document each time, so a failure cannot hide behind a 304.
    cp.set_doc(&doc(6, &key, "revoked"));
    for failure in [
        Behaviour::Status(500),
        Behaviour::Status(404),
        Behaviour::Status(401),
        Behaviour::Slow(Duration::from_millis(1500)),
        Behaviour::TruncatedJson,
        Behaviour::CutOff,
        Behaviour::Huge(1 << 20),
        Behaviour::Reset,
    ] {
        cp.set(failure.clone());
        let seen = cp.requests().len();
        assert!(
            eventually(Duration::from_secs(10), || cp.requests().len() >= seen + 2).await,
            "{failure:?}: keygate stopped asking"
        );
        assert_eq!(gate.revision(), Some(5), "{failure:?}");
        assert_eq!(status_of(&gate, &key).await.status, 200, "{failure:?}");
        let (ready, _) = gate.ready().await;
        assert_eq!(ready, 200, "{failure:?}: no max_staleness, so still ready");
    }
    let errors = gate
        .metric("keygate_snapshot_fetch_errors_total")
        .await
        .unwrap();
    let rejected = gate
        .metric("keygate_snapshot_reloads_total{result=\"rejected\"}")
        .await
        .unwrap();
    assert!(errors >= 10.0, "fetch errors counted: {errors}");
    assert!(rejected >= 2.0, "truncated documents counted: {rejected}");

    // A revision going backwards is refused.
    cp.set(Behaviour::Serve);
    cp.set_doc(&doc(4, &key, "revoked"));
    let seen = cp.requests().len();
    assert!(eventually(Duration::from_secs(5), || cp.requests().len() >= seen + 2).await);
    assert_eq!(gate.revision(), Some(5));
    assert_eq!(status_of(&gate, &key).await.status, 200);

    // And when the control plane is well again, so is keygate, without a restart.
    cp.set_doc(&doc(7, &key, "revoked"));
    gate.wait_revision(7).await;
    assert_error(&status_of(&gate, &key).await, 401, "key_revoked");
    gate.stop().await;
}

#[tokio::test]
async fn a_bearer_token_and_https_with_a_custom_ca() {
    let upstream = Upstream::start().await;
    let key = mint("sk_live_");
    let dir = tempfile::tempdir().unwrap();

    // A CA, and a certificate it signs for 127.0.0.1.
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "keygate test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, ca_cert.pem()).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der()).unwrap(),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(server));
    let cp = ControlPlane::start_tls(&doc(3, &key, "active"), acceptor).await;
    cp.require_token("cp-s3cret");
    assert!(cp.url().starts_with("https://127.0.0.1:"));

    let with_ca = format!(
        "ca_file = {:?}\ntoken_env = \"CP_TOKEN\"",
        ca_path.display().to_string()
    );
    let gate = Gate::start_with_env(
        &config_toml_source(&source(&cp.url(), &with_ca), upstream.addr, ""),
        &[("CP_TOKEN", "cp-s3cret")],
    )
    .await;
    assert_eq!(gate.revision(), Some(3));
    assert_eq!(status_of(&gate, &key).await.status, 200);
    assert!(cp
        .requests()
        .iter()
        .all(|r| r.authorization.as_deref() == Some("Bearer cp-s3cret")));
    gate.stop().await;

    // Without the CA (system roots) the certificate is not trusted: nothing is loaded, and the
    // fronts fail closed.
    let untrusted = Gate::start_with_env(
        &config_toml_source(
            &source(&cp.url(), "token_env = \"CP_TOKEN\""),
            upstream.addr,
            "",
        ),
        &[("CP_TOKEN", "cp-s3cret")],
    )
    .await;
    assert_eq!(untrusted.revision(), None);
    assert_error(
        &status_of(&untrusted, &key).await,
        503,
        "snapshot_unavailable",
    );
    untrusted.stop().await;

    // A wrong token: the control plane's 401 loads nothing either.
    let wrong = Gate::start_with_env(
        &config_toml_source(&source(&cp.url(), &with_ca), upstream.addr, ""),
        &[("CP_TOKEN", "guess")],
    )
    .await;
    assert_eq!(wrong.revision(), None);
    assert_error(&status_of(&wrong, &key).await, 503, "snapshot_unavailable");
    wrong.stop().await;
}

#[tokio::test]
async fn with_the_source_down_at_start_the_cache_serves_unless_too_old() {
    let upstream = Upstream::start().await;
    let key = mint("sk_live_");
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("last-good.json");
    let cache_line = format!("cache_path = {:?}", cache.display().to_string());

    let cp = ControlPlane::start(&doc(7, &key, "active")).await;
    let first = Gate::start(&config_toml_source(
        &source(&cp.url(), &cache_line),
        upstream.addr,
        "",
    ))
    .await;
    assert_eq!(first.revision(), Some(7));
    first.stop().await;
    let cached: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cache).unwrap()).unwrap();
    assert_eq!(cached["revision"], 7);

    // The control plane is gone: nothing listens on this port any more.
    let down = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/v1/snapshot", l.local_addr().unwrap())
    };
    let gate = Gate::start(&config_toml_source(
        &source(&down, &cache_line),
        upstream.addr,
        "",
    ))
    .await;
    assert_eq!(gate.revision(), Some(7));
    let (ready, body) = gate.ready().await;
    assert_eq!(ready, 200, "{body}");
    assert_eq!(status_of(&gate, &key).await.status, 200);
    gate.stop().await;

    // The cache keeps the time of the last confirmation, not of the revision: a keygate whose
    // unchanged snapshot was confirmed by 304s for longer than max_staleness, restarted with
    // the source down, still serves.
    let cp2 = ControlPlane::start(&doc(8, &key, "active")).await;
    let confirmed = Gate::start(&config_toml_source(
        &source(&cp2.url(), &format!("{cache_line}\nmax_staleness = \"2s\"")),
        upstream.addr,
        "",
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(3000)).await;
    confirmed.stop().await;
    let restarted = Gate::start(&config_toml_source(
        &source(&down, &format!("{cache_line}\nmax_staleness = \"2s\"")),
        upstream.addr,
        "",
    ))
    .await;
    assert_eq!(restarted.revision(), Some(8));
    let (ready, body) = restarted.ready().await;
    assert_eq!(ready, 200, "{body}");
    restarted.stop().await;

    // A cache written an hour ago is older than max_staleness: loaded, but not served.
    let f = std::fs::File::options().append(true).open(&cache).unwrap();
    f.set_modified(SystemTime::now() - Duration::from_secs(3600))
        .unwrap();
    drop(f);
    let stale = Gate::start(&config_toml_source(
        &source(&down, &format!("{cache_line}\nmax_staleness = \"2s\"")),
        upstream.addr,
        "",
    ))
    .await;
    assert_eq!(stale.revision(), Some(8));
    let (ready, body) = stale.ready().await;
    assert_eq!(ready, 503, "{body}");
    assert!(body["reason"].as_str().unwrap().contains("max_staleness"));
    assert!(body["confirmed_seconds_ago"].as_f64().unwrap() >= 3590.0);
    assert_error(&status_of(&stale, &key).await, 503, "snapshot_unavailable");
    stale.stop().await;

    // A control plane (or a cache before it) answering 304 to requests that named no document
    // confirms nothing: the hour-old cache stays stale, its time untouched.
    let lying = ControlPlane::start(&doc(9, &key, "revoked")).await;
    lying.set(Behaviour::Status(304));
    let gate = Gate::start(&config_toml_source(
        &source(
            &lying.url(),
            &format!("{cache_line}\nmax_staleness = \"2s\""),
        ),
        upstream.addr,
        "",
    ))
    .await;
    assert_eq!(gate.revision(), Some(8));
    let polls = lying.requests().len();
    while lying.requests().len() < polls + 3 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(lying.requests().iter().all(|r| r.if_none_match.is_none()));
    let (ready, body) = gate.ready().await;
    assert_eq!(ready, 503, "{body}");
    assert_error(&status_of(&gate, &key).await, 503, "snapshot_unavailable");
    gate.stop().await;
    let touched = std::fs::metadata(&cache).unwrap().modified().unwrap();
    assert!(touched < SystemTime::now() - Duration::from_secs(3000));
}

#[tokio::test]
async fn past_max_staleness_every_answer_is_snapshot_unavailable_until_the_source_is_back() {
    let upstream = Upstream::start().await;
    let key = mint("sk_live_");
    let cp = ControlPlane::start(&doc(1, &key, "active")).await;
    let gate = Gate::start(&config_toml_source(
        &source(&cp.url(), "max_staleness = \"1s\""),
        upstream.addr,
        "[ext_authz]\nlisten = \"127.0.0.1:0\"\n[authz_http]\nlisten = \"127.0.0.1:0\"\n",
    ))
    .await;
    assert_eq!(status_of(&gate, &key).await.status, 200);
    assert_eq!(gate.metric("keygate_snapshot_fresh").await, Some(1.0));
    // Envoy's http_service shape: /authz + the original path.
    let authz = format!(
        "http://{}/authz/v1/analyses/1",
        gate.app().authz_http_addr.unwrap()
    );
    let forward_auth = || async { get(&client(), &authz, &[("x-api-key", key.as_str())]).await };
    assert_eq!(forward_auth().await.status, 200);
    let channel = tonic::transport::Channel::from_shared(format!(
        "http://{}",
        gate.app().ext_authz_addr.unwrap()
    ))
    .unwrap()
    .connect()
    .await
    .unwrap();
    let health = tonic_health::pb::health_client::HealthClient::new(channel);
    let serving = || {
        let mut h = health.clone();
        async move {
            h.check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .status
                == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        }
    };
    assert!(serving().await);

    cp.set(Behaviour::Status(503));
    let t = Instant::now();
    loop {
        let a = status_of(&gate, &key).await;
        if a.status == 503 {
            assert_error(&a, 503, "snapshot_unavailable");
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "still served past max_staleness"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        t.elapsed() >= Duration::from_millis(800),
        "stale too early: {:?}",
        t.elapsed()
    );
    assert_eq!(gate.ready().await.0, 503);
    assert_eq!(gate.metric("keygate_snapshot_fresh").await, Some(0.0));
    // Every front: forward-auth says 403 (never a 5xx to Envoy/nginx), gRPC health turns off.
    assert_error(&forward_auth().await, 403, "snapshot_unavailable");
    let t = Instant::now();
    while serving().await {
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "gRPC health still SERVING"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Back: the unchanged document is confirmed by a 304, and service resumes by itself.
    let seen = cp.requests().len();
    cp.set(Behaviour::Serve);
    assert!(
        eventually(Duration::from_secs(3), || gate.app().store.is_fresh()).await,
        "not fresh again"
    );
    assert!(cp.requests()[seen..]
        .iter()
        .any(|r| r.if_none_match.is_some()));
    assert_eq!(status_of(&gate, &key).await.status, 200);
    assert_eq!(gate.ready().await.0, 200);
    assert_eq!(forward_auth().await.status, 200);
    let t = Instant::now();
    while !serving().await {
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "gRPC health not SERVING again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(health);
    gate.stop().await;
}
