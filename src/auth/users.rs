//! The user table as the authority on who a token's `sub` is.
//!
//! A verified token proves who the caller is; the row in `users` says what that user is. A token
//! for an unknown or deactivated user, or whose role or territory disagrees with the row, is
//! refused (401; the log says why, the answer does not).
//!
//! Cost per request: rows are cached in memory for `freshplan.auth.users.refresh-seconds`
//! (default 5 s), so a busy user costs one indexed primary-key query per interval, not one per
//! request; a miss is one query (as the system principal, since no identity exists yet). Unknown
//! ids are not cached, so a user added with `freshplan users add` can log in at once. Changes made
//! by `freshplan users …` (another process) reach the cache within that interval; the open-stream
//! check (`events::hub::watch_users`) reloads the rows of every user with an open stream once per
//! interval in one query and ends the streams of users the table no longer admits.
//!
//! The management commands (`freshplan users add|set|deactivate|list`) are here too: they run on
//! an administrator connection (the owner role, under row-level security, with an identity
//! `cli:<login>` of role admin) and write an audit row per change.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use serde_json::json;
use sqlx::{Connection, PgConnection, PgPool};

use crate::db;
use crate::identity::{Principal, Role};
use crate::territory::Territory;

/// One row of `users`.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct UserRow {
    pub id: String,
    pub name: String,
    pub role: Role,
    pub territory: Territory,
    pub active: bool,
}

/// Entries kept at most; expired ones are pruned beyond this.
const MAX_CACHED: usize = 10_000;

/// The cached view of `users` of one instance.
pub struct Users {
    pool: PgPool,
    ttl: Duration,
    cache: Mutex<HashMap<String, (Instant, UserRow)>>,
}

/// Why the user table refuses a token's principal (logged, never answered).
pub fn admit(token: &Principal, row: Option<&UserRow>) -> Result<Principal, &'static str> {
    let row = row.ok_or("unknown user (no row in the user table)")?;
    if !row.active {
        return Err("user is deactivated");
    }
    if row.role != token.role {
        return Err("role claim disagrees with the user table");
    }
    if row.territory != token.territory {
        return Err("territory claim disagrees with the user table");
    }
    Ok(Principal {
        user_id: row.id.clone(),
        name: row.name.clone(),
        role: row.role,
        territory: row.territory,
    })
}

