//! The outbox → NATS JetStream relay (`freshplan relay`, or inside `serve` with
//! `freshplan.relay.enabled = true`): every committed event, as the same CloudEvents envelope the
//! SSE stream and the consumers see, exactly once into the stream `FRESHPLAN_LEADS` under
//! `freshplan.leads.<territory>.<type>`, with `Nats-Msg-Id` = its idempotency key.
//!
//! # Never skip: the listener's stable cursor
//!
//! The relay is a durable consumer named [`CONSUMER`] with its own row in `event_cursors`. It
//! reads only the *stable* scan of `outbox::fetch_stable` — rows of transactions older than the
//! oldest one still running, in (txid, position) order — for the reason `listener` explains: a
//! transaction that took a lower position may commit after a higher one, and a cursor that passed
//! the higher one would never see it. The relay has no low-latency "fresh" path: publishing an
//! event ahead of an older one that is still uncommitted would break the per-lead order. Its
//! latency is therefore bounded below by the longest running writer transaction.
//!
//! # Never twice: ack, then cursor; JetStream dedupe covers the gap
//!
//! A batch is published pipelined (all publishes sent, then every ack awaited) and only when all
//! acks are in does the cursor advance: in memory at once, in `event_cursors` at most every
//! `CURSOR_FLUSH` (and when the relay stops). A crash (or a lost database) before that write makes
//! the next active relay start after the stream's last message (below) or publish the batches
//! again; JetStream drops those copies by `Nats-Msg-Id` as long as they arrive within the
//! stream's duplicate window.
//! The gap between a first publish and its republication is at most one ack timeout plus the
//! takeover or restart time, so the window (`freshplan.relay.duplicate-window-seconds`, default
//! 2 min) must exceed that; the configuration refuses a window shorter than twice the ack
//! timeout. For restarts slower than the window, the relay does not depend on dedupe alone: when
//! it becomes active it reads the stream's last message, whose `FreshPlan-Cursor` header holds
//! the outbox cursor of that event, and starts after it if it is ahead of the stored cursor
//! (everything before it was published in cursor order on one connection).
//!
//! # One active relay per database
//!
//! A relay first connects to NATS (a relay that cannot reach NATS must not hold the lock that a
//! healthy one could use), then tries a PostgreSQL session advisory lock on a connection of its
//! own (`freshplan-relay`). Holding it makes it active; otherwise it is a hot standby that tries
//! again every poll interval. When the active process dies, PostgreSQL ends its session and
//! releases the lock, and a standby takes over within a poll interval. Two relays racing anyway
//! (an old one that lost its lock connection while a batch was in flight) publish the same ids:
//! JetStream keeps one, and the cursor never moves backwards.
//!
//! # Off by default, and failures
//!
//! Nothing of this runs unless enabled. Any error (NATS unreachable, an ack timeout, the
//! database gone) ends the session: the lock connection and the NATS client are dropped, the
//! state becomes down (`freshplan_relay_state = -1`, readiness check `relay` DOWN inside
//! `serve`), and the relay starts over with exponential backoff (capped at 5 s). The outbox keeps
//! every event meanwhile (retention never prunes beyond the relay's cursor), so it catches up
//! when NATS is back.

use std::str::FromStr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::{self, stream};
use async_nats::{HeaderMap, ServerAddr};
use chrono::{DateTime, Utc};
use sqlx::postgres::PgListener;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection};
use tokio::sync::{mpsc, watch};

use super::consumer::authorize;
use super::listener::CHANNEL;
use super::outbox::{self, Cursor, OutboxRow};
use crate::config::RelaySettings;
use crate::db::{self, SystemPool};
use crate::identity::Principal;
use crate::telemetry::metrics::Metrics;

/// Cursor key of the relay in `event_cursors` (stable forever: renaming it republishes the
/// retained outbox, which JetStream dedupes only within its window).
pub const CONSUMER: &str = "nats-relay";

/// `application_name` of the connection that holds the relay lock.
pub const LOCK_APPLICATION_NAME: &str = "freshplan-relay";

/// `application_name` of the relay's scan-and-cursor connection.
pub const SCAN_APPLICATION_NAME: &str = "freshplan-relay-scan";

/// `application_name` of the active relay's LISTEN connection: the doorbell's ring on
/// `dashboard_updates` after a commit wakes the relay at once instead of at its next poll.
pub const WAKE_APPLICATION_NAME: &str = "freshplan-relay-wake";

