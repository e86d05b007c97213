// Sends events to engage through Segment's official Node.js SDK, exactly as an application would.
//
// Usage: node node_sdk.mjs HOST WRITE_KEY USER TICKS
//
// The same calls as python_sdk.py (a typed track with a fixed messageId and timestamp, TICKS
// "tick" tracks in batches of 5, page, screen, identify, group, alias, an anonymous track), then
// closeAndFlush. Prints one JSON line: the HTTP statuses the SDK got, per status, and its errors.
import { Analytics } from "@segment/analytics-node";

const [host, writeKey, user, ticksArg] = process.argv.slice(2);
const ticks = Number(ticksArg);
const statuses = {};
const errors = [];
const analytics = new Analytics({ writeKey, host, flushAt: 5, flushInterval: 100, maxRetries: 20 });
// What the SDK got on the wire, as the SDK itself reports it.
analytics.on("http_response", (r) => { statuses[r.status] = (statuses[r.status] || 0) + 1; });
analytics.on("error", (e) => errors.push(String(e && (e.reason || e.message || e.code))));

analytics.track({
  userId: user,
  event: "Order Completed",
  properties: { price: "39", "Product ID": "p-1", gift: true, items: [{ sku: "a" }], coupon: null },
  messageId: `${user}-order`,
  timestamp: new Date(Date.UTC(2026, 10, 20, 10, 30)),
});
for (let i = 0; i < ticks; i++) {
  analytics.track({ userId: user, event: "tick", properties: { n: i }, messageId: `${user}-tick-${i}` });
}
analytics.page({ userId: user, category: "Docs", name: "Pricing", properties: { url: "https://example.com/pricing" } });
analytics.screen({ userId: user, name: "Home", properties: { orientation: "portrait" } });
analytics.identify({ userId: user, traits: { email: "someone@example.com" } });
analytics.group({ userId: user, groupId: "g-1", traits: { plan: "pro" } });
analytics.alias({ previousId: `${user}-anon`, userId: user });
analytics.track({ anonymousId: `${user}-anon`, event: "Signed Up", properties: { source: "sdk" } });
await analytics.closeAndFlush({ timeout: 60000 });
console.log(JSON.stringify({ statuses, encodings: ["identity"], errors }));
