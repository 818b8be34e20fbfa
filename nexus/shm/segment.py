"""Shared-memory segments: memfd-backed mappings with a checked header.

The master creates every segment before it forks workers, so each worker
inherits the mapping. A segment is a `memfd_create` file mapped shared, never
a named POSIX segment: CPython's resource tracker unlinks named segments when
any attached process exits (gh-82300), and a memfd can later be handed to a
new master with `socket.send_fds`.

Layout of the header, in 64-bit words:
    0  magic   b"NEXUSSHM" read as a little-endian integer
    1  kind    which table this is (a short ASCII tag, for example b"health")
    2  layout  version of that table's layout; bumped on any change
    3  size    total size in bytes, header included
    4-7        the table's geometry (slot counts, capacities), so a process
               that receives only the file descriptor can map the table
Payload words follow from byte 64, so every table starts cache-line aligned.

Atomic access goes through `region`, a `nexus.shm._native.Region` over the
mapping (acquire loads, release stores, compare-and-swap, fetch-add, robust
locks). Plain reads and writes of single words may also use `words`, a
`memoryview.cast("Q")`, which compiles to one aligned 8-byte load or store on
x86-64 and aarch64, so a reader in another process never sees half of a
word. `struct.pack_into` is not safe for this: CPython clears the target
before writing it.
"""

from __future__ import annotations

import mmap
import os

from nexus.shm._native import Region

__all__ = ["HEADER_BYTES", "Segment", "SegmentError", "SlotTable"]

MAGIC = int.from_bytes(b"NEXUSSHM", "little")
HEADER_BYTES = 64
GEOMETRY_WORDS = 4


class SegmentError(Exception):
    """A segment that is not the table, or not the layout, that the caller expects."""


def _tag(kind: bytes) -> int:
    if len(kind) > 8:
        raise ValueError(f"segment kind {kind!r} is longer than 8 bytes")
    return int.from_bytes(kind.ljust(8, b"\0"), "little")


class Segment:
    """One shared mapping: a header followed by an array of 64-bit words."""

    def __init__(self, fd: int, mapping: mmap.mmap) -> None:
        self.fd = fd
        self.mapping = mapping
        self.words = memoryview(mapping).cast("Q")
        self.region = Region(mapping)

    @classmethod
    def create(cls, kind: bytes, layout: int, payload_bytes: int, geometry: tuple[int, ...] = ()) -> Segment:
        """Create a zeroed segment for `payload_bytes` of table data.

        `geometry` (up to four integers) is stored in the header for `attach`.
        """
        if len(geometry) > GEOMETRY_WORDS:
            raise ValueError(f"a segment header holds {GEOMETRY_WORDS} geometry words, got {len(geometry)}")
        size = HEADER_BYTES + _round_up(payload_bytes, 64)
        fd = os.memfd_create(f"nexus-{kind.decode()}", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        segment = cls(fd, mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE))

        # The magic goes last, so a reader that finds it also finds a whole header.
        segment.words[1] = _tag(kind)
        segment.words[2] = layout
        segment.words[3] = size
        for index, value in enumerate(geometry):
            segment.words[4 + index] = value
        segment.words[0] = MAGIC
        return segment

    @classmethod
    def attach(cls, fd: int, kind: bytes, layout: int) -> Segment:
        """Map an existing segment from `fd` and check that it is `kind` at `layout`."""
        size = os.fstat(fd).st_size
        if size < HEADER_BYTES:
            raise SegmentError(f"shared-memory segment fd {fd} is {size} bytes, smaller than its header")
        segment = cls(fd, mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE))
        segment.check(kind, layout)
        return segment

    def check(self, kind: bytes, layout: int) -> None:
        """Raise SegmentError unless the header names `kind` at `layout`."""
        words = self.words
        if words[0] != MAGIC:
            raise SegmentError(f"shared-memory segment fd {self.fd} has no Nexus header (magic {words[0]:#x})")
        if words[1] != _tag(kind):
            found = words[1].to_bytes(8, "little").rstrip(b"\0")
            raise SegmentError(f"shared-memory segment fd {self.fd} holds {found!r}, expected {kind!r}")
        if words[2] != layout:
            raise SegmentError(
                f"shared-memory segment {kind.decode()} has layout version {words[2]}, this Nexus reads "
                f"version {layout}: restart the service instead of upgrading in place"
            )
        if words[3] != len(self.mapping):
            raise SegmentError(f"shared-memory segment {kind.decode()} is invalid: its header gives {words[3]} bytes but {len(self.mapping)} are mapped")

    @property
    def payload_offset_words(self) -> int:
        return HEADER_BYTES // 8

    @property
    def geometry(self) -> tuple[int, ...]:
        """The geometry words given to `create`, zero where none was given."""
        return tuple(self.words[4 : 4 + GEOMETRY_WORDS])

    def close(self) -> None:
        """Release this process's mapping and file descriptor."""
        self.words.release()
        self.region.release()
        self.mapping.close()
        os.close(self.fd)


def _round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


class SlotTable:
    """Base of the tables made of fixed-size slots of 64-bit words in one segment.

    A subclass sets KIND and LAYOUT (the header's table tag and version) and
    SLOT_WORDS (words per slot).
    """

    KIND: bytes = b""
    LAYOUT = 0
    SLOT_WORDS = 1

    def __init__(self, segment: Segment, slots: int) -> None:
        self.segment = segment
        self.slots = slots
        self._words = segment.words
        self._base = segment.payload_offset_words

    @classmethod
    def create(cls, slots: int):
        """Create a zeroed table of `slots` slots in a new segment."""
        segment = Segment.create(cls.KIND, cls.LAYOUT, max(slots, 1) * cls.SLOT_WORDS * 8, geometry=(slots,))
        return cls(segment, slots)

    @classmethod
    def attach(cls, fd: int):
        """Map the table in the segment `fd`, checking its kind and layout; the slot count is in its header."""
        segment = Segment.attach(fd, cls.KIND, cls.LAYOUT)
        return cls(segment, segment.geometry[0])
