// Oracle test: Pomelo's own browser client from npm (pomelo-jsclient-websocket 0.1.1 over pomelo-protocol
// 0.1.6, unmodified) in headless Chromium against the real cluster. Two pages log in through the gate as the
// demo does, bob broadcasts, ann must get onChat {msg, from, target} with the history fields beside them;
// then ann disconnects, bob talks, and ann re-enters with `since` through the same client and gets exactly
// the missed messages. Usage: node pomelo-npm.js GATE_HOST GATE_PORT. Prints one JSON line; exits non-zero
// with the reason on the first failed check.
"use strict";
const { gate, check, clientPage, run } = require("./npm-client");

const addr = gate("pomelo-npm.js");
const { host, port } = addr;

async function page(browser, name) {
  const p = await clientPage(browser, addr, name);
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

run(async (browser) => {
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
});
