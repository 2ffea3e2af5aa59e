//! Hostile input beyond the HTTP surface, as property tests on stable Rust (proptest): the
//! envelope check of the consumers, the lead status machine, the idempotency-key recipes, the
//! configuration loader and the `Last-Event-ID` parser get arbitrary input and must answer —
//! never panic — with exactly what their rules say. Bounded: proptest's 256 cases per property
//! (`PROPTEST_CASES` raises it for a longer local run). The corpus: `tests/fixtures/fuzz/`
//! holds hand-picked hostile inputs every run replays, and proptest keeps any failing case it
//! finds under `proptest-regressions/` (committed), replayed first on every later run.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, TimeZone, Utc};
use freshplan::auth::Role;
use freshplan::config::Settings;
use freshplan::events::consumer::authorize;
use freshplan::events::envelope::{self, EventType};
use freshplan::events::outbox::OutboxRow;
use freshplan::events::sse::parse_last_event_id;
use freshplan::leads::domain::LeadStatus;
use proptest::prelude::*;
use serde_json::{json, Value};
use uuid::Uuid;

const STATUSES: [LeadStatus; 9] = [
    LeadStatus::Registered,
    LeadStatus::Active,
    LeadStatus::Reminder,
    LeadStatus::GracePeriod,
    LeadStatus::Qualified,
    LeadStatus::Converted,
    LeadStatus::Lost,
    LeadStatus::Expired,
    LeadStatus::Deleted,
];
const ROLES: [Role; 5] = [
    Role::Admin,
    Role::Manager,
    Role::Sales,
    Role::Viewer,
    Role::System,
];

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,40}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::hash_map(".{0,12}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn row(envelope: Value, event_type: &str, key: Uuid) -> OutboxRow {
    OutboxRow {
        position: 1,
        txid: 1,
        idempotency_key: key,
        event_type: event_type.to_string(),
        territory: "DE".into(),
        owner_user_id: Some("sales-de-1".into()),
        collaborators: Vec::new(),
        envelope,
        created_at: Utc::now(),
    }
}

fn valid_envelope(key: Uuid) -> Value {
    json!({
        "specversion": "1.0", "id": Uuid::now_v7().to_string(), "source": envelope::SOURCE,
        "type": "dashboard.lead_created", "time": "2026-12-03T09:00:00.000000Z",
        "datacontenttype": "application/json", "idempotencykey": key.to_string(),
        "data": {"leadId": Uuid::nil()}, "position": 1,
    })
}

