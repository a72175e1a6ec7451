// Browser test of the chat page against a chat server killed mid-conversation (the Rust side sends the
// SIGKILL while this runs; the cluster keeps room history on disk): bob's page sends a message every
// 300 ms (any refused while the room's chat server is down, the page says "not sent"); ada's page must end
// with exactly the messages bob's sends had acknowledged, each once and in order, and no word of lost history.
// Usage: node chat-history.js GATE_URL MESSAGES. Prints one JSON line; exits non-zero on a failed check.
"use strict";
const { check, launch, join: joinAt } = require("./chat-page");

const [url, count] = process.argv.slice(2);
const join = (browser, name, room) => joinAt(browser, url, name, room);
const texts = (page, cls) => page.$$eval(`#log .entry.${cls}`, (es) => es.map((e) => e.lastChild.textContent));

(async () => {
  const browser = await launch();
  try {
    const ada = await join(browser, "ada", "durable");
    const bob = await join(browser, "bob", "durable");
    for (let i = 1; i <= Number(count); i++) {
      await bob.fill("#msg", "d" + i);
      await bob.click("#send");
      await bob.waitForTimeout(300);
      // The Rust side kills the room's chat server when it reads this line.
      if (i === 10) console.error("sent d10");
    }
    // A send in flight when the chat server died is answered (refused) within the connector's 5 s timeout.
    await bob.waitForTimeout(6000);
    const refused = (await texts(bob, "system")).filter((t) => t.startsWith("not sent, try again: ")).map((t) => t.split(": ")[1]);
    const acked = [...Array(Number(count)).keys()].map((i) => "d" + (i + 1)).filter((t) => !refused.includes(t));
    const mine = (await texts(bob, "mine")).filter((t) => /^d\d+$/.test(t));
    const got = (await texts(ada, "chat")).filter((t) => /^d\d+$/.test(t));
    const adaSystem = await texts(ada, "system");
    // The kill came after d10 (the Rust side checks the chat server's pid changed); whether a send was refused
    // meanwhile depends on how fast it is back (a send may also wait for it and succeed), so it is only reported.
    check(acked.length > refused.length, "most sends were acknowledged: " + acked);
    check(JSON.stringify(got) === JSON.stringify(acked), "ada has exactly the acknowledged messages, in order: got " + got + ", acknowledged " + acked);
    check(JSON.stringify(mine) === JSON.stringify(acked), "bob's own page too: " + mine);
    check(!adaSystem.some((t) => t.includes("lost") || t.includes("could not be recovered")), "no history lost: " + adaSystem);
    console.log(JSON.stringify({ ok: true, acked, refused, ada_system: adaSystem }));
  } finally {
    await browser.close();
  }
})().catch((e) => {
  console.error(e.message || String(e));
  process.exit(1);
});
