"""Command-line entry points: `nexus` runs the gateway, `nexusctl` operates it.

`nexus run` starts the master in the foreground and logs to stderr, as a
systemd service expects. `nexus check` and `nexusctl check` validate a
config file without serving and exit non-zero with the error's path and
value when it is invalid. `nexusctl key new` and `nexusctl key hash` make
API keys and the hashes that the config stores in their place. The verbs
that operate a running master (status, workers, reload, upgrade, drain,
resume) are in `nexus.admin.commands`.
"""

from __future__ import annotations

import json
import logging
import os
import sys

import click

from nexus import __version__
from nexus.admin.cli_support import EXIT_STATUS_HELP, config_option, socket_option
from nexus.admin.commands import COMMANDS as ADMIN_COMMANDS
from nexus.config import ConfigError, load_config

__all__ = ["nexus", "nexusctl"]

_LOG_LEVELS = ("debug", "info", "warning", "error")


def _setup_logging(level: str) -> None:
    """Log to stderr; under journald the journal adds its own timestamps."""
    under_journald = "JOURNAL_STREAM" in os.environ
    fmt = "%(levelname)s %(name)s %(message)s" if under_journald else "%(asctime)s %(levelname)s %(name)s %(message)s"
    logging.basicConfig(level=level.upper(), format=fmt, stream=sys.stderr)
    # granian logs a line per worker runtime start and stop; Nexus logs its own.
    logging.getLogger("_granian").setLevel(logging.WARNING)


def _load_or_exit(path: str):
    try:
        return load_config(path)
    except ConfigError as exc:
        message = str(exc)
        # Messages about the file itself already start with its path.
        prefix = "" if message.startswith(path) else f"{path}: "
        # `nexusctl check` shares this: name the program that was run.
        program = click.get_current_context(silent=True)
        name = program.find_root().command.name if program is not None else None
        click.echo(f"{name or 'nexus'}: invalid config {prefix}{message}", err=True)
        sys.exit(2)


@click.group()
@click.version_option(__version__, prog_name="nexus")
def nexus() -> None:
    """Nexus API gateway."""


@nexus.command()
@click.option("--config", "-c", "config_path", required=True, type=click.Path(dir_okay=False), help="Config file (YAML).")
@click.option("--log-level", type=click.Choice(_LOG_LEVELS), default="info", show_default=True, help="Lowest level logged to stderr.")
def run(config_path: str, log_level: str) -> None:
    """Run the gateway in the foreground until SIGTERM or SIGINT."""
    from nexus.master import Master

    _setup_logging(log_level)
    config = _load_or_exit(config_path)
    logging.getLogger("nexus.master").info("config loaded path=%s", os.path.abspath(config_path))
    sys.exit(Master(config, config_path).run())


@nexus.command()
@click.option("--config", "-c", "config_path", required=True, type=click.Path(dir_okay=False), help="Config file (YAML).")
def check(config_path: str) -> None:
    """Validate a config file without serving; exit 2 if it is invalid."""
    config = _load_or_exit(config_path)
    click.echo(
        f"{config_path}: ok (routes: {len(config.routes)}, upstreams: {len(config.upstreams)}, "
        f"workers: {config.worker_count()})"
    )


@click.group(epilog=EXIT_STATUS_HELP)
@click.version_option(__version__, prog_name="nexusctl")
@socket_option("Admin socket of the master, for every verb below.")
@config_option("Config file: verbs read admin.socket from it, and `check` validates it.")
def nexusctl(socket_option: str | None, config_option: str | None) -> None:
    """Operate a running Nexus gateway through the master's admin socket.

    The socket is --socket PATH, else admin.socket in --config FILE, else
    $RUNTIME_DIRECTORY/admin.sock under systemd, else /run/nexus/admin.sock.
    """


@nexusctl.command("check")
@click.option(
    "--config",
    "-c",
    "config_path",
    type=click.Path(dir_okay=False),
    help="Config file (YAML); default: nexusctl's --config.",
)
@click.pass_context
def nexusctl_check(ctx: click.Context, config_path: str | None) -> None:
    """Validate a config file without serving; exit 2 if it is invalid."""
    config_path = config_path or ctx.find_root().params.get("config_option")
    if config_path is None:
        raise click.UsageError("give the config file: nexusctl check --config FILE")
    ctx.invoke(check, config_path=config_path)


for _command in ADMIN_COMMANDS:
    nexusctl.add_command(_command)


@nexusctl.group()
def key() -> None:
    """Make API keys and the hashes the config stores for them."""


@key.command("new")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of two lines.")
def key_new(as_json: bool) -> None:
    """Make a random API key; print it (give it to the consumer) and its hash (put it in the config)."""
    from nexus.auth import hash_key, new_key

    value = new_key()
    if as_json:
        click.echo(json.dumps({"key": value, "hash": hash_key(value)}))
        return
    click.echo(f"key:  {value}")
    click.echo(f"hash: {hash_key(value)}")


@key.command("hash")
@click.argument("value", required=False)
def key_hash_command(value: str | None) -> None:
    """Print the hash of an API key for the config (the key is read from stdin when not given)."""
    from nexus.auth import hash_key

    if value is None:
        # Reading from stdin keeps the key out of shell history and process lists.
        value = sys.stdin.readline()
    # Keys never contain white space; a copied key often carries some.
    value = value.strip()
    if not value:
        click.echo("nexusctl: no API key given: pass it as an argument or on standard input", err=True)
        sys.exit(2)
    click.echo(hash_key(value))


# Commands defined by other modules, one line each.
from nexus.observability.cli import access_log, top  # noqa: E402 - after nexusctl exists

nexusctl.add_command(top)
nexusctl.add_command(access_log)
from nexus.cache.cli import cache_stats, purge  # noqa: E402 - after nexusctl exists

nexusctl.add_command(purge)
nexusctl.add_command(cache_stats)
