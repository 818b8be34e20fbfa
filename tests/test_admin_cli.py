"""nexusctl's admin verbs, run as real processes against an admin server with a stand-in master.

The end-to-end tests against a real `nexus run` are in tests/e2e/test_nexusctl.py.
"""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from admin_support import NEXUSCTL, StandInMaster, run_nexusctl, run_nexusctl_as, temporary_socket_dir

from nexus.admin import AdminServer
from nexus.services import AdminError


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    with temporary_socket_dir() as directory:
        yield directory


NOBODY = 65534


@pytest.fixture
def served(socket_dir: Path) -> Iterator[tuple[StandInMaster, str]]:
    path = str(socket_dir / "admin.sock")
    master = StandInMaster(path)
    server = AdminServer(master)
    server.start()
    yield master, path
    server.stop()


def test_status_text(served) -> None:
    _, path = served
    result = run_nexusctl("status", "--socket", path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"master   pid {os.getpid()}, running, generation 1, up 1m 15s"
    assert "config   /etc/nexus/nexus.yaml (hash abababababab)" in lines
    assert "reloads  0" in lines
    assert "SLOT  PID  CPU  GEN  STATE    UPTIME  REQUESTS  RESTARTS" in lines
    assert "1     102  1    1    serving  1h 1m   7         2" in lines


def test_status_json(served) -> None:
    master, path = served
    result = run_nexusctl("status", "--socket", path, "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["generation"] == 1
    assert [worker["pid"] for worker in status["workers"]] == [101, 102]


def test_workers_table(served) -> None:
    _, path = served
    result = run_nexusctl("workers", "--socket", path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "SLOT  PID  CPU  GEN  STATE    UPTIME  REQUESTS  RESTARTS",
        "0     101  0    1    serving  1m 10s  12        0",
        "1     102  1    1    serving  1h 1m   7         2",
    ]


@pytest.mark.parametrize(
    ("verb", "first_line"),
    [("reload", "reloaded"), ("upgrade", "upgraded"), ("drain", "drained"), ("resume", "resumed")],
)
def test_action_verbs(served, verb, first_line) -> None:
    master, path = served
    result = run_nexusctl(verb, "--socket", path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == first_line
    assert master.calls == [verb]


def test_reload_rejected_prints_config_error(served) -> None:
    master, path = served
    message = '/etc/nexus/nexus.yaml: routes[0].upstream: unknown upstream "billing" (defined: catalog)'
    master.reload_error = AdminError(422, message)
    result = run_nexusctl("reload", "--socket", path)
    assert result.returncode == 1
    assert result.stderr.strip() == f"nexusctl: {message}"
    assert result.stdout == ""


def test_missing_socket_means_not_running(socket_dir: Path) -> None:
    path = str(socket_dir / "admin.sock")
    result = run_nexusctl("status", "--socket", path)
    assert result.returncode == 3
    assert f"master not running: no admin socket at {path}" in result.stderr
    assert "--socket PATH" in result.stderr


def test_stale_socket_means_not_running(socket_dir: Path) -> None:
    path = str(socket_dir / "admin.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()
    result = run_nexusctl("status", "--socket", path)
    assert result.returncode == 3
    assert f"nothing accepts connections on {path}" in result.stderr


def test_permission_denied_names_socket(served) -> None:
    _, path = served
    status, _, stderr = run_nexusctl_as(NOBODY, "status", "--socket", path)
    assert status == 4, stderr
    assert f"permission denied on the admin socket {path} (mode 0600, owner root:root)" in stderr
    assert "sudo" in stderr
    assert "admin.socket_group" in stderr


def test_open_mode_lets_other_user_in(socket_dir: Path) -> None:
    path = str(socket_dir / "admin.sock")
    server = AdminServer(StandInMaster(path, 'socket_mode: "0666"'))
    server.start()
    try:
        status, stdout, stderr = run_nexusctl_as(NOBODY, "status", "--socket", path, "--json")
    finally:
        server.stop()
    assert status == 0, stderr
    assert json.loads(stdout)["generation"] == 1


def test_config_option_reads_socket(served, socket_dir: Path) -> None:
    _, path = served
    config = socket_dir / "conf" / "nexus.yaml"
    config.parent.mkdir()
    # A relative admin.socket is relative to the config file's directory.
    config.write_text("admin: {socket: ../admin.sock}\n")
    for args in (["status", "--config", str(config)], ["--config", str(config), "status"]):
        result = run_nexusctl(*args, "--json")
        assert result.returncode == 0, (args, result.stderr)
        assert json.loads(result.stdout)["generation"] == 1


def test_config_option_ignores_other_sections(served, socket_dir: Path) -> None:
    """nexusctl reload must reach the master even when the config it is about to reload is invalid."""
    master, path = served
    config = socket_dir / "nexus.yaml"
    config.write_text(f'admin: {{socket: "{path}"}}\nroutes: [{{name: x, upstream: missing}}]\n')
    result = run_nexusctl("reload", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert master.calls == ["reload"]


def test_invalid_admin_section_is_usage_error(socket_dir: Path) -> None:
    config = socket_dir / "nexus.yaml"
    config.write_text("admin: {socket: [1, 2]}\n")
    result = run_nexusctl("status", "--config", str(config))
    assert result.returncode == 2
    assert f"nexusctl: invalid config {config}: admin.socket: expected a string, found a list" in result.stderr


def test_misspelled_admin_key_is_named(socket_dir: Path) -> None:
    config = socket_dir / "nexus.yaml"
    config.write_text('admin: {sokcet_mode: "0600"}\n')
    result = run_nexusctl("status", "--config", str(config), "--json")
    assert result.returncode == 2
    assert 'admin.sokcet_mode: unknown key' in result.stderr
    assert 'did you mean "socket_mode"?' in result.stderr
    assert json.loads(result.stdout) == {"error": result.stderr.removeprefix("nexusctl: ").strip(), "exit_status": 2}


def test_json_error_goes_to_stdout(socket_dir: Path) -> None:
    result = run_nexusctl("status", "--socket", str(socket_dir / "missing.sock"), "--json")
    assert result.returncode == 3
    error = json.loads(result.stdout)
    assert error["exit_status"] == 3
    assert error["error"].startswith("master not running: no admin socket at")
    assert error["error"] in result.stderr


def test_config_without_socket_names_the_default(socket_dir: Path) -> None:
    config = socket_dir / "nexus.yaml"
    config.write_text("workers: 1\n")
    result = run_nexusctl("status", "--config", str(config), env={"RUNTIME_DIRECTORY": str(socket_dir / "run")})
    assert result.returncode == 3
    assert f"{config} sets no admin.socket, so this is the default path" in result.stderr
    assert "--config FILE to read admin.socket" not in result.stderr


def test_moved_socket_hints_at_the_old_path(socket_dir: Path) -> None:
    config = socket_dir / "nexus.yaml"
    config.write_text("admin: {socket: new.sock}\n")
    result = run_nexusctl("reload", "--config", str(config))
    assert result.returncode == 3
    assert f"This is admin.socket in {config}" in result.stderr
    assert "pass --socket OLD_PATH" in result.stderr


def test_default_path_under_systemd(served, socket_dir: Path) -> None:
    result = subprocess.run(
        [NEXUSCTL, "status", "--json"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "RUNTIME_DIRECTORY": str(socket_dir)},
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["generation"] == 1


def test_help_documents_exit_statuses() -> None:
    result = run_nexusctl("--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "3 master not running" in text
    assert "4 permission denied on the admin socket" in text


def test_check_uses_group_config(socket_dir: Path) -> None:
    config = socket_dir / "nexus.yaml"
    config.write_text('listen: ["127.0.0.1:0"]\nworkers: 1\n')
    result = run_nexusctl("--config", str(config), "check")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{config}: ok")
    assert stat.S_ISREG(config.stat().st_mode)


def test_yaml_error_names_socket_lookup(socket_dir: Path) -> None:
    config = socket_dir / "gw.yaml"
    config.write_text("admin: {socket: admin.sock}\nroutes:\n  - {name: x\n    upstream: y}\n")
    result = run_nexusctl("--config", str(config), "reload")
    assert result.returncode == 2
    assert f"cannot read the admin socket path from {config}: invalid YAML at line 4" in result.stderr
    assert "invalid admin section" not in result.stderr
    assert result.stderr.count(str(config)) == 1
    assert "--socket PATH" in result.stderr


@pytest.mark.parametrize("kind", ["regular file", "directory"])
def test_socket_path_not_a_socket(socket_dir: Path, kind: str) -> None:
    path = socket_dir / "gw.yaml"
    if kind == "directory":
        path = socket_dir
    else:
        path.write_text("admin: {socket: admin.sock}\n")
    result = run_nexusctl("--socket", str(path), "status")
    assert result.returncode == 2, result.stderr
    assert f"{path} is a {kind}, not the master's admin socket" in result.stderr
    assert "nothing accepts connections" not in result.stderr
    assert "admin.socket" in result.stderr
    assert "/run/nexus/admin.sock" in result.stderr


def test_reload_names_reloaded_file(served, socket_dir: Path) -> None:
    master, path = served
    started_with = socket_dir / "gw.yaml"
    started_with.write_text(f'admin: {{socket: "{path}"}}\n')
    master.config_path = str(started_with)
    result = run_nexusctl("--config", str(started_with), "reload")
    assert result.returncode == 0, result.stderr
    assert re.search(rf"^config_path +{re.escape(str(started_with))}$", result.stdout, re.MULTILINE)
    assert result.stderr == ""


def test_reload_notes_other_config(served, socket_dir: Path) -> None:
    master, path = served
    started_with = socket_dir / "gw.yaml"
    other = socket_dir / "other.yaml"
    for config in (started_with, other):
        config.write_text(f'admin: {{socket: "{path}"}}\n')
    master.config_path = str(started_with)
    result = run_nexusctl("reload", "--config", str(other), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["config_path"] == str(started_with)
    assert f"the master reloaded {started_with}, not {other}" in result.stderr
    assert "--config only locates the admin socket" in result.stderr


def test_admin_checks_run_in_nexusctl(socket_dir: Path) -> None:
    config = socket_dir / "nexus.yaml"
    config.write_text("admin: {socket_mode: 0660}\n")
    result = run_nexusctl("status", "--config", str(config))
    assert result.returncode == 2
    assert "admin.socket_mode: invalid value 432: YAML reads an unquoted mode as a number" in result.stderr
