"""The admin API server on a real Unix socket, with a stand-in master.

Each test starts `AdminServer` in this process on a socket in its own
directory and talks to it with `AdminClient` or raw HTTP over the socket.
"""

from __future__ import annotations

import grp
import json
import logging
import os
import signal
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from admin_support import StandInMaster, temporary_socket_dir

from nexus.admin import AdminClient, AdminClientError, AdminServer, AdminSocketError
from nexus.admin.paths import socket_path
from nexus.admin.server import MAX_CONNECTIONS
from nexus.config import ConfigError, parse_config
from nexus.services import AdminError


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    with temporary_socket_dir() as directory:
        yield directory


@pytest.fixture
def served(socket_dir: Path) -> Iterator[tuple[StandInMaster, AdminServer, AdminClient]]:
    master = StandInMaster(str(socket_dir / "admin.sock"))
    server = AdminServer(master)
    server.start()
    yield master, server, AdminClient(str(socket_dir / "admin.sock"), timeout=10)
    master.release_reload.set()
    server.stop()


def raw_request(path: str, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes on a new connection; return the status, header fields (lower-case names) and body."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        sock.sendall(request)
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except ConnectionResetError:
            # A server that closes with part of the request unread resets
            # the connection after the response; the response is complete.
            if not data:
                raise
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    fields = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), fields, body


def test_status_and_workers(served) -> None:
    master, _, client = served
    status = client.call("GET", "/status")
    assert status["generation"] == 1
    assert [worker["pid"] for worker in status["workers"]] == [101, 102]
    workers = client.call("GET", "/workers")
    assert workers["generation"] == 1
    assert [worker["slot"] for worker in workers["workers"]] == [0, 1]
    assert master.calls == ["status", "status"]


@pytest.mark.parametrize(
    ("method", "path", "call", "key", "value"),
    [
        ("POST", "/reload", "reload", "generation", 2),
        ("POST", "/upgrade", "upgrade", "pid", 4242),
        ("POST", "/drain", "drain", "state", "draining"),
        ("POST", "/resume", "resume", "state", "running"),
    ],
)
def test_verbs_call_master(served, method, path, call, key, value) -> None:
    master, _, client = served
    result = client.call(method, path)
    assert result[key] == value
    assert master.calls == [call]


