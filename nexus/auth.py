"""API keys: who a request comes from, and what the upstream learns of it.

Consumers are declared in the config with the SHA-256 hashes of their keys,
never the keys themselves. A request's key is read from the configured
header field (and, if configured, query parameter), hashed, and looked up.
A route with `auth: api_key` returns 401 to a missing or unknown key, with
the same message for every unknown key so it gives no hint of which keys
exist; `auth: optional` lets requests without a key through as anonymous
(their limits are then per client IP) but still rejects a wrong key.

On an authenticated route the credential is not forwarded: the key's header
field and query parameter are removed, and the upstream gets the consumer's
name in `X-Consumer` instead (any X-Consumer sent by the client is dropped,
so it cannot be forged).

API keys are expected to be long random tokens (`nexusctl key new` makes 256
bits), so one SHA-256 is enough to store them: there is nothing to guess
that a slow password hash would protect.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import NamedTuple
from urllib.parse import parse_qsl, urlencode

from nexus.config import Config
from nexus.errors import Unauthorized

__all__ = ["ANONYMOUS", "CONSUMER_HEADER", "Authenticator", "Identity", "hash_key", "new_key"]

CONSUMER_HEADER = "x-consumer"


class Identity(NamedTuple):
    """The sender of a request: a consumer and its tier, or anonymous (no consumer, priority 0)."""

    consumer: str | None
    tier: str | None
    priority: int


ANONYMOUS = Identity(None, None, 0)


def hash_key(key: str) -> str:
    """Return the form a key is stored in the config: "sha256:" and 64 hex digits."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """Return a new random API key with 256 bits of entropy, URL-safe."""
    return "nx_" + secrets.token_urlsafe(32)


class Authenticator:
    """Finds and checks the API key of a request, for the routes that ask for one."""

    def __init__(self, config: Config) -> None:
        source = config.api_keys
        self._header = source.header.lower().encode("latin-1") if source.header else None
        self._query = source.query
        self._identities: dict[bytes, Identity] = {}
        for name, consumer in config.consumers.items():
            identity = Identity(name, consumer.tier, config.tiers[consumer.tier].priority)
            for key_hash in consumer.keys:
                self._identities[bytes.fromhex(key_hash.removeprefix("sha256:"))] = identity

        params = []
        places = []
        if source.header:
            params.append(f'header="{source.header}"')
            places.append(f"the {source.header} header field")
        if source.query:
            params.append(f'query="{source.query}"')
            places.append(f"the {source.query} query parameter")
        self.challenge = ("ApiKey " + ", ".join(params)).encode()
        self._missing = "missing API key: send it in " + " or ".join(places)

    def identify(self, headers: list[tuple[bytes, bytes]], query: bytes, mode: str) -> Identity:
        """Return the request's identity under route auth `mode`, or raise Unauthorized."""
        key = self._find_key(headers, query)
        if key is None:
            if mode == "api_key":
                raise Unauthorized(self._missing, challenge=self.challenge)
            return ANONYMOUS

        identity = self._identities.get(hashlib.sha256(key).digest())
        if identity is None:
            raise Unauthorized("invalid API key", challenge=self.challenge)
        return identity

    def _find_key(self, headers: list[tuple[bytes, bytes]], query: bytes) -> bytes | None:
        if self._header is not None:
            for name, value in headers:
                if name == self._header and value:
                    return value.strip()
        if self._query is not None and query:
            for name, value in parse_qsl(query.decode("latin-1"), keep_blank_values=False):
                if name == self._query:
                    return value.encode("latin-1")
        return None

    def upstream_headers(self, headers: list[tuple[str, str]], identity: Identity) -> list[tuple[str, str]]:
        """Drop the credential and any client-sent X-Consumer; add the consumer's name if known."""
        header = self._header.decode("latin-1") if self._header else None
        kept = [(name, value) for name, value in headers if name != header and name != CONSUMER_HEADER]
        if identity.consumer is not None:
            kept.append((CONSUMER_HEADER, identity.consumer))
        return kept

    def upstream_query(self, query: str) -> str:
        """Drop the API key query parameter from `query` (without "?"), if one is configured."""
        if self._query is None or not query:
            return query
        pairs = parse_qsl(query, keep_blank_values=True)
        if not any(name == self._query for name, _ in pairs):
            return query
        return urlencode([(name, value) for name, value in pairs if name != self._query])

