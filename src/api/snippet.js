/* engage browser snippet (SPEC §7). No dependencies.
 *   <script src="https://ENGAGE_HOST/snippet.js"></script>
 *   <script>
 *     engage.init({key: "engage_…ingest key…", host: "https://ENGAGE_HOST"});
 *     engage("event.product_viewed", {price: "10"});
 *     engage.identify("user-7");
 *   </script>
 * Events are queued (kept in localStorage across page loads), sent in batches to /v1/batch at
 * least every second or at 20 events, with keepalive when the page is hidden, and retried with
 * backoff on network errors, 429 and 5xx. Each carries a messageId made once, so a retry never
 * stores twice. Until identify, a random anonymous id kept in localStorage is the user. */
(function (w) {
  "use strict";
  var QUEUE = "engage_queue", ANON = "engage_anonymous_id", USER = "engage_user_id";
  var BATCH = 20, EVERY = 1000, MAX_BACKOFF = 30000, MAX_QUEUE = 1000;
  var cfg = null, queue = [], timer = null, due = 0, inFlight = false, backoff = EVERY, mem = {};

  function load(k) { try { return w.localStorage.getItem(k); } catch (e) { return mem[k] || null; } }
  function save(k, v) { try { w.localStorage.setItem(k, v); } catch (e) { mem[k] = v; } }
  function id() {
    if (w.crypto && w.crypto.randomUUID) return w.crypto.randomUUID();
    var b = new Uint8Array(16), s = "";
    (w.crypto || w.msCrypto).getRandomValues(b);
    for (var i = 0; i < 16; i++) s += (b[i] + 256).toString(16).slice(1);
    return s;
  }
  function anonymousId() { var a = load(ANON); if (!a) { a = id(); save(ANON, a); } return a; }
  function persist() { save(QUEUE, JSON.stringify(queue)); }
  try { queue = JSON.parse(load(QUEUE) || "[]") || []; } catch (e) { queue = []; }

  // One timer, due at the earliest time asked for (a full batch goes at once, not at the tick).
  function schedule(ms) {
    var at = Date.now() + ms;
    if (timer && due <= at) return;
    if (timer) clearTimeout(timer);
    due = at;
    timer = setTimeout(function () { timer = null; flush(false); }, ms);
  }

  function flush(keepalive) {
    if (!cfg || inFlight || !queue.length) return;
    var batch = queue.slice(0, BATCH);
    inFlight = true;
    var done = function (retryMs) {
      inFlight = false;
      if (retryMs === 0) {
        var sent = {};
        for (var i = 0; i < batch.length; i++) sent[batch[i].messageId] = true;
        queue = queue.filter(function (m) { return !sent[m.messageId]; });
        persist();
        backoff = EVERY;
        if (queue.length) schedule(queue.length >= BATCH ? 0 : EVERY);
      } else {
        backoff = Math.min(MAX_BACKOFF, backoff * 2);
        schedule(Math.max(retryMs || 0, backoff));
      }
    };
    var body = JSON.stringify({ batch: batch, sentAt: new Date().toISOString() });
    try {
      w.fetch(cfg.host + "/v1/batch", {
        method: "POST",
        keepalive: !!keepalive && body.length < 60000,
        headers: { "Content-Type": "application/json", "Authorization": "Basic " + w.btoa(cfg.key + ":") },
        body: body
      }).then(function (r) {
        if (r.ok) return done(0);
        if (r.status === 429 || r.status >= 500) {
          var after = parseFloat(r.headers.get("Retry-After") || "0") * 1000;
          return done(after || backoff);
        }
        // A batch the server will never take (bad key, bad shape): dropped, said once.
        if (w.console) w.console.warn("engage: batch refused with HTTP " + r.status);
        done(0);
      }, function () { done(backoff); });
    } catch (e) { done(backoff); }
  }

  function engage(name, properties) {
    var userId = load(USER);
    var m = {
      type: "track", event: String(name), properties: properties || {},
      messageId: id(), timestamp: new Date().toISOString(), anonymousId: anonymousId()
    };
    if (userId) m.userId = userId;
    queue.push(m);
    if (queue.length > MAX_QUEUE) queue.splice(0, queue.length - MAX_QUEUE);
    persist();
    if (queue.length >= BATCH) flush(false); else schedule(EVERY);
  }
  engage.init = function (o) {
    cfg = { key: o.key, host: String(o.host || "").replace(/\/+$/, "") };
    if (queue.length) schedule(0);
  };
  engage.identify = function (userId) { save(USER, String(userId)); };
  engage.flush = function () { flush(false); };

  var hidden = function () { if (document.visibilityState === "hidden") flush(true); };
  w.addEventListener("pagehide", function () { flush(true); });
  document.addEventListener("visibilitychange", hidden);
  w.engage = engage;
})(window);
