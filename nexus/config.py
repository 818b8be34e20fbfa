"""The config file: one msgspec Struct per section, decoding and validation.

`load_config(path)` is the only entry point the rest of Nexus uses. It decodes
YAML into the structs below, then runs the checks that span sections (a route
naming an upstream that does not exist, two routes with one name). Every error
is a ConfigError whose message starts with the path of the offending key, as
in `routes[2].upstream: unknown upstream "billing" (defined: catalog, users)`.

Durations, sizes and percentages are written as strings with units in YAML and
stored in base units (seconds, bytes, fractions), with the unit in the
field's docs. docs/config.md documents every key; tests/test_config_docs.py
checks that the two agree.
"""

from __future__ import annotations

import ipaddress
import os
import re
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import msgspec
import yaml

from nexus.units import parse_duration, parse_ratio, parse_size

__all__ = [
    "Config",
    "ConfigError",
    "HealthCheck",
    "Limits",
    "Match",
    "PassiveHealth",
    "Retries",
    "Route",
    "Target",
    "Timeouts",
    "Upstream",
    "load_config",
    "parse_config",
]


class ConfigError(Exception):
    """A config file that cannot be used, with the path of the bad key."""


class Duration(float):
    """Seconds, written in YAML as `250ms`, `2s`, `1m`."""


class Size(int):
    """Bytes, written in YAML as `64KiB`, `10MiB`."""


class Ratio(float):
    """A fraction in 0..1, written in YAML as `20%`."""


_UNIT_PARSERS = {Duration: parse_duration, Size: parse_size, Ratio: parse_ratio}

_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT")

# Conditions a retry can be taken on; status codes are given as integers.
RetryCondition = Literal["connect_failure", "timeout", "reset"] | int

Balance = Literal["round_robin", "least_request", "p2c_ewma", "maglev"]

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]


class _Section(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, kw_only=True):
    """Base of every config section: unknown keys are errors, not ignored."""


class Target(_Section):
    """One upstream server: an http:// URL with host and port, and a weight."""

    url: str
    weight: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 1


class HealthCheck(_Section):
    """Active health check, run once per node by the master."""

    path: str = "/"
    interval: Duration = Duration(0.25)
    timeout: Duration = Duration(0.1)
    unhealthy_after: PositiveInt = 2
    healthy_after: PositiveInt = 2


class PassiveHealth(_Section):
    """Ejection of a target after consecutive failed requests (per worker)."""

    consecutive_failures: PositiveInt = 3
    eject_for: Duration = Duration(5.0)


class Timeouts(_Section):
    """Per-try and total timeouts for requests to an upstream, in seconds."""

    connect: Duration = Duration(1.0)
    response_header: Duration = Duration(10.0)
    total: Duration = Duration(30.0)


class Retries(_Section):
    """Retry policy; `attempts` counts retries after the first try."""

    attempts: Annotated[int, msgspec.Meta(ge=0, le=10)] = 1
    on: list[RetryCondition] = msgspec.field(default_factory=lambda: ["connect_failure"])
    budget: Ratio = Ratio(0.2)
    min_concurrent: Annotated[int, msgspec.Meta(ge=0)] = 3


class Upstream(_Section):
    """A named pool of targets with its balancer, health checks and timeouts."""

    targets: list[str | Target]
    balance: Balance = "round_robin"
    hash_on: str | None = None
    hash_balance_factor: Annotated[float, msgspec.Meta(ge=1.0)] = 1.25
    health: HealthCheck | None = None
    passive: PassiveHealth = msgspec.field(default_factory=PassiveHealth)
    timeouts: Timeouts = msgspec.field(default_factory=Timeouts)
    retries: Retries = msgspec.field(default_factory=Retries)
    max_connections: PositiveInt = 1024

    def target_list(self) -> list[Target]:
        """Return the targets with the short string form expanded."""
        return [Target(url=t) if isinstance(t, str) else t for t in self.targets]


class Match(_Section):
    """Conditions a request must meet for a route to apply; all must hold."""

    host: str | list[str] | None = None
    path: str | None = None
    path_prefix: str | None = None
    methods: list[str] | None = None
    headers: dict[str, str] = msgspec.field(default_factory=dict)


class Route(_Section):
    """A rule that sends matching requests to one upstream."""

    name: str
    upstream: str
    match: Match = msgspec.field(default_factory=Match)
    strip_prefix: str | None = None
    add_prefix: str | None = None


class Limits(_Section):
    """Limits on downstream requests, enforced by every worker."""

    max_body: Size = Size(10 * 1024 * 1024)
    header_timeout: Duration = Duration(10.0)
    body_timeout: Duration = Duration(30.0)