impl Users {
    /// A directory reading `pool` (the application role) with rows cached for `ttl`.
    pub fn new(pool: PgPool, ttl: Duration) -> Self {
        Users {
            pool,
            ttl,
            cache: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, UserRow)>> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How long a row is cached (and the interval of the open-stream check).
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The row of `id`: from the cache while fresh, else from the database.
    pub async fn get(&self, id: &str) -> Result<Option<UserRow>, sqlx::Error> {
        if let Some((at, row)) = self.lock().get(id) {
            if at.elapsed() < self.ttl {
                return Ok(Some(row.clone()));
            }
        }
        let mut rows = self.load(&[id.to_string()]).await?;
        Ok(rows.remove(id))
    }

    /// Reads the rows of `ids` in one query and refreshes the cache with them (ids without a
    /// row are dropped from it).
    pub async fn load(&self, ids: &[String]) -> Result<HashMap<String, UserRow>, sqlx::Error> {
        let mut tx = db::begin_as(&self.pool, &Principal::system()).await?;
        let rows: Vec<UserRow> = sqlx::query_as(
            "SELECT id, name, role, territory, active FROM users WHERE id = ANY($1)",
        )
        .bind(ids)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let now = Instant::now();
        let found: HashMap<String, UserRow> = rows.into_iter().map(|r| (r.id.clone(), r)).collect();
        let mut cache = self.lock();
        for id in ids {
            match found.get(id) {
                Some(row) => {
                    cache.insert(id.clone(), (now, row.clone()));
                }
                None => {
                    cache.remove(id);
                }
            }
        }
        if cache.len() > MAX_CACHED {
            let ttl = self.ttl;
            cache.retain(|_, (at, _)| at.elapsed() < ttl);
        }
        Ok(found)
    }

    /// Drops a cached row (the next request reads it again).
    pub fn forget(&self, id: &str) {
        self.lock().remove(id);
    }
}

// ---- `freshplan users …` ----------------------------------------------------------------

/// Changes `freshplan users set` can make; `None` leaves a column as it is.
#[derive(Debug, Default)]
pub struct UserChange {
    pub name: Option<String>,
    pub role: Option<Role>,
    pub territory: Option<Territory>,
    pub active: Option<bool>,
}

fn check_role(role: Role) -> anyhow::Result<()> {
    if role == Role::System {
        bail!("`system` is the principal of background jobs, not a user role");
    }
    Ok(())
}

fn check_id(id: &str) -> anyhow::Result<()> {
    if id.trim().is_empty() || id.len() > 128 || id.trim() != id {
        bail!("a user id has 1 to 128 characters and no surrounding blanks");
    }
    if id == "system" || id == Principal::anonymous_publisher().user_id {
        bail!("`{id}` is reserved");
    }
    Ok(())
}

/// Runs `f` in a transaction on an administrator connection, as `actor` (role admin), so the
/// row-level security of `users` and `audit_log` applies and the audit row names the operator.
async fn as_operator<T>(
    conn: &mut PgConnection,
    actor: &str,
    f: impl for<'c> FnOnce(&'c mut PgConnection) -> futures::future::BoxFuture<'c, anyhow::Result<T>>,
) -> anyhow::Result<T> {
    let mut tx = conn.begin().await?;
    sqlx::query(
        "SELECT set_config('app.user_id', $1, true), set_config('app.role', 'admin', true), \
         set_config('app.territory', 'DE', true)",
    )
    .bind(actor)
    .execute(&mut *tx)
    .await?;
    let out = f(&mut tx).await?;
    tx.commit().await?;
    Ok(out)
}

async fn audit(
    conn: &mut PgConnection,
    action: &str,
    id: &str,
    territory: Territory,
    details: serde_json::Value,
) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO audit_log (actor_user_id, actor_role, action, entity_type, entity_id, territory, details) \
         VALUES (app_user(), app_role(), $1, 'user', $2, $3, $4)",
    )
    .bind(action)
    .bind(id)
    .bind(territory)
    .bind(details)
    .execute(conn)
    .await?;
    Ok(())
}

/// `freshplan users add`.
pub async fn add(
    conn: &mut PgConnection,
    actor: &str,
    id: &str,
    name: &str,
    role: Role,
    territory: Territory,
) -> anyhow::Result<UserRow> {
    check_id(id)?;
    check_role(role)?;
    if name.trim().is_empty() {
        bail!("--name must not be empty");
    }
    let (id, name) = (id.to_string(), name.to_string());
    as_operator(conn, actor, move |c| {
        Box::pin(async move {
            let row: Option<UserRow> = sqlx::query_as(
                "INSERT INTO users (id, name, role, territory) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (id) DO NOTHING RETURNING id, name, role, territory, active",
            )
            .bind(&id)
            .bind(&name)
            .bind(role)
            .bind(territory)
            .fetch_optional(&mut *c)
            .await?;
            let row = row.ok_or_else(|| {
                anyhow!("user `{id}` exists already: change it with `freshplan users set`")
            })?;
            audit(
                c,
                "user.added",
                &row.id,
                row.territory,
                json!({"role": row.role, "territory": row.territory.code(), "active": true}),
            )
            .await?;
            Ok(row)
        })
    })
    .await
}

