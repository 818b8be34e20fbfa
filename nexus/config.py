"""The config file: one msgspec Struct per section, decoding and validation.

`load_config(path)` is the only entry point the rest of Nexus uses. It parses
YAML with YAML 1.2 booleans and no duplicate keys, and decodes it into the
structs below. Then it runs the checks that types cannot express, and those
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

import difflib
import ipaddress
import math
import os
import re
import types
from typing import Annotated, Any, Literal, NamedTuple, Union, get_args, get_origin
from urllib.parse import urlsplit

import msgspec
import yaml
from msgspec.structs import FieldInfo

from nexus.units import parse_duration, parse_ratio, parse_size, show_value

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
    "parse_listen_address",
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
    source = os.fspath(path)
    try:
        with open(path, "rb") as file:
            text = file.read()
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read the config file: {exc.strerror or exc}") from exc
    return parse_config(text, source=source)


def parse_config(text: bytes | str, source: str = "<config>") -> Config:
    """Decode and validate config text. `source` names the text in file-level errors."""
    raw = _parse_yaml(text, source)
    config = _convert(raw)
    _validate(config)
    return config


# ---------------------------------------------------------------------------
# YAML


class _Yaml12Loader(yaml.SafeLoader):
    """A safe loader with YAML 1.2 booleans that rejects duplicate keys.

    PyYAML follows YAML 1.1, where `on`, `off`, `yes` and `no` are booleans, so
    `retries: {on: [502]}` would silently get the key True. PyYAML also keeps
    the last of two equal keys, which would silently drop an upstream that is
    defined twice; YAML requires keys to be unique.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_lines: dict[tuple[type, Any], int] = {}
        for key_node, _value_node in node.value:
            # Merge keys (`<<: *defaults`) may be overridden on purpose.
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            # The type is part of the identity because 1 == True in Python.
            identity = (type(key), key)
            if identity in first_lines:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {show_value(key)} (first defined at line {first_lines[identity]})",
                    key_node.start_mark,
                )
            first_lines[identity] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _parse_yaml(text: bytes | str, source: str) -> dict[Any, Any]:
    """Parse YAML into plain Python values, with the line and column of any syntax error."""
    try:
        raw = yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        where = _describe_mark(exc.problem_mark)
        raise ConfigError(f"{source}: invalid YAML{where}: {_yaml_problem(exc)}") from None
    except yaml.reader.ReaderError as exc:
        where = _reader_error_place(text, exc)
        raise ConfigError(f"{source}: invalid YAML{where}: {_reader_error_problem(exc)}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: {exc}") from None

    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{source}: expected a mapping of config keys such as listen and upstreams at the top level, "
            f"found {_kind_of(raw)}"
        )
    return raw


def _reader_error_place(text: bytes | str, exc: yaml.reader.ReaderError) -> str:
    """Return where a ReaderError happened: a byte offset if decoding failed, else a line and column."""
    if _is_decode_error(exc):
        return f" at byte {exc.position}"
    # The position counts characters of the decoded text.
    decoded = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
    before = decoded[: exc.position]
    line = before.count("\n") + 1
    column = exc.position - (before.rfind("\n") + 1) + 1
    return f" at line {line}, column {column}"


def _is_decode_error(exc: yaml.reader.ReaderError) -> bool:
    # PyYAML sets the encoding "unicode" for a control character in decoded text.
    return exc.encoding != "unicode"


def _reader_error_problem(exc: yaml.reader.ReaderError) -> str:
    if _is_decode_error(exc):
        return f"the file is not valid {exc.encoding} ({exc.reason}): save it as UTF-8"
    character = exc.character if isinstance(exc.character, str) else chr(exc.character)
    return f"control character U+{ord(character):04X} is not allowed: remove it"


def _describe_mark(mark: yaml.Mark | None) -> str:
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""


def _position(mark: yaml.Mark | None) -> tuple[int, int] | None:
    return (mark.line, mark.column) if mark else None


