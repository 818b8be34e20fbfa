"""The command line: `nexus check`, `nexus run` with a bad config, `--version`, `nexusctl`.

Each test runs the real command in a subprocess, as a user or a service
manager would.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
from conftest import ROOT

from nexus.config import Config

NEXUS = [sys.executable, "-m", "nexus"]
VENV_BIN = Path(sys.executable).parent
NEXUS_SCRIPT = VENV_BIN / "nexus"
NEXUSCTL_SCRIPT = VENV_BIN / "nexusctl"

# The top-level keys in declaration order, as unknown-key errors list them.
TOP_LEVEL_KEYS = ", ".join(field.encode_name for field in msgspec.structs.fields(Config))

GOOD_CONFIG = """\
listen: ["127.0.0.1:0"]
workers: 2
upstreams:
  catalog: {targets: ["http://127.0.0.1:9001"]}
  users: {targets: ["http://127.0.0.1:9002"]}
routes:
  - {name: catalog, upstream: catalog, match: {path_prefix: /catalog}}
  - {name: users, upstream: users}
"""

# Each case is (case id, config text, text that stderr must contain). A
# config text of None means the file does not exist.
BAD_CONFIGS = [
    (
        "unknown-upstream",
        GOOD_CONFIG.replace("upstream: catalog,", "upstream: billing,"),
        'routes[0].upstream: unknown upstream "billing" (defined: catalog, users)',
    ),
    (
        "bad-duration",
        GOOD_CONFIG + "shutdown_timeout: 5 seconds\n",
        'shutdown_timeout: invalid duration "5 seconds": unknown unit "seconds"',
    ),
    (
        "unknown-key",
        GOOD_CONFIG.replace("workers: 2", "wrokers: 2"),
        f'wrokers: unknown key, expected one of {TOP_LEVEL_KEYS} (did you mean "workers"?)',
    ),
    (
        "yaml-syntax",
        GOOD_CONFIG.replace('listen: ["127.0.0.1:0"]', 'listen: ["127.0.0.1:0"'),
        "invalid YAML at line 2, column 1",
    ),
    ("missing-file", None, "cannot read the config file: No such file or directory"),
]


def _run(command: list[str], timeout: float = 20.0) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _write_config(tmp_path: Path, text: str | None, name: str = "nexus.yaml") -> Path:
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    return path


def test_check_good_config(tmp_path):
    path = _write_config(tmp_path, GOOD_CONFIG)
    result = _run([*NEXUS, "check", "--config", str(path)])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{path}: ok (routes: 2, upstreams: 2, workers: 2)"
    assert result.stderr == ""


@pytest.mark.parametrize(("config", "message"), [case[1:] for case in BAD_CONFIGS], ids=[case[0] for case in BAD_CONFIGS])
def test_check_bad_config(tmp_path, config, message):
    path = _write_config(tmp_path, config)
    result = _run([*NEXUS, "check", "--config", str(path)])
    assert result.returncode == 2, f"stdout={result.stdout!r} stderr={result.stderr!r}"
    assert message in result.stderr
    assert str(path) in result.stderr, f"the message does not name the file: {result.stderr!r}"
    assert result.stdout == ""
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("case", ["yaml-syntax", "missing-file"])
def test_check_names_file_once(tmp_path, case):
    config = {case_id: text for case_id, text, _ in BAD_CONFIGS}[case]
    path = _write_config(tmp_path, config)
    result = _run([*NEXUS, "check", "--config", str(path)])
    assert result.returncode == 2
    assert result.stderr.count(str(path)) == 1, f"the file name is repeated in {result.stderr!r}"


def test_run_bad_config_binds_nothing(tmp_path):
    # Reserve a free port, release it, and name it in a config that is invalid elsewhere.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = GOOD_CONFIG.replace('"127.0.0.1:0"', f'"127.0.0.1:{port}"').replace("upstream: catalog,", "upstream: billing,")
    path = _write_config(tmp_path, config)

    process = subprocess.Popen(
        [*NEXUS, "run", "--config", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        stdout, stderr = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)

    assert process.returncode != 0, f"nexus run exited 0 with an invalid config: {stderr!r}"
    assert 'routes[0].upstream: unknown upstream "billing"' in stderr
    assert "listening address=" not in stderr + stdout
    assert "worker started" not in stderr + stdout
    with socket.socket() as again:
        again.bind(("127.0.0.1", port))


def test_version():
    result = _run([*NEXUS, "--version"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "nexus, version 0.1.0"


def test_console_scripts_exist():
    for script in (NEXUS_SCRIPT, NEXUSCTL_SCRIPT):
        assert script.is_file(), f"{script} is not installed"
    for script in (NEXUS_SCRIPT, NEXUSCTL_SCRIPT):
        result = _run([str(script), "--version"])
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == f"{script.name}, version 0.1.0"


def test_nexusctl_check_good_config(tmp_path):
    path = _write_config(tmp_path, GOOD_CONFIG)
    via_module = _run([*NEXUS, "check", "--config", str(path)])
    via_nexusctl = _run([str(NEXUSCTL_SCRIPT), "check", "--config", str(path)])
    assert via_nexusctl.returncode == 0, via_nexusctl.stderr
    assert via_nexusctl.stdout == via_module.stdout


@pytest.mark.parametrize(("config", "message"), [case[1:] for case in BAD_CONFIGS], ids=[case[0] for case in BAD_CONFIGS])
def test_nexusctl_check_bad_config(tmp_path, config, message):
    path = _write_config(tmp_path, config)
    result = _run([str(NEXUSCTL_SCRIPT), "check", "--config", str(path)])
    assert result.returncode == 2, f"stdout={result.stdout!r} stderr={result.stderr!r}"
    assert message in result.stderr
    assert result.stdout == ""
