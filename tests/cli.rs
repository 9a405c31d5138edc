//! The real `keygate` binary: key tooling, `snapshot check`, `config check`, `serve` start-up
//! and SIGTERM, and `demo` — the README's first command — end to end.

mod support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::json;
use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_keygate");

fn keygate(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().expect("keygate runs")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Kills the child when dropped, so a failed assertion leaves no process behind.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn create(snapshot: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "keys",
        "create",
        "--snapshot",
        snapshot.to_str().unwrap(),
        "--partner",
        "partner_acme",
        "--org",
        "org_1",
        "--env",
        "live",
        "--scopes",
        "analyses:read,analyses:write",
        "--json",
    ];
    args.extend_from_slice(extra);
    let o = keygate(&args);
    let (out, err) = text(&o);
    assert!(o.status.success(), "keys create failed: {err}");
    serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("--json output is one JSON object ({e}): {out}"))
}

#[tokio::test]
async fn keys_create_list_revoke_against_a_running_gate() {
    let dir = tempfile::tempdir().unwrap();
    let snapshot = dir.path().join("keys.json");

    // Text output: the secret exactly once.
    let o = keygate(&[
        "keys",
        "create",
        "--snapshot",
        snapshot.to_str().unwrap(),
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
    assert!(o.status.success(), "{err}");
    let secret = out
        .split_whitespace()
        .find(|w| w.starts_with("sk_live_") && w.len() == "sk_live_".len() + 38)
        .unwrap_or_else(|| panic!("no secret in: {out}"))
        .to_owned();
    assert_eq!(
        out.matches(&secret).count(),
        1,
        "the secret is printed once"
    );
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&snapshot).unwrap()).unwrap();
    assert_eq!(doc["schema"], "keygate.snapshot/v1");
    assert_eq!(doc["revision"], 1);

    // JSON output, and the key works through a real gate on that file.
    let created = create(&snapshot, &[]);
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
    assert_eq!(created["revision"], 2);
    let id = created["id"].as_str().unwrap().to_owned();
    let key = created["secret"].as_str().unwrap().to_owned();

    let upstream = Upstream::start().await;
    let gate = Gate::start(&config_toml(&snapshot, upstream.addr, "")).await;
    let a = get(
        &client(),
        &gate.url("/v1/analyses/1"),
        &[("authorization", &format!("Bearer {key}"))],
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(upstream.last().headers["x-key-id"], id.as_str());

    // list: ids and display prefixes, never a secret or a digest.
    for json_flag in [false, true] {
        let mut args = vec!["keys", "list", "--snapshot", snapshot.to_str().unwrap()];
        if json_flag {
            args.push("--json");
        }
        let o = keygate(&args);
        let (out, err) = text(&o);
        assert!(o.status.success(), "{err}");
        assert!(out.contains(&id), "{out}");
        assert!(
            !out.contains(&key) && !out.contains(&secret),
            "list printed a secret"
        );
        assert!(!out.contains("sha256:"), "list printed a digest");
        let hexy = out
            .split(|c: char| !c.is_ascii_hexdigit())
            .any(|w| w.len() >= 64);
        assert!(!hexy, "list printed something digest-like: {out}");
    }

    // revoke: the running gate refuses within a second.
    let start = Instant::now();
    let o = keygate(&[
        "keys",
        "revoke",
        "--snapshot",
        snapshot.to_str().unwrap(),
        &id,
    ]);
    assert!(o.status.success(), "{}", text(&o).1);
    let mut refused = false;
    while start.elapsed() < Duration::from_secs(1) {
        let a = get(
            &client(),
            &gate.url("/v1/analyses/1"),
            &[("x-api-key", &key)],
        )
        .await;
        if a.status == 401 {
            assert_error(&a, 401, "key_revoked");
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        refused,
        "still allowed {:?} after keys revoke",
        start.elapsed()
    );

    let o = keygate(&[
        "keys",
        "revoke",
        "--snapshot",
        snapshot.to_str().unwrap(),
        "key_nope",
    ]);
    assert!(!o.status.success());
    assert!(
        text(&o).1.contains("key_nope"),
        "the error names the id: {}",
        text(&o).1
    );
    gate.stop().await;
}

#[test]
fn snapshot_check_names_every_problem() {
    let snap = SnapshotDir::new();
    let good = mint("sk_live_");
    snap.write(&Doc::new(3).partner("partner_acme", None, "active").key(
        "key_good",
        &good,
        json!({}),
    ));
    let o = keygate(&["snapshot", "check", snap.path().to_str().unwrap()]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        out.contains("revision 3") && out.contains("1 keys usable"),
        "{out}"
    );

    let bad = mint("sk_live_");
    snap.write(
        &Doc::new(4)
            .partner("partner_acme", None, "active")
            .key("key_good", &good, json!({}))
            .key("key_orphan", &bad, json!({"partner_id": "partner_nobody"}))
            .key(
                "key_cidr",
                &mint("sk_live_"),
                json!({"allowed_cidrs": ["not-a-cidr"]}),
            )
            .key("key_hash", &mint("sk_live_"), json!({"hash": "md5:abc"})),
    );
    let o = keygate(&["snapshot", "check", snap.path().to_str().unwrap()]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}{err}");
    for id in ["key_orphan", "key_cidr", "key_hash"] {
        assert!(err.contains(id), "{id} not named: {err}");
    }
    let digest_like = |t: &str| {
        t.split(|c: char| !c.is_ascii_hexdigit())
            .any(|w| w.len() >= 64)
    };
    assert!(
        !digest_like(&err) && !digest_like(&out),
        "a digest was printed: {err}"
    );
    assert!(!err.contains(&bad), "a key was printed");

    for broken in ["{ not json", r#"{"schema":"other/v1","revision":1}"#] {
        snap.write_text(broken);
        let o = keygate(&["snapshot", "check", snap.path().to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(1), "{broken}");
        assert!(!text(&o).1.is_empty(), "a reason is given");
    }
}

#[test]
fn config_check_names_every_bad_key() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "environment = \"live\"\n[snapshot]\npath = \"keys.json\"\n[proxy]\nlisten = \"127.0.0.1:8080\"\nupstream = \"http://127.0.0.1:3000\"\n",
    )
    .unwrap();
    let o = keygate(&["config", "check", "--config", good.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o).1);

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "environment = \"li ve\"\n[snapshot]\npath = \"keys.json\"\npoll_interval = \"5\"\n[proxy]\nlisten = \"nope\"\nupstream = \"htp://x\"\n",
    )
    .unwrap();
    let o = keygate(&["config", "check", "--config", bad.to_str().unwrap()]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1));
    for key in ["environment", "snapshot.poll_interval", "proxy.listen"] {
        assert!(
            err.contains(&format!("config: {key}:")),
            "{key} not named: {err}"
        );
    }

    let typo = dir.path().join("typo.toml");
    std::fs::write(
        &typo,
        "environment = \"live\"\n[proxy]\nlisen = \"127.0.0.1:1\"\n",
    )
    .unwrap();
    let o = keygate(&["config", "check", "--config", typo.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).1.contains("lisen"),
        "the unknown key is named: {}",
        text(&o).1
    );

    // The environment overrides the file, and is checked like it.
    let o = Command::new(BIN)
        .args(["config", "check", "--config", good.to_str().unwrap()])
        .env("KEYGATE__PROXY__LISTEN", "bad")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).1.contains("config: proxy.listen:"),
        "{}",
        text(&o).1
    );

    // serve refuses a broken config at once, naming the key.
    let start = Instant::now();
    let o = keygate(&["serve", "--config", bad.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(text(&o).1.contains("proxy.listen"));
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn serve_becomes_ready_and_exits_zero_on_sigterm() {
    let upstream = Upstream::start().await;
    let snap = SnapshotDir::new();
    let key = mint("sk_live_");
    snap.write(
        &Doc::new(1)
            .partner("partner_acme", None, "active")
            .key("key_a", &key, json!({})),
    );
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let (proxy, admin) = (free(), free());
    let config = snap.dir.path().join("keygate.toml");
    std::fs::write(
        &config,
        format!(
            "environment = \"live\"\n[snapshot]\npath = {:?}\n[proxy]\nlisten = \"127.0.0.1:{proxy}\"\nupstream = \"http://{}\"\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n",
            snap.path().display().to_string(),
            upstream.addr
        ),
    )
    .unwrap();
    let child = Command::new(BIN)
        .args(["serve", "--config", config.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut running = Running(child);
    let start = Instant::now();
    loop {
        if let Ok(s) = tokio::net::TcpStream::connect(("127.0.0.1", admin)).await {
            drop(s);
            let r = get(&client(), &format!("http://127.0.0.1:{admin}/readyz"), &[]).await;
            if r.status == 200 {
                break;
            }
        }
        assert!(start.elapsed() < Duration::from_secs(10), "never ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let a = get(
        &client(),
        &format!("http://127.0.0.1:{proxy}/v1/x"),
        &[("x-api-key", &key)],
    )
    .await;
    assert_eq!(a.status, 200);

    let pid = running.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let start = Instant::now();
    let status = loop {
        if let Some(s) = running.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "no exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "exit status {status:?}");
}

#[tokio::test]
async fn demo_is_the_readmes_first_command() {
    let child = Command::new(BIN)
        .args(["demo", "--listen", "127.0.0.1:0"])
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
    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !lines.iter().any(|l: &String| l.contains("Press Ctrl-C")) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => lines.push(l),
            Err(_) => panic!("demo printed no curl lines in time: {lines:?}"),
        }
    }
    let allowed = lines
        .iter()
        .find(|l| l.contains("curl -s ") && l.contains("Bearer"))
        .unwrap_or_else(|| panic!("no allowed curl line: {lines:?}"));
    let url = allowed
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap()
        .to_owned();
    let key = allowed
        .split([' ', '\''])
        .find(|w| w.starts_with("sk_sandbox_"))
        .unwrap()
        .to_owned();
    let a = get(
        &client(),
        &url,
        &[("authorization", &format!("Bearer {key}"))],
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let echo = a.json();
    assert_eq!(echo["headers"]["x-partner-id"], "partner_demo");
    assert_eq!(echo["headers"]["x-scopes"], "analyses:read");
    assert!(echo["headers"].get("authorization").is_none(), "{echo}");

    let denied = lines
        .iter()
        .find(|l| l.contains("curl -si ") && !l.contains("-H"))
        .expect("no-key line");
    let url = denied
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap();
    let a = get(&client(), url, &[]).await;
    assert_error(&a, 401, "authentication_required");
}