def _yaml_problem(exc: yaml.MarkedYAMLError) -> str:
    """Return PyYAML's problem text, with where the enclosing construct starts if that helps."""
    problem = exc.problem or exc.context or "syntax error"
    # An unclosed "[" or "{" is reported where the parser gave up, and the
    # context mark points at the bracket that was left open.
    context, problem_mark = exc.context_mark, exc.problem_mark
    if exc.context and exc.problem and context and (context.line, context.column) != _position(problem_mark):
        problem += f" ({exc.context}{_describe_mark(exc.context_mark)})"
    return problem


# ---------------------------------------------------------------------------
# Decoding: YAML values into structs, and msgspec errors into plain sentences


def _decode_units(type_: type, value: Any) -> Any:
    parser = _UNIT_PARSERS.get(type_)
    if parser is None:
        raise NotImplementedError(type_)
    return type_(parser(value))


def _convert(raw: dict[Any, Any]) -> Config:
    """Convert parsed YAML into a Config, turning msgspec errors into ConfigErrors."""
    try:
        return msgspec.convert(raw, Config, dec_hook=_decode_units)
    except msgspec.ValidationError as exc:
        raise ConfigError(_explain(raw, Config, str(exc), _KeyPath())) from None


class _KeyPath(NamedTuple):
    """The location of a value: its path as shown to users, and a pattern for `_EXPECTED`.

    In the pattern, list indexes are `[]` and mapping keys `*`, so that
    `upstreams.a.targets[0]` is `upstreams.*.targets[]`.
    """

    path: str = ""
    pattern: str = ""

    def field(self, name: str) -> _KeyPath:
        return _KeyPath(_join(self.path, name), _join(self.pattern, name))

    def item(self, index: int) -> _KeyPath:
        return _KeyPath(f"{self.path}[{index}]", f"{self.pattern}[]")

    def key(self, key: object) -> _KeyPath:
        return _KeyPath(_key_path(self.path, key), _join(self.pattern, "*"))


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _key_path(prefix: str, key: object) -> str:
    """Return the path of a mapping key: `upstreams.catalog`, or `upstreams["a b"]` for an unusual key."""
    if isinstance(key, str) and _PLAIN_KEY.fullmatch(key):
        return _join(prefix, key)
    return f"{prefix}[{show_value(key)}]" if prefix else show_value(key)


# A key made of these characters needs no quoting in a path; "." is left out
# because `upstreams.api.v1` would read as two levels.
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+")

# msgspec's error text: "problem - at `$.a[0].b`", or "- at `key` in `$.a`"
# when a mapping key is wrong. A mapping key in a path is written `[...]`.
_MSGSPEC_ERROR = re.compile(r"^(?P<problem>.*?)(?: - at (?P<in_key>`key` in )?`\$(?P<path>[^`]*)`)?$", re.DOTALL)
_PATH_STEP = re.compile(r"\.(?P<field>[A-Za-z_][A-Za-z0-9_]*)|\[(?P<index>[0-9]+)\]|(?P<key>\[\.\.\.\])")
_MISSING_FIELD = re.compile(r"^Object missing required field `(?P<field>[^`]*)`$")
_UNKNOWN_FIELD = re.compile(r"^Object contains unknown field `(?P<field>[^`]*)`$")

