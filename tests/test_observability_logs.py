"""Worker log lines carry the worker id and pid, added where the message lacks them."""

from __future__ import annotations

import logging
import os

import pytest

from nexus.observability.logs import tag_worker_logs


@pytest.fixture
def restore_factory():
    factory = logging.getLogRecordFactory()
    yield
    logging.setLogRecordFactory(factory)


def make(message: str, *args) -> str:
    return logging.getLogger("test").makeRecord("test", logging.INFO, __file__, 1, message, args, None).getMessage()


def test_messages_get_what_they_lack(restore_factory):
    pid = os.getpid()
    tag_worker_logs(3)
    assert make("retrying upstream=%s", "app") == f"retrying upstream=app worker=3 pid={pid}"
    assert make("ejected worker=%d upstream=app", 3) == f"ejected worker=3 upstream=app pid={pid}"
    assert make("crashed worker=%d pid=%d", 1, 42) == "crashed worker=1 pid=42"
    assert make("100% done") == f"100% done worker=3 pid={pid}"


def test_tagging_again_replaces_the_tag(restore_factory):
    tag_worker_logs(1)
    tag_worker_logs(2)
    assert make("hello").endswith(f" worker=2 pid={os.getpid()}")


def test_bad_format_is_left_to_the_handler(restore_factory):
    tag_worker_logs(0)
    record = logging.getLogger("test").makeRecord("test", logging.INFO, __file__, 1, "%d", ("x",), None)
    with pytest.raises(TypeError):
        record.getMessage()
