"""The YAML 1.2 loader, and YAML error messages that give the position of the problem."""

from __future__ import annotations

import re
from typing import Any

import yaml

from nexus.config.decode import _kind_of
from nexus.config.model import ConfigError
from nexus.units import show_value


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
        raw = yaml.load(text, Loader=_Yaml12Loader)
    except yaml.MarkedYAMLError as exc:
        where = _describe_mark(exc.problem_mark)
        raise ConfigError(f"{source}: invalid YAML{where}: {_yaml_problem(exc)}") from None
    except yaml.reader.ReaderError as exc:
        where = _reader_error_place(text, exc)
        raise ConfigError(f"{source}: invalid YAML{where}: {_reader_error_problem(exc)}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: {exc}") from None

    if raw is None:
        # An empty file is far more often a truncated or half-written one than
        # a wish for the defaults (every interface, port 8080, no routes), and
        # a reload must never swap a working config for it.
        raise ConfigError(
            f"{source}: the config is empty (no keys, or only comments): give at least upstreams and routes, "
            "as in examples/quickstart.yaml"
        )
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
