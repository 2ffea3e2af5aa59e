//! The Sales Cockpit page in a real headless Chromium, driven through chromedriver (Debian's
//! `chromium` and `chromium-driver`, installed by `.ci/run`): development login, tiles against
//! the widget API, a live update through the event stream, the DE manager's territory view.
//!
//! The WebDriver client is the small W3C WebDriver helper below on the `reqwest` dev-dependency
//! (session, navigate, find, text, click, execute script, screenshot): no extra crate.
//! Screenshots go to `target/test-output/` (`CARGO_TARGET_DIR` respected).

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine;
use common::TestApp;
use serde_json::{json, Value};
use tokio::time::Instant;

/// How long the page may take to log in and show the widget (Chromium's first start included).
const PAGE_PATIENCE: Duration = Duration::from_secs(20);
/// The issue's bound: a tile changes within this after the API call returned.
const LIVE_BOUND: Duration = Duration::from_secs(2);
/// A W3C WebDriver element reference key.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// One Chromium at a time: the tests share a 2-core machine and measure a 2 s bound.
static ONE_BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ---- chromedriver -----------------------------------------------------------------------

fn binary(env: &str, default: &str, package: &str) -> PathBuf {
    let path = PathBuf::from(std::env::var(env).unwrap_or_else(|_| default.to_string()));
    assert!(
        path.exists(),
        "{} not found: the browser tests need Debian's `{package}` package \
         (`apt-get install -y chromium chromium-driver`, as .ci/run does) or {env}=<path>",
        path.display()
    );
    path
}

/// A process group started by this test: killed as a whole when dropped.
struct Group(Child);

impl Drop for Group {
    fn drop(&mut self) {
        // chromedriver leads its own group; the Chromium processes it starts stay in it.
        let pgid = self.0.id() as libc::pid_t;
        // SAFETY: kill(2) with the negative id of a process group this test created.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
        let _ = self.0.wait();
    }
}

/// A chromedriver of this test on a free port.
struct Driver {
    _group: Group,
    url: String,
    _dir: tempfile::TempDir,
}

