//! The floor: what PostgreSQL alone needs for the same shape of write, measured in the same run.
//!
//! Straight from the tool, without the service: one transaction that updates a row, inserts an
//! outbox-like row (a JSON payload of an event's size) and notifies, then commits — BEGIN,
//! UPDATE, INSERT, `pg_notify`, COMMIT — at the same open-loop rate as the service phase next to
//! it, on a pool of connections; a separate connection LISTENs and timestamps each notification.
//! So the floor has a commit (with its WAL flush) and a notification, as every service event
//! does, and nothing else. The tables are scratch tables of a database of their own
//! (`freshplan_loadtest`), named per run and dropped at its end, so the service's schema and its
//! start-up checks never see them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use serde_json::json;
use sqlx::postgres::{PgListener, PgPoolOptions};
use sqlx::{Executor, PgPool};
use tokio::task::JoinSet;

use super::setup::Database;
use super::stats::Clock;

/// Database of the scratch tables.
pub const DATABASE: &str = "freshplan_loadtest";

/// Rows the update picks from.
const ROWS: i64 = 1000;

/// One floor write as it went.
#[derive(Debug, Clone, Copy)]
pub struct FloorRecord {
    pub intended_us: u64,
    /// COMMIT answered (`None`: the write failed).
    pub committed_us: Option<u64>,
    /// The notification arrived on the LISTEN connection.
    pub notified_us: Option<u64>,
}

/// The floor's connections and scratch tables.
pub struct Floor {
    pool: PgPool,
    table: String,
    channel: String,
    arrivals: Arc<Mutex<HashMap<u64, u64>>>,
    listener: tokio::task::JoinHandle<()>,
    clock: Clock,
    seq: std::sync::atomic::AtomicU64,
}

async fn ensure_database(db: &Database) -> anyhow::Result<()> {
    let mut admin = db.connect(&db.name).await?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(DATABASE)
            .fetch_one(&mut admin)
            .await?;
    if !exists {
        match admin
            .execute(format!("CREATE DATABASE {DATABASE}").as_str())
            .await
        {
            Ok(_) => {}
            // Created by a concurrent run meanwhile.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => {}
            Err(e) => return Err(e).context(
                "cannot create the floor's scratch database (the admin URL's role needs CREATEDB)",
            ),
        }
    }
    Ok(())
}

impl Floor {
    /// Creates the scratch tables of this run and starts listening.
    pub async fn start(db: &Database, connections: u32, clock: Clock) -> anyhow::Result<Floor> {
        ensure_database(db).await?;
        let run = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
        let table = format!("floor_{run}");
        let channel = format!("floor_{run}");
        let options = db_options(db)?;
        let pool = PgPoolOptions::new()
            .max_connections(connections)
            .min_connections(connections)
            .connect_with(options.clone())
            .await
            .context("cannot connect to the floor's scratch database")?;
        pool.execute(
            format!(
                "CREATE TABLE {table}_rows (id bigint PRIMARY KEY, n bigint NOT NULL, updated_at timestamptz NOT NULL);\
                 INSERT INTO {table}_rows SELECT i, 0, now() FROM generate_series(1, {ROWS}) i;\
                 CREATE TABLE {table}_outbox (position bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, \
                   key uuid NOT NULL UNIQUE, payload jsonb NOT NULL, created_at timestamptz NOT NULL DEFAULT clock_timestamp())"
            )
            .as_str(),
        )
        .await
        .context("cannot create the floor's scratch tables")?;
        let mut listener = PgListener::connect_with(&pool).await?;
        listener.listen(&channel).await?;
        let arrivals: Arc<Mutex<HashMap<u64, u64>>> = Arc::default();
        let task = {
            let arrivals = arrivals.clone();
            tokio::spawn(async move {
                while let Ok(n) = listener.recv().await {
                    let at = clock.now_us();
                    if let Ok(seq) = n.payload().parse::<u64>() {
                        arrivals
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(seq, at);
                    }
                }
            })
        };
        Ok(Floor {
            pool,
            table,
            channel,
            arrivals,
            listener: task,
            clock,
            seq: std::sync::atomic::AtomicU64::new(0),
        })
    }

