//! The decision path in isolation: `decide` over a 100,000-key snapshot and a 100-route table,
//! on the allow path and the common deny paths, plus the per-request work a front does before it
//! (path normalization, credential extraction).
//!
//! Run: `cargo bench --bench decide`. Results go in BENCHMARKS.md.

use std::hint::black_box;
use std::net::IpAddr;

use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue};

use keygate::credential::{extract_from_headers, mint, Credential, CredentialHeaders, Found};
use keygate::decision::{decide, RequestFacts, Verdict};
use keygate::path::{normalize, PathOptions};

mod support;
use support::{settings, snapshot, KEYS};

fn bench(c: &mut Criterion) {
    let (snap, secrets) = snapshot();
    let settings = settings();
    let policy = &settings.policy;
    let path = normalize("/v1/resource7/42/items/9", PathOptions::default()).unwrap();
    let ip: Option<IpAddr> = Some("127.0.0.1".parse().unwrap());
    let now = 1_790_000_000_000;
    let facts = |key: &'static str| RequestFacts {
        method: "GET",
        path: Ok(&path),
        host: Some("api.example.com"),
        client_ip: ip,
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
    let good: &'static str = Box::leak(secrets[KEYS / 2].clone().into_boxed_str());
    let unknown: &'static str = Box::leak(mint("sk_live_").into_boxed_str());
    let mut bad_checksum = good.to_owned();
    bad_checksum.pop();
    bad_checksum.push(if good.ends_with('A') { 'B' } else { 'A' });
    let bad_checksum: &'static str = Box::leak(bad_checksum.into_boxed_str());

    let allow = facts(good);
    assert!(matches!(
        decide(Some(&snap), policy, &allow, now),
        Verdict::Allow(_)
    ));
    c.bench_function("decide/allow (100k keys, 100 routes)", |b| {
        b.iter(|| black_box(decide(Some(&snap), policy, black_box(&allow), now)).is_allow())
    });
    let unknown = facts(unknown);
    c.bench_function("decide/deny unknown key", |b| {
        b.iter(|| black_box(decide(Some(&snap), policy, black_box(&unknown), now)).is_allow())
    });
    let bad = facts(bad_checksum);
    c.bench_function("decide/deny bad checksum", |b| {
        b.iter(|| black_box(decide(Some(&snap), policy, black_box(&bad), now)).is_allow())
    });

    c.bench_function("front/normalize clean path", |b| {
        b.iter(|| {
            normalize(
                black_box("/v1/resource7/42/items/9"),
                PathOptions::default(),
            )
        })
    });
    c.bench_function("front/normalize dirty path", |b| {
        b.iter(|| {
            normalize(
                black_box("/v1//resource7/./42/%69tems/../items/9/"),
                PathOptions::default(),
            )
        })
    });
    let mut headers = HeaderMap::new();
    headers.insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {good}")).unwrap(),
    );
    headers.insert("accept", HeaderValue::from_static("application/json"));
    let names = CredentialHeaders::default();
    c.bench_function("front/extract credential", |b| {
        b.iter(|| {
            matches!(
                extract_from_headers(black_box(&headers), &names),
                Credential::Present { .. }
            )
        })
    });
}

trait IsAllow {
    fn is_allow(&self) -> bool;
}
impl IsAllow for Verdict<'_> {
    fn is_allow(&self) -> bool {
        matches!(self, Verdict::Allow(_))
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
