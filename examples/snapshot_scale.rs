//! How a large snapshot costs in time and memory: parse + index time, resident memory per key,
//! and the peak while a reload builds a second snapshot with the first still in force.
//!
//! Run: `cargo run --release --example snapshot_scale -- 1000000 [RELOADS]`. Results go in
//! BENCHMARKS.md.
//!
//! The document is written to a file (in a temporary directory, removed at the end) the way
//! `keygate keys create` writes entries: minted-looking keys' SHA-256 digests, every optional
//! field present (mostly `null` or `[]`), a few hundred partners, a handful of distinct scope
//! sets, and a few percent of keys with an expiry, CIDRs, referrers or routes. It is loaded and
//! then reloaded the way the file source does it (`snapshot::file::load_into`: the file read a
//! block at a time, the snapshot published to a store), with the first snapshot still held as a
//! request in flight would hold it. The second document is the first with a few keys changed, as
//! a real reload would be: one revoked, one with a new rate limit, one removed, one added.
//! Memory is the process's own account of itself (`VmRSS`, `VmHWM` in `/proc/self/status`) under
//! the system allocator; nothing here asserts a goal, it only measures.
//!
//! Then `RELOADS` more reloads of four changed keys (default 5; each document is the original or
//! the edited one, in turn, with the next revision), each timed on its own: on a shared machine
//! the least on-CPU time of several is the figure to compare. They all run in [`reload`], so
//! that callgrind can count their instructions and nothing else:
//! `valgrind --tool=callgrind --toggle-collect='snapshot_scale::reload' <example> 100000 3`
//! (the example built with `debug = "line-tables-only"` or not: symbols are kept either way).

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use keygate::snapshot::{file, parse, KeyStatus, SnapshotStore};

const PARTNERS: usize = 500;

/// Scope sets as a control plane would hand them out: a few distinct sets, not always sorted.
const SCOPE_SETS: [&str; 6] = [
    r#"["analyses:read"]"#,
    r#"["analyses:read","analyses:write"]"#,
    r#"["analyses:write","analyses:read","reports:read"]"#,
    r#"["reports:read"]"#,
    r#"["analyses:read","reports:read","reports:write","webhooks:manage"]"#,
    r#"[]"#,
];

/// The secret of key `i`: the same in every document, so a reload can keep it.
fn secret(i: usize) -> String {
    let prefix = if i.is_multiple_of(10) {
        "sk_test_"
    } else {
        "sk_live_"
    };
    let body = hex::encode(Sha256::digest(format!("snapshot_scale {i}")));
    format!("{prefix}{}", &body[..32])
}

/// The keys a reload changes: revoked, given another rate limit, removed; and one added.
const REVOKED: usize = 1;
const RELIMITED: usize = 2;
const REMOVED: usize = 3;