    async fn write(&self, seq: u64) -> Result<(), sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let row = (seq as i64 % ROWS) + 1;
        sqlx::query(&format!(
            "UPDATE {}_rows SET n = n + 1, updated_at = now() WHERE id = $1",
            self.table
        ))
        .bind(row)
        .execute(&mut *tx)
        .await?;
        let payload = json!({
            "specversion": "1.0", "id": uuid::Uuid::now_v7(), "source": "lead-management",
            "type": "dashboard.lead_status_changed", "subject": uuid::Uuid::new_v4(),
            "time": chrono::Utc::now(), "datacontenttype": "application/json",
            "data": {"leadId": uuid::Uuid::new_v4(), "companyName": "Lasttest Gasthaus", "oldStatus": "ACTIVE",
                     "newStatus": "REMINDER", "userId": "load-sales-de-01", "ownerUserId": "load-sales-de-01",
                     "territory": "DE", "changedAt": chrono::Utc::now()}
        });
        sqlx::query(&format!(
            "INSERT INTO {}_outbox (key, payload) VALUES ($1, $2) RETURNING position",
            self.table
        ))
        .bind(uuid::Uuid::new_v4())
        .bind(payload)
        .fetch_one(&mut *tx)
        .await?;
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(&self.channel)
            .bind(seq.to_string())
            .execute(&mut *tx)
            .await?;
        tx.commit().await
    }

    /// `rate` writes a second for `duration`, open loop; returns once every notification of
    /// a committed write arrived (or 5 s after the last commit).
    pub async fn run(self: &Arc<Self>, rate: f64, duration: Duration) -> Vec<FloorRecord> {
        let n = (rate * duration.as_secs_f64()).round() as u64;
        let period_us = 1e6 / rate;
        let start_us = self.clock.now_us() + 1_000;
        let mut set = JoinSet::new();
        let mut done = Vec::with_capacity(n as usize);
        for i in 0..n {
            let intended_us = start_us + (i as f64 * period_us) as u64;
            tokio::time::sleep_until(self.clock.at(intended_us).into()).await;
            let me = self.clone();
            let seq = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            set.spawn(async move {
                let ok = me.write(seq).await.is_ok();
                (seq, intended_us, ok.then(|| me.clock.now_us()))
            });
            while let Some(Ok(r)) = set.try_join_next() {
                done.push(r);
            }
        }
        while let Some(r) = set.join_next().await {
            if let Ok(r) = r {
                done.push(r);
            }
        }
        let committed: Vec<u64> = done.iter().filter(|r| r.2.is_some()).map(|r| r.0).collect();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let all = {
                let arrivals = self.arrivals.lock().unwrap_or_else(|e| e.into_inner());
                committed.iter().all(|s| arrivals.contains_key(s))
            };
            if all || tokio::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let arrivals = self.arrivals.lock().unwrap_or_else(|e| e.into_inner());
        done.into_iter()
            .map(|(seq, intended_us, committed_us)| FloorRecord {
                intended_us,
                committed_us,
                notified_us: committed_us.and(arrivals.get(&seq).copied()),
            })
            .collect()
    }

    /// Drops the scratch tables and closes the connections.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.listener.abort();
        self.pool
            .execute(format!("DROP TABLE IF EXISTS {0}_rows, {0}_outbox", self.table).as_str())
            .await?;
        self.pool.close().await;
        Ok(())
    }
}

fn db_options(db: &Database) -> anyhow::Result<sqlx::postgres::PgConnectOptions> {
    use std::str::FromStr;
    Ok(sqlx::postgres::PgConnectOptions::from_str(&db.admin_url)
        .context("freshplan.database.admin-url is not a valid PostgreSQL URL")?
        .database(DATABASE)
        .application_name("freshplan-loadtest-floor"))
}
