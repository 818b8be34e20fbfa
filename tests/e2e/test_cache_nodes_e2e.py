"""Coalescing, purges, L2 and cross-node invalidation through real gateways, a real upstream and real Redis."""

from __future__ import annotations

import asyncio
import http.client
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nexus.admin.client import AdminClient
from tests.conftest import ROOT, wait_for
from tests.e2e.cache_support import TcpRelay, origin, socket_dir  # noqa: F401 - fixtures
from tests.e2e.proxy_support import host_port, send
from tests.redis_support import redis_cluster, redis_server_factory  # noqa: F401 - fixtures

pytestmark = pytest.mark.e2e




def _config(
    upstream_url: str,
    admin_socket: Path,
    redis_url: str | None = None,
    cache: str = "{}",
    node: str = "",
    extra: str = "",
    cluster: list[str] | None = None,
) -> str:
    redis = ""
    if redis_url is not None or cluster is not None:
        where = f'url: "{redis_url}"' if cluster is None else f"cluster: {json.dumps(cluster)}"
        redis = f'redis: {{{where}, key_prefix: "cachetest", node_id: "{node}"}}\ncache: {{l2: true{extra}}}\n'
    return f"""
listen: ["127.0.0.1:0"]
workers: 2
admin: {{socket: "{admin_socket}", metrics: null}}
upstreams:
  app: {{targets: ["{upstream_url}"]}}
routes:
  - {{name: cached, upstream: app, cache: {cache}}}
{redis}"""


def _status(reply) -> str:
    return reply.header("cache-status") or ""


def _get(url: str, path: str, only_if_cached: bool = False):
    """GET with one Host for every node, as behind a load balancer: the host is part of the cache key."""
    headers = [("Host", "api.example")]
    if only_if_cached:
        headers.append(("Cache-Control", "only-if-cached"))
    return send(url, path, headers=headers)


def test_stampede_200_requests_one_upstream_request(origin, gateway_factory, socket_dir):
    gateway = gateway_factory(_config(origin.url, socket_dir / "a.sock"), workers=2)
    origin.respond("/cold", headers=[("Cache-Control", "max-age=60")], body=b"x" * 1000, delay=0.3)
    host, port = host_port(gateway.url)

    async def one() -> int:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET /cold HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        data = await reader.read()
        writer.close()
        return int(data.split(b" ", 2)[1])

    async def all_at_once() -> list[int]:
        return await asyncio.gather(*(one() for _ in range(200)))

    statuses = asyncio.run(all_at_once())
    assert statuses == [200] * 200
    assert origin.count("/cold") == 1


def test_stale_entry_revalidated_once(origin, gateway_factory, socket_dir):
    gateway = gateway_factory(_config(origin.url, socket_dir / "a.sock"), workers=2)
    origin.respond("/stale", headers=[("Cache-Control", "max-age=1"), ("ETag", '"v1"')], body=b"x" * 1000)
    assert _get(gateway.url, "/stale").status == 200
    time.sleep(1.2)
    # The origin now takes 300 ms to respond: without coalescing, every
    # request below would send its own conditional request meanwhile.
    origin.respond("/stale", headers=[("Cache-Control", "max-age=60"), ("ETag", '"v1"')], body=b"x" * 1000, delay=0.3)
    host, port = host_port(gateway.url)

    async def one() -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET /stale HTTP/1.1\r\nHost: api.example\r\nConnection: close\r\n\r\n")
        data = await reader.read()
        writer.close()
        return int(data.split(b" ", 2)[1]), data.partition(b"\r\n\r\n")[2]

    async def all_at_once() -> list[tuple[int, bytes]]:
        return await asyncio.gather(*(one() for _ in range(100)))

    replies = asyncio.run(all_at_once())
    assert [status for status, _ in replies] == [200] * 100
    assert all(body == b"x" * 1000 for _, body in replies)
    assert origin.count("/stale") == 2
    assert "if-none-match" in origin.last("/stale").headers


