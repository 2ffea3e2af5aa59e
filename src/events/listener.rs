//! The listener of one instance: a dedicated `LISTEN dashboard_updates` connection, catch-up from
//! the durable cursor, the low-latency scan of fresh rows, the periodic poll, reconnect with
//! backoff, and the `lead-event-handler` health state.
//!
//! # Why the cursor is (txid, position), not a position
//!
//! Outbox positions come from a sequence and are taken at INSERT time, but rows become visible at
//! COMMIT. Transaction A can take position 5 and commit after transaction B took position 6: a
//! reader that saw 6 and stored "done up to 6" would never look at 5 again — the event would be
//! lost. So the durable cursor is ordered by (txid, position) and only advances over rows whose
//! transaction is older than the oldest one still running,
//! `txid < pg_snapshot_xmin(pg_current_snapshot())`: every such transaction has finished, so no
//! row can ever appear below that bound later (the *stable* scan).
//!
//! Waiting for the oldest running transaction would make latency depend on the slowest writer in
//! the cluster, so the listener also reads committed rows beyond an in-memory high-water position
//! at once (the *fresh* scan), without moving the durable cursor past them. A set of rows already
//! handled (keyed by their cursor order, pruned as the cursor passes them) stops the stable scan
//! from handling them a second time on this instance; the inbox makes any re-read harmless anyway.
//!
//! # Bounded while a transaction holds the cursor back
//!
//! A transaction left open (idle in transaction) keeps `pg_snapshot_xmin` — and so the durable
//! cursor — where it is for as long as it stays open, while the fresh scan keeps handling what
//! commits after it. The rows handled ahead of the cursor are remembered (with their age, which
//! is what `freshplan_outbox_lag_seconds` then reports: the durable consumer has not *passed*
//! them) up to `freshplan.events.max-unsettled-rows`. At that bound the fresh scan stops taking
//! new rows: live delivery then waits for the cursor (the lag and readiness's `unsettledRows`
//! show it, the log says `listener bookkeeping full`) instead of memory growing without limit;
//! nothing is lost or doubled, since the stable scan delivers every row once the transaction
//! ends. Ending the transaction (runbook) releases both.
//!
//! # Order of work
//!
//! `LISTEN` first, then catch up (stable scan to the end, then fresh scan), then react to
//! notifications, in-process wakes and the poll tick. A ring that arrives during catch-up is
//! therefore not lost, and a ring lost to a crash or a dropped connection is covered by the poll.
//! On any error the state becomes `Disconnected`, the connection is dropped and re-established
//! with exponential backoff (capped at 5 s), and catch-up runs again.
//!
//! # Its own connections
//!
//! The listener never borrows from the request pool: LISTEN runs on one connection and the scans
//! and durable effects on a second, both opened per session. When HTTP load exhausts the request
//! pool, events keep flowing and readiness stays UP.
//!
//! # Resuming after a reconnect
//!
//! The durable cursor is loaded from the database once, when the instance starts. After a
//! reconnect the instance resumes from its own in-memory cursor, not from the shared durable one:
//! another instance may have advanced that past rows this instance never handed to its own SSE
//! subscribers, and reloading it would skip them silently. Re-reading rows another instance
//! already applied is harmless (the inboxes say `duplicate`; the per-instance effects still run).

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use tokio::sync::{mpsc, watch, Notify};

use sqlx::PgPool;

use super::consumer::Dispatcher;
use super::outbox::{self, Cursor, OutboxRow};
use crate::db::SystemPool;
use crate::telemetry::health::{ListenerHealth, ListenerState};

/// The doorbell channel.
pub const CHANNEL: &str = "dashboard_updates";

/// `application_name` of the listener connection (operators and tests find it by this name).
pub const APPLICATION_NAME: &str = "freshplan-listener";

/// `application_name` of the listener's scan-and-apply connection.
pub const SCAN_APPLICATION_NAME: &str = "freshplan-listener-scan";

