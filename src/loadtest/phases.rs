//! The phases of a run: starting it (users, leads, subscribers, floor, sampler), a floor phase,
//! a service phase with its drain and analysis, and the ratios to the floor next to each.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use sqlx::PgConnection;

use super::driver::{self, Driver};
use super::floor::{self, Floor, FloorRecord};
use super::jetstream::{self, Watch};
use super::report::{self, Cpu, FloorPhase, Phase, PhaseKind, Ratios, RelayPhase, ServicePhase};
use super::sampler::{self, CpuSnapshot, Sampler};
use super::scrape::{self, Buckets, Scrape};
use super::setup::{self, Fleet};
use super::stats::{histogram, merge, record, summarize, Clock, Summary};
use super::stream::{self, Subscriber};
use super::{analysis, dbstats, procfs, widget, Options, Shape};
use crate::auth::jwt::Authenticator;

/// The live parts of a run.
pub(super) struct Run {
    pub(super) opts: Options,
    pub(super) clock: Clock,
    pub(super) client: reqwest::Client,
    pub(super) admin: PgConnection,
    pub(super) fleet: Arc<Fleet>,
    pub(super) driver: Arc<Driver>,
    pub(super) readers: Vec<widget::Reader>,
    pub(super) subscribers: Vec<Subscriber>,
    pub(super) floor: Option<Arc<Floor>>,
    pub(super) sampler: Sampler,
    pub(super) pids: Vec<u32>,
    /// Raw data kept for the timeline and the merged summary.
    pub(super) writes: Vec<driver::WriteRecord>,
    pub(super) widget_records: Vec<widget::WidgetRecord>,
    pub(super) floor_records: Vec<FloorRecord>,
    pub(super) e2e_samples: Vec<(u64, u64)>,
    pub(super) phases: Vec<Phase>,
    pub(super) e2e_all: Histogram<u64>,
    pub(super) floor_hists: BTreeMap<usize, (Histogram<u64>, Histogram<u64>)>,
    pub(super) first_scrape: Option<Scrape>,
    pub(super) last_scrape: Option<Scrape>,
    pub(super) resyncs_before: u64,
    pub(super) first_position: i64,
    /// The relay's stream, with `--nats`.
    pub(super) relay: Option<Watch>,
    /// Every phase's relay histograms merged: commit → stream, end to end.
    pub(super) relay_all: Option<(Histogram<u64>, Histogram<u64>)>,
}

pub(super) fn say(opts: &Options, line: impl AsRef<str>) {
    if opts.progress {
        eprintln!("{}", line.as_ref());
    }
}

