/*
 * The inspector page: channels, live tail, history and a test publisher.
 * Uses only the public HTTP API and /ws (through client.js).
 */
(function () {
  "use strict";

  const $ = (id) => document.getElementById(id);
  const KEY_TOKEN = "twisted_rt.token";
  const KEY_PATTERN = "twisted_rt.pattern";
  const MAX_EVENTS = 500;
  const HISTORY_PAGE = 50;

  const store = {
    get(k) { try { return localStorage.getItem(k) || ""; } catch (e) { return ""; } },
    set(k, v) { try { if (v) localStorage.setItem(k, v); else localStorage.removeItem(k); } catch (e) { /* private mode */ } },
  };

  let token = store.get(KEY_TOKEN);
  let tailing = null;           // the pattern being tailed
  let received = 0;
  let lastOffsets = {};         // channel -> last offset (from /api/channels)
  let historyState = {channel: "", since: 0};

  const client = new TwistedRT.Client({token: () => token});

  function authHeaders(extra) {
    const h = Object.assign({}, extra || {});
    if (token) h.Authorization = "Bearer " + token;
    return h;
  }

  async function api(method, path, body) {
    const init = {method: method, headers: authHeaders(body ? {"Content-Type": "application/json"} : {})};
    if (body !== undefined) init.body = JSON.stringify(body);
    const r = await fetch(path, init);
    let json = null;
    try { json = await r.json(); } catch (e) { json = null; }
    return {status: r.status, ok: r.ok, body: json};
  }

  function errorText(res) {
    if (res.body && res.body.message) return res.status + " " + (res.body.error || "") + ": " + res.body.message;
    return "HTTP " + res.status;
  }

  // -- status ---------------------------------------------------------------

  const STATUS_TEXT = {open: "live", connecting: "connecting…", closed: "not connected"};
  client.onStatus = (s) => {
    const el = $("status");
    el.className = "status " + s.state;
    if (s.state === "waiting") {
      el.textContent = "reconnecting in " + Math.max(1, Math.round(s.delay / 1000)) + " s";
    } else {
      el.textContent = STATUS_TEXT[s.state] || s.state;
    }
    el.dataset.state = s.state;
  };

  client.onError = (msg) => {
    const el = $("tail-error");
    el.hidden = false;
    el.textContent = (msg.code || "error") + ": " + (msg.message || "");
  };
  client.onReply = (msg) => {
    if (msg.op === "subscribed") {
      if (msg.channel === tailing) {
        $("tail-error").hidden = true;
        loadPresence(msg.channel);
      }
      refreshChannels();  // the subscriber counts changed
    }
  };

  // -- presence (members of the tailed channel, live) -------------------------

  let members = new Map();      // user -> info of the tailed presence channel
  let presenceChannel = null;

  function renderPresence() {
    const list = $("presence");
    list.textContent = "";
    for (const [user, info] of [...members.entries()].sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0))) {
      const li = document.createElement("li");
      li.dataset.user = user;
      const name = document.createElement("span");
      name.className = "user";
      name.textContent = user;
      li.appendChild(name);
      if (info) {
        const extra = document.createElement("code");
        extra.textContent = JSON.stringify(info);
        li.appendChild(extra);
      }
      list.appendChild(li);
    }
    $("presence-count").textContent = presenceChannel ? members.size + " member" + (members.size === 1 ? "" : "s") : "";
  }

  function clearPresence(note) {
    presenceChannel = null;
    members = new Map();
    renderPresence();
    $("presence-note").textContent = note;
  }

  async function loadPresence(channel) {
    if (TwistedRT.isWildcard(channel)) {
      clearPresence("tail one channel (not a pattern) to see its members");
      return;
    }
    let list;
    try { list = await client.presence(channel); } catch (e) {
      clearPresence(e.code === "presence_off" ? channel + " has no presence (no [[channels]] rule with presence = true)"
        : "members unavailable: " + (e.message || e));
      return;
    }
    if (channel !== tailing) return;
    presenceChannel = channel;
    members = new Map(list.map((m) => [m.user, m.info || null]));
    $("presence-note").textContent = "members of " + channel + ", live";
    renderPresence();
  }

  client.onJoin = (m) => {
    if (m.channel !== presenceChannel) return;
    members.set(m.user, m.info || null);
    renderPresence();
  };
  client.onLeave = (m) => {
    if (m.channel !== presenceChannel) return;
    members.delete(m.user);
    renderPresence();
  };

  // -- events ---------------------------------------------------------------

  function localTime(iso) {
    const d = new Date(iso);
    if (isNaN(d.getTime())) return iso || "";
    return d.toLocaleString(undefined, {hour12: false}) + "." + String(d.getMilliseconds()).padStart(3, "0");
  }

  function renderEvent(ev, fresh) {
    const li = $("event-template").content.firstElementChild.cloneNode(true);
    li.querySelector(".channel").textContent = ev.channel;
    li.querySelector(".offset").textContent = ev.offset;
    const t = li.querySelector("time");
    t.dateTime = ev.time || "";
    t.textContent = localTime(ev.time);
    t.title = ev.time || "";
    li.querySelector(".source").textContent = ev.source || "";
    li.querySelector(".type").textContent = ev.type || "";
    li.querySelector(".json").textContent = JSON.stringify(ev.data, null, 2);
    li.dataset.channel = ev.channel;
    li.dataset.offset = ev.offset;
    li.dataset.id = ev.id || "";
    if (fresh) li.classList.add("fresh");
    return li;
  }

  client.onEvent = (ev) => {
    const list = $("events");
    list.insertBefore(renderEvent(ev, true), list.firstChild);
    while (list.children.length > MAX_EVENTS) list.removeChild(list.lastChild);
    received += 1;
    $("tail-count").textContent = received + " event" + (received === 1 ? "" : "s");
    if (lastOffsets[ev.channel] === undefined || lastOffsets[ev.channel] < ev.offset) {
      lastOffsets[ev.channel] = ev.offset;
      scheduleChannels();
    }
  };

  // -- channels -------------------------------------------------------------

  let channelsTimer = null;
  function scheduleChannels() {
    if (channelsTimer) return;
    channelsTimer = setTimeout(() => { channelsTimer = null; refreshChannels(); }, 1000);
  }

  async function refreshChannels() {
    if (!token) {
      // nothing that needs a token is called without one (no 401 in the console)
      $("channels-note").textContent = "With an API key or a token (above) this lists the channels it may read:"
        + " subscribers, last offsets and presence members. Without one you can tail and read the history of"
        + " the anonymous channels.";
      $("channels").tBodies[0].textContent = "";
      return null;
    }
    let res;
    try { res = await api("GET", "/api/channels"); } catch (e) {
      $("channels-note").textContent = "the server cannot be reached";
      return null;
    }
    if (!res.ok || !res.body || !Array.isArray(res.body.channels)) {
      $("channels-note").textContent = res.status === 401 || res.status === 403
        ? "listing channels needs an API key or a token (above)" : errorText(res);
      return null;
    }
    const channels = res.body.channels;
    $("channels-note").textContent = channels.length ? "" : "no channels yet";
    const tbody = $("channels").tBodies[0];
    tbody.textContent = "";
    for (const c of channels) {
      lastOffsets[c.name] = Math.max(lastOffsets[c.name] || 0, c.last_offset);
      const tr = document.createElement("tr");
      tr.dataset.channel = c.name;
      const name = document.createElement("td");
      name.textContent = c.name;
      const subs = document.createElement("td");
      subs.className = "num subscribers";
      subs.textContent = c.subscribers;
      const last = document.createElement("td");
      last.className = "num last-offset";
      last.textContent = c.last_offset;
      const mem = document.createElement("td");
      mem.className = "num members";
      mem.textContent = c.members === undefined ? "" : c.members;
      const act = document.createElement("td");
      act.className = "row";
      const tail = document.createElement("button");
      tail.type = "button";
      tail.className = "secondary";
      tail.textContent = "tail";
      tail.onclick = () => { $("pattern").value = c.name; startTail(c.name); };
      const hist = document.createElement("button");
      hist.type = "button";
      hist.className = "secondary";
      hist.textContent = "history";
      hist.onclick = () => { $("history-channel").value = c.name; $("history-since").value = ""; loadHistory(); };
      act.append(tail, hist);
      tr.append(name, subs, last, mem, act);
      tbody.appendChild(tr);
    }
    return channels;
  }

  // -- live tail ------------------------------------------------------------

  async function startTail(pattern) {
    pattern = pattern.trim();
    if (!pattern) return;
    if (tailing && tailing !== pattern) client.unsubscribe(tailing);
    tailing = pattern;
    clearPresence("");
    store.set(KEY_PATTERN, pattern);
    $("tail-error").hidden = true;
    // Start from the current end of every known matching channel, so a
    // reconnect resumes even channels that had no event yet in this page.
    const channels = await refreshChannels();
    let since;
    if (channels) {
      since = {};
      for (const c of channels) if (TwistedRT.matches(pattern, c.name)) since[c.name] = c.last_offset;
      if (!TwistedRT.isWildcard(pattern)) since = since[pattern] !== undefined ? since[pattern] : 0;
    }
    client.subscribe(pattern, since);
    client.connect();
  }

  function stopTail() {
    if (tailing) client.unsubscribe(tailing);
    tailing = null;
    clearPresence("");
    store.set(KEY_PATTERN, "");
    client.close();
  }

  // -- history --------------------------------------------------------------

  async function loadHistory(older) {
    const channel = $("history-channel").value.trim();
    if (!channel) return;
    let since;
    const typed = $("history-since").value.trim();
    if (older && historyState.channel === channel) {
      since = Math.max(0, historyState.since - HISTORY_PAGE);
    } else if (typed !== "") {
      since = Math.max(0, parseInt(typed, 10) || 0);
    } else {
      await refreshChannels();
      since = Math.max(0, (lastOffsets[channel] || 0) - HISTORY_PAGE);
    }
    historyState = {channel: channel, since: since};
    $("history-since").value = String(since);
    const q = "?since=" + since + "&limit=" + HISTORY_PAGE;
    let res;
    try { res = await api("GET", "/api/channels/" + encodeURIComponent(channel) + "/history" + q); } catch (e) {
      $("history-note").textContent = "the server cannot be reached";
      return;
    }
    const list = $("history");
    list.textContent = "";
    if (!res.ok) { $("history-note").textContent = errorText(res); return; }
    const events = res.body.events || [];
    $("history-note").textContent = events.length
      ? "offsets " + events[0].offset + "–" + events[events.length - 1].offset + " of " + res.body.last_offset + " (newest first)"
      : "no events after offset " + since + " (last offset " + res.body.last_offset + ")";
    for (let i = events.length - 1; i >= 0; i--) list.appendChild(renderEvent(events[i], false));
  }

  // -- publish --------------------------------------------------------------

  async function publish() {
    const out = $("publish-result");
    out.hidden = false;
    out.classList.remove("bad");
    let data;
    try { data = JSON.parse($("publish-data").value); } catch (e) {
      out.classList.add("bad");
      out.textContent = "the data is not JSON: " + e.message;
      return;
    }
    const channel = $("publish-channel").value.trim();
    let res;
    try { res = await api("POST", "/api/publish", {channel: channel, data: data}); } catch (e) {
      out.classList.add("bad");
      out.textContent = "the server cannot be reached";
      return;
    }
    if (!res.ok) out.classList.add("bad");
    out.textContent = res.ok ? "accepted: " + JSON.stringify(res.body) : errorText(res);
    if (res.ok) scheduleChannels();
  }

  // -- wiring ---------------------------------------------------------------

  function init() {
    $("token").value = token;
    $("token-form").addEventListener("submit", (e) => {
      e.preventDefault();
      token = $("token").value.trim();
      store.set(KEY_TOKEN, token);
      refreshChannels();
      if (tailing) { client.close(); startTail(tailing); }
    });
    $("token-clear").onclick = () => { $("token").value = ""; $("token-form").requestSubmit(); };
    $("channels-refresh").onclick = () => refreshChannels();
    $("tail-form").addEventListener("submit", (e) => { e.preventDefault(); startTail($("pattern").value); });
    $("tail-stop").onclick = stopTail;
    $("tail-clear").onclick = () => { $("events").textContent = ""; received = 0; $("tail-count").textContent = ""; };
    $("history-form").addEventListener("submit", (e) => { e.preventDefault(); loadHistory(false); });
    $("history-older").onclick = () => loadHistory(true);
    $("publish-form").addEventListener("submit", (e) => { e.preventDefault(); publish(); });

    const params = new URLSearchParams(location.search);
    const pattern = params.get("pattern") || store.get(KEY_PATTERN);
    refreshChannels();
    // keep the counts fresh while the page is visible
    setInterval(() => { if (!document.hidden) refreshChannels(); }, 10000);
    if (pattern) { $("pattern").value = pattern; startTail(pattern); }
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