def _concurrent_gets(url: str, path: str, count: int) -> list[tuple[int, bytes]]:
    """Send `count` GETs for `path` at once on new connections; return (status, Cache-Status) of each."""
    host, port = host_port(url)

    async def one() -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: api.example\r\nConnection: close\r\n\r\n")
        data = await reader.read()
        writer.close()
        head = data.partition(b"\r\n\r\n")[0].lower()
        status_line = head.split(b"\r\n")[0]
        cache_status = next((line.split(b":", 1)[1].strip() for line in head.split(b"\r\n") if line.startswith(b"cache-status:")), b"")
        return int(status_line.split(b" ")[1]), cache_status

    async def all_at_once() -> list[tuple[int, bytes]]:
        return await asyncio.gather(*(one() for _ in range(count)))

    return asyncio.run(all_at_once())


def test_stale_on_arrival_still_collapses(origin, gateway_factory, socket_dir):
    gateway = gateway_factory(_config(origin.url, socket_dir / "a.sock"), workers=2)
    # The upstream takes longer than the freshness lifetime, so every
    # response is stale when it arrives; waiters must use it anyway.
    origin.respond("/slow-short", headers=[("Cache-Control", "max-age=1")], body=b"s", delay=1.2)
    replies = _concurrent_gets(gateway.url, "/slow-short", 20)
    assert [status for status, _ in replies] == [200] * 20
    assert origin.count("/slow-short") == 1


def test_too_large_response_not_claimed_stored(origin, gateway_factory, socket_dir):
    gateway = gateway_factory(_config(origin.url, socket_dir / "a.sock", cache="{max_object: 1KiB}"), workers=2)
    origin.respond("/big", headers=[("Cache-Control", "max-age=60")], body=b"x" * 5000, delay=0.3)
    replies = _concurrent_gets(gateway.url, "/big", 10)
    assert [status for status, _ in replies] == [200] * 10
    assert all(b"stored" not in status for _, status in replies)
    assert any(b"detail=too-large" in status for _, status in replies)
    assert "stored" not in _status(_get(gateway.url, "/big"))
    assert origin.count("/big") == 11


def test_overflowing_max_age_is_capped(origin, gateway_factory, socket_dir):
    gateway = gateway_factory(_config(origin.url, socket_dir / "a.sock"))
    origin.respond("/forever", headers=[("Cache-Control", "max-age=99999999999999999999999")], body=b"f")
    assert "stored" in _status(_get(gateway.url, "/forever"))
    assert "hit" in _status(_get(gateway.url, "/forever"))
    assert "Traceback" not in gateway.log()


def test_coalesce_timeout_then_upstream(origin, gateway_factory, socket_dir):
    gateway = gateway_factory(_config(origin.url, socket_dir / "a.sock", cache="{coalesce_timeout: 100ms}"))
    origin.respond("/slow", headers=[("Cache-Control", "max-age=60")], delay=1.0)
    host, port = host_port(gateway.url)

    async def one() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET /slow HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        await reader.read()
        writer.close()

    async def two() -> None:
        first = asyncio.ensure_future(one())
        await asyncio.sleep(0.2)
        await asyncio.gather(first, one())

    asyncio.run(two())
    # The second waited 100 ms for the first's fill, then went upstream itself.
    assert origin.count("/slow") == 2


