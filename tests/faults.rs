//! Faults of the surroundings (issue 13): PostgreSQL stopped and started under load, the service
//! killed with SIGKILL, a transaction idle for longer than the inbox retention, the database
//! refusing new connections. Each ends with a ledger: every committed change has exactly one
//! outbox row, every outbox row was applied exactly once by the durable consumer (inbox and
//! projection), and a stream subscriber saw every event of its audience exactly once (by
//! idempotency key). The figures are printed (`FAULT …` lines) for docs/reliability.md.
//!
//! Tests that stop a PostgreSQL server use a private cluster of their own (never the shared one
//! on 5432); a connection limit is put on an application role of the test's own.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde_json::Value;
use sqlx::PgConnection;

/// The stream's per-subscriber queue in these tests. A subscriber that falls behind gets a
/// `resync` instead of the events it missed (tests/events_stream.rs checks that); on a shared
/// 2-core machine a CPU-starved test client must not be mistaken for a loss, so the queue is
/// large here and every test asserts that no `resync` happened.
const SSE_QUEUE: (&str, &str) = ("FRESHPLAN_EVENTS_SSE_QUEUE_SIZE", "20000");

// ---- A subscriber that reconnects with Last-Event-ID ----------------------------------------

/// An admin's stream that reconnects with `Last-Event-ID` whenever it ends (the service or the
/// database went away) and records every frame's (position, idempotency key).
struct Subscriber {
    seen: Arc<Mutex<Vec<(i64, String)>>>,
    resyncs: Arc<AtomicUsize>,
    connects: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Subscriber {
    /// Starts at `Last-Event-ID: 0` (everything in the outbox, then live), so nothing written
    /// before the first connection is missed. `base` may change (a restarted service).
    fn start(base: Arc<Mutex<String>>, bearer: String) -> Subscriber {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let resyncs = Arc::new(AtomicUsize::new(0));
        let connects = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let task = {
            let (seen, resyncs, connects, stop) = (
                seen.clone(),
                resyncs.clone(),
                connects.clone(),
                stop.clone(),
            );
            tokio::spawn(async move {
                let client = reqwest::Client::builder()
                    .connect_timeout(Duration::from_secs(2))
                    .build()
                    .unwrap();
                let mut last = 0i64;
                while !stop.load(Ordering::SeqCst) {
                    let url = format!("{}/api/cockpit/stream", base.lock().unwrap());
                    let response = client
                        .get(url)
                        .header("Authorization", &bearer)
                        .header("Last-Event-ID", last.to_string())
                        .send()
                        .await;
                    let Ok(response) = response.map_err(|_| ()).and_then(|r| {
                        if r.status() == 200 {
                            Ok(r)
                        } else {
                            Err(())
                        }
                    }) else {
                        // Reconnect backoff of a client (the service is down).
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    };
                    connects.fetch_add(1, Ordering::SeqCst);
                    let mut events = response.bytes_stream().eventsource();
                    while !stop.load(Ordering::SeqCst) {
                        let next =
                            match tokio::time::timeout(Duration::from_millis(200), events.next())
                                .await
                            {
                                Err(_) => continue,
                                Ok(n) => n,
                            };
                        let Some(Ok(ev)) = next else { break };
                        if ev.event == "resync" {
                            resyncs.fetch_add(1, Ordering::SeqCst);
                            continue;
                        }
                        let Ok(position) = ev.id.parse::<i64>() else {
                            continue;
                        };
                        let data: Value = serde_json::from_str(&ev.data).unwrap_or(Value::Null);
                        let key = data["idempotencykey"].as_str().unwrap_or("").to_string();
                        seen.lock().unwrap().push((position, key));
                        last = last.max(position);
                    }
                }
            })
        };
        Subscriber {
            seen,
            resyncs,
            connects,
            stop,
            task,
        }
    }

    fn keys(&self) -> HashMap<String, usize> {
        let mut n = HashMap::new();
        for (_, k) in self.seen.lock().unwrap().iter() {
            *n.entry(k.clone()).or_insert(0) += 1;
        }
        n
    }

    async fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.task.await;
    }
}

// ---- The ledger ------------------------------------------------------------------------------

