//! Table tests for configuration: a minimal valid file, every validation error naming its dotted
//! key, several problems reported together, and environment overrides through `load_with_env`.

use std::io::Write as _;

use super::*;

/// The smallest configuration that validates: an environment, a snapshot path, one front.
const MINIMAL: &str = r#"
environment = "live"

[snapshot]
path = "keys.json"

[admin]
listen = "127.0.0.1:9901"
"#;

/// A proxy front besides the admin one, so that proxy settings are validated in full.
const WITH_PROXY: &str = r#"
environment = "live"

[snapshot]
path = "keys.json"

[proxy]
listen = "127.0.0.1:8080"
upstream = "http://127.0.0.1:3000"
"#;

fn problems(text: &str) -> Vec<Problem> {
    match from_toml(text) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(ConfigError::Invalid(p)) => p,
        Err(e @ ConfigError::Read { .. }) => panic!("not a validation error: {e}\n{text}"),
    }
}

#[test]
fn minimal_config_is_valid_with_defaults() {
    let s = from_toml(MINIMAL).unwrap();
    assert_eq!(s.policy.environment, "live");
    assert!(s.policy.prefixes.is_empty());
    assert!(s.policy.routes.is_empty());
    assert_eq!(s.policy.unmatched, Unmatched::Allow);
    assert_eq!(s.policy.route_case, Case::Sensitive);
    assert!(!s.policy.idempotency_required);
    assert!(!s.policy.path.allow_semicolon);
    assert_eq!(s.snapshot.path, PathBuf::from("keys.json"));
    assert_eq!(s.snapshot.poll_interval, Duration::from_secs(1));
    assert!(s.snapshot.pepper.is_none());
    assert!(s.proxy.is_none());
    assert_eq!(s.admin, Some("127.0.0.1:9901".parse().unwrap()));
    assert_eq!(s.headers.credentials, CredentialHeaders::default());
    assert!(!s.headers.forward_credentials);
    assert_eq!(s.headers.key_id, "x-key-id");
    assert_eq!(s.headers.idempotency_key, "idempotency-key");
    assert_eq!(s.log.level, "info");
    assert!(!s.log.json);
    assert_eq!(s.runtime.flavor, RuntimeFlavor::ThreadPerCore);
}

#[test]
fn routes_may_ignore_letter_case() {
    let rules = "[[routes.rule]]\nroute = \"POST /v1/Analyses\"\nscopes = [\"w\"]\n\
                 [[routes.rule]]\nroute = \"* /v1/**\"\nscopes = [\"r\"]\n";
    let s = from_toml(&format!(
        "{WITH_PROXY}[routes]\ncase_sensitive = false\n{rules}"
    ))
    .unwrap();
    assert_eq!(s.policy.route_case, Case::Insensitive);
    for path in ["/v1/analyses", "/V1/ANALYSES", "/v1/Analyses"] {
        let scopes = s
            .policy
            .routes
            .lookup_with("POST", path, s.policy.route_case)
            .unwrap();
        assert_eq!(&*scopes[0], "w", "{path}");
    }
    // Two spellings are two routes when case matters.
    let twice = format!("{rules}[[routes.rule]]\nroute = \"POST /v1/analyses\"\n");
    let s = from_toml(&format!(
        "{WITH_PROXY}[routes]\ncase_sensitive = true\n{twice}"
    ))
    .unwrap();
    assert_eq!(s.policy.routes.len(), 3);
    let scopes = s.policy.routes.lookup("POST", "/v1/ANALYSES").unwrap();
    assert_eq!(&*scopes[0], "r");
}

