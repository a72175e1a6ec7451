// Oracle test: Pomelo's own browser client from npm (pomelo-jsclient-websocket 0.1.1, with pomelo-protobuf
// 0.4.0's browser codec as window.protobuf, both unmodified) in headless Chromium against a cluster whose
// servers.yaml has `protobuf`. The gate's handshake gives the client the protos (it keeps them in
// localStorage and sends their version to the connector, which must then not resend them); bob's requests
// are protobuf-encoded by the client; ann must decode bob's onChat and onAdd pushes as protobuf and see
// the response of a failed send as {code: 500}; enter (no proto) stays JSON.
// Usage: node pomelo-npm-protobuf.js GATE_HOST GATE_PORT. Prints one JSON line; exits non-zero with the
// reason on the first failed check.
"use strict";
const { gate, check, clientPage, run } = require("./npm-client");

const addr = gate("pomelo-npm-protobuf.js");
const { host, port } = addr;

async function page(browser, name) {
  const p = await clientPage(browser, addr, name, [
    // The codec's first part ends with `module.exports = Protobuf`, which throws where there is no `module`
    // (and stops the rest of the file): loaded as a component build loads it, then made window.protobuf.
    { content: "window.module = { exports: {} };" },
    { path: require.resolve("pomelo-protobuf/lib/client/protobuf.js") },
    // npm's 0.1.1 client calls protobuf.decodeStr(route, bytes); the browser codec (and the client's GitHub
    // copy and the chat demo's bundle, which call protobuf.decode) name that function `decode`.
    { content: "window.protobuf = window.module.exports; protobuf.decodeStr = protobuf.decode;" },
  ]);
  const ready = await p.evaluate(() => typeof window.protobuf === "object" && typeof window.protobuf.encode === "function");
  check(ready, "pomelo-protobuf's browser codec is window.protobuf");
  await p.evaluate(() => {
    window.chats = [];
    window.adds = [];
    pomelo.on("onChat", (b) => window.chats.push(b));
    pomelo.on("onAdd", (b) => window.adds.push(b));
    // What reaches the socket, to tell protobuf bodies from JSON ones.
    const send = WebSocket.prototype.send;
    window.sent = [];
    WebSocket.prototype.send = function (data) { window.sent.push(Array.from(new Uint8Array(data))); return send.call(this, data); };
  });
  return p;
}

function login(p, name) {
  return p.evaluate(([host, port, name]) => new Promise((resolve, reject) => {
    setTimeout(() => reject(new Error(name + ": no answer")), 10000);
    const before = localStorage.getItem("protos");
    pomelo.init({ host, port, log: false }, () => {
      const atGate = localStorage.getItem("protos");
      pomelo.request("gate.gateHandler.queryEntry", { uid: name }, (entry) => {
        pomelo.disconnect();
        if (entry.code !== 200) return reject(new Error("gate: " + JSON.stringify(entry)));
        pomelo.init({ host: entry.host, port: entry.port, log: false }, () => {
          pomelo.request("connector.entryHandler.enter", { username: name, rid: "pb" }, (r) => resolve({ r, before, atGate, stored: localStorage.getItem("protos") }));
        });
      });
    });
  }), [host, Number(port), name]);
}

const send = (p, content, target) => p.evaluate(([content, target]) => new Promise((resolve) => {
  pomelo.request("chat.chatHandler.send", { rid: "pb", content, from: "", target }, resolve);
}), [content, target]);

run(async (browser) => {
  const ann = await page(browser, "ann");
  const bob = await page(browser, "bob");
  const a = await login(ann, "ann");
  check(a.before === null && a.atGate !== null, "a fresh page has the protos from the gate's handshake on");
  check(a.stored === a.atGate, "the connector (sent their version) gave no other protos");
  const protos = JSON.parse(a.stored || "null");
  check(protos && typeof protos.version === "string" && protos.server.onChat && protos.client["chat.chatHandler.send"],
    "the handshake gave the protos, kept in localStorage: " + a.stored);
  check(Array.isArray(a.r.users) && typeof a.r.epoch === "string", "enter (no proto) answers JSON: " + JSON.stringify(a.r));
  await login(bob, "bob");
  await ann.waitForFunction(() => window.adds.length >= 1, null, { timeout: 5000 });
  const add = await ann.evaluate(() => window.adds[0]);
  check(add.user === "bob", "onAdd decoded as protobuf: " + JSON.stringify(add));

  // An emoji both ways: the client writes it as a surrogate pair, and reads it only as one.
  const text = "protobuf héllo 中文 😀";
  const ok = await send(bob, text, "*");
  check(JSON.stringify(ok) === "{}", "bob's send is acknowledged: " + JSON.stringify(ok));
  const last = await bob.evaluate(() => window.sent[window.sent.length - 1]);
  // JSON would have a '{'; none of these protobuf fields (rid, content, from, target) holds one.
  check(last && !last.includes(0x7b) && last.includes(0x0a), "bob's request went out as protobuf: " + JSON.stringify(last));
  await ann.waitForFunction(() => window.chats.length >= 1, null, { timeout: 5000 });
  const chat = await ann.evaluate(() => window.chats[0]);
  check(chat.msg === text && chat.from === "bob" && chat.target === "*", "onChat decoded as protobuf: " + JSON.stringify(chat));
  check(chat.epoch === a.r.epoch && chat.offset === 1, "with its place in the history: " + JSON.stringify(chat));

  const refused = await send(bob, "to no one", "nobody");
  check(refused.code === 500, "a refused send reads {code: 500} through the proto: " + JSON.stringify(refused));
  console.log(JSON.stringify({ ok: true, chat, add, refused, version: protos.version }));
});
