//! The `freshplan loadtest` command line: arguments, settings and token key, the run, the
//! report files and a summary on stdout.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{ArgGroup, ValueEnum};

use super::report::{self, Report};
use super::setup::Database;
use super::{Options, Shape};
use crate::config::Settings;
use crate::db::bootstrap::Target;

/// `--profile`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Profile {
    /// 400 events/s (the top of the plan's 200–400) for 5 minutes.
    Burst,
    /// 100 events/s for 10 minutes.
    Soak,
}

/// Arguments of `freshplan loadtest`.
#[derive(Debug, Clone, clap::Args)]
#[command(group(ArgGroup::new("shape").required(true).args(["profile", "rate", "find_max"])))]
pub struct Args {
    /// TOML configuration file (the service's: database URLs, token settings).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Base URL of an instance; repeat for more instances (they are used in turn).
    #[arg(long = "url", required = true)]
    pub urls: Vec<String>,
    /// A load shape of the plan.
    #[arg(long, value_enum)]
    pub profile: Option<Profile>,
    /// Commands (= events) per second.
    #[arg(long, requires = "duration")]
    pub rate: Option<f64>,
    /// With --rate: how long, e.g. `90s`, `5m`, `300`.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Raise the rate step by step until the service no longer keeps up (lost > 0, p99 end to
    /// end ≥ 100 ms or < 95 % of the rate achieved); reports the highest rate held.
    #[arg(long)]
    pub find_max: bool,
    /// --find-max: first rate.
    #[arg(long, default_value_t = 500.0)]
    pub start_rate: f64,
    /// --find-max: added per step.
    #[arg(long, default_value_t = 500.0)]
    pub step_rate: f64,
    /// --find-max: highest rate tried.
    #[arg(long, default_value_t = 6000.0)]
    pub max_rate: f64,
    /// --find-max: length of a step.
    #[arg(long, value_parser = parse_duration, default_value = "20s")]
    pub step_duration: Duration,
    /// Measure PostgreSQL's floor (the same write straight from the tool) before, between and
    /// after the service phases.
    #[arg(long)]
    pub baseline: bool,
    /// Write report.json and report.html into this folder.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Sales users (load-sales-de-01, …) spread over DE, AT and CH.
    #[arg(long, default_value_t = 30)]
    pub users: usize,
    /// SSE subscribers: the admin, a manager per territory, then owners.
    #[arg(long, default_value_t = 10)]
    pub subscribers: usize,
    /// Widget readers (sales own, manager territory, admin all, in turn).
    #[arg(long, default_value_t = 4)]
    pub widget_readers: usize,
    /// Requests a second per widget reader.
    #[arg(long, default_value_t = 5.0)]
    pub widget_rate: f64,
    /// Leads each sales user creates before the first phase.
    #[arg(long, default_value_t = 5)]
    pub leads_per_user: usize,
    /// Length of a service phase between floor phases.
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    pub segment: Duration,
    /// Length of a floor phase.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub floor: Duration,
    /// Longest wait after a phase for every subscriber to get every event.
    #[arg(long, value_parser = parse_duration, default_value = "15s")]
    pub drain: Duration,
    /// HS256 secret to sign the load users' tokens (default: freshplan.auth.jwt.secret, else the
    /// demo data folder's secret).
    #[arg(long, env = "FRESHPLAN_LOADTEST_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// Process id of an instance (repeatable; default: found by the URLs' ports).
    #[arg(long = "service-pid")]
    pub service_pids: Vec<u32>,
    /// Seed of the command mix.
    #[arg(long, default_value_t = 12)]
    pub seed: u64,
    /// Follow the relay's JetStream stream at this NATS URL (e.g. nats://127.0.0.1:4222) and
    /// report the relay beside the SSE path: events in the stream, lost, duplicated, commit →
    /// stream and end to end. The relay itself (`freshplan relay`, or `serve` with
    /// freshplan.relay.enabled) must be running; its stream is freshplan.relay.stream.
    #[arg(long)]
    pub nats: Option<String>,
}

