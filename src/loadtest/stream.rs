//! SSE subscribers: `GET /api/cockpit/stream` as owners, territory managers and the admin,
//! recording when each event first arrived and how often.
//!
//! Every subscriber opens its stream with `Last-Event-ID` set to the outbox position before the
//! run, so no event of the run can slip in between subscribing and the first write. A stream
//! that ends (or fails) is reopened with the last position received, as a browser would; such
//! reconnects are counted, and so are `resync` frames (the service dropped events for a slow
//! client — which then show up as lost).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use eventsource_stream::Eventsource;
use futures::StreamExt;
use reqwest::Client;
use serde::Serialize;
use uuid::Uuid;

use super::setup::{Fleet, LoadUser};
use super::stats::Clock;
use crate::identity::Principal;

/// One event as a subscriber received it.
#[derive(Debug, Clone, Copy)]
pub struct Received {
    pub position: i64,
    /// First arrival (µs on the run's clock).
    pub first_us: u64,
    /// Frames with this key (more than 1 = duplicates).
    pub count: u32,
}

/// What one subscriber has seen so far.
#[derive(Debug, Default)]
pub struct Seen {
    /// By idempotency key.
    pub keys: HashMap<Uuid, Received>,
    pub frames: u64,
    pub resyncs: u64,
    /// Named events that ended the stream (`reauth`, `replaced`).
    pub endings: Vec<String>,
    pub reconnects: u64,
    /// Frames whose data carried no readable idempotency key.
    pub unreadable: u64,
    pub last_position: i64,
    /// Errors opening or reading the stream, with their count.
    pub errors: HashMap<String, u64>,
}

/// An open subscriber.
pub struct Subscriber {
    pub principal: Principal,
    pub url: String,
    seen: Arc<Mutex<Seen>>,
    task: tokio::task::JoinHandle<()>,
}

impl Subscriber {
    /// What it has seen (locked while the guard lives).
    pub fn seen(&self) -> MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Counts of a subscriber for the report.
#[derive(Debug, Clone, Serialize)]
pub struct SubscriberReport {
    pub user: String,
    pub role: String,
    pub territory: String,
    pub url: String,
    pub frames: u64,
    pub distinct_events: u64,
    pub resyncs: u64,
    pub reconnects: u64,
    pub endings: Vec<String>,
    pub unreadable: u64,
    pub errors: Vec<(String, u64)>,
}

impl Subscriber {
    /// Its counts.
    pub fn report(&self) -> SubscriberReport {
        let s = self.seen();
        SubscriberReport {
            user: self.principal.user_id.clone(),
            role: self.principal.role.as_str().to_string(),
            territory: self.principal.territory.code().to_string(),
            url: self.url.clone(),
            frames: s.frames,
            distinct_events: s.keys.len() as u64,
            resyncs: s.resyncs,
            reconnects: s.reconnects,
            endings: s.endings.clone(),
            unreadable: s.unreadable,
            errors: s.errors.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        }
    }
}

/// The users that subscribe: the admin, the three managers, then sales users (owners) in turn.
pub fn subscribers(fleet: &Fleet, n: usize) -> Vec<LoadUser> {
    let mut out = Vec::with_capacity(n);
    out.push(fleet.admin.clone());
    out.extend(fleet.managers.iter().cloned());
    let mut i = 0;
    while out.len() < n {
        out.push(fleet.sales[i % fleet.sales.len()].clone());
        i += 1;
    }
    out.truncate(n);
    out
}

/// The idempotency key inside a frame's JSON, found without parsing the whole envelope.
pub fn key_of(data: &str) -> Option<Uuid> {
    const ATTR: &str = "\"idempotencykey\":\"";
    let at = data.find(ATTR)? + ATTR.len();
    data.get(at..at + 36)?.parse().ok()
}

async fn connect(
    client: &Client,
    url: &str,
    user: &LoadUser,
    last_id: i64,
) -> Result<reqwest::Response, String> {
    let r = client
        .get(format!("{url}/api/cockpit/stream"))
        .header("Authorization", &user.bearer)
        .header("Last-Event-ID", last_id.to_string())
        .header("Accept", "text/event-stream")
        .send()
        .await
        .map_err(|e| format!("connect: {e}"))?;
    if !r.status().is_success() {
        return Err(format!("HTTP {}", r.status().as_u16()));
    }
    Ok(r)
}

fn note_error(seen: &Mutex<Seen>, e: String) {
    let mut s = seen.lock().unwrap_or_else(|e| e.into_inner());
    *s.errors.entry(e).or_default() += 1;
}

/// Reads frames until the stream ends.
async fn read(response: reqwest::Response, seen: &Mutex<Seen>, clock: Clock) {
    let mut events = response.bytes_stream().eventsource();
    while let Some(ev) = events.next().await {
        let at = clock.now_us();
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => {
                note_error(seen, format!("read: {e}"));
                return;
            }
        };
        let mut s = seen.lock().unwrap_or_else(|e| e.into_inner());
        match ev.event.as_str() {
            "resync" => s.resyncs += 1,
            "reauth" | "replaced" => {
                s.endings.push(ev.event.clone());
            }
            _ => {
                s.frames += 1;
                let position = ev.id.trim().parse::<i64>().unwrap_or(0);
                s.last_position = s.last_position.max(position);
                match key_of(&ev.data) {
                    Some(key) => {
                        s.keys
                            .entry(key)
                            .and_modify(|r| r.count += 1)
                            .or_insert(Received {
                                position,
                                first_us: at,
                                count: 1,
                            });
                    }
                    None => s.unreadable += 1,
                }
            }
        }
    }
}

/// Opens a stream for `user` on `url` resuming after `after` and keeps it open (reconnecting
/// with the last position received) until dropped. Returns once the first connection answered,
/// so the subscriber is registered in the service's hub.
pub async fn open(
    client: Client,
    url: String,
    user: LoadUser,
    after: i64,
    clock: Clock,
) -> anyhow::Result<Subscriber> {
    let first = connect(&client, &url, &user, after).await.map_err(|e| {
        anyhow::anyhow!(
            "the event stream of {} at {url} refused: {e}",
            user.principal.user_id
        )
    })?;
    let seen = Arc::new(Mutex::new(Seen {
        last_position: after,
        ..Seen::default()
    }));
    let task = {
        let seen = seen.clone();
        let (url, user) = (url.clone(), user.clone());
        tokio::spawn(async move {
            read(first, &seen, clock).await;
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let last = {
                    let mut s = seen.lock().unwrap_or_else(|e| e.into_inner());
                    s.reconnects += 1;
                    s.last_position
                };
                match connect(&client, &url, &user, last).await {
                    Ok(r) => read(r, &seen, clock).await,
                    Err(e) => note_error(&seen, e),
                }
            }
        })
    };
    Ok(Subscriber {
        principal: user.principal,
        url,
        seen,
        task,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_read_from_a_compact_envelope() {
        let data = r#"{"data":{"leadId":"x"},"datacontenttype":"application/json","id":"0193","idempotencykey":"952ece31-903f-55ee-9463-50cc4c7b7b01","position":12}"#;
        assert_eq!(
            key_of(data),
            Some("952ece31-903f-55ee-9463-50cc4c7b7b01".parse().unwrap())
        );
        assert_eq!(key_of(r#"{"reason":"x"}"#), None);
        assert_eq!(key_of(r#"{"idempotencykey":"short"}"#), None);
    }
}
