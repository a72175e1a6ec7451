// Browser test of the admin dashboard the master serves, in headless Chromium (Debian's, driven by
// playwright-core). Usage: node dashboard.js ADMIN_URL TOKEN SCREENSHOT.png [CHAT_SERVER_ID [--master-restarts]]
// Checks: without the token the page is a login form with no cluster data; a wrong token is refused (401);
// the right one logs in (HttpOnly, SameSite=Strict cookie); every server shows `running`; restarting a chat
// server from its row (after the confirmation) changes its pid in the table; the charts move; logs load.
// With --master-restarts the caller breaks servers.yaml and restarts the master twice, driven by lines on
// stdout/stdin (the page must show the config error, then reconnect by itself, then ask to log in again):
//   script prints {"await":"break-config"}  caller writes an invalid servers.yaml, answers "broken"
//   script prints {"await":"fix-config"}    caller writes the valid one back, answers "fixed"
//   script prints {"await":"kill-master"}   caller kills the master, answers "killed"
//   script prints {"await":"start-master"}  caller starts it again (same token), answers "started PID"
//   script prints {"await":"new-token"}     caller restarts it with a new token, answers "token NEW PID"
// Prints one JSON line of what it saw last; exits non-zero (with the reason) on the first failed check.
"use strict";
const readline = require("readline");
const { chromium } = require("playwright-core");

const [base, token, shot, chatId = "chat-1", mode] = process.argv.slice(2);
if (!base || !token || !shot) {
  console.error("usage: node dashboard.js ADMIN_URL TOKEN SCREENSHOT.png [CHAT_SERVER_ID [--master-restarts]]");
  process.exit(2);
}
setTimeout(() => { console.error("the browser test took over 150 s"); process.exit(1); }, 150000).unref();
let lines = null;
async function ask(what) {
  lines = lines || readline.createInterface({ input: process.stdin })[Symbol.asyncIterator]();
  console.log(JSON.stringify({ await: what }));
  const next = await lines.next();
  check(!next.done, "an answer to " + what);
  return next.value.trim().split(/\s+/);
}
const url = base.replace(/\/$/, "") + "/";

function check(cond, what) {
  if (!cond) throw new Error("check failed: " + what);
}

const allRunning = (count) => {
  const rows = [...document.querySelectorAll("#servers tbody tr")];
  return rows.length === count && rows.every((r) => r.dataset.state === "running");
};

async function masterRestarts(page, ids, seen) {
  // An invalid servers.yaml shows a banner with the error; a valid one takes it away.
  await ask("break-config");
  await page.waitForSelector("#banner-config", { timeout: 15000 });
  seen.config_banner = (await page.textContent("#banner-config pre")).trim();
  await ask("fix-config");
  await page.waitForSelector("#banner-config", { state: "detached", timeout: 15000 });
  // The master dies: the page notices and says it is reconnecting.
  await ask("kill-master");
  await page.waitForFunction(() => !document.querySelector("#live").classList.contains("live-on"), null, { timeout: 10000 });
  seen.offline_shown = (await page.textContent("#live")).trim();
  // A new master (same token) adopts the workers: the page reconnects by itself, with no reload.
  const [, pid] = await ask("start-master");
  const t = Date.now();
  await page.waitForFunction((p) => document.querySelector("#live").classList.contains("live-on")
    && document.querySelector("#master").textContent.includes(`master pid ${p} `), pid, { timeout: 30000 });
  await page.waitForFunction(allRunning, ids.length, { timeout: 20000 });
  seen.reconnect_ms = Date.now() - t;
  check(!(await page.$("form#login")), "still on the dashboard after a master restart");
  // A new master with a new token: the page goes back to the login form, and the new token works.
  const [, fresh, pid2] = await ask("new-token");
  await page.waitForSelector("form#login .msg.notice", { timeout: 40000 });
  seen.relogin_notice = (await page.textContent(".msg.notice")).trim();
  await page.fill("input[name=token]", fresh);
  await Promise.all([page.waitForNavigation(), page.click("#login-button")]);
  await page.waitForFunction((p) => document.querySelector("#master").textContent.includes(`master pid ${p} `), pid2, { timeout: 10000 });
  await page.waitForFunction(allRunning, ids.length, { timeout: 20000 });
  seen.relogged_in = true;
}

