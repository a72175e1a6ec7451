// pomelo-rs admin page. Live data comes from GET /api/events (SSE, authenticated by the login cookie):
// `snapshot` (the whole view), `stats` (the view again, once a second: figures and chart points) and
// `state` (one server changed state). The feed reconnects with backoff; if the token no longer works
// (the master restarted with a new one), the page goes back to the login form. Actions are POSTs to
// /api/servers/{id}/{restart|stop|start} after a confirmation. All text is set with textContent.
(() => {
  "use strict";
  const $ = (id) => document.getElementById(id);
  const SVG = "http://www.w3.org/2000/svg";
  const WINDOW_MS = 5 * 60 * 1000;
  const COLORS = ["#60a5fa", "#f472b6", "#34d399", "#fbbf24", "#a78bfa", "#f87171", "#22d3ee", "#a3e635", "#fb923c", "#e879f9"];

  const st = { view: null, rows: new Map(), history: new Map(), colors: new Map(), events: [], logFor: "" };

  function h(tag, props, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (k === "class") e.className = v;
      else if (k === "text") e.textContent = v;
      else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v);
    }
    for (const kid of kids) if (kid != null) e.append(kid);
    return e;
  }
  const setText = (e, t) => { if (e.textContent !== t) e.textContent = t; };

  // ---- formatting
  function dur(s) {
    if (s == null) return "–";
    s = Math.floor(s);
    const d = Math.floor(s / 86400), hr = Math.floor(s % 86400 / 3600), m = Math.floor(s % 3600 / 60), sec = s % 60;
    if (d) return `${d}d ${hr}h`;
    if (hr) return `${hr}h ${String(m).padStart(2, "0")}m`;
    if (m) return `${m}m ${String(sec).padStart(2, "0")}s`;
    return `${sec}s`;
  }
  function bytes(n) {
    if (!n) return "–";
    const u = ["B", "KiB", "MiB", "GiB"];
    let i = 0;
    while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
    return `${n.toFixed(n < 10 && i ? 1 : 0)} ${u[i]}`;
  }
  const num = (v) => (v == null ? "–" : Math.round(v).toLocaleString("en-US"));
  const rate = (v) => (v >= 100 ? v.toFixed(0) : v >= 10 ? v.toFixed(1) : v.toFixed(2));
  const clock = (ms) => new Date(ms).toLocaleTimeString("en-GB", { hour12: false });
  const stat = (s, k) => (s.stats && s.stats[k]) || 0;
  // Messages per second: chat messages in on chat servers, client requests on frontends.
  const msgRate = (s) => (s.rates && (s.rates.messages_in ?? s.rates.requests)) || 0;
  const colorOf = (id) => {
    if (!st.colors.has(id)) st.colors.set(id, COLORS[st.colors.size % COLORS.length]);
    return st.colors.get(id);
  };

  // ---- the live feed
  const feed = { es: null, backoff: 1000, timer: 0, last: 0 };
  function live(cls, text) {
    const el = $("live");
    el.className = "live " + cls;
    setText(el.querySelector("span"), text);
  }
  function connect() {
    clearTimeout(feed.timer);
    live("connecting", "connecting…");
    const es = new EventSource("/api/events");
    feed.es = es;
    const on = (fn) => (e) => {
      if (feed.es !== es) return;
      feed.last = Date.now();
      feed.backoff = 1000;
      live("live-on", "live");
      let data;
      try { data = JSON.parse(e.data); } catch (_) { return; }
      fn(data);
    };
    es.addEventListener("snapshot", on((v) => apply(v, true)));
    es.addEventListener("stats", on((v) => apply(v, false)));
    es.addEventListener("state", on(stateEvent));
    es.onerror = () => { if (feed.es === es) lost(); };
  }
  function lost() {
    if (feed.es) feed.es.close();
    feed.es = null;
    const delay = Math.round(feed.backoff * (0.75 + Math.random() * 0.5));
    feed.backoff = Math.min(feed.backoff * 2, 15000);
    const until = Date.now() + delay;
    const tick = () => {
      const left = Math.ceil((until - Date.now()) / 1000);
      if (left > 0 && !feed.es) { live("retrying", `reconnecting in ${left}s`); feed.timer = setTimeout(tick, 250); return; }
      retry();
    };
    tick();
  }
  async function retry() {
    live("connecting", "connecting…");
    try {
      const r = await fetch("/api/servers", { credentials: "same-origin", cache: "no-store" });
      if (r.status === 401) { location.assign("/"); return; }
    } catch (_) { lost(); return; }
    connect();
  }
  // A feed that went quiet (stats come every second) is treated as lost.
  setInterval(() => { if (feed.es && feed.last && Date.now() - feed.last > 6000) lost(); }, 2000);

  // ---- applying a view
  function apply(v, full) {
    st.view = v;
    header(v);
    banners(v);
    table(v);
    cards(v);
    logChoices(v);
    if (!full || !st.history.size) sample(v);
    charts();
  }

  function header(v) {
    const m = v.master, box = $("master");
    box.replaceChildren(h("span", { class: "env", text: m.env }),
      `master pid ${m.pid} · up ${dur(m.uptime_secs)} · `, h("code", { text: m.config }));
  }

  function banners(v) {
    const out = [];
    if (v.master.config_error) {
      out.push(h("div", { class: "banner error", id: "banner-config" }, h("span", { class: "icon" }),
        h("div", {}, h("b", { text: "servers.yaml is invalid: the previous configuration keeps running" }),
          h("pre", { text: v.master.config_error }))));
    }
    const failed = v.servers.filter((s) => s.state === "failed");
    if (failed.length) {
      out.push(h("div", { class: "banner warn", id: "banner-failed" }, h("span", { class: "icon" }),
        h("div", {}, h("b", { text: `${failed.map((s) => s.id).join(", ")} ${failed.length > 1 ? "have" : "has"} failed` }),
          "Restarted too often in a short time, so the master gave up. Fix the cause, then Start or Restart it.")));
    }
    const box = $("banners"), sig = JSON.stringify([v.master.config_error, failed.map((s) => s.id)]);
    if (box.dataset.sig !== sig) { box.dataset.sig = sig; box.replaceChildren(...out); }
  }

  function table(v) {
    const body = document.querySelector("#servers tbody");
    const seen = new Set();
    v.servers.forEach((s, i) => {
      seen.add(s.id);
      let row = st.rows.get(s.id);
      if (!row) { row = newRow(s); st.rows.set(s.id, row); }
      fill(row, s);
      if (body.children[i] !== row.tr) body.insertBefore(row.tr, body.children[i] || null);
    });
    for (const [id, row] of st.rows) if (!seen.has(id)) { row.tr.remove(); st.rows.delete(id); st.history.delete(id); }
    $("empty").hidden = v.servers.length > 0;
    if (!v.servers.length) setText($("empty"), "No servers in servers.yaml.");
  }

  function newRow(s) {
    const c = {};
    const td = (name, cls) => (c[name] = h("td", { class: `c-${name} ${cls || ""}` }));
    const btn = (verb, label, cls) => h("button", { class: `btn small ${cls || ""}`, type: "button", "data-action": verb, text: label,
      onclick: () => act(s.id, verb) });
    c.buttons = { restart: btn("restart", "Restart"), stop: btn("stop", "Stop"), start: btn("start", "Start") };
    const logs = h("button", { class: "btn small ghost", type: "button", text: "Logs", onclick: () => showLogs(s.id) });
    const name = h("td", { class: "c-name" }, h("span", { class: "id", text: s.id }),
      h("span", { class: `type ${s.type}`, text: s.type }), c.adopted = h("span", { class: "adopted" }));
    const tr = h("tr", { "data-id": s.id }, name, td("state"), td("pid", "num"), td("uptime", "num"), td("restarts", "num"),
      td("cpu", "num"), td("rss", "num"), td("conns", "num"), td("rooms", "num"), td("rate", "num"),
      h("td", { class: "actions" }, c.buttons.restart, c.buttons.stop, c.buttons.start, logs));
    return { tr, c };
  }

  function fill(row, s) {
    const { tr, c } = row;
    if (tr.dataset.state !== s.state) {
      tr.dataset.state = s.state;
      c.state.replaceChildren(h("span", { class: `pill st-${s.state}`, text: s.state }));
    }
    setText(c.adopted, [s.adopted ? "adopted" : "", s.supervisor && s.supervisor !== "local" ? `${s.supervisor} @ ${s.host}` : ""].filter(Boolean).join(" "));
    const alive = s.pid != null && s.state !== "stopped" && s.state !== "failed";
    setText(c.pid, s.pid != null ? String(s.pid) : "–");
    setText(c.uptime, alive ? dur(s.uptime_secs) : "–");
    setText(c.restarts, String(s.restarts));
    setText(c.cpu, alive ? `${s.cpu_percent.toFixed(1)} %` : "–");
    setText(c.rss, alive ? bytes(s.rss_bytes) : "–");
    setText(c.conns, s.type === "chat" ? "–" : num(stat(s, "connections")));
    setText(c.rooms, s.type === "chat" ? num(stat(s, "rooms")) : "–");
    setText(c.rate, alive ? rate(msgRate(s)) : "–");
    const stopped = s.state === "stopped" || s.state === "failed";
    c.buttons.stop.disabled = stopped || s.state === "stopping";
    c.buttons.start.disabled = !stopped;
    c.buttons.restart.disabled = s.state === "stopping";
  }

  function cards(v) {
    const ss = v.servers, running = ss.filter((s) => s.state === "running").length;
    setText($("sum-servers"), `${running} / ${ss.length}`);
    const bad = ss.filter((s) => s.state !== "running").map((s) => `${s.id} ${s.state}`);
    setText($("sum-servers-sub"), bad.length ? bad.join(", ") : "all running");
    const sum = (f) => ss.reduce((a, s) => a + f(s), 0);
    setText($("sum-conns"), num(sum((s) => stat(s, "connections"))));
    setText($("sum-rooms"), num(sum((s) => stat(s, "rooms"))));
    setText($("sum-members"), `${num(sum((s) => stat(s, "members")))} members`);
    setText($("sum-rate"), rate(sum((s) => (s.type === "chat" ? msgRate(s) : 0))));
    setText($("sum-rate-sub"), `${num(sum((s) => stat(s, "deliveries_out_total")))} deliveries so far`);
    setText($("sum-master"), bytes(v.master.rss_bytes));
    setText($("sum-master-sub"),
      `pid ${v.master.pid} · ${v.master.cpu_seconds.toFixed(1)} s CPU · files ${v.master.open_fds} of ${v.master.max_fds}`);
  }

  // ---- charts
  function sample(v) {
    const t = v.at_ms || Date.now();
    for (const s of v.servers) {
      const pts = st.history.get(s.id) || [];
      pts.push({ t, conns: stat(s, "connections"), rate: msgRate(s) });
      while (pts.length && pts[0].t < t - WINDOW_MS - 5000) pts.shift();
      st.history.set(s.id, pts);
    }
  }
  // Axis top and step: four steps of 1, 2, 2.5 or 5 times a power of ten (whole steps for counts).
  function scale(m, whole) {
    const raw = Math.max(m, 1) / 4, p = Math.pow(10, Math.floor(Math.log10(raw)));
    let step = [1, 2, 2.5, 5, 10].map((f) => f * p).find((v) => v >= raw - 1e-9);
    if (whole) step = Math.max(1, Math.ceil(step));
    return step * 4;
  }
  const axisNum = (v) => String(Number(v.toFixed(2)));
  const ago = (ms) => { const s = Math.round(ms / 1000); return s % 60 ? (s > 60 ? `-${Math.floor(s / 60)}m${s % 60}s` : `-${s}s`) : `-${s / 60}m`; };
  function charts() {
    chart($("chart-conns"), $("legend-conns"), "conns", true, num);
    chart($("chart-rate"), $("legend-rate"), "rate", false, rate);
  }
  function chart(svg, legend, key, whole, fmt) {
    const w = Math.max(svg.clientWidth, 200), hgt = Math.max(svg.clientHeight, 120);
    const pad = { l: 40, r: 12, t: 10, b: 20 };
    const now = (st.view && st.view.at_ms) || Date.now();
    // The window grows with the data: 1, 2, then 5 minutes.
    let oldest = now;
    for (const pts of st.history.values()) if (pts.length) oldest = Math.min(oldest, pts[0].t);
    const span = [60e3, 120e3, WINDOW_MS].find((s) => s >= now - oldest) || WINDOW_MS, from = now - span;
    const tick = span === 60e3 ? 15e3 : span === 120e3 ? 30e3 : 60e3;
    let max = 0;
    for (const pts of st.history.values()) for (const p of pts) if (p.t >= from) max = Math.max(max, p[key]);
    max = scale(max, whole);
    const x = (t) => pad.l + (t - from) / span * (w - pad.l - pad.r);
    const y = (v) => pad.t + (1 - v / max) * (hgt - pad.t - pad.b);
    svg.setAttribute("viewBox", `0 0 ${w} ${hgt}`);
    const kids = [];
    for (let i = 0; i <= 4; i++) {
      const v = max * i / 4, yy = y(v).toFixed(1);
      kids.push(svgEl("line", { class: "grid", x1: pad.l, x2: w - pad.r, y1: yy, y2: yy }));
      kids.push(svgEl("text", { class: "axis", x: pad.l - 6, y: +yy + 3.5, "text-anchor": "end" }, axisNum(v)));
    }
    for (let t = 0; t <= span; t += tick) {
      const anchor = t === 0 ? "start" : t === span ? "end" : "middle";
      kids.push(svgEl("text", { class: "axis", x: x(from + t), y: hgt - 5, "text-anchor": anchor }, t === span ? "now" : ago(span - t)));
    }
    const items = [], types = new Map(((st.view && st.view.servers) || []).map((s) => [s.id, s.type]));
    for (const [id, pts] of st.history) {
      if (key === "conns" && types.get(id) === "chat") continue; // chat servers hold no client sockets
      const shown = pts.filter((p) => p.t >= from - 2000);
      if (!shown.length) continue;
      const d = shown.map((p, i) => `${i ? "L" : "M"}${x(Math.max(p.t, from)).toFixed(1)},${y(p[key]).toFixed(1)}`).join("");
      kids.push(svgEl("path", { class: "line", d, stroke: colorOf(id), "data-id": id }));
      items.push(h("span", {}, swatch(colorOf(id)), id, " ", h("b", { text: fmt(shown[shown.length - 1][key]) })));
    }
    svg.replaceChildren(...kids);
    legend.replaceChildren(...items);
  }
  function swatch(color) {
    const i = h("i");
    i.style.background = color;
    return i;
  }
  function svgEl(tag, attrs, text) {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text != null) e.textContent = text;
    return e;
  }
  window.addEventListener("resize", () => charts());

  // ---- state events
  function stateEvent(e) {
    st.events.unshift(e);
    st.events.length = Math.min(st.events.length, 200);
    const row = st.rows.get(e.id);
    if (row) { row.tr.classList.remove("flash"); void row.tr.offsetWidth; row.tr.classList.add("flash"); }
    activity();
  }
  function activity() {
    const list = $("activity");
    if (!st.events.length) { list.replaceChildren(h("li", { class: "none", text: "No state changes since this page opened." })); return; }
    list.replaceChildren(...st.events.map((e) => h("li", {}, h("time", { text: clock(e.at_ms) }), h("span", { class: "who", text: e.id }),
      h("span", {}, h("span", { class: `pill st-${e.state}`, text: e.state })), e.message ? h("span", { class: "msg", text: e.message }) : null)));
  }

  // ---- actions
  const dialog = $("confirm");
  function confirmAction(title, text, label) {
    setText($("confirm-title"), title);
    setText($("confirm-text"), text);
    setText($("confirm-ok"), label);
    dialog.returnValue = "";
    dialog.showModal();
    return new Promise((resolve) => dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true }));
  }
  const WHAT = {
    restart: ["Restart", "stops it (SIGTERM, then SIGKILL after the grace period) and starts it again. Its clients reconnect."],
    stop: ["Stop", "stops it and keeps it stopped until someone starts it."],
    start: ["Start", "starts it now."],
  };
  async function act(id, verb) {
    const [label, text] = WHAT[verb];
    if (!(await confirmAction(`${label} ${id}?`, `This ${text}`, label))) return;
    await post(`/api/servers/${encodeURIComponent(id)}/${verb}`, `${label}: ${id}`);
  }
  async function post(path, what) {
    try {
      const r = await fetch(path, { method: "POST", credentials: "same-origin", headers: { Accept: "application/json" } });
      if (r.status === 401) { location.assign("/"); return; }
      const body = await r.json().catch(() => ({}));
      if (r.ok) toast(`${what}: ${body.message || "accepted"}`, "ok");
      else toast(`${what}: ${body.detail || body.error || r.status}`, "error");
    } catch (e) {
      toast(`${what}: the master did not answer (${e.message})`, "error");
    }
  }
  $("reload-config").addEventListener("click", async () => {
    if (await confirmAction("Reload servers.yaml?", "Added servers start, removed ones stop, changed ones restart. An invalid file changes nothing.", "Reload")) {
      await post("/api/reload", "Reload");
    }
  });
  function toast(text, cls) {
    const t = h("div", { class: `toast ${cls}`, role: "status", text });
    $("toasts").append(t);
    setTimeout(() => t.remove(), 6000);
  }

  // ---- logs
  function logChoices(v) {
    const sel = $("log-server"), ids = v.servers.map((s) => s.id);
    if (sel.dataset.ids !== ids.join(",")) {
      sel.dataset.ids = ids.join(",");
      sel.replaceChildren(h("option", { value: "", text: "choose a server…" }), ...ids.map((id) => h("option", { value: id, text: id })));
      sel.value = ids.includes(st.logFor) ? st.logFor : "";
    }
  }
  function showLogs(id) {
    st.logFor = id;
    $("log-server").value = id;
    loadLogs();
    $("logs").scrollIntoView({ behavior: "smooth", block: "nearest" });
  }
  let logBusy = false;
  async function loadLogs() {
    const id = st.logFor, pre = $("log-text");
    if (!id || logBusy) return;
    logBusy = true;
    try {
      const r = await fetch(`/api/servers/${encodeURIComponent(id)}/logs?lines=${$("log-lines").value}`, { credentials: "same-origin", cache: "no-store" });
      if (r.status === 401) { location.assign("/"); return; }
      const body = await r.json();
      if (id !== st.logFor) return;
      const atEnd = pre.scrollHeight - pre.scrollTop - pre.clientHeight < 30;
      const lines = r.ok ? body.lines : [`(${body.detail || body.error})`];
      pre.replaceChildren(...(lines.length ? lines : ["(the log is empty)"]).map((l) => {
        const cls = /\bERROR\b/.test(l) ? "lvl-error" : /\bWARN\b/.test(l) ? "lvl-warn" : "";
        return h("span", { class: cls, text: l + "\n" });
      }));
      if (atEnd || pre.dataset.for !== id) pre.scrollTop = pre.scrollHeight;
      pre.dataset.for = id;
    } catch (_) {
      /* the feed shows the connection state; try again on the next tick */
    } finally {
      logBusy = false;
    }
  }
  $("log-server").addEventListener("change", (e) => { st.logFor = e.target.value; loadLogs(); });
  $("log-lines").addEventListener("change", loadLogs);
  $("log-refresh").addEventListener("click", loadLogs);
  setInterval(() => { if ($("log-follow").checked && !document.hidden) loadLogs(); }, 2000);

  activity();
  connect();
})();
