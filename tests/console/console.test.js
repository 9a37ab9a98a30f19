// End-to-end tests of the web console: a real `brise serve` (with API and admin keys)
// and Debian's headless Chromium driven by playwright-core. Each view is screenshotted
// into tests/artifacts/console/.
//
//   scripts/console-deps.sh && node --test tests/console/
//
// Environment: BRISE_BIN (default target/release/brise), BRISE_TEST_MODEL (default
// smollm2:135m), CHROMIUM (default /usr/bin/chromium).
'use strict';
const test = require('node:test');
const assert = require('node:assert/strict');
const {spawn, execFileSync, spawnSync} = require('node:child_process');
const fs = require('node:fs');
const net = require('node:net');
const os = require('node:os');
const path = require('node:path');

const REPO = path.resolve(__dirname, '..', '..');
const {chromium} = require(path.join(REPO, 'target', 'console-node', 'node_modules', 'playwright-core'));
const BRISE = process.env.BRISE_BIN || path.join(REPO, 'target', 'release', 'brise');
const MODEL = process.env.BRISE_TEST_MODEL || 'smollm2:135m';
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const ARTIFACTS = path.join(REPO, 'tests', 'artifacts', 'console');
const API_KEY = 'sk-console-test';
const ADMIN_KEY = 'adm-console-test';
const ANSWER = 60_000; // ms to wait for one answer of a small model

let srv, base, ledger, tmp, browser, context, page;
const problems = []; // console errors, CSP violations and requests that leave the server

function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.listen(0, '127.0.0.1', () => {
      const {port} = s.address();
      s.close(() => resolve(port));
    });
    s.on('error', reject);
  });
}

