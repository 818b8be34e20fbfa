"""Exit statuses of worker processes, the protocol between worker and master."""

OK = 0
# An unexpected exception escaped the worker after it booted; restart it.
CRASH = 1
# The worker could not start; restarting it would fail the same way.
BOOT_ERROR = 3
