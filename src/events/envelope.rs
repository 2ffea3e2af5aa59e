//! The CloudEvents 1.0 envelope, event types, audiences and deterministic idempotency keys.
//!
//! Idempotency keys are UUID v5 in [`KEY_NAMESPACE`] over a canonical string; timestamps in the
//! string are UTC RFC 3339 with exactly six fractional digits and `Z`:
//!
//! | event | canonical string |
//! |---|---|
//! | lead_created | `created\|<leadId>\|<createdAt>` |
//! | lead_status_changed | `status\|<leadId>\|<old>\|<new>\|<changedAt>` |
//! | lead_assigned | `assigned\|<leadId>\|<oldOwner>\|<newOwner>\|<changedAt>` |
//! | activity_logged | `activity\|<activityId>` |
//! | followup_completed (per lead) | `followup\|<leadId>\|<T3\|T7>\|<processedAt>` |
//! | followup_completed (BATCH) | `followup-batch\|<minute window>\|<userId>\|<t3>\|<t7>` |
//!
//! The minute window is the processing time truncated to the minute, `YYYY-MM-DDTHH:MMZ`.

use chrono::{DateTime, SecondsFormat, Timelike, Utc};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::territory::Territory;

/// Namespace of every FreshPlan idempotency key (fixed forever; changing it re-keys history).
pub const KEY_NAMESPACE: Uuid = uuid::uuid!("e4ffedfd-abaa-42fc-a55f-17bb9d048f31");

/// CloudEvents `source` of this module.
pub const SOURCE: &str = "lead-management";

/// Frames larger than this travel as a truncation stub.
pub const MAX_FRAME_BYTES: usize = 7_680;

/// Event types of CONTRACT.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventType {
    LeadCreated,
    LeadStatusChanged,
    LeadAssigned,
    ActivityLogged,
    FollowupCompleted,
}

impl EventType {
    /// Every type.
    pub const ALL: [EventType; 5] = [
        EventType::LeadCreated,
        EventType::LeadStatusChanged,
        EventType::LeadAssigned,
        EventType::ActivityLogged,
        EventType::FollowupCompleted,
    ];

    /// The CloudEvents `type`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::LeadCreated => "dashboard.lead_created",
            EventType::LeadStatusChanged => "dashboard.lead_status_changed",
            EventType::LeadAssigned => "dashboard.lead_assigned",
            EventType::ActivityLogged => "dashboard.activity_logged",
            EventType::FollowupCompleted => "dashboard.followup_completed",
        }
    }

    /// Parses a CloudEvents `type`.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

/// Who may receive an event: the lead's owner and collaborators, managers and viewers of its
/// territory, admins. Stored beside the outbox row so RLS and the SSE hub use the same rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Audience {
    pub territory: Territory,
    pub owner: Option<String>,
    pub collaborators: Vec<String>,
}

/// An event about to be written to the outbox.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub id: Uuid,
    pub event_type: EventType,
    pub subject: Option<Uuid>,
    pub time: DateTime<Utc>,
    pub key: Uuid,
    pub data: Value,
    pub audience: Audience,
}

impl NewEvent {
    /// A new event with a fresh time-ordered id.
    pub fn new(
        event_type: EventType,
        subject: Option<Uuid>,
        time: DateTime<Utc>,
        key: Uuid,
        data: Value,
        audience: Audience,
    ) -> Self {
        NewEvent {
            id: Uuid::now_v7(),
            event_type,
            subject,
            time,
            key,
            data,
            audience,
        }
    }

    /// The envelope as stored (without `position`, which the database assigns).
    pub fn envelope(&self) -> Value {
        let mut env = json!({
            "specversion": "1.0",
            "id": self.id.to_string(),
            "source": SOURCE,
            "type": self.event_type.as_str(),
            "time": ts(self.time),
            "datacontenttype": "application/json",
            "idempotencykey": self.key.to_string(),
            "data": self.data,
        });
        if let Some(subject) = self.subject {
            env["subject"] = json!(subject.to_string());
        }
        env
    }
}

/// UTC RFC 3339 with microseconds: the canonical timestamp of keys and payloads.
pub fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// Truncates to microseconds (PostgreSQL's precision), so a time read back equals the one keyed.
pub fn micros(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(t.timestamp_micros()).unwrap_or(t)
}

fn key(canonical: &str) -> Uuid {
    Uuid::new_v5(&KEY_NAMESPACE, canonical.as_bytes())
}

/// Key of `dashboard.lead_created`.
pub fn key_created(lead: Uuid, created_at: DateTime<Utc>) -> Uuid {
    key(&format!("created|{lead}|{}", ts(created_at)))
}