class Config(_Section):
    """A whole Nexus config file."""

    listen: list[str] = msgspec.field(default_factory=lambda: ["0.0.0.0:8080", "[::]:8080"])
    workers: int | Literal["auto"] = "auto"
    shutdown_timeout: Duration = Duration(30.0)
    limits: Limits = msgspec.field(default_factory=Limits)
    trusted_proxies: list[str] = msgspec.field(default_factory=list)
    request_id_header: str = "x-request-id"
    upstreams: dict[str, Upstream] = msgspec.field(default_factory=dict)
    routes: list[Route] = msgspec.field(default_factory=list)

    def worker_count(self) -> int:
        """Return the number of workers: one per usable CPU for `auto`."""
        if self.workers == "auto":
            return len(os.sched_getaffinity(0))
        return self.workers


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, decode and validate the config file at `path`."""
    try:
        with open(path, "rb") as file:
            text = file.read()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {os.fspath(path)!r}: {exc.strerror}") from exc
    return parse_config(text, source=os.fspath(path))


def parse_config(text: bytes | str, source: str = "<config>") -> Config:
    """Decode and validate config text; `source` names it in YAML syntax errors."""
    raw = _parse_yaml(text, source)
    config = _convert(raw)
    _validate(config)
    return config


class _Yaml12Loader(yaml.SafeLoader):
    """A safe loader that reads booleans as YAML 1.2 does: only true and false.

    PyYAML follows YAML 1.1, where `on`, `off`, `yes` and `no` are booleans, so
    `retries: {on: [502]}` would silently get the key True.
    """


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _parse_yaml(text: bytes | str, source: str) -> dict[str, Any]:
    """Parse YAML into plain Python values, with the line of any syntax error."""
    try:
        raw = yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{source}: invalid YAML{where}: {problem}") from exc
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of config sections at the top level, found {type(raw).__name__}")
    return raw


def _decode_units(type_: type, value: Any) -> Any:
    parser = _UNIT_PARSERS.get(type_)
    if parser is None:
        raise NotImplementedError(type_)
    return type_(parser(value))


def _convert(raw: dict[str, Any]) -> Config:
    """Convert parsed YAML into a Config, turning msgspec errors into ConfigErrors."""
    try:
        return msgspec.convert(raw, Config, dec_hook=_decode_units)
    except msgspec.ValidationError as exc:
        raise ConfigError(_locate(raw, exc)) from None


def _locate(raw: dict[str, Any], exc: msgspec.ValidationError) -> str:
    """Rewrite a msgspec message as `path: problem`, naming dict keys.

    msgspec writes a dict key in a path as `[...]`; the only dict of sections
    is `upstreams`, so convert each upstream alone to find the one that fails.
    """
    message, path = _split_msgspec_error(str(exc))
    if path.startswith("upstreams[...]") and isinstance(raw.get("upstreams"), dict):
        for name, value in raw["upstreams"].items():
            try:
                msgspec.convert(value, Upstream, dec_hook=_decode_units)
            except msgspec.ValidationError as inner:
                inner_message, inner_path = _split_msgspec_error(str(inner))
                return f"upstreams.{name}{'.' + inner_path if inner_path else ''}: {inner_message}"
    return f"{path or '(top level)'}: {message}"


_MSGSPEC_PATH = re.compile(r"^(?P<message>.*?)(?: - at (?:`key` in )?`\$(?P<path>[^`]*)`)?$", re.DOTALL)
_UNKNOWN_FIELD = re.compile(r"^Object contains unknown field `(?P<field>[^`]*)`$")


def _split_msgspec_error(text: str) -> tuple[str, str]:
    """Split msgspec's `problem - at `$.a.b`` into (problem, `a.b`)."""
    match = _MSGSPEC_PATH.match(text)
    assert match is not None
    message = match.group("message")
    path = (match.group("path") or "").lstrip(".")
    unknown = _UNKNOWN_FIELD.match(message)
    if unknown:
        message = f'unknown key "{unknown.group("field")}" (check the spelling against docs/config.md)'
    return message, path


def _validate(config: Config) -> None:
    """Run the checks that msgspec's types cannot express."""
    _check_listen(config.listen)
    _check_workers(config.workers)
    _check_trusted_proxies(config.trusted_proxies)
    for name, upstream in config.upstreams.items():
        _check_upstream(name, upstream)
    _check_routes(config)


def _check_listen(listen: list[str]) -> None:
    if not listen:
        raise ConfigError('listen: at least one address is required, for example ["127.0.0.1:8080"]')
    seen: set[tuple[str, int]] = set()
    for i, address in enumerate(listen):
        try:
            host, port = parse_listen_address(address)
        except ValueError as exc:
            raise ConfigError(f"listen[{i}]: {exc}") from None
        if (host, port) in seen:
            raise ConfigError(f"listen[{i}]: address {address!r} is listed twice")
        seen.add((host, port))


def parse_listen_address(address: str) -> tuple[str, int]:
    """Split `host:port` or `[v6]:port` into (host, port); raise ValueError if invalid."""
    match = re.fullmatch(r"\[(?P<v6>[^\]]+)\]:(?P<port>\d+)|(?P<v4>[^:\[\]]+):(?P<port4>\d+)", address)
    if match is None:
        raise ValueError(f'invalid address {address!r}: expected "host:port" or "[ipv6]:port", such as "0.0.0.0:8080"')
    host = match.group("v6") or match.group("v4")
    port = int(match.group("port") or match.group("port4"))
    if not 0 <= port <= 65535:
        raise ValueError(f"invalid address {address!r}: port {port} is outside 0-65535")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ValueError(f"invalid address {address!r}: {host!r} is not an IP address (use 0.0.0.0 or [::] for all)") from None
    return host, port


