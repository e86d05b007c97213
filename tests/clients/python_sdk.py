"""Sends events to engage through an official Python SDK, exactly as an application would.

Usage: python_sdk.py segment|rudder HOST WRITE_KEY USER TICKS

Sends, for USER: one "Order Completed" track with typed properties, a fixed messageId and
timestamp, TICKS "tick" tracks in batches of 5 (so a server with a low rate limit answers some
batches 429 and the SDK retries them), a page, a screen, an identify, a group, an alias, and a
track with only an anonymousId; then flushes. Prints one JSON line: the HTTP statuses the SDK
got, per status, and whether its bodies were gzip-compressed.
"""
import json
import sys
from collections import Counter
from datetime import datetime, timezone

sdk, host, key, user, ticks = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
if sdk == "segment":
    from segment.analytics import Client
    from segment.analytics import request as wire
    extra = {"gzip": True}
else:
    from rudderstack.analytics import Client
    from rudderstack.analytics import request as wire
    extra = {}  # gzip is this SDK's default

statuses, encodings, errors = Counter(), set(), []
post = wire._session.post


def counting_post(url, **kwargs):
    encodings.add(kwargs.get("headers", {}).get("Content-Encoding", "identity"))
    res = post(url, **kwargs)
    statuses[str(res.status_code)] += 1
    return res


wire._session.post = counting_post
client = Client(
    key,
    host=host,
    upload_size=5,
    upload_interval=0.1,
    max_retries=20,
    on_error=lambda e, batch: errors.append(str(e)),
    **extra,
)
client.track(
    user_id=user,
    event="Order Completed",
    properties={"price": "39", "Product ID": "p-1", "gift": True, "items": [{"sku": "a"}], "coupon": None},
    message_id=user + "-order",
    timestamp=datetime(2026, 11, 20, 10, 30, tzinfo=timezone.utc),
)
for i in range(ticks):
    client.track(user_id=user, event="tick", properties={"n": i}, message_id=f"{user}-tick-{i}")
client.page(user_id=user, category="Docs", name="Pricing", properties={"url": "https://example.com/pricing"})
client.screen(user_id=user, name="Home", properties={"orientation": "portrait"})
client.identify(user_id=user, traits={"email": "someone@example.com"})
client.group(user_id=user, group_id="g-1", traits={"plan": "pro"})
client.alias(previous_id=user + "-anon", user_id=user)
client.track(anonymous_id=user + "-anon", event="Signed Up", properties={"source": "sdk"})
client.flush()
client.join()
print(json.dumps({"statuses": statuses, "encodings": sorted(encodings), "errors": errors}))
