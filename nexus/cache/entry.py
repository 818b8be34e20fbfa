"""The encoding of a stored response: a compact msgpack array of its metadata, then the body.

A hit decodes one `StoredResponse` (msgspec, array-like, so field names are
not stored) and sends its headers as they are: they were made
downstream-ready when the response was stored (hop-by-hop fields removed,
Via appended), so a hit does no per-field work besides adding Age,
Cache-Status and the request id.
"""

from __future__ import annotations

import msgspec

__all__ = ["StoredResponse", "decode_meta", "encode_meta", "encode_l2", "decode_l2"]

# The status of a Vary index record: it stores the names of the fields the
# response varies on, and the responses themselves are stored under
# secondary keys.
VARY_INDEX = 0


class StoredResponse(msgspec.Struct, array_like=True):
    """A stored response's metadata; times are Unix seconds, durations seconds."""

    status: int
    headers: list[tuple[bytes, bytes]]
    # When the request that fetched it started, and when its response arrived.
    request_time: float
    response_time: float
    # corrected_initial_age of RFC 9111 section 4.2.3 and the freshness lifetime.
    initial_age: float
    lifetime: float
    # `nexus.cache.policy` flag bits: NO_STALE, MUST_VALIDATE.
    flags: int = 0
    stale_while_revalidate: float = 0.0
    stale_if_error: float = 0.0
    etag: str | None = None
    last_modified: str | None = None
    # Tag names from Surrogate-Key or Cache-Tag, their purge buckets in the
    # shared tag table, and their generations in Redis when stored in L2.
    tags: list[str] = []
    tag_buckets: list[int] = []
    tag_generations: list[int] = []
    # Names of the request fields in Vary, lowercased; for a VARY_INDEX record only these matter.
    vary: list[str] = []

    def age(self, now: float) -> float:
        """current_age of RFC 9111 section 4.2.3."""
        return self.initial_age + max(0.0, now - self.response_time)


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(StoredResponse)

encode_meta = _encoder.encode
decode_meta = _decoder.decode


def encode_l2(meta: bytes, body: bytes) -> bytes:
    """Return the Redis value of an entry: the meta length (4 bytes, little-endian), the meta, the body."""
    return len(meta).to_bytes(4, "little") + meta + body


def decode_l2(value: bytes) -> tuple[bytes, bytes]:
    """Split a Redis value into (meta, body); raise ValueError when it is not an L2 entry."""
    if len(value) < 4:
        raise ValueError("L2 entry shorter than its length prefix")
    length = int.from_bytes(value[:4], "little")
    if 4 + length > len(value):
        raise ValueError("L2 entry shorter than its meta length")
    return value[4 : 4 + length], value[4 + length :]