pub(super) fn seconds(us: u64) -> f64 {
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

pub(super) fn ratios(
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
pub(super) struct ServiceSide {
    pub(super) publish_notify: Buckets,
    pub(super) notify_process: Buckets,
    pub(super) end_to_end: Buckets,
    pub(super) widget_hit: Buckets,
    pub(super) widget_miss: Buckets,
    pub(super) relay_publish_ack: Buckets,
    pub(super) http: BTreeMap<String, Buckets>,
}

pub(super) fn service_side(before: &Scrape, after: &Scrape) -> ServiceSide {
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
        relay_publish_ack: delta("freshplan_relay_publish_latency_seconds", &|_| true)
            .scaled(1000.0),
        http,
    }
}

impl Run {
    pub(super) async fn start(opts: Options) -> anyhow::Result<(Run, procfs::Machine)> {
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
        let relay = match &opts.nats {
            Some(url) => Some(Watch::open(url, &opts.nats_stream, clock).await?),
            None => None,
        };
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
                relay_all: relay.as_ref().map(|_| (histogram(), histogram())),
                relay,
            },
            machine,
        ))
    }

    pub(super) async fn floor_phase(&mut self, rate: f64) -> anyhow::Result<()> {
        let Some(floor) = self.floor.clone() else {
            return Ok(());
        };
        let db_before = dbstats::read(&mut self.admin, floor::DATABASE).await.ok();
        let before = CpuSnapshot::take(&self.pids);
        let start = self.clock.now_us();
        let records = floor.run(rate, self.opts.floor).await;
        let end = self.clock.now_us();
        let after = CpuSnapshot::take(&self.pids);
        let db_after = dbstats::read(&mut self.admin, floor::DATABASE).await.ok();
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
            database: db_before
                .zip(db_after)
                .and_then(|(b, a)| dbstats::per_event(&b, &a, committed)),
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
            let done = done && self.relay.as_ref().map_or(true, |r| r.has_all(committed));
            if done || tokio::time::Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub(super) async fn service_phase(
        &mut self,
        rate: f64,
        duration: Duration,
    ) -> anyhow::Result<usize> {
        let index = self.phases.len();
        let p_before = setup::outbox_position(&mut self.admin).await?;
        let scrape_before = sampler::scrape_all(&self.client, &self.opts.urls)
            .await
            .context("cannot scrape /q/metrics of the service (features.metrics.prometheus.enabled must be true)")?;
        if self.first_scrape.is_none() {
            self.first_scrape = Some(scrape_before.clone());
        }
        let db_before = dbstats::read(&mut self.admin, &self.opts.database.name)
            .await
            .ok();
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
        let db_after = dbstats::read(&mut self.admin, &self.opts.database.name)
            .await
            .ok();
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
        let window = (end - start) as f64 / 1e6;
        let relay = self.relay.as_ref().map(|watch| {
            let d = jetstream::relay_delivery(&committed, &watch.seen(), &writes);
            if let Some((c2s, e2e)) = self.relay_all.as_mut() {
                merge(c2s, &d.commit_to_stream);
                merge(e2e, &d.end_to_end);
            }
            RelayPhase {
                committed_events: d.committed,
                in_stream: d.in_stream,
                lost: d.lost,
                duplicates: d.duplicates,
                lost_examples: d.lost_examples,
                achieved_rate: (d.in_stream as f64 / window * 10.0).round() / 10.0,
                caught_up_after_s: d.last_received_us.map(|t| seconds(t.saturating_sub(end))),
                commit_to_stream: summarize(&d.commit_to_stream),
                end_to_end: summarize(&d.end_to_end),
                publish_ack: side.relay_publish_ack.summary(),
            }
        });
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
            database: db_before
                .zip(db_after)
                .and_then(|(b, a)| dbstats::per_event(&b, &a, delivery.committed)),
            service_rss_peak_mib: self.sampler.peak_rss_kib(start, drained) as f64 / 1024.0,
            vs_floor,
            relay,
        };
        say(
            &self.opts,
            format!(
                "service  {rate:>6.0}/s {window:>4.0} s: sent {}, ok {}, failed {}, achieved {:.0}/s; lost {}, duplicated {} of {} deliveries; API {}; end to end {}; CPU ms/event {:.2}",
                phase.sent,
                phase.ok,
                phase.failed,
                phase.achieved_rate,
                phase.lost,
                phase.duplicates,
                phase.expected_deliveries,
                report::triple(phase.api.get("all").unwrap_or(&Summary::default())),
                report::triple(&phase.end_to_end),
                phase.cpu.machine_ms_per_event.unwrap_or(0.0)
            ),
        );
        if let Some(r) = &phase.relay {
            say(
                &self.opts,
                format!(
                    "relay    {rate:>6.0}/s {window:>4.0} s: {} of {} events in the stream ({:.0}/s), lost {}, duplicated {}; commit → stream {}; end to end {}",
                    r.in_stream,
                    r.committed_events,
                    r.achieved_rate,
                    r.lost,
                    r.duplicates,
                    report::triple(&r.commit_to_stream),
                    report::triple(&r.end_to_end)
                ),
            );
        }
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
    pub(super) fn complete_ratios(&mut self) {
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

    pub(super) fn resyncs(&self) -> u64 {
        self.subscribers.iter().map(|s| s.seen().resyncs).sum()
    }
}

/// Whether a find-max step held, and why not.
pub(super) fn judge(p: &ServicePhase, rate: f64) -> (bool, Vec<String>) {
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
