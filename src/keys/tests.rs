use super::*;
use serde_json::json;
use std::sync::Arc;

fn now() -> OffsetDateTime {
    OffsetDateTime::parse("2026-11-22T06:00:00Z", &Rfc3339).unwrap()
}

fn opts(partner: &str, env: &str, scopes: &[&str]) -> CreateOptions {
    CreateOptions {
        partner: partner.into(),
        environment: env.into(),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        ..CreateOptions::default()
    }
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// HMAC-SHA256 from RFC 2104 built on plain SHA-256, independent of the `hmac` crate.
fn reference_hmac(key: &[u8], msg: &[u8]) -> String {
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| block.iter().map(|b| b ^ byte).collect::<Vec<u8>>();
    let inner = Sha256::digest([pad(0x36), msg.to_vec()].concat());
    hex::encode(Sha256::digest([pad(0x5c), inner.to_vec()].concat()))
}

/// Names in the directory other than the snapshot and its lock file.
fn strays(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "keys.json" && n != "keys.json.lock")
        .collect()
}

fn sample_doc() -> Value {
    json!({
        "schema": SCHEMA, "revision": 42, "generated_at": "2026-11-20T06:00:00Z",
        "x_top": {"kept": [1, 2, 3]},
        "partners": [ { "id": "partner_acme", "org_id": "org_1", "status": "active", "x_partner": true } ],
        "keys": [ { "id": "key_8f2k1", "name": "Production", "prefix": "sk_live_4Fq9",
            "hash": format!("sha256:{}", "ab".repeat(32)), "partner_id": "partner_acme",
            "environment": "live", "scopes": ["analyses:read"], "status": "active",
            "created_at": "2026-01-15T10:30:00Z", "expires_at": null, "rate_limit_per_minute": 1000,
            "allowed_cidrs": ["10.0.0.0/8"], "allowed_referrers": [], "allowed_routes": [],
            "x_key": {"nested": "yes"} } ]
    })
}

fn write_doc(path: &Path, doc: &Value) {
    fs::write(path, serde_json::to_vec_pretty(doc).unwrap()).unwrap();
}

#[test]
fn create_on_missing_file_starts_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    let mut o = opts("partner_acme", "live", &["analyses:write", "analyses:read"]);
    o.org = Some("org_1".into());
    o.name = Some("Production".into());
    o.rate_limit_per_minute = Some(600);
    let c = create(&path, &o, now()).unwrap();

    assert_eq!(c.revision, 1);
    assert!(c.partner_added);
    assert!(c.secret.starts_with("sk_live_"), "default prefix");
    assert_eq!(c.display_prefix.len(), "sk_live_".len() + 4);
    assert!(c.secret.starts_with(&c.display_prefix));
    assert!(c.id.starts_with("key_") && c.id.len() == 16);
    assert!(c.id[4..].bytes().all(|b| b.is_ascii_alphanumeric()));

    let raw = fs::read_to_string(&path).unwrap();
    assert!(
        raw.ends_with("}\n") && raw.contains("\n  \""),
        "pretty with newline"
    );
    let doc = read_json(&path);
    assert_eq!(doc["schema"], SCHEMA);
    assert_eq!(doc["revision"], 1);
    assert_eq!(doc["generated_at"], "2026-11-22T06:00:00Z");
    assert_eq!(
        doc["partners"],
        json!([{"id": "partner_acme", "org_id": "org_1", "status": "active"}])
    );
    let key = &doc["keys"][0];
    let expected = json!({
        "id": c.id, "name": "Production", "prefix": c.display_prefix,
        "hash": format!("sha256:{}", sha256_hex(c.secret.as_bytes())),
        "partner_id": "partner_acme", "environment": "live",
        "scopes": ["analyses:read", "analyses:write"], "status": "active",
        "created_at": "2026-11-22T06:00:00Z", "expires_at": null, "rate_limit_per_minute": 600,
        "allowed_cidrs": [], "allowed_referrers": [], "allowed_routes": []
    });
    assert_eq!(key, &expected);
    assert_eq!(strays(dir.path()), Vec::<String>::new());

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}

