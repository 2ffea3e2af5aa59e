//! The logs never contain contact data: the real `freshplan serve` binary runs as a subprocess
//! with its JSON log (stderr) captured, while leads are created, searched, duplicated and read
//! with a tampered value.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{TestDb, JWT_SECRET, KEY_1, LOOKUP_KEY};
use freshplan::auth::jwt::Authenticator;
use serde_json::{json, Value};

/// Kills the server when the test ends, also on a failed assertion.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn parsed(lines: &Mutex<Vec<String>>) -> Vec<Value> {
    lines
        .lock()
        .unwrap()
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Waits until a log line with this message appears and returns it.
async fn wait_for(lines: &Mutex<Vec<String>>, message: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(line) = parsed(lines)
            .into_iter()
            .find(|l| l["fields"]["message"] == message)
        {
            return line;
        }
        assert!(
            Instant::now() < deadline,
            "no log line `{message}` in:\n{}",
            lines.lock().unwrap().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn logs_show_a_masked_email_and_never_contact_data() {
    let db = TestDb::create().await;
    let settings = db.settings(&[]);
    let vault = common::vault_from(&settings);
    freshplan::demo::seed(&db.app_pool().await, &vault, 0)
        .await
        .unwrap();

    let child = Command::new(env!("CARGO_BIN_EXE_freshplan"))
        .args(["serve", "--bind", "127.0.0.1:0"])
        .env_clear()
        .env("DATABASE_URL", db.app_url())
        .env("FRESHPLAN_AUTH_JWT_SECRET", JWT_SECRET)
        .env("FRESHPLAN_PII_KEYS", KEY_1)
        .env("FRESHPLAN_PII_LOOKUP_KEY", LOOKUP_KEY)
        .env("RUST_LOG", "debug,sqlx=warn,hyper=info,h2=info,tower=info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start freshplan serve");
    let mut server = Running(child);
    let lines = Arc::new(Mutex::new(Vec::new()));
    let stderr = server.0.stderr.take().unwrap();
    let reader = {
        let lines = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        })
    };
    let listening = wait_for(&lines, "FreshPlan Leads listening").await;
    let url = format!("http://{}", listening["fields"]["addr"].as_str().unwrap());

    let auth = Authenticator::from_settings(&settings.jwt, false).unwrap();
    let token = |user: &str| {
        let p = freshplan::demo::principal(user).unwrap();
        format!("Bearer {}", auth.mint(&p, 3600).unwrap())
    };
    let client = reqwest::Client::new();
    let body = json!({
        "companyName": "Gasthaus Sonne", "businessType": "RESTAURANT", "source": "MESSE",
        "contactPerson": "Max Mustermann", "email": " Max.Mustermann@Example.com", "phone": "+49 89 1234567",
    });
    let post = |user: &str| {
        client
            .post(format!("{url}/api/leads"))
            .header("Authorization", token(user))
            .json(&body)
    };
    let r = post("sales-de-1").send().await.unwrap();
    assert_eq!(r.status(), 201);
    let lead: Value = r.json().await.unwrap();
    let id = lead["id"].as_str().unwrap();

    let created = wait_for(&lines, "lead created").await;
    assert_eq!(
        created["fields"]["contact_email"], "***@example.com",
        "{created}"
    );
    assert_eq!(created["fields"]["lead_id"], id);

    // Search, duplicate and a tampered read each leave their traces in the log, masked.
    let r = client
        .get(format!("{url}/api/leads"))
        .query(&[("email", "max.mustermann@example.com")])
        .header("Authorization", token("sales-de-1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(post("sales-de-2").send().await.unwrap().status(), 409);
    let mut su = db.superuser().await;
    sqlx::query("UPDATE leads SET phone_ct = email_ct WHERE id = $1::uuid")
        .bind(id)
        .execute(&mut su)
        .await
        .unwrap();
    let r = client
        .get(format!("{url}/api/leads/{id}"))
        .header("Authorization", token("sales-de-1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 500);
    let unreadable = wait_for(&lines, "contact data unreadable").await;
    assert_eq!(unreadable["fields"]["lead_id"], id);

    drop(server);
    reader.join().unwrap();
    let log = lines.lock().unwrap().join("\n");
    assert!(log.contains("***@example.com"));
    let lower = log.to_lowercase();
    for secret in ["max.mustermann", "mustermann", "1234567", "89 123"] {
        assert!(
            !lower.contains(secret),
            "the log contains `{secret}`:\n{log}"
        );
    }
    assert!(
        !log.contains("Some("),
        "no Debug wrappers in the log:\n{log}"
    );
}
