"""The admin socket path rule, shared by the master and nexusctl.

`admin.socket` in the config names the path. A relative path is taken
relative to the config file's directory, so `nexusctl --config FILE` finds
the socket from any working directory. Null means the systemd runtime
directory (`$RUNTIME_DIRECTORY/admin.sock`, set by `RuntimeDirectory=nexus`
in nexus.service), else /run/nexus/admin.sock.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from nexus.config import Admin

__all__ = ["DEFAULT_SOCKET", "MAX_SOCKET_PATH", "default_socket_path", "socket_path"]

DEFAULT_SOCKET = "/run/nexus/admin.sock"

# sun_path in struct sockaddr_un is 108 bytes on Linux, including the
# terminating NUL byte.
MAX_SOCKET_PATH = 107


def default_socket_path(env: Mapping[str, str] = os.environ) -> str:
    """Return the socket path used when the config gives none."""
    runtime_directory = env.get("RUNTIME_DIRECTORY")
    if runtime_directory:
        # systemd joins several RuntimeDirectory= entries with ":"; the
        # first is the service's own.
        return os.path.join(runtime_directory.split(":")[0], "admin.sock")
    return DEFAULT_SOCKET


def socket_path(admin: Admin, config_path: str | None, env: Mapping[str, str] = os.environ) -> str:
    """Return the absolute admin socket path for a config read from `config_path`."""
    if admin.socket is None:
        return default_socket_path(env)
    if os.path.isabs(admin.socket) or config_path is None:
        return os.path.abspath(admin.socket)
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(config_path)), admin.socket))
