// Vesalius dashboard: the node's studies, series, jobs and deliveries, live, and each job's result.
// Every number comes from the node's token-guarded JSON API; nothing is fetched from elsewhere.
import { showModel } from './viewer.js';

const TOKEN_KEY = 'vesalius-token';
const POLL_MS = 2000;
const main = document.getElementById('main');
let view = null; // {kind: 'list' | 'job', refresh: async () => void}
let timer = null;

// --- the API, with the token the user gave ---------------------------------------------------------

class Unauthorised extends Error {}

async function api(path, options = {}) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (!token) { askForToken(); throw new Unauthorised(); }
  const headers = { ...(options.headers || {}), Authorization: `Bearer ${token}` };
  const answer = await fetch(path, { ...options, headers });
  if (answer.status === 401) {
    sessionStorage.removeItem(TOKEN_KEY);
    askForToken('The node refused this token.');
    throw new Unauthorised();
  }
  return answer;
}

async function json(path, options) {
  const answer = await api(path, options);
  const body = await answer.json();
  if (!answer.ok) throw new Error(body.error || `HTTP ${answer.status}`);
  return body;
}

export async function blobUrl(path) {
  const answer = await api(path);
  if (!answer.ok) throw new Error(`HTTP ${answer.status}`);
  return URL.createObjectURL(await answer.blob());
}

export function token() { return sessionStorage.getItem(TOKEN_KEY); }

function askForToken(message = '') {
  document.getElementById('login-error').textContent = message;
  const dialog = document.getElementById('login');
  if (!dialog.open) dialog.showModal();
}

document.getElementById('login-form').addEventListener('submit', (event) => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, document.getElementById('token').value.trim());
  document.getElementById('token').value = '';
  document.getElementById('login').close();
  route();
});
document.getElementById('forget').addEventListener('click', () => {
  sessionStorage.removeItem(TOKEN_KEY);
  askForToken();
});

// --- small DOM helpers (text only: nothing from the API becomes HTML) ------------------------------

export function h(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith('on')) element.addEventListener(key.slice(2), value);
    else element.setAttribute(key, value === true ? '' : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    element.append(child instanceof Node ? child : String(child));
  }
  return element;
}

function table(headings, rows, attributes = {}) {
  return h('table', attributes, h('thead', {}, h('tr', {}, headings.map((t) => h('th', {}, t)))),
    h('tbody', {}, rows.length ? rows : h('tr', {}, h('td', { colspan: headings.length, class: 'muted' }, 'none'))));
}

function localTime(iso) {
  if (!iso) return '–';
  return new Date(iso).toLocaleString();
}

function age(iso) {
  if (!iso) return '';
  const seconds = Math.round((Date.now() - new Date(iso).getTime()) / 1000);
  if (seconds < 0) return `in ${duration(-seconds)}`;
  return `${duration(seconds)} ago`;
}