/// Rows read per scan.
pub const BATCH: i64 = 1000;

/// How long a cursor advance over rows this instance had already handled may wait before it is
/// written (see [`Scanner::handle`]).
pub const CURSOR_FLUSH: Duration = Duration::from_millis(250);

const BACKOFF_START: Duration = Duration::from_millis(250);
const BACKOFF_CAP: Duration = Duration::from_secs(5);

/// Everything the listener task needs.
pub struct Listener {
    pub database_url: String,
    pub dispatcher: Dispatcher,
    pub health: Arc<ListenerHealth>,
    /// In-process wake after a local commit (no database round trip).
    pub wake: Arc<Notify>,
    pub poll_interval: Duration,
    /// Bound of the rows remembered ahead of the durable cursor.
    pub max_unsettled: usize,
}

/// The scan state that survives reconnects.
struct Scanner {
    dispatcher: Dispatcher,
    /// The listener's own scan-and-apply connection of the current session.
    pool: Option<SystemPool>,
    /// This instance's cursor; `None` until loaded from the database at the first session.
    cursor: Option<Cursor>,
    /// Highest position the fresh scan has read.
    high: i64,
    /// Rows beyond the durable cursor this instance already handled, with their `created_at`.
    handled: BTreeMap<Cursor, DateTime<Utc>>,
    /// Bound of `handled` (the fresh scan pauses there).
    max_unsettled: usize,
    /// Whether the bound was reached (logged once per episode).
    full: bool,
    health: Arc<ListenerHealth>,
    /// A cursor this instance reached but has not written to `event_cursors` yet.
    unwritten: Option<Cursor>,
    /// When the durable cursor was last written.
    cursor_written: Instant,
}

impl Scanner {
    /// Processes the rows of a scan this instance has not handled yet.
    async fn handle(
        &mut self,
        rows: &[OutboxRow],
        advance_to: Option<Cursor>,
    ) -> anyhow::Result<()> {
        let received = Instant::now();
        let todo: Vec<OutboxRow> = rows
            .iter()
            .filter(|r| !self.handled.contains_key(&Cursor::at(r)))
            .cloned()
            .collect();
        if todo.is_empty() && advance_to.is_some() {
            // The stable scan passing rows the fresh scan already applied: their inbox rows and
            // effects are committed, so writing the cursor now would buy nothing but a
            // transaction and a WAL flush per scan. It moves in memory and is written at most
            // every `CURSOR_FLUSH` ([`Scanner::flush_cursor`]); a crash before that only makes
            // the next start read those rows again, and the inbox answers `duplicate`.
            self.unwritten = advance_to;
        } else {
            self.dispatcher.received(&todo);
            self.dispatcher
                .process(self.pool()?, &todo, received, advance_to)
                .await
                .context("consuming outbox rows")?;
            if advance_to.is_some() {
                self.unwritten = None;
                self.cursor_written = Instant::now();
            }
        }
        self.handled
            .extend(todo.iter().map(|r| (Cursor::at(r), r.created_at)));
        if let Some(c) = advance_to {
            self.cursor = Some(c);
            // Neither scan reads at or below the cursor again.
            self.handled = self.handled.split_off(&Cursor {
                txid: c.txid,
                position: c.position.saturating_add(1),
            });
        }
        Ok(())
    }

    /// Writes the cursor at shutdown; a failure is only logged (the next start reads a few rows
    /// again and the inbox answers `duplicate`).
    async fn final_flush(&mut self) -> anyhow::Result<()> {
        if let Err(e) = self.flush_cursor(true).await {
            tracing::warn!(error = %format!("{e:#}"), "listener: cursor not written at stop");
        }
        Ok(())
    }

