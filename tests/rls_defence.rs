//! Defence in depth in the database (migration 0003 and the grants of `freshplan migrate`): each
//! rule the handlers follow also holds for a raw SQL statement of the application role with an
//! identity set, so a bug in a handler (or an injected statement) cannot break it. Every test
//! runs as the application role (never as superuser; the superuser only creates a stranger role).

mod common;

use common::{vault_from, TestDb};
use freshplan::identity::Principal;
use sqlx::{Connection, Executor, PgConnection, PgPool};
use uuid::Uuid;

/// A migrated database with the demo users, and a pool of the application role.
async fn fixture() -> (TestDb, PgPool) {
    let db = TestDb::create().await;
    let pool = db.app_pool().await;
    freshplan::demo::seed(&pool, &vault_from(&db.settings(&[])), 0)
        .await
        .expect("demo users");
    (db, pool)
}

fn principal(user: &str) -> Principal {
    if user == "system" {
        Principal::system()
    } else {
        freshplan::demo::principal(user).expect("demo user")
    }
}

/// `SQLSTATE: message` of a database error.
fn db_error(e: sqlx::Error) -> String {
    match e.as_database_error() {
        Some(d) => format!("{}: {}", d.code().unwrap_or_default(), d.message()),
        None => panic!("not a database error: {e}"),
    }
}

/// Runs `sql` as a demo user (or `system`) in a transaction of its own, committed on success:
/// the rows affected, or `SQLSTATE: message`.
async fn run_as(pool: &PgPool, user: &str, sql: &str) -> Result<u64, String> {
    let mut tx = freshplan::db::begin_as(pool, &principal(user))
        .await
        .unwrap();
    let rows = tx.execute(sql).await.map_err(db_error)?.rows_affected();
    tx.commit().await.map_err(db_error)?;
    Ok(rows)
}

#[track_caller]
fn assert_refused(result: Result<u64, String>, sqlstate: &str, what: &str) {
    match result {
        Err(e) => assert!(
            e.starts_with(sqlstate),
            "{what}: expected SQLSTATE {sqlstate}, got {e}"
        ),
        Ok(n) => panic!("{what}: accepted ({n} rows), must be refused with {sqlstate}"),
    }
}

#[track_caller]
fn assert_one_row(result: Result<u64, String>, what: &str) {
    assert_eq!(result, Ok(1), "{what}");
}