function duration(seconds) {
  if (seconds < 90) return `${seconds} s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
  if (seconds < 172800) return `${Math.round(seconds / 3600)} h`;
  return `${Math.round(seconds / 86400)} d`;
}

function when(iso) {
  return h('span', { title: iso || '' }, localTime(iso), iso ? h('span', { class: 'muted' }, ` (${age(iso)})`) : '');
}

const short = (uid) => h('span', { class: 'uid', title: uid || '' }, uid && uid.length > 22 ? `…${uid.slice(-20)}` : uid || '–');

// --- states in plain words -------------------------------------------------------------------------

export function jobWords(job) {
  if (job.state === 'running') {
    const p = job.progress;
    return p ? `running: stage ${p.n} of ${p.of} (${p.stage})` : 'running';
  }
  if (job.state === 'failed') return `failed: ${job.error || 'no reason recorded'}`;
  if (job.state === 'queued' && job.attempts) return `queued again (attempt ${job.attempts + 1}; last: ${job.error})`;
  return job.state;
}

function deliveryWords(d) {
  if (d.state === 'pending') {
    const next = d.attempts ? `delivery pending: next try at ${localTime(d.next_try_at)}` : 'delivery pending';
    return d.error ? `${next} (last try: ${d.error})` : next;
  }
  if (d.state === 'failed') return `delivery failed: ${d.error}`;
  // part 'first': the SEG, SR and surfaces are at the destination; the 3D preview and STLs follow
  return d.part === 'first' ? 'SEG, SR and surfaces delivered; 3D preview to follow' : 'delivered';
}

function seriesWords(s) {
  if (s.state === 'stored') return `stored — ${s.reason}`;
  return s.state;
}

function badge(state, text) {
  return h('span', { class: `state state-${state}` }, text);
}

// --- the list page ---------------------------------------------------------------------------------

const filters = { state: '', ae: '', since: '', until: '', before: [] }; // before: a stack of cursors

function query(extra = {}) {
  const q = new URLSearchParams({ limit: '50' });
  if (filters.ae) q.set('ae', filters.ae);
  // a date picked in the browser is a local day: its start, as an absolute time
  if (filters.since) q.set('since', new Date(`${filters.since}T00:00`).toISOString());
  if (filters.until) q.set('until', new Date(new Date(`${filters.until}T00:00`).getTime() + 86400000).toISOString());
  for (const [k, v] of Object.entries(extra)) if (v !== '' && v !== undefined) q.set(k, v);
  return q.toString();
}

async function action(path, body) {
  try {
    const options = { method: 'POST' };
    if (body) { options.body = JSON.stringify(body); options.headers = { 'Content-Type': 'application/json' }; }
    const answer = await json(path, options);
    flash(`${path}: ${JSON.stringify(answer)}`);
  } catch (err) {
    if (!(err instanceof Unauthorised)) flash(`${path}: ${err.message}`, true);
  }
  if (view) view.refresh();
}

function flash(text, error = false) {
  const old = document.getElementById('flash');
  if (old) old.remove();
  main.prepend(h('p', { id: 'flash', class: error ? 'error' : 'ok' }, text));
}

function filterForm(models) {
  const state = h('select', { id: 'filter-state', 'aria-label': 'job state' },
    ['', 'queued', 'running', 'done', 'failed'].map((s) => h('option', { value: s, selected: s === filters.state }, s || 'any state')));
  const ae = h('input', { id: 'filter-ae', placeholder: 'calling AE', value: filters.ae, maxlength: 16, size: 12 });
  const since = h('input', { id: 'filter-since', type: 'date', value: filters.since, 'aria-label': 'from' });
  const until = h('input', { id: 'filter-until', type: 'date', value: filters.until, 'aria-label': 'to' });
  return h('form', {
    id: 'filters', class: 'filters', onsubmit: (e) => {
      e.preventDefault();
      Object.assign(filters, { state: state.value, ae: ae.value.trim(), since: since.value, until: until.value, before: [] });
      view.refresh();
    },
  }, h('label', {}, 'State ', state), h('label', {}, 'AE ', ae), h('label', {}, 'From ', since),
  h('label', {}, 'to ', until), h('button', { type: 'submit' }, 'Filter'));
}

function listPage() {
  let shown = '';
  let models = null; // the node's models, for "Process again"
  async function refresh() {
    const before = filters.before.length ? filters.before[filters.before.length - 1] : '';
    if (models === null) models = (await json('/series/models')).models;
    const [studies, series, jobs, deliveries, pulls] = await Promise.all([
      json(`/studies?${query()}`), json(`/series?${query()}`),
      json(`/jobs?${query({ state: filters.state, before })}`), json(`/deliveries?${query()}`), json('/pulls')]);
    if (view !== page) return; // the user went to another page while this one's data was on its way
    const text = JSON.stringify([studies, series, jobs, deliveries, pulls, filters]);
    if (text === shown) return; // nothing changed: keep the page (and what the user is typing) as it is
    shown = text;
    const focused = document.activeElement && document.activeElement.id;
    const jobRows = jobs.map((j) => h('tr', { 'data-job': j.id, class: `job-${j.state}` },
      h('td', {}, h('a', { href: `#/job/${j.id}` }, `#${j.id}`)),
      h('td', { title: j.study_instance_uid || '' }, short(j.study_instance_uid)),
      h('td', { title: j.series_instance_uid }, short(j.series_instance_uid)),
      h('td', {}, j.calling_ae || '–'), h('td', {}, j.model),
      h('td', { class: 'job-state' }, badge(j.state, jobWords(j))),
      h('td', {}, when(j.created_at)),
      h('td', {}, h('button', { type: 'button', onclick: () => action(`/jobs/${j.id}/retry`), disabled: ['queued', 'running'].includes(j.state) }, 'Retry'),
        ' ', h('button', { type: 'button', onclick: () => action(`/jobs/${j.id}/resend`), disabled: j.state !== 'done' }, 'Resend'))));
    const seriesRows = series.map((s) => {
      const model = h('select', { 'aria-label': 'model' }, models.map((m) => h('option', { value: m }, m)));
      return h('tr', {},
        h('td', { title: s.series_instance_uid }, short(s.series_instance_uid)),
        h('td', { title: s.study_instance_uid }, short(s.study_instance_uid)),
        h('td', {}, s.modality), h('td', {}, s.series_description || '–'), h('td', {}, s.calling_ae),
        h('td', {}, s.instances), h('td', {}, badge(s.state, seriesWords(s))), h('td', {}, when(s.last_received)),
        h('td', {}, s.state === 'receiving' ? '' : h('span', {}, models.length ? model : '',
          h('button', { type: 'button', onclick: () => action(`/series/${encodeURIComponent(s.series_instance_uid)}/process`, model.value ? { model: model.value } : {}) }, 'Process again'))));
    });
    const deliveryRows = deliveries.map((d) => h('tr', {},
      h('td', {}, d.id), h('td', {}, h('a', { href: `#/job/${d.job_id}` }, `#${d.job_id}`)), h('td', {}, d.destination),
      h('td', {}, badge(d.state, deliveryWords(d))), h('td', {}, d.attempts), h('td', {}, when(d.updated_at))));
    const studyRows = studies.map((st) => h('tr', {},
      h('td', { title: st.study_instance_uid }, short(st.study_instance_uid)), h('td', {}, st.series),
      h('td', {}, when(st.selected_at)),
      h('td', {}, h('ul', { class: 'reasons' }, st.selection.map((x) => h('li', {}, `${x.rule}: `, short(x.series_instance_uid), ` — ${x.reason}`))))));
    // pull jobs (docs/pull.md): studies per state, and the actions that apply to the job's state
    const pullButton = (p, name, states) => h('button', { type: 'button', disabled: !states.includes(p.state),
      onclick: () => action(`/pulls/${p.id}/${name}`) }, name[0].toUpperCase() + name.slice(1));
    const pullRows = pulls.map((p) => h('tr', { 'data-pull': p.id, class: `pull-${p.state}` },
      h('td', {}, `#${p.id}`), h('td', {}, p.source), h('td', {}, badge(p.state, p.error ? `${p.state}: ${p.error}` : p.state)),
      h('td', { class: 'pull-studies' }, Object.entries(p.studies).filter(([, n]) => n).map(([s, n]) => `${s} ${n}`).join(', ') || '–'),
      h('td', {}, when(p.created_at)),
      h('td', {}, pullButton(p, 'pause', ['queued', 'running']), ' ', pullButton(p, 'resume', ['paused']), ' ',
        pullButton(p, 'cancel', ['queued', 'running', 'paused']), ' ', pullButton(p, 'retry', ['done', 'failed']))));
    const pager = h('p', { class: 'pager' },
      h('button', { type: 'button', id: 'newer', disabled: !filters.before.length, onclick: () => { filters.before.pop(); refresh(); } }, '← Newer'),
      ' ', h('button', { type: 'button', id: 'older', disabled: jobs.length < 50, onclick: () => { filters.before.push(jobs[jobs.length - 1].id); refresh(); } }, 'Older →'));
    main.replaceChildren(
      filterForm(models),
      h('section', {}, h('h2', {}, 'Jobs'), table(['Job', 'Study', 'Series', 'AE', 'Model', 'State', 'Created', 'Actions'], jobRows, { id: 'jobs' }), pager),
      h('section', {}, h('h2', {}, 'Series'), table(['Series', 'Study', 'Modality', 'Description', 'AE', 'Instances', 'State', 'Last received', ''], seriesRows, { id: 'series' })),
      h('section', {}, h('h2', {}, 'Studies'), table(['Study', 'Series', 'Selected', 'Why each series was chosen or skipped'], studyRows, { id: 'studies' })),
      h('section', {}, h('h2', {}, 'Deliveries'), table(['Delivery', 'Job', 'Destination', 'State', 'Tries', 'Updated'], deliveryRows, { id: 'deliveries' })),
      ...(pulls.length ? [h('section', {}, h('h2', {}, 'Pulls'), table(['Pull', 'Source', 'State', 'Studies', 'Created', 'Actions'], pullRows, { id: 'pulls' }))] : []));
    if (focused && document.getElementById(focused)) document.getElementById(focused).focus();
  }
  const page = { kind: 'list', refresh };
  return page;
}

