"""The admin API's client: one HTTP/1.1 request per connection over the Unix socket.

Every failure becomes an `AdminClientError` whose message states what
failed and what the operator can do, and whose `exit_status` nexusctl
exits with (the table is in `nexus.admin.cli_support`).
"""

from __future__ import annotations

import http.client
import os
import socket
import stat
from typing import Any
from urllib.parse import urlencode

import msgspec

from nexus.admin.paths import default_socket_path
from nexus.admin.unix_socket import describe_owner

__all__ = [
    "EXIT_FAILED",
    "EXIT_NOT_RUNNING",
    "EXIT_PERMISSION",
    "EXIT_USAGE",
    "AdminClient",
    "AdminClientError",
]

# nexusctl's exit statuses for the ways a request can fail. 0 is success
# and 2 a usage error or an invalid config file, as for `nexus check`.
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3
EXIT_PERMISSION = 4

# Default wait for the master's response, in seconds. Reload and upgrade
# respond only once the new generation serves, which can take a while.
DEFAULT_TIMEOUT = 120.0


class AdminClientError(Exception):
    """A failed admin request: the message is for the operator, `status` is the HTTP status if one came back."""

    def __init__(self, message: str, exit_status: int = EXIT_FAILED, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.exit_status = exit_status
        self.status = status


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        # The Host field is required by HTTP/1.1; the socket path is the real address.
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.unix_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class AdminClient:
    """Sends requests to the admin API of the master listening on `path`."""

    def __init__(self, path: str, timeout: float = DEFAULT_TIMEOUT, not_running_hint: str | None = None) -> None:
        self.path = path
        self.timeout = timeout
        # Where the path came from and what to do when no master is there,
        # such as "--config names no admin.socket, so this is the default".
        self.not_running_hint = not_running_hint

    def call(self, method: str, path: str, body: Any = None, query: dict[str, str] | None = None) -> Any:
        """Send one request and return the decoded JSON result, or raise AdminClientError."""
        target = f"{path}?{urlencode(query)}" if query else path
        payload = msgspec.json.encode(body) if body is not None else None
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        connection = _UnixConnection(self.path, self.timeout)
        try:
            connection.request(method, target, body=payload, headers=headers)
            response = connection.getresponse()
            data = response.read()
        except OSError as exc:
            raise self._connection_error(exc) from exc
        except http.client.HTTPException as exc:
            raise AdminClientError(f"invalid response from the master on {self.path}: {exc!r}") from exc
        finally:
            connection.close()
        return self._decode(response, data)

    def _decode(self, response: http.client.HTTPResponse, data: bytes) -> Any:
        try:
            document = msgspec.json.decode(data) if data else None
        except msgspec.DecodeError:
            raise AdminClientError(
                f"invalid response from the master on {self.path}: status {response.status}, "
                f"body not JSON: {data[:200]!r}",
                status=response.status,
            ) from None
        if response.status >= 400:
            detail = document.get("detail") if isinstance(document, dict) else None
            raise AdminClientError(
                detail or f"the master responded {response.status} {response.reason}", status=response.status
            )
        return document

    def _connection_error(self, exc: OSError) -> AdminClientError:
        """Translate a socket error into what it means for the operator."""
        choose = "pass --socket PATH, or --config FILE to read admin.socket from the config"
        if isinstance(exc, FileNotFoundError):
            if self.not_running_hint is not None:
                return AdminClientError(f"master not running: no admin socket at {self.path}. {self.not_running_hint}.", EXIT_NOT_RUNNING)
            return AdminClientError(
                f"master not running: no admin socket at {self.path}. Start it (systemctl start nexus, or "
                f"nexus run --config FILE), or, if it runs with another socket, {choose}.",
                EXIT_NOT_RUNNING,
            )
        not_socket = self._not_socket_error()
        if not_socket is not None:
            return not_socket
        if isinstance(exc, ConnectionRefusedError):
            return AdminClientError(
                f"master not running: nothing accepts connections on {self.path} (a socket left by a master that "
                f"stopped). Start the master, or, if it runs with another socket, {choose}.",
                EXIT_NOT_RUNNING,
            )
        if isinstance(exc, PermissionError):
            return AdminClientError(self._permission_message(), EXIT_PERMISSION)
        if isinstance(exc, ConnectionResetError):
            return AdminClientError(
                f"the master on {self.path} closed the connection before responding (it may have stopped): "
                "check `nexusctl status` and the master's log"
            )
        if isinstance(exc, TimeoutError):
            return AdminClientError(
                f"no response from the master on {self.path} within {self.timeout:g} s: it may still be working; "
                "check `nexusctl status` and the master's log, or pass a longer --timeout",
            )
        return AdminClientError(f"admin request to {self.path} failed: {exc.strerror or exc}")

    def _not_socket_error(self) -> AdminClientError | None:
        """Return the error for a path that exists but is no socket, such as the config file passed as --socket."""
        try:
            mode = os.stat(self.path).st_mode
        except OSError:
            return None
        if stat.S_ISSOCK(mode):
            return None
        kind = {stat.S_IFREG: "a regular file", stat.S_IFDIR: "a directory"}.get(stat.S_IFMT(mode), "a special file")
        return AdminClientError(
            f"{self.path} is {kind}, not the master's admin socket. The socket is admin.socket in the master's "
            f"config (pass --config FILE to read it from there), else {default_socket_path()}; pass that path "
            "with --socket PATH.",
            EXIT_USAGE,
        )

    def _permission_message(self) -> str:
        try:
            owner = describe_owner(os.stat(self.path))
        except PermissionError:
            return (
                f"permission denied: cannot reach the admin socket {self.path} because a directory on its path "
                "is closed to this user. Run nexusctl as the service user or with sudo."
            )
        return (
            f"permission denied on the admin socket {self.path} ({owner}). Run nexusctl as that user or with sudo, "
            'or set admin.socket_group to a group you belong to and admin.socket_mode to "0660".'
        )