/// Key of the session advisory lock (`pg_try_advisory_lock`) that makes one relay active per
/// database: "fp-relay" in ASCII.
pub const LOCK_KEY: i64 = 0x6670_2d72_656c_6179;

/// Header with the outbox cursor (`<txid>:<position>`) of a published event.
pub const CURSOR_HEADER: &str = "FreshPlan-Cursor";

/// Subjects of the stream.
pub const SUBJECTS: &str = "freshplan.leads.>";

const BACKOFF_START: Duration = Duration::from_millis(250);
const BACKOFF_CAP: Duration = Duration::from_secs(5);
/// How often the active relay checks that it still holds its lock connection when busy.
const LOCK_CHECK: Duration = Duration::from_secs(1);
/// How often the lag gauges are measured (a batch that empties the backlog sets them to 0).
const LAG_REFRESH: Duration = Duration::from_secs(1);
/// How long the relay cursor in `event_cursors` may trail the published one.
const CURSOR_FLUSH: Duration = Duration::from_millis(250);

/// The subject token of a CloudEvents type: the `dashboard.` prefix dropped and any other dot
/// turned into `_` (a token never contains a dot): `dashboard.lead_created` → `lead_created`.
pub fn type_token(event_type: &str) -> String {
    event_type
        .strip_prefix("dashboard.")
        .unwrap_or(event_type)
        .replace(['.', ' ', '*', '>'], "_")
}

/// `freshplan.leads.<territory>.<type token>`, e.g. `freshplan.leads.DE.lead_status_changed`.
pub fn subject(territory: &str, event_type: &str) -> String {
    format!("freshplan.leads.{territory}.{}", type_token(event_type))
}

/// What the relay of this process is doing (`freshplan_relay_state`, readiness check `relay`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayState {
    /// Holds the lock and publishes.
    Active = 1,
    /// Connected to NATS and the database, waiting for the lock.
    Standby = 0,
    /// NATS or the database unreachable (or not yet connected).
    Down = -1,
}

impl RelayState {
    /// Name in the readiness answer.
    pub fn as_str(self) -> &'static str {
        match self {
            RelayState::Active => "active",
            RelayState::Standby => "standby",
            RelayState::Down => "down",
        }
    }
}

/// The relay's state, shared with readiness and mirrored in `freshplan_relay_state`.
#[derive(Debug)]
pub struct RelayHealth {
    state: AtomicI64,
    gauge: prometheus::IntGauge,
}

impl RelayHealth {
    /// A health state reported into `freshplan_relay_state` of `metrics`, which this exports
    /// from now on (a process without a relay has no such series).
    pub fn new(metrics: &Metrics) -> Self {
        metrics.expose_relay_state();
        let gauge = metrics.relay_state.clone();
        gauge.set(RelayState::Down as i64);
        RelayHealth {
            state: AtomicI64::new(RelayState::Down as i64),
            gauge,
        }
    }

    /// Records a new state.
    pub fn set(&self, s: RelayState) {
        self.state.store(s as i64, Ordering::SeqCst);
        self.gauge.set(s as i64);
    }

    /// The current state.
    pub fn get(&self) -> RelayState {
        match self.state.load(Ordering::SeqCst) {
            1 => RelayState::Active,
            0 => RelayState::Standby,
            _ => RelayState::Down,
        }
    }
}

/// Everything the relay task needs.
pub struct Relay {
    pub database_url: String,
    pub settings: RelaySettings,
    pub metrics: Arc<Metrics>,
    pub health: Arc<RelayHealth>,
}

/// The NATS side of one session.
struct Nats {
    client: async_nats::Client,
    js: jetstream::Context,
    stream: stream::Stream,
}

impl Relay {
    /// A relay configured by `settings`, counting into `metrics`, with a health state of its own
    /// (mirrored in `freshplan_relay_state`).
    pub fn new(database_url: &str, settings: &RelaySettings, metrics: Arc<Metrics>) -> Self {
        let health = Arc::new(RelayHealth::new(&metrics));
        Relay {
            database_url: database_url.to_string(),
            settings: settings.clone(),
            metrics,
            health,
        }
    }

