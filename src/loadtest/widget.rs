//! Widget readers: `GET /api/cockpit/lead-widget` at a fixed rate per reader (open loop, timed
//! from the intended start), as a sales user (own), a manager (territory) and the admin (all) in
//! turn. A client cannot tell a cache hit from a miss; the service's own
//! `freshplan_widget_query_ms{scope,cache}` tells that, and the report shows both.

use std::sync::Arc;
use std::time::Duration;

use reqwest::{Client, StatusCode};
use serde::Serialize;
use tokio::task::JoinSet;

use super::setup::{Fleet, LoadUser};
use super::stats::Clock;

/// One widget request as it went.
#[derive(Debug, Clone)]
pub struct WidgetRecord {
    pub scope: &'static str,
    pub intended_us: u64,
    pub done_us: u64,
    /// HTTP status (0: no answer).
    pub status: u16,
}

/// Who reads which scope.
#[derive(Debug, Clone)]
pub struct Reader {
    pub user: LoadUser,
    pub scope: &'static str,
}

/// Scopes per reader role, in the order readers are made.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ReaderSpec {
    pub readers: usize,
    /// Requests a second per reader.
    pub rate: f64,
}

/// `n` readers: sales (own), manager (territory), admin (all), sales, … .
pub fn readers(fleet: &Fleet, n: usize) -> Vec<Reader> {
    (0..n)
        .map(|i| match i % 3 {
            0 => Reader {
                user: fleet.sales[(i / 3) % fleet.sales.len()].clone(),
                scope: "own",
            },
            1 => Reader {
                user: fleet.managers[(i / 3) % fleet.managers.len()].clone(),
                scope: "territory",
            },
            _ => Reader {
                user: fleet.admin.clone(),
                scope: "all",
            },
        })
        .collect()
}

async fn read_once(client: &Client, url: &str, reader: &Reader) -> u16 {
    let sent = client
        .get(format!(
            "{url}/api/cockpit/lead-widget?scope={}",
            reader.scope
        ))
        .header("Authorization", &reader.user.bearer)
        .send()
        .await;
    match sent {
        Ok(r) => {
            let status = r.status();
            // The answer counts once its body is read.
            match r.bytes().await {
                Ok(_) => status.as_u16(),
                Err(_) => 0,
            }
        }
        Err(_) => 0,
    }
}

/// Runs every reader at `rate` requests a second for `duration` and returns the records.
pub async fn run(
    client: &Client,
    urls: &[String],
    readers: &[Reader],
    rate: f64,
    duration: Duration,
    clock: Clock,
) -> Vec<WidgetRecord> {
    if readers.is_empty() || rate <= 0.0 {
        return Vec::new();
    }
    let n = (rate * duration.as_secs_f64()).round() as u64;
    let period_us = 1e6 / rate;
    // Readers start spread over one period, not all at once.
    let offset_us = period_us / readers.len() as f64;
    let start_us = clock.now_us() + 1_000;
    let mut set = JoinSet::new();
    let mut out = Vec::new();
    let readers = Arc::new(readers.to_vec());
    for i in 0..n {
        for (r, reader) in readers.iter().enumerate() {
            let intended_us = start_us + (i as f64 * period_us + r as f64 * offset_us) as u64;
            tokio::time::sleep_until(clock.at(intended_us).into()).await;
            let client = client.clone();
            let url = urls[(i as usize + r) % urls.len()].clone();
            let reader = reader.clone();
            set.spawn(async move {
                let status = read_once(&client, &url, &reader).await;
                WidgetRecord {
                    scope: reader.scope,
                    intended_us,
                    done_us: clock.now_us(),
                    status,
                }
            });
            while let Some(Ok(rec)) = set.try_join_next() {
                out.push(rec);
            }
        }
    }
    while let Some(done) = set.join_next().await {
        if let Ok(rec) = done {
            out.push(rec);
        }
    }
    out
}

/// True for an answer that counts as read.
pub fn ok(r: &WidgetRecord) -> bool {
    r.status == StatusCode::OK.as_u16()
}
