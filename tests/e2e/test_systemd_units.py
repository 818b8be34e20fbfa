"""The systemd side of a real `nexus run`: the unit files, the notify protocol and socket activation.

The service manager is played by the test: it binds the NOTIFY_SOCKET
datagram socket and reads what the master sends, and it binds listening
sockets and passes them as fd 3 and up with LISTEN_FDS and LISTEN_PID, the
way systemd starts a service. `systemd-analyze verify` checks the unit
files where it is installed.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from admin_support import fd_moves, run_nexusctl, temporary_socket_dir
from conftest import ROOT, wait_for
from lifecycle_support import get, proc_status, wait_gone


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    with temporary_socket_dir() as directory:
        yield directory


UNITS = ROOT / "systemd"
VENV_BIN = Path(sys.executable).parent
_SERVING_LINE = re.compile(r"worker serving worker=(\d+) pid=(\d+)")


# The unit files


def unit_settings(path: Path) -> dict[str, list[str]]:
    """Return every `Key=value` of a unit file as {"Section.Key": [values in order]}."""
    settings: dict[str, list[str]] = {}
    section = ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key}", []).append(value)
    return settings


def test_service_settings() -> None:
    settings = unit_settings(UNITS / "nexus.service")
    assert settings["Service.Type"] == ["notify"]
    assert settings["Service.NotifyAccess"] == ["all"]
    assert settings["Service.ExecStart"] == ["/usr/bin/nexus run --config /etc/nexus/nexus.yaml"]
    assert settings["Service.ExecReload"] == ["/usr/bin/nexusctl --config /etc/nexus/nexus.yaml reload"]
    assert settings["Service.KillMode"] == ["mixed"]
    assert settings["Service.RuntimeDirectory"] == ["nexus"]
    # Longer than the default drain deadline (shutdown_timeout 30s).
    assert int(settings["Service.TimeoutStopSec"][0].removesuffix("s")) > 30
    for hardening in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "MemoryDenyWriteExecute"):
        assert settings[f"Service.{hardening}"] == ["yes"], hardening
    assert settings["Service.ProtectSystem"] == ["strict"]
    assert settings["Service.User"] == ["nexus"]


def test_invalid_config_exit_prevents_restart(tmp_path: Path) -> None:
    # systemd must not restart a master that a restart cannot fix.
    config = tmp_path / "nexus.yaml"
    config.write_text("wrokers: 2\n")
    started = subprocess.run([sys.executable, "-m", "nexus", "run", "--config", str(config)], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert "wrokers: unknown key" in started.stderr
    prevented = unit_settings(UNITS / "nexus.service")["Service.RestartPreventExitStatus"][0].split()
    assert str(started.returncode) in prevented, (started.returncode, prevented)


def test_socket_settings() -> None:
    settings = unit_settings(UNITS / "nexus.socket")
    assert settings["Socket.ListenStream"] == ["0.0.0.0:8080", "[::]:8080"]
    assert settings["Socket.Accept"] == ["no"]
    assert settings["Socket.BindIPv6Only"] == ["ipv6-only"]
    assert settings["Socket.Service"] == ["nexus.service"]


def verify(directory: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["systemd-analyze", "verify", str(directory / "nexus.service"), str(directory / "nexus.socket")],
        capture_output=True,
        text=True,
        timeout=60,
    )


def copy_units(directory: Path) -> None:
    """Copy the units with the drop-in that docs/operations.md gives for a virtualenv install.

    verify checks that each command exists, and here the scripts are in
    this virtualenv, not in /usr/bin.
    """
    for name in ("nexus.service", "nexus.socket"):
        shutil.copy(UNITS / name, directory / name)
    drop_in = directory / "nexus.service.d"
    drop_in.mkdir()
    (drop_in / "venv.conf").write_text(
        "[Service]\n"
        "ExecStart=\n"
        f"ExecStart={VENV_BIN}/nexus run --config /etc/nexus/nexus.yaml\n"
        "ExecReload=\n"
        f"ExecReload={VENV_BIN}/nexusctl --config /etc/nexus/nexus.yaml reload\n"
    )


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed: the unit files were not verified"
)
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    copy_units(tmp_path)
    result = verify(tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout == ""


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed: the unit files were not verified"
)
def test_verify_catches_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a misspelled setting is reported."""
    copy_units(tmp_path)
    service = tmp_path / "nexus.service"
    service.write_text(service.read_text().replace("KillMode=mixed", "KillMode=sometimes"))
    result = verify(tmp_path)
    # systemd-analyze 252 exits 0 on a setting it ignores, so the verify test above also requires empty output.
    assert "nexus.service:" in result.stderr
    assert "sometimes" in result.stderr


