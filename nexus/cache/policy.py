"""RFC 9111 rules of a shared cache, with no I/O: storability, freshness, age, reuse.

Everything here works on parsed header values and numbers of seconds, so
the request path (`nexus.cache.layer`) and the tests can call it directly.
Section numbers refer to RFC 9111 unless another RFC is named.
"""

from __future__ import annotations

from dataclasses import dataclass
from email.utils import parsedate_to_datetime

__all__ = [
    "HEURISTIC_STATUSES",
    "RequestDirectives",
    "Freshness",
    "parse_cache_control",
    "parse_http_date",
    "request_directives",
    "storable_reason",
    "freshness_lifetime",
    "initial_age",
]

# Statuses that are heuristically cacheable (RFC 9110 section 15.1): a
# response with one of them may get a heuristic freshness lifetime.
HEURISTIC_STATUSES = frozenset({200, 203, 204, 206, 300, 301, 308, 404, 405, 410, 414, 501})

# The fraction of (Date - Last-Modified) used as a heuristic lifetime
# (section 4.2.2 suggests "no more than some fraction", typically 10%).
HEURISTIC_FRACTION = 0.1

Directives = dict[str, str | None]


def parse_cache_control(values: list[str]) -> Directives:
    """Parse Cache-Control field values into {directive: argument or None}.

    Names are case-insensitive (section 5.2). Quoted arguments lose their
    quotes; a comma inside quotes does not split. The first occurrence of a
    directive wins, as a conservative reading of duplicates.
    """
    directives: Directives = {}
    for value in values:
        for item in _split_quoted(value):
            name, sep, argument = item.partition("=")
            name = name.strip().lower()
            if not name or name in directives:
                continue
            if not sep:
                directives[name] = None
                continue
            argument = argument.strip()
            if len(argument) >= 2 and argument[0] == argument[-1] == '"':
                argument = argument[1:-1]
            directives[name] = argument
    return directives


def _split_quoted(value: str) -> list[str]:
    if '"' not in value:
        return value.split(",")
    items, current, quoted = [], [], False
    for char in value:
        if char == '"':
            quoted = not quoted
        if char == "," and not quoted:
            items.append("".join(current))
            current = []
        else:
            current.append(char)
    items.append("".join(current))
    return items


# Section 1.2.2: a delta-seconds value too large to represent counts as 2^31.
DELTA_SECONDS_MAX = 2**31


def delta_seconds(directives: Directives, name: str) -> int | None:
    """Return a directive's delta-seconds argument, or None when absent or invalid (section 1.2.2)."""
    if name not in directives:
        return None
    argument = directives[name]
    if argument is None or not argument.isascii() or not argument.isdigit():
        return None
    digits = argument.lstrip("0") or "0"
    # More than 10 digits is above 2^31 (2147483648 has 10); no need to convert them.
    if len(digits) > 10:
        return DELTA_SECONDS_MAX
    return min(int(digits), DELTA_SECONDS_MAX)


def parse_http_date(value: str | None) -> float | None:
    """Return an HTTP-date (RFC 9110 section 5.6.7) as Unix seconds, or None when invalid."""
    if not value:
        return None
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


@dataclass(slots=True)
class RequestDirectives:
    """The request's Cache-Control directives that constrain reuse (section 5.2.1)."""

    no_cache: bool = False
    no_store: bool = False
    max_age: int | None = None
    min_fresh: int = 0
    # None: no max-stale; -1: any staleness accepted.
    max_stale: int | None = None
    only_if_cached: bool = False

    @property
    def is_plain(self) -> bool:
        return not (self.no_cache or self.no_store or self.only_if_cached) and self.max_age is None and (
            self.min_fresh == 0 and self.max_stale is None
        )


PLAIN_REQUEST = RequestDirectives()


def request_directives(cache_control: list[str], pragma: list[str]) -> RequestDirectives:
    """Parse a request's Cache-Control, honouring `Pragma: no-cache` only without Cache-Control (section 5.4)."""
    if not cache_control:
        if any("no-cache" in value.lower() for value in pragma):
            return RequestDirectives(no_cache=True)
        return PLAIN_REQUEST
    directives = parse_cache_control(cache_control)
    max_stale: int | None = None
    if "max-stale" in directives:
        max_stale = delta_seconds(directives, "max-stale")
        if max_stale is None:
            max_stale = -1
    return RequestDirectives(
        no_cache="no-cache" in directives,
        no_store="no-store" in directives,
        max_age=delta_seconds(directives, "max-age"),
        min_fresh=delta_seconds(directives, "min-fresh") or 0,
        max_stale=max_stale,
        only_if_cached="only-if-cached" in directives,
    )


