//! The relay beside the SSE path (issue 14): with `--nats URL` the tool follows the JetStream
//! stream the relay writes (`FRESHPLAN_LEADS`) with an ordered consumer from the moment the run
//! starts, and records per event when JetStream stored it (the message's server timestamp) and
//! when the tool received it. After each service phase [`relay_delivery`] compares the phase's
//! committed events with the stream: what is missing is lost, what came twice is duplicated,
//! and the latencies are
//!
//! - **commit → stream**: the outbox row's `created_at` (its transaction's start, so this is an
//!   upper bound of commit → stored) → JetStream's stored timestamp (PostgreSQL's and NATS's
//!   clocks: run both on one host, or with synchronised clocks);
//! - **end to end via the relay**: the command's intended start → the message received by the
//!   tool, the same definition as the SSE path's end to end.
//!
//! The tool does not run the relay: start `freshplan relay` (or `serve` with
//! `freshplan.relay.enabled = true`) against the same database and NATS.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::Context;
use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use hdrhistogram::Histogram;
use uuid::Uuid;

use super::driver::WriteRecord;
use super::setup::Committed;
use super::stats::{histogram, record, Clock};

/// How long [`Watch::open`] waits for the relay to create its stream.
const STREAM_PATIENCE: std::time::Duration = std::time::Duration::from_secs(30);

/// One event as the tool saw it in the stream.
#[derive(Debug, Clone, Copy)]
pub struct Arrival {
    /// Messages with this `Nats-Msg-Id` (more than 1 = duplicated in the stream).
    pub count: u32,
    /// When the tool received the first (µs on the run's clock).
    pub received_us: u64,
    /// When JetStream stored the first (µs since the Unix epoch), when the message said.
    pub stored_unix_us: Option<i64>,
}

/// What the watcher has seen so far.
#[derive(Debug, Default)]
pub struct Seen {
    pub keys: HashMap<Uuid, Arrival>,
    pub messages: u64,
    /// Why the watcher stopped, when it did.
    pub error: Option<String>,
}

/// A running watcher of the relay's stream.
pub struct Watch {
    seen: Arc<Mutex<Seen>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Watch {
    /// Connects to `url`, finds `stream` and follows it from its next message on.
    pub async fn open(url: &str, stream: &str, clock: Clock) -> anyhow::Result<Watch> {
        let client = async_nats::connect(url)
            .await
            .with_context(|| format!("cannot connect to NATS at {url}"))?;
        let js = jetstream::new(client);
        // The relay creates its stream when it starts: give one that is starting a moment.
        let deadline = tokio::time::Instant::now() + STREAM_PATIENCE;
        let stream = loop {
            match js.get_stream(stream).await {
                Ok(s) => break s,
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(e).with_context(|| {
                        format!(
                            "no JetStream stream `{stream}` at {url} after {} s: is the relay running?",
                            STREAM_PATIENCE.as_secs()
                        )
                    })
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(200)).await,
            }
        };
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                deliver_policy: consumer::DeliverPolicy::New,
                ..Default::default()
            })
            .await
            .context("cannot create an ordered consumer on the relay's stream")?;
        let mut messages = consumer
            .messages()
            .await
            .context("cannot read the relay's stream")?;
        let seen = Arc::new(Mutex::new(Seen::default()));
        let into = seen.clone();
        let task = tokio::spawn(async move {
            while let Some(m) = messages.next().await {
                let received_us = clock.now_us();
                let m = match m {
                    Ok(m) => m,
                    Err(e) => {
                        // The ordered consumer recreates itself after a gap; other errors end it.
                        tracing::warn!(error = %e, "relay stream watcher");
                        continue;
                    }
                };
                let key = m
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
                    .and_then(|v| Uuid::parse_str(v.as_str()).ok());
                // Without its metadata the message still counts; its latency is not known.
                let stored_unix_us = m
                    .info()
                    .map(|i| (i.published.unix_timestamp_nanos() / 1000) as i64)
                    .ok();
                let mut s = into.lock().unwrap_or_else(|p| p.into_inner());
                s.messages += 1;
                if let Some(key) = key {
                    s.keys
                        .entry(key)
                        .and_modify(|a| a.count += 1)
                        .or_insert(Arrival {
                            count: 1,
                            received_us,
                            stored_unix_us,
                        });
                }
            }
            into.lock().unwrap_or_else(|p| p.into_inner()).error =
                Some("the relay stream watcher ended".into());
        });
        Ok(Watch { seen, task })
    }

    pub fn seen(&self) -> MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether every event of `committed` is in the stream.
    pub fn has_all(&self, committed: &[Committed]) -> bool {
        let seen = self.seen();
        committed.iter().all(|c| seen.keys.contains_key(&c.key))
    }
}

