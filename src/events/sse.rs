//! `GET /api/cockpit/stream`: the Server-Sent Events stream of the events in the caller's
//! audience, with `Last-Event-ID` resume.
//!
//! Resume without gaps or duplicates: the subscriber registers in the hub *first*, so live events
//! queue up while the outbox is replayed (as the caller: row-level security on the outbox applies
//! the audience rule); live events the replay already sent, or that the client had, are dropped.
//! The queue is bounded (`freshplan.events.sse-queue-size`): a client that falls behind gets its
//! backlog discarded and one `event: resync` (refetch the widget) instead of unbounded buffering.
//!
//! A stream lives no longer than its token: at the token's `exp` it ends with `event: reauth`
//! (the client gets a fresh token and reconnects with `Last-Event-ID`). The hub may end it earlier:
//! `event: replaced` when the user opened more than `freshplan.stream.max-per-principal` streams,
//! `event: reauth` when the user table no longer admits the user (deactivated, role or territory
//! changed). Viewers get aggregate frames only (`hub::aggregate`), replayed ones included.

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use sqlx::PgPool;

use super::hub::{self, Ending, HubEvent};
use super::{envelope, outbox, EventsState};
use crate::auth::Caller;
use crate::db;
use crate::error::{ApiError, ApiResult};
use crate::identity::{Principal, Role};

/// Rows per replay query.
const REPLAY_PAGE: i64 = 500;
/// A client further behind than this is told to resync instead of being replayed to.
const REPLAY_MAX: usize = 20_000;

fn frame_event(position: i64, event_type: &str, data: &str) -> Event {
    Event::default()
        .id(position.to_string())
        .event(event_type)
        .data(data)
}

fn resync(reason: &str) -> Event {
    Event::default()
        .event("resync")
        .data(json!({"reason": reason}).to_string())
}

fn named(event: &str, reason: &str) -> Event {
    Event::default()
        .event(event)
        .data(json!({"reason": reason}).to_string())
}

/// Time left until `exp` (seconds since the Unix epoch).
fn until(exp: u64) -> Duration {
    (UNIX_EPOCH + Duration::from_secs(exp))
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO)
}

/// What woke the live loop.
enum Next {
    Ended(Option<Ending>),
    Expired,
    Event(Option<std::sync::Arc<HubEvent>>),
}

async fn replay_page(
    pool: &PgPool,
    caller: &Principal,
    after: i64,
) -> Result<Vec<(i64, String, Value)>, sqlx::Error> {
    let mut tx = db::begin_as(pool, caller).await?;
    let rows = outbox::replay_after(&mut tx, after, REPLAY_PAGE).await?;
    tx.commit().await?;
    Ok(rows)
}

/// The caller's live event stream.
#[utoipa::path(get, path = "/api/cockpit/stream", tag = "events",
    params(("Last-Event-ID" = Option<i64>, Header, description = "outbox position of the last event received; the stream replays what followed")),
    responses(
        (status = 200, description = "text/event-stream: `id:` outbox position, `event:` CloudEvents type, `data:` envelope (or truncation stub; aggregate frames for viewers); `event: resync` when the client fell behind; the stream ends with `event: reauth` at the token's expiry or when the user is deactivated, and with `event: replaced` when the user opened too many streams", content_type = "text/event-stream"),
        (status = 401, description = "no identity"),
        (status = 422, description = "Last-Event-ID is not a position")))]
pub async fn stream(
    State(state): State<EventsState>,
    caller: Caller,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let last_id = match headers.get("last-event-id") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(parse_last_event_id)
                .ok_or_else(|| {
                    ApiError::field("Last-Event-ID must be an outbox position (an integer)")
                })?,
        ),
    };
    let Caller {
        principal: caller,
        expires_at,
    } = caller;
    let viewer = caller.role == Role::Viewer;
    let expiry = tokio::time::Instant::now() + until(expires_at);
    let mut sub = state.hub.subscribe(caller.clone());
    let pool = state.pool.clone();
    let events = async_stream::stream! {
        let mut replayed: HashSet<i64> = HashSet::new();
        if let Some(mut after) = last_id {
            loop {
                match replay_page(&pool, &caller, after).await {
                    Ok(rows) => {
                        let n = rows.len() as i64;
                        for (position, event_type, env) in rows {
                            after = position;
                            replayed.insert(position);
                            let (mut frame, _) = envelope::frame(&env);
                            if viewer {
                                frame = hub::aggregate(&frame);
                            }
                            yield Ok::<_, Infallible>(frame_event(position, &event_type, &frame.to_string()));
                        }
                        if n < REPLAY_PAGE {
                            break;
                        }
                        if replayed.len() >= REPLAY_MAX {
                            yield Ok(resync("too far behind to replay"));
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "SSE replay failed; asking the client to resync");
                        yield Ok(resync("replay failed"));
                        break;
                    }
                }
            }
        }
        loop {
            let next = tokio::select! {
                biased;
                ended = &mut sub.ended => Next::Ended(ended.ok()),
                _ = tokio::time::sleep_until(expiry) => Next::Expired,
                ev = sub.rx.recv() => Next::Event(ev),
            };
            match next {
                Next::Ended(Some(Ending::Replaced)) => {
                    yield Ok(named("replaced", "too many open streams for this user"));
                    break;
                }
                Next::Ended(Some(Ending::Revoked)) => {
                    yield Ok(named("reauth", "user no longer admitted"));
                    break;
                }
                // The hub closed (shutdown).
                Next::Ended(None) | Next::Event(None) => break,
                Next::Expired => {
                    yield Ok(named("reauth", "token expired"));
                    break;
                }
                Next::Event(Some(ev)) => {
                    if sub.overflow.swap(false, Ordering::SeqCst) {
                        while sub.rx.try_recv().is_ok() {}
                        yield Ok(resync("queue overflow"));
                        continue;
                    }
                    if last_id.is_some_and(|l| ev.position <= l) || replayed.remove(&ev.position) {
                        continue;
                    }
                    yield Ok(frame_event(ev.position, &ev.event_type, &ev.data));
                }
            }
        }
    };
    let keepalive = KeepAlive::new()
        .interval(state.keepalive)
        .text("keep-alive");
    Ok(Sse::new(events).keep_alive(keepalive).into_response())
}

/// The position a `Last-Event-ID` header names: an integer, surrounding blanks allowed.
pub fn parse_last_event_id(value: &str) -> Option<i64> {
    value.trim().parse::<i64>().ok()
}
