//! `report.html`: one self-contained page (inline CSS and SVG, nothing fetched) with the goals,
//! the machine, the phases and charts — latency over time, percentile curves per path,
//! throughput sent/processed/delivered, the floor beside the service, CPU and memory.

use std::fmt::Write;

use super::report::{Phase, PhaseKind, Report, Second};
use super::stats::Summary;

const W: f64 = 920.0;
const H: f64 = 300.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 190.0;
const TOP: f64 = 30.0;
const BOTTOM: f64 = 42.0;
const COLORS: [&str; 10] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#17becf", "#bcbd22",
];

/// Escapes text for HTML and SVG.
pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// One line of a chart.
struct Series {
    name: String,
    points: Vec<(f64, f64)>,
    dashed: bool,
}

/// How the x axis reads.
#[derive(Clone, Copy, PartialEq)]
enum XAxis {
    /// Seconds of the run.
    Seconds,
    /// Percentiles, spread by their nines (50, 90, 99, 99.9 … equally apart).
    Nines,
}

struct Chart<'a> {
    title: &'a str,
    y_label: &'a str,
    log_y: bool,
    x: XAxis,
    series: Vec<Series>,
    /// Shaded x ranges (floor phases), with their label.
    bands: Vec<(f64, f64, &'a str)>,
}

fn nines(p: f64) -> f64 {
    let p = p.min(99.999);
    -(1.0 - p / 100.0).log10()
}

fn nice_step(range: f64) -> f64 {
    let raw = (range / 5.0).max(1e-9);
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag)
}

fn label(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 1000.0 {
        format!("{:.0}", v)
    } else if v.abs() >= 1.0 {
        let s = format!("{v:.1}");
        s.trim_end_matches(".0").to_string()
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').to_string()
    }
}

