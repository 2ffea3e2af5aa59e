//! The lead widget: who may see which scope, the one-statement SQL (`widget.sql`, roll-ups of
//! migration 0002, see docs/cockpit-sql.md) run as the caller under row-level security, the
//! cache, read-your-writes by outbox position, and viewer redaction.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgPool;

use super::cache::{Computed, Key, Scope, Source, WidgetCache};
use crate::db;
use crate::error::{ApiError, ApiResult};
use crate::identity::{Principal, Role};
use crate::telemetry::metrics::Metrics;

/// The widget statement with `{{SCOPE}}` still in it.
const WIDGET_SQL: &str = include_str!("widget.sql");

/// The statement prepared per scope (three fixed texts, so each gets its scope's plan), wrapped
/// so the same snapshot also reports the outbox position it includes, the snapshot itself, and
/// whether the event at `$5` (if any) is visible to it.
fn statement(scope: Scope) -> String {
    let predicate = match scope {
        Scope::Own => "owner_user_id = $2::text",
        Scope::Territory => "territory = $3::text",
        Scope::All => "true",
    };
    let widget = WIDGET_SQL.replace("{{SCOPE}}", predicate);
    format!(
        "SELECT w.widget, pg_current_snapshot()::text AS snapshot, \
           (SELECT coalesce(max(position), 0) FROM outbox) AS position, \
           ($5::bigint IS NULL OR EXISTS (SELECT 1 FROM outbox WHERE position = $5) \
             OR $5 < (SELECT coalesce(min(position), 0) FROM outbox)) AS includes_min \
         FROM ({widget}) AS w(widget)"
    )
}

/// The three statements, built once.
pub struct Statements {
    own: String,
    territory: String,
    all: String,
}

impl Default for Statements {
    fn default() -> Self {
        Statements {
            own: statement(Scope::Own),
            territory: statement(Scope::Territory),
            all: statement(Scope::All),
        }
    }
}

impl Statements {
    fn get(&self, scope: Scope) -> &str {
        match scope {
            Scope::Own => &self.own,
            Scope::Territory => &self.territory,
            Scope::All => &self.all,
        }
    }
}

/// The scope a caller gets for `requested` (their default when `None`), or 403.
pub fn scope_for(caller: &Principal, requested: Option<Scope>) -> ApiResult<Scope> {
    let (allowed, default): (&[Scope], Scope) = match caller.role {
        Role::Sales => (&[Scope::Own], Scope::Own),
        Role::Manager => (&[Scope::Own, Scope::Territory], Scope::Territory),
        Role::Viewer => (&[Scope::Territory], Scope::Territory),
        Role::Admin | Role::System => (&[Scope::Own, Scope::Territory, Scope::All], Scope::All),
    };
    let scope = requested.unwrap_or(default);
    if allowed.contains(&scope) {
        Ok(scope)
    } else {
        Err(ApiError::Forbidden(format!(
            "role {} may see the widget with scope {} only",
            caller.role,
            allowed
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(" or ")
        )))
    }
}

/// Longest wait for `minPosition` before answering 503 `not-yet-consistent`.
pub const CONSISTENCY_WAIT: Duration = Duration::from_secs(2);

/// Everything the widget needs.
pub struct Widget {
    pub pool: PgPool,
    pub cache: Arc<WidgetCache>,
    pub metrics: Arc<Metrics>,
    pub statements: Statements,
}

/// A widget answer: the JSON and whether it came from the cache.
pub struct Answer {
    pub body: Value,
    pub source: Source,
}

impl Widget {
    async fn compute(
        &self,
        caller: &Principal,
        scope: Scope,
        now: DateTime<Utc>,
        min_position: Option<i64>,
    ) -> Result<(Computed, bool), sqlx::Error> {
        let mut tx = db::begin_as(&self.pool, caller).await?;
        let (widget, snapshot, position, includes_min): (Value, String, i64, bool) =
            sqlx::query_as(self.statements.get(scope))
                .bind(scope.as_str())
                .bind(&caller.user_id)
                .bind(caller.territory)
                .bind(now)
                .bind(min_position)
                .fetch_one(&mut *tx)
                .await?;
        tx.commit().await?;
        Ok((
            Computed {
                widget,
                position,
                snapshot,
            },
            includes_min,
        ))
    }

    /// True when the transaction that wrote the event at `position` is visible in `snapshot`.
    async fn visible_in(
        &self,
        caller: &Principal,
        position: i64,
        snapshot: &str,
    ) -> Result<bool, sqlx::Error> {
        let mut tx = db::begin_as(&self.pool, caller).await?;
        let visible: Option<bool> = sqlx::query_scalar(
            "SELECT pg_visible_in_snapshot(txid, $2::pg_snapshot) FROM outbox WHERE position = $1",
        )
        .bind(position)
        .bind(snapshot)
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(visible.unwrap_or(false))
    }