# A real master started the way systemd starts it


class NotifyListener:
    """The service manager's end of NOTIFY_SOCKET: a datagram socket that collects messages."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[dict[str, str]] = []

    def wait_for(self, key: str, timeout: float = 20.0) -> dict[str, str]:
        """Return the first message not yet returned that has `key`, reading until it arrives."""
        deadline = time.monotonic() + timeout
        for message in self.messages:
            if key in message and not message.get("_seen"):
                message["_seen"] = "1"
                return message
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                break
            message = dict(line.split("=", 1) for line in data.decode().split("\n"))
            self.messages.append(message)
            if key in message:
                message["_seen"] = "1"
                return message
        raise AssertionError(f"no {key} message within {timeout} s; received: {self.messages}")

    def __enter__(self) -> NotifyListener:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.sock.close()


class Master:
    """A `nexus run` process started like systemd would, with its log in a file."""

    def __init__(self, process: subprocess.Popen, log_path: Path) -> None:
        self.process = process
        self.log_path = log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def worker_pids(self) -> list[int]:
        return sorted({int(match[2]) for match in _SERVING_LINE.finditer(self.log())})

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        for pid in self.worker_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def write_config(directory: Path, upstream_url: str, listen: str = "127.0.0.1:0") -> Path:
    config = directory / "nexus.yaml"
    config.write_text(
        f'listen: ["{listen}"]\n'
        "workers: 2\n"
        "shutdown_timeout: 5s\n"
        f'admin: {{socket: "{directory / "admin.sock"}", metrics: null}}\n'
        "upstreams:\n"
        f'  app: {{targets: ["{upstream_url}"]}}\n'
        "routes:\n"
        "  - {name: all, upstream: app}\n"
    )
    return config


@pytest.fixture
def start_master(socket_dir: Path) -> Iterator:
    started: list[Master] = []

    def start(config: Path, env: dict[str, str], passed: list[socket.socket] = ()) -> Master:
        log_path = socket_dir / f"master-{len(started)}.log"
        command = f'exec "$0" -m nexus run --config "$1" {fd_moves(passed)}'
        if passed:
            # As systemd does: LISTEN_PID is the pid of the process that gets the sockets.
            command = "LISTEN_PID=$$ " + command
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(
                ["bash", "-c", command, sys.executable, str(config)],
                env={**os.environ, **env},
                pass_fds=[sock.fileno() for sock in passed],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        master = Master(process, log_path)
        started.append(master)
        return master

    yield start
    for master in started:
        master.stop()


def test_notify_ready_reloading_stopping(socket_dir: Path, upstream_factory, start_master) -> None:
    upstream = upstream_factory("app")
    with NotifyListener(socket_dir / "notify.sock") as notify:
        master = start_master(write_config(socket_dir, upstream.url), {"NOTIFY_SOCKET": str(notify.path)})

        # READY=1 comes once every worker serves.
        ready = notify.wait_for("READY")
        assert ready["READY"] == "1"
        assert len(master.worker_pids()) == 2, master.log()
        assert "STATUS" in ready
        address = re.findall(r"listening address=(\S+)", master.log())[0]
        assert get(address, "/status/200")[0] == 200

        # A reload: RELOADING=1 with the monotonic clock, then READY=1 again.
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        result = run_nexusctl("reload", "--socket", str(socket_dir / "admin.sock"))
        assert result.returncode == 0, result.stderr
        reloading = notify.wait_for("RELOADING")
        assert reloading["RELOADING"] == "1"
        assert before <= int(reloading["MONOTONIC_USEC"]) <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert notify.wait_for("READY")["READY"] == "1"

        # SIGTERM: STOPPING=1.
        master.process.send_signal(signal.SIGTERM)
        assert notify.wait_for("STOPPING")["STOPPING"] == "1"
        assert master.process.wait(20) == 0


def test_notify_mainpid_after_upgrade(socket_dir: Path, upstream_factory, start_master) -> None:
    upstream = upstream_factory("app")
    with NotifyListener(socket_dir / "notify.sock") as notify:
        master = start_master(write_config(socket_dir, upstream.url), {"NOTIFY_SOCKET": str(notify.path)})
        notify.wait_for("READY")
        result = run_nexusctl("upgrade", "--socket", str(socket_dir / "admin.sock"), "--json")
        assert result.returncode == 0, result.stderr
        new_pid = int(re.search(r'"pid": (\d+)', result.stdout)[1])
        try:
            message = notify.wait_for("MAINPID")
            assert message["MAINPID"] == str(new_pid)
            assert master.process.wait(30) == 0
        finally:
            os.kill(new_pid, signal.SIGTERM)
        assert wait_gone([new_pid], 30) == []


def test_watchdog_pings_from_master(socket_dir: Path, upstream_factory, start_master) -> None:
    """nexus.service sets WatchdogSec=30s: the master must send WATCHDOG=1 at least every 15 s."""
    upstream = upstream_factory("app")
    with NotifyListener(socket_dir / "notify.sock") as notify:
        start_master(
            write_config(socket_dir, upstream.url),
            # 2 s watchdog: a ping at least every second. No WATCHDOG_PID, so any pid may ping.
            {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "2000000"},
        )
        notify.wait_for("READY")
        first = notify.wait_for("WATCHDOG", timeout=5)
        second = notify.wait_for("WATCHDOG", timeout=5)
        assert first["WATCHDOG"] == second["WATCHDOG"] == "1"


def passed_listener() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    return sock


def start_activated(socket_dir: Path, upstream_url: str, start_master) -> tuple[Master, int, Path]:
    """Start a master on a passed listening socket whose address `listen` names; return it, the port and the config."""
    passed = passed_listener()
    port = passed.getsockname()[1]
    # As docs/operations.md requires, `listen` names the addresses of nexus.socket.
    config = write_config(socket_dir, upstream_url, listen=f"127.0.0.1:{port}")
    with passed:
        master = start_master(config, {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "http"}, [passed])
    wait_for(
        lambda: len(master.worker_pids()) == 2 or master.process.poll() is not None, 20, message="2 workers serving"
    )
    return master, port, config


def test_socket_activation_serves_passed_socket(socket_dir: Path, upstream_factory, start_master) -> None:
    upstream = upstream_factory("app")
    passed = passed_listener()
    port = passed.getsockname()[1]
    # The config names another address: the passed socket wins, as under nexus.socket.
    config = write_config(socket_dir, upstream.url)
    with passed:
        master = start_master(config, {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "http"}, [passed])
    wait_for(
        lambda: len(master.worker_pids()) == 2 or master.process.poll() is not None, 20, message="2 workers serving"
    )
    log = master.log()
    assert f"using passed socket fd=3 name=http address=127.0.0.1:{port}" in log
    assert re.findall(r"listening address=(\S+)", log) == [f"127.0.0.1:{port}"]
    assert get(f"127.0.0.1:{port}", "/status/200")[0] == 200
    status = run_nexusctl("status", "--socket", str(socket_dir / "admin.sock"))
    assert status.returncode == 0, status.stderr


def test_socket_activation_warns_of_listen_change(socket_dir: Path, upstream_factory, start_master) -> None:
    master, port, config = start_activated(socket_dir, upstream_factory("app").url, start_master)

    config.write_text(config.read_text().replace(f"127.0.0.1:{port}", "127.0.0.1:1"))
    for _ in range(2):
        reload = run_nexusctl("reload", "--socket", str(socket_dir / "admin.sock"))
        # The reload goes on with the passed socket and warns that `listen` was not applied.
        assert reload.returncode == 0, reload.stderr
        assert f"nexusctl: warning: listen 127.0.0.1:1 differs from the sockets systemd passed (127.0.0.1:{port})" in reload.stderr
        assert "ListenStream=" in reload.stderr
    assert master.log().count("reload: listen 127.0.0.1:1 differs") == 2
    assert get(f"127.0.0.1:{port}", "/status/200")[0] == 200

    # Back to the passed address: nothing to warn about.
    config.write_text(config.read_text().replace("127.0.0.1:1", f"127.0.0.1:{port}"))
    reload = run_nexusctl("reload", "--socket", str(socket_dir / "admin.sock"))
    assert reload.returncode == 0, reload.stderr
    assert "warning" not in reload.stderr


def test_unusable_passed_socket_prevents_restart(socket_dir: Path, upstream_factory, start_master) -> None:
    upstream = upstream_factory("app")
    passed = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    passed.bind(str(socket_dir / "wrong.sock"))
    passed.listen(8)
    with passed:
        master = start_master(write_config(socket_dir, upstream.url), {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "http"}, [passed])
    status = master.process.wait(30)
    assert "is not a TCP socket" in master.log()
    prevented = unit_settings(UNITS / "nexus.service")["Service.RestartPreventExitStatus"][0].split()
    assert str(status) in prevented, (status, prevented)


def test_socket_activation_survives_upgrade(socket_dir: Path, upstream_factory, start_master) -> None:
    """After an upgrade the new master serves the passed socket, received from the old master."""
    master, port, _ = start_activated(socket_dir, upstream_factory("app").url, start_master)
    assert "using passed socket fd=3" in master.log()

    result = run_nexusctl("upgrade", "--socket", str(socket_dir / "admin.sock"), "--json")
    assert result.returncode == 0, result.stderr
    new_pid = int(re.search(r'"pid": (\d+)', result.stdout)[1])
    try:
        # The LISTEN_* variables were removed, so the new master cannot mistake fd 3 for a passed socket.
        environ = Path(f"/proc/{new_pid}/environ").read_bytes().split(b"\0")
        assert [entry for entry in environ if entry.startswith(b"LISTEN_")] == []
        assert master.process.wait(30) == 0
        assert proc_status(new_pid), master.log()
        assert get(f"127.0.0.1:{port}", "/status/200")[0] == 200, master.log()
        # Only the passed socket was ever listened on; nothing was bound again.
        assert set(re.findall(r"listening address=(\S+)", master.log())) == {f"127.0.0.1:{port}"}
    finally:
        os.kill(new_pid, signal.SIGTERM)
    assert wait_gone([new_pid], 30) == []


MDWE_EXEC = """
import ctypes, mmap, os, sys
libc = ctypes.CDLL(None, use_errno=True)
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
    sys.exit(f"prctl(PR_SET_MDWE) failed: {os.strerror(ctypes.get_errno())}")
