/*
 * twisted_rt browser client: WebSocket subscriptions that survive restarts.
 *
 *   <script src="https://rt.example.com/client.js"></script>
 *   <script>
 *     const rt = new TwistedRT.Client({url: "wss://rt.example.com/ws", token: "…"});
 *     rt.onEvent = (ev) => console.log(ev.channel, ev.offset, ev.data);
 *     rt.onStatus = (s) => console.log(s.state);   // connecting | open | closed | waiting
 *     rt.subscribe("github.*");                      // live from now on
 *     rt.subscribe("billing.invoice", 41);          // replay after offset 41, then live
 *     rt.connect();
 *   </script>
 *
 * The client remembers the last offset it saw on every channel.  When the
 * connection drops it reconnects with exponential backoff (with jitter) and
 * resubscribes with `since` set to those offsets, so the server replays
 * exactly what was missed: no gap and no duplicate (events at or below an
 * offset already seen are dropped as well, in case of overlap).
 *
 * `token` may be a string or a function returning one (called at every
 * connection, e.g. to refresh an expiring JWT).  No dependencies.
 *
 * Presence (channels with a `presence = true` rule):
 *     rt.onJoin = (m) => console.log(m.user, "joined", m.channel, m.info);
 *     rt.onLeave = (m) => console.log(m.user, "left", m.channel);
 *     rt.presence("chat.room1").then((members) => ...);   // [{user, info?}]
 * `rt.recovered[pattern]` is false after a resume whose missed events were
 * partly trimmed already (the replay then started at the oldest kept one).
 * A connection closed with 4003 (the operator disconnected this user) is not
 * reopened.
 */
