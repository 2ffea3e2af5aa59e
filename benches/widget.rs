//! Lead-widget latency at 100,000 leads (`cargo bench --bench widget`): p50/p95/p99/max of
//! `Widget::answer` for cache hits and cache misses, per view (sales own, manager territory,
//! viewer territory, admin all). Targets (issue): p95 ≤ 2 ms on a hit, ≤ 15 ms on a miss.
//!
//! What it does:
//! 1. creates its own database `fp_widget_bench_<pid>` on the test server
//!    (`FRESHPLAN_TEST_ADMIN_URL`, default `postgres://postgres@127.0.0.1:5432/postgres`) and
//!    migrates it with the real `freshplan::db::bootstrap::migrate`, with the role names the
//!    test harness uses (`freshplan_app` / `freshplan_owner`, shared by every test database;
//!    only the database is ours, and it is dropped at the end — set
//!    `FRESHPLAN_WIDGET_BENCH_KEEP=1` to keep it for EXPLAIN);
//! 2. seeds the demo users (`freshplan::demo::seed`), adds 9 more salespeople per territory
//!    and bulk-loads 100,000 leads, ~500,000 activities and ~15,000 follow-ups of the last 30
//!    days as the superuser with a few `INSERT … SELECT generate_series` statements (the 0002
//!    triggers keep the roll-ups exact), then `VACUUM (ANALYZE)` and `CHECKPOINT`;
//! 3. measures in-process through a pool of the application role (NOSUPERUSER, NOBYPASSRLS,
//!    checked with `check_runtime_role`), so row-level security applies: misses with the cache
//!    cleared before every call, hits on a warm cache. A sample is `answer()` plus
//!    `serde_json::to_vec` of the body (what the handler sends). Views are interleaved round by
//!    round so a burst of load on the machine hits all of them alike;
//! 4. measures the same over HTTP (one in-process server, keep-alive client) with fewer calls;
//! 5. writes reports/widget-bench.md and prints it.
//!
//! Only under `cargo bench` (cargo passes `--bench` to a `harness = false` bench binary): run
//! any other way (`cargo test --all-targets`) it measures nothing, creates no database and
//! leaves the committed report alone.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Context};
use freshplan::app::{AppState, Server};
use freshplan::auth::jwt::Authenticator;
use freshplan::cockpit::cache::{Scope, Source, WidgetCache};
use freshplan::cockpit::widget::{Statements, Widget};
use freshplan::config::Settings;
use freshplan::db::bootstrap;
use freshplan::identity::Principal;
use freshplan::pii::Vault;
use freshplan::telemetry::metrics::Metrics;
use futures::FutureExt;

#[path = "support/dataset.rs"]
mod dataset;
use dataset::*;
use sqlx::{Connection, PgConnection, PgPool};

const WARM_UP_MISSES: usize = 30;
const MISSES: usize = 300;
const WARM_UP_HITS: usize = 300;
const HITS: usize = 3_000;
/// Misses per view whose CPU time is measured (after the timed ones).
const CPU_MISSES: usize = 100;
const HTTP_MISSES: usize = 100;
const HTTP_HITS: usize = 1_000;
/// Targets of the issue (p95, ms).
const HIT_TARGET_MS: f64 = 2.0;
const MISS_TARGET_MS: f64 = 15.0;

const APP_ROLE: &str = "freshplan_app";
const OWNER_ROLE: &str = "freshplan_owner";

const JWT_SECRET: &str = "bench-secret-bench-secret-bench-secret-0123456789";
const PII_KEY: &str = "k1:BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=";
const LOOKUP_KEY: &str = "CQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQk=";

/// One widget view: who asks, for which scope.
struct View {
    label: &'static str,
    user: &'static str,
    scope: Scope,
}