# Check that the restriction is in force before running Nexus under it.
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    sys.exit("PR_SET_MDWE did not refuse writable and executable memory")
except PermissionError:
    pass
os.execv(sys.executable, [sys.executable, "-m", "nexus", "run", "--config", sys.argv[1]])
"""


def test_serves_with_memory_deny_write_execute(socket_dir: Path, upstream_factory) -> None:
    """nexus.service sets MemoryDenyWriteExecute=yes; Nexus must serve under the same rule.

    The kernel's PR_SET_MDWE (Linux 6.3 and later) refuses the same
    mappings as systemd's seccomp filter, and is kept across fork and exec.
    """
    if tuple(int(part) for part in os.uname().release.split(".")[:2]) < (6, 3):
        pytest.skip(f"kernel {os.uname().release} has no PR_SET_MDWE: MemoryDenyWriteExecute=yes was not tested")
    upstream = upstream_factory("app")
    config = write_config(socket_dir, upstream.url)
    log_path = socket_dir / "mdwe.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-c", MDWE_EXEC, str(config)], stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT
        )
    master = Master(process, log_path)
    try:
        wait_for(lambda: len(master.worker_pids()) == 2 or process.poll() is not None, 20, message="2 workers serving")
        assert process.poll() is None, master.log()
        address = re.findall(r"listening address=(\S+)", master.log())[0]
        for path in ("/status/200", "/echo", "/bytes?n=200000"):
            assert get(address, path)[0] == 200, path
    finally:
        master.stop()
    assert process.returncode == 0, master.log()


def test_socket_activation_drain_and_resume(socket_dir: Path, upstream_factory, start_master) -> None:
    """systemd keeps its copy of the socket open, so resume must serve the passed socket again, not bind anew."""
    upstream = upstream_factory("app")
    with passed_listener() as passed:
        port = passed.getsockname()[1]
        config = write_config(socket_dir, upstream.url, listen=f"127.0.0.1:{port}")
        master = start_master(config, {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "http"}, [passed])
        wait_for(lambda: len(master.worker_pids()) == 2 or master.process.poll() is not None, 20, message="2 workers")
        admin = str(socket_dir / "admin.sock")

        drained = run_nexusctl("drain", "--socket", admin)
        assert drained.returncode == 0, drained.stderr
        wait_gone(master.worker_pids(), 10)

        resumed = run_nexusctl("resume", "--socket", admin)
        assert resumed.returncode == 0, f"{resumed.stderr}\n{master.log()}"
        assert get(f"127.0.0.1:{port}", "/status/200")[0] == 200
