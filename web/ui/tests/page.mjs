// Drives the web view in Debian's chromium for the Rust browser test
// (tests/tests/web_browser.rs): one JSON command per stdin line, one JSON answer per stdout
// line ({"ok": true, "value": ...} or {"ok": false, "error": "..."}). Every wait inside a
// command is bounded (WAIT_MS); the Rust side decides what is expected.
//
// Environment: CHROMIUM (default /usr/bin/chromium), OUT_DIR (downloads, the profile).
import { chromium } from 'playwright-core';
import { createInterface } from 'node:readline';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

// Generous: chromium on a loaded 2-core machine can take seconds per step; this only bounds a failure.
const WAIT_MS = 60_000;
const outDir = process.env.OUT_DIR ?? tmpdir();
const profile = mkdtempSync(join(outDir, 'chromium-profile-'));

const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
  headless: true,
  args: [
    '--headless',
    '--no-sandbox',
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
  ],
  acceptDownloads: true,
  viewport: { width: 1500, height: 860 },
});
let page = context.pages()[0] ?? (await context.newPage());
page.setDefaultTimeout(WAIT_MS);
/** Requests the page made to other origins (there must be none). */
const foreign = [];
/** Console errors, CSP violations among them. */
const consoleErrors = [];
function watch(p) {
  p.on('request', (r) => {
    const u = new URL(r.url());
    if (!['blob:', 'data:'].includes(u.protocol) && u.origin !== origin) foreign.push(r.url());
  });
  p.on('console', (m) => {
    if (m.type() === 'error') consoleErrors.push(m.text());
  });
}
let origin = '';
watch(page);

/** Waits two animation frames: the page has rendered what the last input changed. */
const frames = () => page.evaluate(() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r))));
const selected = async () => {
  await frames();
  return page.locator('.conn-row.row.sel').evaluateAll((els) => els.map((e) => e.dataset.id));
};

const row = (id) => page.locator(`.conn-row.row[data-id="${id}"]`);

