//! The 100,000-lead data set of the benchmarks (`cargo bench --bench widget`, `--bench leads`):
//! demo users plus 9 more salespeople per territory, leads over 180 days, activities and
//! follow-ups, loaded as the superuser with a few `INSERT … SELECT generate_series` statements
//! (the triggers of migration 0002 keep the roll-ups exact).
#![allow(dead_code)]

use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::Context;
use freshplan::pii::Vault;
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, Executor, PgConnection, PgPool};

pub const LEADS: i64 = 100_000;
/// Sales users per territory: the 2 demo ones plus `EXTRA_SALES` more (≈3,000 leads each).
pub const EXTRA_SALES: i64 = 9;

// ---- Data set --------------------------------------------------------------------------

/// One row per lead with every random draw, all timestamps from one `now()`. Statuses depend
/// on the lead's age (leads are registered over 180 days; ACTIVE only in the first 30 days,
/// later REMINDER / GRACE_PERIOD / … / EXPIRED). T+3 / T+7 mails exist for the last 30 days
/// (when the follow-up job's records start): to leads with consent, not blocked, clock
/// running, past REGISTERED; 93 % SENT, 7 % FAILED (then the lead is pending again).
pub const GEN_LEADS: &str = r#"
CREATE TEMP TABLE g AS
WITH clock AS (SELECT now() AS now),
draw AS (
    SELECT i, (ARRAY['DE', 'AT', 'CH'])[1 + i % 3] AS territory,
           1 + (i / 3) % $2 AS owner_n,
           random() * 180 AS age_days, random() AS r_status, random() AS r_collab,
           random() AS r_consent, random() AS r_blocked, random() AS r_clock,
           random() AS r_t3, random() AS r_t7, random() AS d3, random() AS d7
    FROM generate_series(1, $1) i
),
lead AS (
    SELECT d.*, clock.now,
           md5('lead-' || i)::uuid AS id,
           format('sales-%s-%s', lower(territory), owner_n) AS owner,
           CASE WHEN r_collab < 0.15
                THEN ARRAY[format('sales-%s-%s', lower(territory), 1 + owner_n % $2)]
                ELSE '{}'::text[] END AS collaborators,
           clock.now - age_days * interval '1 day' AS registered_at,
           CASE WHEN age_days < 3 THEN
                    CASE WHEN r_status < 0.4 THEN 'REGISTERED' ELSE 'ACTIVE' END
                WHEN age_days < 30 THEN
                    CASE WHEN r_status < 0.55 THEN 'ACTIVE' WHEN r_status < 0.60 THEN 'REGISTERED'
                         WHEN r_status < 0.66 THEN 'REMINDER' WHEN r_status < 0.69 THEN 'GRACE_PERIOD'
                         WHEN r_status < 0.84 THEN 'QUALIFIED' WHEN r_status < 0.90 THEN 'CONVERTED'
                         WHEN r_status < 0.96 THEN 'LOST' ELSE 'DELETED' END
                ELSE
                    CASE WHEN r_status < 0.12 THEN 'REMINDER' WHEN r_status < 0.17 THEN 'GRACE_PERIOD'
                         WHEN r_status < 0.33 THEN 'QUALIFIED' WHEN r_status < 0.47 THEN 'CONVERTED'
                         WHEN r_status < 0.61 THEN 'LOST' WHEN r_status < 0.97 THEN 'EXPIRED'
                         ELSE 'DELETED' END
           END AS status,
           r_consent < 0.55 AS email_consent,
           r_blocked < 0.02 AS contact_blocked,
           r_clock < 0.03 AS clock_stopped
    FROM draw d CROSS JOIN clock
),
mail AS (
    SELECT l.*,
           email_consent AND NOT contact_blocked AND NOT clock_stopped AND status <> 'REGISTERED' AS mailable,
           registered_at + interval '72 hours' AS t3_due,
           registered_at + interval '72 hours' + d3 * interval '20 minutes' AS t3_at,
           registered_at + interval '168 hours' AS t7_due,
           registered_at + interval '168 hours' + d7 * interval '20 minutes' AS t7_at
    FROM lead l
),
t3 AS (
    SELECT m.*,
           CASE WHEN mailable AND t3_at >= now - interval '30 days' AND t3_at < now
                THEN CASE WHEN r_t3 < 0.93 THEN 'SENT' ELSE 'FAILED' END END AS t3_state
    FROM mail m
)
SELECT t3.*,
       CASE WHEN t3_state = 'SENT' AND t7_at < now
            THEN CASE WHEN r_t7 < 0.93 THEN 'SENT' ELSE 'FAILED' END END AS t7_state
FROM t3
"#;

