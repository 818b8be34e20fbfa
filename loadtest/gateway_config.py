"""Write the gateway config of a load test run from loadtest/nexus.yaml."""

from __future__ import annotations

from pathlib import Path

import yaml

TEMPLATE = Path(__file__).resolve().parent / "nexus.yaml"
UPSTREAM = "app"
CACHED_ROUTE = "catalog"


def render_config(
    upstream_url: str,
    concurrency: bool = True,
    workers: int | None = None,
    limits: dict | None = None,
    cache: bool = False,
    observability: dict | None = None,
) -> str:
    """Return loadtest/nexus.yaml as YAML text, aimed at `upstream_url`.

    With `concurrency` false the upstream's adaptive limit is removed, for
    runs that show the gateway without it. `workers` replaces the worker
    count and `limits` replaces keys of the `concurrency` section when given.
    With `cache` the catalog route caches responses (the zipf workload).
    `observability` is merged into the top level: the `admin` and
    `access_log` sections of a run.
    """
    config = yaml.safe_load(TEMPLATE.read_text())
    upstream = config["upstreams"][UPSTREAM]
    upstream["targets"] = [upstream_url]
    if not concurrency:
        del upstream["concurrency"]
    elif limits:
        upstream["concurrency"].update(limits)
    if workers is not None:
        config["workers"] = workers
    config.update(observability or {})
    if cache:
        for route in config["routes"]:
            if route["name"] == CACHED_ROUTE:
                route["cache"] = {"enabled": True}
    header = "# Generated from loadtest/nexus.yaml for a load test run; edit that file, not this one.\n"
    return header + yaml.safe_dump(config, sort_keys=False)


def write_config(path: Path, upstream_url: str, **options) -> Path:
    """Write `render_config(upstream_url, **options)` to `path`."""
    path.write_text(render_config(upstream_url, **options))
    return path


def concurrency_settings(limits: dict | None = None) -> dict:
    """Return the `concurrency` section of loadtest/nexus.yaml with `limits` applied, for reports."""
    settings = yaml.safe_load(TEMPLATE.read_text())["upstreams"][UPSTREAM]["concurrency"]
    return {**settings, **(limits or {})}
