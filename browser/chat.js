// Browser test of the chat page the gate serves: two people in headless Chromium join one room, see each
// other, exchange a broadcast and a private message; ada's page reloads and recovers what bob said
// meanwhile, nothing missing or doubled; with the admin API given, ada's connector is restarted
// and the page must reconnect by itself. Usage: node chat.js GATE_URL SCREENSHOT.png [ADMIN_URL TOKEN]
// Prints one JSON line of what it saw; exits non-zero (with the reason) on the first failed check.
"use strict";
const chatPage = require("./chat-page");

const [url, shot, admin, token] = process.argv.slice(2);
if (!url || !shot) {
  console.error("usage: node chat.js GATE_URL SCREENSHOT.png");
  process.exit(2);
}

const check = chatPage.check;
const join = (browser, name, room) => chatPage.join(browser, url, name, room);

const users = (page) => page.$$eval("#users li", (lis) => lis.map((li) => li.dataset.user));
const entries = (page, cls) => page.$$eval(`#log .entry.${cls}`, (es) => es.map((e) => e.textContent));

(async () => {
  const browser = await chatPage.launch();
  try {
    const ada = await join(browser, "ada", "tea");
    const bob = await join(browser, "bob", "tea");
    // Both see both in the user list (ada through onAdd, bob from the enter reply).
    await ada.waitForFunction(() => [...document.querySelectorAll("#users li")].some((li) => li.dataset.user === "bob"), null, { timeout: 5000 });
    check(JSON.stringify((await users(ada)).sort()) === '["ada","bob"]', "ada sees ada and bob: " + (await users(ada)));
    check(JSON.stringify((await users(bob)).sort()) === '["ada","bob"]', "bob sees ada and bob: " + (await users(bob)));
    check((await entries(ada, "system")).some((t) => t.includes("bob joined")), "ada was told bob joined");

    // A broadcast reaches both, sender included.
    await ada.fill("#msg", "hello tea room");
    await ada.click("#send");
    await bob.waitForFunction(() => [...document.querySelectorAll("#log .entry.chat")].some((e) => e.textContent.includes("hello tea room")), null, { timeout: 5000 });
    await ada.waitForFunction(() => [...document.querySelectorAll("#log .entry.mine")].some((e) => e.textContent.includes("hello tea room")), null, { timeout: 5000 });

    // A private message from bob to ada: ada sees it as private; nobody else got a copy.
    await bob.selectOption("#target", "ada");
    await bob.fill("#msg", "just for you");
    await bob.click("#send");
    await ada.waitForFunction(() => [...document.querySelectorAll("#log .entry.private")].some((e) => e.textContent.includes("just for you")), null, { timeout: 5000 });
    const adaPrivate = await entries(ada, "private");
    check(adaPrivate.some((t) => t.includes("bob (private)")), "ada's private entry names bob: " + adaPrivate);
    // Bob's own copy is drawn when his send is answered, which may come after ada's push.
    await bob.waitForFunction(() => document.querySelectorAll("#log .entry.private").length > 0, null, { timeout: 5000 });
    const bobPrivate = await entries(bob, "private");
    check(bobPrivate.length === 1 && bobPrivate[0].includes("you → ada"), "bob sees his own private once: " + bobPrivate);

    // ada goes away (her page is closed and reloaded) while bob talks: the reloaded page shows the log it
    // had and what bob said meanwhile (recovered with `since`), each once.
    await ada.evaluate(() => state.client.close());
    await bob.fill("#msg", "while you were away");
    await bob.click("#send");
    await bob.waitForFunction(() => [...document.querySelectorAll("#log .entry.mine")].some((e) => e.textContent.includes("while you were away")), null, { timeout: 5000 });
    await ada.reload();
    await ada.waitForFunction(() => [...document.querySelectorAll("#log .entry.system")].some((e) => e.textContent === "you are back in tea"), null, { timeout: 10000 });
    await ada.waitForFunction(() => [...document.querySelectorAll("#log .entry.chat")].some((e) => e.textContent.includes("while you were away")), null, { timeout: 5000 });
    await ada.waitForTimeout(300);
    const count = async (text) => (await ada.$$eval("#log .entry", (es) => es.map((e) => e.textContent))).filter((t) => t.includes(text)).length;
    check((await count("hello tea room")) === 1, "ada's log kept her message once after the reload");
    check((await count("while you were away")) === 1, "ada got what bob said while she was away, once");
    check((await count("just for you")) === 1, "ada's private message kept once");
    check(!(await entries(ada, "system")).some((t) => t.includes("could not be recovered")), "nothing was lost");

    // A third person with ada's name in the same room is refused, as the demo does.
    const eve = await browser.newPage();
    await eve.goto(url);
    await eve.fill("#name", "ada");
    await eve.fill("#room", "tea");
    await eve.click("#join");
    await eve.waitForFunction(() => document.querySelector("#error").textContent.length > 0, null, { timeout: 5000 });
    const refusal = await eve.textContent("#error");
    check(/change your name/.test(refusal), "duplicate name refused: " + refusal);

    // bob leaves: ada sees it.
    await bob.close();
    await ada.waitForFunction(() => ![...document.querySelectorAll("#users li")].some((li) => li.dataset.user === "bob"), null, { timeout: 8000 });
    check((await entries(ada, "system")).some((t) => t.includes("bob left")), "ada was told bob left");

    if (admin) {
      // Restart ada's connector through the admin API; the page reconnects through the gate on its own.
      const status = await ada.textContent("#status");
      const port = Number(status.split(":").pop());
      const auth = { headers: { Authorization: "Bearer " + token } };
      const servers = (await (await fetch(admin + "/api/servers", auth)).json()).servers;
      const conn = servers.find((s) => s.addrs.client && Number(s.addrs.client.split(":").pop()) === port);
      check(conn, "ada's connector (port " + port + ") is in the API");
      const r = await fetch(admin + "/api/servers/" + conn.id + "/restart", { method: "POST", ...auth });
      check(r.status === 202, "restart accepted: " + r.status);
      await ada.waitForFunction(() => [...document.querySelectorAll("#log .entry.system")].some((e) => e.textContent === "reconnected"), null, { timeout: 20000 });
      await ada.fill("#msg", "still here");
      await ada.click("#send");
      await ada.waitForFunction(() => [...document.querySelectorAll("#log .entry.mine")].some((e) => e.textContent.includes("still here")), null, { timeout: 5000 });
    }

    await ada.screenshot({ path: shot });
    console.log(JSON.stringify({ ok: true, ada_users: await users(ada), ada_log: await ada.$$eval("#log .entry", (es) => es.map((e) => e.textContent)) }));
  } finally {
    await browser.close();
  }
})().catch((e) => {
  console.error(e.message || String(e));
  process.exit(1);
});