/// What the ledger found after recovery.
#[derive(Debug)]
struct Ledger {
    outbox: usize,
    /// Committed leads without exactly one `lead_created` outbox row.
    changes_without_one_event: i64,
    /// Outbox rows the durable consumer has no inbox row for.
    not_applied: i64,
    /// Sum of the projection minus the outbox rows (> 0: something applied twice).
    projection_excess: i64,
    /// Events the subscriber never saw.
    lost: usize,
    /// Events the subscriber saw more than once.
    doubled: usize,
    /// `resync` events the subscriber got (it fell behind): must be 0 here.
    resyncs: usize,
}

impl Ledger {
    fn assert_clean(&self, what: &str) {
        assert_eq!(self.changes_without_one_event, 0, "{what}: {self:?}");
        assert_eq!(self.not_applied, 0, "{what}: {self:?}");
        assert_eq!(self.projection_excess, 0, "{what}: {self:?}");
        assert_eq!(self.lost, 0, "{what}: {self:?}");
        assert_eq!(self.doubled, 0, "{what}: {self:?}");
        assert_eq!(
            self.resyncs, 0,
            "{what}: the subscriber fell behind: {self:?}"
        );
    }
}

/// Every outbox key, as text.
async fn outbox_keys(su: &mut PgConnection) -> Vec<String> {
    sqlx::query_scalar("SELECT idempotency_key::text FROM outbox ORDER BY position")
        .fetch_all(su)
        .await
        .unwrap()
}

async fn scalar(su: &mut PgConnection, sql: &str) -> i64 {
    let v: Option<i64> = sqlx::query_scalar(sql).fetch_one(su).await.unwrap();
    v.unwrap_or(0)
}

