//! Where PostgreSQL's share goes, per event: commits, rows written and read in the database
//! (`pg_stat_database`) and WAL records, bytes and flushes of the whole cluster
//! (`pg_stat_wal`), read before and after a phase. The cumulative statistics reach these views
//! within about a second of a transaction's end; a phase's drain covers that.

use serde::Serialize;
use sqlx::PgConnection;

/// The counters at one moment.
#[derive(Debug, Clone, Copy, Default, sqlx::FromRow)]
pub struct Counters {
    pub commits: i64,
    pub rollbacks: i64,
    pub inserted: i64,
    pub updated: i64,
    pub deleted: i64,
    pub returned: i64,
    pub fetched: i64,
    pub blocks_read: i64,
    pub wal_records: i64,
    pub wal_bytes: i64,
    pub wal_syncs: i64,
}

/// Reads the counters of database `datname` and of the WAL.
pub async fn read(conn: &mut PgConnection, datname: &str) -> Result<Counters, sqlx::Error> {
    sqlx::query_as(
        "SELECT d.xact_commit AS commits, d.xact_rollback AS rollbacks, d.tup_inserted AS inserted, \
           d.tup_updated AS updated, d.tup_deleted AS deleted, d.tup_returned AS returned, \
           d.tup_fetched AS fetched, d.blks_read AS blocks_read, w.wal_records, \
           w.wal_bytes::bigint AS wal_bytes, w.wal_sync AS wal_syncs \
         FROM pg_stat_database d, pg_stat_wal w WHERE d.datname = $1",
    )
    .bind(datname)
    .fetch_one(conn)
    .await
}

/// Per event between two readings.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PerEvent {
    pub commits: f64,
    pub rollbacks: f64,
    pub rows_inserted: f64,
    pub rows_updated: f64,
    pub rows_deleted: f64,
    /// Rows scanned (sequential and index) plus rows fetched by index.
    pub rows_read: f64,
    pub blocks_read: f64,
    pub wal_records: f64,
    pub wal_bytes: f64,
    /// WAL flushes (fsync/fdatasync): what a commit waits for.
    pub wal_syncs: f64,
}

/// `(after − before) / events`.
pub fn per_event(before: &Counters, after: &Counters, events: u64) -> Option<PerEvent> {
    if events == 0 {
        return None;
    }
    let n = events as f64;
    let d = |a: i64, b: i64| ((a - b).max(0) as f64 / n * 100.0).round() / 100.0;
    Some(PerEvent {
        commits: d(after.commits, before.commits),
        rollbacks: d(after.rollbacks, before.rollbacks),
        rows_inserted: d(after.inserted, before.inserted),
        rows_updated: d(after.updated, before.updated),
        rows_deleted: d(after.deleted, before.deleted),
        rows_read: d(
            after.returned + after.fetched,
            before.returned + before.fetched,
        ),
        blocks_read: d(after.blocks_read, before.blocks_read),
        wal_records: d(after.wal_records, before.wal_records),
        wal_bytes: d(after.wal_bytes, before.wal_bytes),
        wal_syncs: d(after.wal_syncs, before.wal_syncs),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deltas_are_divided_by_the_events() {
        let before = Counters {
            commits: 10,
            wal_syncs: 5,
            ..Counters::default()
        };
        let after = Counters {
            commits: 40,
            wal_syncs: 25,
            ..Counters::default()
        };
        let p = per_event(&before, &after, 10).unwrap();
        assert_eq!(p.commits, 3.0);
        assert_eq!(p.wal_syncs, 2.0);
        assert!(per_event(&before, &after, 0).is_none());
    }
}