impl Driver {
    async fn start() -> Driver {
        let exe = binary("CHROMEDRIVER", "/usr/bin/chromedriver", "chromium-driver");
        let dir = tempfile::tempdir().expect("temp dir");
        let log = dir.path().join("chromedriver.log");
        let http = reqwest::Client::new();
        let mut failures = Vec::new();
        // A port taken between probing and binding makes chromedriver exit: try another.
        for _ in 0..3 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("free port")
                .port();
            let mut cmd = Command::new(&exe);
            cmd.arg(format!("--port={port}"))
                .arg(format!("--log-path={}", log.display()))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
            let mut group = Group(
                cmd.spawn()
                    .unwrap_or_else(|e| panic!("cannot start {}: {e}", exe.display())),
            );
            let url = format!("http://127.0.0.1:{port}");
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                if let Ok(Some(status)) = group.0.try_wait() {
                    failures.push(format!("port {port}: chromedriver exited with {status}"));
                    break;
                }
                let ready = http
                    .get(format!("{url}/status"))
                    .timeout(Duration::from_secs(2))
                    .send()
                    .await;
                if let Ok(r) = ready {
                    let body: Value = r.json().await.unwrap_or(Value::Null);
                    if body["value"]["ready"] == true {
                        return Driver {
                            _group: group,
                            url,
                            _dir: dir,
                        };
                    }
                }
                if Instant::now() >= deadline {
                    failures.push(format!("port {port}: /status not ready within 15 s"));
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let tail = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = tail.lines().collect();
        let tail = lines[lines.len().saturating_sub(30)..].join("\n");
        panic!("chromedriver did not come up: {failures:?}\n{tail}");
    }
}

// ---- a minimal W3C WebDriver client -----------------------------------------------------

/// One browser session.
struct Browser {
    http: reqwest::Client,
    session: String,
    // Dropped in this order: Chromium is gone before its profile folder is removed.
    _driver: Driver,
    _profile: tempfile::TempDir,
}

/// A WebDriver error (`value.error`, `value.message`).
struct WdError(String);

impl std::fmt::Debug for WdError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Browser {
    async fn open() -> Browser {
        let driver = Driver::start().await;
        let chrome = binary("CHROME_BIN", "/usr/bin/chromium", "chromium");
        let profile = tempfile::tempdir().expect("profile dir");
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:loggingPrefs": {"browser": "ALL"},
            "goog:chromeOptions": {
                "binary": chrome,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-quic", "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--lang=de-DE",
                    format!("--user-data-dir={}", profile.path().display()),
                    "--window-size=1400,1000",
                ],
            },
        }}});
        let r = http
            .post(format!("{}/session", driver.url))
            .json(&caps)
            .send()
            .await
            .expect("chromedriver answers");
        let body: Value = r.json().await.expect("session JSON");
        let session = body["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no browser session: {body}"))
            .to_string();
        Browser {
            http,
            session: format!("{}/session/{session}", driver.url),
            _profile: profile,
            _driver: driver,
        }
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, WdError> {
        let mut req = self.http.request(method, format!("{}{path}", self.session));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req
            .send()
            .await
            .map_err(|e| WdError(format!("chromedriver: {e}")))?;
        let status = r.status();
        let v: Value = r
            .json()
            .await
            .map_err(|e| WdError(format!("chromedriver answer: {e}")))?;
        if !status.is_success() || v["value"]["error"].is_string() {
            return Err(WdError(format!(
                "{} {}: {}",
                status,
                v["value"]["error"].as_str().unwrap_or(""),
                v["value"]["message"].as_str().unwrap_or("")
            )));
        }
        Ok(v["value"].clone())
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        self.call(reqwest::Method::POST, path, Some(body))
            .await
            .unwrap_or_else(|e| panic!("WebDriver POST {path}: {e:?}"))
    }

    async fn get(&self, path: &str) -> Value {
        self.call(reqwest::Method::GET, path, None)
            .await
            .unwrap_or_else(|e| panic!("WebDriver GET {path}: {e:?}"))
    }

    async fn goto(&self, url: &str) {
        self.post("/url", json!({ "url": url })).await;
    }

    async fn find(&self, css: &str) -> String {
        let v = self
            .post("/element", json!({"using": "css selector", "value": css}))
            .await;
        v[ELEMENT_KEY]
            .as_str()
            .unwrap_or_else(|| panic!("no element reference for {css}: {v}"))
            .to_string()
    }

    async fn text(&self, css: &str) -> String {
        let id = self.find(css).await;
        let v = self.get(&format!("/element/{id}/text")).await;
        v.as_str().unwrap_or_default().to_string()
    }

    async fn displayed(&self, css: &str) -> bool {
        let id = self.find(css).await;
        self.get(&format!("/element/{id}/displayed")).await == true
    }

    async fn click(&self, css: &str) {
        let id = self.find(css).await;
        self.post(&format!("/element/{id}/click"), json!({})).await;
    }

    async fn try_js(&self, script: &str) -> Result<Value, WdError> {
        self.call(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
        .await
    }

    async fn js(&self, script: &str) -> Value {
        self.try_js(script)
            .await
            .unwrap_or_else(|e| panic!("script failed: {e:?}\n{script}"))
    }

    /// Polls `script` (a function body) until it returns something truthy other than
    /// `{waiting: <what it sees>}`; returns that. Errors while the page navigates count as
    /// "not yet"; the last thing seen is in the timeout message.
    async fn wait_for(&self, what: &str, within: Duration, script: &str) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let last = match self.try_js(script).await {
                Ok(v) if truthy(&v) && v.get("waiting").is_none() => return v,
                Ok(v) => v.to_string(),
                Err(WdError(e)) => e,
            };
            if Instant::now() >= deadline {
                let url = self.try_js("return location.href").await;
                panic!("timed out after {within:?} waiting for {what}; last: {last}; page {url:?}");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// A PNG of the whole page (the window is made as tall as the document first).
    async fn screenshot(&self, name: &str) -> PathBuf {
        let height = self
            .js("return Math.ceil(document.documentElement.scrollHeight + window.outerHeight - window.innerHeight)")
            .await
            .as_f64()
            .unwrap_or(1000.0);
        self.post(
            "/window/rect",
            json!({"width": 1400, "height": height.max(1000.0)}),
        )
        .await;
        let b64 = self.get("/screenshot").await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().expect("screenshot is base64"))
            .expect("screenshot decodes");
        assert!(png.starts_with(b"\x89PNG"), "screenshot is not a PNG");
        let dir = output_dir();
        std::fs::create_dir_all(&dir).expect("create test output dir");
        let path = dir.join(name);
        std::fs::write(&path, png).expect("write screenshot");
        println!("screenshot: {}", path.display());
        path
    }

    /// The browser console's SEVERE entries (JavaScript errors, failed requests — including the
    /// browser's own `/favicon.ico` request, which the service answers with an icon).
    async fn console_errors(&self) -> Vec<String> {
        let v = self.post("/se/log", json!({"type": "browser"})).await;
        v.as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["level"] == "SEVERE")
            .map(|e| e["message"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    async fn quit(self) {
        let _ = self.call(reqwest::Method::DELETE, "", None).await;
    }
}

fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty(),
        _ => true,
    }
}

