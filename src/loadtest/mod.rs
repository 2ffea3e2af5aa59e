//! `freshplan loadtest`: drives running instances of the service with open-loop load and
//! measures every path of an event against PostgreSQL's own floor (issue 12).
//!
//! A run: load users are made in the user table ([`setup`]); each sales user creates a few
//! leads; SSE subscribers (the admin, a manager per territory, owners) open their streams
//! ([`stream`]); then phases follow — the service under a fixed rate of commands ([`driver`]) with
//! widget readers ([`widget`]), and with `--baseline` the floor (PostgreSQL alone, [`floor`])
//! before, between and after them. After each service phase the tool reads the events committed
//! in its range from the outbox and waits until every subscriber in their audience has them (or
//! the drain time is up): what is missing is lost, what came twice is duplicated. The service's
//! own histograms are scraped around each phase ([`scrape`]), CPU and memory read from `/proc`
//! ([`procfs`], [`sampler`]). [`report`] and [`html`] turn it into `report.json` and
//! `report.html`.

pub mod analysis;
pub mod cli;
pub mod driver;
pub mod floor;
pub mod html;
pub mod procfs;
pub mod report;
pub mod sampler;
pub mod scrape;
pub mod setup;
pub mod stats;
pub mod stream;
pub mod widget;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use sqlx::PgConnection;

pub use cli::{run_command, Args};
use driver::{Driver, Mix};
use floor::{Floor, FloorRecord};
use report::{
    Cpu, FindMax, FloorPhase, Phase, PhaseKind, Ratios, Report, RunSummary, Second, ServicePhase,
    SetupInfo, Step, ToolInfo,
};
use sampler::{CpuSnapshot, Sampler};
use scrape::{Buckets, Scrape};
use setup::{Database, Fleet};
use stats::{histogram, merge, record, summarize, Clock, Summary};
use stream::Subscriber;

use crate::auth::jwt::Authenticator;
use crate::config::JwtSettings;

/// The load's shape.
#[derive(Debug, Clone, PartialEq)]
pub enum Shape {
    /// `rate` commands a second for `duration`.
    Fixed { rate: f64, duration: Duration },
    /// Raise the rate step by step until the service no longer keeps up.
    FindMax {
        start: f64,
        step: f64,
        max: f64,
        step_duration: Duration,
    },
}

impl Shape {
    /// `--profile burst`: 400 events/s (the top of the plan's 200–400) for 5 minutes.
    pub fn burst() -> Shape {
        Shape::Fixed {
            rate: 400.0,
            duration: Duration::from_secs(300),
        }
    }

    /// `--profile soak`: 100 events/s for 10 minutes.
    pub fn soak() -> Shape {
        Shape::Fixed {
            rate: 100.0,
            duration: Duration::from_secs(600),
        }
    }

    fn describe(&self) -> String {
        match self {
            Shape::Fixed { rate, duration } => {
                format!("{rate:.0} events/s for {} s", duration.as_secs_f64())
            }
            Shape::FindMax {
                start,
                step,
                max,
                step_duration,
            } => format!(
                "find-max: {start:.0} events/s, +{step:.0} per step up to {max:.0}, {} s per step",
                step_duration.as_secs_f64()
            ),
        }
    }
}

/// Everything a run needs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Base URLs of the instances (`http://127.0.0.1:8080`); commands, streams and widget
    /// readers take them in turn.
    pub urls: Vec<String>,
    pub shape: Shape,
    /// Measure the floor (PostgreSQL alone) before, between and after the service phases.
    pub baseline: bool,
    /// Sales users who own and change the leads (at least 1).
    pub users: usize,
    /// SSE subscribers: the admin, three managers, then owners.
    pub subscribers: usize,
    pub widget_readers: usize,
    /// Widget requests a second per reader.
    pub widget_rate: f64,
    /// Leads each sales user creates before the first phase.
    pub leads_per_user: usize,
    pub mix: Mix,
    /// How tokens are signed (the service's secret; the demo's data folder secret).
    pub jwt: JwtSettings,
    pub database: Database,
    /// Processes of the service; empty: found by the URLs' ports.
    pub service_pids: Vec<u32>,
    /// Length of a service phase between two floor phases.
    pub segment: Duration,
    /// Length of a floor phase.
    pub floor: Duration,
    /// How long to wait after a phase for every subscriber to get every event.
    pub drain: Duration,
    /// Connections of the floor's writers.
    pub floor_connections: u32,
    pub seed: u64,
    /// Shown in the report.
    pub command_line: String,
    /// Progress lines on stderr.
    pub progress: bool,
}