#[test]
fn create_twice_bumps_revision_and_keeps_unknown_fields() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    write_doc(&path, &sample_doc());

    let later = now() + time::Duration::seconds(90);
    let first = create(&path, &opts("partner_acme", "live", &["a"]), now()).unwrap();
    let second = create(&path, &opts("partner_new", "test", &["b"]), later).unwrap();
    assert_eq!((first.revision, second.revision), (43, 44));
    assert!(!first.partner_added && second.partner_added);
    assert_ne!(first.id, second.id);

    let doc = read_json(&path);
    let before = sample_doc();
    assert_eq!(doc["revision"], 44);
    assert_eq!(doc["generated_at"], "2026-11-22T06:01:30Z");
    assert_eq!(doc["x_top"], before["x_top"]);
    assert_eq!(doc["partners"][0], before["partners"][0]);
    assert_eq!(doc["partners"][1]["id"], "partner_new");
    assert_eq!(doc["partners"][1]["org_id"], Value::Null);
    assert_eq!(doc["partners"].as_array().unwrap().len(), 2);
    assert_eq!(
        doc["keys"][0], before["keys"][0],
        "existing key byte-for-byte"
    );
    assert_eq!(doc["keys"][1]["id"], first.id.as_str());
    assert_eq!(doc["keys"][2]["id"], second.id.as_str());
    assert_eq!(
        doc["keys"][2]["name"],
        second.id.as_str(),
        "name defaults to id"
    );
    assert_eq!(doc["keys"][2]["rate_limit_per_minute"], Value::Null);
}

#[test]
fn hmac_digest_matches_an_independent_computation() {
    let long_pepper = vec![0x5a; 100]; // longer than the SHA-256 block: the key is hashed first
    let cases: [&[u8]; 3] = [b"k", b"a-longer-pepper-of-moderate-size", &long_pepper];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    for (i, pepper) in cases.iter().enumerate() {
        let mut o = opts("partner_acme", "live", &["a"]);
        o.pepper = Some(pepper.to_vec());
        let c = create(&path, &o, now()).unwrap();
        let doc = read_json(&path);
        let want = format!(
            "hmac-sha256:{}",
            reference_hmac(pepper, c.secret.as_bytes())
        );
        assert_eq!(doc["keys"][i]["hash"], want.as_str(), "case {i}");
    }
    // RFC 4231 test case 2 pins the reference itself.
    assert_eq!(
        reference_hmac(b"Jefe", b"what do ya want for nothing?"),
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    );
}

#[test]
fn a_peppered_file_gets_no_unpeppered_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    let mut peppered = opts("partner_acme", "live", &["a"]);
    peppered.pepper = Some(b"pepper".to_vec());
    create(&path, &peppered, now()).unwrap();
    let before = fs::read(&path).unwrap();

    let err = create(&path, &opts("partner_acme", "live", &["a"]), now()).unwrap_err();
    assert!(
        matches!(&err, KeysError::PepperNeeded(f) if f.ends_with("keys.json")),
        "{err}"
    );
    assert!(err.to_string().contains("--pepper-env"), "{err}");
    assert_eq!(
        fs::read(&path).unwrap(),
        before,
        "the file is left as it was"
    );

    // With the pepper it goes on; a file of sha256 digests may take a peppered key.
    create(&path, &peppered, now()).unwrap();
    let plain = dir.path().join("plain.json");
    create(&plain, &opts("partner_acme", "live", &["a"]), now()).unwrap();
    create(&plain, &peppered, now()).unwrap();
    let doc = read_json(&plain);
    assert!(doc["keys"][1]["hash"]
        .as_str()
        .unwrap()
        .starts_with("hmac-sha256:"));
}

#[test]
fn pepper_comes_from_the_environment_as_raw_bytes() {
    // No set_var: other tests may read the environment concurrently.
    let var = "KEYGATE_KEYS_TEST_PEPPER_UNSET_6c1f";
    assert!(matches!(pepper_from_env(var), Err(KeysError::PepperNotSet(v)) if v == var));
    let cases: &[(Option<&str>, Option<&[u8]>)] = &[
        (None, None),
        (Some(""), None),
        (Some("s3cret pepper"), Some(b"s3cret pepper")),
    ];
    for (value, want) in cases {
        let got = pepper_from("V", value.map(Into::into));
        assert_eq!(got.as_deref().ok(), *want, "{value:?}");
    }
}

