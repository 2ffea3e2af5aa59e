#!/usr/bin/env bash
# Checks the operators' files of FreshPlan Leads: the Grafana dashboard's PromQL, the alert rules
# and their unit tests (including that the tests would notice a broken alert), the Prometheus and
# Alertmanager configurations. Installs nothing: needs promtool (Debian package `prometheus`),
# amtool (`prometheus-alertmanager`) and python3 (standard library only).
#
#   ops/check.sh            from anywhere; exits non-zero if any check fails
#
# See ops/README.md.
set -uo pipefail

OPS="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DASHBOARD="$OPS/grafana/freshplan-leads.json"
ALERTS="$OPS/prometheus/alerts.yml"
ALERT_TESTS="$OPS/prometheus/alerts.test.yml"
PROM_CONFIG="$OPS/prometheus/prometheus.yml"
AM_CONFIG="$OPS/alertmanager/alertmanager.yml"
RUNBOOK="$OPS/../docs/runbook.md"

missing=()
for tool in promtool amtool python3; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if ((${#missing[@]})); then
    echo "ops/check.sh: missing: ${missing[*]}" >&2
    echo "  promtool comes with the Debian package 'prometheus', amtool with 'prometheus-alertmanager'" >&2
    echo "  (apt-get install -y prometheus prometheus-alertmanager); this script installs nothing." >&2
    exit 2
fi

TMP="$(mktemp -d "${TMPDIR:-/tmp}/freshplan-ops-check.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT
started=$SECONDS
failures=0
checks=0

# run DESCRIPTION COMMAND...: runs one check, shows its output only when it fails.
run() {
    local what="$1"
    shift
    checks=$((checks + 1))
    if "$@" >"$TMP/out" 2>&1; then
        printf 'ok    %s\n' "$what"
        [[ -n "${VERBOSE:-}" ]] && sed 's/^/      /' "$TMP/out"
    else
        failures=$((failures + 1))
        printf 'FAIL  %s\n' "$what"
        sed 's/^/      /' "$TMP/out"
    fi
    return 0
}

echo "promtool: $(promtool --version 2>&1 | head -n1)"
echo "amtool:   $(amtool --version 2>&1 | head -n1)"
echo

# ---------------------------------------------------------------------------------------------
# Metric names the ops files may use: CONTRACT.md "Metrics" plus the service's own ones.
cat >"$TMP/catalogue.txt" <<'EOF'
freshplan_events_published_total
freshplan_events_consumed_total
freshplan_event_latency_ms
freshplan_dashboard_cache_invalidations_total
freshplan_dashboard_active_widgets
freshplan_dashboard_updates_total
freshplan_dedupe_cache_entries
freshplan_dedupe_cache_hit_rate
freshplan_outbox_lag_seconds
freshplan_followup_queue_size
freshplan_followup_batch_duration_ms
freshplan_followup_automated_total
leads_followup_sent_total
freshplan_widget_query_ms
freshplan_notify_queue_usage
freshplan_listener_connected
freshplan_http_requests_total
freshplan_http_request_duration_ms
freshplan_relay_state
freshplan_relay_lag_seconds
freshplan_relay_lag_events
freshplan_relay_published_total
freshplan_relay_publish_latency_seconds
freshplan_relay_retries_total
EOF

# ---------------------------------------------------------------------------------------------
# Dashboard: structure, metric names, and every PromQL expression into a rules file for promtool.
cat >"$TMP/dashboard.py" <<'EOF'
import json, re, sys

dashboard_path, catalogue_path, out_path = sys.argv[1:4]
catalogue = set(open(catalogue_path).read().split())
errors = []

try:
    dash = json.load(open(dashboard_path, encoding="utf-8"))
except (OSError, ValueError) as e:
    sys.exit(f"{dashboard_path}: not valid JSON: {e}")

# Grafana's built-in variables get a plausible value, every other $var / ${var} / ${var:fmt} /
# [[var]] becomes the regex ".*" (they are used in =~ matchers). ${1} (label_replace) stays.
BUILTIN = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h", "__auto": "1m",
           "__interval_ms": "60000", "__range_s": "3600", "__range_ms": "3600000"}
VAR = re.compile(r"\$\{([A-Za-z_]\w*)(?::[^}]*)?\}|\[\[([A-Za-z_]\w*)(?::[^\]]*)?\]\]|\$([A-Za-z_]\w*)")
def substitute(expr):
    return VAR.sub(lambda m: BUILTIN.get(next(g for g in m.groups() if g), ".*"), expr)

METRIC = re.compile(r"\b((?:freshplan|leads)_[a-z0-9_]+)\b")
def metric_names(expr):
    return {re.sub(r"_(bucket|count|sum)$", "", n) if re.sub(r"_(bucket|count|sum)$", "", n) in catalogue else n
            for n in METRIC.findall(expr)}

templating = dash.get("templating", {}).get("list", [])
ds_vars = [v for v in templating if v.get("name") == "DS_PROMETHEUS"]
if not (ds_vars and ds_vars[0].get("type") == "datasource" and ds_vars[0].get("query") == "prometheus"):
    errors.append('templating: no variable DS_PROMETHEUS of type "datasource" with query "prometheus"')
if "__inputs" in dash:
    errors.append("__inputs present: the data source is chosen through the DS_PROMETHEUS variable")
if dash.get("id") is not None:
    errors.append('"id" must be null in an importable dashboard')
if not dash.get("uid"):
    errors.append('no "uid"')

def ds_ok(ds, where):
    if not (isinstance(ds, dict) and ds.get("uid") == "${DS_PROMETHEUS}"):
        errors.append(f'{where}: datasource is {ds!r}, not {{"uid": "${{DS_PROMETHEUS}}"}}')

exprs = []   # (record name, labels, expr)
for v in templating:
    if v.get("type") != "query":
        continue
    ds_ok(v.get("datasource"), f"variable {v.get('name')}")
    q = v.get("query")
    q = q.get("query", "") if isinstance(q, dict) else (q or "")
    m = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", q)
    if m:
        exprs.append((f"grafana:variable_{v['name']}", {}, m.group(1), q))
    elif not re.fullmatch(r"\s*label_values\(\s*\w+\s*\)\s*", q):
        exprs.append((f"grafana:variable_{v['name']}", {}, q, q))

def walk(panels):
    for p in panels:
        yield p
        yield from walk(p.get("panels", []))

ids, panel_count = set(), 0
for p in walk(dash.get("panels", [])):
    where = f"panel {p.get('id')} {p.get('title')!r}"
    if p.get("id") in ids:
        errors.append(f"{where}: duplicate id")
    ids.add(p.get("id"))
    if "gridPos" not in p:
        errors.append(f"{where}: no gridPos")
    if p.get("type") == "row":
        continue
    panel_count += 1
    ds_ok(p.get("datasource"), where)
    targets = p.get("targets", [])
    if not targets:
        errors.append(f"{where}: no targets")
    for t in targets:
        ds_ok(t.get("datasource"), f"{where} target {t.get('refId')}")
        expr = t.get("expr", "")
        if not expr.strip():
            errors.append(f"{where} target {t.get('refId')}: empty expr")
            continue
        exprs.append((f"grafana:panel_{p['id']}:{t.get('refId', 'X')}", {}, expr, expr))

used = set()
for _, _, expr, _ in exprs:
    used |= metric_names(expr)
unknown = sorted(used - catalogue)
if unknown:
    errors.append("metric names not in the catalogue (typo?): " + ", ".join(unknown))

with open(out_path, "w") as f:
    f.write("# generated by ops/check.sh from ops/grafana/freshplan-leads.json\n")
    f.write("groups:\n  - name: grafana-dashboard-expressions\n    rules:\n")
    for record, _, expr, _ in exprs:
        f.write(f"      - record: {json.dumps(record)}\n        expr: {json.dumps(substitute(expr))}\n")

for e in errors:
    print("error:", e)
print(f"{panel_count} panels, {len(exprs)} expressions (panel targets and variable queries), "
      f"{len(used)} metric names: {', '.join(sorted(used))}")
sys.exit(1 if errors else 0)
EOF

check_dashboard() {
    python3 "$TMP/dashboard.py" "$DASHBOARD" "$TMP/catalogue.txt" "$TMP/dashboard-rules.yml" &&
        promtool check rules "$TMP/dashboard-rules.yml"
}
run "dashboard: JSON, DS_PROMETHEUS data source everywhere, metric names known; every expr parses (promtool check rules)" check_dashboard
[[ -n "${VERBOSE:-}" && -f "$TMP/dashboard-rules.yml" ]] && sed 's/^/      /' "$TMP/dashboard-rules.yml"

# ---------------------------------------------------------------------------------------------
# Alert rules: metric names, syntax, required labels and annotations.
cat >"$TMP/alerts_meta.py" <<'EOF'
import re, sys
alerts_path, catalogue_path = sys.argv[1:3]
catalogue = set(open(catalogue_path).read().split())
text = open(alerts_path, encoding="utf-8").read()
errors = []
used = set()
for n in re.findall(r"\b((?:freshplan|leads)_[a-z0-9_]+)\b", text):
    base = re.sub(r"_(bucket|count|sum)$", "", n)
    used.add(base if base in catalogue else n)
unknown = sorted(used - catalogue)
if unknown:
    errors.append("metric names not in the catalogue (typo?): " + ", ".join(unknown))
blocks = re.split(r"(?m)^\s*- alert:\s*", text)[1:]
for b in blocks:
    name = b.split()[0]
    if not re.search(r"(?m)^\s+severity:\s*[\"']?(critical|warning)[\"']?\s*$", b):
        errors.append(f"{name}: labels.severity must be critical or warning")
    for a in ("summary", "description"):
        if not re.search(rf"(?m)^\s+{a}:\s*\S", b):
            errors.append(f"{name}: annotation {a} missing")
for e in errors:
    print("error:", e)
print(f"{len(blocks)} alerts; metric names: {', '.join(sorted(used))}")
sys.exit(1 if errors else 0)
EOF
check_alerts() {
    python3 "$TMP/alerts_meta.py" "$ALERTS" "$TMP/catalogue.txt" && promtool check rules "$ALERTS"
}
run "alerts: promtool check rules ops/prometheus/alerts.yml; severity, summary, description on each; metric names known" check_alerts

run "alert unit tests: promtool test rules ops/prometheus/alerts.test.yml" \
    bash -c 'cd "$(dirname "$1")" && promtool test rules "$(basename "$1")"' _ "$ALERT_TESTS"

# ---------------------------------------------------------------------------------------------
# The tests must notice a broken alert. For every alert, three mutants of alerts.yml are run
# against the unchanged tests, and each must make them fail:
#   never   the alert renamed (never fires under its name)  -> some test expects it to fire
#   always  every numeric comparison in its expr made '>= -Inf' (fires for any series present)
#                                                            -> some test expects it silent
#   no-for  its 'for:' removed (when it has one)             -> some test expects it still pending
cat >"$TMP/mutants.py" <<'EOF'
import concurrent.futures, os, re, shutil, subprocess, sys
alerts_path, tests_path, work = sys.argv[1:4]
text = open(alerts_path, encoding="utf-8").read()
starts = [m.start() for m in re.finditer(r"(?m)^\s*- alert:\s*\S+", text)]
if not starts:
    sys.exit("no alerts found")
COMPARISON = re.compile(r"(==|!=|>=|<=|>|<)\s*-?[0-9][0-9.]*(?:e[+-]?[0-9]+)?(?:\s*[*/]\s*[0-9][0-9.]*)?")
survivors, runs, jobs = [], 0, []
for k, i in enumerate(starts):
    j = starts[k + 1] if k + 1 < len(starts) else len(text)
    block = text[i:j]
    name = re.search(r"- alert:\s*(\S+)", block).group(1)
    head = re.split(r"(?m)^\s+(?:for|keep_firing_for|labels|annotations):", block)[0]   # name + expr
    mutants = {"never": block.replace(f"alert: {name}", f"alert: {name}Mutant", 1)}
    relaxed = COMPARISON.sub(">= -Inf", head)
    if relaxed != head:
        mutants["always"] = relaxed + block[len(head):]
    else:
        survivors.append(f"{name}: no numeric comparison to relax in its expr")
    if re.search(r"(?m)^\s+for:", block):
        mutants["no-for"] = re.sub(r"(?m)^\s+for:.*\n", "", block)
    for kind, mutated in mutants.items():
        d = os.path.join(work, f"{name}-{kind}")
        os.makedirs(d)
        with open(os.path.join(d, os.path.basename(alerts_path)), "w") as f:
            f.write(text[:i] + mutated + text[j:])
        shutil.copy(tests_path, d)
        jobs.append((name, kind, d))

def test(job):
    name, kind, d = job
    r = subprocess.run(["promtool", "test", "rules", os.path.basename(tests_path)],
                       cwd=d, capture_output=True, text=True)
    return name, kind, r.returncode != 0 and "FAILED" in (r.stdout + r.stderr)

with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
    for name, kind, caught in pool.map(test, jobs):
        runs += 1
        print(f"{'caught  ' if caught else 'SURVIVED'} {name} [{kind}]")
        if not caught:
            survivors.append(f"{name} [{kind}]: tests still pass with the alert broken")
for s in survivors:
    print("error:", s)
print(f"{len(starts)} alerts, {runs} mutants")
sys.exit(1 if survivors else 0)
EOF
run "alert unit tests catch broken alerts (never fires / always fires / no 'for' mutants of every alert)" \
    python3 "$TMP/mutants.py" "$ALERTS" "$ALERT_TESTS" "$TMP"

# ---------------------------------------------------------------------------------------------
run "prometheus: promtool check config ops/prometheus/prometheus.yml" promtool check config "$PROM_CONFIG"
run "alertmanager: amtool check-config ops/alertmanager/alertmanager.yml" amtool check-config "$AM_CONFIG"

# Routing: critical pages through PagerDuty, warnings and anything without a known severity go
# to Slack #freshplan-alerts.
check_routes() {
    local case labels want got
    for case in "severity=critical:pagerduty-critical" "severity=warning:slack-freshplan-alerts" \
        "severity=none:slack-freshplan-alerts"; do
        labels="${case%%:*}" want="${case#*:}"
        got="$(amtool config routes test --config.file="$AM_CONFIG" "$labels" alertname=Test 2>"$TMP/amtool.err")" ||
            { cat "$TMP/amtool.err"; return 1; }
        echo "$labels -> $got"
        [[ "$got" == "$want" ]] || { echo "expected $want"; return 1; }
    done
}
run "alertmanager: routing (amtool config routes test): critical -> pagerduty-critical, rest -> slack-freshplan-alerts" check_routes

# The receivers are what their names say (amtool only checks that the configuration is valid).
cat >"$TMP/receivers.py" <<'EOF'
import re, sys
text = open(sys.argv[1], encoding="utf-8").read()
section = text.split("\nreceivers:", 1)[1].split("\ninhibit_rules:", 1)[0]
blocks = {b.split()[0]: b for b in re.split(r"(?m)^  - name:\s*", section)[1:]}
errors = []
pd = blocks.get("pagerduty-critical", "")
if not (re.search(r"(?m)^\s+pagerduty_configs:", pd) and re.search(r"(?m)^\s+- routing_key(_file)?:\s*\S", pd)):
    errors.append("pagerduty-critical: no pagerduty_configs with routing_key_file (or routing_key)")
sl = blocks.get("slack-freshplan-alerts", "")
if not (re.search(r"(?m)^\s+slack_configs:", sl) and re.search(r"(?m)^\s+channel:\s*[\"']#freshplan-alerts[\"']", sl)):
    errors.append("slack-freshplan-alerts: no slack_configs with channel '#freshplan-alerts'")
if not re.search(r"(?m)^\s+(- )?api_url(_file)?:\s*\S", sl):
    errors.append("slack-freshplan-alerts: no api_url_file (or api_url)")
for m in re.finditer(r"(?m)^\s+(?:- )?(routing_key|service_key|api_url):\s*(\S+)", text):
    if m.group(2).strip("\"'") != "<secret>":
        errors.append(f"{m.group(1)} written inline: use {m.group(1)}_file")
for e in errors:
    print("error:", e)
print("receivers:", ", ".join(blocks))
sys.exit(1 if errors else 0)
EOF
run "alertmanager: pagerduty-critical is PagerDuty, slack-freshplan-alerts posts to #freshplan-alerts, secrets from files" \
    python3 "$TMP/receivers.py" "$AM_CONFIG"

# ---------------------------------------------------------------------------------------------
# Runbook: every alert links to a section of its own in docs/runbook.md.
cat >"$TMP/runbook.py" <<'EOF'
import re, sys
alerts = open(sys.argv[1], encoding="utf-8").read()
runbook = open(sys.argv[2], encoding="utf-8").read()
def slug(heading):   # GitHub's heading anchors
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
anchors = {slug(h) for h in re.findall(r"(?m)^#{1,6}\s+(.+?)\s*$", runbook)}
errors, seen = [], {}
for block in re.split(r"(?m)^\s*- alert:\s*", alerts)[1:]:
    name = block.split()[0]
    m = re.search(r"(?m)^\s+runbook_url:\s*[\"']?docs/runbook\.md#([\w-]+)[\"']?\s*$", block)
    if not m:
        errors.append(f"{name}: no runbook_url docs/runbook.md#<anchor>")
        continue
    anchor = m.group(1)
    if anchor not in anchors:
        errors.append(f"{name}: docs/runbook.md has no heading with anchor #{anchor}")
    if anchor in seen:
        errors.append(f"{name}: shares #{anchor} with {seen[anchor]} (one section per alert)")
    seen[anchor] = name
    print(f"{name} -> #{anchor}")
for e in errors:
    print("error:", e)
sys.exit(1 if errors else 0)
EOF
run "runbook: every alert's runbook_url is a section of its own in docs/runbook.md" \
    python3 "$TMP/runbook.py" "$ALERTS" "$RUNBOOK"

echo
elapsed=$((SECONDS - started))
if ((failures)); then
    echo "ops/check.sh: $failures of $checks checks FAILED (${elapsed}s)"
    exit 1
fi
echo "ops/check.sh: all $checks checks passed (${elapsed}s)"
