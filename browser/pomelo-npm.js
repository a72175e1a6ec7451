// Oracle test: Pomelo's own browser client from npm (pomelo-jsclient-websocket 0.1.1 over pomelo-protocol
// 0.1.6, unmodified) in headless Chromium against the real cluster. Two pages log in through the gate as the
// demo does, bob broadcasts, ann must get onChat {msg, from, target} with the history fields beside them;
// then ann disconnects, bob talks, and ann re-enters with `since` through the same client and gets exactly
// the missed messages. Usage: node pomelo-npm.js GATE_HOST GATE_PORT. Prints one JSON line; exits non-zero
// with the reason on the first failed check.
"use strict";
const path = require("path");
const { chromium } = require("playwright-core");

const [host, port] = process.argv.slice(2);
if (!host || !port) {
  console.error("usage: node pomelo-npm.js GATE_HOST GATE_PORT");
  process.exit(2);
}
const check = (cond, what) => { if (!cond) throw new Error("check failed: " + what); };

// The smallest EventEmitter the client needs (the demo ships component's emitter).
const EMITTER = `window.module = {};
window.EventEmitter = function () {};
EventEmitter.prototype.on = function (ev, fn) { (this._ev = this._ev || {}); (this._ev[ev] = this._ev[ev] || []).push(fn); return this; };
EventEmitter.prototype.emit = function (ev, ...args) { ((this._ev || {})[ev] || []).slice().forEach((fn) => fn.apply(this, args)); return this; };
EventEmitter.prototype.removeAllListeners = function () { this._ev = {}; return this; };`;

async function page(browser, name) {
  const p = await browser.newPage();
  p.on("pageerror", (e) => { if (!/module/.test(e.message)) console.error(`[${name}] page error: ${e.message}`); });
  // An http origin (the gate's, any path): the client needs localStorage, which about:blank lacks.
  await p.goto(`http://${host}:${port}/npm-oracle`);
  await p.addScriptTag({ content: EMITTER });
  await p.addScriptTag({ path: require.resolve("pomelo-protocol/lib/protocol.js") }).catch(() => {});
  await p.addScriptTag({ path: path.join(path.dirname(require.resolve("pomelo-jsclient-websocket/package.json")), "lib/pomelo-client.js") });
  await p.evaluate(() => {
    window.chats = [];
    pomelo.on("onChat", (b) => window.chats.push(b));
  });
  return p;
}

// The demo's login: queryEntry on the gate, then enter on the connector it names.
function login(p, name, since) {
  return p.evaluate(([host, port, name, since]) => new Promise((resolve, reject) => {
    setTimeout(() => reject(new Error(name + ": no answer")), 10000);
    pomelo.init({ host, port, log: false }, () => {
      pomelo.request("gate.gateHandler.queryEntry", { uid: name }, (entry) => {
        pomelo.disconnect();
        if (entry.code !== 200) return reject(new Error("gate: " + JSON.stringify(entry)));
        pomelo.init({ host: entry.host, port: entry.port, log: false }, () => {
          const body = { username: name, rid: "npm" };
          if (since) body.since = since;
          pomelo.request("connector.entryHandler.enter", body, resolve);
        });
      });
    });
  }), [host, Number(port), name, since]);
}

const send = (p, text) => p.evaluate((text) => new Promise((resolve) => {
  pomelo.request("chat.chatHandler.send", { rid: "npm", content: text, from: "", target: "*" }, resolve);
}), text);

const chatsUntil = async (p, n) => {
  await p.waitForFunction((n) => window.chats.length >= n, n, { timeout: 5000 });
  await p.waitForTimeout(300);
  return p.evaluate(() => window.chats);
};

(async () => {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
      "--disable-component-update", "--disable-sync"],
  });
  try {
    const ann = await page(browser, "ann");
    const bob = await page(browser, "bob");
    const r = await login(ann, "ann");
    check(Array.isArray(r.users) && typeof r.epoch === "string", "ann entered: " + JSON.stringify(r));
    await login(bob, "bob");
    check(JSON.stringify(await send(bob, "one")) === "{}", "bob's send is acknowledged");
    const [first] = await chatsUntil(ann, 1);
    check(first.msg === "one" && first.from === "bob" && first.target === "*", "onChat as the demo reads it: " + JSON.stringify(first));
    check(first.epoch === r.epoch && first.offset === 1, "with its place in the history: " + JSON.stringify(first));

    await ann.evaluate(() => { pomelo.disconnect(); window.chats = []; });
    for (const t of ["two", "three"]) check(JSON.stringify(await send(bob, t)) === "{}", "send " + t);
    await ann.waitForTimeout(200);
    // Her old session may hold the name for a moment after the disconnect.
    let back;
    for (let i = 0; i < 20; i++) {
      back = await login(ann, "ann", { epoch: first.epoch, offset: first.offset });
      if (!back.error) break;
      await ann.evaluate(() => pomelo.disconnect());
      await ann.waitForTimeout(100);
    }
    check(back.recovered === true, "recovered: " + JSON.stringify(back));
    const missed = await chatsUntil(ann, 2);
    check(JSON.stringify(missed.map((c) => [c.msg, c.offset])) === '[["two",2],["three",3]]', "exactly what ann missed: " + JSON.stringify(missed));
    console.log(JSON.stringify({ ok: true, first, missed }));
  } finally {
    await browser.close();
  }
})().catch((e) => {
  console.error(e.message || String(e));
  process.exit(1);
});
