//! The service's own view: `/q/metrics` of every instance, parsed from the Prometheus text
//! format, and bucket histograms subtracted (after − before) into the distribution of one phase.
//!
//! Percentiles of a bucket histogram are interpolated linearly inside the bucket, as PromQL's
//! `histogram_quantile` does, so they are only as fine as the buckets (1, 2, 5, 10, … ms for the
//! event path). A value in the +Inf bucket is reported as the highest finite bound.

use serde::Serialize;

use super::stats::Summary;

/// One sample: metric name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    /// The value of label `k`.
    pub fn label(&self, k: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(name, _)| name == k)
            .map(|(_, v)| v.as_str())
    }
}

/// One scrape of one or more instances (their samples side by side).
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    pub samples: Vec<Sample>,
}

fn parse_labels(text: &str) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut rest = text;
    loop {
        rest = rest.trim_start_matches([',', ' ']);
        if rest.is_empty() {
            return Some(out);
        }
        let (name, after) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, other)) => value.push(other),
                    None => return None,
                },
                '"' => {
                    end = Some(i);
                    break;
                }
                c => value.push(c),
            }
        }
        let end = end?;
        out.push((name.trim().to_string(), value));
        rest = &after[end + 1..];
    }
}

impl Scrape {
    /// Parses the Prometheus text format; lines it cannot read are skipped.
    pub fn parse(text: &str) -> Scrape {
        let mut samples = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (head, value) = match line.rfind('}') {
                Some(close) => (&line[..=close], line[close + 1..].trim()),
                None => match line.split_once(' ') {
                    Some((h, v)) => (h, v.trim()),
                    None => continue,
                },
            };
            let value = value.split_whitespace().next().unwrap_or("");
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = match head.split_once('{') {
                Some((name, labels)) => match parse_labels(labels.trim_end_matches('}')) {
                    Some(l) => (name, l),
                    None => continue,
                },
                None => (head, Vec::new()),
            };
            samples.push(Sample {
                name: name.to_string(),
                labels,
                value,
            });
        }
        Scrape { samples }
    }

    /// The samples of several instances as one scrape (counters and buckets then add up).
    pub fn combine(scrapes: Vec<Scrape>) -> Scrape {
        Scrape {
            samples: scrapes.into_iter().flat_map(|s| s.samples).collect(),
        }
    }

    /// Sum of the samples named `name` whose labels satisfy `keep`.
    pub fn sum(&self, name: &str, keep: impl Fn(&Sample) -> bool) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name && keep(s))
            .map(|s| s.value)
            .sum()
    }

    /// The bucket histogram `name` summed over every label set that `keep` admits.
    pub fn histogram(&self, name: &str, keep: impl Fn(&Sample) -> bool) -> Buckets {
        let bucket = format!("{name}_bucket");
        let mut bounds: Vec<(f64, f64)> = Vec::new();
        for s in self.samples.iter().filter(|s| s.name == bucket && keep(s)) {
            let Some(le) = s.label("le") else { continue };
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                match le.parse() {
                    Ok(v) => v,
                    Err(_) => continue,
                }
            };
            match bounds.iter_mut().find(|(b, _)| *b == le) {
                Some((_, c)) => *c += s.value,
                None => bounds.push((le, s.value)),
            }
        }
        bounds.sort_by(|a, b| a.0.total_cmp(&b.0));
        Buckets {
            cumulative: bounds,
            sum: self.sum(&format!("{name}_sum"), &keep),
        }
    }
}

/// A cumulative bucket histogram (bounds in the metric's unit, here milliseconds).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Buckets {
    /// `(upper bound, cumulative count)`, ascending; the last bound is +Inf.
    pub cumulative: Vec<(f64, f64)>,
    pub sum: f64,
}

impl Buckets {
    /// Observations counted.
    pub fn count(&self) -> f64 {
        self.cumulative.last().map(|b| b.1).unwrap_or(0.0)
    }

    /// `self − before`: the observations made between two scrapes.
    pub fn minus(&self, before: &Buckets) -> Buckets {
        let cumulative = self
            .cumulative
            .iter()
            .map(|&(le, c)| {
                let prior = before
                    .cumulative
                    .iter()
                    .find(|(b, _)| *b == le)
                    .map(|b| b.1)
                    .unwrap_or(0.0);
                (le, (c - prior).max(0.0))
            })
            .collect();
        Buckets {
            cumulative,
            sum: (self.sum - before.sum).max(0.0),
        }
    }

