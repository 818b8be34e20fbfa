"""The request router: pick the route for a request, and rewrite its path.

`RouteTable(routes)` is built once from the config's routes; `table.match(host,
path, method, headers)` returns the route for one request, or None when no
route matches. `rewrite_path(route, path)` gives the path to send upstream.
The module does no I/O.

Matching
--------
A route matches when every condition in its `match` holds:

- `host`: the request's Host/authority value is reduced to a host name: the
  port is dropped (`api.example.com:8080`, `[::1]:8080`), IPv6 brackets are
  removed, the name is lower-cased and one trailing dot is ignored. Route
  hosts are reduced the same way, with two exceptions. A port in a route host
  is kept, so such a host never matches. A wildcard with no domain, `*.`,
  makes RouteTable raise ValueError. An exact host matches that name only. A
  wildcard `*.example.com` matches a name that ends in `.example.com` and has
  at least one more non-empty label before it (`a.example.com`,
  `a.b.example.com`), never `example.com` itself. With a list of hosts, any
  one may match. A route without host (or with an empty list) matches any
  request, including one without a Host.
- `path`: the request path (no query string) equals it exactly,
  case-sensitively, as received (no decoding or dot-segment removal).
- `path_prefix`: the request path starts with it on a segment boundary:
  `/v1/catalog` matches `/v1/catalog`, `/v1/catalog/` and `/v1/catalog/x`,
  not `/v1/catalogue`. The prefix `/` matches every path. A trailing slash
  changes nothing: `/v1/catalog/` matches the same paths as `/v1/catalog`.
- `methods`: the request method is one of them (methods are case-sensitive,
  as in HTTP). Unset or an empty list means any method.
- `headers`: every listed header is present with exactly that value. Names
  are case-insensitive; `match` expects a headers mapping with lower-case
  names.

Precedence
----------
When several routes match, the most specific one wins. Routes are compared by
these keys in order; a later key only decides when all earlier ones tie:

1. Host: an exact host beats a wildcard; a wildcard with a longer suffix beats
   one with a shorter suffix (`*.api.example.com` beats `*.example.com`); any
   wildcard beats a route without host. For a route with several hosts, the
   host that matched the request is the one compared.
2. Path: an exact `path` beats a `path_prefix`; a longer prefix beats a
   shorter one; any prefix, even `/`, beats a route without path rule.
3. Methods: a route with `methods` beats one without.
4. Headers: more header conditions beat fewer.
5. Order: the route earlier in the config wins.

So `host: api.example.com` with no path rule beats `host: *.example.com,
path: /exact`, because the host key is compared first.

Lookup cost
-----------
The table is split by host kind: exact hosts are keys of a dict, wildcards
are keys of a dict by suffix (tried from the longest suffix the request host
has), and host-less routes form one group. Within each group, exact paths are
keys of a dict and prefixes are keys of a dict tried from the longest
segment-boundary prefix of the request path (no longer than the longest
configured prefix) down to `/`; each key holds its
routes pre-sorted by keys 3 to 5. A request therefore costs a few dict look-ups
per host label and path segment, plus a scan of only the routes that share one
host key and one path key, whatever the number of routes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TypeAlias

from nexus.config import Route

__all__ = ["RouteTable", "rewrite_path"]

# One route as checked at request time: the route, its methods (None for any)
# and its header conditions as (lower-case name, value) pairs.
_Entry: TypeAlias = tuple[Route, frozenset[str] | None, tuple[tuple[str, str], ...]]


def _host_name(host: str) -> str:
    """Reduce a Host/authority value to the lower-case name without port or trailing dot."""
    if host.startswith("["):
        end = host.find("]")
        if end > 0:
            host = host[1:end]
    else:
        colon = host.find(":")
        # One colon is a port; more than one is a bare IPv6 address.
        if colon >= 0 and host.find(":", colon + 1) < 0:
            host = host[:colon]
    host = host.lower()
    host = host.removesuffix(".")
    return host


def _route_host(host: str) -> str:
    """Normalize a host written in a route: case, one trailing dot, IPv6 brackets; a port is kept."""
    host = host.lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    host = host.removesuffix(".")
    return host


class _Group:
    """The routes that share one host key, indexed by path."""

    __slots__ = ("_pending", "anypath", "exact", "longest", "prefixes", "root")

    def __init__(self) -> None:
        self.exact: dict[str, list[_Entry]] = {}
        self.prefixes: dict[str, list[_Entry]] = {}
        self.longest = 0  # the length of the longest key of self.prefixes
        self.root: list[_Entry] = []
        self.anypath: list[_Entry] = []
        # (sort key, entry) pairs, sorted and moved into the lists by finish().
        self._pending: list[tuple[tuple[int, int, int], list[_Entry], _Entry]] = []

    def add(self, index: int, route: Route, entry: _Entry) -> None:
        match = route.match
        if match.path is not None:
            bucket = self.exact.setdefault(match.path, [])
        elif match.path_prefix is None:
            bucket = self.anypath
        elif match.path_prefix.rstrip("/") == "":
            bucket = self.root
        else:
            # A trailing slash names the same subtree: "/v1/" is "/v1".
            bucket = self.prefixes.setdefault(match.path_prefix.rstrip("/"), [])
        # Keys 3 to 5: methods, then more headers, then config order.
        key = (0 if entry[1] is not None else 1, -len(entry[2]), index)
        self._pending.append((key, bucket, entry))

    def finish(self) -> None:
        self._pending.sort(key=lambda item: item[0])
        for _key, bucket, entry in self._pending:
            bucket.append(entry)
        self._pending = []
        self.longest = max(map(len, self.prefixes), default=0)

    def find(self, path: str, method: str, headers: Mapping[str, str]) -> Route | None:
        """Return the best route of this group for the request, or None."""
        if self.exact:
            entries = self.exact.get(path)
            if entries is not None:
                found = _first(entries, method, headers)
                if found is not None:
                    return found
        prefixes = self.prefixes
        if prefixes:
            # The path itself, then each part of it that ends before a "/",
            # longest first, skipping those longer than any prefix; "/"
            # itself is self.root.
            end = len(path)
            if end > self.longest:
                end = path.rfind("/", 0, self.longest + 1)
            candidate = path[:end]
            while end > 0:
                entries = prefixes.get(candidate)
                if entries is not None:
                    found = _first(entries, method, headers)
                    if found is not None:
                        return found
                end = path.rfind("/", 0, end)
                candidate = path[:end]
        if self.root:
            found = _first(self.root, method, headers)
            if found is not None:
                return found
        if self.anypath:
            return _first(self.anypath, method, headers)
        return None


def _first(entries: list[_Entry], method: str, headers: Mapping[str, str]) -> Route | None:
    """Return the first route of `entries` whose methods and headers match."""
    for route, methods, conditions in entries:
        if methods is not None and method not in methods:
            continue
        for name, value in conditions:
            if headers.get(name) != value:
                break
        else:
            return route
    return None


class RouteTable:
    """The routes of a config, indexed for matching requests; see the module docs."""

    __slots__ = ("_anyhost", "_exact", "_wildcards")

    def __init__(self, routes: Sequence[Route]) -> None:
        self._exact: dict[str, _Group] = {}
        self._wildcards: dict[str, _Group] = {}
        anyhost = _Group()
        for index, route in enumerate(routes):
            match = route.match
            methods = frozenset(match.methods) if match.methods else None
            conditions = tuple((name.lower(), value) for name, value in match.headers.items())
            entry: _Entry = (route, methods, conditions)
            hosts = [match.host] if isinstance(match.host, str) else match.host
            if not hosts:
                anyhost.add(index, route, entry)
                continue
            seen: set[str] = set()
            for raw in hosts:
                host = _route_host(raw)
                if host in seen:
                    continue
                seen.add(host)
                if host.startswith("*"):
                    suffix = host[1:]  # ".example.com"
                    if len(suffix) < 2 or suffix[0] != ".":
                        raise ValueError(
                            f"route {route.name!r}: invalid host {raw!r}: "
                            "a wildcard needs a domain, as in *.example.com"
                        )
                    group = self._wildcards.setdefault(suffix, _Group())
                else:
                    group = self._exact.setdefault(host, _Group())
                group.add(index, route, entry)
        for group in (*self._exact.values(), *self._wildcards.values(), anyhost):
            group.finish()
        empty = not (anyhost.exact or anyhost.prefixes or anyhost.root or anyhost.anypath)
        self._anyhost: _Group | None = None if empty else anyhost

    def match(self, host: str | None, path: str, method: str, headers: Mapping[str, str]) -> Route | None:
        """Return the most specific route for the request, or None if none matches.

        `host` is the Host/authority value as received (None if absent),
        `path` the path without query string, `headers` a mapping with
        lower-case names.
        """
        if host:
            name = _host_name(host)
            group = self._exact.get(name)
            if group is not None:
                found = group.find(path, method, headers)
                if found is not None:
                    return found
            wildcards = self._wildcards
            # Skip names with an empty label: ".a.example.com", "a..example.com".
            if wildcards and name and name[0] != "." and ".." not in name:
                # Each suffix that starts at a dot after the first label,
                # longest first: "a.b.example.com" tries ".b.example.com",
                # ".example.com", ".com".
                dot = name.find(".")
                while dot > 0:
                    group = wildcards.get(name[dot:])
                    if group is not None:
                        found = group.find(path, method, headers)
                        if found is not None:
                            return found
                    dot = name.find(".", dot + 1)
        if self._anyhost is not None:
            return self._anyhost.find(path, method, headers)
        return None


def rewrite_path(route: Route, path: str) -> str:
    """Return the path to send upstream: strip `strip_prefix`, then add `add_prefix`.

    `strip_prefix` is removed only when the path starts with it on a segment
    boundary; what is left always starts with "/". A path that does not start
    with it is left unchanged, and stripping "/" changes nothing:

        strip_prefix="/v1":  "/v1" -> "/"    "/v1/" -> "/"    "/v1/x" -> "/x"
                             "/v1x" -> "/v1x" (not a boundary)  "/v2/x" -> "/v2/x"

    `add_prefix` is then put in front of the path as is, so the result is
    `add_prefix + path`; a path of "/" keeps its slash. Adding "/" changes
    nothing:

        add_prefix="/api":   "/x" -> "/api/x"    "/" -> "/api/"    "/x/" -> "/api/x/"

    Both together, strip_prefix="/v1" and add_prefix="/api":

        "/v1/x" -> "/api/x"    "/v1" -> "/api/"    "/other" -> "/api/other"

    A path that does not start with "/" (such as "*" in `OPTIONS *`) is
    returned unchanged.
    """
    if not path.startswith("/"):
        return path
    strip = route.strip_prefix
    if strip is not None and strip != "/" and path.startswith(strip):
        n = len(strip)
        if len(path) == n:
            path = "/"
        elif path[n] == "/":
            path = path[n:]
    add = route.add_prefix
    if add is not None and add != "/":
        path = add + path
    return path
