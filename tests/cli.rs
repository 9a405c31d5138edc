//! The real `keygate` binary: key tooling, `snapshot check`, `config check`, `serve` start-up
//! and SIGTERM, and `demo` — the README's first command — end to end. Every test spawns the
//! built executable and asserts its exit code and what it printed.

mod support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::json;
use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_keygate");

fn keygate(args: &[&str]) -> Output {
    keygate_env(args, &[])
}

/// Run keygate with extra environment variables; `KEYGATE__…` from the test's own environment
/// are removed so that only the file (and `env`) decide.
fn keygate_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args).stdin(Stdio::null());
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("KEYGATE")) {
        cmd.env_remove(k);
    }
    cmd.envs(env.iter().copied());
    cmd.output().expect("keygate runs")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Any run of 64 or more hex digits: what a printed digest would look like.
fn digest_like(t: &str) -> bool {
    t.split(|c: char| !c.is_ascii_hexdigit())
        .any(|w| w.len() >= 64)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Kills the child when dropped, so a failed assertion leaves no process behind.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Running {
    /// `kill -TERM` without waiting.
    fn signal(&self) {
        let pid = self.0.id().to_string();
        let sent = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill runs");
        assert!(sent.success(), "kill -TERM {pid} failed");
    }

    /// `kill -TERM`, then wait (with a deadline) for the exit status.
    async fn terminate(&mut self, deadline: Duration) -> ExitStatus {
        self.signal();
        self.wait(deadline).await
    }

    /// Wait (with a deadline) for the exit status.
    async fn wait(&mut self, deadline: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status;
            }
            assert!(
                start.elapsed() < deadline,
                "no exit {deadline:?} after SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// `keys create … --json` for partner_acme in live; returns the printed object.
fn create(snapshot: &Path, scopes: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "keys",
        "create",
        "--snapshot",
        s(snapshot),
        "--partner",
        "partner_acme",
        "--org",
        "org_1",
        "--env",
        "live",
        "--scopes",
        scopes,
        "--json",
    ];
    args.extend_from_slice(extra);
    let o = keygate(&args);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "keys create failed: {err}");
    let v: serde_json::Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("--json output is one JSON value ({e}): {out}"));
    assert!(v.is_object(), "--json prints an object: {out}");
    v
}

fn read_doc(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).expect("snapshot is JSON")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

// ---------------------------------------------------------------------------------------------
// keys create