def test_unknown_route_is_404_problem(served) -> None:
    _, server, _ = served
    status, fields, body = raw_request(server.path, b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 404
    assert fields["content-type"] == "application/problem+json"
    problem = json.loads(body)
    assert problem["status"] == 404
    assert problem["title"] == "Not Found"
    assert problem["type"] == "about:blank"
    assert "GET /status" in problem["detail"]


def test_wrong_method_is_405_with_allow(served) -> None:
    _, server, _ = served
    status, fields, body = raw_request(server.path, b"GET /reload HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 405
    assert fields["allow"] == "POST"
    assert b"use POST" in body
    assert fields["content-type"] == "application/problem+json"


def test_bad_json_is_400(served) -> None:
    master, server, _ = served
    body = b"{not json"
    request = b"POST /reload HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )
    status, fields, response = raw_request(server.path, request)
    assert status == 400
    assert fields["content-type"] == "application/problem+json"
    assert b"invalid JSON body" in response
    assert master.calls == []


def test_malformed_request_line_is_problem(served) -> None:
    _, server, _ = served
    status, fields, body = raw_request(server.path, b"NONSENSE\r\n\r\n")
    assert status == 400
    assert fields["content-type"] == "application/problem+json"
    assert b'"status":400' in body


def test_handler_exception_is_500_and_logged(served, caplog) -> None:
    master, _, client = served
    master.crash_status = True
    with caplog.at_level(logging.ERROR, logger="nexus.admin"):
        with pytest.raises(AdminClientError) as error:
            client.call("GET", "/status")
    assert error.value.status == 500
    assert "see the master's log" in error.value.message
    assert any("admin request failed" in record.message and record.exc_info for record in caplog.records)
    # The server thread survived: the next request is served.
    master.crash_status = False
    assert client.call("GET", "/status")["generation"] == 1


def test_admin_error_status_and_detail(served) -> None:
    master, _, client = served
    master.reload_error = AdminError(422, '/etc/nexus/nexus.yaml: routes[0].upstream: unknown upstream "billing"')
    with pytest.raises(AdminClientError) as error:
        client.call("POST", "/reload")
    assert error.value.status == 422
    assert error.value.message == master.reload_error.message
    assert master.generation == 1


def test_blocked_verb_does_not_block_status(served) -> None:
    master, _, client = served
    master.release_reload.clear()
    results = []
    thread = threading.Thread(target=lambda: results.append(client.call("POST", "/reload")))
    thread.start()
    assert master.reload_started.wait(10)
    # The reload is still running in its own thread, and status is served meanwhile.
    assert client.call("GET", "/status")["generation"] == 1
    master.release_reload.set()
    thread.join(10)
    # The admin server adds the file the master reloaded to the master's reply.
    assert results == [{"generation": 2, "config_hash": "cd" * 32, "config_path": master.config_path}]


def test_default_socket_mode_is_0600(served) -> None:
    _, server, _ = served
    assert stat.S_IMODE(os.stat(server.path).st_mode) == 0o600
    assert stat.S_ISSOCK(os.stat(server.path).st_mode)


def test_mode_and_group_applied(socket_dir: Path) -> None:
    group = grp.getgrgid(os.getgid() if os.getgid() != 0 else 1)  # gid 1 is "daemon" on Debian
    master = StandInMaster(str(socket_dir / "admin.sock"), f'socket_mode: "0660", socket_group: {group.gr_name}')
    server = AdminServer(master)
    server.start()
    try:
        info = os.stat(server.path)
        assert stat.S_IMODE(info.st_mode) == 0o660
        assert info.st_gid == group.gr_gid
    finally:
        server.stop()


def test_unknown_group_rejected(socket_dir: Path) -> None:
    master = StandInMaster(str(socket_dir / "admin.sock"), "socket_group: no-such-group-xyz")
    with pytest.raises(AdminSocketError, match="unknown group 'no-such-group-xyz'"):
        AdminServer(master).start()
    assert os.listdir(socket_dir) == []


def test_stop_removes_socket(served) -> None:
    _, server, _ = served
    path = server.path
    server.stop()
    assert not os.path.exists(path)
    assert server.path is None


def test_stale_socket_replaced(socket_dir: Path) -> None:
    path = str(socket_dir / "admin.sock")
    # A socket file left by a process that died without removing it.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()
    server = AdminServer(StandInMaster(path))
    server.start()
    try:
        assert AdminClient(path, timeout=10).call("GET", "/status")["generation"] == 1
    finally:
        server.stop()


def test_regular_file_at_path_rejected(socket_dir: Path) -> None:
    path = socket_dir / "admin.sock"
    path.write_text("not a socket")
    with pytest.raises(AdminSocketError, match=r"exists and is not a socket: remove it or set admin.socket"):
        AdminServer(StandInMaster(str(path))).start()
    assert path.read_text() == "not a socket"


def test_live_socket_not_stolen(served) -> None:
    _, first, client = served
    second = AdminServer(StandInMaster(first.path))
    with pytest.raises(AdminSocketError, match=rf"another process \(pid {os.getpid()}\) serves on the admin socket"):
        second.start()
    assert client.call("GET", "/status")["generation"] == 1


def test_replace_live_hands_over_path(served) -> None:
    old_master, old, client = served
    new_master = StandInMaster(old.path)
    new_master.generation = 7
    new = AdminServer(new_master)
    new.start(replace_live=True)
    try:
        assert client.call("GET", "/status")["generation"] == 7
        # The old master exits after the handover and must leave the new socket in place.
        old.stop()
        assert client.call("GET", "/status")["generation"] == 7
    finally:
        new.stop()
    assert not os.path.exists(new_master.config.admin.socket)
    assert old_master.calls == []


def test_forked_child_closes_admin_socket(served) -> None:
    _, server, client = served
    listener_fd = server.fileno()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.fstat(listener_fd)
            os.write(write_end, b"open")
        except OSError:
            os.write(write_end, b"closed")
        os._exit(0)
    os.close(write_end)
    answer = os.read(read_end, 16)
    os.close(read_end)
    os.waitpid(pid, 0)
    assert answer == b"closed"
    assert client.call("GET", "/status")["generation"] == 1


def test_dead_master_socket_is_stale(socket_dir: Path) -> None:
    """A master killed with SIGKILL leaves its socket; the next master replaces it."""
    path = str(socket_dir / "admin.sock")
    pid = os.fork()
    if pid == 0:
        server = AdminServer(StandInMaster(path))
        server.start()
        time.sleep(60)
        os._exit(0)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert os.path.exists(path)
    with pytest.raises(AdminClientError) as error:
        AdminClient(path, timeout=5).call("GET", "/status")
    assert error.value.exit_status == 3
    assert "nothing accepts connections" in error.value.message
    server = AdminServer(StandInMaster(path))
    server.start()
    try:
        assert AdminClient(path, timeout=5).call("GET", "/status")["generation"] == 1
    finally:
        server.stop()


class _PurgeService:
    name = "purge-service"

    def __init__(self) -> None:
        self.seen: list[tuple[dict, object]] = []

    def admin_routes(self):
        def purge(query, body):
            self.seen.append((query, body))
            return {"purged": len(body.get("keys", []))}

        return {("POST", "/cache/purge"): purge}


def test_service_routes_mounted(socket_dir: Path) -> None:
    service = _PurgeService()
    path = str(socket_dir / "admin.sock")
    server = AdminServer(StandInMaster(path), [service])
    server.start()
    try:
        result = AdminClient(path, timeout=10).call(
            "POST", "/cache/purge", body={"keys": ["a", "b"]}, query={"route": "api"}
        )
    finally:
        server.stop()
    assert result == {"purged": 2}
    assert service.seen == [({"route": "api"}, {"keys": ["a", "b"]})]


def test_service_route_conflict_rejected(socket_dir: Path) -> None:
    class Clash:
        name = "clash"

        def admin_routes(self):
            return {("GET", "/status"): lambda query, body: {}}

    with pytest.raises(ValueError, match="admin route GET /status of service clash is already served by master"):
        AdminServer(StandInMaster(str(socket_dir / "admin.sock")), [Clash()])


def test_repeated_query_parameter_is_400(served) -> None:
    _, server, _ = served
    status, _, body = raw_request(server.path, b"GET /status?a=1&a=2 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 400
    assert b"given more than once" in body


def test_reconfigure_moves_socket(served, socket_dir: Path) -> None:
    master, server, _ = served
    old_path = server.path
    new_path = str(socket_dir / "moved.sock")
    server.reconfigure(parse_config(f'admin: {{socket: "{new_path}", socket_mode: "0640", metrics: null}}\n'))
    assert server.path == new_path
    assert not os.path.exists(old_path)
    assert stat.S_IMODE(os.stat(new_path).st_mode) == 0o640
    assert AdminClient(new_path, timeout=10).call("GET", "/status")["generation"] == 1


def test_reconfigure_changes_mode_in_place(served) -> None:
    master, server, _ = served
    server.reconfigure(parse_config(f'admin: {{socket: "{server.path}", socket_mode: "0660", metrics: null}}\n'))
    assert stat.S_IMODE(os.stat(server.path).st_mode) == 0o660


def test_too_long_path_rejected(socket_dir: Path) -> None:
    # The config check rejects a long path as written; a relative one only
    # grows too long once resolved against the config file's directory.
    master = StandInMaster("admin.sock")
    master.config_path = str(socket_dir / ("x" * 100) / "nexus.yaml")
    with pytest.raises(AdminSocketError, match="limited to 107 bytes"):
        AdminServer(master).start()


def test_client_timeout_message(served) -> None:
    master, server, _ = served
    master.release_reload.clear()
    client = AdminClient(server.path, timeout=0.5)
    with pytest.raises(AdminClientError) as error:
        client.call("POST", "/reload")
    assert error.value.exit_status == 1
    assert f"no response from the master on {server.path} within 0.5 s" in error.value.message
    assert "--timeout" in error.value.message


def test_client_connection_closed_message(socket_dir: Path) -> None:
    """A master that dies while handling a request closes the connection without a response."""
    path = str(socket_dir / "closing.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    def accept_and_close() -> None:
        connection, _ = listener.accept()
        connection.recv(65536)
        connection.close()

    thread = threading.Thread(target=accept_and_close)
    thread.start()
    try:
        with pytest.raises(AdminClientError) as error:
            AdminClient(path, timeout=10).call("GET", "/status")
    finally:
        thread.join(10)
        listener.close()
    assert error.value.exit_status == 1
    assert "closed the connection before responding" in error.value.message


@pytest.mark.parametrize(
    ("socket_setting", "config_path", "env", "expected"),
    [
        (None, "/etc/nexus/nexus.yaml", {}, "/run/nexus/admin.sock"),
        (None, "/etc/nexus/nexus.yaml", {"RUNTIME_DIRECTORY": "/run/nexus"}, "/run/nexus/admin.sock"),
        (None, None, {"RUNTIME_DIRECTORY": "/run/nexus-a:/run/nexus-b"}, "/run/nexus-a/admin.sock"),
        ("/srv/admin.sock", "/etc/nexus/nexus.yaml", {"RUNTIME_DIRECTORY": "/run/nexus"}, "/srv/admin.sock"),
        ("../run/admin.sock", "/opt/gw/conf/nexus.yaml", {}, "/opt/gw/run/admin.sock"),
    ],
)
def test_socket_path_rule(socket_setting, config_path, env, expected) -> None:
    admin = parse_config(f"admin: {{socket: {json.dumps(socket_setting)}}}\n").admin
    assert socket_path(admin, config_path, env) == expected


def test_bare_socket_mode_rejected() -> None:
    with pytest.raises(ConfigError) as error:
        parse_config("admin: {socket_mode: 0660}\n")
    assert str(error.value) == (
        "admin.socket_mode: invalid value 432: YAML reads an unquoted mode as a number (0660 as 432); "
        'write the octal bits as a quoted string, such as "0660"'
    )


def test_connections_over_limit_get_503(served) -> None:
    _, server, client = served
    idle = []
    try:
        for _ in range(MAX_CONNECTIONS):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(server.path)
            idle.append(sock)
        # Each idle connection takes a slot once the server has accepted it.
        time.sleep(0.5)
        status, fields, body = raw_request(server.path, b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 503
        assert fields["content-type"] == "application/problem+json"
        assert json.loads(body)["detail"].startswith(f"the admin API has {MAX_CONNECTIONS} connections open")
    finally:
        for sock in idle:
            sock.close()

    def served_again() -> bool:
        try:
            return client.call("GET", "/status")["generation"] == 1
        except AdminClientError:
            return False

    deadline = time.monotonic() + 10
    while not served_again():
        assert time.monotonic() < deadline, "the freed connection slots were not reused"
        time.sleep(0.05)
