//! What the paced load generators (`ext_authz_load`, `http_load`) share: the line they print.
//! Not an example itself (no `main.rs` here); each includes it with `mod support;`.

/// The nearest-rank quantile `q` of sorted nanoseconds, in milliseconds (NaN when empty).
pub fn quantile_ms(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64 / 1e6
}

/// `rate <asked> <achieved> ok <n> failed <n> p50 <ms> p90 <ms> p99 <ms> p99.9 <ms> max <ms>`,
/// the part of the line both clients print (the bench scripts read its fields by position);
/// `latency` sorted, in nanoseconds.
pub fn summary(asked: f64, achieved: f64, failed: u64, latency: &[u64]) -> String {
    let ms = |q| quantile_ms(latency, q);
    format!(
        "rate {asked:.0} {achieved:.0} ok {} failed {failed} p50 {:.3} p90 {:.3} p99 {:.3} p99.9 {:.3} max {:.3}",
        latency.len(),
        ms(0.5),
        ms(0.9),
        ms(0.99),
        ms(0.999),
        ms(1.0),
    )
}