    /// The `q`-quantile (0..1), interpolated inside its bucket; `None` without observations.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total <= 0.0 {
            return None;
        }
        let rank = q * total;
        let mut lower_bound = 0.0;
        let mut lower_count = 0.0;
        for &(le, c) in &self.cumulative {
            if c >= rank && c > lower_count {
                if le.is_infinite() {
                    return Some(lower_bound);
                }
                let share = (rank - lower_count) / (c - lower_count);
                return Some(lower_bound + (le - lower_bound) * share.clamp(0.0, 1.0));
            }
            if !le.is_infinite() {
                lower_bound = le;
            }
            lower_count = c;
        }
        Some(lower_bound)
    }

    /// Share of observations at or below `bound` (a bucket bound), 0..1.
    pub fn share_at_most(&self, bound: f64) -> Option<f64> {
        let total = self.count();
        if total <= 0.0 {
            return None;
        }
        self.cumulative
            .iter()
            .find(|(le, _)| *le == bound)
            .map(|(_, c)| c / total)
    }

    /// The same observations in another unit (`1000.0`: seconds → ms).
    pub fn scaled(&self, factor: f64) -> Buckets {
        Buckets {
            cumulative: self
                .cumulative
                .iter()
                .map(|&(le, c)| (le * factor, c))
                .collect(),
            sum: self.sum * factor,
        }
    }

    /// Percentiles in the report's shape (max = upper bound of the highest non-empty bucket).
    pub fn summary(&self) -> Summary {
        let count = self.count();
        let round = |v: f64| (v * 1000.0).round() / 1000.0;
        let q = |p| self.quantile(p).map(round);
        let mut max = None;
        let mut below = 0.0;
        for &(le, c) in &self.cumulative {
            if c > below {
                max = (!le.is_infinite()).then_some(le);
            }
            below = c;
        }
        Summary {
            count: count as u64,
            p50_ms: q(0.50),
            p95_ms: q(0.95),
            p99_ms: q(0.99),
            p999_ms: q(0.999),
            max_ms: max,
            mean_ms: (count > 0.0).then(|| round(self.sum / count)),
        }
    }

    /// `(percentile, ms)` at the report's curve points.
    pub fn curve(&self) -> Vec<(f64, f64)> {
        if self.count() <= 0.0 {
            return Vec::new();
        }
        super::stats::CURVE_PERCENTILES
            .iter()
            .filter(|&&p| p < 100.0)
            .filter_map(|&p| self.quantile(p / 100.0).map(|v| (p, v)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP freshplan_event_latency_ms Event path latency
# TYPE freshplan_event_latency_ms histogram
freshplan_event_latency_ms_bucket{event_type="a",path="publish_notify",le="1"} 50
freshplan_event_latency_ms_bucket{event_type="a",path="publish_notify",le="2"} 90
freshplan_event_latency_ms_bucket{event_type="a",path="publish_notify",le="+Inf"} 100
freshplan_event_latency_ms_sum{event_type="a",path="publish_notify"} 120
freshplan_event_latency_ms_count{event_type="a",path="publish_notify"} 100
freshplan_event_latency_ms_bucket{event_type="b",path="publish_notify",le="1"} 50
freshplan_event_latency_ms_bucket{event_type="b",path="publish_notify",le="2"} 50
freshplan_event_latency_ms_bucket{event_type="b",path="publish_notify",le="+Inf"} 100
freshplan_events_consumed_total{event_type="a",module="m",result="success"} 7
weird{x="a \"quoted\", value"} 3
"#;

    #[test]
    fn buckets_of_every_label_set_add_up_and_interpolate() {
        let s = Scrape::parse(TEXT);
        let h = s.histogram("freshplan_event_latency_ms", |x| {
            x.label("path") == Some("publish_notify")
        });
        assert_eq!(h.count(), 200.0);
        assert_eq!(
            h.cumulative,
            vec![(1.0, 100.0), (2.0, 140.0), (f64::INFINITY, 200.0)]
        );
        assert_eq!(h.quantile(0.5), Some(1.0));
        assert_eq!(h.quantile(0.6), Some(1.5));
        assert_eq!(h.quantile(0.99), Some(2.0), "+Inf reads as the last bound");
        assert_eq!(h.share_at_most(1.0), Some(0.5));
        assert_eq!(
            h.summary().max_ms,
            None,
            "observations beyond the last bound"
        );
        assert_eq!(
            s.sum("freshplan_events_consumed_total", |x| x.label("result")
                == Some("success")),
            7.0
        );
        assert_eq!(
            s.samples.last().unwrap().label("x"),
            Some("a \"quoted\", value")
        );
    }

    #[test]
    fn a_delta_keeps_only_what_happened_between_two_scrapes() {
        let before = Buckets {
            cumulative: vec![(1.0, 10.0), (5.0, 10.0), (f64::INFINITY, 10.0)],
            sum: 5.0,
        };
        let after = Buckets {
            cumulative: vec![(1.0, 10.0), (5.0, 30.0), (f64::INFINITY, 30.0)],
            sum: 65.0,
        };
        let d = after.minus(&before);
        assert_eq!(d.count(), 20.0);
        assert_eq!(d.quantile(0.5), Some(3.0));
        let s = d.summary();
        assert_eq!(s.max_ms, Some(5.0));
        assert_eq!(s.mean_ms, Some(3.0));
        assert_eq!(Buckets::default().quantile(0.5), None);
    }
}
