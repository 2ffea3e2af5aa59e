//! The durable consumer `lead-event-handler`: counts events per day, territory, owner and type
//! into `cockpit_daily_events`, exactly once per event (its inbox decides), in one statement
//! per batch.

use chrono::NaiveDate;
use futures::future::BoxFuture;

use crate::db::Tx;
use crate::events::consumer::{DurableConsumer, Event};

/// Name of the durable consumer (inbox and cursor key, and the readiness check's name).
pub const CONSUMER: &str = "lead-event-handler";

/// The cockpit's daily event counts.
pub struct DailyEvents;

impl DurableConsumer for DailyEvents {
    fn name(&self) -> &'static str {
        CONSUMER
    }

    fn apply<'a>(
        &'a self,
        tx: &'a mut Tx,
        events: &'a [&'a Event<'a>],
    ) -> BoxFuture<'a, Result<(), sqlx::Error>> {
        Box::pin(async move {
            let days: Vec<NaiveDate> = events.iter().map(|e| e.time.date_naive()).collect();
            let territories: Vec<&str> = events.iter().map(|e| e.territory.code()).collect();
            let owners: Vec<&str> = events
                .iter()
                .map(|e| e.row.owner_user_id.as_deref().unwrap_or(""))
                .collect();
            let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
            // Rows in group order, so two instances racing take their locks in the same order.
            sqlx::query(
                "INSERT INTO cockpit_daily_events (day, territory, owner_user_id, event_type, events) \
                 SELECT day, territory, owner, event_type, count(*) \
                 FROM unnest($1::date[], $2::text[], $3::text[], $4::text[]) \
                   AS b(day, territory, owner, event_type) \
                 GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4 \
                 ON CONFLICT (day, territory, owner_user_id, event_type) \
                 DO UPDATE SET events = cockpit_daily_events.events + EXCLUDED.events",
            )
            .bind(&days)
            .bind(&territories)
            .bind(&owners)
            .bind(&types)
            .execute(&mut **tx)
            .await?;
            Ok(())
        })
    }
}
