"""`nexusctl purge`: remove responses from the cache of every node through the admin API."""

from __future__ import annotations

import sys

import click

from nexus.admin.cli_support import Output, admin_command
from nexus.admin.client import AdminClient

__all__ = ["purge"]


@click.command()
@click.argument("target")
@click.option("--prefix", "kind", flag_value="prefix", help="TARGET is a path prefix: purge every URL under it.")
@click.option("--tag", "kind", flag_value="tag", help="TARGET is a tag from Surrogate-Key or Cache-Tag.")
@click.option(
    "--soft", is_flag=True, help="Mark the entries stale instead of removing them (stale-while-revalidate still serves them)."
)
@admin_command
def purge(client: AdminClient, output: Output, target: str, kind: str | None, soft: bool) -> None:
    """Purge cached responses by URL (default), by path prefix or by tag, on this node and, with Redis, on all nodes.

    TARGET is a URL (http://host/path?query), a path (/path?query, for every
    host), a path prefix with --prefix, or a tag with --tag.
    """
    kind = kind or "url"
    if kind != "tag" and not (target.startswith("/") or target.startswith(("http://", "https://"))):
        click.echo(f"nexusctl: invalid {kind} {target!r}: expected a path starting with / or an http:// URL", err=True)
        sys.exit(2)
    result = client.call("POST", "/cache/purge", body={kind: target, "soft": soft})
    output.show(result, _text)


def _text(result: dict) -> str:
    how = "marked stale" if result.get("soft") else "purged"
    where = "all nodes" if result.get("nodes") == "all" else "this node only (no Redis configured)"
    count = "" if result.get("kind") == "tag" else f", {result.get('purged_local', 0)} entries on this node"
    return f"{how} {result.get('kind')} {result.get('value')} on {where}{count}"
