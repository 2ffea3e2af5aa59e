//! Who drives the load: load users in the user table (created idempotently through the admin
//! database URL, the way `freshplan users add` does), their signed tokens, and the read-only
//! questions the tool asks the database (the newest outbox position, the events of a phase).

use std::str::FromStr;

use anyhow::{bail, Context};
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, Executor, PgConnection};
use uuid::Uuid;

use crate::auth::jwt::Authenticator;
use crate::auth::users::{self, UserChange};
use crate::db::redact_url;
use crate::events::envelope::Audience;
use crate::identity::{Principal, Role};
use crate::territory::Territory;

/// Who the audit trail names for users the tool creates.
pub const ACTOR: &str = "cli:loadtest";

/// Where the tool reaches the database as administrator.
#[derive(Debug, Clone)]
pub struct Database {
    /// `freshplan.database.admin-url`.
    pub admin_url: String,
    /// The runtime database (from `DATABASE_URL`).
    pub name: String,
    /// `freshplan.database.owner-role`.
    pub owner_role: String,
}

impl Database {
    fn options(&self, database: &str) -> anyhow::Result<PgConnectOptions> {
        Ok(PgConnectOptions::from_str(&self.admin_url)
            .context("freshplan.database.admin-url is not a valid PostgreSQL URL")?
            .database(database)
            .application_name("freshplan-loadtest"))
    }

    /// An administrator connection to the runtime database acting as the owner role (as
    /// `freshplan users` does), so row-level security applies to what the tool does there.
    pub async fn owner_connection(&self) -> anyhow::Result<PgConnection> {
        let mut conn = self.connect(&self.name).await?;
        let owner = self.owner_role.replace('"', "\"\"");
        conn.execute(format!("SET ROLE \"{owner}\"").as_str())
            .await
            .context("cannot act as the owner role (run `freshplan migrate` first)")?;
        Ok(conn)
    }

    /// An administrator connection to `database` as the admin URL's own role.
    pub async fn connect(&self, database: &str) -> anyhow::Result<PgConnection> {
        self.options(database)?.connect().await.with_context(|| {
            format!(
                "cannot connect to database `{database}` as administrator ({}); set FRESHPLAN_ADMIN_DATABASE_URL",
                redact_url(&self.admin_url)
            )
        })
    }
}

/// One user the tool acts as, with its bearer header.
#[derive(Debug, Clone)]
pub struct LoadUser {
    pub principal: Principal,
    /// `Bearer <jwt>`.
    pub bearer: String,
}

/// Every user of a run.
#[derive(Debug, Clone)]
pub struct Fleet {
    /// Sales users who own and change the load's leads (DE, AT, CH in turn).
    pub sales: Vec<LoadUser>,
    /// One manager per territory, in DE, AT, CH order.
    pub managers: Vec<LoadUser>,
    pub admin: LoadUser,
}

/// Territories in the order the tool cycles through them.
pub const TERRITORIES: [Territory; 3] = [Territory::DE, Territory::AT, Territory::CH];

/// The load users: `load-sales-de-01`, `load-sales-at-01`, … (`n` in all), one manager per
/// territory (`load-manager-de`, …) and `load-admin`.
pub fn load_principals(n: usize) -> (Vec<Principal>, Vec<Principal>, Principal) {
    let p = |id: String, role: Role, territory: Territory| Principal {
        name: format!("Lasttest {id}"),
        user_id: id,
        role,
        territory,
    };
    let sales = (0..n)
        .map(|i| {
            let t = TERRITORIES[i % 3];
            let id = format!(
                "load-sales-{}-{:02}",
                t.code().to_ascii_lowercase(),
                i / 3 + 1
            );
            p(id, Role::Sales, t)
        })
        .collect();
    let managers = TERRITORIES
        .iter()
        .map(|t| {
            let id = format!("load-manager-{}", t.code().to_ascii_lowercase());
            p(id, Role::Manager, *t)
        })
        .collect();
    (
        sales,
        managers,
        p("load-admin".into(), Role::Admin, Territory::DE),
    )
}

/// Makes sure `p` exists, active, with its role and territory: added when missing, corrected
/// when it differs (both audited as `freshplan users` does), left alone otherwise.
async fn ensure_user(
    conn: &mut PgConnection,
    known: &[users::UserRow],
    p: &Principal,
) -> anyhow::Result<()> {
    match known.iter().find(|u| u.id == p.user_id) {
        None => {
            users::add(conn, ACTOR, &p.user_id, &p.name, p.role, p.territory).await?;
        }
        Some(row) if row.role != p.role || row.territory != p.territory || !row.active => {
            let change = UserChange {
                role: Some(p.role),
                territory: Some(p.territory),
                active: Some(true),
                ..UserChange::default()
            };
            users::set(conn, ACTOR, &p.user_id, change).await?;
        }
        Some(_) => {}
    }
    Ok(())
}

