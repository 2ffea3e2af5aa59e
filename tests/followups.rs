//! Follow-up automation end to end: real PostgreSQL as the application role, the job's clock
//! moved instead of waiting days, mails delivered through the file transport (.eml on disk) or
//! over SMTP to a small SMTP server this test runs on 127.0.0.1 (it speaks the protocol; it can
//! be told to refuse every mail).

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use common::{wait_until, TestApp, PATIENCE};
use freshplan::auth::Principal;
use freshplan::events::envelope;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

// ---- helpers -------------------------------------------------------------------------------

/// An instance whose mails go to `dir` as .eml files.
async fn app_with_mail_dir(dir: &Path, extra: &[(&str, &str)]) -> TestApp {
    let dir = dir.to_str().unwrap().to_string();
    let mut env: Vec<(&str, &str)> = vec![
        ("FRESHPLAN_MAIL_FILE_DIR", dir.as_str()),
        ("FRESHPLAN_MAIL_BACKOFF_MS", "20"),
    ];
    env.extend_from_slice(extra);
    TestApp::spawn_with(&env).await
}

/// Creates an ACTIVE lead of `user` with contact data and e-mail consent; returns its JSON.
async fn active_lead(
    app: &TestApp,
    user: &str,
    company: &str,
    business_type: &str,
    email: &str,
) -> Value {
    let lead = app
        .create_lead(
            user,
            json!({
                "companyName": company, "businessType": business_type, "source": "MESSE",
                "contactPerson": "Anna Müller", "email": email, "emailConsent": true,
            }),
        )
        .await;
    let r = app
        .patch(
            user,
            lead["id"].as_str().unwrap(),
            1,
            json!({"status": "ACTIVE"}),
        )
        .await;
    assert_eq!(r.status(), 200, "activate: {}", r.text().await.unwrap());
    r.json().await.unwrap()
}

/// Moves the job's clock `days` and `hours` ahead of now.
fn clock_ahead(app: &TestApp, days: i64, hours: i64) {
    app.state()
        .clock
        .set(Utc::now() + chrono::Duration::days(days) + chrono::Duration::hours(hours));
}

/// Runs the job as the scheduler does and waits until every queued mail is delivered or failed.
async fn run_and_deliver(app: &TestApp) -> freshplan::followups::job::RunReport {
    let report = app
        .state()
        .followups
        .run(&Principal::system(), None)
        .await
        .expect("job runs");
    app.state()
        .mail
        .drain(Duration::from_secs(20))
        .await
        .expect("mails delivered");
    report
}

/// The .eml files in `dir`.
fn eml_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = rd
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "eml"))
        .collect();
    v.sort();
    v
}

/// A header of a message (unfolded), if present.
fn header(eml: &str, name: &str) -> Option<String> {
    let head = eml
        .split("\r\n\r\n")
        .next()
        .unwrap_or("")
        .replace("\r\n ", " ")
        .replace("\r\n\t", " ");
    head.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
    })
}

fn decode_qp(s: &str) -> String {
    let s = s.replace("=\r\n", "");
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'=' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8(out).expect("utf-8 body")
}

/// The decoded text/plain and text/html parts of a multipart/alternative message.
fn parts(eml: &str) -> (String, String) {
    use base64::Engine;
    let ct = header(eml, "Content-Type").expect("content type");
    let boundary = ct
        .split("boundary=")
        .nth(1)
        .expect("boundary")
        .trim_matches('"')
        .to_string();
    let (mut text, mut html) = (String::new(), String::new());
    for part in eml.split(&format!("--{boundary}")).skip(1) {
        let Some((head, body)) = part.split_once("\r\n\r\n") else {
            continue;
        };
        let head = format!("{}\r\n\r\n", head.trim_start());
        let cte = header(&head, "Content-Transfer-Encoding")
            .unwrap_or_default()
            .to_ascii_lowercase();
        let body = body.trim_end_matches("--\r\n").trim_end();
        let decoded = match cte.as_str() {
            "quoted-printable" => decode_qp(body),
            "base64" => String::from_utf8(
                base64::engine::general_purpose::STANDARD
                    .decode(body.replace("\r\n", ""))
                    .expect("base64 body"),
            )
            .unwrap(),
            _ => body.to_string(),
        };
        let pct = header(&head, "Content-Type").unwrap_or_default();
        if pct.starts_with("text/plain") {
            text = decoded;
        } else if pct.starts_with("text/html") {
            html = decoded;
        }
    }
    (text, html)
}

/// A small SMTP server (RFC 5321 subset: EHLO/HELO, MAIL, RCPT, DATA, RSET, NOOP, QUIT).
struct SmtpServer {
    port: u16,
    /// MAIL FROM commands received (delivery attempts).
    attempts: Arc<AtomicUsize>,
    /// Messages accepted (DATA).
    accepted: Arc<Mutex<Vec<String>>>,
    /// While true, every MAIL FROM is answered 550.
    refuse: Arc<AtomicBool>,
}