fn output_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"))
        .join("test-output")
}

// ---- the page ----------------------------------------------------------------------------

/// Logs in through the development login page (clicks the user's button) and waits until the
/// cockpit shows the widget and the live indicator says live.
async fn log_in(browser: &Browser, app: &TestApp, user: &str) {
    browser.goto(&format!("{}/login", app.url)).await;
    browser
        .click(&format!("button[data-user=\"{user}\"]"))
        .await;
    browser
        .wait_for(
            &format!("the cockpit of {user} with the widget loaded"),
            PAGE_PATIENCE,
            "return location.pathname === '/' \
             && document.querySelector('[data-testid=lead-widget]').dataset.loaded === 'true'",
        )
        .await;
    browser
        .wait_for(
            "the live indicator to say live",
            PAGE_PATIENCE,
            "return document.querySelector('[data-testid=live-indicator]').dataset.state === 'live'",
        )
        .await;
    let name = freshplan::demo::principal(user).unwrap().name;
    assert_eq!(
        browser.text("[data-testid=user-name]").await,
        name,
        "the header names the logged-in user"
    );
}

/// Every tile's text, the status counts and the widget's position and scope, in one read.
const READ_TILES: &str = r#"
    const t = (id) => document.querySelector(`[data-testid="${id}"]`).textContent;
    const w = document.querySelector('[data-testid=lead-widget]');
    const out = { position: Number(w.dataset.position), scope: w.dataset.scope, tiles: {}, status: {} };
    for (const id of ['pending-t3', 'pending-t7', 'completed-today', 'total', 't3-response',
                      't7-response', 't3-conversion', 't7-conversion']) {
      out.tiles[id] = t(`tile-${id}-value`);
    }
    out.trends = {};
    for (const id of ['t3-response', 't7-response', 't3-conversion', 't7-conversion']) {
      const n = document.querySelector(`[data-testid="tile-${id}-trend"]`);
      out.trends[id] = [n.dataset.direction, n.querySelector('.trend-pill').textContent];
    }
    for (const s of ['REGISTERED', 'ACTIVE', 'REMINDER', 'GRACE_PERIOD', 'QUALIFIED', 'CONVERTED',
                     'LOST', 'EXPIRED']) {
      out.status[s] = t(`status-${s}-count`);
    }
    return out;
"#;

/// A count as the page shows it (de-DE: `1.234`).
fn de_int(text: &str) -> i64 {
    let ok = !text.is_empty()
        && text.split('.').enumerate().all(|(i, g)| {
            g.chars().all(|c| c.is_ascii_digit())
                && if i == 0 {
                    (1..=3).contains(&g.len())
                } else {
                    g.len() == 3
                }
        });
    assert!(ok, "`{text}` is not a de-DE integer");
    text.replace('.', "").parse().unwrap()
}

/// A rate as the page shows it (de-DE percent with one decimal: `12,5 %`), in percent.
fn de_percent(text: &str) -> f64 {
    let number = text
        .strip_suffix(" %")
        .unwrap_or_else(|| panic!("`{text}` does not end in ` %`"));
    let (int, frac) = number
        .split_once(',')
        .unwrap_or_else(|| panic!("`{text}` has no decimal comma"));
    assert!(
        frac.len() == 1 && frac.chars().all(|c| c.is_ascii_digit()),
        "`{text}` does not have exactly one decimal"
    );
    de_int(int) as f64 + frac.parse::<f64>().unwrap() / 10.0
}

