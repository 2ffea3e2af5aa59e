//! The open-loop writer: commands arrive at a fixed rate whatever the service does, each timed
//! from its *intended* start (so a stalled service shows up as latency instead of silently
//! lowering the rate — coordinated omission), as a mix of status changes, logged activities and
//! new leads by many sales users in DE, AT and CH.
//!
//! Status changes follow the status machine (`leads::domain`) in a loop that never ends a lead
//! (REGISTERED → ACTIVE → REMINDER → ACTIVE or GRACE_PERIOD → ACTIVE …) and carry `If-Match`
//! with the version the tool keeps per lead; a lead is checked out while a change is in flight,
//! so the tool does not race itself. A 412 (someone else changed it) takes the problem's
//! `currentVersion` and tries again; a 409 reads the lead again first.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reqwest::{Client, Response, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::task::JoinSet;
use uuid::Uuid;

use super::setup::Fleet;
use super::stats::Clock;
use crate::identity::Role;
use crate::leads::domain::LeadStatus;

/// Header of a write's outbox position.
pub const POSITION_HEADER: &str = "freshplan-position";

/// Attempts of one status change (the first and the retries after 412/409).
const ATTEMPTS: u32 = 4;

/// What a command does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Create,
    Status,
    Activity,
}

impl Kind {
    /// Every kind, in report order.
    pub const ALL: [Kind; 3] = [Kind::Status, Kind::Activity, Kind::Create];

    /// Name in the report.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Create => "create",
            Kind::Status => "status",
            Kind::Activity => "activity",
        }
    }
}

/// Shares of the command kinds (they need not add up to 1).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Mix {
    pub status: f64,
    pub activity: f64,
    pub create: f64,
}

impl Default for Mix {
    fn default() -> Self {
        Mix {
            status: 0.5,
            activity: 0.35,
            create: 0.15,
        }
    }
}

/// Why a command failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Failure {
    /// HTTP status (0: no answer: connection error or timeout).
    pub status: u16,
    /// Problem type slug or error text, shortened.
    pub problem: String,
}

/// One command as it went.
#[derive(Debug, Clone)]
pub struct WriteRecord {
    pub kind: Kind,
    /// When it was meant to start (µs on the run's clock).
    pub intended_us: u64,
    /// When its answer was read.
    pub done_us: u64,
    /// The outbox position of its event, or why it failed.
    pub result: Result<i64, Failure>,
    /// 412/409 answers it went through before succeeding (status changes only).
    pub retries: u32,
}

/// A lead of the load with what the tool knows of it.
#[derive(Debug, Clone)]
struct LeadState {
    id: Uuid,
    /// Index into `Fleet::sales`.
    owner: usize,
    version: i64,
    status: LeadStatus,
}

/// The leads of the load: the idle ones a status change may check out, and all (for
/// activities, which need no version).
#[derive(Default)]
struct Leads {
    idle: Mutex<Vec<LeadState>>,
    all: RwLock<Vec<(Uuid, usize)>>,
}

impl Leads {
    fn add(&self, lead: LeadState) {
        self.all
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push((lead.id, lead.owner));
        self.give_back(lead);
    }

    fn give_back(&self, lead: LeadState) {
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(lead);
    }