#[test]
fn invalid_inputs_are_refused_before_touching_anything() {
    type Case = (&'static str, fn(&mut CreateOptions), fn(&KeysError) -> bool);
    let cases: &[Case] = &[
        (
            "empty partner",
            |o| o.partner.clear(),
            |e| matches!(e, KeysError::InvalidPartner(_)),
        ),
        (
            "partner with space",
            |o| o.partner = "a b".into(),
            |e| matches!(e, KeysError::InvalidPartner(_)),
        ),
        (
            "partner with slash",
            |o| o.partner = "acme/eu".into(),
            |e| matches!(e, KeysError::InvalidPartner(_)),
        ),
        (
            "partner of 129",
            |o| o.partner = "p".repeat(129),
            |e| matches!(e, KeysError::InvalidPartner(_)),
        ),
        (
            "empty env",
            |o| o.environment.clear(),
            |e| matches!(e, KeysError::InvalidEnvironment(_)),
        ),
        (
            "upper-case env",
            |o| o.environment = "Live".into(),
            |e| matches!(e, KeysError::InvalidEnvironment(_)),
        ),
        (
            "env with dot",
            |o| o.environment = "a.b".into(),
            |e| matches!(e, KeysError::InvalidEnvironment(_)),
        ),
        (
            "no scopes",
            |o| o.scopes.clear(),
            |e| matches!(e, KeysError::NoScopes),
        ),
        (
            "empty scope",
            |o| o.scopes = vec!["a,,b".into()],
            |e| matches!(e, KeysError::InvalidScope(_)),
        ),
        (
            "scope with space",
            |o| o.scopes = vec!["a b".into()],
            |e| matches!(e, KeysError::InvalidScope(s) if s == "a b"),
        ),
        (
            "non-ASCII scope",
            |o| o.scopes = vec!["lecture:é".into()],
            |e| matches!(e, KeysError::InvalidScope(_)),
        ),
        (
            "scope of 129",
            |o| o.scopes = vec!["s".repeat(129)],
            |e| matches!(e, KeysError::InvalidScope(_)),
        ),
        (
            "empty prefix",
            |o| o.prefix = Some(String::new()),
            |e| matches!(e, KeysError::InvalidPrefix(_)),
        ),
        (
            "prefix with dash",
            |o| o.prefix = Some("sk-live-".into()),
            |e| matches!(e, KeysError::InvalidPrefix(_)),
        ),
        (
            "prefix of 33",
            |o| o.prefix = Some("p".repeat(33)),
            |e| matches!(e, KeysError::InvalidPrefix(_)),
        ),
        (
            "non-ASCII prefix",
            |o| o.prefix = Some("sk_é_".into()),
            |e| matches!(e, KeysError::InvalidPrefix(_)),
        ),
        (
            "default prefix too long",
            |o| o.environment = "e".repeat(30),
            |e| matches!(e, KeysError::InvalidPrefix(_)),
        ),
        (
            "blank name",
            |o| o.name = Some("  ".into()),
            |e| matches!(e, KeysError::InvalidName(_)),
        ),
        (
            "name with newline",
            |o| o.name = Some("a\nb".into()),
            |e| matches!(e, KeysError::InvalidName(_)),
        ),
        (
            "org with space",
            |o| o.org = Some("org 1".into()),
            |e| matches!(e, KeysError::InvalidOrg(_)),
        ),
        (
            "expiry not RFC 3339",
            |o| o.expires_at = Some("2027-01-01".into()),
            |e| matches!(e, KeysError::InvalidExpiry { .. }),
        ),
        (
            "expiry past",
            |o| o.expires_at = Some("2020-01-01T00:00:00Z".into()),
            |e| matches!(e, KeysError::ExpiryNotInFuture { .. }),
        ),
        (
            "expiry now",
            |o| o.expires_at = Some("2026-11-22T06:00:00Z".into()),
            |e| matches!(e, KeysError::ExpiryNotInFuture { .. }),
        ),
        (
            "expiry beyond year 9999 in UTC",
            |o| o.expires_at = Some("9999-12-31T23:59:59-01:00".into()),
            |e| matches!(e, KeysError::InvalidExpiry { .. }),
        ),
        (
            "zero rate limit",
            |o| o.rate_limit_per_minute = Some(0),
            |e| matches!(e, KeysError::InvalidRateLimit),
        ),
        (
            "empty pepper",
            |o| o.pepper = Some(Vec::new()),
            |e| matches!(e, KeysError::EmptyPepper),
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    for (what, mutate, expected) in cases {
        let mut o = opts("partner_acme", "live", &["analyses:read"]);
        mutate(&mut o);
        let err = create(&path, &o, now()).expect_err(what);
        assert!(expected(&err), "{what}: got {err:?}");
        assert!(!err.to_string().is_empty());
        assert!(!path.exists(), "{what}: no snapshot written");
    }
}

#[test]
fn accepted_inputs_are_normalised() {
    type Case = (&'static str, fn(&mut CreateOptions), fn(&Value, &Created));
    let cases: &[Case] = &[
        (
            "scopes split, trimmed, sorted, deduplicated",
            |o| o.scopes = vec!["b, a".into(), "c".into(), "a".into()],
            |k, _| {
                assert_eq!(k["scopes"], json!(["a", "b", "c"]));
            },
        ),
        (
            "env with dash gets an underscore prefix",
            |o| o.environment = "pre-prod".into(),
            |k, c| {
                assert!(c.secret.starts_with("sk_pre_prod_"));
                assert_eq!(k["environment"], "pre-prod");
            },
        ),
        (
            "explicit prefix",
            |o| o.prefix = Some("kg_".into()),
            |k, c| {
                assert!(c.secret.starts_with("kg_"));
                assert_eq!(k["prefix"].as_str().unwrap().len(), 7);
            },
        ),
        (
            "expiry normalised to UTC seconds",
            |o| o.expires_at = Some("2027-01-31T01:00:00.75+01:00".into()),
            |k, c| {
                assert_eq!(k["expires_at"], "2027-01-31T00:00:00Z");
                assert_eq!(c.expires_at.as_deref(), Some("2027-01-31T00:00:00Z"));
            },
        ),
    ];
    for (what, mutate, check) in cases {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        let mut o = opts("partner_acme", "live", &["x"]);
        mutate(&mut o);
        let c = create(&path, &o, now()).unwrap_or_else(|e| panic!("{what}: {e}"));
        check(&read_json(&path)["keys"][0], &c);
    }
}

#[test]
fn org_must_agree_with_an_existing_partner() {
    let cases: &[(Option<&str>, bool)] =
        &[(None, true), (Some("org_1"), true), (Some("org_2"), false)];
    for (org, ok) in cases {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        write_doc(&path, &sample_doc());
        let before = fs::read(&path).unwrap();
        let mut o = opts("partner_acme", "live", &["a"]);
        o.org = org.map(String::from);
        match create(&path, &o, now()) {
            Ok(c) => {
                assert!(ok, "{org:?}");
                assert!(!c.partner_added);
                assert_eq!(read_json(&path)["partners"].as_array().unwrap().len(), 1);
            }
            Err(e) => {
                assert!(!ok, "{org:?}: {e}");
                assert!(matches!(e, KeysError::OrgMismatch { .. }), "{e:?}");
                assert!(e.to_string().contains("org_1") && e.to_string().contains("org_2"));
                assert_eq!(fs::read(&path).unwrap(), before, "file untouched");
            }
        }
    }
}

/// A partner entry a keygate would quarantine (no status, an org that is not text) does not
/// stop the tools: keys are listed, created for other partners and revoked; its fields are
/// written back as read, in the contract's order first.
#[test]
fn a_malformed_partner_blocks_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    let mut doc = sample_doc();
    doc["partners"].as_array_mut().unwrap().push(json!({
        "x_first": 1, "org_id": 7, "id": "partner_broken"
    }));
    write_doc(&path, &doc);

    assert_eq!(list(&path).unwrap().len(), 1);
    let c = create(&path, &opts("partner_broken", "live", &["a"]), now()).unwrap();
    assert_eq!(c.partner_status, "quarantined by keygate (no status)");
    assert!(render_created(&c, false)
        .contains("partner_broken is quarantined by keygate (no status); this key is refused"));
    let err = create(
        &path,
        &CreateOptions {
            org: Some("org_9".into()),
            ..opts("partner_broken", "live", &["a"])
        },
        now(),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("org_id 7 (not text), not org_9"),
        "{err}"
    );
    revoke(&path, &c.id, now()).unwrap();

    // Active, but with an org_id a keygate refuses: the key made is refused too, and said.
    let odd = dir.path().join("odd.json");
    let mut doc = sample_doc();
    doc["partners"][0]["org_id"] = json!("org 1");
    write_doc(&odd, &doc);
    let c = create(&odd, &opts("partner_acme", "live", &["a"]), now()).unwrap();
    assert!(
        c.partner_status
            .starts_with("quarantined by keygate (org_id \"org 1\""),
        "{}",
        c.partner_status
    );

    let text = String::from_utf8(fs::read(&path).unwrap()).unwrap();
    let broken = text.find("\"partner_broken\"").unwrap();
    let (org, first) = (
        text[broken..].find("\"org_id\"").unwrap(),
        text[broken..].find("\"x_first\"").unwrap(),
    );
    assert!(org < first, "contract fields first: {text}");
    let written = read_json(&path);
    assert_eq!(
        written["partners"][1],
        json!({"id": "partner_broken", "org_id": 7, "x_first": 1})
    );
    assert_eq!(written["partners"][0], sample_doc()["partners"][0]);
}

#[test]
fn inactive_partner_is_kept_and_noted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    let mut doc = sample_doc();
    doc["partners"][0]["status"] = json!("suspended");
    write_doc(&path, &doc);
    let c = create(&path, &opts("partner_acme", "live", &["a"]), now()).unwrap();
    assert_eq!(c.partner_status, "suspended");
    assert_eq!(read_json(&path)["partners"][0]["status"], "suspended");
    assert!(render_created(&c, false).contains("partner_acme is suspended"));
    let v: Value = serde_json::from_str(&render_created(&c, true)).unwrap();
    assert_eq!(v["partner_status"], "suspended");
    assert_eq!(v["partner_added"], false);
}

#[test]
fn render_created_prints_the_secret_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    let mut o = opts("partner_acme", "live", &["analyses:read"]);
    o.expires_at = Some("2027-01-01T00:00:00Z".into());
    let c = create(&path, &o, now()).unwrap();
    let digest = read_json(&path)["keys"][0]["hash"]
        .as_str()
        .unwrap()
        .to_string();

    for json in [false, true] {
        let out = render_created(&c, json);
        assert_eq!(out.matches(&c.secret).count(), 1, "json={json}: {out}");
        assert!(
            !out.contains(&digest) && !out.contains("sha256"),
            "json={json}"
        );
    }
    let text = render_created(&c, false);
    assert!(text.contains("shown once, store it now"));
    assert!(text.contains(&c.id) && text.contains(&c.display_prefix));

    let v: Value = serde_json::from_str(&render_created(&c, true)).unwrap();
    let mut fields: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    fields.sort_unstable();
    assert_eq!(
        fields,
        [
            "created_at",
            "environment",
            "expires_at",
            "id",
            "partner_added",
            "partner_id",
            "partner_status",
            "prefix",
            "revision",
            "scopes",
            "secret"
        ]
    );
    assert_eq!(v["secret"], c.secret.as_str());
    assert_eq!(v["prefix"], c.display_prefix.as_str());
    assert_eq!(v["expires_at"], "2027-01-01T00:00:00Z");
    assert_eq!(v["revision"], 1);

    assert!(
        !format!("{c:?}").contains(&c.secret),
        "Debug redacts the secret"
    );
    let mut o = o.clone();
    o.pepper = Some(b"pepper-bytes".to_vec());
    assert!(
        !format!("{o:?}").contains("pepper-bytes"),
        "Debug redacts the pepper"
    );
}

#[test]
fn list_never_shows_a_secret_or_digest() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    let mut doc = sample_doc();
    doc["keys"][0]["name"] = json!("Production\tEU"); // hand-edited: control characters
    write_doc(&path, &doc);
    let mut peppered = opts("partner_b", "test", &["x:read", "x:write"]);
    peppered.pepper = Some(b"pepper".to_vec());
    peppered.name = Some("Staging box".into());
    let secrets = [
        create(&path, &opts("partner_acme", "live", &["a"]), now())
            .unwrap()
            .secret,
        create(&path, &peppered, now()).unwrap().secret,
    ];
    let doc = read_json(&path);
    let digests: Vec<String> = doc["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            k["hash"]
                .as_str()
                .unwrap()
                .split(':')
                .nth(1)
                .unwrap()
                .to_string()
        })
        .collect();

    let keys = list(&path).unwrap();
    assert_eq!(keys.len(), 3);
    assert_eq!(keys[0].id, "key_8f2k1");
    assert_eq!(keys[0].name.as_deref(), Some("Production\tEU"));
    assert_eq!(keys[0].prefix, "sk_live_4Fq9");
    assert_eq!(keys[2].scopes, ["x:read", "x:write"]);

    for json in [false, true] {
        let out = render_list(&keys, json);
        for s in &secrets {
            assert!(!out.contains(s.as_str()), "json={json}: secret leaked");
        }
        for d in &digests {
            assert!(!out.contains(d.as_str()), "json={json}: digest leaked");
        }
        assert!(
            !out.contains("sha256") && !out.contains("hash"),
            "json={json}"
        );
    }
    let v: Value = serde_json::from_str(&render_list(&keys, true)).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 3);
    assert_eq!(v[0]["id"], "key_8f2k1");

    let text = render_list(&keys, false);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4);
    assert!(lines[0].starts_with("ID") && lines[0].contains("EXPIRES"));
    let col = lines[0].find("PARTNER").unwrap();
    assert!(
        lines
            .iter()
            .skip(1)
            .all(|l| l[col..].starts_with("partner_")),
        "aligned:\n{text}"
    );
    assert!(
        text.contains("Production\\tEU"),
        "control characters escaped"
    );
    assert!(text.contains("Staging box"));
    assert_eq!(render_list(&[], false), "no keys");
    assert_eq!(render_list(&[], true), "[]");
}

