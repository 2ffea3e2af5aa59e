//! The outbox → JetStream relay at fixed rates (`cargo bench --bench relay`, issue 14): how fast
//! it empties a backlog with every publish acknowledged, and commit → stored in the stream at
//! 250, 1,000 and 2,500 events/s arriving live — independent of how many commands the HTTP
//! service can take on this machine (`freshplan loadtest --nats` measures the relay beside the
//! SSE path at the rates the service holds).
//!
//! What it does:
//! 1. creates its own database `fp_relay_bench_<pid>` (migrated with the real
//!    `freshplan::db::bootstrap::migrate`, dropped at the end) and starts a `nats-server -js` on
//!    a free port with its store in a temporary folder;
//! 2. **backlog**: 20,000 events written by 4 writers in transactions of 100 while no relay
//!    runs; then the relay (the real `freshplan::events::relay::Relay`, in this process, default
//!    settings) starts and the time until the stream holds all of them is measured;
//! 3. **live**: at each rate, 20 s of open-loop writes, one event per transaction, as the
//!    application role; after each commit the doorbell rings (the same `doorbell::run` task a
//!    `serve` instance runs) so the relay wakes at once. The load tool's stream watcher
//!    (`loadtest::jetstream::Watch`, an ordered consumer) records when JetStream stored each
//!    event. Latencies: commit answered to the writer → stored in JetStream (both this machine's
//!    clock), and intended start of the write → stored (includes the writer's own queueing);
//! 4. checks that every event is in the stream exactly once, writes reports/relay-bench.md and
//!    prints it.
//!
//! Only under `cargo bench` (cargo passes `--bench`): run any other way it measures nothing and
//! leaves the committed report alone.

use std::fmt::Write as _;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use freshplan::config::Settings;
use freshplan::db::{self, bootstrap};
use freshplan::events::doorbell;
use freshplan::events::envelope::{self, Audience, EventType, NewEvent};
use freshplan::events::outbox;
use freshplan::events::relay::Relay;
use freshplan::identity::Principal;
use freshplan::loadtest::jetstream::Watch;
use freshplan::loadtest::stats::{histogram, record, summarize, Clock, Summary};
use freshplan::telemetry::metrics::Metrics;
use freshplan::territory::Territory;
use futures::FutureExt;
use serde_json::json;
use sqlx::PgPool;
use tokio::sync::{watch, Notify};
use uuid::Uuid;

#[path = "support/dataset.rs"]
mod dataset;
use dataset::{admin_url, db_url, drop_database};

const APP_ROLE: &str = "freshplan_app";
const OWNER_ROLE: &str = "freshplan_owner";
const BACKLOG: usize = 20_000;
const RATES: [f64; 3] = [250.0, 1000.0, 2500.0];
const PHASE: Duration = Duration::from_secs(20);
/// Writer connections (a `serve` instance's default pool size).
const WRITERS: u32 = 16;

