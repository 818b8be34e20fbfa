"""The gateway proxies a request end to end and stops cleanly on SIGTERM."""

import json
import urllib.request


def test_proxies_and_stops(upstream_factory, gateway_factory):
    upstream = upstream_factory("a")
    gateway = gateway_factory(f"""
listen: ["127.0.0.1:0"]
workers: 2
upstreams:
  app: {{targets: ["{upstream.url}"]}}
routes:
  - {{name: all, upstream: app}}
""")
    with urllib.request.urlopen(gateway.url + "/hello?x=1") as response:
        body = json.loads(response.read())
        assert response.status == 200
        assert response.headers["x-upstream"] == "a"
    assert body["path"] == "/hello"
    assert body["query"] == "x=1"
    assert gateway.stop() == 0
