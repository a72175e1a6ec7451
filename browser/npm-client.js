// What the npm-client oracle scripts (pomelo-npm*.js) share: the gate address from the command line, the
// check that fails the run, headless Chromium, and a page with Pomelo's own browser client from npm
// (pomelo-jsclient-websocket 0.1.1 over pomelo-protocol 0.1.6, unmodified) loaded the way the demo does.
"use strict";
const path = require("path");
const { chromium } = require("playwright-core");

/// GATE_HOST GATE_PORT from the command line, or the usage and exit 2.
function gate(script) {
  const [host, port] = process.argv.slice(2);
  if (!host || !port) {
    console.error(`usage: node ${script} GATE_HOST GATE_PORT`);
    process.exit(2);
  }
  return { host, port: Number(port) };
}

const check = (cond, what) => { if (!cond) throw new Error("check failed: " + what); };

// The smallest EventEmitter the client needs (the demo ships component's emitter).
const EMITTER = `window.module = {};
window.EventEmitter = function () {};
EventEmitter.prototype.on = function (ev, fn) { (this._ev = this._ev || {}); (this._ev[ev] = this._ev[ev] || []).push(fn); return this; };
EventEmitter.prototype.emit = function (ev, ...args) { ((this._ev || {})[ev] || []).slice().forEach((fn) => fn.apply(this, args)); return this; };
EventEmitter.prototype.removeAllListeners = function () { this._ev = {}; return this; };`;

/// A page on the gate's origin (the client needs localStorage, which about:blank lacks) with `before`
/// (script tags the client must find when it loads: a protobuf codec, an RSA library), then the client.
async function clientPage(browser, { host, port }, name, before = []) {
  const p = await browser.newPage();
  p.on("pageerror", (e) => { if (!/module/.test(e.message)) console.error(`[${name}] page error: ${e.message}`); });
  await p.goto(`http://${host}:${port}/npm-oracle`);
  for (const tag of before) await p.addScriptTag(tag);
  await p.addScriptTag({ content: EMITTER });
  await p.addScriptTag({ path: require.resolve("pomelo-protocol/lib/protocol.js") }).catch(() => {});
  await p.addScriptTag({ path: path.join(path.dirname(require.resolve("pomelo-jsclient-websocket/package.json")), "lib/pomelo-client.js") });
  return p;
}

/// Runs `body(browser)` in headless Chromium; the first failed check (or any error) exits 1 with its reason.
function run(body) {
  (async () => {
    const browser = await chromium.launch({
      executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
      args: ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"],
    });
    try {
      await body(browser);
    } finally {
      await browser.close();
    }
  })().catch((e) => {
    console.error(e.message || String(e));
    process.exit(1);
  });
}

module.exports = { gate, check, clientPage, run };