const VIEWS: [View; 4] = [
    View {
        label: "sales, own",
        user: "sales-de-1",
        scope: Scope::Own,
    },
    View {
        label: "manager, territory",
        user: "manager-de",
        scope: Scope::Territory,
    },
    View {
        label: "viewer, territory",
        user: "viewer-de",
        scope: Scope::Territory,
    },
    View {
        label: "admin, all",
        user: "admin",
        scope: Scope::All,
    },
];

/// Sizes of the loaded data set, as markdown lines.
async fn data_set(su: &mut PgConnection) -> anyhow::Result<String> {
    let statuses: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, count(*) FROM leads GROUP BY 1 ORDER BY 2 DESC")
            .fetch_all(&mut *su)
            .await?;
    let total: i64 = statuses.iter().map(|s| s.1).sum();
    let (users, sales): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(*) FILTER (WHERE role = 'sales') FROM users")
            .fetch_one(&mut *su)
            .await?;
    let (acts, meaningful, received, changes, conv, act_days): (i64, i64, i64, i64, i64, f64) =
        sqlx::query_as(
            "SELECT count(*), count(*) FILTER (WHERE meaningful), \
               count(*) FILTER (WHERE activity_type = 'EMAIL_RECEIVED'), \
               count(*) FILTER (WHERE activity_type = 'STATUS_CHANGE'), \
               count(*) FILTER (WHERE new_status IN ('QUALIFIED', 'CONVERTED')), \
               (extract(epoch FROM now() - min(occurred_at)) / 86400)::float8 \
             FROM lead_activities",
        )
        .fetch_one(&mut *su)
        .await?;
    let (fu, sent, failed, responded, converted, fu_days): (i64, i64, i64, i64, i64, f64) =
        sqlx::query_as(
            "SELECT count(*), count(*) FILTER (WHERE status = 'SENT'), \
               count(*) FILTER (WHERE status = 'FAILED'), \
               count(responded_at), count(converted_at), \
               (extract(epoch FROM now() - min(coalesce(sent_at, failed_at))) / 86400)::float8 \
             FROM followups",
        )
        .fetch_one(&mut *su)
        .await?;
    let (consistent,): (bool,) = sqlx::query_as(
        "SELECT NOT EXISTS (SELECT 1 FROM leads l LEFT JOIN followups f \
                              ON f.lead_id = l.id AND f.followup_type = 'T3' AND f.status = 'SENT' \
                            WHERE (l.t3_sent_at IS NULL) <> (f.id IS NULL) \
                               OR l.t3_sent_at IS DISTINCT FROM coalesce(f.sent_at, l.t3_sent_at)) \
            AND NOT EXISTS (SELECT 1 FROM leads l LEFT JOIN followups f \
                              ON f.lead_id = l.id AND f.followup_type = 'T7' AND f.status = 'SENT' \
                            WHERE (l.t7_sent_at IS NULL) <> (f.id IS NULL) \
                               OR l.t7_sent_at IS DISTINCT FROM coalesce(f.sent_at, l.t7_sent_at))",
    )
    .fetch_one(&mut *su)
    .await?;
    ensure!(
        consistent,
        "leads.t3_sent_at / t7_sent_at disagree with the SENT follow-ups"
    );
    let (collab, consent): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE collaborators <> '{}'), count(*) FILTER (WHERE email_consent) \
         FROM leads",
    )
    .fetch_one(&mut *su)
    .await?;
    let (counts, act_daily, fu_daily): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM cockpit_lead_counts), \
                (SELECT count(*) FROM cockpit_activity_daily), \
                (SELECT count(*) FROM cockpit_followup_daily)",
    )
    .fetch_one(&mut *su)
    .await?;
    let (db_size,): (String,) =
        sqlx::query_as("SELECT pg_size_pretty(pg_database_size(current_database()))")
            .fetch_one(&mut *su)
            .await?;
    let pct = |n: i64, of: i64| 100.0 * n as f64 / of.max(1) as f64;
    let status_line = statuses
        .iter()
        .map(|(s, n)| format!("{s} {:.0} %", pct(*n, total)))
        .collect::<Vec<_>>()
        .join(" / ");
    Ok(format!(
        "- Leads: {total} in 3 territories (DE/AT/CH ≈ 1/3 each), registered over 180 days; \
         {status_line}; {:.0} % with a collaborator, {:.0} % with email consent\n\
         - Users: {users} ({sales} sales: {} per territory, ≈ 3,000 leads each)\n\
         - Activities: {acts} over {act_days:.0} days (5 per lead within 60 days of its \
         registration; {meaningful} meaningful, {received} EMAIL_RECEIVED, {changes} \
         STATUS_CHANGE with new_status, {conv} of them to QUALIFIED/CONVERTED)\n\
         - Follow-ups: {fu} over the last {fu_days:.0} days ({sent} SENT, {failed} FAILED; \
         {responded} responded, {converted} converted); `leads.t3_sent_at`/`t7_sent_at` equal \
         the SENT follow-ups (checked)\n\
         - Roll-ups: {counts} lead-count rows, {act_daily} activity-day rows, {fu_daily} \
         follow-up-day rows; database {db_size}\n",
        pct(collab, total),
        pct(consent, total),
        2 + EXTRA_SALES,
    ))
}