fn line_chart(c: &Chart) -> String {
    let pts: Vec<(f64, f64)> = c
        .series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|(x, y)| x.is_finite() && y.is_finite() && (!c.log_y || *y > 0.0))
        .collect();
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<figure><svg viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" aria-label="{t}"><text x="{LEFT}" y="18" class="title">{t}</text>"#,
        t = esc(c.title)
    );
    if pts.is_empty() {
        out.push_str(r#"<text x="80" y="120">no data</text></svg></figure>"#);
        return out;
    }
    let fx = |x: f64| if c.x == XAxis::Nines { nines(x) } else { x };
    let (mut x0, mut x1) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), (x, _)| {
        (a.min(fx(*x)), b.max(fx(*x)))
    });
    if c.x == XAxis::Nines {
        x0 = 0.0;
        x1 = x1.max(2.0);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let ymax = pts.iter().map(|p| p.1).fold(0.0, f64::max);
    let ymin = pts.iter().map(|p| p.1).fold(f64::MAX, f64::min);
    let (y0, y1) = if c.log_y {
        (
            10f64.powf(ymin.log10().floor()),
            10f64.powf(ymax.log10().ceil().max(ymin.log10().floor() + 1.0)),
        )
    } else {
        let step = nice_step(ymax.max(1e-9) * 1.05);
        (0.0, (ymax * 1.05 / step).ceil().max(1.0) * step)
    };
    let pw = W - LEFT - RIGHT;
    let ph = H - TOP - BOTTOM;
    let sx = |x: f64| LEFT + (fx(x) - x0) / (x1 - x0) * pw;
    let sy = |y: f64| {
        let r = if c.log_y {
            (y.max(y0).log10() - y0.log10()) / (y1.log10() - y0.log10())
        } else {
            (y - y0) / (y1 - y0)
        };
        TOP + ph - r.clamp(0.0, 1.0) * ph
    };
    for (a, b, name) in &c.bands {
        let (xa, xb) = (sx(*a).max(LEFT), sx(*b).min(LEFT + pw));
        if xb > xa {
            let _ = write!(
                out,
                r#"<rect x="{xa:.1}" y="{TOP}" width="{:.1}" height="{ph}" class="band"><title>{}</title></rect>"#,
                xb - xa,
                esc(name)
            );
        }
    }
    // Y grid and labels.
    let yticks: Vec<f64> = if c.log_y {
        let mut v = Vec::new();
        let mut t = y0;
        while t <= y1 * 1.0001 {
            v.push(t);
            t *= 10.0;
        }
        v
    } else {
        let step = nice_step(y1 - y0);
        (0..=((y1 - y0) / step).round() as usize)
            .map(|i| y0 + i as f64 * step)
            .collect()
    };
    for t in yticks {
        let y = sy(t);
        let _ = write!(
            out,
            r#"<line x1="{LEFT}" x2="{:.1}" y1="{y:.1}" y2="{y:.1}" class="grid"/><text x="{:.1}" y="{:.1}" class="tick" text-anchor="end">{}</text>"#,
            LEFT + pw,
            LEFT - 6.0,
            y + 4.0,
            label(t)
        );
    }
    // X ticks.
    let xticks: Vec<(f64, String)> = match c.x {
        XAxis::Nines => [0.0, 50.0, 90.0, 99.0, 99.9, 99.99, 99.999]
            .iter()
            .filter(|p| nines(**p) <= x1 + 1e-9)
            .map(|p| {
                (
                    *p,
                    if *p >= 99.999 {
                        "max".into()
                    } else {
                        format!("{}", p)
                    },
                )
            })
            .collect(),
        XAxis::Seconds => {
            let step = nice_step(x1 - x0);
            let first = (x0 / step).ceil() * step;
            (0..)
                .map(|i| first + i as f64 * step)
                .take_while(|t| *t <= x1 + 1e-9)
                .map(|t| (t, label(t)))
                .collect()
        }
    };
    for (t, l) in xticks {
        let x = sx(t);
        let _ = write!(
            out,
            r#"<line x1="{x:.1}" x2="{x:.1}" y1="{TOP}" y2="{:.1}" class="grid"/><text x="{x:.1}" y="{:.1}" class="tick" text-anchor="middle">{}</text>"#,
            TOP + ph,
            TOP + ph + 16.0,
            esc(&l)
        );
    }
    let x_label = match c.x {
        XAxis::Seconds => "seconds since the start",
        XAxis::Nines => "percentile",
    };
    let _ = write!(
        out,
        r#"<text x="{:.1}" y="{:.1}" class="axis" text-anchor="middle">{x_label}</text><text x="14" y="{:.1}" class="axis" transform="rotate(-90 14 {:.1})" text-anchor="middle">{}</text>"#,
        LEFT + pw / 2.0,
        H - 6.0,
        TOP + ph / 2.0,
        TOP + ph / 2.0,
        esc(c.y_label)
    );
    for (i, s) in c.series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let path: Vec<String> = s
            .points
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite() && (!c.log_y || *y > 0.0))
            .map(|(x, y)| format!("{:.1},{:.1}", sx(*x), sy(*y)))
            .collect();
        if path.is_empty() {
            continue;
        }
        let dash = if s.dashed {
            r#" stroke-dasharray="5 3""#
        } else {
            ""
        };
        let _ = write!(
            out,
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="1.6"{dash}/>"#,
            path.join(" ")
        );
        let ly = TOP + 8.0 + i as f64 * 16.0;
        let _ = write!(
            out,
            r#"<line x1="{:.1}" x2="{:.1}" y1="{ly:.1}" y2="{ly:.1}" stroke="{color}" stroke-width="2"{dash}/><text x="{:.1}" y="{:.1}" class="legend">{}</text>"#,
            LEFT + pw + 10.0,
            LEFT + pw + 30.0,
            LEFT + pw + 35.0,
            ly + 4.0,
            esc(&s.name)
        );
    }
    out.push_str("</svg></figure>");
    out
}

/// A group of bars: its label and `(series, value)` per bar.
type BarGroup = (String, Vec<(String, Option<f64>)>);