#[test]
fn revoke_then_revoke_again() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    write_doc(&path, &sample_doc());
    let later = now() + time::Duration::hours(1);

    let r = revoke(&path, "key_8f2k1", now()).unwrap();
    assert_eq!((r.already_revoked, r.revision), (false, 43));
    let doc = read_json(&path);
    assert_eq!(doc["keys"][0]["status"], "revoked");
    assert_eq!(doc["generated_at"], "2026-11-22T06:00:00Z");
    assert_eq!(doc["keys"][0]["x_key"], json!({"nested": "yes"}));
    assert!(render_revoked(&r, false).starts_with("Revoked key key_8f2k1 (Production)"));

    let before = fs::read(&path).unwrap();
    let again = revoke(&path, "key_8f2k1", later).unwrap();
    assert_eq!((again.already_revoked, again.revision), (true, 43));
    assert_eq!(
        fs::read(&path).unwrap(),
        before,
        "no write when nothing changes"
    );
    assert!(render_revoked(&again, false).contains("already revoked"));
    let v: Value = serde_json::from_str(&render_revoked(&again, true)).unwrap();
    assert_eq!(v["already_revoked"], true);
    assert_eq!(list(&path).unwrap()[0].status, "revoked");
}

#[test]
fn revoke_of_an_unknown_id_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    write_doc(&path, &sample_doc());
    let before = fs::read(&path).unwrap();
    let err = revoke(&path, "key_nope", now()).unwrap_err();
    assert!(matches!(&err, KeysError::UnknownKey { id, .. } if id == "key_nope"));
    assert!(err.to_string().contains("key_nope"));
    assert_eq!(fs::read(&path).unwrap(), before);
}

