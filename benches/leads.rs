//! Lead-list latency at 100,000 leads (`cargo bench --bench leads`): p50/p95/p99/max of the
//! first page of 50 (`LeadService::list`, what `GET /api/leads?size=50` runs: the page, its
//! total and the decryption of the contact data) per role, without and with a search, and a
//! deep page. Goal (issue "Performance"): p95 ≤ 5 ms for the first page.
//!
//! Same data set as the widget bench (benches/support/dataset.rs) in a database of its own
//! (`fp_leads_bench_<pid>`, dropped at the end unless `FRESHPLAN_LEADS_BENCH_KEEP=1`), measured
//! in-process through a pool of the application role, so row-level security applies. Cases are
//! interleaved round by round. Writes reports/lead-list-bench.md.
//!
//! Only under `cargo bench`: run any other way it measures nothing and leaves the report alone.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use freshplan::db::bootstrap;
use freshplan::events::Publisher;
use freshplan::identity::Principal;
use freshplan::leads::service::{LeadService, ListQuery};
use freshplan::pii::Vault;
use freshplan::telemetry::metrics::Metrics;
use futures::FutureExt;

#[path = "support/dataset.rs"]
mod dataset;
use dataset::*;

const APP_ROLE: &str = "freshplan_app";
const OWNER_ROLE: &str = "freshplan_owner";
const WARM_UP: usize = 20;
const SAMPLES: usize = 300;
const GOAL_P95_MS: f64 = 5.0;

/// One measured call: who, with which query.
struct Case {
    label: &'static str,
    user: &'static str,
    q: Option<&'static str>,
    page: i64,
}

const CASES: &[Case] = &[
    Case {
        label: "sales, first page",
        user: "sales-de-1",
        q: None,
        page: 0,
    },
    Case {
        label: "manager (DE), first page",
        user: "manager-de",
        q: None,
        page: 0,
    },
    Case {
        label: "admin, first page",
        user: "admin",
        q: None,
        page: 0,
    },
    Case {
        label: "sales, q=krone (common word)",
        user: "sales-de-1",
        q: Some("krone"),
        page: 0,
    },
    Case {
        label: "manager (DE), q=krone",
        user: "manager-de",
        q: Some("krone"),
        page: 0,
    },
    Case {
        label: "admin, q=krone",
        user: "admin",
        q: Some("krone"),
        page: 0,
    },
    Case {
        label: "sales, q=4711 (rare)",
        user: "sales-de-1",
        q: Some("4711"),
        page: 0,
    },
    Case {
        label: "manager (DE), q=4711",
        user: "manager-de",
        q: Some("4711"),
        page: 0,
    },
    Case {
        label: "admin, q=4711",
        user: "admin",
        q: Some("4711"),
        page: 0,
    },
    Case {
        label: "admin, page 200 (offset 10,000)",
        user: "admin",
        q: None,
        page: 200,
    },
];

fn principal(user: &str) -> anyhow::Result<Principal> {
    freshplan::demo::principal(user).with_context(|| format!("demo user {user}"))
}

fn stats(mut v: Vec<Duration>) -> (f64, f64, f64, f64) {
    v.sort();
    let p = |q: f64| {
        let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
        v[rank - 1].as_secs_f64() * 1000.0
    };
    (
        p(0.50),
        p(0.95),
        p(0.99),
        v.last().unwrap().as_secs_f64() * 1000.0,
    )
}