def _check_workers(workers: int | str) -> None:
    if isinstance(workers, int) and workers < 1:
        raise ConfigError(f'workers: invalid value {workers}: use a positive integer or "auto"')


def _check_trusted_proxies(networks: list[str]) -> None:
    for i, network in enumerate(networks):
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise ConfigError(
                f"trusted_proxies[{i}]: invalid network {network!r}: expected an address or CIDR such as 10.0.0.0/8"
            ) from None


def _check_upstream(name: str, upstream: Upstream) -> None:
    where = f"upstreams.{name}"
    if not upstream.targets:
        raise ConfigError(f"{where}.targets: at least one target is required")
    for i, target in enumerate(upstream.target_list()):
        problem = _target_url_problem(target.url)
        if problem:
            raise ConfigError(f"{where}.targets[{i}]: {problem}")
    if upstream.balance == "maglev" and upstream.hash_on is None:
        raise ConfigError(f'{where}.hash_on: required when balance is "maglev", for example "header:x-user-id"')
    if upstream.hash_on is not None:
        problem = _hash_on_problem(upstream.hash_on)
        if problem:
            raise ConfigError(f"{where}.hash_on: {problem}")
    if upstream.health is not None:
        _check_health(f"{where}.health", upstream.health)
    for i, condition in enumerate(upstream.retries.on):
        if isinstance(condition, int) and not 500 <= condition <= 599:
            raise ConfigError(f"{where}.retries.on[{i}]: invalid status {condition}: only 5xx statuses can be retried")
    if upstream.timeouts.total < upstream.timeouts.connect:
        raise ConfigError(f"{where}.timeouts.total: {upstream.timeouts.total}s is shorter than timeouts.connect")


def _target_url_problem(url: str) -> str | None:
    parts = urlsplit(url)
    if parts.scheme != "http":
        return f'invalid target {url!r}: expected an http:// URL such as "http://10.0.0.5:8000"'
    if not parts.hostname or parts.port is None:
        return f'invalid target {url!r}: host and port are required, such as "http://10.0.0.5:8000"'
    if parts.path not in ("", "/") or parts.query:
        return f"invalid target {url!r}: a target has no path or query (use the route's add_prefix)"
    return None


_HASH_SOURCES = ("header", "cookie")
_HASH_KEYS = ("client_ip", "path")


def _hash_on_problem(hash_on: str) -> str | None:
    kind, _, name = hash_on.partition(":")
    if hash_on in _HASH_KEYS:
        return None
    if kind in _HASH_SOURCES and name:
        return None
    return f'invalid value {hash_on!r}: expected "header:NAME", "cookie:NAME", "client_ip" or "path"'


def _check_health(where: str, health: HealthCheck) -> None:
    if not health.path.startswith("/"):
        raise ConfigError(f'{where}.path: invalid path {health.path!r}: must start with "/"')
    if health.interval <= 0:
        raise ConfigError(f"{where}.interval: must be greater than 0")
    if health.timeout <= 0 or health.timeout > health.interval:
        raise ConfigError(f"{where}.timeout: {health.timeout}s must be greater than 0 and at most the interval ({health.interval}s)")


def _check_routes(config: Config) -> None:
    names: dict[str, int] = {}
    defined = ", ".join(sorted(config.upstreams)) or "none"
    for i, route in enumerate(config.routes):
        where = f"routes[{i}]"
        if route.name in names:
            raise ConfigError(f'{where}.name: duplicate route name "{route.name}" (also routes[{names[route.name]}])')
        names[route.name] = i
        if route.upstream not in config.upstreams:
            raise ConfigError(f'{where}.upstream: unknown upstream "{route.upstream}" (defined: {defined})')
        _check_match(f"{where}.match", route.match)
        for key in ("strip_prefix", "add_prefix"):
            value = getattr(route, key)
            if value is not None and (not value.startswith("/") or value.endswith("/") and value != "/"):
                raise ConfigError(f'{where}.{key}: invalid prefix {value!r}: must start with "/" and not end with "/", such as "/v1"')


def _check_match(where: str, match: Match) -> None:
    if match.path is not None and match.path_prefix is not None:
        raise ConfigError(f"{where}: set either path or path_prefix, not both")
    for key in ("path", "path_prefix"):
        value = getattr(match, key)
        if value is not None and not value.startswith("/"):
            raise ConfigError(f'{where}.{key}: invalid path {value!r}: must start with "/"')
    hosts = [match.host] if isinstance(match.host, str) else match.host or []
    for host in hosts:
        if "*" in host and (not host.startswith("*.") or "*" in host[2:]):
            raise ConfigError(f'{where}.host: invalid host {host!r}: a wildcard is only allowed as a leading "*.", such as "*.example.com"')
    for i, method in enumerate(match.methods or []):
        if method not in _METHODS:
            raise ConfigError(f"{where}.methods[{i}]: unknown method {method!r} (use upper case: {', '.join(_METHODS)})")
