//! The outbox → NATS JetStream relay against a real `nats-server -js` (started by each test on a
//! free port with a store folder of its own) and real PostgreSQL as the application role: every
//! committed event lands in the stream exactly once, in position order per lead, through SIGKILLs
//! of the real `freshplan relay` binary, a NATS outage under load and a takeover between two
//! relays.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use common::nats::{Nats, STREAM};
use common::{metric_in, wait_until, TestApp, TestDb};
use freshplan::db;
use freshplan::events::envelope::{self, Audience, EventType, NewEvent};
use freshplan::events::outbox;
use freshplan::identity::Principal;
use freshplan::territory::Territory;
use futures::StreamExt;
use rand::Rng;
use serde_json::{json, Value};
use sqlx::PgPool;
use uuid::Uuid;

/// Patience of a relay catching up (debug build, two busy cores).
const CATCH_UP: Duration = Duration::from_secs(45);

// ---- the real `freshplan relay` binary -----------------------------------------------------

/// A `freshplan relay` process, SIGKILLed on drop.
struct RelayProcess {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    metrics_url: String,
}

impl RelayProcess {
    async fn spawn(db: &TestDb, nats: &Nats) -> RelayProcess {
        Self::spawn_with(db, nats, &[]).await
    }

    async fn spawn_with(db: &TestDb, nats: &Nats, env: &[(&str, &str)]) -> RelayProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_freshplan"))
            .args(["relay", "--metrics-bind", "127.0.0.1:0"])
            .env_clear()
            .env("DATABASE_URL", db.app_url())
            .env("FRESHPLAN_RELAY_NATS_URL", nats.url())
            .env("FRESHPLAN_RELAY_POLL_INTERVAL_MS", "20")
            .env("FRESHPLAN_RELAY_BATCH_SIZE", "100")
            .env("RUST_LOG", "info,sqlx=warn")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start freshplan relay");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    lines.lock().unwrap().push(line);
                }
            });
        }
        let mut process = RelayProcess {
            child,
            lines,
            metrics_url: String::new(),
        };
        let listening = process.wait_for_log("relay metrics listening").await;
        process.metrics_url = format!(
            "http://{}/q/metrics",
            listening["fields"]["addr"].as_str().unwrap()
        );
        process
    }

    fn log(&self) -> Vec<Value> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    fn logged(&self, message: &str) -> Option<Value> {
        self.log()
            .into_iter()
            .find(|l| l["fields"]["message"] == message)
    }

    async fn wait_for_log(&self, message: &str) -> Value {
        wait_until(
            Duration::from_secs(30),
            &format!("log line `{message}`"),
            || async { self.logged(message).is_some() },
        )
        .await;
        self.logged(message).unwrap()
    }

    async fn metric(&self, sample: &str) -> f64 {
        match reqwest::get(&self.metrics_url).await {
            Ok(r) => metric_in(&r.text().await.unwrap_or_default(), sample),
            Err(_) => f64::NAN,
        }
    }

    /// `kill -9`: no shutdown code runs.
    fn kill9(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

// ---- writing events --------------------------------------------------------------------------

/// An activity event about `lead`, as another writer on the database would append it.
fn event_for(lead: Uuid, territory: Territory) -> NewEvent {
    let now = envelope::micros(chrono::Utc::now());
    NewEvent::new(
        EventType::ActivityLogged,
        Some(lead),
        now,
        envelope::key_activity(Uuid::now_v7()),
        json!({"leadId": lead, "activityType": "CALL", "ownerUserId": "sales-de-1",
               "territory": territory, "userId": "sales-de-1", "occurredAt": envelope::ts(now)}),
        Audience {
            territory,
            owner: Some("sales-de-1".into()),
            collaborators: vec![],
        },
    )
}

/// Appends `total` events about `leads` (round robin), `per_tx` per transaction, one
/// transaction after the other (so each lead's events are written in order).
async fn write_events(pool: PgPool, leads: Vec<Uuid>, total: usize, per_tx: usize) {
    write_events_paced(pool, leads, total, per_tx, Duration::ZERO).await
}

/// Same, with a pause after each transaction (load spread over time).
async fn write_events_paced(
    pool: PgPool,
    leads: Vec<Uuid>,
    total: usize,
    per_tx: usize,
    pause: Duration,
) {
    let mut written = 0;
    while written < total {
        let mut tx = db::begin_as(&pool, &Principal::system()).await.unwrap();
        for _ in 0..per_tx.min(total - written) {
            let territory = Territory::ALL[written % 3];
            let ev = event_for(leads[written % leads.len()], territory);
            outbox::append(&mut tx, &ev).await.unwrap().unwrap();
            written += 1;
        }
        tx.commit().await.unwrap();
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
}

fn leads(n: usize) -> Vec<Uuid> {
    (0..n).map(|_| Uuid::now_v7()).collect()
}

/// Outbox events (idempotency key → envelope with position), read as superuser.
async fn outbox_events(db: &TestDb) -> HashMap<String, Value> {
    let mut su = db.superuser().await;
    let rows: Vec<(Uuid, Value)> = sqlx::query_as(&format!(
        "SELECT idempotency_key, {} FROM outbox",
        outbox::ENVELOPE_SQL
    ))
    .fetch_all(&mut su)
    .await
    .unwrap();
    rows.into_iter().map(|(k, e)| (k.to_string(), e)).collect()
}

/// The stream holds every outbox event exactly once, under its key as `Nats-Msg-Id`, with the
/// same envelope, on its subject, and each lead's events in position order.
async fn assert_exactly_once_in_order(db: &TestDb, nats: &Nats) -> usize {
    let expected = outbox_events(db).await;
    let messages = nats.messages().await;
    let ids: HashSet<&str> = messages.iter().map(|m| m.msg_id.as_str()).collect();
    assert_eq!(ids.len(), messages.len(), "a Nats-Msg-Id appears twice");
    assert_eq!(
        messages.len(),
        expected.len(),
        "stream holds {} messages for {} outbox events",
        messages.len(),
        expected.len()
    );
    let mut last_position: BTreeMap<String, i64> = BTreeMap::new();
    for m in &messages {
        let envelope = expected
            .get(&m.msg_id)
            .unwrap_or_else(|| panic!("message {} is no outbox event", m.msg_id));
        assert_eq!(
            &m.envelope, envelope,
            "the stream carries the outbox envelope"
        );
        assert_eq!(m.envelope["idempotencykey"], m.msg_id.as_str());
        let territory = envelope["data"]["territory"].as_str().unwrap();
        let kind = envelope["type"]
            .as_str()
            .unwrap()
            .trim_start_matches("dashboard.");
        assert_eq!(m.subject, format!("freshplan.leads.{territory}.{kind}"));
        let lead = envelope["subject"].as_str().unwrap_or("").to_string();
        let position = envelope["position"].as_i64().unwrap();
        if let Some(before) = last_position.insert(lead.clone(), position) {
            assert!(
                before < position,
                "lead {lead}: position {position} after {before}"
            );
        }
    }
    messages.len()
}

fn relay_env(nats: &Nats) -> Vec<(&'static str, String)> {
    vec![
        ("FRESHPLAN_RELAY_ENABLED", "true".into()),
        ("FRESHPLAN_RELAY_NATS_URL", nats.url()),
        ("FRESHPLAN_RELAY_POLL_INTERVAL_MS", "20".into()),
        // A publish into a stopped NATS fails after 2 s instead of 5 s.
        ("FRESHPLAN_RELAY_ACK_TIMEOUT_MS", "2000".into()),
    ]
}

async fn spawn_app_with_relay(nats: &Nats) -> TestApp {
    let env = relay_env(nats);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    TestApp::spawn_with(&env).await
}

async fn relay_check(app: &TestApp) -> (u16, Value) {
    let r = app
        .client
        .get(format!("{}/q/health/ready", app.url))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let body: Value = r.json().await.unwrap();
    let check = body["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "relay")
        .cloned()
        .unwrap_or(Value::Null);
    (status, check)
}

// ---- tests ---------------------------------------------------------------------------------

#[tokio::test]
async fn every_committed_event_reaches_the_stream_once_with_its_envelope_subject_and_key_in_position_order_per_lead(
) {
    let nats = Nats::start().await;
    let app = spawn_app_with_relay(&nats).await;
    wait_until(CATCH_UP, "readiness shows the relay active", || async {
        let (status, check) = relay_check(&app).await;
        status == 200 && check["status"] == "UP" && check["data"]["state"] == "active"
    })
    .await;

    // Through the service: a lead created and its status changed (two event types, DE).
    let lead = app
        .create_lead("sales-de-1", TestApp::lead_body("Relais GmbH"))
        .await;
    let lead_id = lead["id"].as_str().unwrap();
    assert_eq!(
        app.patch("sales-de-1", lead_id, 1, json!({"status": "ACTIVE"}))
            .await
            .status(),
        200
    );
    // Two transactions committing out of position order: A takes the lower position and
    // commits last. Neither may be skipped.
    let pool = app.db.app_pool().await;
    let (lead_a, lead_b) = (Uuid::now_v7(), Uuid::now_v7());
    let mut tx_a = db::begin_as(&pool, &Principal::system()).await.unwrap();
    let pos_a = outbox::append(&mut tx_a, &event_for(lead_a, Territory::AT))
        .await
        .unwrap()
        .unwrap();
    let mut tx_b = db::begin_as(&pool, &Principal::system()).await.unwrap();
    let pos_b = outbox::append(&mut tx_b, &event_for(lead_b, Territory::CH))
        .await
        .unwrap()
        .unwrap();
    assert!(pos_a < pos_b);
    tx_b.commit().await.unwrap();
    tx_a.commit().await.unwrap();
    // And a burst over 20 leads from four writers at once (each lead written by one writer).
    let writers: Vec<_> = (0..4)
        .map(|_| tokio::spawn(write_events(pool.clone(), leads(5), 150, 5)))
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    let total = 2 + 2 + 600;
    wait_until(CATCH_UP, "every event in the stream, lag 0", || async {
        nats.count().await == total
            && app.metric("freshplan_relay_lag_events").await == 0.0
            && app.metric("freshplan_relay_lag_seconds").await == 0.0
    })
    .await;
    assert_eq!(assert_exactly_once_in_order(&app.db, &nats).await, 604);
    assert_eq!(
        app.metric("freshplan_relay_published_total{result=\"published\"}")
            .await,
        604.0
    );
    assert_eq!(app.metric("freshplan_relay_state").await, 1.0);
    let messages = nats.messages().await;
    assert_eq!(messages[0].subject, "freshplan.leads.DE.lead_created");
    assert_eq!(messages[0].envelope["subject"], lead_id);
    assert_eq!(
        messages[1].subject,
        "freshplan.leads.DE.lead_status_changed"
    );
    for m in &messages {
        let text = m.envelope.to_string();
        assert!(!text.contains("contactPerson") && !text.contains("\"email\""));
    }

    // A consumer as docs/relay.md shows it: a durable pull consumer on one territory, acking.
    let js = nats.jetstream().await;
    let stream = js.get_stream(STREAM).await.unwrap();
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some("crm-sync".into()),
            filter_subject: "freshplan.leads.DE.>".into(),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut batch = consumer.fetch().max_messages(2).messages().await.unwrap();
    let mut seen = Vec::new();
    while let Some(msg) = batch.next().await {
        let msg = msg.unwrap();
        let envelope: Value = serde_json::from_slice(&msg.payload).unwrap();
        seen.push(envelope["type"].as_str().unwrap().to_string());
        msg.ack().await.unwrap();
    }
    assert_eq!(
        seen,
        ["dashboard.lead_created", "dashboard.lead_status_changed"]
    );
}

#[tokio::test]
async fn readiness_has_no_relay_check_and_nothing_connects_to_nats_while_the_relay_is_off() {
    let app = TestApp::spawn().await;
    wait_until(common::PATIENCE, "ready", || async {
        relay_check(&app).await.0 == 200
    })
    .await;
    assert_eq!(relay_check(&app).await.1, Value::Null);
    // No state series: "no relay active" alerts only where a relay runs.
    assert!(!app.metrics_text().await.contains("freshplan_relay_state"));
    assert_eq!(
        app.metric("freshplan_relay_published_total{result=\"published\"}")
            .await,
        0.0
    );
}

#[tokio::test]
async fn a_relay_killed_with_sigkill_at_random_points_during_5000_events_leaves_each_exactly_once_in_the_stream(
) {
    let nats = Nats::start().await;
    let db = TestDb::create().await;
    let pool = db.app_pool().await;
    const TOTAL: usize = 5000;
    // Four writers of 25 leads each, ~600 events/s, so that the kills hit a relay at work.
    let writers: Vec<_> = (0..4)
        .map(|_| {
            tokio::spawn(write_events_paced(
                pool.clone(),
                leads(25),
                TOTAL / 4,
                5,
                Duration::from_millis(30),
            ))
        })
        .collect();
    let mut rng = rand::thread_rng();
    let mut kills = 0;
    let started = Instant::now();
    // Kill while the writers write and the relay publishes, until everything was written and at
    // least eight kills happened (each after 100–600 ms of the relay's life: at start-up, while
    // publishing, between the acks and the cursor commit).
    while kills < 8 || writers.iter().any(|w| !w.is_finished()) {
        let mut relay = RelayProcess::spawn(&db, &nats).await;
        tokio::time::sleep(Duration::from_millis(rng.gen_range(100..600))).await;
        relay.kill9();
        kills += 1;
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "writers too slow"
        );
    }
    for w in writers {
        w.await.unwrap();
    }
    let published_before_last = nats.count().await;
    let relay = RelayProcess::spawn(&db, &nats).await;
    wait_until(CATCH_UP, "5,000 messages in the stream, lag 0", || async {
        nats.count().await == TOTAL as u64
            && relay.metric("freshplan_relay_lag_events").await == 0.0
    })
    .await;
    assert_eq!(assert_exactly_once_in_order(&db, &nats).await, TOTAL);
    eprintln!(
        "{kills} SIGKILLs; {published_before_last} messages before the last start; took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn nats_down_for_10_seconds_under_load_loses_and_doubles_nothing_and_the_lag_returns_to_zero()
{
    let mut nats = Nats::start().await;
    let app = spawn_app_with_relay(&nats).await;
    wait_until(CATCH_UP, "relay active", || async {
        app.metric("freshplan_relay_state").await == 1.0
    })
    .await;
    let pool = app.db.app_pool().await;
    // Load: ~100 events/s over 10 leads until told to stop.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let load = {
        let pool = pool.clone();
        tokio::spawn(async move {
            let leads = leads(10);
            let mut n = 0usize;
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            while !*stop_rx.borrow() {
                tick.tick().await;
                write_events(pool.clone(), vec![leads[n % 10]], 2, 2).await;
                n += 1;
            }
            n * 2
        })
    };
    wait_until(CATCH_UP, "load flowing into the stream", || async {
        nats.count().await >= 50
    })
    .await;

    let in_stream_before = nats.count().await as i64;
    nats.stop();
    let outage = Instant::now();
    wait_until(Duration::from_secs(9), "readiness relay DOWN", || async {
        let (status, check) = relay_check(&app).await;
        status == 503 && check["status"] == "DOWN" && check["data"]["state"] == "down"
    })
    .await;
    assert_eq!(app.metric("freshplan_relay_state").await, -1.0);
    // The outage lasts 10 s while the load goes on; the outbox keeps everything.
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(outage.elapsed())).await;
    let in_outbox = app.count("SELECT count(*) FROM outbox").await;
    assert!(
        in_outbox > in_stream_before + 200,
        "the outbox kept writing during the outage: {in_outbox} events, {in_stream_before} in the stream before"
    );
    nats.spawn().await;
    wait_until(CATCH_UP, "relay active again", || async {
        app.metric("freshplan_relay_state").await == 1.0
    })
    .await;
    stop_tx.send(true).unwrap();
    let written = load.await.unwrap();
    assert!(written > 500, "only {written} events written under load");
    wait_until(CATCH_UP, "stream caught up, lag 0", || async {
        nats.count().await == written as u64
            && app.metric("freshplan_relay_lag_events").await == 0.0
            && app.metric("freshplan_relay_lag_seconds").await == 0.0
    })
    .await;
    assert_eq!(assert_exactly_once_in_order(&app.db, &nats).await, written);
    assert!(app.metric("freshplan_relay_retries_total").await >= 1.0);
    let (status, check) = relay_check(&app).await;
    assert_eq!((status, check["status"].as_str()), (200, Some("UP")));
}

#[tokio::test]
async fn of_two_relays_started_together_one_publishes_and_the_other_takes_over_when_it_is_killed() {
    let nats = Nats::start().await;
    let db = TestDb::create().await;
    let pool = db.app_pool().await;
    let (first, second) = tokio::join!(
        RelayProcess::spawn(&db, &nats),
        RelayProcess::spawn(&db, &nats)
    );
    let mut relays = [first, second];
    wait_until(CATCH_UP, "one active, one standby", || async {
        let a = relays[0].metric("freshplan_relay_state").await;
        let b = relays[1].metric("freshplan_relay_state").await;
        (a == 1.0 && b == 0.0) || (a == 0.0 && b == 1.0)
    })
    .await;
    let active = if relays[0].metric("freshplan_relay_state").await == 1.0 {
        0
    } else {
        1
    };
    let standby = 1 - active;
    assert!(relays[active].logged("relay active").is_some());
    relays[standby]
        .wait_for_log("relay standby: another relay holds the lock")
        .await;

    write_events(pool.clone(), leads(10), 200, 10).await;
    wait_until(CATCH_UP, "200 in the stream", || async {
        nats.count().await == 200
    })
    .await;
    let published = "freshplan_relay_published_total{result=\"published\"}";
    assert_eq!(relays[active].metric(published).await, 200.0);
    assert_eq!(relays[standby].metric(published).await, 0.0);
    assert_eq!(relays[standby].metric("freshplan_relay_state").await, 0.0);

    relays[active].kill9();
    wait_until(CATCH_UP, "the standby takes over", || async {
        relays[standby].metric("freshplan_relay_state").await == 1.0
    })
    .await;
    relays[standby].wait_for_log("relay active").await;
    write_events(pool.clone(), leads(10), 200, 10).await;
    wait_until(CATCH_UP, "400 in the stream, lag 0", || async {
        nats.count().await == 400
            && relays[standby].metric("freshplan_relay_lag_events").await == 0.0
    })
    .await;
    assert_eq!(relays[standby].metric(published).await, 200.0);
    assert_eq!(assert_exactly_once_in_order(&db, &nats).await, 400);
}

#[tokio::test]
async fn the_relay_catches_up_a_5000_event_backlog_and_then_relays_live_events_exactly_once_in_order(
) {
    let nats = Nats::start().await;
    let db = TestDb::create().await;
    let pool = db.app_pool().await;
    // Backlog: 5,000 events written while no relay runs.
    const BACKLOG: u64 = 5000;
    let writers: Vec<_> = (0..4)
        .map(|_| tokio::spawn(write_events(pool.clone(), leads(25), 1250, 50)))
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    let relay = RelayProcess::spawn(&db, &nats).await;
    relay.wait_for_log("relay active").await;
    let started = Instant::now();
    wait_until(CATCH_UP, "backlog in the stream", || async {
        nats.count().await == BACKLOG
    })
    .await;
    let catch_up = started.elapsed();
    let throughput = BACKLOG as f64 / catch_up.as_secs_f64();

    // Live: 1,000 events at ~200/s, one per transaction; commit → stored in the stream.
    let live_leads = leads(10);
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    for i in 0..1000 {
        tick.tick().await;
        write_events(pool.clone(), vec![live_leads[i % 10]], 1, 1).await;
    }
    wait_until(CATCH_UP, "live events in the stream", || async {
        nats.count().await == BACKLOG + 1000
    })
    .await;
    let mut su = db.superuser().await;
    let created: HashMap<String, i64> = sqlx::query_as::<_, (Uuid, i64)>(
        "SELECT idempotency_key, (extract(epoch FROM created_at) * 1000000)::bigint FROM outbox",
    )
    .fetch_all(&mut su)
    .await
    .unwrap()
    .into_iter()
    .map(|(k, t)| (k.to_string(), t))
    .collect();
    let messages = nats.messages().await;
    let mut delays: Vec<f64> = messages[BACKLOG as usize..]
        .iter()
        .map(|m| (m.stored_micros - created[&m.msg_id]) as f64 / 1000.0)
        .collect();
    delays.sort_by(f64::total_cmp);
    let q = |p: f64| delays[((delays.len() as f64 * p) as usize).min(delays.len() - 1)];
    let (p50, p95, p99) = (q(0.50), q(0.95), q(0.99));
    eprintln!(
        "relay: backlog of {BACKLOG} in {catch_up:?} = {throughput:.0} events/s with acks; \
         live commit -> stream p50 {p50:.1} ms, p95 {p95:.1} ms, p99 {p99:.1} ms ({} events)",
        delays.len()
    );
    assert_eq!(assert_exactly_once_in_order(&db, &nats).await, 6000);
    // Throughput and latency are printed (figures for docs/relay.md), never asserted: benchmarks
    // are not tests, and the stable scan waits for the oldest running transaction of the whole
    // cluster, so other tests' migrations can hold a few events back for seconds.
}

#[tokio::test]
async fn a_relay_whose_cursor_was_lost_resumes_after_the_streams_last_message_even_past_the_dedupe_window(
) {
    let nats = Nats::start().await;
    let db = TestDb::create().await;
    let pool = db.app_pool().await;
    // A 1 s dedupe window (the stream is updated to it at start): dedupe alone cannot help once
    // it has passed.
    let short_window = [
        ("FRESHPLAN_RELAY_ACK_TIMEOUT_MS", "200"),
        ("FRESHPLAN_RELAY_DUPLICATE_WINDOW_SECONDS", "1"),
    ];
    write_events(pool.clone(), leads(5), 100, 10).await;
    let mut relay = RelayProcess::spawn_with(&db, &nats, &short_window).await;
    wait_until(CATCH_UP, "100 in the stream", || async {
        nats.count().await == 100
    })
    .await;
    relay.kill9();
    let mut js = nats.jetstream().await;
    js.set_timeout(Duration::from_secs(5));
    let mut stream = js.get_stream(STREAM).await.unwrap();
    assert_eq!(
        stream.info().await.unwrap().config.duplicate_window,
        Duration::from_secs(1)
    );
    // The cursor commits were lost (as after a crash between the acks and the commit), and the
    // dedupe window has passed.
    let mut su = db.superuser().await;
    sqlx::query("DELETE FROM event_cursors WHERE consumer = 'nats-relay'")
        .execute(&mut su)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;

    write_events(pool.clone(), leads(5), 50, 10).await;
    let relay = RelayProcess::spawn_with(&db, &nats, &short_window).await;
    relay
        .wait_for_log(
            "relay: the stream is ahead of the stored cursor; resuming after its last message",
        )
        .await;
    wait_until(CATCH_UP, "150 in the stream, lag 0", || async {
        nats.count().await == 150 && relay.metric("freshplan_relay_lag_events").await == 0.0
    })
    .await;
    assert_eq!(assert_exactly_once_in_order(&db, &nats).await, 150);
    assert_eq!(
        relay
            .metric("freshplan_relay_published_total{result=\"published\"}")
            .await,
        50.0
    );
}

#[tokio::test]
async fn a_relay_with_a_ten_minute_poll_publishes_a_committed_event_once_the_doorbell_rings() {
    let nats = Nats::start().await;
    let db = TestDb::create().await;
    let pool = db.app_pool().await;
    // Only a ring can wake this relay within the test: its poll is 10 minutes.
    let relay = RelayProcess::spawn_with(
        &db,
        &nats,
        &[("FRESHPLAN_RELAY_POLL_INTERVAL_MS", "600000")],
    )
    .await;
    relay.wait_for_log("relay active").await;
    write_events(pool.clone(), leads(1), 1, 1).await;
    // The doorbell of a `serve` instance rings after each commit; rung again on every check,
    // since the relay may still be opening its LISTEN connection after `relay active`.
    wait_until(
        Duration::from_secs(20),
        "the event in the stream",
        || async {
            let mut bell = pool.acquire().await.unwrap();
            freshplan::events::doorbell::ring(&mut bell).await.unwrap();
            nats.count().await == 1
        },
    )
    .await;
    assert_eq!(assert_exactly_once_in_order(&db, &nats).await, 1);
}

#[tokio::test]
async fn an_active_relay_whose_stop_sender_is_dropped_writes_its_cursor_and_returns() {
    use freshplan::events::relay::{Relay, RelayState};
    use freshplan::telemetry::metrics::Metrics;
    let nats = Nats::start().await;
    let db = TestDb::create().await;
    let pool = db.app_pool().await;
    let url = nats.url();
    let settings = db
        .settings(&[("FRESHPLAN_RELAY_NATS_URL", url.as_str())])
        .relay;
    let relay = Relay::new(&db.app_url(), &settings, Arc::new(Metrics::new()));
    let health = relay.health.clone();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(relay.run(stopped));
    wait_until(Duration::from_secs(30), "the relay active", || async {
        health.get() == RelayState::Active
    })
    .await;
    write_events(pool.clone(), leads(1), 1, 1).await;
    wait_until(CATCH_UP, "the event in the stream", || async {
        nats.count().await == 1
    })
    .await;
    // The owner of the stop signal goes away without sending it (a dropped server).
    drop(stop);
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the relay returns instead of scanning in a loop")
        .unwrap();
    let mut su = db.superuser().await;
    let (cursor, last): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT position FROM event_cursors WHERE consumer = 'nats-relay'), \
                (SELECT max(position) FROM outbox)",
    )
    .fetch_one(&mut su)
    .await
    .unwrap();
    assert_eq!(
        cursor, last,
        "the cursor was written when the relay stopped"
    );
}