fn insert_lead_sql(id: Uuid, territory: &str, owner: &str, collaborators: &[&str]) -> String {
    let collaborators = collaborators
        .iter()
        .map(|c| format!("'{c}'"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "INSERT INTO leads (id, company_name, territory, business_type, source, owner_user_id, \
           collaborators, status, registered_at, created_at, updated_at, created_by, updated_by) \
         VALUES ('{id}', 'Defence GmbH', '{territory}', 'HOTEL', 'MESSE', '{owner}', \
           ARRAY[{collaborators}]::text[], 'REGISTERED', now(), now(), now(), '{owner}', '{owner}')"
    )
}

/// A lead inserted by `writer` (who must be allowed to); returns its id.
async fn lead(
    pool: &PgPool,
    writer: &str,
    territory: &str,
    owner: &str,
    collaborators: &[&str],
) -> Uuid {
    let id = Uuid::now_v7();
    let sql = insert_lead_sql(id, territory, owner, collaborators);
    assert_one_row(run_as(pool, writer, &sql).await, "setting up a lead");
    id
}

#[tokio::test]
async fn a_collaborator_cannot_change_owner_or_collaborators_but_can_touch_last_activity_at() {
    let (_db, pool) = fixture().await;
    let id = lead(
        &pool,
        "sales-de-2",
        "DE",
        "sales-de-2",
        &["manager-de", "sales-de-1"],
    )
    .await;

    for (what, set) in [
        ("take the lead", "owner_user_id = 'sales-de-1'"),
        ("give the lead away", "owner_user_id = 'manager-de'"),
        (
            "drop the other collaborators",
            "collaborators = '{sales-de-1}'",
        ),
        (
            "add a collaborator",
            "collaborators = '{manager-de,sales-de-1,viewer-de}'",
        ),
        ("remove themselves", "collaborators = '{}'"),
        // The handler lets only the owner, a manager of the territory or an admin PATCH.
        ("change the status", "status = 'ACTIVE'"),
        ("change a flag", "email_consent = true"),
    ] {
        assert_refused(
            run_as(
                &pool,
                "sales-de-1",
                &format!("UPDATE leads SET {set} WHERE id = '{id}'"),
            )
            .await,
            "42501",
            &format!("a collaborator may not {what}"),
        );
    }

    // What logging an activity does (repo::touch_activity): move last_activity_at forward.
    let touch = format!(
        "UPDATE leads SET last_activity_at = GREATEST(last_activity_at, now()) WHERE id = '{id}'"
    );
    assert_one_row(
        run_as(&pool, "sales-de-1", &touch).await,
        "a collaborator logs an activity",
    );
    assert_refused(
        run_as(
            &pool,
            "sales-de-1",
            &format!(
                "UPDATE leads SET last_activity_at = last_activity_at - interval '1 day' WHERE id = '{id}'"
            ),
        )
        .await,
        "42501",
        "a collaborator may not move last_activity_at back",
    );

    // The owner (and a manager of the territory) still may.
    assert_one_row(
        run_as(
            &pool,
            "sales-de-2",
            &format!(
                "UPDATE leads SET collaborators = '{{}}', status = 'ACTIVE' WHERE id = '{id}'"
            ),
        )
        .await,
        "the owner changes collaborators and status",
    );
    assert_one_row(
        run_as(
            &pool,
            "manager-de",
            &format!("UPDATE leads SET owner_user_id = 'sales-de-1', collaborators = '{{sales-de-2}}' WHERE id = '{id}'"),
        )
        .await,
        "a manager of the territory reassigns",
    );
    // The former owner is a collaborator now and holds no more than one.
    assert_refused(
        run_as(
            &pool,
            "sales-de-2",
            &format!("UPDATE leads SET owner_user_id = 'sales-de-2' WHERE id = '{id}'"),
        )
        .await,
        "42501",
        "the former owner, now a collaborator, may not take the lead back",
    );
}

#[tokio::test]
async fn a_lead_cannot_be_given_to_a_viewer_or_to_a_user_of_another_territory() {
    let (_db, pool) = fixture().await;
    let id = lead(&pool, "sales-de-1", "DE", "sales-de-1", &[]).await;

    for writer in ["manager-de", "admin", "system"] {
        for (what, set) in [
            ("to a viewer", "owner_user_id = 'viewer-de'"),
            ("to an admin", "owner_user_id = 'admin'"),
            ("to a salesperson of AT", "owner_user_id = 'sales-at-1'"),
            ("to a manager of AT", "owner_user_id = 'manager-at'"),
            ("to someone who is no user", "owner_user_id = 'nobody'"),
            ("a collaborator of AT", "collaborators = '{sales-at-1}'"),
            (
                "a collaborator who is no user",
                "collaborators = '{nobody}'",
            ),
        ] {
            assert_refused(
                run_as(
                    &pool,
                    writer,
                    &format!("UPDATE leads SET {set} WHERE id = '{id}'"),
                )
                .await,
                "23514",
                &format!("{writer} gives a DE lead {what}"),
            );
        }
    }
    // A sales owner handing the lead over (staying a collaborator, so that row-level security
    // lets the row through and the ownership rule is what refuses it).
    for (what, owner) in [
        ("to a viewer", "viewer-de"),
        ("to a salesperson of AT", "sales-at-1"),
    ] {
        assert_refused(
            run_as(
                &pool,
                "sales-de-1",
                &format!("UPDATE leads SET owner_user_id = '{owner}', collaborators = '{{sales-de-1}}' WHERE id = '{id}'"),
            )
            .await,
            "23514",
            &format!("sales-de-1 gives their DE lead {what}"),
        );
    }
    // Moving the lead to another territory leaves it with an owner of the wrong territory.
    assert_refused(
        run_as(
            &pool,
            "admin",
            &format!("UPDATE leads SET territory = 'AT' WHERE id = '{id}'"),
        )
        .await,
        "23514",
        "admin moves a lead away from its owner's territory",
    );

    // New leads: the same rule for owner and collaborators.
    for (writer, territory, owner, collaborators) in [
        ("manager-de", "DE", "viewer-de", &[][..]),
        ("manager-de", "DE", "sales-at-1", &[]),
        ("admin", "DE", "viewer-de", &[]),
        ("admin", "AT", "sales-de-1", &[]),
        ("system", "DE", "nobody", &[]),
        ("sales-de-1", "DE", "sales-de-1", &["sales-at-1"]),
        ("manager-de", "DE", "sales-de-1", &["nobody"]),
    ] {
        assert_refused(
            run_as(
                &pool,
                writer,
                &insert_lead_sql(Uuid::now_v7(), territory, owner, collaborators),
            )
            .await,
            "23514",
            &format!("{writer} creates a {territory} lead owned by {owner} with {collaborators:?}"),
        );
    }

    // Allowed: sales and managers of the territory; collaborators of the territory (any role,
    // as the handler validates them).
    assert_one_row(
        run_as(
            &pool,
            "manager-de",
            &format!("UPDATE leads SET owner_user_id = 'sales-de-2', collaborators = '{{sales-de-1,viewer-de}}' WHERE id = '{id}'"),
        )
        .await,
        "manager-de gives the lead to sales-de-2",
    );
    assert_one_row(
        run_as(
            &pool,
            "admin",
            &format!("UPDATE leads SET owner_user_id = 'manager-de' WHERE id = '{id}'"),
        )
        .await,
        "admin gives the lead to manager-de",
    );
    // A lead an admin or the system principal creates is owned by its creator (what the
    // handler does today); nobody else outside sales and managers of the territory.
    assert_one_row(
        run_as(
            &pool,
            "admin",
            &insert_lead_sql(Uuid::now_v7(), "AT", "admin", &[]),
        )
        .await,
        "admin creates a lead as its owner",
    );
}

fn outbox_sql(territory: &str, owner: &str, collaborators: &[&str]) -> String {
    let collaborators = collaborators
        .iter()
        .map(|c| format!("'{c}'"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "INSERT INTO outbox (event_id, idempotency_key, event_type, subject, territory, \
           owner_user_id, collaborators, envelope) \
         VALUES (gen_random_uuid(), gen_random_uuid(), 'dashboard.activity_logged', NULL, \
           '{territory}', '{owner}', ARRAY[{collaborators}]::text[], '{{}}')"
    )
}

#[tokio::test]
async fn outbox_rows_are_refused_outside_the_writers_territory_and_audience() {
    let (_db, pool) = fixture().await;
    for (writer, territory, owner, collaborators) in [
        ("manager-de", "AT", "sales-at-1", &[][..]),
        ("manager-at", "DE", "sales-de-1", &[]),
        ("sales-de-1", "AT", "sales-de-1", &[]),
        ("sales-de-1", "AT", "sales-at-1", &["sales-de-1"]),
        ("sales-de-1", "DE", "sales-de-2", &[]),
        ("viewer-de", "DE", "sales-de-1", &[]),
    ] {
        assert_refused(
            run_as(&pool, writer, &outbox_sql(territory, owner, collaborators)).await,
            "42501",
            &format!("{writer} publishes an event of {territory} for {owner} {collaborators:?}"),
        );
    }
    for (writer, territory, owner, collaborators) in [
        ("manager-de", "DE", "sales-de-2", &[][..]),
        ("sales-de-1", "DE", "sales-de-1", &[]),
        // A collaborator's activity, and an owner's hand-over (the old owner stays in the
        // audience of the assignment event).
        ("sales-de-1", "DE", "sales-de-2", &["sales-de-1"]),
        ("admin", "AT", "sales-at-1", &[]),
        ("system", "CH", "sales-ch-1", &[]),
    ] {
        assert_one_row(
            run_as(&pool, writer, &outbox_sql(territory, owner, collaborators)).await,
            &format!("{writer} publishes an event of {territory} for {owner} {collaborators:?}"),
        );
    }
}

#[tokio::test]
async fn audit_rows_are_refused_under_another_actor_role_or_territory() {
    let (_db, pool) = fixture().await;
    let audit = |actor: &str, role: &str, territory: &str| {
        format!(
            "INSERT INTO audit_log (actor_user_id, actor_role, action, entity_type, entity_id, territory) \
             VALUES ('{actor}', '{role}', 'LEAD_UPDATED', 'lead', 'x', {territory})"
        )
    };
    for (writer, actor, role, territory) in [
        ("sales-de-1", "sales-de-2", "sales", "'DE'"),
        ("sales-de-1", "sales-de-1", "admin", "'DE'"),
        ("manager-de", "admin", "admin", "'DE'"),
        ("manager-de", "system", "system", "NULL"),
        ("sales-de-1", "sales-de-1", "sales", "'AT'"),
        ("manager-de", "manager-de", "manager", "'CH'"),
        ("admin", "sales-de-1", "sales", "'DE'"),
    ] {
        assert_refused(
            run_as(&pool, writer, &audit(actor, role, territory)).await,
            "42501",
            &format!("{writer} writes an audit row as {actor}/{role} in {territory}"),
        );
    }
    for (writer, actor, role, territory) in [
        ("sales-de-1", "sales-de-1", "sales", "'DE'"),
        ("manager-de", "manager-de", "manager", "'DE'"),
        ("admin", "admin", "admin", "'AT'"),
        ("system", "system", "system", "NULL"),
    ] {
        assert_one_row(
            run_as(&pool, writer, &audit(actor, role, territory)).await,
            &format!("{writer} writes its own audit row in {territory}"),
        );
    }
}

#[tokio::test]
async fn the_application_role_cannot_update_or_delete_users_and_only_the_system_inserts_them() {
    let (db, pool) = fixture().await;
    for writer in ["admin", "system"] {
        assert_refused(
            run_as(
                &pool,
                writer,
                "UPDATE users SET role = 'sales' WHERE id = 'viewer-de'",
            )
            .await,
            "42501",
            &format!("{writer} promotes a viewer"),
        );
        assert_refused(
            run_as(
                &pool,
                writer,
                "UPDATE users SET territory = 'AT' WHERE id = 'sales-de-1'",
            )
            .await,
            "42501",
            &format!("{writer} moves a user"),
        );
        assert_refused(
            run_as(&pool, writer, "DELETE FROM users WHERE id = 'sales-de-2'").await,
            "42501",
            &format!("{writer} deletes a user"),
        );
    }
    assert_refused(
        run_as(
            &pool,
            "admin",
            "INSERT INTO users (id, name, role, territory) VALUES ('intruder', 'I', 'sales', 'DE')",
        )
        .await,
        "42501",
        "admin inserts a user",
    );
    // The demo seed (as system) still inserts users and skips existing ones.
    freshplan::demo::seed(&pool, &vault_from(&db.settings(&[])), 0)
        .await
        .expect("seeding twice");
    assert_one_row(
        run_as(
            &pool,
            "system",
            "INSERT INTO users (id, name, role, territory) VALUES ('sales-de-3', 'S', 'sales', 'DE') \
             ON CONFLICT (id) DO NOTHING",
        )
        .await,
        "system inserts a user",
    );
    let role: String = sqlx::query_scalar("SELECT role FROM users WHERE id = 'viewer-de'")
        .fetch_one(&mut db.superuser().await)
        .await
        .unwrap();
    assert_eq!(role, "viewer");

    // Operators change users as the owner role with an admin identity (`freshplan users …`,
    // through the administrator URL), the one path the policies leave open for updates.
    let mut operator = db.superuser().await;
    let mut tx = operator.begin().await.unwrap();
    tx.execute(
        "SET LOCAL ROLE freshplan_owner; \
         SELECT set_config('app.user_id', 'cli:ops', true), set_config('app.role', 'admin', true), \
                set_config('app.territory', 'DE', true)",
    )
    .await
    .unwrap();
    let changed = tx
        .execute("UPDATE users SET name = 'Vera Viewer' WHERE id = 'viewer-de'")
        .await
        .unwrap();
    assert_eq!(
        changed.rows_affected(),
        1,
        "the operator path updates users"
    );
    tx.rollback().await.unwrap();
}

#[tokio::test]
async fn the_application_role_cannot_advance_the_outbox_or_audit_sequences() {
    let (db, pool) = fixture().await;
    let mut conn = PgConnection::connect(&db.app_url()).await.unwrap();
    for seq in ["outbox_position_seq", "audit_log_id_seq"] {
        for sql in [
            format!("SELECT nextval('{seq}')"),
            format!("SELECT setval('{seq}', 1000000)"),
        ] {
            let e = conn
                .execute(sql.as_str())
                .await
                .map(|r| r.rows_affected())
                .map_err(db_error);
            assert_refused(e, "42501", &sql);
        }
    }
    // Identity columns need no privilege on their sequence: events and audit rows are written,
    // and the doorbell still reads the newest position.
    assert_one_row(
        run_as(&pool, "system", &outbox_sql("DE", "sales-de-1", &[])).await,
        "system publishes an event",
    );
    assert_one_row(
        run_as(
            &pool,
            "system",
            "INSERT INTO audit_log (actor_user_id, actor_role, action, entity_type, entity_id) \
             VALUES ('system', 'system', 'X', 'lead', 'x')",
        )
        .await,
        "system writes an audit row",
    );
    let last: i64 = sqlx::query_scalar("SELECT last_value FROM outbox_position_seq")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(last, 1);
}

#[tokio::test]
async fn only_the_application_role_may_connect_and_it_cannot_create_temp_tables() {
    let (db, _pool) = fixture().await;
    let stranger = format!(
        "fp_test_stranger_{}",
        &Uuid::new_v4().simple().to_string()[..12]
    );
    let mut su = db.superuser().await;
    su.execute(format!("CREATE ROLE {stranger} LOGIN").as_str())
        .await
        .unwrap();
    let url = db
        .app_url()
        .replace("freshplan_app@", &format!("{stranger}@"));
    let refused = match PgConnection::connect(&url).await {
        Ok(c) => {
            c.close().await.unwrap();
            Ok(0)
        }
        Err(e) => Err(db_error(e)),
    };
    su.execute(format!("DROP ROLE {stranger}").as_str())
        .await
        .unwrap();
    assert_refused(
        refused,
        "42501",
        "a role other than the application role connects",
    );

    let mut app = PgConnection::connect(&db.app_url()).await.unwrap();
    let temp = app
        .execute("CREATE TEMP TABLE scratch (a int)")
        .await
        .map(|r| r.rows_affected())
        .map_err(db_error);
    assert_refused(temp, "42501", "the application role creates a temp table");
}
