"""RAW: the virtual disk is the file. Holes come from SEEK_DATA/SEEK_HOLE; output stays sparse."""
from __future__ import annotations

import errno
import os

import numpy as np

from ..errors import UsageError
from ..extents import Extent, Kind, mask_runs
from ..io import AtomicOutput, ImageFile, write_error
from .base import Reader, Writer

OPTIONS = {"preallocation": "off (default, sparse), falloc (reserve blocks) or full (write zeros)"}
ZERO_FILL = 4 << 20


class RawReader(Reader):
    format = "raw"

    def __init__(self, image: ImageFile):
        super().__init__(image)
        self.virtual_size = image.size

    def extents(self, start: int = 0, end: int | None = None):
        end = self.virtual_size if end is None else min(end, self.virtual_size)
        pos = start
        while pos < end:
            data_start, data_end = self._next_data(pos, end)
            if data_start > pos:
                yield Extent(pos, data_start - pos, Kind.ZERO, host_offset=pos)
            if data_end > data_start:
                yield Extent(data_start, data_end - data_start, Kind.DATA, host_offset=data_start)
            pos = data_end

    def _next_data(self, pos: int, end: int) -> tuple[int, int]:
        """The next data run at or after pos, clipped to end; the whole rest when holes are unknown."""
        if self.image.is_block_device or not hasattr(os, "SEEK_DATA"):
            return pos, end
        try:
            data_start = os.lseek(self.image.fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return end, end
            return pos, end
        if data_start >= end:
            return end, end
        try:
            data_end = os.lseek(self.image.fd, data_start, os.SEEK_HOLE)
        except OSError:
            data_end = end
        return data_start, min(data_end, end)

    def readinto(self, offset: int, buf) -> None:
        view = memoryview(buf).cast("B")
        got = self.image.readinto(view, offset)
        if got < len(view):
            view[got:] = bytes(len(view) - got)

    def info(self) -> dict:
        return {}


class RawWriter(Writer):
    chunk_size = 512

    def __init__(self, out: AtomicOutput, virtual_size: int, preallocation: str):
        self.out = out
        self.virtual_size = virtual_size
        self.preallocation = preallocation
        self.filled = 0   # with preallocation=full: everything below this offset is written
        out.truncate(virtual_size)
        if preallocation in ("falloc", "full") and virtual_size:
            try:
                os.posix_fallocate(out.fd, 0, virtual_size)
            except OSError as exc:
                raise write_error(out.dst, exc) from None

    def encode(self, offset: int, data: memoryview, mask: np.ndarray):
        """Write the runs of data chunks right here, in the worker thread.

        A raw file needs no allocation order (every byte has its fixed place), and parallel
        pwrite measured several times faster than one writing thread on a page cache."""
        written = []
        if not mask.any():
            return written
        cs = self.chunk_size
        for lo, hi in mask_runs(mask):
            start, stop = lo * cs, min(hi * cs, len(data))
            self.out.pwrite(data[start:stop], offset + start)
            written.append((offset + start, stop - start))
        return written

    def commit(self, offset: int, encoded) -> None:
        """With preallocation=full, zero-fill the gaps before each written run, in order."""
        for run_offset, length in encoded:
            self._zero_fill_to(run_offset)
            self.filled = max(self.filled, run_offset + length)

    def _zero_fill_to(self, target: int) -> None:
        if self.preallocation != "full":
            return
        zeros = bytes(min(ZERO_FILL, max(target - self.filled, 0)))
        while self.filled < target:
            n = min(len(zeros), target - self.filled)
            self.out.pwrite(memoryview(zeros)[:n], self.filled)
            self.filled += n

    def finish(self) -> None:
        self._zero_fill_to(self.virtual_size)
        self.out.truncate(self.virtual_size)


def open_reader(image: ImageFile, options: dict) -> RawReader:
    return RawReader(image)


def create_writer(out: AtomicOutput, virtual_size: int, options: dict) -> RawWriter:
    mode = options.get("preallocation", "off")
    if mode not in ("off", "falloc", "full"):
        raise UsageError(f"preallocation={mode!r}: use off, falloc or full")
    return RawWriter(out, virtual_size, mode)


def measure(extents, virtual_size: int, options: dict) -> dict:
    """A raw file's blocks are its data; fully allocated it is the whole virtual size."""
    required = virtual_size
    if options.get("preallocation", "off") == "off":
        required = sum(e.length for e in extents if e.kind == Kind.DATA)
    return {"required": required, "fully-allocated": virtual_size}
