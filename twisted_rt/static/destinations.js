// The inspector's "Destinations" panel (issue 17): each [[destinations]] entry with its
// state, pending, retrying and dead counts, its last error, and buttons to retry the dead
// letters and to pause or resume. It uses only the public API (/api/destinations, API key).
(function () {
  "use strict";
  const KEY_TOKEN = "twisted_rt.token";

  function token() {
    try { return window.localStorage.getItem(KEY_TOKEN) || ""; } catch (e) { return ""; }
  }

  async function call(method, path) {
    const headers = {"Content-Type": "application/json"};
    const t = token();
    if (t) headers.Authorization = "Bearer " + t;
    const r = await fetch(path, {method, headers, body: method === "POST" ? "{}" : undefined});
    let body = null;
    try { body = await r.json(); } catch (e) { body = null; }
    return {ok: r.ok, status: r.status, body};
  }

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function build() {
    const card = el("section", "card");
    card.id = "destinations-card";
    const head = el("div", "head");
    head.appendChild(el("h2", "", "Destinations"));
    const refresh = el("button", "secondary small", "Refresh");
    refresh.type = "button";
    refresh.id = "destinations-refresh";
    head.appendChild(refresh);
    card.appendChild(head);
    const note = el("p", "note");
    note.id = "destinations-note";
    card.appendChild(note);
    const table = el("table");
    table.id = "destinations";
    const thead = el("thead");
    const tr = el("tr");
    for (const [name, num] of [["name", false], ["state", false], ["pending", true], ["retrying", true],
                               ["dead", true], ["delivered", true], ["", false]]) {
      tr.appendChild(el("th", num ? "num" : "", name));
    }
    thead.appendChild(tr);
    table.appendChild(thead);
    table.appendChild(el("tbody"));
    card.appendChild(table);
    const side = document.querySelector(".col.side") || document.querySelector("main") || document.body;
    side.appendChild(card);
    refresh.onclick = load;
    return {card, note, tbody: table.tBodies[0]};
  }

  let ui = null;

  async function act(name, action) {
    const res = await call("POST", "/api/destinations/" + encodeURIComponent(name) + "/" + action);
    ui.note.textContent = res.ok ? name + ": " + action + " done"
      : name + ": " + action + " failed (" + ((res.body && res.body.message) || res.status) + ")";
    await load();
  }

  async function load() {
    if (!ui) return;
    if (!token()) {
      ui.note.textContent = "the destinations need an API key (above)";
      ui.tbody.replaceChildren();
      return;
    }
    let res;
    try { res = await call("GET", "/api/destinations"); } catch (e) { ui.note.textContent = String(e); return; }
    if (!res.ok) {
      ui.note.textContent = (res.body && res.body.message) || ("HTTP " + res.status);
      ui.tbody.replaceChildren();
      return;
    }
    const rows = res.body.destinations || [];
    ui.note.textContent = rows.length ? "" : "no [[destinations]] configured";
    ui.tbody.replaceChildren(...rows.map((d) => {
      const tr = el("tr");
      tr.dataset.destination = d.name;
      const name = el("td", "", d.name);
      name.title = d.url + (d.last_error ? "\nlast error: " + d.last_error : "");
      tr.appendChild(name);
      const state = el("td", "state-" + d.state, d.state);
      if (d.reason) state.title = d.reason;
      tr.appendChild(state);
      for (const k of ["pending", "retrying", "dead", "delivered"]) tr.appendChild(el("td", "num", String(d[k])));
      const cell = el("td");
      const retry = el("button", "secondary small", "Retry dead");
      retry.type = "button";
      retry.className += " retry";
      retry.disabled = !d.dead;
      retry.onclick = () => act(d.name, "retry");
      cell.appendChild(retry);
      const toggle = el("button", "secondary small", d.state === "paused" ? "Resume" : "Pause");
      toggle.type = "button";
      toggle.onclick = () => act(d.name, d.state === "paused" ? "resume" : "pause");
      cell.appendChild(toggle);
      tr.appendChild(cell);
      return tr;
    }));
  }

  function start() {
    ui = build();
    load();
    window.setInterval(load, 5000);
    const form = document.getElementById("token-form");
    if (form) form.addEventListener("submit", () => window.setTimeout(load, 50));
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
  window.TwistedRTDestinations = {load};
})();