    /// Runs until `stop` turns true.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut backoff = BACKOFF_START;
        loop {
            self.health.set(RelayState::Down);
            if *stop.borrow() {
                return;
            }
            let started = Instant::now();
            match self.session(&mut stop).await {
                Ok(()) => {
                    self.health.set(RelayState::Down);
                    return;
                }
                Err(e) => {
                    self.metrics.relay_retries.inc();
                    tracing::warn!(
                        error = %format!("{e:#}"),
                        retry_in_ms = backoff.as_millis() as u64,
                        "relay session ended"
                    )
                }
            }
            self.health.set(RelayState::Down);
            // A session that ran for a while starts the backoff over.
            if started.elapsed() > BACKOFF_CAP * 2 {
                backoff = BACKOFF_START;
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.changed() => return,
            }
            backoff = (backoff * 2).min(BACKOFF_CAP);
        }
    }

    fn ack_timeout(&self) -> Duration {
        Duration::from_millis(self.settings.ack_timeout_ms)
    }

    fn poll(&self) -> Duration {
        Duration::from_millis(self.settings.poll_interval_ms)
    }

    /// Connects NATS and makes sure the stream exists with the configured limits.
    async fn connect_nats(&self) -> anyhow::Result<Nats> {
        let servers = self
            .settings
            .nats_url
            .split(',')
            .map(|s| ServerAddr::from_str(s.trim()))
            .collect::<Result<Vec<_>, _>>()
            .context("freshplan.relay.nats-url is not a valid NATS URL list")?;
        let client = async_nats::ConnectOptions::new()
            .name("freshplan-relay")
            .connection_timeout(self.ack_timeout())
            .connect(servers)
            .await
            .context("connecting to NATS (freshplan.relay.nats-url)")?;
        let js = jetstream::context::ContextBuilder::new()
            .timeout(self.ack_timeout())
            // One batch is in flight at most; waiting beats failing when it is full.
            .max_ack_inflight(self.settings.batch_size as usize * 2)
            .backpressure_on_inflight(true)
            .build(client.clone());
        let stream = self.ensure_stream(&js).await?;
        Ok(Nats { client, js, stream })
    }

    /// The stream configuration the settings ask for.
    fn stream_config(&self) -> stream::Config {
        stream::Config {
            name: self.settings.stream.clone(),
            subjects: vec![SUBJECTS.to_string()],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            max_age: Duration::from_secs(self.settings.max_age_hours * 3600),
            duplicate_window: Duration::from_secs(self.settings.duplicate_window_seconds),
            num_replicas: self.settings.replicas,
            description: Some("FreshPlan Leads lead events (CloudEvents 1.0 JSON)".into()),
            ..Default::default()
        }
    }

    /// Creates the stream, or updates it when its limits differ from the configuration.
    async fn ensure_stream(&self, js: &jetstream::Context) -> anyhow::Result<stream::Stream> {
        let want = self.stream_config();
        match js.get_stream(&want.name).await {
            Ok(mut existing) => {
                let have = existing
                    .info()
                    .await
                    .context("reading the stream")?
                    .config
                    .clone();
                let differs = have.max_age != want.max_age
                    || have.duplicate_window != want.duplicate_window
                    || have.num_replicas != want.num_replicas
                    || !have.subjects.iter().any(|s| s == SUBJECTS);
                if differs {
                    let mut update = have.clone();
                    update.max_age = want.max_age;
                    update.duplicate_window = want.duplicate_window;
                    update.num_replicas = want.num_replicas;
                    if !update.subjects.iter().any(|s| s == SUBJECTS) {
                        update.subjects.push(SUBJECTS.to_string());
                    }
                    js.update_stream(update)
                        .await
                        .context("updating the stream to the configured limits")?;
                    tracing::info!(stream = %want.name, "relay stream updated to the configuration");
                }
                Ok(existing)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    jetstream::context::GetStreamErrorKind::JetStream(ref j)
                        if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
                ) =>
            {
                let stream = js
                    .create_stream(want.clone())
                    .await
                    .context("creating the stream")?;
                tracing::info!(stream = %want.name, "relay stream created");
                Ok(stream)
            }
            Err(e) => Err(e).context("looking up the stream"),
        }
    }

    /// One session: NATS, the lock (standby until it is ours), then publishing. `Ok` only when
    /// stopped.
    async fn session(&self, stop: &mut watch::Receiver<bool>) -> anyhow::Result<()> {
        let nats = self.connect_nats().await?;
        let options =
            PgConnectOptions::from_str(&self.database_url).context("invalid database URL")?;
        let mut lock =
            PgConnection::connect_with(&options.clone().application_name(LOCK_APPLICATION_NAME))
                .await
                .context("connecting the relay's lock connection")?;
        let scan = SystemPool::connect(options.clone().application_name(SCAN_APPLICATION_NAME))
            .await
            .context("connecting the relay's scan connection")?;
        let result = async {
            if !self.acquire(&mut lock, &nats, stop).await? {
                return Ok(());
            }
            let (wake, reader) = listen(options.clone()).await?;
            let result = self.publish_loop(&mut lock, &scan, &nats, wake, stop).await;
            reader.abort();
            result
        }
        .await;
        scan.close().await;
        let _ = lock.close().await;
        result
    }

    /// Waits as a hot standby until the lock is ours (`true`) or `stop` (`false`).
    async fn acquire(
        &self,
        lock: &mut PgConnection,
        nats: &Nats,
        stop: &mut watch::Receiver<bool>,
    ) -> anyhow::Result<bool> {
        let mut announced = false;
        loop {
            let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                .bind(LOCK_KEY)
                .fetch_one(&mut *lock)
                .await
                .context("trying the relay lock")?;
            if got {
                self.health.set(RelayState::Active);
                tracing::info!(stream = %self.settings.stream, "relay active");
                return Ok(true);
            }
            nats_connected(nats)?;
            if !announced {
                self.health.set(RelayState::Standby);
                tracing::info!("relay standby: another relay holds the lock");
                announced = true;
            }
            tokio::select! {
                _ = tokio::time::sleep(self.poll()) => {}
                _ = stop.changed() => return Ok(false),
            }
            if *stop.borrow() {
                return Ok(false);
            }
        }
    }

    /// Where publishing resumes: the stored cursor, or the cursor of the stream's last message
    /// when that is ahead (published, but the cursor commit was lost).
    async fn start_cursor(&self, scan: &SystemPool, nats: &Nats) -> anyhow::Result<Cursor> {
        let stored = outbox::load_min_cursor(scan.pool(), &[CONSUMER])
            .await
            .context("loading the relay cursor")?;
        let mut stream = nats.stream.clone();
        let last = stream
            .info()
            .await
            .context("reading the stream")?
            .state
            .last_sequence;
        if last == 0 {
            return Ok(stored);
        }
        let in_stream = match stream.get_raw_message(last).await {
            Ok(m) => m
                .headers
                .get(CURSOR_HEADER)
                .and_then(|v| parse_cursor(v.as_str())),
            Err(e) => {
                tracing::warn!(error = %e, "relay: the stream's last message is unreadable; resuming from the stored cursor");
                None
            }
        };
        // A stored cursor written less than a duplicate window ago (minus an ack timeout) is
        // trusted even when the stream is ahead: everything published after it is still inside
        // JetStream's dedupe window, so republishing from it doubles nothing, and it cannot skip
        // an event that was lost in a batch whose later messages were stored.
        let age: Option<f64> = sqlx::query_scalar(
            "SELECT extract(epoch FROM now() - updated_at)::float8 FROM event_cursors \
             WHERE consumer = $1",
        )
        .bind(CONSUMER)
        .fetch_optional(scan.pool())
        .await
        .context("reading the relay cursor's age")?;
        let covered =
            self.settings.duplicate_window_seconds as f64 - self.ack_timeout().as_secs_f64() - 1.0;
        if age.is_some_and(|a| a < covered) {
            return Ok(stored);
        }
        match in_stream {
            Some(c) if c > stored => {
                tracing::info!(
                    stored_position = stored.position,
                    stream_position = c.position,
                    "relay: the stream is ahead of the stored cursor; resuming after its last message"
                );
                record_cursor(scan, c).await?;
                Ok(c)
            }
            _ => Ok(stored),
        }
    }

    async fn publish_loop(
        &self,
        lock: &mut PgConnection,
        scan: &SystemPool,
        nats: &Nats,
        mut wake: mpsc::Receiver<()>,
        stop: &mut watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        let mut cursor = self.start_cursor(scan, nats).await?;
        // The cursor in `event_cursors` may trail the published one by up to `CURSOR_FLUSH`: a
        // relay starting after a crash resumes after the stream's last message anyway (see
        // `start_cursor`), so writing it after every batch would buy nothing but a transaction
        // and a WAL flush per batch.
        let mut written = cursor;
        let mut cursor_written = Instant::now();
        let mut lock_checked = Instant::now();
        let mut lag_refreshed: Option<Instant> = None;
        loop {
            if *stop.borrow() {
                return self.final_cursor(scan, written, cursor).await;
            }
            let rows = outbox::fetch_stable(scan, cursor, self.settings.batch_size)
                .await
                .context("reading the outbox")?;
            // At most once a second (one index range count), busy or idle.
            if lag_refreshed.map_or(true, |t| t.elapsed() >= LAG_REFRESH) {
                self.refresh_lag(scan, cursor).await?;
                lag_refreshed = Some(Instant::now());
            }
            let full = rows.len() as i64 == self.settings.batch_size;
            if let Some(last) = rows.last().map(Cursor::at) {
                self.publish_batch(nats, &rows).await?;
                cursor = last;
                if !full {
                    // Everything the stable scan could see is in the stream.
                    self.metrics.relay_lag_events.set(0);
                    self.metrics.relay_lag_seconds.set(0.0);
                }
            }
            if written != cursor && cursor_written.elapsed() >= CURSOR_FLUSH {
                record_cursor(scan, cursor).await?;
                written = cursor;
                cursor_written = Instant::now();
            }
            if lock_checked.elapsed() >= LOCK_CHECK {
                check_lock(lock).await?;
                lock_checked = Instant::now();
            }
            if full {
                continue;
            }
            nats_connected(nats)?;
            // Woken by the doorbell's ring after a commit, or by the poll (commits of writers
            // that do not ring, a ring lost while the LISTEN connection reconnected, and the
            // cursor write that is due).
            let poll = if written != cursor {
                self.poll().min(CURSOR_FLUSH)
            } else {
                self.poll()
            };
            tokio::select! {
                _ = tokio::time::sleep(poll) => {}
                rang = wake.recv() => {
                    if rang.is_none() {
                        anyhow::bail!("the relay's LISTEN connection was lost");
                    }
                }
                changed = stop.changed() => {
                    // A dropped sender means stop as well (and would never wait again).
                    if changed.is_err() {
                        return self.final_cursor(scan, written, cursor).await;
                    }
                }
            }
        }
    }

    /// Writes the cursor when the relay stops. A failure is only logged: the next relay resumes
    /// from the stored cursor or after the stream's last message, and JetStream dedupes.
    async fn final_cursor(
        &self,
        scan: &SystemPool,
        written: Cursor,
        cursor: Cursor,
    ) -> anyhow::Result<()> {
        if written != cursor {
            if let Err(e) = record_cursor(scan, cursor).await {
                tracing::warn!(error = %format!("{e:#}"), "relay: cursor not written at stop");
            }
        }
        Ok(())
    }

    /// Publishes `rows` pipelined and waits for every ack. Any failure fails the whole batch
    /// (it is published again; JetStream drops what it already has).
    async fn publish_batch(&self, nats: &Nats, rows: &[OutboxRow]) -> anyhow::Result<()> {
        let mut pending = Vec::with_capacity(rows.len());
        for row in rows {
            if authorize(row).is_none() {
                tracing::warn!(
                    position = row.position,
                    "relay: outbox row is not a valid lead-management event; not published"
                );
                self.metrics
                    .relay_published
                    .with_label_values(&["denied"])
                    .inc();
                continue;
            }
            let mut headers = HeaderMap::new();
            headers.insert(
                async_nats::header::NATS_MESSAGE_ID,
                row.idempotency_key.to_string().as_str(),
            );
            headers.insert(
                CURSOR_HEADER,
                format!("{}:{}", row.txid, row.position).as_str(),
            );
            let payload = serde_json::to_vec(&row.envelope).context("encoding an envelope")?;
            let sent = Instant::now();
            // Sending waits while the client's queue is full (NATS gone, reconnecting): bounded
            // by the ack timeout like the ack itself.
            let ack = tokio::time::timeout(
                self.ack_timeout(),
                nats.js.publish_with_headers(
                    subject(&row.territory, &row.event_type),
                    headers,
                    payload.into(),
                ),
            )
            .await
            .map_err(|e| self.failed(e, rows.len()))?
            .map_err(|e| self.failed(e, rows.len()))?;
            pending.push((sent, ack));
        }
        let mut duplicates = 0u64;
        let total = pending.len();
        for (sent, ack) in pending {
            let ack = ack.await.map_err(|e| self.failed(e, total))?;
            self.metrics
                .relay_publish_latency
                .observe(sent.elapsed().as_secs_f64());
            if ack.duplicate {
                duplicates += 1;
            }
        }
        self.metrics
            .relay_published
            .with_label_values(&["published"])
            .inc_by(total as u64 - duplicates);
        self.metrics
            .relay_published
            .with_label_values(&["duplicate"])
            .inc_by(duplicates);
        Ok(())
    }

    fn failed(&self, e: impl std::error::Error + Send + Sync + 'static, n: usize) -> anyhow::Error {
        self.metrics
            .relay_published
            .with_label_values(&["failure"])
            .inc_by(n as u64);
        anyhow::Error::new(e).context("publishing to JetStream")
    }

    /// Sets the lag gauges from the events beyond `cursor`.
    async fn refresh_lag(&self, scan: &SystemPool, cursor: Cursor) -> anyhow::Result<()> {
        let (count, oldest): (i64, Option<DateTime<Utc>>) = sqlx::query_as(
            "SELECT count(*), min(created_at) FROM outbox \
             WHERE (txid, position) > ($1::bigint::text::xid8, $2)",
        )
        .bind(cursor.txid)
        .bind(cursor.position)
        .fetch_one(scan.pool())
        .await
        .context("measuring the relay lag")?;
        self.metrics.relay_lag_events.set(count);
        let age = oldest
            .map(|t| ((Utc::now() - t).num_milliseconds() as f64 / 1000.0).max(0.0))
            .unwrap_or(0.0);
        self.metrics.relay_lag_seconds.set(age);
        Ok(())
    }
}