/// Creates (or corrects) the load users and signs a token for each, valid `ttl_seconds`.
pub async fn fleet(
    db: &Database,
    auth: &Authenticator,
    n: usize,
    ttl_seconds: u64,
) -> anyhow::Result<Fleet> {
    if n == 0 {
        bail!("--users must be at least 1");
    }
    let (sales, managers, admin) = load_principals(n);
    let mut conn = db.owner_connection().await?;
    let known = users::list(&mut conn, ACTOR).await?;
    for p in sales.iter().chain(&managers).chain(std::iter::once(&admin)) {
        ensure_user(&mut conn, &known, p)
            .await
            .with_context(|| format!("cannot create the load user `{}`", p.user_id))?;
    }
    conn.close().await.ok();
    let user = |p: Principal| -> anyhow::Result<LoadUser> {
        let bearer = format!("Bearer {}", auth.mint(&p, ttl_seconds)?);
        Ok(LoadUser {
            principal: p,
            bearer,
        })
    };
    Ok(Fleet {
        sales: sales.into_iter().map(user).collect::<Result<_, _>>()?,
        managers: managers.into_iter().map(user).collect::<Result<_, _>>()?,
        admin: user(admin)?,
    })
}

/// Runs `sql` on the owner connection inside a transaction with an admin identity, so the
/// outbox's row-level security shows every event.
async fn as_admin<T>(
    conn: &mut PgConnection,
    f: impl for<'c> FnOnce(&'c mut PgConnection) -> futures::future::BoxFuture<'c, sqlx::Result<T>>,
) -> anyhow::Result<T> {
    let mut tx = conn.begin().await?;
    sqlx::query(
        "SELECT set_config('app.user_id', $1, true), set_config('app.role', 'admin', true), \
         set_config('app.territory', 'DE', true)",
    )
    .bind(ACTOR)
    .execute(&mut *tx)
    .await?;
    let out = f(&mut tx).await?;
    tx.commit().await?;
    Ok(out)
}

/// The newest committed outbox position (0 when empty).
pub async fn outbox_position(conn: &mut PgConnection) -> anyhow::Result<i64> {
    as_admin(conn, |c| {
        Box::pin(async move {
            sqlx::query_scalar("SELECT coalesce(max(position), 0)::bigint FROM outbox")
                .fetch_one(c)
                .await
        })
    })
    .await
}

/// One committed event as the tool accounts for it.
#[derive(Debug, Clone)]
pub struct Committed {
    pub position: i64,
    pub key: Uuid,
    pub event_type: String,
    /// The outbox row's `created_at` (its transaction's start), µs since the Unix epoch.
    pub created_unix_us: i64,
    pub audience: Audience,
}

/// The committed events with `after < position <= upto`.
pub async fn committed_between(
    conn: &mut PgConnection,
    after: i64,
    upto: i64,
) -> anyhow::Result<Vec<Committed>> {
    type Row = (i64, Uuid, String, i64, String, Option<String>, Vec<String>);
    let rows: Vec<Row> = as_admin(conn, move |c| {
        Box::pin(async move {
            sqlx::query_as(
                "SELECT position, idempotency_key, event_type, \
                        (extract(epoch FROM created_at) * 1000000)::bigint, \
                        territory, owner_user_id, collaborators \
                 FROM outbox WHERE position > $1 AND position <= $2 ORDER BY position",
            )
            .bind(after)
            .bind(upto)
            .fetch_all(c)
            .await
        })
    })
    .await?;
    rows.into_iter()
        .map(
            |(position, key, event_type, created_unix_us, territory, owner, collaborators)| {
                let territory = territory
                    .parse()
                    .map_err(|e| anyhow::anyhow!("outbox row {position}: {e}"))?;
                Ok(Committed {
                    position,
                    key,
                    event_type,
                    created_unix_us,
                    audience: Audience {
                        territory,
                        owner,
                        collaborators,
                    },
                })
            },
        )
        .collect()
}

/// `SHOW`s a few settings and the version of the PostgreSQL server.
pub async fn postgres_facts(
    conn: &mut PgConnection,
) -> anyhow::Result<(String, Vec<(String, String)>)> {
    let version: String = sqlx::query_scalar("SELECT version()")
        .fetch_one(&mut *conn)
        .await?;
    let mut settings = Vec::new();
    for name in [
        "shared_buffers",
        "synchronous_commit",
        "fsync",
        "wal_sync_method",
        "commit_delay",
        "max_connections",
    ] {
        let v: Option<String> =
            sqlx::query_scalar("SELECT setting FROM pg_settings WHERE name = $1")
                .bind(name)
                .fetch_optional(&mut *conn)
                .await?;
        if let Some(v) = v {
            settings.push((name.to_string(), v));
        }
    }
    Ok((version, settings))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_users_spread_over_the_three_territories() {
        let (sales, managers, admin) = load_principals(7);
        let ids: Vec<&str> = sales.iter().map(|p| p.user_id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "load-sales-de-01",
                "load-sales-at-01",
                "load-sales-ch-01",
                "load-sales-de-02",
                "load-sales-at-02",
                "load-sales-ch-02",
                "load-sales-de-03"
            ]
        );
        assert!(sales.iter().all(|p| p.role == Role::Sales
            && p.user_id.contains(&p.territory.code().to_ascii_lowercase())));
        assert_eq!(managers.len(), 3);
        assert_eq!(managers[1].territory, Territory::AT);
        assert_eq!(admin.role, Role::Admin);
    }
}
