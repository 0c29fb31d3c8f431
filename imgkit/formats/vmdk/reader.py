"""Reading a hosted sparse extent: extents from the grain tables, data by coalesced preads.

One run iterator (extents) serves both map and read: readinto walks the same runs, so
contiguous uncompressed grains become one pread and holes are never read.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Iterator

import numpy as np

from ... import limits
from ...errors import InvalidImage, LimitExceeded
from ...extents import Extent, Kind, merge
from ..base import Reader
from . import deflate
from .layout import GRAIN_MARKER_BYTES, GTE_UNALLOCATED, GTE_ZEROED, SECTOR, unpack_grain_marker
from .sparse import SparseExtent


class GrainTables:
    """Grain tables by directory index, read on demand and kept in a bounded, locked LRU.

    A miss reads the tables that follow on disk too (up to BATCH), since writers lay them
    out back to back and walks are sequential: a 2 TiB disk has 65536 tables."""

    BATCH = 64

    def __init__(self, extent: SparseExtent):
        self.extent = extent
        self.capacity = max(self.BATCH, limits.VMDK_GT_CACHE_BYTES // extent.gt_bytes)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self._empty = np.zeros(extent.header.gtes_per_gt, dtype="<u4")
        gd = extent.gd.astype(np.int64)
        step = -(-extent.gt_bytes // SECTOR)
        self._follows = np.append((gd[1:] == gd[:-1] + step) & (gd[1:] != 0), False)

    def get(self, index: int) -> np.ndarray:
        if self.extent.gd[index] == 0:
            return self._empty
        with self._lock:
            table = self._cache.get(index)
            if table is not None:
                self._cache.move_to_end(index)
                return table
        tables = self._read_batch(index)
        with self._lock:
            for i, t in enumerate(tables):
                self._cache[index + i] = t
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        return tables[0]

    def _read_batch(self, index: int) -> list[np.ndarray]:
        count = 1
        while count < self.BATCH and index + count < len(self._follows) and self._follows[index + count - 1]:
            count += 1
        size = self.extent.gt_bytes
        raw = self.extent.image.pread_exact(size * count, int(self.extent.gd[index]) * SECTOR,
                                            f"VMDK grain table {index}")
        return [np.frombuffer(raw, dtype="<u4", count=size // 4, offset=i * size) for i in range(count)]


class VmdkReader(Reader):
    format = "vmdk"

    def __init__(self, extent: SparseExtent):
        super().__init__(extent.image)
        self.extent = extent
        self.virtual_size = extent.virtual_size
        self.grain_bytes = extent.header.grain_bytes
        self.gtes = extent.header.gtes_per_gt
        self.tables = GrainTables(extent)
        self.warnings = list(extent.warnings)
        if extent.descriptor is not None and extent.descriptor.is_delta:
            self.unsafe_reason = ("a VMDK delta disk (parentCID or parentFileNameHint set): its unwritten "
                                  "grains live in a parent file, which imgkit never opens")

    # -- mapping ---------------------------------------------------------------------------

    def extents(self, start: int = 0, end: int | None = None) -> Iterator[Extent]:
        end = self.virtual_size if end is None else min(end, self.virtual_size)
        if start >= end:
            return
        yield from merge(self._grain_runs(start, end))

    def _grain_runs(self, start: int, end: int) -> Iterator[Extent]:
        """Runs over blocks of up to BATCH tables at once, so a huge empty disk costs little."""
        first, last = start // self.grain_bytes, (end - 1) // self.grain_bytes
        block = self.gtes * GrainTables.BATCH
        grain = first
        while grain <= last:
            stop = min(last + 1, (grain // block + 1) * block)
            entries = self._entries(grain, stop)
            if entries.any():
                yield from self._table_runs(grain, entries, start, end)
            else:
                yield self._run(grain, stop - grain, Kind.UNALLOCATED, 0, start, end)
            grain = stop

    def _entries(self, lo: int, hi: int) -> np.ndarray:
        """Grain table entries of grains [lo, hi), across tables."""
        parts = []
        for index in range(lo // self.gtes, (hi - 1) // self.gtes + 1):
            base = index * self.gtes
            parts.append(self.tables.get(index)[max(lo, base) - base:min(hi, base + self.gtes) - base])
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _table_runs(self, first_grain: int, entries: np.ndarray, start: int, end: int):
        """Runs of grain table entries: same kind and, for plain data, contiguous on the host."""
        kinds = np.where(entries == GTE_UNALLOCATED, Kind.UNALLOCATED,
                         np.where(entries == GTE_ZEROED, Kind.ZERO, Kind.DATA)).astype(np.int8)
        breaks = kinds[1:] != kinds[:-1]
        data = kinds[1:] == Kind.DATA
        if self.extent.compressed:
            breaks |= data
        else:
            step = self.grain_bytes // SECTOR
            breaks |= data & (entries[1:].astype(np.int64) != entries[:-1].astype(np.int64) + step)
        edges = [0, *(np.flatnonzero(breaks) + 1).tolist(), len(entries)]
        for k0, k1 in zip(edges[:-1], edges[1:]):
            yield self._run(first_grain + k0, k1 - k0, Kind(int(kinds[k0])), int(entries[k0]), start, end)

    def _run(self, grain: int, count: int, kind: Kind, entry: int, start: int, end: int) -> Extent:
        run_start = grain * self.grain_bytes
        lo = max(run_start, start)
        hi = min(run_start + count * self.grain_bytes, end, self.virtual_size)
        if kind != Kind.DATA:
            return Extent(lo, hi - lo, kind)
        host = entry * SECTOR
        if self.extent.compressed:
            self._check_inside(grain, host, GRAIN_MARKER_BYTES)
            return Extent(lo, hi - lo, kind, host, compressed=True)
        run_end = min(run_start + count * self.grain_bytes, self.virtual_size)
        self._check_inside(grain, host, run_end - run_start)
        return Extent(lo, hi - lo, kind, host + (lo - run_start))

    def _check_inside(self, grain: int, host: int, length: int) -> None:
        if host + length > self.image.size:
            raise InvalidImage(f"{self.image.path}: VMDK grain table entry for grain {grain} points to "
                               f"offset {host} (+{length} bytes), beyond the end of the file "
                               f"({self.image.size} bytes)")

    # -- reading ---------------------------------------------------------------------------

    def readinto(self, offset: int, buf) -> None:
        view = memoryview(buf).cast("B")
        end = offset + len(view)
        inside = min(end, self.virtual_size)
        if inside < end:
            _zero(view[max(inside - offset, 0):])
        for ext in self.extents(offset, inside):
            dst = view[ext.offset - offset:ext.end - offset]
            if ext.kind != Kind.DATA:
                _zero(dst)
            elif ext.compressed:
                grain_start = ext.offset - ext.offset % self.grain_bytes
                rel = ext.offset - grain_start
                dst[:] = self.inflate(grain_start // self.grain_bytes, ext.host_offset)[rel:rel + len(dst)]
            elif self.image.readinto(dst, ext.host_offset) < len(dst):
                raise InvalidImage(f"{self.image.path}: short read of VMDK grain data at {ext.host_offset}")

    def inflate(self, grain: int, host: int) -> memoryview:
        """One compressed grain, its marker checked and its output capped at one grain."""
        where = f"{self.image.path}: VMDK compressed grain {grain} at offset {host}"
        lba, size = unpack_grain_marker(self.image.pread_exact(GRAIN_MARKER_BYTES, host, "VMDK grain marker"))
        expected_lba = grain * (self.grain_bytes // SECTOR)
        if lba != expected_lba:
            raise InvalidImage(f"{where}: marker says LBA {lba}, expected {expected_lba}")
        if size == 0:
            raise InvalidImage(f"{where}: a metadata marker stands where the grain should be")
        if size > limits.MAX_COMPRESSED_CHUNK:
            raise LimitExceeded(f"{where}: compressed size {size} is above the limit of "
                                f"{limits.MAX_COMPRESSED_CHUNK}")
        payload = self.image.pread_exact(size, host + GRAIN_MARKER_BYTES, "VMDK compressed grain")
        need = min(self.grain_bytes, self.virtual_size - grain * self.grain_bytes)
        return memoryview(inflate_grain(payload, self.grain_bytes, need, where))

    # -- facts -----------------------------------------------------------------------------

    def info(self) -> dict:
        desc = self.extent.descriptor
        extent = {"virtual-size": self.virtual_size, "filename": self.image.path,
                  "cluster-size": self.grain_bytes, "format": ""}
        if self.extent.compressed:
            extent["compressed"] = True
        return {
            "cluster-size": self.grain_bytes,
            "format-specific": {"type": "vmdk", "data": {
                "cid": desc.cid if desc is not None and desc.cid is not None else 0,
                "parent-cid": desc.parent_cid if desc is not None else 0xFFFFFFFF,
                "create-type": self.extent.create_type,
                "extents": [extent],
            }},
        }


def inflate_grain(payload: bytes, grain_bytes: int, need: int, where: str) -> bytes:
    """A zlib stream (RFC 1950) that must yield at least need and at most grain_bytes bytes."""
    inflater = deflate.decompressobj()
    try:
        out = inflater.decompress(payload, grain_bytes)
    except deflate.errors as exc:
        raise InvalidImage(f"{where}: corrupt compressed data ({exc})") from None
    if inflater.unconsumed_tail:
        raise InvalidImage(f"{where}: inflates to more than one grain")
    if not inflater.eof:
        raise InvalidImage(f"{where}: the compressed stream is truncated")
    if len(out) < need:
        raise InvalidImage(f"{where}: inflates to {len(out)} bytes, expected {need}")
    return out


def _zero(view: memoryview) -> None:
    if len(view):
        np.frombuffer(view, dtype=np.uint8)[:] = 0
