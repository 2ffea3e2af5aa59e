//! The SSE hub of one instance: the open `/api/cockpit/stream` subscribers, each with its
//! principal and a bounded queue, and the in-memory audience match that decides who gets an
//! event.
//!
//! The audience of an event (territory, owner, collaborators — copied onto the outbox row at write
//! time) is computed once per event by the consumer; matching it against a subscriber is a few
//! comparisons in memory, never a query per subscriber. A slow subscriber cannot make the hub
//! buffer without bound: when its queue is full the event is dropped for it and the subscriber is
//! flagged, and its stream then discards the backlog and sends one `resync`.
//!
//! Viewers get aggregate frames only ([`aggregate`], made once per event): no lead id, company
//! name, subject or user ids. A user has at most `freshplan.stream.max-per-principal` open streams
//! on an instance; a further one ends the oldest with `event: replaced`. [`watch_users`] ends the
//! streams of users the user table no longer admits (deactivated, role or territory changed).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch};

use super::envelope::Audience;
use crate::auth::users::{self, Users};
use crate::identity::{Principal, Role};
use crate::telemetry::metrics::Metrics;

/// Label of the SSE gauge in `freshplan_dashboard_active_widgets`.
const SSE_WIDGET: &str = "sse";

/// Default of `freshplan.stream.max-per-principal`.
pub const DEFAULT_MAX_PER_PRINCIPAL: usize = 5;

/// One event as the hub hands it to subscribers: framed and serialised once.
#[derive(Debug)]
pub struct HubEvent {
    /// Outbox position (the SSE `id:`).
    pub position: i64,
    /// CloudEvents type (the SSE `event:`).
    pub event_type: String,
    /// Who may receive it.
    pub audience: Audience,
    /// The frame as JSON text: the envelope with `position`, or its truncation stub.
    pub data: String,
}

/// Attributes of `data` an aggregate (viewer) frame keeps: event kind, territory, status names,
/// counts and times — never a lead id, company name, user id or free text. The truncation stub's
/// fields stay too (its reference is the idempotency key, fetched as an aggregate again).
pub const AGGREGATE_DATA_FIELDS: &[&str] = &[
    "territory",
    "status",
    "oldStatus",
    "newStatus",
    "activityType",
    "followUpType",
    "t3Count",
    "t7Count",
    "success",
    "createdAt",
    "changedAt",
    "occurredAt",
    "processedAt",
    "truncated",
    "reference",
    "original_size_bytes",
    "hint",
];

/// The aggregate form of an envelope (or frame) for viewers: every CloudEvents attribute but
/// `subject` (the lead id), and of `data` only [`AGGREGATE_DATA_FIELDS`].
pub fn aggregate(envelope: &Value) -> Value {
    let mut out = envelope.clone();
    if let Some(obj) = out.as_object_mut() {
        obj.remove("subject");
        if let Some(Value::Object(data)) = obj.get_mut("data") {
            data.retain(|k, _| AGGREGATE_DATA_FIELDS.contains(&k.as_str()));
        }
    }
    out
}

impl HubEvent {
    /// The same event as viewers get it.
    fn for_viewers(&self) -> HubEvent {
        let data = serde_json::from_str::<Value>(&self.data)
            .map(|v| aggregate(&v).to_string())
            .unwrap_or_else(|_| "{}".into());
        HubEvent {
            position: self.position,
            event_type: self.event_type.clone(),
            audience: self.audience.clone(),
            data,
        }
    }
}

/// True when `p` is in the audience: admins get everything, managers and viewers their
/// territory, sales users the leads they own or collaborate on. The same rule as the
/// database's `app_can_see`, so live delivery and `Last-Event-ID` replay agree.
pub fn in_audience(p: &Principal, a: &Audience) -> bool {
    match p.role {
        Role::Admin | Role::System => true,
        Role::Manager | Role::Viewer => p.territory == a.territory,
        Role::Sales => {
            a.owner.as_deref() == Some(p.user_id.as_str()) || a.collaborators.contains(&p.user_id)
        }
    }
}

/// Why the hub ended a stream (its last, named event).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The user opened more than `freshplan.stream.max-per-principal` streams: `event: replaced`.
    Replaced,
    /// The user table no longer admits the user: `event: reauth`.
    Revoked,
}

struct Subscriber {
    principal: Principal,
    tx: mpsc::Sender<Arc<HubEvent>>,
    overflow: Arc<AtomicBool>,
    end: oneshot::Sender<Ending>,
}

/// Open SSE subscribers of this instance.
pub struct Hub {
    subscribers: Mutex<HashMap<u64, Subscriber>>,
    next_id: AtomicU64,
    queue_size: usize,
    max_per_principal: usize,
    closed: AtomicBool,
    metrics: Arc<Metrics>,
}