// ---- Measurement -----------------------------------------------------------------------

/// Sorted samples.
struct Stats(Vec<Duration>);

impl Stats {
    fn new(mut v: Vec<Duration>) -> Self {
        v.sort();
        Stats(v)
    }

    /// Nearest-rank percentile, in ms.
    fn p(&self, q: f64) -> f64 {
        let n = self.0.len();
        let rank = ((q * n as f64).ceil() as usize).clamp(1, n);
        self.0[rank - 1].as_secs_f64() * 1000.0
    }

    fn max(&self) -> f64 {
        self.0.last().map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    }
}

fn principal(user: &str) -> anyhow::Result<Principal> {
    freshplan::demo::principal(user).ok_or_else(|| anyhow!("no demo user {user}"))
}

/// One `answer` (and its serialisation, as the handler does), checked to come from `want`.
async fn sample(
    widget: &Widget,
    caller: &Principal,
    scope: Scope,
    want: Source,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let answer = widget
        .answer(caller, scope, None)
        .await
        .map_err(|e| anyhow!("widget answer failed: {e}"))?;
    let bytes = serde_json::to_vec(&answer.body)?;
    let elapsed = start.elapsed();
    black_box(bytes);
    ensure!(
        answer.source == want,
        "expected a cache {}, got a {}",
        want.as_str(),
        answer.source.as_str()
    );
    Ok(elapsed)
}

/// What was measured for one view.
struct ViewResult {
    misses: Stats,
    hits: Stats,
    /// The widget JSON (for the report's "data behind it").
    body: serde_json::Value,
    /// CPU ms per miss: (PostgreSQL backend, this process), from /proc — independent of how
    /// long the calls waited for a CPU on a busy machine.
    cpu: Option<(f64, f64)>,
}

/// CPU time (user + system) of a process in ms, from /proc/<pid>/stat.
fn cpu_ms(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks * 1000.0 / hz)
}

/// CPU ms of this process and of every backend of the application pool.
async fn cpu_now(pool: &PgPool) -> anyhow::Result<Option<(f64, f64)>> {
    let pids: Vec<i32> = sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity \
         WHERE datname = current_database() AND usename = current_user",
    )
    .fetch_all(pool)
    .await?;
    let server: Option<f64> = pids.iter().map(|p| cpu_ms(&p.to_string())).sum();
    Ok(server.zip(cpu_ms("self")))
}

