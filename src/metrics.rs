//! `/metrics` in the Prometheus text format (OpenMetrics), read off the live state at each
//! scrape: nothing on the request path is touched to produce it. Never a key or a digest; key
//! ids only where a metric is per key.

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::snapshot::SnapshotStore;

/// The content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

fn gauge(registry: &mut Registry, name: &str, help: &str, value: f64) {
    let g = Gauge::<f64, AtomicU64>::default();
    g.set(value);
    registry.register(name, help, g);
}

fn counter(registry: &mut Registry, name: &str, help: &str, value: &AtomicU64) {
    let c = Counter::<u64>::default();
    c.inc_by(value.load(Ordering::Relaxed));
    registry.register(name, help, c);
}

/// Encode the current metrics.
pub fn render(store: &SnapshotStore, limits: &crate::ratelimit::RateLimits) -> String {
    let mut registry = Registry::with_prefix("keygate");
    let current = store.current();
    let stats = &store.stats;
    if let Some(s) = current.as_ref() {
        gauge(
            &mut registry,
            "snapshot_revision",
            "Revision of the snapshot in force",
            s.revision as f64,
        );
        gauge(
            &mut registry,
            "snapshot_keys",
            "Keys in force (quarantined entries excluded)",
            s.key_count() as f64,
        );
        gauge(
            &mut registry,
            "snapshot_quarantined_entries",
            "Entries of the snapshot in force that act as absent because they are invalid",
            s.quarantined.len() as f64,
        );
    }
    gauge(
        &mut registry,
        "snapshot_in_force",
        "1 while a snapshot is in force",
        f64::from(u8::from(current.is_some())),
    );
    gauge(
        &mut registry,
        "snapshot_fresh",
        "1 while the snapshot in force may be served (present and within snapshot.max_staleness)",
        f64::from(u8::from(store.serving().is_some())),
    );
    if let Some(age) = store.unconfirmed_for() {
        gauge(
            &mut registry,
            "snapshot_unconfirmed_seconds",
            "Seconds since the source last confirmed the snapshot in force",
            age.as_secs_f64(),
        );
    }
    if let Some(max) = store.max_staleness() {
        gauge(
            &mut registry,
            "snapshot_max_staleness_seconds",
            "snapshot.max_staleness: past this age the snapshot is not served",
            max.as_secs_f64(),
        );
    }
    let reloads = Family::<Vec<(&'static str, &'static str)>, Counter>::default();
    reloads
        .get_or_create(&vec![("result", "applied")])
        .inc_by(stats.reloads_applied.load(Ordering::Relaxed));
    reloads
        .get_or_create(&vec![("result", "rejected")])
        .inc_by(stats.reloads_rejected.load(Ordering::Relaxed));
    registry.register(
        "snapshot_reloads",
        "Snapshot documents and deltas offered by the source, by result",
        reloads,
    );
    counter(
        &mut registry,
        "snapshot_fetch_errors",
        "Attempts to reach the source that brought no document (unreachable, error status, timeout, broken stream)",
        &stats.fetch_errors,
    );
    counter(
        &mut registry,
        "snapshot_confirmations",
        "Answers that confirmed the snapshot in force unchanged (HTTP 304, gRPC heartbeats)",
        &stats.confirmations,
    );
    counter(
        &mut registry,
        "snapshot_deltas_applied",
        "keygate.sync.v1 deltas applied",
        &stats.deltas_applied,
    );
    if let Some(redis) = &limits.redis {
        counter(
            &mut registry,
            "ratelimit_redis_answered",
            "Rate-limit decisions made by Redis (rate_limit.backend = \"redis\")",
            &redis.stats.answered,
        );
        counter(
            &mut registry,
            "ratelimit_redis_fallbacks",
            "Rate-limit decisions made locally because Redis did not answer in time",
            &redis.stats.fallbacks,
        );
        gauge(
            &mut registry,
            "ratelimit_redis_degraded",
            "1 while Redis is not answering and rate limits are per replica",
            f64::from(u8::from(redis.is_degraded())),
        );
    }
    let mut out = String::new();
    encode(&mut out, &registry).expect("writing to a String cannot fail");
    out
}