/// Grouped bars: per group, one bar per series (log scale, ms).
fn bar_chart(title: &str, groups: &[BarGroup]) -> String {
    let values: Vec<f64> = groups
        .iter()
        .flat_map(|g| g.1.iter().filter_map(|v| v.1))
        .filter(|v| *v > 0.0)
        .collect();
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<figure><svg viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" aria-label="{t}"><text x="{LEFT}" y="18" class="title">{t}</text>"#,
        t = esc(title)
    );
    if values.is_empty() {
        out.push_str(r#"<text x="80" y="120">no data</text></svg></figure>"#);
        return out;
    }
    let ymin = values.iter().copied().fold(f64::MAX, f64::min);
    let ymax = values.iter().copied().fold(0.0, f64::max);
    let y0 = 10f64.powf(ymin.log10().floor());
    let y1 = 10f64.powf(ymax.log10().ceil().max(y0.log10() + 1.0));
    let pw = W - LEFT - RIGHT;
    let ph = H - TOP - BOTTOM;
    let sy = |y: f64| {
        TOP + ph
            - ((y.max(y0).log10() - y0.log10()) / (y1.log10() - y0.log10())).clamp(0.0, 1.0) * ph
    };
    let mut t = y0;
    while t <= y1 * 1.0001 {
        let y = sy(t);
        let _ = write!(
            out,
            r#"<line x1="{LEFT}" x2="{:.1}" y1="{y:.1}" y2="{y:.1}" class="grid"/><text x="{:.1}" y="{:.1}" class="tick" text-anchor="end">{}</text>"#,
            LEFT + pw,
            LEFT - 6.0,
            y + 4.0,
            label(t)
        );
        t *= 10.0;
    }
    let n_series = groups.first().map(|g| g.1.len()).unwrap_or(1).max(1);
    let gw = pw / groups.len().max(1) as f64;
    let bw = (gw * 0.8 / n_series as f64).min(28.0);
    for (gi, (name, bars)) in groups.iter().enumerate() {
        let gx = LEFT + gi as f64 * gw + (gw - bw * n_series as f64) / 2.0;
        for (bi, (series, v)) in bars.iter().enumerate() {
            let Some(v) = v else { continue };
            let y = sy(*v);
            let _ = write!(
                out,
                r#"<rect x="{:.1}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{}: {} ms</title></rect>"#,
                gx + bi as f64 * bw,
                bw - 2.0,
                (TOP + ph - y).max(0.5),
                COLORS[bi % COLORS.len()],
                esc(series),
                label(*v)
            );
        }
        let _ = write!(
            out,
            r#"<text x="{:.1}" y="{:.1}" class="tick" text-anchor="middle">{}</text>"#,
            LEFT + gi as f64 * gw + gw / 2.0,
            TOP + ph + 16.0,
            esc(name)
        );
    }
    if let Some((_, first)) = groups.first() {
        for (i, (series, _)) in first.iter().enumerate() {
            let ly = TOP + 8.0 + i as f64 * 16.0;
            let _ = write!(
                out,
                r#"<rect x="{:.1}" y="{:.1}" width="14" height="10" fill="{}"/><text x="{:.1}" y="{:.1}" class="legend">{}</text>"#,
                LEFT + pw + 10.0,
                ly - 5.0,
                COLORS[i % COLORS.len()],
                LEFT + pw + 30.0,
                ly + 4.0,
                esc(series)
            );
        }
    }
    let _ = write!(
        out,
        r#"<text x="14" y="{:.1}" class="axis" transform="rotate(-90 14 {:.1})" text-anchor="middle">ms (log scale)</text></svg></figure>"#,
        TOP + ph / 2.0,
        TOP + ph / 2.0
    );
    out
}

fn f(v: Option<f64>) -> String {
    match v {
        Some(v) if v >= 100.0 => format!("{v:.0}"),
        Some(v) if v >= 10.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.2}"),
        None => "–".into(),
    }
}

fn summary_cells(s: &Summary) -> String {
    format!(
        "<td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>",
        s.count,
        f(s.p50_ms),
        f(s.p95_ms),
        f(s.p99_ms),
        f(s.p999_ms),
        f(s.max_ms)
    )
}

fn cpu_cell(c: &super::report::Cpu) -> String {
    format!(
        "{} ({} + {} + {})",
        f(c.machine_ms_per_event),
        f(c.service_ms_per_event),
        f(c.postgres_ms_per_event),
        f(c.tool_ms_per_event)
    )
}