impl Options {
    /// Defaults for `urls` and `database` (3 × 10 users, 10 subscribers, 4 widget readers at 5/s,
    /// 60 s segments, 10 s floors, 15 s drain).
    pub fn new(urls: Vec<String>, shape: Shape, jwt: JwtSettings, database: Database) -> Self {
        Options {
            urls,
            shape,
            baseline: false,
            users: 30,
            subscribers: 10,
            widget_readers: 4,
            widget_rate: 5.0,
            leads_per_user: 5,
            mix: Mix::default(),
            jwt,
            database,
            service_pids: Vec::new(),
            segment: Duration::from_secs(60),
            floor: Duration::from_secs(10),
            drain: Duration::from_secs(15),
            floor_connections: 8,
            seed: 12,
            command_line: String::new(),
            progress: false,
        }
    }
}

/// The live parts of a run.
struct Run {
    opts: Options,
    clock: Clock,
    client: reqwest::Client,
    admin: PgConnection,
    fleet: Arc<Fleet>,
    driver: Arc<Driver>,
    readers: Vec<widget::Reader>,
    subscribers: Vec<Subscriber>,
    floor: Option<Arc<Floor>>,
    sampler: Sampler,
    pids: Vec<u32>,
    /// Raw data kept for the timeline and the merged summary.
    writes: Vec<driver::WriteRecord>,
    widget_records: Vec<widget::WidgetRecord>,
    floor_records: Vec<FloorRecord>,
    e2e_samples: Vec<(u64, u64)>,
    phases: Vec<Phase>,
    e2e_all: Histogram<u64>,
    floor_hists: BTreeMap<usize, (Histogram<u64>, Histogram<u64>)>,
    first_scrape: Option<Scrape>,
    last_scrape: Option<Scrape>,
    resyncs_before: u64,
    first_position: i64,
}

fn say(opts: &Options, line: impl AsRef<str>) {
    if opts.progress {
        eprintln!("{}", line.as_ref());
    }
}

fn seconds(us: u64) -> f64 {
    (us as f64 / 1e4).round() / 100.0
}

fn port_of(url: &str) -> Option<u16> {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let host = rest.split('/').next().unwrap_or(rest);
    match host.rsplit_once(':') {
        Some((_, p)) => p.parse().ok(),
        None => Some(if url.starts_with("https") { 443 } else { 80 }),
    }
}