/// LISTENs on `dashboard_updates` on a connection of its own; every ring becomes at most one
/// pending wake-up (rings while one is pending are coalesced). A receive cancelled halfway could
/// lose protocol state, so a task of its own reads the connection; the channel closes when the
/// connection is gone.
async fn listen(
    options: PgConnectOptions,
) -> anyhow::Result<(mpsc::Receiver<()>, tokio::task::JoinHandle<()>)> {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .max_lifetime(None)
        .idle_timeout(None)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options.application_name(WAKE_APPLICATION_NAME))
        .await
        .context("connecting the relay's LISTEN connection")?;
    let mut listener = PgListener::connect_with(&pool)
        .await
        .context("connecting the relay's LISTEN connection")?;
    listener.eager_reconnect(false);
    listener
        .listen(CHANNEL)
        .await
        .context("LISTEN dashboard_updates (relay)")?;
    let (tx, rx) = mpsc::channel::<()>(1);
    let reader = tokio::spawn(async move {
        while let Ok(Some(_)) = listener.try_recv().await {
            let _ = tx.try_send(());
        }
        drop(listener);
        pool.close().await;
    });
    Ok((rx, reader))
}

fn nats_connected(nats: &Nats) -> anyhow::Result<()> {
    match nats.client.connection_state() {
        async_nats::connection::State::Connected => Ok(()),
        other => anyhow::bail!("NATS connection lost ({other:?})"),
    }
}