/// `90s`, `5m`, `1h`, `250ms` or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (number, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (e.g. 90s, 5m)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("unknown unit in `{s}` (ms, s, m, h)")),
    };
    if !(secs > 0.0 && secs.is_finite()) {
        return Err(format!("`{s}` must be positive"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn shape(a: &Args) -> anyhow::Result<Shape> {
    Ok(match (a.profile, a.rate, a.find_max) {
        (Some(Profile::Burst), None, false) => Shape::burst(),
        (Some(Profile::Soak), None, false) => Shape::soak(),
        (None, Some(rate), false) => {
            if !(rate > 0.0 && rate.is_finite()) {
                bail!("--rate must be positive");
            }
            Shape::Fixed {
                rate,
                duration: a.duration.context("--rate needs --duration")?,
            }
        }
        (None, None, true) => {
            if a.start_rate <= 0.0 || a.step_rate <= 0.0 || a.max_rate < a.start_rate {
                bail!("--find-max needs 0 < --start-rate ≤ --max-rate and --step-rate > 0");
            }
            Shape::FindMax {
                start: a.start_rate,
                step: a.step_rate,
                max: a.max_rate,
                step_duration: a.step_duration,
            }
        }
        _ => bail!("give one of --profile, --rate with --duration, or --find-max"),
    })
}

/// Options from the arguments and the service's settings (database URLs, token settings);
/// `demo_secret_file` is the demo data folder's secret, used when no key is configured.
pub fn options(a: &Args, demo_secret_file: &Path) -> anyhow::Result<Options> {
    let settings = Settings::load(a.config.as_deref())?;
    let mut jwt = settings.jwt.clone();
    if let Some(secret) = &a.jwt_secret {
        jwt.secret = secret.clone();
    }
    if jwt.secret.is_empty() {
        jwt.demo_secret_file = Some(demo_secret_file.to_path_buf());
    }
    let target = Target::from_url(&settings.database_url, &settings.owner_role)?;
    let database = Database {
        admin_url: settings.admin_database_url.clone(),
        name: target.database,
        owner_role: settings.owner_role.clone(),
    };
    let urls = a
        .urls
        .iter()
        .map(|u| u.trim_end_matches('/').to_string())
        .collect();
    let mut o = Options::new(urls, shape(a)?, jwt, database);
    o.baseline = a.baseline;
    o.users = a.users;
    o.subscribers = a.subscribers.max(1);
    o.widget_readers = a.widget_readers;
    o.widget_rate = a.widget_rate;
    o.leads_per_user = a.leads_per_user;
    o.service_pids = a.service_pids.clone();
    o.segment = a.segment;
    o.floor = a.floor;
    o.drain = a.drain;
    o.seed = a.seed;
    o.progress = true;
    o.nats = a.nats.clone();
    o.nats_stream = settings.relay.stream.clone();
    o.command_line = std::env::args()
        .map(|x| if x.contains(' ') { format!("'{x}'") } else { x })
        .collect::<Vec<_>>()
        .join(" ");
    if a.jwt_secret.is_some() {
        // Never print a secret given on the command line.
        o.command_line = redact_secret(&o.command_line);
    }
    Ok(o)
}

fn redact_secret(line: &str) -> String {
    let mut out = Vec::new();
    let mut hide = false;
    for w in line.split(' ') {
        if hide {
            out.push("***".to_string());
            hide = false;
        } else if w == "--jwt-secret" {
            out.push(w.to_string());
            hide = true;
        } else if let Some(_v) = w.strip_prefix("--jwt-secret=") {
            out.push("--jwt-secret=***".into());
        } else {
            out.push(w.to_string());
        }
    }
    out.join(" ")
}

/// Prints the goals and the main figures.
pub fn print_summary(r: &Report) {
    let s = &r.summary;
    println!(
        "\n{} — {} s of service load, {} commands ({} failed), achieved {:.0}/s",
        r.setup.shape, s.service_seconds, s.sent, s.failed, s.achieved_rate
    );
    println!(
        "lost {} / duplicated {} of {} deliveries ({} events committed), resyncs {}",
        s.lost, s.duplicates, s.expected_deliveries, s.committed_events, s.resyncs
    );
    let line = |name: &str, x: &super::stats::Summary| {
        println!("  {name:<34} {}", report::triple(x));
    };
    if let Some(all) = s.api.get("all") {
        line("API (all commands)", all);
    }
    line("end to end (API call → SSE frame)", &s.end_to_end);
    if let Some(r) = &s.relay {
        println!(
            "relay: {} of {} committed events in the stream, lost {}, duplicated {}",
            r.in_stream, r.committed_events, r.lost, r.duplicates
        );
        line("relay: commit → stream", &r.commit_to_stream);
        line("relay: end to end (API call → stream)", &r.end_to_end);
    }
    line("service publish → notify", &s.service_publish_notify);
    line("service notify → processed", &s.service_notify_process);
    line("widget (client)", &s.widget_client);
    line("widget hit (service)", &s.widget_hit);
    line("widget miss (service)", &s.widget_miss);
    if s.floor_end_to_end.count > 0 {
        line("floor: commit", &s.floor_commit);
        line("floor: write → notification", &s.floor_end_to_end);
    }
    println!(
        "\n{:<60} {:<50} {:<14} measured",
        "figure", "goal", "verdict"
    );
    for g in &r.goals {
        println!(
            "{:<60} {:<50} {:<14} {}",
            g.figure, g.goal, g.verdict, g.measured
        );
    }
}

/// `freshplan loadtest …`.
pub async fn run_command(a: Args, demo_secret_file: &Path) -> anyhow::Result<()> {
    let opts = options(&a, demo_secret_file)?;
    let report = super::run(opts).await?;
    if let Some(dir) = &a.report {
        report::write(&report, dir)?;
        println!(
            "report: {} and {}",
            dir.join("report.json").display(),
            dir.join("report.html").display()
        );
    }
    print_summary(&report);
    let s = &report.summary;
    if let Some(r) = s.relay.as_ref().filter(|r| r.lost > 0 || r.duplicates > 0) {
        bail!(
            "relay: {} events missing from the stream, {} duplicated",
            r.lost,
            r.duplicates
        );
    }
    // --find-max goes past capacity on purpose: commands failing in the step that was not held
    // are its finding, not an error of the run (lost or duplicated events always are).
    let failed = match &report.find_max {
        Some(f) => f
            .steps
            .iter()
            .filter(|step| step.held)
            .filter_map(|step| report.phases.get(step.phase)?.service.as_ref())
            .map(|p| p.failed)
            .sum(),
        None => s.failed,
    };
    if s.lost > 0 || s.duplicates > 0 || failed > 0 {
        bail!(
            "{} lost, {} duplicated events, {} failed commands",
            s.lost,
            s.duplicates,
            failed
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_units_and_plain_seconds() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("15"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("3 weeks").is_err());
    }

    #[test]
    fn a_secret_on_the_command_line_is_not_repeated() {
        assert_eq!(
            redact_secret("freshplan loadtest --jwt-secret abc --rate 5"),
            "freshplan loadtest --jwt-secret *** --rate 5"
        );
        assert_eq!(redact_secret("x --jwt-secret=abc"), "x --jwt-secret=***");
    }
}