async fn measure_in_process(pool: &PgPool) -> anyhow::Result<Vec<ViewResult>> {
    let metrics = Arc::new(Metrics::new());
    // A TTL far beyond the run, so no hit turns into a TTL miss.
    let cache = Arc::new(WidgetCache::new(
        Duration::from_secs(3600),
        Duration::ZERO,
        metrics.clone(),
    ));
    let widget = Widget {
        pool: pool.clone(),
        cache: cache.clone(),
        metrics,
        statements: Statements::default(),
    };
    let callers = VIEWS
        .iter()
        .map(|v| principal(v.user))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut misses = vec![Vec::with_capacity(MISSES); VIEWS.len()];
    for round in 0..WARM_UP_MISSES + MISSES {
        for (i, v) in VIEWS.iter().enumerate() {
            cache.clear();
            let d = sample(&widget, &callers[i], v.scope, Source::Miss).await?;
            if round >= WARM_UP_MISSES {
                misses[i].push(d);
            }
        }
    }
    // CPU per miss, view by view (sequential calls use one pooled connection).
    let mut cpu = Vec::new();
    for (i, v) in VIEWS.iter().enumerate() {
        let before = cpu_now(pool).await?;
        for _ in 0..CPU_MISSES {
            cache.clear();
            sample(&widget, &callers[i], v.scope, Source::Miss).await?;
        }
        let after = cpu_now(pool).await?;
        cpu.push(before.zip(after).map(|((s0, c0), (s1, c1))| {
            let n = CPU_MISSES as f64;
            ((s1 - s0) / n, (c1 - c0) / n)
        }));
    }
    let mut bodies = Vec::new();
    cache.clear();
    for (i, v) in VIEWS.iter().enumerate() {
        let a = widget
            .answer(&callers[i], v.scope, None)
            .await
            .map_err(|e| anyhow!("widget answer failed: {e}"))?;
        bodies.push(a.body);
    }
    let mut hits = vec![Vec::with_capacity(HITS); VIEWS.len()];
    for round in 0..WARM_UP_HITS + HITS {
        for (i, v) in VIEWS.iter().enumerate() {
            let d = sample(&widget, &callers[i], v.scope, Source::Hit).await?;
            if round >= WARM_UP_HITS {
                hits[i].push(d);
            }
        }
    }
    Ok(misses
        .into_iter()
        .zip(hits)
        .zip(bodies)
        .zip(cpu)
        .map(|(((m, h), body), cpu)| ViewResult {
            misses: Stats::new(m),
            hits: Stats::new(h),
            body,
            cpu,
        })
        .collect())
}

