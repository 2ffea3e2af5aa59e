/*
 * FreshPlan Sales Cockpit — the page script.
 *
 * Plain ES2020, no framework, no build step. Talks to:
 *   GET /api/me                           optional: {userId, name, role, territory}; 404 is fine
 *   GET /api/cockpit/lead-widget?scope=&minPosition=
 *   GET /api/cockpit/stream               SSE, read with fetch() so cookie and bearer auth share
 *                                         one code path and Last-Event-ID can be sent on resume
 * Auth: the session cookie (same-origin) and, if present, a bearer token from `#token=…` or
 * localStorage `freshplan.token`.
 */
(() => {
  'use strict';

  // ---------------------------------------------------------------- constants

  const API = {
    me: '/api/me',
    widget: '/api/cockpit/lead-widget',
    stream: '/api/cockpit/stream',
  };
  const TOKEN_KEY = 'freshplan.token';
  const SCOPE_KEY = 'freshplan.scope';

  const SCOPES = ['own', 'territory', 'all'];
  const ROLE_SCOPES = {
    sales: ['own'],
    manager: ['own', 'territory'],
    viewer: ['territory'],
    admin: ['own', 'territory', 'all'],
  };
  const ROLE_DEFAULT_SCOPE = { sales: 'own', manager: 'territory', viewer: 'territory', admin: 'all' };
  const ROLE_RANK = ['viewer', 'sales', 'manager', 'admin'];
  const ROLE_LABEL = {
    admin: 'Administration',
    manager: 'Vertriebsleitung',
    sales: 'Vertrieb',
    viewer: 'Lesezugriff',
  };

  /** leadStats field, status, German label — in funnel order. */
  const STATUSES = [
    ['registered', 'REGISTERED', 'Registriert'],
    ['active', 'ACTIVE', 'Aktiv'],
    ['reminder', 'REMINDER', 'Erinnerung'],
    ['gracePeriod', 'GRACE_PERIOD', 'Nachfrist'],
    ['qualified', 'QUALIFIED', 'Qualifiziert'],
    ['converted', 'CONVERTED', 'Gewonnen'],
    ['lost', 'LOST', 'Verloren'],
    ['expired', 'EXPIRED', 'Abgelaufen'],
  ];

  /** activity type → [German label, icon glyph, colour class]. */
  const ACTIVITIES = {
    QUALIFIED_CALL: ['Qualifiziertes Gespräch', '☎', 'act-sales'],
    MEETING: ['Termin', '◷', 'act-sales'],
    DEMO: ['Demo', '▶', 'act-sales'],
    ROI_PRESENTATION: ['ROI-Präsentation', '%', 'act-sales'],
    SAMPLE_SENT: ['Muster versendet', '◧', 'act-sales'],
    EMAIL: ['E-Mail', '✉', 'act-contact'],
    CALL: ['Anruf', '☎', 'act-contact'],
    ORDER: ['Bestellung', '€', 'act-sales'],
    NOTE: ['Notiz', '✎', 'act-system'],
    FOLLOW_UP: ['Follow-up', '↻', 'act-system'],
    EMAIL_RECEIVED: ['E-Mail erhalten', '✉', 'act-inbound'],
    STATUS_CHANGE: ['Statuswechsel', '⇄', 'act-system'],
    LEAD_ASSIGNED: ['Zugewiesen', '→', 'act-system'],
    CREATED: ['Angelegt', '+', 'act-system'],
  };

  const FOLLOWUPS = {
    T3: ['T+3', 'Muster-Nachfass'],
    T7: ['T+7', 'Mengenangebot'],
    BATCH: ['Lauf', 'Sammellauf'],
  };

  const TREND = {
    UP: ['▲', 'steigend'],
    DOWN: ['▼', 'fallend'],
    STABLE: ['▶', 'stabil'],
  };

  const CHART_COLORS = {
    t3: '#2f9a5c',
    t7: '#9bcf6a',
    responses: '#2f78c4',
    conversions: '#1f7a45',
  };

  const REFRESH_MIN_INTERVAL_MS = 300; // at most one widget refetch per this interval
  const REFRESH_SETTLE_MS = 120; // wait this long after the first event of a burst
  const FALLBACK_REFRESH_MS = 60000;
  const STREAM_IDLE_TIMEOUT_MS = 70000; // server sends keep-alives (default every 15 s)
  const STREAM_BACKOFF_MIN_MS = 1000;
  const STREAM_BACKOFF_MAX_MS = 15000;
  const NOT_CONSISTENT_MAX_RETRIES = 4;

  // ---------------------------------------------------------------- formatting

  const TZ = 'Europe/Berlin';
  const nf = new Intl.NumberFormat('de-DE');
  const pf = new Intl.NumberFormat('de-DE', { minimumFractionDigits: 1, maximumFractionDigits: 1 });
  const dtFull = new Intl.DateTimeFormat('de-DE', { timeZone: TZ, dateStyle: 'medium', timeStyle: 'medium' });
  const dtDayTime = new Intl.DateTimeFormat('de-DE', {
    timeZone: TZ, day: '2-digit', month: '2-digit', hour: '2-digit', minute: '2-digit',
  });
  const dtTime = new Intl.DateTimeFormat('de-DE', { timeZone: TZ, hour: '2-digit', minute: '2-digit' });
  const dtDayKey = new Intl.DateTimeFormat('de-DE', { timeZone: TZ, year: 'numeric', month: '2-digit', day: '2-digit' });
  // Calendar dates ("2026-11-20") are dates, not instants: format them in UTC so they never shift.
  const dtAxis = new Intl.DateTimeFormat('de-DE', { timeZone: 'UTC', day: '2-digit', month: '2-digit' });
  const dtAxisLong = new Intl.DateTimeFormat('de-DE', { timeZone: 'UTC', weekday: 'short', day: '2-digit', month: '2-digit' });
  const rtf = new Intl.RelativeTimeFormat('de-DE', { numeric: 'auto', style: 'short' });

  const isNum = (v) => typeof v === 'number' && Number.isFinite(v);
  const fmtInt = (v) => (isNum(v) ? nf.format(v) : '–');
  /** A rate is a fraction 0..1 (DESIGN.md); shown as "12,5 %". */
  const fmtRate = (v) => (isNum(v) ? `${pf.format(v * 100)} %` : '–');
  /** changePercent is already in percent: "+3,2 %", "-1,0 %", "±0,0 %". */
  const fmtChange = (v) => {
    if (!isNum(v)) return '–';
    const rounded = Math.round(v * 10) / 10;
    const sign = rounded > 0 ? '+' : rounded < 0 ? '-' : '±';
    return `${sign}${pf.format(Math.abs(rounded))} %`;
  };

  function parseDay(s) {
    const m = /^(\d{4})-(\d{2})-(\d{2})/.exec(String(s || ''));
    return m ? Date.UTC(+m[1], +m[2] - 1, +m[3]) : NaN;
  }
  const fmtAxisDay = (s) => {
    const t = parseDay(s);
    return Number.isFinite(t) ? dtAxis.format(t) : '';
  };
  const fmtAxisDayLong = (s) => {
    const t = parseDay(s);
    return Number.isFinite(t) ? dtAxisLong.format(t) : '';
  };

  function fmtRelative(iso) {
    const t = Date.parse(iso);
    if (!Number.isFinite(t)) return '—';
    const diff = (t - Date.now()) / 1000;
    const abs = Math.abs(diff);
    if (abs < 60 || (diff > 0 && diff < 300)) return 'gerade eben';
    if (abs < 3600) return rtf.format(Math.round(diff / 60), 'minute');
    if (abs < 86400) return rtf.format(Math.round(diff / 3600), 'hour');
    if (abs < 7 * 86400) return rtf.format(Math.round(diff / 86400), 'day');
    return dtDayTime.format(t);
  }
  function fmtAbsolute(iso) {
    const t = Date.parse(iso);
    if (!Number.isFinite(t)) return '';
    return dtDayKey.format(t) === dtDayKey.format(Date.now()) ? dtTime.format(t) : dtDayTime.format(t);
  }
  const fmtFull = (iso) => {
    const t = Date.parse(iso);
    return Number.isFinite(t) ? dtFull.format(t) : '';
  };

  // ---------------------------------------------------------------- DOM helpers

  const $ = (sel, root = document) => root.querySelector(sel);
  const byTestId = (id) => document.querySelector(`[data-testid="${id}"]`);

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    if (props) {
      for (const [k, v] of Object.entries(props)) {
        if (v == null || v === false) continue;
        if (k === 'class') node.className = v;
        else if (k === 'grow') node.style.flexGrow = String(v); // CSSOM, not a style attribute (CSP)
        else if (k === 'text') node.textContent = v;
        else node.setAttribute(k, v === true ? '' : String(v));
      }
    }
    for (const c of children) {
      if (c == null || c === false) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  /** Sets a tile's value text; a changed value flashes briefly (not on first render). */
  function setValue(testId, text) {
    const node = byTestId(testId);
    if (!node) return;
    if (node.textContent === text) return;
    const hadValue = node.textContent !== '';
    node.textContent = text;
    if (hadValue) {
      node.classList.remove('value-flash');
      void node.offsetWidth; // restart the animation
      node.classList.add('value-flash');
    }
  }

  const store = {
    get(key) {
      try { return localStorage.getItem(key); } catch (_) { return null; }
    },
    set(key, value) {
      try { localStorage.setItem(key, value); } catch (_) { /* private mode: keep it in memory */ }
    },
    remove(key) {
      try { localStorage.removeItem(key); } catch (_) { /* ignore */ }
    },
  };

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  // ---------------------------------------------------------------- state

  const state = {
    token: null, // bearer token, if any
    claims: null, // decoded (unverified) token payload, for display only
    me: null, // /api/me answer, if that endpoint exists
    role: null, // 'sales' | 'manager' | 'viewer' | 'admin' | null (unknown)
    scopes: null, // scopes offered in the selector
    scope: null, // requested scope; null = the server's default
    widget: null, // last widget answer
    authRequired: false,
    disabled: false,
    fetches: 0,
  };

  // ---------------------------------------------------------------- auth

  function normaliseToken(raw) {
    let t = String(raw || '').trim();
    if (/^bearer\s+/i.test(t)) t = t.replace(/^bearer\s+/i, '');
    return t || null;
  }

  function takeTokenFromHash() {
    const m = /(?:^#|[#&])token=([^&]+)/.exec(location.hash);
    if (!m) return;
    let raw = m[1];
    try { raw = decodeURIComponent(raw); } catch (_) { /* keep raw */ }
    const token = normaliseToken(raw);
    if (token) store.set(TOKEN_KEY, token);
    state.token = token || state.token;
    // Do not leave the token in the address bar or the history.
    history.replaceState(null, '', location.pathname + location.search);
  }

  function decodeClaims(token) {
    try {
      const part = token.split('.')[1];
      if (!part) return null;
      const b64 = part.replace(/-/g, '+').replace(/_/g, '/').padEnd(Math.ceil(part.length / 4) * 4, '=');
      const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
      return JSON.parse(new TextDecoder().decode(bytes));
    } catch (_) {
      return null;
    }
  }

  /** The most privileged known role in a role list (roles are case-insensitive). */
  function effectiveRole(roles) {
    let best = null;
    for (const r of Array.isArray(roles) ? roles : [roles]) {
      const role = String(r || '').toLowerCase();
      if (ROLE_RANK.includes(role) && (best == null || ROLE_RANK.indexOf(role) > ROLE_RANK.indexOf(best))) best = role;
    }
    return best;
  }

  function authHeaders(extra) {
    const headers = Object.assign({}, extra);
    if (state.token) headers.Authorization = `Bearer ${state.token}`;
    return headers;
  }

  function api(path, signal) {
    return fetch(path, {
      credentials: 'same-origin',
      cache: 'no-store',
      headers: authHeaders({ Accept: 'application/json' }),
      signal,
    });
  }

  async function readProblem(res) {
    try {
      const type = res.headers.get('content-type') || '';
      if (type.includes('json')) return await res.json();
    } catch (_) { /* not JSON */ }
    return null;
  }
  const problemSlug = (p) => (p && typeof p.type === 'string' ? p.type.replace(/\/+$/, '').split('/').pop() : '');

  // ---------------------------------------------------------------- panels, banners

  const ui = {
    widget: $('#widget'),
    login: $('#login-panel'),
    loginReason: $('#login-reason'),
    disabled: $('#disabled-panel'),
    banner: $('#banner'),
    bannerText: $('#banner-text'),
    notice: $('#notice'),
    noticeText: $('#notice-text'),
    noticeAction: $('#notice-action'),
    live: $('#live'),
    liveText: $('#live-text'),
  };

  function showBanner(text) {
    ui.bannerText.textContent = text;
    ui.banner.hidden = false;
    ui.widget.setAttribute('aria-busy', 'false');
  }
  function hideBanner() {
    ui.banner.hidden = true;
  }

  function showNotice(text, actionLabel, action) {
    ui.noticeText.textContent = text;
    ui.noticeAction.hidden = !actionLabel;
    ui.noticeAction.textContent = actionLabel || '';
    ui.noticeAction.onclick = action || null;
    ui.notice.hidden = false;
  }
  function hideNotice() {
    ui.notice.hidden = true;
  }

  function showLogin(reason) {
    state.authRequired = true;
    stopStream();
    hideBanner();
    ui.widget.hidden = true;
    ui.disabled.hidden = true;
    ui.login.hidden = false;
    ui.loginReason.textContent = reason ||
      (state.token
        ? 'Das gespeicherte Token wurde abgelehnt (ungültig oder abgelaufen). Bitte melden Sie sich erneut an.'
        : 'Um das Sales Cockpit zu sehen, melden Sie sich bitte an.');
    if (state.token) $('.token-box', ui.login).open = true;
    $('#switch-user').textContent = 'Anmelden';
  }

  function showDisabled() {
    state.disabled = true;
    state.authRequired = false;
    $('#switch-user').textContent = 'Benutzer wechseln';
    hideBanner();
    ui.widget.hidden = true;
    ui.login.hidden = true;
    ui.disabled.hidden = false;
    renderWho();
    startStream(); // header and live indicator stay; an event or the minute timer re-checks
  }

  function showWidget() {
    state.disabled = false;
    state.authRequired = false;
    $('#switch-user').textContent = 'Benutzer wechseln';
    ui.login.hidden = true;
    ui.disabled.hidden = true;
    ui.widget.hidden = false;
  }

  // ---------------------------------------------------------------- header

  function initials(name) {
    const parts = String(name || '').split(/[\s._-]+/).filter((p) => /^[A-Za-zÄÖÜäöü]/.test(p));
    return parts.slice(0, 2).map((p) => p[0].toUpperCase()).join('') || '?';
  }

  function renderWho() {
    const w = state.widget || {};
    const me = state.me || {};
    const claims = state.claims || {};
    const userId = me.userId || w.userId || claims.sub || '';
    const name = me.name || claims.name || userId;
    const territory = me.territory || w.territory || claims.territory || '';
    if (!name) return;
    $('#whoami').hidden = false;
    $('#user-name').textContent = name;
    $('#user-name').title = userId && userId !== name ? userId : '';
    $('#user-avatar').textContent = name === userId ? name.slice(0, 1).toUpperCase() : initials(name);
    $('#user-role').textContent = ROLE_LABEL[state.role] || '';
    $('#user-territory').textContent = territory;
    $('#user-territory').title = territory ? `Gebiet ${territory}` : '';
  }

  // ---------------------------------------------------------------- scope selector

  function scopeText(scope, territory) {
    if (scope === 'own') return 'Meine Leads';
    if (scope === 'territory') return territory ? `Gebiet ${territory}` : 'Gebiet';
    if (scope === 'all') return 'Alle Gebiete';
    return '';
  }

  /** Without a known role: infer the offered scopes from the server's default answer. */
  function inferScopes(w) {
    if (w.scope === 'all') return ['own', 'territory', 'all'];
    if (w.scope === 'territory') return w.isManagerView ? ['own', 'territory'] : ['territory'];
    return [w.scope || 'own'];
  }

  function renderScopeControl() {
    const control = $('#scope-control');
    const scopes = state.scopes || [];
    const current = (state.widget && state.widget.scope) || state.scope;
    control.hidden = scopes.length < 2;
    for (const button of control.querySelectorAll('button[data-scope]')) {
      const s = button.dataset.scope;
      button.hidden = !scopes.includes(s);
      const checked = s === current;
      button.setAttribute('aria-checked', String(checked));
      button.tabIndex = checked ? 0 : -1;
    }
  }

  function selectScope(scope) {
    if (!SCOPES.includes(scope) || scope === state.scope) return;
    state.scope = scope;
    if (state.role) store.set(SCOPE_KEY, scope);
    const control = $('#scope-control');
    for (const b of control.querySelectorAll('button[data-scope]')) {
      b.setAttribute('aria-checked', String(b.dataset.scope === scope));
    }
    ui.widget.setAttribute('aria-busy', 'true');
    refresh.now();
  }

  function dropScope(scope) {
    if (state.scopes) state.scopes = state.scopes.filter((s) => s !== scope);
    store.remove(SCOPE_KEY);
    state.scope = state.role ? ROLE_DEFAULT_SCOPE[state.role] : null;
    if (state.scope === scope) state.scope = null;
    renderScopeControl();
  }

  // ---------------------------------------------------------------- widget rendering

  function renderTrend(testId, trend) {
    const node = byTestId(testId);
    if (!node) return;
    node.textContent = '';
    if (!trend || typeof trend !== 'object') return;
    const direction = TREND[trend.direction] ? trend.direction : 'STABLE';
    const [arrow, word] = TREND[direction];
    const change = fmtChange(trend.changePercent);
    node.dataset.direction = direction;
    // The API has one trend for T+3 and T+7 together (CONTRACT.md): say so, or a T+7 tile at
    // 0,0 % would show the rise of T+3 as its own.
    node.setAttribute('aria-label', `Trend T+3 und T+7 zusammen ${word}: ${change} gegenüber der Vorwoche`);
    node.title = isNum(trend.current) && isNum(trend.previous)
      ? `T+3 und T+7 zusammen – diese 7 Tage: ${fmtRate(trend.current)} · Vorwoche: ${fmtRate(trend.previous)}`
      : '';
    node.append(
      el('span', { class: 'trend-pill', 'data-direction': direction },
        el('span', { class: 'trend-arrow', 'aria-hidden': 'true', text: arrow }), change),
      el('span', { class: 'trend-note', text: 'T+3/T+7 ggü. Vorwoche' }),
    );
  }

  function renderTiles(w) {
    const t3 = isNum(w.completedT3Today) ? w.completedT3Today : 0;
    const t7 = isNum(w.completedT7Today) ? w.completedT7Today : 0;
    setValue('tile-pending-t3-value', fmtInt(w.pendingT3Count));
    setValue('tile-pending-t7-value', fmtInt(w.pendingT7Count));
    setValue('tile-completed-today-value', fmtInt(t3 + t7));
    $('#split-t3').textContent = `T+3: ${fmtInt(t3)}`;
    $('#split-t7').textContent = `T+7: ${fmtInt(t7)}`;
    setValue('tile-total-value', fmtInt((w.leadStats || {}).total));
    $('#total-sub').textContent = scopeText(w.scope, w.territory) || '\u00a0';
    setValue('tile-t3-response-value', fmtRate(w.t3ResponseRate));
    setValue('tile-t7-response-value', fmtRate(w.t7ResponseRate));
    setValue('tile-t3-conversion-value', fmtRate(w.t3ConversionRate));
    setValue('tile-t7-conversion-value', fmtRate(w.t7ConversionRate));
    renderTrend('tile-t3-response-trend', w.responseTrend);
    renderTrend('tile-t7-response-trend', w.responseTrend);
    renderTrend('tile-t3-conversion-trend', w.conversionTrend);
    renderTrend('tile-t7-conversion-trend', w.conversionTrend);
  }

  function renderStatus(stats) {
    stats = stats || {};
    const bar = $('#status-bar');
    const list = $('#status-list');
    const counts = STATUSES.map(([field]) => (isNum(stats[field]) ? stats[field] : 0));
    const sum = counts.reduce((a, b) => a + b, 0);
    const total = isNum(stats.total) ? stats.total : sum;
    $('#status-total').textContent = `${fmtInt(total)} Leads`;
    bar.textContent = '';
    list.textContent = '';
    const parts = [];
    STATUSES.forEach(([, status, label], i) => {
      const n = counts[i];
      const share = sum > 0 ? `${pf.format((n / sum) * 100)} %` : '0,0 %';
      if (n > 0) {
        bar.append(el('span', {
          class: `status-seg st-${status}`,
          grow: n,
          title: `${label}: ${fmtInt(n)} (${share})`,
        }));
      }
      parts.push(`${label} ${fmtInt(n)}`);
      list.append(el('li', { class: 'status-item', 'data-testid': `status-${status}`, 'data-status': status },
        el('span', { class: 'status-item-label' },
          el('span', { class: `status-swatch st-${status}`, 'aria-hidden': 'true' }), label),
        el('span', { class: 'status-item-count' },
          el('span', { 'data-testid': `status-${status}-count`, text: fmtInt(n) }),
          el('span', { class: 'status-item-share', text: share }))));
    });
    bar.setAttribute('aria-label', `Leads nach Status: ${parts.join(', ')}`);
  }

  function timeCell(iso) {
    return el('time', {
      class: 'js-rel',
      datetime: iso || null,
      'data-ts': iso || null,
      title: fmtFull(iso) || null,
      text: iso ? fmtRelative(iso) : '—',
    });
  }

  function renderActivities(items) {
    const list = $('#activity-list');
    list.textContent = '';
    items = Array.isArray(items) ? items.slice(0, 10) : [];
    if (items.length === 0) {
      list.append(el('li', { class: 'feed-empty', text: 'Noch keine Aktivitäten.' }));
      return;
    }
    for (const a of items) {
      if (!a || typeof a !== 'object') continue;
      const [label, glyph, cls] = ACTIVITIES[a.type] || [a.type ? String(a.type) : 'Aktivität', '•', 'act-system'];
      const anon = !a.companyName;
      list.append(el('li', { class: 'feed-row', 'data-testid': 'activity-row', 'data-type': a.type || null },
        el('span', { class: `pill act-icon ${cls}`, 'aria-hidden': 'true', text: glyph }),
        el('div', { class: 'feed-main' },
          el('div', { class: `feed-title${anon ? ' is-anon' : ''}`, text: anon ? 'Lead (anonym)' : a.companyName }),
          el('div', { class: 'feed-meta' },
            el('span', { 'data-testid': 'activity-type', text: label }), ' · ',
            el('span', { 'data-testid': 'activity-user', text: a.userId || '—' }))),
        el('div', { class: 'feed-time' },
          timeCell(a.occurredAt), el('br'),
          el('span', { class: 'js-abs', 'data-ts': a.occurredAt || null, text: fmtAbsolute(a.occurredAt) }))));
    }
  }

  function renderFollowUps(items) {
    const list = $('#followup-list');
    list.textContent = '';
    items = Array.isArray(items) ? items.slice(0, 10) : [];
    if (items.length === 0) {
      list.append(el('li', { class: 'feed-empty', text: 'Noch keine Follow-ups versendet.' }));
      return;
    }
    for (const f of items) {
      if (!f || typeof f !== 'object') continue;
      const [short, kind] = FOLLOWUPS[f.followUpType] || [f.followUpType ? String(f.followUpType) : '—', 'Follow-up'];
      const anon = !f.companyName;
      const result = f.success === true
        ? el('span', { class: 'result result-ok', 'data-testid': 'followup-result', 'data-success': 'true', text: '✓ versendet' })
        : f.success === false
          ? el('span', { class: 'result result-fail', 'data-testid': 'followup-result', 'data-success': 'false', text: '✗ fehlgeschlagen' })
          : el('span', { class: 'result result-unknown', 'data-testid': 'followup-result', text: '—' });
      list.append(el('li', { class: 'feed-row', 'data-testid': 'followup-row', 'data-type': f.followUpType || null },
        el('span', { class: `pill fu-${f.followUpType || 'X'}`, 'data-testid': 'followup-type', text: short }),
        el('div', { class: 'feed-main' },
          el('div', { class: `feed-title${anon ? ' is-anon' : ''}`, text: anon ? 'Lead (anonym)' : f.companyName }),
          el('div', { class: 'feed-meta' }, `${kind} · `, result)),
        el('div', { class: 'feed-time' },
          timeCell(f.sentAt), el('br'),
          el('span', { class: 'js-abs', 'data-ts': f.sentAt || null, text: fmtAbsolute(f.sentAt) }))));
    }
  }

  function renderAsOf(w) {
    const node = byTestId('as-of');
    const when = fmtFull(w.asOf);
    const parts = [];
    if (when) parts.push(`Stand: ${when}`);
    if (isNum(w.position)) parts.push(`Position ${w.position}`);
    node.textContent = parts.join(' · ');
    node.title = w.asOf || '';
  }

  function tickTimes() {
    for (const t of document.querySelectorAll('.js-rel[data-ts]')) t.textContent = fmtRelative(t.dataset.ts);
    for (const t of document.querySelectorAll('.js-abs[data-ts]')) t.textContent = fmtAbsolute(t.dataset.ts);
  }

  // ---------------------------------------------------------------- charts (uPlot)

  const charts = { sent: null, outcome: null, days: [] };

  function niceIncrs() {
    const out = [];
    for (let mag = 1; mag <= 1e9; mag *= 10) out.push(mag, 2 * mag, 2.5 * mag, 5 * mag);
    return out.filter(Number.isInteger);
  }
  const INT_INCRS = niceIncrs();
  /** Top of the y axis: a little headroom, rounded to a step that gives at most 4 gridlines. */
  function niceMax(max) {
    const m = Math.max(4, (max || 0) * 1.05);
    const step = INT_INCRS.find((s) => m / s <= 4) || 1;
    return Math.ceil(m / step) * step;
  }

  function chartOptions(width, series, caption) {
    const axisFont = '12px system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif';
    return {
      width,
      height: 210,
      padding: [10, 10, 0, 2],
      legend: { live: false },
      cursor: {
        drag: { x: false, y: false, setScale: false },
        points: { size: 7, width: 2 },
        y: false,
      },
      select: { show: false },
      scales: {
        x: { time: false, range: (u, min, max) => [min - 0.6, max + 0.6] },
        y: { range: (u, min, max) => [0, niceMax(max)] },
      },
      axes: [
        {
          stroke: '#56665d',
          font: axisFont,
          grid: { show: false },
          ticks: { show: true, stroke: '#dfe6e1', width: 1, size: 4 },
          size: 30,
          space: 42,
          incrs: [1, 2, 3, 7, 14],
          values: (u, splits) => splits.map((i) => (Number.isInteger(i) ? fmtAxisDay(charts.days[i]) : '')),
        },
        {
          stroke: '#56665d',
          font: axisFont,
          size: 44,
          space: 36,
          grid: { stroke: '#edf1ee', width: 1 },
          ticks: { show: false },
          incrs: INT_INCRS,
          values: (u, splits) => splits.map((v) => (Number.isInteger(v) ? nf.format(v) : '')),
        },
      ],
      series: [{ label: 'Tag' }].concat(series),
      hooks: {
        setCursor: [(u) => {
          const i = u.cursor.idx;
          if (i == null || charts.days[i] == null) {
            caption.textContent = 'letzte 14 Tage';
            return;
          }
          const values = series.map((s, k) => `${s.label} ${fmtInt(u.data[k + 1][i])}`).join(' · ');
          caption.textContent = `${fmtAxisDayLong(charts.days[i])}: ${values}`;
        }],
      },
    };
  }

  function createChart(container, series, data) {
    const caption = container.closest('.card').querySelector('.card-meta');
    const width = Math.max(240, container.clientWidth);
    const opts = chartOptions(width, series, caption);
    container.textContent = '';
    const chart = new uPlot(opts, data, container);
    const observer = new ResizeObserver(() => {
      const w = Math.max(240, container.clientWidth);
      if (Math.abs(w - chart.width) > 1) chart.setSize({ width: w, height: 210 });
    });
    observer.observe(container);
    return chart;
  }

  function renderCharts(daily) {
    const sentEl = $('#chart-sent');
    const outcomeEl = $('#chart-outcome');
    daily = Array.isArray(daily) ? daily.filter((d) => d && typeof d === 'object') : [];
    if (typeof uPlot === 'undefined') {
      for (const c of [sentEl, outcomeEl]) {
        c.textContent = '';
        c.append(el('div', { class: 'chart-empty', text: 'Diagramm nicht verfügbar.' }));
      }
      return;
    }
    if (daily.length === 0) {
      for (const key of ['sent', 'outcome']) {
        if (charts[key]) charts[key].destroy();
        charts[key] = null;
      }
      for (const c of [sentEl, outcomeEl]) {
        c.textContent = '';
        c.append(el('div', { class: 'chart-empty', text: 'Noch keine Daten.' }));
      }
      return;
    }
    charts.days = daily.map((d) => d.date);
    const xs = daily.map((_, i) => i);
    const num = (v) => (isNum(v) ? v : 0);
    const sentData = [xs, daily.map((d) => num(d.t3Sent)), daily.map((d) => num(d.t7Sent))];
    const outcomeData = [xs, daily.map((d) => num(d.responses)), daily.map((d) => num(d.conversions))];

    if (!charts.sent) {
      const bars = uPlot.paths && uPlot.paths.bars;
      const barSeries = (label, color, align) => ({
        label,
        stroke: color,
        fill: color,
        width: 0,
        points: { show: false },
        paths: bars ? bars({ size: [0.36, 22], align, gap: 0 }) : undefined,
      });
      charts.sent = createChart(sentEl, [
        barSeries('T+3', CHART_COLORS.t3, -1),
        barSeries('T+7', CHART_COLORS.t7, 1),
      ], sentData);
    } else {
      charts.sent.setData(sentData);
    }

    if (!charts.outcome) {
      const lineSeries = (label, color, fill) => ({
        label,
        stroke: color,
        width: 2.25,
        fill,
        points: { show: true, size: 5, width: 1.5, fill: '#fff' },
      });
      charts.outcome = createChart(outcomeEl, [
        lineSeries('Antworten', CHART_COLORS.responses, 'rgba(47,120,196,0.08)'),
        lineSeries('Konversionen', CHART_COLORS.conversions, 'rgba(31,122,69,0.10)'),
      ], outcomeData);
    } else {
      charts.outcome.setData(outcomeData);
    }
  }

  // ---------------------------------------------------------------- widget loading

  let loadSeq = 0;
  let errorBackoffMs = 2000;
  let errorTimer = null;

  function scheduleErrorRetry() {
    clearTimeout(errorTimer);
    const delay = errorBackoffMs;
    errorBackoffMs = Math.min(errorBackoffMs * 2, 30000);
    errorTimer = setTimeout(() => refresh.request(null, true), delay);
    return delay;
  }

  function retryAfterMs(res) {
    const h = res.headers.get('Retry-After');
    if (!h) return 1000;
    const secs = Number(h);
    if (Number.isFinite(secs)) return Math.min(Math.max(secs, 0.2), 30) * 1000;
    const at = Date.parse(h);
    return Number.isFinite(at) ? Math.min(Math.max(at - Date.now(), 200), 30000) : 1000;
  }

  /**
   * Fetches the widget once (plus retries while the server says the numbers are not yet
   * consistent) and renders it. Resolves when done; a newer call supersedes an older one.
   */
  async function loadWidget(minPosition) {
    const seq = ++loadSeq;
    let attempts = 0;
    for (;;) {
      const params = new URLSearchParams();
      if (state.scope) params.set('scope', state.scope);
      if (minPosition != null) params.set('minPosition', String(minPosition));
      const url = API.widget + (params.toString() ? `?${params}` : '');
      let res;
      state.fetches += 1;
      ui.widget.dataset.fetches = String(state.fetches);
      try {
        res = await api(url);
      } catch (_) {
        if (seq !== loadSeq) return;
        const delay = scheduleErrorRetry();
        showBanner(`Keine Verbindung zum Server. Die Zahlen sind möglicherweise nicht aktuell – neuer Versuch in ${Math.round(delay / 1000)} s.`);
        return;
      }
      if (seq !== loadSeq) return;

      if (res.ok) {
        let data;
        try {
          data = await res.json();
        } catch (_) {
          showBanner('Die Antwort des Servers war unvollständig. Neuer Versuch läuft.');
          scheduleErrorRetry();
          return;
        }
        if (seq !== loadSeq) return;
        errorBackoffMs = 2000;
        clearTimeout(errorTimer);
        hideBanner();
        applyWidget(data);
        return;
      }

      const problem = await readProblem(res);
      if (seq !== loadSeq) return;
      const slug = problemSlug(problem);

      if (res.status === 401) {
        showLogin();
        return;
      }
      if (res.status === 404 && slug === 'feature-disabled') {
        showDisabled();
        return;
      }
      if (res.status === 403 && state.scope) {
        // This scope is not for this user: hide it and fall back to the default view.
        dropScope(state.scope);
        continue;
      }
      const retryable = res.status === 503 && (slug === 'not-yet-consistent' || res.headers.has('Retry-After'));
      if (retryable && (attempts < NOT_CONSISTENT_MAX_RETRIES || minPosition != null)) {
        attempts += 1;
        await sleep(retryAfterMs(res));
        if (seq !== loadSeq) return;
        if (attempts >= NOT_CONSISTENT_MAX_RETRIES && minPosition != null) {
          minPosition = null; // stop insisting on that position: show what there is
          attempts = 0;
        }
        continue;
      }
      const delay = scheduleErrorRetry();
      const detail = problem && (problem.title || problem.detail);
      showBanner(`Die Kennzahlen konnten nicht geladen werden (${res.status}${detail ? `: ${detail}` : ''}). Neuer Versuch in ${Math.round(delay / 1000)} s.`);
      return;
    }
  }

  function applyWidget(w) {
    if (!w || typeof w !== 'object') return;
    const first = !state.widget;
    state.widget = w;
    showWidget();
    ui.widget.classList.remove('is-loading');
    ui.widget.setAttribute('aria-busy', 'false');
    ui.widget.dataset.loaded = 'true';
    ui.widget.dataset.scope = w.scope || '';
    ui.widget.dataset.position = isNum(w.position) ? String(w.position) : '';

    if (!state.scopes) state.scopes = state.role && ROLE_SCOPES[state.role] ? ROLE_SCOPES[state.role].slice() : inferScopes(w);
    if (w.scope && !state.scopes.includes(w.scope)) state.scopes = SCOPES.filter((s) => s === w.scope || state.scopes.includes(s));
    renderScopeControl();
    renderWho();

    const badge = byTestId('manager-view');
    badge.hidden = !w.isManagerView;
    badge.textContent = !w.isManagerView ? ''
      : w.scope === 'all' ? 'Gesamtansicht' : `Gebietsansicht ${w.territory || ''}`.trim();
    const scopeLabel = $('#scope-label');
    scopeLabel.textContent = w.isManagerView ? '' : scopeText(w.scope, w.territory);

    renderTiles(w);
    renderStatus(w.leadStats);
    renderCharts(w.daily);
    renderActivities(w.recentActivities);
    renderFollowUps(w.recentFollowUps);
    renderAsOf(w);

    if (first) {
      // Resume the stream right after the snapshot: no event between the two is missed.
      if (live.lastEventId == null && isNum(w.position) && w.position > 0) live.lastEventId = String(w.position);
      startStream();
    }
  }

  /**
   * Coalesced refresh: at most one request in flight and at most one per
   * REFRESH_MIN_INTERVAL_MS; `minPosition` accumulates to the newest event seen.
   */
  const refresh = (() => {
    let wanted = false;
    let inFlight = 0; // a scope switch may overlap a superseded request
    let timer = null;
    let lastStart = 0;
    let pendingMin = null;

    function pump() {
      if (!wanted || inFlight || timer) return;
      const wait = Math.max(REFRESH_SETTLE_MS, lastStart + REFRESH_MIN_INTERVAL_MS - Date.now());
      timer = setTimeout(run, wait);
    }

    async function run() {
      timer = null;
      if (inFlight || !wanted) return;
      if (state.authRequired) { wanted = false; pendingMin = null; return; }
      wanted = false;
      const min = pendingMin;
      pendingMin = null;
      inFlight += 1;
      lastStart = Date.now();
      try {
        await loadWidget(min);
      } finally {
        inFlight -= 1;
        pump();
      }
    }

    return {
      /** Ask for a refresh; `position` = outbox position the answer must include. */
      request(position, force) {
        if (state.disabled && !force) return; // the minute timer re-checks a disabled widget
        if (position != null && !force) {
          const have = state.widget && state.widget.position;
          if (isNum(have) && have >= position && !wanted) return; // already reflected
          pendingMin = pendingMin == null ? position : Math.max(pendingMin, position);
        }
        wanted = true;
        pump();
      },
      /** Refetch immediately (scope switch), superseding whatever is in flight. */
      now() {
        clearTimeout(timer);
        timer = null;
        wanted = false;
        pendingMin = null;
        inFlight += 1;
        lastStart = Date.now();
        loadWidget(null).finally(() => {
          inFlight -= 1;
          pump();
        });
      },
    };
  })();

  // ---------------------------------------------------------------- live stream (SSE over fetch)

  const live = {
    lastEventId: null,
    running: false,
    stopped: true,
    replaced: false,
    ctrl: null,
    backoff: STREAM_BACKOFF_MIN_MS,
    wake: null,
    idleTimer: null,
    everOpen: false,
    outageReported: false,
  };

  function setLive(on) {
    const next = on ? 'live' : 'offline';
    if (ui.live.dataset.state === next) return;
    ui.live.dataset.state = next;
    ui.liveText.textContent = on ? 'Live' : 'Offline';
    ui.live.title = on ? 'Live-Aktualisierung aktiv' : 'Keine Live-Verbindung – Zahlen werden jede Minute aktualisiert';
  }

  function startStream() {
    live.stopped = false;
    live.replaced = false;
    if (live.running) return;
    live.running = true;
    streamLoop().finally(() => {
      live.running = false;
      setLive(false);
    });
  }

  function stopStream() {
    live.stopped = true;
    if (live.ctrl) live.ctrl.abort();
    if (live.wake) live.wake();
  }

  function wakeStream() {
    live.backoff = STREAM_BACKOFF_MIN_MS;
    if (live.wake) live.wake();
  }

  function interruptibleSleep(ms) {
    return new Promise((resolve) => {
      const t = setTimeout(done, ms);
      function done() {
        clearTimeout(t);
        live.wake = null;
        resolve();
      }
      live.wake = done;
    });
  }

  async function streamLoop() {
    while (!live.stopped && !live.replaced) {
      const ctrl = new AbortController();
      live.ctrl = ctrl;
      let opened = false;
      try {
        const headers = authHeaders({ Accept: 'text/event-stream' });
        if (live.lastEventId != null) headers['Last-Event-ID'] = live.lastEventId;
        const res = await fetch(API.stream, {
          credentials: 'same-origin',
          cache: 'no-store',
          headers,
          signal: ctrl.signal,
        });
        if (res.status === 401) {
          showLogin();
          return;
        }
        if (res.status === 422 && live.lastEventId != null) {
          // The server did not accept our resume point: start fresh and refetch the state.
          live.lastEventId = null;
          refresh.request(null, true);
          continue;
        }
        if (!res.ok || !res.body) throw new Error(`stream answered ${res.status}`);
        opened = true;
        live.outageReported = false;
        live.backoff = STREAM_BACKOFF_MIN_MS;
        setLive(true);
        if (!ui.banner.hidden) {
          // Back after an outage: fetch now instead of waiting for the error backoff.
          errorBackoffMs = 2000;
          clearTimeout(errorTimer);
          refresh.request(null, true);
        }
        if (live.everOpen && live.lastEventId == null) refresh.request(null, true); // gap not replayable
        live.everOpen = true;
        await readEvents(res.body, ctrl);
      } catch (_) {
        /* network error, abort or idle timeout: reconnect below */
      } finally {
        clearTimeout(live.idleTimer);
        if (live.ctrl === ctrl) live.ctrl = null;
      }
      setLive(false);
      if (live.stopped || live.replaced) return;
      if (!opened && !live.outageReported) {
        // Could not reach the stream: check the API too, so a real outage shows the banner.
        live.outageReported = true;
        refresh.request(null, true);
      }
      const delay = opened ? STREAM_BACKOFF_MIN_MS : live.backoff;
      if (!opened) live.backoff = Math.min(live.backoff * 2, STREAM_BACKOFF_MAX_MS);
      await interruptibleSleep(delay + Math.random() * 250);
    }
  }

  /** Reads an SSE body and dispatches complete events (WHATWG event-stream parsing rules). */
  async function readEvents(body, ctrl) {
    const reader = body.getReader();
    const decoder = new TextDecoder('utf-8');
    let buffer = '';
    let data = [];
    let type = '';
    let id = null;
    const armIdle = () => {
      clearTimeout(live.idleTimer);
      live.idleTimer = setTimeout(() => ctrl.abort(), STREAM_IDLE_TIMEOUT_MS);
    };
    armIdle();

    const line = (text) => {
      if (text === '') {
        if (id != null) live.lastEventId = id;
        if (data.length > 0 || type) dispatch(type || 'message', data.join('\n'), id);
        data = [];
        type = '';
        id = null;
        return;
      }
      if (text[0] === ':') return; // comment / keep-alive
      const colon = text.indexOf(':');
      const field = colon < 0 ? text : text.slice(0, colon);
      let value = colon < 0 ? '' : text.slice(colon + 1);
      if (value[0] === ' ') value = value.slice(1);
      if (field === 'data') data.push(value);
      else if (field === 'event') type = value;
      else if (field === 'id') { if (!value.includes('\0')) id = value; }
      // `retry` and unknown fields are ignored: our own backoff applies.
    };

    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      armIdle();
      buffer += decoder.decode(value, { stream: true });
      let start = 0;
      for (let i = 0; i < buffer.length; i++) {
        const c = buffer[i];
        if (c === '\n' || c === '\r') {
          if (c === '\r' && i === buffer.length - 1) break; // maybe half of \r\n: wait for more
          line(buffer.slice(start, i));
          if (c === '\r' && buffer[i + 1] === '\n') i++;
          start = i + 1;
        }
        if (live.replaced || live.stopped) break;
      }
      buffer = buffer.slice(start);
      if (live.replaced || live.stopped) {
        ctrl.abort();
        break;
      }
    }
  }

  function dispatch(type, data, id) {
    switch (type) {
      case 'resync':
        refresh.request(null, true);
        return;
      case 'reauth':
        showLogin('Ihre Anmeldung ist abgelaufen. Bitte melden Sie sich erneut an.');
        return;
      case 'replaced':
        live.replaced = true;
        showNotice('Die Live-Aktualisierung läuft jetzt in einem anderen Fenster. Die Zahlen hier werden jede Minute aktualisiert.',
          'Hier fortsetzen', () => {
            hideNotice();
            live.backoff = STREAM_BACKOFF_MIN_MS;
            startStream();
          });
        return;
      default: {
        // A CloudEvents frame (event: <type>, id: <outbox position>). Its numbers are
        // requested with minPosition so the answer includes this event.
        let position = id != null && /^\d+$/.test(id) ? Number(id) : null;
        if (position == null && data) {
          try {
            const env = JSON.parse(data);
            if (env && isNum(env.position)) position = env.position;
          } catch (_) { /* a stub or not JSON: refresh without a position */ }
        }
        refresh.request(position);
      }
    }
  }

  // ---------------------------------------------------------------- wiring

  function bindUi() {
    $('#banner-retry').addEventListener('click', () => {
      errorBackoffMs = 2000;
      clearTimeout(errorTimer);
      hideBanner();
      refresh.request(null, true);
      wakeStream();
    });

    const control = $('#scope-control');
    control.addEventListener('click', (e) => {
      const b = e.target.closest('button[data-scope]');
      if (b) selectScope(b.dataset.scope);
    });
    control.addEventListener('keydown', (e) => {
      if (!['ArrowLeft', 'ArrowRight', 'ArrowUp', 'ArrowDown'].includes(e.key)) return;
      const visible = [...control.querySelectorAll('button[data-scope]')].filter((b) => !b.hidden);
      const i = visible.indexOf(document.activeElement);
      if (i < 0) return;
      e.preventDefault();
      const next = visible[(i + (e.key === 'ArrowLeft' || e.key === 'ArrowUp' ? -1 : 1) + visible.length) % visible.length];
      next.focus();
      selectScope(next.dataset.scope);
    });

    $('#token-form').addEventListener('submit', (e) => {
      e.preventDefault();
      const token = normaliseToken($('#token-input').value);
      if (!token) return;
      store.set(TOKEN_KEY, token);
      $('#token-input').value = '';
      restart();
    });
    $('#token-clear').addEventListener('click', () => {
      store.remove(TOKEN_KEY);
      $('#token-input').value = '';
      restart();
    });
    // Switching user: forget a stored token, so the new login's cookie is what counts.
    $('#switch-user').addEventListener('click', () => store.remove(TOKEN_KEY));

    window.addEventListener('online', () => {
      refresh.request(null, true);
      wakeStream();
    });
    document.addEventListener('visibilitychange', () => {
      if (document.visibilityState === 'visible' && !state.authRequired) refresh.request(null, true);
    });
    setInterval(() => {
      if (!state.authRequired) refresh.request(null, true);
    }, FALLBACK_REFRESH_MS);
    setInterval(tickTimes, 30000);
  }

  function restart() {
    stopStream();
    loadSeq += 1; // drop answers of the old identity
    Object.assign(state, {
      token: null, claims: null, me: null, role: null, scopes: null, scope: null,
      widget: null, authRequired: false, disabled: false,
    });
    live.lastEventId = null;
    live.everOpen = false;
    ui.login.hidden = true;
    ui.widget.hidden = false;
    ui.widget.classList.add('is-loading');
    ui.widget.setAttribute('aria-busy', 'true');
    start();
  }

  async function loadMe() {
    try {
      const res = await api(API.me);
      if (!res.ok) return null; // 404: not implemented; 401 is handled by the widget request
      const me = await res.json();
      return me && typeof me === 'object' ? me : null;
    } catch (_) {
      return null;
    }
  }

  async function start() {
    state.token = normaliseToken(store.get(TOKEN_KEY));
    takeTokenFromHash();
    state.claims = state.token ? decodeClaims(state.token) : null;
    if (state.claims) {
      const c = state.claims;
      state.claims.roleGuess = effectiveRole(
        [].concat(c.roles || [], (c.realm_access && c.realm_access.roles) || [], c.role || []));
    }
    renderWho();

    state.me = await loadMe();
    state.role = effectiveRole(state.me && state.me.role) || (state.claims && state.claims.roleGuess) || null;
    if (state.role) {
      state.scopes = ROLE_SCOPES[state.role].slice();
      const saved = store.get(SCOPE_KEY);
      state.scope = saved && state.scopes.includes(saved) ? saved : ROLE_DEFAULT_SCOPE[state.role];
    }
    renderWho();
    renderScopeControl();
    refresh.now();
  }

  bindUi();
  start();
})();