/// Five activities per lead within 60 days of its registration (up to now): ordinary ones
/// (about half meaningful, EMAIL_RECEIVED among them) and one STATUS_CHANGE with `new_status`
/// for every lead past REGISTERED.
pub const GEN_ACTIVITIES: &str = r#"
CREATE TEMP TABLE ga AS
SELECT md5('activity-' || g.i || '-' || k)::uuid AS id, g.id AS lead_id, g.owner AS user_id,
       g.registered_at + random() * least(g.age_days, 60) * interval '1 day' AS occurred_at,
       CASE WHEN k = 5 AND g.status <> 'REGISTERED' THEN 'STATUS_CHANGE'
            ELSE (ARRAY['NOTE', 'NOTE', 'NOTE', 'CALL', 'CALL', 'CALL', 'EMAIL', 'EMAIL',
                        'EMAIL_RECEIVED', 'EMAIL_RECEIVED', 'FOLLOW_UP', 'MEETING', 'DEMO',
                        'SAMPLE_SENT', 'QUALIFIED_CALL'])[1 + floor(random() * 15)::int] END AS activity_type,
       CASE WHEN k = 5 AND g.status <> 'REGISTERED' THEN g.status END AS new_status,
       CASE WHEN k = 5 AND g.status <> 'REGISTERED'
            THEN CASE WHEN g.status = 'ACTIVE' THEN 'REGISTERED → ACTIVE' ELSE 'ACTIVE → ' || g.status END
            ELSE 'Kontakt ' || k END AS description
FROM g CROSS JOIN generate_series(1, 5) k
"#;

pub const INSERT_LEADS: &str = r#"
INSERT INTO leads (id, company_name, contact_person_ct, email_ct, phone_ct, pii_key_id, email_hash,
                   phone_hash, city, territory, business_type, source, owner_user_id, collaborators,
                   status, email_consent, contact_blocked, clock_stopped, registered_at,
                   last_activity_at, t3_sent_at, t7_sent_at, version, created_at, updated_at,
                   created_by, updated_by)
SELECT g.id,
       format('%s %s %s', (ARRAY['Restaurant', 'Hotel', 'Catering', 'Betriebskantine', 'Großhandel',
                                 'Markt', 'Mensa', 'Klinikküche', 'Gastro'])[1 + g.i % 9],
              (ARRAY['Sonne', 'Linde', 'Adler', 'Krone', 'Hirsch', 'Post', 'Rose', 'Bergblick',
                     'Seeblick', 'Eiche', 'Stern', 'Mühle', 'Alpenrose', 'Löwen', 'Traube',
                     'Schwan', 'Anker', 'Bären', 'Rössli', 'Falken'])[1 + (g.i / 9) % 20], g.i),
       decode(md5('c1' || g.i) || md5('c2' || g.i) || md5('c3' || g.i), 'hex'),
       decode(md5('e1' || g.i) || md5('e2' || g.i) || md5('e3' || g.i), 'hex'),
       decode(md5('p1' || g.i) || md5('p2' || g.i) || md5('p3' || g.i), 'hex'),
       'k1', sha256(('e' || g.i)::bytea), sha256(('p' || g.i)::bytea),
       CASE g.territory WHEN 'DE' THEN (ARRAY['München', 'Berlin', 'Hamburg', 'Köln'])[1 + g.i % 4]
                        WHEN 'AT' THEN (ARRAY['Wien', 'Graz', 'Salzburg'])[1 + g.i % 3]
                        ELSE (ARRAY['Zürich', 'Bern', 'Basel'])[1 + g.i % 3] END,
       g.territory,
       (ARRAY['RESTAURANT', 'HOTEL', 'CATERING', 'KANTINE', 'GROSSHANDEL', 'LEH', 'BILDUNG',
              'GESUNDHEIT', 'SONSTIGES'])[1 + g.i % 9],
       (ARRAY['MESSE', 'EMPFEHLUNG', 'TELEFON', 'WEB_FORMULAR', 'PARTNER', 'SONSTIGES'])[1 + (g.i / 7) % 6],
       g.owner, g.collaborators, g.status, g.email_consent, g.contact_blocked, g.clock_stopped,
       g.registered_at, a.last_at,
       CASE WHEN g.t3_state = 'SENT' THEN g.t3_at END,
       CASE WHEN g.t7_state = 'SENT' THEN g.t7_at END,
       1 + (g.status <> 'REGISTERED')::int, g.registered_at, greatest(a.last_at, g.registered_at),
       g.owner, g.owner
FROM g JOIN (SELECT lead_id, max(occurred_at) AS last_at FROM ga GROUP BY 1) a ON a.lead_id = g.id
ORDER BY g.registered_at
"#;

pub const INSERT_ACTIVITIES: &str = r#"
INSERT INTO lead_activities (id, lead_id, activity_type, meaningful, description, outcome,
                             occurred_at, user_id, created_at, new_status)
SELECT id, lead_id, activity_type,
       activity_type IN ('QUALIFIED_CALL', 'MEETING', 'DEMO', 'ROI_PRESENTATION', 'SAMPLE_SENT',
                         'EMAIL', 'CALL', 'ORDER'),
       description, NULL, occurred_at, user_id, occurred_at, new_status