# Descriptions of the expected value, by key pattern, for keys where the
# description built from the type would be vague.
_EXPECTED = {
    "workers": 'a positive integer or "auto"',
    "listen": 'a list of addresses such as ["0.0.0.0:8080"]',
    "listen[]": 'an address such as "0.0.0.0:8080" or "[::]:8080"',
    "trusted_proxies": 'a list of networks such as ["10.0.0.0/8"]',
    "trusted_proxies[]": 'an address or network such as "10.0.0.0/8"',
    "upstreams": "a mapping from upstream name to its settings, such as {catalog: {targets: [...]}}",
    "upstreams.*.targets": 'a list of targets such as ["http://10.0.0.5:8000"]',
    "upstreams.*.targets[]": (
        'a URL string such as "http://10.0.0.5:8000" or a mapping {url: ..., weight: ...}'
    ),
    "upstreams.*.retries.on": "a list of retry conditions such as [connect_failure, 503]",
    "upstreams.*.retries.on[]": "connect_failure, timeout, reset or a 5xx status code such as 503",
    "upstreams.*": "a mapping of upstream settings, such as {targets: [...]}",
    "routes": "a list of routes, each a mapping with name, upstream and match",
    "routes[]": "a mapping with name, upstream and match",
    "routes[].match.host": 'a host name such as "api.example.com" or a list of host names',
    "routes[].match.methods": "a list of methods such as [GET, HEAD]",
    "routes[].match.headers": 'a mapping from header name to value, such as {x-tenant: "acme"}',
}


def _explain(raw: Any, type_: Any, error: str, where: _KeyPath) -> str:
    """Rewrite msgspec's `error` about `raw`, decoded as `type_`, as `path: problem`.

    The path msgspec reports is walked through the raw value and the type
    together, so the message can show the value found and describe what the
    key expects. msgspec writes a mapping key as `[...]`, so at such a step the
    failing entry is found by converting each entry alone.
    """
    match = _MSGSPEC_ERROR.match(error)
    assert match is not None  # every string matches: the location part is optional
    value, field = raw, None
    for step in _PATH_STEP.finditer(match["path"] or ""):
        type_ = _narrow(type_, value)
        if step["key"]:
            return _explain_mapping(value, type_, where, match["problem"])
        if step["field"]:
            field = _struct_field(type_, step["field"])
            value, type_, where = value[step["field"]], field.type, where.field(step["field"])
        else:
            index = int(step["index"])
            value, type_, where, field = value[index], _item_type(type_), where.item(index), None

    if match["in_key"]:
        return _explain_mapping(value, _narrow(type_, value), where, match["problem"])
    return _describe_problem(match["problem"], value, type_, where, field)


def _explain_mapping(mapping: dict[Any, Any], type_: Any, where: _KeyPath, problem: str) -> str:
    """Find the entry of `mapping` that fails to decode as `type_` and explain it."""
    if _is_struct(type_):
        # msgspec only checks here that the keys of a section are strings.
        for key in mapping:
            if not isinstance(key, str):
                return _unknown_key_message(type_, key, where)
        return f"{where.path}: {problem}"

    key_type, value_type = get_args(type_)
    for key, item in mapping.items():
        try:
            msgspec.convert(key, key_type)
        except msgspec.ValidationError:
            return f"{where.path}: invalid key {show_value(key)}: expected {_describe(key_type)}, so put it in quotes"
        try:
            msgspec.convert(item, value_type, dec_hook=_decode_units)
        except msgspec.ValidationError as exc:
            return _explain(item, value_type, str(exc), where.key(key))
    # Not reached while msgspec and the checks above agree; keep its wording.
    return f"{where.path}: {problem}"


def _describe_problem(problem: str, value: Any, type_: Any, where: _KeyPath, field: FieldInfo | None) -> str:
    """Write the message for a value that msgspec rejected at `where`."""
    missing = _MISSING_FIELD.match(problem)
    if missing:
        return f'{where.path}: missing required key "{missing["field"]}"'
    unknown = _UNKNOWN_FIELD.match(problem)
    if unknown:
        return _unknown_key_message(_narrow(type_, value), unknown["field"], where)
    if _strip_meta(type_)[0] in _UNIT_PARSERS:
        # The unit parsers' messages already show the value and an example.
        return f"{where.path}: {problem}"

    expected = _EXPECTED.get(where.pattern) or _describe(type_)
    if value is None:
        hint = " (or remove the key to use the default)" if field is not None and not field.required else ""
        return f"{where.path}: missing value: expected {expected}{hint}"
    if isinstance(value, (list, dict)):
        return f"{where.path}: expected {expected}, found {_kind_of(value)}"
    return f"{where.path}: invalid value {show_value(value)}: expected {expected}"


