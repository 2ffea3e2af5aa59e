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
pub mod dbstats;
pub mod driver;
pub mod floor;
pub mod html;
pub mod jetstream;
mod phases;
pub mod procfs;
pub mod report;
pub mod sampler;
pub mod scrape;
pub mod setup;
pub mod stats;
pub mod stream;
mod summary;
pub mod widget;

use std::sync::Arc;
use std::time::Duration;

pub use cli::{run_command, Args};
use driver::Mix;
use phases::{judge, say, Run};
use report::{FindMax, Report, SetupInfo, Step, ToolInfo};
use setup::Database;

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
    /// NATS URL: follow the relay's JetStream stream beside the SSE path.
    pub nats: Option<String>,
    /// The relay's stream (`freshplan.relay.stream`).
    pub nats_stream: String,
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
            nats: None,
            nats_stream: "FRESHPLAN_LEADS".into(),
        }
    }
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
    let summary = summary::summarize_run(&run);
    let timeline = summary::timeline(&run);
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