// --- the job page ----------------------------------------------------------------------------------

function fileLink(jobId, name, label) {
  return h('a', {
    href: '#', class: 'download', 'data-file': name, onclick: async (event) => {
      event.preventDefault();
      const url = await blobUrl(`/jobs/${jobId}/files/${name}`);
      const a = h('a', { href: url, download: name.split('/').pop() });
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 10000);
    },
  }, label || name);
}

function measurements(summary) {
  const rows = summary.structures.map((s) => h('tr', { class: s.complete ? '' : 'incomplete' },
    h('td', {}, s.name), h('td', {}, s.volume_ml), h('td', {}, s.surface_area_cm2 ?? '–'),
    h('td', {}, s.mean === null || s.mean === undefined ? '–' : `${s.mean} ± ${s.std}`),
    h('td', {}, s.complete ? 'complete' : 'incomplete: the scan cuts it')));
  return h('section', {}, h('h2', {}, 'Measurements'),
    table(['Structure', 'Volume (ml)', 'Surface (cm²)', 'Mean (HU) ± SD', ''], rows, { id: 'measurements' }),
    summary.not_found.length ? h('p', { class: 'muted' }, `Not found in this series: ${summary.not_found.join(', ')}`) : '');
}

// The patient's volume of each structure over time (pseudonymous: dates and volumes only),
// one small inline SVG line per structure; this job's point is filled.
function svg(tag, attributes = {}, ...children) {
  const element = document.createElementNS('http://www.w3.org/2000/svg', tag);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, value);
  for (const child of children.flat()) element.append(child instanceof Node ? child : String(child));
  return element;
}