def _unknown_key_message(struct: type[msgspec.Struct], key: object, where: _KeyPath) -> str:
    names = [field.encode_name for field in msgspec.structs.fields(struct)]
    close = difflib.get_close_matches(str(key), names, n=1)
    guess = f' (did you mean "{close[0]}"?)' if close else ""
    return f"{where.key(key).path}: unknown key, expected one of {', '.join(names)}{guess}"


def _strip_meta(type_: Any) -> tuple[Any, list[msgspec.Meta]]:
    """Split `Annotated[T, msgspec.Meta(...)]` into T and its constraints."""
    if get_origin(type_) is Annotated:
        base, *extras = get_args(type_)
        return base, [extra for extra in extras if isinstance(extra, msgspec.Meta)]
    return type_, []


def _is_union(type_: Any) -> bool:
    return get_origin(type_) in (Union, types.UnionType)


def _is_struct(type_: Any) -> bool:
    return isinstance(type_, type) and issubclass(type_, msgspec.Struct)


def _narrow(type_: Any, value: Any) -> Any:
    """Pick the member of a union type that a mapping or list `value` is meant to be."""
    base = _strip_meta(type_)[0]
    if not _is_union(base):
        return base
    for member in get_args(base):
        member = _strip_meta(member)[0]
        if isinstance(value, dict) and (_is_struct(member) or get_origin(member) is dict):
            return member
        if isinstance(value, list) and get_origin(member) is list:
            return member
    return base


def _struct_field(struct: type[msgspec.Struct], encode_name: str) -> FieldInfo:
    return next(field for field in msgspec.structs.fields(struct) if field.encode_name == encode_name)


def _item_type(list_type: Any) -> Any:
    return get_args(list_type)[0]


_UNIT_DESCRIPTIONS = {
    Duration: ("a duration such as 2s or 250ms", "durations"),
    Size: ("a size such as 10MiB", "sizes"),
    Ratio: ("a percentage such as 20%", "percentages"),
}

_SCALAR_DESCRIPTIONS = {
    str: ("a string", "strings"),
    int: ("an integer", "integers"),
    float: ("a number", "numbers"),
    bool: ("true or false", "booleans"),
    type(None): ("null", "nulls"),
}


def _describe(type_: Any, plural: bool = False) -> str:
    """Describe in words the YAML values that `type_` accepts, such as "a list of strings"."""
    base, constraints = _strip_meta(type_)
    origin = get_origin(base)
    if _is_union(base):
        members = [member for member in get_args(base) if member is not type(None)]
        return _join_alternatives([_describe(member, plural) for member in members])
    if origin is Literal:
        values = get_args(base)
        if len(values) == 1:
            return show_value(values[0])
        return ("values among " if plural else "one of ") + ", ".join(str(value) for value in values)
    if origin is list:
        return "lists" if plural else f"a list of {_describe(get_args(base)[0], plural=True)}"
    if origin is dict or _is_struct(base):
        return "mappings" if plural else "a mapping"

    singular, many = _UNIT_DESCRIPTIONS.get(base) or _SCALAR_DESCRIPTIONS.get(base) or (str(base), str(base))
    if plural:
        return many
    return _with_bounds(singular, constraints)


def _with_bounds(noun: str, constraints: list[msgspec.Meta]) -> str:
    """Add a number's bounds to its description: "an integer from 0 to 10"."""
    bounds = {
        name: getattr(meta, name)
        for meta in constraints
        for name in ("ge", "gt", "le", "lt")
        if getattr(meta, name) is not None
    }
    if noun == "an integer" and bounds == {"ge": 1}:
        return "a positive integer"
    if "ge" in bounds and "le" in bounds:
        return f"{noun} from {bounds['ge']:g} to {bounds['le']:g}"
    words = {"ge": "of at least", "gt": "greater than", "le": "of at most", "lt": "less than"}
    parts = [f"{words[name]} {value:g}" for name, value in bounds.items()]
    return f"{noun} {' and '.join(parts)}" if parts else noun