/// Key of `dashboard.lead_status_changed`.
pub fn key_status_change(lead: Uuid, old: &str, new: &str, changed_at: DateTime<Utc>) -> Uuid {
    key(&format!("status|{lead}|{old}|{new}|{}", ts(changed_at)))
}

/// Key of `dashboard.lead_assigned`.
pub fn key_assigned(
    lead: Uuid,
    old_owner: &str,
    new_owner: &str,
    changed_at: DateTime<Utc>,
) -> Uuid {
    key(&format!(
        "assigned|{lead}|{old_owner}|{new_owner}|{}",
        ts(changed_at)
    ))
}

/// Key of `dashboard.activity_logged`.
pub fn key_activity(activity: Uuid) -> Uuid {
    key(&format!("activity|{activity}"))
}

/// Key of a per-lead `dashboard.followup_completed` (`kind` is T3 or T7).
pub fn key_followup(lead: Uuid, kind: &str, processed_at: DateTime<Utc>) -> Uuid {
    key(&format!("followup|{lead}|{kind}|{}", ts(processed_at)))
}

/// Key of the BATCH `dashboard.followup_completed`: same minute, user and counts → same key.
pub fn key_followup_batch(processed_at: DateTime<Utc>, user: &str, t3: i64, t7: i64) -> Uuid {
    let minute = processed_at
        .with_second(0)
        .and_then(|t| t.with_nanosecond(0))
        .unwrap_or(processed_at);
    key(&format!(
        "followup-batch|{}|{user}|{t3}|{t7}",
        minute.format("%Y-%m-%dT%H:%MZ")
    ))
}

/// The SSE/consumer form of an envelope: unchanged up to [`MAX_FRAME_BYTES`], else every
/// attribute but `data`, which becomes the truncation stub of CONTRACT.md.
pub fn frame(envelope: &Value) -> (Value, bool) {
    let size = serde_json::to_vec(envelope).map(|v| v.len()).unwrap_or(0);
    if size <= MAX_FRAME_BYTES {
        return (envelope.clone(), false);
    }
    let mut stub = envelope.clone();
    stub["data"] = json!({
        "truncated": true,
        "reference": envelope.get("idempotencykey").cloned().unwrap_or(Value::Null),
        "original_size_bytes": size,
        "hint": "payload >8KB, fetch details via API",
    });
    (stub, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn keys_reproduce_fixed_vectors() {
        let lead: Uuid = "0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b".parse().unwrap();
        let t = at("2026-11-28T09:00:00.123456Z");
        // Vectors computed independently with Python: uuid.uuid5(NS, canonical).
        assert_eq!(
            key_status_change(lead, "ACTIVE", "QUALIFIED", t).to_string(),
            "952ece31-903f-55ee-9463-50cc4c7b7b01"
        );
        assert_eq!(
            key_followup(lead, "T3", t).to_string(),
            "3955bb0d-2e47-5bf6-95c6-52152228fc41"
        );
        assert_eq!(
            key_followup_batch(at("2026-11-28T09:00:41.5Z"), "system", 3, 1).to_string(),
            "a5574fad-4673-5f9d-a9b4-2c9e5aa6ecde"
        );
        assert_eq!(
            ts(Utc.with_ymd_and_hms(2026, 11, 28, 9, 0, 0).unwrap()),
            "2026-11-28T09:00:00.000000Z"
        );
    }

    #[test]
    fn batch_keys_are_equal_within_a_minute_with_the_same_counts_only() {
        let a = key_followup_batch(at("2026-11-28T09:00:05.1Z"), "system", 3, 1);
        assert_eq!(
            a,
            key_followup_batch(at("2026-11-28T09:00:59.999Z"), "system", 3, 1)
        );
        assert_ne!(
            a,
            key_followup_batch(at("2026-11-28T09:01:00Z"), "system", 3, 1)
        );
        assert_ne!(
            a,
            key_followup_batch(at("2026-11-28T09:00:10Z"), "system", 3, 2)
        );
        assert_ne!(
            a,
            key_followup_batch(at("2026-11-28T09:00:10Z"), "manager-de", 3, 1)
        );
    }

    #[test]
    fn big_envelopes_become_a_stub_that_keeps_every_other_attribute() {
        let audience = Audience {
            territory: Territory::DE,
            owner: None,
            collaborators: vec![],
        };
        let ev = NewEvent::new(
            EventType::LeadCreated,
            None,
            Utc::now(),
            Uuid::nil(),
            json!({"x": "y".repeat(8000)}),
            audience,
        );
        let env = ev.envelope();
        let (stub, truncated) = frame(&env);
        assert!(truncated);
        assert_eq!(stub["data"]["reference"], json!(Uuid::nil().to_string()));
        assert_eq!(stub["type"], env["type"]);
        assert!(serde_json::to_vec(&stub).unwrap().len() < MAX_FRAME_BYTES);
    }
}