/// The relay's figures of one phase.
#[derive(Debug)]
pub struct RelayDelivery {
    pub committed: u64,
    pub in_stream: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub lost_examples: Vec<String>,
    /// Outbox `created_at` → stored in JetStream.
    pub commit_to_stream: Histogram<u64>,
    /// Intended start of the command → message received by the tool.
    pub end_to_end: Histogram<u64>,
    /// When the last event of the phase was stored (µs on the run's clock, for the catch-up).
    pub last_received_us: Option<u64>,
}

/// Compares the committed events of a phase with the stream.
pub fn relay_delivery(
    committed: &[Committed],
    seen: &Seen,
    writes: &[WriteRecord],
) -> RelayDelivery {
    let mut d = RelayDelivery {
        committed: committed.len() as u64,
        in_stream: 0,
        lost: 0,
        duplicates: 0,
        lost_examples: Vec::new(),
        commit_to_stream: histogram(),
        end_to_end: histogram(),
        last_received_us: None,
    };
    let mut received_at: HashMap<i64, u64> = HashMap::with_capacity(committed.len());
    for ev in committed {
        match seen.keys.get(&ev.key) {
            Some(a) => {
                d.in_stream += 1;
                d.duplicates += u64::from(a.count.saturating_sub(1));
                if let Some(stored) = a.stored_unix_us {
                    record(
                        &mut d.commit_to_stream,
                        stored.saturating_sub(ev.created_unix_us).max(0) as u64,
                    );
                }
                received_at.insert(ev.position, a.received_us);
                d.last_received_us = Some(d.last_received_us.unwrap_or(0).max(a.received_us));
            }
            None => {
                d.lost += 1;
                if d.lost_examples.len() < 20 {
                    d.lost_examples.push(format!(
                        "{} (position {}, key {}) never reached the stream",
                        ev.event_type, ev.position, ev.key
                    ));
                }
            }
        }
    }
    for w in writes {
        let Ok(position) = w.result else { continue };
        if let Some(&received) = received_at.get(&position) {
            record(&mut d.end_to_end, received.saturating_sub(w.intended_us));
        }
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::envelope::Audience;
    use crate::loadtest::driver::Kind;

    fn committed(position: i64, created_unix_us: i64) -> Committed {
        Committed {
            position,
            key: Uuid::from_u128(position as u128),
            event_type: "dashboard.lead_status_changed".into(),
            created_unix_us,
            audience: Audience {
                territory: "DE".parse().unwrap(),
                owner: None,
                collaborators: Vec::new(),
            },
        }
    }

    #[test]
    fn an_event_missing_from_the_stream_is_lost_and_a_second_message_of_one_key_is_a_duplicate() {
        let events = [
            committed(1, 1_000_000),
            committed(2, 1_000_000),
            committed(3, 2_000_000),
        ];
        let mut seen = Seen::default();
        seen.keys.insert(
            events[0].key,
            Arrival {
                count: 1,
                received_us: 5_000,
                stored_unix_us: Some(1_004_000),
            },
        );
        seen.keys.insert(
            events[2].key,
            Arrival {
                count: 2,
                received_us: 9_000,
                stored_unix_us: Some(2_010_000),
            },
        );
        let writes = [WriteRecord {
            kind: Kind::Status,
            intended_us: 1_000,
            done_us: 3_000,
            result: Ok(1),
            retries: 0,
        }];
        let d = relay_delivery(&events, &seen, &writes);
        assert_eq!(
            (d.committed, d.in_stream, d.lost, d.duplicates),
            (3, 2, 1, 1)
        );
        assert!(d.lost_examples[0].contains("position 2"));
        // commit → stream: 4 ms and 10 ms; end to end only for the tool's own write: 4 ms.
        assert_eq!(d.commit_to_stream.len(), 2);
        assert_eq!(d.commit_to_stream.max() / 1000, 10);
        assert_eq!(d.end_to_end.len(), 1);
        assert_eq!(d.end_to_end.max() / 1000, 4);
        assert_eq!(d.last_received_us, Some(9_000));
    }
}
