//! Observability end to end: the exact metric deltas of a known sequence of requests, and a real
//! Prometheus (Debian's `prometheus` server) scraping a running service with the job of
//! `ops/prometheus/prometheus.yml` and the rules of `ops/prometheus/alerts.yml`: the listener
//! alert fires while the database refuses the listener and resolves after it reconnects, and
//! every query of the Grafana dashboard `ops/grafana/freshplan-leads.json` runs against it.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use freshplan::events::consumer::Outcome;
use freshplan::events::outbox::{self, Cursor};
use serde_json::{json, Value};
use sqlx::Connection;

const CREATED: &str = "dashboard.lead_created";
const STATUS_CHANGED: &str = "dashboard.lead_status_changed";
const MODULE: &str = "lead-management";
/// The alert on `freshplan_listener_connected == 0` in `ops/prometheus/alerts.yml`.
const LISTENER_ALERT: &str = "FreshplanListenerDisconnected";
/// How long the tests wait for Prometheus (scrapes and rule evaluations every second).
const PROMETHEUS_PATIENCE: Duration = Duration::from_secs(60);

// ---- The exposition format ---------------------------------------------------------------

type Labels = BTreeMap<String, String>;

/// One scrape of `/q/metrics`: every sample by metric name and labels.
struct Scrape(HashMap<(String, Labels), f64>);

impl Scrape {
    fn parse(text: &str) -> Scrape {
        let samples = text
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
            .map(|l| parse_sample(l).unwrap_or_else(|| panic!("unparsable sample line: {l}")))
            .map(|(name, labels, value)| ((name, labels), value))
            .collect();
        Scrape(samples)
    }

    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let labels: Labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.0
            .get(&(name.to_string(), labels))
            .copied()
            .unwrap_or(0.0)
    }

    /// The samples of `name` that changed since `before` (a series new since then counts from 0).
    fn deltas(&self, before: &Scrape, name: &str) -> BTreeMap<Labels, f64> {
        self.0
            .iter()
            .filter(|((n, _), _)| n == name)
            .map(|((n, labels), v)| {
                let was = before
                    .0
                    .get(&(n.clone(), labels.clone()))
                    .copied()
                    .unwrap_or(0.0);
                (labels.clone(), v - was)
            })
            .filter(|(_, d)| *d != 0.0)
            .collect()
    }
}

/// `name{a="x",b="y"} value` (label values may contain `{`, `}`, `,` and escapes).
fn parse_sample(line: &str) -> Option<(String, Labels, f64)> {
    let name_end = line.find(['{', ' '])?;
    let name = line[..name_end].to_string();
    let mut labels = Labels::new();
    let mut rest = &line[name_end..];
    if let Some(mut s) = rest.strip_prefix('{') {
        loop {
            s = s.trim_start_matches(',');
            if let Some(after) = s.strip_prefix('}') {
                rest = after;
                break;
            }
            let (key, after_key) = s.split_once("=\"")?;
            let mut value = String::new();
            let mut chars = after_key.char_indices();
            let end = loop {
                match chars.next()? {
                    (i, '"') => break i,
                    (_, '\\') => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        c => value.push(c),
                    },
                    (_, c) => value.push(c),
                }
            };
            labels.insert(key.to_string(), value);
            s = &after_key[end + 1..];
        }
    }
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some((name, labels, value))
}

