//! The report: what a run measured, phase by phase and overall, the goals of issue 12 checked
//! against it, and the per-second timeline. `report.json` is this structure; `report.html`
//! draws it ([`super::html`]).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use serde::Serialize;

use super::procfs::Machine;
use super::stats::Summary;
use super::stream::SubscriberReport;

/// Everything a run produced.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub tool: ToolInfo,
    pub machine: Machine,
    pub setup: SetupInfo,
    pub phases: Vec<Phase>,
    pub summary: RunSummary,
    pub find_max: Option<FindMax>,
    pub goals: Vec<Goal>,
    pub timeline: Vec<Second>,
    pub subscribers: Vec<SubscriberReport>,
}

/// How and when the run was made.
#[derive(Debug, Clone, Serialize)]
pub struct ToolInfo {
    pub version: String,
    pub command_line: String,
    pub started_at: String,
    pub finished_at: String,
    /// `git describe` of the working tree the tool ran from, when it is one.
    pub code: Option<String>,
    pub release_build: bool,
}

/// The load's shape and participants.
#[derive(Debug, Clone, Serialize)]
pub struct SetupInfo {
    pub urls: Vec<String>,
    pub shape: String,
    pub baseline: bool,
    pub users: usize,
    pub subscribers: usize,
    pub widget_readers: usize,
    pub widget_rate_per_reader: f64,
    pub mix: super::driver::Mix,
    pub leads_at_start: usize,
    pub leads_at_end: usize,
    pub service_pids: Vec<u32>,
    pub segment_seconds: f64,
    pub floor_seconds: f64,
    pub first_position: i64,
}

/// One phase: the service under load, or the floor (PostgreSQL alone).
#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    pub index: usize,
    pub kind: PhaseKind,
    /// Target rate, events (commands or floor writes) per second.
    pub rate: f64,
    /// Seconds since the run's start: sending began, sending ended, drained.
    pub start_s: f64,
    pub end_s: f64,
    pub drained_s: f64,
    pub service: Option<ServicePhase>,
    pub floor: Option<FloorPhase>,
}

/// Which kind of phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PhaseKind {
    Service,
    Floor,
}

/// Figures of a service phase.
#[derive(Debug, Clone, Serialize)]
pub struct ServicePhase {
    pub sent: u64,
    pub sent_by_kind: BTreeMap<String, u64>,
    pub ok: u64,
    pub failed: u64,
    pub failures: Vec<(String, u64)>,
    /// 412/409 answers that status changes went through (then succeeded or failed).
    pub retries: u64,
    /// Successful commands per second of the sending window.
    pub achieved_rate: f64,
    /// API latency (intended start → answer) per command kind and `all`.
    pub api: BTreeMap<String, Summary>,
    /// Intended start → SSE frame received, per subscriber in the audience.
    pub end_to_end: Summary,
    pub end_to_end_by_role: BTreeMap<String, Summary>,
    pub committed_events: u64,
    pub expected_deliveries: u64,
    pub delivered: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub lost_examples: Vec<String>,
    pub unmatched_writes: u64,
    /// The service's own histograms (bucket deltas), ms.
    pub service_publish_notify: Summary,
    pub service_notify_process: Summary,
    pub service_end_to_end: Summary,
    /// Server-side request latency per route (`freshplan_http_request_duration_ms` deltas).
    pub service_http: BTreeMap<String, Summary>,
    /// Widget: client-side (intended start → body read) and the service's hit/miss histograms.
    pub widget_client: Summary,
    pub widget_errors: u64,
    pub widget_hit: Summary,
    pub widget_miss: Summary,
    pub cpu: Cpu,
    /// What PostgreSQL did per event (this database's commits and rows, the cluster's WAL).
    pub database: Option<super::dbstats::PerEvent>,
    pub service_rss_peak_mib: f64,
    /// Ratios to the floor phases right before and after this one.
    pub vs_floor: Option<Ratios>,
    /// The relay into JetStream beside the SSE path (`--nats`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relay: Option<RelayPhase>,
}

/// The relay's figures of a service phase: the phase's committed events in the JetStream
/// stream (`--nats`).
#[derive(Debug, Clone, Serialize)]
pub struct RelayPhase {
    pub committed_events: u64,
    pub in_stream: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub lost_examples: Vec<String>,
    /// Events in the stream per second of the sending window.
    pub achieved_rate: f64,
    /// Sending window's end → the phase's last event received from the stream (0 when the relay
    /// kept up; how long it took to catch up otherwise).
    pub caught_up_after_s: Option<f64>,
    /// Outbox `created_at` (its transaction's start) → stored in JetStream.
    pub commit_to_stream: Summary,
    /// Intended start of the command → message received from the stream by the tool.
    pub end_to_end: Summary,
    /// The relay's own publish → ack histogram (`freshplan_relay_publish_latency_seconds`), when
    /// a scraped URL serves it.
    pub publish_ack: Summary,
}