async function waitHealthy(url, log) {
  const deadline = Date.now() + 60_000;
  for (;;) {
    if (srv.exitCode !== null) throw new Error(`brise serve exited (${srv.exitCode}):\n${fs.readFileSync(log, 'utf8')}`);
    try {
      if ((await fetch(url + '/health')).status === 200) return;
    } catch {}
    if (Date.now() > deadline) throw new Error(`brise serve not healthy after 60 s:\n${fs.readFileSync(log, 'utf8')}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** `brise ledger show ID`: the record with its feedback, or null (exit 1). */
function show(id) {
  const p = spawnSync(BRISE, ['ledger', 'show', id, '--ledger', ledger], {encoding: 'utf8'});
  if (p.status === 1) return null;
  assert.equal(p.status, 0, p.stderr);
  return JSON.parse(p.stdout);
}

async function shot(name, p = page) {
  fs.mkdirSync(ARTIFACTS, {recursive: true});
  await p.screenshot({path: path.join(ARTIFACTS, name + '.png'), fullPage: true});
}

function watch(p) {
  p.on('console', (m) => {
    // The first request without a key is answered 401 by design (the console then asks).
    if (m.type() === 'error' && !/status of 401/.test(m.text())) problems.push(`console: ${m.text()}`);
  });
  p.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  p.on('request', (r) => {
    if (!r.url().startsWith(base + '/') && !r.url().startsWith('data:')) problems.push(`request off the server: ${r.url()}`);
  });
}

function assertNoProblems() {
  assert.deepEqual(problems.splice(0), [], 'console errors, CSP violations or outside requests');
}

/** Every visible control has an accessible name (what tests and screen readers find it by). */
async function assertLabelled(p = page) {
  const unnamed = await p.evaluate(() => {
    const named = (el) => {
      if (el.getAttribute('aria-label')) return true;
      if (el.getAttribute('aria-labelledby')) return true;
      if (el.labels && el.labels.length && [...el.labels].some((l) => l.textContent.trim())) return true;
      if (el.tagName === 'BUTTON' && el.textContent.trim()) return true;
      if (el.tagName === 'A' && el.textContent.trim()) return true;
      return false;
    };
    return [...document.querySelectorAll('button, input, select, textarea, a[href]')]
      .filter((el) => el.checkVisibility() && !named(el))
      .map((el) => el.outerHTML.slice(0, 120));
  });
  assert.deepEqual(unnamed, [], 'controls without an accessible name');
}

const lastAnswer = () => page.locator('li.msg.assistant').last();

/** Sends `text` from the Message box and waits for the recorded answer; returns its id. */
async function ask(text, {keyboard = false} = {}) {
  const box = page.getByRole('textbox', {name: 'Message'});
  await box.fill(text);
  const n = await page.locator('li.msg.assistant').count();
  if (keyboard) await box.press('Enter');
  else await page.getByRole('button', {name: 'Send'}).click();
  const answer = page.locator('li.msg.assistant').nth(n);
  await answer.and(page.locator('[data-completion-id]')).waitFor({timeout: ANSWER});
  return answer.getAttribute('data-completion-id');
}

async function setMaxTokens(n, temperature) {
  const settings = page.locator('#settings');
  if (!(await settings.evaluate((d) => d.open))) await settings.locator('summary').click();
  await page.getByRole('spinbutton', {name: 'Max tokens'}).fill(String(n));
  if (temperature !== undefined) await page.getByRole('spinbutton', {name: 'Temperature'}).fill(String(temperature));
  await settings.locator('summary').click();
}

test.before(async () => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'brise-console-'));
  ledger = path.join(tmp, 'ledger.sqlite');
  const port = await freePort();
  base = `http://127.0.0.1:${port}`;
  const log = path.join(tmp, 'serve.log');
  const out = fs.openSync(log, 'w');
  const env = {...process.env};
  delete env.BRISE_API_KEY;
  delete env.BRISE_ADMIN_KEY;
  delete env.BRISE_LEDGER;
  srv = spawn(BRISE, ['serve', MODEL, '--host', '127.0.0.1', '--port', String(port), '--ledger', ledger,
    '-t', '2', '--parallel', '2', '-c', '4096', '--api-key', API_KEY, '--admin-key', ADMIN_KEY],
  {stdio: ['ignore', out, out], env});
  await waitHealthy(base, log);
  // Playwright gives the browser a fresh --user-data-dir of its own.
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  context = await browser.newContext({viewport: {width: 1280, height: 860}, colorScheme: 'light'});
  await context.addInitScript(() => {
    document.addEventListener('securitypolicyviolation', (e) =>
      console.error(`CSP violation: ${e.violatedDirective} ${e.blockedURI}`));
  });
  page = await context.newPage();
  watch(page);
});

test.after(async () => {
  await browser?.close();
  if (srv && srv.exitCode === null) {
    srv.kill('SIGTERM');
    await new Promise((r) => srv.once('exit', r));
  }
  if (tmp) fs.rmSync(tmp, {recursive: true, force: true});
});

test('the page is served from the binary with a strict CSP and caching headers', async () => {
  const r = await fetch(base + '/');
  assert.equal(r.status, 200);
  assert.match(r.headers.get('content-type'), /^text\/html/);
  assert.match(r.headers.get('content-security-policy'), /default-src 'none'; script-src 'self'/);
  assert.equal(r.headers.get('cache-control'), 'no-cache');
  const again = await fetch(base + '/', {headers: {'If-None-Match': r.headers.get('etag')}});
  assert.equal(again.status, 304);
  const lib = await fetch(base + '/console/vendor/marked-18.2.1.umd.js');
  assert.match(lib.headers.get('content-type'), /^text\/javascript/);
  assert.match(lib.headers.get('cache-control'), /immutable/);
  assert.equal((await fetch(base + '/console/nope.js')).status, 404);
  // The API still wants the key.
  assert.equal((await fetch(base + '/v1/usage')).status, 401);
});

test('asks for the API key, then streams a chat answer (keyboard only)', {timeout: 120_000}, async () => {
  await page.goto(base + '/');
  const dialog = page.getByRole('dialog', {name: 'API key'});
  await dialog.waitFor();
  assert.match(await dialog.textContent(), /requires an API key/);
  await dialog.getByLabel('API key').fill('wrong-key');
  await dialog.getByLabel('API key').press('Enter');
  await page.getByText('That API key was not accepted').waitFor();
  await dialog.getByLabel('API key').fill(API_KEY);
  await dialog.getByRole('button', {name: 'Use key'}).click();
  await page.locator(`#chat-model option[value="${MODEL}"]`).waitFor({state: 'attached'});
  assert.equal(await page.getByRole('combobox', {name: 'Model'}).inputValue(), MODEL);
  await page.getByText('AI-generated content.').waitFor();
  // Greedy, so the answer (and its code block) is the same every run.
  await setMaxTokens(48, 0);
  await assertLabelled();
  await shot('chat-empty');

  // Record every text the answer shows while it streams.
  await page.evaluate(() => {
    window.__seen = [];
    new MutationObserver(() => {
      const md = document.querySelector('li.msg.assistant .md');
      if (md) window.__seen.push({text: md.textContent, typing: md.classList.contains('typing')});
    }).observe(document.querySelector('#messages'), {subtree: true, childList: true, characterData: true});
  });
  const box = page.getByRole('textbox', {name: 'Message'});
  await box.focus();
  // Tab order: the Message box, then Send.
  await page.keyboard.press('Tab');
  assert.equal(await page.evaluate(() => document.activeElement.textContent), 'Send');
  await box.focus();
  const resp = page.waitForResponse((r) => r.url().endsWith('/v1/chat/completions'));
  const id = await ask('Write a Python function that adds two numbers.', {keyboard: true});
  assert.match((await resp).headers()['content-type'], /^text\/event-stream/);
  assert.match(id, /^chatcmpl-/);
  const partial = new Set(await page.evaluate(() => window.__seen.filter((s) => s.typing && s.text).map((s) => s.text)));
  assert.ok(partial.size >= 3, `the answer should appear piece by piece while streaming, saw ${partial.size} states`);
  // Rendered as Markdown: the answer's code block is a <pre><code> with a copy button.
  const answer = lastAnswer();
  await answer.locator('pre code').first().waitFor();
  await answer.getByRole('button', {name: 'Copy code'}).first().waitFor();
  const rec = show(id);
  assert.ok(rec, 'the streamed answer is in the ledger');
  assert.equal(rec.endpoint, '/v1/chat/completions');
  assert.match(rec.output[0].text, /```/);
  assert.ok((await answer.locator('.md').textContent()).includes('def '), 'the code is shown');
  await assertLabelled();
  await shot('chat');
  assertNoProblems();
});

test('stop, regenerate, and edit-and-resend', {timeout: 180_000}, async () => {
  await setMaxTokens(1500);
  const box = page.getByRole('textbox', {name: 'Message'});
  await box.fill('Tell me a very long story about a lighthouse keeper.');
  await page.getByRole('button', {name: 'Send'}).click();
  const answer = page.locator('li.msg.assistant').nth(1);
  await answer.locator('.md.typing').filter({hasText: /\S/}).waitFor({timeout: ANSWER});
  await page.getByRole('button', {name: 'Stop'}).click();
  await answer.getByText('Stopped.').waitFor();
  assert.equal(await answer.getAttribute('data-completion-id'), null, 'a stopped answer has no record');
  assert.equal(await answer.getByRole('button', {name: 'Good answer'}).count(), 0);
  await page.getByRole('button', {name: 'Send'}).waitFor();

  await setMaxTokens(32);
  await answer.getByRole('button', {name: 'Regenerate'}).click();
  const regenerated = page.locator('li.msg.assistant').nth(1);
  await regenerated.and(page.locator('[data-completion-id]')).waitFor({timeout: ANSWER});
  assert.equal(await page.locator('li.msg.assistant').count(), 2, 'regenerate replaces the last answer');
  const rid = await regenerated.getAttribute('data-completion-id');
  assert.equal(show(rid).messages.at(-1).content, 'Tell me a very long story about a lighthouse keeper.');

  await page.locator('li.msg.user').nth(1).getByRole('button', {name: 'Edit message'}).click();
  const edit = page.getByRole('textbox', {name: 'Edit message'});
  await edit.fill('Say hello in French.');
  await page.getByRole('button', {name: 'Save and send'}).click();
  const edited = page.locator('li.msg.assistant').nth(1);
  await edited.and(page.locator('[data-completion-id]')).waitFor({timeout: ANSWER});
  const eid = await edited.getAttribute('data-completion-id');
  assert.notEqual(eid, rid);
  assert.equal(await page.locator('li.msg.user').count(), 2);
  assert.equal(await page.locator('li.msg.user .bubble').nth(1).textContent(), 'Say hello in French.');
  const rec = show(eid);
  assert.equal(rec.messages.at(-1).content, 'Say hello in French.');
  assert.equal(rec.messages.length, 3, 'the edited turn follows the first exchange');
  assertNoProblems();
});

test('a bad answer with a correction, and a good answer, land in the ledger', {timeout: 120_000}, async () => {
  const answer = lastAnswer();
  const id = await answer.getAttribute('data-completion-id');
  await answer.getByRole('button', {name: 'Bad answer'}).click();
  assert.equal(await answer.getByRole('button', {name: 'Bad answer'}).getAttribute('aria-expanded'), 'true');
  await answer.getByRole('textbox', {name: 'Better answer'}).fill('Bonjour !');
  await answer.getByRole('textbox', {name: 'Comment (optional)'}).fill('It should be French.');
  await assertLabelled();
  await answer.getByRole('button', {name: 'Submit feedback'}).scrollIntoViewIfNeeded();
  await page.waitForTimeout(400); // the conversation scrolls smoothly
  await shot('chat-correction');
  await answer.getByRole('button', {name: 'Submit feedback'}).click();
  await answer.getByText('your better answer was recorded').waitFor();
  const rec = show(id);
  assert.equal(rec.feedback.length, 1);
  assert.equal(rec.feedback[0].rating, -1);
  assert.equal(rec.feedback[0].correction, 'Bonjour !');
  assert.equal(rec.feedback[0].comment, 'It should be French.');
  assert.equal(await answer.getByRole('button', {name: 'Bad answer'}).getAttribute('aria-pressed'), 'true');

  const first = page.locator('li.msg.assistant').first();
  const fid = await first.getAttribute('data-completion-id');
  await first.getByRole('button', {name: 'Good answer'}).click();
  await first.getByText('recorded as a good answer').waitFor();
  assert.deepEqual(show(fid).feedback.map((f) => [f.kind, f.rating, f.correction]), [['rating', 1, null]]);
  await shot('chat-feedback');
  // A reload keeps the conversation and what was rated (the key is kept for the tab).
  await page.reload();
  const kept = page.locator(`li.msg.assistant[data-completion-id="${id}"]`);
  await kept.waitFor();
  assert.equal(await kept.getByRole('button', {name: 'Bad answer'}).getAttribute('aria-pressed'), 'true');
  assert.equal(await page.locator('li.msg').count(), 4);
  assert.equal(await page.locator('#set-max-tokens').inputValue(), '32', 'settings are kept');
  assert.equal(await page.locator('#set-temperature').inputValue(), '0');
  assertNoProblems();
});

test('an arena choice and a tie are recorded as pairwise feedback', {timeout: 180_000}, async () => {
  await page.getByRole('link', {name: 'Arena'}).click();
  await page.getByRole('heading', {name: 'Arena'}).waitFor();
  const ids = [];
  for (const choice of ['Left is better', 'Tie']) {
    await page.getByRole('textbox', {name: 'Prompt'}).fill('Name a colour of the sky.');
    await page.getByRole('button', {name: 'Compare'}).click();
    await page.locator('#arena-result:not([hidden])').waitFor({timeout: ANSWER});
    const left = await page.locator('#cand-left').getAttribute('data-completion-id');
    const right = await page.locator('#cand-right').getAttribute('data-completion-id');
    assert.ok(left && right && left !== right);
    assert.ok(await page.locator('#cand-left .version').isHidden(), 'blind until chosen');
    await assertLabelled();
    if (choice === 'Tie') await shot('arena');
    await page.getByRole('button', {name: choice}).click();
    await page.getByText('Recorded:').waitFor();
    assert.ok(await page.locator('#cand-left .version').isVisible(), 'versions revealed after the choice');
    ids.push([left, right]);
  }
  const [[l1, r1], [l2, r2]] = ids;
  const pref = show(l1).feedback;
  assert.deepEqual(pref.map((f) => [f.kind, f.completion_id, f.rejected_id]), [['preference', l1, r1]]);
  assert.deepEqual(show(r1).feedback.map((f) => f.kind), ['preference'], 'the rejected side sees it too');
  const tie = show(l2).feedback;
  assert.deepEqual(tie.map((f) => [f.kind, f.completion_id, f.rejected_id]), [['tie', l2, r2]]);
  await shot('arena-chosen');
  assertNoProblems();
});

test('the dashboard shows usage charts and the new feedback', {timeout: 60_000}, async () => {
  await page.getByRole('link', {name: 'Dashboard'}).click();
  await page.getByRole('combobox', {name: 'Period'}).selectOption('3600');
  const row = page.locator(`#dash-feedback tbody tr[data-model="${MODEL}"][data-adapter="base"]`);
  await row.waitFor();
  const cell = async (col) => (await row.locator(`[data-col="${col}"]`).textContent()).trim();
  assert.equal(await cell('good'), '1');
  assert.equal(await cell('bad'), '1');
  assert.equal(await cell('corrections'), '1');
  assert.equal(await cell('wins'), '1');
  assert.equal(await cell('losses'), '1');
  assert.equal(await cell('ties'), '1');
  assert.equal(await cell('good_rate'), '50%');
  assert.equal(await cell('win_rate'), '50%');
  // 3 chat answers, the stopped one (recorded as cancelled) and 4 arena answers.
  assert.equal(await cell('completions'), '8');
  const requests = await page.locator('[data-tile="Requests"] .value').textContent();
  assert.equal(requests, '8');
  for (const id of ['chart-requests', 'chart-tokens', 'chart-latency', 'chart-feedback']) {
    const drawn = await page.evaluate((id) => {
      const c = Chart.getChart(document.getElementById(id));
      return c ? c.data.datasets.reduce((a, d) => a + d.data.reduce((x, y) => x + (y || 0), 0), 0) : -1;
    }, id);
    assert.ok(drawn > 0, `${id} is drawn with data`);
  }
  await assertLabelled();
  await shot('dashboard');
  await page.emulateMedia({colorScheme: 'dark'});
  await Promise.all([page.waitForResponse((r) => r.url().includes('/v1/usage')),
    page.getByRole('button', {name: 'Refresh'}).click()]);
  await page.waitForTimeout(200);
  await shot('dashboard-dark');
  await page.emulateMedia({colorScheme: 'light'});
  assertNoProblems();
});

test('admin: retention settings and erasure by subject', {timeout: 60_000}, async () => {
  // Carol's answer, to erase.
  const r = await fetch(base + '/v1/chat/completions', {method: 'POST',
    headers: {Authorization: `Bearer ${API_KEY}`, 'Content-Type': 'application/json', 'X-Brise-Subject': 'carol'},
    body: JSON.stringify({model: MODEL, messages: [{role: 'user', content: 'Hi'}], max_tokens: 4})});
  const carol = (await r.json()).id;
  assert.ok(show(carol));

  await page.getByRole('link', {name: 'Admin'}).click();
  const key = page.getByLabel('Admin key');
  await key.fill(API_KEY); // a tenant's key is not the admin key
  await page.getByRole('button', {name: 'Unlock'}).click();
  await page.getByText('That admin key was not accepted.').waitFor();
  await key.fill(ADMIN_KEY);
  await page.getByRole('button', {name: 'Unlock'}).click();
  await page.getByRole('heading', {name: 'Retention'}).waitFor();
  await page.getByRole('spinbutton', {name: 'Keep records (days)'}).fill('365');
  await page.getByRole('spinbutton', {name: 'Keep feedback (days)'}).fill('');
  await page.getByRole('button', {name: 'Save retention'}).click();
  await page.getByText('Saved: records 365 days, feedback until erased').waitFor();
  const ret = await (await fetch(base + '/v1/admin/retention', {headers: {Authorization: `Bearer ${ADMIN_KEY}`}})).json();
  assert.deepEqual([ret.records_days, ret.feedback_days], [365, null]);

  await page.getByRole('textbox', {name: 'Subject'}).fill('carol');
  await page.getByRole('button', {name: 'Erase subject'}).click();
  await page.getByText('Erase every record and feedback item of “carol” in every tenant?').waitFor();
  await page.getByRole('button', {name: 'Confirm erasure'}).click();
  await page.getByRole('heading', {name: 'Erasure receipt'}).waitFor();
  const receipt = await page.locator('#erase-receipt').textContent();
  assert.match(receipt, /Records erased1/);
  assert.equal(show(carol), null, "carol's record is gone");
  await assertLabelled();
  await shot('admin');
  assertNoProblems();
});

test('learning: a job\'s live loss curve, the version\'s lineage and evaluation, chat with it, promote and roll back',
  {timeout: 300_000}, async () => {
    const auth = {Authorization: `Bearer ${API_KEY}`};
    const prompts = JSON.parse(fs.readFileSync(path.join(REPO, 'tests', 'sdk', 'learning_prompts.json'), 'utf8'));
    const rows = prompts.train.slice(0, 16).map((q) => JSON.stringify({messages: [
      {role: 'user', content: q}, {role: 'assistant', content: 'Ahoy! A fine question. Fair winds, Brise.'}]}));
    const form = new FormData();
    form.append('purpose', 'fine-tune');
    form.append('file', new Blob([rows.join('\n') + '\n'], {type: 'application/jsonl'}), 'house.jsonl');
    const up = await fetch(base + '/v1/files', {method: 'POST', headers: auth, body: form});
    assert.equal(up.status, 200, await up.clone().text());
    const file = await up.json();
    const jr = await fetch(base + '/v1/fine_tuning/jobs', {method: 'POST',
      headers: {...auth, 'Content-Type': 'application/json'},
      body: JSON.stringify({model: MODEL, training_file: file.id, hyperparameters: {n_epochs: 2, batch_size: 4}})});
    assert.equal(jr.status, 200, await jr.clone().text());
    const job = await jr.json();

    await page.getByRole('link', {name: 'Dashboard'}).click();
    const row = page.locator(`#dash-jobs tr[data-job="${job.id}"]`);
    await row.waitFor();
    await page.locator(`#dash-jobs tr[data-job="${job.id}"][data-status="succeeded"]`).waitFor({timeout: 240_000});
    // 16 examples, batch 4, 2 epochs: 8 steps, each a point of the curve.
    await page.waitForFunction(() => {
      const c = Chart.getChart(document.getElementById('chart-loss'));
      return c && c.data.datasets[0].data.length === 8;
    }, null, {timeout: 10_000});
    assert.equal((await row.locator('[data-col="progress"]').textContent()).trim(), '8 / 8');
    assert.match(await page.locator('#loss-caption').textContent(), /succeeded, step 8 of 8/);
    const done = await (await fetch(`${base}/v1/fine_tuning/jobs/${job.id}`, {headers: auth})).json();
    const vid = done.fine_tuned_model.split(':').pop();
    assert.equal((await row.locator('[data-col="result"]').textContent()).trim(), vid);

    // The version it made: trained from the base, a candidate, with the gate's checks.
    const vrow = page.locator(`#dash-versions tr[data-version="${vid}"]`);
    await vrow.waitFor();
    assert.equal((await vrow.locator('[data-col="parent"]').textContent()).trim(), 'the base model');
    assert.equal(await vrow.getAttribute('data-status'), 'candidate');
    await vrow.locator('details.report summary').click();
    await vrow.getByText(/nll: /).waitFor();
    await assertLabelled();
    await shot('dashboard-learning');

    // The candidate is in the chat's model picker; its answers are recorded with it.
    await page.reload();
    await page.getByRole('link', {name: 'Chat', exact: true}).click();
    await page.locator(`#chat-model option[value="${MODEL}:${vid}"]`).waitFor({state: 'attached'});
    await page.getByRole('combobox', {name: 'Model'}).selectOption(`${MODEL}:${vid}`);
    await page.getByRole('button', {name: 'New chat'}).click();
    const id = await ask('What is the capital of Spain?');
    assert.equal(show(id).adapter, vid);
    await shot('chat-candidate');
    await page.getByRole('combobox', {name: 'Model'}).selectOption(MODEL);

    // Promote (the admin key is unlocked in this tab), then roll back.
    const plain = async () => (await (await fetch(base + '/v1/chat/completions', {method: 'POST',
      headers: {...auth, 'Content-Type': 'application/json'},
      body: JSON.stringify({model: MODEL, messages: [{role: 'user', content: 'Hi'}], max_tokens: 2})})).json()).model;
    await page.getByRole('link', {name: 'Dashboard'}).click();
    await page.getByRole('button', {name: `Promote ${vid}`}).click();
    await vrow.locator('[data-col="status"]', {hasText: 'serving'}).waitFor();
    assert.equal(await plain(), `${MODEL}:${vid}`);
    await shot('dashboard-promoted');
    await page.getByRole('button', {name: `Roll back ${MODEL} from ${vid}`}).click();
    await page.locator(`#dash-versions tr[data-version="${vid}"][data-status="retired"]`).waitFor();
    assert.equal(await plain(), MODEL);
    assertNoProblems();
  });

test('usable on a phone-sized screen, in dark mode', {timeout: 120_000}, async () => {
  const phone = await browser.newContext({viewport: {width: 390, height: 844}, deviceScaleFactor: 2,
    isMobile: true, hasTouch: true, colorScheme: 'dark'});
  await phone.addInitScript((k) => sessionStorage.setItem('brise.key', k), API_KEY);
  const p = await phone.newPage();
  watch(p);
  try {
    await p.goto(base + '/#/chat');
    await p.locator(`#chat-model option[value="${MODEL}"]`).waitFor({state: 'attached'});
    await p.getByRole('textbox', {name: 'Message'}).fill('What is the capital of France? Answer in one sentence.');
    await p.getByRole('button', {name: 'Send'}).tap();
    await p.locator('li.msg.assistant[data-completion-id]').waitFor({timeout: ANSWER});
    for (const view of ['chat', 'arena', 'dashboard', 'admin']) {
      await p.goto(`${base}/#/${view}`);
      await p.locator(`#view-${view}:not([hidden])`).waitFor();
      if (view === 'dashboard') await p.getByText('Updated').waitFor();
      const overflow = await p.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
      assert.ok(overflow <= 0, `${view}: the page is ${overflow}px wider than the phone`);
      await assertLabelled(p);
      await shot(`phone-${view}`, p);
    }
    assertNoProblems();
  } finally {
    await phone.close();
  }
});