    /// The widget for `caller` in `scope`, including the event at `min_position` when given
    /// (waiting up to [`CONSISTENCY_WAIT`] for it, then 503 `not-yet-consistent`).
    pub async fn answer(
        &self,
        caller: &Principal,
        scope: Scope,
        min_position: Option<i64>,
    ) -> ApiResult<Answer> {
        let started = Instant::now();
        let key = Key::of(scope, &caller.user_id, caller.territory);
        let deadline = tokio::time::Instant::now() + CONSISTENCY_WAIT;
        let (computed, source) = loop {
            // A cached entry serves a read-your-writes request only if its snapshot provably
            // saw the write (positions are taken before commit, so a higher visible position
            // alone does not prove it).
            let cached = match (self.cache.fresh(&key), min_position) {
                (Some(e), None) => Some(e),
                (Some(e), Some(p)) if e.position >= p => {
                    if self.visible_in(caller, p, &e.snapshot).await? {
                        Some(e)
                    } else {
                        None
                    }
                }
                _ => None,
            };
            if let Some(e) = cached {
                break (e, Source::Hit);
            }
            let waiting = self.cache.changed.notified();
            let mut included = true;
            let (value, source) = self
                .cache
                .get_or_compute(
                    &key,
                    // With `minPosition` only a computation of our own or the check above
                    // (which proves visibility) will do: a higher position alone proves nothing.
                    |_| min_position.is_none(),
                    || async {
                        let (c, inc) = self
                            .compute(caller, scope, Utc::now(), min_position)
                            .await?;
                        included = inc;
                        Ok::<_, ApiError>(c)
                    },
                )
                .await?;
            if included {
                break (value, source);
            }
            if tokio::time::timeout_at(deadline, waiting).await.is_err() {
                return Err(ApiError::NotYetConsistentAt(min_position.unwrap_or(0)));
            }
        };
        let mut body = computed.widget.clone();
        // Entries are shared by everyone with the same view (a territory's manager and viewer);
        // the caller is the only per-caller field.
        body["userId"] = Value::from(caller.user_id.as_str());
        body["isManagerView"] = Value::Bool(scope != Scope::Own);
        body["position"] = Value::from(computed.position);
        if caller.role == Role::Viewer {
            redact(&mut body);
        }
        self.metrics
            .widget_query
            .with_label_values(&[scope.as_str(), source.as_str()])
            .observe(started.elapsed().as_secs_f64() * 1000.0);
        Ok(Answer { body, source })
    }
}

/// Viewers see aggregates only: no lead ids or company names in the recent lists.
fn redact(body: &mut Value) {
    for list in ["recentActivities", "recentFollowUps"] {
        if let Some(items) = body.get_mut(list).and_then(Value::as_array_mut) {
            for item in items {
                if let Some(obj) = item.as_object_mut() {
                    obj.remove("leadId");
                    obj.remove("companyName");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::territory::Territory;

    fn p(role: Role) -> Principal {
        Principal {
            user_id: "u".into(),
            name: "U".into(),
            role,
            territory: Territory::DE,
        }
    }

    #[test]
    fn each_role_gets_its_default_scope_and_only_its_allowed_scopes() {
        use Scope::*;
        let cases = [
            (Role::Sales, None, Some(Own)),
            (Role::Sales, Some(Territory), None),
            (Role::Sales, Some(All), None),
            (Role::Manager, None, Some(Territory)),
            (Role::Manager, Some(Own), Some(Own)),
            (Role::Manager, Some(All), None),
            (Role::Viewer, None, Some(Territory)),
            (Role::Viewer, Some(Own), None),
            (Role::Admin, None, Some(All)),
            (Role::Admin, Some(Own), Some(Own)),
        ];
        for (role, asked, expected) in cases {
            assert_eq!(
                scope_for(&p(role), asked).ok(),
                expected,
                "{role:?} asking {asked:?}"
            );
        }
    }

    #[test]
    fn every_scope_statement_has_its_predicate_and_no_placeholder_left() {
        let s = Statements::default();
        for scope in [Scope::Own, Scope::Territory, Scope::All] {
            assert!(!s.get(scope).contains("{{SCOPE}}"));
        }
        assert!(s.own.contains("owner_user_id = $2::text"));
        assert!(s.territory.contains("territory = $3::text"));
    }

    #[test]
    fn redaction_removes_lead_ids_and_names_from_both_lists() {
        let mut body = serde_json::json!({
            "recentActivities": [{"leadId": "x", "companyName": "Sonne", "type": "CALL"}],
            "recentFollowUps": [{"leadId": "x", "companyName": "Sonne", "followUpType": "T3"}],
        });
        redact(&mut body);
        assert_eq!(
            body["recentActivities"][0],
            serde_json::json!({"type": "CALL"})
        );
        assert_eq!(
            body["recentFollowUps"][0],
            serde_json::json!({"followUpType": "T3"})
        );
    }
}