function historyPlot(entry, jobId) {
  const [width, height, pad] = [260, 90, 18];
  const days = entry.points.map((p) => Date.UTC(+p.study_date.slice(0, 4), +p.study_date.slice(4, 6) - 1, +p.study_date.slice(6, 8)));
  const volumes = entry.points.map((p) => p.volume_ml);
  const [d0, d1] = [Math.min(...days), Math.max(...days)];
  const [v0, v1] = [Math.min(...volumes), Math.max(...volumes)];
  const x = (d) => pad + (d1 > d0 ? (d - d0) / (d1 - d0) : 0.5) * (width - 2 * pad);
  const y = (v) => height - pad - (v1 > v0 ? (v - v0) / (v1 - v0) : 0.5) * (height - 2 * pad);
  const xy = entry.points.map((p, i) => [x(days[i]), y(p.volume_ml)]);
  return svg('svg', { width, height, viewBox: `0 0 ${width} ${height}`, class: 'history-plot', role: 'img', 'aria-label': `${entry.structure} volume over time` },
    svg('polyline', { points: xy.map(([a, b]) => `${a},${b}`).join(' '), fill: 'none', stroke: 'currentColor' }),
    entry.points.map((p, i) => svg('circle', { cx: xy[i][0], cy: xy[i][1], r: 3, stroke: 'currentColor', fill: p.job_id === jobId ? 'currentColor' : 'white' },
      svg('title', {}, `${p.study_date}: ${p.volume_ml} ml`))),
    svg('text', { x: 2, y: 12, 'font-size': 10, fill: 'currentColor' }, `${v1} ml`),
    svg('text', { x: 2, y: height - 2, 'font-size': 10, fill: 'currentColor' }, `${v0} ml`));
}

function volumeHistory(job) {
  const entries = (job.history || []).filter((e) => e.points.length > 1);
  if (!entries.length) return '';
  return h('section', { id: 'history' }, h('h2', {}, 'Volume over time (this patient)'),
    h('div', { class: 'thumbs' }, entries.map((e) => h('figure', {}, historyPlot(e, job.id),
      h('figcaption', {}, `${e.structure}: ${e.points.map((p) => `${p.study_date} ${p.volume_ml} ml`).join(' → ')}`)))));
}

function downloads(job) {
  const names = job.files.map((f) => f.name);
  const group = (title, picked) => (picked.length ? h('div', {}, h('h3', {}, title),
    h('ul', { class: 'files' }, picked.map((n) => h('li', {}, fileLink(job.id, n), h('span', { class: 'muted' }, ` ${(job.files.find((f) => f.name === n).bytes / 1024).toFixed(0)} KiB`))))) : '');
  return h('section', { id: 'downloads' }, h('h2', {}, 'Downloads'),
    group('DICOM objects', names.filter((n) => n.endsWith('.dcm'))),
    group('3D meshes', names.filter((n) => n.endsWith('.stl') || n.endsWith('.glb'))),
    group('Other', names.filter((n) => !n.endsWith('.dcm') && !n.endsWith('.stl') && !n.endsWith('.glb'))),
    job.ohif ? h('p', {}, h('a', { id: 'ohif', href: job.ohif, target: '_blank', rel: 'noopener' }, 'Open the study in OHIF')) : '');
}

