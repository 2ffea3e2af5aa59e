//! The whole run in figures: service phases and floor phases merged, ratios, CPU, memory,
//! percentile curves per path, and the per-second timeline.

use std::collections::BTreeMap;

use super::phases::{ratios, service_side, Run};
use super::report::{Cpu, Phase, PhaseKind, RelayPhase, RunSummary, Second, ServicePhase};
use super::stats::{self, histogram, record, summarize, Summary};
use super::{analysis, procfs, widget};

pub(super) fn summarize_run(run: &Run) -> RunSummary {
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
    if let Some((c2s, e2e)) = &run.relay_all {
        curves.insert("relay: commit → stream".into(), stats::curve(c2s));
        curves.insert("relay: end to end (client)".into(), stats::curve(e2e));
    }
    curves.retain(|_, v| !v.is_empty());
    let relay = run.relay_all.as_ref().map(|(c2s, e2e)| {
        let phases: Vec<(&Phase, &RelayPhase)> = service
            .iter()
            .filter_map(|(p, s)| s.relay.as_ref().map(|r| (*p, r)))
            .collect();
        let in_stream: u64 = phases.iter().map(|(_, r)| r.in_stream).sum();
        let mut lost_examples: Vec<String> = phases
            .iter()
            .flat_map(|(_, r)| r.lost_examples.iter().cloned())
            .collect();
        lost_examples.truncate(20);
        RelayPhase {
            committed_events: phases.iter().map(|(_, r)| r.committed_events).sum(),
            in_stream,
            lost: phases.iter().map(|(_, r)| r.lost).sum(),
            duplicates: phases.iter().map(|(_, r)| r.duplicates).sum(),
            lost_examples,
            achieved_rate: if service_seconds > 0.0 {
                (in_stream as f64 / service_seconds * 10.0).round() / 10.0
            } else {
                0.0
            },
            caught_up_after_s: phases
                .iter()
                .filter_map(|(_, r)| r.caught_up_after_s)
                .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v)))),
            commit_to_stream: summarize(c2s),
            end_to_end: summarize(e2e),
            publish_ack: side
                .as_ref()
                .map(|s| s.relay_publish_ack.summary())
                .unwrap_or_default(),
        }
    });
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
        relay,
    }
}

fn percentile(sorted: &[u64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    Some(sorted[i] as f64 / 1000.0)
}

pub(super) fn timeline(run: &Run) -> Vec<Second> {
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
