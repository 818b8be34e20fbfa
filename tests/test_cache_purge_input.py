"""Checks of `nexusctl purge` input: option conflicts, and URLs and tags that could never match an entry.

The CLI cases run the installed nexusctl against a socket path with no
master: each must fail as a usage error before any request is sent.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from admin_support import run_nexusctl, temporary_socket_dir

from nexus.cache.invalidation import check_purge_value


@pytest.fixture
def absent_socket() -> Iterator[str]:
    with temporary_socket_dir() as directory:
        yield str(Path(directory) / "admin.sock")


@pytest.mark.parametrize(
    ("kind", "value", "message"),
    [
        ("tag", "", "invalid purge tag: it is empty"),
        ("url", "", "invalid purge URL: it is empty"),
        ("tag", "a b", "invalid purge tag 'a b': it contains white space (' ')"),
        ("tag", "a\tb", "invalid purge tag 'a\\tb': it contains white space ('\\t')"),
        ("tag", "a,b", "Surrogate-Key and Cache-Tag separate tags with commas"),
        ("url", "/products/1 2", "invalid purge URL '/products/1 2': it contains white space"),
        ("url", "/p\x01", "invalid purge URL '/p\\x01': it contains a non-printable character ('\\x01')"),
        ("prefix", "/p\x7f/", "invalid purge prefix '/p\\x7f/': it contains a non-printable character"),
        ("url", "/caf\u00e9", "it contains a non-ASCII character"),
        ("url", "products/1", "expected http://host/path or a path starting with /"),
    ],
)
def test_check_purge_value_rejects(kind: str, value: str, message: str) -> None:
    with pytest.raises(ValueError) as error:
        check_purge_value(kind, value)
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("kind", "value"),
    [("url", "/products/1?a=1"), ("url", "http://127.0.0.1:18080/p%20q"), ("prefix", "/img/"), ("tag", "product-1")],
)
def test_check_purge_value_accepts(kind: str, value: str) -> None:
    check_purge_value(kind, value)


@pytest.mark.parametrize("args", [["--prefix", "--tag", "x"], ["--tag", "--prefix", "/x"]])
def test_purge_prefix_and_tag_exclusive(absent_socket: str, args: list[str]) -> None:
    result = run_nexusctl("purge", *args, "--socket", absent_socket)
    assert result.returncode == 2, result.stderr
    assert "--prefix and --tag exclude each other" in result.stderr


def test_purge_flag_without_target(absent_socket: str) -> None:
    result = run_nexusctl("purge", "--tag", "--socket", absent_socket)
    assert result.returncode == 2, result.stderr
    assert "Missing argument 'TARGET'" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tag", ""], "invalid purge tag: it is empty"),
        (["--tag", "a b"], "invalid purge tag 'a b'"),
        (["/products/1 2"], "invalid purge URL '/products/1 2'"),
        (["/p\x01"], "invalid purge URL '/p\\x01'"),
    ],
)
def test_purge_invalid_value_is_usage_error(absent_socket: str, args: list[str], message: str) -> None:
    result = run_nexusctl("purge", *args, "--socket", absent_socket)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "\x01" not in result.stderr
    assert "master not running" not in result.stderr
