"""The extent model every driver maps to: a virtual disk is a run of DATA, ZERO and UNALLOCATED ranges."""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np


class Kind(enum.IntEnum):
    DATA = 0          # bytes must be read from the file
    ZERO = 1          # allocated or flagged by the format as reading zeros
    UNALLOCATED = 2   # a hole: reads as zeros (no backing file is ever followed)


@dataclass(frozen=True, slots=True)
class Extent:
    offset: int
    length: int
    kind: Kind
    host_offset: int | None = None
    compressed: bool = False

    @property
    def end(self) -> int:
        return self.offset + self.length


def merge(extents: Iterable[Extent]) -> Iterator[Extent]:
    """Join neighbours of the same kind; DATA runs join only when host offsets are contiguous."""
    pending: Extent | None = None
    for ext in extents:
        if ext.length == 0:
            continue
        if pending is not None and pending.end == ext.offset and pending.kind == ext.kind \
                and pending.compressed == ext.compressed and _host_contiguous(pending, ext):
            pending = Extent(pending.offset, pending.length + ext.length, pending.kind,
                             pending.host_offset, pending.compressed)
            continue
        if pending is not None:
            yield pending
        pending = ext
    if pending is not None:
        yield pending


def _host_contiguous(a: Extent, b: Extent) -> bool:
    if a.host_offset is None and b.host_offset is None:
        return True
    if a.host_offset is None or b.host_offset is None or a.compressed:
        return False
    return a.host_offset + a.length == b.host_offset


def mask_runs(mask) -> list[tuple[int, int]]:
    """[lo, hi) index pairs of the runs of True in a chunk mask (what a writer allocates)."""
    edges = np.flatnonzero(np.diff(np.concatenate(([False], mask, [False])).astype(np.int8)))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))
