"""Creating, checking and removing the admin API's Unix socket.

The socket is bound under a temporary name in the same directory, given
its mode and group, then renamed onto the configured path. The rename is
atomic, so a client never sees the socket with the wrong permissions, and
a new master replaces the path of a running one without a moment when the
path is missing (the upgrade's handover). A master removes the path at exit
only while the path still refers to the socket it bound, so the master
that exits last never removes its successor's socket.
"""

from __future__ import annotations

import errno
import grp
import logging
import os
import pwd
import socket
import stat
import struct
from dataclasses import dataclass

from nexus.admin.paths import MAX_SOCKET_PATH

__all__ = [
    "AdminSocketError",
    "BoundSocket",
    "bind_admin_socket",
    "describe_owner",
    "peer_credentials",
    "set_permissions",
]

log = logging.getLogger("nexus.admin")

# Pending connections on the admin socket; nexusctl opens one at a time.
BACKLOG = 16
# How long probing an existing socket may take, in seconds.
PROBE_TIMEOUT = 1.0


class AdminSocketError(Exception):
    """The admin socket cannot be created; the message names the path and the fix."""


@dataclass(frozen=True, slots=True)
class BoundSocket:
    """A listening admin socket and the identity of the file it was bound to."""

    sock: socket.socket
    path: str
    device: int
    inode: int

    def is_at_path(self) -> bool:
        """Return whether `path` still refers to this socket's file."""
        try:
            info = os.lstat(self.path)
        except FileNotFoundError:
            return False
        return (info.st_dev, info.st_ino) == (self.device, self.inode)

    def close(self, *, unlink: bool = True) -> None:
        """Close the socket and, with `unlink`, remove the path if it is still ours."""
        owned = unlink and self.is_at_path()
        self.sock.close()
        if owned:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


def bind_admin_socket(path: str, mode: str, group: str | None, *, replace_live: bool = False) -> BoundSocket:
    """Create the listening admin socket at `path`, or raise AdminSocketError.

    A stale socket left by a master that died is replaced. A socket that a
    live process still accepts on is replaced only with `replace_live`,
    which the new master of an upgrade uses once it serves.
    """
    _check_length(path)
    _make_directory(os.path.dirname(path))
    _check_existing(path, replace_live)

    temporary = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}")
    _remove_quietly(temporary)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(temporary)
        set_permissions(temporary, mode, group)
        sock.listen(BACKLOG)
        os.rename(temporary, path)
        info = os.lstat(path)
    except (OSError, AdminSocketError) as exc:
        sock.close()
        _remove_quietly(temporary)
        if isinstance(exc, AdminSocketError):
            raise
        raise AdminSocketError(f"cannot create the admin socket {path}: {exc.strerror or exc}{_hint(exc)}") from exc
    return BoundSocket(sock, path, info.st_dev, info.st_ino)


def _check_length(path: str) -> None:
    size = len(os.fsencode(path))
    # The temporary name adds a leading dot, a dot before the pid, and the pid (up to 7 digits).
    if size + 9 > MAX_SOCKET_PATH:
        raise AdminSocketError(
            f"admin socket path {path} is {size} bytes long: a Unix socket path is limited to "
            f"{MAX_SOCKET_PATH} bytes (and Nexus needs 9 more for a temporary name): set admin.socket to a shorter path"
        )


def _make_directory(directory: str) -> None:
    try:
        os.makedirs(directory, mode=0o755, exist_ok=True)
    except OSError as exc:
        raise AdminSocketError(
            f"cannot create the admin socket directory {directory}: {exc.strerror or exc}: set admin.socket "
            "to a path in a directory you can write, or run under systemd with RuntimeDirectory=nexus"
        ) from exc


def _check_existing(path: str, replace_live: bool) -> None:
    """Reject a path that is not a socket, or that a running master still serves on."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(info.st_mode):
        raise AdminSocketError(
            f"admin socket path {path} is a directory: set admin.socket to a socket file in it, such as "
            f"{os.path.join(path, 'admin.sock')}"
        )
    if not stat.S_ISSOCK(info.st_mode):
        raise AdminSocketError(
            f"admin socket path {path} exists and is not a socket: remove it or set admin.socket to another path"
        )

    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(PROBE_TIMEOUT)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        log.info("replacing stale admin socket path=%s", path)
        return
    except OSError as exc:
        raise AdminSocketError(f"cannot check the existing admin socket {path}: {exc.strerror or exc}") from exc
    else:
        pid = peer_credentials(probe)[0]
    finally:
        probe.close()

    if not replace_live:
        raise AdminSocketError(
            f"another process (pid {pid}) serves on the admin socket {path}: another master is running. "
            "Stop it first, or give this one another admin.socket"
        )
    log.info("taking over admin socket path=%s previous_pid=%d", path, pid)


def set_permissions(path: str, mode: str, group: str | None) -> None:
    """Give the socket file at `path` the octal `mode` (such as "0660") and `group`."""
    gid = _group_id(group)
    try:
        os.chmod(path, int(mode, 8))
        if gid is not None:
            os.chown(path, -1, gid)
    except OSError as exc:
        raise AdminSocketError(
            f"cannot set mode {mode} and group {group or '-'} on the admin socket {path}: "
            f"{exc.strerror or exc}{_hint(exc)}"
        ) from exc


def _group_id(group: str | None) -> int | None:
    if group is None:
        return None
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise AdminSocketError(
            f"admin.socket_group: unknown group {group!r}: create it (groupadd {group}) "
            "or set socket_group to an existing group"
        ) from None


def _hint(exc: OSError) -> str:
    if exc.errno == errno.EPERM:
        return ": the master can give the socket only to a group its user belongs to (or run it as root)"
    if exc.errno == errno.EACCES:
        return ": set admin.socket to a path in a directory the master's user can write"
    return ""


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """Return (pid, uid, gid) of the process at the other end of a connected Unix socket."""
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", data)
    return pid, uid, gid


def describe_owner(info: os.stat_result) -> str:
    """Describe a file's mode, owner and group as `mode 0600, owner nexus:nexus`."""
    return f"mode {stat.S_IMODE(info.st_mode):04o}, owner {_user_name(info.st_uid)}:{_group_name(info.st_gid)}"


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)
