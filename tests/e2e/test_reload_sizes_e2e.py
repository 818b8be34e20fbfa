"""A reload that changes shared_memory sizes warns that they wait for a restart, and one that restores them does not."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import admin_socket_dir
from tests.e2e.obs_support import obs_config

pytestmark = pytest.mark.e2e

NEXUSCTL = [sys.executable, "-c", "from nexus.cli import nexusctl; nexusctl()"]
WARNING = "shared_memory sizes differ from those in effect"


def nexusctl(verb: str, socket) -> str:
    """Run `nexusctl VERB --socket SOCKET`, expect success, and return its stderr."""
    result = subprocess.run([*NEXUSCTL, verb, "--socket", str(socket)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stderr


def reload(socket) -> None:
    nexusctl("reload", socket)


def test_size_warning_follows_sizes_in_effect(tmp_path, upstream_factory, gateway_factory):
    upstream = upstream_factory("app")
    socket = admin_socket_dir(tmp_path) / "a.sock"
    base = obs_config(upstream.url, socket, metrics=False)
    gateway = gateway_factory(base, workers=1)

    gateway.config_path.write_text(base + "shared_memory: {cache_size: 32MiB}\n")
    reload(socket)
    assert gateway.log().count(WARNING) == 1

    # Back to the sizes the tables were made with: nothing to warn about.
    gateway.config_path.write_text(base)
    reload(socket)
    assert gateway.log().count(WARNING) == 1


def test_upgrade_keeps_the_sizes_in_effect(tmp_path, upstream_factory, gateway_factory):
    # An upgrade maps the old master's segments, so their sizes stay in
    # effect whatever sizes the new master's config sets.
    upstream = upstream_factory("app")
    socket = admin_socket_dir(tmp_path) / "a.sock"
    base = obs_config(upstream.url, socket, metrics=False)
    gateway = gateway_factory(base, workers=1)

    gateway.config_path.write_text(base + "shared_memory: {cache_size: 32MiB}\n")
    assert f"nexusctl: warning: {WARNING}" in nexusctl("upgrade", socket)
    assert "on upgrade" in gateway.log()
    assert f"nexusctl: warning: {WARNING}" in nexusctl("reload", socket)

    # The new master took over the 64 MiB default as the size in effect.
    gateway.config_path.write_text(base)
    assert WARNING not in nexusctl("reload", socket)
