"""nexusctl verbs of observability: `top` (busiest consumers and routes) and `access-log reopen`.

`nexusctl top` reads GET /usage from the master's admin API every
`--interval` seconds and redraws the terminal with plain ANSI escapes:
the busiest consumers and routes, with their request rate over the last
interval, error and rate-limited shares, bytes and latency quantiles.
`--once` reads the usage twice, `--interval` apart, prints one table with
the rates between them, and exits; `--json` prints the usage documents
instead.
"""

from __future__ import annotations

import json
import time
from typing import Any

import click

from nexus.admin.cli_support import Output, admin_command, format_table

__all__ = ["access_log", "render", "top"]

# Home the cursor and clear the screen.
_CLEAR = "\x1b[H\x1b[2J"


def _rates(
    current: list[dict], previous: list[dict] | None, seconds: float, limit: int | None
) -> dict[str, float | None]:
    """Requests per second of each row since `previous`, None where it cannot be known.

    `previous` contains at most `limit` rows, the busiest. A row missing from
    a full `previous` may have been just below its cut, so its rate is
    unknown. A row missing from a shorter one had no requests.
    """
    if previous is None or seconds <= 0:
        return {row["name"]: None for row in current}
    before = {row["name"]: row["requests"] for row in previous}
    cut = limit is not None and len(previous) >= limit
    rates: dict[str, float | None] = {}
    for row in current:
        earlier = before.get(row["name"])
        if earlier is None and cut:
            rates[row["name"]] = None
        else:
            rates[row["name"]] = (row["requests"] - (earlier or 0)) / seconds
    return rates


def _share(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def _milliseconds(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def _table(title: str, rows: list[dict], rates: dict[str, float | None]) -> str:
    headers = [title, "req/s", "requests", "5xx", "429", "bytes", "p50 ms", "p90 ms", "p99 ms"]
    cells = []
    for row in rows:
        rate = rates.get(row["name"])
        cells.append(
            [
                row["name"],
                "-" if rate is None else f"{rate:.1f}",
                row["requests"],
                _share(row["errors"], row["requests"]),
                _share(row["rate_limited"], row["requests"]),
                row["bytes"],
                _milliseconds(row["latency_s"]["p50"]),
                _milliseconds(row["latency_s"]["p90"]),
                _milliseconds(row["latency_s"]["p99"]),
            ]
        )
    return format_table(headers, cells)


def render(usage: dict[str, Any], previous: dict[str, Any] | None = None, limit: int | None = None) -> str:
    """Render a usage document as two tables; rates come from the difference with `previous` (read with `limit`)."""
    seconds = usage["time"] - previous["time"] if previous else 0.0
    consumers = _rates(usage["consumers"], previous and previous["consumers"], seconds, limit)
    routes = _rates(usage["routes"], previous and previous["routes"], seconds, limit)
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(usage["since"]))
    lines = [
        f"nexus top: {usage['records']} requests since {started}"
        + (f", rates over the last {seconds:.1f} s" if previous else ""),
    ]
    if usage.get("recording") is False:
        lines.append("usage is off (usage: false and no access_log.path): workers send no records to count")
    lines += [
        "",
        _table("consumer", usage["consumers"], consumers),
        "",
        _table("route", usage["routes"], routes),
    ]
    return "\n".join(lines)


@click.command()
@click.option("--once", is_flag=True, help="Print the table once and exit, instead of refreshing.")
@click.option(
    "--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True, help="Seconds between refreshes."
)
@click.option("--limit", type=click.IntRange(min=1), default=10, show_default=True, help="Rows of each table.")
@admin_command
def top(client, output: Output, once: bool, interval: float, limit: int) -> None:
    """Show the busiest consumers and routes, refreshing every second until Ctrl-C."""
    query = {"limit": str(limit)}
    try:
        if once and output.as_json:
            click.echo(json.dumps(client.call("GET", "/usage", query=query), sort_keys=True))
            return
        previous = client.call("GET", "/usage", query=query) if once else None
        if once:
            time.sleep(interval)
        while True:
            usage = client.call("GET", "/usage", query=query)
            if output.as_json:
                click.echo(json.dumps(usage, sort_keys=True))
            elif once:
                click.echo(render(usage, previous, limit))
                return
            else:
                click.echo(_CLEAR + render(usage, previous, limit), nl=True)
            previous = usage
            time.sleep(interval)
    except KeyboardInterrupt:
        return


@click.group("access-log")
def access_log() -> None:
    """Operate the access log the master writes."""


@access_log.command("reopen")
@admin_command
def access_log_reopen(client, output: Output) -> None:
    """Reopen the access log file, after logrotate renamed it (same as SIGUSR1 to the master)."""
    output.show(client.call("POST", "/access-log/reopen"))