/** Polls `f` until it returns a value that is not undefined (bounded by WAIT_MS). */
async function until(what, f) {
  const end = Date.now() + WAIT_MS;
  let last;
  for (;;) {
    try {
      const v = await f();
      if (v !== undefined) return v;
    } catch (e) {
      last = e;
    }
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}${last ? ` (${last.message})` : ''}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

const commands = {
  /** Opens a URL; grants clipboard access for its origin. */
  async open({ url }) {
    origin = new URL(url).origin;
    await context.grantPermissions(['clipboard-read', 'clipboard-write'], { origin });
    await page.goto(url);
    // The app has started once it shows the login form or the tabs.
    await page.waitForSelector('[data-testid="login"], nav.tabs');
    return page.url();
  },
  /** The address bar now. */
  async url() {
    return page.url();
  },
  /** A fresh page with no stored token (sessionStorage is per tab). */
  async newPage() {
    await page.close();
    page = await context.newPage();
    page.setDefaultTimeout(WAIT_MS);
    watch(page);
    return true;
  },
  async tab({ name }) {
    await page.click(`nav.tabs button[data-tab="${name}"]`);
    return true;
  },
  /** Waits until the login form shows; returns whether any connection row is in the page. */
  async loginShown() {
    await page.waitForSelector('[data-testid="login"]');
    return { rows: await page.locator('.conn-row.row').count(), text: await page.innerText('body') };
  },
  async login({ token }) {
    await page.fill('[data-testid="token-input"]', token);
    await page.click('[data-testid="login"] button[type="submit"]');
    return true;
  },
  async loginError() {
    return await page.innerText('[data-testid="login-error"]');
  },
  /** Waits until the row of connection `id` shows `status` exactly; returns its cells. */
  async waitRow({ id, status }) {
    return until(`row ${id} with status "${status}"`, async () => {
      if (!(await row(id).count())) return undefined;
      const cells = await row(id).locator('span').allInnerTexts();
      return cells[3] === status ? cells : undefined;
    });
  },
  /** Waits until no row of these IDs is shown. */
  async waitGone({ ids }) {
    return until(`rows ${ids} to go`, async () => {
      for (const id of ids) if (await row(id).count()) return undefined;
      return true;
    });
  },
  /** The Connections store's window: what it holds, where its watch starts, whether older records remain. */
  async connWindow() {
    return page.evaluate(() => {
      const c = window.__interpose.conns;
      const ids = c.ids();
      return {
        ready: c.ready,
        loading: c.loadingOlder,
        size: c.records.size,
        first: ids[0]?.toString(),
        last: ids.at(-1)?.toString(),
        watchFrom: c.watchFrom?.toString(),
        older: c.olderToken !== '',
        button: !!document.querySelector('[data-testid="load-older"]'),
        footer: document.querySelector('.conns .footer')?.textContent ?? '',
      };
    });
  },
  /** Waits until the store holds `size` records with its watch's snapshot in. */
  async waitWindow({ size }) {
    return until(`a window of ${size} records, live`, async () => {
      const w = await commands.connWindow();
      return w.ready && !w.loading && w.size === size ? w : undefined;
    });
  },
  /** Waits until the store's record `id` has status number `status` (1 active, 2 disconnected). */
  async waitStored({ id, status }) {
    return until(`record ${id} with status ${status}`, () =>
      page.evaluate(
        ({ id, status }) => (window.__interpose.conns.records.get(BigInt(id))?.status === status ? true : undefined),
        { id, status },
      ),
    );
  },
  /** Whether the store holds record `id`. */
  async stored({ id }) {
    return page.evaluate((id) => window.__interpose.conns.records.has(BigInt(id)), id);
  },
  /** Clicks "Load older". */
  async loadOlder() {
    await page.click('[data-testid="load-older"]');
    return true;
  },
  async rowIds() {
    return page.locator('.conn-row.row').evaluateAll((els) => els.map((e) => e.dataset.id));
  },
  /** Waits until the counts by status read `text`. */
  async waitCounts({ text }) {
    return until(`counts "${text}"`, async () => {
      const t = await page.innerText('[data-testid="counts"]');
      return t === text ? t : undefined;
    });
  },
  /** Clicks rows: the first plainly, then each with `modifier` (Control or Shift). */
  async select({ ids, modifier }) {
    await row(ids[0]).click();
    for (const id of ids.slice(1)) await row(id).click({ modifiers: [modifier] });
    return selected();
  },
  /** Keys on the focused table (e.g. "Shift+ArrowDown"); returns the selected IDs. */
  async keys({ keys }) {
    await page.focus('[data-testid="conn-table"]');
    for (const k of keys) await page.keyboard.press(k);
    return selected();
  },
  /** Right-clicks row `id` and picks `item` from the menu. */
  async menu({ id, item }) {
    await row(id).click({ button: 'right' });
    await page.locator('[data-testid="context-menu"] button', { hasText: new RegExp(`^${item}$`) }).click();
    return true;
  },
  /** The clipboard's text, once Copy has put something there (the profile starts empty). */
  async clipboard() {
    return until('text on the clipboard', async () => {
      const t = await page.evaluate(() => navigator.clipboard.readText());
      return t ? t : undefined;
    });
  },
  /** The clear dialog's text; confirms it. */
  async confirmClear() {
    const text = await page.innerText('[data-testid="clear-dialog"]');
    await page.click('[data-testid="confirm-clear"]');
    return text;
  },
  /** Searches the history and returns the listed packets. */
  async historySearch({ conn, contains, hex, direction }) {
    await page.fill('[data-testid="history-conn"]', conn ?? '');
    await page.fill('[data-testid="history-contains"]', contains ?? '');
    await page.selectOption('[data-testid="history-direction"]', String(direction ?? 0));
    const box = page.locator('.history input[type="checkbox"]').first();
    if ((await box.isChecked()) !== Boolean(hex)) await box.click();
    const footer = page.locator('[data-testid="history-footer"]');
    const before = Number(await footer.getAttribute('data-done'));
    await page.click('[data-testid="history-search"]');
    // Each search is numbered; wait until this one (a later number) has loaded.
    await until('the search to load', async () => (Number(await footer.getAttribute('data-done')) > before ? true : undefined));
    return commands.historyRows();
  },
  /** The packets listed in the history tab. */
  async historyRows() {
    return page.locator('.pkt-row.row').evaluateAll((els) =>
      els.map((e) => ({ conn: e.dataset.conn, seq: e.dataset.seq, cells: [...e.children].map((c) => c.textContent) })),
    );
  },
  /** Opens packet (conn, seq) in the viewer; returns each dump's bytes as hex. */
  async packet({ conn, seq }) {
    await page.click(`.pkt-row.row[data-conn="${conn}"][data-seq="${seq}"]`);
    const read = async (testid) => {
      const l = page.locator(`[data-testid="${testid}"]`);
      if (!(await l.count())) return null;
      const text = await l.innerText();
      return text
        .split('\n')
        .filter((line) => /^[0-9a-f]{8} /.test(line))
        .map((line) => line.slice(10, 57).trim())
        .join(' ')
        .replace(/\s+/g, ' ')
        .trim();
    };
    return { received: await read('dump-received'), sent: await read('dump-sent') };
  },
  /** Clicks the connection link of the first listed packet; returns the selected rows. */
  async followLink({ conn }) {
    await page.locator(`.pkt-row.row[data-conn="${conn}"] .conn-link`).first().click();
    // The link selects that row alone; waiting for exactly that (not "includes") keeps a
    // render in between, with the tab's earlier selection still shown, from deciding it.
    return until('the linked row selected alone', async () => {
      const sel = await page.locator('.conn-row.row.sel').evaluateAll((els) => els.map((e) => e.dataset.id));
      return sel.length === 1 && sel[0] === String(conn) ? sel : undefined;
    });
  },
  async setIntercept({ enabled, ports, direction }) {
    await page.click('nav.tabs button[data-tab="intercept"]');
    const box = page.locator('[data-testid="intercept-enabled"]');
    await until('the intercept setting to load', async () => ((await box.count()) ? true : undefined));
    if (ports !== undefined) {
      await page.fill('[data-testid="intercept-ports"]', ports);
      await page.click('[data-testid="intercept-apply"]');
    }
    if (direction !== undefined) {
      await page.selectOption('[data-testid="intercept-direction"]', String(direction));
    }
    if ((await box.isChecked()) !== enabled) await box.click();
    await until(`intercept ${enabled ? 'on' : 'off'}`, async () => ((await box.isChecked()) === enabled ? true : undefined));
    return true;
  },
  /** Waits for a held packet of connection `conn` whose status text contains `status`. */
  async waitHeld({ conn, status }) {
    return until(`a held packet of ${conn} showing "${status}"`, async () => {
      const h = page.locator(`.held.row[data-conn="${conn}"]`);
      if (!(await h.count())) return undefined;
      const text = await h.first().locator('[data-testid="held-status"]').innerText();
      return text.includes(status) ? text : undefined;
    });
  },
  /** Picks the held packet of `conn`; returns the editor's state. */
  async pickHeld({ conn }) {
    await page.locator(`.held.row[data-conn="${conn}"]`).first().click();
    await frames();
    return {
      status: await page.innerText('[data-testid="picked-status"]'),
      forwardDisabled: await page.isDisabled('[data-testid="forward"]'),
      forwardEditedDisabled: await page.isDisabled('[data-testid="forward-edited"]'),
      warning: (await page.locator('[data-testid="closed-warning"]').count()) ? await page.innerText('[data-testid="closed-warning"]') : null,
      text: await page.inputValue('[data-testid="held-edit"]'),
    };
  },
  /** Replaces the editor's text and presses a button (forward, forward-edited, drop) or a key. */
  async actHeld({ text, button, key }) {
    if (text !== undefined) await page.fill('[data-testid="held-edit"]', text);
    if (button) await page.click(`[data-testid="${button}"]`);
    if (key) {
      // Shortcuts act outside text fields: leave the editor first.
      await page.evaluate(() => document.activeElement?.blur());
      await page.keyboard.press(key);
    }
    return true;
  },
  async waitHeldGone({ conn }) {
    return until(`no held packet of ${conn}`, async () =>
      (await page.locator(`.held.row[data-conn="${conn}"]`).count()) ? undefined : true,
    );
  },
  async interceptNote() {
    return until('a note', async () => {
      const l = page.locator('[data-testid="intercept-note"]');
      return (await l.count()) ? l.innerText() : undefined;
    });
  },
  /** Runs an export from the Export tab; saves the download to `path`. */
  async exportCapture({ scope, format, ports, path }) {
    await page.click('nav.tabs button[data-tab="export"]');
    if (scope === 'all') await page.click('[data-testid="scope-all"]');
    await page.selectOption('[data-testid="export-format"]', format === 'pcap' ? '1' : '2');
    await page.fill('[data-testid="export-ports"]', ports ?? '');
    const [dl] = await Promise.all([page.waitForEvent('download'), page.click('[data-testid="export-run"]')]);
    await dl.saveAs(path);
    const summary = await until('the summary', async () => {
      const l = page.locator('[data-testid="export-summary"]');
      return (await l.count()) ? l.innerText() : undefined;
    });
    return { name: dl.suggestedFilename(), summary };
  },
  async caText() {
    await page.click('nav.tabs button[data-tab="export"]');
    return until('the CA', async () => {
      const l = page.locator('[data-testid="ca"]');
      return (await l.count()) ? l.innerText() : undefined;
    });
  },
  async screenshot({ path }) {
    await page.screenshot({ path });
    return path;
  },
  // ----- Benchmark commands (tests/src/bin/bench-web.rs) -----
  /** Opens `url`; milliseconds to the first rendered row and to the end of the snapshot. */
  async timeOpen({ url }) {
    origin = new URL(url).origin;
    const t0 = Date.now();
    await page.goto(url);
    await page.waitForSelector('.conn-row.row', { timeout: 120_000 });
    const firstRows = Date.now() - t0;
    await page.waitForFunction(() => window.__interpose?.conns.ready, null, { timeout: 300_000, polling: 50 });
    const snapshot = Date.now() - t0;
    return { firstRows, snapshot, kept: await page.evaluate(() => window.__interpose.conns.records.size) };
  },
  /** JS heap after a garbage collection, from the DevTools protocol (bytes). */
  async heap() {
    const cdp = await context.newCDPSession(page);
    await cdp.send('HeapProfiler.collectGarbage');
    await cdp.send('Performance.enable');
    const { metrics } = await cdp.send('Performance.getMetrics');
    const m = Object.fromEntries(metrics.map((x) => [x.name, x.value]));
    await cdp.detach();
    return { used: m.JSHeapUsedSize, total: m.JSHeapTotalSize, nodes: m.Nodes };
  },
  /** Milliseconds to scroll the table to the end and back, and to apply a host filter. */
  async scrollFilter({ host }) {
    const frame = () => page.evaluate(() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r))));
    const t0 = Date.now();
    await page.evaluate(() => {
      const el = document.querySelector('[data-testid="conn-table"] .vlist');
      el.scrollTop = el.scrollHeight;
    });
    await frame();
    const t1 = Date.now();
    await page.evaluate(() => {
      document.querySelector('[data-testid="conn-table"] .vlist').scrollTop = 0;
    });
    await frame();
    const t2 = Date.now();
    await page.fill('[data-testid="host-filter"]', host);
    await frame();
    const t3 = Date.now();
    const shown = await page.innerText('.conns .footer');
    await page.fill('[data-testid="host-filter"]', '');
    await frame();
    return { scrollEnd: t1 - t0, scrollTop: t2 - t1, filter: t3 - t2, shown };
  },
  /** Starts measuring live events: for each UPSERT, the time from its event (open or close) to the table's next render. */
  async liveArm() {
    await page.evaluate(() => {
      const conns = window.__interpose.conns;
      const b = { lat: [], final: new Map(), pending: [] };
      window.__bench = b;
      const ms = (t) => Number(t.seconds) * 1000 + t.nanos / 1e6;
      conns.onLive = (c) => b.pending.push(c);
      conns.subscribe(() => {
        const now = Date.now();
        for (const c of b.pending) {
          const t = c.closedAt ?? c.openedAt;
          if (t) b.lat.push(now - ms(t));
          b.final.set(c.id.toString(), c.status);
        }
        b.pending = [];
      });
    });
    return true;
  },
  /** Latency percentiles (ms) and how many connections reached their closed state. */
  async liveResult() {
    return page.evaluate(() => {
      const b = window.__bench;
      const lat = [...b.lat].sort((x, y) => x - y);
      const pct = (p) => lat[Math.min(lat.length - 1, Math.floor((p / 100) * lat.length))];
      let closed = 0;
      for (const s of b.final.values()) if (s === 2) closed++;
      return { events: lat.length, p50: pct(50), p99: pct(99), max: lat[lat.length - 1], closed, seen: b.final.size };
    });
  },
  /** Other-origin requests and console errors seen so far. */
  async hygiene() {
    return { foreign, consoleErrors };
  },
  async quit() {
    await context.close();
    rmSync(profile, { recursive: true, force: true });
    process.stdout.write(JSON.stringify({ ok: true, value: true }) + '\n');
    process.exit(0);
  },
};

process.stdout.write(JSON.stringify({ ok: true, value: 'ready' }) + '\n');
const rl = createInterface({ input: process.stdin });
for await (const line of rl) {
  let answer;
  try {
    const msg = JSON.parse(line);
    const f = commands[msg.cmd];
    if (!f) throw new Error(`unknown command ${msg.cmd}`);
    answer = { ok: true, value: (await f(msg)) ?? null };
  } catch (e) {
    answer = { ok: false, error: String(e?.stack ?? e) };
  }
  process.stdout.write(JSON.stringify(answer) + '\n');
}
await context.close();
rmSync(profile, { recursive: true, force: true });
