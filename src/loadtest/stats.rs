//! Latency bookkeeping: one clock for the whole run, HDR histograms in microseconds, and their
//! summaries (percentiles in milliseconds) as the report shows them.

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Largest latency a histogram holds (2 minutes); larger samples are clamped to it.
pub const MAX_MICROS: u64 = 120_000_000;

/// Percentiles of the curves in the report (100 = the maximum).
pub const CURVE_PERCENTILES: &[f64] = &[
    0.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 98.0, 99.0, 99.5, 99.9, 99.95, 99.99, 100.0,
];

/// The run's single clock: every timestamp of the run is microseconds since its start, so
/// intended start times, responses and SSE arrivals compare directly.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    start: Instant,
}

impl Clock {
    /// A clock starting now.
    pub fn new() -> Self {
        Clock {
            start: Instant::now(),
        }
    }

    /// Microseconds since the start.
    pub fn now_us(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }

    /// The instant `us` microseconds after the start.
    pub fn at(&self, us: u64) -> Instant {
        self.start + Duration::from_micros(us)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// An empty histogram of microseconds with three significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_MICROS, 3).expect("static bounds are valid")
}

/// Records `micros` (clamped to 1 µs … [`MAX_MICROS`]).
pub fn record(h: &mut Histogram<u64>, micros: u64) {
    h.saturating_record(micros.clamp(1, MAX_MICROS));
}

/// Adds `from` into `into`.
pub fn merge(into: &mut Histogram<u64>, from: &Histogram<u64>) {
    // Both come from `histogram()`, with the same bounds: adding cannot fail.
    let _ = into.add(from);
}

/// Percentiles of a latency distribution, in milliseconds.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Summary {
    pub count: u64,
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub p999_ms: Option<f64>,
    /// Exact maximum for client-side histograms; for the service's bucket histograms the upper
    /// bound of the highest non-empty bucket (`None` when that is +Inf).
    pub max_ms: Option<f64>,
    pub mean_ms: Option<f64>,
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// The summary of an HDR histogram (empty: count 0 and no percentiles).
pub fn summarize(h: &Histogram<u64>) -> Summary {
    if h.is_empty() {
        return Summary::default();
    }
    let q = |p: f64| Some(ms(h.value_at_quantile(p)));
    Summary {
        count: h.len(),
        p50_ms: q(0.50),
        p95_ms: q(0.95),
        p99_ms: q(0.99),
        p999_ms: q(0.999),
        max_ms: Some(ms(h.max())),
        mean_ms: Some((h.mean()).round() / 1000.0),
    }
}

/// `(percentile, milliseconds)` at [`CURVE_PERCENTILES`].
pub fn curve(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    if h.is_empty() {
        return Vec::new();
    }
    CURVE_PERCENTILES
        .iter()
        .map(|&p| {
            let v = if p >= 100.0 {
                h.max()
            } else {
                h.value_at_quantile(p / 100.0)
            };
            (p, ms(v))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_summary_reads_percentiles_in_milliseconds() {
        let mut h = histogram();
        for us in 1..=1000 {
            record(&mut h, us * 10);
        }
        let s = summarize(&h);
        assert_eq!(s.count, 1000);
        assert!((s.p50_ms.unwrap() - 5.0).abs() < 0.01, "{s:?}");
        assert!((s.p99_ms.unwrap() - 9.9).abs() < 0.01, "{s:?}");
        assert!((s.max_ms.unwrap() - 10.0).abs() < 0.01, "{s:?}");
        assert_eq!(curve(&h).last().map(|p| p.0), Some(100.0));
        assert_eq!(summarize(&histogram()), Summary::default());
    }

    #[test]
    fn samples_beyond_the_bounds_are_clamped_not_lost() {
        let mut h = histogram();
        record(&mut h, 0);
        record(&mut h, u64::MAX);
        assert_eq!(h.len(), 2);
        assert!(h.max() >= MAX_MICROS);
    }
}
