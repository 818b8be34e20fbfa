"""Private redis-server processes on 127.0.0.1 for tests: one server, or a 3-master cluster.

Each server runs without persistence in a temporary directory, on a free
port, and is stopped (SIGKILL if SIGTERM is not enough) when the fixture
ends. `RedisServer.kill()` and `restart()` let a test take Redis away and
bring it back on the same port.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

__all__ = ["RedisCluster3", "RedisServer", "free_port", "redis_cluster", "redis_server_factory"]

_START_TIMEOUT_S = 10.0


def free_port(cluster_bus: bool = False) -> int:
    """Return a free loopback port; with `cluster_bus`, port + 10000 (the cluster bus) is free too."""
    for _ in range(100):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if not cluster_bus:
            return port
        if port + 10000 > 65535:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise AssertionError("found no free port pair for a cluster node in 100 tries")


@dataclass
class RedisServer:
    """One redis-server process that a test owns."""

    port: int
    directory: Path
    cluster: bool = False
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.directory),
        ]
        if self.cluster:
            args += [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                f"nodes-{self.port}.conf",
                "--cluster-node-timeout",
                "500",
            ]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                if self.client().ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.02)
        raise AssertionError(f"redis-server on port {self.port} did not answer within {_START_TIMEOUT_S} s")

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)

    def kill(self) -> None:
        """SIGKILL the server, as a crash would."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


@pytest.fixture
def redis_server_factory(tmp_path: Path) -> Iterator:
    """Start private standalone redis-server processes; all are stopped when the test ends."""
    started: list[RedisServer] = []

    def start() -> RedisServer:
        directory = tmp_path / f"redis-{len(started)}"
        directory.mkdir()
        server = RedisServer(free_port(), directory)
        started.append(server)
        server.start()
        return server

    yield start
    for server in started:
        server.stop()


@dataclass
class RedisCluster3:
    """Three cluster-enabled masters joined into one cluster with every slot assigned."""

    servers: list[RedisServer]

    @property
    def urls(self) -> list[str]:
        return [f"redis://127.0.0.1:{server.port}" for server in self.servers]


def _cluster_ok(server: RedisServer) -> bool:
    info = server.client().cluster("INFO")
    state = info.get("cluster_state") if isinstance(info, dict) else None
    return state == "ok" and int(info.get("cluster_known_nodes", 0)) == 3


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[RedisCluster3]:
    servers = []
    try:
        for index in range(3):
            directory = tmp_path / f"cluster-{index}"
            directory.mkdir()
            server = RedisServer(free_port(cluster_bus=True), directory, cluster=True)
            servers.append(server)
            server.start()
        addresses = [f"127.0.0.1:{server.port}" for server in servers]
        subprocess.run(
            ["redis-cli", "--cluster", "create", *addresses, "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=30,
        )
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not all(_cluster_ok(server) for server in servers):
            if time.monotonic() > deadline:
                raise AssertionError(f"cluster on {addresses} did not reach cluster_state:ok")
            time.sleep(0.05)
        yield RedisCluster3(servers)
    finally:
        for server in servers:
            server.stop()