#[test]
fn missing_snapshot_is_an_error_for_list_and_revoke() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    assert!(matches!(
        list(&path),
        Err(KeysError::SnapshotMissing { .. })
    ));
    assert!(matches!(
        revoke(&path, "key_x", now()),
        Err(KeysError::SnapshotMissing { .. })
    ));
    assert!(!path.exists());
}

#[test]
fn other_documents_are_refused_and_left_alone() {
    type Case = (&'static str, &'static str, fn(&KeysError) -> bool);
    let cases: &[Case] = &[
        ("empty file", "", |e| {
            matches!(e, KeysError::NotASnapshot { .. })
        }),
        ("not JSON", "hello", |e| {
            matches!(e, KeysError::NotASnapshot { .. })
        }),
        ("array", "[1, 2]", |e| {
            matches!(e, KeysError::NotASnapshot { .. })
        }),
        ("no schema", r#"{"revision": 1}"#, |e| {
            matches!(e, KeysError::NotASnapshot { .. })
        }),
        (
            "other schema",
            r#"{"schema": "keygate.snapshot/v2", "revision": 1}"#,
            |e| matches!(e, KeysError::NotASnapshot { reason, .. } if reason.contains("v2")),
        ),
        ("schema not a string", r#"{"schema": 1}"#, |e| {
            matches!(e, KeysError::NotASnapshot { .. })
        }),
        ("no revision", r#"{"schema": "keygate.snapshot/v1"}"#, |e| {
            matches!(e, KeysError::Malformed { .. })
        }),
        (
            "keys not a list",
            r#"{"schema": "keygate.snapshot/v1", "revision": 1, "keys": {}}"#,
            |e| matches!(e, KeysError::Malformed { .. }),
        ),
    ];
    for (what, content, expected) in cases {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        fs::write(&path, content).unwrap();
        let results = [
            create(&path, &opts("partner_acme", "live", &["a"]), now()).map(|_| ()),
            revoke(&path, "key_8f2k1", now()).map(|_| ()),
            list(&path).map(|_| ()),
        ];
        for result in results {
            let err = result.expect_err(what);
            assert!(expected(&err), "{what}: {err:?}");
        }
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            *content,
            "{what}: untouched"
        );
        assert_eq!(strays(dir.path()), Vec::<String>::new(), "{what}");
    }
}

