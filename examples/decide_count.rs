//! `decide` N times on the decide benchmark's fixture (100,000 keys, 100 routes), for counting
//! instructions per decision under callgrind. On this 2-core machine criterion's wall times
//! move by 20% with the neighbours' builds; instruction counts do not.
//!
//! ```sh
//! cargo build --release --example decide_count
//! for n in 0 100000; do
//!   valgrind --tool=callgrind --callgrind-out-file=/dev/null \
//!     target/release/examples/decide_count $n allow 2>&1 | grep Collected
//! done    # (second total - first total) / 100000 = instructions per decision
//! ```
//!
//! The second argument is `allow` (a valid key) or `unknown` (a well-formed key the snapshot
//! does not hold). Under valgrind SHA-256 runs in software: about 3,600 of the count.

use std::hint::black_box;
use std::net::IpAddr;

use keygate::credential::{mint, Credential, Found};
use keygate::decision::{decide, RequestFacts, Verdict};
use keygate::path::{normalize, PathOptions};

#[path = "../benches/support/mod.rs"]
mod support;
use support::{settings, snapshot, KEYS};

fn main() {
    let mut args = std::env::args().skip(1);
    let usage = "usage: decide_count N allow|unknown";
    let n: u64 = args.next().and_then(|a| a.parse().ok()).expect(usage);
    let which = args.next().expect(usage);

    let (snap, secrets) = snapshot();
    let settings = settings();
    let unknown = mint("sk_live_");
    let (key, want_allow) = match which.as_str() {
        "allow" => (secrets[KEYS / 2].as_str(), true),
        "unknown" => (unknown.as_str(), false),
        _ => panic!("{usage}"),
    };
    let path = normalize("/v1/resource7/42/items/9", PathOptions::default()).unwrap();
    let facts = RequestFacts {
        method: "GET",
        path: Ok(&path),
        host: Some("api.example.com"),
        client_ip: Some(IpAddr::from([127, 0, 0, 1])),
        credential: Credential::Present {
            key,
            found: Found {
                authorization: true,
                api_key: false,
            },
        },
        referer: None,
        origin: None,
        idempotency_key: None,
        method_override: None,
        url_override: None,
    };
    let now = 1_790_000_000_000;
    let allowed = (0..n)
        .filter(|_| {
            let verdict = decide(Some(&snap), &settings.policy, black_box(&facts), now);
            matches!(verdict, Verdict::Allow(_))
        })
        .count() as u64;
    assert_eq!(allowed, if want_allow { n } else { 0 });
}