fn db_cell(d: Option<&super::dbstats::PerEvent>) -> String {
    match d {
        Some(d) => format!(
            "{:.2} · {:.2} · {:.1} · {:.1}",
            d.commits,
            d.wal_syncs,
            d.wal_bytes / 1024.0,
            d.rows_inserted + d.rows_updated + d.rows_deleted
        ),
        None => "–".into(),
    }
}

fn series(secs: &[Second], name: &str, dashed: bool, v: impl Fn(&Second) -> Option<f64>) -> Series {
    Series {
        name: name.into(),
        points: secs
            .iter()
            .filter_map(|s| v(s).map(|y| (s.t as f64 + 0.5, y)))
            .collect(),
        dashed,
    }
}

fn floor_bands(phases: &[Phase]) -> Vec<(f64, f64, &'static str)> {
    phases
        .iter()
        .filter(|p| p.kind == PhaseKind::Floor)
        .map(|p| (p.start_s, p.end_s, "floor phase (PostgreSQL alone)"))
        .collect()
}

const STYLE: &str = "body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1100px;color:#222}\
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd}\
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 7px;text-align:right}\
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}\
.met{color:#17803d;font-weight:600}.missed{color:#c62828;font-weight:600}.nm{color:#777}\
figure{margin:12px 0}svg{background:#fff;border:1px solid #eee}\
.title{font-weight:600;font-size:13px}.tick{font-size:11px;fill:#555}.axis{font-size:12px;fill:#333}\
.legend{font-size:11px}.grid{stroke:#eee}.band{fill:#f3efe0}code{background:#f4f4f4;padding:1px 4px}";

