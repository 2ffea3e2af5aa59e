//! `freshplan migrate`: creates the roles and the database if missing, then applies the
//! embedded migrations as the owner role and grants the application role what it needs.
//! Idempotent and safe to run concurrently (roles tolerate races, migrations take an
//! advisory lock).

use std::str::FromStr;

use anyhow::{bail, Context};
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, Executor, PgConnection};

use super::redact_url;

/// Embedded migrations, applied in order; never edit one that has shipped.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "schema",
        include_str!("../../migrations/0001_schema.sql"),
    ),
    (
        2,
        "cockpit",
        include_str!("../../migrations/0002_cockpit.sql"),
    ),
    (
        3,
        "defence",
        include_str!("../../migrations/0003_defence.sql"),
    ),
    (4, "users", include_str!("../../migrations/0004_users.sql")),
    (5, "mail", include_str!("../../migrations/0005_mail.sql")),
    (
        6,
        "lead list",
        include_str!("../../migrations/0006_lead_list.sql"),
    ),
];

/// Role and database names taken from the runtime URL.
#[derive(Debug, Clone)]
pub struct Target {
    pub database: String,
    pub app_role: String,
    pub app_password: Option<String>,
    pub owner_role: String,
}

fn identifier(kind: &str, name: &str) -> anyhow::Result<String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !ok {
        bail!("{kind} name `{name}` must be lower-case letters, digits and _ (at most 63)");
    }
    Ok(format!("\"{name}\""))
}

impl Target {
    /// Reads database, role and password from the runtime URL.
    pub fn from_url(url: &str, owner_role: &str) -> anyhow::Result<Self> {
        let opts = PgConnectOptions::from_str(url)
            .with_context(|| format!("invalid database URL {}", redact_url(url)))?;
        let database = opts.get_database().unwrap_or("freshplan").to_string();
        let app_role = opts.get_username().to_string();
        let app_password = url
            .split_once("://")
            .and_then(|(_, rest)| rest.rsplit_once('@'))
            .and_then(|(cred, _)| cred.split_once(':'))
            .map(|(_, p)| p.to_string());
        if app_role == owner_role {
            bail!("the application role `{app_role}` must differ from the owner role");
        }
        Ok(Target {
            database,
            app_role,
            app_password,
            owner_role: owner_role.to_string(),
        })
    }
}

/// Creates roles and database when missing and applies every pending migration.
pub async fn migrate(admin_url: &str, target: &Target) -> anyhow::Result<()> {
    let admin = PgConnectOptions::from_str(admin_url)
        .with_context(|| format!("invalid admin database URL {}", redact_url(admin_url)))?;
    let mut conn = PgConnection::connect_with(&admin).await.with_context(|| {
        format!(
            "cannot connect to PostgreSQL as administrator ({}); is the server running? \
             set FRESHPLAN_ADMIN_DATABASE_URL",
            redact_url(admin_url)
        )
    })?;
    let owner = identifier("owner role", &target.owner_role)?;
    let app = identifier("application role", &target.app_role)?;
    let db = identifier("database", &target.database)?;

    create_role(&mut conn, &format!("CREATE ROLE {owner} NOLOGIN")).await?;
    let password = match &target.app_password {
        Some(p) => format!(" PASSWORD '{}'", p.replace('\'', "''")),
        None => String::new(),
    };
    create_role(
        &mut conn,
        &format!(
            "CREATE ROLE {app} LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE{password}"
        ),
    )
    .await?;
    // The administrator must be able to SET ROLE to the owner (a no-op for superusers).
    conn.execute(format!("GRANT {owner} TO CURRENT_USER").as_str())
        .await
        .ok();

    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&target.database)
            .fetch_one(&mut conn)
            .await?;
    if !exists {
        if let Err(e) = conn
            .execute(format!("CREATE DATABASE {db} OWNER {owner}").as_str())
            .await
        {
            let dup = e.as_database_error().and_then(|d| d.code()).as_deref() == Some("42P04");
            if !dup {
                return Err(e).context("CREATE DATABASE failed");
            }
        }
    }
    conn.close().await.ok();

    let mut conn = PgConnection::connect_with(&admin.clone().database(&target.database))
        .await
        .context("cannot connect to the new database as administrator")?;
    conn.execute(format!("SET ROLE {owner}").as_str()).await?;
    conn.execute("SELECT pg_advisory_lock(727274)").await?;
    let result = apply(&mut conn, &app, &db).await;
    conn.execute("SELECT pg_advisory_unlock(727274)").await.ok();
    result
}

async fn create_role(conn: &mut PgConnection, create: &str) -> anyhow::Result<()> {
    // Tolerates a concurrent migrate creating the same role.
    let sql = format!(
        "DO $$ BEGIN {create}; EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$"
    );
    conn.execute(sql.as_str()).await.context("creating role")?;
    Ok(())
}

async fn apply(conn: &mut PgConnection, app: &str, db: &str) -> anyhow::Result<()> {
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY, \
         name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .await?;
    let applied: Vec<i32> = sqlx::query_scalar("SELECT version FROM schema_migrations")
        .fetch_all(&mut *conn)
        .await?;
    for (version, name, sql) in MIGRATIONS {
        if applied.contains(version) {
            continue;
        }
        let mut tx = conn.begin().await?;
        tx.execute(*sql)
            .await
            .with_context(|| format!("migration {version} ({name}) failed"))?;
        sqlx::query("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)")
            .bind(version)
            .bind(name)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        tracing::info!(version, name, "applied migration");
    }
    // Privileges: plain DML, row-level security decides which rows. The app owns nothing.
    // Applied after every run, so each line also repairs a database migrated by an older
    // version (migration 0003 explains the rules these complete):
    // - only the application role (and the owner's members) may connect; nobody creates temp
    //   objects (which could shadow the schema's names);
    // - `users` is inserted by the system principal's demo seed only (INSERT … ON CONFLICT DO
    //   NOTHING): no UPDATE, no DELETE;
    // - sequences are read (the doorbell rings with `last_value`), never advanced: identity
    //   columns need no privilege on their sequence, nextval/setval by hand would.
    // (client_min_messages: pg_trgm's functions belong to the extension, not the owner, so the
    // blanket EXECUTE grant warns about each of them; nothing of the extension is needed by the
    // application role.)
    let grants = format!(
        "SET client_min_messages = error;
         REVOKE CONNECT, TEMPORARY ON DATABASE {db} FROM PUBLIC;
         REVOKE TEMPORARY ON DATABASE {db} FROM {app};
         GRANT CONNECT ON DATABASE {db} TO {app};
         GRANT USAGE ON SCHEMA public TO {app};
         GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {app};
         REVOKE INSERT, UPDATE, DELETE ON schema_migrations FROM {app};
         REVOKE UPDATE, DELETE ON users FROM {app};
         REVOKE USAGE, UPDATE ON ALL SEQUENCES IN SCHEMA public FROM {app};
         GRANT SELECT ON ALL SEQUENCES IN SCHEMA public TO {app};
         GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA public TO {app};
         REVOKE CREATE ON SCHEMA public FROM PUBLIC;
         RESET client_min_messages;"
    );
    conn.execute(grants.as_str())
        .await
        .context("granting privileges")?;
    Ok(())
}
