/* engage browser snippet (SPEC §7). No dependencies.
 *   <script src="https://ENGAGE_HOST/snippet.js"></script>
 *   <script>
 *     engage.init({key: "engage_…ingest key…", host: "https://ENGAGE_HOST"});
 *     engage("event.product_viewed", {price: "10"});
 *     engage.identify("user-7");
 *   </script>
 * Events are queued (kept in localStorage across page loads, shared by the site's tabs), sent in
 * batches to /v1/batch at least every second or at 20 events, with keepalive when the page is
 * hidden, and retried with backoff on network errors, 429 and 5xx. Each carries a messageId made
 * once, so a retry never stores twice. Until identify, a random anonymous id kept in
 * localStorage is the user. */
(function (w) {
  "use strict";
  var QUEUE = "engage_queue", ANON = "engage_anonymous_id", USER = "engage_user_id";
  var BATCH = 20, EVERY = 1000, MAX_BACKOFF = 30000, MAX_QUEUE = 1000, KEEPALIVE_BYTES = 60000;
  var cfg = null, queue = [], timer = null, due = 0, inFlight = false, backoff = EVERY;
  var notBefore = 0, size = BATCH, hidAt = 0, mem = {};

  // A value kept in memory once localStorage refused it (full, or disabled) wins over storage.
  function load(k) {
    if (k in mem) return mem[k];
    try { return w.localStorage.getItem(k); } catch (e) { return null; }
  }
  function save(k, v) { try { w.localStorage.setItem(k, v); delete mem[k]; } catch (e) { mem[k] = v; } }
  function warn(m) { if (w.console) w.console.warn("engage: " + m); }
  function id() {
    if (w.crypto && w.crypto.randomUUID) return w.crypto.randomUUID();
    var b = new Uint8Array(16), s = "";
    (w.crypto || w.msCrypto).getRandomValues(b);
    for (var i = 0; i < 16; i++) s += (b[i] + 256).toString(16).slice(1);
    return s;
  }
  function anonymousId() { var a = load(ANON); if (!a) { a = id(); save(ANON, a); } return a; }
  // The stored queue is shared by the origin's tabs: each change re-reads it and adds or removes
  // only its own messages, so one tab never overwrites what another has queued.
  function stored() {
    try { var q = JSON.parse(load(QUEUE) || "[]"); return q instanceof Array ? q : []; } catch (e) { return []; }
  }
  function store(add, sent) {
    var q = stored().filter(function (m) { return m && !(sent && sent[m.messageId]); });
    if (add) q.push(add);
    if (q.length > MAX_QUEUE) q.splice(0, q.length - MAX_QUEUE);
    save(QUEUE, JSON.stringify(q));
  }
  function forget(batch) {
    var sent = {};
    for (var i = 0; i < batch.length; i++) sent[batch[i].messageId] = true;
    queue = queue.filter(function (m) { return !sent[m.messageId]; });
    store(null, sent);
  }
  queue = stored();

  // One timer, due at the earliest time asked for (a full batch goes at once, not at the tick),
  // never before a backoff or Retry-After ends.
  function schedule(ms) {
    var at = Math.max(Date.now() + ms, notBefore);
    if (timer && due <= at) return;
    if (timer) clearTimeout(timer);
    due = at;
    timer = setTimeout(function () { timer = null; flush(); }, at - Date.now());
  }

  function post(batch, keepalive, then) {
    var body;
    try {
      body = JSON.stringify({ batch: batch, sentAt: new Date().toISOString() });
      w.fetch(cfg.host + "/v1/batch", {
        method: "POST",
        keepalive: keepalive,
        headers: { "Content-Type": "application/json", "Authorization": "Basic " + w.btoa(cfg.key + ":") },
        body: body
      }).then(then, function () { then(null); });
    } catch (e) { then(null); }
  }

  function flush() {
    if (!cfg || inFlight || !queue.length) return;
    if (Date.now() < notBefore) return schedule(0);
    var batch = queue.slice(0, size);
    inFlight = true;
    post(batch, false, function (r) {
      inFlight = false;
      if (r && r.ok) {
        forget(batch);
        backoff = EVERY;
        notBefore = 0;
        if (queue.length) schedule(queue.length >= size ? 0 : EVERY);
        return;
      }
      if (r && (r.status === 400 || r.status === 413) && batch.length > 1) {
        // Too large for the server's limits (burst, batch size, body size): smaller batches.
        size = Math.max(1, batch.length >> 1);
        return schedule(0);
      }
      if (r && r.status !== 408 && r.status !== 429 && r.status < 500) {
        // A batch the server will never take (bad key, a bad message): dropped, said once.
        warn("batch refused with HTTP " + r.status);
        forget(batch);
        if (queue.length) schedule(0);
        return;
      }
      // Network error, 408, 429, 5xx: later, with jitter, never before Retry-After.
      var after = r ? parseFloat(r.headers.get("Retry-After") || "0") * 1000 || 0 : 0;
      backoff = Math.min(MAX_BACKOFF, backoff * 2);
      notBefore = Date.now() + Math.max(after, backoff * (0.5 + Math.random() / 2));
      schedule(0);
    });
  }

  // The page is going away: whatever is queued (a batch in flight included, since leaving the
  // page cancels it) goes in keepalive requests, whose answers may never be seen; what they
  // stored is not stored twice when a later page sends it again.
  function flushOnHide() {
    // pagehide and visibilitychange both come when a page is left: one send for both.
    if (!cfg || !queue.length || Date.now() - hidAt < 1000) return;
    hidAt = Date.now();
    var chunk = [], bytes = 0, budget = KEEPALIVE_BYTES;
    for (var i = 0; i < queue.length && i < 5 * BATCH; i++) {
      var n = JSON.stringify(queue[i]).length + 1;
      if (bytes + n > budget && chunk.length) break;
      chunk.push(queue[i]);
      bytes += n;
    }
    post(chunk, bytes < budget, function (r) { if (r && r.ok) forget(chunk); });
  }

  function engage(name, properties) {
    var props;
    try { props = JSON.parse(JSON.stringify(properties || {})); } catch (e) {
      return warn("event " + String(name) + " not queued: its properties are not JSON (" + e + ")");
    }
    var userId = load(USER);
    var m = {
      type: "track", event: String(name), properties: props,
      messageId: id(), timestamp: new Date().toISOString(), anonymousId: anonymousId()
    };
    if (userId) m.userId = userId;
    queue.push(m);
    if (queue.length > MAX_QUEUE) queue.splice(0, queue.length - MAX_QUEUE);
    store(m, null);
    schedule(queue.length >= size ? 0 : EVERY);
  }
  engage.init = function (o) {
    cfg = { key: o.key, host: String(o.host || "").replace(/\/+$/, "") };
    if (queue.length) schedule(0);
  };
  engage.identify = function (userId) { save(USER, String(userId)); };
  engage.flush = function () { flush(); };

  w.addEventListener("pagehide", flushOnHide);
  document.addEventListener("visibilitychange", function () {
    if (document.visibilityState === "hidden") flushOnHide();
  });
  w.engage = engage;
})(window);