(async () => {
  // What the cluster holds, straight from the API, to compare the page with.
  const api = await (await fetch(url + "api/servers", { headers: { Authorization: "Bearer " + token } })).json();
  const ids = api.servers.map((s) => s.id);
  check(ids.includes(chatId), `${chatId} is in the cluster: ${ids}`);

  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  const t0 = Date.now();
  const seen = { ok: false, servers: ids };
  try {
    const context = await browser.newContext({ viewport: { width: 1440, height: 1000 } });
    const page = await context.newPage();
    const errors = [];
    page.on("pageerror", (e) => errors.push(e.message));
    page.on("console", (m) => { if (m.type() === "error") errors.push(m.text()); });

    // 1. No token: a login form, and nothing about the cluster.
    const first = await page.goto(url);
    check(first.status() === 200, "GET / answers 200: " + first.status());
    await page.waitForSelector("form#login input[name=token]", { timeout: 5000 });
    const html = await page.content(), text = await page.innerText("body");
    check(!(await page.$("#servers")), "no servers table before logging in");
    for (const id of ids) check(!html.includes(id), `no trace of ${id} before logging in`);
    check(!text.includes(String(api.master.pid)), "no master pid before logging in");

    // 2. A wrong token: the form again, with an error, status 401.
    await page.fill("input[name=token]", "not-the-token-at-all");
    const [bad] = await Promise.all([page.waitForNavigation(), page.click("#login-button")]);
    check(bad.status() === 401, "a wrong token answers 401: " + bad.status());
    check(/not the admin token/.test(await page.textContent(".msg.error")), "the form says the token is wrong");

    // 3. The right token: the dashboard, with a session cookie the page's scripts cannot read.
    await page.fill("input[name=token]", token);
    await Promise.all([page.waitForNavigation(), page.click("#login-button")]);
    errors.length = 0; // the refused login above logged its 401; from here on nothing may fail
    const cookie = (await context.cookies()).find((c) => c.name === "pomelo_admin");
    check(cookie && cookie.httpOnly && cookie.sameSite === "Strict" && cookie.path === "/", "cookie flags: " + JSON.stringify(cookie));
    check(!(await page.evaluate(() => document.cookie.includes("pomelo_admin"))), "the cookie is HttpOnly");

    // 4. Every server of the cluster is in the table, running (through the live feed).
    await page.waitForFunction((n) => {
      const rows = [...document.querySelectorAll("#servers tbody tr")];
      return rows.length === n && rows.every((r) => r.dataset.state === "running");
    }, ids.length, { timeout: 20000 });
    const rows = await page.$$eval("#servers tbody tr", (rs) => rs.map((r) => ({
      id: r.dataset.id, state: r.dataset.state, pid: r.querySelector(".c-pid").textContent })));
    check(JSON.stringify(rows.map((r) => r.id).sort()) === JSON.stringify([...ids].sort()), "rows: " + JSON.stringify(rows));
    seen.rows = rows;
    check(/live/.test(await page.textContent("#live")), "the feed is live");

    // 5. The charts move: a line's path changes as time passes.
    const pathOf = () => page.$eval(`#chart-rate path.line[data-id="${chatId}"]`, (p) => p.getAttribute("d"));
    await page.waitForSelector(`#chart-rate path.line[data-id="${chatId}"]`, { timeout: 5000 });
    const d0 = await pathOf();
    await page.waitForFunction(([id, d]) => {
      const p = document.querySelector(`#chart-rate path.line[data-id="${id}"]`);
      return p && p.getAttribute("d") !== d;
    }, [chatId, d0], { timeout: 5000 });
    seen.chart_moved = true;

    // 6. Restart the chat server from its row; accept the confirmation; its pid changes.
    const row = `#servers tbody tr[data-id="${chatId}"]`;
    const pid0 = (await page.textContent(`${row} .c-pid`)).trim();
    const restarts0 = Number(await page.textContent(`${row} .c-restarts`));
    check(/^\d+$/.test(pid0), "a pid is shown: " + pid0);
    await page.click(`${row} button[data-action=restart]`);
    await page.waitForSelector("#confirm[open]", { timeout: 3000 });
    check((await page.textContent("#confirm-title")).includes(chatId), "the confirmation names the server");
    const clicked = Date.now();
    await page.click("#confirm-ok");
    await page.waitForFunction(([sel, pid]) => {
      const r = document.querySelector(sel);
      const now = r && r.querySelector(".c-pid").textContent.trim();
      return r && /^\d+$/.test(now) && now !== pid && r.dataset.state === "running";
    }, [row, pid0], { timeout: 20000 });
    seen.restart_ms = Date.now() - clicked;
    seen.pid_before = pid0;
    seen.pid_after = (await page.textContent(`${row} .c-pid`)).trim();
    seen.restarts = Number(await page.textContent(`${row} .c-restarts`));
    check(seen.restarts === restarts0 + 1, `restarts ${restarts0} → ${seen.restarts}`);
    await page.waitForFunction((id) => [...document.querySelectorAll("#activity li .who")].some((w) => w.textContent === id),
      chatId, { timeout: 5000 });
    check((await page.textContent("#toasts")).includes("Restart"), "a toast confirms the restart");

    // 7. Its log tail loads in the log panel.
    await page.click(`${row} button:text("Logs")`);
    await page.waitForFunction(() => document.querySelectorAll("#log-text span").length > 0, null, { timeout: 5000 });
    seen.log_lines = await page.$$eval("#log-text span", (s) => s.length);

    // Let the charts gather a few more points (longer with DASHBOARD_LINGER_MS), then keep a picture.
    await page.waitForTimeout(Number(process.env.DASHBOARD_LINGER_MS) || 2500);
    await page.evaluate(() => window.scrollTo(0, 0));
    await page.screenshot({ path: shot, fullPage: true });
    check(errors.length === 0, "no page errors: " + errors.join(" | "));

    if (mode === "--master-restarts") await masterRestarts(page, ids, seen);
    seen.ok = true;
    seen.runtime_ms = Date.now() - t0;
    console.log(JSON.stringify(seen));
  } finally {
    await browser.close();
  }
  process.exit(0);
})().catch((e) => {
  console.error(e.message || String(e));
  process.exit(1);
});

