//! How a large snapshot costs in time and memory: parse + index time, resident memory per key,
//! and the peak while a reload builds a second snapshot with the first still in force.
//!
//! Run: `cargo run --release --example snapshot_scale -- 1000000`. Results go in BENCHMARKS.md.
//!
//! The document is generated in memory (nothing is written to disk) the way `keygate keys create`
//! writes entries: minted keys' SHA-256 digests, every optional field present (mostly `null` or
//! `[]`), a few hundred partners, a handful of distinct scope sets, and a few percent of keys with
//! an expiry, CIDRs, referrers or routes. Memory is the process's own account of itself
//! (`VmRSS`, `VmHWM` in `/proc/self/status`) under the system allocator; nothing here asserts a
//! goal, it only measures.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use keygate::credential::mint;
use keygate::snapshot::parse;

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

/// One document of `keys` keys; returns it with a few of its secrets, to check lookups.
fn document(keys: usize, revision: u64) -> (Vec<u8>, Vec<String>) {
    let mut out = String::with_capacity(keys * 420 + PARTNERS * 80);
    let mut samples = Vec::new();
    write!(
        out,
        r#"{{"schema":"keygate.snapshot/v1","revision":{revision},"generated_at":"2026-11-22T06:00:00Z","partners":["#
    )
    .unwrap();
    for p in 0..PARTNERS {
        if p > 0 {
            out.push(',');
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
    out.push_str(r#"],"keys":["#);
    for i in 0..keys {
        if i > 0 {
            out.push(',');
        }
        let (environment, prefix) = if i % 10 == 0 {
            ("test", "sk_test_")
        } else {
            ("live", "sk_live_")
        };
        let secret = mint(prefix);
        let hash = hex::encode(Sha256::digest(secret.as_bytes()));
        // Partners own very different numbers of keys: a few big ones, a long tail.
        let partner = (i * i + 7 * i) % PARTNERS;
        let name = match i % 4 {
            0 => format!("key_{i:07}"),
            1 => "Production".to_owned(),
            2 => format!("CI runner {}", i % 50),
            _ => "Staging (EU)".to_owned(),
        };
        write!(
            out,
            r#"{{"id":"key_{i:07}","name":"{name}","prefix":"{}","hash":"sha256:{hash}","partner_id":"partner_{partner:04}","environment":"{environment}","scopes":{},"status":"{}","created_at":"2026-01-15T10:30:00Z","#,
            &secret[..prefix.len() + 4],
            SCOPE_SETS[i % SCOPE_SETS.len()],
            if i % 50 == 0 { "revoked" } else { "active" },
        )
        .unwrap();
        if i % 20 == 3 {
            out.push_str(r#""expires_at":"2027-06-30T00:00:00Z","#);
        } else {
            out.push_str(r#""expires_at":null,"#);
        }
        if i % 5 == 1 {
            out.push_str(r#""rate_limit_per_minute":600,"#);
        } else {
            out.push_str(r#""rate_limit_per_minute":null,"#);
        }
        if i % 33 == 5 {
            out.push_str(r#""allowed_cidrs":["203.0.113.0/24","2001:db8::/32"],"#);
        } else {
            out.push_str(r#""allowed_cidrs":[],"#);
        }
        if i % 100 == 7 {
            out.push_str(r#""allowed_referrers":["https://app.example.com/*"],"#);
        } else {
            out.push_str(r#""allowed_referrers":[],"#);
        }
        if i % 50 == 9 {
            out.push_str(r#""allowed_routes":["GET /v1/analyses/**","POST /v1/analyses"]}"#);
        } else {
            out.push_str(r#""allowed_routes":[]}"#);
        }
        if i % (keys / 8).max(1) == 1 {
            samples.push(secret);
        }
    }
    out.push_str("]}");
    (out.into_bytes(), samples)
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

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn main() {
    let keys: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("usage: snapshot_scale [KEYS]"))
        .unwrap_or(1_000_000);

    let base = rss();
    let t = Instant::now();
    let (doc, samples) = document(keys, 1);
    let generated = t.elapsed();
    let doc_len = doc.len() as u64;

    reset_peak();
    let (t, cpu) = (Instant::now(), cpu_time());
    let first = parse(&doc, None).expect("the document parses");
    let (load_time, load_cpu) = (t.elapsed(), cpu_time() - cpu);
    let load_peak = status("VmHWM:");
    assert_eq!(first.key_count(), keys, "{:?}", first.quarantined.first());
    for s in &samples {
        assert!(first.find(s).is_some(), "a sampled key is found");
    }
    drop(doc);
    let steady = rss();

    // A reload: the new document is read while the first snapshot is in force, and the first is
    // released only once the second is published.
    reset_peak();
    let (doc, samples) = document(keys, 2);
    let (t, cpu) = (Instant::now(), cpu_time());
    let second = parse(&doc, None).expect("the document parses");
    let (reload_time, reload_cpu) = (t.elapsed(), cpu_time() - cpu);
    let reload_peak = status("VmHWM:");
    assert_eq!(second.key_count(), keys);
    assert!(samples.iter().all(|s| second.find(s).is_some()));
    let t = Instant::now();
    drop(first);
    let drop_time = t.elapsed();
    drop(doc);
    let after_reload = rss();

    let per_key = |bytes: u64| format!("{:.0} B", bytes as f64 / keys as f64);
    println!("snapshot_scale: {keys} keys, {PARTNERS} partners, system allocator");
    println!("(document generated in {}, not counted)", ms(generated));
    println!();
    println!("| measure | value |");
    println!("|---|---:|");
    println!(
        "| document size | {} ({} per key) |",
        mib(doc_len),
        per_key(doc_len)
    );
    println!(
        "| parse + index, first load: wall (on CPU) | {} ({}) |",
        ms(load_time),
        ms(load_cpu)
    );
    println!(
        "| parse + index, reload: wall (on CPU) | {} ({}) |",
        ms(reload_time),
        ms(reload_cpu)
    );
    println!("| drop of the replaced snapshot | {} |", ms(drop_time));
    println!("| RSS before the document (baseline) | {} |", mib(base));
    println!(
        "| RSS steady: one snapshot, no document | {} |",
        mib(steady)
    );
    println!(
        "| resident memory per key beyond baseline | {} |",
        per_key(steady.saturating_sub(base))
    );
    println!(
        "| peak during first load (document held) | {} |",
        mib(load_peak)
    );
    println!(
        "| peak during reload (old snapshot + new document + new snapshot) | {} ({:.2}x steady) |",
        mib(reload_peak),
        reload_peak as f64 / steady as f64
    );
    println!(
        "| the same peak less the document's bytes | {} ({:.2}x steady) |",
        mib(reload_peak.saturating_sub(doc_len)),
        reload_peak.saturating_sub(doc_len) as f64 / steady as f64
    );
    println!(
        "| RSS after the reload, old snapshot dropped | {} |",
        mib(after_reload)
    );
}