FROM ga
ORDER BY occurred_at
"#;

pub const INSERT_FOLLOWUPS: &str = r#"
INSERT INTO followups (id, lead_id, followup_type, status, territory, owner_user_id, attempts,
                       queued_at, sent_at, failed_at, last_error, template)
SELECT md5('followup-' || g.i || '-' || f.t)::uuid, g.id, f.t, f.state, g.territory, g.owner,
       CASE WHEN f.state = 'SENT' THEN 1 ELSE 3 END, f.due,
       CASE WHEN f.state = 'SENT' THEN f.at END,
       CASE WHEN f.state = 'FAILED' THEN f.at END,
       CASE WHEN f.state = 'FAILED' THEN 'smtp-550' END,
       lower(f.t) || '-' || lower(g.territory)
FROM g CROSS JOIN LATERAL (VALUES ('T3', g.t3_state, g.t3_due, g.t3_at),
                                  ('T7', g.t7_state, g.t7_due, g.t7_at)) AS f(t, state, due, at)
WHERE f.state IS NOT NULL
ORDER BY f.at
"#;

/// Timings of the load.
#[derive(Default)]
pub struct Load {
    pub migrate: Duration,
    pub users: Duration,
    pub generate: Duration,
    pub leads: Duration,
    pub activities: Duration,
    pub followups: Duration,
    pub vacuum: Duration,
}

impl Load {
    pub fn inserts(&self) -> Duration {
        self.users + self.generate + self.leads + self.activities + self.followups
    }
}

pub async fn timed<F: std::future::Future<Output = anyhow::Result<()>>>(
    slot: &mut Duration,
    f: F,
) -> anyhow::Result<()> {
    let start = Instant::now();
    f.await?;
    *slot = start.elapsed();
    Ok(())
}

pub async fn load(pool: &PgPool, su: &mut PgConnection, load: &mut Load) -> anyhow::Result<()> {
    let vault = Vault::new(vec![("k1".into(), vec![7; 32])], "k1", vec![9; 32])?;
    timed(&mut load.users, async {
        freshplan::demo::seed(pool, &vault, 0).await?;
        sqlx::query(
            "INSERT INTO users (id, name, role, territory) \
             SELECT format('sales-%s-%s', lower(t), n), format('Vertrieb %s %s', t, n), 'sales', t \
             FROM unnest(ARRAY['DE', 'AT', 'CH']) t, generate_series(3, 2 + $1::int) n",
        )
        .bind(EXTRA_SALES as i32)
        .execute(&mut *su)
        .await?;
        Ok(())
    })
    .await?;
    timed(&mut load.generate, async {
        su.execute("SELECT setseed(0.20261203)").await?;
        sqlx::query(GEN_LEADS)
            .bind(LEADS)
            .bind(2 + EXTRA_SALES)
            .execute(&mut *su)
            .await
            .context("generating leads")?;
        su.execute(GEN_ACTIVITIES)
            .await
            .context("generating activities")?;
        Ok(())
    })
    .await?;
    timed(&mut load.leads, async {
        su.execute(INSERT_LEADS).await.context("inserting leads")?;
        Ok(())
    })
    .await?;
    timed(&mut load.activities, async {
        su.execute(INSERT_ACTIVITIES)
            .await
            .context("inserting activities")?;
        Ok(())
    })
    .await?;
    timed(&mut load.followups, async {
        su.execute(INSERT_FOLLOWUPS)
            .await
            .context("inserting follow-ups")?;
        Ok(())
    })
    .await?;
    su.execute("DROP TABLE g; DROP TABLE ga").await?;
    timed(&mut load.vacuum, async {
        // Autovacuum would otherwise visit the freshly loaded tables in the middle of the
        // measurement; the checkpoint flushes the load before the first sample.
        su.execute("VACUUM (ANALYZE)").await?;
        su.execute("CHECKPOINT").await?;
        Ok(())
    })
    .await?;
    Ok(())
}

/// Administrator URL of the PostgreSQL server (the one the tests use).
pub fn admin_url() -> String {
    std::env::var("FRESHPLAN_TEST_ADMIN_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// `user` on database `db` of the same server (as tests/common does).
pub fn db_url(user: &str, db: &str) -> String {
    let admin = admin_url();
    let host = admin
        .split_once('@')
        .map(|(_, h)| h)
        .unwrap_or("127.0.0.1:5432/postgres");
    let host = host.rsplit_once('/').map(|(h, _)| h).unwrap_or(host);
    format!("postgres://{user}@{host}/{db}")
}

pub async fn superuser(db: &str) -> anyhow::Result<PgConnection> {
    let opts = PgConnectOptions::from_str(&admin_url())?.database(db);
    Ok(PgConnection::connect_with(&opts).await?)
}

pub async fn drop_database(db: &str) -> anyhow::Result<()> {
    let mut conn = superuser("postgres").await?;
    conn.execute(format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)").as_str())
        .await?;
    Ok(())
}
