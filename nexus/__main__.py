"""Allow `python -m nexus`, the same as the `nexus` command."""

from nexus.cli import nexus

nexus()
