"""Forked child processes for the shared-memory tests: start, wait, kill, and never leak.

Children forked through `Children` run one function and exit 0, or 1 after
printing the traceback if it raised. Leaving the `with` block SIGKILLs and
reaps every child still running, so a failing test leaves no process behind.
`fork_with_result` and `collect` run one function in a child and bring its
JSON-encodable return value, or its traceback, back to the parent.
"""

from __future__ import annotations

import json
import os
import signal
import time
import traceback
from collections.abc import Callable
from typing import Self

__all__ = ["Children", "collect", "fork_with_result"]


class Children:
    """Forked children of one test: reaped on `wait`, SIGKILLed and reaped on exit."""

    def __init__(self) -> None:
        self.running: list[int] = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        for pid in self.running:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in self.running:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass  # a test already reaped it with its own waitpid
        self.running.clear()

    def fork(self, action: Callable[[], None]) -> int:
        """Run `action` in a forked child and return its pid. The child exits 0, or 1 if `action` raised."""
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                action()
                code = 0
            except BaseException:  # noqa: BLE001 - any failure ends the child with code 1, after its traceback
                traceback.print_exc()
            finally:
                os._exit(code)
        self.running.append(pid)
        return pid

    def kill(self, pid: int) -> int:
        """SIGKILL `pid`, reap it and return its exit code."""
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        self.running.remove(pid)
        return os.waitstatus_to_exitcode(status)

    def exited(self, pid: int) -> int | None:
        """Reap `pid` and return its exit code if it has exited, else None."""
        done, status = os.waitpid(pid, os.WNOHANG)
        if not done:
            return None
        self.running.remove(pid)
        return os.waitstatus_to_exitcode(status)

    def wait(self, pid: int, timeout_s: float) -> int:
        """Reap `pid` and return its exit code, after a SIGKILL if it is still running after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while (code := self.exited(pid)) is None:
            if time.monotonic() > deadline:
                return self.kill(pid)
            time.sleep(0.001)
        return code

    def wait_all(self, timeout_s: float) -> list[int]:
        """Reap every running child within one shared deadline and return their exit codes in fork order."""
        deadline = time.monotonic() + timeout_s
        return [self.wait(pid, max(0.0, deadline - time.monotonic())) for pid in list(self.running)]


def fork_with_result(action: Callable[[], object]) -> tuple[int, int]:
    """Run `action` in a forked child; return (pid, read end of a pipe carrying its JSON result).

    The child exits 0 after writing action()'s return value, or 1 after
    writing the traceback of what it raised. Collect it with `collect`.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        code = 1
        try:
            try:
                message = {"result": action()}
                code = 0
            # Anything raised, SystemExit included, must reach the parent
            # as text, and the child must still leave through os._exit.
            except BaseException:  # noqa: BLE001
                message = {"error": traceback.format_exc()}
            os.write(write_end, json.dumps(message).encode())
        finally:
            os._exit(code)
    os.close(write_end)
    return pid, read_end


def collect(pid: int, read_end: int):
    """Wait for a child started by fork_with_result() and return its result, failing on its error."""
    chunks = []
    while chunk := os.read(read_end, 65536):
        chunks.append(chunk)
    os.close(read_end)
    status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    message = json.loads(b"".join(chunks) or b"{}")
    assert status == 0, f"child {pid} exited with {status}: {message.get('error', 'no output')}"
    return message["result"]