/// Write a document of `keys` keys to `path` (through a temporary file and a rename, as a
/// control plane or `keygate keys create` replaces it). With `edited`, the few changes above;
/// with `relimited`, every key's rate limit changes too.
fn write_document(path: &Path, keys: usize, revision: u64, edited: bool, relimited: bool) {
    let tmp = path.with_extension("tmp");
    let mut out = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&tmp).unwrap());
    write!(
        out,
        r#"{{"schema":"keygate.snapshot/v1","revision":{revision},"generated_at":"2026-11-22T06:00:00Z","partners":["#
    )
    .unwrap();
    for p in 0..PARTNERS {
        if p > 0 {
            out.write_all(b",").unwrap();
        }
        let status = if p % 97 == 0 { "suspended" } else { "active" };
        if p % 5 == 0 {
            write!(out, r#"{{"id":"partner_{p:04}","status":"{status}"}}"#).unwrap();
        } else {
            write!(
                out,
                r#"{{"id":"partner_{p:04}","org_id":"org_{:04}","status":"{status}"}}"#,
                p / 3
            )
            .unwrap();
        }
    }
    out.write_all(br#"],"keys":["#).unwrap();
    let mut entry = String::with_capacity(1024);
    let total = if edited { keys + 1 } else { keys };
    let mut first = true;
    for i in 0..total {
        if edited && i == REMOVED {
            continue;
        }
        entry.clear();
        if !first {
            entry.push(',');
        }
        first = false;
        let environment = if i % 10 == 0 { "test" } else { "live" };
        let secret = secret(i);
        let hash = hex::encode(Sha256::digest(secret.as_bytes()));
        // Partners own very different numbers of keys: a few big ones, a long tail.
        let partner = (i * i + 7 * i) % PARTNERS;
        let name = match i % 4 {
            0 => format!("key_{i:07}"),
            1 => "Production".to_owned(),
            2 => format!("CI runner {}", i % 50),
            _ => "Staging (EU)".to_owned(),
        };
        let revoked = i % 50 == 0 || (edited && i == REVOKED);
        write!(
            entry,
            r#"{{"id":"key_{i:07}","name":"{name}","prefix":"{}","hash":"sha256:{hash}","partner_id":"partner_{partner:04}","environment":"{environment}","scopes":{},"status":"{}","created_at":"2026-01-15T10:30:00Z","#,
            &secret[..12],
            SCOPE_SETS[i % SCOPE_SETS.len()],
            if revoked { "revoked" } else { "active" },
        )
        .unwrap();
        if i % 20 == 3 {
            entry.push_str(r#""expires_at":"2027-06-30T00:00:00Z","#);
        } else {
            entry.push_str(r#""expires_at":null,"#);
        }
        if relimited {
            entry.push_str(r#""rate_limit_per_minute":900,"#);
        } else if edited && i == RELIMITED {
            entry.push_str(r#""rate_limit_per_minute":1200,"#);
        } else if i % 5 == 1 {
            entry.push_str(r#""rate_limit_per_minute":600,"#);
        } else {
            entry.push_str(r#""rate_limit_per_minute":null,"#);
        }
        if i % 33 == 5 {
            entry.push_str(r#""allowed_cidrs":["203.0.113.0/24","2001:db8::/32"],"#);
        } else {
            entry.push_str(r#""allowed_cidrs":[],"#);
        }
        if i % 100 == 7 {
            entry.push_str(r#""allowed_referrers":["https://app.example.com/*"],"#);
        } else {
            entry.push_str(r#""allowed_referrers":[],"#);
        }
        if i % 50 == 9 {
            entry.push_str(r#""allowed_routes":["GET /v1/analyses/**","POST /v1/analyses"]}"#);
        } else {
            entry.push_str(r#""allowed_routes":[]}"#);
        }
        out.write_all(entry.as_bytes()).unwrap();
    }
    out.write_all(b"]}").unwrap();
    out.into_inner().unwrap().sync_all().unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A `kB` line of `/proc/self/status`, in bytes.
fn status(field: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let line = text
        .lines()
        .find(|l| l.starts_with(field))
        .unwrap_or_else(|| panic!("{field} in /proc/self/status"));
    let kb: u64 = line[field.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .expect("a number of kB");
    kb * 1024
}

fn rss() -> u64 {
    status("VmRSS:")
}

/// Resets `VmHWM` to the current RSS, so the next peak is this phase's own.
fn reset_peak() {
    std::fs::write("/proc/self/clear_refs", "5").expect("write /proc/self/clear_refs");
}

/// Time this thread has spent on a CPU: unlike wall time, not stretched by other processes.
fn cpu_time() -> Duration {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").expect("schedstat");
    let ns = text.split_whitespace().next().and_then(|n| n.parse().ok());
    Duration::from_nanos(ns.expect("nanoseconds on CPU"))
}

/// One file reload, on its own for callgrind (see the module's comment).
#[inline(never)]
fn reload(
    store: &SnapshotStore,
    settings: &keygate::config::SnapshotSettings,
) -> (Duration, Duration) {
    let (t, cpu) = (Instant::now(), cpu_time());
    file::load_into(store, settings).expect("the document reloads");
    (t.elapsed(), cpu_time() - cpu)
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn main() {
    let keys: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("usage: snapshot_scale [KEYS]"))
        .unwrap_or(1_000_000);
    let reloads: usize = std::env::args()
        .nth(2)
        .map(|a| a.parse().expect("usage: snapshot_scale [KEYS [RELOADS]]"))
        .unwrap_or(5);
    assert!(keys > 10, "at least a few keys");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("keys.json");
    let settings = keygate::config::from_toml(&format!(
        "environment = \"live\"\n[authz_http]\nlisten = \"127.0.0.1:0\"\n[snapshot]\nsource = \"file\"\npath = {:?}\n",
        path.display().to_string()
    ))
    .expect("a file-source configuration")
    .snapshot;
    let store = SnapshotStore::new();
    let samples = [0, 4, keys / 3, keys / 2, keys - 1];

    let base = rss();
    let t = Instant::now();
    write_document(&path, keys, 1, false, false);
    let generated = t.elapsed();
    let doc_len = std::fs::metadata(&path).unwrap().len();

    reset_peak();
    let (t, cpu) = (Instant::now(), cpu_time());
    file::load_into(&store, &settings).expect("the document loads");
    let (load_time, load_cpu) = (t.elapsed(), cpu_time() - cpu);
    let load_peak = status("VmHWM:");
    let first = store.current_arc().unwrap();
    assert_eq!(first.key_count(), keys, "{:?}", first.quarantined.first());
    for i in samples.into_iter().chain([REVOKED, RELIMITED, REMOVED]) {
        assert!(first.find(&secret(i)).is_some(), "key {i} is found");
    }
    let steady = rss();

    // A reload: the first snapshot stays held (as a request in flight holds it) until the
    // second is published and measured.
    write_document(&path, keys, 2, true, false);
    reset_peak();
    let (t, cpu) = (Instant::now(), cpu_time());
    file::load_into(&store, &settings).expect("the document reloads");
    let (reload_time, reload_cpu) = (t.elapsed(), cpu_time() - cpu);
    let reload_peak = status("VmHWM:");
    let second = store.current_arc().unwrap();
    assert_eq!(second.revision, 2);
    assert_eq!(second.key_count(), keys);
    for i in samples {
        assert!(second.find(&secret(i)).is_some(), "key {i} is found");
    }
    assert_eq!(
        second.find(&secret(REVOKED)).unwrap().status,
        KeyStatus::Revoked
    );
    assert_eq!(
        first.find(&secret(REVOKED)).unwrap().status,
        KeyStatus::Active
    );
    assert_eq!(
        second
            .find(&secret(RELIMITED))
            .unwrap()
            .rate_limit_per_minute(),
        Some(1200)
    );
    assert!(second.find(&secret(REMOVED)).is_none());
    assert!(
        second.find(&secret(keys)).is_some(),
        "the added key is found"
    );
    let t = Instant::now();
    drop(first);
    let drop_time = t.elapsed();
    let after_reload = rss();

    // A reload that changes every key (all rate limits): nothing can be shared.
    write_document(&path, keys, 3, true, true);
    reset_peak();
    let (t, cpu) = (Instant::now(), cpu_time());
    file::load_into(&store, &settings).expect("the document reloads");
    let (all_time, all_cpu) = (t.elapsed(), cpu_time() - cpu);
    let all_peak = status("VmHWM:");
    let third = store.current_arc().unwrap();
    assert_eq!(third.revision, 3);
    assert_eq!(
        third.find(&secret(0)).unwrap().rate_limit_per_minute(),
        Some(900)
    );
    drop((second, third));

    // For comparison with earlier figures: `parse` of the same document held in memory.
    let bytes = std::fs::read(&path).unwrap();
    let (t, cpu) = (Instant::now(), cpu_time());
    let in_memory = parse(&bytes, None).expect("the document parses");
    let (bytes_time, bytes_cpu) = (t.elapsed(), cpu_time() - cpu);
    assert_eq!(in_memory.key_count(), keys);
    drop((in_memory, bytes));

    // Repeated reloads of four changed keys, each against the last: the edited document and
    // the original one in turn (the revoked key revoked and restored, and so on), after the
    // original, untimed (the document in force had every key changed).
    write_document(&path, keys, 4, false, false);
    file::load_into(&store, &settings).expect("the document reloads");
    let (mut walls, mut repeated): (Vec<Duration>, Vec<Duration>) = (0..reloads)
        .map(|n| {
            let edited = n % 2 == 0;
            write_document(&path, keys, 5 + n as u64, edited, false);
            let times = reload(&store, &settings);
            let s = store.current_arc().unwrap();
            assert_eq!(s.revision, 5 + n as u64);
            assert_eq!(s.key_count(), keys);
            assert_eq!(s.find(&secret(REMOVED)).is_none(), edited);
            let status = s.find(&secret(REVOKED)).unwrap().status;
            assert_eq!(status == KeyStatus::Revoked, edited);
            times
        })
        .unzip();
    walls.sort_unstable();
    repeated.sort_unstable();
    drop(dir);

    let per_key = |bytes: u64| format!("{:.0} B", bytes as f64 / keys as f64);
    println!("snapshot_scale: {keys} keys, {PARTNERS} partners, system allocator");
    println!(
        "(document written to a file in {}, not counted)",
        ms(generated)
    );
    println!();
    println!("| measure | value |");
    println!("|---|---:|");
    println!(
        "| document size | {} ({} per key) |",
        mib(doc_len),
        per_key(doc_len)
    );
    println!(
        "| read + parse + index, first load (file source): wall (on CPU) | {} ({}) |",
        ms(load_time),
        ms(load_cpu)
    );
    println!(
        "| read + parse + index + publish, reload of 4 changed keys: wall (on CPU) | {} ({}) |",
        ms(reload_time),
        ms(reload_cpu)
    );
    println!(
        "| read + parse + index + publish, reload of every key changed: wall (on CPU) | {} ({}) |",
        ms(all_time),
        ms(all_cpu)
    );
    println!(
        "| parse + index of the same document held in memory: wall (on CPU) | {} ({}) |",
        ms(bytes_time),
        ms(bytes_cpu)
    );
    if let (Some(least), Some(most)) = (repeated.first(), repeated.last()) {
        println!(
            "| {reloads} more reloads of 4 changed keys, each: on CPU, least / median / most | {} / {} / {} |",
            ms(*least),
            ms(repeated[reloads / 2]),
            ms(*most)
        );
        println!(
            "| the same reloads, wall: least / median / most | {} / {} / {} |",
            ms(walls[0]),
            ms(walls[reloads / 2]),
            ms(walls[reloads - 1])
        );
    }
    println!("| drop of the replaced snapshot | {} |", ms(drop_time));
    println!("| RSS before the document (baseline) | {} |", mib(base));
    println!("| RSS steady: one snapshot in force | {} |", mib(steady));
    println!(
        "| resident memory per key beyond baseline | {} |",
        per_key(steady.saturating_sub(base))
    );
    println!("| peak during the first load | {} |", mib(load_peak));
    println!(
        "| peak during the reload (old snapshot held + new snapshot) | {} ({:.2}x steady) |",
        mib(reload_peak),
        reload_peak as f64 / steady as f64
    );
    println!(
        "| RSS after the reload, old snapshot dropped | {} |",
        mib(after_reload)
    );
    println!(
        "| peak during a reload of every key changed (old snapshot held) | {} ({:.2}x steady) |",
        mib(all_peak),
        all_peak as f64 / steady as f64
    );
}