def _join_alternatives(parts: list[str]) -> str:
    if len(parts) <= 1:
        return "".join(parts)
    return f"{', '.join(parts[:-1])} or {parts[-1]}"


def _kind_of(value: Any) -> str:
    """Name the kind of a YAML value, for "found a list"."""
    for kind, name in ((bool, "a boolean"), (dict, "a mapping"), (list, "a list"), (str, "a string")):
        if isinstance(value, kind):
            return name
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    return "null" if value is None else type(value).__name__


# ---------------------------------------------------------------------------
# Checks that msgspec's types cannot express


def _validate(config: Config) -> None:
    """Run the checks on single values that types cannot express, and those that span sections."""
    _check_listen(config.listen)
    _check_workers(config.workers)
    _check_limits(config.limits)
    _check_trusted_proxies(config.trusted_proxies)
    _check_request_id_header(config.request_id_header)
    for name, upstream in config.upstreams.items():
        where = _key_path("upstreams", name)
        _check_name(where, "upstream", name)
        _check_upstream(where, upstream)
    _check_routes(config)


def _check_listen(listen: list[str]) -> None:
    if not listen:
        raise ConfigError('listen: at least one address is required, such as ["0.0.0.0:8080"]')
    seen: dict[tuple[str, int], int] = {}
    for i, address in enumerate(listen):
        try:
            host, port = parse_listen_address(address)
        except ValueError as exc:
            raise ConfigError(f"listen[{i}]: {exc}") from None
        # Compare parsed addresses, so "[::0]:80" is seen to equal "[::]:80".
        key = (host if host == "localhost" else ipaddress.ip_address(host).compressed, port)
        if key in seen:
            raise ConfigError(
                f"listen[{i}]: duplicate address {show_value(address)} (same as listen[{seen[key]}]): remove one"
            )
        seen[key] = i


def parse_listen_address(address: str) -> tuple[str, int]:
    """Split `host:port` or `[v6]:port` into (host, port), or raise ValueError if it is invalid.

    The host is an IP address or `localhost`, because a listener binds to a
    local address and never resolves other names.
    """
    match = re.fullmatch(r"\[(?P<v6>[^\]]+)\]:(?P<port>[0-9]+)|(?P<v4>[^:\[\]]+):(?P<port4>[0-9]+)", address)
    if match is None:
        raise ValueError(
            f'invalid address {show_value(address)}: expected "host:port" or "[ipv6]:port", such as "0.0.0.0:8080"'
        )
    host = match.group("v6") or match.group("v4")
    port = int(match.group("port") or match.group("port4"))
    if not 0 <= port <= 65535:
        raise ValueError(f"invalid address {show_value(address)}: port {port} is outside 0-65535")
    if host != "localhost" and not _is_ip_address(host):
        raise ValueError(
            f"invalid address {show_value(address)}: {show_value(host)} is not an IP address "
            "(use 0.0.0.0 or [::] for all addresses)"
        )
    if match.group("v6") and ":" not in host:
        raise ValueError(f'invalid address {show_value(address)}: brackets are for IPv6 only, write "{host}:{port}"')
    return host, port


def _is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _check_workers(workers: int | str) -> None:
    if isinstance(workers, int) and workers < 1:
        raise ConfigError(f'workers: invalid value {workers}: expected a positive integer or "auto"')


def _check_limits(limits: Limits) -> None:
    # A zero max_body is allowed: it rejects every request that has a body.
    _check_positive("limits.header_timeout", limits.header_timeout)
    _check_positive("limits.body_timeout", limits.body_timeout)


def _check_positive(where: str, seconds: float) -> None:
    if seconds <= 0:
        raise ConfigError(f"{where}: invalid duration 0s: must be greater than 0, such as 1s")


