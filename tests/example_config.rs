//! `config.example.toml` is the reference: it must load as it is (unknown keys are errors, so
//! this also proves it names no key keygate does not know), and its values are the defaults.

use std::path::Path;

#[test]
fn example_config_loads_and_states_the_defaults() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml");
    let s = keygate::config::load_with_env(&path, std::iter::empty())
        .expect("config.example.toml is valid");
    let p = s.proxy.expect("the example runs the proxy");
    assert_eq!(p.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(p.upstream.as_str(), "127.0.0.1:3000");
    assert_eq!(
        s.admin.map(|a| a.to_string()).as_deref(),
        Some("127.0.0.1:9901")
    );
    assert_eq!(s.policy.environment, "live");
    assert_eq!(s.policy.routes.len(), 2);

    // The defaults the example claims are the ones keygate uses without it.
    let minimal = keygate::config::from_toml(
        "environment = \"live\"\n[snapshot]\npath = \"keys.json\"\n[proxy]\nlisten = \"127.0.0.1:8080\"\nupstream = \"http://127.0.0.1:3000\"\n",
    )
    .unwrap();
    let d = minimal.proxy.unwrap();
    assert_eq!(d.connect_timeout, p.connect_timeout);
    assert_eq!(d.upstream_timeout, p.upstream_timeout);
    assert_eq!(d.header_read_timeout, p.header_read_timeout);
    assert_eq!(d.max_header_bytes, p.max_header_bytes);
    assert_eq!(d.max_headers, p.max_headers);
    assert_eq!(d.pool_idle_per_host, p.pool_idle_per_host);
    assert_eq!(d.max_connections_per_ip, p.max_connections_per_ip);
    assert_eq!(d.upstream_host, p.upstream_host);
    assert_eq!(d.tls, p.tls, "no TLS unless configured");
    assert_eq!(d.upstream_tls, p.upstream_tls);
    assert_eq!(
        minimal.ext_authz.and_then(|e| e.tls),
        s.ext_authz.as_ref().and_then(|e| e.tls.clone())
    );
    assert_eq!(minimal.snapshot.poll_interval, s.snapshot.poll_interval);
    let (a, b) = (&minimal.snapshot, &s.snapshot);
    assert_eq!(a.connect_timeout, b.connect_timeout);
    assert_eq!(a.read_timeout, b.read_timeout);
    assert_eq!(a.max_body_bytes, b.max_body_bytes);
    assert_eq!(a.backoff_max, b.backoff_max);
    assert_eq!(a.idle_timeout, b.idle_timeout);
    assert_eq!(a.max_staleness, b.max_staleness);
    assert_eq!(minimal.rate_limit, s.rate_limit);
    assert_eq!(minimal.limits, s.limits);
    assert_eq!(minimal.shutdown, s.shutdown);
    assert_eq!(minimal.log.decisions, s.log.decisions);
    assert_eq!(minimal.idempotency, s.idempotency);
    assert_eq!(
        minimal.headers.forward_credentials,
        s.headers.forward_credentials
    );
    assert_eq!(minimal.policy.path, s.policy.path);
    assert_eq!(
        minimal.policy.idempotency_required,
        s.policy.idempotency_required
    );
    assert_eq!(minimal.policy.unmatched, s.policy.unmatched);
}

#[test]
fn environment_overrides_the_file() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml");
    let env = [
        ("KEYGATE__PROXY__LISTEN", "127.0.0.1:18080"),
        ("KEYGATE__PROXY__TRUSTED_PROXIES", "10.0.0.0/8,192.168.1.1"),
        ("KEYGATE__ENVIRONMENT", "test"),
    ]
    .map(|(k, v)| (k.to_owned(), v.to_owned()));
    let s = keygate::config::load_with_env(&path, env).unwrap();
    let p = s.proxy.unwrap();
    assert_eq!(p.listen.to_string(), "127.0.0.1:18080");
    assert_eq!(p.trusted_proxies.len(), 2);
    assert_eq!(s.policy.environment, "test");
}

#[test]
fn an_empty_trusted_proxies_variable_clears_the_list() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml");
    for value in ["", "10.0.0.0/8,"] {
        let env = [(
            "KEYGATE__PROXY__TRUSTED_PROXIES".to_owned(),
            value.to_owned(),
        )];
        let s = keygate::config::load_with_env(&path, env).unwrap();
        assert_eq!(
            s.proxy.unwrap().trusted_proxies.len(),
            usize::from(!value.is_empty()),
            "{value:?}"
        );
    }
}

#[test]
fn example_config_runs_the_forward_auth_front() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml");
    let s = keygate::config::load_with_env(&path, std::iter::empty()).unwrap();
    let f = s.authz_http.expect("the example runs /authz");
    assert_eq!(f.listen.to_string(), "127.0.0.1:9192");
    assert_eq!(f.trusted_proxies.len(), 1);
}

#[test]
fn an_asking_front_alone_is_a_valid_configuration() {
    for front in [
        "[ext_authz]\nlisten = \"127.0.0.1:0\"\n",
        "[authz_http]\nlisten = \"127.0.0.1:0\"\n",
    ] {
        let toml = format!("environment = \"live\"\n[snapshot]\npath = \"keys.json\"\n{front}");
        let s = keygate::config::from_toml(&toml).unwrap_or_else(|e| panic!("{front}: {e}"));
        assert!(s.proxy.is_none());
        assert!(s.ext_authz.is_some() || s.authz_http.is_some());
    }
    let none =
        keygate::config::from_toml("environment = \"live\"\n[snapshot]\npath = \"keys.json\"\n");
    assert!(none
        .unwrap_err()
        .to_string()
        .contains("no front is configured"));
}
