//! From records to figures: which committed events every subscriber in their audience received
//! (lost, duplicated), end to end latency per subscriber, API latency per command kind.

use std::collections::{BTreeMap, HashMap};

use hdrhistogram::Histogram;

use super::driver::{Kind, WriteRecord};
use super::setup::Committed;
use super::stats::{histogram, record};
use super::stream::Seen;
use crate::events::hub::in_audience;
use crate::identity::Principal;

/// Delivery of the committed events of one phase.
#[derive(Debug)]
pub struct Delivery {
    /// Events committed in the phase's range (the tool's and anybody else's).
    pub committed: u64,
    /// (event, subscriber in its audience) pairs.
    pub expected: u64,
    pub delivered: u64,
    /// Pairs never received.
    pub lost: u64,
    /// Extra frames of an event one subscriber had already received.
    pub duplicates: u64,
    /// The first few lost pairs, readable.
    pub lost_examples: Vec<String>,
    /// Intended start of the command → frame received, per subscriber in the audience.
    pub e2e: Histogram<u64>,
    /// The same by the subscriber's role.
    pub e2e_by_role: BTreeMap<String, Histogram<u64>>,
    /// `(intended start, e2e µs)` for the timeline.
    pub e2e_samples: Vec<(u64, u64)>,
    /// Successful commands whose position is not among the committed events read back
    /// (should be 0: every answered write is committed).
    pub unmatched_writes: u64,
}

/// Compares what was committed with what each subscriber received.
pub fn deliveries(
    committed: &[Committed],
    subscribers: &[(&Principal, &Seen)],
    writes: &[WriteRecord],
) -> Delivery {
    let mut d = Delivery {
        committed: committed.len() as u64,
        expected: 0,
        delivered: 0,
        lost: 0,
        duplicates: 0,
        lost_examples: Vec::new(),
        e2e: histogram(),
        e2e_by_role: BTreeMap::new(),
        e2e_samples: Vec::new(),
        unmatched_writes: 0,
    };
    for ev in committed {
        for (p, seen) in subscribers {
            if !in_audience(p, &ev.audience) {
                continue;
            }
            d.expected += 1;
            match seen.keys.get(&ev.key) {
                Some(r) => {
                    d.delivered += 1;
                    d.duplicates += u64::from(r.count.saturating_sub(1));
                }
                None => {
                    d.lost += 1;
                    if d.lost_examples.len() < 20 {
                        d.lost_examples.push(format!(
                            "{} (position {}, key {}) never reached {}",
                            ev.event_type, ev.position, ev.key, p.user_id
                        ));
                    }
                }
            }
        }
    }
    let by_position: HashMap<i64, &Committed> = committed.iter().map(|c| (c.position, c)).collect();
    for w in writes {
        let Ok(position) = w.result else { continue };
        let Some(ev) = by_position.get(&position) else {
            d.unmatched_writes += 1;
            continue;
        };
        for (p, seen) in subscribers {
            if !in_audience(p, &ev.audience) {
                continue;
            }
            if let Some(r) = seen.keys.get(&ev.key) {
                let e2e = r.first_us.saturating_sub(w.intended_us);
                record(&mut d.e2e, e2e);
                record(
                    d.e2e_by_role
                        .entry(p.role.as_str().to_string())
                        .or_insert_with(histogram),
                    e2e,
                );
                d.e2e_samples.push((w.intended_us, e2e));
            }
        }
    }
    d
}

/// True once every subscriber received every committed event of its audience.
pub fn all_delivered(committed: &[Committed], subscribers: &[(&Principal, &Seen)]) -> bool {
    committed.iter().all(|ev| {
        subscribers
            .iter()
            .all(|(p, seen)| !in_audience(p, &ev.audience) || seen.keys.contains_key(&ev.key))
    })
}

/// API latency (intended start → answer read) of successful commands, per kind and overall.
pub fn api_latency(writes: &[WriteRecord]) -> BTreeMap<String, Histogram<u64>> {
    let mut out: BTreeMap<String, Histogram<u64>> = BTreeMap::new();
    for w in writes.iter().filter(|w| w.result.is_ok()) {
        let us = w.done_us.saturating_sub(w.intended_us);
        for name in [w.kind.as_str(), "all"] {
            record(out.entry(name.to_string()).or_insert_with(histogram), us);
        }
    }
    out
}

/// Failed commands by kind, HTTP status and problem.
pub fn failures(writes: &[WriteRecord]) -> Vec<(String, u64)> {
    let mut out: BTreeMap<String, u64> = BTreeMap::new();
    for w in writes {
        if let Err(f) = &w.result {
            *out.entry(format!(
                "{} HTTP {} {}",
                w.kind.as_str(),
                f.status,
                f.problem
            ))
            .or_default() += 1;
        }
    }
    out.into_iter().collect()
}

/// Commands sent per kind.
pub fn sent_by_kind(writes: &[WriteRecord]) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for k in Kind::ALL {
        out.insert(
            k.as_str().to_string(),
            writes.iter().filter(|w| w.kind == k).count() as u64,
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::envelope::Audience;
    use crate::identity::Role;
    use crate::loadtest::stream::Received;
    use crate::territory::Territory;
    use uuid::Uuid;

    fn p(id: &str, role: Role, t: Territory) -> Principal {
        Principal {
            user_id: id.into(),
            name: id.into(),
            role,
            territory: t,
        }
    }

    fn ev(position: i64, owner: &str, t: Territory) -> Committed {
        Committed {
            position,
            key: Uuid::new_v4(),
            event_type: "dashboard.activity_logged".into(),
            created_unix_us: 0,
            audience: Audience {
                territory: t,
                owner: Some(owner.into()),
                collaborators: vec![],
            },
        }
    }

    #[test]
    fn an_event_missing_at_one_audience_member_is_lost_and_a_second_frame_is_a_duplicate() {
        let admin = p("a", Role::Admin, Territory::DE);
        let manager_at = p("m", Role::Manager, Territory::AT);
        let owner = p("s1", Role::Sales, Territory::DE);
        let e1 = ev(1, "s1", Territory::DE);
        let e2 = ev(2, "s2", Territory::DE);
        let got = |evs: &[(&Committed, u32)]| Seen {
            keys: evs
                .iter()
                .map(|(e, count)| {
                    (
                        e.key,
                        Received {
                            position: e.position,
                            first_us: 5_000,
                            count: *count,
                        },
                    )
                })
                .collect(),
            ..Seen::default()
        };
        let admin_seen = got(&[(&e1, 1), (&e2, 2)]);
        let manager_seen = got(&[]);
        let owner_seen = got(&[]);
        let subs = [
            (&admin, &admin_seen),
            (&manager_at, &manager_seen),
            (&owner, &owner_seen),
        ];
        let committed = [e1, e2];
        let writes = [WriteRecord {
            kind: Kind::Activity,
            intended_us: 1_000,
            done_us: 2_000,
            result: Ok(1),
            retries: 0,
        }];
        let d = deliveries(&committed, &subs, &writes);
        assert_eq!(
            d.expected, 3,
            "admin twice, the DE owner of e1 once, the AT manager never"
        );
        assert_eq!(d.delivered, 2);
        assert_eq!(d.lost, 1);
        assert!(d.lost_examples[0].contains("s1"));
        assert_eq!(d.duplicates, 1);
        assert_eq!(d.e2e.len(), 1, "the admin's frame of the tool's own write");
        assert!(
            (3_990..=4_010).contains(&d.e2e.max()),
            "from the intended start"
        );
        assert!(!all_delivered(&committed, &subs));
        assert_eq!(api_latency(&writes)["all"].len(), 1);
    }
}