/// Waits until the durable consumer applied every outbox row and the subscriber saw every key,
/// then takes the ledger.
async fn settle_and_count(su: &mut PgConnection, sub: &Subscriber, within: Duration) -> Ledger {
    let keys = outbox_keys(su).await;
    let deadline = Instant::now() + within;
    loop {
        let applied = scalar(
            su,
            "SELECT count(*) FROM outbox o WHERE EXISTS (SELECT 1 FROM inbox i \
              WHERE i.consumer = 'lead-event-handler' AND i.idempotency_key = o.idempotency_key)",
        )
        .await as usize;
        let seen = sub.keys();
        if applied == keys.len() && keys.iter().all(|k| seen.contains_key(k)) {
            break;
        }
        if Instant::now() >= deadline {
            break; // the ledger below says what is missing
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen = sub.keys();
    let outbox = keys.len() as i64;
    Ledger {
        outbox: keys.len(),
        changes_without_one_event: scalar(
            su,
            "SELECT count(*) FROM leads l WHERE (SELECT count(*) FROM outbox o \
              WHERE o.subject = l.id::text AND o.event_type = 'dashboard.lead_created') <> 1",
        )
        .await,
        not_applied: outbox
            - scalar(
                su,
                "SELECT count(*) FROM outbox o WHERE EXISTS (SELECT 1 FROM inbox i \
                  WHERE i.consumer = 'lead-event-handler' AND i.idempotency_key = o.idempotency_key)",
            )
            .await,
        projection_excess: scalar(su, "SELECT sum(events)::bigint FROM cockpit_daily_events")
            .await
            - outbox,
        lost: keys.iter().filter(|k| !seen.contains_key(*k)).count(),
        doubled: seen.values().filter(|n| **n > 1).count(),
        resyncs: sub.resyncs.load(Ordering::SeqCst),
    }
}

// ---- Load and what it was answered ----------------------------------------------------------

/// One answer of the load.
#[derive(Debug, Clone)]
struct Answer {
    status: u16,
    took: Duration,
    problem: bool,
    retry_after: bool,
    type_: String,
}

/// Writers creating leads (and readers listing them) against `base` until `stop`; every answer
/// recorded. A transport error (the service itself is gone) is recorded as status 0.
fn load(
    base: Arc<Mutex<String>>,
    bearer: String,
    writers: usize,
    stop: Arc<AtomicBool>,
) -> (Arc<Mutex<Vec<Answer>>>, Vec<tokio::task::JoinHandle<()>>) {
    let answers = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (base, bearer, stop, answers) =
            (base.clone(), bearer.clone(), stop.clone(), answers.clone());
        tasks.push(tokio::spawn(async move {
            // A hang shows as a timeout (status 0 with took ≥ 20 s), never as a stuck test.
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .unwrap();
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                i += 1;
                let url = base.lock().unwrap().clone();
                let started = Instant::now();
                let request = if i % 4 == 0 {
                    client.get(format!("{url}/api/leads?size=5"))
                } else {
                    client
                        .post(format!("{url}/api/leads"))
                        .json(&TestApp::lead_body(&format!("Fault writer {w} lead {i}")))
                };
                let r = request.header("Authorization", &bearer).send().await;
                let answer = match r {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        let problem = r
                            .headers()
                            .get("content-type")
                            .is_some_and(|v| v == "application/problem+json");
                        let retry_after = r.headers().contains_key("retry-after");
                        let body: Value = r.json().await.unwrap_or(Value::Null);
                        Answer {
                            status,
                            took: started.elapsed(),
                            problem,
                            retry_after,
                            type_: body["type"].as_str().unwrap_or("").to_string(),
                        }
                    }
                    Err(_) => Answer {
                        status: 0,
                        took: started.elapsed(),
                        problem: false,
                        retry_after: false,
                        type_: String::new(),
                    },
                };
                let failed = answer.status != 201 && answer.status != 200;
                answers.lock().unwrap().push(answer);
                if failed {
                    // A client honouring Retry-After would wait longer; keep the pressure on.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }));
    }
    (answers, tasks)
}

/// Stops the load and returns its answers.
async fn finish(
    stop: Arc<AtomicBool>,
    answers: Arc<Mutex<Vec<Answer>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
) -> Vec<Answer> {
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await.unwrap();
    }
    let a = answers.lock().unwrap().clone();
    a
}

/// The distinct problem types of the 503 answers, by their slug.
fn slugs_503(answers: &[Answer]) -> Vec<String> {
    let mut s: Vec<String> = answers
        .iter()
        .filter(|a| a.status == 503)
        .map(|a| a.type_.rsplit('/').next().unwrap_or("").to_string())
        .collect();
    s.sort();
    s.dedup();
    s
}

/// Every answer a success or a 503 problem with Retry-After, none slower than `bound`.
fn assert_only_503_problems(answers: &[Answer], bound: Duration, what: &str) {
    for a in answers {
        match a.status {
            200 | 201 => {}
            503 => assert!(
                a.problem && a.retry_after && a.type_.starts_with("https://freshplan.de/problems/"),
                "{what}: a 503 without problem+json and Retry-After: {a:?}"
            ),
            _ => panic!("{what}: answered {a:?} (only 2xx or 503 problem+json expected)"),
        }
        assert!(
            a.took <= bound,
            "{what}: an answer took {:?}: {a:?}",
            a.took
        );
    }
}

async fn get_status(client: &reqwest::Client, url: &str) -> u16 {
    match client.get(url).send().await {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    }
}

fn count(answers: &[Answer], status: u16) -> usize {
    answers.iter().filter(|a| a.status == status).count()
}

// ---- (8) The database refuses new connections ----------------------------------------------

/// Drops a database and its own role when the test ends, passed or failed (a role is
/// cluster-wide: a failed test must not leave it behind on the shared server).
struct Cleanup(Option<OwnDb>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(db) = self.0.take() {
            let _ = std::thread::spawn(move || {
                if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    rt.block_on(db.drop_all());
                }
            })
            .join();
        }
    }
}

#[tokio::test]
async fn refused_database_connections_answer_503_problems_keep_readiness_up_and_the_listener_delivering_and_lose_nothing(
) {
    let role = format!(
        "fp_faults_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    );
    let db = OwnDb::create(&admin_url(), &role).await;
    let _cleanup = Cleanup(Some(db.clone()));
    let server = db.start(&[SSE_QUEUE]).await;
    let base = Arc::new(Mutex::new(server.url()));
    let client = reqwest::Client::new();
    let ready = format!("{}/q/health/ready", server.url());
    wait_until(PATIENCE, "ready", || async {
        get_status(&client, &ready).await == 200
    })
    .await;
    let sub = Subscriber::start(base.clone(), db.bearer("admin"));
    let mut su = db.superuser().await;

    let stop = Arc::new(AtomicBool::new(false));
    let (answers, tasks) = load(base.clone(), db.bearer("sales-de-1"), 4, stop.clone());
    wait_until(PATIENCE, "some writes before the fault", || async {
        count(&answers.lock().unwrap(), 201) >= 40
    })
    .await;

    // The fault: the role may open no further connection, and the request pool loses the ones
    // it has (so every request needs a new one). The listener's own connections stay.
    let listener_pid = server.state.listener_health.backend_pid();
    sqlx::query(&format!("ALTER ROLE {role} CONNECTION LIMIT 0"))
        .execute(&mut su)
        .await
        .unwrap();
    let terminated = scalar(
        &mut su,
        &format!(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
              WHERE usename = '{role}' AND application_name = 'freshplan'"
        ),
    )
    .await;
    let fault_start = Instant::now();
    let before_fault = answers.lock().unwrap().len();
    wait_until(
        Duration::from_secs(30),
        "requests refused with 503",
        || async {
            answers.lock().unwrap()[before_fault..]
                .iter()
                .filter(|a| a.status == 503)
                .count()
                >= 8
        },
    )
    .await;
    // Meanwhile another writer (not limited) commits events: the listener still delivers them.
    let direct_pool = sqlx::PgPool::connect(&url_on(&db.admin, "postgres", &db.name))
        .await
        .unwrap();
    let mut direct_keys = Vec::new();
    for _ in 0..20 {
        let ev = activity_event("sales-de-1", freshplan::territory::Territory::DE);
        direct_keys.push(ev.key.to_string());
        let mut tx = direct_pool.begin().await.unwrap();
        freshplan::events::outbox::append(&mut tx, &ev)
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
    wait_until(
        PATIENCE,
        "events committed during the refusal reach the stream",
        || async {
            let seen = sub.keys();
            direct_keys.iter().all(|k| seen.contains_key(k))
        },
    )
    .await;
    assert_eq!(
        server.state.listener_health.backend_pid(),
        listener_pid,
        "the listener kept its connection"
    );
    let refused_for = fault_start.elapsed();
    // Readiness has a connection of its own: a refusal of new connections alone does not take
    // the instance out of the load balancer (the 503s above tell the clients to retry).
    assert_eq!(
        get_status(&client, &ready).await,
        200,
        "readiness stays UP while only new connections are refused"
    );

    // Connections free up.
    sqlx::query(&format!("ALTER ROLE {role} CONNECTION LIMIT -1"))
        .execute(&mut su)
        .await
        .unwrap();
    let lifted = Instant::now();
    let after_lift = answers.lock().unwrap().len();
    wait_until(PATIENCE, "writes succeed again", || async {
        answers.lock().unwrap()[after_lift..]
            .iter()
            .any(|a| a.status == 201)
    })
    .await;
    let recovery = lifted.elapsed();
    wait_until(PATIENCE, "more writes after the recovery", || async {
        answers.lock().unwrap()[after_lift..]
            .iter()
            .filter(|a| a.status == 201)
            .count()
            >= 20
    })
    .await;
    let answers = finish(stop, answers, tasks).await;
    assert_only_503_problems(&answers, Duration::from_secs(8), "refused connections");

    let ledger = settle_and_count(&mut su, &sub, Duration::from_secs(20)).await;
    println!(
        "FAULT refused-connections: requests={} ok={} 503={} terminated_pool_connections={terminated} \
         refused_for={refused_for:?} events={} lost={} doubled={} applied_twice={} recovery={recovery:?} \
         max_answer={:?} resyncs={} stream_connects={} problem_types={:?}",
        answers.len(),
        count(&answers, 201) + count(&answers, 200),
        count(&answers, 503),
        ledger.outbox,
        ledger.lost,
        ledger.doubled,
        ledger.projection_excess.max(0),
        answers.iter().map(|a| a.took).max().unwrap_or_default(),
        sub.resyncs.load(Ordering::SeqCst),
        sub.connects.load(Ordering::SeqCst),
        slugs_503(&answers),
    );
    ledger.assert_clean("refused connections");
    assert!(count(&answers, 503) >= 8);
    sub.stop().await;
    server.stop().await;
    direct_pool.close().await;
    drop(su);
}

// ---- (7) A transaction idle for longer than the inbox retention ----------------------------

#[tokio::test]
async fn a_transaction_idle_past_the_inbox_retention_holds_the_cursor_shows_the_lag_bounds_listener_memory_and_applies_nothing_twice(
) {
    // Retention shortened by configuration: outbox 1.8 s, inbox 3.6 s, the job every second;
    // the listener remembers at most 100 rows ahead of the durable cursor.
    let env = [
        ("FRESHPLAN_EVENTS_OUTBOX_RETENTION_HOURS", "0.0005"),
        ("FRESHPLAN_EVENTS_INBOX_RETENTION_HOURS", "0.001"),
        ("FRESHPLAN_EVENTS_RETENTION_INTERVAL_SECONDS", "1"),
        ("FRESHPLAN_EVENTS_MAX_UNSETTLED_ROWS", "100"),
        SSE_QUEUE,
    ];
    let mut app = TestApp::spawn_with(&env).await;
    wait_until(PATIENCE, "ready", || async {
        app.get("admin", "/q/health/ready").await.status() == 200
    })
    .await;
    let base = Arc::new(Mutex::new(app.url.clone()));
    let sub = Subscriber::start(base.clone(), app.bearer("admin"));

    // A session that took a transaction id and then sits idle in its transaction.
    let mut idle = app.db.superuser().await;
    sqlx::query("BEGIN").execute(&mut idle).await.unwrap();
    let idle_xid: i64 = sqlx::query_scalar("SELECT pg_current_xact_id()::text::bigint")
        .fetch_one(&mut idle)
        .await
        .unwrap();
    let idle_since = Instant::now();

    const WRITES: usize = 150;
    for i in 0..WRITES {
        app.create_lead("sales-de-1", TestApp::lead_body(&format!("Idle {i}")))
            .await;
    }
    let mut su = app.db.superuser().await;
    // Live delivery went on up to the listener's bound, then waits for the cursor.
    wait_until(PATIENCE, "100 rows applied ahead of the cursor", || async {
        app.count("SELECT count(*) FROM inbox").await == 100
    })
    .await;
    let inbox_retention = Duration::from_secs_f64(0.001 * 3600.0);
    wait_until(
        Duration::from_secs(30),
        "the idle transaction is older than the inbox retention and the lag shows it",
        || async {
            let lag = app
                .metric("freshplan_outbox_lag_seconds{consumer=\"lead-event-handler\"}")
                .await;
            lag > inbox_retention.as_secs_f64() + 1.5
        },
    )
    .await;
    let lag = app
        .metric("freshplan_outbox_lag_seconds{consumer=\"lead-event-handler\"}")
        .await;
    // The retention job ran meanwhile (every second) and pruned no inbox row of an event the
    // durable cursor has not passed, and no such outbox row.
    assert_eq!(
        app.count("SELECT count(*) FROM inbox").await,
        100,
        "inbox rows beyond the durable cursor survive retention"
    );
    assert_eq!(
        app.count("SELECT count(*) FROM outbox").await,
        WRITES as i64
    );
    let cursor_txid = scalar(
        &mut su,
        "SELECT coalesce(max(txid::text::bigint), 0) FROM event_cursors",
    )
    .await;
    assert!(
        cursor_txid < idle_xid,
        "the durable cursor ({cursor_txid}) cannot pass the idle transaction ({idle_xid})"
    );
    // The bookkeeping is bounded, and readiness shows the lag but stays UP.
    let unsettled = app.state().listener_health.unsettled();
    assert_eq!(unsettled, 100, "at most max-unsettled-rows remembered");
    let r = app.get("admin", "/q/health/ready").await;
    assert_eq!(
        r.status(),
        200,
        "a held-back cursor alone keeps the instance ready"
    );
    let body: Value = r.json().await.unwrap();
    let handler = &body["checks"][1]["data"];
    assert_eq!(handler["unsettledRows"], "100", "{body}");
    let shown: f64 = handler["outboxLagSeconds"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(shown > inbox_retention.as_secs_f64(), "{body}");

    // A restart while the transaction is still open reads every row beyond the cursor again:
    // the inbox says `duplicate` for each one already applied.
    app.restart(None).await;
    *base.lock().unwrap() = app.url.clone();
    wait_until(PATIENCE, "ready after the restart", || async {
        app.get("admin", "/q/health/ready").await.status() == 200
    })
    .await;
    // The transaction ends; the cursor passes everything.
    sqlx::query("ROLLBACK").execute(&mut idle).await.unwrap();
    let held = idle_since.elapsed();
    let ended = Instant::now();
    wait_until(PATIENCE, "the cursor passes every row", || async {
        app.count(
            "SELECT count(*) FROM outbox o, event_cursors c \
              WHERE (o.txid, o.position) > (c.txid, c.position)",
        )
        .await
            == 0
    })
    .await;
    let recovery = ended.elapsed();
    wait_until(
        PATIENCE,
        "nothing remembered once the cursor passed",
        || async { app.state().listener_health.unsettled() == 0 },
    )
    .await;
    // The ledger, before retention prunes the passed outbox rows (1.8 s after they were written
    // and passed; the projection below is never pruned).
    let keys = outbox_keys(&mut su).await;
    let ledger = settle_and_count(&mut su, &sub, PATIENCE).await;
    println!(
        "FAULT idle-transaction: writes={WRITES} held={held:?} lag_seen={lag:.1}s \
         unsettled_max={unsettled} events={} lost={} doubled={} applied_twice={} recovery={recovery:?}",
        keys.len(),
        ledger.lost,
        ledger.doubled,
        ledger.projection_excess.max(0),
    );
    assert_eq!(
        scalar(
            &mut su,
            "SELECT sum(events)::bigint FROM cockpit_daily_events"
        )
        .await,
        WRITES as i64,
        "each event applied exactly once"
    );
    assert_eq!(ledger.lost, 0, "{ledger:?}");
    assert_eq!(ledger.doubled, 0, "{ledger:?}");
    assert_eq!(ledger.resyncs, 0, "{ledger:?}");
    assert_eq!(ledger.changes_without_one_event, 0, "{ledger:?}");
    sub.stop().await;
}

// ---- (3) The service is killed with SIGKILL and started again ------------------------------

/// A `freshplan serve` process, killed when dropped (a failing test leaves nothing running).
struct Service(std::process::Child);

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A free port below the kernel's ephemeral range (32768 and up), so that no `bind(:0)` of a
/// test running alongside can take it while the private cluster is stopped.
fn free_port_below_ephemeral() -> u16 {
    loop {
        let port = 20_000 + (uuid::Uuid::new_v4().as_u128() % 10_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// The real binary, as an operator runs it (no `--demo`: keys from the environment).
fn serve(db: &TestDb, port: u16) -> Service {
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_freshplan"))
        .args(["serve", "--bind", &format!("127.0.0.1:{port}")])
        .env("DATABASE_URL", db.app_url())
        .env("FRESHPLAN_ADMIN_DATABASE_URL", admin_url())
        .env("FRESHPLAN_AUTH_JWT_SECRET", JWT_SECRET)
        .env("FRESHPLAN_PII_KEYS", KEY_1)
        .env("FRESHPLAN_PII_LOOKUP_KEY", LOOKUP_KEY)
        .env("FRESHPLAN_EVENTS_POLL_INTERVAL_MS", "200")
        .env("FRESHPLAN_DATABASE_POOL_SIZE", "4")
        .env(SSE_QUEUE.0, SSE_QUEUE.1)
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("freshplan serve starts");
    Service(child)
}

#[tokio::test]
async fn a_service_killed_with_sigkill_mid_load_catches_up_and_a_resuming_stream_gets_every_event_once(
) {
    let db = TestDb::create().await;
    let settings = db.settings(&[]);
    let pool = db.app_pool().await;
    freshplan::demo::seed(&pool, &vault_from(&settings), 0)
        .await
        .expect("seed users");
    let auth = freshplan::auth::jwt::Authenticator::from_settings(&settings.jwt, false).unwrap();
    let bearer = |user: &str| {
        let p = freshplan::demo::principal(user).unwrap();
        format!("Bearer {}", auth.mint(&p, 3600).unwrap())
    };
    let client = reqwest::Client::new();

    let port = free_port();
    let mut service = serve(&db, port);
    let base = Arc::new(Mutex::new(format!("http://127.0.0.1:{port}")));
    let ready = |base: &Arc<Mutex<String>>| format!("{}/q/health/ready", base.lock().unwrap());
    let url = ready(&base);
    wait_until(Duration::from_secs(30), "the service is ready", || async {
        get_status(&client, &url).await == 200
    })
    .await;
    let sub = Subscriber::start(base.clone(), bearer("admin"));
    // One writer: its commits are in position order, so a stream resuming after the newest
    // position it saw misses nothing (docs/events.md, known limit, for concurrent writers).
    let stop = Arc::new(AtomicBool::new(false));
    let (answers, tasks) = load(base.clone(), bearer("sales-de-1"), 1, stop.clone());
    wait_until(PATIENCE, "writes through the service", || async {
        count(&answers.lock().unwrap(), 201) >= 60
    })
    .await;

    // kill -9 mid-load.
    service.0.kill().expect("SIGKILL");
    let status = service.0.wait().unwrap();
    assert!(!status.success(), "killed, not exited: {status:?}");
    let killed = Instant::now();

    // Writes go on into the database while no instance runs (another module on the same
    // database, as the application role under row-level security).
    let writer = freshplan::demo::principal("sales-de-2").unwrap();
    const DIRECT: usize = 100;
    for _ in 0..DIRECT / 10 {
        let mut tx = freshplan::db::begin_as(&pool, &writer).await.unwrap();
        for _ in 0..10 {
            let ev = activity_event("sales-de-2", freshplan::territory::Territory::DE);
            assert!(freshplan::events::outbox::append(&mut tx, &ev)
                .await
                .unwrap()
                .is_some());
        }
        tx.commit().await.unwrap();
    }
    let down_for = killed.elapsed();

    // Started again (on another port: the old one may linger in TIME_WAIT).
    let port = free_port();
    let started = Instant::now();
    let _service = serve(&db, port);
    *base.lock().unwrap() = format!("http://127.0.0.1:{port}");
    let url = ready(&base);
    wait_until(
        Duration::from_secs(30),
        "ready after the restart",
        || async { get_status(&client, &url).await == 200 },
    )
    .await;
    let ready_after = started.elapsed();
    let resumed = answers.lock().unwrap().len();
    wait_until(PATIENCE, "writes through the restarted service", || async {
        answers.lock().unwrap()[resumed..]
            .iter()
            .filter(|a| a.status == 201)
            .count()
            >= 40
    })
    .await;
    let answers = finish(stop, answers, tasks).await;
    let mut su = db.superuser().await;
    let ledger = settle_and_count(&mut su, &sub, Duration::from_secs(30)).await;
    let caught_up = started.elapsed();
    let transport_errors = count(&answers, 0);
    println!(
        "FAULT sigkill: requests={} ok={} transport_errors_while_dead={transport_errors} \
         direct_writes={DIRECT} down={down_for:?} events={} lost={} doubled={} applied_twice={} \
         ready_after_restart={ready_after:?} caught_up={caught_up:?} stream_connects={}",
        answers.len(),
        count(&answers, 201) + count(&answers, 200),
        ledger.outbox,
        ledger.lost,
        ledger.doubled,
        ledger.projection_excess.max(0),
        sub.connects.load(Ordering::SeqCst),
    );
    ledger.assert_clean("sigkill");
    assert!(
        sub.connects.load(Ordering::SeqCst) >= 2,
        "the stream resumed with Last-Event-ID"
    );
    assert_eq!(sub.resyncs.load(Ordering::SeqCst), 0);
    for a in &answers {
        assert!(
            matches!(a.status, 0 | 200 | 201) || (a.status == 503 && a.problem && a.retry_after),
            "only transport errors (the process is gone) or 2xx: {a:?}"
        );
    }
    sub.stop().await;
}

// ---- (2) PostgreSQL is stopped and started while in use -------------------------------------

/// A private PostgreSQL cluster in a folder of its own (never the shared server on 5432): the
/// same code `serve --demo` uses, which runs the server as the `postgres` user when the tests
/// run as root. Stopped and its folder removed when dropped.
struct PrivateCluster {
    data: std::path::PathBuf,
    admin: String,
    running: Option<freshplan::db::embedded::EmbeddedCluster>,
}

impl PrivateCluster {
    async fn start() -> PrivateCluster {
        assert!(
            freshplan::db::embedded::find_server_bin().is_some(),
            "the PostgreSQL server programs are not installed (.ci/run installs them)"
        );
        let port = free_port_below_ephemeral();
        let mut cluster = PrivateCluster {
            data: std::env::temp_dir().join(format!(
                "fp-faults-pg-{}",
                &uuid::Uuid::new_v4().simple().to_string()[..12]
            )),
            admin: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            running: None,
        };
        cluster.up().await;
        cluster
    }

    /// Starts the server (initialises the folder the first time); blocking work off the runtime.
    async fn up(&mut self) {
        let (data, admin) = (self.data.clone(), self.admin.clone());
        let running = tokio::task::spawn_blocking(move || {
            freshplan::db::embedded::EmbeddedCluster::start(&data, &admin)
        })
        .await
        .unwrap()
        .expect("private cluster starts");
        self.running = Some(running);
    }

    /// `pg_ctl stop -m fast`: sessions are terminated, in-flight transactions roll back.
    async fn down(&mut self) {
        if let Some(c) = self.running.take() {
            tokio::task::spawn_blocking(move || drop(c)).await.unwrap();
        }
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        drop(self.running.take());
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_stopped_and_started_under_load_answers_503_goes_unready_recovers_by_itself_and_loses_nothing(
) {
    let mut cluster = PrivateCluster::start().await;
    let db = OwnDb::create(&cluster.admin, "freshplan_app").await;
    let server = db.start(&[SSE_QUEUE]).await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let ready = format!("{}/q/health/ready", server.url());
    wait_until(PATIENCE, "ready", || async {
        get_status(&client, &ready).await == 200
    })
    .await;
    let listener_pid = server.state.listener_health.backend_pid();
    let base = Arc::new(Mutex::new(server.url()));
    let sub = Subscriber::start(base.clone(), db.bearer("admin"));
    let stop = Arc::new(AtomicBool::new(false));
    let (answers, tasks) = load(base.clone(), db.bearer("sales-de-1"), 4, stop.clone());
    wait_until(PATIENCE, "writes before the restart", || async {
        count(&answers.lock().unwrap(), 201) >= 40
    })
    .await;

    cluster.down().await;
    let stopped = Instant::now();
    let before = answers.lock().unwrap().len();
    wait_until(
        PATIENCE,
        "readiness DOWN while PostgreSQL is down",
        || async { get_status(&client, &ready).await == 503 },
    )
    .await;
    let down_after = stopped.elapsed();
    let body: Value = client
        .get(&ready)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["status"], "DOWN", "{body}");
    assert_eq!(body["checks"][0]["status"], "DOWN", "{body}");
    wait_until(
        Duration::from_secs(30),
        "requests answered 503 meanwhile",
        || async {
            answers.lock().unwrap()[before..]
                .iter()
                .filter(|a| a.status == 503)
                .count()
                >= 8
        },
    )
    .await;
    let outage = stopped.elapsed();

    cluster.up().await;
    let restarted = Instant::now();
    wait_until(Duration::from_secs(30), "readiness UP again", || async {
        get_status(&client, &ready).await == 200
    })
    .await;
    let ready_after = restarted.elapsed();
    let after = answers.lock().unwrap().len();
    wait_until(Duration::from_secs(30), "writes succeed again", || async {
        answers.lock().unwrap()[after..]
            .iter()
            .filter(|a| a.status == 201)
            .count()
            >= 20
    })
    .await;
    let writes_after = restarted.elapsed();
    let answers = finish(stop, answers, tasks).await;
    assert_ne!(
        server.state.listener_health.backend_pid(),
        listener_pid,
        "the listener reconnected"
    );
    assert_only_503_problems(&answers, Duration::from_secs(8), "PostgreSQL restart");

    let mut su = db.superuser().await;
    let ledger = settle_and_count(&mut su, &sub, Duration::from_secs(30)).await;
    println!(
        "FAULT postgresql-restart: requests={} ok={} 503={} outage={outage:?} readiness_down_after={down_after:?} \
         events={} lost={} doubled={} applied_twice={} ready_after_start={ready_after:?} \
         writes_after_start={writes_after:?} max_answer={:?} stream_connects={} resyncs={} problem_types={:?}",
        answers.len(),
        count(&answers, 201) + count(&answers, 200),
        count(&answers, 503),
        ledger.outbox,
        ledger.lost,
        ledger.doubled,
        ledger.projection_excess.max(0),
        answers.iter().map(|a| a.took).max().unwrap_or_default(),
        sub.connects.load(Ordering::SeqCst),
        sub.resyncs.load(Ordering::SeqCst),
        slugs_503(&answers),
    );
    ledger.assert_clean("PostgreSQL restart");
    sub.stop().await;
    drop(su);
    server.stop().await;
}