/// The same over HTTP: one instance of the real server on 127.0.0.1:0, a keep-alive client,
/// `GET /api/cockpit/lead-widget?scope=…` with a bearer token until the body is read.
async fn measure_http(db: &str) -> anyhow::Result<Vec<(Stats, Stats)>> {
    let vars: HashMap<&str, String> = HashMap::from([
        ("DATABASE_URL", db_url(APP_ROLE, db)),
        ("FRESHPLAN_ADMIN_DATABASE_URL", admin_url()),
        ("FRESHPLAN_AUTH_JWT_SECRET", JWT_SECRET.into()),
        ("FRESHPLAN_PII_KEYS", PII_KEY.into()),
        ("FRESHPLAN_PII_LOOKUP_KEY", LOOKUP_KEY.into()),
    ]);
    let settings = Settings::load_with(None, |k| vars.get(k).cloned())?;
    let minter = Authenticator::from_settings(&settings.jwt, false)?;
    let auth = Authenticator::from_settings(&settings.jwt, false)?;
    let vault =
        Vault::from_settings(&settings.pii)?.ok_or_else(|| anyhow!("bench PII keys missing"))?;
    let state = AppState::connect(settings, auth, vault).await?;
    let server = Server::start(state, "127.0.0.1:0").await?;
    let result = async {
        let client = reqwest::Client::new();
        let requests = VIEWS
            .iter()
            .map(|v| {
                let token = minter.mint(&principal(v.user)?, 3600)?;
                Ok(client
                    .get(format!(
                        "{}/api/cockpit/lead-widget?scope={}",
                        server.url(),
                        v.scope.as_str()
                    ))
                    .bearer_auth(token))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let get = |i: usize| {
            let request = requests[i].try_clone().expect("no streaming body");
            async move {
                let start = Instant::now();
                let r = request.send().await?;
                let status = r.status();
                let body = r.bytes().await?;
                let elapsed = start.elapsed();
                ensure!(
                    status == 200,
                    "HTTP {status}: {}",
                    String::from_utf8_lossy(&body)
                );
                Ok::<_, anyhow::Error>(elapsed)
            }
        };
        let cache = &server.state.widget_cache;
        let mut misses = vec![Vec::new(); VIEWS.len()];
        for round in 0..WARM_UP_MISSES + HTTP_MISSES {
            for (i, m) in misses.iter_mut().enumerate() {
                cache.clear();
                let d = get(i).await?;
                if round >= WARM_UP_MISSES {
                    m.push(d);
                }
            }
        }
        cache.clear();
        let mut hits = vec![Vec::new(); VIEWS.len()];
        for round in 0..1 + WARM_UP_HITS + HTTP_HITS {
            for (i, h) in hits.iter_mut().enumerate() {
                let d = get(i).await?;
                if round > WARM_UP_HITS {
                    h.push(d);
                }
            }
        }
        Ok(misses
            .into_iter()
            .zip(hits)
            .map(|(m, h)| (Stats::new(m), Stats::new(h)))
            .collect())
    }
    .await;
    server.stop().await;
    result
}

// ---- Database and machine --------------------------------------------------------------

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// The code measured: HEAD, and whether src/ or migrations/ had uncommitted changes.
fn code_state() -> String {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let head = git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".into());
    match git(&["status", "--porcelain", "--", "src", "migrations"]) {
        Some(s) if s.is_empty() => format!("commit {head}, src/ and migrations/ clean"),
        Some(s) => format!(
            "commit {head} plus uncommitted changes in {} files of src/ and migrations/ \
             (work in progress of other engineers, compiled in)",
            s.lines().count()
        ),
        None => format!("commit {head}"),
    }
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "unknown CPU".into())
}

// ---- Report ----------------------------------------------------------------------------

fn verdict(p95: f64, target: f64) -> &'static str {
    if p95 <= target {
        "✓"
    } else {
        "✗"
    }
}

fn view_facts(body: &serde_json::Value) -> String {
    let n = |k: &str| body[k].as_i64().unwrap_or(-1);
    let sent: i64 = body["daily"]
        .as_array()
        .map(|d| {
            d.iter()
                .map(|x| x["t3Sent"].as_i64().unwrap_or(0) + x["t7Sent"].as_i64().unwrap_or(0))
                .sum()
        })
        .unwrap_or(0);
    format!(
        "{} leads, pending T+3/T+7 {}/{}, {} mails in 14 days, T+3 response {:.0} %",
        body["leadStats"]["total"].as_i64().unwrap_or(-1),
        n("pendingT3Count"),
        n("pendingT7Count"),
        sent,
        body["t3ResponseRate"].as_f64().unwrap_or(0.0) * 100.0,
    )
}

struct Run {
    code: String,
    before: String,
    after_load: String,
    after: String,
    pg: String,
    load: Load,
    data: String,
    measured: Vec<ViewResult>,
    http: Result<Vec<(Stats, Stats)>, String>,
    started: chrono::DateTime<chrono::Utc>,
    measuring: Duration,
}