async fn scrape(app: &TestApp) -> Scrape {
    Scrape::parse(&app.metrics_text().await)
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

async fn ready_status(app: &TestApp) -> u16 {
    app.get("admin", "/q/health/ready").await.status().as_u16()
}

async fn wait_ready(app: &TestApp) {
    wait_until(PATIENCE, "readiness UP (listener live)", || async {
        ready_status(app).await == 200
    })
    .await;
}

// ---- 1. Exact deltas of a known sequence ---------------------------------------------------

#[tokio::test]
async fn three_creates_two_status_changes_a_replayed_duplicate_and_a_denied_publish_move_the_counters_by_exactly_that_and_feed_all_three_latency_histograms(
) {
    let app = TestApp::spawn().await;
    wait_ready(&app).await;
    let before = scrape(&app).await;

    let mut leads = Vec::new();
    for i in 0..3 {
        leads.push(
            app.create_lead("sales-de-1", TestApp::lead_body(&format!("Messe Lead {i}")))
                .await,
        );
    }
    for lead in &leads[..2] {
        let r = app
            .patch(
                "sales-de-1",
                lead["id"].as_str().unwrap(),
                1,
                json!({"status": "ACTIVE"}),
            )
            .await;
        assert_eq!(r.status(), 200, "status change");
    }
    // A viewer may not write: refused before anything reaches the outbox, counted `denied`.
    let r = app
        .client
        .post(format!("{}/api/leads", app.url))
        .header("Authorization", app.bearer("viewer-de"))
        .json(&TestApp::lead_body("Nur Lesen GmbH"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "a viewer creating a lead");

    wait_until(
        PATIENCE,
        "the listener consumed the five events",
        || async {
            let now = scrape(&app).await;
            let consumed = now.deltas(&before, "freshplan_events_consumed_total");
            consumed.get(&labels(&[
                ("event_type", CREATED),
                ("module", MODULE),
                ("result", "success"),
            ])) == Some(&3.0)
                && consumed.get(&labels(&[
                    ("event_type", STATUS_CHANGED),
                    ("module", MODULE),
                    ("result", "success"),
                ])) == Some(&2.0)
        },
    )
    .await;

    // Replay: the first lead's creation delivered once more to this instance's dispatcher, as a
    // redelivery would be.
    let rows = outbox::fetch_fresh(&app.db.system_pool().await, 0, Cursor::default(), 100)
        .await
        .unwrap();
    assert_eq!(rows.len(), 5, "three creations and two status changes");
    let replay: Vec<_> = rows
        .iter()
        .filter(|r| r.event_type == CREATED)
        .take(1)
        .cloned()
        .collect();
    let outcomes = app
        .state()
        .dispatcher()
        .process(&app.state().pool, &replay, Instant::now(), None)
        .await
        .unwrap();
    assert_eq!(outcomes, vec![Outcome::Duplicate]);

    let after = scrape(&app).await;
    let published = after.deltas(&before, "freshplan_events_published_total");
    let want_published = BTreeMap::from([
        (
            labels(&[
                ("event_type", CREATED),
                ("module", MODULE),
                ("result", "success"),
            ]),
            3.0,
        ),
        (
            labels(&[
                ("event_type", STATUS_CHANGED),
                ("module", MODULE),
                ("result", "success"),
            ]),
            2.0,
        ),
        (
            labels(&[
                ("event_type", CREATED),
                ("module", MODULE),
                ("result", "denied"),
            ]),
            1.0,
        ),
    ]);
    assert_eq!(
        published, want_published,
        "freshplan_events_published_total deltas"
    );

    let consumed = after.deltas(&before, "freshplan_events_consumed_total");
    let want_consumed = BTreeMap::from([
        (
            labels(&[
                ("event_type", CREATED),
                ("module", MODULE),
                ("result", "success"),
            ]),
            3.0,
        ),
        (
            labels(&[
                ("event_type", STATUS_CHANGED),
                ("module", MODULE),
                ("result", "success"),
            ]),
            2.0,
        ),
        (
            labels(&[
                ("event_type", CREATED),
                ("module", MODULE),
                ("result", "duplicate"),
            ]),
            1.0,
        ),
    ]);
    assert_eq!(
        consumed, want_consumed,
        "freshplan_events_consumed_total deltas"
    );

    // HTTP: the API requests of the sequence, exactly (the scrapes and readiness polls of the
    // test itself hit /q/… routes and are left out).
    let http: BTreeMap<Labels, f64> = after
        .deltas(&before, "freshplan_http_requests_total")
        .into_iter()
        .filter(|(l, _)| l["route"].starts_with("/api/"))
        .collect();
    let want_http = BTreeMap::from([
        (
            labels(&[
                ("method", "POST"),
                ("route", "/api/leads"),
                ("status", "201"),
            ]),
            3.0,
        ),
        (
            labels(&[
                ("method", "POST"),
                ("route", "/api/leads"),
                ("status", "403"),
            ]),
            1.0,
        ),
        (
            labels(&[
                ("method", "PATCH"),
                ("route", "/api/leads/{id}"),
                ("status", "200"),
            ]),
            2.0,
        ),
    ]);
    assert_eq!(http, want_http, "freshplan_http_requests_total deltas");
    let durations: BTreeMap<Labels, f64> = after
        .deltas(&before, "freshplan_http_request_duration_ms_count")
        .into_iter()
        .filter(|(l, _)| l["route"].starts_with("/api/"))
        .collect();
    assert_eq!(
        durations,
        BTreeMap::from([
            (labels(&[("method", "POST"), ("route", "/api/leads")]), 4.0),
            (
                labels(&[("method", "PATCH"), ("route", "/api/leads/{id}")]),
                2.0
            ),
        ]),
        "freshplan_http_request_duration_ms_count deltas"
    );

    // Latency: every path of both event types received observations, and each histogram is
    // consistent (+Inf bucket = count).
    for event_type in [CREATED, STATUS_CHANGED] {
        for path in ["publish_notify", "notify_process", "end_to_end"] {
            let l = [("event_type", event_type), ("path", path)];
            let count = after.get("freshplan_event_latency_ms_count", &l)
                - before.get("freshplan_event_latency_ms_count", &l);
            assert!(
                count > 0.0,
                "freshplan_event_latency_ms{{event_type={event_type},path={path}}} received no observation"
            );
            let inf = [("event_type", event_type), ("path", path), ("le", "+Inf")];
            assert_eq!(
                after.get("freshplan_event_latency_ms_bucket", &inf),
                after.get("freshplan_event_latency_ms_count", &l),
                "{event_type} {path}: +Inf bucket equals the count"
            );
        }
    }
}

// ---- A real Prometheus -------------------------------------------------------------------

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|p| p.is_file())
}

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo_file(path)).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