async fn run(db: &str) -> anyhow::Result<String> {
    let mut times = Load::default();
    let target = bootstrap::Target::from_url(&db_url(APP_ROLE, db), OWNER_ROLE)?;
    bootstrap::migrate(&admin_url(), &target).await?;
    let pool = freshplan::db::connect(&db_url(APP_ROLE, db), 4, "freshplan-leads-bench").await?;
    freshplan::db::check_runtime_role(&pool).await?;
    let mut su = superuser(db).await?;
    load(&pool, &mut su, &mut times).await?;
    // The data set's contact columns hold stand-in bytes (the widget never decrypts them); the
    // list decrypts, so clear them (AES-GCM of 50 rows × 3 fields is a few µs either way).
    sqlx::query(
        "UPDATE leads SET contact_person_ct = NULL, email_ct = NULL, phone_ct = NULL, \
         pii_key_id = NULL WHERE contact_person_ct IS NOT NULL OR email_ct IS NOT NULL \
         OR phone_ct IS NOT NULL",
    )
    .execute(&mut su)
    .await?;
    sqlx::query("VACUUM (ANALYZE) leads")
        .execute(&mut su)
        .await?;
    let (pg,): (String,) =
        sqlx::query_as("SELECT 'PostgreSQL ' || current_setting('server_version')")
            .fetch_one(&mut su)
            .await?;
    let (leads, visible_sales): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE status <> 'DELETED' AND \
           (owner_user_id = 'sales-de-1' OR 'sales-de-1' = ANY (collaborators))) FROM leads",
    )
    .fetch_one(&mut su)
    .await?;
    eprintln!("leads bench: {leads} leads loaded; measuring");
    // The key the data set was sealed with (dataset.rs).
    let vault = Vault::new(vec![("k1".into(), vec![7; 32])], "k1", vec![9; 32])?;
    let service = LeadService {
        pool: pool.clone(),
        vault: Arc::new(vault),
        publisher: Publisher::new(Arc::new(Metrics::new())),
    };
    let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); CASES.len()];
    let mut rows = vec![(0usize, 0i64); CASES.len()];
    for round in 0..WARM_UP + SAMPLES {
        for (i, c) in CASES.iter().enumerate() {
            let who = principal(c.user)?;
            let q = ListQuery {
                q: c.q.map(str::to_string),
                page: Some(c.page),
                size: Some(50),
                ..ListQuery::default()
            };
            let started = Instant::now();
            let page = service
                .list(&who, q)
                .await
                .map_err(|e| anyhow::anyhow!("{}: {e:?}", c.label))?;
            let took = started.elapsed();
            std::hint::black_box(&page);
            if round >= WARM_UP {
                samples[i].push(took);
            }
            rows[i] = (page.items.len(), page.total);
        }
    }
    pool.close().await;
    let mut out = String::new();
    writeln!(out, "# Lead list at 100,000 leads\n")?;
    writeln!(
        out,
        "`cargo bench --bench leads` (benches/leads.rs) — in-process `LeadService::list` as the \
         application role (row-level security applies), page size 50 (the data set's stand-in \
         contact data is cleared, so no decryption) on this machine ({} cores), {pg}, measured \
         {}.\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
    )?;
    writeln!(
        out,
        "{leads} leads in DE/AT/CH (benches/support/dataset.rs); `sales-de-1` sees {visible_sales} \
         (own and collaborating). {SAMPLES} samples per case after {WARM_UP} warm-up rounds, cases \
         interleaved. Goal: first page p95 ≤ {GOAL_P95_MS} ms.\n"
    )?;
    writeln!(
        out,
        "| case | rows / total | p50 ms | p95 ms | p99 ms | max ms |"
    )?;
    writeln!(out, "|---|---|---|---|---|---|")?;
    for (i, c) in CASES.iter().enumerate() {
        let (p50, p95, p99, max) = stats(std::mem::take(&mut samples[i]));
        writeln!(
            out,
            "| {} | {} / {} | {p50:.2} | {p95:.2} | {p99:.2} | {max:.2} |",
            c.label, rows[i].0, rows[i].1
        )?;
    }
    writeln!(
        out,
        "\nHow: `lead_list_page()` (migration 0006) picks the page's ids with per-role predicates \
         the planner can serve from indexes (row-level security would allow an index only for \
         leakproof conditions; `@>` on collaborators and ILIKE are not), the total comes from the \
         lead-count roll-up where that is exact (managers and admins without a search), and the \
         50 rows are read by id under the caller's row-level security."
    )?;
    Ok(out)
}

fn main() {
    if !std::env::args().skip(1).any(|a| a == "--bench") {
        println!(
            "benches/leads.rs: not started by `cargo bench` (no --bench argument); measuring \
             nothing and leaving reports/lead-list-bench.md unchanged"
        );
        return;
    }
    let db = format!("fp_leads_bench_{}", std::process::id());
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let outcome = runtime.block_on(async {
        let outcome = std::panic::AssertUnwindSafe(run(&db)).catch_unwind().await;
        if std::env::var_os("FRESHPLAN_LEADS_BENCH_KEEP").is_some() {
            eprintln!("leads bench: kept database {db}");
        } else if let Err(e) = drop_database(&db).await {
            eprintln!("leads bench: could not drop database {db}: {e:#}");
        }
        outcome
    });
    match outcome {
        Ok(Ok(report)) => {
            let path =
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("reports/lead-list-bench.md");
            if let Err(e) = std::fs::write(&path, &report) {
                eprintln!("cannot write {}: {e}", path.display());
            }
            print!("{report}");
        }
        Ok(Err(e)) => {
            eprintln!("leads bench failed: {e:#}");
            std::process::exit(1);
        }
        Err(panic) => std::panic::resume_unwind(panic),
    }
}
