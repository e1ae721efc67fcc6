// Tether's dashboard: plain JS, no build step, no network beyond this server's own API.
// Views: #/runs (list), #/runs/ID (one run, live log), #/workers, #/lanes, #/endpoints.
'use strict';

// ---- small helpers -------------------------------------------------------------------------

const $ = (sel, root = document) => root.querySelector(sel);

// Builds an element; strings become text nodes, so nothing from the API is parsed as HTML.
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === 'class') el.className = v;
    else if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

// Ids are UUIDv7: the head is a timestamp shared by runs made together, the tail is random.
const shortId = id => (id && id.length > 14 ? id.slice(0, 8) + '…' + id.slice(-4) : id || '');

// "850 ms", "42 s", "2 m 10 s", "1 h 4 m", "3 d 2 h".
function human(secs) {
  if (secs === null || secs === undefined || isNaN(secs)) return '—';
  if (secs < 1) return Math.max(0, Math.round(secs * 1000)) + ' ms';
  const s = Math.floor(secs);
  if (s < 60) return s + ' s';
  const m = Math.floor(s / 60);
  if (m < 60) return m + ' m' + (s % 60 ? ' ' + (s % 60) + ' s' : '');
  const hrs = Math.floor(m / 60);
  if (hrs < 24) return hrs + ' h' + (m % 60 ? ' ' + (m % 60) + ' m' : '');
  return Math.floor(hrs / 24) + ' d ' + (hrs % 24) + ' h';
}

// "just now", "12 s ago", "3 min ago", "2 h ago", "Mar 4".
function ago(iso) {
  if (!iso) return '—';
  const secs = (Date.now() - Date.parse(iso)) / 1000;
  if (secs < 5) return 'just now';
  if (secs < 60) return Math.floor(secs) + ' s ago';
  if (secs < 3600) return Math.floor(secs / 60) + ' min ago';
  if (secs < 86400) return Math.floor(secs / 3600) + ' h ago';
  if (secs < 7 * 86400) return Math.floor(secs / 86400) + ' d ago';
  return new Date(iso).toLocaleDateString(undefined, { month: 'short', day: 'numeric' });
}

const exact = iso => (iso ? new Date(iso).toLocaleString() + ' (' + iso + ')' : '');

// A relative time that keeps itself current (see tick()).
const timeEl = iso => h('time', { datetime: iso || '', title: exact(iso), 'data-ago': iso || '' }, ago(iso));

// An age in seconds, measured by the server at `at` (ms, this browser's clock), that ticks.
function ageEl(secs, suffix = '', at = Date.now()) {
  if (secs === null || secs === undefined) return h('span', { class: 'muted' }, '—');
  return h('span', { class: 'tabular', 'data-age': secs, 'data-age-at': at, 'data-suffix': suffix }, human(secs) + suffix);
}

// Re-renders every relative time and ticking age once a second, without refetching.
function tick() {
  const now = Date.now();
  for (const el of document.querySelectorAll('[data-ago]')) {
    if (el.dataset.ago) el.textContent = ago(el.dataset.ago);
  }
  for (const el of document.querySelectorAll('[data-age]')) {
    const secs = Number(el.dataset.age) + (now - Number(el.dataset.ageAt)) / 1000;
    el.textContent = human(secs) + (el.dataset.suffix || '');
  }
}
setInterval(tick, 1000);

const STATUS_CLASS = {
  pending: 'b-idle', claimed: 'b-info', running: 'b-info b-pulse', succeeded: 'b-ok',
  failed: 'b-bad', timed_out: 'b-bad', cancelled: 'b-idle',
};
const LIVENESS_CLASS = {
  waiting: 'b-idle', alive: 'b-ok b-pulse', quiet: 'b-warn', suspect: 'b-warn', lost: 'b-bad', done: 'b-idle',
};
const LIVENESS_HELP = {
  waiting: 'no worker holds it yet',
  alive: 'heartbeats fresh, output recent',
  quiet: 'heartbeats fresh, but nothing printed for a while',
  suspect: 'at least one heartbeat missed',
  lost: 'heartbeat past the stale window: the reaper ends this attempt',
  done: 'finished',
};
const WORKER_CLASS = { active: 'b-ok', suspect: 'b-warn', lost: 'b-bad', draining: 'b-info' };

const statusBadge = s => h('span', { class: 'badge status ' + (STATUS_CLASS[s] || 'b-idle'), 'data-status': s }, s.replace('_', ' '));

function livenessBadge(l, at = Date.now()) {
  if (!l) return '';
  const badge = h('span', { class: 'badge liveness ' + (LIVENESS_CLASS[l.state] || 'b-idle'),
    'data-liveness': l.state, title: LIVENESS_HELP[l.state] || '' }, l.state);
  if (l.state === 'waiting' || l.state === 'done' || l.heartbeat_age_s === null || l.heartbeat_age_s === undefined) {
    return badge;
  }
  return h('span', { class: 'nowrap' }, badge, ' ', h('span', { class: 'muted small' }, 'hb ', ageEl(l.heartbeat_age_s, ' ago', at)));
}

const isTerminal = s => ['succeeded', 'failed', 'cancelled', 'timed_out'].includes(s);

