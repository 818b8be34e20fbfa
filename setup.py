"""Build the C extensions (shared memory, access log lines); the rest of the metadata is in pyproject.toml."""

from pathlib import Path

from setuptools import Extension, setup

NATIVE = Path("nexus/shm/native")
COMPILE_ARGS = ["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers"]

setup(
    ext_modules=[
        Extension(
            "nexus.shm._native",
            sources=sorted(str(path) for path in NATIVE.glob("*.c")),
            depends=sorted(str(path) for path in NATIVE.glob("*.h")),
            extra_compile_args=COMPILE_ARGS,
        ),
        Extension(
            "nexus.observability._lines",
            sources=["nexus/observability/native/lines.c"],
            extra_compile_args=COMPILE_ARGS,
        ),
    ],
)
