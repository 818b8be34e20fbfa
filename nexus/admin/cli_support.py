"""Options and output shared by every nexusctl verb that talks to the master.

`admin_command` adds the options `--socket PATH`, `--config FILE`, `--json`
and `--timeout SECONDS` to a click command and passes it an `AdminClient`
for the chosen socket and an `Output` that prints results as text or JSON.
The socket is, in order: `--socket`, the `admin.socket` of `--config`
(either may also be given before the verb: `nexusctl --config FILE status`),
else the default path (`$RUNTIME_DIRECTORY/admin.sock` under systemd, else
/run/nexus/admin.sock).

Exit statuses of every such verb:
  0  success
  1  the master rejected or failed the request (such as an invalid config
     on reload), or sent no response in time
  2  usage error, an invalid --config file, or a --socket path that is
     not a socket (such as the config file)
  3  master not running: no socket, or nothing accepts on it
  4  permission denied on the admin socket
"""

from __future__ import annotations

import functools
import inspect
import json
import sys
from collections.abc import Callable
from typing import Any

import click

from nexus.admin.client import DEFAULT_TIMEOUT, AdminClient, AdminClientError
from nexus.admin.paths import default_socket_path, socket_path
from nexus.config import Admin, ConfigError

__all__ = [
    "EXIT_STATUS_HELP",
    "Output",
    "admin_command",
    "chosen_config",
    "config_option",
    "format_table",
    "resolve_socket",
    "socket_option",
]

EXIT_STATUS_HELP = (
    "Exit status: 0 success; 1 the master rejected or failed the request; 2 usage error, invalid --config "
    "file, or --socket not a socket; 3 master not running; 4 permission denied on the admin socket."
)


class Output:
    """Prints a verb's result: JSON with --json, else the verb's text."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json

    def show(self, result: Any, text: Callable[[Any], str] | None = None) -> None:
        """Print `result` as JSON, or as `text(result)`, or as aligned `key  value` lines."""
        if self.as_json:
            click.echo(json.dumps(result, indent=2, sort_keys=True))
            return
        click.echo((text or format_value)(result))

    def error(self, message: str, exit_status: int) -> None:
        """With --json, print a failure as `{"error": ..., "exit_status": ...}`, so scripts always get JSON.

        The message goes to stderr as well, as without --json (the caller prints it).
        """
        if self.as_json:
            click.echo(json.dumps({"error": message, "exit_status": exit_status}, indent=2, sort_keys=True))


def resolve_socket(socket_option: str | None, config_option: str | None) -> tuple[str, str | None]:
    """Return the admin socket path from the options, and how to find the master if it is not there.

    The second value is advice for the "master not running" error, or None
    for the general advice (start the master, or name its socket).
    """
    if socket_option:
        return socket_option, None
    if config_option:
        admin = _read_admin_section(config_option)
        path = socket_path(admin, config_option)
        if admin.socket is None:
            return path, (
                f"{config_option} sets no admin.socket, so this is the default path. Start the master, or, if it "
                "runs with another socket, pass --socket PATH"
            )
        return path, (
            f"This is admin.socket in {config_option}. If you changed it since the master started or last "
            "reloaded, the master still listens on the old path until it reloads: pass --socket OLD_PATH, "
            "for example to reload. Otherwise start the master"
        )
    return default_socket_path(), None


class ConfigFileError(click.ClickException):
    """A --config file nexusctl cannot read the admin socket path from; nexusctl exits 2, as for a usage error."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        # As every other nexusctl error, not click's "Error:" form.
        click.echo(f"nexusctl: {self.format_message()}", err=True)


def _read_admin_section(config_path: str) -> Admin:
    """Read only the admin section, so nexusctl reload works while other sections are invalid.

    The master validates the whole file on reload and reports every error;
    nexusctl only needs to know where the socket is.
    """
    from nexus.config.checks import _check_admin
    from nexus.config.decode import convert_section
    from nexus.config.yaml_loader import _parse_yaml

    bypass = "or pass the socket with --socket PATH"
    try:
        with open(config_path, "rb") as file:
            data = file.read()
    except OSError as exc:
        raise ConfigFileError(
            f"cannot read the config file {config_path}: {exc.strerror or exc}; fix --config, {bypass}"
        ) from None
    try:
        raw = _parse_yaml(data, config_path)
    except ConfigError as exc:
        # The loader's message starts with the path, which this one already names.
        problem = str(exc).removeprefix(f"{config_path}: ")
        raise ConfigFileError(
            f"cannot read the admin socket path from {config_path}: {problem}. Fix the file (the master would "
            f"reject it too), {bypass}"
        ) from None
    try:
        admin = convert_section(raw.get("admin") or {}, Admin, "admin")
        # The same checks as `nexus check`, except clashes with `listen`, which nexusctl does not read.
        _check_admin(admin, [])
    except ConfigError as exc:
        raise ConfigFileError(f"invalid config {config_path}: {exc}; fix it, {bypass}") from None
    return admin