def test_purge_url_prefix_tag_soft(origin, gateway_factory, socket_dir):
    sock = socket_dir / "a.sock"
    url = gateway_factory(_config(origin.url, sock, cache="{stale_while_revalidate: 30s}")).url
    admin = AdminClient(str(sock))
    for path in ("/p/1", "/p/2", "/other", "/t"):
        origin.respond(path, headers=[("Cache-Control", "max-age=60"), ("Surrogate-Key", "red blue")])
        send(url, path)
        assert "hit" in _status(send(url, path))

    result = admin.call("POST", "/cache/purge", body={"url": "/p/1"})
    assert result["purged_local"] == 1
    assert "uri-miss" in _status(send(url, "/p/1"))
    assert "hit" in _status(send(url, "/p/2"))

    admin.call("POST", "/cache/purge", body={"prefix": "/p/"})
    assert "uri-miss" in _status(send(url, "/p/2"))
    assert "hit" in _status(send(url, "/other"))

    admin.call("POST", "/cache/purge", body={"tag": "blue"})
    assert "hit" not in _status(send(url, "/other"))
    assert "hit" not in _status(send(url, "/t"))

    # Soft: served stale while it is revalidated in the background.
    assert "hit" in _status(send(url, "/t"))
    admin.call("POST", "/cache/purge", body={"url": "/t", "soft": True})
    before = origin.count("/t")
    stale = send(url, "/t")
    assert "detail=stale" in _status(stale)
    wait_for(lambda: origin.count("/t") == before + 1, 5, message="background revalidation after a soft purge")


def test_purge_bad_request(origin, gateway_factory, socket_dir):
    sock = socket_dir / "a.sock"
    gateway_factory(_config(origin.url, sock))
    from nexus.admin.client import AdminClientError

    with pytest.raises(AdminClientError) as error:
        AdminClient(str(sock)).call("POST", "/cache/purge", body={"url": "ftp://x"})
    assert "invalid purge URL" in str(error.value)

    # White space, control characters and empty values could never match an entry.
    for body, message in [
        ({"tag": ""}, "invalid purge tag: it is empty"),
        ({"tag": "a b"}, "invalid purge tag 'a b': it contains white space"),
        ({"url": "/products/1 2"}, "invalid purge URL '/products/1 2': it contains white space"),
        ({"prefix": "/p\x01"}, "invalid purge prefix '/p\\x01': it contains a non-printable character"),
    ]:
        with pytest.raises(AdminClientError) as error:
            AdminClient(str(sock)).call("POST", "/cache/purge", body=body)
        assert error.value.status == 400, body
        assert message in error.value.message, body


def _two_route_config(upstream_url: str, admin_socket: Path) -> str:
    return f"""
listen: ["127.0.0.1:0"]
workers: 1
admin: {{socket: "{admin_socket}", metrics: null}}
upstreams:
  app: {{targets: ["{upstream_url}"]}}
routes:
  - {{name: cached, upstream: app, match: {{path_prefix: /c/}}, cache: {{}}}}
  - {{name: plain, upstream: app, match: {{path_prefix: /plain/}}}}
"""


def test_purge_reply_names_route(origin, gateway_factory, socket_dir):
    sock = socket_dir / "a.sock"
    url = gateway_factory(_two_route_config(origin.url, sock), workers=1).url
    host, port = host_port(url)
    admin = AdminClient(str(sock))
    origin.respond("/c/1", headers=[("Cache-Control", "max-age=60"), ("Surrogate-Key", "red")])
    send(url, "/c/1")
    assert "hit" in _status(send(url, "/c/1"))

    uncached = admin.call("POST", "/cache/purge", body={"url": "/plain/1"})
    assert uncached["route"] == "plain"
    assert uncached["purged_local"] == 0
    assert uncached["notes"] == ["route plain matches /plain/1 but has no cache section, so it caches nothing"]

    unrouted = admin.call("POST", "/cache/purge", body={"prefix": "/elsewhere/"})
    assert unrouted["route"] is None
    assert "no route without match.host matches GET /elsewhere/" in unrouted["notes"][0]

    # The host of a purge URL is the requests' Host header, port included.
    without_port = admin.call("POST", "/cache/purge", body={"url": f"http://{host}/c/1"})
    assert without_port["route"] == "cached"
    assert without_port["purged_local"] == 0
    assert f"no entry on this node matched the URL on host {host}" in without_port["notes"][0]
    assert "port included" in without_port["notes"][0]
    assert "hit" in _status(send(url, "/c/1"))

    with_port = admin.call("POST", "/cache/purge", body={"url": f"http://{host}:{port}/c/1"})
    assert with_port["purged_local"] == 1
    assert with_port["notes"] == []

    send(url, "/c/1")
    tagged = admin.call("POST", "/cache/purge", body={"tag": "red"})
    assert tagged["purged_local"] is None
    assert "a tag purge has no count" in tagged["notes"][0]
    assert "hit" not in _status(send(url, "/c/1"))


