"""A cache sized beyond the machine's memory starts, with a warning that names the setting to lower."""

from __future__ import annotations

import pytest

from tests.conftest import admin_socket_dir
from tests.e2e.obs_support import obs_config, request

pytestmark = pytest.mark.e2e


def test_oversized_cache_warns(tmp_path, upstream_factory, gateway_factory):
    upstream = upstream_factory("app")
    config = obs_config(upstream.url, admin_socket_dir(tmp_path) / "a.sock", metrics=False, extra="shared_memory: {cache_size: 64TiB}\n")
    gateway = gateway_factory(config, workers=1)

    assert request(gateway.url, path="/status/200") == 200
    assert "larger than this machine's" in gateway.log()
    assert "shared_memory.cache_size" in gateway.log()