fn main() {
    if !std::env::args().skip(1).any(|a| a == "--bench") {
        println!(
            "benches/relay.rs: not started by `cargo bench` (no --bench argument); \
             measuring nothing and leaving reports/relay-bench.md unchanged"
        );
        return;
    }
    let db = format!("fp_relay_bench_{}", std::process::id());
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let outcome = runtime.block_on(async {
        let outcome = std::panic::AssertUnwindSafe(run(&db)).catch_unwind().await;
        if let Err(e) = drop_database(&db).await {
            eprintln!("relay bench: could not drop database {db}: {e:#}");
        }
        outcome
    });
    match outcome {
        Ok(Ok(report)) if std::env::var_os("FRESHPLAN_RELAY_BENCH_NO_DOORBELL").is_some() => {
            print!("{report}");
        }
        Ok(Ok(report)) => {
            let path =
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("reports/relay-bench.md");
            if let Err(e) = std::fs::write(&path, &report) {
                eprintln!("cannot write {}: {e}", path.display());
            }
            print!("{report}");
        }
        Ok(Err(e)) => {
            eprintln!("relay bench failed: {e:#}");
            std::process::exit(1);
        }
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// A `nats-server -js` of the bench, killed on drop.
struct NatsServer {
    child: Child,
    url: String,
    _store: tempfile::TempDir,
}

impl NatsServer {
    async fn start() -> anyhow::Result<NatsServer> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let store = tempfile::tempdir()?;
        let child = Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(store.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting nats-server (Debian package nats-server)")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            ensure!(Instant::now() < deadline, "nats-server did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(NatsServer {
            child,
            url: format!("nats://127.0.0.1:{port}"),
            _store: store,
        })
    }

    async fn stream_count(&self, stream: &str) -> u64 {
        let Ok(client) = async_nats::connect(&self.url).await else {
            return 0;
        };
        match async_nats::jetstream::new(client).get_stream(stream).await {
            Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
            Err(_) => 0,
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An activity event about `lead`, as a `serve` instance appends it.
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

/// One transaction with `n` events; returns their keys.
async fn write(pool: &PgPool, leads: &[Uuid], n: usize, seq: usize) -> anyhow::Result<Vec<Uuid>> {
    let mut tx = db::begin_as(pool, &Principal::system()).await?;
    let mut keys = Vec::with_capacity(n);
    for i in 0..n {
        let k = seq + i;
        let ev = event_for(leads[k % leads.len()], Territory::ALL[k % 3]);
        let key = ev.key;
        outbox::append(&mut tx, &ev)
            .await?
            .context("the event's key was already in the outbox")?;
        keys.push(key);
    }
    tx.commit().await?;
    Ok(keys)
}

fn unix_us() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

/// A live write: key, intended start (µs on the clock), COMMIT answered (unix µs), write
/// latency (µs).
type Written = (Uuid, u64, i64, u64);

struct Live {
    rate: f64,
    written: usize,
    achieved: f64,
    in_stream: usize,
    duplicates: u64,
    caught_up_after: Duration,
    commit_to_stream: Summary,
    intended_to_stream: Summary,
    write: Summary,
}

async fn run(db: &str) -> anyhow::Result<String> {
    let started = chrono::Utc::now();
    let load_before = loadavg();
    let url = db_url(APP_ROLE, db);
    let target = bootstrap::Target::from_url(&url, OWNER_ROLE)?;
    bootstrap::migrate(&admin_url(), &target)
        .await
        .context("migrating the bench database")?;
    let pool = db::connect(&url, WRITERS, "freshplan-relay-bench").await?;
    db::check_runtime_role(&pool).await?;
    let nats = NatsServer::start().await?;
    let mut settings = Settings::load(None)?.relay;
    settings.enabled = true;
    settings.nats_url = nats.url.clone();
    let stream_name = settings.stream.clone();
    let leads: Vec<Uuid> = (0..200).map(|_| Uuid::now_v7()).collect();

    // 1. Backlog.
    eprintln!("relay bench: writing a backlog of {BACKLOG} events");
    let mut writers = Vec::new();
    for w in 0..4 {
        let (pool, leads) = (pool.clone(), leads.clone());
        writers.push(tokio::spawn(async move {
            let mut keys = Vec::new();
            for t in 0..BACKLOG / 4 / 100 {
                keys.extend(write(&pool, &leads, 100, (w * BACKLOG / 4) + t * 100).await?);
            }
            anyhow::Ok(keys)
        }));
    }
    let mut backlog_keys = 0;
    for w in writers {
        backlog_keys += w.await??.len();
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let relay = Relay::new(&url, &settings, Arc::new(Metrics::new()));
    let relay_started = Instant::now();
    let relay_task = tokio::spawn(relay.run(stop_rx.clone()));
    let url_for_bell = url.clone();
    while nats.stream_count(&stream_name).await < backlog_keys as u64 {
        ensure!(
            relay_started.elapsed() < Duration::from_secs(300),
            "the backlog did not reach the stream in 5 minutes"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let catch_up = relay_started.elapsed();
    eprintln!(
        "relay bench: backlog in the stream after {:.0} ms",
        catch_up.as_secs_f64() * 1000.0
    );

    // 2. Live, open loop, with the doorbell.
    let committed = Arc::new(Notify::new());
    let committed_for_bell = committed.clone();
    // FRESHPLAN_RELAY_BENCH_NO_DOORBELL=1: nobody rings, the relay finds events by its poll
    // (the relay before it listened; for an A/B, written to stdout only).
    let ring = std::env::var_os("FRESHPLAN_RELAY_BENCH_NO_DOORBELL").is_none();
    let bell = tokio::spawn(async move {
        if ring {
            doorbell::run(url_for_bell, committed_for_bell, stop_rx).await
        }
    });
    let clock = Clock::new();
    // Unix µs of the clock's 0 (the clock is monotonic; this machine's wall clock does not jump
    // within a run).
    let origin_unix = unix_us() - clock.now_us() as i64;
    let watch = Watch::open(&nats.url, &stream_name, clock).await?;
    let mut lives = Vec::new();
    let mut seq = BACKLOG;
    for rate in RATES {
        let n = (rate * PHASE.as_secs_f64()) as usize;
        let period = 1e6 / rate;
        let start_us = clock.now_us() + 1000;
        let records: Arc<Mutex<Vec<Written>>> = Arc::new(Mutex::new(Vec::with_capacity(n)));
        let mut set = tokio::task::JoinSet::new();
        for i in 0..n {
            let intended = start_us + (i as f64 * period) as u64;
            tokio::time::sleep_until(clock.at(intended).into()).await;
            let (pool, leads, records, committed) = (
                pool.clone(),
                leads.clone(),
                records.clone(),
                committed.clone(),
            );
            let k = seq + i;
            set.spawn(async move {
                let keys = write(&pool, &leads, 1, k).await?;
                let done_unix = unix_us();
                let done = clock.now_us();
                committed.notify_one();
                records.lock().unwrap().push((
                    keys[0],
                    intended,
                    done_unix,
                    done.saturating_sub(intended),
                ));
                anyhow::Ok(())
            });
            while let Some(r) = set.try_join_next() {
                r??;
            }
        }
        while let Some(r) = set.join_next().await {
            r??;
        }
        seq += n;
        let end_us = clock.now_us();
        let records = std::mem::take(&mut *records.lock().unwrap());
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let all = {
                let seen = watch.seen();
                records.iter().all(|r| seen.keys.contains_key(&r.0))
            };
            if all || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let seen = watch.seen();
        let (mut c2s, mut i2s, mut w) = (histogram(), histogram(), histogram());
        let mut in_stream = 0;
        let mut duplicates = 0;
        let mut last_received = 0;
        for (key, intended, done_unix, write_us) in &records {
            record(&mut w, *write_us);
            let Some(a) = seen.keys.get(key) else {
                continue;
            };
            in_stream += 1;
            duplicates += u64::from(a.count - 1);
            last_received = last_received.max(a.received_us);
            let Some(stored) = a.stored_unix_us else {
                continue;
            };
            record(&mut c2s, (stored - done_unix).max(0) as u64);
            record(
                &mut i2s,
                (stored - (origin_unix + *intended as i64)).max(0) as u64,
            );
        }
        drop(seen);
        let window = (end_us - start_us) as f64 / 1e6;
        let live = Live {
            rate,
            written: records.len(),
            achieved: records.len() as f64 / window,
            in_stream,
            duplicates,
            caught_up_after: Duration::from_micros(last_received.saturating_sub(end_us)),
            commit_to_stream: summarize(&c2s),
            intended_to_stream: summarize(&i2s),
            write: summarize(&w),
        };
        eprintln!(
            "relay bench: {rate:.0}/s: {} of {} in the stream, commit → stream p50 {:?} p95 {:?} p99 {:?} ms",
            live.in_stream,
            live.written,
            live.commit_to_stream.p50_ms,
            live.commit_to_stream.p95_ms,
            live.commit_to_stream.p99_ms
        );
        ensure!(
            live.in_stream == live.written && live.duplicates == 0,
            "at {rate:.0}/s: {} of {} events in the stream, {} duplicated",
            live.in_stream,
            live.written,
            live.duplicates
        );
        lives.push(live);
    }
    let total_in_stream = nats.stream_count(&stream_name).await;
    let _ = stop_tx.send(true);
    let _ = relay_task.await;
    let _ = bell.await;
    pool.close().await;
    let written = backlog_keys + lives.iter().map(|l| l.written).sum::<usize>();
    ensure!(
        total_in_stream == written as u64,
        "{written} events written, {total_in_stream} messages in the stream"
    );
    Ok(report(&Report {
        doorbell: ring,
        started,
        load_before,
        load_after: loadavg(),
        backlog: backlog_keys,
        catch_up,
        lives,
        written,
        total_in_stream,
        nats_version: nats_version(),
    }))
}

struct Report {
    doorbell: bool,
    started: chrono::DateTime<chrono::Utc>,
    load_before: String,
    load_after: String,
    backlog: usize,
    catch_up: Duration,
    lives: Vec<Live>,
    written: usize,
    total_in_stream: u64,
    nats_version: String,
}

fn ms(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.1}")).unwrap_or_else(|| "–".into())
}

fn report(r: &Report) -> String {
    let mut h = String::new();
    let _ = writeln!(h, "# Relay benchmark (`cargo bench --bench relay`)\n");
    let _ = writeln!(
        h,
        "Run {} on this machine ({} cores), {}, {}, PostgreSQL on the same box with default \
         settings; release build of the bench (the relay runs in its process, default \
         `freshplan.relay.*` settings: batch 256, poll 100 ms{}). Load \
         average before {}, after {}. Code: {}.\n",
        r.started.format("%Y-%m-%d %H:%M UTC"),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        r.nats_version,
        postgres_note(),
        if r.doorbell {
            ", woken by the doorbell"
        } else {
            "; NO DOORBELL: the relay finds events by its poll only"
        },
        r.load_before,
        r.load_after,
        code_state()
    );
    let _ = writeln!(
        h,
        "Exactly once: {} events written, **{} messages in the stream** (each key once).\n",
        r.written, r.total_in_stream
    );
    let _ = writeln!(
        h,
        "## Backlog\n\n{} events written while no relay ran (4 writers, 100 per transaction), \
         then the relay started: all in the stream, every publish acknowledged, after **{:.0} ms \
         = {:.0} events/s**.\n",
        r.backlog,
        r.catch_up.as_secs_f64() * 1000.0,
        r.backlog as f64 / r.catch_up.as_secs_f64()
    );
    let _ = writeln!(
        h,
        "## Live\n\n{} s per rate, open loop, one event per transaction, {} writer connections; \
         {}.\n\n\
         | rate | written (achieved /s) | in stream | dup | last one after the window | write p50 / p99 ms | commit → stored p50 / p95 / p99 / max ms | intended → stored p50 / p95 / p99 ms |\n\
         |---|---|---|---|---|---|---|---|",
        PHASE.as_secs(),
        WRITERS,
        if r.doorbell {
            "the doorbell rings after each commit"
        } else {
            "no doorbell"
        }
    );
    for l in &r.lives {
        let _ = writeln!(
            h,
            "| {:.0}/s | {} ({:.0}) | {} | {} | {:.0} ms | {} / {} | {} / {} / **{}** / {} | {} / {} / {} |",
            l.rate,
            l.written,
            l.achieved,
            l.in_stream,
            l.duplicates,
            l.caught_up_after.as_secs_f64() * 1000.0,
            ms(l.write.p50_ms),
            ms(l.write.p99_ms),
            ms(l.commit_to_stream.p50_ms),
            ms(l.commit_to_stream.p95_ms),
            ms(l.commit_to_stream.p99_ms),
            ms(l.commit_to_stream.max_ms),
            ms(l.intended_to_stream.p50_ms),
            ms(l.intended_to_stream.p95_ms),
            ms(l.intended_to_stream.p99_ms),
        );
    }
    let _ = writeln!(
        h,
        "\n*commit → stored*: the writer's COMMIT answered → JetStream's stored timestamp of the \
         message (both this machine's clock). *intended → stored* adds the writer's own wait \
         for a connection and its transaction, from the open-loop schedule. Goal (issue 14): p99 \
         below 50 ms at 1,000 events/s, and the relay keeps up with the highest rate the service \
         holds (`freshplan loadtest --nats` shows it beside the SSE path)."
    );
    h
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn nats_version() -> String {
    Command::new("nats-server")
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "nats-server".into())
}

fn postgres_note() -> String {
    Command::new("psql")
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "PostgreSQL".into())
}

fn code_state() -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let head = git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".into());
    match git(&[
        "status",
        "--porcelain",
        "--",
        "src",
        "migrations",
        "benches",
    ]) {
        Some(s) if s.is_empty() => format!("commit {head}"),
        Some(_) => format!("commit {head} with uncommitted changes"),
        None => format!("commit {head}"),
    }
}