/// A registered subscriber; dropping it unregisters it.
pub struct Subscription {
    id: u64,
    hub: Arc<Hub>,
    /// Events in the subscriber's audience, in the order the consumer handled them.
    pub rx: mpsc::Receiver<Arc<HubEvent>>,
    /// Set when an event had to be dropped because the queue was full.
    pub overflow: Arc<AtomicBool>,
    /// Resolves when the hub ends the stream: `Ok(reason)`, or an error when the hub closed
    /// (shutdown) or never registered it.
    pub ended: oneshot::Receiver<Ending>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if self.hub.lock().remove(&self.id).is_some() {
            self.hub.gauge_sub(1);
        }
    }
}

impl Hub {
    /// An empty hub; `queue_size` is `freshplan.events.sse-queue-size`.
    pub fn new(queue_size: usize, metrics: Arc<Metrics>) -> Arc<Self> {
        Self::with_limit(queue_size, DEFAULT_MAX_PER_PRINCIPAL, metrics)
    }

    /// Same, with `freshplan.stream.max-per-principal`.
    pub fn with_limit(
        queue_size: usize,
        max_per_principal: usize,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Hub {
            subscribers: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            queue_size: queue_size.max(1),
            max_per_principal: max_per_principal.max(1),
            closed: AtomicBool::new(false),
            metrics,
        })
    }

    // A panic while holding the lock cannot leave the map inconsistent (every critical section
    // is a single insert, remove or iteration), so a poisoned lock is still usable.
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Subscriber>> {
        self.subscribers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn gauge_sub(&self, n: i64) {
        self.metrics
            .active_widgets
            .with_label_values(&[SSE_WIDGET])
            .sub(n);
    }

    /// Registers a subscriber. After [`Hub::close`] the subscription is already ended. When the
    /// user already has `max-per-principal` streams here, the oldest ends with
    /// [`Ending::Replaced`].
    pub fn subscribe(self: &Arc<Self>, principal: Principal) -> Subscription {
        let (tx, rx) = mpsc::channel(self.queue_size);
        let (end, ended) = oneshot::channel();
        let overflow = Arc::new(AtomicBool::new(false));
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if !self.closed.load(Ordering::SeqCst) {
            let mut subscribers = self.lock();
            let mut same: Vec<u64> = subscribers
                .iter()
                .filter(|(_, s)| s.principal.user_id == principal.user_id)
                .map(|(id, _)| *id)
                .collect();
            same.sort_unstable();
            let excess = (same.len() + 1).saturating_sub(self.max_per_principal);
            for oldest in same.into_iter().take(excess) {
                if let Some(s) = subscribers.remove(&oldest) {
                    tracing::info!(user = %principal.user_id, "too many streams: the oldest is replaced");
                    let _ = s.end.send(Ending::Replaced);
                    self.gauge_sub(1);
                }
            }
            subscribers.insert(
                id,
                Subscriber {
                    principal,
                    tx,
                    overflow: overflow.clone(),
                    end,
                },
            );
            self.metrics
                .active_widgets
                .with_label_values(&[SSE_WIDGET])
                .inc();
        }
        Subscription {
            id,
            hub: self.clone(),
            rx,
            overflow,
            ended,
        }
    }

    /// Hands an event to every subscriber in its audience; returns how many got it queued.
    /// Viewers get its aggregate form, made once.
    pub fn publish(&self, event: Arc<HubEvent>) -> usize {
        let subscribers = self.lock();
        let mut delivered = 0;
        let mut for_viewers: Option<Arc<HubEvent>> = None;
        for s in subscribers.values() {
            if !in_audience(&s.principal, &event.audience) {
                continue;
            }
            let ev = if s.principal.role == Role::Viewer {
                for_viewers
                    .get_or_insert_with(|| Arc::new(event.for_viewers()))
                    .clone()
            } else {
                event.clone()
            };
            match s.tx.try_send(ev) {
                Ok(()) => delivered += 1,
                Err(mpsc::error::TrySendError::Full(_)) => s.overflow.store(true, Ordering::SeqCst),
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        delivered
    }

    /// The open subscribers: (subscription id, principal).
    pub fn principals(&self) -> Vec<(u64, Principal)> {
        self.lock()
            .iter()
            .map(|(id, s)| (*id, s.principal.clone()))
            .collect()
    }

    /// Ends one stream with `why` as its last event.
    pub fn end(&self, id: u64, why: Ending) {
        let removed = self.lock().remove(&id);
        if let Some(s) = removed {
            let _ = s.end.send(why);
            self.gauge_sub(1);
        }
    }

    /// Number of open subscribers.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True without subscribers.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Ends every stream (shutdown): dropping the senders lets each stream finish, so graceful
    /// HTTP shutdown does not wait for long-lived SSE connections.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let mut subscribers = self.lock();
        let n = subscribers.len() as i64;
        subscribers.clear();
        self.gauge_sub(n);
    }
}

/// Ends the streams of users the user table no longer admits. Every `every` (the user cache
/// TTL, `freshplan.auth.users.refresh-seconds`) it reads the rows of all users with an open
/// stream on this instance in one query — which also refreshes the request cache — and ends the
/// streams of users that are gone, deactivated, or whose role or territory changed, with
/// `event: reauth`. `freshplan users deactivate` runs in another process: this bounds the delay
/// to one interval.
pub async fn watch_users(
    hub: Arc<Hub>,
    users: Arc<Users>,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => return,
            _ = tick.tick() => {}
        }
        if *stop.borrow() {
            return;
        }
        let open = hub.principals();
        if open.is_empty() {
            continue;
        }
        let ids: Vec<String> = open
            .iter()
            .map(|(_, p)| p.user_id.clone())
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let rows = match users.load(&ids).await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, "checking the users of open streams failed; retrying");
                continue;
            }
        };
        for (id, p) in open {
            if let Err(reason) = users::admit(&p, rows.get(&p.user_id)) {
                tracing::info!(user = %p.user_id, reason, "ending a stream the user table no longer admits");
                hub.end(id, Ending::Revoked);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::territory::Territory;

    fn p(user: &str, role: Role, t: Territory) -> Principal {
        Principal {
            user_id: user.into(),
            name: user.into(),
            role,
            territory: t,
        }
    }

    #[test]
    fn audience_follows_role_territory_owner_and_collaborators() {
        let a = Audience {
            territory: Territory::DE,
            owner: Some("sales-de-1".into()),
            collaborators: vec!["sales-de-2".into()],
        };
        assert!(in_audience(&p("admin", Role::Admin, Territory::AT), &a));
        assert!(in_audience(
            &p("manager-de", Role::Manager, Territory::DE),
            &a
        ));
        assert!(in_audience(
            &p("viewer-de", Role::Viewer, Territory::DE),
            &a
        ));
        assert!(!in_audience(
            &p("manager-at", Role::Manager, Territory::AT),
            &a
        ));
        assert!(in_audience(
            &p("sales-de-1", Role::Sales, Territory::DE),
            &a
        ));
        assert!(in_audience(
            &p("sales-de-2", Role::Sales, Territory::DE),
            &a
        ));
        assert!(!in_audience(
            &p("sales-de-3", Role::Sales, Territory::DE),
            &a
        ));
    }

    #[tokio::test]
    async fn a_full_queue_flags_overflow_instead_of_buffering() {
        let hub = Hub::new(2, Arc::new(Metrics::new()));
        let sub = hub.subscribe(p("admin", Role::Admin, Territory::DE));
        let a = Audience {
            territory: Territory::DE,
            owner: None,
            collaborators: vec![],
        };
        for position in 1..=3 {
            hub.publish(Arc::new(HubEvent {
                position,
                event_type: "t".into(),
                audience: a.clone(),
                data: "{}".into(),
            }));
        }
        assert!(sub.overflow.load(Ordering::SeqCst));
        assert_eq!(hub.len(), 1);
        drop(sub);
        assert!(hub.is_empty());
    }

    #[tokio::test]
    async fn a_stream_beyond_the_limit_replaces_the_oldest_of_that_user_only() {
        let hub = Hub::with_limit(4, 2, Arc::new(Metrics::new()));
        let mut first = hub.subscribe(p("sales-de-1", Role::Sales, Territory::DE));
        let _other = hub.subscribe(p("sales-de-2", Role::Sales, Territory::DE));
        let mut second = hub.subscribe(p("sales-de-1", Role::Sales, Territory::DE));
        assert!(first.ended.try_recv().is_err(), "within the limit");
        let _third = hub.subscribe(p("sales-de-1", Role::Sales, Territory::DE));
        assert_eq!(first.ended.try_recv(), Ok(Ending::Replaced));
        assert!(second.ended.try_recv().is_err());
        assert_eq!(hub.len(), 3);
        drop(first);
        assert_eq!(hub.len(), 3, "an ended subscription is not removed twice");
    }

    #[test]
    fn the_aggregate_frame_keeps_kind_territory_status_and_times_only() {
        let env = serde_json::json!({"specversion": "1.0", "id": "e", "type": "dashboard.lead_status_changed",
            "subject": "lead-1", "time": "t", "position": 3,
            "data": {"leadId": "lead-1", "companyName": "Sonne GmbH", "oldStatus": "ACTIVE",
                     "newStatus": "QUALIFIED", "userId": "sales-de-1", "ownerUserId": "sales-de-1",
                     "territory": "DE", "changedAt": "t"}});
        let a = aggregate(&env);
        assert!(a.get("subject").is_none());
        assert_eq!(a["position"], 3);
        assert_eq!(
            a["data"],
            serde_json::json!({"oldStatus": "ACTIVE", "newStatus": "QUALIFIED", "territory": "DE", "changedAt": "t"})
        );
    }
}
