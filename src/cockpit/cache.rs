//! The per-instance lead-widget cache's invalidation hook. Every consumed event marks the
//! entries of its territory and owner stale; until the widget itself exists this only counts
//! (`freshplan_dashboard_cache_invalidations_total`), so the path is observable end to end.

use std::sync::Arc;

use crate::events::consumer::{Event, LocalEffect};
use crate::telemetry::metrics::Metrics;

/// Widget label of the cache-invalidation metric.
pub const LEAD_WIDGET: &str = "lead-widget";

/// The widget cache of one instance.
pub struct WidgetCache {
    metrics: Arc<Metrics>,
}

impl WidgetCache {
    /// A cache counting into `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        WidgetCache { metrics }
    }
}

impl LocalEffect for WidgetCache {
    fn on_event(&self, _event: &Event<'_>) {
        self.metrics
            .cache_invalidations
            .with_label_values(&[LEAD_WIDGET, "event"])
            .inc();
    }
}