    /// Writes a cursor that moved in memory only, once `CURSOR_FLUSH` has passed since the last
    /// write (or at once with `now`).
    async fn flush_cursor(&mut self, now: bool) -> anyhow::Result<()> {
        let Some(c) = self.unwritten else {
            return Ok(());
        };
        if !now && self.cursor_written.elapsed() < CURSOR_FLUSH {
            return Ok(());
        }
        self.dispatcher
            .process(self.pool()?, &[], Instant::now(), Some(c))
            .await
            .context("advancing the durable cursor")?;
        self.unwritten = None;
        self.cursor_written = Instant::now();
        Ok(())
    }

    fn pool(&self) -> anyhow::Result<&PgPool> {
        Ok(self.scan_pool()?.pool())
    }

    fn scan_pool(&self) -> anyhow::Result<&SystemPool> {
        self.pool.as_ref().context("the listener has no connection")
    }

    fn cursor(&self) -> Cursor {
        self.cursor.unwrap_or_default()
    }

    /// One stable batch; returns the number of rows read.
    async fn stable(&mut self) -> anyhow::Result<usize> {
        let rows = outbox::fetch_stable(self.scan_pool()?, self.cursor(), BATCH)
            .await
            .context("reading the outbox")?;
        let Some(last) = rows.last().map(Cursor::at) else {
            return Ok(0);
        };
        let oldest = rows
            .iter()
            .find(|r| !self.handled.contains_key(&Cursor::at(r)))
            .map(|r| r.created_at);
        self.dispatcher.set_lag(oldest);
        self.handle(&rows, Some(last)).await?;
        Ok(rows.len())
    }

    /// One fresh batch; returns the number of rows read. Reads nothing while `handled` is at
    /// its bound (the stable scan delivers those rows once the cursor moves).
    async fn fresh(&mut self) -> anyhow::Result<usize> {
        let room = self.max_unsettled.saturating_sub(self.handled.len());
        if room == 0 {
            if !self.full {
                self.full = true;
                tracing::warn!(
                    unsettled = self.handled.len(),
                    "listener bookkeeping full: a long transaction holds the durable cursor back; \
                     live delivery waits for it (see the runbook, events are late)"
                );
            }
            return Ok(0);
        }
        self.full = false;
        let limit = BATCH.min(room as i64);
        let rows = outbox::fetch_fresh(self.scan_pool()?, self.high, self.cursor(), limit)
            .await
            .context("reading the outbox")?;
        let Some(max) = rows.iter().map(|r| r.position).max() else {
            return Ok(0);
        };
        self.handle(&rows, None).await?;
        self.high = self.high.max(max);
        Ok(rows.len())
    }

    /// Stable scan to the end, then fresh scan to the end.
    async fn drain(&mut self) -> anyhow::Result<()> {
        while self.stable().await? as i64 == BATCH {}
        while self.fresh().await? as i64 == BATCH {}
        self.flush_cursor(false).await?;
        // Handled but not passed: the durable consumer's lag is the age of the oldest of them
        // (the first in cursor order, i.e. of the oldest transaction).
        let oldest = self.handled.values().next().copied();
        self.dispatcher.set_lag(oldest);
        let lag = oldest
            .map(|t| (Utc::now() - t).num_milliseconds().max(0) as f64 / 1000.0)
            .unwrap_or(0.0);
        self.health.set_backlog(self.handled.len(), lag);
        Ok(())
    }
}