fn report(r: &Run) -> String {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let s = |d: Duration| d.as_secs_f64();
    let mut out = format!(
        "# Lead widget latency at 100,000 leads\n\n\
         Measured by `cargo bench --bench widget` (release build). Targets: p95 ≤ {HIT_TARGET_MS} ms on a \
         cache hit, ≤ {MISS_TARGET_MS} ms on a miss.\n\n\
         - Date: {date}\n\
         - Machine: {cores} cores (`nproc`), {cpu}\n\
         - PostgreSQL: {pg}\n\
         - Code: {code}\n\
         - Load average (1/5/15 min, `/proc/loadavg`): {before} before the load, {after_load} before \
         measuring, {after} after\n\n\
         ## Data set\n\n{data}\
         - Load: {inserts:.1} s for the inserts (users {users:.1} s, generating the rows {generate:.1} s, \
         leads {leads:.1} s, activities {activities:.1} s, follow-ups {followups:.1} s, all as the superuser \
         through the 0002 triggers), then `VACUUM (ANALYZE)` + `CHECKPOINT` {vacuum:.1} s; \
         migration of the empty database {migrate:.1} s\n\n\
         ## In process: `Widget::answer` as the caller, under row-level security\n\n\
         Pool of the application role `{APP_ROLE}` (no superuser, no BYPASSRLS, owns nothing: \
         `check_runtime_role` passed). One sample = `answer()` + `serde_json::to_vec` of the body. \
         Misses: the cache is cleared before each call (BEGIN, identity, the widget statement, \
         COMMIT: 4 round trips), {WARM_UP_MISSES} warm-up rounds, then {MISSES} calls per view. \
         Hits: {WARM_UP_HITS} warm-up rounds, then {HITS} calls per view. The four views take \
         turns call by call. Times in ms (nearest-rank percentiles); measuring took {measuring:.0} s. \
         \"CPU per miss\": CPU time (user + system, `/proc/<pid>/stat`) of the PostgreSQL backend / \
         of this process over {CPU_MISSES} further misses per view — what a miss costs when it \
         does not wait for a core, so it shows how much of the wall time above is queueing on a \
         busy machine.\n\n\
         | view (caller) | scope | data behind it (from the widget) | hit p50 | hit p95 | hit p99 | hit max | miss p50 | miss p95 | miss p99 | miss max | CPU per miss (db + app) |\n\
         |---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        date = r.started.format("%Y-%m-%d %H:%M UTC"),
        cpu = cpu_model(),
        pg = r.pg,
        code = r.code,
        before = r.before,
        after_load = r.after_load,
        after = r.after,
        data = r.data,
        inserts = s(r.load.inserts()),
        users = s(r.load.users),
        generate = s(r.load.generate),
        leads = s(r.load.leads),
        activities = s(r.load.activities),
        followups = s(r.load.followups),
        vacuum = s(r.load.vacuum),
        migrate = s(r.load.migrate),
        measuring = s(r.measuring),
    );
    for (v, m) in VIEWS.iter().zip(&r.measured) {
        let (miss, hit) = (&m.misses, &m.hits);
        let cpu = m.cpu.map_or("n/a".into(), |(db, app)| {
            format!("{:.2} ({db:.2} + {app:.2})", db + app)
        });
        let _ = writeln!(
            out,
            "| {} ({}) | {} | {} | {:.3} | {:.3} {} | {:.3} | {:.3} | {:.2} | {:.2} {} | {:.2} | {:.2} | {cpu} |",
            v.label,
            v.user,
            v.scope.as_str(),
            view_facts(&m.body),
            hit.p(0.50),
            hit.p(0.95),
            verdict(hit.p(0.95), HIT_TARGET_MS),
            hit.p(0.99),
            hit.max(),
            miss.p(0.50),
            miss.p(0.95),
            verdict(miss.p(0.95), MISS_TARGET_MS),
            miss.p(0.99),
            miss.max(),
        );
    }
    let _ = write!(
        out,
        "\n## Over HTTP (informational)\n\n\
         The real server on 127.0.0.1 (JWT check, handler, JSON response, loopback TCP), one \
         keep-alive `reqwest` client, `GET /api/cockpit/lead-widget?scope=…` until the body is read. \
         {WARM_UP_MISSES} warm-up rounds, then {HTTP_MISSES} misses (instance cache cleared before \
         each) and {HTTP_HITS} hits per view. ms.\n\n"
    );
    match &r.http {
        Ok(http) => {
            out.push_str(
                "| view (caller) | scope | hit p50 | hit p95 | hit p99 | miss p50 | miss p95 | miss p99 |\n\
                 |---|---|---:|---:|---:|---:|---:|---:|\n",
            );
            for (v, (miss, hit)) in VIEWS.iter().zip(http) {
                let _ = writeln!(
                    out,
                    "| {} ({}) | {} | {:.3} | {:.3} | {:.3} | {:.2} | {:.2} | {:.2} |",
                    v.label,
                    v.user,
                    v.scope.as_str(),
                    hit.p(0.50),
                    hit.p(0.95),
                    hit.p(0.99),
                    miss.p(0.50),
                    miss.p(0.95),
                    miss.p(0.99),
                );
            }
        }
        Err(e) => {
            let _ = writeln!(out, "Not measured: {e}");
        }
    }
    out
}

