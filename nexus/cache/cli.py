"""`nexusctl purge` and `nexusctl cache-stats`: the response cache through the admin API."""

from __future__ import annotations

from typing import Any

import click

from nexus.admin.cli_support import Output, admin_command
from nexus.admin.client import AdminClient
from nexus.cache.invalidation import check_purge_value

__all__ = ["cache_stats", "purge"]


@click.command()
@click.argument("target")
@click.option("--prefix", "by_prefix", is_flag=True, help="TARGET is a path prefix: purge every URL under it.")
@click.option("--tag", "by_tag", is_flag=True, help="TARGET is a tag from Surrogate-Key or Cache-Tag.")
@click.option(
    "--soft", is_flag=True, help="Mark the entries stale instead of removing them (stale-while-revalidate still serves them)."
)
@admin_command
def purge(client: AdminClient, output: Output, target: str, by_prefix: bool, by_tag: bool, soft: bool) -> None:
    """Purge cached responses by URL (default), by path prefix or by tag, on this node and, with Redis, on all nodes.

    TARGET is a URL (http://host/path?query), a path (/path?query, for every
    host), a path prefix with --prefix, or a tag with --tag. The host of a URL
    must equal the Host header of the cached requests, port included
    (http://127.0.0.1:8080/path); a path alone matches every host.
    """
    kind = purge_kind(by_prefix, by_tag)
    try:
        check_purge_value(kind, target)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    result = client.call("POST", "/cache/purge", body={kind: target, "soft": soft})
    output.show(result, purge_text)


def purge_kind(by_prefix: bool, by_tag: bool) -> str:
    """Return "url", "prefix" or "tag" from the flags, or raise click.UsageError when both are given."""
    if by_prefix and by_tag:
        raise click.UsageError("--prefix and --tag exclude each other: give one, or neither for a URL")
    if by_prefix:
        return "prefix"
    if by_tag:
        return "tag"
    return "url"


def purge_text(result: dict[str, Any]) -> str:
    """Render the master's purge reply: what was purged where, the count, the route and any notes."""
    action = "marked stale" if result.get("soft") else "purged"
    where = "all nodes" if result.get("nodes") == "all" else "this node only (no Redis configured)"
    count = result.get("purged_local")
    counted = "" if count is None else f", {count} {'entry' if count == 1 else 'entries'} on this node"
    # The value passed check_purge_value here and in the master, so it contains no control characters.
    lines = [f"{action} {result.get('kind')} {result.get('value')} on {where}{counted}"]
    if result.get("kind") != "tag":
        route = result.get("route")
        lines.append(f"route: {route}" if route is not None else "route: none matched")
    lines += [f"note: {note}" for note in result.get("notes", [])]
    return "\n".join(lines)


@click.command("cache-stats")
@admin_command
def cache_stats(client: AdminClient, output: Output) -> None:
    """Show this node's cache store: entries, bytes, evictions, refusals, and the purge stream's progress."""
    output.show(client.call("GET", "/cache/stats"))