/// `ops/prometheus/prometheus.yml` for the test: the same file with only these changes (each
/// asserted to apply): the intervals set to 1 s, the target replaced by the test server, the
/// rule file replaced by `rules` (absolute path), and the `alerting` section left out (no
/// Alertmanager runs here). Returns the configuration and its scrape job's name.
fn test_prometheus_config(target: &str, rules: &Path) -> (String, String) {
    let original = read("ops/prometheus/prometheus.yml");
    let mut out = vec![
        "# Generated by tests/observability.rs from ops/prometheus/prometheus.yml.".to_string(),
    ];
    let (mut section, mut intervals, mut rule_files, mut targets) = ("", 0, 0, 0);
    let mut job = None;
    for line in original.lines() {
        if !line.starts_with([' ', '#']) && line.ends_with(':') {
            section = if line.starts_with("alerting") {
                "alerting"
            } else if line.starts_with("rule_files") {
                "rule_files"
            } else if line.starts_with("scrape_configs") {
                "scrape_configs"
            } else {
                "other"
            };
        }
        if section == "alerting" && !line.starts_with(' ') && !line.starts_with("alerting") {
            section = "other";
        }
        if section == "alerting" {
            continue;
        }
        let indent = &line[..line.len() - line.trim_start().len()];
        let trimmed = line.trim_start();
        if let Some(name) = trimmed.strip_prefix("- job_name:") {
            job = Some(name.split('#').next().unwrap().trim().to_string());
        }
        if [
            "scrape_interval:",
            "evaluation_interval:",
            "scrape_timeout:",
        ]
        .iter()
        .any(|k| trimmed.starts_with(k))
        {
            let key = trimmed.split(':').next().unwrap();
            out.push(format!("{indent}{key}: 1s"));
            intervals += 1;
        } else if section == "rule_files" && trimmed.starts_with("- ") {
            assert_eq!(
                trimmed.trim_start_matches("- ").trim(),
                "alerts.yml",
                "prometheus.yml loads alerts.yml"
            );
            out.push(format!("{indent}- {:?}", rules.display().to_string()));
            rule_files += 1;
        } else if section == "scrape_configs" && trimmed.starts_with("- targets:") {
            out.push(format!("{indent}- targets: [{target:?}]"));
            targets += 1;
        } else {
            out.push(line.to_string());
        }
    }
    assert!(
        intervals >= 2,
        "prometheus.yml sets the scrape and evaluation intervals"
    );
    assert_eq!(rule_files, 1, "prometheus.yml loads one rule file");
    assert_eq!(targets, 1, "prometheus.yml has one static target");
    let config = out.join("\n") + "\n";
    assert!(
        config.contains("metrics_path: /q/metrics"),
        "prometheus.yml scrapes /q/metrics"
    );
    (config, job.expect("prometheus.yml has a job_name"))
}

