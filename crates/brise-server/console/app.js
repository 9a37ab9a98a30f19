// brise console: chat, arena, dashboard and admin over the server's own API.
// No framework and no build step: plain DOM code, with marked + DOMPurify for Markdown
// and Chart.js for charts (vendored, served by brise itself).
'use strict';
(() => {
  const $ = (sel, root = document) => root.querySelector(sel);
  const $$ = (sel, root = document) => [...root.querySelectorAll(sel)];

  /** Builds an element: h('button', {class: 'x', onclick: f}, 'text', child). */
  function h(tag, attrs = {}, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (v === undefined || v === null || v === false) continue;
      if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
      else if (k === 'class') el.className = v;
      else if (k === 'html') el.innerHTML = v;
      else el.setAttribute(k, v === true ? '' : v);
    }
    for (const c of children.flat()) {
      if (c !== null && c !== undefined && c !== false) el.append(c instanceof Node ? c : String(c));
    }
    return el;
  }

  // Inline icons (paths only: no markup from outside).
  const ICONS = {
    up: 'M7 10v11M2 12v7a2 2 0 0 0 2 2h13.4a2 2 0 0 0 2-1.7l1.3-7A2 2 0 0 0 18.7 10H14V5a3 3 0 0 0-3-3l-4 8',
    down: 'M17 14V3M22 12V5a2 2 0 0 0-2-2H6.6a2 2 0 0 0-2 1.7l-1.3 7A2 2 0 0 0 5.3 14H10v5a3 3 0 0 0 3 3l4-8',
    copy: 'M9 9h11v11H9zM5 15H4V4h11v1',
    redo: 'M21 12a9 9 0 1 1-3-6.7L21 8M21 3v5h-5',
    edit: 'M12 20h9M16.5 3.5a2.1 2.1 0 0 1 3 3L7 19l-4 1 1-4z',
    sun: 'M12 17a5 5 0 1 0 0-10 5 5 0 0 0 0 10zM12 1v2M12 21v2M4.2 4.2l1.4 1.4M18.4 18.4l1.4 1.4M1 12h2M21 12h2M4.2 19.8l1.4-1.4M18.4 5.6l1.4-1.4',
    moon: 'M21 12.8A9 9 0 1 1 11.2 3a7 7 0 0 0 9.8 9.8z',
    // A half-filled circle: the theme follows the system.
    auto: ['M12 3a9 9 0 1 0 0 18a9 9 0 1 0 0-18z', 'M12 3a9 9 0 0 0 0 18z'],
  };
  function icon(name) {
    const ns = 'http://www.w3.org/2000/svg';
    const svg = document.createElementNS(ns, 'svg');
    svg.setAttribute('viewBox', '0 0 24 24');
    svg.setAttribute('aria-hidden', 'true');
    svg.setAttribute('fill', 'none');
    svg.setAttribute('stroke', 'currentColor');
    svg.setAttribute('stroke-width', '2');
    svg.setAttribute('stroke-linecap', 'round');
    svg.setAttribute('stroke-linejoin', 'round');
    [].concat(ICONS[name]).forEach((d, i) => {
      const p = document.createElementNS(ns, 'path');
      p.setAttribute('d', d);
      if (i > 0) p.setAttribute('fill', 'currentColor');
      svg.append(p);
    });
    return svg;
  }
  const iconButton = (name, label, {class: cls = '', ...attrs} = {}) =>
    h('button', {type: 'button', class: `icon-btn ${cls}`, 'aria-label': label, title: label, ...attrs}, icon(name));

  let toastTimer;
  function toast(text) {
    const t = $('#toast');
    t.textContent = text;
    t.classList.add('show');
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => t.classList.remove('show'), 2500);
  }

  // ---- storage: the API key in this tab, or on this device when asked to remember it.
  const store = {
    get: (k) => sessionStorage.getItem(k) ?? localStorage.getItem(k) ?? '',
    set(k, v, remember) {
      sessionStorage.removeItem(k);
      localStorage.removeItem(k);
      if (v) (remember ? localStorage : sessionStorage).setItem(k, v);
    },
  };
  const state = {
    key: store.get('brise.key'),
    adminKey: sessionStorage.getItem('brise.adminKey') || '',
    models: [],
    conv: [],
    busy: null,
  };

  // ---- the API
  class ApiError extends Error {
    constructor(status, body) {
      const e = body && body.error;
      super((e && e.message) || `HTTP ${status}`);
      this.status = status;
      this.param = e && e.param;
    }
  }

  let keyPrompt = null;
  /** Opens the key dialog (once, however many requests wait) and resolves with the key. */
  function askKey(reason) {
    if (keyPrompt) return keyPrompt;
    keyPrompt = new Promise((resolve, reject) => {
      const d = $('#key-dialog');
      $('#key-reason').textContent = reason;
      $('#key-input').value = '';
      const done = (key) => {
        d.close();
        keyPrompt = null;
        $('#key-form').onsubmit = null;
        $('#key-cancel').onclick = null;
        d.oncancel = null;
        key ? resolve(key) : reject(new Error('An API key is needed to use this server.'));
      };
      $('#key-form').onsubmit = (ev) => {
        ev.preventDefault();
        const key = $('#key-input').value.trim();
        if (!key) return;
        state.key = key;
        store.set('brise.key', key, $('#key-remember').checked);
        $('#key-button').hidden = false;
        done(key);
      };
      $('#key-cancel').onclick = () => done(null);
      d.oncancel = () => done(null);
      d.showModal();
    });
    return keyPrompt;
  }

  async function api(path, {method = 'GET', body, admin = false, signal} = {}) {
    for (;;) {
      const headers = {};
      const key = admin ? state.adminKey : state.key;
      if (key) headers.Authorization = 'Bearer ' + key;
      if (body !== undefined) headers['Content-Type'] = 'application/json';
      const r = await fetch(path, {method, headers, signal, body: body === undefined ? undefined : JSON.stringify(body)});
      if (r.status === 401 && !admin) {
        await askKey(state.key ? 'That API key was not accepted. Enter another one.' : 'This server requires an API key.');
        continue;
      }
      if (!r.ok) throw new ApiError(r.status, await r.json().catch(() => null));
      return r;
    }
  }
  const apiJson = async (path, opts) => (await api(path, opts)).json();

  /** The `data:` payloads of a server-sent event stream. */
  async function* sse(stream) {
    const reader = stream.getReader();
    const dec = new TextDecoder();
    let buf = '';
    for (;;) {
      const {value, done} = await reader.read();
      if (done) return;
      buf += dec.decode(value, {stream: true});
      let i;
      while ((i = buf.indexOf('\n\n')) >= 0) {
        const block = buf.slice(0, i);
        buf = buf.slice(i + 2);
        const data = block.split('\n').filter((l) => l.startsWith('data:'))
          .map((l) => l.slice(5).replace(/^ /, '')).join('\n');
        if (data) yield data;
      }
    }
  }

  // ---- Markdown: marked, then DOMPurify; links open outside, no inline styles.
  const PURIFY = {FORBID_TAGS: ['style', 'form', 'input', 'button', 'textarea', 'select'], FORBID_ATTR: ['style']};
  let purifyHooked = false;
  function markdown(text) {
    if (!purifyHooked) {
      DOMPurify.addHook('afterSanitizeAttributes', (node) => {
        if (node.tagName === 'A') {
          node.setAttribute('target', '_blank');
          node.setAttribute('rel', 'noopener noreferrer');
        }
      });
      purifyHooked = true;
    }
    return DOMPurify.sanitize(marked.parse(text, {gfm: true, breaks: false}), PURIFY);
  }
  /** Renders into `el`; `final` adds code-block headers with a copy button. */
  function renderMarkdown(el, text, final) {
    el.innerHTML = markdown(text);
    if (!final) return;
    for (const pre of $$('pre', el)) {
      const code = $('code', pre);
      if (!code) continue;
      const lang = ([...code.classList].find((c) => c.startsWith('language-')) || '').slice(9);
      const btn = h('button', {type: 'button', 'aria-label': 'Copy code'}, 'Copy');
      btn.addEventListener('click', () => copy(code.textContent, 'Code copied'));
      pre.prepend(h('div', {class: 'code-head'}, h('span', {}, lang || 'code'), btn));
    }
  }
  async function copy(text, done) {
    try {
      await navigator.clipboard.writeText(text);
      toast(done);
    } catch {
      toast('Copying is not allowed here');
    }
  }

  // ---- theme: automatic (system), light or dark
  const THEMES = ['auto', 'light', 'dark'];
  function applyTheme(t) {
    if (t === 'auto') delete document.documentElement.dataset.theme;
    else document.documentElement.dataset.theme = t;
    const b = $('#theme');
    const label = `Colour theme: ${t === 'auto' ? 'automatic' : t}`;
    b.replaceChildren(icon(t === 'auto' ? 'auto' : t === 'light' ? 'sun' : 'moon'));
    b.setAttribute('aria-label', label);
    b.title = label;
    if (dash.data) drawDashboard();
  }

  // ---- views
  const VIEWS = ['chat', 'arena', 'dashboard', 'admin'];
  function route() {
    const v = (location.hash.match(/^#\/(\w+)/) || [])[1];
    const view = VIEWS.includes(v) ? v : 'chat';
    for (const name of VIEWS) $('#view-' + name).hidden = name !== view;
    for (const a of $$('.tabs a')) {
      if (a.dataset.view === view) a.setAttribute('aria-current', 'page');
      else a.removeAttribute('aria-current');
    }
    document.title = `${view[0].toUpperCase()}${view.slice(1)} · brise console`;
    if (view === 'dashboard') loadDashboard();
    if (view === 'admin' && state.adminKey) unlockAdmin(state.adminKey);
    if (view === 'chat') $('#message').focus();
  }

  async function loadModels() {
    try {
      const j = await apiJson('/v1/models');
      state.cards = j.data;
      state.models = j.data.map((m) => m.id);
    } catch (e) {
      toast(e.message);
      return;
    }
    const saved = localStorage.getItem('brise.model');
    for (const sel of $$('[data-model-select]')) {
      const was = sel.value;
      sel.replaceChildren(...state.models.map((id) => h('option', {value: id}, id)));
      if (state.models.includes(was)) sel.value = was;
      else if (state.models.includes(saved)) sel.value = saved;
      if (sel.dataset.bound) continue;
      sel.dataset.bound = '1';
      sel.addEventListener('change', () => {
        localStorage.setItem('brise.model', sel.value);
        for (const o of $$('[data-model-select]')) o.value = sel.value;
      });
    }
  }

  /** Sampling settings shared by chat and arena; empty fields are left to the server. */
  function sampling() {
    const out = {};
    const t = $('#set-temperature').value.trim();
    if (t !== '') out.temperature = Number(t);
    const n = $('#set-max-tokens').value.trim();
    if (n !== '') out.max_tokens = Number(n);
    return out;
  }

  // ---- chat
  const elOf = new WeakMap();

  function history(upto) {
    const msgs = [];
    const sys = $('#set-system').value.trim();
    if (sys) msgs.push({role: 'system', content: sys});
    for (const m of state.conv.slice(0, upto)) {
      if (m.role === 'assistant' && (m.error || !m.content)) continue;
      msgs.push({role: m.role, content: m.content});
    }
    return msgs;
  }

  // The conversation survives a reload of the tab (sessionStorage: it goes with the tab).
  const KEEP = ['role', 'content', 'id', 'model', 'usage', 'ms', 'finish', 'stopped', 'error', 'feedback', 'fbStatus', 'fbError'];
  function saveConversation() {
    const conv = state.conv.filter((m) => !m.pending)
      .map((m) => Object.fromEntries(KEEP.filter((k) => m[k] !== undefined).map((k) => [k, m[k]])));
    try {
      sessionStorage.setItem('brise.chat', JSON.stringify(conv));
    } catch {
      // Storage full or off: the conversation just won't survive a reload.
    }
  }
  function loadConversation() {
    try {
      const conv = JSON.parse(sessionStorage.getItem('brise.chat') || '[]');
      return Array.isArray(conv) ? conv.filter((m) => m && (m.role === 'user' || m.role === 'assistant') && typeof m.content === 'string') : [];
    } catch {
      return [];
    }
  }

  function renderConversation() {
    saveConversation();
    const list = $('#messages');
    list.replaceChildren(...state.conv.map((m, i) => {
      const el = m.role === 'user' ? userEl(m, i) : assistantEl(m, i);
      elOf.set(m, el);
      return el;
    }));
    $('#chat-empty').hidden = state.conv.length > 0;
  }

  function userEl(m, i) {
    const li = h('li', {class: 'msg user'});
    if (m.editing) {
      const ta = h('textarea', {'aria-label': 'Edit message', rows: '3'});
      ta.value = m.content;
      const save = () => {
        const text = ta.value.trim();
        if (!text || state.busy) return;
        state.conv = state.conv.slice(0, i + 1);
        m.content = text;
        m.editing = false;
        generate();
      };
      ta.addEventListener('keydown', (ev) => {
        if (ev.key === 'Enter' && !ev.shiftKey && !ev.isComposing) { ev.preventDefault(); save(); }
        if (ev.key === 'Escape') { m.editing = false; renderConversation(); }
      });
      li.append(h('div', {class: 'edit'}, ta, h('div', {class: 'row end'},
        h('button', {type: 'button', class: 'ghost', onclick: () => { m.editing = false; renderConversation(); }}, 'Cancel'),
        h('button', {type: 'button', class: 'primary', onclick: save}, 'Save and send'))));
      queueMicrotask(() => ta.focus());
      return li;
    }
    li.append(h('div', {class: 'bubble'}, m.content));
    li.append(h('div', {class: 'msg-actions'},
      iconButton('edit', 'Edit message', {disabled: state.busy ? true : undefined, onclick: () => { m.editing = true; renderConversation(); }}),
      iconButton('copy', 'Copy message', {onclick: () => copy(m.content, 'Message copied')})));
    return li;
  }

  function assistantEl(m, i) {
    const li = h('li', {class: 'msg assistant'});
    if (m.id) li.dataset.completionId = m.id;
    const stats = [];
    if (m.usage) stats.push(`${m.usage.completion_tokens} tokens`);
    if (m.ms) stats.push(`${(m.ms / 1000).toFixed(1)} s`);
    li.append(h('div', {class: 'meta'},
      h('span', {class: 'avatar'}, h('img', {src: '/console/icon.svg', alt: ''})),
      h('span', {}, m.model),
      h('span', {class: 'badge', title: 'Generated by an AI model'}, 'AI-generated'),
      stats.length ? h('span', {}, '· ' + stats.join(' · ')) : null));
    const body = h('div', {class: 'md' + (m.pending ? ' typing' : '')});
    renderMarkdown(body, m.content, !m.pending);
    li.append(body);
    if (m.pending) return li;
    if (m.finish === 'length') {
      // The server says why when it cut the answer on its own (a loop, its default limit).
      const why = m.finishNote && m.finishNote.stop === 'repetition'
        ? 'Stopped: the answer was repeating itself (set Max tokens in Settings to let it run).'
        : 'Cut at the token limit (Settings: Max tokens).';
      li.append(h('p', {class: 'note'}, why));
    }
    if (m.stopped) li.append(h('p', {class: 'note'}, 'Stopped. The ledger keeps what was generated, marked cancelled; an answer cut short takes no feedback.'));
    if (m.error) li.append(h('p', {class: 'note error-text', role: 'alert'}, 'Error: ' + m.error));
    const last = i === state.conv.length - 1;
    const actions = h('div', {class: 'msg-actions'});
    if (m.content) actions.append(iconButton('copy', 'Copy answer', {onclick: () => copy(m.content, 'Answer copied')}));
    if (last) actions.append(iconButton('redo', 'Regenerate', {disabled: state.busy ? true : undefined, onclick: regenerate}));
    if (m.id) {
      const fb = m.feedback;
      const good = iconButton('up', 'Good answer', {class: 'good', 'aria-pressed': fb === 'good' ? 'true' : 'false', disabled: fb ? true : undefined});
      const bad = iconButton('down', 'Bad answer', {class: 'bad', 'aria-pressed': fb === 'bad' ? 'true' : 'false',
        'aria-expanded': m.correcting ? 'true' : 'false', 'aria-controls': `fix-${i}`, disabled: fb ? true : undefined});
      good.addEventListener('click', () => rate(m, {rating: 1}, 'good'));
      bad.addEventListener('click', () => { m.correcting = !m.correcting; refresh(m); if (m.correcting) openedForm(i); });
      actions.append(good, bad);
    }
    li.append(actions);
    if (m.id && m.correcting && !m.feedback) li.append(correctionForm(m, i));
    if (m.fbStatus) li.append(h('p', {class: 'fb-status' + (m.fbError ? ' error-text' : ''), role: 'status'}, m.fbStatus));
    return li;
  }

  function openedForm(i) {
    const form = $(`#fix-${i}`);
    if (!form) return;
    form.scrollIntoView({block: 'nearest'});
    $('textarea', form).focus({preventScroll: true});
  }

  function correctionForm(m, i) {
    const better = h('textarea', {rows: '4', placeholder: 'What the answer should have said'});
    const comment = h('textarea', {rows: '2', placeholder: 'What was wrong (optional)'});
    better.value = m.draft || '';
    better.addEventListener('input', () => { m.draft = better.value; });
    const form = h('form', {class: 'correction', id: `fix-${i}`, 'aria-label': 'Correct this answer'},
      h('label', {class: 'field'}, h('span', {}, 'Better answer'), better),
      h('label', {class: 'field'}, h('span', {}, 'Comment (optional)'), comment),
      h('div', {class: 'row end'},
        h('button', {type: 'button', class: 'ghost', onclick: () => { m.correcting = false; refresh(m); }}, 'Cancel'),
        h('button', {type: 'submit', class: 'primary'}, 'Submit feedback')));
    form.addEventListener('submit', (ev) => {
      ev.preventDefault();
      const body = {rating: -1};
      if (better.value.trim()) body.correction = better.value;
      if (comment.value.trim()) body.comment = comment.value.trim();
      rate(m, body, 'bad');
    });
    form.addEventListener('keydown', (ev) => { if (ev.key === 'Escape') { m.correcting = false; refresh(m); } });
    return form;
  }

  async function rate(m, body, kind) {
    try {
      await apiJson('/v1/feedback', {method: 'POST', body: {completion_id: m.id, ...body}});
      m.feedback = kind;
      m.correcting = false;
      m.fbError = false;
      m.fbStatus = kind === 'good' ? 'Thanks: recorded as a good answer.'
        : body.correction ? 'Thanks: your better answer was recorded.' : 'Thanks: recorded as a bad answer.';
    } catch (e) {
      m.fbError = true;
      m.fbStatus = 'Feedback not recorded: ' + e.message;
    }
    refresh(m);
  }

  /** Re-renders one message in place. */
  function refresh(m) {
    const old = elOf.get(m);
    const i = state.conv.indexOf(m);
    if (!old || i < 0) return renderConversation();
    const el = m.role === 'user' ? userEl(m, i) : assistantEl(m, i);
    elOf.set(m, el);
    old.replaceWith(el);
    saveConversation();
  }

  function setBusy(ctl) {
    state.busy = ctl;
    $('#send').hidden = !!ctl;
    $('#stop').hidden = !ctl;
  }

  function stickToBottom() {
    const s = $('#chat-scroller');
    if (s.scrollHeight - s.scrollTop - s.clientHeight < 160) s.scrollTop = s.scrollHeight;
  }

  async function generate() {
    const model = $('#chat-model').value;
    if (!model) { toast('No model is loaded yet'); return; }
    const messages = history(state.conv.length);
    const m = {role: 'assistant', content: '', model, pending: true};
    state.conv.push(m);
    const ctl = new AbortController();
    setBusy(ctl);
    renderConversation();
    $('#chat-scroller').scrollTop = $('#chat-scroller').scrollHeight;
    const t0 = performance.now();
    let id = null;
    let frame = 0;
    const paint = () => {
      frame = 0;
      const el = elOf.get(m);
      if (el) renderMarkdown($('.md', el), m.content, false);
      stickToBottom();
    };
    try {
      const r = await api('/v1/chat/completions', {method: 'POST', signal: ctl.signal,
        body: {model, messages, stream: true, stream_options: {include_usage: true}, ...sampling()}});
      let done = false;
      for await (const data of sse(r.body)) {
        if (data === '[DONE]') { done = true; break; }
        const j = JSON.parse(data);
        if (j.error) throw new Error(j.error.message);
        id = j.id || id;
        if (j.usage) m.usage = j.usage;
        if (j.choices && j.choices[0] && j.choices[0].finish_reason) {
          m.finish = j.choices[0].finish_reason;
          m.finishNote = j.choices[0].brise || null;
        }
        const delta = j.choices && j.choices[0] && j.choices[0].delta;
        if (delta && delta.content) {
          m.content += delta.content;
          if (!frame) frame = requestAnimationFrame(paint);
        }
      }
      if (!done) throw new Error('the answer stream ended before it was complete');
      // [DONE] comes after the ledger committed the record: now it takes feedback.
      m.id = id;
    } catch (e) {
      if (e.name === 'AbortError') m.stopped = true;
      else m.error = e.message;
    } finally {
      if (frame) cancelAnimationFrame(frame);
      m.pending = false;
      m.ms = performance.now() - t0;
      setBusy(null);
      renderConversation();
      stickToBottom();
    }
  }

  function sendMessage(text) {
    text = text.trim();
    if (!text || state.busy) return;
    state.conv.push({role: 'user', content: text});
    $('#message').value = '';
    autosize();
    generate();
  }

  function regenerate() {
    if (state.busy) return;
    const last = state.conv[state.conv.length - 1];
    if (last && last.role === 'assistant') state.conv.pop();
    generate();
  }

  function autosize() {
    const ta = $('#message');
    ta.style.height = 'auto';
    ta.style.height = Math.min(ta.scrollHeight, window.innerHeight * 0.4) + 'px';
  }

  // ---- arena
  const arena = {cands: null, chosen: false};
  async function compare(ev) {
    ev.preventDefault();
    const prompt = $('#arena-prompt').value.trim();
    const status = $('#arena-status');
    if (!prompt) { status.textContent = 'Write a prompt first.'; $('#arena-prompt').focus(); return; }
    const go = $('#arena-go');
    go.disabled = true;
    status.className = 'status';
    status.textContent = 'Generating two answers…';
    $('#arena-result').hidden = true;
    try {
      const s = sampling();
      // The version serving now against a candidate: the adapter picked, else the
      // model's newest other one (a picked serving version is compared with the base).
      // Without adapters, two answers of the one version.
      const cards = state.cards || [];
      const picked = cards.find((m) => m.id === $('#arena-model').value);
      let model = $('#arena-model').value;
      if (picked && picked.parent) model = picked.parent;
      const card = cards.find((m) => m.id === model);
      const current = (card && card.current_version) || 'base';
      let candidate = picked && picked.parent ? picked.adapter.name : null;
      if (!candidate) {
        const others = cards.filter((m) => m.parent === model && m.adapter.name !== current)
          .sort((a, b) => b.created - a.created);
        if (others.length) candidate = others[0].adapter.name;
      }
      let versions;
      if (candidate) versions = [candidate === current ? 'base' : current, candidate];
      else if (current !== 'base') versions = ['base', current];
      // Two answers from one version differ only by sampling: greedy settings are left out.
      if (!versions && s.temperature === 0) delete s.temperature;
      const j = await apiJson('/v1/compare', {method: 'POST', body: {model,
        messages: [{role: 'user', content: prompt}], ...(versions ? {versions} : {}), ...s}});
      arena.cands = j.candidates;
      arena.chosen = false;
      for (const [side, c] of [['left', j.candidates[0]], ['right', j.candidates[1]]]) {
        const card = $('#cand-' + side);
        card.dataset.completionId = c.id;
        card.classList.remove('chosen');
        renderMarkdown($('.md', card), c.message.content || '(empty answer)', true);
        const v = $('.version', card);
        v.textContent = c.version;
        v.hidden = true;
      }
      for (const b of $$('.choice button')) { b.disabled = false; b.setAttribute('aria-pressed', 'false'); }
      $('#arena-result').hidden = false;
      status.textContent = 'Which answer is better? The versions are revealed after you choose.';
      $('.choice button').focus();
    } catch (e) {
      status.className = 'status error';
      status.textContent = e.message;
    } finally {
      go.disabled = false;
    }
  }

  async function choose(choice) {
    if (!arena.cands || arena.chosen) return;
    const [l, r] = arena.cands;
    const body = choice === 'tie' ? {tie: [l.id, r.id]}
      : choice === 'left' ? {preferred: l.id, rejected: r.id} : {preferred: r.id, rejected: l.id};
    const status = $('#arena-status');
    try {
      await apiJson('/v1/feedback', {method: 'POST', body});
      arena.chosen = true;
      for (const b of $$('.choice button')) {
        b.disabled = true;
        b.setAttribute('aria-pressed', b.dataset.choice === choice ? 'true' : 'false');
      }
      if (choice !== 'tie') $('#cand-' + choice).classList.add('chosen');
      for (const v of $$('#arena-result .version')) v.hidden = false;
      status.className = 'status';
      status.textContent = `Recorded: ${choice === 'tie' ? 'a tie' : `the ${choice} answer is better`}. Left was ${l.version}, right was ${r.version}.`;
    } catch (e) {
      status.className = 'status error';
      status.textContent = 'Not recorded: ' + e.message;
    }
  }

  // ---- dashboard
  const dash = {data: null, charts: {}};
  async function loadDashboard(quiet) {
    const status = $('#dash-status');
    status.className = 'status';
    if (quiet !== true) status.textContent = 'Loading…';
    try {
      dash.data = await apiJson('/v1/usage?window=' + $('#dash-window').value);
      status.textContent = `Updated ${new Date().toLocaleTimeString()}.`;
      drawDashboard();
      loadLearning(quiet);
    } catch (e) {
      status.className = 'status error';
      status.textContent = 'Could not load usage: ' + e.message;
    }
  }

  const fmtInt = (n) => Number(n).toLocaleString();
  const fmtPct = (r) => (r === null || r === undefined ? '–' : `${Math.round(r * 100)}%`);
  const fmtMs = (ms) => (ms === null || ms === undefined ? '–' : ms >= 1000 ? `${(ms / 1000).toFixed(2)} s` : `${Math.round(ms)} ms`);

  function drawDashboard() {
    const u = dash.data;
    const s = u.series;
    const sum = (k) => s.reduce((a, b) => a + b[k], 0);
    const requests = sum('requests');
    const weighted = s.reduce((a, b) => a + (b.latency_ms_avg || 0) * b.requests, 0);
    const fb = u.feedback;
    const fsum = (k) => fb.reduce((a, b) => a + b[k], 0);
    const good = fsum('good');
    const bad = fsum('bad');
    const tiles = [
      ['Requests', fmtInt(requests)],
      ['Errors', fmtInt(sum('errors'))],
      ['Tokens', fmtInt(sum('prompt_tokens') + sum('completion_tokens'))],
      ['Mean latency', requests ? fmtMs(weighted / requests) : '–'],
      ['Rated good', good + bad ? fmtPct(good / (good + bad)) : '–'],
      ['Corrections', fmtInt(fsum('corrections'))],
      ['Arena choices', fmtInt(fsum('wins') + fsum('ties'))],
    ];
    $('#dash-tiles').replaceChildren(...tiles.map(([label, value]) =>
      h('div', {class: 'card tile', 'data-tile': label}, h('div', {class: 'label'}, label), h('div', {class: 'value'}, value))));

    const css = getComputedStyle(document.documentElement);
    const c = (v) => css.getPropertyValue(v).trim();
    Chart.defaults.color = c('--muted');
    Chart.defaults.borderColor = c('--border');
    Chart.defaults.font.family = c('--font');
    const day = u.bucket_ms >= 86_400_000;
    const long = u.to_ms - u.from_ms > 86_400_000;
    const fmt = new Intl.DateTimeFormat(undefined, day ? {month: 'short', day: 'numeric'}
      : long ? {weekday: 'short', hour: '2-digit', minute: '2-digit'} : {hour: '2-digit', minute: '2-digit'});
    const labels = s.map((b) => fmt.format(new Date(b.start_ms)));
    const per = u.bucket_ms >= 3_600_000 ? `${u.bucket_ms / 3_600_000} h` : `${u.bucket_ms / 60_000} min`;
    const base = {
      responsive: true, maintainAspectRatio: false, animation: false,
      interaction: {mode: 'index', intersect: false},
      plugins: {legend: {position: 'bottom', labels: {boxWidth: 12}}},
      scales: {x: {grid: {display: false}, ticks: {maxTicksLimit: 8, maxRotation: 0}}, y: {beginAtZero: true, ticks: {precision: 0}}},
    };
    const stacked = {...base, scales: {x: {...base.scales.x, stacked: true}, y: {...base.scales.y, stacked: true}}};
    const chart = (id, config, summary) => {
      dash.charts[id]?.destroy();
      const canvas = $('#' + id);
      canvas.setAttribute('aria-label', summary);
      dash.charts[id] = new Chart(canvas, config);
    };
    chart('chart-requests', {type: 'bar', options: stacked, data: {labels, datasets: [
      {label: 'OK', data: s.map((b) => b.requests - b.errors), backgroundColor: c('--accent'), borderRadius: 3},
      {label: 'Errors', data: s.map((b) => b.errors), backgroundColor: c('--bad'), borderRadius: 3},
    ]}}, `Requests per ${per}: ${requests} in all, ${sum('errors')} errors`);
    chart('chart-tokens', {type: 'bar', options: stacked, data: {labels, datasets: [
      {label: 'Prompt', data: s.map((b) => b.prompt_tokens), backgroundColor: c('--accent-2'), borderRadius: 3},
      {label: 'Completion', data: s.map((b) => b.completion_tokens), backgroundColor: c('--good'), borderRadius: 3},
    ]}}, `Tokens per ${per}: ${sum('prompt_tokens')} prompt, ${sum('completion_tokens')} completion`);
    chart('chart-latency', {type: 'line', options: {...base, spanGaps: true}, data: {labels, datasets: [
      {label: 'Mean', data: s.map((b) => b.latency_ms_avg), borderColor: c('--accent'), backgroundColor: c('--accent'), pointRadius: 2, tension: 0.25},
      {label: 'Max', data: s.map((b) => b.latency_ms_max), borderColor: c('--bad'), backgroundColor: c('--bad'), pointRadius: 2, tension: 0.25},
      {label: 'Time to first token', data: s.map((b) => b.ttft_ms_avg), borderColor: c('--good'), backgroundColor: c('--good'), pointRadius: 2, tension: 0.25},
    ]}}, `Latency per ${per} in milliseconds`);
    const vname = (f) => `${f.model} · ${f.adapter || 'base'}`;
    chart('chart-feedback', {type: 'bar', options: {...base, datasets: {bar: {maxBarThickness: 36}}}, data: {labels: fb.map(vname), datasets: [
      {label: 'Good', data: fb.map((f) => f.good), backgroundColor: c('--good'), borderRadius: 3},
      {label: 'Bad', data: fb.map((f) => f.bad), backgroundColor: c('--bad'), borderRadius: 3},
      {label: 'Corrections', data: fb.map((f) => f.corrections), backgroundColor: c('--muted'), borderRadius: 3},
      {label: 'Arena wins', data: fb.map((f) => f.wins), backgroundColor: c('--accent'), borderRadius: 3},
      {label: 'Arena losses', data: fb.map((f) => f.losses), backgroundColor: c('--border'), borderRadius: 3},
      {label: 'Ties', data: fb.map((f) => f.ties), backgroundColor: c('--accent-2'), borderRadius: 3},
    ]}}, `Feedback counts by model version: ${fb.map((f) => `${vname(f)} ${f.good} good, ${f.bad} bad`).join('; ') || 'none'}`);

    const rows = fb.map((f) => h('tr', {'data-model': f.model, 'data-adapter': f.adapter || 'base'},
      h('td', {'data-col': 'model'}, f.model),
      h('td', {'data-col': 'version'}, f.adapter || 'base'),
      h('td', {'data-col': 'completions'}, fmtInt(f.completions)),
      h('td', {'data-col': 'with_feedback'}, `${fmtInt(f.with_feedback)} (${fmtPct(f.feedback_rate)})`),
      h('td', {'data-col': 'good'}, fmtInt(f.good)),
      h('td', {'data-col': 'bad'}, fmtInt(f.bad)),
      h('td', {'data-col': 'good_rate'}, fmtPct(f.good_rate)),
      h('td', {'data-col': 'corrections'}, fmtInt(f.corrections)),
      h('td', {'data-col': 'wins'}, fmtInt(f.wins)),
      h('td', {'data-col': 'losses'}, fmtInt(f.losses)),
      h('td', {'data-col': 'ties'}, fmtInt(f.ties)),
      h('td', {'data-col': 'win_rate'}, fmtPct(f.win_rate))));
    $('#dash-feedback tbody').replaceChildren(...(rows.length ? rows
      : [h('tr', {}, h('td', {colspan: '12', class: 'empty-row'}, 'No answers in this period yet.'))]));
  }

  // ---- learning: training jobs with their loss curves, and adapter versions
  const learn = {jobs: [], versions: [], models: [], files: {}, selected: null, curveFor: null, curve: []};
  const shortId = (id) => (id || '').replace(/^ftjob-/, '').slice(0, 8);
  const pill = (text, cls = text) => h('span', {class: `pill ${cls}`}, text);
  const ago = (s) => (s ? new Date(s * 1000).toLocaleString(undefined, {month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit'}) : '–');
  const active = (j) => j.status === 'running' || j.status === 'queued';

  async function loadLearning(quiet) {
    const status = $('#learn-status');
    status.className = 'status';
    try {
      const [jobs, versions, files] = await Promise.all([apiJson('/v1/fine_tuning/jobs?limit=50'),
        apiJson('/v1/adapters'), apiJson('/v1/files?purpose=fine-tune')]);
      learn.files = Object.fromEntries(files.data.map((f) => [f.id, f.filename]));
      learn.jobs = jobs.data;
      learn.versions = versions.data;
      learn.models = versions.models;
      if (!learn.jobs.some((j) => j.id === learn.selected)) {
        learn.selected = (learn.jobs.find(active) || learn.jobs[0] || {}).id || null;
      }
      drawJobs();
      drawVersions();
      await drawLoss();
      if (quiet !== true) status.textContent = '';
    } catch (e) {
      status.className = 'status error';
      status.textContent = 'Could not load training jobs and versions: ' + e.message;
    }
  }

  function drawJobs() {
    const rows = learn.jobs.map((j) => {
      const m = (j.brise && j.brise.metrics) || {};
      const fm = j.fine_tuned_model ? j.fine_tuned_model.split(':').pop() : null;
      const selected = j.id === learn.selected;
      const data = j.brise.source === 'ledger' ? 'feedback in the ledger'
        : h('span', {title: j.training_file}, learn.files[j.training_file] || j.training_file);
      const show = h('button', {type: 'button', class: 'ghost small', 'aria-pressed': String(selected),
        'aria-label': `Show the loss curve of job ${shortId(j.id)}`, onclick: () => { learn.selected = j.id; drawJobs(); drawLoss(); }}, 'Loss curve');
      const actions = [show];
      if (active(j)) {
        actions.push(h('button', {type: 'button', class: 'ghost small', 'aria-label': `Cancel job ${shortId(j.id)}`,
          onclick: () => cancelJob(j)}, 'Cancel'));
      }
      return h('tr', {'data-job': j.id, 'data-status': j.status, 'aria-selected': String(selected)},
        h('td', {}, h('code', {title: j.id}, shortId(j.id)), h('span', {class: 'sub'}, j.brise.created_by === 'brise serve --learn' ? 'brise serve --learn' : ago(j.created_at))),
        h('td', {class: 'wrap'}, data),
        h('td', {}, j.brise.method.toUpperCase()),
        h('td', {'data-col': 'status'}, pill(j.brise.cancel_requested && j.status === 'running' ? 'cancelling' : j.status),
          j.error ? h('span', {class: 'sub error-text', title: j.error.message}, j.error.message.slice(0, 60)) : null),
        h('td', {class: 'num', 'data-col': 'progress'}, m.step ? `${m.step} / ${m.total_steps}` : '–'),
        h('td', {class: 'num', 'data-col': 'loss'}, typeof m.train_loss === 'number' ? m.train_loss.toFixed(3) : '–'),
        h('td', {'data-col': 'result'}, fm ? h('code', {}, fm) : '–'),
        h('td', {}, h('div', {class: 'actions'}, actions)));
    });
    $('#dash-jobs tbody').replaceChildren(...(rows.length ? rows
      : [h('tr', {}, h('td', {colspan: '8', class: 'empty-row'}, 'No training jobs yet.'))]));
  }

  async function cancelJob(j) {
    try {
      if (j.brise.source === 'ledger' && state.adminKey) {
        await apiJson(`/v1/admin/fine_tuning/jobs/${j.id}/cancel`, {method: 'POST', admin: true});
      } else {
        await apiJson(`/v1/fine_tuning/jobs/${j.id}/cancel`, {method: 'POST'});
      }
      toast(`Cancelling job ${shortId(j.id)}`);
    } catch (e) {
      toast('Could not cancel: ' + e.message);
    }
    loadLearning(true);
  }

  async function drawLoss() {
    const j = learn.jobs.find((x) => x.id === learn.selected);
    $('#loss-empty').hidden = !!j;
    $('#chart-loss').closest('.canvas-box').hidden = !j;
    if (!j) {
      $('#loss-caption').textContent = 'Training loss';
      return;
    }
    const steps = (j.brise.metrics && j.brise.metrics.step) || 0;
    // Fetch the events only when there are new steps (or another job is shown).
    if (learn.curveFor !== j.id || learn.curve.length !== steps) {
      const ev = await apiJson(`/v1/fine_tuning/jobs/${j.id}/events?order=asc&limit=100000`);
      learn.curve = ev.data.filter((e) => e.type === 'metrics' && e.data).map((e) => e.data);
      learn.curveFor = j.id;
    }
    const pts = learn.curve;
    const last = pts[pts.length - 1];
    $('#loss-caption').textContent = `Training loss: job ${shortId(j.id)} (${j.status}${last ? `, step ${last.step} of ${last.total_steps}` : ''})`;
    const css = getComputedStyle(document.documentElement);
    const c = (v) => css.getPropertyValue(v).trim();
    dash.charts['chart-loss']?.destroy();
    const canvas = $('#chart-loss');
    canvas.setAttribute('aria-label', pts.length
      ? `Training loss of job ${shortId(j.id)} over ${pts.length} steps: from ${pts[0].train_loss.toFixed(3)} to ${last.train_loss.toFixed(3)}`
      : `Job ${shortId(j.id)} has no training steps yet`);
    dash.charts['chart-loss'] = new Chart(canvas, {
      type: 'line',
      data: {labels: pts.map((p) => p.step), datasets: [
        {label: 'Loss', data: pts.map((p) => p.train_loss), borderColor: c('--accent'), backgroundColor: c('--accent'), pointRadius: pts.length > 60 ? 0 : 2, tension: 0.2, yAxisID: 'y'},
        {label: 'Learning rate', data: pts.map((p) => p.learning_rate), borderColor: c('--muted'), backgroundColor: c('--muted'), borderDash: [4, 4], pointRadius: 0, yAxisID: 'lr'},
      ]},
      options: {
        responsive: true, maintainAspectRatio: false, animation: false,
        interaction: {mode: 'index', intersect: false},
        plugins: {legend: {position: 'bottom', labels: {boxWidth: 12}}},
        scales: {
          x: {title: {display: true, text: 'Step'}, grid: {display: false}, ticks: {maxTicksLimit: 10, maxRotation: 0}},
          y: {title: {display: true, text: 'Loss'}},
          lr: {position: 'right', grid: {display: false}, ticks: {maxTicksLimit: 4, callback: (v) => Number(v).toExponential(0)}},
        },
      },
    });
  }

  /** The gate's verdict: a pill, the perplexity change, and every check in a disclosure. */
  function evaluation(v) {
    const r = v.eval_report;
    if (!r) return h('span', {class: 'sub'}, 'not evaluated');
    const cand = r.candidate && r.candidate.metrics;
    const cur = r.current && r.current.metrics;
    const ppl = cand && cur && cand.ppl && cur.ppl ? (cand.ppl / cur.ppl - 1) * 100 : null;
    const nll = cand && cur && cand.nll && cur.nll ? (cand.nll / cur.nll - 1) * 100 : null;
    const pct = (x) => `${x > 0 ? '+' : ''}${x.toFixed(1)}%`;
    const checks = (r.checks || []).map((k) => h('li', {},
      h('span', {class: `outcome ${k.outcome}`}, k.outcome), h('span', {}, `${k.metric}: ${k.why}`)));
    return h('details', {class: 'report'},
      h('summary', {}, pill(r.passed ? 'passed' : 'failed'), ' ',
        nll !== null ? `held-out NLL ${pct(nll)}` : '', ppl !== null ? `, perplexity ${pct(ppl)}` : ''),
      h('p', {class: 'sub'}, r.summary),
      h('ul', {class: 'checks'}, checks),
      r.held_out ? h('p', {class: 'sub'}, `Held out: ${r.held_out.examples} examples; against ${r.current.name}.`) : null);
  }

  function drawVersions() {
    const admin = !!state.adminKey;
    $('#versions-hint').hidden = admin;
    const serving = Object.fromEntries(learn.models.map((m) => [m.model, m.serving]));
    const rows = [...learn.versions].reverse().map((v) => {
      const isServing = serving[v.model] === v.id;
      const st = v.tainted ? 'tainted' : v.status;
      const actions = [];
      if (admin && !isServing && !v.tainted && v.status !== 'rejected') {
        actions.push(h('button', {type: 'button', class: 'small', 'aria-label': `Promote ${v.id}`, onclick: () => promote(v)}, 'Promote'));
      }
      if (admin && isServing) {
        actions.push(h('button', {type: 'button', class: 'ghost small', 'aria-label': `Roll back ${v.model} from ${v.id}`, onclick: () => rollback(v)}, 'Roll back'));
      }
      return h('tr', {'data-version': v.id, 'data-status': st},
        h('td', {}, h('code', {}, v.id), h('span', {class: 'sub'}, v.model)),
        h('td', {'data-col': 'parent'}, v.parent ? h('code', {}, v.parent) : 'the base model'),
        h('td', {'data-col': 'data'}, v.feedback + v.records
          ? [`${v.method.toUpperCase()} on ${fmtInt(v.feedback)} feedback`, h('span', {class: 'sub'}, `${fmtInt(v.records)} answers`)]
          : [`${v.method.toUpperCase()} on a file`, h('span', {class: 'sub', title: v.dataset_sha256 || ''}, v.dataset_sha256 ? `sha256 ${v.dataset_sha256.slice(0, 12)}…` : '')]),
        h('td', {'data-col': 'status'}, pill(isServing ? 'serving' : st, isServing ? 'promoted' : st),
          v.status_reason ? h('span', {class: 'sub', title: v.status_reason}, v.status_reason.slice(0, 50)) : null,
          v.promoted_by ? h('span', {class: 'sub'}, `promoted by ${v.promoted_by}`) : null),
        h('td', {class: 'wrap', 'data-col': 'eval'}, evaluation(v)),
        h('td', {}, ago(Math.floor(v.created_at_ms / 1000)), h('span', {class: 'sub wrap'}, v.created_by)),
        h('td', {}, h('div', {class: 'actions'}, actions)));
    });
    $('#dash-versions tbody').replaceChildren(...(rows.length ? rows
      : [h('tr', {}, h('td', {colspan: '7', class: 'empty-row'}, 'No adapter versions yet: the base model serves every request.'))]));
  }

  async function promote(v) {
    try {
      const r = await apiJson(`/v1/admin/adapters/${encodeURIComponent(v.id)}/promote`, {method: 'POST', admin: true});
      toast(`${v.model} now serves ${r.serving}`);
    } catch (e) {
      toast('Could not promote: ' + e.message);
    }
    await loadLearning(true);
    loadModels();
  }

  async function rollback(v) {
    try {
      const r = await apiJson('/v1/admin/adapters/rollback', {method: 'POST', admin: true, body: {model: v.model}});
      toast(`${v.model} rolled back: now serving ${r.serving}`);
    } catch (e) {
      toast('Could not roll back: ' + e.message);
    }
    await loadLearning(true);
    loadModels();
  }

  // ---- admin
  async function unlockAdmin(key) {
    const status = $('#admin-status');
    state.adminKey = key;
    try {
      const r = await apiJson('/v1/admin/retention', {admin: true});
      sessionStorage.setItem('brise.adminKey', key);
      $('#ret-records').value = r.records_days ?? '';
      $('#ret-feedback').value = r.feedback_days ?? '';
      $('#admin-unlock').hidden = true;
      $('#admin-panels').hidden = false;
      status.className = 'status';
      status.textContent = '';
    } catch (e) {
      state.adminKey = '';
      sessionStorage.removeItem('brise.adminKey');
      status.className = 'status error';
      status.textContent = e.status === 401 ? 'That admin key was not accepted.'
        : e.status === 403 ? 'Admin routes are off on this server: start brise serve with --admin-key.' : e.message;
    }
  }

  function days(input) {
    const v = input.value.trim();
    return v === '' ? null : Number(v);
  }

  async function saveRetention(ev) {
    ev.preventDefault();
    const st = $('#ret-status');
    try {
      const j = await apiJson('/v1/admin/retention', {method: 'POST', admin: true,
        body: {records_days: days($('#ret-records')), feedback_days: days($('#ret-feedback'))}});
      const keep = (d) => (d ? `${d} days` : 'until erased');
      st.className = 'status';
      st.textContent = `Saved: records ${keep(j.retention.records_days)}, feedback ${keep(j.retention.feedback_days)}. ` +
        `Purged ${j.purged.completions} records and ${j.purged.feedback} feedback items.`;
    } catch (e) {
      st.className = 'status error';
      st.textContent = e.message;
    }
  }

  function askErase(ev) {
    ev.preventDefault();
    const subject = $('#erase-subject').value.trim();
    if (!subject) { $('#erase-subject').focus(); return; }
    const tenant = $('#erase-tenant').value.trim();
    $('#erase-question').textContent = `Erase every record and feedback item of “${subject}” in ${tenant ? `tenant “${tenant}”` : 'every tenant'}?`;
    $('#erase-confirm').hidden = false;
    $('#erase-confirm-go').focus();
  }

  async function erase() {
    const subject = $('#erase-subject').value.trim();
    const tenant = $('#erase-tenant').value.trim();
    $('#erase-confirm').hidden = true;
    const out = $('#erase-receipt');
    try {
      const r = await apiJson('/v1/admin/erase', {method: 'POST', admin: true, body: tenant ? {subject, tenant} : {subject}});
      const rows = [['Receipt', r.receipt_id], ['Subject', r.subject], ['Tenant', r.tenant ?? 'every tenant'],
        ['Records erased', r.completions_erased], ['Feedback erased', r.feedback_erased], ['Audit entry', r.audit_seq],
        ['At', new Date(r.at_ms).toLocaleString()],
        // Adapter versions trained on the erased data (marked tainted); one that is
        // serving needs a rollback or a clean version.
        ['Adapter versions marked', (r.adapters_tainted || []).map((v) =>
          v.status === 'promoted' ? `${v.id} (SERVING ${v.model}: roll it back)` : v.id).join(', ') || 'none']];
      out.replaceChildren(h('h3', {}, 'Erasure receipt'), h('dl', {}, rows.flatMap(([k, v]) => [h('dt', {}, k), h('dd', {}, String(v))])));
    } catch (e) {
      out.replaceChildren(h('p', {class: 'error-text'}, 'Not erased: ' + e.message));
    }
  }

  // ---- start
  function start() {
    if (state.key) $('#key-button').hidden = false;
    $('#key-button').addEventListener('click', () => askKey('Enter the API key to use.').then(() => loadModels(), () => {}));
    const theme = localStorage.getItem('brise.theme') || 'auto';
    applyTheme(THEMES.includes(theme) ? theme : 'auto');
    $('#theme').addEventListener('click', () => {
      const cur = document.documentElement.dataset.theme || 'auto';
      const next = THEMES[(THEMES.indexOf(cur) + 1) % THEMES.length];
      localStorage.setItem('brise.theme', next);
      applyTheme(next);
    });

    const msg = $('#message');
    $('#composer').addEventListener('submit', (ev) => { ev.preventDefault(); sendMessage(msg.value); });
    msg.addEventListener('keydown', (ev) => {
      if (ev.key === 'Enter' && !ev.shiftKey && !ev.isComposing) { ev.preventDefault(); sendMessage(msg.value); }
      if (ev.key === 'Escape' && state.busy) state.busy.abort();
    });
    msg.addEventListener('input', autosize);
    $('#stop').addEventListener('click', () => { state.busy?.abort(); msg.focus(); });
    $('#new-chat').addEventListener('click', () => {
      state.busy?.abort();
      state.conv = [];
      renderConversation();
      msg.focus();
    });
    for (const chip of $$('.chip')) chip.addEventListener('click', () => sendMessage(chip.textContent));

    $('#arena-form').addEventListener('submit', compare);
    $('#arena-prompt').addEventListener('keydown', (ev) => {
      if (ev.key === 'Enter' && (ev.ctrlKey || ev.metaKey)) compare(ev);
    });
    for (const b of $$('.choice button')) b.addEventListener('click', () => choose(b.dataset.choice));

    $('#dash-window').addEventListener('change', loadDashboard);
    $('#dash-refresh').addEventListener('click', loadDashboard);
    // The dashboard refreshes itself while it is on screen.
    setInterval(() => {
      if (!$('#view-dashboard').hidden && !document.hidden) loadDashboard(true);
    }, 30_000);
    // While a job trains, its row and loss curve follow it live.
    setInterval(() => {
      if (!$('#view-dashboard').hidden && !document.hidden && learn.jobs.some(active)) loadLearning(true);
    }, 2_000);

    // Chat settings are kept on this device.
    const SETTINGS = {system: '#set-system', temperature: '#set-temperature', max_tokens: '#set-max-tokens'};
    try {
      const saved = JSON.parse(localStorage.getItem('brise.settings') || '{}');
      for (const [k, sel] of Object.entries(SETTINGS)) if (typeof saved[k] === 'string') $(sel).value = saved[k];
    } catch {
      // Unreadable settings: keep the defaults.
    }
    for (const sel of Object.values(SETTINGS)) {
      $(sel).addEventListener('change', () => localStorage.setItem('brise.settings',
        JSON.stringify(Object.fromEntries(Object.entries(SETTINGS).map(([k, s]) => [k, $(s).value])))));
    }

    $('#admin-unlock').addEventListener('submit', (ev) => {
      ev.preventDefault();
      const k = $('#admin-key').value.trim();
      if (k) unlockAdmin(k);
    });
    $('#admin-lock').addEventListener('click', () => {
      state.adminKey = '';
      sessionStorage.removeItem('brise.adminKey');
      $('#admin-key').value = '';
      $('#admin-unlock').hidden = false;
      $('#admin-panels').hidden = true;
    });
    $('#retention-form').addEventListener('submit', saveRetention);
    $('#erase-form').addEventListener('submit', askErase);
    $('#erase-cancel').addEventListener('click', () => { $('#erase-confirm').hidden = true; $('#erase-go').focus(); });
    $('#erase-confirm-go').addEventListener('click', erase);

    window.addEventListener('hashchange', route);
    state.conv = loadConversation();
    renderConversation();
    loadModels().then(route);
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start);
  else start();
})();
