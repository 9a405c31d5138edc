//! `/metrics` in the Prometheus text format (OpenMetrics), read off the live state at each
//! scrape: nothing on the request path is touched to produce it. Never a key or a digest; key
//! ids only where a metric is per key.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use prometheus_client::registry::Unit;

use crate::snapshot::SnapshotStore;
use crate::sync::server::Hub;
use crate::telemetry::{Front, HistogramTotals, Telemetry};
use crate::tls::TlsServer;

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

/// Latency histograms, one per front (label `front`), from [`Telemetry`]'s sums.
#[derive(Debug)]
struct ByFront(Vec<(&'static str, HistogramTotals)>);

impl EncodeMetric for ByFront {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        for (front, h) in &self.0 {
            encoder
                .encode_family(&vec![("front", *front)])?
                .encode_histogram::<NoLabelSet>(h.sum_seconds, h.count, &h.buckets, None)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// What the fronts counted: answers by front and code, latency, upstream errors, connections
/// (the hub's too, when there is one).
fn fronts(registry: &mut Registry, telemetry: &Telemetry, fronts: &[Front], hub: Option<&Hub>) {
    let answers = Family::<Vec<(&'static str, &'static str)>, Counter>::default();
    let upstream = Family::<Vec<(&'static str, &'static str)>, Counter>::default();
    let open = Family::<Vec<(&'static str, &'static str)>, Gauge>::default();
    let refused = Family::<Vec<(&'static str, &'static str)>, Counter>::default();
    let (mut decision, mut request) = (Vec::new(), Vec::new());
    for &front in fronts {
        let t = telemetry.totals(front);
        let name = front.as_str();
        for (code, n) in &t.answers {
            answers
                .get_or_create(&vec![("front", name), ("code", *code)])
                .inc_by(*n);
            let kind = match *code {
                "upstream_unavailable" => "unavailable",
                "upstream_timeout" => "timeout",
                _ => continue,
            };
            upstream.get_or_create(&vec![("kind", kind)]).inc_by(*n);
        }
        if t.broken_answers > 0 {
            upstream
                .get_or_create(&vec![("kind", "unavailable")])
                .inc_by(t.broken_answers);
        }
        open.get_or_create(&vec![("front", name)])
            .set(i64::try_from(t.open_connections).unwrap_or(i64::MAX));
        refused
            .get_or_create(&vec![("front", name), ("reason", "max_connections")])
            .inc_by(t.refused_connections);
        if front == Front::Proxy {
            refused
                .get_or_create(&vec![("front", name), ("reason", "max_connections_per_ip")])
                .inc_by(t.refused_connections_per_ip);
        }
        decision.push((name, t.decision));
        request.push((name, t.request));
    }
    if let Some(hub) = hub {
        let c = &hub.connections;
        open.get_or_create(&vec![("front", "sync_server")])
            .set(i64::try_from(c.open()).unwrap_or(i64::MAX));
        refused
            .get_or_create(&vec![
                ("front", "sync_server"),
                ("reason", "max_connections"),
            ])
            .inc_by(c.refused());
    }
    registry.register(
        "requests",
        "Requests answered, by front and code (\"allowed\", or the denial's code)",
        answers,
    );
    registry.register_with_unit(
        "decision_duration",
        "From a request's arrival to its verdict (decision and rate limit)",
        Unit::Seconds,
        ByFront(decision),
    );
    registry.register_with_unit(
        "request_duration",
        "From a request's arrival to its answer's head (proxy: the upstream's answer)",
        Unit::Seconds,
        ByFront(request),
    );
    if fronts.contains(&Front::Proxy) {
        for kind in ["unavailable", "timeout"] {
            upstream.get_or_create(&vec![("kind", kind)]).inc_by(0);
        }
        registry.register(
            "upstream_errors",
            "Proxied requests the upstream did not answer: refused or broken (502), too slow (504)",
            upstream,
        );
    }
    registry.register("connections_open", "Connections open now, by front", open);
    registry.register(
        "connections_refused",
        "Connections reset at once, by front and reason: limits.max_connections were open, \
         or proxy.max_connections_per_ip from the client's address",
        refused,
    );
}

/// The hub's side of `keygate.sync.v1`: who follows it and what it sent them.
fn hub(registry: &mut Registry, hub: &Hub) {
    gauge(
        registry,
        "sync_watchers",
        "Watch streams open now on sync_server: the sidecars following this hub",
        hub.stats.watching() as f64,
    );
    let sent = Family::<Vec<(&'static str, &'static str)>, Counter>::default();
    for (event, n) in hub.stats.sent() {
        sent.get_or_create(&vec![("event", event)]).inc_by(n);
    }
    registry.register(
        "sync_sent",
        "Events sent on Watch streams, by kind: full (a whole snapshot), delta, heartbeat",
        sent,
    );
    let refused = Counter::<u64>::default();
    refused.inc_by(hub.stats.unauthenticated());
    registry.register(
        "sync_unauthenticated",
        "Watch calls refused for a missing or wrong bearer token (sync_server.token_env)",
        refused,
    );
}

/// When each TLS listener's certificate expires, read off the certificate in force at each
/// scrape (a rotation shows at the next one).
fn certificates(registry: &mut Registry, servers: &[Arc<TlsServer>]) {
    if servers.is_empty() {
        return;
    }
    let expiry = Family::<Vec<(&'static str, &'static str)>, Gauge>::default();
    for server in servers {
        if let Some(at) = server.not_after() {
            expiry
                .get_or_create(&vec![("listener", server.name())])
                .set(i64::try_from(at).unwrap_or(i64::MAX));
        }
    }
    registry.register(
        "tls_certificate_expiration_timestamp_seconds",
        "When the certificate a TLS listener serves stops being valid (its notAfter), \
         as seconds since the Unix epoch",
        expiry,
    );
    let failed = Family::<Vec<(&'static str, &'static str)>, Counter>::default();
    for server in servers {
        failed
            .get_or_create(&vec![("listener", server.name())])
            .inc_by(server.failed_reloads());
    }
    registry.register(
        "tls_reload_failures",
        "Changed certificate files a TLS listener could not put in force (it kept the \
         certificate in force)",
        failed,
    );
}

/// Encode the current metrics. `fronts` are the fronts this keygate runs, `tls` its TLS
/// listeners, `hub` its sync server if it runs one.
pub fn render(
    store: &SnapshotStore,
    limits: &crate::ratelimit::RateLimits,
    telemetry: &Telemetry,
    running: &[Front],
    tls: &[Arc<TlsServer>],
    hub: Option<&Hub>,
) -> String {
    let mut registry = Registry::with_prefix("keygate");
    fronts(&mut registry, telemetry, running, hub);
    if let Some(h) = hub {
        self::hub(&mut registry, h);
    }
    certificates(&mut registry, tls);
    counter(
        &mut registry,
        "log_lines_dropped",
        "Log lines dropped because stderr's reader did not keep up (log.buffered_lines)",
        &AtomicU64::new(crate::telemetry::log_lines_dropped()),
    );
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
        "Attempts to reach the source that brought no document (a file that cannot be read, unreachable, error status, timeout, broken stream)",
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
