//! Demo data (`freshplan seed --demo`, `serve --demo`): users of every role and territory and a
//! few thousand leads of all ages, statuses and types, with activities and collaborators.
//! Deterministic ids make it idempotent: running it again inserts nothing new.

use chrono::{DateTime, Duration, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sqlx::PgPool;
use uuid::Uuid;

use crate::db;
use crate::identity::{Principal, Role};
use crate::leads::domain::{ActivityType, BusinessType, LeadSource, LeadStatus};
use crate::leads::model::{NewActivity, PatchLead};
use crate::leads::service::LeadService;
use crate::pii::{normalize_email, normalize_phone, PiiField, Vault};
use crate::territory::Territory;

/// Demo users: (id, name, role, territory).
pub const USERS: &[(&str, &str, Role, Territory)] = &[
    ("admin", "Anna Admin", Role::Admin, Territory::DE),
    (
        "manager-de",
        "Markus Manager (DE)",
        Role::Manager,
        Territory::DE,
    ),
    (
        "manager-at",
        "Maria Managerin (AT)",
        Role::Manager,
        Territory::AT,
    ),
    (
        "manager-ch",
        "Marco Manager (CH)",
        Role::Manager,
        Territory::CH,
    ),
    (
        "sales-de-1",
        "Sabine Vertrieb (DE 1)",
        Role::Sales,
        Territory::DE,
    ),
    (
        "sales-de-2",
        "Stefan Vertrieb (DE 2)",
        Role::Sales,
        Territory::DE,
    ),
    (
        "sales-at-1",
        "Sophie Vertrieb (AT 1)",
        Role::Sales,
        Territory::AT,
    ),
    (
        "sales-at-2",
        "Simon Vertrieb (AT 2)",
        Role::Sales,
        Territory::AT,
    ),
    (
        "sales-ch-1",
        "Selina Vertrieb (CH 1)",
        Role::Sales,
        Territory::CH,
    ),
    (
        "sales-ch-2",
        "Samuel Vertrieb (CH 2)",
        Role::Sales,
        Territory::CH,
    ),
    ("viewer-de", "Vera Viewer (DE)", Role::Viewer, Territory::DE),
];

/// The demo principal with this id.
pub fn principal(id: &str) -> Option<Principal> {
    USERS
        .iter()
        .find(|u| u.0 == id)
        .map(|(id, name, role, territory)| Principal {
            user_id: id.to_string(),
            name: name.to_string(),
            role: *role,
            territory: *territory,
        })
}

const SEED_NAMESPACE: Uuid = uuid::uuid!("5b0f3c1e-8f0a-4d7e-9a51-3c2b1d0e9f47");

const COMPANY_WORDS: &[&str] = &[
    "Sonne",
    "Linde",
    "Adler",
    "Krone",
    "Hirsch",
    "Post",
    "Rose",
    "Bergblick",
    "Seeblick",
    "Eiche",
    "Stern",
    "Mühle",
    "Alpenrose",
    "Löwen",
    "Traube",
    "Schwan",
    "Anker",
    "Bären",
    "Rössli",
    "Falken",
];
const FIRST: &[&str] = &[
    "Anna", "Lukas", "Mia", "Felix", "Lea", "Jonas", "Emma", "Paul", "Laura", "Max",
];
const LAST: &[&str] = &[
    "Schmidt", "Müller", "Weber", "Huber", "Meier", "Wagner", "Gruber", "Keller", "Fischer",
    "Brunner",
];
const CITIES: &[(&str, Territory)] = &[
    ("München", Territory::DE),
    ("Berlin", Territory::DE),
    ("Hamburg", Territory::DE),
    ("Köln", Territory::DE),
    ("Wien", Territory::AT),
    ("Graz", Territory::AT),
    ("Salzburg", Territory::AT),
    ("Zürich", Territory::CH),
    ("Bern", Territory::CH),
    ("Basel", Territory::CH),
];

fn prefix(bt: BusinessType) -> &'static str {
    match bt {
        BusinessType::Restaurant => "Restaurant",
        BusinessType::Hotel => "Hotel",
        BusinessType::Catering => "Catering",
        BusinessType::Kantine => "Betriebskantine",
        BusinessType::Grosshandel => "Großhandel",
        BusinessType::Leh => "Markt",
        BusinessType::Bildung => "Mensa",
        BusinessType::Gesundheit => "Klinikküche",
        BusinessType::Sonstiges => "Gastro",
    }
}

/// What `seed` did.
#[derive(Debug, Default, Clone, Copy)]
pub struct SeedReport {
    pub users: u64,
    pub leads: u64,
    pub activities: u64,
}

fn pick<T: Copy>(rng: &mut StdRng, items: &[T]) -> T {
    items[rng.gen_range(0..items.len())]
}