/// Figures of a floor phase.
#[derive(Debug, Clone, Serialize)]
pub struct FloorPhase {
    pub sent: u64,
    pub committed: u64,
    pub notified: u64,
    pub failed: u64,
    pub achieved_rate: f64,
    /// Intended start → COMMIT answered.
    pub commit: Summary,
    /// Intended start → notification received on the LISTEN connection.
    pub end_to_end: Summary,
    /// COMMIT answered → notification received.
    pub commit_to_notify: Summary,
    pub cpu: Cpu,
    /// What PostgreSQL did per floor write (the scratch database's commits and rows, WAL).
    pub database: Option<super::dbstats::PerEvent>,
}

/// CPU time per event (ms) over a phase, by who spent it, and the machine's load.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Cpu {
    pub events: u64,
    pub service_ms_per_event: Option<f64>,
    pub postgres_ms_per_event: Option<f64>,
    pub tool_ms_per_event: Option<f64>,
    /// Every process of the machine (service + PostgreSQL + this tool + the rest).
    pub machine_ms_per_event: Option<f64>,
    /// Busy share of all cores over the phase, 0..1.
    pub machine_busy: Option<f64>,
}

/// Service figure ÷ floor figure measured next to it.
#[derive(Debug, Clone, Serialize)]
pub struct Ratios {
    /// Floor phases the ratio is taken against.
    pub floor_phases: Vec<usize>,
    pub floor_end_to_end: Summary,
    pub floor_commit: Summary,
    /// End to end p50/p95/p99 ÷ the floor's end to end.
    pub end_to_end_p50: Option<f64>,
    pub end_to_end_p95: Option<f64>,
    pub end_to_end_p99: Option<f64>,
    /// API (all commands) p50/p95/p99 ÷ the floor's commit.
    pub api_p50: Option<f64>,
    pub api_p95: Option<f64>,
    pub api_p99: Option<f64>,
}

/// The whole run: service phases merged, floor phases merged.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    pub service_seconds: f64,
    pub sent: u64,
    pub ok: u64,
    pub failed: u64,
    pub achieved_rate: f64,
    pub committed_events: u64,
    pub expected_deliveries: u64,
    pub lost: u64,
    /// Extra frames of any event per subscriber over the whole run (not only the phases'
    /// ranges).
    pub duplicates: u64,
    pub resyncs: u64,
    pub api: BTreeMap<String, Summary>,
    pub end_to_end: Summary,
    pub service_publish_notify: Summary,
    pub service_notify_process: Summary,
    pub service_end_to_end: Summary,
    pub widget_client: Summary,
    pub widget_hit: Summary,
    pub widget_miss: Summary,
    pub floor_commit: Summary,
    pub floor_end_to_end: Summary,
    pub floor_commit_to_notify: Summary,
    pub vs_floor: Option<Ratios>,
    pub cpu: Cpu,
    pub service_rss_peak_mib: f64,
    /// VmHWM of the service processes at the end (peak since they started).
    pub service_rss_hwm_mib: f64,
    /// `(percentile, ms)` per path, for the percentile chart.
    pub curves: BTreeMap<String, Vec<(f64, f64)>>,
    /// The relay over all service phases (`--nats`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relay: Option<RelayPhase>,
}

/// `--find-max`: the steps and the highest rate held.
#[derive(Debug, Clone, Serialize)]
pub struct FindMax {
    pub criteria: String,
    pub steps: Vec<Step>,
    pub highest_held: Option<f64>,
}

/// One step of `--find-max`.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub rate: f64,
    pub phase: usize,
    pub held: bool,
    /// Why not, when not held.
    pub reasons: Vec<String>,
    pub achieved_rate: f64,
    pub end_to_end_p99_ms: Option<f64>,
    pub lost: u64,
}

/// A goal of issue 12 and what this run says about it.
#[derive(Debug, Clone, Serialize)]
pub struct Goal {
    pub figure: String,
    pub goal: String,
    pub measured: String,
    /// `met`, `missed` or `not measured`.
    pub verdict: String,
}

/// One second of the run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Second {
    pub t: u64,
    /// `service`, `floor` or empty (between phases).
    pub phase: String,
    pub sent: u64,
    pub ok: u64,
    pub failed: u64,
    /// Events the service consumed (all instances).
    pub processed: Option<f64>,
    /// Frames received by all subscribers (first receptions).
    pub delivered: u64,
    pub api_p50_ms: Option<f64>,
    pub api_p99_ms: Option<f64>,
    pub e2e_p50_ms: Option<f64>,
    pub e2e_p99_ms: Option<f64>,
    pub floor_sent: u64,
    pub floor_e2e_p50_ms: Option<f64>,
    pub floor_e2e_p99_ms: Option<f64>,
    /// Cores the service used (1.0 = one core busy).
    pub service_cores: Option<f64>,
    /// Busy share of the machine, 0..1.
    pub machine_busy: Option<f64>,
    pub service_rss_mib: Option<f64>,
}

