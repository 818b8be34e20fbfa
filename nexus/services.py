"""Master-side services: background work the master runs beside its workers.

A service is started once the master owns the node: after the shared
memory exists on a fresh start, and only after the old master committed on
an upgrade, because one master at a time may drain the rings, hold the
metrics port or read the purge stream. It is told about each accepted
config reload and stopped when the master exits or hands over. It may
serve admin API routes: the master's admin server (`nexus.admin`) mounts
what `admin_routes()` returns. A service with a `handoff()` method passes
what it returns to its successor in the new master of an upgrade, which
reads it from `master.inherited[name]`.

`master_services(master)` is the one list of them. Each service reads what
it needs from the Master (its config, `shared`, `metric_layout`, node id)
when it is built, so adding a service means adding one line here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from nexus.config import Config
    from nexus.master import Master

__all__ = ["AdminError", "AdminHandler", "Service", "master_services"]


class AdminError(Exception):
    """An admin request that failed, with its HTTP `status` and a message that names the fix."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# A handler gets the query parameters and the decoded JSON body (None for
# none) and returns a JSON-serialisable result, or raises AdminError.
AdminHandler = Callable[[dict[str, str], Any], Any]


class Service(Protocol):
    name: str

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def reconfigure(self, config: Config) -> None:
        """Apply an accepted new config; called in the master loop, so return quickly."""

    def admin_routes(self) -> dict[tuple[str, str], AdminHandler]:
        """Admin API routes this service serves, by (method, path)."""

    # Optional: `handoff() -> dict` with JSON-serialisable state for the
    # same service in the next master of an upgrade, and `check(config)`,
    # which raises AdminError to reject a reload that the service could not
    # apply (an access log path it cannot open, say).


def master_services(master: Master) -> list[Service]:
    """Build the services for this master, in start order."""
    services: list[Service] = []
    from nexus.observability.service import ObservabilityService  # here: it imports this module

    observability = ObservabilityService(master)
    services.append(observability)
    from nexus.cache.service import CacheService  # here: it imports this module
    from nexus.observability.access_log import INVALIDATE_KIND

    cache = CacheService(master)
    # Workers' invalidation records reach the cache service through the ring drain.
    observability.ring_handlers[INVALIDATE_KIND] = cache.on_invalidation
    services.append(cache)
    return services
