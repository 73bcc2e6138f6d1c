// zhuge web page: fleet overview, VM view, host view with drain planning.
// Plain JS, no build step. All data comes from the API that serves this page
// (same origin); Chart.js is vendored under /static/vendor/.
'use strict';

(() => {
  const TOKEN_KEY = 'zhugeToken';
  const CANDIDATES_N = 20;
  const DAY_S = 24 * 3600;
  const COLORS = {
    accent: '#1f6feb', ok: '#1a7f37', warn: '#d98e04', bad: '#c62828',
    band: 'rgba(26, 127, 55, 0.16)', bandEdge: 'rgba(26, 127, 55, 0.85)',
    cpu: '#1f6feb', cpuFill: 'rgba(31, 111, 235, 0.12)',
    dirty: '#8250df', dirtyFill: 'rgba(130, 80, 223, 0.12)', muted: '#5b6673',
  };

  const state = {
    seq: 0,               // bumped on each navigation: late answers of an old view are dropped
    charts: new Map(),    // canvas key -> Chart, destroyed on navigation (Chart.js holds listeners)
    lastPlan: null,       // the drain plan on screen, exposed for tests as window.zhuge.lastPlan
    memoryToken: null,    // used when localStorage is unavailable (private mode, file policies)
  };

  // ------------------------------------------------------------------ format
  const isNum = (v) => typeof v === 'number' && Number.isFinite(v);
  const pad2 = (n) => String(n).padStart(2, '0');

  /** Epoch seconds -> "2026-12-01 14:05Z" (UTC, truncated to the minute like strftime). */
  function fmtUtc(sec) {
    if (!isNum(sec)) return '–';
    const iso = new Date(sec * 1000).toISOString();
    return `${iso.slice(0, 10)} ${iso.slice(11, 16)}Z`;
  }

  /** Epoch seconds -> "in 3 h 10 min" / "25 min ago" / "now", relative to the browser clock. */
  function fmtRel(sec, nowMs = Date.now()) {
    if (!isNum(sec)) return '';
    const delta = sec - nowMs / 1000;
    const abs = Math.abs(delta);
    if (abs < 60) return 'now';
    const text = fmtSpan(abs);
    return delta > 0 ? `in ${text}` : `${text} ago`;
  }

  /** A duration in seconds as "3 h 10 min", "2 d 4 h", "45 min", "12 s". */
  function fmtSpan(s) {
    if (!isNum(s)) return '–';
    if (s < 60) return `${Math.round(s)} s`;
    const min = Math.floor(s / 60);
    if (min < 60) return `${min} min`;
    const h = Math.floor(min / 60);
    if (h < 24) return min % 60 ? `${h} h ${min % 60} min` : `${h} h`;
    const d = Math.floor(h / 24);
    return h % 24 ? `${d} d ${h % 24} h` : `${d} d`;
  }

  /** Downtime in ms for people: null/non-finite means the migration never converges. */
  function fmtMs(v) {
    if (!isNum(v)) return 'never';
    return `${v < 10 ? v.toFixed(1) : Math.round(v).toLocaleString('en-US')} ms`;
  }

  /** Downtime in ms as a bare number (test hooks parse it): one decimal, or "never". */
  function msNumber(v) {
    return isNum(v) ? String(Math.round(v * 10) / 10) : 'never';
  }

  const fmtPct = (p) => (isNum(p) ? `${Math.round(p * 100)}%` : '–');
  const fmtNum = (v, digits = 1) => (isNum(v) ? v.toFixed(digits) : '–');

  // --------------------------------------------------------------------- DOM
  /** el('a', {href, class, text, dataset, onclick}, ...children): builds nodes, never parses HTML. */
  function el(tag, props = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props)) {
      if (value == null || value === false) continue;
      if (key === 'class') node.className = value;
      else if (key === 'text') node.textContent = value;
      else if (key === 'dataset') Object.assign(node.dataset, value);
      else if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? '' : String(value));
    }
    for (const child of children.flat(Infinity)) {
      if (child == null || child === false) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  /** Replaces a node's children; like el(), it flattens arrays and skips null/false. */
  function fill(node, ...children) {
    node.replaceChildren(...children.flat(Infinity).filter((c) => c != null && c !== false));
    return node;
  }

  const $ = (sel) => document.querySelector(sel);
  const vmHref = (vm) => `#/vm/${encodeURIComponent(vm)}`;
  const hostHref = (host) => `#/host/${encodeURIComponent(host)}`;
  const vmLink = (vm) => el('a', { href: vmHref(vm), text: vm });
  const hostLink = (host) => (host ? el('a', { href: hostHref(host), text: host }) : '–');

  /** A UTC time with its relative form beside it; the ISO time as tooltip. */
  function timeNode(sec, id) {
    if (!isNum(sec)) return el('span', { id, text: '–' });
    return el('span', { id, title: new Date(sec * 1000).toISOString(), dataset: { ts: String(sec) } },
      fmtUtc(sec), el('span', { class: 'rel', text: fmtRel(sec) }));
  }

  function downtimeNode(ms, id) {
    return el('span', { id, class: isNum(ms) ? null : 'never', text: fmtMs(ms) });
  }

  function windowText(start, end) {
    if (!isNum(start)) return 'none';
    return isNum(end) ? `${fmtUtc(start)} – ${fmtUtc(end)}` : fmtUtc(start);
  }

  /**
   * A table from column specs {label, num, cell(row) -> Node|string}; rowProps(row) gives
   * the <tr> attributes (data-* hooks for tests).
   */
  function table(id, columns, rows, rowProps = () => ({})) {
    const head = el('tr', {}, columns.map((c) => el('th', { class: c.num ? 'num' : null, text: c.label })));
    const body = rows.map((row) => el('tr', rowProps(row),
      columns.map((c) => el('td', { class: c.num ? 'num' : null }, c.cell(row)))));
    const empty = rows.length ? null
      : el('tr', { class: 'empty' }, el('td', { colspan: columns.length, class: 'muted', text: 'none' }));
    // The "none" row lives in <tfoot> so that `tbody tr` counts only data rows.
    return el('div', { class: 'table-wrap' },
      el('table', { id }, el('thead', {}, head), el('tbody', {}, body), empty && el('tfoot', {}, empty)));
  }

  function card(label, valueNode, sub, tone) {
    return el('div', { class: `card ${tone || ''}` },
      el('div', { class: 'label', text: label }), el('div', { class: 'value' }, valueNode),
      sub && el('div', { class: 'sub', text: sub }));
  }

  // -------------------------------------------------------------------- auth
  function getToken() {
    try { return localStorage.getItem(TOKEN_KEY) || state.memoryToken; } catch { return state.memoryToken; }
  }

  function setToken(token) {
    state.memoryToken = token || null;
    try {
      if (token) localStorage.setItem(TOKEN_KEY, token); else localStorage.removeItem(TOKEN_KEY);
    } catch { /* memoryToken still holds it for this page load */ }
  }

  /**
   * A `token` parameter in the fragment (`#/?token=abc`) is stored once, then removed from
   * the address bar so that it is not bookmarked, shared or left in the history.
   */
  function takeTokenFromHash() {
    const raw = location.hash.replace(/^#/, '');
    const q = raw.indexOf('?');
    if (q < 0) return;
    const params = new URLSearchParams(raw.slice(q + 1));
    if (!params.has('token')) return;
    setToken(params.get('token'));
    params.delete('token');
    const rest = params.toString();
    history.replaceState(null, '', `#${raw.slice(0, q) || '/'}${rest ? `?${rest}` : ''}`);
  }

  function showAuth(reason) {
    const hadToken = Boolean(getToken());
    $('#auth-message').textContent = hadToken
      ? `The stored token was rejected (${reason}). Enter another one.`
      : `This API requires a bearer token (${reason}). Enter it below; it is kept in this browser's localStorage.`;
    $('#auth').hidden = false;
    $('#auth-token').focus();
  }

  // --------------------------------------------------------------------- API
  class ApiError extends Error {
    constructor(status, code, reason) {
      super(reason);
      this.status = status;
      this.code = code;
      this.reason = reason;
    }
  }

  /** The reason of an error body: ours is {error, reason}; FastAPI's own is {detail}. */
  function reasonOf(data, res) {
    if (data && typeof data.reason === 'string') return data.reason;
    if (data && typeof data.detail === 'string') return data.detail;
    if (data && data.detail) return JSON.stringify(data.detail);
    return `${res.status} ${res.statusText || 'error'}`;
  }

  async function api(path, { method = 'GET', body } = {}) {
    const headers = { Accept: 'application/json' };
    const token = getToken();
    if (token) headers.Authorization = `Bearer ${token}`;
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    let res;
    try {
      res = await fetch(path, {
        method, headers, cache: 'no-store', body: body === undefined ? undefined : JSON.stringify(body),
      });
    } catch (err) {
      throw new ApiError(0, 'network', `cannot reach the API (${method} ${path}): ${err.message}`);
    }
    const text = await res.text();
    let data = null;
    let parsed = true;
    try { data = text ? JSON.parse(text) : null; } catch { parsed = false; }
    if (!res.ok) {
      throw new ApiError(res.status, (data && data.error) || 'http', reasonOf(data, res));
    }
    if (!parsed) {
      // Python's json writes NaN/Infinity, which JSON.parse refuses: the API must send null.
      throw new ApiError(res.status, 'bad_json', `the API answered ${path} with invalid JSON`);
    }
    return data;
  }

  // ------------------------------------------------------------------ errors
  function clearError() {
    const box = $('#error');
    box.hidden = true;
    box.textContent = '';
  }

  /** Shows an error in #error; `what` names the object (e.g. "VM x") so the message says which. */
  function showError(err, what) {
    const reason = err instanceof ApiError ? err.reason : String(err && err.message ? err.message : err);
    const status = err instanceof ApiError && err.status ? ` (HTTP ${err.status})` : '';
    const box = $('#error');
    box.textContent = `${what ? `${what}: ` : ''}${reason}${status}`;
    box.hidden = false;
    if (err instanceof ApiError && err.status === 401) showAuth(reason);
  }

  // ------------------------------------------------------------------ charts
  function destroyCharts() {
    for (const chart of state.charts.values()) chart.destroy();
    state.charts.clear();
  }

  function makeChart(key, canvas, config) {
    const old = state.charts.get(key);
    if (old) old.destroy();
    const chart = new Chart(canvas, config);
    state.charts.set(key, chart);
    return chart;
  }

  /** A tick step (ms) giving at most ~12 ticks, on round UTC boundaries. */
  function tickStep(spanMs) {
    const steps = [15, 30, 60, 120, 180, 360, 720, 1440, 2880, 10080].map((m) => m * 60000);
    return steps.find((s) => spanMs / s <= 12) || steps[steps.length - 1];
  }

  /** UTC tick label: "HH:MM", with the date at midnight and on the first tick. */
  function fmtTick(ms, index) {
    const d = new Date(ms);
    const hm = `${pad2(d.getUTCHours())}:${pad2(d.getUTCMinutes())}`;
    const md = `${pad2(d.getUTCMonth() + 1)}-${pad2(d.getUTCDate())}`;
    if (index === 0) return `${md} ${hm}Z`;
    return hm === '00:00' ? md : hm;
  }

  /**
   * A linear x axis over epoch ms with UTC labels: no date adapter needed. Ticks are
   * rebuilt on multiples of the step (epoch multiples of whole hours are UTC hours).
   */
  function timeAxis(minMs, maxMs, extra = {}) {
    const step = tickStep(maxMs - minMs);
    return {
      type: 'linear', min: minMs, max: maxMs,
      afterBuildTicks: (axis) => {
        const ticks = [];
        for (let v = Math.ceil(minMs / step) * step; v <= maxMs; v += step) ticks.push({ value: v });
        axis.ticks = ticks;
      },
      ticks: { callback: (v, i) => fmtTick(v, i), maxRotation: 0, autoSkip: true },
      title: { display: true, text: 'time (UTC)' },
      ...extra,
    };
  }

  /**
   * Inline plugin: vertical lines at x values (epoch ms) across the chart area, each label
   * in the padding above the area (so it never covers data), flipped left near the right edge.
   */
  function verticalLines(lines) {
    return {
      id: 'zhugeVerticalLines',
      afterDatasetsDraw(chart) {
        const { ctx, chartArea: area, scales: { x } } = chart;
        ctx.save();
        ctx.font = '11px system-ui, sans-serif';
        ctx.textBaseline = 'bottom';
        for (const line of lines) {
          const px = x.getPixelForValue(line.x);
          if (!isNum(px) || px < area.left - 1 || px > area.right + 1) continue;
          ctx.strokeStyle = line.color;
          ctx.lineWidth = line.width || 1.5;
          ctx.setLineDash(line.dash || []);
          ctx.beginPath();
          ctx.moveTo(px, area.top);
          ctx.lineTo(px, area.bottom);
          ctx.stroke();
          if (line.label) {
            const width = ctx.measureText(line.label).width;
            const fitsRight = px + 4 + width <= area.right;
            ctx.fillStyle = line.color;
            ctx.fillText(line.label, fitsRight ? px + 4 : px - 4 - width, area.top - 3);
          }
        }
        ctx.restore();
      },
    };
  }

  /** An axis maximum on a round number (1000 rather than 987.3), so the top tick reads well. */
  function niceCeil(v) {
    const step = 10 ** Math.floor(Math.log10(v)) / 2;
    return Math.ceil(v / step) * step;
  }

  /** Inline plugin: a text label right of each floating bar (left of it where it would overflow). */
  function barLabels(texts) {
    return {
      id: 'zhugeBarLabels',
      afterDatasetsDraw(chart) {
        const { ctx, chartArea: area } = chart;
        const bars = chart.getDatasetMeta(0).data;
        ctx.save();
        ctx.font = '11px system-ui, sans-serif';
        ctx.fillStyle = '#1d232b';
        ctx.textBaseline = 'middle';
        bars.forEach((bar, i) => {
          const text = texts[i];
          const right = Math.max(bar.x, bar.base);
          const left = Math.min(bar.x, bar.base);
          const width = ctx.measureText(text).width;
          const x = right + 4 + width <= area.right ? right + 4 : Math.max(area.left + 2, left - 4 - width);
          ctx.fillText(text, x, bar.y);
        });
        ctx.restore();
      },
    };
  }

  const baseOptions = () => ({
    animation: false,              // drawn synchronously: data-ready means "pixels are there"
    layout: { padding: { top: 16 } },  // room for the vertical lines' labels
    responsive: true,
    maintainAspectRatio: false,
    interaction: { mode: 'nearest', axis: 'x', intersect: false },
  });

  function downtimeChart(canvas, curve, score, targetMs) {
    const t0 = curve.t0;
    const end = t0 + DAY_S;
    const line = [];
    const never = [];
    let maxFinite = 0;
    curve.ts.forEach((t, i) => {
      if (!(t >= t0 && t < end)) return;
      const v = curve.downtime_ms[i];
      if (isNum(v)) {
        line.push({ x: t * 1000, y: v });
        maxFinite = Math.max(maxFinite, v);
      } else {
        line.push({ x: t * 1000, y: null });  // a gap: the migration does not converge there
        never.push(t * 1000);
      }
    });
    const ymax = niceCeil(Math.max(maxFinite, isNum(targetMs) ? targetMs : 0, 1) * 1.1);
    const xmin = t0 * 1000;
    const xmax = Math.max(end * 1000 - curve.slot_s * 1000, xmin + 1);
    const datasets = [];
    const lines = [];
    if (isNum(score.best_start)) {
      const bs = score.best_start * 1000;
      // At least one slot wide: a window whose end equals its start would be an invisible band.
      const be = Math.max(isNum(score.best_end) ? score.best_end : 0, score.best_start + curve.slot_s) * 1000;
      // The band is a two-point line at the top of the axis filled down to zero.
      datasets.push({
        label: 'recommended window', data: [{ x: bs, y: ymax }, { x: be, y: ymax }],
        fill: 'origin', backgroundColor: COLORS.band, borderWidth: 0, pointRadius: 0, tooltip: false,
      });
      lines.push({ x: bs, color: COLORS.bandEdge, label: 'recommended window' }, { x: be, color: COLORS.bandEdge });
    }
    datasets.push({
      label: 'predicted downtime (ms)', data: line, borderColor: COLORS.accent, backgroundColor: COLORS.accent,
      borderWidth: 2, pointRadius: 0, pointHoverRadius: 4, spanGaps: false, tension: 0,
    });
    if (never.length) {
      datasets.push({
        label: 'never converges', data: never.map((x) => ({ x, y: ymax })), showLine: false,
        pointStyle: 'crossRot', pointRadius: 4, borderColor: COLORS.bad, backgroundColor: COLORS.bad, never: true,
      });
    }
    if (isNum(targetMs)) {
      datasets.push({
        label: `target ${fmtMs(targetMs)}`, data: [{ x: xmin, y: targetMs }, { x: xmax, y: targetMs }],
        borderColor: COLORS.warn, borderDash: [6, 4], borderWidth: 1.5, pointRadius: 0, tooltip: false,
      });
    }
    return makeChart('downtime', canvas, {
      type: 'line',
      data: { datasets },
      options: {
        ...baseOptions(),
        scales: {
          x: timeAxis(xmin, xmax),
          y: { beginAtZero: true, max: ymax, title: { display: true, text: 'downtime (ms)' } },
        },
        plugins: {
          legend: { position: 'bottom' },
          tooltip: {
            filter: (item) => item.dataset.tooltip !== false,
            callbacks: {
              title: (items) => (items.length ? fmtUtc(items[0].parsed.x / 1000) : ''),
              label: (item) => (item.dataset.never ? 'never converges' : `downtime ${fmtMs(item.parsed.y)}`),
            },
          },
        },
      },
      plugins: [verticalLines(lines)],
    });
  }

  function forecastChart(canvas, forecast) {
    const xs = forecast.ts.map((t) => t * 1000);
    const series = (values) => xs.map((x, i) => ({ x, y: isNum(values[i]) ? values[i] : null }));
    const q = (metric, name) => (forecast[metric] && forecast[metric][name]) || [];
    // q90 fills down to its q50 (fill: '-1'), so each band is the q50..q90 spread.
    const datasets = [
      { label: 'cpu % q50', data: series(q('cpu_pct', 'q50')), yAxisID: 'cpu', borderColor: COLORS.cpu },
      {
        label: 'cpu % q90', data: series(q('cpu_pct', 'q90')), yAxisID: 'cpu', borderColor: COLORS.cpu,
        borderDash: [5, 4], fill: '-1', backgroundColor: COLORS.cpuFill,
      },
      { label: 'dirty MB/s q50', data: series(q('dirty_mbps', 'q50')), yAxisID: 'dirty', borderColor: COLORS.dirty },
      {
        label: 'dirty MB/s q90', data: series(q('dirty_mbps', 'q90')), yAxisID: 'dirty', borderColor: COLORS.dirty,
        borderDash: [5, 4], fill: '-1', backgroundColor: COLORS.dirtyFill,
      },
    ].map((d) => ({ borderWidth: 2, pointRadius: 0, pointHoverRadius: 3, tension: 0, ...d }));
    const xmin = xs.length ? xs[0] : 0;
    const xmax = xs.length > 1 ? xs[xs.length - 1] : xmin + 3600000;
    return makeChart('forecast', canvas, {
      type: 'line',
      data: { datasets },
      options: {
        ...baseOptions(),
        scales: {
          x: timeAxis(xmin, xmax),
          cpu: { position: 'left', beginAtZero: true, title: { display: true, text: 'cpu %' } },
          dirty: {
            position: 'right', beginAtZero: true, grid: { drawOnChartArea: false },
            title: { display: true, text: 'dirty MB/s' },
          },
        },
        plugins: {
          legend: { position: 'bottom' },
          tooltip: { callbacks: { title: (items) => (items.length ? fmtUtc(items[0].parsed.x / 1000) : '') } },
        },
      },
    });
  }

  function drainTimeline(canvas, plan, vms, targetMs) {
    const color = (ms) => {
      if (!isNum(ms)) return COLORS.bad;
      return isNum(targetMs) && ms > targetMs ? COLORS.warn : COLORS.ok;
    };
    const ends = vms.map((v) => v.end).filter(isNum);
    const xmin = plan.t0 * 1000;
    const last = Math.max(isNum(plan.deadline) ? plan.deadline : plan.t0, ...ends);
    const xmax = xmin + Math.max(last * 1000 - xmin, 60000) * 1.04;
    const lines = [{ x: xmin, color: COLORS.muted, label: 'start of plan' }];
    if (isNum(plan.deadline)) {
      lines.push({ x: plan.deadline * 1000, color: COLORS.bad, dash: [6, 4], label: 'deadline' });
    }
    const labels = vms.map((v) => `${fmtMs(v.downtime_ms)} · ${fmtNum(v.bw_mbps, 0)} MB/s`);
    return makeChart('timeline', canvas, {
      type: 'bar',
      data: {
        labels: vms.map((v) => v.vm),
        datasets: [{
          label: 'migration', data: vms.map((v) => [v.start * 1000, v.end * 1000]),
          backgroundColor: vms.map((v) => color(v.downtime_ms)), borderRadius: 3,
          barPercentage: 0.8, categoryPercentage: 0.9, borderSkipped: false,
          minBarLength: 4,  // migrations of seconds on an hours-long axis must stay visible
        }],
      },
      options: {
        ...baseOptions(),
        indexAxis: 'y',
        interaction: { mode: 'nearest', axis: 'y', intersect: true },
        scales: {
          x: timeAxis(xmin, xmax),
          y: { type: 'category', ticks: { autoSkip: false, font: { size: 11 } } },
        },
        plugins: {
          legend: { display: false },
          tooltip: {
            callbacks: {
              label: (item) => {
                const v = vms[item.dataIndex];
                return `${fmtUtc(v.start)} → ${fmtUtc(v.end)} (${fmtSpan(v.duration_s)}), `
                  + `downtime ${fmtMs(v.downtime_ms)}, ${fmtNum(v.bw_mbps, 0)} MB/s`;
              },
            },
          },
        },
      },
      plugins: [verticalLines(lines), barLabels(labels)],
    });
  }

  // ------------------------------------------------------------------- views
  const scoreColumns = {
    vm: { label: 'VM', cell: (r) => vmLink(r.vm) },
    host: { label: 'host', cell: (r) => hostLink(r.host) },
    now: { label: 'downtime now', num: true, cell: (r) => downtimeNode(r.now_downtime_ms) },
    nowP: { label: 'p_ok now', num: true, cell: (r) => fmtPct(r.now_p_ok) },
    window: { label: 'recommended window', cell: (r) => windowCell(r) },
    best: { label: 'window downtime', num: true, cell: (r) => downtimeNode(r.best_downtime_ms) },
    bestP: { label: 'p_ok', num: true, cell: (r) => fmtPct(r.p_ok) },
    rule: { label: 'rule', cell: (r) => r.window_rule || '–' },
    updated: { label: 'updated', cell: (r) => timeNode(r.updated) },
  };

  function windowCell(r) {
    if (!isNum(r.best_start)) return el('span', { class: 'muted', text: 'none' });
    return el('span', {}, windowText(r.best_start, r.best_end), el('span', { class: 'rel', text: fmtRel(r.best_start) }));
  }

  const scoreRowProps = (r) => ({ dataset: { vm: r.vm, nowDowntimeMs: isNum(r.now_downtime_ms) ? String(r.now_downtime_ms) : '' } });

  async function renderFleet(ctx) {
    const [fleet, cands, hosts] = await Promise.all([
      api('/v1/fleet'), api(`/v1/candidates?n=${CANDIDATES_N}`), api('/v1/hosts'),
    ]);
    if (!ctx.current()) return;
    const c = scoreColumns;
    const hostRows = [...hosts.hosts].sort((a, b) => String(a.host).localeCompare(String(b.host)));
    fill(ctx.view,
      el('h1', { text: 'Fleet' }),
      el('div', { class: 'cards' },
        card('VMs scored', el('span', { id: 'fleet-vms', text: String(fleet.vms) }),
          `on ${fleet.hosts} hosts · target ${fmtMs(fleet.target_ms)}`),
        card('within target now', el('span', { id: 'fleet-now', text: String(fleet.now_within_target) }),
          'can migrate right away', 'ok'),
        card('only in their window', el('span', { id: 'fleet-window', text: String(fleet.window_within_target) }),
          'wait for the recommended window', 'warn'),
        card('not at all', el('span', { id: 'fleet-never', text: String(fleet.not_at_all) }),
          'no slot within the target', 'bad')),
      el('h2', { text: `Best ${CANDIDATES_N} candidates to migrate now` }),
      table('candidates', [c.vm, c.host, c.now, c.nowP, c.window, c.best, c.bestP, c.rule],
        cands.candidates, scoreRowProps),
      el('h2', { text: `Hosts (${hostRows.length})` }),
      table('hosts', [
        { label: 'host', cell: (h) => hostLink(h.host) },
        { label: 'VMs', num: true, cell: (h) => String(h.vms) },
      ], hostRows, (h) => ({ dataset: { host: h.host } })),
    );
    ctx.view.querySelector('#candidates').dataset.n = String(CANDIDATES_N);
    ctx.ready();
  }

  function vmFields(s) {
    const rows = [
      ['downtime now', downtimeNode(s.now_downtime_ms, 'vm-now-downtime')],
      ['p_ok now', fmtPct(s.now_p_ok)],
      ['migration time now', fmtSpan(s.now_total_s)],
      ['recommended start', timeNode(s.best_start, 'vm-best-start')],
      ['recommended end', timeNode(s.best_end)],
      ['window downtime', downtimeNode(s.best_downtime_ms)],
      ['window p_ok', fmtPct(s.p_ok)],
      ['window rule', s.window_rule || '–'],
      ['strict minimum', `${windowText(s.min_start, s.min_end)} · ${fmtMs(s.min_downtime_ms)} · p_ok ${fmtPct(s.min_p_ok)}`],
      ['model', s.model || '–'],
      ['last sample', timeNode(s.last_ts)],
      ['scored', timeNode(s.updated)],
    ];
    return el('dl', { class: 'fields' }, rows.map(([k, v]) => [el('dt', { text: k }), el('dd', {}, v)]));
  }

  function chartPanel(title, canvasId, note) {
    return el('div', { class: 'panel' }, el('h2', { text: title }), note && el('p', { class: 'muted', text: note }),
      el('div', { class: 'chart-box' }, el('canvas', { id: canvasId, role: 'img', 'aria-label': title })));
  }

  async function renderVm(ctx, vm) {
    const [data, fleet] = await Promise.all([
      api(`/v1/vms/${encodeURIComponent(vm)}`),
      api('/v1/fleet').catch(() => null),  // only for the target line: the VM view works without it
    ]);
    if (!ctx.current()) return;
    const s = data.score || {};
    const targetMs = fleet ? fleet.target_ms : null;
    const curve = data.curve;
    fill(ctx.view,
      el('h1', {}, 'VM ', el('span', { id: 'vm-name', text: data.vm }), el('span', { class: 'muted' }, ' on host '),
        hostLink(s.host)),
      el('div', {}, 'Recommended window: ',
        el('span', {
          id: 'recommended-window', class: 'window-box', text: windowText(s.best_start, s.best_end),
          dataset: { start: isNum(s.best_start) ? String(s.best_start) : '', end: isNum(s.best_end) ? String(s.best_end) : '' },
        }),
        el('span', { class: 'rel', text: `${fmtRel(s.best_start)} · predicted downtime ${fmtMs(s.best_downtime_ms)}` })),
      el('div', { class: 'panel' }, vmFields(s)),
      curve
        ? [chartPanel('Predicted downtime, next 24 h', 'downtime-chart',
          `one point per ${fmtSpan(curve.slot_s)} slot from ${fmtUtc(curve.t0)}; shaded: the recommended window`),
        chartPanel('Forecast (q50 solid, q90 dashed)', 'forecast-chart')]
        : el('p', { class: 'muted', text: 'No curve stored for this VM yet: charts appear after its next scoring.' }),
    );
    if (curve) {
      downtimeChart($('#downtime-chart'), curve, s, targetMs);
      if (curve.forecast && curve.forecast.ts) forecastChart($('#forecast-chart'), curve.forecast);
    }
    ctx.ready();
  }

  function drainForm(ctx, host, targetMs) {
    const status = el('span', { id: 'drain-status', class: 'muted' });
    const form = el('form', { id: 'drain-form', class: 'drain' },
      el('label', {}, 'deadline (hours from now)',
        el('input', { id: 'drain-deadline-h', name: 'deadline_h', type: 'number', min: '0.25', step: '0.25', value: '6', required: true })),
      el('label', {}, 'max concurrent migrations (K)',
        el('input', { id: 'drain-k', name: 'max_concurrent', type: 'number', min: '1', step: '1', value: '2', required: true })),
      el('button', { type: 'submit', id: 'drain-submit', text: 'plan drain' }),
      status);
    form.addEventListener('submit', async (event) => {
      event.preventDefault();
      const hours = Number($('#drain-deadline-h').value);
      const k = Number($('#drain-k').value);
      if (!(hours > 0) || !(Number.isInteger(k) && k >= 1)) {
        showError(new Error('deadline must be > 0 hours and K a whole number >= 1'), `drain ${host}`);
        return;
      }
      clearError();
      ctx.busy();  // data-ready="0" while the plan is computed, "1" once it is drawn
      form.querySelector('button').disabled = true;
      status.textContent = 'planning…';
      try {
        const plan = await api('/v1/drain', { method: 'POST', body: { host, deadline_s: hours * 3600, max_concurrent: k } });
        if (!ctx.current()) return;
        renderPlan($('#drain-plan'), plan, targetMs);
        status.textContent = `planned ${fmtUtc(plan.created)}`;
        ctx.ready();
      } catch (err) {
        if (!ctx.current()) return;
        status.textContent = '';
        showError(err, `drain ${host}`);
        ctx.failed();
      } finally {
        form.querySelector('button').disabled = false;
      }
    });
    return form;
  }

  /**
   * A baseline's total: a baseline total counts its converging VMs only, so one that leaves
   * VMs unconverged or late is not a valid drain and its total is not comparable with the
   * plan's. Such a card says so (tone "bad", data-feasible="0").
   */
  function baselineCard(label, b, id) {
    if (!b) return card(label, el('span', { id, class: 'num', text: 'never' }), 'not computed');
    const feasible = b.not_converged === 0 && b.late === 0;
    const value = el('span', {},
      el('span', { id, class: 'num', dataset: { feasible: feasible ? '1' : '0' }, text: msNumber(b.total_downtime_ms) }), ' ms');
    const sub = `worst ${fmtMs(b.worst_downtime_ms)} · ${fmtSpan(b.makespan_s)} · `
      + (feasible ? 'valid drain' : `not a valid drain: ${b.not_converged} not converged, ${b.late} late `
        + '(total of converging VMs only)');
    return card(label, value, sub, feasible ? null : 'bad');
  }

  function renderPlan(box, plan, targetMs) {
    state.lastPlan = plan;
    const vms = [...(plan.vms || [])].sort((a, b) => a.start - b.start || a.order - b.order);
    const base = plan.baselines || {};
    const baseCard = (label, b, id) => baselineCard(label, b, id);
    const solver = plan.solver || {};
    const height = Math.max(160, 26 * vms.length + 70);
    const unplaced = plan.unplaced || [];
    fill(box,
      el('p', { class: 'muted' },
        `plan of ${fmtUtc(plan.created)} · from ${fmtUtc(plan.t0)} to deadline ${fmtUtc(plan.deadline)} (${fmtRel(plan.deadline)})`
        + ` · K = ${plan.max_concurrent} · link ${fmtNum(plan.link_mbps, 0)} MB/s · slot ${fmtSpan(plan.slot_s)}`
        + ` · solver ${solver.strategy || '?'} ${solver.status || ''} in ${fmtNum(solver.wall_s, 2)} s`
        + (isNum(solver.lower_bound_ms) ? ` · lower bound ${fmtMs(solver.lower_bound_ms)}` : '')),
      el('div', { class: 'totals' },
        card('plan total downtime',
          el('span', {}, el('span', { id: 'drain-total', class: 'num', text: msNumber(plan.total_downtime_ms) }), ' ms'),
          `worst ${fmtMs(plan.worst_downtime_ms)} · makespan ${fmtSpan(plan.makespan_s)}`, 'ok'),
        baseCard('baseline: all now', base.all_now, 'drain-baseline-all-now'),
        baseCard('baseline: one after another', base.sequential, 'drain-baseline-sequential')),
      el('div', { class: 'chart-box' },
        el('canvas', { id: 'drain-timeline', role: 'img', 'aria-label': 'drain timeline' })),
      el('h2', { text: `Planned migrations (${vms.length})` }),
      table('drain-vms', [
        { label: '#', num: true, cell: (v) => String(v.order) },
        { label: 'VM', cell: (v) => vmLink(v.vm) },
        { label: 'start', cell: (v) => timeNode(v.start) },
        { label: 'end', cell: (v) => timeNode(v.end) },
        { label: 'duration', num: true, cell: (v) => fmtSpan(v.duration_s) },
        { label: 'downtime', num: true, cell: (v) => downtimeNode(v.downtime_ms) },
        { label: 'bandwidth', num: true, cell: (v) => `${fmtNum(v.bw_mbps, 0)} MB/s` },
      ], vms, (v) => ({ dataset: { vm: v.vm } })),
      el('h2', { text: `Unplaced VMs (${unplaced.length})` }),
      el('ul', { id: 'drain-unplaced', class: 'unplaced' },
        unplaced.map((u) => el('li', { dataset: { vm: u.vm } }, vmLink(u.vm), `: ${u.reason}`))),
      unplaced.length ? null : el('p', { class: 'muted', text: 'every VM of the host is placed before the deadline' }),
    );
    // Sized through CSSOM (not a style attribute) so a strict Content-Security-Policy allows it.
    box.querySelector('.chart-box').style.height = `${height}px`;
    if (vms.length) drainTimeline($('#drain-timeline'), plan, vms, targetMs);
  }

  async function renderHost(ctx, host) {
    const [data, fleet] = await Promise.all([
      api(`/v1/hosts/${encodeURIComponent(host)}`),
      api('/v1/fleet').catch(() => null),
    ]);
    if (!ctx.current()) return;
    const c = scoreColumns;
    const targetMs = fleet ? fleet.target_ms : null;
    fill(ctx.view,
      el('h1', {}, 'Host ', el('span', { id: 'host-name', text: data.host })),
      el('h2', { text: `VMs (${data.vms.length})` }),
      table('host-vms', [c.vm, c.now, c.nowP, c.window, c.best, c.bestP, c.rule, c.updated], data.vms, scoreRowProps),
      el('div', { class: 'panel' },
        el('h2', { text: 'Drain this host' }),
        el('p', { class: 'muted', text: 'Plans when to migrate each VM off this host before the deadline, '
          + 'at most K at a time, to minimise the total downtime.' }),
        drainForm(ctx, data.host, targetMs),
        el('div', { id: 'drain-plan' }, data.drain ? null : el('p', { class: 'muted', text: 'no plan yet' }))),
    );
    if (data.drain) renderPlan($('#drain-plan'), data.drain, targetMs);
    ctx.ready();
  }

  // ----------------------------------------------------------------- routing
  /** "#/", "#/vm/<id>", "#/host/<host>" (an optional "?..." part is ignored here). */
  function parseRoute(hash) {
    const raw = hash.replace(/^#/, '');
    const q = raw.indexOf('?');
    const parts = (q < 0 ? raw : raw.slice(0, q)).split('/').filter(Boolean);
    const decode = (p) => { try { return decodeURIComponent(p); } catch { return p; } };
    if (parts[0] === 'vm' && parts.length > 1) return { view: 'vm', id: decode(parts.slice(1).join('/')) };
    if (parts[0] === 'host' && parts.length > 1) return { view: 'host', id: decode(parts.slice(1).join('/')) };
    return { view: 'fleet' };
  }

  const VIEWS = {
    fleet: { render: (ctx) => renderFleet(ctx), what: () => 'fleet' },
    vm: { render: (ctx, r) => renderVm(ctx, r.id), what: (r) => `VM ${r.id}` },
    host: { render: (ctx, r) => renderHost(ctx, r.id), what: (r) => `host ${r.id}` },
  };

  /** The view's context: whether it is still the one on screen, and its data-ready states. */
  function viewContext(seq, view) {
    const current = () => seq === state.seq;
    const mark = (value) => { if (current()) view.dataset.ready = value; };
    return {
      view, current, ready: () => mark('1'), busy: () => mark('0'), failed: () => mark('error'),
    };
  }

  async function route() {
    takeTokenFromHash();
    const r = parseRoute(location.hash);
    const seq = ++state.seq;
    const view = $('#view');
    destroyCharts();
    state.lastPlan = null;
    clearError();
    view.dataset.view = r.view;
    view.dataset.ready = '0';
    view.replaceChildren(el('p', { class: 'loading', text: 'loading…' }));
    const ctx = viewContext(seq, view);
    try {
      if (typeof Chart === 'undefined') throw new Error('Chart.js did not load (/static/vendor/chart.umd.min.js)');
      await VIEWS[r.view].render(ctx, r);
    } catch (err) {
      if (!ctx.current()) return;
      view.replaceChildren();
      showError(err, VIEWS[r.view].what(r));
      ctx.failed();  // data-ready="error": tests fail at once with #error instead of timing out
    }
  }

  // -------------------------------------------------------------------- boot
  function boot() {
    $('#auth-form').addEventListener('submit', (event) => {
      event.preventDefault();
      setToken($('#auth-token').value.trim());
      $('#auth-token').value = '';
      $('#auth').hidden = true;
      route();
    });
    $('#auth-forget').addEventListener('click', () => {
      setToken(null);
      $('#auth-message').textContent = 'Stored token removed.';
    });
    $('#goto-vm').addEventListener('submit', (event) => {
      event.preventDefault();
      const id = $('#goto-vm-id').value.trim();
      if (id) location.hash = vmHref(id);
    });
    window.addEventListener('hashchange', route);
    route();
  }

  // Hooks for tests and the console; not an API.
  window.zhuge = {
    get lastPlan() { return state.lastPlan; },
    fmtUtc, fmtRel, fmtMs,
  };

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', boot);
  else boot();
})();