(function (global) {
  "use strict";

  function isWildcard(pattern) {
    return pattern.indexOf("*") >= 0 || pattern.indexOf(">") >= 0;
  }

  /* Whether `channel` matches `pattern` (`*` one segment, final `>` one or more). */
  function matches(pattern, channel) {
    if (!isWildcard(pattern)) return pattern === channel;
    const ps = pattern.split(".");
    const cs = channel.split(".");
    for (let i = 0; i < ps.length; i++) {
      if (ps[i] === ">") return cs.length > i;
      if (i >= cs.length) return false;
      if (ps[i] !== "*" && ps[i] !== cs[i]) return false;
    }
    return ps.length === cs.length;
  }

  /* The default /ws URL of the page's own origin. */
  function defaultUrl() {
    const loc = global.location;
    if (!loc) return "ws://127.0.0.1:8080/ws";
    return (loc.protocol === "https:" ? "wss://" : "ws://") + loc.host + "/ws";
  }

  class Client {
    /*
     * options: url (default: this page's /ws), token (string or function),
     * minDelay (ms, 500), maxDelay (ms, 15000), pingInterval (ms, 25000; 0 = off).
     */
    constructor(options) {
      const o = options || {};
      this.url = o.url || defaultUrl();
      this.token = o.token || null;
      this.minDelay = o.minDelay || 500;
      this.maxDelay = o.maxDelay || 15000;
      this.pingInterval = o.pingInterval === undefined ? 25000 : o.pingInterval;
      this.offsets = {};        // channel -> last offset seen
      this.subs = new Map();    // pattern -> {since, ref}
      this.onEvent = null;
      this.onStatus = null;
      this.onError = null;
      this.onReply = null;
      this.onJoin = null;
      this.onLeave = null;
      this.recovered = {};      // pattern -> false when a resume missed trimmed events
      this.state = "closed";
      this.ws = null;
      this._attempt = 0;
      this._timer = null;
      this._pinger = null;
      this._ref = 0;
      this._pending = new Map();  // ref -> {resolve, reject}
      this._stopped = true;
    }

    /* Open the connection (and keep it open until close()). */
    connect() {
      this._stopped = false;
      if (this.ws || this._timer) return this;
      this._open();
      return this;
    }

    /* Close for good: no more reconnects. */
    close() {
      this._stopped = true;
      if (this._timer) { clearTimeout(this._timer); this._timer = null; }
      this._stopPing();
      if (this.ws) { try { this.ws.close(1000); } catch (e) { /* closing anyway */ } }
      this.ws = null;
      this._status("closed");
    }

    /*
     * Subscribe to a channel or pattern.  `since`: the last offset already
     * seen (a number for a channel, an object {channel: offset} for a
     * pattern); omit it for live events only.
     */
    subscribe(pattern, since) {
      const sub = {since: since === undefined ? null : since};
      if (typeof since === "number" && !isWildcard(pattern)) {
        this.offsets[pattern] = Math.max(this.offsets[pattern] || 0, since);
      } else if (since && typeof since === "object") {
        for (const ch of Object.keys(since)) {
          this.offsets[ch] = Math.max(this.offsets[ch] || 0, since[ch]);
        }
      }
      this.subs.set(pattern, sub);
      if (this.state === "open") this._sendSubscribe(pattern, sub);
      return this;
    }

    unsubscribe(pattern) {
      if (!this.subs.delete(pattern)) return this;
      if (this.state === "open") this._send({op: "unsubscribe", channel: pattern, ref: ++this._ref});
      return this;
    }

    /* Publish over the WebSocket; resolves with the {"op":"published"} reply. */
    publish(channel, data) {
      return this._request({op: "publish", channel: channel, data: data});
    }

    ping() {
      return this._request({op: "ping"});
    }

    /* The members of a presence channel: resolves with [{user, info?}]. */
    presence(channel) {
      return this._request({op: "presence", channel: channel}).then((m) => m.members || []);
    }

    /* The `since` to send for `pattern` now: the offsets seen so far. */
    sinceFor(pattern) {
      const sub = this.subs.get(pattern) || {since: null};
      if (!isWildcard(pattern)) {
        const seen = this.offsets[pattern];
        if (seen !== undefined) return seen;
        return typeof sub.since === "number" ? sub.since : null;
      }
      const out = {};
      let any = false;
      if (sub.since && typeof sub.since === "object") {
        for (const ch of Object.keys(sub.since)) { out[ch] = sub.since[ch]; any = true; }
      }
      for (const ch of Object.keys(this.offsets)) {
        if (matches(pattern, ch)) { out[ch] = this.offsets[ch]; any = true; }
      }
      if (any) return out;
      return typeof sub.since === "number" ? sub.since : null;
    }

    // -- internals ---------------------------------------------------------

    _status(state, extra) {
      this.state = state;
      if (this.onStatus) {
        try { this.onStatus(Object.assign({state: state, attempt: this._attempt}, extra || {})); }
        catch (e) { console.error(e); }
      }
    }

    _url() {
      let token = this.token;
      if (typeof token === "function") token = token();
      if (!token) return this.url;
      return this.url + (this.url.indexOf("?") >= 0 ? "&" : "?") + "token=" + encodeURIComponent(token);
    }

    _open() {
      this._timer = null;
      this._status("connecting");
      let ws;
      try {
        ws = new WebSocket(this._url());
      } catch (e) {
        this._retry({code: 0, reason: String(e)});
        return;
      }
      this.ws = ws;
      ws.onopen = () => {
        if (this.ws !== ws) return;
        this._attempt = 0;
        this._status("open");
        for (const [pattern, sub] of this.subs) this._sendSubscribe(pattern, sub);
        this._startPing();
      };
      ws.onmessage = (m) => {
        if (this.ws !== ws) return;
        let msg;
        try { msg = JSON.parse(m.data); } catch (e) { return; }
        this._message(msg);
      };
      ws.onclose = (c) => {
        if (this.ws !== ws) return;
        this.ws = null;
        this._stopPing();
        for (const p of this._pending.values()) p.reject(new Error("connection closed"));
        this._pending.clear();
        if (c.code === 4003) this._stopped = true;  // disconnected by the operator: do not come back
        this._retry(c);
      };
      ws.onerror = () => { /* onclose follows */ };
    }

    _retry(close) {
      if (this._stopped) { this._status("closed"); return; }
      const base = Math.min(this.maxDelay, this.minDelay * Math.pow(2, this._attempt));
      const delay = Math.round(base / 2 + Math.random() * base / 2);
      this._attempt += 1;
      this._status("waiting", {delay: delay, code: close.code, reason: close.reason || ""});
      this._timer = setTimeout(() => this._open(), delay);
    }

    _startPing() {
      this._stopPing();
      if (this.pingInterval > 0) {
        this._pinger = setInterval(() => this.ping().catch(() => {}), this.pingInterval);
      }
    }

    _stopPing() {
      if (this._pinger) { clearInterval(this._pinger); this._pinger = null; }
    }

    _send(obj) {
      if (!this.ws || this.ws.readyState !== 1) return false;
      this.ws.send(JSON.stringify(obj));
      return true;
    }

    _request(obj) {
      return new Promise((resolve, reject) => {
        const ref = ++this._ref;
        obj.ref = ref;
        if (!this._send(obj)) { reject(new Error("not connected")); return; }
        this._pending.set(ref, {resolve: resolve, reject: reject});
      });
    }

    _sendSubscribe(pattern, sub) {
      const msg = {op: "subscribe", channel: pattern, ref: ++this._ref};
      const since = this.sinceFor(pattern);
      if (since !== null && since !== undefined) msg.since = since;
      sub.ref = msg.ref;
      this._send(msg);
    }

    _message(msg) {
      if (msg.op === "event") {
        const seen = this.offsets[msg.channel];
        if (seen !== undefined && msg.offset <= seen) return;  // already delivered
        this.offsets[msg.channel] = msg.offset;
        if (this.onEvent) {
          try { this.onEvent(msg); } catch (e) { console.error(e); }
        }
        return;
      }
      if (msg.op === "join" || msg.op === "leave") {
        const cb = msg.op === "join" ? this.onJoin : this.onLeave;
        if (cb) {
          try { cb(msg); } catch (e) { console.error(e); }
        }
        return;
      }
      if (msg.op === "subscribed" && typeof msg.recovered === "boolean") {
        this.recovered[msg.channel] = msg.recovered;
      }
      if (msg.ref !== undefined && this._pending.has(msg.ref)) {
        const p = this._pending.get(msg.ref);
        this._pending.delete(msg.ref);
        if (msg.op === "error") {
          const err = new Error(msg.message || msg.code);
          err.code = msg.code;
          p.reject(err);
        } else {
          p.resolve(msg);
        }
        return;
      }
      if (msg.op === "error") {
        if (this.onError) this.onError(msg);
        else console.warn("twisted_rt:", msg.code, msg.message);
        return;
      }
      if (this.onReply) this.onReply(msg);
    }
  }

  global.TwistedRT = {Client: Client, matches: matches, isWildcard: isWildcard};
})(typeof window !== "undefined" ? window : this);
