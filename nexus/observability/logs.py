"""Worker id and pid on every log line a worker writes.

Operators find a worker's lines by `worker=N pid=P`. Most messages name
both, and `tag_worker_logs` makes sure every one does, also those of
libraries and of modules that do not know which worker they run in. In a
worker process, a message without `worker=` or `pid=` gets what it lacks
appended.
"""

from __future__ import annotations

import logging
import os

__all__ = ["tag_worker_logs"]


def tag_worker_logs(worker_id: int) -> None:
    """Append worker id and pid to this process's log messages that lack them; call once in the worker."""
    pid = os.getpid()
    make_record = logging.getLogRecordFactory()
    if getattr(make_record, "worker_id", None) is not None:
        make_record = make_record.inner  # a worker forked from a tagged process: replace its tag

    def tagged(*args, **kwargs) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format is reported by the handler, as without the tag
            return record
        suffix = ""
        if "worker=" not in message:
            suffix += f" worker={worker_id}"
        if "pid=" not in message:
            suffix += f" pid={pid}"
        if suffix:
            # The message is final from here: no arguments left to format.
            record.msg = message + suffix
            record.args = None
        return record

    tagged.worker_id = worker_id  # type: ignore[attr-defined]
    tagged.inner = make_record  # type: ignore[attr-defined]
    logging.setLogRecordFactory(tagged)