// How long a run ran (or has been running, ticking), or has waited.
function durationEl(run, at) {
  const start = run.started_at || run.claimed_at;
  if (start && run.finished_at) return h('span', { class: 'tabular' }, human((Date.parse(run.finished_at) - Date.parse(start)) / 1000));
  if (start) return ageEl((at - Date.parse(start)) / 1000, '', at);
  if (run.status === 'pending') return h('span', { class: 'muted' }, 'waiting ', ageEl((at - Date.parse(run.created_at)) / 1000, '', at));
  return h('span', { class: 'muted' }, '—');
}

function outcomeEl(run) {
  if (run.error_code) return h('code', { class: 'err', title: run.error_message || '' }, run.error_code + (run.exit_code !== null && run.exit_code !== undefined ? ' (' + run.exit_code + ')' : ''));
  if (run.exit_code !== null && run.exit_code !== undefined) return h('code', {}, 'exit ' + run.exit_code);
  return h('span', { class: 'muted' }, '—');
}

// The argv as a shell would read it back: arguments with spaces or quotes are single-quoted.
const shellJoin = argv => argv.map(a => (/^[\w@%+=:,.\/-]+$/.test(a) ? a : "'" + a.replace(/'/g, "'\\''") + "'")).join(' ');

const labelChips = labels => Object.entries(labels || {}).map(([k, v]) => h('span', { class: 'chip' }, k + '=' + v));

// ---- the API, with the session's token ---------------------------------------------------

const TOKEN_KEY = 'tether_token';
const token = () => sessionStorage.getItem(TOKEN_KEY);

class ApiError extends Error {
  constructor(status, code, message) { super(message); this.status = status; this.code = code; }
}

let tokenWaiters = [];

// Shows the token prompt; resolves when a token was entered.
function askForToken(rejected) {
  const dialog = $('#token-dialog');
  const error = $('#token-error');
  error.hidden = !rejected;
  error.textContent = rejected ? 'That token was refused. Check it and try again.' : '';
  dialog.hidden = false;
  setTimeout(() => $('#token-input').focus(), 0);
  return new Promise(resolve => tokenWaiters.push(resolve));
}

function initTokenDialog() {
  $('#token-form').addEventListener('submit', ev => {
    ev.preventDefault();
    const value = $('#token-input').value.trim();
    if (!value) return;
    sessionStorage.setItem(TOKEN_KEY, value);
    $('#token-input').value = '';
    $('#token-dialog').hidden = true;
    updateTokenUi();
    const waiters = tokenWaiters;
    tokenWaiters = [];
    waiters.forEach(w => w());
  });
  $('#forget-token').addEventListener('click', () => {
    sessionStorage.removeItem(TOKEN_KEY);
    updateTokenUi();
    route();
  });
  updateTokenUi();
}

function updateTokenUi() { $('#forget-token').hidden = !token(); }

function headers(extra) {
  const hs = Object.assign({ Accept: 'application/json' }, extra || {});
  if (token()) hs.Authorization = 'Bearer ' + token();
  return hs;
}

function setConn(ok, text) {
  const el = $('#conn');
  el.className = 'conn ' + (ok ? 'ok' : 'down');
  el.textContent = text;
}

// A JSON call. A 401 asks for the token and retries once it is given.
async function api(path, opts = {}) {
  for (;;) {
    let res;
    try {
      res = await fetch(path, { method: opts.method || 'GET', headers: headers(opts.body ? { 'Content-Type': 'application/json' } : {}), body: opts.body ? JSON.stringify(opts.body) : undefined });
    } catch (e) {
      setConn(false, 'server unreachable');
      throw new ApiError(0, 'unreachable', 'cannot reach the server');
    }
    if (res.status === 401) {
      setConn(false, 'token needed');
      await askForToken(Boolean(token()));
      continue;
    }
    setConn(true, 'connected');
    const text = await res.text();
    let body = null;
    try { body = text ? JSON.parse(text) : null; } catch (e) { body = null; }
    if (!res.ok) {
      const err = body && body.error ? body.error : { code: 'http_' + res.status, message: text || res.statusText };
      throw new ApiError(res.status, err.code, err.message);
    }
    return body;
  }
}

// ---- routing -------------------------------------------------------------------------------

// Each view returns a cleanup function; timers and streams stop when the view changes.
let cleanup = null;
let generation = 0;

function parseHash() {
  const raw = location.hash.replace(/^#/, '') || '/runs';
  const [path, query] = raw.split('?');
  return { parts: path.split('/').filter(Boolean), params: new URLSearchParams(query || '') };
}

function route() {
  if (cleanup) { try { cleanup(); } catch (e) { /* a view that failed to stop is gone anyway */ } }
  cleanup = null;
  generation += 1;
  const { parts, params } = parseHash();
  const view = $('#view');
  view.replaceChildren();
  const name = parts[0] || 'runs';
  for (const a of document.querySelectorAll('[data-nav]')) a.classList.toggle('active', a.dataset.nav === name);
  const ctx = { gen: generation, alive: () => ctx.gen === generation };
  if (name === 'runs' && parts[1]) cleanup = runPage(view, decodeURIComponent(parts[1]), ctx);
  else if (name === 'workers') cleanup = workersPage(view, ctx);
  else if (name === 'lanes') cleanup = lanesPage(view, ctx);
  else if (name === 'endpoints') cleanup = endpointsPage(view, ctx);
  else cleanup = runsPage(view, params, ctx);
}

// Calls `load` now and every `ms` while the view lives; shows failures without stopping.
function poll(ctx, ms, load, onError) {
  let timer = null;
  let stopped = false;
  const run = async () => {
    if (stopped || !ctx.alive()) return;
    try { await load(); } catch (e) { if (onError) onError(e); }
    if (!stopped && ctx.alive()) timer = setTimeout(run, ms);
  };
  run();
  return () => { stopped = true; clearTimeout(timer); };
}

function errorBanner(e) {
  return h('div', { class: 'error-banner', role: 'alert' }, (e.code ? e.code + ': ' : '') + e.message);
}

// ---- runs list -----------------------------------------------------------------------------

const STATUSES = ['pending', 'claimed', 'running', 'succeeded', 'failed', 'cancelled', 'timed_out'];

function runsPage(view, params, ctx) {
  const filters = {
    status: params.get('status') || '', lane: params.get('lane') || '',
    label: params.get('label') || '', q: params.get('q') || '',
  };
  // Cursors of the pages before this one, so "Newer" goes back.
  const cursors = [];
  let cursor = params.get('cursor') || '';
  let nextCursor = null;

  const setFilters = () => {
    const p = new URLSearchParams();
    for (const [k, v] of Object.entries(filters)) if (v) p.set(k, v);
    const hash = '#/runs' + (p.toString() ? '?' + p : '');
    if (location.hash !== hash) location.hash = hash; else route();
  };

  const statusSel = h('select', { id: 'filter-status', 'aria-label': 'status', onchange: e => { filters.status = e.target.value; setFilters(); } },
    h('option', { value: '' }, 'All statuses'), STATUSES.map(s => h('option', { value: s, selected: s === filters.status }, s.replace('_', ' '))));
  const laneSel = h('select', { id: 'filter-lane', 'aria-label': 'lane', onchange: e => { filters.lane = e.target.value; setFilters(); } },
    h('option', { value: '' }, 'All lanes'), filters.lane ? h('option', { value: filters.lane, selected: true }, filters.lane) : null);
  const labelIn = h('input', { id: 'filter-label', class: 'label', type: 'text', placeholder: 'label key=value', value: filters.label, 'aria-label': 'label' });
  const search = h('input', { id: 'filter-q', type: 'search', placeholder: 'Search command or id prefix', value: filters.q, 'aria-label': 'search' });
  let debounce = null;
  const onType = () => {
    clearTimeout(debounce);
    debounce = setTimeout(() => { filters.q = search.value.trim(); filters.label = labelIn.value.trim(); setFilters(); }, 400);
  };
  search.addEventListener('input', onType);
  labelIn.addEventListener('input', onType);

  const tbody = h('tbody', {});
  const table = h('table', { class: 'grid', id: 'runs-table' },
    h('thead', {}, h('tr', {}, ['Run', 'Status', 'Liveness', 'Command', 'Lane', 'Attempt', 'Duration', 'Result', 'Created'].map(t => h('th', {}, t)))),
    tbody);
  const older = h('button', { class: 'btn', id: 'page-older', disabled: true, onclick: () => { cursors.push(cursor); cursor = nextCursor; refresh(); } }, 'Older →');
  const newer = h('button', { class: 'btn', id: 'page-newer', disabled: true, onclick: () => { cursor = cursors.pop() || ''; refresh(); } }, '← Newer');
  const pageInfo = h('span', { class: 'muted small' });
  const errorSlot = h('div', {});
  view.append(
    h('div', { class: 'page-head' }, h('h1', {}, 'Runs'), h('span', { class: 'sub' }, 'newest first · live')),
    h('div', { class: 'filters' }, statusSel, laneSel, labelIn, search),
    errorSlot,
    h('div', { class: 'panel' }, table, h('div', { class: 'pager' }, pageInfo, newer, older)));

  api('/v1/lanes').then(body => {
    for (const lane of body.lanes) {
      if (lane.name !== filters.lane) laneSel.append(h('option', { value: lane.name }, lane.name));
    }
  }).catch(() => {});

  const row = (run, at) => {
    const pending = run.status === 'pending';
    return h('tr', { class: 'clickable', 'data-run-id': run.id, onclick: () => { location.hash = '#/runs/' + run.id; } },
      h('td', { class: 'nowrap', 'data-label': 'run' }, h('a', { href: '#/runs/' + run.id, class: 'mono', title: run.id }, shortId(run.id))),
      h('td', {}, statusBadge(run.status)),
      h('td', {}, livenessBadge(run.liveness, at)),
      h('td', {}, h('div', { class: 'cmd', title: shellJoin(run.command) }, shellJoin(run.command))),
      h('td', { 'data-label': 'lane' }, h('span', {}, run.lane), ' ', labelChips(run.labels)),
      h('td', { class: 'tabular hide-narrow', 'data-label': 'attempt' }, run.attempt + '/' + (run.max_attempts + (run.released_attempts || 0))),
      h('td', { class: 'nowrap', 'data-label': pending ? '' : 'duration' }, durationEl(run, at),
        pending && run.queue_position ? h('span', { class: 'muted small' }, ' · #' + run.queue_position + ' in queue') : null,
        pending && run.waiting_reason ? h('span', { class: 'reason' }, run.waiting_reason) : null),
      h('td', { class: 'hide-narrow', 'data-label': 'result' }, outcomeEl(run)),
      h('td', { class: 'nowrap', 'data-label': 'created' }, timeEl(run.created_at)));
  };

  const refresh = async () => {
    const p = new URLSearchParams({ limit: '50' });
    for (const [k, v] of Object.entries(filters)) if (v) p.set(k, v);
    if (cursor) p.set('cursor', cursor);
    const body = await api('/v1/runs?' + p);
    if (!ctx.alive()) return;
    const at = Date.now();
    errorSlot.replaceChildren();
    nextCursor = body.next_cursor;
    older.disabled = !nextCursor;
    newer.disabled = cursors.length === 0;
    pageInfo.textContent = body.runs.length ? 'page ' + (cursors.length + 1) + ' · ' + body.runs.length + ' runs' : '';
    if (body.runs.length === 0) {
      const filtered = Object.values(filters).some(Boolean);
      tbody.replaceChildren(h('tr', {}, h('td', { colspan: 9, class: 'empty' },
        filtered ? (nextCursor ? 'No match in this stretch of history; try Older →' : 'No runs match these filters.')
          : 'No runs yet. Submit one with `tether run -- echo hello`.')));
      return;
    }
    tbody.replaceChildren(...body.runs.map(r => row(r, at)));
  };
  const stop = poll(ctx, 2000, refresh, e => errorSlot.replaceChildren(errorBanner(e)));
  return () => { stop(); clearTimeout(debounce); };
}

// ---- one run -------------------------------------------------------------------------------

// Keeps this much output in the page; older parts are dropped and can be loaded again.
const LOG_KEEP_BYTES = 2 * 1024 * 1024;

function runPage(view, runId, ctx) {
  let run = null;
  let fetchedAt = Date.now();
  const errorSlot = h('div', {});
  const head = h('div', { class: 'panel' });
  const attemptsPanel = h('div', { class: 'panel' });
  const log = h('pre', { class: 'log', id: 'log', tabindex: '0' });
  const follow = h('input', { type: 'checkbox', checked: true, id: 'log-follow' });
  const logMeta = h('span', { class: 'log-meta', id: 'log-meta' });
  const tabs = h('span', { class: 'tabs', role: 'tablist' });
  for (const [key, text] of [['all', 'All'], ['stdout', 'stdout'], ['stderr', 'stderr']]) {
    tabs.append(h('button', { type: 'button', 'data-stream': key, class: key === 'all' ? 'on' : '', onclick: () => {
      for (const b of tabs.children) b.classList.toggle('on', b.dataset.stream === key);
      log.classList.remove('only-stdout', 'only-stderr');
      if (key !== 'all') log.classList.add('only-' + key);
    } }, text));
  }
  view.append(errorSlot, head, attemptsPanel,
    h('div', { class: 'panel' },
      h('div', { class: 'log-head' }, h('h2', { style: 'margin:0' }, 'Output'), tabs, h('label', {}, follow, 'Follow'), logMeta),
      log));

  // -- the log: a tail from /output, earlier windows on demand, live events over SSE --
  let lastSeq = null;       // the highest seq shown or covered: SSE resumes after it
  let earlierBefore = null; // pass as `before` to load the window before the first shown
  let shownBytes = 0;
  let lastAttempt = null;
  let ended = false;
  let streamAbort = null;

  const decodeLen = ev => (ev.text || '').length;
  const chunkEl = ev => h('span', { class: 'chunk ' + (ev.stream === 'stderr' ? 'stderr' : 'stdout'), 'data-seq': ev.seq, 'data-attempt': ev.attempt, 'data-bytes': decodeLen(ev) }, ev.text || '');
  const sepEl = attempt => h('span', { class: 'sep', 'data-attempt-sep': attempt }, '── attempt ' + attempt + ' ──');

  const earlierEl = () => h('span', { class: 'earlier' }, h('button', { type: 'button', id: 'log-earlier', onclick: loadEarlier }, 'Load earlier output'));

  function updateMeta() {
    const total = run ? run.stdout_bytes + run.stderr_bytes : 0;
    logMeta.textContent = run ? fmtBytes(total) + ' total · stdout ' + fmtBytes(run.stdout_bytes) + ' · stderr ' + fmtBytes(run.stderr_bytes) : '';
  }

  function atBottom() { return log.scrollHeight - log.scrollTop - log.clientHeight < 40; }

  function appendLive(ev) {
    if (lastSeq !== null && ev.seq <= lastSeq) return; // never repeat
    lastSeq = ev.seq;
    if (ev.type !== 'log') return;
    const stick = follow.checked;
    $('.log-empty', log)?.remove();
    if (lastAttempt !== null && ev.attempt !== lastAttempt) log.append(sepEl(ev.attempt));
    lastAttempt = ev.attempt;
    log.append(chunkEl(ev));
    shownBytes += decodeLen(ev);
    trimHead();
    if (stick) log.scrollTop = log.scrollHeight;
  }

  // Keeps the page light on an endless log: drop the oldest chunks, offer them again.
  function trimHead() {
    if (shownBytes <= LOG_KEEP_BYTES) return;
    $('.earlier', log)?.remove();
    let first = log.querySelector('.chunk');
    while (first && shownBytes > LOG_KEEP_BYTES * 0.75) {
      shownBytes -= Number(first.dataset.bytes);
      let next = first.nextElementSibling;
      first.remove();
      while (next && !next.classList.contains('chunk')) { const n = next.nextElementSibling; next.remove(); next = n; }
      first = next;
    }
    if (first) { earlierBefore = Number(first.dataset.seq); log.prepend(earlierEl()); }
  }

  async function loadTail() {
    const page = await api('/v1/runs/' + encodeURIComponent(runId) + '/output');
    if (!ctx.alive()) return;
    log.replaceChildren();
    shownBytes = 0;
    lastAttempt = null;
    earlierBefore = page.earlier_before;
    if (earlierBefore) log.append(earlierEl());
    for (const ev of page.events) {
      if (lastAttempt !== null && ev.attempt !== lastAttempt) log.append(sepEl(ev.attempt));
      lastAttempt = ev.attempt;
      log.append(chunkEl(ev));
      shownBytes += decodeLen(ev);
    }
    if (!page.events.length) log.append(h('span', { class: 'log-empty' }, 'No output yet.'));
    lastSeq = page.through_seq;
    log.scrollTop = log.scrollHeight;
  }

  async function loadEarlier() {
    if (!earlierBefore) return;
    const btn = $('#log-earlier', log);
    if (btn) { btn.disabled = true; btn.textContent = 'Loading…'; }
    try {
      const page = await api('/v1/runs/' + encodeURIComponent(runId) + '/output?before=' + earlierBefore);
      if (!ctx.alive()) return;
      const keepFrom = log.scrollHeight - log.scrollTop;
      $('.earlier', log)?.remove();
      const frag = document.createDocumentFragment();
      let prevAttempt = null;
      for (const ev of page.events) {
        if (prevAttempt !== null && ev.attempt !== prevAttempt) frag.append(sepEl(ev.attempt));
        prevAttempt = ev.attempt;
        frag.append(chunkEl(ev));
      }
      const firstShown = log.querySelector('.chunk');
      if (firstShown && prevAttempt !== null && Number(firstShown.dataset.attempt) !== prevAttempt) frag.append(sepEl(Number(firstShown.dataset.attempt)));
      earlierBefore = page.earlier_before;
      log.prepend(frag);
      if (earlierBefore) log.prepend(earlierEl());
      log.scrollTop = log.scrollHeight - keepFrom; // keep the reader's place
      follow.checked = false;
    } catch (e) {
      errorSlot.replaceChildren(errorBanner(e));
      if (btn) { btn.disabled = false; btn.textContent = 'Load earlier output'; }
    }
  }

  // The event stream, read with fetch so it can carry the token and Last-Event-ID; it
  // reconnects after a drop and resumes after the last seq shown, so nothing is lost or repeated.
  async function stream() {
    let backoff = 500;
    while (ctx.alive() && !ended) {
      streamAbort = new AbortController();
      try {
        const hs = headers({ Accept: 'text/event-stream' });
        if (lastSeq !== null) hs['Last-Event-ID'] = String(lastSeq);
        const res = await fetch('/v1/runs/' + encodeURIComponent(runId) + '/events', { headers: hs, signal: streamAbort.signal });
        if (res.status === 401) { await askForToken(Boolean(token())); continue; }
        if (!res.ok || !res.body) throw new Error('stream answered ' + res.status);
        backoff = 500;
        await readSse(res.body, onEvent);
      } catch (e) {
        if (!ctx.alive()) return;
      }
      if (!ctx.alive() || ended) return;
      await new Promise(r => setTimeout(r, backoff));
      backoff = Math.min(backoff * 2, 5000);
    }
  }

  function onEvent(type, data) {
    let ev;
    try { ev = JSON.parse(data); } catch (e) { return; }
    if (type === 'heartbeat') {
      if (run && ev.liveness) { run.liveness = ev.liveness; fetchedAt = Date.now(); renderHead(); }
      return;
    }
    appendLive(ev);
    if (type === 'end') { ended = true; }
    if (type === 'status' || type === 'attempt' || type === 'end') refreshRun();
  }

  // -- the run itself --
  async function refreshRun() {
    const body = await api('/v1/runs/' + encodeURIComponent(runId));
    if (!ctx.alive()) return;
    run = body;
    fetchedAt = Date.now();
    errorSlot.replaceChildren();
    renderHead();
    renderAttempts();
    updateMeta();
  }

  async function cancel() {
    const btn = $('#cancel');
    btn.disabled = true;
    try {
      await api('/v1/runs/' + encodeURIComponent(runId) + '/cancel', { method: 'POST' });
      await refreshRun();
    } catch (e) {
      errorSlot.replaceChildren(errorBanner(e));
      btn.disabled = false;
    }
  }

  async function resubmit() {
    const keys = ['command', 'env', 'cwd', 'lane', 'resources', 'labels', 'endpoints', 'max_attempts', 'timeout_s', 'heartbeat_timeout_s', 'stall_timeout_s'];
    const req = {};
    for (const k of keys) if (run[k] !== null && run[k] !== undefined) req[k] = run[k];
    if (run.heartbeat_timeout_s === null) req.heartbeat_timeout_s = null;
    try {
      const created = await api('/v1/runs', { method: 'POST', body: req });
      location.hash = '#/runs/' + created.id;
    } catch (e) {
      errorSlot.replaceChildren(errorBanner(e));
    }
  }

  function fact(k, v, id) { return h('div', { class: 'fact' }, h('div', { class: 'k' }, k), h('div', { class: 'v', id }, v)); }

  function renderHead() {
    if (!run) return;
    const l = run.liveness || {};
    const live = !isTerminal(run.status) && run.status !== 'pending';
    const headline = h('div', { class: 'headline' });
    if (live) {
      headline.append(
        h('div', {}, h('div', { class: 'lbl' }, 'Heartbeat'), h('div', { class: 'big', id: 'hb-age' }, ageEl(l.heartbeat_age_s, ' ago', fetchedAt))),
        h('div', {}, h('div', { class: 'lbl' }, l.since_last_output_s === null || l.since_last_output_s === undefined ? 'Quiet since start for' : 'Quiet for'),
          h('div', { class: 'big', id: 'quiet-for' }, ageEl(l.idle_for_s, '', fetchedAt))));
    } else if (run.status === 'pending') {
      headline.append(h('div', {}, h('div', { class: 'lbl' }, 'Waiting for'), h('div', { class: 'big' }, ageEl((fetchedAt - Date.parse(run.created_at)) / 1000, '', fetchedAt))),
        run.queue_position ? h('div', {}, h('div', { class: 'lbl' }, 'Queue position'), h('div', { class: 'big' }, '#' + run.queue_position)) : null,
        run.waiting_reason ? h('div', {}, h('div', { class: 'lbl' }, 'Why'), h('div', { class: 'reason' }, run.waiting_reason)) : null);
    } else {
      headline.append(h('div', {}, h('div', { class: 'lbl' }, 'Ran for'), h('div', { class: 'big' }, durationEl(run, fetchedAt))),
        h('div', {}, h('div', { class: 'lbl' }, 'Result'), h('div', { class: 'big' }, outcomeEl(run))));
    }
    const current = (run.attempts || []).find(a => a.attempt === run.attempt);
    head.replaceChildren(
      h('div', { class: 'panel-body' },
        h('div', { class: 'run-title' },
          h('span', { id: 'run-status' }, statusBadge(run.status)),
          h('span', { id: 'run-liveness' }, livenessBadge(run.liveness, fetchedAt)),
          h('span', { class: 'mono muted', title: run.id }, run.id),
          h('div', { class: 'run-actions' },
            h('button', { class: 'btn danger', id: 'cancel', disabled: isTerminal(run.status) || Boolean(run.cancel_requested_at), onclick: cancel },
              run.cancel_requested_at && !isTerminal(run.status) ? 'Cancelling…' : 'Cancel'),
            // Secret env values are never shown by the API, so the page cannot send them again.
            h('button', { class: 'btn', id: 'resubmit', onclick: resubmit, disabled: (run.secret_env || []).length > 0,
              title: (run.secret_env || []).length ? 'this run has secret env values the API never shows: resubmit it where it was made' : 'submit the same command again as a new run' }, 'Resubmit'))),
        h('div', { class: 'cmd-full', id: 'run-command' }, shellJoin(run.command))),
      headline,
      h('div', { class: 'facts' },
        fact('Lane', [run.lane, ' ', labelChips(run.labels)]),
        fact('Attempt', run.attempt + ' of ' + (run.max_attempts + (run.released_attempts || 0))),
        fact('Worker', current ? (current.worker_name || shortId(current.worker_id)) : '—'),
        fact('Created', timeEl(run.created_at)),
        fact('Started', run.started_at ? timeEl(run.started_at) : '—'),
        fact('Finished', run.finished_at ? timeEl(run.finished_at) : '—'),
        fact('Exit code', run.exit_code === null || run.exit_code === undefined ? '—' : String(run.exit_code)),
        fact('Error', run.error_code ? [h('code', {}, run.error_code), run.error_message ? h('div', { class: 'muted small' }, run.error_message) : null] : '—'),
        fact('Timeouts', 'run ' + (run.timeout_s ? human(run.timeout_s) : 'none') + ' · heartbeat ' + (run.heartbeat_timeout_s ? human(run.heartbeat_timeout_s) : 'never') + (run.stall_timeout_s ? ' · stall ' + human(run.stall_timeout_s) : '')),
        fact('Resources', run.resources.cpus + ' cpu · ' + run.resources.memory_mb + ' MB')));
  }

  function renderAttempts() {
    const attempts = run.attempts || [];
    attemptsPanel.replaceChildren(h('h2', {}, 'Attempts'));
    if (!attempts.length) { attemptsPanel.append(h('div', { class: 'empty' }, 'Not claimed yet.')); return; }
    attemptsPanel.append(h('ol', { class: 'timeline', id: 'attempts' }, attempts.map(a => {
      const cls = a.status === 'succeeded' ? 't-ok' : a.status && a.status !== 'cancelled' ? 't-bad' : '';
      return h('li', { class: cls, 'data-attempt': a.attempt },
        h('div', { class: 'row' }, h('strong', {}, 'Attempt ' + a.attempt),
          a.status ? statusBadge(a.status) : h('span', { class: 'badge b-info b-pulse' }, 'in flight'),
          a.error_code ? h('code', { title: a.error_message || '' }, a.error_code) : null,
          a.exit_code !== null && a.exit_code !== undefined ? h('code', {}, 'exit ' + a.exit_code) : null,
          h('span', { class: 'muted' }, 'on ', h('strong', { class: 'worker-name', title: a.worker_id }, a.worker_name || shortId(a.worker_id)))),
        h('div', { class: 'times' }, 'claimed ', timeEl(a.claimed_at),
          a.started_at ? [' · started ', timeEl(a.started_at)] : null,
          a.finished_at ? [' · finished ', timeEl(a.finished_at), ' (ran ', human((Date.parse(a.finished_at) - Date.parse(a.started_at || a.claimed_at)) / 1000), ')'] : null),
        Object.keys(a.endpoints || {}).length ? h('div', { class: 'times' }, 'endpoints: ',
          Object.entries(a.endpoints).map(([v, d]) => h('span', { class: 'chip', title: d.source }, v + ' → ' + d.url + (d.source === 'fallback' ? ' (fallback)' : '')))) : null);
    })));
  }

  const stopPoll = poll(ctx, 2000, async () => { if (!run || !isTerminal(run.status)) await refreshRun(); },
    e => errorSlot.replaceChildren(errorBanner(e)));
  loadTail().then(() => stream()).catch(e => errorSlot.replaceChildren(errorBanner(e)));
  return () => { stopPoll(); if (streamAbort) streamAbort.abort(); };
}

function fmtBytes(n) {
  if (!n) return '0 B';
  if (n < 1024) return n + ' B';
  if (n < 1024 * 1024) return (n / 1024).toFixed(1) + ' KiB';
  return (n / 1024 / 1024).toFixed(1) + ' MiB';
}

// Parses a text/event-stream body, calling onEvent(type, data) for each event.
async function readSse(body, onEvent) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = '';
  let type = 'message';
  let data = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += value;
    let nl;
    while ((nl = buf.indexOf('\n')) >= 0) {
      let line = buf.slice(0, nl);
      buf = buf.slice(nl + 1);
      if (line.endsWith('\r')) line = line.slice(0, -1);
      if (line === '') {
        if (data.length) onEvent(type, data.join('\n'));
        type = 'message';
        data = [];
      } else if (line.startsWith('data:')) data.push(line.slice(5).replace(/^ /, ''));
      else if (line.startsWith('event:')) type = line.slice(6).trim();
    }
  }
}

// ---- workers, lanes, endpoints -------------------------------------------------------------

function tablePage(view, ctx, title, sub, load, ms = 2000) {
  const errorSlot = h('div', {});
  const body = h('div', {});
  view.append(h('div', { class: 'page-head' }, h('h1', {}, title), h('span', { class: 'sub' }, sub)), errorSlot, body);
  return poll(ctx, ms, async () => {
    const content = await load();
    if (!ctx.alive()) return;
    errorSlot.replaceChildren();
    body.replaceChildren(...content);
  }, e => errorSlot.replaceChildren(errorBanner(e)));
}

function grid(id, heads, rows, empty) {
  if (!rows.length) return h('div', { class: 'panel' }, h('div', { class: 'empty' }, empty));
  return h('div', { class: 'panel' }, h('table', { class: 'grid', id },
    h('thead', {}, h('tr', {}, heads.map(t => h('th', {}, t)))), h('tbody', {}, rows)));
}

const res = r => r.cpus + ' cpu · ' + r.memory_mb + ' MB';

function workersPage(view, ctx) {
  return tablePage(view, ctx, 'Workers', 'heartbeat age ticks live', async () => {
    const body = await api('/v1/workers');
    const at = Date.now();
    const rows = body.workers.map(w => h('tr', { 'data-worker-id': w.id },
      h('td', {}, h('strong', {}, w.name), h('div', { class: 'mono muted small', title: w.id }, shortId(w.id))),
      h('td', {}, h('span', { class: 'badge ' + (WORKER_CLASS[w.state] || 'b-idle') }, w.state)),
      h('td', { class: 'nowrap', 'data-label': 'heartbeat' }, ageEl(w.heartbeat_age_s, ' ago', at)),
      h('td', { 'data-label': 'capacity' }, res(w.capacity)),
      h('td', { 'data-label': 'held' }, res(w.reserved), ' · ', w.runs.length + ' run' + (w.runs.length === 1 ? '' : 's'),
        w.runs.length ? h('div', {}, w.runs.map(r => [h('a', { href: '#/runs/' + r.run_id, class: 'mono small' }, shortId(r.run_id)), ' '])) : null),
      h('td', { 'data-label': 'lanes' }, w.lanes.length ? w.lanes.map(l => h('span', { class: 'chip' }, l)) : h('span', { class: 'muted' }, 'every lane')),
      h('td', { class: 'hide-narrow' }, labelChips(w.labels)),
      h('td', { class: 'nowrap hide-narrow', 'data-label': 'registered' }, timeEl(w.registered_at))));
    return [grid('workers-table', ['Worker', 'State', 'Heartbeat', 'Capacity', 'Held', 'Lanes', 'Labels', 'Registered'], rows, 'No workers registered. Start one with `tether worker`.')];
  });
}

function lanesPage(view, ctx) {
  return tablePage(view, ctx, 'Lanes', 'policy and load, from the config and the store', async () => {
    const body = await api('/v1/lanes');
    const rows = body.lanes.map(l => h('tr', { 'data-lane': l.name },
      h('td', {}, h('a', { href: '#/runs?lane=' + encodeURIComponent(l.name) }, h('strong', {}, l.name))),
      h('td', {}, h('span', { class: 'badge ' + (l.on_full === 'reject' ? 'b-warn' : 'b-idle') }, l.on_full)),
      h('td', { class: 'num', 'data-label': 'in flight' }, l.in_flight + (l.max_concurrency ? ' / ' + l.max_concurrency : '')),
      h('td', { class: 'num', 'data-label': 'pending' }, String(l.pending)),
      h('td', { class: 'num', 'data-label': 'refused' }, String(l.refused || 0)),
      h('td', { 'data-label': 'capacity' }, res(l.capacity), h('div', { class: 'muted small' }, l.live_workers + ' live worker' + (l.live_workers === 1 ? '' : 's'))),
      h('td', { 'data-label': 'reserved' }, res(l.reserved)),
      h('td', { class: 'small hide-narrow' }, [
        l.timeout_s ? 'timeout ' + human(l.timeout_s) : null, l.heartbeat_timeout_s ? 'heartbeat ' + human(l.heartbeat_timeout_s) : null,
        l.max_attempts ? l.max_attempts + ' attempts' : null, l.resources ? 'runs need ' + res(l.resources) : null,
        l.output_limit_mb ? 'output ≤ ' + l.output_limit_mb + ' MB' : null].filter(Boolean).join(' · ') || h('span', { class: 'muted' }, 'defaults'))));
    return [grid('lanes-table', ['Lane', 'When full', 'In flight', 'Pending', 'Refused', 'Capacity', 'Reserved', 'Policy'], rows, 'No lanes.')];
  }, 3000);
}

function endpointsPage(view, ctx) {
  return tablePage(view, ctx, 'Endpoints & pools', 'readiness by the store\'s clock; dispatch as a claim would see it now', async () => {
    const [eps, pools] = await Promise.all([api('/v1/endpoints'), api('/v1/pools')]);
    const at = Date.now();
    const dispatch = await Promise.all(pools.pools.map(p => api('/v1/pools/' + encodeURIComponent(p.name) + '/dispatch').catch(e => ({ error: e }))));
    const poolRows = pools.pools.map((p, i) => {
      const d = dispatch[i];
      return h('tr', { 'data-pool': p.name },
        h('td', {}, h('strong', {}, p.name)),
        h('td', { 'data-label': 'hands out' }, d.error ? h('span', { class: 'badge b-bad' }, d.error.code) :
          [h('code', {}, d.url), ' ', h('span', { class: 'badge ' + (d.source === 'endpoint' ? 'b-ok' : 'b-warn') }, d.source === 'endpoint' ? 'endpoint ' + d.endpoint : 'fallback')]),
        h('td', { 'data-label': 'fallback' }, p.fallback_url ? h('code', {}, p.fallback_url) : h('span', { class: 'muted' }, 'none')),
        h('td', { class: 'num', 'data-label': 'freshness' }, human(p.freshness_s)),
        h('td', { class: 'hide-narrow' }, p.source));
    });
    const epRows = eps.endpoints.map(e => h('tr', { 'data-endpoint': e.name },
      h('td', {}, h('strong', {}, e.name), h('div', { class: 'muted small' }, e.pool)),
      h('td', {}, h('span', { class: 'badge ' + (e.ready ? 'b-ok' : 'b-bad') }, e.ready ? 'ready' : 'not ready')),
      h('td', { class: 'nowrap', 'data-label': 'stamp age' }, e.kind === 'always_ready' ? h('span', { class: 'muted' }, 'always ready') : ageEl(e.stamp_age_s, ' ago', at)),
      h('td', { 'data-label': 'url' }, h('code', {}, e.url)),
      h('td', { class: 'hide-narrow' }, e.readiness_url ? h('code', { class: 'small' }, e.readiness_url) : '—'),
      h('td', { class: 'hide-narrow', 'data-label': 'last probe' }, e.last_probe_at ? timeEl(e.last_probe_at) : '—',
        e.last_error ? h('div', { class: 'reason' }, e.last_error) : null)));
    return [
      h('h2', {}, 'Pools'),
      grid('pools-table', ['Pool', 'Dispatch hands out now', 'Fallback', 'Freshness', 'Source'], poolRows, 'No pools. Name them in the config or PUT /v1/pools/{pool}.'),
      h('h2', {}, 'Endpoints'),
      grid('endpoints-table', ['Endpoint', 'Readiness', 'Stamp age', 'URL', 'Readiness URL', 'Last probe'], epRows, 'No endpoints. Register one with PUT /v1/endpoints/{name}.'),
    ];
  }, 3000);
}

// ---- start ---------------------------------------------------------------------------------

window.addEventListener('hashchange', route);
document.addEventListener('DOMContentLoaded', () => { initTokenDialog(); route(); });