/// The hand-picked hostile inputs of `tests/fixtures/fuzz/<name>.txt`, one per line.
fn corpus(name: &str) -> Vec<String> {
    let path = format!(
        "{}/tests/fixtures/fuzz/{name}.txt",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .lines()
        .map(|l| l.replace("\\n", "\n").replace("\\0", "\0"))
        .collect()
}

#[test]
fn the_envelope_corpus_is_refused_and_a_valid_envelope_accepted() {
    // The corpus carries the nil key, the row's key here: each line is refused for its own
    // defect, not for a key mismatch.
    let key = Uuid::nil();
    assert!(authorize(&row(valid_envelope(key), "dashboard.lead_created", key)).is_some());
    for line in corpus("envelopes") {
        let envelope: Value = serde_json::from_str(&line).unwrap_or(Value::String(line.clone()));
        assert!(
            authorize(&row(envelope, "dashboard.lead_created", key)).is_none(),
            "accepted: {line}"
        );
    }
}

proptest! {
    #[test]
    fn arbitrary_json_as_an_envelope_is_refused_without_a_panic(envelope in any_json()) {
        let key = Uuid::new_v4();
        prop_assert!(authorize(&row(envelope, "dashboard.lead_created", key)).is_none());
    }

    #[test]
    fn a_valid_envelope_with_any_required_attribute_changed_is_refused(
        attr in prop::sample::select(vec!["specversion", "id", "source", "type", "time", "idempotencykey", "data"]),
        replacement in any_json(),
        remove in any::<bool>(),
    ) {
        let key = Uuid::new_v4();
        let mut env = valid_envelope(key);
        let original = env[attr].clone();
        if remove {
            env.as_object_mut().unwrap().remove(attr);
        } else {
            // `data` may be any JSON, `id` any non-empty string: those stay valid.
            prop_assume!(attr != "data" && !(attr == "id" && replacement.as_str().is_some_and(|s| !s.is_empty())));
            prop_assume!(replacement != original);
            env[attr] = replacement;
        }
        prop_assert!(authorize(&row(env, "dashboard.lead_created", key)).is_none());
    }

    #[test]
    fn an_envelope_whose_type_or_key_disagrees_with_its_row_is_refused(
        row_type in prop::sample::select(EventType::ALL.to_vec()),
        other_key in any::<u128>(),
    ) {
        let key = Uuid::new_v4();
        let env = valid_envelope(key);
        let accepted = authorize(&row(env.clone(), row_type.as_str(), key)).is_some();
        prop_assert_eq!(accepted, row_type == EventType::LeadCreated);
        let other = Uuid::from_u128(other_key);
        prop_assume!(other != key);
        prop_assert!(authorize(&row(env, "dashboard.lead_created", other)).is_none());
    }

    #[test]
    fn every_status_change_the_machine_allows_is_in_the_design_table_and_deleted_is_final(
        steps in prop::collection::vec((0..9usize, 0..5usize, any::<bool>()), 1..40),
    ) {
        let mut status = LeadStatus::Registered;
        for (to, role, clock_stopped) in steps {
            let to = STATUSES[to];
            match status.transition(to, ROLES[role], clock_stopped) {
                Ok(next) => {
                    prop_assert_eq!(next, to);
                    prop_assert!(
                        status.allowed_targets().contains(&to) || to == LeadStatus::Deleted,
                        "{:?} -> {:?} allowed", status, to
                    );
                    prop_assert_ne!(status, LeadStatus::Deleted, "nothing leaves DELETED");
                    status = next;
                }
                Err(e) => {
                    prop_assert_eq!(e.from, status);
                    prop_assert_eq!(e.to, to);
                }
            }
        }
    }

    #[test]
    fn idempotency_keys_are_deterministic_and_differ_when_any_part_differs(
        lead in any::<u128>(), lead2 in any::<u128>(),
        old in prop::sample::select(STATUSES.to_vec()), new in prop::sample::select(STATUSES.to_vec()),
        micros in 0i64..4_102_444_800_000_000, micros2 in 0i64..4_102_444_800_000_000,
    ) {
        let (a, b) = (Uuid::from_u128(lead), Uuid::from_u128(lead2));
        let t = Utc.timestamp_micros(micros).unwrap();
        let t2 = Utc.timestamp_micros(micros2).unwrap();
        let k = envelope::key_status_change(a, old.as_str(), new.as_str(), t);
        prop_assert_eq!(k, envelope::key_status_change(a, old.as_str(), new.as_str(), t));
        prop_assert_eq!(k.get_version_num(), 5);
        if a != b {
            prop_assert_ne!(k, envelope::key_status_change(b, old.as_str(), new.as_str(), t));
            prop_assert_ne!(envelope::key_created(a, t), envelope::key_created(b, t));
        }
        if t != t2 {
            prop_assert_ne!(k, envelope::key_status_change(a, old.as_str(), new.as_str(), t2));
            prop_assert_ne!(envelope::key_followup(a, "T3", t), envelope::key_followup(a, "T3", t2));
        }
        prop_assert_ne!(envelope::key_followup(a, "T3", t), envelope::key_followup(a, "T7", t));
        prop_assert_ne!(envelope::key_created(a, t), envelope::key_followup(a, "T3", t));
    }

    #[test]
    fn batch_keys_are_equal_within_a_minute_and_differ_across_minutes_users_and_counts(
        minute in 0i64..60_000_000, s1 in 0i64..60_000_000, s2 in 0i64..60_000_000,
        t3 in 0i64..1000, t7 in 0i64..1000,
    ) {
        let at = |minute: i64, micros: i64| -> DateTime<Utc> {
            Utc.timestamp_micros(minute * 60_000_000 + micros).unwrap()
        };
        let k = envelope::key_followup_batch(at(minute, s1), "system", t3, t7);
        prop_assert_eq!(k, envelope::key_followup_batch(at(minute, s2), "system", t3, t7));
        prop_assert_ne!(k, envelope::key_followup_batch(at(minute + 1, s1), "system", t3, t7));
        prop_assert_ne!(k, envelope::key_followup_batch(at(minute, s1), "manager-de", t3, t7));
        prop_assert_ne!(k, envelope::key_followup_batch(at(minute, s1), "system", t3 + 1, t7));
        prop_assert_ne!(k, envelope::key_followup_batch(at(minute, s1), "system", t3, t7 + 1));
    }

    #[test]
    fn the_config_loader_answers_any_value_of_any_key_with_settings_or_an_error_naming_it(
        key in prop::sample::select(Settings::documented_keys().map(|(k, _, _)| k).collect::<Vec<_>>()),
        value in prop_oneof![".{0,30}", any::<i64>().prop_map(|n| n.to_string()), Just("true".to_string()), Just(String::new())],
    ) {
        let env = HashMap::from([(freshplan::config::env_name(key), value.clone())]);
        match Settings::load_with(None, |k| env.get(k).cloned()) {
            Ok(_) => {}
            Err(e) => {
                let text = e.to_string();
                prop_assert!(text.contains(key), "`{}` = {:?}: {}", key, value, text);
            }
        }
    }

    #[test]
    fn a_config_file_of_arbitrary_text_is_loaded_or_refused_with_a_message(text in ".{0,200}") {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("freshplan.toml");
        std::fs::write(&path, &text).unwrap();
        if let Err(e) = Settings::load_with(Some(&path), |_| None) {
            prop_assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn last_event_id_is_a_position_exactly_when_the_text_is_an_integer(value in ".{0,30}", n in any::<i64>()) {
        prop_assert_eq!(parse_last_event_id(&value), value.trim().parse::<i64>().ok());
        prop_assert_eq!(parse_last_event_id(&format!(" {n}\t")), Some(n));
    }
}

#[test]
fn the_last_event_id_corpus_is_refused() {
    let mut seen = HashSet::new();
    for line in corpus("last-event-id") {
        assert_eq!(parse_last_event_id(&line), None, "{line:?}");
        seen.insert(line);
    }
    assert!(seen.len() >= 10);
}
