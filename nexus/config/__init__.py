"""The config file: one msgspec Struct per section, decoding and validation.

`load_config(path)` is the only entry point the rest of Nexus uses. It parses
YAML with YAML 1.2 booleans and no duplicate keys, and decodes it into the
structs in model.py. Then it runs the checks that types cannot express, and those
that span sections, such as a route naming an upstream that does not exist.
Every error is a ConfigError whose message starts with the path of the
offending key and names the value found and what is expected, as in
`routes[2].upstream: unknown upstream "billing" (defined: catalog, users)`.
msgspec's own errors are rewritten into that form from the path and the type
they report.

Durations, sizes and percentages are written as strings with units in YAML and
stored in base units (seconds, bytes, fractions), with the unit in the
field's docs. docs/config.md documents every key; tests/test_config_docs.py
checks that the two agree.
"""

from __future__ import annotations

from nexus.config.checks import parse_listen_address
from nexus.config.loader import load_config, parse_config
from nexus.config.model import (
    AccessLog,
    Admin,
    ApiKeys,
    Concurrency,
    Config,
    ConfigError,
    Consumer,
    Duration,
    HealthCheck,
    Limits,
    Match,
    PassiveHealth,
    Policy,
    Quota,
    Rate,
    Ratio,
    Redis,
    Retries,
    Route,
    RouteRateLimit,
    SharedMemory,
    Size,
    Target,
    Tier,
    Timeouts,
    Upstream,
)

__all__ = [
    "AccessLog",
    "Admin",
    "ApiKeys",
    "Concurrency",
    "Config",
    "ConfigError",
    "Consumer",
    "Duration",
    "HealthCheck",
    "Limits",
    "Match",
    "PassiveHealth",
    "Policy",
    "Quota",
    "Rate",
    "Ratio",
    "Redis",
    "Retries",
    "Route",
    "RouteRateLimit",
    "SharedMemory",
    "Size",
    "Target",
    "Tier",
    "Timeouts",
    "Upstream",
    "load_config",
    "parse_config",
    "parse_listen_address",
]