async fn wait_ready(client: &reqwest::Client, url: &str) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let r = client.get(format!("{url}/q/health/ready")).send().await;
        if matches!(&r, Ok(r) if r.status().is_success()) {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "{url} is not ready after 60 s ({})",
                match r {
                    Ok(r) => format!("HTTP {}", r.status()),
                    Err(e) => e.to_string(),
                }
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn cpu(before: &CpuSnapshot, after: &CpuSnapshot, events: u64, has_service: bool) -> Cpu {
    let per = |ticks: u64| (events > 0).then(|| procfs::ticks_to_ms(ticks) / events as f64);
    let total = after.machine_total.saturating_sub(before.machine_total);
    let busy = after.machine_busy.saturating_sub(before.machine_busy);
    Cpu {
        events,
        service_ms_per_event: if has_service {
            per(after.service.saturating_sub(before.service))
        } else {
            None
        },
        postgres_ms_per_event: per(after.postgres.saturating_sub(before.postgres)),
        tool_ms_per_event: per(after.own.saturating_sub(before.own)),
        // /proc/stat counts ticks per core: busy ticks are CPU time.
        machine_ms_per_event: per(busy),
        machine_busy: (total > 0).then(|| busy as f64 / total as f64),
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some((a / b * 100.0).round() / 100.0),
        _ => None,
    }
}

fn ratios(
    floor_phases: Vec<usize>,
    floor_e2e: &Histogram<u64>,
    floor_commit: &Histogram<u64>,
    e2e: &Summary,
    api: Option<&Summary>,
) -> Ratios {
    let fe = summarize(floor_e2e);
    let fc = summarize(floor_commit);
    let api = api.cloned().unwrap_or_default();
    Ratios {
        end_to_end_p50: ratio(e2e.p50_ms, fe.p50_ms),
        end_to_end_p95: ratio(e2e.p95_ms, fe.p95_ms),
        end_to_end_p99: ratio(e2e.p99_ms, fe.p99_ms),
        api_p50: ratio(api.p50_ms, fc.p50_ms),
        api_p95: ratio(api.p95_ms, fc.p95_ms),
        api_p99: ratio(api.p99_ms, fc.p99_ms),
        floor_phases,
        floor_end_to_end: fe,
        floor_commit: fc,
    }
}

/// Service-side histograms of one phase from the scrapes around it.
struct ServiceSide {
    publish_notify: Buckets,
    notify_process: Buckets,
    end_to_end: Buckets,
    widget_hit: Buckets,
    widget_miss: Buckets,
    http: BTreeMap<String, Buckets>,
}

fn service_side(before: &Scrape, after: &Scrape) -> ServiceSide {
    let path = |p: &'static str| move |s: &scrape::Sample| s.label("path") == Some(p);
    let cache = |c: &'static str| move |s: &scrape::Sample| s.label("cache") == Some(c);
    let delta = |name: &str, keep: &dyn Fn(&scrape::Sample) -> bool| {
        after
            .histogram(name, keep)
            .minus(&before.histogram(name, keep))
    };
    let mut http = BTreeMap::new();
    let mut routes: Vec<(String, String)> = after
        .samples
        .iter()
        .filter(|s| s.name == "freshplan_http_request_duration_ms_count")
        .filter_map(|s| {
            Some((
                s.label("method")?.to_string(),
                s.label("route")?.to_string(),
            ))
        })
        .collect();
    routes.sort();
    routes.dedup();
    for (method, route) in routes {
        let keep = |s: &scrape::Sample| {
            s.label("method") == Some(method.as_str()) && s.label("route") == Some(route.as_str())
        };
        let d = delta("freshplan_http_request_duration_ms", &keep);
        if d.count() > 0.0 {
            http.insert(format!("{method} {route}"), d);
        }
    }
    ServiceSide {
        publish_notify: delta("freshplan_event_latency_ms", &path("publish_notify")),
        notify_process: delta("freshplan_event_latency_ms", &path("notify_process")),
        end_to_end: delta("freshplan_event_latency_ms", &path("end_to_end")),
        widget_hit: delta("freshplan_widget_query_ms", &cache("hit")),
        widget_miss: delta("freshplan_widget_query_ms", &cache("miss")),
        http,
    }
}

impl Run {
    async fn start(opts: Options) -> anyhow::Result<(Run, procfs::Machine)> {
        if opts.urls.is_empty() {
            bail!("at least one --url is needed");
        }
        let clock = Clock::new();
        let mut machine = procfs::Machine::here();
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .tcp_nodelay(true)
            .pool_max_idle_per_host(256)
            .build()
            .context("cannot build the HTTP client")?;
        let stream_client = reqwest::Client::builder()
            .tcp_nodelay(true)
            .build()
            .context("cannot build the HTTP client")?;
        for url in &opts.urls {
            wait_ready(&client, url).await?;
        }
        let mut admin = opts.database.owner_connection().await?;
        let (version, settings) = setup::postgres_facts(&mut admin).await?;
        machine.postgres_version = version;
        machine.postgres_settings = settings;

        let auth = Authenticator::from_settings(&opts.jwt, true)
            .context("cannot sign tokens for the load users")?;
        let planned = match &opts.shape {
            Shape::Fixed { duration, .. } => duration.as_secs() * 2,
            Shape::FindMax { step_duration, .. } => step_duration.as_secs() * 40,
        };
        let ttl = (planned + 3600).min(opts.jwt.max_lifetime_seconds);
        let fleet = Arc::new(setup::fleet(&opts.database, &auth, opts.users, ttl).await?);
        say(
            &opts,
            format!(
                "{} load users ready; creating {} leads",
                fleet.sales.len() + fleet.managers.len() + 1,
                opts.leads_per_user * fleet.sales.len()
            ),
        );
        let driver = Arc::new(Driver::new(
            client.clone(),
            opts.urls.clone(),
            fleet.clone(),
            clock,
            opts.mix,
            opts.seed,
        ));
        driver.seed_leads(opts.leads_per_user.max(1)).await?;

        let mut pids = opts.service_pids.clone();
        if pids.is_empty() {
            for url in &opts.urls {
                if let Some(pid) = port_of(url).and_then(procfs::pid_listening_on) {
                    if !pids.contains(&pid) {
                        pids.push(pid);
                    }
                }
            }
        }
        let first_position = setup::outbox_position(&mut admin).await?;
        let mut subscribers = Vec::new();
        for (i, user) in stream::subscribers(&fleet, opts.subscribers)
            .into_iter()
            .enumerate()
        {
            let url = opts.urls[i % opts.urls.len()].clone();
            subscribers
                .push(stream::open(stream_client.clone(), url, user, first_position, clock).await?);
        }
        let floor = if opts.baseline {
            Some(Arc::new(
                Floor::start(&opts.database, opts.floor_connections, clock).await?,
            ))
        } else {
            None
        };
        let sampler = Sampler::start(client.clone(), opts.urls.clone(), pids.clone(), clock);
        let readers = widget::readers(&fleet, opts.widget_readers);
        say(
            &opts,
            format!(
                "{} subscribers open after position {first_position}; service pids {pids:?}; {}",
                subscribers.len(),
                opts.shape.describe()
            ),
        );
        Ok((
            Run {
                opts,
                clock,
                client,
                admin,
                fleet,
                driver,
                readers,
                subscribers,
                floor,
                sampler,
                pids,
                writes: Vec::new(),
                widget_records: Vec::new(),
                floor_records: Vec::new(),
                e2e_samples: Vec::new(),
                phases: Vec::new(),
                e2e_all: histogram(),
                floor_hists: BTreeMap::new(),
                first_scrape: None,
                last_scrape: None,
                resyncs_before: 0,
                first_position,
            },
            machine,
        ))
    }

    async fn floor_phase(&mut self, rate: f64) -> anyhow::Result<()> {
        let Some(floor) = self.floor.clone() else {
            return Ok(());
        };
        let before = CpuSnapshot::take(&self.pids);
        let start = self.clock.now_us();
        let records = floor.run(rate, self.opts.floor).await;
        let end = self.clock.now_us();
        let after = CpuSnapshot::take(&self.pids);
        let (mut commit, mut e2e, mut c2n) = (histogram(), histogram(), histogram());
        let mut committed = 0;
        let mut notified = 0;
        for r in &records {
            if let Some(c) = r.committed_us {
                committed += 1;
                record(&mut commit, c - r.intended_us.min(c));
                if let Some(n) = r.notified_us {
                    notified += 1;
                    record(&mut e2e, n.saturating_sub(r.intended_us));
                    record(&mut c2n, n.saturating_sub(c));
                }
            }
        }
        let window = self.opts.floor.as_secs_f64();
        let index = self.phases.len();
        let phase = FloorPhase {
            sent: records.len() as u64,
            committed,
            notified,
            failed: records.len() as u64 - committed,
            achieved_rate: committed as f64 / window,
            commit: summarize(&commit),
            end_to_end: summarize(&e2e),
            commit_to_notify: summarize(&c2n),
            cpu: cpu(&before, &after, committed, false),
        };
        say(
            &self.opts,
            format!(
                "floor    {rate:>6.0}/s {:>4.0} s: committed {committed}, notified {notified}; commit {}; write → notification {}",
                window,
                report::triple(&phase.commit),
                report::triple(&phase.end_to_end)
            ),
        );
        self.floor_hists.insert(index, (e2e, commit));
        self.floor_records.extend(records);
        self.phases.push(Phase {
            index,
            kind: PhaseKind::Floor,
            rate,
            start_s: seconds(start),
            end_s: seconds(end),
            drained_s: seconds(end),
            service: None,
            floor: Some(phase),
        });
        Ok(())
    }

    async fn wait_delivered(&self, committed: &[setup::Committed]) {
        let deadline = tokio::time::Instant::now() + self.opts.drain;
        loop {
            let done = {
                let guards: Vec<_> = self.subscribers.iter().map(|s| s.seen()).collect();
                let views: Vec<_> = self
                    .subscribers
                    .iter()
                    .zip(&guards)
                    .map(|(s, g)| (&s.principal, &**g))
                    .collect();
                analysis::all_delivered(committed, &views)
            };
            if done || tokio::time::Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn service_phase(&mut self, rate: f64, duration: Duration) -> anyhow::Result<usize> {
        let index = self.phases.len();
        let p_before = setup::outbox_position(&mut self.admin).await?;
        let scrape_before = sampler::scrape_all(&self.client, &self.opts.urls)
            .await
            .context("cannot scrape /q/metrics of the service (features.metrics.prometheus.enabled must be true)")?;
        if self.first_scrape.is_none() {
            self.first_scrape = Some(scrape_before.clone());
        }
        let cpu_before = CpuSnapshot::take(&self.pids);
        let start = self.clock.now_us();
        let (writes, widgets) = tokio::join!(
            self.driver.run(rate, duration),
            widget::run(
                &self.client,
                &self.opts.urls,
                &self.readers,
                self.opts.widget_rate,
                duration,
                self.clock
            )
        );
        let end = self.clock.now_us();
        let p_after = setup::outbox_position(&mut self.admin).await?;
        let committed = setup::committed_between(&mut self.admin, p_before, p_after).await?;
        self.wait_delivered(&committed).await;
        let drained = self.clock.now_us();
        let cpu_after = CpuSnapshot::take(&self.pids);
        let scrape_after = sampler::scrape_all(&self.client, &self.opts.urls)
            .await
            .context("cannot scrape /q/metrics of the service")?;
        let side = service_side(&scrape_before, &scrape_after);
        self.last_scrape = Some(scrape_after);

        let delivery = {
            let guards: Vec<_> = self.subscribers.iter().map(|s| s.seen()).collect();
            let views: Vec<_> = self
                .subscribers
                .iter()
                .zip(&guards)
                .map(|(s, g)| (&s.principal, &**g))
                .collect();
            analysis::deliveries(&committed, &views, &writes)
        };
        let api = analysis::api_latency(&writes);
        let ok = writes.iter().filter(|w| w.result.is_ok()).count() as u64;
        let mut widget_client = histogram();
        let mut widget_errors = 0;
        for w in &widgets {
            if widget::ok(w) {
                record(&mut widget_client, w.done_us.saturating_sub(w.intended_us));
            } else {
                widget_errors += 1;
            }
        }
        merge(&mut self.e2e_all, &delivery.e2e);
        let window = (end - start) as f64 / 1e6;
        let vs_floor = self.adjacent_floor_ratio(index, &summarize(&delivery.e2e), &api);
        let phase = ServicePhase {
            sent: writes.len() as u64,
            sent_by_kind: analysis::sent_by_kind(&writes),
            ok,
            failed: writes.len() as u64 - ok,
            failures: analysis::failures(&writes),
            retries: writes.iter().map(|w| u64::from(w.retries)).sum(),
            achieved_rate: (ok as f64 / window * 10.0).round() / 10.0,
            api: api.iter().map(|(k, h)| (k.clone(), summarize(h))).collect(),
            end_to_end: summarize(&delivery.e2e),
            end_to_end_by_role: delivery
                .e2e_by_role
                .iter()
                .map(|(k, h)| (k.clone(), summarize(h)))
                .collect(),
            committed_events: delivery.committed,
            expected_deliveries: delivery.expected,
            delivered: delivery.delivered,
            lost: delivery.lost,
            duplicates: delivery.duplicates,
            lost_examples: delivery.lost_examples.clone(),
            unmatched_writes: delivery.unmatched_writes,
            service_publish_notify: side.publish_notify.summary(),
            service_notify_process: side.notify_process.summary(),
            service_end_to_end: side.end_to_end.summary(),
            service_http: side
                .http
                .iter()
                .map(|(k, b)| (k.clone(), b.summary()))
                .collect(),
            widget_client: summarize(&widget_client),
            widget_errors,
            widget_hit: side.widget_hit.summary(),
            widget_miss: side.widget_miss.summary(),
            cpu: cpu(
                &cpu_before,
                &cpu_after,
                delivery.committed,
                !self.pids.is_empty(),
            ),
            service_rss_peak_mib: self.sampler.peak_rss_kib(start, drained) as f64 / 1024.0,
            vs_floor,
        };
        say(
            &self.opts,
            format!(
                "service  {rate:>6.0}/s {window:>4.0} s: sent {}, ok {}, failed {}, achieved {:.0}/s; lost {}, duplicated {} of {} deliveries; API {}; end to end {}",
                phase.sent,
                phase.ok,
                phase.failed,
                phase.achieved_rate,
                phase.lost,
                phase.duplicates,
                phase.expected_deliveries,
                report::triple(phase.api.get("all").unwrap_or(&Summary::default())),
                report::triple(&phase.end_to_end)
            ),
        );
        self.e2e_samples.extend(delivery.e2e_samples);
        self.writes.extend(writes);
        self.widget_records.extend(widgets);
        self.phases.push(Phase {
            index,
            kind: PhaseKind::Service,
            rate,
            start_s: seconds(start),
            end_s: seconds(end),
            drained_s: seconds(drained),
            service: Some(phase),
            floor: None,
        });
        Ok(index)
    }

    /// Ratio against the floor phase just before `index` (the one after is added once it ran).
    fn adjacent_floor_ratio(
        &self,
        index: usize,
        e2e: &Summary,
        api: &BTreeMap<String, Histogram<u64>>,
    ) -> Option<Ratios> {
        let before = index.checked_sub(1)?;
        let (fe, fc) = self.floor_hists.get(&before)?;
        let api = api.get("all").map(summarize);
        Some(ratios(vec![before], fe, fc, e2e, api.as_ref()))
    }

    /// Adds the floor phase after each service phase to its ratio (before and after merged).
    fn complete_ratios(&mut self) {
        for p in self.phases.iter_mut() {
            let Some(s) = p.service.as_mut() else {
                continue;
            };
            let around: Vec<usize> = [p.index.checked_sub(1), Some(p.index + 1)]
                .into_iter()
                .flatten()
                .filter(|i| self.floor_hists.contains_key(i))
                .collect();
            if around.is_empty() {
                continue;
            }
            let (mut fe, mut fc) = (histogram(), histogram());
            for i in &around {
                let (e, c) = &self.floor_hists[i];
                merge(&mut fe, e);
                merge(&mut fc, c);
            }
            s.vs_floor = Some(ratios(
                around,
                &fe,
                &fc,
                &s.end_to_end.clone(),
                s.api.get("all"),
            ));
        }
    }

    fn resyncs(&self) -> u64 {
        self.subscribers.iter().map(|s| s.seen().resyncs).sum()
    }
}

/// Whether a find-max step held, and why not.
fn judge(p: &ServicePhase, rate: f64) -> (bool, Vec<String>) {
    let mut reasons = Vec::new();
    if p.lost > 0 {
        reasons.push(format!("{} deliveries lost", p.lost));
    }
    if p.end_to_end.p99_ms.map_or(true, |v| v >= 100.0) {
        reasons.push(format!(
            "end to end p99 {} ms ≥ 100 ms",
            p.end_to_end
                .p99_ms
                .map(|v| format!("{v:.1}"))
                .unwrap_or_else(|| "–".into())
        ));
    }
    if p.achieved_rate < 0.95 * rate {
        reasons.push(format!(
            "achieved {:.0}/s < 95 % of {rate:.0}/s",
            p.achieved_rate
        ));
    }
    (reasons.is_empty(), reasons)
}

/// Runs the load described by `opts` against the running service and returns the report
/// (written nowhere: see [`report::write`]).
pub async fn run(opts: Options) -> anyhow::Result<Report> {
    let started_at = chrono::Utc::now();
    let (mut run, mut machine) = Run::start(opts.clone()).await?;
    run.resyncs_before = run.resyncs();
    let leads_at_start = run.driver.lead_count();
    let mut find_max = None;
    match opts.shape.clone() {
        Shape::Fixed { rate, duration } => {
            let mut left = duration;
            while !left.is_zero() {
                let seg = left.min(opts.segment);
                run.floor_phase(rate).await?;
                run.service_phase(rate, seg).await?;
                left -= seg;
            }
            run.floor_phase(rate).await?;
        }
        Shape::FindMax {
            start,
            step,
            max,
            step_duration,
        } => {
            let mut steps = Vec::new();
            let mut highest = None;
            let mut rate = start;
            while rate <= max {
                run.floor_phase(rate).await?;
                let i = run.service_phase(rate, step_duration).await?;
                let Some(p) = run.phases[i].service.as_ref() else {
                    break;
                };
                let (held, reasons) = judge(p, rate);
                say(
                    &opts,
                    if held {
                        format!("         {rate:.0}/s held")
                    } else {
                        format!("         {rate:.0}/s not held: {}", reasons.join("; "))
                    },
                );
                steps.push(Step {
                    rate,
                    phase: i,
                    held,
                    reasons,
                    achieved_rate: p.achieved_rate,
                    end_to_end_p99_ms: p.end_to_end.p99_ms,
                    lost: p.lost,
                });
                if !held {
                    break;
                }
                highest = Some(rate);
                rate += step;
            }
            run.floor_phase(rate.min(max)).await?;
            find_max = Some(FindMax {
                criteria: "0 lost, end to end p99 < 100 ms, ≥ 95 % of the target rate achieved"
                    .into(),
                steps,
                highest_held: highest,
            });
        }
    }
    run.complete_ratios();
    machine.load_after = procfs::loadavg();
    let summary = summarize_run(&run);
    let timeline = timeline(&run);
    let subscribers = run.subscribers.iter().map(|s| s.report()).collect();
    let setup = SetupInfo {
        urls: opts.urls.clone(),
        shape: opts.shape.describe(),
        baseline: opts.baseline,
        users: run.fleet.sales.len(),
        subscribers: run.subscribers.len(),
        widget_readers: run.readers.len(),
        widget_rate_per_reader: opts.widget_rate,
        mix: opts.mix,
        leads_at_start,
        leads_at_end: run.driver.lead_count(),
        service_pids: run.pids.clone(),
        segment_seconds: opts.segment.as_secs_f64(),
        floor_seconds: if opts.baseline {
            opts.floor.as_secs_f64()
        } else {
            0.0
        },
        first_position: run.first_position,
    };
    let mut report = Report {
        tool: ToolInfo {
            version: env!("CARGO_PKG_VERSION").into(),
            command_line: opts.command_line.clone(),
            started_at: started_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            finished_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            code: code_version(),
            release_build: !cfg!(debug_assertions),
        },
        machine,
        setup,
        phases: run.phases.clone(),
        summary,
        find_max,
        goals: Vec::new(),
        timeline,
        subscribers,
    };
    report.goals = report::goals(&report);
    drop(run.subscribers);
    if let Some(floor) = run.floor.take() {
        if let Ok(floor) = Arc::try_unwrap(floor) {
            floor.stop().await?;
        }
    }
    Ok(report)
}

/// `git describe --always --dirty` of the current directory, when it is a work tree.
fn code_version() -> Option<String> {
    let out = std::process::Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn summarize_run(run: &Run) -> RunSummary {
    let service: Vec<(&Phase, &ServicePhase)> = run
        .phases
        .iter()
        .filter_map(|p| p.service.as_ref().map(|s| (p, s)))
        .collect();
    let api = analysis::api_latency(&run.writes);
    let (mut floor_commit, mut floor_e2e, mut floor_c2n) = (histogram(), histogram(), histogram());
    for r in &run.floor_records {
        if let Some(c) = r.committed_us {
            record(&mut floor_commit, c.saturating_sub(r.intended_us));
            if let Some(n) = r.notified_us {
                record(&mut floor_e2e, n.saturating_sub(r.intended_us));
                record(&mut floor_c2n, n.saturating_sub(c));
            }
        }
    }
    let side = match (&run.first_scrape, &run.last_scrape) {
        (Some(a), Some(b)) => Some(service_side(a, b)),
        _ => None,
    };
    let mut widget_client = histogram();
    for w in run.widget_records.iter().filter(|w| widget::ok(w)) {
        record(&mut widget_client, w.done_us.saturating_sub(w.intended_us));
    }
    let e2e = summarize(&run.e2e_all);
    let api_summary: BTreeMap<String, Summary> =
        api.iter().map(|(k, h)| (k.clone(), summarize(h))).collect();
    let vs_floor = (!run.floor_hists.is_empty()).then(|| {
        ratios(
            run.floor_hists.keys().copied().collect(),
            &floor_e2e,
            &floor_commit,
            &e2e,
            api_summary.get("all"),
        )
    });
    let service_seconds: f64 = service.iter().map(|(p, _)| p.end_s - p.start_s).sum();
    let ok: u64 = service.iter().map(|(_, s)| s.ok).sum();
    let mut cpu_sum = Cpu::default();
    let (mut sv, mut pg, mut tl, mut mc) = (0.0, 0.0, 0.0, 0.0);
    for (_, s) in &service {
        let n = s.cpu.events as f64;
        cpu_sum.events += s.cpu.events;
        sv += s.cpu.service_ms_per_event.unwrap_or(0.0) * n;
        pg += s.cpu.postgres_ms_per_event.unwrap_or(0.0) * n;
        tl += s.cpu.tool_ms_per_event.unwrap_or(0.0) * n;
        mc += s.cpu.machine_ms_per_event.unwrap_or(0.0) * n;
    }
    if cpu_sum.events > 0 {
        let n = cpu_sum.events as f64;
        let r = |v: f64| Some((v / n * 1000.0).round() / 1000.0);
        cpu_sum.service_ms_per_event = if run.pids.is_empty() { None } else { r(sv) };
        cpu_sum.postgres_ms_per_event = r(pg);
        cpu_sum.tool_ms_per_event = r(tl);
        cpu_sum.machine_ms_per_event = r(mc);
    }
    let hwm: u64 = run.pids.iter().map(|p| procfs::memory_kib(*p).1).sum();
    let mut curves = BTreeMap::new();
    curves.insert(
        "end to end (client)".to_string(),
        stats::curve(&run.e2e_all),
    );
    for (k, h) in &api {
        curves.insert(format!("API {k}"), stats::curve(h));
    }
    curves.insert("widget (client)".into(), stats::curve(&widget_client));
    if !run.floor_records.is_empty() {
        curves.insert(
            "floor: write → notification".into(),
            stats::curve(&floor_e2e),
        );
        curves.insert("floor: commit".into(), stats::curve(&floor_commit));
    }
    if let Some(side) = &side {
        curves.insert(
            "service: publish → notify".into(),
            side.publish_notify.curve(),
        );
        curves.insert(
            "service: notify → processed".into(),
            side.notify_process.curve(),
        );
        curves.insert("service: widget hit".into(), side.widget_hit.curve());
        curves.insert("service: widget miss".into(), side.widget_miss.curve());
    }
    curves.retain(|_, v| !v.is_empty());
    let duplicates = run
        .subscribers
        .iter()
        .map(|s| {
            s.seen()
                .keys
                .values()
                .map(|r| u64::from(r.count.saturating_sub(1)))
                .sum::<u64>()
        })
        .sum();
    RunSummary {
        service_seconds: (service_seconds * 100.0).round() / 100.0,
        sent: service.iter().map(|(_, s)| s.sent).sum(),
        ok,
        failed: service.iter().map(|(_, s)| s.failed).sum(),
        achieved_rate: if service_seconds > 0.0 {
            (ok as f64 / service_seconds * 10.0).round() / 10.0
        } else {
            0.0
        },
        committed_events: service.iter().map(|(_, s)| s.committed_events).sum(),
        expected_deliveries: service.iter().map(|(_, s)| s.expected_deliveries).sum(),
        lost: service.iter().map(|(_, s)| s.lost).sum(),
        duplicates,
        resyncs: run.resyncs() - run.resyncs_before,
        api: api_summary,
        end_to_end: e2e,
        service_publish_notify: side
            .as_ref()
            .map(|s| s.publish_notify.summary())
            .unwrap_or_default(),
        service_notify_process: side
            .as_ref()
            .map(|s| s.notify_process.summary())
            .unwrap_or_default(),
        service_end_to_end: side
            .as_ref()
            .map(|s| s.end_to_end.summary())
            .unwrap_or_default(),
        widget_client: summarize(&widget_client),
        widget_hit: side
            .as_ref()
            .map(|s| s.widget_hit.summary())
            .unwrap_or_default(),
        widget_miss: side
            .as_ref()
            .map(|s| s.widget_miss.summary())
            .unwrap_or_default(),
        floor_commit: summarize(&floor_commit),
        floor_end_to_end: summarize(&floor_e2e),
        floor_commit_to_notify: summarize(&floor_c2n),
        vs_floor,
        cpu: cpu_sum,
        service_rss_peak_mib: run.sampler.peak_rss_kib(0, u64::MAX) as f64 / 1024.0,
        service_rss_hwm_mib: hwm as f64 / 1024.0,
        curves,
    }
}

fn percentile(sorted: &[u64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    Some(sorted[i] as f64 / 1000.0)
}

fn timeline(run: &Run) -> Vec<Second> {
    let ticks = run.sampler.ticks();
    let end_s = run
        .phases
        .last()
        .map(|p| p.drained_s.ceil() as u64 + 1)
        .unwrap_or(0);
    let mut secs: Vec<Second> = (0..end_s)
        .map(|t| Second {
            t,
            ..Second::default()
        })
        .collect();
    if secs.is_empty() {
        return secs;
    }
    let at = |us: u64| ((us / 1_000_000) as usize).min(end_s as usize - 1);
    for p in &run.phases {
        for s in secs
            .iter_mut()
            .filter(|s| (s.t as f64) >= p.start_s.floor() && (s.t as f64) < p.end_s)
        {
            s.phase = match p.kind {
                PhaseKind::Service => "service".into(),
                PhaseKind::Floor => "floor".into(),
            };
        }
    }
    let mut api: Vec<Vec<u64>> = vec![Vec::new(); secs.len()];
    let mut e2e: Vec<Vec<u64>> = vec![Vec::new(); secs.len()];
    let mut floor: Vec<Vec<u64>> = vec![Vec::new(); secs.len()];
    for w in &run.writes {
        let s = at(w.intended_us);
        secs[s].sent += 1;
        if w.result.is_ok() {
            secs[at(w.done_us)].ok += 1;
            api[s].push(w.done_us.saturating_sub(w.intended_us));
        } else {
            secs[at(w.done_us)].failed += 1;
        }
    }
    for &(intended, v) in &run.e2e_samples {
        e2e[at(intended)].push(v);
    }
    for f in &run.floor_records {
        let s = at(f.intended_us);
        secs[s].floor_sent += 1;
        if let Some(n) = f.notified_us {
            floor[s].push(n.saturating_sub(f.intended_us));
        }
    }
    for sub in &run.subscribers {
        for r in sub.seen().keys.values() {
            secs[at(r.first_us)].delivered += 1;
        }
    }
    for (i, s) in secs.iter_mut().enumerate() {
        for (v, p50, p99) in [
            (&mut api[i], &mut s.api_p50_ms, &mut s.api_p99_ms),
            (&mut e2e[i], &mut s.e2e_p50_ms, &mut s.e2e_p99_ms),
            (
                &mut floor[i],
                &mut s.floor_e2e_p50_ms,
                &mut s.floor_e2e_p99_ms,
            ),
        ] {
            v.sort_unstable();
            *p50 = percentile(v, 0.5);
            *p99 = percentile(v, 0.99);
        }
    }
    let tps = procfs::ticks_per_second();
    for pair in ticks.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        let s = at(b.t_us);
        let dt = (b.t_us - a.t_us) as f64 / 1e6;
        if dt <= 0.0 {
            continue;
        }
        if let (Some(x), Some(y)) = (a.processed, b.processed) {
            secs[s].processed = Some(((y - x).max(0.0) / dt).round());
        }
        if !run.pids.is_empty() {
            let cores = b.service_ticks.saturating_sub(a.service_ticks) as f64 / tps / dt;
            secs[s].service_cores = Some((cores * 100.0).round() / 100.0);
            secs[s].service_rss_mib =
                Some((b.service_rss_kib as f64 / 1024.0 * 10.0).round() / 10.0);
        }
        let total = b.machine_total.saturating_sub(a.machine_total);
        if total > 0 {
            let busy = b.machine_busy.saturating_sub(a.machine_busy) as f64 / total as f64;
            secs[s].machine_busy = Some((busy * 100.0).round() / 100.0);
        }
    }
    secs
}