/// The page.
pub fn render(r: &Report) -> String {
    let mut h = String::new();
    let s = &r.summary;
    let _ = write!(
        h,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>FreshPlan load test: {}</title><style>{STYLE}</style></head><body>",
        esc(&r.setup.shape)
    );
    let _ = write!(
        h,
        "<h1>FreshPlan load test — {}</h1><p><code>{}</code><br>{} → {} · code {} · {} build of the tool</p>",
        esc(&r.setup.shape),
        esc(&r.tool.command_line),
        esc(&r.tool.started_at),
        esc(&r.tool.finished_at),
        esc(r.tool.code.as_deref().unwrap_or("unknown")),
        if r.tool.release_build { "release" } else { "debug" }
    );

    h.push_str("<h2>Goals (issue 12)</h2><table><tr><th>figure</th><th>goal</th><th>measured</th><th>verdict</th></tr>");
    for g in &r.goals {
        let class = match g.verdict.as_str() {
            "met" => "met",
            "missed" => "missed",
            _ => "nm",
        };
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"{class}\">{}</td></tr>",
            esc(&g.figure),
            esc(&g.goal),
            esc(&g.measured),
            esc(&g.verdict)
        );
    }
    h.push_str("</table>");

    let _ = write!(
        h,
        "<h2>Summary</h2><p>{} s of service load: {} commands sent, {} succeeded, {} failed; {:.0}/s achieved. \
         <b>Lost {}</b>, <b>duplicated {}</b> of {} expected deliveries ({} events committed); {} resyncs.</p>",
        s.service_seconds, s.sent, s.ok, s.failed, s.achieved_rate, s.lost, s.duplicates,
        s.expected_deliveries, s.committed_events, s.resyncs
    );
    h.push_str("<table><tr><th>path</th><th>count</th><th>p50 ms</th><th>p95 ms</th><th>p99 ms</th><th>p99.9 ms</th><th>max ms</th><th>p95 ÷ floor</th></tr>");
    let ratio = |v: Option<f64>| match v {
        Some(v) => format!("{v:.2}×"),
        None => "".into(),
    };
    let vs = s.vs_floor.as_ref();
    let mut rows: Vec<(String, &Summary, String)> = vec![(
        "end to end: API call → SSE frame (client)".into(),
        &s.end_to_end,
        ratio(vs.and_then(|v| v.end_to_end_p95)),
    )];
    for (k, v) in &s.api {
        let r = if k == "all" {
            ratio(vs.and_then(|v| v.api_p95))
        } else {
            String::new()
        };
        rows.push((format!("API {k} (client)"), v, r));
    }
    rows.push((
        "service: publish → notify (buckets)".into(),
        &s.service_publish_notify,
        String::new(),
    ));
    rows.push((
        "service: notify → processed (buckets)".into(),
        &s.service_notify_process,
        String::new(),
    ));
    rows.push((
        "service: outbox write → SSE hub (buckets)".into(),
        &s.service_end_to_end,
        String::new(),
    ));
    if let Some(relay) = &s.relay {
        rows.push((
            "relay: end to end: API call → JetStream message (client)".into(),
            &relay.end_to_end,
            String::new(),
        ));
        rows.push((
            "relay: outbox created_at → stored in JetStream".into(),
            &relay.commit_to_stream,
            String::new(),
        ));
        rows.push((
            "relay: publish → ack (relay buckets)".into(),
            &relay.publish_ack,
            String::new(),
        ));
    }
    rows.push(("widget (client)".into(), &s.widget_client, String::new()));
    rows.push((
        "widget hit (service buckets)".into(),
        &s.widget_hit,
        String::new(),
    ));
    rows.push((
        "widget miss (service buckets)".into(),
        &s.widget_miss,
        String::new(),
    ));
    rows.push((
        "floor: write → COMMIT".into(),
        &s.floor_commit,
        String::new(),
    ));
    rows.push((
        "floor: write → notification".into(),
        &s.floor_end_to_end,
        String::new(),
    ));
    rows.push((
        "floor: COMMIT → notification".into(),
        &s.floor_commit_to_notify,
        String::new(),
    ));
    for (name, sm, r) in rows {
        let _ = write!(
            h,
            "<tr><td>{}</td>{}<td>{}</td></tr>",
            esc(&name),
            summary_cells(sm),
            r
        );
    }
    h.push_str("</table>");
    if let Some(relay) = &s.relay {
        let _ = write!(
            h,
            "<h3>Relay into NATS JetStream (beside the SSE path)</h3><p>{} of {} committed events in the stream \
             ({:.0}/s over the service phases): <b>lost {}</b>, <b>duplicated {}</b>; the last event of a phase \
             arrived at most {} s after its sending window ended.</p><table><tr><th>phase</th><th>rate</th>\
             <th>in stream / committed</th><th>achieved /s</th><th>lost</th><th>dup</th><th>caught up after s</th>\
             <th>commit → stream p50 / p95 / p99 ms</th><th>end to end p50 / p95 / p99 ms</th></tr>",
            relay.in_stream,
            relay.committed_events,
            relay.achieved_rate,
            relay.lost,
            relay.duplicates,
            f(relay.caught_up_after_s)
        );
        for p in &r.phases {
            let Some(rp) = p.service.as_ref().and_then(|s| s.relay.as_ref()) else {
                continue;
            };
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{:.0}</td><td>{} / {}</td><td>{:.0}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                p.index,
                p.rate,
                rp.in_stream,
                rp.committed_events,
                rp.achieved_rate,
                rp.lost,
                rp.duplicates,
                f(rp.caught_up_after_s),
                esc(&super::report::triple(&rp.commit_to_stream)),
                esc(&super::report::triple(&rp.end_to_end))
            );
        }
        h.push_str("</table>");
    }
    let c = &s.cpu;
    let _ = write!(
        h,
        "<p>CPU per event over the service phases: machine {} ms (service {}, PostgreSQL {}, this tool {}); \
         service RSS peak {:.1} MiB (VmHWM {:.1} MiB).</p>",
        f(c.machine_ms_per_event),
        f(c.service_ms_per_event),
        f(c.postgres_ms_per_event),
        f(c.tool_ms_per_event),
        s.service_rss_peak_mib,
        s.service_rss_hwm_mib
    );

    let secs = &r.timeline;
    let bands = floor_bands(&r.phases);
    h.push_str("<h2>Latency over time</h2>");
    h.push_str(&line_chart(&Chart {
        title: "Per second (by intended start): end to end and API p50/p99; floor write → notification p99",
        y_label: "ms (log scale)",
        log_y: true,
        x: XAxis::Seconds,
        series: vec![
            series(secs, "end to end p50", false, |s| s.e2e_p50_ms),
            series(secs, "end to end p99", false, |s| s.e2e_p99_ms),
            series(secs, "API p50", true, |s| s.api_p50_ms),
            series(secs, "API p99", true, |s| s.api_p99_ms),
            series(secs, "floor p50", false, |s| s.floor_e2e_p50_ms),
            series(secs, "floor p99", false, |s| s.floor_e2e_p99_ms),
        ],
        bands: bands.clone(),
    }));
    h.push_str("<h2>Percentile curves per path</h2>");
    h.push_str(&line_chart(&Chart {
        title: "Whole run: latency by percentile (service paths from the service's buckets)",
        y_label: "ms (log scale)",
        log_y: true,
        x: XAxis::Nines,
        series: s
            .curves
            .iter()
            .map(|(name, pts)| Series {
                name: name.clone(),
                points: pts.clone(),
                dashed: name.starts_with("floor") || name.starts_with("service"),
            })
            .collect(),
        bands: Vec::new(),
    }));
    h.push_str("<h2>Throughput</h2>");
    h.push_str(&line_chart(&Chart {
        title: "Per second: commands sent and answered, events processed, frames delivered, floor writes",
        y_label: "per second",
        log_y: false,
        x: XAxis::Seconds,
        series: vec![
            series(secs, "sent", false, |s| Some(s.sent as f64)),
            series(secs, "answered ok", true, |s| Some(s.ok as f64)),
            series(secs, "processed", false, |s| s.processed),
            series(secs, "frames delivered", false, |s| Some(s.delivered as f64)),
            series(secs, "floor writes", false, |s| Some(s.floor_sent as f64)),
        ],
        bands: bands.clone(),
    }));

    h.push_str("<h2>The floor beside the service</h2>");
    let groups: Vec<BarGroup> = r
        .phases
        .iter()
        .filter_map(|p| {
            let sp = p.service.as_ref()?;
            let v = sp.vs_floor.as_ref();
            Some((
                format!("#{} {:.0}/s", p.index, p.rate),
                vec![
                    ("service end to end p95".into(), sp.end_to_end.p95_ms),
                    (
                        "floor write → notification p95".into(),
                        v.and_then(|v| v.floor_end_to_end.p95_ms),
                    ),
                    (
                        "service API p95".into(),
                        sp.api.get("all").and_then(|a| a.p95_ms),
                    ),
                    (
                        "floor commit p95".into(),
                        v.and_then(|v| v.floor_commit.p95_ms),
                    ),
                ],
            ))
        })
        .collect();
    h.push_str(&bar_chart(
        "Each service phase next to the floor phases right before and after it",
        &groups,
    ));

    h.push_str("<h2>CPU and memory</h2>");
    h.push_str(&line_chart(&Chart {
        title: "Cores busy: the service, the whole machine; service RSS (MiB ÷ 100)",
        y_label: "cores",
        log_y: false,
        x: XAxis::Seconds,
        series: vec![
            series(secs, "service", false, |s| s.service_cores),
            series(secs, "machine", false, |s| {
                s.machine_busy.map(|b| b * r.machine.cores as f64)
            }),
            series(secs, "service RSS / 100 MiB", true, |s| {
                s.service_rss_mib.map(|m| m / 100.0)
            }),
        ],
        bands,
    }));

    h.push_str("<h2>Phases</h2><table><tr><th>#</th><th>kind</th><th>rate</th><th>s</th><th>sent</th><th>ok / committed</th><th>lost</th><th>dup</th>\
        <th>API p50/p95/p99</th><th>end to end p50/p95/p99</th><th>e2e p95 ÷ floor</th><th>pub→notify p95</th><th>notify→proc p95</th><th>widget hit/miss p95</th><th>CPU ms per event: machine (service + PostgreSQL + tool)</th><th>PostgreSQL per event: commits · WAL flushes · WAL KiB · rows written</th></tr>");
    for p in &r.phases {
        let dur = p.end_s - p.start_s;
        if let Some(sp) = &p.service {
            let api = sp.api.get("all").cloned().unwrap_or_default();
            let _ = write!(
                h,
                "<tr><td>{}</td><td>service</td><td>{:.0}</td><td>{:.0}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{} / {} / {}</td><td>{} / {} / {}</td><td>{}</td><td>{}</td><td>{}</td><td>{} / {}</td><td>{}</td><td>{}</td></tr>",
                p.index, p.rate, dur, sp.sent, sp.ok, sp.lost, sp.duplicates,
                f(api.p50_ms), f(api.p95_ms), f(api.p99_ms),
                f(sp.end_to_end.p50_ms), f(sp.end_to_end.p95_ms), f(sp.end_to_end.p99_ms),
                ratio(sp.vs_floor.as_ref().and_then(|v| v.end_to_end_p95)),
                f(sp.service_publish_notify.p95_ms), f(sp.service_notify_process.p95_ms),
                f(sp.widget_hit.p95_ms), f(sp.widget_miss.p95_ms),
                cpu_cell(&sp.cpu),
                db_cell(sp.database.as_ref())
            );
        }
        if let Some(fp) = &p.floor {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>floor</td><td>{:.0}</td><td>{:.0}</td><td>{}</td><td>{}</td><td></td><td></td><td>{} / {} / {} (commit)</td><td>{} / {} / {}</td><td></td><td></td><td></td><td></td><td>{}</td><td>{}</td></tr>",
                p.index, p.rate, dur, fp.sent, fp.committed,
                f(fp.commit.p50_ms), f(fp.commit.p95_ms), f(fp.commit.p99_ms),
                f(fp.end_to_end.p50_ms), f(fp.end_to_end.p95_ms), f(fp.end_to_end.p99_ms),
                cpu_cell(&fp.cpu),
                db_cell(fp.database.as_ref())
            );
        }
    }
    h.push_str("</table>");
    let failures: Vec<(usize, &(String, u64))> = r
        .phases
        .iter()
        .filter_map(|p| p.service.as_ref().map(|s| (p.index, s)))
        .flat_map(|(i, s)| s.failures.iter().map(move |f| (i, f)))
        .collect();
    if !failures.is_empty() {
        h.push_str(
            "<h3>Failed commands</h3><table><tr><th>phase</th><th>what</th><th>count</th></tr>",
        );
        for (i, (what, n)) in failures {
            let _ = write!(h, "<tr><td>{i}</td><td>{}</td><td>{n}</td></tr>", esc(what));
        }
        h.push_str("</table>");
    }
    let lost: Vec<&String> = r
        .phases
        .iter()
        .filter_map(|p| p.service.as_ref())
        .flat_map(|s| s.lost_examples.iter())
        .collect();
    if !lost.is_empty() {
        h.push_str("<h3>Lost (first ones)</h3><ul>");
        for l in lost.iter().take(20) {
            let _ = write!(h, "<li>{}</li>", esc(l));
        }
        h.push_str("</ul>");
    }
    if let Some(fm) = &r.find_max {
        let _ = write!(
            h,
            "<h2>Find max</h2><p>Criteria: {}. Highest rate held: <b>{}</b>.</p><table><tr><th>rate</th><th>held</th><th>achieved</th><th>e2e p99 ms</th><th>lost</th><th>why not</th></tr>",
            esc(&fm.criteria),
            fm.highest_held.map(|v| format!("{v:.0} events/s")).unwrap_or_else(|| "none".into())
        );
        for s in &fm.steps {
            let _ = write!(
                h,
                "<tr><td>{:.0}</td><td>{}</td><td>{:.0}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                s.rate,
                if s.held { "yes" } else { "no" },
                s.achieved_rate,
                f(s.end_to_end_p99_ms),
                s.lost,
                esc(&s.reasons.join("; "))
            );
        }
        h.push_str("</table>");
    }

    let m = &r.machine;
    let _ = write!(
        h,
        "<h2>Machine and setup</h2><table><tr><td>cores</td><td>{}</td></tr><tr><td>CPU</td><td>{}</td></tr>\
         <tr><td>memory</td><td>{} GiB</td></tr><tr><td>kernel</td><td>{}</td></tr><tr><td>PostgreSQL</td><td>{}</td></tr>\
         <tr><td>PostgreSQL settings</td><td>{}</td></tr><tr><td>load average before / after</td><td>{} / {}</td></tr>\
         <tr><td>instances</td><td>{}</td></tr><tr><td>service pids</td><td>{:?}</td></tr>\
         <tr><td>users / subscribers / widget readers</td><td>{} sales users in DE/AT/CH, {} subscribers (admin, managers, owners), {} widget readers at {}/s each</td></tr>\
         <tr><td>command mix</td><td>status {:.0} %, activity {:.0} %, create {:.0} %</td></tr>\
         <tr><td>leads of the load</td><td>{} at the start, {} at the end</td></tr>\
         <tr><td>phases</td><td>service segments of {} s; floor phases of {} s</td></tr></table>",
        m.cores,
        esc(&m.cpu_model),
        m.memory_gib,
        esc(&m.kernel),
        esc(&m.postgres_version),
        esc(&m.postgres_settings.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(", ")),
        esc(&m.load_before),
        esc(&m.load_after),
        esc(&r.setup.urls.join(", ")),
        r.setup.service_pids,
        r.setup.users,
        r.setup.subscribers,
        r.setup.widget_readers,
        r.setup.widget_rate_per_reader,
        r.setup.mix.status * 100.0,
        r.setup.mix.activity * 100.0,
        r.setup.mix.create * 100.0,
        r.setup.leads_at_start,
        r.setup.leads_at_end,
        r.setup.segment_seconds,
        r.setup.floor_seconds
    );
    h.push_str("<h2>Subscribers</h2><table><tr><th>user</th><th>role</th><th>territory</th><th>instance</th><th>frames</th><th>events</th><th>resyncs</th><th>reconnects</th><th>errors</th></tr>");
    for sub in &r.subscribers {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&sub.user),
            esc(&sub.role),
            esc(&sub.territory),
            esc(&sub.url),
            sub.frames,
            sub.distinct_events,
            sub.resyncs,
            sub.reconnects,
            esc(&sub.errors.iter().map(|(e, n)| format!("{e} ×{n}")).collect::<Vec<_>>().join("; "))
        );
    }
    h.push_str("</table><h2>How to read this</h2><p>Latency counts from each command's <i>intended</i> start \
        (open-loop arrivals at a fixed rate), so a stalled service shows as latency, not as a lower rate. \
        End to end is measured per subscriber in the event's audience (the service's <code>in_audience</code> rule). \
        Lost = a committed event (read back from the outbox) that a subscriber in its audience never received; \
        duplicated = a second frame of an event at one subscriber. Service paths come from the service's own \
        histograms (bucket deltas, interpolated inside a bucket). The floor is PostgreSQL alone: BEGIN, an UPDATE, \
        an INSERT of an event-sized row, <code>pg_notify</code>, COMMIT, at the same rate, with a LISTEN connection \
        timing the notification; shaded in the time charts.</p></body></html>");
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_escape_their_text_and_survive_empty_data() {
        let c = Chart {
            title: "a <b> & c",
            y_label: "ms",
            log_y: true,
            x: XAxis::Seconds,
            series: vec![Series {
                name: "x\"y".into(),
                points: vec![(0.0, 1.0), (1.0, 10.0), (2.0, 0.0)],
                dashed: false,
            }],
            bands: vec![(0.5, 1.5, "floor")],
        };
        let svg = line_chart(&c);
        assert!(svg.contains("a &lt;b&gt; &amp; c") && svg.contains("x&quot;y"));
        assert!(svg.contains("<polyline"));
        let empty = line_chart(&Chart {
            series: Vec::new(),
            ..c
        });
        assert!(empty.contains("no data"));
        assert!(bar_chart("t", &[]).contains("no data"));
    }

    #[test]
    fn percentiles_are_spread_by_their_nines() {
        assert!((nines(90.0) - 1.0).abs() < 1e-9);
        assert!((nines(99.0) - 2.0).abs() < 1e-9);
        assert!((nines(100.0) - 5.0).abs() < 1e-9);
        assert_eq!(label(0.5), "0.5");
        assert_eq!(label(10.0), "10");
    }
}