def chosen_config(ctx: click.Context) -> str | None:
    """Return the --config FILE given to the verb or, before the verb, to nexusctl; None without one."""
    return ctx.params.get("config_option") or ctx.find_root().params.get("config_option")


def socket_option(help_text: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Return the `--socket PATH` option, shared by the nexusctl group and each verb."""
    return click.option("--socket", "socket_option", metavar="PATH", help=help_text)


def config_option(help_text: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Return the `--config FILE` option, shared by the nexusctl group and each verb."""
    return click.option(
        "--config", "-c", "config_option", metavar="FILE", type=click.Path(dir_okay=False), help=help_text
    )


def admin_command(function: Callable[..., None]) -> Callable[..., None]:
    """Add the admin options to a click command; the command gets `client` and `output`.

    Apply it below `@group.command()`. An AdminClientError raised by the
    command is printed to stderr and ends nexusctl with its exit status.
    """

    @socket_option("Admin socket of the master (default: see --config).")
    @config_option(
        "Config file to read admin.socket from; without --socket or --config, $RUNTIME_DIRECTORY/admin.sock "
        "under systemd, else /run/nexus/admin.sock."
    )
    @click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
    @click.option(
        "--timeout",
        metavar="SECONDS",
        type=click.FloatRange(min=0, min_open=True),
        default=DEFAULT_TIMEOUT,
        show_default=True,
        help="Seconds to wait for the master's response.",
    )
    @click.pass_context
    @functools.wraps(function)
    def wrapper(
        ctx: click.Context,
        socket_option: str | None,
        config_option: str | None,
        as_json: bool,
        timeout: float,
        **kwargs: Any,
    ) -> None:
        output = Output(as_json)
        try:
            path, not_running_hint = resolve_socket(
                socket_option or ctx.find_root().params.get("socket_option"), chosen_config(ctx)
            )
        except ConfigFileError as exc:
            output.error(exc.message, exc.exit_code)
            raise
        client = AdminClient(path, timeout=timeout, not_running_hint=not_running_hint)
        try:
            function(client=client, output=output, **kwargs)
        except AdminClientError as exc:
            output.error(exc.message, exc.exit_status)
            click.echo(f"nexusctl: {exc.message}", err=True)
            sys.exit(exc.exit_status)

    if wrapper.__doc__:
        # Dedent first: the appended paragraph has no indent, so click would keep the docstring's.
        wrapper.__doc__ = inspect.cleandoc(wrapper.__doc__) + "\n\n" + EXIT_STATUS_HELP
    return wrapper


def format_value(value: Any) -> str:
    """Render a JSON result for people: a mapping as `key  value` lines, a list of mappings as a table."""
    if isinstance(value, dict):
        scalars = {key: item for key, item in value.items() if not isinstance(item, (dict, list))}
        width = max((len(str(key)) for key in scalars), default=0)
        lines = [f"{key:<{width}}  {_scalar(item)}" for key, item in scalars.items()]
        for key, item in value.items():
            if isinstance(item, (dict, list)):
                lines += ["", f"{key}:", _indent(format_value(item))]
        return "\n".join(lines)
    if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
        columns = list(dict.fromkeys(key for item in value for key in item))
        return format_table(columns, [[item.get(column) for column in columns] for item in value])
    if isinstance(value, list):
        return "\n".join(_scalar(item) for item in value) or "(none)"
    return _scalar(value)


def format_table(headers: list[str], rows: list[list[Any]]) -> str:
    """Render rows under upper-case headers in left-aligned columns."""
    cells = [[header.upper() for header in headers]] + [[_scalar(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def _scalar(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.1f}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _indent(text: str) -> str:
    return "\n".join(f"  {line}" if line else line for line in text.splitlines())