/// Asserts that the page's tiles show `api` (the widget JSON), formatted de-DE.
fn assert_tiles_match(page: &Value, api: &Value) {
    let tiles = &page["tiles"];
    let int = |id: &str| de_int(tiles[id].as_str().unwrap());
    let rate = |id: &str| de_percent(tiles[id].as_str().unwrap());
    let n = |k: &str| {
        api[k]
            .as_i64()
            .unwrap_or_else(|| panic!("API has no {k}: {api}"))
    };
    assert_eq!(int("pending-t3"), n("pendingT3Count"), "Fällige T+3");
    assert_eq!(int("pending-t7"), n("pendingT7Count"), "Fällige T+7");
    assert_eq!(
        int("completed-today"),
        n("completedT3Today") + n("completedT7Today"),
        "Heute versendet"
    );
    assert_eq!(
        int("total"),
        api["leadStats"]["total"].as_i64().unwrap(),
        "Leads gesamt"
    );
    for (id, key) in [
        ("t3-response", "t3ResponseRate"),
        ("t7-response", "t7ResponseRate"),
        ("t3-conversion", "t3ConversionRate"),
        ("t7-conversion", "t7ConversionRate"),
    ] {
        let want = api[key].as_f64().unwrap() * 100.0;
        let shown = rate(id);
        assert!(
            (shown - want).abs() <= 0.05 + 1e-9,
            "tile {id} shows {shown} %, the API says {key} = {want} %"
        );
    }
    for (id, key) in [
        ("t3-response", "responseTrend"),
        ("t7-response", "responseTrend"),
        ("t3-conversion", "conversionTrend"),
        ("t7-conversion", "conversionTrend"),
    ] {
        let trend = &api[key];
        let (direction, pill) = (
            &page["trends"][id][0],
            page["trends"][id][1].as_str().unwrap(),
        );
        assert_eq!(
            direction, &trend["direction"],
            "trend direction under tile {id}"
        );
        // "▲+3,2 %", "▼-1,0 %", "▶±0,0 %": the arrow, then the signed change.
        let change = pill.trim_start_matches(['▲', '▼', '▶']);
        let sign = change.chars().next().unwrap_or(' ');
        let number = &change[sign.len_utf8()..];
        let shown = de_percent(number) * if sign == '-' { -1.0 } else { 1.0 };
        let want = trend["changePercent"].as_f64().unwrap();
        assert!(
            ['+', '-', '±'].contains(&sign) && (shown - want).abs() <= 0.05 + 1e-9,
            "trend under tile {id} shows `{pill}`, the API says {key}.changePercent = {want}"
        );
    }
    for (status, key) in [
        ("REGISTERED", "registered"),
        ("ACTIVE", "active"),
        ("REMINDER", "reminder"),
        ("GRACE_PERIOD", "gracePeriod"),
        ("QUALIFIED", "qualified"),
        ("CONVERTED", "converted"),
        ("LOST", "lost"),
        ("EXPIRED", "expired"),
    ] {
        assert_eq!(
            de_int(page["status"][status].as_str().unwrap()),
            api["leadStats"][key].as_i64().unwrap(),
            "status count {status}"
        );
    }
}