#[test]
fn full_config_is_read() {
    let s = from_toml(&format!(
        r#"{WITH_PROXY}
trusted_proxies = ["10.0.0.0/8", "192.168.1.1"]
connect_timeout = "250ms"
upstream_timeout = "1m"

[[key_prefixes]]
prefix = "sk_live_"
environment = "live"

[[key_prefixes]]
prefix = "imp_"
environment = "live"
checksum = false

[routes]
unmatched = "deny"

[[routes.rule]]
route = "POST /v1/analyses"
scopes = ["analyses:write", "analyses:write"]

[identity_headers]
key_id = "X-Keygate-Key"

[idempotency]
required = true

[log]
format = "json"
level = "keygate=debug,info"

[runtime]
flavor = "current_thread"
worker_threads = 2
"#
    ))
    .unwrap();
    let proxy = s.proxy.unwrap();
    assert_eq!(proxy.listen, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(proxy.upstream, "127.0.0.1:3000");
    assert_eq!(proxy.upstream_scheme, http::uri::Scheme::HTTP);
    assert_eq!(
        &*proxy.trusted_proxies,
        [
            "10.0.0.0/8".parse().unwrap(),
            "192.168.1.1/32".parse().unwrap()
        ]
    );
    assert_eq!(proxy.connect_timeout, Duration::from_millis(250));
    assert_eq!(proxy.upstream_timeout, Duration::from_secs(60));
    let rules = s.policy.prefixes.rules();
    assert_eq!(rules.len(), 2);
    assert_eq!(rules[0].prefix, "sk_live_", "longest first");
    assert!(rules[0].checksum, "checksum defaults to true");
    assert!(!rules[1].checksum);
    assert_eq!(s.policy.unmatched, Unmatched::Deny);
    let scopes = s.policy.routes.lookup("POST", "/v1/analyses").unwrap();
    assert_eq!(
        scopes.iter().map(|s| &**s).collect::<Vec<_>>(),
        ["analyses:write"],
        "deduplicated"
    );
    assert_eq!(s.headers.key_id, "x-keygate-key", "lower-cased");
    assert!(s.policy.idempotency_required);
    assert!(s.log.json);
    assert_eq!(s.runtime.flavor, RuntimeFlavor::CurrentThread);
    assert_eq!(s.runtime.worker_threads, 2);
}

/// Each case adds to (or edits) a valid configuration; the one problem reported names `key`.
#[test]
fn each_problem_names_its_dotted_key() {
    let unset_var = "KEYGATE_TEST_PEPPER_THAT_IS_NEVER_SET_3F9A";
    assert!(std::env::var_os(unset_var).is_none());
    let pepper_case = format!(
        "environment = \"live\"\n[snapshot]\npath = \"k.json\"\npepper_env = \"{unset_var}\"\n\
         [admin]\nlisten = \"127.0.0.1:1\"\n"
    );
    let edit = |from: &str, to: &str| {
        assert!(WITH_PROXY.contains(from), "{from}");
        WITH_PROXY.replacen(from, to, 1)
    };
    let add = |text: &str| format!("{WITH_PROXY}{text}");
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "missing environment",
            edit("environment = \"live\"", ""),
            "environment",
        ),
        (
            "bad environment",
            edit("\"live\"", "\"li ve\""),
            "environment",
        ),
        (
            "bad prefix",
            add("[[key_prefixes]]\nprefix = \"sk-live-\"\nenvironment = \"live\"\n"),
            "key_prefixes[0].prefix",
        ),
        (
            "empty prefix",
            add("[[key_prefixes]]\nprefix = \"\"\nenvironment = \"live\"\n"),
            "key_prefixes[0].prefix",
        ),
        (
            "bad prefix environment",
            add("[[key_prefixes]]\nprefix = \"sk_\"\nenvironment = \"live!\"\n"),
            "key_prefixes[0].environment",
        ),
        (
            "duplicate prefix",
            add(
                "[[key_prefixes]]\nprefix = \"sk_live_\"\nenvironment = \"live\"\n\
                 [[key_prefixes]]\nprefix = \"sk_live_\"\nenvironment = \"test\"\n",
            ),
            "key_prefixes[1].prefix",
        ),
        (
            "duration without a unit",
            edit("upstream = ", "connect_timeout = \"5\"\nupstream = "),
            "proxy.connect_timeout",
        ),
        (
            "zero duration",
            edit(
                "path = \"keys.json\"",
                "path = \"keys.json\"\npoll_interval = \"0s\"",
            ),
            "snapshot.poll_interval",
        ),
        (
            "bad listen address",
            edit("\"127.0.0.1:8080\"", "\"localhost:8080\""),
            "proxy.listen",
        ),
        (
            "bad admin listen address",
            add("[admin]\nlisten = \"127.0.0.1:99999\"\n"),
            "admin.listen",
        ),
        (
            "proxy.listen without upstream",
            edit("upstream = \"http://127.0.0.1:3000\"", ""),
            "proxy.upstream",
        ),
        (
            "ftp upstream",
            edit("http://127.0.0.1:3000", "ftp://127.0.0.1:3000"),
            "proxy.upstream",
        ),
        (
            "https upstream with a CA file that is not PEM",
            edit(
                "upstream = \"http://127.0.0.1:3000\"",
                "upstream = \"https://127.0.0.1:3000\"\nupstream_ca_file = \"Cargo.toml\"",
            ),
            "proxy.upstream_ca_file",
        ),
        (
            "https upstream with a missing CA file",
            edit(
                "upstream = \"http://127.0.0.1:3000\"",
                "upstream = \"https://127.0.0.1:3000\"\nupstream_ca_file = \"/nonexistent/ca.pem\"",
            ),
            "proxy.upstream_ca_file",
        ),
        (
            "upstream_ca_file with an http upstream",
            edit("upstream = ", "upstream_ca_file = \"Cargo.toml\"\nupstream = "),
            "proxy.upstream_ca_file",
        ),
        (
            "upstream_client_cert without its key",
            edit(
                "upstream = \"http://127.0.0.1:3000\"",
                "upstream = \"https://127.0.0.1:3000\"\nupstream_client_cert = \"Cargo.toml\"",
            ),
            "proxy.upstream_client_key",
        ),
        (
            "upstream_server_name that is not a name",
            edit(
                "upstream = \"http://127.0.0.1:3000\"",
                "upstream = \"https://127.0.0.1:3000\"\nupstream_server_name = \"api internal\"",
            ),
            "proxy.upstream_server_name",
        ),
        (
            "upstream_host that is neither client nor upstream",
            edit("upstream = ", "upstream_host = \"api.internal\"\nupstream = "),
            "proxy.upstream_host",
        ),
        (
            "max_connections_per_ip over a million",
            edit("upstream = ", "max_connections_per_ip = 1000001\nupstream = "),
            "proxy.max_connections_per_ip",
        ),
        (
            "proxy.tls_cert without its key",
            edit("upstream = ", "tls_cert = \"Cargo.toml\"\nupstream = "),
            "proxy.tls_key",
        ),
        (
            "proxy.tls_key without its certificate",
            edit("upstream = ", "tls_key = \"Cargo.toml\"\nupstream = "),
            "proxy.tls_cert",
        ),
        (
            "proxy.tls_cert that is not PEM",
            edit(
                "upstream = ",
                "tls_cert = \"Cargo.toml\"\ntls_key = \"Cargo.toml\"\nupstream = ",
            ),
            "proxy.tls_cert",
        ),
        (
            "proxy.tls_cert unreadable",
            edit(
                "upstream = ",
                "tls_cert = \"/nonexistent/cert.pem\"\ntls_key = \"Cargo.toml\"\nupstream = ",
            ),
            "proxy.tls_cert",
        ),
        (
            "proxy.client_ca without TLS",
            edit("upstream = ", "client_ca = \"Cargo.toml\"\nupstream = "),
            "proxy.client_ca",
        ),
        (
            "ext_authz.client_ca without TLS",
            add("[ext_authz]\nlisten = \"127.0.0.1:0\"\nclient_ca = \"Cargo.toml\"\n"),
            "ext_authz.client_ca",
        ),
        (
            "ext_authz.tls_key without its certificate",
            add("[ext_authz]\nlisten = \"127.0.0.1:0\"\ntls_key = \"Cargo.toml\"\n"),
            "ext_authz.tls_cert",
        ),
        (
            "ext_authz buffers smaller than one CheckRequest",
            add("[ext_authz]\nlisten = \"127.0.0.1:0\"\nmax_buffered_bytes = 1000\n"),
            "ext_authz.max_buffered_bytes",
        ),
        (
            "ext_authz buffers that hold a CheckRequest but not its frame's prefix",
            add("[ext_authz]\nlisten = \"127.0.0.1:0\"\nmax_request_bytes = 1000\nmax_buffered_bytes = 1004\n"),
            "ext_authz.max_buffered_bytes",
        ),
        (
            "ext_authz.max_request_bytes zero",
            add("[ext_authz]\nlisten = \"127.0.0.1:0\"\nmax_request_bytes = 0\n"),
            "ext_authz.max_request_bytes",
        ),
        (
            "ext_authz.max_request_bytes beyond a gRPC frame",
            add("[ext_authz]\nlisten = \"127.0.0.1:0\"\nmax_request_bytes = 4294967296\nmax_buffered_bytes = 4294967296\n"),
            "ext_authz.max_request_bytes",
        ),
        (
            "ext_authz.read_timeout without a unit",
            add("[ext_authz]\nlisten = \"127.0.0.1:0\"\nread_timeout = \"10\"\n"),
            "ext_authz.read_timeout",
        ),
        (
            "TLS on authz_http, which does not offer it",
            add("[authz_http]\nlisten = \"127.0.0.1:0\"\ntls_cert = \"Cargo.toml\"\n"),
            "authz_http.tls_cert",
        ),
        (
            "upstream with a path",
            edit("http://127.0.0.1:3000", "http://127.0.0.1:3000/api"),
            "proxy.upstream",
        ),
        (
            "upstream with a query",
            edit("http://127.0.0.1:3000", "http://127.0.0.1:3000/?a=1"),
            "proxy.upstream",
        ),
        (
            "upstream with credentials",
            edit("http://127.0.0.1:3000", "http://user:pw@127.0.0.1:3000"),
            "proxy.upstream",
        ),
        (
            "upstream not a URL",
            edit("http://127.0.0.1:3000", "htp:/x y"),
            "proxy.upstream",
        ),
        (
            "bad trusted proxy CIDR",
            edit(
                "upstream = ",
                "trusted_proxies = [\"10.0.0.0/8\", \"10.0.0.0/40\"]\nupstream = ",
            ),
            "proxy.trusted_proxies[1]",
        ),
        (
            "max_header_bytes out of range",
            edit("upstream = ", "max_header_bytes = 10\nupstream = "),
            "proxy.max_header_bytes",
        ),
        (
            "bad route pattern",
            add("[[routes.rule]]\nroute = \"POST v1/analyses\"\n"),
            "routes.rule[0].route",
        ),
        (
            "route without a method",
            add("[[routes.rule]]\nroute = \"/v1/analyses\"\n"),
            "routes.rule[0].route",
        ),
        (
            "duplicate route",
            add("[[routes.rule]]\nroute = \"POST /v1/analyses\"\n\
                 [[routes.rule]]\nroute = \"POST /v1/analyses/\"\n"),
            "routes.rule",
        ),
        (
            "two spellings of one route, case ignored",
            add("[routes]\ncase_sensitive = false\n\
                 [[routes.rule]]\nroute = \"POST /v1/analyses\"\n\
                 [[routes.rule]]\nroute = \"POST /V1/Analyses\"\n"),
            "routes.rule",
        ),
        (
            "bad scope",
            add("[[routes.rule]]\nroute = \"POST /v1/analyses\"\nscopes = [\"a b\"]\n"),
            "routes.rule[0].scopes",
        ),
        (
            "routes.unmatched = maybe",
            add("[routes]\nunmatched = \"maybe\"\n"),
            "routes.unmatched",
        ),
        (
            "bad log format",
            add("[log]\nformat = \"xml\"\n"),
            "log.format",
        ),
        (
            "bad log level",
            add("[log]\nlevel = \"keygate=loud\"\n"),
            "log.level",
        ),
        (
            "forward-auth header timeout without a unit",
            add("[authz_http]\nlisten = \"127.0.0.1:9192\"\nheader_read_timeout = \"10\"\n"),
            "authz_http.header_read_timeout",
        ),
        (
            "a timeout past a year (hyper would overflow the clock)",
            edit(
                "upstream = \"http://127.0.0.1:3000\"\n",
                "upstream = \"http://127.0.0.1:3000\"\nheader_read_timeout = \"500000000000y\"\n",
            ),
            "proxy.header_read_timeout",
        ),
        (
            "an empty tls_cert (an unset variable) next to a key and a client CA",
            edit(
                "upstream = \"http://127.0.0.1:3000\"\n",
                "upstream = \"http://127.0.0.1:3000\"\ntls_cert = \"\"\ntls_key = \"Cargo.toml\"\nclient_ca = \"Cargo.toml\"\n",
            ),
            "proxy.tls_cert",
        ),
        (
            "bad decision log",
            add("[log]\ndecisions = \"some\"\n"),
            "log.decisions",
        ),
        (
            "negative-looking shutdown delay",
            add("[shutdown]\ndelay = \"-5s\"\n"),
            "shutdown.delay",
        ),
        (
            "zero drain timeout",
            add("[shutdown]\ndrain_timeout = \"0s\"\n"),
            "shutdown.drain_timeout",
        ),
        (
            "no connections allowed",
            add("[limits]\nmax_connections = 0\n"),
            "limits.max_connections",
        ),
        (
            "absurd stream limit",
            add("[limits]\nhttp2_max_concurrent_streams = 1000000\n"),
            "limits.http2_max_concurrent_streams",
        ),
        (
            "keep-alive without a unit",
            add("[limits]\nhttp2_keep_alive_interval = \"30\"\n"),
            "limits.http2_keep_alive_interval",
        ),
        (
            "an idle timeout too short for keep-alive PINGs",
            add("[limits]\nidle_timeout = \"1ns\"\n"),
            "limits.idle_timeout",
        ),
        (
            "keep-alive PINGs no more often than the idle timeout",
            add("[limits]\nhttp2_keep_alive_interval = \"3m\"\nidle_timeout = \"3m\"\n"),
            "limits.http2_keep_alive_interval",
        ),
        (
            "bad runtime flavor",
            add("[runtime]\nflavor = \"single\"\n"),
            "runtime.flavor",
        ),
        (
            "snapshot.source = http without a url",
            edit("path = ", "source = \"http\"\npath = "),
            "snapshot.url",
        ),
        (
            "snapshot.source = grpc with a url that has a path",
            edit(
                "path = ",
                "source = \"grpc\"\nurl = \"http://hub:9393/v1\"\npath = ",
            ),
            "snapshot.url",
        ),
        (
            "snapshot.client_cert without its key",
            edit(
                "path = ",
                "source = \"grpc\"\nurl = \"https://hub:9393\"\nclient_cert = \"Cargo.toml\"\npath = ",
            ),
            "snapshot.client_key",
        ),
        (
            "sync_server.client_ca without TLS",
            add("[sync_server]\nlisten = \"127.0.0.1:0\"\nclient_ca = \"Cargo.toml\"\n"),
            "sync_server.client_ca",
        ),
        (
            "sync_server.tls_cert unreadable",
            add("[sync_server]\nlisten = \"127.0.0.1:0\"\ntls_cert = \"/nonexistent.pem\"\ntls_key = \"Cargo.toml\"\n"),
            "sync_server.tls_cert",
        ),
        (
            "snapshot.url not http(s)",
            edit(
                "path = ",
                "source = \"http\"\nurl = \"ftp://cp/keys\"\npath = ",
            ),
            "snapshot.url",
        ),
        (
            "snapshot.token_env names an unset variable",
            edit(
                "path = ",
                "token_env = \"KEYGATE_TEST_SURELY_UNSET\"\npath = ",
            ),
            "snapshot.token_env",
        ),
        (
            "snapshot.max_staleness not longer than the poll interval",
            edit("path = ", "max_staleness = \"500ms\"\npath = "),
            "snapshot.max_staleness",
        ),
        (
            "snapshot.ca_file missing",
            edit("path = ", "ca_file = \"/nonexistent/ca.pem\"\npath = "),
            "snapshot.ca_file",
        ),
        (
            "sync_server off loopback without a token",
            add("[sync_server]\nlisten = \"0.0.0.0:9393\"\n"),
            "sync_server.token_env",
        ),
        (
            "bad sync_server.listen",
            add("[sync_server]\nlisten = \"everywhere\"\n"),
            "sync_server.listen",
        ),
        (
            "sync_server.heartbeat_interval without a unit",
            add("[sync_server]\nlisten = \"127.0.0.1:0\"\nheartbeat_interval = \"5\"\n"),
            "sync_server.heartbeat_interval",
        ),
        (
            "snapshot.source = ftp",
            edit("path = ", "source = \"ftp\"\npath = "),
            "snapshot.source",
        ),
        (
            "missing snapshot.path",
            edit("path = \"keys.json\"", ""),
            "snapshot.path",
        ),
        (
            "pepper_env names an unset variable",
            pepper_case,
            "snapshot.pepper_env",
        ),
        (
            "two identity headers with the same name",
            add("[identity_headers]\npartner_id = \"x-key-id\"\n"),
            "identity_headers",
        ),
        (
            "two identity headers equal once '_' is read as '-'",
            add("[identity_headers]\norg_id = \"X_Partner_Id\"\n"),
            "identity_headers",
        ),
        (
            "identity header equal to a credential header",
            add("[identity_headers]\nkey_id = \"X-API-Key\"\n"),
            "identity_headers",
        ),
        (
            "identity header equal to a configured credential header",
            add("[credentials]\napi_key_header = \"x-scopes\"\n"),
            "identity_headers",
        ),
        (
            "bad header name",
            add("[credentials]\napi_key_header = \"x api key\"\n"),
            "credentials.api_key_header",
        ),
        (
            "no front at all",
            edit(
                "[proxy]\nlisten = \"127.0.0.1:8080\"\nupstream = \"http://127.0.0.1:3000\"\n",
                "",
            ),
            "proxy.listen",
        ),
    ];

    let mut failures = Vec::new();
    for (name, text, key) in &cases {
        let got = match from_toml(text) {
            Ok(_) => {
                failures.push(format!("{name}: accepted"));
                continue;
            }
            Err(ConfigError::Read { message, .. }) => {
                failures.push(format!("{name}: read error {message}"));
                continue;
            }
            Err(ConfigError::Invalid(p)) => p,
        };
        let keys: Vec<&str> = got.iter().map(|p| p.key.as_str()).collect();
        if keys != [*key] {
            failures.push(format!("{name}: problems {got:?}, want one for {key}"));
            continue;
        }
        let line = got[0].to_string();
        if !line.starts_with(&format!("config: {key}: ")) || got[0].message.is_empty() {
            failures.push(format!("{name}: rendered as {line:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// An unknown key is a typo: it is refused, named by its dotted key with what its table takes,
/// and reported together with the file's other problems.
#[test]
fn unknown_keys_are_refused_by_dotted_name() {
    let cases = [
        (
            "[proxy] listn",
            WITH_PROXY.replacen("listen =", "listn =", 1),
            "proxy.listn",
            "proxy takes: listen, upstream",
        ),
        (
            "top-level enviroment",
            format!("enviroment = \"live\"\n{WITH_PROXY}"),
            "enviroment",
            "the top level takes: environment",
        ),
        (
            "[[routes.rule]] scope",
            format!("{WITH_PROXY}[[routes.rule]]\nroute = \"GET /a\"\nscope = [\"x\"]\n"),
            "routes.rule[0].scope",
            "routes.rule[0] takes: route, scopes",
        ),
        (
            "unknown section",
            format!("{WITH_PROXY}[proxies]\nlisten = \"127.0.0.1:1\"\n"),
            "proxies",
            "the top level takes:",
        ),
    ];
    for (name, text, key, takes) in cases {
        let got = problems(&text);
        let p = got
            .iter()
            .find(|p| p.key == key)
            .unwrap_or_else(|| panic!("{name}: {key} not reported: {got:?}"));
        assert!(p.message.contains(takes), "{name}: {p}");
    }
    // The same typo arriving from the environment.
    let file = write_config(WITH_PROXY);
    let err = load_with_env(
        file.path(),
        env(&[("KEYGATE__PROXY__LISTN", "127.0.0.1:1")]),
    )
    .unwrap_err();
    assert!(matches!(err, ConfigError::Invalid(_)), "{err:?}");
    assert!(
        err.to_string()
            .starts_with("config: proxy.listn: unknown key"),
        "{err}"
    );

    // A typo does not hide the other problems of the file.
    let text = "environment = \"li ve\"\n[snapshot]\npath = \"keys.json\"\n[proxy]\nlisten = \"nope\"\nlisen = \"127.0.0.1:1\"\nupstream = \"http://127.0.0.1:3000\"\n";
    let keys: Vec<String> = problems(text).into_iter().map(|p| p.key).collect();
    for key in ["proxy.lisen", "environment", "proxy.listen"] {
        assert!(
            keys.iter().any(|k| k == key),
            "{key} not reported: {keys:?}"
        );
    }
}

/// Every table of the file is checked key by key (a new table must be added to `table_fields`).
#[test]
fn every_table_is_checked_key_by_key() {
    for field in fields_of::<RawConfig>() {
        if *field == "environment" {
            continue;
        }
        assert!(
            table_fields(field)
                .or(table_fields(&format!("{field}[]")))
                .is_some(),
            "{field} is missing from table_fields"
        );
    }
    assert!(fields_of::<RawProxy>().contains(&"upstream"));
    assert!(fields_of::<RawRoutes>().contains(&"rule"));
}

#[test]
fn all_problems_are_reported_at_once() {
    let text = r#"
environment = "li ve"

[[key_prefixes]]
prefix = "sk-live"
environment = "live"

[snapshot]
poll_interval = "5"

[proxy]
listen = "127.0.0.1:8080"
upstream = "ftp://upstream"
trusted_proxies = ["nope"]

[routes]
unmatched = "maybe"

[[routes.rule]]
route = "GET nope"

[log]
format = "xml"

[runtime]
flavor = "single"
"#;
    let got = problems(text);
    let mut keys: Vec<&str> = got.iter().map(|p| p.key.as_str()).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "environment",
            "key_prefixes[0].prefix",
            "log.format",
            "proxy.trusted_proxies[0]",
            "proxy.upstream",
            "routes.rule[0].route",
            "routes.unmatched",
            "runtime.flavor",
            "snapshot.path",
            "snapshot.poll_interval",
        ]
    );
    let err = ConfigError::Invalid(got);
    assert_eq!(err.problems().len(), 10);
    assert_eq!(err.to_string().lines().count(), 10, "one problem per line");
}

#[test]
fn messages_quote_the_offending_value() {
    let got = problems(&WITH_PROXY.replacen("\"live\"", "\"li ve\"", 1));
    assert!(got[0].message.contains("\"li ve\""), "{:?}", got[0]);
    let got = problems(&format!("{WITH_PROXY}[routes]\nunmatched = \"maybe\"\n"));
    assert!(got[0].message.contains("\"maybe\""), "{:?}", got[0]);
}

#[test]
fn pepper_is_read_from_the_named_variable() {
    // PATH is set in any test environment; its bytes are the pepper.
    let path = std::env::var_os("PATH").expect("PATH is set");
    let s = from_toml(&MINIMAL.replacen(
        "path = \"keys.json\"",
        "path = \"keys.json\"\npepper_env = \"PATH\"",
        1,
    ))
    .unwrap();
    assert_eq!(s.snapshot.pepper.as_deref(), Some(path.as_encoded_bytes()));
    // Never printed, not even by `{:?}` (of the settings, or of a snapshot indexed with it).
    let shown = format!("{:?}", s.snapshot);
    assert!(shown.contains("pepper: Some(\"<redacted>\")"), "{shown}");
    let bytes = format!("{:?}", path.as_encoded_bytes());
    assert!(!shown.contains(&bytes[1..bytes.len() - 1]), "{shown}");
    let doc = r#"{"schema":"keygate.snapshot/v1","revision":3,"partners":[],"keys":[]}"#;
    let snapshot = crate::snapshot::parse(doc.as_bytes(), s.snapshot.pepper.clone()).unwrap();
    let shown = format!("{snapshot:?}");
    assert!(shown.starts_with("Snapshot { revision: 3,"), "{shown}");
    assert!(!shown.contains(&bytes[1..bytes.len() - 1]), "{shown}");
}

// ---------------------------------------------------------------------------------------------
// load_with_env

fn write_config(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f.flush().unwrap();
    f
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn environment_overrides_the_file() {
    let file = write_config(WITH_PROXY);
    let s = load_with_env(
        file.path(),
        env(&[
            ("KEYGATE__PROXY__LISTEN", "127.0.0.1:9000"),
            ("KEYGATE__ENVIRONMENT", "test"),
            (
                "KEYGATE__PROXY__TRUSTED_PROXIES",
                "10.0.0.0/8,192.168.0.0/16",
            ),
            ("KEYGATE__PROXY__CONNECT_TIMEOUT", "750ms"),
            ("KEYGATE__IDENTITY_HEADERS__KEY_ID", "x-gate-key"),
            ("KEYGATE__IDEMPOTENCY__REQUIRED", "true"),
            ("KEYGATE__ROUTES__UNMATCHED", "deny"),
            // A comma in a value that is not a list stays in the value.
            ("KEYGATE__LOG__LEVEL", "keygate=debug,info"),
            // Not ours: ignored.
            ("KEYGATEX__ENVIRONMENT", "nope"),
            ("HOME", "/nowhere"),
        ]),
    )
    .unwrap();
    let proxy = s.proxy.unwrap();
    assert_eq!(proxy.listen, "127.0.0.1:9000".parse().unwrap());
    assert_eq!(s.policy.environment, "test");
    assert_eq!(
        &*proxy.trusted_proxies,
        [
            "10.0.0.0/8".parse::<IpNet>().unwrap(),
            "192.168.0.0/16".parse().unwrap()
        ]
    );
    assert_eq!(proxy.connect_timeout, Duration::from_millis(750));
    assert_eq!(proxy.upstream, "127.0.0.1:3000", "the file's value stays");
    assert_eq!(s.headers.key_id, "x-gate-key");
    assert!(s.policy.idempotency_required);
    assert_eq!(s.policy.unmatched, Unmatched::Deny);
    assert_eq!(s.log.level, "keygate=debug,info");
}

#[test]
fn environment_values_are_validated_like_the_file() {
    let file = write_config(WITH_PROXY);
    let table: &[(&str, &str, &str)] = &[
        ("KEYGATE__PROXY__LISTEN", "nope", "proxy.listen"),
        ("KEYGATE__ENVIRONMENT", "li ve", "environment"),
        (
            "KEYGATE__PROXY__TRUSTED_PROXIES",
            "10.0.0.0/8,nope",
            "proxy.trusted_proxies[1]",
        ),
        ("KEYGATE__ROUTES__UNMATCHED", "maybe", "routes.unmatched"),
    ];
    for (var, value, key) in table {
        match load_with_env(file.path(), env(&[(var, value)])) {
            Err(ConfigError::Invalid(p)) => {
                let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
                assert_eq!(keys, [*key], "{var}={value}");
            }
            Err(e) => panic!("{var}={value}: {e}"),
            Ok(_) => panic!("{var}={value}: accepted"),
        }
    }
}

#[test]
fn a_single_trusted_proxy_from_the_environment_is_a_list() {
    let file = write_config(WITH_PROXY);
    let s = load_with_env(
        file.path(),
        env(&[("KEYGATE__PROXY__TRUSTED_PROXIES", "10.0.0.1")]),
    )
    .unwrap();
    assert_eq!(
        &*s.proxy.unwrap().trusted_proxies,
        ["10.0.0.1/32".parse::<IpNet>().unwrap()]
    );
}

#[test]
fn without_environment_the_file_is_used() {
    let file = write_config(WITH_PROXY);
    let s = load_with_env(file.path(), Vec::new()).unwrap();
    assert_eq!(s.policy.environment, "live");
    assert_eq!(s.proxy.unwrap().listen, "127.0.0.1:8080".parse().unwrap());
}

#[test]
fn a_missing_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent-keygate.toml");
    let err = load_with_env(&path, Vec::new()).unwrap_err();
    assert!(matches!(err, ConfigError::Read { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains(&path.display().to_string()), "{text}");
    assert_eq!(err.problems(), [text]);
}

#[test]
fn a_file_that_is_not_toml_is_named() {
    let file = write_config("environment = \"live\"\n[snapshot\npath = 1\n");
    let err = load_with_env(file.path(), Vec::new()).unwrap_err();
    assert!(matches!(err, ConfigError::Read { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&file.path().display().to_string()),
        "{err}"
    );
}

#[test]
fn helpers() {
    for (s, want) in [
        ("10.0.0.0/8", Some("10.0.0.0/8")),
        ("10.1.2.3/8", Some("10.0.0.0/8")),
        (" 192.168.1.1 ", Some("192.168.1.1/32")),
        ("::1", Some("::1/128")),
        ("2001:db8::/32", Some("2001:db8::/32")),
        ("::ffff:10.0.0.0/104", Some("10.0.0.0/8")),
        ("::ffff:203.0.113.7", Some("203.0.113.7/32")),
        ("::ffff:0:0/96", Some("0.0.0.0/0")),
        ("::ffff:0:0/95", Some("::fffe:0:0/95")),
        ("10.0.0.0/33", None),
        ("10.0.0", None),
        ("", None),
    ] {
        assert_eq!(
            parse_cidr(s),
            want.map(|w| w.parse::<IpNet>().unwrap()),
            "{s:?}"
        );
    }
    for (a, b, want) in [
        ("x-key-id", "x_key_id", true),
        ("x-key-id", "x-key-id", true),
        ("x-key-id", "x-key-ids", false),
        ("x-key-id", "x-kez-id", false),
    ] {
        assert_eq!(folded_eq(a, b), want, "{a} {b}");
    }
    for (s, want) in [
        ("analyses:read", true),
        ("a b", false),
        ("a,b", false),
        ("", false),
        ("é", false),
    ] {
        assert_eq!(is_scope(s), want, "{s:?}");
    }
}

/// Real certificate files: a good pair validates everywhere TLS is offered; a key of another
/// certificate is named as the problem, under each section's own key.
#[test]
fn tls_files_are_parsed_and_matched_at_validation() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: String| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let mint = |name: &str| {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (cert, key) = mint("keygate.test");
    let (_, other) = mint("other.test");
    let (cert, key, other, ca) = (
        write("cert.pem", cert.clone()),
        write("key.pem", key),
        write("other-key.pem", other),
        write("ca.pem", cert),
    );
    let text = |key: &str| {
        format!(
            "environment = \"live\"\n[snapshot]\npath = \"keys.json\"\n\
             [proxy]\nlisten = \"127.0.0.1:0\"\nupstream = \"https://api.internal:8443\"\n\
             tls_cert = {cert:?}\ntls_key = {key:?}\nclient_ca = {ca:?}\nupstream_ca_file = {ca:?}\n\
             upstream_client_cert = {cert:?}\nupstream_client_key = {key:?}\n\
             [ext_authz]\nlisten = \"127.0.0.1:0\"\ntls_cert = {cert:?}\ntls_key = {key:?}\n\
             [sync_server]\nlisten = \"127.0.0.1:0\"\ntls_cert = {cert:?}\ntls_key = {key:?}\nclient_ca = {ca:?}\n"
        )
    };
    let s = from_toml(&text(&key)).unwrap();
    let p = s.proxy.unwrap();
    assert_eq!(p.upstream_scheme, http::uri::Scheme::HTTPS);
    assert_eq!(p.upstream.as_str(), "api.internal:8443");
    let up = p.upstream_tls.unwrap();
    assert_eq!(up.server_name, "api.internal");
    assert!(up.client_identity.is_some());
    assert!(p.tls.unwrap().client_ca.is_some());
    assert!(s.ext_authz.unwrap().tls.unwrap().client_ca.is_none());
    assert!(s.sync_server.unwrap().tls.is_some());

    let got = problems(&text(&other));
    let mut keys: Vec<&str> = got.iter().map(|p| p.key.as_str()).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "ext_authz.tls_key",
            "proxy.tls_key",
            "proxy.upstream_client_key",
            "sync_server.tls_key"
        ]
    );
    for p in &got {
        assert!(
            p.message.contains("does not match the certificate in"),
            "{p}"
        );
    }

    // upstream_server_name replaces the host as the name checked (and sent as SNI).
    let named = text(&key).replace(
        "upstream_ca_file",
        "upstream_server_name = \"api.example.com\"\nupstream_ca_file",
    );
    let p = from_toml(&named).unwrap().proxy.unwrap();
    assert_eq!(p.upstream_tls.unwrap().server_name, "api.example.com");
}

#[test]
fn upstream_host_names_the_upstream_as_it_expects_to_be_named() {
    let host = |upstream: &str, server_name: Option<&str>| {
        let uri: http::Uri = upstream.parse().unwrap();
        let (scheme, authority) = (uri.scheme().unwrap(), uri.authority().unwrap());
        super::upstream_host(scheme, authority, server_name)
    };
    assert_eq!(host("https://localhost:8443", None), "localhost:8443");
    assert_eq!(host("http://app", None), "app");
    assert_eq!(host("http://app:80", None), "app:80");
    // Reached by address, named by its certificate: the name, with a port that is not 443.
    assert_eq!(
        host("https://10.0.0.5:8443", Some("api.internal")),
        "api.internal:8443"
    );
    assert_eq!(
        host("https://10.0.0.5:443", Some("api.internal")),
        "api.internal"
    );
    assert_eq!(
        host("https://10.0.0.5", Some("api.internal")),
        "api.internal"
    );

    let with = |value: &str| {
        from_toml(&format!("{WITH_PROXY}upstream_host = {value:?}\n"))
            .unwrap()
            .proxy
            .unwrap()
            .upstream_host
    };
    assert_eq!(
        with(" upstream "),
        UpstreamHost::Upstream("127.0.0.1:3000".parse().unwrap())
    );
    assert_eq!(with("client"), UpstreamHost::Client);
    assert_eq!(
        from_toml(WITH_PROXY).unwrap().proxy.unwrap().upstream_host,
        UpstreamHost::Client
    );
}

#[test]
fn a_key_holds_at_most_its_share_of_the_idempotent_places() {
    let with = |extra: &str| format!("{WITH_PROXY}[idempotency]\n{extra}\n");
    let limits = |extra: &str| from_toml(&with(extra)).unwrap().idempotency.unwrap().limits;
    assert_eq!(limits("").max_in_flight_per_key, 64, "a quarter of 256");
    assert_eq!(limits("max_in_flight = 2").max_in_flight_per_key, 1);
    let both = limits("max_in_flight = 10\nmax_in_flight_per_key = 10");
    assert_eq!((both.max_in_flight, both.max_in_flight_per_key), (10, 10));
    for (extra, message) in [
        ("max_in_flight_per_key = 0", "must be more than zero"),
        (
            "max_in_flight = 8\nmax_in_flight_per_key = 9",
            "9 is more than idempotency.max_in_flight (8)",
        ),
    ] {
        let got = problems(&with(extra));
        assert!(
            got.iter().any(
                |p| p.key == "idempotency.max_in_flight_per_key" && p.message.contains(message)
            ),
            "{extra}: {got:?}"
        );
    }
}

/// A blank value (an unset variable in a template, an empty override) for a key whose absence
/// weakens a check is refused, not read as "unset": an empty max_staleness served a stale
/// snapshot forever, an empty ca_file trusted every public CA instead of the private one.
#[test]
fn blank_values_do_not_turn_checks_off() {
    let http = r#"
environment = "live"
[snapshot]
source = "http"
url = "https://cp.internal/v1/snapshot"
[proxy]
listen = "127.0.0.1:8080"
upstream = "http://127.0.0.1:3000"
"#;
    for (var, key) in [
        ("KEYGATE__SNAPSHOT__MAX_STALENESS", "snapshot.max_staleness"),
        ("KEYGATE__SNAPSHOT__CA_FILE", "snapshot.ca_file"),
        ("KEYGATE__SNAPSHOT__TOKEN_ENV", "snapshot.token_env"),
        ("KEYGATE__USAGE__CA_FILE", "usage.ca_file"),
        ("KEYGATE__USAGE__TOKEN_ENV", "usage.token_env"),
        ("KEYGATE__SYNC_SERVER__TOKEN_ENV", "sync_server.token_env"),
    ] {
        for blank in ["", "  "] {
            let file = write_config(http);
            let err = load_with_env(file.path(), env(&[(var, blank)])).unwrap_err();
            let ConfigError::Invalid(problems) = err else {
                panic!("{var}={blank:?}: {err:?}")
            };
            assert!(
                problems
                    .iter()
                    .any(|p| p.key == key && p.message.starts_with("is empty")),
                "{var}={blank:?}: {problems:?}"
            );
        }
    }
    // In the file too.
    let got = problems(&http.replacen("[proxy]", "max_staleness = \"\"\n[proxy]", 1));
    assert!(
        got.iter().any(|p| p.key == "snapshot.max_staleness"),
        "{got:?}"
    );
}

/// A URL with a password in it is refused without being quoted: problems are printed and
/// logged. (A malformed one was echoed whole, password and all.)
#[test]
fn urls_with_credentials_are_refused_unquoted() {
    for (section, url, key) in [
        (
            "[snapshot]\nsource = \"http\"\nurl",
            "htps://svc:S3cretP4ss@cp.internal/v1/snapshot",
            "snapshot.url",
        ),
        (
            "[snapshot]\nsource = \"http\"\nurl",
            "https://svc:S3cretP4ss@cp.internal/v1/snapshot",
            "snapshot.url",
        ),
        (
            "[snapshot]\npath = \"keys.json\"\n[usage]\nreport_url",
            "https://svc:S3cretP4ss@billing.internal/usage",
            "usage.report_url",
        ),
        // A password with `/`, `?` or `#` in it ends the authority early: still refused, and
        // never quoted.
        (
            "[snapshot]\nsource = \"grpc\"\nurl",
            "https://sync:S3cret/P4ss@cp.internal:9393",
            "snapshot.url",
        ),
        (
            "[snapshot]\nsource = \"http\"\nurl",
            "https://user:S3cret#P4ss@cp.internal/v1/snapshot",
            "snapshot.url",
        ),
        (
            "[snapshot]\npath = \"keys.json\"\n[usage]\nreport_url",
            "https://u:S3cret?P4ss@billing.internal/usage",
            "usage.report_url",
        ),
    ] {
        let text = format!(
            "environment = \"live\"\n{section} = \"{url}\"\n[admin]\nlisten = \"127.0.0.1:9901\"\n"
        );
        let got = problems(&text);
        let p = got
            .iter()
            .find(|p| p.key == key)
            .unwrap_or_else(|| panic!("{url}: {got:?}"));
        let shown = format!("{got:?}");
        assert!(!shown.contains("S3cret"), "{shown}");
        assert!(!shown.contains("P4ss"), "{shown}");
        assert!(
            p.message.contains("user name or password") || p.message.contains("port"),
            "{p}"
        );
    }
    // An `@` in a path or a query is no password.
    let ok = "environment = \"live\"\n[snapshot]\nsource = \"http\"\nurl = \"https://cp.internal/v1/snapshot?owner=a@b.com\"\n[admin]\nlisten = \"127.0.0.1:9901\"\n";
    assert!(from_toml(ok).is_ok());
}

#[test]
fn values_that_pass_the_types_but_not_their_use_are_refused() {
    for (extra, key, message) in [
        (
            "[usage]\nreport_url = \"http://127.0.0.1:9/u\"\ninterval = \"1ns\"\n",
            "usage.interval",
            "less than 100ms",
        ),
        (
            "[runtime]\nworker_threads = 100000\n",
            "runtime.worker_threads",
            "100000 is more than 1024",
        ),
    ] {
        let got = problems(&format!("{WITH_PROXY}{extra}"));
        assert!(
            got.iter()
                .any(|p| p.key == key && p.message.contains(message)),
            "{extra}: {got:?}"
        );
    }
    assert!(from_toml(&format!("{WITH_PROXY}[runtime]\nworker_threads = 1024\n")).is_ok());
}

/// HTTP/2 keep-alive PINGs come before the idle timeout closes a quiet stream: unset, the
/// interval is at most half of `limits.idle_timeout`; set at or past it, it is refused.
#[test]
fn keep_alive_pings_come_within_the_idle_timeout() {
    let s = from_toml(&format!("{WITH_PROXY}\n[limits]\nidle_timeout = \"10s\"\n")).unwrap();
    assert_eq!(s.limits.http2_keep_alive_interval, Duration::from_secs(5));
    let s = from_toml(WITH_PROXY).unwrap();
    assert_eq!(s.limits.http2_keep_alive_interval, Duration::from_secs(30));
    assert_eq!(s.limits.idle_timeout, Duration::from_secs(180));
    let s = from_toml(&format!(
        "{WITH_PROXY}\n[limits]\nidle_timeout = \"10s\"\nhttp2_keep_alive_interval = \"9s\"\n"
    ))
    .unwrap();
    assert_eq!(s.limits.http2_keep_alive_interval, Duration::from_secs(9));
}

/// An environment override is the text it was written as where a key takes text, and a number
/// or a boolean where a key takes one. ("007" was read as 7 and given back as "7".)
#[test]
fn environment_overrides_keep_text_as_written() {
    let file = write_config(WITH_PROXY);
    let s = load_with_env(
        file.path(),
        env(&[
            ("KEYGATE__ENVIRONMENT", "007"),
            ("KEYGATE__IDENTITY_HEADERS__KEY_ID", "x-1e3"),
            ("KEYGATE__LIMITS__MAX_CONNECTIONS", "50"),
            ("KEYGATE__IDEMPOTENCY__REQUIRED", "true"),
            ("KEYGATE__AUTHZ_HTTP__LISTEN", "127.0.0.1:9192"),
            ("KEYGATE__AUTHZ_HTTP__TRUSTED_PROXIES", "10.0.0.1"),
        ]),
    )
    .unwrap();
    assert_eq!(s.policy.environment, "007");
    assert_eq!(s.headers.key_id.as_str(), "x-1e3");
    assert_eq!(s.limits.max_connections, 50);
    assert!(s.policy.idempotency_required);
    assert_eq!(
        s.authz_http.unwrap().trusted_proxies[..],
        ["10.0.0.1/32".parse().unwrap()]
    );
    // A number where text is wanted is still refused by name.
    let err = load_with_env(
        file.path(),
        env(&[("KEYGATE__LIMITS__MAX_CONNECTIONS", "many")]),
    )
    .unwrap_err();
    assert!(err.to_string().contains("max_connections"), "{err}");
}