def storable_reason(
    status: int,
    response: Directives,
    request: RequestDirectives,
    has_authorization: bool,
    has_expires: bool,
    allowed_statuses: frozenset[int],
    has_default_ttl: bool,
) -> str | None:
    """Return why a response to a GET may not be stored in a shared cache (section 3), or None if it may.

    The reasons are short tokens for the Cache-Status `detail` parameter.
    """
    if status not in allowed_statuses:
        return "status"
    if request.no_store or "no-store" in response:
        return "no-store"
    # A shared cache must not store a private response (section 5.2.2.7).
    # NOTE: `private="field"` could be stored without those fields; Nexus
    # does not store such responses at all.
    if "private" in response:
        return "private"
    # Section 3.5: a response to a request with Authorization only with one
    # of these directives.
    if has_authorization and not ("public" in response or "s-maxage" in response or "must-revalidate" in response):
        return "authorization"
    explicit = has_expires or "max-age" in response or "s-maxage" in response or "public" in response
    if not explicit and status not in HEURISTIC_STATUSES and not has_default_ttl:
        return "no-freshness"
    return None


@dataclass(slots=True)
class Freshness:
    """A stored response's freshness lifetime, and whether it came from a heuristic, in seconds."""

    lifetime: float
    heuristic: bool


def freshness_lifetime(
    status: int,
    response: Directives,
    date: float | None,
    expires: str | None,
    last_modified: float | None,
    now: float,
    default_ttl: float | None,
    max_ttl: float | None,
) -> Freshness:
    """Compute the freshness lifetime of a response for a shared cache (section 4.2.1).

    Order: s-maxage, max-age, Expires - Date, then `default_ttl` when the
    route sets one, else the 10% heuristic from Last-Modified for
    heuristically cacheable statuses, else 0. `max_ttl` caps the result.
    """
    lifetime = _explicit_lifetime(response, date, expires, now)
    heuristic = False
    if lifetime is None:
        if default_ttl is not None:
            lifetime = default_ttl
        elif last_modified is not None and status in HEURISTIC_STATUSES:
            # Section 4.2.2: a fraction of the time since the last change.
            lifetime = max(0.0, ((date or now) - last_modified) * HEURISTIC_FRACTION)
            heuristic = True
        else:
            lifetime = 0.0
    if max_ttl is not None:
        lifetime = min(lifetime, max_ttl)
    return Freshness(lifetime, heuristic)


def _explicit_lifetime(response: Directives, date: float | None, expires: str | None, now: float) -> float | None:
    s_maxage = delta_seconds(response, "s-maxage")
    if s_maxage is not None:
        return float(s_maxage)
    max_age = delta_seconds(response, "max-age")
    if max_age is not None:
        return float(max_age)
    if "max-age" in response or "s-maxage" in response:
        # An invalid argument (section 4.2.1): treat the response as stale.
        return 0.0
    if expires is not None:
        expires_at = parse_http_date(expires)
        if expires_at is None:
            # An invalid Expires, such as "0", means already expired (section 5.3).
            return 0.0
        return max(0.0, expires_at - (date if date is not None else now))
    return None


def initial_age(age_header: str | None, date: float | None, request_time: float, response_time: float) -> float:
    """Return corrected_initial_age of section 4.2.3, in seconds."""
    age_value = 0
    if age_header:
        age_value = delta_seconds({"age": age_header.strip()}, "age") or 0
    apparent_age = max(0.0, response_time - date) if date is not None else 0.0
    response_delay = response_time - request_time
    return max(apparent_age, age_value + response_delay)


def may_serve_stale(response_flags: int, stale_for: float, request: RequestDirectives, allowance: float) -> bool:
    """Return whether a response stale by `stale_for` s may be served without validation.

    `allowance` is the stale-while-revalidate or stale-if-error window that
    applies. must-revalidate, proxy-revalidate and s-maxage forbid it
    (sections 4.2.4, 5.2.2.2, 5.2.2.8, 5.2.2.10), as does no-cache.
    """
    if response_flags & (NO_STALE | MUST_VALIDATE):
        return False
    if request.max_stale is not None and (request.max_stale < 0 or stale_for <= request.max_stale):
        return True
    return stale_for <= allowance


# Flag bits summarising a stored response's directives, kept in its entry.
NO_STALE = 1  # must-revalidate, proxy-revalidate or s-maxage: never served stale
MUST_VALIDATE = 2  # no-cache: validated before every reuse


def response_flags(response: Directives) -> int:
    flags = 0
    if "must-revalidate" in response or "proxy-revalidate" in response or "s-maxage" in response:
        flags |= NO_STALE
    # no-cache with field names (section 5.2.2.4) is treated as plain
    # no-cache, which is allowed and stricter.
    if "no-cache" in response:
        flags |= MUST_VALIDATE
    return flags