#[tokio::test]
async fn keys_create_prints_the_secret_once_and_the_key_authenticates() {
    let dir = tempfile::tempdir().unwrap();
    let snapshot = dir.path().join("keys.json");

    // Text output on a file that does not exist yet: the secret exactly once, on stdout only.
    let o = keygate(&[
        "keys",
        "create",
        "--snapshot",
        s(&snapshot),
        "--partner",
        "partner_acme",
        "--org",
        "org_1",
        "--env",
        "live",
        "--scopes",
        "analyses:read",
        "--name",
        "first",
    ]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    let secrets: Vec<&str> = out
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("sk_live_") && w.len() > 12)
        .collect();
    assert_eq!(secrets.len(), 1, "one secret-shaped word in: {out}");
    let first_secret = secrets[0].to_owned();
    assert_eq!(
        first_secret.len(),
        "sk_live_".len() + 32 + 6,
        "prefix + 32 body + 6 checksum: {first_secret}"
    );
    assert!(
        keygate::credential::has_valid_checksum(&first_secret, "sk_live_"),
        "the minted key carries a valid checksum: {first_secret}"
    );
    assert_eq!(out.matches(&first_secret).count(), 1, "printed once: {out}");
    assert!(!err.contains(&first_secret), "the secret went to stderr");
    assert!(!digest_like(&out), "a digest was printed: {out}");

    let doc = read_doc(&snapshot);
    assert_eq!(doc["schema"], "keygate.snapshot/v1");
    assert_eq!(doc["revision"], 1);
    assert_eq!(doc["keys"].as_array().unwrap().len(), 1, "{doc}");
    let stored = &doc["keys"][0];
    assert_eq!(
        stored["hash"],
        digest(&first_secret),
        "sha256 of the secret"
    );
    assert_eq!(stored["name"], "first");
    assert_eq!(stored["partner_id"], "partner_acme");
    assert_eq!(stored["status"], "active");
    assert_eq!(doc["partners"][0]["id"], "partner_acme");
    assert_eq!(doc["partners"][0]["org_id"], "org_1");
    let file_text = std::fs::read_to_string(&snapshot).unwrap();
    assert!(
        !file_text.contains(&first_secret),
        "the file holds the secret"
    );
    let first_id = stored["id"].as_str().unwrap().to_owned();
    assert!(out.contains(&first_id), "the id is printed: {out}");

    // --json: one object with every documented field, the next revision.
    let created = create(&snapshot, "analyses:read,analyses:write", &[]);
    for field in [
        "id",
        "secret",
        "prefix",
        "partner_id",
        "environment",
        "scopes",
        "created_at",
        "revision",
    ] {
        assert!(!created[field].is_null(), "--json lacks {field}: {created}");
    }
    let id = created["id"].as_str().unwrap().to_owned();
    let key = created["secret"].as_str().unwrap().to_owned();
    let prefix = created["prefix"].as_str().unwrap();
    assert_ne!(id, first_id);
    assert!(
        key.starts_with("sk_live_"),
        "default prefix sk_live_: {key}"
    );
    assert!(
        key.starts_with(prefix) && prefix.len() > "sk_live_".len() && prefix.len() < key.len(),
        "display prefix {prefix} is a proper prefix of the secret"
    );
    assert_eq!(created["partner_id"], "partner_acme");
    assert_eq!(created["environment"], "live");
    assert_eq!(
        created["scopes"],
        json!(["analyses:read", "analyses:write"])
    );
    assert_eq!(created["revision"], 2);
    let created_at = created["created_at"].as_str().unwrap();
    time::OffsetDateTime::parse(created_at, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("created_at {created_at:?} is not RFC 3339: {e}"));
    let doc = read_doc(&snapshot);
    assert_eq!(doc["revision"], 2);
    assert_eq!(
        doc["keys"].as_array().unwrap().len(),
        2,
        "the first key kept"
    );
    assert_eq!(
        doc["partners"].as_array().unwrap().len(),
        1,
        "the partner is not added twice"
    );
    assert!(!std::fs::read_to_string(&snapshot).unwrap().contains(&key));

    // Both keys work through a real gate reading that file.
    let upstream = Upstream::start().await;
    let gate = Gate::start(&config_toml(&snapshot, upstream.addr, "")).await;
    gate.wait_revision(2).await;
    let a = get(
        &client(),
        &gate.url("/v1/analyses/1"),
        &[("authorization", &format!("Bearer {key}"))],
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let seen = upstream.last();
    assert_eq!(seen.headers["x-key-id"], id.as_str());
    assert_eq!(seen.headers["x-partner-id"], "partner_acme");
    let a = get(
        &client(),
        &gate.url("/v1/analyses/1"),
        &[("x-api-key", &first_secret)],
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(upstream.last().headers["x-key-id"], first_id.as_str());
    gate.stop().await;
}

#[test]
fn keys_create_refuses_bad_input_and_leaves_the_file_alone() {
    let dir = tempfile::tempdir().unwrap();
    let snapshot = dir.path().join("keys.json");

    let refused = |args: &[&str], names: &str| {
        let o = keygate(args);
        let (out, err) = text(&o);
        assert!(!o.status.success(), "{args:?} was accepted: {out}");
        assert!(err.contains(names), "{args:?}: error names {names}: {err}");
        assert!(!out.contains("sk_"), "{args:?} printed a key: {out}");
    };
    let base = |env: &'static str, scopes: &'static str| {
        vec![
            "keys",
            "create",
            "--snapshot",
            s(&snapshot),
            "--partner",
            "partner_acme",
            "--env",
            env,
            "--scopes",
            scopes,
        ]
    };
    refused(&base("li ve", "analyses:read"), "--env");
    refused(&base("live", ""), "scopes");
    let mut bad_expiry = base("live", "analyses:read");
    bad_expiry.extend_from_slice(&["--expires-at", "tomorrow"]);
    refused(&bad_expiry, "--expires-at");
    let mut past = base("live", "analyses:read");
    past.extend_from_slice(&["--expires-at", "2020-01-01T00:00:00Z"]);
    refused(&past, "not in the future");
    let mut zero = base("live", "analyses:read");
    zero.extend_from_slice(&["--rate-limit", "0"]);
    refused(&zero, "--rate-limit");
    refused(&base("live", "a b"), "\"a b\"");
    assert!(!snapshot.exists(), "a refused create wrote the file");

    // A partner's org is not silently changed.
    create(&snapshot, "analyses:read", &[]);
    let before = std::fs::read(&snapshot).unwrap();
    let mut other_org = base("live", "analyses:read");
    other_org.extend_from_slice(&["--org", "org_2"]);
    refused(&other_org, "org_1");
    assert_eq!(std::fs::read(&snapshot).unwrap(), before, "file changed");

    // A file that is not a snapshot is never overwritten.
    let other = dir.path().join("other.json");
    std::fs::write(&other, r#"{"schema":"something/v2","revision":7}"#).unwrap();
    let before = std::fs::read(&other).unwrap();
    let o = keygate(&[
        "keys",
        "create",
        "--snapshot",
        s(&other),
        "--partner",
        "partner_acme",
        "--env",
        "live",
        "--scopes",
        "analyses:read",
    ]);
    assert!(!o.status.success(), "{}", text(&o).0);
    assert!(
        text(&o).1.contains("other.json"),
        "names the file: {}",
        text(&o).1
    );
    assert_eq!(std::fs::read(&other).unwrap(), before, "file changed");
}

/// A snapshot reached through a symlink (a mounted volume, a ConfigMap): the link stays, the
/// target is edited. `--prefix`, `--expires-at` and `--rate-limit` reach the file and the key
/// works through a gate.
#[tokio::test]
async fn keys_create_through_a_symlink_with_options() {
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("real.json");
    let link = dir.path().join("keys.json");
    create(&real, "analyses:read", &[]);
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let created = create(
        &link,
        "analyses:read",
        &[
            "--prefix",
            "legacy_",
            "--expires-at",
            "2999-01-31T00:00:00Z",
            "--rate-limit",
            "600",
        ],
    );
    assert!(
        std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink(),
        "the symlink was replaced by a file"
    );
    let key = created["secret"].as_str().unwrap();
    assert!(key.starts_with("legacy_"), "{key}");
    assert!(created["prefix"].as_str().unwrap().starts_with("legacy_"));
    assert_eq!(created["revision"], 2);
    let doc = read_doc(&real);
    assert_eq!(doc["revision"], 2);
    let stored = &doc["keys"][1];
    assert_eq!(stored["id"], created["id"]);
    assert_eq!(stored["expires_at"], "2999-01-31T00:00:00Z");
    assert_eq!(stored["rate_limit_per_minute"], 600);

    let upstream = Upstream::start().await;
    let gate = Gate::start(&config_toml(&link, upstream.addr, "")).await;
    gate.wait_revision(2).await;
    let a = get(
        &client(),
        &gate.url("/v1/analyses/1"),
        &[("x-api-key", key)],
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(
        upstream.last().headers["x-key-id"],
        created["id"].as_str().unwrap()
    );
    gate.stop().await;
}

// ---------------------------------------------------------------------------------------------
// keys list

#[test]
fn keys_list_shows_ids_and_prefixes_never_secrets_or_digests() {
    let dir = tempfile::tempdir().unwrap();
    let snapshot = dir.path().join("keys.json");
    let a = create(&snapshot, "analyses:read", &[]);
    let b = create(&snapshot, "analyses:write", &["--name", "second"]);
    let file_text = std::fs::read_to_string(&snapshot).unwrap();
    let hashes: Vec<String> = read_doc(&snapshot)["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["hash"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(hashes.len(), 2, "{file_text}");

    let check = |out: &str| {
        for k in [&a, &b] {
            let (id, prefix, secret) = (
                k["id"].as_str().unwrap(),
                k["prefix"].as_str().unwrap(),
                k["secret"].as_str().unwrap(),
            );
            assert!(out.contains(id), "id {id} missing: {out}");
            assert!(out.contains(prefix), "prefix {prefix} missing: {out}");
            assert!(!out.contains(secret), "list printed a secret: {out}");
        }
        for h in &hashes {
            let hex = h.split_once(':').unwrap().1;
            assert!(!out.contains(hex), "list printed a digest: {out}");
        }
        assert!(!out.contains("sha256:"), "list printed a digest: {out}");
        assert!(
            !digest_like(out),
            "list printed something digest-like: {out}"
        );
    };

    let o = keygate(&["keys", "list", "--snapshot", s(&snapshot)]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    check(&out);
    assert!(!err.contains("sk_live_") && !digest_like(&err), "{err}");
    assert!(out.contains("second"), "the name is shown: {out}");

    let o = keygate(&["keys", "list", "--snapshot", s(&snapshot), "--json"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    check(&out);
    let rows: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("list --json is JSON ({e}): {out}"));
    let rows = rows.as_array().expect("an array");
    assert_eq!(rows.len(), 2);
    for (row, k) in rows.iter().zip([&a, &b]) {
        assert_eq!(row["id"], k["id"]);
        assert_eq!(row["prefix"], k["prefix"]);
        assert_eq!(row["status"], "active");
        assert_eq!(row["partner_id"], "partner_acme");
        for absent in ["hash", "secret", "digest"] {
            assert!(row.get(absent).is_none(), "row has {absent}: {row}");
        }
    }

    // A missing snapshot is an error naming it, not an empty list.
    let missing = dir.path().join("nope.json");
    let o = keygate(&["keys", "list", "--snapshot", s(&missing)]);
    assert!(!o.status.success(), "{}", text(&o).0);
    assert!(text(&o).1.contains("nope.json"), "{}", text(&o).1);
}

// ---------------------------------------------------------------------------------------------
// keys revoke

#[tokio::test]
async fn keys_revoke_is_refused_by_a_running_gate_within_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let snapshot = dir.path().join("keys.json");
    let keep = create(&snapshot, "analyses:read", &[]);
    let gone = create(&snapshot, "analyses:read", &[]);
    let id = gone["id"].as_str().unwrap().to_owned();
    let key = gone["secret"].as_str().unwrap().to_owned();
    let kept = keep["secret"].as_str().unwrap().to_owned();

    let upstream = Upstream::start().await;
    let gate = Gate::start(&config_toml(&snapshot, upstream.addr, "")).await;
    gate.wait_revision(2).await;
    let a = get(
        &client(),
        &gate.url("/v1/analyses/1"),
        &[("x-api-key", &key)],
    )
    .await;
    assert_eq!(a.status, 200, "before revoke: {:?}", a.body);

    let start = Instant::now();
    let o = keygate(&["keys", "revoke", "--snapshot", s(&snapshot), &id]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(out.contains(&id), "names the revoked key: {out}");
    assert!(!out.contains(&key) && !digest_like(&out), "{out}");
    let doc = read_doc(&snapshot);
    assert_eq!(doc["revision"], 3);
    assert_eq!(doc["keys"][1]["status"], "revoked");
    assert_eq!(doc["keys"][0]["status"], "active");

    let in_force = eventually(Duration::from_secs(1), || gate.revision() == Some(3)).await;
    assert!(in_force, "revision 3 not in force {:?}", start.elapsed());
    let a = get(
        &client(),
        &gate.url("/v1/analyses/1"),
        &[("x-api-key", &key)],
    )
    .await;
    assert_error(&a, 401, "key_revoked");
    let elapsed = start.elapsed();
    assert!(
        elapsed < Duration::from_secs(1),
        "refused only after {elapsed:?}"
    );
    let a = get(
        &client(),
        &gate.url("/v1/analyses/1"),
        &[("x-api-key", &kept)],
    )
    .await;
    assert_eq!(a.status, 200, "the other key still works: {:?}", a.body);

    // keys list shows the status.
    let o = keygate(&["keys", "list", "--snapshot", s(&snapshot), "--json"]);
    let rows: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(rows[1]["status"], "revoked", "{rows}");

    // Revoking again is not an error and does not bump the revision.
    let o = keygate(&["keys", "revoke", "--snapshot", s(&snapshot), &id]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o).1);
    assert_eq!(read_doc(&snapshot)["revision"], 3);

    // An unknown id: non-zero, the id named, the file untouched.
    let before = std::fs::read(&snapshot).unwrap();
    let o = keygate(&["keys", "revoke", "--snapshot", s(&snapshot), "key_nope"]);
    let (out, err) = text(&o);
    assert!(!o.status.success(), "{out}");
    assert!(err.contains("key_nope"), "the error names the id: {err}");
    assert_eq!(std::fs::read(&snapshot).unwrap(), before);
    gate.stop().await;
}

/// Every `keys` command's output is whole lines, so `| tail -1`, `| while read …` and a shell
/// prompt after the secret behave.
#[test]
fn keys_output_ends_with_a_newline() {
    let dir = tempfile::tempdir().unwrap();
    let snapshot = dir.path().join("keys.json");
    let sp = s(&snapshot);
    let mut id = String::new();
    for json_flag in [false, true] {
        let mut runs: Vec<Vec<&str>> = vec![
            vec![
                "keys",
                "create",
                "--snapshot",
                sp,
                "--partner",
                "partner_acme",
                "--env",
                "live",
                "--scopes",
                "analyses:read",
            ],
            vec!["keys", "list", "--snapshot", sp],
        ];
        for r in &mut runs {
            if json_flag {
                r.push("--json");
            }
        }
        for args in runs {
            let o = keygate(&args);
            let (out, err) = text(&o);
            assert_eq!(o.status.code(), Some(0), "{err}");
            assert!(out.ends_with('\n'), "{args:?}: no final newline: {out:?}");
        }
        if id.is_empty() {
            id = read_doc(&snapshot)["keys"][0]["id"]
                .as_str()
                .unwrap()
                .to_owned();
        }
        let mut args = vec!["keys", "revoke", "--snapshot", sp, &id];
        if json_flag {
            args.push("--json");
        }
        let o = keygate(&args);
        let (out, err) = text(&o);
        assert_eq!(o.status.code(), Some(0), "{err}");
        assert!(out.ends_with('\n'), "{args:?}: no final newline: {out:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// snapshot check

#[test]
fn snapshot_check_passes_a_good_file_with_revision_and_counts() {
    let snap = SnapshotDir::new();
    snap.write(
        &Doc::new(3)
            .partner("partner_acme", None, "active")
            .key("key_good", &mint("sk_live_"), json!({}))
            .key("key_also", &mint("sk_live_"), json!({"status": "revoked"})),
    );
    let o = keygate(&["snapshot", "check", s(&snap.path())]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}{err}");
    assert!(out.contains("revision 3"), "{out}");
    assert!(out.contains("2 keys usable"), "{out}");
    assert!(out.contains("0 entries quarantined"), "{out}");
    assert!(!digest_like(&out) && !digest_like(&err), "{out}{err}");
    assert!(err.is_empty(), "{err}");

    // Revision 0 is a valid document, which a hub cannot serve: said so, still exit 0.
    snap.write(&Doc::new(0).partner("partner_acme", None, "active").key(
        "key_good",
        &mint("sk_live_"),
        json!({}),
    ));
    let o = keygate(&["snapshot", "check", s(&snap.path())]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}{err}");
    assert!(err.contains("warning: revision 0"), "{err}");
}

#[test]
fn snapshot_check_names_every_quarantined_entry_and_its_reason() {
    let snap = SnapshotDir::new();
    let good = mint("sk_live_");
    let twin = mint("sk_live_");
    let orphan = mint("sk_live_");
    snap.write(
        &Doc::new(4)
            .partner("partner_acme", None, "active")
            .key("key_good", &good, json!({}))
            .key(
                "key_orphan",
                &orphan,
                json!({"partner_id": "partner_nobody"}),
            )
            .key(
                "key_cidr",
                &mint("sk_live_"),
                json!({"allowed_cidrs": ["not-a-cidr"]}),
            )
            .key("key_hash", &mint("sk_live_"), json!({"hash": "md5:abc"}))
            .key("key_status", &mint("sk_live_"), json!({"status": "paused"}))
            .key("key_twin_a", &twin, json!({}))
            .key("key_twin_b", &twin, json!({})),
    );
    let o = keygate(&["snapshot", "check", s(&snap.path())]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}{err}");
    let line_for = |id: &str| -> String {
        err.lines()
            .find(|l| l.contains(&format!("key {id}:")) || l.contains(&format!("{id}:")))
            .unwrap_or_else(|| panic!("{id} not named: {err}"))
            .to_owned()
    };
    for (id, reason) in [
        ("key_orphan", "partner"),
        ("key_cidr", "allowed_cidrs"),
        ("key_hash", "hash"),
        ("key_status", "status"),
        ("key_twin_a", "same digest"),
        ("key_twin_b", "same digest"),
    ] {
        let line = line_for(id);
        assert!(
            line.contains(reason),
            "{id}: reason lacks {reason:?}: {line}"
        );
    }
    assert!(!err.contains("key_good"), "a good key was reported: {err}");
    assert!(out.contains("revision 4"), "{out}");
    assert!(out.contains("1 keys usable"), "{out}");
    assert!(out.contains("6 entries quarantined"), "{out}");
    assert!(
        !digest_like(&err) && !digest_like(&out),
        "a digest was printed: {err}"
    );
    for t in [&out, &err] {
        for (i, _) in t.match_indices("sha256:") {
            let next = t[i + "sha256:".len()..].chars().next();
            assert!(
                !next.is_some_and(|c| c.is_ascii_hexdigit()),
                "a digest was printed: {t}"
            );
        }
    }
    for k in [&good, &twin, &orphan] {
        assert!(
            !err.contains(k.as_str()) && !out.contains(k.as_str()),
            "a key was printed"
        );
    }
}

/// A key pasted into the wrong field of the file the key tools read is not printed back in
/// the error (serde quotes the offending value), nor is a wrong schema.
#[test]
fn key_tools_never_print_a_misplaced_key() {
    let snap = SnapshotDir::new();
    let key = mint("sk_live_");
    for doc in [
        format!(r#"{{"schema":"keygate.snapshot/v1","revision":"{key}","partners":[],"keys":[]}}"#),
        format!(
            r#"{{"schema":"keygate.snapshot/v1","revision":"a\"{key}","partners":[],"keys":[]}}"#
        ),
        format!(r#"{{"schema":"{key}","revision":1,"partners":[],"keys":[]}}"#),
    ] {
        snap.write_text(&doc);
        let o = keygate(&["keys", "list", "--snapshot", s(&snap.path())]);
        let (out, err) = text(&o);
        assert_ne!(o.status.code(), Some(0), "{doc}: {out}{err}");
        assert!(!err.trim().is_empty(), "{doc}: no reason given");
        let body = &key["sk_live_".len()..];
        assert!(!err.contains(body) && !out.contains(body), "{doc}: {err}");
    }
}

#[test]
fn snapshot_check_rejects_a_broken_document() {
    let snap = SnapshotDir::new();
    for broken in [
        "{ not json",
        r#"{"schema":"other/v1","revision":1,"partners":[],"keys":[]}"#,
        r#"{"revision":1,"partners":[],"keys":[]}"#,
    ] {
        snap.write_text(broken);
        let o = keygate(&["snapshot", "check", s(&snap.path())]);
        let (out, err) = text(&o);
        assert_eq!(o.status.code(), Some(1), "{broken}: {out}{err}");
        assert!(!err.trim().is_empty(), "{broken}: no reason given");
        assert!(
            !out.contains("keys usable"),
            "{broken}: reported as read: {out}"
        );
    }
    snap.write_text(r#"{"schema":"other/v1","revision":1,"partners":[],"keys":[]}"#);
    let o = keygate(&["snapshot", "check", s(&snap.path())]);
    assert!(
        text(&o).1.contains("schema"),
        "a wrong schema is named: {}",
        text(&o).1
    );

    let missing = snap.dir.path().join("missing.json");
    let o = keygate(&["snapshot", "check", s(&missing)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).1.contains("missing.json"), "{}", text(&o).1);
}

#[test]
fn snapshot_check_with_a_pepper_reads_hmac_digests() {
    let dir = tempfile::tempdir().unwrap();
    let snapshot = dir.path().join("keys.json");
    let pepper = ("KG_TEST_PEPPER", "a-long-random-pepper-value-for-tests");
    let o = keygate_env(
        &[
            "keys",
            "create",
            "--snapshot",
            s(&snapshot),
            "--partner",
            "partner_acme",
            "--env",
            "live",
            "--scopes",
            "analyses:read",
            "--pepper-env",
            "KG_TEST_PEPPER",
            "--json",
        ],
        &[pepper],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o).1);
    let created: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let id = created["id"].as_str().unwrap();
    let hash = read_doc(&snapshot)["keys"][0]["hash"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(hash.starts_with("hmac-sha256:"), "{hash}");

    let o = keygate_env(
        &[
            "snapshot",
            "check",
            s(&snapshot),
            "--pepper-env",
            "KG_TEST_PEPPER",
        ],
        &[pepper],
    );
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}{err}");
    assert!(out.contains("1 keys usable"), "{out}");

    // Without the pepper the entry cannot be used: named, with the reason, digest not shown.
    let o = keygate(&["snapshot", "check", s(&snapshot)]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}{err}");
    assert!(err.contains(id) && err.contains("pepper"), "{err}");
    assert!(!digest_like(&err) && !digest_like(&out), "{err}");

    // --pepper-env naming an unset variable is an error naming it.
    let o = keygate(&[
        "snapshot",
        "check",
        s(&snapshot),
        "--pepper-env",
        "KG_TEST_PEPPER_UNSET",
    ]);
    assert!(!o.status.success());
    assert!(
        text(&o).1.contains("KG_TEST_PEPPER_UNSET"),
        "{}",
        text(&o).1
    );
}

// ---------------------------------------------------------------------------------------------
// config check

const GOOD_CONFIG: &str = "environment = \"live\"\n[snapshot]\npath = \"keys.json\"\n[proxy]\nlisten = \"127.0.0.1:8080\"\nupstream = \"http://127.0.0.1:3000\"\n";

#[test]
fn config_check_passes_a_valid_file() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, GOOD_CONFIG).unwrap();
    let o = keygate(&["config", "check", "--config", s(&good)]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(out.contains("ok"), "{out}");

    // The harness's full configuration is valid too.
    let full = dir.path().join("full.toml");
    std::fs::write(
        &full,
        config_toml(
            &dir.path().join("keys.json"),
            "127.0.0.1:3000".parse().unwrap(),
            "",
        ),
    )
    .unwrap();
    let o = keygate(&["config", "check", "--config", s(&full)]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o).1);
}

/// An expired certificate passes (`serve` serves it until the files are renewed in place) but
/// is said, with the listener's key, the file and when it expired; a valid one is not.
#[test]
fn config_check_warns_of_an_expired_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let (cert, key) = (dir.path().join("old.pem"), dir.path().join("old-key.pem"));
    pki.issue_until(&["127.0.0.1"], (2021, 1, 1))
        .write_to(&cert, &key);
    let toml = |cert: &Path, key: &Path| {
        format!(
            "{GOOD_CONFIG}tls_cert = {:?}\ntls_key = {:?}\n",
            s(cert),
            s(key)
        )
    };
    let config = dir.path().join("keygate.toml");
    std::fs::write(&config, toml(&cert, &key)).unwrap();
    let o = keygate(&["config", "check", "--config", s(&config)]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}{err}");
    assert!(out.contains("ok"), "{out}");
    assert!(
        err.contains("warning: proxy.tls_cert")
            && err.contains("old.pem")
            && err.contains("expired at 2021-01-01T00:00:00Z"),
        "{err}"
    );

    std::fs::write(&config, toml(&pki.server_cert, &pki.server_key)).unwrap();
    let o = keygate(&["config", "check", "--config", s(&config)]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}{err}");
    assert!(!err.contains("warning"), "{err}");
}

#[test]
fn config_check_names_every_bad_value_by_dotted_key() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "environment = \"li ve\"\n[snapshot]\npath = \"keys.json\"\npoll_interval = \"5\"\n[proxy]\nlisten = \"nope\"\nupstream = \"http://127.0.0.1:3000\"\n[admin]\nlisten = \"127.0.0.1:99999\"\n",
    )
    .unwrap();
    let o = keygate(&["config", "check", "--config", s(&bad)]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    for key in [
        "environment",
        "snapshot.poll_interval",
        "proxy.listen",
        "admin.listen",
    ] {
        assert!(
            err.contains(&format!("config: {key}:")),
            "{key} not named: {err}"
        );
    }
    assert!(!out.contains("ok"), "{out}");
}

#[test]
fn config_check_names_an_unknown_key() {
    let dir = tempfile::tempdir().unwrap();
    let typo = dir.path().join("typo.toml");
    std::fs::write(
        &typo,
        "environment = \"live\"\n[snapshot]\npath = \"keys.json\"\n[proxy]\nlisten = \"127.0.0.1:1\"\nupstream = \"http://127.0.0.1:3000\"\nlisen = \"127.0.0.1:1\"\n",
    )
    .unwrap();
    let o = keygate(&["config", "check", "--config", s(&typo)]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("lisen") && err.contains("proxy"),
        "the unknown key and its table are named: {err}"
    );
}

/// DESIGN: `config check` exits 1 "and name[s] every problem". A typo must not hide the
/// other problems of the same file.
#[test]
fn config_check_names_an_unknown_key_alongside_other_problems() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "environment = \"li ve\"\n[snapshot]\npath = \"keys.json\"\n[proxy]\nlisten = \"nope\"\nlisen = \"127.0.0.1:1\"\nupstream = \"http://127.0.0.1:3000\"\n",
    )
    .unwrap();
    let o = keygate(&["config", "check", "--config", s(&bad)]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    for key in ["environment", "proxy.listen", "proxy.lisen"] {
        assert!(err.contains(key), "{key} not named: {err}");
    }
}

/// A bad `proxy.upstream` is a problem of its own, whatever `proxy.listen` holds.
#[test]
fn config_check_names_a_bad_upstream_even_when_listen_is_bad() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "environment = \"live\"\n[snapshot]\npath = \"keys.json\"\n[proxy]\nlisten = \"nope\"\nupstream = \"htp://x\"\n",
    )
    .unwrap();
    let o = keygate(&["config", "check", "--config", s(&bad)]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    for key in ["proxy.listen", "proxy.upstream"] {
        assert!(
            err.contains(&format!("config: {key}:")),
            "{key} not named: {err}"
        );
    }
}

#[test]
fn config_check_applies_environment_overrides() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, GOOD_CONFIG).unwrap();
    let args = ["config", "check", "--config", s(&good)];

    let o = keygate_env(&args, &[("KEYGATE__PROXY__LISTEN", "bad")]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(err.contains("config: proxy.listen:"), "{err}");

    // A good override keeps a good file good; a bad top-level one is named too.
    let o = keygate_env(&args, &[("KEYGATE__PROXY__LISTEN", "127.0.0.1:9999")]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o).1);
    let o = keygate_env(&args, &[("KEYGATE__ENVIRONMENT", "li ve")]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).1.contains("config: environment:"),
        "{}",
        text(&o).1
    );

    // A missing file is an error naming it.
    let missing = dir.path().join("missing.toml");
    let o = keygate(&["config", "check", "--config", s(&missing)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).1.contains("missing.toml"), "{}", text(&o).1);
}

// ---------------------------------------------------------------------------------------------
// serve

#[test]
fn serve_refuses_a_broken_config_at_once_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "environment = \"live\"\n[snapshot]\npath = \"keys.json\"\n[proxy]\nlisten = \"nope\"\nupstream = \"http://127.0.0.1:3000\"\n",
    )
    .unwrap();
    let start = Instant::now();
    let child = Command::new(BIN)
        .args(["serve", "--config", s(&bad)])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut running = Running(child);
    let status = loop {
        if let Some(st) = running.0.try_wait().unwrap() {
            break st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "serve kept running on a broken config"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(running.0.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "exit {status:?}");
    assert!(err.contains("proxy.listen"), "{err}");

    // No config file at all: also refused, naming it.
    let o = keygate(&["serve", "--config", s(&dir.path().join("absent.toml"))]);
    assert!(!o.status.success());
    assert!(text(&o).1.contains("absent.toml"), "{}", text(&o).1);
}

/// `keygate serve --config <config>` with `env` and its stderr to `stderr`, once `/readyz` on
/// the admin port answers 200 (within 10 s).
async fn serve_ready(config: &Path, env: &[(&str, &str)], stderr: Stdio, admin: u16) -> Running {
    let child = Command::new(BIN)
        .args(["serve", "--config", s(config)])
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let mut running = Running(child);
    let start = Instant::now();
    loop {
        if let Some(st) = running.0.try_wait().unwrap() {
            panic!("serve exited before ready: {st:?}");
        }
        if tokio::net::TcpStream::connect(("127.0.0.1", admin))
            .await
            .is_ok()
            && get(&client(), &format!("http://127.0.0.1:{admin}/readyz"), &[])
                .await
                .status
                == 200
        {
            return running;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "/readyz not 200 within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn serve_becomes_ready_and_exits_zero_on_sigterm() {
    let upstream = Upstream::start().await;
    let (snap, key) = one_key_snapshot();
    let (proxy, admin) = (free_port(), free_port());
    let receiver = UsageReceiver::start().await;
    let config = snap.dir.path().join("keygate.toml");
    std::fs::write(
        &config,
        format!(
            "environment = \"live\"\n[snapshot]\npath = {:?}\n[proxy]\nlisten = \"127.0.0.1:{proxy}\"\nupstream = \"http://{}\"\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n[usage]\nreport_url = \"http://{}/usage\"\ntoken_env = \"USAGE_TOKEN\"\ninterval = \"1h\"\n",
            snap.path().display().to_string(),
            upstream.addr,
            receiver.addr
        ),
    )
    .unwrap();
    let mut running = serve_ready(
        &config,
        &[("USAGE_TOKEN", "usage-token")],
        Stdio::null(),
        admin,
    )
    .await;
    let url = format!("http://127.0.0.1:{proxy}/v1/x");
    let a = get(&client(), &url, &[("x-api-key", &key)]).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(upstream.last().headers["x-key-id"], "key_a");
    let a = get(&client(), &url, &[]).await;
    assert_error(&a, 401, "authentication_required");

    assert_eq!(
        receiver.requests("key_a").0,
        0,
        "hourly: nothing reported yet"
    );

    let status = running.terminate(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0), "exit status {status:?}");
    // Nothing lost on SIGTERM: the counts went out before the process exited.
    assert_eq!(receiver.requests("key_a"), (1, false));
}

/// A log reader that stalls (a stuck shipper: stderr a pipe nobody drains) must not stop
/// requests at their decision line, nor /healthz: lines past log.buffered_lines are dropped
/// and counted. (Writing to stderr on the request path froze the process at its ~240th
/// request, once the pipe was full.)
#[tokio::test]
async fn a_stalled_log_reader_never_holds_up_a_request() {
    let upstream = Upstream::start().await;
    let (snap, key) = one_key_snapshot();
    let (proxy, admin) = (free_port(), free_port());
    let config = snap.dir.path().join("keygate.toml");
    std::fs::write(
        &config,
        format!(
            "environment = \"live\"\n[snapshot]\npath = {:?}\n[proxy]\nlisten = \"127.0.0.1:{proxy}\"\nupstream = \"http://{}\"\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n[log]\nlevel = \"info\"\ndecisions = \"all\"\nbuffered_lines = 100\n",
            snap.path().display().to_string(),
            upstream.addr,
        ),
    )
    .unwrap();
    // stderr a pipe that is never read.
    let mut running = serve_ready(&config, &[], Stdio::piped(), admin).await;
    let web = client();
    // ~250 bytes of decision line each: far more than the pipe (64 KiB) and the buffer hold.
    let url = format!("http://127.0.0.1:{proxy}/v1/x");
    for i in 0..2_000 {
        let a = tokio::time::timeout(
            Duration::from_secs(5),
            get(&web, &url, &[("x-api-key", &key)]),
        )
        .await
        .unwrap_or_else(|_| panic!("request {i} hung"));
        assert_eq!(a.status, 200, "request {i}");
    }
    let health = tokio::time::timeout(
        Duration::from_secs(5),
        get(&web, &format!("http://127.0.0.1:{admin}/healthz"), &[]),
    )
    .await
    .expect("/healthz hung");
    assert_eq!(health.status, 200);
    let metrics = get(&web, &format!("http://127.0.0.1:{admin}/metrics"), &[]).await;
    let metrics = String::from_utf8_lossy(&metrics.body);
    let dropped: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("keygate_log_lines_dropped_total "))
        .unwrap_or_else(|| panic!("no dropped-lines counter in {metrics}"))
        .trim()
        .parse()
        .unwrap();
    assert!(dropped > 1_000, "{dropped} lines dropped of ~2,000");
    let status = running.terminate(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0), "exit status {status:?}");
}

// ---------------------------------------------------------------------------------------------
// demo

/// The URL and the sandbox key on a printed `curl` line.
fn url_on(line: &str) -> String {
    line.split([' ', '\''])
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no URL on {line}"))
        .to_owned()
}

fn key_on(line: &str, prefix: &str) -> String {
    line.split([' ', '\''])
        .find(|w| w.starts_with(prefix))
        .unwrap_or_else(|| panic!("no {prefix} key on {line}"))
        .to_owned()
}

#[tokio::test]
async fn demo_is_the_readmes_first_command() {
    let tmp = tempfile::tempdir().unwrap();
    let child = Command::new(BIN)
        .args(["demo", "--listen", "127.0.0.1:0"])
        .env("TMPDIR", tmp.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut running = Running(child);
    let stdout = running.0.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !lines.iter().any(|l| l.contains("Press Ctrl-C")) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => lines.push(l),
            Err(_) => panic!("demo printed no curl lines in time: {lines:?}"),
        }
    }
    let find = |what: &str, pred: &dyn Fn(&str) -> bool| -> String {
        lines
            .iter()
            .find(|l| pred(l))
            .unwrap_or_else(|| panic!("no {what} line: {lines:#?}"))
            .clone()
    };

    // Its snapshot is in a directory of its own: a new, random name, only the user's (a name
    // known in advance could be made first by someone else, with their own key in it).
    let made: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap())
        .collect();
    assert_eq!(made.len(), 1, "{made:?}");
    let name = made[0].file_name().into_string().unwrap();
    let random = name.strip_prefix("keygate-demo-").unwrap_or("");
    assert!(
        random.len() == 16 && random.bytes().all(|b| b.is_ascii_hexdigit()),
        "{name}"
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(&made[0].metadata().unwrap().permissions());
    assert_eq!(mode & 0o777, 0o700, "{name}: {mode:o}");

    // Allowed: 200, an echo with the identity headers and no Authorization.
    let allowed = find("allowed curl", &|l| {
        l.trim_start().starts_with("curl -s ") && l.contains("Authorization: Bearer")
    });
    let url = url_on(&allowed);
    let proxy = url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    assert_ne!(proxy, "127.0.0.1:0", "the bound port is printed");
    let key = key_on(&allowed, "sk_sandbox_");
    let a = get(
        &client(),
        &url,
        &[("authorization", &format!("Bearer {key}"))],
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let echo = a.json();
    assert_eq!(echo["headers"]["x-partner-id"], "partner_demo", "{echo}");
    assert_eq!(echo["headers"]["x-scopes"], "analyses:read", "{echo}");
    assert!(echo["headers"]["x-key-id"].is_string(), "{echo}");
    assert!(echo["headers"].get("authorization").is_none(), "{echo}");
    assert!(
        !echo.to_string().contains(&key),
        "the key reached the upstream"
    );

    // Denied, no key.
    let no_key = find("no-key curl", &|l| {
        l.trim_start().starts_with("curl -si ") && !l.contains("-H") && !l.contains("-X")
    });
    let a = get(&client(), &url_on(&no_key), &[]).await;
    assert_error(&a, 401, "authentication_required");

    // Denied, missing scope: POST with the sandbox key.
    let post = find("POST curl", &|l| l.contains("-X POST"));
    let a = send(
        &client(),
        "POST",
        &url_on(&post),
        &[("x-api-key", &key_on(&post, "sk_sandbox_"))],
        "",
    )
    .await;
    assert_error(&a, 403, "scope_required");

    // Denied, a live key at a sandbox gate.
    let live = find("live-key curl", &|l| l.contains("sk_live_"));
    let a = get(
        &client(),
        &url_on(&live),
        &[("x-api-key", &key_on(&live, "sk_live_"))],
    )
    .await;
    assert_error(&a, 403, "key_environment_mismatch");

    // Denied, an encoded '/' in the path.
    let trick = find("path-trick curl", &|l| l.contains("%2F"));
    let a = get(
        &client(),
        &url_on(&trick),
        &[("x-api-key", &key_on(&trick, "sk_sandbox_"))],
    )
    .await;
    assert_error(&a, 400, "invalid_path");

    // Revoke through the printed snapshot path and key id: the next request is refused.
    let revoke = find("revoke", &|l| l.contains("keys revoke --snapshot"));
    let words: Vec<&str> = revoke.split_whitespace().collect();
    let snap_at = words.iter().position(|w| *w == "--snapshot").unwrap() + 1;
    let snapshot = words[snap_at].to_owned();
    let key_id = words.last().unwrap().to_string();
    assert!(key_id.starts_with("key_"), "{revoke}");
    let o = keygate(&["keys", "revoke", "--snapshot", &snapshot, &key_id]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o).1);
    let start = Instant::now();
    loop {
        let a = get(&client(), &url, &[("x-api-key", &key)]).await;
        if a.status != 200 {
            assert_error(&a, 401, "key_revoked");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the demo never noticed the revoke"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // SIGTERM: exit 0 and the temporary directory is gone.
    let status = running.terminate(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0), "exit status {status:?}");
    let dir = Path::new(&snapshot).parent().unwrap();
    assert!(!dir.exists(), "{} left behind", dir.display());
}

// ---------------------------------------------------------------------------------------------
// Further: concurrent edits, readiness without a snapshot, draining on SIGTERM, a busy port.

/// Each `keys create` holds the snapshot's lock: concurrent runs lose no key.
#[test]
fn concurrent_keys_create_loses_no_key() {
    let dir = tempfile::tempdir().unwrap();
    let snapshot = dir.path().join("keys.json");
    let n = 6;
    let children: Vec<Child> = (0..n)
        .map(|_| {
            Command::new(BIN)
                .args([
                    "keys",
                    "create",
                    "--snapshot",
                    s(&snapshot),
                    "--partner",
                    "partner_acme",
                    "--env",
                    "live",
                    "--scopes",
                    "analyses:read",
                    "--json",
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut revisions = Vec::new();
    let mut ids = Vec::new();
    for c in children {
        let o = c.wait_with_output().unwrap();
        assert_eq!(o.status.code(), Some(0), "{}", text(&o).1);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        revisions.push(v["revision"].as_u64().unwrap());
        ids.push(v["id"].as_str().unwrap().to_owned());
    }
    revisions.sort();
    assert_eq!(
        revisions,
        (1..=n as u64).collect::<Vec<_>>(),
        "one revision each"
    );
    let doc = read_doc(&snapshot);
    assert_eq!(doc["revision"], n as u64);
    let stored: Vec<&str> = doc["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["id"].as_str().unwrap())
        .collect();
    for id in &ids {
        assert!(stored.contains(&id.as_str()), "{id} lost: {stored:?}");
    }
    assert_eq!(stored.len(), n);
    assert_eq!(doc["partners"].as_array().unwrap().len(), 1, "{doc}");
    // No temporary files left next to the snapshot (the lock file may stay).
    let leftovers: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|f| f != "keys.json" && f != "keys.json.lock")
        .collect();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
}

/// Writes a serve config with fixed free ports; returns (config path, proxy port, admin port).
fn serve_config(dir: &Path, snapshot: &Path, upstream: std::net::SocketAddr) -> (String, u16, u16) {
    let (proxy, admin) = (free_port(), free_port());
    let config = dir.join("keygate.toml");
    std::fs::write(
        &config,
        format!(
            "environment = \"live\"\n[snapshot]\npath = {:?}\npoll_interval = \"100ms\"\n[proxy]\nlisten = \"127.0.0.1:{proxy}\"\nupstream = \"http://{upstream}\"\nupstream_timeout = \"5s\"\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n",
            snapshot.display().to_string(),
        ),
    )
    .unwrap();
    (config.to_str().unwrap().to_owned(), proxy, admin)
}

fn spawn_serve(config: &str) -> Running {
    spawn_serve_with(config, Stdio::null())
}

/// [`spawn_serve`] with the log going to `stderr` (`Stdio::piped()` to read it after exit).
fn spawn_serve_with(config: &str, stderr: Stdio) -> Running {
    Running(
        Command::new(BIN)
            .args(["serve", "--config", config])
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap(),
    )
}

/// Poll `/readyz` until it answers (any status) and return that status; panics after 10 s.
async fn readyz_status(running: &mut Running, admin: u16, want: u16) -> u16 {
    let start = Instant::now();
    let mut last = None;
    loop {
        if let Some(st) = running.0.try_wait().unwrap() {
            panic!("serve exited: {st:?}");
        }
        if tokio::net::TcpStream::connect(("127.0.0.1", admin))
            .await
            .is_ok()
        {
            let r = get(&client(), &format!("http://127.0.0.1:{admin}/readyz"), &[]).await;
            if r.status == want {
                return r.status;
            }
            last = Some(r.status);
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "/readyz never {want} within 10 s (last {last:?})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `GET /v1/x` through the proxy on `proxy` with the secret `keys create` printed.
async fn get_with_key(proxy: u16, created: &serde_json::Value) -> Answer {
    let key = created["secret"].as_str().unwrap();
    let url = format!("http://127.0.0.1:{proxy}/v1/x");
    get(&client(), &url, &[("x-api-key", key)]).await
}

#[tokio::test]
async fn serve_is_not_ready_until_a_snapshot_appears() {
    let upstream = Upstream::start().await;
    let snap = SnapshotDir::new();
    let (config, proxy, admin) = serve_config(snap.dir.path(), &snap.path(), upstream.addr);
    let mut running = spawn_serve(&config);
    readyz_status(&mut running, admin, 503).await;
    // Still running and still not ready a moment later, while the file is absent.
    let r = get(&client(), &format!("http://127.0.0.1:{admin}/readyz"), &[]).await;
    assert_eq!(r.status, 503);
    assert!(running.0.try_wait().unwrap().is_none(), "serve exited");
    let a = get(&client(), &format!("http://127.0.0.1:{proxy}/v1/x"), &[]).await;
    assert_ne!(a.status, 200, "a request passed with no snapshot");
    assert_eq!(upstream.count(), 0);

    // The operator creates a key with the CLI: the running gate picks it up.
    let created = create(&snap.path(), "analyses:read", &[]);
    readyz_status(&mut running, admin, 200).await;
    let a = get_with_key(proxy, &created).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(
        upstream.last().headers["x-key-id"],
        created["id"].as_str().unwrap()
    );
    let status = running.terminate(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0));
}

/// A snapshot file keygate cannot read yet (a permission fixed after start-up, as an operator or
/// an init container would) is loaded once it can be, though the fix changes neither the file's
/// contents nor its modification time. keygate runs as an unprivileged user here: root reads
/// whatever the mode says.
#[tokio::test]
async fn serve_loads_a_snapshot_once_it_becomes_readable() {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let snapshot = dir.path().join("keys.json");
    let created = create(&snapshot, "analyses:read", &[]);
    let mode = |m| std::fs::set_permissions(&snapshot, std::fs::Permissions::from_mode(m)).unwrap();
    mode(0o000);
    let (config, proxy, admin) = serve_config(dir.path(), &snapshot, upstream.addr);
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let root = std::fs::metadata("/proc/self").unwrap().uid() == 0;
    let mut command = if root {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", BIN]);
        c
    } else {
        Command::new(BIN)
    };
    let mut running = Running(
        command
            .args(["serve", "--config", &config])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("setpriv (util-linux) runs keygate as nobody"),
    );
    readyz_status(&mut running, admin, 503).await;
    // Several polls (100 ms) and inotify's attribute events go by with the file unreadable.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let r = get(&client(), &format!("http://127.0.0.1:{admin}/readyz"), &[]).await;
    assert_eq!(r.status, 503, "not ready while the file cannot be read");
    let metrics = get(&client(), &format!("http://127.0.0.1:{admin}/metrics"), &[]).await;
    let metrics = String::from_utf8_lossy(&metrics.body).into_owned();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("keygate_snapshot_fetch_errors_total") && !l.ends_with(" 0")),
        "the unreadable file is counted: {metrics}"
    );
    let before = std::fs::metadata(&snapshot).unwrap();
    mode(0o644);
    let after = std::fs::metadata(&snapshot).unwrap();
    assert_eq!((before.ino(), before.len()), (after.ino(), after.len()));
    assert_eq!(before.modified().unwrap(), after.modified().unwrap());
    readyz_status(&mut running, admin, 200).await;
    let a = get_with_key(proxy, &created).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let status = running.terminate(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn serve_finishes_an_in_flight_request_on_sigterm() {
    let upstream = Upstream::start().await;
    let (snap, key) = one_key_snapshot();
    let (config, proxy, admin) = serve_config(snap.dir.path(), &snap.path(), upstream.addr);
    let mut running = spawn_serve(&config);
    readyz_status(&mut running, admin, 200).await;

    let url = format!("http://127.0.0.1:{proxy}/slow/700");
    let k = key.clone();
    let in_flight = tokio::spawn(async move { get(&client(), &url, &[("x-api-key", &k)]).await });
    let arrived = eventually(Duration::from_secs(5), || upstream.count() == 1).await;
    assert!(arrived, "the slow request never reached the upstream");
    let status = running.terminate(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0), "{status:?}");
    let a = in_flight.await.unwrap();
    assert_eq!(a.status, 200, "in-flight request cut: {:?}", a.body);
}

/// SIGTERM in the order a load balancer needs: not ready at once, still accepting for
/// `shutdown.delay`, then new connections refused while the request in flight finishes and
/// `/readyz` still answers 503; exit 0.
#[tokio::test]
async fn serve_drains_in_the_order_a_load_balancer_needs() {
    let upstream = Upstream::start().await;
    let (snap, key) = one_key_snapshot();
    let (config, proxy, admin) = serve_config(snap.dir.path(), &snap.path(), upstream.addr);
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("[shutdown]\ndelay = \"1500ms\"\ndrain_timeout = \"10s\"\n");
    std::fs::write(&config, text).unwrap();
    let mut running = spawn_serve(&config);
    readyz_status(&mut running, admin, 200).await;

    let url = format!("http://127.0.0.1:{proxy}/slow/3500");
    let k = key.clone();
    let in_flight = tokio::spawn(async move { get(&client(), &url, &[("x-api-key", &k)]).await });
    let arrived = eventually(Duration::from_secs(5), || upstream.count() == 1).await;
    assert!(arrived, "the slow request never reached the upstream");

    running.signal();
    let signalled = Instant::now();
    // Not ready at once, and it says why.
    readyz_status(&mut running, admin, 503).await;
    assert!(signalled.elapsed() < Duration::from_millis(1000));
    let r = get(&client(), &format!("http://127.0.0.1:{admin}/readyz"), &[]).await;
    assert_eq!(r.json()["reason"], "shutting down", "{:?}", r.json());

    // Still accepting during the delay: a new connection (a fresh client) is served.
    let a = get(
        &client(),
        &format!("http://127.0.0.1:{proxy}/v1/during-delay"),
        &[("x-api-key", &key)],
    )
    .await;
    assert_eq!(a.status, 200, "refused during shutdown.delay: {:?}", a.body);
    assert!(signalled.elapsed() < Duration::from_millis(1500));
    // …and told to go elsewhere for its next request.
    assert_eq!(a.header("connection"), Some("close"));

    // After the delay: new connections are refused, well before the slow request ends.
    let refused = loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", proxy))
            .await
            .is_err()
        {
            break signalled.elapsed();
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(3),
            "still accepting 3 s after SIGTERM (delay 1.5 s)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        refused >= Duration::from_millis(1400),
        "stopped accepting after {refused:?}, before shutdown.delay"
    );
    // Draining: the admin listener still answers, not ready.
    let r = get(&client(), &format!("http://127.0.0.1:{admin}/readyz"), &[]).await;
    assert_eq!(r.status, 503);
    assert!(
        running.0.try_wait().unwrap().is_none(),
        "exited before the request in flight finished"
    );

    let a = in_flight.await.unwrap();
    assert_eq!(a.status, 200, "in-flight request cut: {:?}", a.body);
    let status = running.wait(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0), "{status:?}");
}

#[test]
fn demo_on_a_busy_port_fails_naming_the_address() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let start = Instant::now();
    let child = Command::new(BIN)
        .args(["demo", "--listen", &addr])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut running = Running(child);
    let status = loop {
        if let Some(st) = running.0.try_wait().unwrap() {
            break st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "demo kept running on a busy port"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(running.0.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "{status:?}");
    assert!(err.contains(&addr), "the address is named: {err}");
    drop(busy);
}

/// With `log.decisions = "denied"`, a request the decision allowed but the proxy then denied
/// (here the upstream refuses: 502) is logged with the key and partner it was decided for.
#[tokio::test]
async fn denied_decisions_are_logged_with_their_key_also_when_denied_after_the_decision() {
    let (snap, key) = one_key_snapshot();
    // Nothing listens on the upstream's port.
    let upstream = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let (config, proxy, admin) = serve_config(snap.dir.path(), &snap.path(), upstream);
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("[log]\nlevel = \"info\"\nformat = \"json\"\ndecisions = \"denied\"\n");
    std::fs::write(&config, text).unwrap();
    let mut running = spawn_serve_with(&config, Stdio::piped());
    readyz_status(&mut running, admin, 200).await;
    let url = format!("http://127.0.0.1:{proxy}/v1/x");
    let refused = get(&client(), &url, &[("x-api-key", &key)]).await;
    assert_error(&refused, 502, "upstream_unavailable");
    let keyless = get(&client(), &url, &[]).await;
    assert_error(&keyless, 401, "authentication_required");
    let status = running.terminate(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0), "exit status {status:?}");

    let mut err = String::new();
    std::io::Read::read_to_string(running.0.stderr.as_mut().unwrap(), &mut err).unwrap();
    let events: Vec<serde_json::Value> = err
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["target"] == "keygate::decision")
        .map(|e| e["fields"].clone())
        .collect();
    let by_code = |code: &str| {
        events
            .iter()
            .find(|e| e["code"] == code)
            .unwrap_or_else(|| panic!("no {code} event in {events:?}"))
    };
    let e = by_code("upstream_unavailable");
    assert_eq!(
        (&e["key_id"], &e["partner_id"]),
        (&json!("key_a"), &json!("partner_acme"))
    );
    assert_eq!(e["status"], 502);
    assert_eq!(by_code("authentication_required")["key_id"], "-");
    assert_eq!(events.len(), 2, "{events:?}");
}