async function thumbnails(job) {
  const names = (job.summary && job.summary.thumbnails) || [];
  const figures = await Promise.all(names.map(async (n) => h('figure', {},
    h('img', { src: await blobUrl(`/jobs/${job.id}/files/${n}`), alt: n, class: 'thumbnail' }),
    h('figcaption', {}, n.split('/').pop().replace('.png', '')))));
  return h('section', { id: 'thumbnails' }, h('h2', {}, 'Key slices'), figures.length ? h('div', { class: 'thumbs' }, figures) : h('p', { class: 'muted' }, 'none'));
}

function jobPage(jobId) {
  let shownState = '';
  let shownStatus = '';
  async function refresh() {
    const job = await json(`/jobs/${jobId}`);
    if (view !== page) return; // another page now: drawing this one would replace it
    const status = JSON.stringify([job.state, job.progress, job.error, job.deliveries]);
    if (job.state === shownState && document.getElementById('job-header')) {
      if (status !== shownStatus) { document.getElementById('job-header').replaceWith(header(job)); shownStatus = status; }
      return;
    }
    shownState = job.state;
    shownStatus = status;
    const parts = [header(job)];
    const summary = job.summary;
    if (summary && job.state === 'done') {
      const glb = job.files.find((f) => f.name.endsWith('.glb'));
      const viewer = h('section', { id: 'viewer-section' }, h('h2', {}, '3D'), glb ? h('div', { id: 'viewer' }) : h('p', { class: 'muted' }, 'No structure was found: no 3D model.'));
      parts.push(viewer, measurements(summary), volumeHistory(job), await thumbnails(job),
        h('section', {}, h('h2', {}, 'Stage timings'), table(['Stage', 'Seconds'], Object.entries(summary.stages_s).map(([k, v]) => h('tr', {}, h('td', {}, k), h('td', {}, v.toFixed(2)))), { id: 'stages' })),
        downloads(job));
      if (view !== page) return;
      main.replaceChildren(...parts);
      if (glb) showModel(document.getElementById('viewer'), `/jobs/${jobId}/files/${glb.name}`, token(), summary.structures);
    } else {
      main.replaceChildren(...parts);
    }
  }
  function header(job) {
    const model = job.summary ? `${job.summary.model.name} ${job.summary.model.version}` : job.model;
    return h('section', { id: 'job-header' },
      h('h2', {}, `Job #${job.id} `, badge(job.state, jobWords(job))),
      h('dl', { class: 'facts' },
        h('dt', {}, 'Model'), h('dd', { id: 'job-model' }, model),
        h('dt', {}, 'Rule'), h('dd', {}, job.rule),
        h('dt', {}, 'Study'), h('dd', {}, job.study_instance_uid || '–'),
        h('dt', {}, 'Series'), h('dd', {}, job.series_instance_uid),
        h('dt', {}, 'Calling AE'), h('dd', {}, job.calling_ae || '–'),
        h('dt', {}, 'Created'), h('dd', {}, when(job.created_at)),
        h('dt', {}, 'Updated'), h('dd', {}, when(job.updated_at)),
        job.progress && job.state === 'running' ? [h('dt', {}, 'Stage started'), h('dd', {}, when(new Date(job.progress.started_at * 1000).toISOString()))] : []),
      h('p', {}, h('button', { type: 'button', onclick: () => action(`/jobs/${job.id}/retry`), disabled: ['queued', 'running'].includes(job.state) }, 'Retry'), ' ',
        h('button', { type: 'button', onclick: () => action(`/jobs/${job.id}/resend`), disabled: job.state !== 'done' }, 'Resend')),
      table(['Destination', 'State', 'Tries'], job.deliveries.map((d) => h('tr', {}, h('td', {}, d.destination), h('td', {}, badge(d.state, deliveryWords(d))), h('td', {}, d.attempts))), { id: 'job-deliveries' }));
  }
  const page = { kind: 'job', refresh };
  return page;
}

// --- routing and live updates ----------------------------------------------------------------------

async function tick() {
  clearTimeout(timer);
  if (!view) return;
  try {
    await view.refresh();
    document.getElementById('live').textContent = `live · updated ${new Date().toLocaleTimeString()}`;
  } catch (err) {
    if (err instanceof Unauthorised) return; // the dialog asks; polling resumes after the token
    document.getElementById('live').textContent = `cannot reach the node: ${err.message}`;
  }
  timer = setTimeout(tick, POLL_MS);
}

function route() {
  const match = location.hash.match(/^#\/job\/(\d+)$/);
  view = match ? jobPage(Number(match[1])) : listPage();
  main.replaceChildren(h('p', { class: 'muted' }, 'Loading…'));
  tick();
}

window.addEventListener('hashchange', route);
route();
