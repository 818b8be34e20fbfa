"""The master's /metrics listener: prometheus-client's exposition behind a strict front.

prometheus-client's own server returns the metrics on every path, and a
plain-text 405 to every method but GET and OPTIONS, so a typo in a scrape
config goes unnoticed and `curl -I` fails. This server serves
GET and HEAD on /metrics only (RFC 9110 §9.3.2: HEAD gets the fields GET
would, without content), and rejects anything else with a 404 or 405
problem+json body (RFC 9457) that names the fix.

It runs in a thread of the master, one thread per scrape, as the
exposition needs: scrapes are rare (seconds apart) and short (milliseconds).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

__all__ = ["METRICS_PATH", "MetricsServer", "start_metrics_server"]

log = logging.getLogger("nexus.metrics")

METRICS_PATH = "/metrics"
_ALLOW = "GET, HEAD"

StartResponse = Callable[..., object]


class MetricsServer(ThreadingMixIn, WSGIServer):
    """A threading WSGI server; its threads never keep the master from exiting."""

    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    """Logs requests through `logging` at debug level instead of stderr lines."""

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        log.debug("metrics request client=%s %s", self.client_address[0], format % args)


def metrics_app(registry: CollectorRegistry) -> Callable[[dict, StartResponse], Iterable[bytes]]:
    """Return the WSGI app that serves `registry` at /metrics and problems elsewhere."""
    exposition = make_wsgi_app(registry)

    def app(environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        method = environ["REQUEST_METHOD"]
        if path != METRICS_PATH:
            return _problem(start_response, 404, f"no resource at {path!r}: metrics are served at {METRICS_PATH}")
        if method not in ("GET", "HEAD"):
            return _problem(start_response, 405, f"method {method} is not allowed on {METRICS_PATH}: use GET or HEAD")
        if method == "GET":
            return exposition(environ, start_response)
        return _head(exposition, environ, start_response)

    return app


def _head(exposition, environ: dict, start_response: StartResponse) -> Iterable[bytes]:
    """Respond to HEAD with the status and fields of a GET, Content-Length included, and no content."""
    answer: list = []
    body = b"".join(exposition({**environ, "REQUEST_METHOD": "GET"}, lambda status, headers, *_: answer.extend((status, headers))))
    status, headers = answer
    headers = [(name, value) for name, value in headers if name.lower() != "content-length"]
    start_response(status, [*headers, ("Content-Length", str(len(body)))])
    return []


def _problem(start_response: StartResponse, status: int, detail: str) -> Iterable[bytes]:
    titles = {404: "Not Found", 405: "Method Not Allowed"}
    body = json.dumps({"type": "about:blank", "title": titles[status], "status": status, "detail": detail}).encode()
    headers = [("Content-Type", "application/problem+json"), ("Content-Length", str(len(body)))]
    if status == 405:
        headers.append(("Allow", _ALLOW))
    start_response(f"{status} {titles[status]}", headers)
    return [body]


def start_metrics_server(host: str, port: int, registry: CollectorRegistry) -> MetricsServer:
    """Bind `host:port` and serve /metrics from a daemon thread; raise OSError if it cannot be bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server_class = type("MetricsServer", (MetricsServer,), {"address_family": family})
    server = make_server(host, port, metrics_app(registry), server_class=server_class, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="nexus-metrics", daemon=True)
    thread.start()
    return server
