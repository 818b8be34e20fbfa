"""W3C Trace Context: the traceparent field passed to upstreams.

A valid traceparent from the downstream goes to the upstream unchanged
(Nexus records no spans of its own, so it does not start a child span).
A missing or invalid one is replaced by a new one: version 00, a random
16-byte trace id and 8-byte parent id, and the sampled flag of the
received field when its flags could be read, else not sampled. The ids
come from the `random` module, which reseeds itself in every forked
worker, because os.urandom is a system call per request; trace ids need
to be unique, not secret.
tracestate is an ordinary end-to-end field and passes through.

Format (W3C Trace Context, section 3.2): version "-" trace-id "-"
parent-id "-" trace-flags, lower-case hex of 2, 32, 16 and 2 digits. An
all-zero trace id or parent id is invalid, and so is version ff. A later
version may append fields after the flags, separated by "-".
"""

from __future__ import annotations

import random
import re

__all__ = ["TRACEPARENT", "trace_context"]

TRACEPARENT = "traceparent"

_FIELD = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_ZERO_TRACE = "0" * 32
_ZERO_PARENT = "0" * 16


def trace_context(values: list[str] | None) -> tuple[str, int]:
    """Return the traceparent to send upstream and its trace id as an integer.

    `values` are the received traceparent lines; more than one is invalid.
    """
    flags = 0
    if values is not None and len(values) == 1:
        value = values[0].strip()
        match = _FIELD.fullmatch(value)
        if match is not None:
            version, trace_id, parent_id, flag_text, rest = match.groups()
            flags = int(flag_text, 16) & 1
            valid = (
                version != "ff"
                and trace_id != _ZERO_TRACE
                and parent_id != _ZERO_PARENT
                and (rest is None or version != "00")
            )
            if valid:
                return value, int(trace_id, 16)
    # Both ids must not be all zeros; `or 1` covers the one draw in 2**128 (or 2**64) that is.
    trace_id = random.getrandbits(128) or 1
    parent_id = random.getrandbits(64) or 1
    return f"00-{trace_id:032x}-{parent_id:016x}-{flags:02x}", trace_id