def test_nexusctl_purge_text_notes(origin, gateway_factory, socket_dir):
    sock = socket_dir / "a.sock"
    gateway_factory(_two_route_config(origin.url, sock), workers=1)
    nexusctl = [sys.executable, "-c", "from nexus.cli import nexusctl; nexusctl()", "purge", "--socket", str(sock)]

    result = subprocess.run([*nexusctl, "/plain/1"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "purged url /plain/1 on this node only (no Redis configured), 0 entries on this node",
        "route: plain",
        "note: route plain matches /plain/1 but has no cache section, so it caches nothing",
    ]

    result = subprocess.run([*nexusctl, "--tag", "red"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "purged tag red on this node only (no Redis configured)"
    assert "0 entries" not in result.stdout
    assert "note: a tag purge has no count" in result.stdout


def test_nexusctl_purge(origin, gateway_factory, socket_dir):
    sock = socket_dir / "a.sock"
    url = gateway_factory(_config(origin.url, sock)).url
    origin.respond("/c", headers=[("Cache-Control", "max-age=60")])
    send(url, "/c")
    result = subprocess.run(
        [sys.executable, "-c", "from nexus.cli import nexusctl; nexusctl()", "purge", "/c", "--socket", str(sock), "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert '"purged_local": 1' in result.stdout
    assert "uri-miss" in _status(send(url, "/c"))

    stats = subprocess.run(
        [sys.executable, "-c", "from nexus.cli import nexusctl; nexusctl()", "cache-stats", "--socket", str(sock), "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout)["entries"] == 1


def test_l2_warms_second_node(origin, gateway_factory, socket_dir, redis_server_factory):
    server = redis_server_factory()
    a = gateway_factory(_config(origin.url, socket_dir / "a.sock", server.url, node="a")).url
    b = gateway_factory(_config(origin.url, socket_dir / "b.sock", server.url, node="b")).url
    origin.respond("/l2", headers=[("Cache-Control", "max-age=60")], body=b"shared")
    _get(a, "/l2")
    wait_for(lambda: any(server.client().scan_iter(match=b"cachetest:cache:/l2*")), 5, message="L2 write")
    reply = _get(b, "/l2")
    assert reply.body == b"shared"
    assert "detail=l2" in _status(reply)
    assert "hit" in _status(_get(b, "/l2"))
    assert origin.count("/l2") == 1


def test_l2_copy_follows_freshness_and_request_rules(origin, gateway_factory, socket_dir, redis_server_factory):
    server = redis_server_factory()
    a = gateway_factory(_config(origin.url, socket_dir / "a.sock", server.url, node="a")).url
    b = gateway_factory(_config(origin.url, socket_dir / "b.sock", server.url, node="b")).url
    origin.respond("/short", headers=[("Cache-Control", "max-age=1"), ("ETag", '"s1"')], body=b"short")
    origin.respond("/long", headers=[("Cache-Control", "max-age=600"), ("ETag", '"l1"')], body=b"long")
    _get(a, "/short")
    _get(a, "/long")
    wait_for(lambda: len(list(server.client().scan_iter(match=b"cachetest:cache:*"))) >= 2, 5, message="L2 writes")

    # Expired in L2: node b must revalidate, not serve it as a hit.
    time.sleep(1.5)
    reply = _get(b, "/short")
    assert reply.body == b"short"
    assert "hit" not in _status(reply)
    assert origin.count("/short") == 2
    assert "if-none-match" in origin.last("/short").headers

    # Fresh in L2, but the request requires validation.
    reply = send(b, "/long", headers=[("Host", "api.example"), ("Cache-Control", "no-cache")])
    assert reply.body == b"long"
    assert "hit" not in _status(reply)
    assert origin.count("/long") == 2


def test_l2_down_falls_back_to_upstream(origin, gateway_factory, socket_dir, redis_server_factory):
    server = redis_server_factory()
    url = gateway_factory(_config(origin.url, socket_dir / "a.sock", server.url, node="a")).url
    server.kill()
    origin.respond("/down", headers=[("Cache-Control", "max-age=60")])
    assert _get(url, "/down").status == 200
    assert "hit" in _status(_get(url, "/down"))


def test_purge_reaches_other_node_within_100ms_p99(origin, gateway_factory, socket_dir, redis_server_factory):
    server = redis_server_factory()
    sock_a = socket_dir / "a.sock"
    a = gateway_factory(_config(origin.url, sock_a, server.url, node="a")).url
    b_gateway = gateway_factory(_config(origin.url, socket_dir / "b.sock", server.url, node="b"))
    b = b_gateway.url
    admin = AdminClient(str(sock_a))
    origin.respond("/n", headers=[("Cache-Control", "max-age=600")])
    wait_for(lambda: "cache purge stream connected" in b_gateway.log(), 5, message="node b reading the stream")

    # Poll node b on one keep-alive connection, so the measured time is the
    # purge's propagation and not connection set-up on a busy machine.
    host, port = host_port(b)
    poll = http.client.HTTPConnection(host, port, timeout=5)

    def b_serves_stored() -> bool:
        poll.request("GET", "/n", headers={"Host": "api.example", "Cache-Control": "only-if-cached"})
        response = poll.getresponse()
        response.read()
        return "hit" in (response.getheader("cache-status") or "")

    delays = []
    for _ in range(50):
        _get(b, "/n")
        assert b_serves_stored()
        started = time.monotonic()
        admin.call("POST", "/cache/purge", body={"url": "/n"})
        while b_serves_stored():
            assert time.monotonic() - started < 2, "purge did not reach node b within 2 s"
        delays.append(time.monotonic() - started)
    poll.close()
    delays.sort()
    p99 = delays[int(0.99 * (len(delays) - 1))]
    print(f"purge to other node: p50 {delays[len(delays) // 2] * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms")
    assert p99 < 0.1, f"p99 {p99 * 1000:.1f} ms, delays {[round(d * 1000, 1) for d in delays]}"


def test_unsafe_method_invalidates_other_node(origin, gateway_factory, socket_dir, redis_server_factory):
    server = redis_server_factory()
    a = gateway_factory(_config(origin.url, socket_dir / "a.sock", server.url, node="a")).url
    b_gateway = gateway_factory(_config(origin.url, socket_dir / "b.sock", server.url, node="b"))
    b = b_gateway.url
    origin.respond("/items/7", headers=[("Cache-Control", "max-age=600")])
    origin.respond("/items/8", headers=[("Cache-Control", "max-age=600")])
    wait_for(lambda: "cache purge stream connected" in b_gateway.log(), 5, message="node b reading the stream")
    for path in ("/items/7", "/items/8"):
        _get(b, path)
        assert "hit" in _status(_get(b, path, only_if_cached=True))

    # A write on node a drops the URL from node b's L1 too (RFC 9111 section
    # 4.4 across nodes), and only that URL.
    reply = send(a, "/items/7", method="POST", body=b"new", headers=[("Host", "api.example")])
    assert reply.status == 200
    started = time.monotonic()
    wait_for(
        lambda: "hit" not in _status(_get(b, "/items/7", only_if_cached=True)),
        5,
        message="node b dropping the URL written on node a",
    )
    print(f"unsafe-method invalidation reached node b in {(time.monotonic() - started) * 1000:.0f} ms")
    assert "hit" in _status(_get(b, "/items/8", only_if_cached=True))
    stats = AdminClient(str(socket_dir / "a.sock")).call("GET", "/cache/stats")
    assert stats["invalidations_announced"] >= 1


def test_invalidation_waits_for_redis_to_return(origin, gateway_factory, socket_dir, redis_server_factory):
    server = redis_server_factory()
    relay = TcpRelay(server.port)
    a = gateway_factory(_config(origin.url, socket_dir / "a.sock", f"redis://127.0.0.1:{relay.port}/0", node="a")).url
    b_gateway = gateway_factory(_config(origin.url, socket_dir / "b.sock", server.url, node="b"))
    b = b_gateway.url
    origin.respond("/items/9", headers=[("Cache-Control", "max-age=600")])
    wait_for(lambda: "cache purge stream connected" in b_gateway.log(), 5, message="node b reading the stream")
    _get(b, "/items/9")

    # Node a writes while its Redis connection is cut: the invalidation
    # waits in its queue and reaches node b once Redis is back.
    relay.cut()
    assert send(a, "/items/9", method="PUT", body=b"new", headers=[("Host", "api.example")]).status == 200
    time.sleep(0.5)
    assert "hit" in _status(_get(b, "/items/9", only_if_cached=True))
    relay.restore()
    wait_for(
        lambda: "hit" not in _status(_get(b, "/items/9", only_if_cached=True)),
        10,
        message="node b dropping the URL once node a reaches Redis again",
    )


def test_disconnected_node_catches_up(origin, gateway_factory, socket_dir, redis_server_factory):
    server = redis_server_factory()
    relay = TcpRelay(server.port)
    sock_a = socket_dir / "a.sock"
    a = gateway_factory(_config(origin.url, sock_a, server.url, node="a")).url
    b_gateway = gateway_factory(_config(origin.url, socket_dir / "b.sock", f"redis://127.0.0.1:{relay.port}/0", node="b"))
    b = b_gateway.url
    origin.respond("/gone", headers=[("Cache-Control", "max-age=600")])
    origin.respond("/kept", headers=[("Cache-Control", "max-age=600")])
    wait_for(lambda: "cache purge stream connected" in b_gateway.log(), 5, message="node b reading the stream")
    _get(b, "/gone")
    _get(b, "/kept")

    relay.cut()
    AdminClient(str(sock_a)).call("POST", "/cache/purge", body={"url": "/gone"})
    time.sleep(0.5)
    relay.restore()
    wait_for(
        lambda: "hit" not in _status(_get(b, "/gone", only_if_cached=True)),
        15,
        message="node b dropping the purged entry after it reconnects",
    )
    assert "hit" in _status(_get(b, "/kept"))


def test_node_away_past_stream_length_clears(origin, gateway_factory, socket_dir, redis_server_factory):
    server = redis_server_factory()
    relay = TcpRelay(server.port)
    sock_a = socket_dir / "a.sock"
    gateway_factory(_config(origin.url, sock_a, server.url, node="a", extra=", purge_stream_length: 100"))
    b_gateway = gateway_factory(
        _config(origin.url, socket_dir / "b.sock", f"redis://127.0.0.1:{relay.port}/0", node="b", extra=", purge_stream_length: 100")
    )
    b = b_gateway.url
    origin.respond("/kept", headers=[("Cache-Control", "max-age=600")])
    wait_for(lambda: "cache purge stream connected" in b_gateway.log(), 5, message="node b reading the stream")
    _get(b, "/kept")

    relay.cut()
    admin = AdminClient(str(sock_a))
    for i in range(400):
        admin.call("POST", "/cache/purge", body={"url": f"/other/{i}"})
    relay.restore()
    wait_for(lambda: "cleared the cache of this node" in b_gateway.log(), 15, message="node b clearing its cache")
    assert "hit" not in _status(_get(b, "/kept", only_if_cached=True))


def test_recreated_stream_clears(origin, gateway_factory, socket_dir, redis_server_factory):
    server = redis_server_factory()
    relay = TcpRelay(server.port)
    sock_a = socket_dir / "a.sock"
    gateway_factory(_config(origin.url, sock_a, server.url, node="a"))
    b_gateway = gateway_factory(_config(origin.url, socket_dir / "b.sock", f"redis://127.0.0.1:{relay.port}/0", node="b"))
    b = b_gateway.url
    origin.respond("/kept", headers=[("Cache-Control", "max-age=600")])
    wait_for(lambda: "cache purge stream connected" in b_gateway.log(), 5, message="node b reading the stream")
    admin = AdminClient(str(sock_a))
    admin.call("POST", "/cache/purge", body={"url": "/first"})
    wait_for(lambda: AdminClient(str(socket_dir / "b.sock")).call("GET", "/cache/stats")["stream_purges_applied"] == 1, 5)
    _get(b, "/kept")

    # While node b is away, the stream is lost (as when Redis restarts
    # without its data) and a new purge creates it again.
    relay.cut()
    server.client().delete(b"cachetest:cache:purges")
    admin.call("POST", "/cache/purge", body={"url": "/second"})
    relay.restore()
    wait_for(lambda: "cleared the cache of this node" in b_gateway.log(), 15, message="node b clearing its cache")
    assert "hit" not in _status(_get(b, "/kept", only_if_cached=True))


def test_tag_purge_invalidates_l2_everywhere(origin, gateway_factory, socket_dir, redis_server_factory):
    server = redis_server_factory()
    sock_a = socket_dir / "a.sock"
    a = gateway_factory(_config(origin.url, sock_a, server.url, node="a")).url
    b = gateway_factory(_config(origin.url, socket_dir / "b.sock", server.url, node="b")).url
    origin.respond("/tagged", headers=[("Cache-Control", "max-age=600"), ("Cache-Tag", "news,sports")])
    _get(a, "/tagged")
    wait_for(lambda: any(server.client().scan_iter(match=b"cachetest:cache:/tagged*")), 5, message="L2 write")
    # Drop the stream, as if node b had never seen the purge event: only the generation counter can stop it.
    AdminClient(str(sock_a)).call("POST", "/cache/purge", body={"tag": "sports"})
    server.client().delete("cachetest:cache:purges")
    reply = _get(b, "/tagged")
    assert "detail=l2" not in _status(reply)
    assert origin.count("/tagged") == 2


def test_l2_on_redis_cluster(origin, gateway_factory, socket_dir, redis_cluster):
    urls = redis_cluster.urls
    a = gateway_factory(_config(origin.url, socket_dir / "a.sock", node="a", cluster=urls)).url
    b = gateway_factory(_config(origin.url, socket_dir / "b.sock", node="b", cluster=urls)).url
    origin.respond("/cl", headers=[("Cache-Control", "max-age=60"), ("Vary", "Accept")])
    _get(a, "/cl")
    time.sleep(0.5)
    reply = _get(b, "/cl")
    assert "detail=l2" in _status(reply)
    assert origin.count("/cl") == 1


def test_cache_counters_exported(origin, gateway_factory, socket_dir):
    from tests.redis_support import free_port

    metrics_port = free_port()
    config = _config(origin.url, socket_dir / "a.sock").replace("metrics: null", f'metrics: "127.0.0.1:{metrics_port}"')
    url = gateway_factory(config).url
    origin.respond("/m", headers=[("Cache-Control", "max-age=60")])
    send(url, "/m")
    send(url, "/m")
    send(url, "/m", method="POST", body=b"x")
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    assert 'nexus_cache_requests_total{result="miss",route="cached"} 1.0' in text
    assert 'nexus_cache_requests_total{result="hit",route="cached"} 1.0' in text
    assert 'nexus_cache_requests_total{result="bypass",route="cached"} 1.0' in text