def _check_trusted_proxies(networks: list[str]) -> None:
    for i, network in enumerate(networks):
        # Host bits are ignored (10.0.0.1/8 is 10.0.0.0/8), as nexus.headers does.
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise ConfigError(
                f"trusted_proxies[{i}]: invalid network {show_value(network)}: "
                'expected an IP address or a CIDR network such as "10.0.0.0/8"'
            ) from None


# A header or cookie name: an HTTP token (RFC 9110 section 5.6.2).
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _check_header_name(where: str, name: str) -> None:
    if not _TOKEN.fullmatch(name):
        raise ConfigError(
            f"{where}: invalid header name {show_value(name)}: use only letters, digits and "
            "!#$%&'*+-.^_`|~, such as \"x-request-id\""
        )


# Fields that the gateway removes, sets or rewrites itself, so a request id
# stored in one of them would be lost or would break the message.
_RESERVED_HEADERS = frozenset(
    {
        "connection",
        "content-length",
        "forwarded",
        "host",
        "keep-alive",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "via",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
    }
)


def _check_request_id_header(name: str) -> None:
    _check_header_name("request_id_header", name)
    if name.lower() in _RESERVED_HEADERS:
        raise ConfigError(
            f'request_id_header: invalid header name {show_value(name)}: the gateway sets or removes this header '
            'itself, so choose another, such as "x-request-id"'
        )


# Upstream and route names become metric labels and log ids.
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def _check_name(where: str, kind: str, name: str) -> None:
    if not _NAME.fullmatch(name):
        raise ConfigError(
            f'{where}: invalid {kind} name {show_value(name)}: use only letters, digits, "_", "." and "-", '
            "because names become metric labels and log ids"
        )


def _check_upstream(where: str, upstream: Upstream) -> None:
    _check_targets(f"{where}.targets", upstream.target_list())
    _check_hashing(where, upstream)
    if upstream.health is not None:
        _check_health(f"{where}.health", upstream.health)
    _check_positive(f"{where}.passive.eject_for", upstream.passive.eject_for)
    _check_timeouts(f"{where}.timeouts", upstream.timeouts)
    for i, condition in enumerate(upstream.retries.on):
        if isinstance(condition, int) and not 500 <= condition <= 599:
            raise ConfigError(
                f"{where}.retries.on[{i}]: invalid status {condition}: only 5xx statuses can be retried, such as 503"
            )


def _check_targets(where: str, targets: list[Target]) -> None:
    if not targets:
        raise ConfigError(f'{where}: at least one target is required, such as ["http://10.0.0.5:8000"]')
    seen: dict[tuple[str, int], int] = {}
    for i, target in enumerate(targets):
        problem = _target_url_problem(target.url)
        if problem:
            raise ConfigError(f"{where}[{i}]: {problem}")
        parts = urlsplit(target.url)
        key = (parts.hostname or "", parts.port or 0)
        if key in seen:
            raise ConfigError(
                f"{where}[{i}]: duplicate target {show_value(target.url)} (same as targets[{seen[key]}]): "
                "remove one, or raise its weight"
            )
        seen[key] = i


def _target_url_problem(url: str) -> str | None:
    """Return why `url` is not a usable target (http://host:port), or None if it is."""
    example = 'such as "http://10.0.0.5:8000"'
    try:
        parts = urlsplit(url)
    except ValueError:
        # urlsplit raises for a malformed network location, such as an unbalanced IPv6 bracket.
        return f"invalid target {show_value(url)}: expected an http:// URL {example}"
    try:
        port = parts.port
    except ValueError:
        return f"invalid target {show_value(url)}: the port must be a number from 1 to 65535, {example}"

    if "://" not in url:
        return f'invalid target {show_value(url)}: expected an http:// URL, such as "http://{url}"'
    if parts.scheme != "http":
        return f"invalid target {show_value(url)}: only http:// targets are supported, {example}"
    if not parts.hostname or port is None or port == 0:
        return f"invalid target {show_value(url)}: a host and a port from 1 to 65535 are required, {example}"
    if parts.username is not None:
        return f"invalid target {show_value(url)}: credentials in a target URL are not supported"
    if parts.path not in ("", "/") or parts.query or parts.fragment or url.endswith(("?", "#")):
        return (
            f"invalid target {show_value(url)}: a target has no path or query "
            "(use the route's add_prefix for a path)"
        )
    return None


