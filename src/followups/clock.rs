//! The job's clock, injectable so tests and the demo can move time.

use std::sync::atomic::{AtomicI64, Ordering};

use chrono::{DateTime, Duration, Utc};

/// Wall-clock time moved by an adjustable offset (0 in production). Business times of the
/// follow-ups (due dates, `sent_at`, the season of a template) come from here; retry backoff
/// uses real time.
#[derive(Debug, Default)]
pub struct Clock {
    offset_ms: AtomicI64,
}

impl Clock {
    /// The real time.
    pub fn system() -> Self {
        Self::default()
    }

    /// Now, as the job sees it.
    pub fn now(&self) -> DateTime<Utc> {
        Utc::now() + Duration::milliseconds(self.offset_ms.load(Ordering::Relaxed))
    }

    /// Moves the clock so that [`Clock::now`] answers about `t` at this moment.
    pub fn set(&self, t: DateTime<Utc>) {
        self.offset_ms
            .store((t - Utc::now()).num_milliseconds(), Ordering::Relaxed);
    }

    /// Moves the clock forward (or back) by `d`.
    pub fn advance(&self, d: Duration) {
        self.offset_ms
            .fetch_add(d.num_milliseconds(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_moved_clock_answers_the_moved_time_and_keeps_running() {
        let c = Clock::system();
        let target = Utc::now() + Duration::days(3) + Duration::hours(1);
        c.set(target);
        let now = c.now();
        assert!(
            (now - target).num_milliseconds().abs() < 1000,
            "{now} vs {target}"
        );
        c.advance(Duration::days(7));
        assert!(c.now() - now >= Duration::days(7));
    }
}