/// `freshplan users set` and `freshplan users deactivate`.
pub async fn set(
    conn: &mut PgConnection,
    actor: &str,
    id: &str,
    change: UserChange,
) -> anyhow::Result<UserRow> {
    if let Some(role) = change.role {
        check_role(role)?;
    }
    if change.name.as_deref().is_some_and(|n| n.trim().is_empty()) {
        bail!("--name must not be empty");
    }
    let id = id.to_string();
    as_operator(conn, actor, move |c| {
        Box::pin(async move {
            let before: Option<UserRow> = sqlx::query_as(
                "SELECT id, name, role, territory, active FROM users WHERE id = $1 FOR UPDATE",
            )
            .bind(&id)
            .fetch_optional(&mut *c)
            .await?;
            let before =
                before.ok_or_else(|| anyhow!("no user `{id}` (add it with `freshplan users add`)"))?;
            let after: UserRow = sqlx::query_as(
                "UPDATE users SET name = COALESCE($2, name), role = COALESCE($3, role), \
                 territory = COALESCE($4, territory), active = COALESCE($5, active), updated_at = now() \
                 WHERE id = $1 RETURNING id, name, role, territory, active",
            )
            .bind(&id)
            .bind(&change.name)
            .bind(change.role)
            .bind(change.territory)
            .bind(change.active)
            .fetch_one(&mut *c)
            .await?;
            // Field names and non-PII values only: the name is shown as changed, not its value.
            let mut details = serde_json::Map::new();
            if before.name != after.name {
                details.insert("name".into(), json!("changed"));
            }
            if before.role != after.role {
                details.insert("role".into(), json!([before.role, after.role]));
            }
            if before.territory != after.territory {
                details.insert(
                    "territory".into(),
                    json!([before.territory.code(), after.territory.code()]),
                );
            }
            if before.active != after.active {
                details.insert("active".into(), json!([before.active, after.active]));
            }
            let action = match (before.active, after.active) {
                (true, false) => "user.deactivated",
                (false, true) => "user.reactivated",
                _ => "user.changed",
            };
            audit(c, action, &after.id, after.territory, details.into()).await?;
            Ok(after)
        })
    })
    .await
}

/// `freshplan users list`.
pub async fn list(conn: &mut PgConnection, actor: &str) -> anyhow::Result<Vec<UserRow>> {
    as_operator(conn, actor, |c| {
        Box::pin(async move {
            Ok(sqlx::query_as(
                "SELECT id, name, role, territory, active FROM users ORDER BY territory, role, id",
            )
            .fetch_all(&mut *c)
            .await?)
        })
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(role: Role, territory: Territory, active: bool) -> UserRow {
        UserRow {
            id: "sales-de-1".into(),
            name: "Sabine".into(),
            role,
            territory,
            active,
        }
    }

    #[test]
    fn the_row_decides_and_every_disagreement_is_named() {
        let token = Principal {
            user_id: "sales-de-1".into(),
            name: "from the token".into(),
            role: Role::Sales,
            territory: Territory::DE,
        };
        let ok = admit(&token, Some(&row(Role::Sales, Territory::DE, true))).unwrap();
        assert_eq!(ok.name, "Sabine", "the name comes from the row");
        assert!(admit(&token, None).unwrap_err().contains("unknown"));
        assert!(admit(&token, Some(&row(Role::Sales, Territory::DE, false)))
            .unwrap_err()
            .contains("deactivated"));
        assert!(admit(&token, Some(&row(Role::Admin, Territory::DE, true)))
            .unwrap_err()
            .contains("role"));
        assert!(admit(&token, Some(&row(Role::Sales, Territory::AT, true)))
            .unwrap_err()
            .contains("territory"));
    }

    #[test]
    fn reserved_ids_and_the_system_role_are_refused() {
        assert!(check_id("system").is_err());
        assert!(check_id("anonymous-publisher").is_err());
        assert!(check_id(" x").is_err());
        assert!(check_id("").is_err());
        assert!(check_id("k-user-1").is_ok());
        assert!(check_role(Role::System).is_err());
    }
}
