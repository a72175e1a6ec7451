// Oracle test: Pomelo's own browser client from npm (pomelo-jsclient-websocket 0.1.1) with `encrypt: true`
// in headless Chromium, its RSA from jsrsasign (the RSAKey of Tom Wu and Kenji Urushima that Pomelo's demo
// bundles), against a connector with `useCrypto: true`. The client makes a 1024-bit key, sends it in the
// handshake and signs every request body into `__crypto__`: enter and a send with non-ASCII text and an
// emoji are accepted (and bob, who signs too, gets the message); a wrong signature answers {code: 500}.
// Usage: node pomelo-npm-crypto.js GATE_HOST GATE_PORT. Prints one JSON line; exits non-zero with the
// reason on the first failed check.
"use strict";
const { gate, check, clientPage, run } = require("./npm-client");

const addr = gate("pomelo-npm-crypto.js");
const { host, port } = addr;

async function page(browser, name) {
  const p = await clientPage(browser, addr, name, [
    { path: require.resolve("jsrsasign/lib/jsrsasign-all-min.js") },
    // The client reads window.rsa once, when it loads. jsrsasign renamed the demo's signString to sign.
    { content: "window.rsa = new RSAKey(); rsa.signString = function (s, alg) { return rsa.sign(s, alg); };" },
  ]);
  await p.evaluate(() => {
    window.chats = [];
    pomelo.on("onChat", (b) => window.chats.push(b));
    const send = WebSocket.prototype.send;
    window.sent = [];
    WebSocket.prototype.send = function (data) { window.sent.push(new TextDecoder().decode(new Uint8Array(data).slice(4))); return send.call(this, data); };
  });
  return p;
}

function login(p, name) {
  return p.evaluate(([host, port, name]) => new Promise((resolve, reject) => {
    setTimeout(() => reject(new Error(name + ": no answer")), 20000);
    pomelo.init({ host, port, log: false, encrypt: true }, () => {
      pomelo.request("gate.gateHandler.queryEntry", { uid: name }, (entry) => {
        pomelo.disconnect();
        if (entry.code !== 200) return reject(new Error("gate: " + JSON.stringify(entry)));
        pomelo.init({ host: entry.host, port: entry.port, log: false, encrypt: true }, () => {
          pomelo.request("connector.entryHandler.enter", { username: name, rid: "rsa" }, resolve);
        });
      });
    });
  }), [host, Number(port), name]);
}

const send = (p, content) => p.evaluate((content) => new Promise((resolve) => {
  pomelo.request("chat.chatHandler.send", { rid: "rsa", content, from: "", target: "*" }, resolve);
}), content);

run(async (browser) => {
  const ann = await page(browser, "ann");
  const bob = await page(browser, "bob");
  const r = await login(ann, "ann");
  check(Array.isArray(r.users), "ann's signed enter is accepted: " + JSON.stringify(r));
  const handshake = await ann.evaluate(() => window.sent.find((s) => s.includes('"rsa_n"')));
  check(handshake && /"rsa_e":65537/.test(handshake), "the handshake carried the client's key: " + handshake);
  await login(bob, "bob");
  const text = "signed héllo 中文 😀";
  const ok = await send(bob, text);
  check(JSON.stringify(ok) === "{}", "bob's signed send is acknowledged: " + JSON.stringify(ok));
  const last = await bob.evaluate(() => window.sent[window.sent.length - 1]);
  check(/"__crypto__":"[0-9a-f]+"\}$/.test(last), "the body carried __crypto__ last: " + last);
  await ann.waitForFunction(() => window.chats.length >= 1, null, { timeout: 5000 });
  const chat = await ann.evaluate(() => window.chats[0]);
  check(chat.msg === text && chat.from === "bob" && !("__crypto__" in chat), "onChat as sent: " + JSON.stringify(chat));
  // A signature of other text: refused with an answer, not dropped as Pomelo did.
  await bob.evaluate(() => { rsa.signString = function (s, alg) { return rsa.sign(s + " ", alg); }; });
  const refused = await send(bob, "tampered");
  check(refused.code === 500 && /signature/.test(refused.message || ""), "a wrong signature is refused: " + JSON.stringify(refused));
  await ann.waitForTimeout(300);
  const after = await ann.evaluate(() => window.chats.length);
  check(after === 1, "the refused message reached no one");
  console.log(JSON.stringify({ ok: true, chat, refused }));
});