/// `ops/prometheus/alerts.yml` with the `for:` of the listener alert shortened from 1m to 2s, so
/// that the test sees it fire within seconds; every other rule unchanged.
fn test_alert_rules() -> String {
    let original = read("ops/prometheus/alerts.yml");
    let mut out = Vec::new();
    let (mut in_listener_alert, mut shortened) = (false, 0);
    for line in original.lines() {
        let trimmed = line.trim_start();
        if let Some(name) = trimmed.strip_prefix("- alert:") {
            in_listener_alert = name.trim() == LISTENER_ALERT;
        }
        if in_listener_alert && trimmed.starts_with("expr:") {
            assert!(
                trimmed.contains("freshplan_listener_connected") && trimmed.contains("== 0"),
                "{LISTENER_ALERT} is the alert on freshplan_listener_connected == 0: {trimmed}"
            );
        }
        if in_listener_alert && trimmed.starts_with("for:") {
            let indent = &line[..line.len() - trimmed.len()];
            out.push(format!(
                "{indent}for: 2s   # tests/observability.rs: 1m in alerts.yml"
            ));
            shortened += 1;
        } else {
            out.push(line.to_string());
        }
    }
    assert_eq!(
        shortened, 1,
        "{LISTENER_ALERT} has one `for:` in alerts.yml"
    );
    out.join("\n") + "\n"
}