    fn check_out(&self, rng: &mut StdRng) -> Option<LeadState> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.is_empty() {
            return None;
        }
        let i = rng.gen_range(0..idle.len());
        Some(idle.swap_remove(i))
    }

    fn any(&self, rng: &mut StdRng) -> Option<(Uuid, usize)> {
        let all = self.all.read().unwrap_or_else(|e| e.into_inner());
        (!all.is_empty()).then(|| all[rng.gen_range(0..all.len())])
    }

    fn count(&self) -> usize {
        self.all.read().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// The next status of the load's loop, by the status machine, for a sales owner; `None` for a
/// lead that has left the loop (which the tool never does itself).
pub fn next_status(from: LeadStatus, pick: usize) -> Option<LeadStatus> {
    let targets: Vec<LeadStatus> = from
        .allowed_targets()
        .iter()
        .copied()
        .filter(|t| {
            matches!(
                t,
                LeadStatus::Active | LeadStatus::Reminder | LeadStatus::GracePeriod
            )
        })
        .filter(|t| from.transition(*t, Role::Sales, false).is_ok())
        .collect();
    (!targets.is_empty()).then(|| targets[pick % targets.len()])
}

/// What one arrival will do, decided when it is due.
enum Plan {
    Create { owner: usize },
    Status { lead: LeadState },
    Activity { lead: Uuid, owner: usize },
}

const CITIES: [[&str; 3]; 3] = [
    ["München", "Hamburg", "Köln"],
    ["Wien", "Graz", "Linz"],
    ["Zürich", "Basel", "Bern"],
];
const BUSINESS_TYPES: [&str; 5] = ["RESTAURANT", "HOTEL", "CATERING", "KANTINE", "BILDUNG"];
const SOURCES: [&str; 4] = ["MESSE", "EMPFEHLUNG", "TELEFON", "WEB_FORMULAR"];
const ACTIVITY_TYPES: [&str; 5] = ["CALL", "EMAIL", "MEETING", "NOTE", "SAMPLE_SENT"];

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LeadAnswer {
    id: Uuid,
    version: i64,
    status: LeadStatus,
}

/// Drives the commands of a run.
pub struct Driver {
    client: Client,
    urls: Vec<String>,
    fleet: Arc<Fleet>,
    clock: Clock,
    mix: Mix,
    leads: Leads,
    seq: AtomicU64,
    seed: u64,
}

fn position(r: &Response) -> Option<i64> {
    r.headers()
        .get(POSITION_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

fn etag_version(r: &Response) -> Option<i64> {
    r.headers()
        .get(reqwest::header::ETAG)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.trim()
                .trim_start_matches("W/")
                .trim_matches('"')
                .to_string()
        })
        .and_then(|v| v.parse().ok())
}

/// The problem slug of an error answer (or the start of its body).
async fn failure(r: Response) -> Failure {
    let status = r.status().as_u16();
    let body = r.text().await.unwrap_or_default();
    let problem = serde_json::from_str::<Value>(&body)
        .ok()
        .and_then(|v| {
            v["type"]
                .as_str()
                .map(|t| t.rsplit('/').next().unwrap_or(t).to_string())
        })
        .unwrap_or_else(|| body.chars().take(160).collect());
    Failure { status, problem }
}

/// A request without an answer, described without its URL (which carries a lead id, so
/// failures group by cause): what kind of error and its innermost cause.
fn transport(e: reqwest::Error) -> Failure {
    let kind = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect"
    } else if e.is_body() || e.is_decode() {
        "body"
    } else {
        "request"
    };
    let mut cause: &dyn std::error::Error = &e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    Failure {
        status: 0,
        problem: format!(
            "{kind}: {}",
            cause.to_string().chars().take(120).collect::<String>()
        ),
    }
}

impl Driver {
    /// A driver for `fleet` against `urls` (arrivals take the instances in turn).
    pub fn new(
        client: Client,
        urls: Vec<String>,
        fleet: Arc<Fleet>,
        clock: Clock,
        mix: Mix,
        seed: u64,
    ) -> Self {
        Driver {
            client,
            urls,
            fleet,
            clock,
            mix,
            leads: Leads::default(),
            seq: AtomicU64::new(0),
            seed,
        }
    }

    /// Leads known to the driver.
    pub fn lead_count(&self) -> usize {
        self.leads.count()
    }

    fn url(&self, n: u64) -> &str {
        &self.urls[(n % self.urls.len() as u64) as usize]
    }

    /// Creates `per_user` leads for every sales user before the measured phases (eight at a
    /// time); every create must succeed.
    pub async fn seed_leads(self: &Arc<Self>, per_user: usize) -> anyhow::Result<()> {
        let mut set = JoinSet::new();
        let total = per_user * self.fleet.sales.len();
        for i in 0..total {
            if set.len() >= 8 {
                if let Some(done) = set.join_next().await {
                    done??;
                }
            }
            let me = self.clone();
            set.spawn(async move {
                let n = me.seq.fetch_add(1, Ordering::Relaxed);
                me.create(n, i % me.fleet.sales.len())
                    .await
                    .map(|_| ())
                    .map_err(|f| {
                        anyhow::anyhow!(
                            "creating the load's leads failed: HTTP {} {}",
                            f.status,
                            f.problem
                        )
                    })
            });
        }
        while let Some(done) = set.join_next().await {
            done??;
        }
        Ok(())
    }

