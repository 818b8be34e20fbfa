"""The entry points: `load_config` for a file and `parse_config` for text."""

from __future__ import annotations

import os

from nexus.config.checks import _validate
from nexus.config.decode import _convert
from nexus.config.model import Config, ConfigError
from nexus.config.yaml_loader import _parse_yaml


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, decode and validate the config file at `path`."""
    source = os.fspath(path)
    try:
        with open(path, "rb") as file:
            text = file.read()
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read the config file: {exc.strerror or exc}") from exc
    return parse_config(text, source=source)


def parse_config(text: bytes | str, source: str = "<config>") -> Config:
    """Decode and validate config text. `source` names the text in file-level errors."""
    raw = _parse_yaml(text, source)
    config = _convert(raw)
    _validate(config)
    return config
