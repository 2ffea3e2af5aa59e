//! The SSE hub of one instance: the open `/api/cockpit/stream` subscribers, each with its
//! principal and a bounded queue, and the in-memory audience match that decides who gets an
//! event.
//!
//! The audience of an event (territory, owner, collaborators — copied onto the outbox row at write
//! time) is computed once per event by the consumer; matching it against a subscriber is a few
//! comparisons in memory, never a query per subscriber. A slow subscriber cannot make the hub
//! buffer without bound: when its queue is full the event is dropped for it and the subscriber is
//! flagged, and its stream then discards the backlog and sends one `resync`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::mpsc;

use super::envelope::Audience;
use crate::identity::{Principal, Role};
use crate::telemetry::metrics::Metrics;

/// Label of the SSE gauge in `freshplan_dashboard_active_widgets`.
const SSE_WIDGET: &str = "sse";

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

struct Subscriber {
    principal: Principal,
    tx: mpsc::Sender<Arc<HubEvent>>,
    overflow: Arc<AtomicBool>,
}

/// Open SSE subscribers of this instance.
pub struct Hub {
    subscribers: Mutex<HashMap<u64, Subscriber>>,
    next_id: AtomicU64,
    queue_size: usize,
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
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if self.hub.lock().remove(&self.id).is_some() {
            self.hub
                .metrics
                .active_widgets
                .with_label_values(&[SSE_WIDGET])
                .dec();
        }
    }
}

impl Hub {
    /// An empty hub; `queue_size` is `freshplan.events.sse-queue-size`.
    pub fn new(queue_size: usize, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Hub {
            subscribers: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            queue_size: queue_size.max(1),
            closed: AtomicBool::new(false),
            metrics,
        })
    }

    // A panic while holding the lock cannot leave the map inconsistent (every critical section
    // is a single insert, remove or iteration), so a poisoned lock is still usable.
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Subscriber>> {
        self.subscribers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a subscriber. After [`Hub::close`] the subscription is already ended.
    pub fn subscribe(self: &Arc<Self>, principal: Principal) -> Subscription {
        let (tx, rx) = mpsc::channel(self.queue_size);
        let overflow = Arc::new(AtomicBool::new(false));
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if !self.closed.load(Ordering::SeqCst) {
            self.lock().insert(
                id,
                Subscriber {
                    principal,
                    tx,
                    overflow: overflow.clone(),
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
        }
    }

    /// Hands an event to every subscriber in its audience; returns how many got it queued.
    pub fn publish(&self, event: Arc<HubEvent>) -> usize {
        let subscribers = self.lock();
        let mut delivered = 0;
        for s in subscribers.values() {
            if !in_audience(&s.principal, &event.audience) {
                continue;
            }
            match s.tx.try_send(event.clone()) {
                Ok(()) => delivered += 1,
                Err(mpsc::error::TrySendError::Full(_)) => s.overflow.store(true, Ordering::SeqCst),
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        delivered
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
        self.metrics
            .active_widgets
            .with_label_values(&[SSE_WIDGET])
            .sub(n);
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
}