// ---- Main ------------------------------------------------------------------------------

async fn run(db: &str) -> anyhow::Result<String> {
    let started = chrono::Utc::now();
    let before = loadavg();
    let mut times = Load::default();
    let target = bootstrap::Target::from_url(&db_url(APP_ROLE, db), OWNER_ROLE)?;
    timed(&mut times.migrate, async {
        bootstrap::migrate(&admin_url(), &target).await
    })
    .await
    .context("migrating the bench database")?;
    let pool = freshplan::db::connect(&db_url(APP_ROLE, db), 4, "freshplan-widget-bench").await?;
    // The same refusal the server applies: no superuser, no BYPASSRLS, not the owner.
    freshplan::db::check_runtime_role(&pool).await?;
    let mut su = superuser(db).await?;
    load(&pool, &mut su, &mut times).await?;
    let data = data_set(&mut su).await?;
    let (pg,): (String,) = sqlx::query_as(
        "SELECT 'PostgreSQL ' || current_setting('server_version') || ', shared_buffers ' || \
         current_setting('shared_buffers') || ', work_mem ' || current_setting('work_mem') || \
         ', jit ' || current_setting('jit')",
    )
    .fetch_one(&mut su)
    .await?;
    su.close().await.ok();

    let after_load = loadavg();
    eprintln!(
        "widget bench: data loaded in {:.1} s (load average {after_load}); measuring",
        times.inserts().as_secs_f64()
    );
    let measuring = Instant::now();
    let measured = measure_in_process(&pool).await?;
    pool.close().await;
    let http = measure_http(db).await.map_err(|e| format!("{e:#}"));
    let measuring = measuring.elapsed();
    let after = loadavg();
    Ok(report(&Run {
        code: code_state(),
        before,
        after_load,
        after,
        pg,
        load: times,
        data,
        measured,
        http,
        started,
        measuring,
    }))
}

fn main() {
    if !std::env::args().skip(1).any(|a| a == "--bench") {
        println!(
            "benches/widget.rs: not started by `cargo bench` (no --bench argument); \
             measuring nothing and leaving reports/widget-bench.md unchanged"
        );
        return;
    }
    let db = format!("fp_widget_bench_{}", std::process::id());
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let outcome = runtime.block_on(async {
        let outcome = std::panic::AssertUnwindSafe(run(&db)).catch_unwind().await;
        if std::env::var_os("FRESHPLAN_WIDGET_BENCH_KEEP").is_some() {
            eprintln!("widget bench: kept database {db}");
        } else if let Err(e) = drop_database(&db).await {
            eprintln!("widget bench: could not drop database {db}: {e:#}");
        }
        outcome
    });
    match outcome {
        Ok(Ok(report)) => {
            let path =
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("reports/widget-bench.md");
            if let Err(e) = std::fs::write(&path, &report) {
                eprintln!("cannot write {}: {e}", path.display());
            }
            print!("{report}");
        }
        Ok(Err(e)) => {
            eprintln!("widget bench failed: {e:#}");
            std::process::exit(1);
        }
        Err(panic) => std::panic::resume_unwind(panic),
    }
}