/// Reads the tiles and the widget API as `user` until both are of the same outbox position
/// (nothing else writes, so normally at once), then compares them. Returns the API's widget.
async fn tiles_equal_api(browser: &Browser, app: &TestApp, user: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let page = browser.js(READ_TILES).await;
        let r = app.get(user, "/api/cockpit/lead-widget").await;
        assert_eq!(r.status(), 200, "widget API as {user}");
        let api: Value = r.json().await.unwrap();
        if page["position"].as_i64() == api["position"].as_i64() {
            assert_eq!(
                page["scope"], api["scope"],
                "page and API show the same scope"
            );
            assert_tiles_match(&page, &api);
            return api;
        }
        assert!(
            Instant::now() < deadline,
            "page stays at position {} while the API is at {}",
            page["position"],
            api["position"]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The company names in the activity and follow-up feeds.
async fn feed_rows(browser: &Browser) -> (Vec<String>, Vec<String>) {
    let v = browser
        .js(
            "const rows = (id) => [...document.querySelectorAll(`[data-testid=${id}]`)] \
               .map((r) => r.querySelector('.feed-title').textContent); \
             return [rows('activity-row'), rows('followup-row')];",
        )
        .await;
    let list = |i: usize| -> Vec<String> {
        v[i].as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    };
    (list(0), list(1))
}

// ---- test data ---------------------------------------------------------------------------

/// Distinctive AT company names: none may show in a DE view.
const AT_PREFIX: &str = "Wiener Heuriger";

struct Seeded {
    /// sales-de-1's REGISTERED lead (consent, registered 9 days ago): turning it ACTIVE makes
    /// it a pending T+3. (id, version)
    live_lead: (String, i64),
    /// Leads in territory DE.
    de_total: i64,
    /// sales-de-1's leads.
    own_total: i64,
}

async fn lead(app: &TestApp, user: &str, company: &str) -> (String, i64) {
    let email = format!("info-{}@example.com", uuid::Uuid::new_v4().simple());
    let l = app
        .create_lead(
            user,
            json!({"companyName": company, "businessType": "RESTAURANT", "source": "MESSE",
                   "email": email, "emailConsent": true, "city": "Testdorf"}),
        )
        .await;
    (
        l["id"].as_str().unwrap().to_string(),
        l["version"].as_i64().unwrap(),
    )
}

async fn set_status(app: &TestApp, user: &str, lead: &mut (String, i64), status: &str) {
    let r = app
        .patch(user, &lead.0, lead.1, json!({ "status": status }))
        .await;
    let code = r.status();
    let body: Value = r.json().await.unwrap();
    assert_eq!(code, 200, "PATCH status {status}: {body}");
    lead.1 = body["version"].as_i64().unwrap();
}

async fn activity(app: &TestApp, user: &str, lead: &(String, i64), kind: &str) {
    let r = app
        .client
        .post(format!("{}/api/leads/{}/activities", app.url, lead.0))
        .header("Authorization", app.bearer(user))
        .json(&json!({"type": kind, "description": "browser test"}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        201,
        "activity {kind}: {}",
        r.text().await.unwrap()
    );
}

async fn superuser(app: &TestApp, sql: &str, lead: &(String, i64)) {
    let mut c = app.db.superuser().await;
    let id: uuid::Uuid = lead.0.parse().unwrap();
    sqlx::query(sql).bind(id).execute(&mut c).await.unwrap();
}

/// A SENT follow-up of `kind` for `lead`, sent `ago` before now (rows the follow-up job would
/// write; triggers copy the lead's owner and territory and keep the roll-ups).
async fn sent_followup(app: &TestApp, lead: &(String, i64), kind: &str, ago: &str) {
    let sql = format!(
        "INSERT INTO followups (id, lead_id, followup_type, status, territory, owner_user_id, \
                                queued_at, sent_at) \
         SELECT gen_random_uuid(), id, '{kind}', 'SENT', territory, owner_user_id, \
                now() - interval '{ago}', now() - interval '{ago}' FROM leads WHERE id = $1"
    );
    superuser(app, &sql, lead).await;
    let column = if kind == "T3" {
        "t3_sent_at"
    } else {
        "t7_sent_at"
    };
    superuser(
        app,
        &format!("UPDATE leads SET {column} = now() - interval '{ago}' WHERE id = $1"),
        lead,
    )
    .await;
}

/// sales-de-1 (own leads in every tile), sales-de-2 (DE, not sales-de-1's), sales-at-1 (AT,
/// written last so its activities and follow-up are the newest: a DE view that leaked them
/// would list them first).
async fn seed(app: &TestApp) -> Seeded {
    let u = "sales-de-1";
    let mut live_lead = lead(app, u, "Gasthaus Sonne Köln").await;
    let mut pending_t3 = lead(app, u, "Hotel Adler Hamburg").await;
    let mut pending_t7 = lead(app, u, "Kantine Linde Berlin").await;
    let mut qualified = lead(app, u, "Catering Krone München").await;
    let registered = lead(app, u, "Restaurant Hirsch Stuttgart").await;
    for l in [&live_lead, &pending_t3, &pending_t7] {
        superuser(
            app,
            "UPDATE leads SET registered_at = now() - interval '9 days' WHERE id = $1",
            l,
        )
        .await;
    }
    sent_followup(app, &pending_t7, "T3", "5 days").await;
    sent_followup(app, &qualified, "T3", "30 minutes").await;
    set_status(app, u, &mut pending_t3, "ACTIVE").await;
    set_status(app, u, &mut pending_t7, "ACTIVE").await;
    activity(app, u, &qualified, "CALL").await; // a response to its T+3
    set_status(app, u, &mut qualified, "QUALIFIED").await; // a conversion after its T+3
    activity(app, u, &registered, "MEETING").await;
    activity(app, u, &pending_t3, "EMAIL").await;
    // Refresh the live lead's version (unchanged so far) for the later If-Match.
    let got = app
        .get_json(u, &format!("/api/leads/{}", live_lead.0))
        .await;
    live_lead.1 = got["version"].as_i64().unwrap();

    let other = lead(app, "sales-de-2", "Bäckerei Eiche Dresden").await;
    activity(app, "sales-de-2", &other, "DEMO").await;

    let at = "sales-at-1";
    let mut at1 = lead(app, at, &format!("{AT_PREFIX} Zum Grünen Baum")).await;
    let at2 = lead(app, at, &format!("{AT_PREFIX} Kahlenberg")).await;
    sent_followup(app, &at2, "T3", "1 minute").await;
    set_status(app, at, &mut at1, "ACTIVE").await;
    for kind in ["CALL", "MEETING", "EMAIL_RECEIVED", "DEMO", "NOTE", "ORDER"] {
        activity(app, at, &at1, kind).await;
        activity(app, at, &at2, kind).await;
    }

    // The AT data is there and visible to AT (so its absence below means something).
    let at_view = app.get_json("manager-at", "/api/cockpit/lead-widget").await;
    assert!(
        at_view["recentActivities"][0]["companyName"]
            .as_str()
            .is_some_and(|c| c.starts_with(AT_PREFIX)),
        "the AT manager sees the AT activities: {at_view}"
    );
    Seeded {
        live_lead,
        de_total: 6,
        own_total: 5,
    }
}

async fn spawn() -> TestApp {
    TestApp::spawn_with(&[("FRESHPLAN_AUTH_DEV_LOGIN_ENABLED", "true")]).await
}

// ---- tests -------------------------------------------------------------------------------

#[tokio::test]
async fn sales_user_tiles_in_chromium_show_the_widget_api_numbers_formatted_de_de() {
    let _one = ONE_BROWSER.lock().await;
    let app = spawn().await;
    let seeded = seed(&app).await;
    let browser = Browser::open().await;
    log_in(&browser, &app, "sales-de-1").await;

    let api = tiles_equal_api(&browser, &app, "sales-de-1").await;
    assert_eq!(api["scope"], "own");
    assert_eq!(api["leadStats"]["total"], seeded.own_total, "{api}");
    assert_eq!(api["pendingT3Count"], 1, "{api}");
    assert!(
        !browser.displayed("[data-testid=manager-view]").await,
        "a salesperson gets no manager badge"
    );
    assert_eq!(
        browser.text("[data-testid=scope-label]").await,
        "Meine Leads"
    );
    let (activities, followups) = feed_rows(&browser).await;
    assert!(
        activities.iter().any(|c| c == "Hotel Adler Hamburg"),
        "own activities are listed: {activities:?}"
    );
    assert!(
        followups.iter().any(|c| c == "Catering Krone München"),
        "own follow-ups are listed: {followups:?}"
    );
    for row in activities.iter().chain(&followups) {
        assert!(
            !row.starts_with(AT_PREFIX) && row != "Bäckerei Eiche Dresden",
            "sales-de-1 sees another user's lead `{row}`"
        );
    }

    browser.screenshot("cockpit-sales.png").await;
    let errors = browser.console_errors().await;
    assert!(errors.is_empty(), "console errors: {errors:#?}");
    browser.quit().await;
}

#[tokio::test]
async fn sales_tile_changes_within_2s_of_an_api_status_change_without_reload() {
    let _one = ONE_BROWSER.lock().await;
    let app = spawn().await;
    let mut seeded = seed(&app).await;
    let browser = Browser::open().await;
    log_in(&browser, &app, "sales-de-1").await;
    let before = tiles_equal_api(&browser, &app, "sales-de-1").await;
    let pending = before["pendingT3Count"].as_i64().unwrap();
    let active = before["leadStats"]["active"].as_i64().unwrap();
    // A reload would lose this marker and start a new document.
    let origin = browser
        .js("window.__browserTestMarker = 'no reload'; return performance.timeOrigin")
        .await;

    // REGISTERED → ACTIVE: the lead (consent, registered 9 days ago) becomes a pending T+3.
    set_status(&app, "sales-de-1", &mut seeded.live_lead, "ACTIVE").await;
    let written = Instant::now();
    let want = (pending + 1).to_string();
    browser
        .wait_for(
            &format!("tile Fällige T+3 to show {want} (was {pending})"),
            LIVE_BOUND,
            &format!(
                "const w = document.querySelector('[data-testid=lead-widget]'); \
                 const text = document.querySelector('[data-testid=tile-pending-t3-value]').textContent; \
                 return text === '{want}' || {{waiting: {{text, position: w.dataset.position, \
                   fetches: w.dataset.fetches, \
                   live: document.querySelector('[data-testid=live-indicator]').dataset.state}}}};"
            ),
        )
        .await;
    println!(
        "tile changed {:?} after the API call returned",
        written.elapsed()
    );
    let after = browser
        .js("return [window.__browserTestMarker || null, performance.timeOrigin]")
        .await;
    assert_eq!(
        after,
        json!(["no reload", origin]),
        "the page was not reloaded"
    );

    let now = tiles_equal_api(&browser, &app, "sales-de-1").await;
    assert_eq!(now["pendingT3Count"], pending + 1, "{now}");
    assert_eq!(now["leadStats"]["active"], active + 1, "{now}");
    let errors = browser.console_errors().await;
    assert!(errors.is_empty(), "console errors: {errors:#?}");
    browser.quit().await;
}

#[tokio::test]
async fn de_manager_sees_the_de_territory_view_in_chromium_without_any_at_lead() {
    let _one = ONE_BROWSER.lock().await;
    let app = spawn().await;
    let seeded = seed(&app).await;
    let browser = Browser::open().await;
    log_in(&browser, &app, "manager-de").await;

    let api = tiles_equal_api(&browser, &app, "manager-de").await;
    assert_eq!(
        (&api["scope"], &api["isManagerView"], &api["territory"]),
        (&json!("territory"), &json!(true), &json!("DE"))
    );
    assert_eq!(api["leadStats"]["total"], seeded.de_total, "{api}");
    assert!(
        browser.displayed("[data-testid=manager-view]").await,
        "the manager badge is visible"
    );
    assert_eq!(
        browser.text("[data-testid=manager-view]").await,
        "Gebietsansicht DE"
    );
    assert_eq!(
        de_int(&browser.text("[data-testid=tile-total-value]").await),
        seeded.de_total
    );

    let (activities, followups) = feed_rows(&browser).await;
    assert!(
        activities.iter().any(|c| c == "Bäckerei Eiche Dresden")
            && activities.iter().any(|c| c == "Hotel Adler Hamburg"),
        "the territory's activities of both DE salespeople are listed: {activities:?}"
    );
    assert!(
        followups.iter().any(|c| c == "Catering Krone München"),
        "DE follow-ups are listed: {followups:?}"
    );
    for row in activities.iter().chain(&followups) {
        assert!(
            !row.starts_with(AT_PREFIX),
            "the DE manager sees the AT lead `{row}`"
        );
    }
    let page_text = browser.text("body").await;
    assert!(
        !page_text.contains(AT_PREFIX),
        "an AT company name appears on the DE manager's page"
    );

    browser.screenshot("cockpit-manager-de.png").await;
    let errors = browser.console_errors().await;
    assert!(errors.is_empty(), "console errors: {errors:#?}");
    browser.quit().await;
}
