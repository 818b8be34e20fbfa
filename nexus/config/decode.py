"""Conversion of parsed YAML into structs, and msgspec errors rewritten as plain sentences."""

from __future__ import annotations

import difflib
import re
import types
from typing import Annotated, Any, Literal, NamedTuple, Union, get_args, get_origin

import msgspec
from msgspec.structs import FieldInfo

from nexus.config.model import _UNIT_PARSERS, Config, ConfigError, Duration, Quota, Rate, Ratio, Size
from nexus.units import show_value


def _decode_units(type_: type, value: Any) -> Any:
    parser = _UNIT_PARSERS.get(type_)
    if parser is None:
        raise NotImplementedError(type_)
    parsed = parser(value)
    return parsed if isinstance(parsed, type_) else type_(parsed)


def _convert(raw: dict[Any, Any]) -> Config:
    """Convert parsed YAML into a Config, turning msgspec errors into ConfigErrors."""
    try:
        return msgspec.convert(raw, Config, dec_hook=_decode_units)
    except msgspec.ValidationError as exc:
        raise ConfigError(_explain(raw, Config, str(exc), _KeyPath())) from None


def convert_section(raw: Any, type_: type, name: str) -> Any:
    """Convert one top-level section `name` of parsed YAML alone, with the same messages as `_convert`."""
    try:
        return msgspec.convert(raw, type_, dec_hook=_decode_units)
    except msgspec.ValidationError as exc:
        raise ConfigError(_explain(raw, type_, str(exc), _KeyPath().field(name))) from None


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
    if value is not None and _unit_type(type_) is not None:
        # The unit parsers' messages already show the value and an example.
        return f"{where.path}: {problem}"

    expected = _EXPECTED.get(where.pattern) or _describe(type_)
    if value is None:
        hint = " (or remove the key to use the default)" if field is not None and not field.required else ""
        return f"{where.path}: missing value: expected {expected}{hint}"
    if isinstance(value, (list, dict)):
        return f"{where.path}: expected {expected}, found {_kind_of(value)}"
    return f"{where.path}: invalid value {show_value(value)}: expected {expected}"


def _unit_type(type_: Any) -> type | None:
    """Return the unit type (Duration, Rate, ...) that `type_` is, or is optionally."""
    base = _strip_meta(type_)[0]
    if _is_union(base):
        members = [member for member in get_args(base) if member is not type(None)]
        base = members[0] if len(members) == 1 else None
    return base if base in _UNIT_PARSERS else None


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
    Rate: ("a rate such as 100/s or 30/min", "rates"),
    Quota: ("a quota such as 300/min or 10000/day", "quotas"),
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
        return f"{noun} from {_number(bounds['ge'])} to {_number(bounds['le'])}"
    words = {"ge": "of at least", "gt": "greater than", "le": "of at most", "lt": "less than"}
    parts = [f"{words[name]} {_number(value)}" for name, value in bounds.items()]
    return f"{noun} {' and '.join(parts)}" if parts else noun


def _number(value: float) -> str:
    """Write a bound in full: 67108864, not 6.71089e+07."""
    return str(value) if isinstance(value, int) else f"{value:g}"


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
