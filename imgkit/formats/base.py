"""What every driver implements, and the check report that drivers with a checker fill in."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from ..extents import Extent
from ..io import ImageFile


class Reader:
    """A virtual disk over an image file. Subclasses set format and virtual_size."""

    format: str = ""
    virtual_size: int = 0

    def __init__(self, image: ImageFile):
        self.image = image

    def extents(self, start: int = 0, end: int | None = None) -> Iterator[Extent]:
        """Cover [start, end) in order, from metadata only (no guest data is read)."""
        raise NotImplementedError

    def readinto(self, offset: int, buf) -> None:
        """Fill buf (a writable buffer) with the virtual disk's bytes at offset. Thread-safe."""
        raise NotImplementedError

    def info(self) -> dict:
        """Extra qemu-img-style info keys (cluster-size, format-specific, backing-filename...)."""
        return {}

    def close(self) -> None:
        self.image.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Writer:
    """Turns chunks of virtual disk into a file. chunk_size is the allocation unit.

    encode() runs in worker threads and must not touch shared state; commit() runs in the
    caller's thread in ascending offset order; finish() writes tables and footers last.
    A writer whose layout needs no allocation (raw: every byte has a fixed place) may pwrite
    in encode() itself, which lets writes run in parallel.
    """

    chunk_size: int = 512

    def encode(self, offset: int, data: memoryview, mask: np.ndarray):
        """data starts at a chunk boundary and spans len(mask) chunks (the last may be short);
        mask[i] says chunk i holds data. Chunks with mask False must be left unallocated."""
        raise NotImplementedError

    def commit(self, offset: int, encoded) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        raise NotImplementedError


@dataclass
class CheckReport:
    """qemu-img check's result, with its JSON keys."""

    filename: str
    format: str
    corruptions: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    check_errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    image_end_offset: int | None = None
    total_clusters: int | None = None
    allocated_clusters: int | None = None
    fragmented_clusters: int | None = None
    compressed_clusters: int | None = None

    @property
    def exit_code(self) -> int:
        if self.check_errors:
            return 1
        if self.corruptions:
            return 2
        if self.leaks:
            return 3
        return 0

    def to_json(self) -> dict:
        out = {"filename": self.filename, "format": self.format,
               "check-errors": len(self.check_errors)}
        if self.corruptions:
            out["corruptions"] = len(self.corruptions)
        if self.leaks:
            out["leaks"] = len(self.leaks)
        for key, value in (("image-end-offset", self.image_end_offset),
                           ("total-clusters", self.total_clusters),
                           ("allocated-clusters", self.allocated_clusters),
                           ("fragmented-clusters", self.fragmented_clusters),
                           ("compressed-clusters", self.compressed_clusters)):
            if value is not None:
                out[key] = value
        out["messages"] = (
            [{"severity": "error", "message": m} for m in self.corruptions + self.check_errors]
            + [{"severity": "leak", "message": m} for m in self.leaks]
            + [{"severity": "warning", "message": m} for m in self.warnings])
        return out