    fn plan(&self, rng: &mut StdRng) -> Plan {
        let total = self.mix.status + self.mix.activity + self.mix.create;
        let x = rng.gen::<f64>() * total;
        let owner = rng.gen_range(0..self.fleet.sales.len());
        if x < self.mix.create || self.leads.count() == 0 {
            return Plan::Create { owner };
        }
        if x < self.mix.create + self.mix.status {
            if let Some(lead) = self.leads.check_out(rng) {
                return Plan::Status { lead };
            }
        }
        match self.leads.any(rng) {
            Some((lead, owner)) => Plan::Activity { lead, owner },
            None => Plan::Create { owner },
        }
    }

    /// Sends `rate` commands a second for `duration`, open loop, and returns every command's
    /// record once all have been answered.
    pub async fn run(self: &Arc<Self>, rate: f64, duration: Duration) -> Vec<WriteRecord> {
        let n = (rate * duration.as_secs_f64()).round() as u64;
        let period_us = 1e6 / rate;
        let start_us = self.clock.now_us() + 1_000;
        let mut rng = StdRng::seed_from_u64(self.seed ^ self.seq.load(Ordering::Relaxed));
        let mut set = JoinSet::new();
        let mut out = Vec::with_capacity(n as usize);
        for i in 0..n {
            let intended_us = start_us + (i as f64 * period_us) as u64;
            tokio::time::sleep_until(self.clock.at(intended_us).into()).await;
            let plan = self.plan(&mut rng);
            let pick = rng.gen::<usize>();
            let me = self.clone();
            set.spawn(async move { me.execute(plan, intended_us, pick).await });
            while let Some(done) = set.try_join_next() {
                match done {
                    Ok(r) => out.push(r),
                    Err(e) => tracing::warn!(error = %e, "a load command task failed"),
                }
            }
        }
        while let Some(done) = set.join_next().await {
            match done {
                Ok(r) => out.push(r),
                Err(e) => tracing::warn!(error = %e, "a load command task failed"),
            }
        }
        out
    }

    async fn execute(&self, plan: Plan, intended_us: u64, pick: usize) -> WriteRecord {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let (kind, result, retries) = match plan {
            Plan::Create { owner } => (Kind::Create, self.create(n, owner).await, 0),
            Plan::Status { lead } => {
                let (result, retries) = self.change_status(n, lead, pick).await;
                (Kind::Status, result, retries)
            }
            Plan::Activity { lead, owner } => {
                (Kind::Activity, self.activity(n, lead, owner, pick).await, 0)
            }
        };
        WriteRecord {
            kind,
            intended_us,
            done_us: self.clock.now_us(),
            result,
            retries,
        }
    }

    async fn create(&self, n: u64, owner: usize) -> Result<i64, Failure> {
        let user = &self.fleet.sales[owner];
        let t = super::setup::TERRITORIES
            .iter()
            .position(|t| *t == user.principal.territory)
            .unwrap_or(0);
        let i = n as usize;
        let body = json!({
            "companyName": format!("Lasttest {} {n}", ["Gasthaus", "Hotel", "Kantine"][i % 3]),
            "city": CITIES[t][i % 3],
            "businessType": BUSINESS_TYPES[i % BUSINESS_TYPES.len()],
            "source": SOURCES[i % SOURCES.len()],
            "contactPerson": "Max Lasttest",
            "email": format!("load-{}@lasttest.example", Uuid::new_v4().simple()),
            "emailConsent": i % 2 == 0,
        });
        let r = self
            .client
            .post(format!("{}/api/leads", self.url(n)))
            .header("Authorization", &user.bearer)
            .json(&body)
            .send()
            .await
            .map_err(transport)?;
        if r.status() != StatusCode::CREATED {
            return Err(failure(r).await);
        }
        let pos = position(&r);
        let lead: LeadAnswer = r.json().await.map_err(transport)?;
        self.leads.add(LeadState {
            id: lead.id,
            owner,
            version: lead.version,
            status: lead.status,
        });
        pos.ok_or_else(|| Failure {
            status: 201,
            problem: "no FreshPlan-Position header".into(),
        })
    }

