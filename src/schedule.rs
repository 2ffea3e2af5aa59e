//! When the follow-up job runs: a cron expression in a time zone (default daily 09:00
//! Europe/Berlin). A leaf: no other module of this crate is imported.

use std::str::FromStr;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;

/// A parsed schedule.
#[derive(Debug, Clone)]
pub struct Schedule {
    inner: cron::Schedule,
    tz: Tz,
}

impl Schedule {
    /// Parses the usual five fields (minute hour day-of-month month day-of-week); six or seven
    /// fields (with seconds, and a year) are accepted as the `cron` crate reads them.
    pub fn parse(expr: &str, tz: Tz) -> Result<Self, String> {
        let fields = expr.split_whitespace().count();
        let full = match fields {
            5 => format!("0 {expr}"),
            6 | 7 => expr.to_string(),
            _ => {
                return Err(format!(
                    "`{expr}`: expected 5 fields (minute hour day-of-month month day-of-week)"
                ))
            }
        };
        let inner = cron::Schedule::from_str(&full).map_err(|e| format!("`{expr}`: {e}"))?;
        if inner.upcoming(tz).next().is_none() {
            return Err(format!("`{expr}` never fires"));
        }
        Ok(Schedule { inner, tz })
    }

    /// The first firing strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.inner
            .after(&t.with_timezone(&self.tz))
            .next()
            .map(|n| n.with_timezone(&Utc))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn daily_nine_in_berlin_is_eight_utc_in_winter_and_seven_utc_in_summer() {
        let s = Schedule::parse("0 9 * * *", chrono_tz::Europe::Berlin).unwrap();
        assert_eq!(
            s.next_after(at("2026-12-03T10:00:00Z")),
            Some(at("2026-12-04T08:00:00Z"))
        );
        assert_eq!(
            s.next_after(at("2026-07-01T06:59:00Z")),
            Some(at("2026-07-01T07:00:00Z"))
        );
        // Across the switch to summer time (29 March 2026).
        assert_eq!(
            s.next_after(at("2026-03-28T08:00:00Z")),
            Some(at("2026-03-29T07:00:00Z"))
        );
    }

    #[test]
    fn malformed_expressions_are_refused_with_the_expression_named() {
        for bad in ["", "9 * * *", "61 9 * * *", "0 25 * * *", "every day"] {
            let e = Schedule::parse(bad, chrono_tz::Europe::Berlin).unwrap_err();
            assert!(e.contains('`'), "{bad}: {e}");
        }
    }
}
