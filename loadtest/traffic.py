"""The traffic mixes of the load tests: who sends what to the gateway of loadtest/nexus.yaml.

Both the locust users (loadtest/locustfile.py) and the open-loop spike
benchmark (benchmarks/spike.py) draw their requests from here, so they
offer the gateway the same mix. The `spike` and `steady` workloads send
the mixed mix (`pick_operation`); the `zipf` workload sends the
cache-heavy mix (`pick_zipf_request`): mostly GETs of catalog items whose
ids follow a Zipf distribution, so a few items take most requests, as
popular content does, and the response cache serves them.

Every route of loadtest/nexus.yaml leads to the one capacity upstream, and
every request except the upstream's health check costs it one service
time, whatever the path. The mix decides which routes, tiers and
priorities compete for that capacity.
"""

from __future__ import annotations

import bisect
import itertools
import json
import random
from dataclasses import dataclass

# The API keys of the consumers in loadtest/nexus.yaml, made with
# `nexusctl key new`. The config stores only their SHA-256 hashes.
# NOTE: these keys are public test values for load on 127.0.0.1 only;
# never put them in a config that faces a network.
API_KEYS = {
    "critical": "nx_8wh510vbAXtmEaNdtvokAgTkcpz1yOvEZYLFUNL4UUI",
    "pro": "nx_L1PoFfKkY0ZATHpliiRRPHxailRPQX8Wnr3bKUQ4mqE",
    "free": "nx_5fzGThTO6tVEfBuN7fuXIYZgoW7sw1MHKEk-iYROTyA",
}
ANONYMOUS = "anonymous"
KEY_HEADER = "x-api-key"

# Share of the requests sent by each kind of client. Anonymous clients have
# priority 0 under the concurrency limit; the tiers have the priorities of
# loadtest/nexus.yaml (free 1, pro 2, critical 3).
CLIENT_WEIGHTS = {ANONYMOUS: 35, "free": 35, "pro": 20, "critical": 10}


@dataclass(frozen=True)
class Operation:
    """One kind of request: its locust stats name, method, path template and weight."""

    name: str
    method: str
    path: str
    weight: int
    needs_key: bool = False
    has_body: bool = False


# GET-heavy, as API traffic usually is: 90% reads by weight for key holders.
# `{id}` is replaced by a random item id. Only key holders call routes with
# `auth: api_key`, because an anonymous call would only get 401.
OPERATIONS = (
    Operation("GET /api/catalog/items/{id}", "GET", "/api/catalog/items/{id}", 40),
    Operation("GET /api/catalog/search", "GET", "/api/catalog/search?q=lamp&page={id}", 20),
    Operation("GET /public/status", "GET", "/public/status", 5),
    Operation("GET /api/orders/{id}", "GET", "/api/orders/{id}", 15, needs_key=True),
    Operation("POST /api/orders", "POST", "/api/orders", 8, needs_key=True, has_body=True),
    Operation("GET /api/reports/daily", "GET", "/api/reports/daily?day={id}", 2, needs_key=True),
)

ITEM_IDS = 10_000


@dataclass(frozen=True)
class PlannedRequest:
    """One request to send: the client kind, the operation's name, method, path, headers and body."""

    client: str
    name: str
    method: str
    path: str
    headers: dict[str, str]
    body: bytes | None


def operations_for(client: str) -> tuple[Operation, ...]:
    """Return the operations a client of this kind sends."""
    if client == ANONYMOUS:
        return tuple(operation for operation in OPERATIONS if not operation.needs_key)
    return OPERATIONS


def headers_for(client: str) -> dict[str, str]:
    if client == ANONYMOUS:
        return {}
    return {KEY_HEADER: API_KEYS[client]}


def build_request(client: str, operation: Operation, rng: random.Random) -> PlannedRequest:
    """Fill in an operation's path and body for one request of `client`."""
    path = operation.path.replace("{id}", str(rng.randrange(ITEM_IDS)))
    headers = headers_for(client)
    body = None
    if operation.has_body:
        body = json.dumps({"item": rng.randrange(ITEM_IDS), "quantity": 1 + rng.randrange(5)}).encode()
        headers = {**headers, "content-type": "application/json"}
    return PlannedRequest(client, operation.name, operation.method, path, headers, body)


def pick_operation(client: str, rng: random.Random) -> Operation:
    choices = operations_for(client)
    return rng.choices(choices, weights=[operation.weight for operation in choices])[0]


def pick_request(rng: random.Random) -> PlannedRequest:
    """Draw one request of the whole mix: first the client kind, then its operation."""
    clients = list(CLIENT_WEIGHTS)
    client = rng.choices(clients, weights=[CLIENT_WEIGHTS[name] for name in clients])[0]
    return build_request(client, pick_operation(client, rng), rng)


# The cache-heavy mix: Zipf-distributed item ids with exponent ZIPF_EXPONENT
# over ITEM_IDS items (rank 1 is the most popular). With 1.1, the 100 most
# popular items take about 65% of the item requests.
ZIPF_EXPONENT = 1.1
_ZIPF_CUMULATIVE = list(itertools.accumulate(1.0 / rank**ZIPF_EXPONENT for rank in range(1, ITEM_IDS + 1)))

# Shares of the cache-heavy mix: cacheable reads of items and searches,
# uncacheable reads of orders, and writes.
ZIPF_OPERATIONS = (
    Operation("GET /api/catalog/items/{zipf}", "GET", "/api/catalog/items/{id}", 80),
    Operation("GET /api/catalog/search", "GET", "/api/catalog/search?q=lamp&page={id}", 10),
    Operation("GET /api/orders/{id}", "GET", "/api/orders/{id}", 6, needs_key=True),
    Operation("POST /api/orders", "POST", "/api/orders", 4, needs_key=True, has_body=True),
)


def zipf_item(rng: random.Random) -> int:
    """Draw an item id; id 0 is the most popular."""
    return bisect.bisect_left(_ZIPF_CUMULATIVE, rng.random() * _ZIPF_CUMULATIVE[-1])


def pick_zipf_request(client: str, rng: random.Random) -> PlannedRequest:
    """Draw one request of the cache-heavy mix for a client of kind `client`."""
    choices = ZIPF_OPERATIONS if client != ANONYMOUS else tuple(op for op in ZIPF_OPERATIONS if not op.needs_key)
    operation = rng.choices(choices, weights=[op.weight for op in choices])[0]
    planned = build_request(client, operation, rng)
    if operation.method == "GET" and operation.path.startswith("/api/catalog"):
        # Searches page through few pages; items follow the Zipf ranks.
        number = zipf_item(rng) if "items" in operation.path else zipf_item(rng) % 20
        path = operation.path.replace("{id}", str(number))
        return PlannedRequest(client, operation.name, operation.method, path, planned.headers, planned.body)
    return planned