/// Fails when the lock connection is gone (its session lock with it).
async fn check_lock(lock: &mut PgConnection) -> anyhow::Result<()> {
    sqlx::query("SELECT 1")
        .execute(&mut *lock)
        .await
        .context("the relay lock connection is gone")?;
    Ok(())
}

/// Advances the relay cursor (never backwards).
async fn record_cursor(scan: &SystemPool, to: Cursor) -> anyhow::Result<()> {
    let mut tx = db::begin_as(scan.pool(), &Principal::system()).await?;
    outbox::record_batch(&mut tx, CONSUMER, &[], Some(to))
        .await
        .context("advancing the relay cursor")?;
    tx.commit().await.context("advancing the relay cursor")?;
    Ok(())
}

/// Parses a `FreshPlan-Cursor` header value (`<txid>:<position>`).
pub fn parse_cursor(v: &str) -> Option<Cursor> {
    let (txid, position) = v.split_once(':')?;
    Some(Cursor {
        txid: txid.trim().parse().ok()?,
        position: position.trim().parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_have_one_dot_free_token_per_level() {
        assert_eq!(
            subject("DE", "dashboard.lead_status_changed"),
            "freshplan.leads.DE.lead_status_changed"
        );
        assert_eq!(type_token("other.kind.x"), "other_kind_x");
        assert_eq!(
            parse_cursor("812:42"),
            Some(Cursor {
                txid: 812,
                position: 42
            })
        );
        assert_eq!(parse_cursor("x"), None);
    }
}