fn weighted_status(rng: &mut StdRng, age_days: i64) -> LeadStatus {
    use LeadStatus::*;
    if age_days < 2 {
        return if rng.gen_bool(0.5) {
            Registered
        } else {
            Active
        };
    }
    let table = [
        (Active, 35),
        (Registered, 12),
        (Reminder, 8),
        (GracePeriod, 4),
        (Qualified, 12),
        (Converted, 10),
        (Lost, 8),
        (Expired, 8),
        (Deleted, 3),
    ];
    let total: u32 = table.iter().map(|t| t.1).sum();
    let mut n = rng.gen_range(0..total);
    for (s, w) in table {
        if n < w {
            return s;
        }
        n -= w;
    }
    Active
}

/// Inserts the demo users and `leads` demo leads (idempotent).
pub async fn seed(pool: &PgPool, vault: &Vault, leads: usize) -> anyhow::Result<SeedReport> {
    let system = Principal::system();
    let mut report = SeedReport::default();
    let mut tx = db::begin_as(pool, &system).await?;
    for (id, name, role, territory) in USERS {
        report.users += sqlx::query(
            "INSERT INTO users (id, name, role, territory) VALUES ($1, $2, $3, $4) ON CONFLICT (id) DO NOTHING",
        )
        .bind(id)
        .bind(name)
        .bind(role.as_str())
        .bind(territory.code())
        .execute(&mut *tx)
        .await?
        .rows_affected();
    }
    tx.commit().await?;

    let mut rng = StdRng::seed_from_u64(20261128);
    let now = Utc::now();
    let sales: Vec<&(&str, &str, Role, Territory)> =
        USERS.iter().filter(|u| u.2 == Role::Sales).collect();
    for chunk_start in (0..leads).step_by(500) {
        let chunk = chunk_start..(chunk_start + 500).min(leads);
        let mut l = LeadColumns::default();
        let mut a = ActivityColumns::default();
        for i in chunk {
            let territory = match i % 4 {
                0 | 1 => Territory::DE,
                2 => Territory::AT,
                _ => Territory::CH,
            };
            let team: Vec<_> = sales.iter().filter(|u| u.3 == territory).collect();
            let owner = pick(&mut rng, &team).0;
            let id = Uuid::new_v5(&SEED_NAMESPACE, format!("lead-{i}").as_bytes());
            let bt = pick(&mut rng, BusinessType::ALL);
            let age_minutes = rng.gen_range(10..60 * 24 * 60);
            let registered = now - Duration::minutes(age_minutes);
            let age_days = age_minutes / (24 * 60);
            let status = weighted_status(&mut rng, age_days);
            let followed = matches!(
                status,
                LeadStatus::Active
                    | LeadStatus::Reminder
                    | LeadStatus::GracePeriod
                    | LeadStatus::Qualified
                    | LeadStatus::Converted
                    | LeadStatus::Lost
            );
            let t3 = (followed && age_days >= 3 && rng.gen_bool(0.7))
                .then(|| registered + Duration::days(3) + Duration::hours(2));
            let t7 = (t3.is_some() && age_days >= 7 && rng.gen_bool(0.6))
                .then(|| registered + Duration::days(7) + Duration::hours(2));
            let first = pick(&mut rng, FIRST);
            let last = pick(&mut rng, LAST);
            let email = normalize_email(&format!(
                "{}.{}.{i}@example.com",
                first.to_lowercase(),
                last.to_lowercase()
            ))
            .map_err(anyhow::Error::msg)?;
            let phone = format!(
                "0{} {}",
                rng.gen_range(30..999),
                rng.gen_range(100_000..9_999_999)
            );
            let phone_e164 = normalize_phone(&phone, territory).map_err(anyhow::Error::msg)?;
            let city_pool: Vec<_> = CITIES.iter().filter(|c| c.1 == territory).collect();
            let collaborators: Vec<String> = if rng.gen_bool(0.2) {
                team.iter()
                    .map(|u| u.0.to_string())
                    .filter(|u| u != owner)
                    .take(1)
                    .collect()
            } else {
                Vec::new()
            };
            let updated = now - Duration::minutes(rng.gen_range(1..age_minutes.max(2)));
            l.id.push(id);
            l.company.push(format!(
                "{} {} {}",
                prefix(bt),
                pick(&mut rng, COMPANY_WORDS),
                pick(&mut rng, &["GmbH", "KG", "AG", "& Co."])
            ));
            l.contact
                .push(vault.seal(id, PiiField::ContactPerson, &format!("{first} {last}")));
            l.email_hash
                .push(vault.lookup_hash(PiiField::Email, &email));
            l.email.push(vault.seal(id, PiiField::Email, &email));
            l.phone_hash
                .push(vault.lookup_hash(PiiField::Phone, &phone_e164));
            l.phone.push(vault.seal(id, PiiField::Phone, &phone));
            l.city.push(pick(&mut rng, &city_pool).0.to_string());
            l.territory.push(territory.code().to_string());
            l.business_type.push(bt.as_str().to_string());
            l.source
                .push(pick(&mut rng, LeadSource::ALL).as_str().to_string());
            l.owner.push(owner.to_string());
            l.collaborators.push(collaborators.join(","));
            l.status.push(status.as_str().to_string());
            l.consent.push(rng.gen_bool(0.85));
            l.blocked.push(rng.gen_bool(0.03));
            l.registered.push(registered);
            l.t3.push(t3);
            l.t7.push(t7);
            l.updated.push(updated);
            let mut last_activity = registered;
            for k in 0..rng.gen_range(0..5) {
                let kind = pick(
                    &mut rng,
                    &[
                        ActivityType::Call,
                        ActivityType::Email,
                        ActivityType::Note,
                        ActivityType::Meeting,
                        ActivityType::SampleSent,
                        ActivityType::EmailReceived,
                        ActivityType::Demo,
                    ],
                );
                let at = registered + Duration::minutes(rng.gen_range(1..age_minutes.max(2)));
                last_activity = last_activity.max(at);
                a.id.push(Uuid::new_v5(
                    &SEED_NAMESPACE,
                    format!("activity-{i}-{k}").as_bytes(),
                ));
                a.lead.push(id);
                a.kind.push(kind.as_str().to_string());
                a.meaningful.push(kind.is_meaningful());
                a.at.push(at);
                a.user.push(owner.to_string());
            }
            l.last_activity.push(last_activity);
        }
        let mut tx = db::begin_as(pool, &system).await?;
        report.leads += l.insert(&mut tx, vault.active_key_id()).await?;
        report.activities += a.insert(&mut tx).await?;
        // The T+3/T+7 mails these leads already got, as the follow-up job records them.
        sqlx::query(
            "INSERT INTO followups (id, lead_id, followup_type, status, territory, owner_user_id, attempts, queued_at, sent_at) \
             SELECT gen_random_uuid(), id, t, 'SENT', territory, owner_user_id, 1, at, at \
             FROM leads, LATERAL (VALUES ('T3', t3_sent_at), ('T7', t7_sent_at)) AS f(t, at) \
             WHERE id = ANY($1) AND at IS NOT NULL \
             ON CONFLICT (lead_id, followup_type) DO NOTHING",
        )
        .bind(&l.id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
    }
    if report.leads > 0 {
        let mut tx = db::begin_as(pool, &system).await?;
        sqlx::query(
            "INSERT INTO audit_log (actor_user_id, actor_role, action, entity_type, entity_id, details) \
             VALUES ('system', 'system', 'DEMO_SEEDED', 'lead', 'demo', jsonb_build_object('leads', $1::bigint))",
        )
        .bind(report.leads as i64)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
    }
    Ok(report)
}

#[derive(Default)]
struct LeadColumns {
    id: Vec<Uuid>,
    company: Vec<String>,
    contact: Vec<Vec<u8>>,
    email: Vec<Vec<u8>>,
    phone: Vec<Vec<u8>>,
    email_hash: Vec<Vec<u8>>,
    phone_hash: Vec<Vec<u8>>,
    city: Vec<String>,
    territory: Vec<String>,
    business_type: Vec<String>,
    source: Vec<String>,
    owner: Vec<String>,
    collaborators: Vec<String>,
    status: Vec<String>,
    consent: Vec<bool>,
    blocked: Vec<bool>,
    registered: Vec<DateTime<Utc>>,
    last_activity: Vec<DateTime<Utc>>,
    t3: Vec<Option<DateTime<Utc>>>,
    t7: Vec<Option<DateTime<Utc>>>,
    updated: Vec<DateTime<Utc>>,
}

impl LeadColumns {
    async fn insert(&self, tx: &mut db::Tx, key_id: &str) -> anyhow::Result<u64> {
        Ok(sqlx::query(
            "INSERT INTO leads (id, company_name, contact_person_ct, email_ct, phone_ct, pii_key_id, email_hash, \
               phone_hash, city, territory, business_type, source, owner_user_id, collaborators, status, \
               email_consent, contact_blocked, registered_at, last_activity_at, t3_sent_at, t7_sent_at, \
               created_at, updated_at, created_by, updated_by) \
             SELECT id, company, contact, email, phone, $21, email_hash, phone_hash, city, territory, bt, src, \
               owner, COALESCE(string_to_array(NULLIF(collab, ''), ','), '{}'), status, consent, blocked, registered, last_activity, \
               t3, t7, registered, updated, owner, owner \
             FROM unnest($1::uuid[], $2::text[], $3::bytea[], $4::bytea[], $5::bytea[], $6::bytea[], $7::bytea[], \
               $8::text[], $9::text[], $10::text[], $11::text[], $12::text[], $13::text[], $14::text[], $15::bool[], \
               $16::bool[], $17::timestamptz[], $18::timestamptz[], $19::timestamptz[], $20::timestamptz[], $22::timestamptz[]) \
               AS v(id, company, contact, email, phone, email_hash, phone_hash, city, territory, bt, src, owner, collab, \
                    status, consent, blocked, registered, last_activity, t3, t7, updated) \
             ON CONFLICT DO NOTHING",
        )
        .bind(&self.id)
        .bind(&self.company)
        .bind(&self.contact)
        .bind(&self.email)
        .bind(&self.phone)
        .bind(&self.email_hash)
        .bind(&self.phone_hash)
        .bind(&self.city)
        .bind(&self.territory)
        .bind(&self.business_type)
        .bind(&self.source)
        .bind(&self.owner)
        .bind(&self.collaborators)
        .bind(&self.status)
        .bind(&self.consent)
        .bind(&self.blocked)
        .bind(&self.registered)
        .bind(&self.last_activity)
        .bind(&self.t3)
        .bind(&self.t7)
        .bind(key_id)
        .bind(&self.updated)
        .execute(&mut **tx)
        .await?
        .rows_affected())
    }
}

#[derive(Default)]
struct ActivityColumns {
    id: Vec<Uuid>,
    lead: Vec<Uuid>,
    kind: Vec<String>,
    meaningful: Vec<bool>,
    at: Vec<DateTime<Utc>>,
    user: Vec<String>,
}

impl ActivityColumns {
    async fn insert(&self, tx: &mut db::Tx) -> anyhow::Result<u64> {
        Ok(sqlx::query(
            "INSERT INTO lead_activities (id, lead_id, activity_type, meaningful, occurred_at, user_id) \
             SELECT v.id, v.lead, v.kind, v.meaningful, v.at, v.usr \
             FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::bool[], $5::timestamptz[], $6::text[]) \
               AS v(id, lead, kind, meaningful, at, usr) \
             JOIN leads l ON l.id = v.lead \
             ON CONFLICT DO NOTHING",
        )
        .bind(&self.id)
        .bind(&self.lead)
        .bind(&self.kind)
        .bind(&self.meaningful)
        .bind(&self.at)
        .bind(&self.user)
        .execute(&mut **tx)
        .await?
        .rows_affected())
    }
}

/// Keeps the demo moving: every few seconds a demo sales user logs an activity on one of their
/// leads, or moves a fresh lead on, through the leads service the API uses (events included).
pub fn spawn_live_activity(leads: LeadService) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut rng = StdRng::from_entropy();
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(3));
        loop {
            tick.tick().await;
            if let Err(e) = live_step(&leads, &mut rng).await {
                tracing::debug!(error = %e, "demo activity skipped");
            }
        }
    })
}

