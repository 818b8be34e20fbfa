"""A reload that adds Redis moves the cache's purges to it at once.

Workers of the new generation read and write L2 in the new Redis, so a
purge through the admin API right after the reload must delete there too,
or the next request would get the purged response back from L2.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from nexus.admin.client import AdminClient
from tests.conftest import wait_for
from tests.e2e.cache_support import origin, socket_dir  # noqa: F401 - fixtures
from tests.e2e.proxy_support import send
from tests.redis_support import redis_server_factory  # noqa: F401 - fixture

pytestmark = pytest.mark.e2e




def _config(upstream_url: str, admin_socket: Path, redis_url: str | None = None) -> str:
    text = f"""
listen: ["127.0.0.1:0"]
workers: 2
admin: {{socket: "{admin_socket}", metrics: null}}
upstreams:
  app: {{targets: ["{upstream_url}"]}}
routes:
  - {{name: cached, upstream: app, cache: {{}}}}
"""
    if redis_url is not None:
        text += f'redis: {{url: "{redis_url}", key_prefix: "cachereload"}}\ncache: {{l2: true}}\n'
    return text


def test_reload_adding_redis_purges_through_it(origin, gateway_factory, socket_dir, redis_server_factory):
    redis = redis_server_factory()
    sock = socket_dir / "a.sock"
    gateway = gateway_factory(_config(origin.url, sock))
    admin = AdminClient(str(sock), timeout=30)

    gateway.config_path.write_text(_config(origin.url, sock, redis.url))
    generation = admin.call("POST", "/reload")["generation"]
    assert generation == 2

    # Old workers accept for a moment while they drain, and they have no L2.
    def only_new_workers() -> bool:
        workers = admin.call("GET", "/status")["workers"]
        return [worker["generation"] for worker in workers] == [2, 2]

    wait_for(only_new_workers, 10, message="the first generation to be gone")

    origin.respond("/item", headers=[("Cache-Control", "max-age=60")])
    send(gateway.url, "/item")

    def stored() -> list[bytes]:
        return redis.client().keys("cachereload:cache:/item*")

    wait_for(stored, 5, message="the background L2 write")

    result = admin.call("POST", "/cache/purge", body={"prefix": "/item"})
    assert result["nodes"] == "all", result
    assert stored() == []
    reply = send(gateway.url, "/item")
    assert "hit" not in (reply.header("cache-status") or ""), reply.headers
