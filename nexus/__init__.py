"""Nexus: an API gateway with a pre-fork master and granian workers."""

__version__ = "0.1.0"