/// One step of the demo's life: a random demo sales user moves a registered lead on or logs an
/// activity on one of their open leads. Returns what it did (`None` when the user had no lead).
pub async fn live_step(
    leads: &LeadService,
    rng: &mut StdRng,
) -> Result<Option<&'static str>, crate::error::ApiError> {
    let (id, ..) = pick(rng, &USERS[4..10]);
    let Some(p) = principal(id) else {
        return Ok(None);
    };
    let mut tx = db::begin_as(&leads.pool, &p).await?;
    let lead: Option<(Uuid, LeadStatus, i64)> = sqlx::query_as(
        "SELECT id, status, version FROM leads WHERE owner_user_id = $1 \
         AND status IN ('REGISTERED', 'ACTIVE', 'REMINDER') ORDER BY random() LIMIT 1",
    )
    .bind(&p.user_id)
    .fetch_optional(&mut *tx)
    .await?;
    tx.commit().await?;
    let Some((lead, status, version)) = lead else {
        return Ok(None);
    };
    if status == LeadStatus::Registered && rng.gen_bool(0.3) {
        let body = PatchLead {
            status: Some(LeadStatus::Active),
            ..Default::default()
        };
        leads.patch(&p, lead, version, body).await?;
        return Ok(Some("status"));
    }
    let kind = pick(
        rng,
        &[
            ActivityType::Call,
            ActivityType::Email,
            ActivityType::Meeting,
            ActivityType::EmailReceived,
            ActivityType::Note,
        ],
    );
    let body = NewActivity {
        activity_type: kind,
        description: None,
        occurred_at: None,
        outcome: None,
    };
    leads.add_activity(&p, lead, body).await?;
    Ok(Some("activity"))
}