#[test]
fn failed_replace_leaves_target_and_no_temp_file() {
    // Renaming a file over a non-empty directory fails even for root.
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("keys.json");
    fs::create_dir(&target).unwrap();
    fs::write(target.join("inside"), "x").unwrap();
    let err = write_atomic(&target, b"{}\n").unwrap_err();
    assert!(
        matches!(
            err,
            KeysError::Io {
                action: "replace",
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(fs::read_to_string(target.join("inside")).unwrap(), "x");
    assert_eq!(strays(dir.path()), Vec::<String>::new());
}

#[cfg(unix)]
#[test]
fn read_only_directory_leaves_snapshot_untouched() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    create(&path, &opts("partner_acme", "live", &["a"]), now()).unwrap();
    let before = fs::read(&path).unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o555)).unwrap();
    let probe = dir.path().join("probe");
    if fs::write(&probe, "").is_ok() {
        // Running as root: permissions do not stop writes, so this case says nothing.
        let _ = fs::remove_file(&probe);
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        eprintln!("skipped: directory permissions are not enforced for this user");
        return;
    }
    let result = create(&path, &opts("partner_acme", "live", &["b"]), now());
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    assert!(matches!(result, Err(KeysError::Io { .. })), "{result:?}");
    assert_eq!(fs::read(&path).unwrap(), before);
    assert_eq!(strays(dir.path()), Vec::<String>::new());
}