_HASH_KEYS = ("client_ip", "path")
_HASH_SOURCES = ("header", "cookie")


def _check_hashing(where: str, upstream: Upstream) -> None:
    if upstream.balance == "maglev" and upstream.hash_on is None:
        raise ConfigError(
            f'{where}.hash_on: missing, but required when balance is "maglev": '
            'set it to a hashing key such as "header:x-user-id" or "client_ip"'
        )
    if upstream.hash_on is not None and upstream.balance != "maglev":
        # Only maglev hashes, so a hash_on on another balancer would be ignored.
        raise ConfigError(
            f'{where}.hash_on: only used when balance is "maglev" (balance is "{upstream.balance}"): '
            "set balance: maglev or remove hash_on"
        )
    if upstream.hash_on is not None:
        problem = _hash_on_problem(upstream.hash_on)
        if problem:
            raise ConfigError(f"{where}.hash_on: {problem}")
    if not math.isfinite(upstream.hash_balance_factor):
        raise ConfigError(
            f"{where}.hash_balance_factor: invalid value {upstream.hash_balance_factor}: "
            "expected a finite number of at least 1"
        )


def _hash_on_problem(hash_on: str) -> str | None:
    """Return why `hash_on` is not a valid hashing key, or None if it is."""
    if hash_on in _HASH_KEYS:
        return None
    kind, _, name = hash_on.partition(":")
    if kind in _HASH_SOURCES and _TOKEN.fullmatch(name):
        return None
    return (
        f'invalid value {show_value(hash_on)}: expected "header:NAME", "cookie:NAME", "client_ip" or "path", '
        'such as "header:x-user-id"'
    )


def _check_health(where: str, health: HealthCheck) -> None:
    # The path goes into the probe's request line as written.
    if not health.path.startswith("/") or any(char.isspace() or not char.isprintable() for char in health.path):
        raise ConfigError(
            f'{where}.path: invalid path {show_value(health.path)}: must start with "/" and contain no spaces, '
            'such as "/healthz"'
        )
    _check_positive(f"{where}.interval", health.interval)
    _check_positive(f"{where}.timeout", health.timeout)
    if health.timeout > health.interval:
        raise ConfigError(
            f"{where}.timeout: {_show_seconds(health.timeout)} is longer than the interval "
            f"({_show_seconds(health.interval)}): use a timeout of at most the interval"
        )


def _check_timeouts(where: str, timeouts: Timeouts) -> None:
    _check_positive(f"{where}.connect", timeouts.connect)
    _check_positive(f"{where}.response_header", timeouts.response_header)
    _check_positive(f"{where}.total", timeouts.total)
    if timeouts.total < timeouts.connect:
        raise ConfigError(
            f"{where}.total: {_show_seconds(timeouts.total)} is shorter than timeouts.connect "
            f"({_show_seconds(timeouts.connect)}): make total at least as long as connect"
        )


def _show_seconds(seconds: float) -> str:
    """Format a duration as the config file would write it: 250ms, 2s."""
    return f"{seconds * 1000:g}ms" if seconds < 1 else f"{seconds:g}s"


def _check_routes(config: Config) -> None:
    names: dict[str, int] = {}
    conditions: dict[tuple[Any, ...], int] = {}
    defined = ", ".join(sorted(config.upstreams)) or "none"
    for i, route in enumerate(config.routes):
        where = f"routes[{i}]"
        _check_name(f"{where}.name", "route", route.name)
        if route.name in names:
            raise ConfigError(
                f'{where}.name: duplicate route name "{route.name}" (also routes[{names[route.name]}]): '
                "route names must be unique"
            )
        names[route.name] = i
        if route.upstream not in config.upstreams:
            raise ConfigError(f'{where}.upstream: unknown upstream "{route.upstream}" (defined: {defined})')

        _check_match(f"{where}.match", route.match)
        _check_rewrites(where, route)

        # With equal conditions the earlier route always wins, so the later one never matches.
        key = _match_key(route.match)
        if key in conditions:
            first = conditions[key]
            raise ConfigError(
                f'{where}.match: same conditions as routes[{first}] ("{config.routes[first].name}"), '
                "which comes first and always wins: change the conditions or remove one route"
            )
        conditions[key] = i


