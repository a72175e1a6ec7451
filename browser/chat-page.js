// What the chat page scripts (chat.js, chat-history.js) share: the check that fails the run, headless
// Chromium, and a person joining a room on the page the gate serves.
"use strict";
const { chromium } = require("playwright-core");

function check(cond, what) {
  if (!cond) throw new Error("check failed: " + what);
}

// playwright-core gives every launch a fresh, empty profile of its own.
function launch() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
}

// A new page at `url` where `name` joins `room`; resolves once the chat is shown.
async function join(browser, url, name, room) {
  const page = await browser.newPage({ viewport: { width: 1000, height: 640 } });
  page.on("pageerror", (e) => console.error(`[${name}] page error: ${e.message}`));
  await page.goto(url);
  await page.fill("#name", name);
  await page.fill("#room", room);
  await page.click("#join");
  await page.waitForSelector("#chat", { state: "visible", timeout: 10000 });
  return page;
}

module.exports = { check, launch, join };
