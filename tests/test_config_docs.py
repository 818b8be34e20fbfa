"""docs/config.md against the config structs: every key documented, every example valid.

The reference has one `## ` section per struct reachable from Config, titled
with the YAML path of the struct in backticks (`upstreams.<name>.health`),
except the top level, titled "Top-level keys". Each key of a struct is a
`### ` heading in backticks inside its section.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import msgspec
import msgspec.inspect as mi
import pytest

from nexus.config import Config, load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "config.md"
TOP_LEVEL_TITLE = "Top-level keys"


def struct_sections(info: mi.StructType, path: str) -> Iterator[tuple[str, mi.StructType]]:
    """Yield (YAML path, struct) for `info` and every struct below it, depth first in field order."""
    yield path, info
    for field in info.fields:
        field_path = f"{path}.{field.encode_name}" if path else field.encode_name
        for suffix, child in nested_structs(field.type):
            yield from struct_sections(child, field_path + suffix)


def nested_structs(info: mi.Type, suffix: str = "") -> Iterator[tuple[str, mi.StructType]]:
    """Yield the structs a field's type contains, with the path suffix that reaches each."""
    if isinstance(info, mi.Metadata):
        yield from nested_structs(info.type, suffix)
    elif isinstance(info, mi.UnionType):
        for member in info.types:
            yield from nested_structs(member, suffix)
    elif isinstance(info, mi.ListType):
        yield from nested_structs(info.item_type, suffix + "[]")
    elif isinstance(info, mi.DictType):
        yield from nested_structs(info.value_type, suffix + ".<name>")
    elif isinstance(info, mi.StructType):
        yield suffix, info


SECTIONS = list(struct_sections(mi.type_info(Config), ""))


def documented_sections() -> dict[str, list[str]]:
    """Return each `## ` section of the docs, by YAML path, with its `### ` keys in order."""
    sections: dict[str, list[str]] = {}
    keys: list[str] = []
    for line in DOCS.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            title = line[3:].strip()
            code = re.match(r"`([^`]+)`", title)
            if title == TOP_LEVEL_TITLE:
                path = ""
            elif code:
                path = code.group(1)
            else:
                path = title
            keys = sections.setdefault(path, [])
        elif line.startswith("### ") and (key := re.fullmatch(r"### `([^`]+)`", line.strip())):
            keys.append(key.group(1))
    return sections


def section_id(path: str) -> str:
    return path or "top-level"


def test_walk_finds_every_struct() -> None:
    # Guards the walk itself: if it missed nested structs, the tests below
    # would pass on an empty list.
    paths = [path for path, _info in SECTIONS]
    assert "" in paths
    assert "upstreams.<name>.targets[]" in paths
    assert "upstreams.<name>.health" in paths
    assert "routes[].match" in paths


@pytest.mark.parametrize(("path", "info"), SECTIONS, ids=[section_id(path) for path, _ in SECTIONS])
def test_section_documents_every_key(path: str, info: mi.StructType) -> None:
    sections = documented_sections()
    assert path in sections, f"docs/config.md has no section for {section_id(path)}"
    documented = sections[path]
    fields = [field.encode_name for field in info.fields]
    assert sorted(set(fields) - set(documented)) == [], "keys missing from the docs"
    assert sorted(set(documented) - set(fields)) == [], "documented keys that the struct does not have"
    assert documented == fields, "keys are documented out of struct order"


def test_sections_follow_struct_order() -> None:
    documented = [path for path in documented_sections() if path in dict(SECTIONS)]
    assert documented == [path for path, _info in SECTIONS]


def full_example() -> str:
    """Return the YAML block under the "## Full example" heading."""
    text = DOCS.read_text(encoding="utf-8")
    match = re.search(r"^## Full example\n.*?^```yaml\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    assert match is not None, 'docs/config.md has no "## Full example" section with a yaml block'
    return match.group(1)


def test_full_example_parses() -> None:
    config = parse_config(full_example(), source="docs/config.md")
    assert config.upstreams
    assert config.routes


def test_full_example_shows_optional_features() -> None:
    # The example is the one place that shows the optional parts together.
    config = parse_config(full_example(), source="docs/config.md")
    upstreams = list(config.upstreams.values())
    assert any(upstream.health is not None for upstream in upstreams)
    assert any(upstream.balance == "maglev" for upstream in upstreams)
    assert any(any(not isinstance(target, str) for target in upstream.targets) for upstream in upstreams)
    assert any(route.match.headers for route in config.routes)
    assert msgspec.structs.asdict(config.limits) != msgspec.structs.asdict(type(config.limits)())


def test_example_files_parse() -> None:
    # One test over all files, so that having no examples yet is a pass and
    # not a skipped test.
    failures = {}
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        try:
            load_config(path)
        except Exception as exc:  # noqa: BLE001 - report every file's error at once
            failures[path.name] = str(exc)
    assert failures == {}
