"""nexusctl's verbs that operate the running master: status, workers, reload, upgrade, drain, resume.

Each verb sends one admin API request and prints the result: a short text
by default, the master's JSON with --json.
"""

from __future__ import annotations

import os
import time
from typing import Any

import click

from nexus.admin.cli_support import Output, admin_command, chosen_config, format_table, format_value
from nexus.admin.client import AdminClient

__all__ = ["COMMANDS"]

_WORKER_COLUMNS = ("slot", "pid", "cpu", "generation", "state", "uptime_s", "requests", "restarts")


@click.command()
@admin_command
def status(client: AdminClient, output: Output) -> None:
    """Show the master: generation, config, reloads and every worker."""
    output.show(client.call("GET", "/status"), _status_text)


@click.command()
@admin_command
def workers(client: AdminClient, output: Output) -> None:
    """List the workers: pid, CPU, generation, state, uptime, requests served, restarts."""
    output.show(client.call("GET", "/workers"), lambda result: _workers_table(result.get("workers", [])))


@click.command()
@admin_command
def reload(client: AdminClient, output: Output) -> None:
    """Reload the config: start a new worker generation, then drain the old one.

    The master reloads the file it was started with; --config only tells
    nexusctl where the admin socket is. An invalid config is rejected with
    the same message as `nexus check`, and the running generation keeps
    serving.
    """
    result = client.call("POST", "/reload")
    if isinstance(result, dict) and "config_path" not in result:
        # A master older than the config_path field in the reload reply.
        result["config_path"] = client.call("GET", "/status").get("config_path")
    output.show(result, lambda result: _action_text("reloaded", result))
    _print_warnings(result)
    reloaded = result.get("config_path") if isinstance(result, dict) else None
    note = _other_config_note(chosen_config(click.get_current_context()), reloaded)
    if note is not None:
        click.echo(f"nexusctl: note: {note}", err=True)


@click.command()
@admin_command
def upgrade(client: AdminClient, output: Output) -> None:
    """Start a new master from the installed code and hand it the sockets; the old one drains and exits.

    The config file is checked first, as for a reload: an invalid one is
    rejected and nothing starts. If the new master does not become ready in
    time, the old one keeps serving.
    """
    result = client.call("POST", "/upgrade")
    output.show(result, lambda result: _action_text("upgraded", result))
    _print_warnings(result)


@click.command()
@admin_command
def drain(client: AdminClient, output: Output) -> None:
    """Stop accepting new connections for maintenance; `nexusctl resume` undoes it."""
    output.show(client.call("POST", "/drain"), lambda result: _action_text("drained", result))


@click.command()
@admin_command
def resume(client: AdminClient, output: Output) -> None:
    """Accept connections again after `nexusctl drain`."""
    output.show(client.call("POST", "/resume"), lambda result: _action_text("resumed", result))


COMMANDS = [status, workers, reload, upgrade, drain, resume]


def _status_text(result: dict[str, Any]) -> str:
    workers_list = result.get("workers", [])
    uptime = result.get("uptime_s")
    if uptime is None and result.get("started_at") is not None:
        uptime = time.time() - result["started_at"]
    config_hash = result.get("config_hash") or "-"
    rows = [
        (
            "master",
            f"pid {result.get('pid', '-')}, {result.get('state', '-')}, generation {result.get('generation', '-')}, "
            f"up {format_duration(uptime)}",
        ),
        ("config", f"{result.get('config_path', '-')} (hash {config_hash[:12]})"),
        ("reloads", str(result.get("reloads", 0))),
        ("workers", str(len(workers_list))),
    ]
    # Fields the master adds beyond these (counters, node id) follow as they are.
    summarized = {
        "pid",
        "state",
        "generation",
        "uptime_s",
        "started_at",
        "config_path",
        "config_hash",
        "reloads",
        "workers",
    }
    nested = []
    for key, value in result.items():
        if key in summarized:
            continue
        if isinstance(value, (dict, list)):
            nested.append((key, value))
        else:
            rows.append((key.replace("_", " "), format_value(value)))
    width = max(len(label) for label, _ in rows)
    lines = [f"{label:<{width}}  {value}" for label, value in rows]
    for key, value in nested:
        lines += ["", f"{key.replace('_', ' ')}:", format_value(value)]
    if workers_list:
        lines += ["", "workers:", _workers_table(workers_list)]
    return "\n".join(lines)


def _workers_table(workers_list: list[dict[str, Any]]) -> str:
    if not workers_list:
        return "no workers"
    rows = []
    for worker in workers_list:
        row = [worker.get(column) for column in _WORKER_COLUMNS]
        row[_WORKER_COLUMNS.index("uptime_s")] = format_duration(worker.get("uptime_s"))
        rows.append(row)
    headers = ["slot", "pid", "cpu", "gen", "state", "uptime", "requests", "restarts"]
    return format_table(headers, rows)


def _print_warnings(result: Any) -> None:
    """Print the warnings of a reload or upgrade result to stderr: what the master could not apply."""
    for warning in result.get("warnings", []) if isinstance(result, dict) else []:
        click.echo(f"nexusctl: warning: {warning}", err=True)


def _other_config_note(socket_config: str | None, reloaded: str | None) -> str | None:
    """Return a note when --config names another file than the one the master reloaded, else None."""
    if socket_config is None or reloaded is None or os.path.realpath(socket_config) == os.path.realpath(reloaded):
        return None
    return (
        f"the master reloaded {reloaded}, not {socket_config}: --config only locates the admin socket, and the master "
        "always reloads the file it was started with. To serve another file, copy it over that one and reload, "
        "or restart the master with `nexus run --config FILE`."
    )


def _action_text(verb: str, result: Any) -> str:
    if not isinstance(result, dict) or not result:
        return verb
    return f"{verb}\n{format_value(result)}"


def format_duration(seconds: float | None) -> str:
    """Render seconds as `45s`, `12m 5s`, `3h 2m` or `4d 1h`."""
    if seconds is None:
        return "-"
    total = int(seconds)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"
