"""W3C traceparent: passed on when valid, created when missing or invalid."""

from __future__ import annotations

import re

import pytest

from nexus.headers import ForwardingContext, TrustedProxies, upstream_request_headers
from nexus.observability.trace import trace_context

VALID = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
NEW = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-(0[01])")


def test_valid_header_passes_unchanged():
    assert trace_context([VALID]) == (VALID, 0x0AF7651916CD43DD8448EB211C80319C)


def test_future_version_with_extra_fields_passes():
    value = "cc-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-what-the-future-holds"
    assert trace_context([value])[0] == value


def test_missing_header_gets_a_new_unsampled_one():
    value, trace_id = trace_context(None)
    match = NEW.fullmatch(value)
    assert match is not None
    assert int(match.group(1), 16) == trace_id != 0
    assert match.group(3) == "00"
    assert trace_context(None)[1] != trace_id


@pytest.mark.parametrize(
    ("value", "flags"),
    [
        ("00-00000000000000000000000000000000-b7ad6b7169203331-01", "01"),  # zero trace id
        ("00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01", "01"),  # zero parent id
        ("ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "01"),  # version ff
        ("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00-extra", "00"),  # 00 has no more fields
        ("00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01", "00"),  # upper case
        ("garbage", "00"),
    ],
)
def test_invalid_header_is_replaced(value, flags):
    new, trace_id = trace_context([value])
    match = NEW.fullmatch(new)
    assert match is not None and new != value
    assert match.group(3) == flags
    assert trace_id == int(match.group(1), 16)


def test_two_lines_are_invalid():
    assert trace_context([VALID, VALID])[0] != VALID


def test_request_headers_carry_traceparent_and_tracestate():
    context = ForwardingContext("192.0.2.1", "http", TrustedProxies([]), "x-request-id", trace_context=True)
    downstream = [(b"traceparent", VALID.encode()), (b"tracestate", b"vendor=abc")]
    result = upstream_request_headers(downstream, context)
    assert ("traceparent", VALID) in result.headers
    assert ("tracestate", "vendor=abc") in result.headers
    assert result.trace_id == 0x0AF7651916CD43DD8448EB211C80319C

    created = upstream_request_headers([], context)
    values = [value for name, value in created.headers if name == "traceparent"]
    assert len(values) == 1
    assert NEW.fullmatch(values[0])
    assert int(values[0][3:35], 16) == created.trace_id