def _check_match(where: str, match: Match) -> None:
    if match.path is not None and match.path_prefix is not None:
        raise ConfigError(
            f"{where}: path and path_prefix are both set: use path for one exact path or path_prefix for a subtree"
        )
    for key in ("path", "path_prefix"):
        value = getattr(match, key)
        if value is not None and not value.startswith("/"):
            raise ConfigError(f'{where}.{key}: invalid path {show_value(value)}: must start with "/", such as "/v1"')
    hosts = [match.host] if isinstance(match.host, str) else match.host or []
    for i, host in enumerate(hosts):
        problem = _host_problem(host)
        if problem:
            raise ConfigError(f"{where}.host{'' if isinstance(match.host, str) else f'[{i}]'}: {problem}")
    for i, method in enumerate(match.methods or []):
        if method not in _METHODS:
            if method.upper() in _METHODS:
                fix = f'write it in upper case: "{method.upper()}"'
            else:
                fix = f"use one of {', '.join(_METHODS)}"
            raise ConfigError(f"{where}.methods[{i}]: unknown method {show_value(method)}: {fix}")
    _check_match_headers(f"{where}.headers", match.headers)


# A host name: labels of letters, digits, "-" and "_", with one optional
# trailing dot.
_HOST_NAME = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.?")


def _host_problem(host: str) -> str | None:
    """Return why `host` is not a valid route host, or None if it is."""
    name = host.removeprefix("*.")
    if "*" in name:
        return (
            f'invalid host {show_value(host)}: a wildcard is only allowed as a leading "*.", '
            'such as "*.example.com" (leave host unset to match any host)'
        )
    if _HOST_NAME.fullmatch(name):
        return None
    try:
        # The router also accepts an IPv6 address, with or without brackets.
        ipaddress.IPv6Address(name[1:-1] if name.startswith("[") and name.endswith("]") else name)
        return None
    except ValueError:
        pass
    if ":" in name:
        return f"invalid host {show_value(host)}: a route host has no port, such as \"api.example.com\""
    return f'invalid host {show_value(host)}: expected a host name such as "api.example.com" or "*.example.com"'


def _check_match_headers(where: str, headers: dict[str, str]) -> None:
    seen: dict[str, str] = {}
    for name in headers:
        _check_header_name(_key_path(where, name), name)
        # Header names are case-insensitive: two spellings are two conditions
        # on one header.
        if name.lower() in seen:
            raise ConfigError(
                f'{_key_path(where, name)}: duplicate header "{name}" (same as "{seen[name.lower()]}"): '
                "header names are case-insensitive, keep one"
            )
        seen[name.lower()] = name


def _check_rewrites(where: str, route: Route) -> None:
    for key in ("strip_prefix", "add_prefix"):
        value = getattr(route, key)
        if value is not None and (not value.startswith("/") or value.endswith("/") and value != "/"):
            raise ConfigError(
                f'{where}.{key}: invalid prefix {show_value(value)}: must start with "/" and not end with "/", '
                'such as "/v1"'
            )


def _match_key(match: Match) -> tuple[Any, ...]:
    """Return what the router compares of a route's conditions, for spotting duplicates."""
    hosts = [match.host] if isinstance(match.host, str) else match.host or []
    return (
        frozenset(host.lower().removesuffix(".") for host in hosts),
        match.path,
        match.path_prefix,
        frozenset(match.methods or ()),
        frozenset((name.lower(), value) for name, value in match.headers.items()),
    )