    /// Reads the lead again (after a 409) as its owner.
    async fn reread(&self, n: u64, lead: &mut LeadState) -> Result<(), Failure> {
        let r = self
            .client
            .get(format!("{}/api/leads/{}", self.url(n), lead.id))
            .header("Authorization", &self.fleet.sales[lead.owner].bearer)
            .send()
            .await
            .map_err(transport)?;
        if r.status() != StatusCode::OK {
            return Err(failure(r).await);
        }
        let fresh: LeadAnswer = r.json().await.map_err(transport)?;
        lead.version = fresh.version;
        lead.status = fresh.status;
        Ok(())
    }

    async fn change_status(
        &self,
        n: u64,
        mut lead: LeadState,
        pick: usize,
    ) -> (Result<i64, Failure>, u32) {
        let mut retries = 0;
        let result = loop {
            let Some(target) = next_status(lead.status, pick + retries as usize) else {
                break Err(Failure {
                    status: 0,
                    problem: format!("lead {} left the status loop at {}", lead.id, lead.status),
                });
            };
            let sent = self
                .client
                .patch(format!("{}/api/leads/{}", self.url(n), lead.id))
                .header("Authorization", &self.fleet.sales[lead.owner].bearer)
                .header("If-Match", format!("\"{}\"", lead.version))
                .json(&json!({"status": target, "reason": "Lasttest"}))
                .send()
                .await;
            let r = match sent {
                Ok(r) => r,
                Err(e) => break Err(transport(e)),
            };
            match r.status() {
                StatusCode::OK => {
                    let pos = position(&r);
                    match etag_version(&r) {
                        Some(v) => lead.version = v,
                        None => lead.version += 1,
                    }
                    lead.status = target;
                    // The body is the lead; reading it keeps the connection reusable.
                    let _ = r.bytes().await;
                    break pos.ok_or_else(|| Failure {
                        status: 200,
                        problem: "no FreshPlan-Position header".into(),
                    });
                }
                StatusCode::PRECONDITION_FAILED if retries + 1 < ATTEMPTS => {
                    retries += 1;
                    let body: Value = r.json().await.unwrap_or_default();
                    match body["currentVersion"].as_i64() {
                        Some(v) => lead.version = v,
                        None => {
                            if let Err(f) = self.reread(n, &mut lead).await {
                                break Err(f);
                            }
                        }
                    }
                }
                StatusCode::CONFLICT if retries + 1 < ATTEMPTS => {
                    retries += 1;
                    let _ = r.bytes().await;
                    if let Err(f) = self.reread(n, &mut lead).await {
                        break Err(f);
                    }
                }
                _ => break Err(failure(r).await),
            }
        };
        self.leads.give_back(lead);
        (result, retries)
    }

    async fn activity(
        &self,
        n: u64,
        lead: Uuid,
        owner: usize,
        pick: usize,
    ) -> Result<i64, Failure> {
        let body = json!({
            "type": ACTIVITY_TYPES[pick % ACTIVITY_TYPES.len()],
            "description": "Lasttest: Rückruf vereinbart",
            "outcome": "SUCCESSFUL",
        });
        let r = self
            .client
            .post(format!("{}/api/leads/{lead}/activities", self.url(n)))
            .header("Authorization", &self.fleet.sales[owner].bearer)
            .json(&body)
            .send()
            .await
            .map_err(transport)?;
        if r.status() != StatusCode::CREATED {
            return Err(failure(r).await);
        }
        let pos = position(&r);
        let _ = r.bytes().await;
        pos.ok_or_else(|| Failure {
            status: 201,
            problem: "no FreshPlan-Position header".into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_loop_follows_the_machine_and_never_ends_a_lead() {
        use LeadStatus::*;
        let mut seen = std::collections::HashSet::new();
        let mut status = Registered;
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..200 {
            let pick = rng.gen::<usize>();
            let next = next_status(status, pick).expect("the loop goes on");
            assert!(status.transition(next, Role::Sales, false).is_ok());
            seen.insert(next);
            status = next;
        }
        assert!(seen.contains(&Active) && seen.contains(&Reminder) && seen.contains(&GracePeriod));
        assert_eq!(next_status(Converted, 0), None);
        assert_eq!(next_status(Qualified, 0), None);
    }
}