async fn smtp_server() -> SmtpServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let attempts = Arc::new(AtomicUsize::new(0));
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let refuse = Arc::new(AtomicBool::new(false));
    let (a, m, r) = (attempts.clone(), accepted.clone(), refuse.clone());
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                return;
            };
            let (a, m, r) = (a.clone(), m.clone(), r.clone());
            tokio::spawn(async move {
                let (rd, mut wr) = sock.into_split();
                let mut rd = BufReader::new(rd);
                let _ = wr.write_all(b"220 test.local ESMTP\r\n").await;
                let mut line = String::new();
                loop {
                    line.clear();
                    if rd.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let cmd = line.to_ascii_uppercase();
                    let reply: &[u8] = if cmd.starts_with("EHLO") || cmd.starts_with("HELO") {
                        b"250-test.local\r\n250 8BITMIME\r\n"
                    } else if cmd.starts_with("MAIL FROM") {
                        a.fetch_add(1, Ordering::SeqCst);
                        if r.load(Ordering::SeqCst) {
                            b"550 5.7.1 relaying denied\r\n"
                        } else {
                            b"250 2.1.0 ok\r\n"
                        }
                    } else if cmd.starts_with("RCPT TO") {
                        b"250 2.1.5 ok\r\n"
                    } else if cmd.starts_with("DATA") {
                        let _ = wr.write_all(b"354 go ahead\r\n").await;
                        let mut data = String::new();
                        loop {
                            let mut l = String::new();
                            if rd.read_line(&mut l).await.unwrap_or(0) == 0 {
                                return;
                            }
                            if l == ".\r\n" {
                                break;
                            }
                            data.push_str(&l);
                        }
                        m.lock().unwrap().push(data);
                        b"250 2.0.0 queued\r\n"
                    } else if cmd.starts_with("QUIT") {
                        let _ = wr.write_all(b"221 2.0.0 bye\r\n").await;
                        return;
                    } else {
                        b"250 2.0.0 ok\r\n"
                    };
                    if wr.write_all(reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    SmtpServer {
        port,
        attempts,
        accepted,
        refuse,
    }
}

async fn lead_json(app: &TestApp, user: &str, id: &str) -> Value {
    app.get_json(user, &format!("/api/leads/{id}")).await
}

// ---- tests ---------------------------------------------------------------------------------

#[tokio::test]
async fn a_restaurant_lead_three_days_and_an_hour_old_gets_the_t3_mail_and_a_week_on_the_t7_mail_with_15_percent_from_500_euro(
) {
    let dir = tempfile::tempdir().unwrap();
    let app = app_with_mail_dir(dir.path(), &[]).await;
    let lead = active_lead(
        &app,
        "sales-de-1",
        "Restaurant Sonne GmbH",
        "RESTAURANT",
        "anna@sonne.example",
    )
    .await;
    let id = lead["id"].as_str().unwrap().to_string();

    // Not yet due 2 days later.
    clock_ahead(&app, 2, 0);
    let r = run_and_deliver(&app).await;
    assert_eq!((r.t3_queued, r.t7_queued), (0, 0));
    assert!(eml_files(dir.path()).is_empty());

    clock_ahead(&app, 3, 1);
    let r = run_and_deliver(&app).await;
    assert_eq!((r.t3_queued, r.t7_queued), (1, 0));
    let files = eml_files(dir.path());
    assert_eq!(files.len(), 1, "one T+3 mail");
    let eml = std::fs::read_to_string(&files[0]).unwrap();
    assert_eq!(header(&eml, "To").as_deref(), Some("anna@sonne.example"));
    assert!(header(&eml, "List-Unsubscribe")
        .unwrap()
        .contains("/unsubscribe?token="));
    let (text, html) = parts(&eml);
    assert!(text.contains("Probierbox"), "starter box: {text}");
    assert!(
        text.contains("Mittagstisch"),
        "restaurant suggestion: {text}"
    );
    assert!(text.contains("Guten Tag Anna Müller"), "{text}");
    assert!(
        html.contains("Probierbox") && html.contains("FreshFoodz GmbH"),
        "{html}"
    );
    let after_t3 = lead_json(&app, "sales-de-1", &id).await;
    assert!(after_t3["t3SentAt"].is_string(), "lead marked: {after_t3}");
    assert!(after_t3["t7SentAt"].is_null());
    let activities = app
        .get_json("sales-de-1", &format!("/api/leads/{id}/activities"))
        .await;
    assert!(
        activities
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["type"] == "FOLLOW_UP"),
        "FOLLOW_UP activity: {activities}"
    );

    // T+7: 7 days and an hour after registration, with T+3 sent.
    clock_ahead(&app, 7, 1);
    let r = run_and_deliver(&app).await;
    assert_eq!((r.t3_queued, r.t7_queued), (0, 1));
    let files = eml_files(dir.path());
    assert_eq!(files.len(), 2);
    let t7 = files
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap())
        .find(|e| parts(e).0.contains("Mindestbestellwert"))
        .expect("a T+7 mail");
    let (text, _) = parts(&t7);
    assert!(text.contains("15 %") && text.contains("500 €"), "{text}");
    assert!(lead_json(&app, "sales-de-1", &id).await["t7SentAt"].is_string());

    // Nothing more is due: a third run mails nobody.
    clock_ahead(&app, 9, 0);
    let r = run_and_deliver(&app).await;
    assert_eq!((r.t3_queued, r.t7_queued), (0, 0));
    assert_eq!(eml_files(dir.path()).len(), 2);
}

#[tokio::test]
async fn a_hotel_gets_20_percent_from_1000_euro_and_leads_without_consent_blocked_stopped_registered_or_lost_get_no_mail(
) {
    let dir = tempfile::tempdir().unwrap();
    let app = app_with_mail_dir(dir.path(), &[]).await;
    let hotel = active_lead(
        &app,
        "sales-de-1",
        "Hotel Post",
        "HOTEL",
        "info@post.example",
    )
    .await;
    let no_consent = active_lead(
        &app,
        "sales-de-1",
        "Ohne Einwilligung",
        "HOTEL",
        "a@nc.example",
    )
    .await;
    let blocked = active_lead(&app, "sales-de-1", "Gesperrt", "HOTEL", "b@bl.example").await;
    let stopped = active_lead(&app, "sales-de-1", "Uhr steht", "HOTEL", "c@st.example").await;
    let lost = active_lead(&app, "sales-de-1", "Verloren", "HOTEL", "d@lo.example").await;
    for (lead, body) in [
        (&no_consent, json!({"emailConsent": false})),
        (&blocked, json!({"contactBlocked": true})),
        (&stopped, json!({"clockStopped": true})),
        (&lost, json!({"status": "QUALIFIED"})),
    ] {
        let r = app
            .patch(
                "sales-de-1",
                lead["id"].as_str().unwrap(),
                lead["version"].as_i64().unwrap(),
                body,
            )
            .await;
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    }
    let q = lead_json(&app, "sales-de-1", lost["id"].as_str().unwrap()).await;
    let r = app
        .patch(
            "sales-de-1",
            q["id"].as_str().unwrap(),
            q["version"].as_i64().unwrap(),
            json!({"status": "LOST"}),
        )
        .await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    app.create_lead(
        "sales-de-1",
        json!({"companyName": "Nur registriert", "businessType": "HOTEL", "source": "MESSE",
               "email": "e@reg.example", "emailConsent": true}),
    )
    .await;

    clock_ahead(&app, 3, 1);
    let r = run_and_deliver(&app).await;
    assert_eq!(r.t3_queued, 1, "only the hotel is due");
    clock_ahead(&app, 7, 1);
    let r = run_and_deliver(&app).await;
    assert_eq!(r.t7_queued, 1);
    let mails: Vec<String> = eml_files(dir.path())
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap())
        .collect();
    assert_eq!(mails.len(), 2);
    for m in &mails {
        assert_eq!(header(m, "To").as_deref(), Some("info@post.example"));
    }
    let t7 = mails
        .iter()
        .map(|m| parts(m).0)
        .find(|t| t.contains("Mindestbestellwert"))
        .unwrap();
    assert!(t7.contains("20 %") && t7.contains("1.000 €"), "{t7}");
    let sent: i64 = app
        .count(&format!(
            "SELECT count(*) FROM followups WHERE lead_id = '{}' AND status = 'SENT'",
            hotel["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(sent, 2);
    assert_eq!(
        app.count("SELECT count(*) FROM followups").await,
        2,
        "no other lead claimed"
    );
}

#[tokio::test]
async fn two_runs_started_at_the_same_moment_on_two_instances_send_each_mail_once() {
    let dir = tempfile::tempdir().unwrap();
    let app = app_with_mail_dir(dir.path(), &[("FRESHPLAN_FOLLOWUP_BATCH_SIZE", "3")]).await;
    let second = app.second_instance().await;
    for i in 0..12 {
        active_lead(
            &app,
            "sales-de-1",
            &format!("Kantine {i}"),
            "KANTINE",
            &format!("k{i}@kantine.example"),
        )
        .await;
    }
    let at = Utc::now() + chrono::Duration::days(3) + chrono::Duration::hours(1);
    app.state().clock.set(at);
    second.state().clock.set(at);
    let system = Principal::system();
    let (a, b) = tokio::join!(
        app.state().followups.run(&system, None),
        second.state().followups.run(&system, None),
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(
        a.t3_queued + b.t3_queued,
        12,
        "each lead claimed by exactly one run: {a:?} {b:?}"
    );
    app.state()
        .mail
        .drain(Duration::from_secs(20))
        .await
        .unwrap();
    second
        .state()
        .mail
        .drain(Duration::from_secs(20))
        .await
        .unwrap();
    let files = eml_files(dir.path());
    assert_eq!(files.len(), 12);
    let mut to: Vec<String> = files
        .iter()
        .map(|f| header(&std::fs::read_to_string(f).unwrap(), "To").unwrap())
        .collect();
    to.sort();
    to.dedup();
    assert_eq!(to.len(), 12, "every lead mailed once");
    assert_eq!(app.count("SELECT count(*) FROM mail_outbox").await, 12);
    assert_eq!(
        app.count("SELECT count(*) FROM lead_activities WHERE activity_type = 'FOLLOW_UP'")
            .await,
        12
    );
}

#[tokio::test]
async fn a_refusing_smtp_server_gets_every_retry_then_the_follow_up_fails_unsent_and_a_later_run_delivers_it(
) {
    let smtp = smtp_server().await;
    let port = smtp.port.to_string();
    let app = TestApp::spawn_with(&[
        ("FRESHPLAN_MAIL_TRANSPORT", "smtp"),
        ("FRESHPLAN_MAIL_SMTP_HOST", "127.0.0.1"),
        ("FRESHPLAN_MAIL_SMTP_PORT", port.as_str()),
        ("FRESHPLAN_MAIL_SMTP_STARTTLS", "off"),
        ("FRESHPLAN_MAIL_MAX_ATTEMPTS", "3"),
        ("FRESHPLAN_MAIL_BACKOFF_MS", "20"),
    ])
    .await;
    let lead = active_lead(
        &app,
        "sales-at-1",
        "Gasthof Krone",
        "RESTAURANT",
        "wirt@krone.example",
    )
    .await;
    let id = lead["id"].as_str().unwrap().to_string();
    let failure = r#"leads_followup_sent_total{result="failure",territory="AT",type="T3"}"#;
    let success = r#"leads_followup_sent_total{result="success",territory="AT",type="T3"}"#;
    let failures_before = app.metric(failure).await;

    smtp.refuse.store(true, Ordering::SeqCst);
    clock_ahead(&app, 3, 1);
    let r = run_and_deliver(&app).await;
    assert_eq!(r.t3_queued, 1);
    assert_eq!(
        smtp.attempts.load(Ordering::SeqCst),
        3,
        "tried max-attempts times"
    );
    assert!(smtp.accepted.lock().unwrap().is_empty());
    let status: String = {
        let mut c = app.db.superuser().await;
        sqlx::query_scalar("SELECT status FROM followups WHERE lead_id = $1::uuid")
            .bind(&id)
            .fetch_one(&mut c)
            .await
            .unwrap()
    };
    assert_eq!(status, "FAILED");
    assert!(
        lead_json(&app, "sales-at-1", &id).await["t3SentAt"].is_null(),
        "not marked sent"
    );
    assert_eq!(app.metric(failure).await, failures_before + 1.0);
    let widget = app.get_json("sales-at-1", "/api/cockpit/lead-widget").await;
    assert_eq!(widget["recentFollowUps"][0]["success"], false, "{widget}");
    let last_error: String = {
        let mut c = app.db.superuser().await;
        sqlx::query_scalar("SELECT last_error FROM followups WHERE lead_id = $1::uuid")
            .bind(&id)
            .fetch_one(&mut c)
            .await
            .unwrap()
    };
    assert_eq!(last_error, "smtp permanent 550");

    smtp.refuse.store(false, Ordering::SeqCst);
    clock_ahead(&app, 4, 0);
    let r = run_and_deliver(&app).await;
    assert_eq!(r.t3_queued, 1, "the failed follow-up is due again");
    assert_eq!(smtp.accepted.lock().unwrap().len(), 1);
    assert!(smtp.accepted.lock().unwrap()[0].contains("To: wirt@krone.example"));
    assert!(lead_json(&app, "sales-at-1", &id).await["t3SentAt"].is_string());
    assert_eq!(app.metric(success).await, 1.0);
}

#[tokio::test]
async fn each_processed_lead_yields_one_event_for_its_owner_and_territory_and_the_run_one_batch_event_keyed_by_minute(
) {
    let dir = tempfile::tempdir().unwrap();
    let app = app_with_mail_dir(dir.path(), &[]).await;
    let de = active_lead(
        &app,
        "sales-de-1",
        "Catering Nord",
        "CATERING",
        "c@nord.example",
    )
    .await;
    let at = active_lead(
        &app,
        "sales-at-1",
        "Catering Süd",
        "CATERING",
        "c@sued.example",
    )
    .await;
    let mut owner_stream = app.sse("sales-de-1", None).await;
    clock_ahead(&app, 3, 1);
    let report = run_and_deliver(&app).await;
    assert_eq!(report.t3_queued, 2);

    let seen = owner_stream
        .until("the DE lead's followup_completed", |e| {
            e.event == "dashboard.followup_completed"
        })
        .await;
    let frame = common::sse_json(seen.last().unwrap());
    common::assert_cloudevent(&frame);
    assert_eq!(frame["data"]["leadId"], de["id"]);
    assert_eq!(frame["data"]["ownerUserId"], "sales-de-1");
    assert_eq!(frame["data"]["territory"], "DE");
    assert_eq!(frame["data"]["followUpType"], "T3");
    assert_eq!(frame["data"]["success"], true);
    assert!(
        !frame.to_string().contains("c@nord.example"),
        "no PII in events"
    );

    let mut c = app.db.superuser().await;
    let rows: Vec<(Value,)> = sqlx::query_as(
        "SELECT envelope FROM outbox WHERE event_type = 'dashboard.followup_completed' ORDER BY position",
    )
    .fetch_all(&mut c)
    .await
    .unwrap();
    let per_lead: Vec<&Value> = rows
        .iter()
        .map(|r| &r.0)
        .filter(|e| e["data"]["followUpType"] == "T3")
        .collect();
    assert_eq!(per_lead.len(), 2, "one event per processed lead");
    let at_event = per_lead
        .iter()
        .find(|e| e["data"]["leadId"] == at["id"])
        .unwrap();
    assert_eq!(at_event["data"]["ownerUserId"], "sales-at-1");
    assert_eq!(at_event["data"]["territory"], "AT");
    let batch: Vec<&Value> = rows
        .iter()
        .map(|r| &r.0)
        .filter(|e| e["data"]["followUpType"] == "BATCH")
        .collect();
    assert_eq!(batch.len(), 1);
    assert_eq!(batch[0]["data"]["t3Count"], 2);
    assert_eq!(batch[0]["data"]["t7Count"], 0);
    assert!(batch[0]["data"].get("leadId").is_none());
    assert_eq!(
        batch[0]["idempotencykey"],
        envelope::key_followup_batch(report.processed_at, "system", 2, 0).to_string()
    );
}

#[tokio::test]
async fn the_unsubscribe_link_of_a_real_mail_withdraws_consent_once_and_the_next_run_mails_nobody()
{
    let dir = tempfile::tempdir().unwrap();
    let app = app_with_mail_dir(dir.path(), &[]).await;
    let lead = active_lead(
        &app,
        "sales-ch-1",
        "Bistro Zürich",
        "RESTAURANT",
        "bistro@zh.example",
    )
    .await;
    let id = lead["id"].as_str().unwrap().to_string();
    clock_ahead(&app, 3, 1);
    run_and_deliver(&app).await;
    let eml = std::fs::read_to_string(&eml_files(dir.path())[0]).unwrap();
    let (text, html) = parts(&eml);
    let link = text
        .split_whitespace()
        .find(|w| w.contains("/unsubscribe?token="))
        .expect("unsubscribe link in the text part")
        .to_string();
    assert!(
        html.contains(&link.replace('&', "&amp;")),
        "same link in the HTML part"
    );
    let token = link.split("token=").nth(1).unwrap().to_string();
    let page = |t: String| {
        let app = &app;
        async move {
            app.client
                .get(format!("{}/unsubscribe", app.url))
                .query(&[("token", t)])
                .send()
                .await
                .unwrap()
        }
    };
    let post = |t: String| {
        let app = &app;
        async move {
            app.client
                .post(format!("{}/unsubscribe", app.url))
                .form(&[("token", t)])
                .send()
                .await
                .unwrap()
        }
    };

    // Tampered: one character changed → clear page, nothing changed.
    let mut tampered = token.clone().into_bytes();
    tampered[10] = if tampered[10] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    let r = post(tampered.clone()).await;
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("ungültig"));
    assert_eq!(
        lead_json(&app, "sales-ch-1", &id).await["emailConsent"],
        true
    );

    // The confirmation page changes nothing and offers the form.
    let r = page(token.clone()).await;
    assert_eq!(r.status(), 200);
    let body = r.text().await.unwrap();
    assert!(
        body.contains("Bistro Zürich") && body.contains("name=\"token\""),
        "{body}"
    );
    assert_eq!(
        lead_json(&app, "sales-ch-1", &id).await["emailConsent"],
        true
    );

    let r = post(token.clone()).await;
    assert_eq!(r.status(), 200);
    let after = lead_json(&app, "sales-ch-1", &id).await;
    assert_eq!(after["emailConsent"], false, "consent withdrawn");
    let audit = app
        .count(&format!(
            "SELECT count(*) FROM audit_log WHERE action = 'EMAIL_CONSENT_WITHDRAWN' AND entity_id = '{id}'"
        ))
        .await;
    assert_eq!(audit, 1);
    let notes = app
        .count(&format!(
            "SELECT count(*) FROM lead_activities WHERE lead_id = '{id}' AND activity_type = 'NOTE'"
        ))
        .await;
    assert_eq!(notes, 1);

    // The salesperson records consent again; replaying the link changes nothing.
    let r = app
        .patch(
            "sales-ch-1",
            &id,
            after["version"].as_i64().unwrap(),
            json!({"emailConsent": true}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let r = post(token.clone()).await;
    assert_eq!(r.status(), 200);
    assert!(
        r.text().await.unwrap().contains("bereits"),
        "already-used page"
    );
    assert_eq!(
        lead_json(&app, "sales-ch-1", &id).await["emailConsent"],
        true
    );
    assert_eq!(
        app.count(&format!("SELECT count(*) FROM audit_log WHERE action = 'EMAIL_CONSENT_WITHDRAWN' AND entity_id = '{id}'"))
            .await,
        1
    );

    // Withdrawn again through the API, the T+7 run mails nobody.
    let now = lead_json(&app, "sales-ch-1", &id).await;
    app.patch(
        "sales-ch-1",
        &id,
        now["version"].as_i64().unwrap(),
        json!({"emailConsent": false}),
    )
    .await;
    clock_ahead(&app, 7, 1);
    let r = run_and_deliver(&app).await;
    assert_eq!(r.t7_queued, 0);
    assert_eq!(eml_files(dir.path()).len(), 1);
}

#[tokio::test]
async fn a_mail_queued_before_consent_was_withdrawn_is_not_sent_and_the_follow_up_ends_failed() {
    // The mail folder's path is first taken by a plain file, so the first attempt fails and the
    // mail waits (backoff 10 min) in the outbox; then the folder becomes usable and the lead's
    // consent is withdrawn. When the mail is due again it must not go out.
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("mail");
    std::fs::write(&dir, b"not a folder").unwrap();
    let app = app_with_mail_dir(&dir, &[("FRESHPLAN_MAIL_BACKOFF_MS", "600000")]).await;
    let lead = active_lead(
        &app,
        "sales-de-1",
        "Mensa West",
        "BILDUNG",
        "mensa@west.example",
    )
    .await;
    let id = lead["id"].as_str().unwrap().to_string();
    clock_ahead(&app, 3, 1);
    let r = app
        .state()
        .followups
        .run(&Principal::system(), None)
        .await
        .unwrap();
    assert_eq!(r.t3_queued, 1);
    wait_until(PATIENCE, "the first attempt failed", || async {
        app.count("SELECT count(*) FROM mail_outbox WHERE status = 'QUEUED' AND attempts = 1")
            .await
            == 1
    })
    .await;
    std::fs::remove_file(&dir).unwrap();
    let now = lead_json(&app, "sales-de-1", &id).await;
    let r = app
        .patch(
            "sales-de-1",
            &id,
            now["version"].as_i64().unwrap(),
            json!({"emailConsent": false}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let mut c = app.db.superuser().await;
    sqlx::query("UPDATE mail_outbox SET next_attempt_at = now()")
        .execute(&mut c)
        .await
        .unwrap();
    app.state()
        .mail
        .drain(Duration::from_secs(20))
        .await
        .unwrap();
    assert!(
        eml_files(&dir).is_empty(),
        "no mail to a lead without consent"
    );
    let (status, error): (String, String) =
        sqlx::query_as("SELECT status, last_error FROM followups WHERE lead_id = $1::uuid")
            .bind(&id)
            .fetch_one(&mut c)
            .await
            .unwrap();
    assert_eq!(status, "FAILED");
    assert!(error.starts_with("cancelled"), "{error}");
    assert!(lead_json(&app, "sales-de-1", &id).await["t3SentAt"].is_null());
}

#[tokio::test]
async fn only_managers_and_admins_run_the_job_over_http_a_manager_for_their_territory_only() {
    let dir = tempfile::tempdir().unwrap();
    let app = app_with_mail_dir(dir.path(), &[]).await;
    active_lead(
        &app,
        "sales-de-1",
        "Hotel Berlin",
        "HOTEL",
        "h@berlin.example",
    )
    .await;
    active_lead(&app, "sales-at-1", "Hotel Wien", "HOTEL", "h@wien.example").await;
    clock_ahead(&app, 3, 1);
    let post = |user: &'static str| {
        let app = &app;
        async move {
            app.client
                .post(format!("{}/api/followups/run", app.url))
                .header("Authorization", app.bearer(user))
                .send()
                .await
                .unwrap()
        }
    };
    for user in ["sales-de-1", "viewer-de"] {
        let r = post(user).await;
        assert_eq!(r.status(), 403, "{user}");
        assert_eq!(r.headers()["content-type"], "application/problem+json");
    }
    let r = post("manager-at").await;
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("freshplan-position"));
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["t3Queued"], 1, "only the AT lead: {body}");
    let r = post("admin").await;
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["t3Queued"], 1, "then the DE lead: {body}");
    app.state()
        .mail
        .drain(Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(eml_files(dir.path()).len(), 2);
    let r = app
        .client
        .post(format!("{}/api/followups/run", app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    let off = TestApp::spawn_with(&[("FRESHPLAN_FOLLOWUP_ENABLED", "false")]).await;
    let r = off
        .client
        .post(format!("{}/api/followups/run", off.url))
        .header("Authorization", off.bearer("admin"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let p: Value = r.json().await.unwrap();
    assert!(
        p["type"].as_str().unwrap().ends_with("feature-disabled"),
        "{p}"
    );
}

#[tokio::test]
async fn the_command_line_run_queues_and_delivers_and_its_log_holds_no_contact_data() {
    let dir = tempfile::tempdir().unwrap();
    let app = app_with_mail_dir(dir.path(), &[]).await;
    active_lead(
        &app,
        "sales-de-1",
        "Gesundheitszentrum",
        "GESUNDHEIT",
        "kontakt@gz.example",
    )
    .await;
    let at = (Utc::now() + chrono::Duration::days(3) + chrono::Duration::hours(1)).to_rfc3339();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_freshplan"))
        .args(["followups", "run", "--at", &at, "--deliver-seconds", "20"])
        .env_clear()
        .env("DATABASE_URL", app.db.app_url())
        .env("FRESHPLAN_PII_KEYS", common::KEY_1)
        .env("FRESHPLAN_PII_LOOKUP_KEY", common::LOOKUP_KEY)
        .env("FRESHPLAN_MAIL_FILE_DIR", dir.path())
        .env("RUST_LOG", "debug,sqlx=warn")
        .output()
        .expect("run freshplan followups run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("queued 1 T+3 and 0 T+7"), "{stdout}");
    assert!(stdout.contains("delivered 1,"), "{stdout}");
    assert!(
        stderr.contains("follow-up mail delivered"),
        "the log tells: {stderr}"
    );
    for secret in ["kontakt@gz.example", "gz.example", "Anna Müller"] {
        assert!(
            !stdout.contains(secret) && !stderr.contains(secret),
            "{secret} leaked"
        );
    }
    assert_eq!(eml_files(dir.path()).len(), 1);
}

#[test]
fn every_template_for_every_business_type_renders_filled_german_mails_saved_as_eml_and_html() {
    use freshplan::followups::mailer;
    use freshplan::followups::templates::{self, Kind, MailInput};
    use freshplan::leads::domain::BusinessType;
    use freshplan::territory::Territory;

    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-output/followups");
    std::fs::create_dir_all(&out).unwrap();
    let business_types = [
        BusinessType::Restaurant,
        BusinessType::Hotel,
        BusinessType::Catering,
        BusinessType::Kantine,
        BusinessType::Grosshandel,
        BusinessType::Leh,
        BusinessType::Bildung,
        BusinessType::Gesundheit,
        BusinessType::Sonstiges,
    ];
    let territories = [Territory::DE, Territory::AT, Territory::CH];
    let mut written = 0;
    for (i, bt) in business_types.into_iter().enumerate() {
        for kind in [Kind::T3, Kind::T7] {
            let territory = territories[i % 3];
            // Winter for odd, spring for even business types: both seasonal suggestions appear.
            let date = if i % 2 == 0 {
                chrono::NaiveDate::from_ymd_opt(2026, 4, 15).unwrap()
            } else {
                chrono::NaiveDate::from_ymd_opt(2026, 12, 3).unwrap()
            };
            let url = "https://leads.freshfoodz.example/unsubscribe?token=AQ.sample";
            let company = "Müller & Söhne <Gastro> GmbH";
            let r = templates::render(&MailInput {
                kind,
                business_type: bt,
                territory,
                company_name: company,
                contact_person: Some("Jürgen Groß"),
                sender_name: "Jonas Weber",
                date,
                unsubscribe_url: url,
            });
            for body in [&r.text, &r.html] {
                assert!(
                    !body.contains('{') && !body.contains('}'),
                    "{}: unfilled placeholder",
                    r.template
                );
                assert!(body.contains("FreshFoodz"), "{}: footer", r.template);
                assert!(
                    body.contains("abmelden"),
                    "{}: unsubscribe line",
                    r.template
                );
            }
            assert!(
                r.html.contains("Müller &amp; Söhne &lt;Gastro&gt; GmbH"),
                "{}: escaped",
                r.template
            );
            assert!(!r.html.contains("<Gastro>"));
            assert!(
                r.text.contains(company),
                "{}: text keeps the name",
                r.template
            );
            assert!(
                r.html.contains(&format!("href=\"{}\"", url)),
                "{}: link",
                r.template
            );
            match kind {
                Kind::T3 => assert!(r.text.contains("Probierbox"), "{}", r.template),
                Kind::T7 => {
                    let (pct, min) = templates::bulk_terms(bt);
                    assert!(
                        r.text.contains(&format!("{pct} %")),
                        "{}: {pct} %",
                        r.template
                    );
                    let min = if min >= 1000 {
                        format!("{}.{:03} €", min / 1000, min % 1000)
                    } else {
                        format!("{min} €")
                    };
                    assert!(r.text.contains(&min), "{}: {min}", r.template);
                }
            }
            let mail = mailer::compose(
                "FreshFoodz Vertrieb <vertrieb@freshfoodz.example>",
                "kunde@example.com",
                uuid::Uuid::now_v7(),
                &r,
                url,
                Utc::now(),
            )
            .unwrap();
            let eml = String::from_utf8(mail.raw).unwrap();
            // The mail carries CRLF line ends (RFC 5322); otherwise the parts are the rendering.
            let lf = |s: &str| s.replace("\r\n", "\n").trim_end().to_string();
            let (text, html) = parts(&eml);
            assert_eq!(
                (lf(&text), lf(&html)),
                (lf(&r.text), lf(&r.html)),
                "{}: MIME round trip",
                r.template
            );
            let name = format!("{}-{}", kind.as_str(), bt.as_str());
            std::fs::write(out.join(format!("{name}.eml")), &eml).unwrap();
            std::fs::write(out.join(format!("{name}.html")), &r.html).unwrap();
            written += 1;
        }
    }
    assert_eq!(written, 18);
}

#[tokio::test]
async fn the_schedule_runs_the_job_by_itself_and_two_instances_on_one_database_mail_each_lead_once()
{
    let dir = tempfile::tempdir().unwrap();
    // Every second (six fields: with seconds), on both instances.
    let app = app_with_mail_dir(dir.path(), &[("FRESHPLAN_FOLLOWUP_CRON", "* * * * * *")]).await;
    let second = app.second_instance().await;
    for i in 0..5 {
        active_lead(
            &app,
            "sales-de-2",
            &format!("Hotel {i}"),
            "HOTEL",
            &format!("h{i}@hotel.example"),
        )
        .await;
    }
    let at = Utc::now() + chrono::Duration::days(3) + chrono::Duration::hours(1);
    app.state().clock.set(at);
    second.state().clock.set(at);
    wait_until(
        PATIENCE,
        "five mails delivered by the scheduled runs",
        || async {
            eml_files(dir.path()).len() >= 5
                && app
                    .count("SELECT count(*) FROM mail_outbox WHERE status <> 'SENT'")
                    .await
                    == 0
        },
    )
    .await;
    // A few more firings on both instances change nothing.
    let runs = app
        .count("SELECT count(*) FROM audit_log WHERE action = 'FOLLOWUP_RUN'")
        .await;
    wait_until(PATIENCE, "three more scheduled runs", || async {
        app.count("SELECT count(*) FROM audit_log WHERE action = 'FOLLOWUP_RUN'")
            .await
            >= runs + 3
    })
    .await;
    assert_eq!(eml_files(dir.path()).len(), 5, "each lead mailed once");
    assert_eq!(
        app.count("SELECT count(*) FROM followups WHERE status = 'SENT'")
            .await,
        5
    );
    assert_eq!(
        app.count(
            "SELECT count(*) FROM audit_log WHERE action = 'FOLLOWUP_RUN' \
             AND details->>'triggeredBy' IS DISTINCT FROM 'system'"
        )
        .await,
        0,
        "the scheduled runs are triggered by the system principal"
    );
}

#[tokio::test]
async fn delivered_follow_ups_move_the_widget_pending_completed_and_response_rate_of_their_owner() {
    let dir = tempfile::tempdir().unwrap();
    let app = app_with_mail_dir(dir.path(), &[]).await;
    let a = active_lead(
        &app,
        "sales-de-1",
        "Antwortet GmbH",
        "RESTAURANT",
        "a@antwortet.example",
    )
    .await;
    active_lead(
        &app,
        "sales-de-1",
        "Schweigt GmbH",
        "RESTAURANT",
        "s@schweigt.example",
    )
    .await;
    // Registered 3 days and an hour ago, so the job runs on today's clock.
    let mut c = app.db.superuser().await;
    sqlx::query("UPDATE leads SET registered_at = now() - interval '3 days 1 hour'")
        .execute(&mut c)
        .await
        .unwrap();
    let widget = |pos: Option<i64>| {
        let app = &app;
        async move {
            let q = pos.map(|p| format!("?minPosition={p}")).unwrap_or_default();
            app.get_json("sales-de-1", &format!("/api/cockpit/lead-widget{q}"))
                .await
        }
    };
    let before = widget(None).await;
    assert_eq!(before["pendingT3Count"], 2, "{before}");
    assert_eq!(before["completedT3Today"], 0);

    run_and_deliver(&app).await;
    let r = app
        .client
        .post(format!(
            "{}/api/leads/{}/activities",
            app.url,
            a["id"].as_str().unwrap()
        ))
        .header("Authorization", app.bearer("sales-de-1"))
        .json(&json!({"type": "EMAIL_RECEIVED"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let pos: i64 = r.headers()["freshplan-position"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let after = widget(Some(pos)).await;
    assert_eq!(after["pendingT3Count"], 0, "{after}");
    assert_eq!(after["completedT3Today"], 2);
    assert_eq!(after["t3ResponseRate"], 0.5, "one of the two answered");
    let recent = after["recentFollowUps"].as_array().unwrap();
    assert_eq!(recent.len(), 2);
    assert!(recent
        .iter()
        .all(|f| f["success"] == true && f["followUpType"] == "T3"));
    let today = after["daily"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(today["t3Sent"], 2, "{today}");
}