/// A Prometheus server of this test; killed when dropped.
struct Prometheus {
    child: Child,
    url: String,
    log: PathBuf,
    job: String,
    client: reqwest::Client,
    /// Configuration, rules, TSDB and log; removed after the process is killed.
    _dir: Option<tempfile::TempDir>,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Starts Debian's `prometheus` scraping `app` with the test configuration and waits for
    /// `/-/ready`.
    async fn start(app: &TestApp) -> Prometheus {
        let binary = which("prometheus").unwrap_or_else(|| {
            panic!(
                "the Prometheus server is missing: install Debian's `prometheus` package \
                 (apt-get install -y prometheus; scripts/test.sh does). This test needs it and does not skip."
            )
        });
        let dir = tempfile::tempdir().unwrap();
        let rules = dir.path().join("alerts.yml");
        std::fs::write(&rules, test_alert_rules()).unwrap();
        let target = app.url.trim_start_matches("http://").to_string();
        let (config, job) = test_prometheus_config(&target, &rules);
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        let log = dir.path().join("prometheus.log");
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();

        // A free port is found by binding port 0 and letting it go; another process may take it
        // in between, so a start that fails on its address is retried with a new port.
        for _attempt in 0..3 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let log_file = std::fs::File::create(&log).unwrap();
            let child = Command::new(&binary)
                .arg(format!("--config.file={}", config_path.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .stdin(Stdio::null())
                .stdout(log_file.try_clone().unwrap())
                .stderr(log_file)
                .spawn()
                .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
            // From here on the guard kills the process, whatever happens.
            let mut prometheus = Prometheus {
                child,
                url: format!("http://127.0.0.1:{port}"),
                log: log.clone(),
                job: job.clone(),
                client: client.clone(),
                _dir: None,
            };
            if prometheus.wait_ready().await {
                prometheus._dir = Some(dir);
                return prometheus;
            }
        }
        panic!("prometheus found no free port in 3 attempts");
    }

    /// Waits for `/-/ready`; false when the process exited because its address was taken.
    async fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let log = self.log_text();
                if log.contains("address already in use") {
                    return false;
                }
                panic!("prometheus exited ({status}) before it was ready:\n{log}");
            }
            let ready = self
                .client
                .get(format!("{}/-/ready", self.url))
                .send()
                .await
                .map(|r| r.status() == 200)
                .unwrap_or(false);
            if ready {
                return true;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready within 30 s:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn api(&self, path: &str, params: &[(&str, &str)]) -> Value {
        let r = self
            .client
            .get(format!("{}{path}", self.url))
            .query(params)
            .send()
            .await
            .unwrap_or_else(|e| panic!("prometheus {path}: {e}"));
        let status = r.status();
        let body: Value = r.json().await.unwrap();
        assert!(
            status == 200 && body["status"] == "success",
            "prometheus {path} {params:?}: HTTP {status}: {body}"
        );
        body["data"].clone()
    }

    /// The result vector of an instant query.
    async fn query(&self, expr: &str) -> Vec<Value> {
        let data = self.api("/api/v1/query", &[("query", expr)]).await;
        data["result"].as_array().cloned().unwrap_or_default()
    }

    /// The single value of `expr`, if it returns exactly one sample.
    async fn value(&self, expr: &str) -> Option<f64> {
        match self.query(expr).await.as_slice() {
            [one] => one["value"][1].as_str().and_then(|v| v.parse().ok()),
            _ => None,
        }
    }

    /// Active (pending or firing) alerts named `name`.
    async fn active_alerts(&self, name: &str) -> Vec<Value> {
        let data = self.api("/api/v1/alerts", &[]).await;
        data["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["labels"]["alertname"] == name)
            .cloned()
            .collect()
    }

    /// Polls until `check` holds; panics with `what` and the Prometheus log after `within`.
    async fn wait_for<F, Fut>(&self, within: Duration, what: &str, mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + within;
        while !check().await {
            assert!(
                Instant::now() < deadline,
                "timed out after {within:?} waiting for: {what}\nprometheus log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// `ALTER DATABASE … ALLOW_CONNECTIONS` on the test's own database, from the administrator's
/// database (PostgreSQL refuses it for the database one is connected to).
async fn allow_connections(app: &TestApp, allow: bool) {
    let mut admin = sqlx::PgConnection::connect(&admin_url())
        .await
        .expect("administrator connection");
    sqlx::query(&format!(
        "ALTER DATABASE \"{}\" ALLOW_CONNECTIONS {allow}",
        app.db.name
    ))
    .execute(&mut admin)
    .await
    .unwrap();
}

// ---- 2. The listener alert on a real Prometheus ------------------------------------------

#[tokio::test]
async fn prometheus_fires_the_listener_alert_while_the_database_refuses_the_listener_and_resolves_it_after_the_reconnect(
) {
    let app = TestApp::spawn().await;
    wait_ready(&app).await;
    assert_eq!(app.metric("freshplan_listener_connected").await, 1.0);
    let prometheus = Prometheus::start(&app).await;
    let instance = app.url.trim_start_matches("http://").to_string();
    let connected = format!(
        "freshplan_listener_connected{{job=\"{}\", instance=\"{instance}\"}}",
        prometheus.job
    );
    prometheus
        .wait_for(
            PROMETHEUS_PATIENCE,
            "Prometheus scraped freshplan_listener_connected = 1",
            || async { prometheus.value(&connected).await == Some(1.0) },
        )
        .await;
    assert!(prometheus.active_alerts(LISTENER_ALERT).await.is_empty());

    // Keep the listener away: a listener whose backend is terminated reconnects within 250 ms,
    // so the database is made to refuse new connections to this test's database
    // (ALLOW_CONNECTIONS false — an outage as PostgreSQL would present it) and then the
    // listener's backend is terminated. Its reconnect attempts fail until connections are
    // allowed again. Existing connections (the request pool, the health probe, this superuser
    // session) stay, and /q/metrics needs none.
    let mut su = app.db.superuser().await;
    allow_connections(&app, false).await;
    let pid = app.state().listener_health.backend_pid();
    assert_ne!(pid, 0, "the listener recorded its backend pid");
    let terminated: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .fetch_one(&mut su)
        .await
        .unwrap();
    assert!(terminated, "the listener's backend {pid} was terminated");
    wait_until(PATIENCE, "freshplan_listener_connected = 0", || async {
        app.metric("freshplan_listener_connected").await == 0.0
    })
    .await;
    assert_eq!(
        ready_status(&app).await,
        503,
        "readiness DOWN without listener"
    );

    let started = Instant::now();
    let seen_pending = std::cell::Cell::new(false);
    prometheus
        .wait_for(
            PROMETHEUS_PATIENCE,
            &format!("{LISTENER_ALERT} firing for {instance}"),
            || async {
                let alerts = prometheus.active_alerts(LISTENER_ALERT).await;
                let ours = alerts.iter().find(|a| a["labels"]["instance"] == instance);
                if ours.is_some_and(|a| a["state"] == "pending") {
                    seen_pending.set(true);
                }
                ours.is_some_and(|a| a["state"] == "firing")
            },
        )
        .await;
    let firing = prometheus.active_alerts(LISTENER_ALERT).await;
    eprintln!(
        "{LISTENER_ALERT} firing {:?} after the listener was cut off (pending seen: {})",
        started.elapsed(),
        seen_pending.get()
    );
    assert_eq!(firing.len(), 1, "one alert: {firing:?}");
    assert_eq!(firing[0]["labels"]["severity"], "critical");
    assert_eq!(firing[0]["labels"]["job"], prometheus.job.as_str());
    assert_eq!(
        firing[0]["annotations"]["runbook_url"],
        "docs/runbook.md#freshplanlistenerdisconnected"
    );
    assert_eq!(prometheus.value(&connected).await, Some(0.0));
    // Still held away while the alert fired.
    assert_eq!(app.metric("freshplan_listener_connected").await, 0.0);

    // Let the listener back: it reconnects at its next attempt (backoff at most 5 s).
    allow_connections(&app, true).await;
    let started = Instant::now();
    wait_until(
        Duration::from_secs(20),
        "freshplan_listener_connected = 1 after the reconnect",
        || async { app.metric("freshplan_listener_connected").await == 1.0 },
    )
    .await;
    wait_until(PATIENCE, "readiness UP after the reconnect", || async {
        ready_status(&app).await == 200
    })
    .await;
    prometheus
        .wait_for(
            PROMETHEUS_PATIENCE,
            &format!("{LISTENER_ALERT} resolved"),
            || async { prometheus.active_alerts(LISTENER_ALERT).await.is_empty() },
        )
        .await;
    eprintln!(
        "{LISTENER_ALERT} resolved {:?} after connections were allowed again",
        started.elapsed()
    );
    assert_eq!(prometheus.value(&connected).await, Some(1.0));
}

// ---- 3. The dashboard's queries on a real Prometheus --------------------------------------

/// Panels that may legitimately return no data here, and why. Every other panel query must
/// return at least one series.
const MAY_BE_EMPTY: &[(&str, &str)] = &[
    (
        "Server errors by route",
        "data only once some request answered 5xx (here: readiness polls answered 503 until the \
         listener was live); a status series appears with its first request",
    ),
    (
        "Relay state",
        "only processes that run the NATS relay export freshplan_relay_state (off here)",
    ),
];

/// Variables whose values may be empty here (none: `territory` reads
/// `leads_followup_sent_total`, whose series exist from the start).
const VARIABLES_MAY_BE_EMPTY: &[&str] = &[];

/// Replaces Grafana's variables as the dashboard would be shown by default: the built-in
/// intervals as in ops/check.sh, a variable with a current value by that value (`job`), the
/// others by their "All" value.
fn substitute(expr: &str, vars: &HashMap<String, String>) -> String {
    let builtin = |name: &str| -> Option<&str> {
        Some(match name {
            "__rate_interval" => "5m",
            "__interval" | "__auto" => "1m",
            "__range" => "1h",
            "__interval_ms" => "60000",
            "__range_s" => "3600",
            "__range_ms" => "3600000",
            _ => return None,
        })
    };
    let value = |name: &str| -> String {
        builtin(name)
            .map(str::to_string)
            .or_else(|| vars.get(name).cloned())
            .unwrap_or_else(|| panic!("the dashboard uses an unknown variable ${name}: {expr}"))
    };
    let is_ident_start = |c: char| c.is_ascii_alphabetic() || c == '_';
    let mut out = String::new();
    let mut rest = expr;
    while let Some(i) = rest.find(['$', '[']) {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(inner) = tail.strip_prefix("${") {
            let end = inner.find('}').expect("closed ${…}");
            let name = inner[..end].split(':').next().unwrap();
            if name.starts_with(is_ident_start) {
                out.push_str(&value(name));
            } else {
                out.push_str(&tail[..end + 3]); // ${1} of label_replace
            }
            rest = &inner[end + 1..];
        } else if let Some(inner) = tail.strip_prefix("[[") {
            let end = inner.find("]]").expect("closed [[…]]");
            out.push_str(&value(inner[..end].split(':').next().unwrap()));
            rest = &inner[end + 2..];
        } else if tail.starts_with('$') && tail[1..].starts_with(is_ident_start) {
            let len = tail[1..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len() - 1);
            out.push_str(&value(&tail[1..1 + len]));
            rest = &tail[1 + len..];
        } else {
            out.push_str(&tail[..1]);
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

fn panels(list: &[Value]) -> Vec<&Value> {
    list.iter()
        .flat_map(|p| {
            let mut all = vec![p];
            all.extend(panels(p["panels"].as_array().map_or(&[][..], |v| v)));
            all
        })
        .collect()
}

#[tokio::test]
async fn every_dashboard_query_runs_on_a_real_prometheus_and_all_but_the_5xx_panel_have_data_with_follow_ups_delivered(
) {
    let dashboard: Value = serde_json::from_str(&read("ops/grafana/freshplan-leads.json")).unwrap();
    let mail_dir = tempfile::tempdir().unwrap();
    let app =
        TestApp::spawn_with(&[("FRESHPLAN_MAIL_FILE_DIR", mail_dir.path().to_str().unwrap())])
            .await;
    wait_ready(&app).await;
    let prometheus = Prometheus::start(&app).await;
    let instance = app.url.trim_start_matches("http://").to_string();
    prometheus
        .wait_for(PROMETHEUS_PATIENCE, "the first scrape", || async {
            prometheus
                .value(&format!("up{{instance=\"{instance}\"}}"))
                .await
                == Some(1.0)
        })
        .await;

    // Traffic in two rounds. The service creates a counter series with its first increment
    // (not at 0 on start), and increase()/rate() cannot see the step from "no series" to its
    // first value; so the first round creates every series (events of two types, a replayed
    // duplicate, the cockpit widget missed and then hit) and the second, after Prometheus has
    // scraped the first, moves them.
    let traffic = |round: &'static str| {
        let app = &app;
        async move {
            let before = scrape(app).await;
            let lead = app
                .create_lead(
                    "sales-de-1",
                    TestApp::lead_body(&format!("Dashboard Lead {round}")),
                )
                .await;
            let r = app
                .patch(
                    "sales-de-1",
                    lead["id"].as_str().unwrap(),
                    1,
                    json!({"status": "ACTIVE"}),
                )
                .await;
            assert_eq!(r.status(), 200);
            wait_until(PATIENCE, "both events consumed", || async {
                let d = scrape(app)
                    .await
                    .deltas(&before, "freshplan_events_consumed_total");
                d.values().sum::<f64>() >= 2.0
            })
            .await;
            let rows = outbox::fetch_fresh(&app.db.system_pool().await, 0, Cursor::default(), 1)
                .await
                .unwrap();
            assert_eq!(
                app.state()
                    .dispatcher()
                    .process(&app.state().pool, &rows, Instant::now(), None)
                    .await
                    .unwrap(),
                vec![Outcome::Duplicate]
            );
            for _ in 0..2 {
                assert_eq!(
                    app.get("sales-de-1", "/api/cockpit/lead-widget")
                        .await
                        .status(),
                    200
                );
            }
            // A T+3 follow-up, queued by the job and delivered (file transport).
            let due = app
                .create_lead(
                    "sales-de-1",
                    json!({"companyName": format!("Follow-up Lead {round}"), "businessType": "HOTEL",
                           "source": "MESSE", "email": format!("fu-{round}@example.com"), "emailConsent": true}),
                )
                .await;
            let r = app
                .patch(
                    "sales-de-1",
                    due["id"].as_str().unwrap(),
                    1,
                    json!({"status": "ACTIVE"}),
                )
                .await;
            assert_eq!(r.status(), 200);
            app.state()
                .clock
                .set(chrono::Utc::now() + chrono::Duration::days(3) + chrono::Duration::hours(1));
            let report = app
                .state()
                .followups
                .run(&freshplan::auth::Principal::system(), None)
                .await
                .unwrap();
            assert_eq!(report.t3_queued, 1);
            app.state()
                .mail
                .drain(Duration::from_secs(20))
                .await
                .unwrap();
        }
    };
    traffic("A").await;
    let duplicates = format!(
        "sum(freshplan_events_consumed_total{{instance=\"{instance}\", result=\"duplicate\"}})"
    );
    prometheus
        .wait_for(
            PROMETHEUS_PATIENCE,
            "Prometheus scraped the first round",
            || async { prometheus.value(&duplicates).await == Some(1.0) },
        )
        .await;
    traffic("B").await;

    // Variables: the dashboard's current value, else its "All" value.
    let templating = dashboard["templating"]["list"].as_array().unwrap();
    let mut vars = HashMap::new();
    for v in templating {
        let name = v["name"].as_str().unwrap().to_string();
        let value = match v["current"]["value"].as_str() {
            Some(current) if !current.is_empty() => current.to_string(),
            _ => v["allValue"].as_str().unwrap_or(".*").to_string(),
        };
        vars.insert(name, value);
    }
    assert_eq!(
        vars["job"], prometheus.job,
        "the dashboard's default job is the scrape job of prometheus.yml"
    );

    let titles: BTreeSet<&str> = panels(dashboard["panels"].as_array().unwrap())
        .iter()
        .filter_map(|p| p["title"].as_str())
        .collect();
    for (title, _) in MAY_BE_EMPTY {
        assert!(
            titles.contains(title),
            "MAY_BE_EMPTY names a panel the dashboard does not have: {title}"
        );
    }
    let mut queries = Vec::new(); // (panel title, refId, expr)
    for p in panels(dashboard["panels"].as_array().unwrap()) {
        if p["type"] == "row" {
            continue;
        }
        for t in p["targets"].as_array().unwrap() {
            queries.push((
                p["title"].as_str().unwrap().to_string(),
                t["refId"].as_str().unwrap_or("?").to_string(),
                substitute(t["expr"].as_str().unwrap(), &vars),
            ));
        }
    }
    assert!(queries.len() >= 30, "{} panel queries", queries.len());

    // Every query is accepted (api() asserts status "success"); every panel not in
    // MAY_BE_EMPTY returns data once Prometheus has scraped the traffic (two samples of every
    // series for rate()).
    let started = Instant::now();
    loop {
        let (mut missing, mut allowed) = (Vec::new(), BTreeSet::new());
        for (title, ref_id, expr) in &queries {
            if !prometheus.query(expr).await.is_empty() {
                continue;
            }
            match MAY_BE_EMPTY.iter().find(|(t, _)| t == title) {
                Some((t, why)) => {
                    allowed.insert(format!("{t}: {why}"));
                }
                None => missing.push(format!("{title} [{ref_id}]: {expr}")),
            }
        }
        if missing.is_empty() {
            eprintln!("panels without data (allowed): {allowed:#?}");
            break;
        }
        assert!(
            started.elapsed() < PROMETHEUS_PATIENCE,
            "after {PROMETHEUS_PATIENCE:?} these panels still return no data: {missing:#?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!(
        "{} dashboard queries answered, all expected data present after {:?}",
        queries.len(),
        started.elapsed()
    );

    // The variables' queries: label_values(selector, label) as Grafana runs it.
    for v in templating.iter().filter(|v| v["type"] == "query") {
        let name = v["name"].as_str().unwrap();
        let q = v["query"]["query"]
            .as_str()
            .or(v["query"].as_str())
            .unwrap();
        let inner = q
            .trim()
            .strip_prefix("label_values(")
            .and_then(|s| s.strip_suffix(')'))
            .unwrap_or_else(|| panic!("variable {name}: not label_values(…): {q}"));
        let (selector, label) = inner.rsplit_once(',').unwrap();
        let selector = substitute(selector.trim(), &vars);
        let values = prometheus
            .api(
                &format!("/api/v1/label/{}/values", label.trim()),
                &[("match[]", selector.as_str())],
            )
            .await;
        let values: Vec<&str> = values
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        match name {
            "job" => assert_eq!(values, [prometheus.job.as_str()], "variable job"),
            "instance" => assert_eq!(values, [instance.as_str()], "variable instance"),
            "event_type" => assert!(
                values.contains(&CREATED) && values.contains(&STATUS_CHANGED),
                "variable event_type: {values:?}"
            ),
            _ => assert!(
                !values.is_empty() || VARIABLES_MAY_BE_EMPTY.contains(&name),
                "variable {name} has no values"
            ),
        }
    }

    // Core panels, by value: the listener is connected, the outbox is drained, events flowed.
    let job = &prometheus.job;
    assert_eq!(
        prometheus
            .value(&substitute(
                "min by (instance) (freshplan_listener_connected{job=\"$job\"})",
                &vars
            ))
            .await,
        Some(1.0)
    );
    let published = format!(
        "sum(increase(freshplan_events_published_total{{job=\"{job}\", result=\"success\"}}[5m]))"
    );
    prometheus
        .wait_for(
            PROMETHEUS_PATIENCE,
            "Prometheus sees the second round's events as an increase",
            || async { prometheus.value(&published).await.is_some_and(|v| v > 0.0) },
        )
        .await;
    let lag = prometheus
        .query(&format!("freshplan_outbox_lag_seconds{{job=\"{job}\"}}"))
        .await;
    assert!(!lag.is_empty(), "outbox lag exported");
}
