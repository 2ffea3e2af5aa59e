//! Database plumbing: the runtime pool, transactions scoped to a principal, migrations,
//! bootstrap of roles and database, the start-up security check and the embedded cluster.

pub mod bootstrap;
pub mod embedded;

use std::str::FromStr;
use std::time::Duration;

use anyhow::{bail, Context};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres, Transaction};

use crate::identity::{Principal, Role};

/// `statement_timeout` of every transaction opened for a caller (not for the system principal).
pub const REQUEST_STATEMENT_TIMEOUT: &str = "5s";

/// A transaction whose every statement runs under a principal's RLS identity.
pub type Tx = Transaction<'static, Postgres>;

/// Opens the runtime pool (as the application role).
pub async fn connect(url: &str, size: u32, application_name: &str) -> anyhow::Result<PgPool> {
    let options = PgConnectOptions::from_str(url)
        .context("freshplan.database.url is not a valid PostgreSQL URL")?
        .application_name(application_name);
    PgPoolOptions::new()
        .max_connections(size)
        .min_connections(1)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options)
        .await
        .with_context(|| {
            format!(
                "cannot connect to the runtime database ({})",
                redact_url(url)
            )
        })
}

/// A pool of one detached connection that acts as the system principal for its whole session
/// (the listener's and the relay's scan connections, never lent to a caller): a read on it is
/// one statement, with no transaction needed to carry the identity. Transactions on it
/// ([`begin_as`]) still set their own, transaction-local identity.
#[derive(Clone, Debug)]
pub struct SystemPool(PgPool);

impl SystemPool {
    /// Connects one connection with `options` and sets the system identity on its session.
    pub async fn connect(options: PgConnectOptions) -> Result<SystemPool, sqlx::Error> {
        PgPoolOptions::new()
            .max_connections(1)
            .max_lifetime(None)
            .idle_timeout(None)
            .acquire_timeout(Duration::from_secs(5))
            .after_connect(|conn, _| {
                Box::pin(async move {
                    let p = Principal::system();
                    sqlx::query(
                        "SELECT set_config('app.user_id', $1, false), \
                         set_config('app.role', $2, false), set_config('app.territory', $3, false)",
                    )
                    .bind(&p.user_id)
                    .bind(p.role.as_str())
                    .bind(p.territory.code())
                    .execute(conn)
                    .await?;
                    Ok(())
                })
            })
            .connect_with(options)
            .await
            .map(SystemPool)
    }

    /// The pool itself (for transactions, which set their identity themselves).
    pub fn pool(&self) -> &PgPool {
        &self.0
    }

    pub async fn close(&self) {
        self.0.close().await
    }
}

/// Begins a transaction and sets the RLS identity with `set_config(…, true)`, so it is
/// transaction-local and can never leak to the next user of the pooled connection.
///
/// (Sending the identity as `SET LOCAL`s in the BEGIN's own message would save a round trip,
/// but a failed or cancelled message then leaves a transaction open on a connection the pool
/// takes back — sqlx 0.8 only rolls back once the BEGIN has been acknowledged.)
pub async fn begin_as(pool: &PgPool, p: &Principal) -> Result<Tx, sqlx::Error> {
    let mut tx = pool.begin().await?;
    set_identity(&mut tx, p).await?;
    Ok(tx)
}

/// Sets the identity on an open transaction.
pub async fn set_identity(tx: &mut Tx, p: &Principal) -> Result<(), sqlx::Error> {
    // Work on behalf of a caller is bounded (a runaway query must not hold a connection and its
    // locks); background work as the system principal keeps the server default.
    let statement_timeout = (p.role != Role::System).then_some(REQUEST_STATEMENT_TIMEOUT);
    sqlx::query(
        "SELECT set_config('app.user_id', $1, true), set_config('app.role', $2, true), \
         set_config('app.territory', $3, true), \
         set_config('statement_timeout', coalesce($4, current_setting('statement_timeout')), true)",
    )
    .bind(&p.user_id)
    .bind(p.role.as_str())
    .bind(p.territory.code())
    .bind(statement_timeout)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Hides a password in a database URL before it reaches a log or an error message.
pub fn redact_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((cred, host)) => {
                let user = cred.split(':').next().unwrap_or("");
                format!("{scheme}://{user}@{host}")
            }
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

/// What the start-up check found about the runtime role.
#[derive(Debug)]
pub struct RoleCheck {
    pub role: String,
    pub superuser: bool,
    pub bypass_rls: bool,
    pub owned_relations: i64,
    pub member_of_owner: bool,
    pub unforced_tables: Vec<String>,
}

/// Tables that must have ENABLE + FORCE ROW LEVEL SECURITY.
pub const RLS_TABLES: &[&str] = &[
    "territories",
    "users",
    "leads",
    "lead_activities",
    "audit_log",
    "outbox",
    "inbox",
    "event_cursors",
    "cockpit_daily_events",
    "followups",
    "cockpit_lead_counts",
    "cockpit_activity_daily",
    "mail_outbox",
    "unsubscribe_redemptions",
    "cockpit_followup_daily",
];

/// Refuses a runtime role that could bypass row-level security: a superuser, a role with
/// BYPASSRLS, one that owns (or is a member of the owner of) the tables, or tables without
/// FORCE ROW LEVEL SECURITY. The error names the problem and the fix.
pub async fn check_runtime_role(pool: &PgPool) -> anyhow::Result<RoleCheck> {
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('public.leads') IS NOT NULL")
        .fetch_one(pool)
        .await?;
    if !exists {
        bail!("the schema is missing: run `freshplan migrate` first");
    }
    let row: (String, bool, bool, i64, bool) = sqlx::query_as(
        "SELECT r.rolname::text, r.rolsuper, r.rolbypassrls, \
           (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relowner = r.oid AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
               AND n.nspname NOT LIKE 'pg_toast%'), \
           pg_has_role(r.oid, (SELECT relowner FROM pg_class WHERE oid = 'public.leads'::regclass), 'MEMBER') \
         FROM pg_roles r WHERE r.rolname = current_user",
    )
    .fetch_one(pool)
    .await?;
    let unforced: Vec<String> = sqlx::query_scalar(
        "SELECT t FROM unnest($1::text[]) AS t \
         LEFT JOIN pg_class c ON c.oid = to_regclass('public.' || t) \
         WHERE c.oid IS NULL OR NOT (c.relrowsecurity AND c.relforcerowsecurity)",
    )
    .bind(RLS_TABLES)
    .fetch_all(pool)
    .await?;
    let check = RoleCheck {
        role: row.0,
        superuser: row.1,
        bypass_rls: row.2,
        owned_relations: row.3,
        member_of_owner: row.4,
        unforced_tables: unforced,
    };
    let role = &check.role;
    if check.superuser {
        bail!("refusing to start: runtime role `{role}` is a superuser, which bypasses row-level security; set DATABASE_URL to the application role (run `freshplan migrate` to create it)");
    }
    if check.bypass_rls {
        bail!("refusing to start: runtime role `{role}` has BYPASSRLS; use a role without it (ALTER ROLE {role} NOBYPASSRLS)");
    }
    if check.owned_relations > 0 || check.member_of_owner {
        bail!("refusing to start: runtime role `{role}` owns the schema's tables (or is a member of their owner) and could switch row-level security off; connect as the application role instead");
    }
    if !check.unforced_tables.is_empty() {
        bail!(
            "refusing to start: row-level security is not enabled and forced on {:?}; run `freshplan migrate`",
            check.unforced_tables
        );
    }
    Ok(check)
}