#[cfg(unix)]
#[test]
fn existing_permissions_are_kept() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    write_doc(&path, &sample_doc());
    fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
    create(&path, &opts("partner_acme", "live", &["a"]), now()).unwrap();
    revoke(&path, "key_8f2k1", now()).unwrap();
    let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o640);
}

#[cfg(unix)]
#[test]
fn a_symlinked_snapshot_is_edited_through_the_link() {
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("keys.json");
    write_doc(&real, &sample_doc());
    let link = dir.path().join("link.json");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    create(&link, &opts("partner_acme", "live", &["a"]), now()).unwrap();
    assert!(fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(read_json(&real)["revision"], 43);
}

#[test]
fn concurrent_creates_lose_nothing() {
    const THREADS: usize = 4;
    const EACH: usize = 5;
    let dir = tempfile::tempdir().unwrap();
    let path = Arc::new(dir.path().join("keys.json"));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let path = Arc::clone(&path);
            std::thread::spawn(move || {
                (0..EACH)
                    .map(|_| {
                        create(&path, &opts(&format!("partner_{t}"), "live", &["a"]), now())
                            .unwrap()
                            .id
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut ids: Vec<String> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    ids.sort();

    let doc = read_json(&path);
    assert_eq!(doc["revision"], (THREADS * EACH) as u64);
    assert_eq!(doc["partners"].as_array().unwrap().len(), THREADS);
    let mut stored: Vec<String> = list(&path).unwrap().into_iter().map(|k| k.id).collect();
    stored.sort();
    assert_eq!(stored, ids);
    stored.dedup();
    assert_eq!(stored.len(), THREADS * EACH, "ids unique");
    assert_eq!(strays(dir.path()), Vec::<String>::new());
}

/// A snapshot restored from a backup, or made again, goes back to a lower revision than a
/// running keygate has in force, which refuses it: the next edit (a revocation) would never
/// take effect. The lock file remembers the highest revision written, and the edit goes past it.
#[test]
fn an_edit_after_a_restore_goes_past_every_revision_written() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    let first = create(&path, &opts("partner_acme", "live", &["a:b"]), now()).unwrap();
    let backup = dir.path().join("backup.json");
    fs::copy(&path, &backup).unwrap();
    create(&path, &opts("partner_acme", "live", &["a:b"]), now()).unwrap();
    assert_eq!(read_json(&path)["revision"], 2);
    fs::copy(&backup, &path).unwrap(); // back to revision 1
    let r = revoke(&path, &first.id, now()).unwrap();
    assert_eq!(r.revision, 3, "past the 2 a keygate may have in force");
    assert_eq!(read_json(&path)["revision"], 3);
    // Made again from nothing: the same.
    fs::remove_file(&path).unwrap();
    let again = create(&path, &opts("partner_acme", "live", &["a:b"]), now()).unwrap();
    assert_eq!(again.revision, 4);
}

/// An entry a keygate would quarantine (a field missing, or of the wrong type) is listed with
/// what it has and can be revoked; it never stops an edit of the others, and every entry is
/// written back as it was.
#[test]
fn entries_a_keygate_would_quarantine_do_not_block_the_tools() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    let mut doc = sample_doc();
    doc["keys"].as_array_mut().unwrap().extend([
        json!({"id": "key_from_cp", "hash": format!("sha256:{}", "cd".repeat(32)),
               "partner_id": "partner_acme", "environment": "live", "scopes": ["a:b"],
               "status": "active"}),
        json!({"id": "key_odd", "scopes": "a:b", "status": "active", "created_at": 7}),
    ]);
    write_doc(&path, &doc);
    let listed = list(&path).unwrap();
    let ids: Vec<&str> = listed.iter().map(|k| k.id.as_str()).collect();
    assert_eq!(ids, ["key_8f2k1", "key_from_cp", "key_odd"]);
    assert_eq!(listed[1].prefix, "");
    assert!(listed[2].scopes.is_empty());
    let r = revoke(&path, "key_odd", now()).unwrap();
    assert!(!r.already_revoked);
    create(&path, &opts("partner_acme", "live", &["a:b"]), now()).unwrap();
    let after = read_json(&path);
    let keys = after["keys"].as_array().unwrap();
    assert_eq!(keys[0], doc["keys"][0], "untouched");
    assert_eq!(keys[1], doc["keys"][1], "untouched");
    let mut odd = doc["keys"][2].clone();
    odd["status"] = json!("revoked");
    assert_eq!(keys[2], odd, "only its status changed");
    // An entry without an id is named by its place.
    doc["keys"]
        .as_array_mut()
        .unwrap()
        .push(json!({"status": "active"}));
    write_doc(&path, &doc);
    let Err(err) = list(&path) else {
        panic!("an entry without an id was read")
    };
    let err = err.to_string();
    assert!(err.contains("key entry 3"), "{err}");
}

/// The lock file made by one user (root, with `sudo`) gets the snapshot's mode, so that the
/// service account it belongs to can still lock it.
#[cfg(unix)]
#[test]
fn the_lock_file_gets_the_snapshots_mode() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    write_doc(&path, &sample_doc());
    fs::set_permissions(&path, fs::Permissions::from_mode(0o660)).unwrap();
    create(&path, &opts("partner_acme", "live", &["a:b"]), now()).unwrap();
    let mode = fs::metadata(dir.path().join("keys.json.lock"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o660);
}

/// A field twice in one entry: a keygate leaves the entry out; read here, the last copy would
/// win and be written back alone (a key both revoked and active would come back active at an
/// unrelated edit). The tools refuse the file, naming where, and leave it as it was.
#[test]
fn a_field_twice_in_one_entry_is_refused_not_laundered() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    let text = r#"{"schema": "keygate.snapshot/v1", "revision": 3,
 "partners": [{"id": "partner_acme", "status": "active"}],
 "keys": [{"id": "key_twice", "partner_id": "partner_acme", "status": "revoked",
           "status": "active"}]}"#;
    fs::write(&path, text).unwrap();
    let err = create(&path, &opts("partner_acme", "live", &["a:b"]), now())
        .err()
        .map(|e| e.to_string());
    let err = err.expect("refused");
    assert!(
        err.contains("appears twice") && err.contains("line 4"),
        "{err}"
    );
    assert_eq!(
        fs::read_to_string(&path).unwrap(),
        text,
        "the file was changed"
    );
}

/// Whoever may write the snapshot's directory could point `keys.json.lock` at another file:
/// a root edit would have handed it over (owner, mode) and overwritten it. A lock file that is
/// a symlink, or another file's hard link, is refused and left alone.
#[cfg(unix)]
#[test]
fn a_lock_file_that_is_a_link_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    write_doc(&path, &sample_doc());
    let victim = dir.path().join("victim");
    fs::write(&victim, "precious\n").unwrap();
    let lock = dir.path().join("keys.json.lock");
    std::os::unix::fs::symlink(&victim, &lock).unwrap();
    let err = create(&path, &opts("partner_acme", "live", &["a:b"]), now());
    assert!(err.is_err(), "edited through a symlinked lock file");
    fs::remove_file(&lock).unwrap();
    fs::hard_link(&victim, &lock).unwrap();
    let err = revoke(&path, "key_8f2k1", now())
        .err()
        .map(|e| e.to_string());
    assert!(
        err.is_some_and(|e| e.contains("one link")),
        "edited through a hard link"
    );
    assert_eq!(fs::read_to_string(&victim).unwrap(), "precious\n");
    assert_eq!(read_json(&path)["revision"], 42, "the snapshot was edited");
}

/// A key is written with the contract's fields in their order (id, name, prefix, hash, …),
/// then the others: an edit does not reorder every entry of a file written before.
#[test]
fn keys_are_written_in_the_contracts_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    create(&path, &opts("partner_acme", "live", &["a:b"]), now()).unwrap();
    let text = fs::read_to_string(&path).unwrap();
    let at = |field: &str| text.find(&format!("\"{field}\"")).unwrap();
    let order = [
        "id",
        "name",
        "prefix",
        "hash",
        "partner_id",
        "environment",
        "scopes",
    ];
    for pair in order.windows(2) {
        assert!(at(pair[0]) < at(pair[1]), "{} after {}", pair[0], pair[1]);
    }
    assert!(at("expires_at") < at("allowed_cidrs"));
}