/// Writes `report.json` and `report.html` into `dir` (created if missing).
pub fn write(report: &Report, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let json = serde_json::to_string_pretty(report)?;
    std::fs::write(dir.join("report.json"), json)
        .with_context(|| format!("cannot write {}", dir.join("report.json").display()))?;
    std::fs::write(dir.join("report.html"), super::html::render(report))
        .with_context(|| format!("cannot write {}", dir.join("report.html").display()))?;
    Ok(())
}

fn fmt(v: Option<f64>) -> String {
    match v {
        Some(v) if v >= 100.0 => format!("{v:.0}"),
        Some(v) if v >= 10.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.2}"),
        None => "–".into(),
    }
}

/// `p50 / p95 / p99 ms`.
pub fn triple(s: &Summary) -> String {
    format!(
        "{} / {} / {} ms",
        fmt(s.p50_ms),
        fmt(s.p95_ms),
        fmt(s.p99_ms)
    )
}

fn verdict(ok: Option<bool>) -> String {
    match ok {
        Some(true) => "met",
        Some(false) => "missed",
        None => "not measured",
    }
    .into()
}

/// The goals of issue 12, checked against the run.
pub fn goals(r: &Report) -> Vec<Goal> {
    let s = &r.summary;
    let mut out = Vec::new();
    let service: Vec<&ServicePhase> = r.phases.iter().filter_map(|p| p.service.as_ref()).collect();
    out.push(Goal {
        figure: "lost / duplicated events".into(),
        goal: "0 / 0".into(),
        measured: format!(
            "{} / {} of {} deliveries ({} events committed)",
            s.lost, s.duplicates, s.expected_deliveries, s.committed_events
        ),
        verdict: verdict((!service.is_empty()).then_some(s.lost == 0 && s.duplicates == 0)),
    });
    let at_400: Vec<&Phase> = r
        .phases
        .iter()
        .filter(|p| p.kind == PhaseKind::Service && (p.rate - 400.0).abs() < 1.0)
        .collect();
    let e2e_ratio = s.vs_floor.as_ref().and_then(|v| v.end_to_end_p95);
    out.push(Goal {
        figure: "end to end p95 (API call → SSE frame)".into(),
        goal: "≤ 2× the floor's p95 in the same run (at 400 events/s)".into(),
        measured: match &s.vs_floor {
            Some(v) => format!(
                "{} ms vs floor {} ms = {}× (rates: {})",
                fmt(s.end_to_end.p95_ms),
                fmt(v.floor_end_to_end.p95_ms),
                fmt(e2e_ratio),
                rates(r)
            ),
            None => format!("{} ms (no floor measured)", fmt(s.end_to_end.p95_ms)),
        },
        verdict: verdict(if at_400.is_empty() {
            None
        } else {
            e2e_ratio.map(|x| x <= 2.0)
        }),
    });
    let pn = s.service_publish_notify.p95_ms;
    let floor_notify = s.floor_end_to_end.p95_ms;
    out.push(Goal {
        figure: "publish → notify p95 (service histogram, 1/2/5 ms buckets)".into(),
        goal: "≤ 1 ms above the commit (floor: write → notification)".into(),
        measured: format!(
            "{} ms; floor write → notification p95 {} ms",
            fmt(pn),
            fmt(floor_notify)
        ),
        verdict: verdict(match (pn, floor_notify) {
            (Some(a), Some(b)) => Some(a <= b + 1.0),
            _ => None,
        }),
    });
    let np = s.service_notify_process.p95_ms;
    out.push(Goal {
        figure: "notify → processed p95 (service histogram)".into(),
        goal: "≤ 2 ms".into(),
        measured: format!("{} ms", fmt(np)),
        verdict: verdict(np.map(|v| v <= 2.0)),
    });
    out.push(Goal {
        figure: "widget p95 under load (service histogram; demo data set, not 100,000 leads)"
            .into(),
        goal: "≤ 2 ms hit, ≤ 15 ms miss".into(),
        measured: format!(
            "hit {} ms ({} answers), miss {} ms ({} answers); client side p95 {} ms",
            fmt(s.widget_hit.p95_ms),
            s.widget_hit.count,
            fmt(s.widget_miss.p95_ms),
            s.widget_miss.count,
            fmt(s.widget_client.p95_ms)
        ),
        verdict: verdict(match (s.widget_hit.p95_ms, s.widget_miss.p95_ms) {
            (Some(h), Some(m)) => Some(h <= 2.0 && m <= 15.0),
            (Some(h), None) => Some(h <= 2.0),
            _ => None,
        }),
    });
    out.push(Goal {
        figure: "highest rate held (0 lost, p99 end to end < 100 ms, ≥ 95 % achieved)".into(),
        goal: "≥ 2,500 events/s".into(),
        measured: match &r.find_max {
            Some(f) => match f.highest_held {
                Some(h) => format!("{h:.0} events/s"),
                None => "no step held".into(),
            },
            None => "run with --find-max".into(),
        },
        verdict: verdict(
            r.find_max
                .as_ref()
                .map(|f| f.highest_held.unwrap_or(0.0) >= 2500.0),
        ),
    });
    if let Some(relay) = &s.relay {
        // At 1,000 events/s (± 20 %), or the phases that ran when none did.
        let at: Vec<&RelayPhase> = r
            .phases
            .iter()
            .filter(|p| p.kind == PhaseKind::Service && (p.rate - 1000.0).abs() <= 200.0)
            .filter_map(|p| p.service.as_ref()?.relay.as_ref())
            .collect();
        let p99 = at
            .iter()
            .filter_map(|p| p.commit_to_stream.p99_ms)
            .fold(None, |m: Option<f64>, v| {
                Some(m.map_or(v, |m: f64| m.max(v)))
            });
        // Kept up: every event of every phase in the stream, the last within 1 s of the end of
        // the phase's sending window.
        let kept_up = r
            .phases
            .iter()
            .filter_map(|p| p.service.as_ref()?.relay.as_ref())
            .all(|rp| rp.lost == 0 && rp.caught_up_after_s.map_or(true, |s| s <= 1.0));
        out.push(Goal {
            figure: "relay into JetStream: keeps up, commit → stream p99".into(),
            goal: "keeps up (every event in the stream ≤ 1 s after each phase); p99 < 50 ms at 1,000 events/s".into(),
            measured: format!(
                "{} of {} events in the stream ({:.0}/s), lost {}, duplicated {}, caught up ≤ {} s after a phase; commit → stream {}{}",
                relay.in_stream,
                relay.committed_events,
                relay.achieved_rate,
                relay.lost,
                relay.duplicates,
                fmt(relay.caught_up_after_s),
                triple(&relay.commit_to_stream),
                match p99 {
                    Some(v) => format!("; at 1,000/s p99 {v:.1} ms"),
                    None => format!(" (not at 1,000/s; rates: {})", rates(r)),
                }
            ),
            // Missed on any loss, duplicate or phase it fell behind; otherwise judged by the
            // p99 at 1,000/s, "not measured" without such a phase.
            verdict: verdict(if relay.lost > 0 || relay.duplicates > 0 || !kept_up {
                Some(false)
            } else {
                p99.map(|v| v < 50.0)
            }),
        });
    }
    let near_1000: Vec<&ServicePhase> = r
        .phases
        .iter()
        .filter(|p| p.kind == PhaseKind::Service && (p.rate - 1000.0).abs() <= 200.0)
        .filter_map(|p| p.service.as_ref())
        .collect();
    let cpu_1000 = near_1000
        .iter()
        .filter_map(|p| p.cpu.machine_ms_per_event)
        .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.min(v))));
    out.push(Goal {
        figure: "whole-machine CPU per event at 1,000 events/s".into(),
        goal: "≤ 0.7 ms".into(),
        measured: match cpu_1000 {
            Some(v) => format!("{v:.2} ms"),
            None => format!(
                "not at 1,000/s; at {}: {} ms per event (service {}, PostgreSQL {}, tool {})",
                rates(r),
                fmt(s.cpu.machine_ms_per_event),
                fmt(s.cpu.service_ms_per_event),
                fmt(s.cpu.postgres_ms_per_event),
                fmt(s.cpu.tool_ms_per_event)
            ),
        },
        verdict: verdict(cpu_1000.map(|v| v <= 0.7)),
    });
    out.push(Goal {
        figure: "service peak RSS".into(),
        goal: "< 150 MB under burst".into(),
        measured: format!(
            "{:.1} MiB sampled peak (VmHWM {:.1} MiB)",
            s.service_rss_peak_mib, s.service_rss_hwm_mib
        ),
        verdict: verdict((s.service_rss_peak_mib > 0.0).then_some(s.service_rss_hwm_mib < 150.0)),
    });
    out
}

fn rates(r: &Report) -> String {
    let mut rates: Vec<String> = r
        .phases
        .iter()
        .filter(|p| p.kind == PhaseKind::Service)
        .map(|p| format!("{:.0}/s", p.rate))
        .collect();
    rates.dedup();
    rates.join(", ")
}