impl Listener {
    /// Runs until `stop` turns true.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut scanner = Scanner {
            dispatcher: self.dispatcher.clone(),
            pool: None,
            cursor: None,
            high: 0,
            handled: BTreeMap::new(),
            max_unsettled: self.max_unsettled.max(1),
            full: false,
            unwritten: None,
            cursor_written: Instant::now(),
            health: self.health.clone(),
        };
        let mut backoff = BACKOFF_START;
        loop {
            self.health.set(ListenerState::Disconnected);
            if *stop.borrow() {
                return;
            }
            match self.session(&mut scanner, &mut stop, &mut backoff).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), retry_in_ms = backoff.as_millis() as u64, "event listener disconnected")
                }
            }
            self.health.set(ListenerState::Disconnected);
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.changed() => return,
            }
            backoff = (backoff * 2).min(BACKOFF_CAP);
        }
    }

    /// One connection's life: listen, catch up, serve wakes. `Ok` only when stopped.
    async fn session(
        &self,
        scanner: &mut Scanner,
        stop: &mut watch::Receiver<bool>,
        backoff: &mut Duration,
    ) -> anyhow::Result<()> {
        let options = PgConnectOptions::from_str(&self.database_url)
            .context("invalid database URL")?
            .application_name(APPLICATION_NAME);
        // Connections detached from the runtime pool: LISTEN on one, scans and durable effects
        // on another (`freshplan-listener-scan`), so the listener never competes with requests
        // for a connection; closing the pools closes them.
        let detached = |name: &str| {
            PgPoolOptions::new()
                .max_connections(1)
                .max_lifetime(None)
                .idle_timeout(None)
                .acquire_timeout(Duration::from_secs(5))
                .connect_with(options.clone().application_name(name))
        };
        let pool = detached(APPLICATION_NAME)
            .await
            .context("connecting the listener")?;
        let scan_pool =
            SystemPool::connect(options.clone().application_name(SCAN_APPLICATION_NAME))
                .await
                .context("connecting the listener's scan connection")?;
        let mut listener = PgListener::connect_with(&pool)
            .await
            .context("connecting the listener")?;
        let backend_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut listener)
            .await
            .context("connecting the listener")?;
        self.health.set_backend_pid(backend_pid);
        scanner.pool = Some(scan_pool.clone());
        listener.eager_reconnect(false);
        listener
            .listen(CHANNEL)
            .await
            .context("LISTEN dashboard_updates")?;

        // Notifications are read by a task of their own, because a receive cancelled halfway
        // (as `select!` would do) could lose protocol state; a closed channel means the
        // connection is gone.
        let (ring_tx, mut rings) = mpsc::channel::<()>(1);
        let reader = tokio::spawn(async move {
            while let Ok(Some(_)) = listener.try_recv().await {
                // Full means a ring is already pending: coalesced.
                let _ = ring_tx.try_send(());
            }
        });
        let result = self.serve(scanner, stop, backoff, &mut rings).await;
        reader.abort();
        scanner.pool = None;
        scan_pool.close().await;
        pool.close().await;
        result
    }

    async fn serve(
        &self,
        scanner: &mut Scanner,
        stop: &mut watch::Receiver<bool>,
        backoff: &mut Duration,
        rings: &mut mpsc::Receiver<()>,
    ) -> anyhow::Result<()> {
        self.health.set(ListenerState::CatchingUp);
        if scanner.cursor.is_none() {
            let names = scanner.dispatcher.consumer_names();
            scanner.cursor = Some(
                outbox::load_min_cursor(scanner.pool()?, &names)
                    .await
                    .context("loading the durable cursor")?,
            );
        }
        let started = Instant::now();
        scanner.drain().await?;
        tracing::info!(
            cursor_position = scanner.cursor().position,
            took_ms = started.elapsed().as_millis() as u64,
            "event listener live"
        );
        self.health.set(ListenerState::Live);
        *backoff = BACKOFF_START;
        let mut poll = tokio::time::interval(self.poll_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                // A cursor that moved in memory only is written before the instance stops.
                _ = stop.changed() => return scanner.final_flush().await,
                ring = rings.recv() => {
                    if ring.is_none() {
                        anyhow::bail!("listener connection lost");
                    }
                }
                _ = self.wake.notified() => {}
                _ = poll.tick() => {
                    scanner
                        .dispatcher
                        .sample_notify_queue(scanner.pool()?)
                        .await
                        .context("sampling the notification queue")?;
                }
            }
            if *stop.borrow() {
                return scanner.final_flush().await;
            }
            scanner.drain().await?;
        }
    }
}
