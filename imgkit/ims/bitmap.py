"""The .mf bitmap a RAW quick import needs: one bit per block that holds any non-zero byte.

Layout (the README repeats it): bit i describes block i of `granularity` bytes of the virtual
disk (the last block may be short), set when the block holds a non-zero byte; bits are packed
least significant bit first in each byte; the file is ceil(blocks / 8) bytes with no header.
Huawei's CreateMF.jar layout is unpublished; this one follows the public ZVHD2 bitmap convention.

The mask comes from the extent map first (holes and zero extents are never read), then the
native kernel over the data windows (engine.block_mask).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from .. import engine, native
from ..errors import InvalidImage, UsageError
from ..io import AtomicOutput, ImageFile, check_destination
from .rules import BITMAP_EXTENSION, DEFAULT_GRANULARITY

MAX_BLOCKS = 1 << 28        # 32 MiB of bitmap, 256 MiB of mask in memory while it is built


def default_bitmap_path(image_path: str | os.PathLike) -> str:
    """The user guide's naming rule: image01.raw -> image01.mf, beside the image."""
    return os.path.splitext(os.fspath(image_path))[0] + BITMAP_EXTENSION


def check_granularity(granularity: int, virtual_size: int | None = None) -> None:
    engine.check_block_size("--granularity", granularity)
    if virtual_size is not None and block_count(virtual_size, granularity) > MAX_BLOCKS:
        raise UsageError(f"--granularity {granularity}: {block_count(virtual_size, granularity)} blocks "
                         f"exceed the limit of {MAX_BLOCKS}; use a larger granularity")


def block_count(virtual_size: int, granularity: int) -> int:
    return -(-virtual_size // granularity)


def bitmap_size(virtual_size: int, granularity: int) -> int:
    return -(-block_count(virtual_size, granularity) // 8)


def pack(mask: np.ndarray) -> bytes:
    return native.pack_bits(mask).tobytes()


def unpack(data: bytes) -> np.ndarray:
    """All bits of a bitmap file as bools (padding bits of the last byte included)."""
    return np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little").astype(np.bool_)


def compute_mask(reader, granularity: int = DEFAULT_GRANULARITY, threads: int | None = None,
                 progress=None) -> np.ndarray:
    """mask[i]: block i holds a non-zero byte; only DATA extents are read (engine.block_mask,
    which scans a RAW file in place)."""
    check_granularity(granularity, reader.virtual_size)
    return engine.block_mask(reader, granularity, threads, progress)


def write_bitmap(reader, dst: str, granularity: int = DEFAULT_GRANULARITY, force: bool = False,
                 threads: int | None = None, progress=None) -> dict:
    """Compute the bitmap of reader's virtual disk and write it atomically to dst."""
    check_granularity(granularity, reader.virtual_size)
    check_destination(dst, force, [reader.image.path])
    mask = compute_mask(reader, granularity, threads, progress)
    save(pack(mask), dst, force, [reader.image.path])
    return describe(mask, granularity, dst)


def save(data: bytes, dst: str, force: bool = False, sources=()) -> None:
    """Write packed bitmap bytes atomically."""
    with AtomicOutput(dst, force, sources) as out:
        out.pwrite(data, 0)
        out.truncate(len(data))


def describe(mask: np.ndarray, granularity: int, path: str | None = None) -> dict:
    return {"bitmap": path, "granularity": granularity, "blocks": int(len(mask)),
            "data-blocks": int(np.count_nonzero(mask)), "bytes": (len(mask) + 7) // 8}


@dataclass
class Verdict:
    matches: bool
    message: str
    block: int | None = None        # first mismatching block
    expected: bool | None = None    # its bit as computed from the image
    found: bool | None = None       # its bit in the file

    def to_json(self) -> dict:
        return {"matches": self.matches, "message": self.message, "block": self.block,
                "expected": self.expected, "found": self.found}


def read_bitmap(path: str, virtual_size: int, granularity: int) -> bytes:
    """The bitmap file's bytes, refused when its size cannot belong to this image."""
    expected = bitmap_size(virtual_size, granularity)
    with ImageFile(path) as f:
        if f.size != expected:
            raise InvalidImage(f"{path}: the bitmap is {f.size} bytes; a {virtual_size}-byte disk at "
                               f"granularity {granularity} needs {expected}")
        return f.pread_exact(expected, 0, "bitmap")


def compare(expected: np.ndarray, data: bytes, granularity: int) -> Verdict:
    """Where the file's bits differ from the mask (padding bits must be zero)."""
    nblocks = len(expected)
    if len(data) != (nblocks + 7) // 8:
        return Verdict(False, f"the bitmap is {len(data)} bytes, {(nblocks + 7) // 8} expected")
    bits = unpack(data)
    if bits[nblocks:].any():
        block = nblocks + int(np.flatnonzero(bits[nblocks:])[0])
        return Verdict(False, f"padding bit {block} (past the last of {nblocks} blocks) is set",
                       block, False, True)
    diff = np.flatnonzero(bits[:nblocks] != expected)
    if len(diff) == 0:
        return Verdict(True, f"the bitmap matches ({nblocks} blocks of {granularity} bytes)")
    block = int(diff[0])
    want = bool(expected[block])
    state = "holds data" if want else "is all zeros"
    return Verdict(False, f"block {block} (bytes {block * granularity}..{(block + 1) * granularity - 1}) "
                          f"{state} but its bit is {int(not want)}; {len(diff)} blocks differ",
                   block, want, not want)


def verify_bitmap(reader, path: str, granularity: int = DEFAULT_GRANULARITY, threads: int | None = None,
                  progress=None) -> Verdict:
    """Recompute the bitmap of reader and compare it with the file at path."""
    check_granularity(granularity, reader.virtual_size)
    try:
        data = read_bitmap(path, reader.virtual_size, granularity)
    except InvalidImage as exc:
        return Verdict(False, exc.message)
    return compare(compute_mask(reader, granularity, threads, progress), data, granularity)


class StreamingBitmap:
    """The mask built from windows as they stream through a Writer wrapper (prepare).

    window() is pure and runs in worker threads; apply() runs in commit order."""

    def __init__(self, virtual_size: int, granularity: int):
        check_granularity(granularity, virtual_size)
        self.granularity = granularity
        self.mask = np.zeros(block_count(virtual_size, granularity), dtype=np.bool_)

    def window(self, offset: int, data) -> tuple[int, np.ndarray]:
        g = self.granularity
        if offset % g == 0:
            return offset // g, native.nonzero_blocks(data, g)
        # a window smaller than a block lies inside one block
        return offset // g, native.nonzero_blocks(data, len(data))

    def apply(self, first: int, sub: np.ndarray) -> None:
        self.mask[first:first + len(sub)] |= sub
