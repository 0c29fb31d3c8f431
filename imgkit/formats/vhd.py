"""VHD (qemu calls it vpc): fixed and dynamic disks. Read, write, check and measure.

Layout facts: shared/reference/formats.md §2. Two traps shape this module:

* The virtual size. qemu 7.2 sizes a disk by its CHS geometry unless the creator application
  is one of a few (``win ``, ``qem2``...) or the geometry is the maximum; a disk written with
  a CHS creator and a size the geometry cannot express loses its tail in qemu. We decide the
  size exactly as qemu does, and ``info`` warns when that differs from current_size.
* Writing. We label our files ``qem2`` with current_size = the true size (rounded up to whole
  512-byte sectors) and the spec's CHS geometry, so qemu, Hyper-V and imgkit agree on the size.
  original_size keeps the exact source size, so a rounded-up disk can say so.

Sector bitmaps are honoured on reads (a clear bit reads as zeros, or as "the parent's" for a
differencing disk), which is what the specification says; qemu ignores them. Every block we
write has a bitmap of all ones, as qemu's blocks do, so both readers see the same bytes.
"""
from __future__ import annotations

import struct
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .. import __version__
from ..limits import DEFAULT_SPARSE
from ..errors import InvalidImage, LimitExceeded, UnsupportedFormat, UsageError
from ..extents import Extent, Kind
from ..io import AtomicOutput, ImageFile, parse_size
from ..limits import MiB, VHD_MAX_BAT_BYTES, VHD_MAX_BLOCK_SIZE, VHD_MAX_SECTORS
from .base import CheckReport, Reader, Writer
from .raw import RawReader, RawWriter

OPTIONS = {
    "subformat": "dynamic (default: sparse blocks) or fixed (raw data and a footer, what Azure wants)",
    "block_size": "dynamic block size, a power of two from 4K to 256M (default 2M)",
    "force_size": "accepted for qemu-img compatibility; imgkit always stores the exact size",
}

SECTOR = 512
FOOTER_SIZE = 512
HEADER_SIZE = 1024
FOOTER_COOKIE = b"conectix"
HEADER_COOKIE = b"cxsparse"
FIXED, DYNAMIC, DIFFERENCING = 2, 3, 4
SUBFORMATS = {FIXED: "fixed", DYNAMIC: "dynamic", DIFFERENCING: "differencing"}
UNUSED = 0xFFFFFFFF                       # BAT entry of a block that is not allocated
NO_OFFSET = 0xFFFFFFFFFFFFFFFF            # data offset of a fixed disk and of the dynamic header
VHD_EPOCH = 946684800                     # 2000-01-01 00:00:00 UTC, the footer's time base
MAX_GEOMETRY = (65535, 16, 255)
# Creators whose disks qemu 7.2 sizes by current_size rather than by CHS geometry.
CURRENT_SIZE_CREATORS = (b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0")
WRITER_CREATOR = b"qem2"
WRITER_HOST_OS = b"Wi2k"
DEFAULT_BLOCK_SIZE = 2 * MiB
# qemu 7.2 computes a zero-byte sector bitmap for blocks under 4 KiB (the spec says one sector),
# so it misreads them: we read such files by the spec but never write them.
QEMU_MIN_BLOCK_SIZE = 4096
MAX_SIZE = VHD_MAX_SECTORS * SECTOR
MAX_BAT_SECTOR = 0xFFFFFFFE               # the largest block position a BAT entry can hold
BITMAP_CACHE_BYTES = 4 * MiB
MAX_FINDINGS = 50                         # per kind of check finding, then a summary line

FOOTER = struct.Struct(">8sIIQI4sI4sQQHBBII16sB")
HEADER = struct.Struct(">8sQQIIII16sI")
FOOTER_CHECKSUM_AT = 64
HEADER_CHECKSUM_AT = 36
PARENT_NAME = slice(64, 576)


def vhd_checksum(raw: bytes, at: int) -> int:
    """One's complement of the byte sum, with the checksum field itself counted as zero."""
    return ~(sum(raw) - sum(raw[at:at + 4])) & 0xFFFFFFFF


def with_checksum(raw: bytes, at: int) -> bytes:
    return raw[:at] + struct.pack(">I", vhd_checksum(raw, at)) + raw[at + 4:]


def round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def bitmap_bytes(block_size: int) -> int:
    """A block's sector bitmap: one bit per sector, padded to whole sectors."""
    return round_up(-(-(block_size // SECTOR) // 8), SECTOR)


def printable(field: bytes) -> str:
    return "".join(chr(b) if 32 <= b < 127 else f"\\x{b:02x}" for b in field)


def spec_geometry(size: int) -> tuple[int, int, int]:
    """The specification's CHS geometry for size bytes; it covers at most size (rounds down)."""
    total = min(size // SECTOR, 65535 * 16 * 255)
    if total >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = total // spt
    else:
        spt = 17
        cth = total // spt
        heads = max(4, (cth + 1023) // 1024)
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = total // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = total // spt
    return cth // heads, heads, spt


@dataclass(frozen=True)
class Footer:
    features: int
    version: int
    data_offset: int
    timestamp: int
    creator_app: bytes
    creator_version: int
    creator_os: bytes
    original_size: int
    current_size: int
    cylinders: int
    heads: int
    sectors: int
    disk_type: int
    checksum: int
    unique_id: bytes
    saved_state: int

    @classmethod
    def parse(cls, raw: bytes) -> "Footer":
        return cls(*FOOTER.unpack_from(raw)[1:])

    def pack(self) -> bytes:
        fields = [FOOTER_COOKIE] + [getattr(self, name) for name in self.__dataclass_fields__]
        return with_checksum(FOOTER.pack(*fields).ljust(FOOTER_SIZE, b"\0"), FOOTER_CHECKSUM_AT)

    @property
    def geometry(self) -> tuple[int, int, int]:
        return self.cylinders, self.heads, self.sectors

    @property
    def chs_size(self) -> int:
        return self.cylinders * self.heads * self.sectors * SECTOR

    @property
    def size_from_current(self) -> bool:
        """qemu 7.2's rule: trust current_size for these creators or the maximum geometry."""
        return self.creator_app in CURRENT_SIZE_CREATORS or self.geometry == MAX_GEOMETRY

    @property
    def virtual_size(self) -> int:
        if self.size_from_current:
            return self.current_size // SECTOR * SECTOR
        return self.chs_size


@dataclass(frozen=True)
class DynamicHeader:
    data_offset: int
    table_offset: int
    version: int
    max_entries: int
    block_size: int
    checksum: int
    parent_id: bytes
    parent_timestamp: int
    parent_name: str

    @classmethod
    def parse(cls, raw: bytes) -> "DynamicHeader":
        fields = HEADER.unpack_from(raw)[1:]
        name = raw[PARENT_NAME].decode("utf-16-be", errors="replace").split("\0", 1)[0]
        return cls(*fields, parent_name=name)


@dataclass(frozen=True)
class Layout:
    """Where everything is in a dynamic disk, decided once from the footer and header."""
    block_size: int
    bitmap_size: int
    table_offset: int
    max_entries: int
    header_offset: int

    @property
    def block_span(self) -> int:
        return self.bitmap_size + self.block_size

    @property
    def table_bytes(self) -> int:
        return round_up(self.max_entries * 4, SECTOR)


# -- reading the metadata (shared by the reader and the checker) ---------------------------------

def locate_footer(image: ImageFile) -> tuple[bytes, int]:
    """The footer and its offset: a copy at 0 for dynamic disks, else the last 512 bytes (fixed)."""
    if image.size < FOOTER_SIZE:
        raise InvalidImage(f"{image.path}: {image.size} bytes is too small for a VHD footer")
    head = image.pread_exact(FOOTER_SIZE, 0, "VHD footer copy")
    if head[:8] == FOOTER_COOKIE and Footer.parse(head).disk_type != FIXED:
        return head, 0
    tail_at = image.size - FOOTER_SIZE
    tail = image.pread_exact(FOOTER_SIZE, tail_at, "VHD footer")
    if tail[:8] == FOOTER_COOKIE:
        return tail, tail_at
    raise InvalidImage(f"{image.path}: no VHD footer ('conectix') at the start or in the last 512 bytes")


def verify_checksum(image: ImageFile, raw: bytes, at: int, where: int, what: str) -> str | None:
    """None when the stored checksum is right, else a one-line description of the mismatch."""
    stored = struct.unpack_from(">I", raw, at)[0]
    computed = vhd_checksum(raw, at)
    if stored == computed:
        return None
    return (f"{image.path}: {what} checksum mismatch at offset {where} "
            f"(stored 0x{stored:08x}, computed 0x{computed:08x})")


def checked_size(image: ImageFile, footer: Footer) -> int:
    size = footer.virtual_size
    if size > MAX_SIZE:
        source = "current_size" if footer.size_from_current else "CHS geometry"
        raise LimitExceeded(f"{image.path}: VHD virtual size {size} bytes (from its {source}) is above "
                            f"the VHD limit of 2040 GiB ({VHD_MAX_SECTORS:#x} sectors)")
    return size


def read_header(image: ImageFile, footer: Footer) -> tuple[bytes, DynamicHeader]:
    raw = image.pread_exact(HEADER_SIZE, footer.data_offset, "VHD dynamic disk header")
    if raw[:8] != HEADER_COOKIE:
        raise InvalidImage(f"{image.path}: no dynamic disk header ('cxsparse') at offset {footer.data_offset}")
    return raw, DynamicHeader.parse(raw)


def dynamic_layout(image: ImageFile, footer: Footer, header: DynamicHeader, size: int) -> Layout:
    """Validate the block size and the table against the virtual size and the limits."""
    bs = header.block_size
    if bs < SECTOR or not is_power_of_two(bs):
        raise InvalidImage(f"{image.path}: VHD block size {bs} is not a power of two of at least 512")
    if bs > VHD_MAX_BLOCK_SIZE:
        raise LimitExceeded(f"{image.path}: VHD block size {bs} is above imgkit's limit of {VHD_MAX_BLOCK_SIZE}")
    needed = -(-size // bs)
    if header.max_entries < needed:
        raise InvalidImage(f"{image.path}: the VHD block table has {header.max_entries} entries, fewer than "
                           f"the {needed} blocks of the {size}-byte virtual size")
    if needed * 4 > VHD_MAX_BAT_BYTES:
        raise LimitExceeded(f"{image.path}: the VHD block table of {needed} entries is above imgkit's limit "
                            f"of {VHD_MAX_BAT_BYTES // 4} entries")
    return Layout(bs, bitmap_bytes(bs), header.table_offset, header.max_entries, footer.data_offset)


def read_table(image: ImageFile, layout: Layout, entries: int) -> np.ndarray:
    raw = image.pread_exact(entries * 4, layout.table_offset, "VHD block allocation table")
    return np.frombuffer(raw, dtype=">u4").astype(np.int64)


def block_bytes_needed(layout: Layout, size: int, count: int) -> np.ndarray:
    """Bytes each block must have in the file: bitmap plus the data that the virtual size uses."""
    index = np.arange(count, dtype=np.int64)
    used = np.clip(size - index * layout.block_size, 0, layout.block_size)
    return layout.bitmap_size + (used + SECTOR - 1) // SECTOR * SECTOR


# -- reader --------------------------------------------------------------------------------------

class BitmapCache:
    """Sector bitmaps of recently used blocks, bounded in bytes and shared between threads."""

    def __init__(self, limit: int = BITMAP_CACHE_BYTES):
        self.limit = limit
        self._items: OrderedDict[int, np.ndarray | None] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: int, load):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = load()
        with self._lock:
            if key not in self._items:
                self._items[key] = value
                self._bytes += self._cost(value)
                while self._bytes > self.limit and len(self._items) > 1:
                    _, old = self._items.popitem(last=False)
                    self._bytes -= self._cost(old)
        return value

    @staticmethod
    def _cost(value) -> int:
        return 64 if value is None else value.nbytes + 64


class VhdReader(Reader):
    format = "vhd"

    def __init__(self, image: ImageFile):
        super().__init__(image)
        raw, self.footer_offset = locate_footer(image)
        problem = verify_checksum(image, raw, FOOTER_CHECKSUM_AT, self.footer_offset, "VHD footer")
        if problem:
            raise InvalidImage(problem)
        self.footer = Footer.parse(raw)
        self.virtual_size = checked_size(image, self.footer)
        self.header: DynamicHeader | None = None
        self.unsafe_reason: str | None = None
        kind = self.footer.disk_type
        if kind == FIXED:
            self._open_fixed()
        elif kind in (DYNAMIC, DIFFERENCING):
            self._open_dynamic()
        else:
            raise InvalidImage(f"{image.path}: VHD disk type {kind} is not fixed (2), dynamic (3) "
                               f"or differencing (4)")

    def _open_fixed(self) -> None:
        if self.footer_offset < self.virtual_size:
            raise InvalidImage(f"{self.image.path}: fixed VHD holds {self.footer_offset} bytes of data, less "
                               f"than its virtual size of {self.virtual_size}; the file is truncated")
        self._raw = RawReader(self.image)

    def _open_dynamic(self) -> None:
        raw, self.header = read_header(self.image, self.footer)
        problem = verify_checksum(self.image, raw, HEADER_CHECKSUM_AT, self.footer.data_offset,
                                  "VHD dynamic disk header")
        if problem:
            raise InvalidImage(problem)
        self.layout = dynamic_layout(self.image, self.footer, self.header, self.virtual_size)
        count = -(-self.virtual_size // self.layout.block_size)
        self.bat = read_table(self.image, self.layout, count)
        self._check_blocks_inside()
        self._bitmaps = BitmapCache()
        self._partial = Kind.ZERO
        if self.footer.disk_type == DIFFERENCING:
            self._partial = Kind.UNALLOCATED
            name = self.header.parent_name or "(unnamed)"
            self.unsafe_reason = (f"differencing VHD: its data depends on a parent image ({name}), "
                                  f"which imgkit does not open")

    def _check_blocks_inside(self) -> None:
        allocated = np.flatnonzero(self.bat != UNUSED)
        if not len(allocated):
            return
        starts = self.bat[allocated] * SECTOR
        ends = starts + block_bytes_needed(self.layout, self.virtual_size, len(self.bat))[allocated]
        outside = np.flatnonzero(ends > self.image.size)
        if len(outside):
            first = int(outside[0])
            raise InvalidImage(f"{self.image.path}: VHD block table entry {int(allocated[first])} puts a block at "
                               f"offset {int(starts[first])}, beyond the end of the file ({self.image.size} "
                               f"bytes); the file is truncated or the table is corrupt")

    @property
    def is_fixed(self) -> bool:
        return self.footer.disk_type == FIXED

    def extents(self, start: int = 0, end: int | None = None) -> Iterator[Extent]:
        end = self.virtual_size if end is None else min(end, self.virtual_size)
        if start >= end:
            return
        if self.is_fixed:
            yield from self._raw.extents(start, end)
            return
        bs = self.layout.block_size
        first = start // bs
        allocated = np.flatnonzero(self.bat[first:(end - 1) // bs + 1] != UNUSED) + first
        pos = start
        for index in allocated.tolist():
            block_start = index * bs
            if block_start > pos:
                yield Extent(pos, block_start - pos, Kind.UNALLOCATED)
                pos = block_start
            stop = min(end, block_start + bs)
            yield from self._block_extents(index, pos, stop)
            pos = stop
        if pos < end:
            yield Extent(pos, end - pos, Kind.UNALLOCATED)

    def _block_extents(self, index: int, lo: int, hi: int) -> Iterator[Extent]:
        """[lo, hi) inside one allocated block, split where its sector bitmap changes."""
        base = index * self.layout.block_size
        host = int(self.bat[index]) * SECTOR + self.layout.bitmap_size - base
        bits = self._bitmaps.get(index, lambda: self._load_bitmap(index))
        first, last = (lo - base) // SECTOR, -(-(hi - base) // SECTOR)
        sub = None if bits is None else bits[first:last]
        if sub is None or sub.all():
            yield Extent(lo, hi - lo, Kind.DATA, host + lo)
            return
        cuts = (np.flatnonzero(sub[1:] != sub[:-1]) + 1).tolist()
        for run_start, run_stop in zip([0] + cuts, cuts + [len(sub)]):
            run_lo = max(lo, base + (first + run_start) * SECTOR)
            run_hi = min(hi, base + (first + run_stop) * SECTOR)
            if sub[run_start]:
                yield Extent(run_lo, run_hi - run_lo, Kind.DATA, host + run_lo)
            else:
                yield Extent(run_lo, run_hi - run_lo, self._partial)

    def _load_bitmap(self, index: int) -> np.ndarray | None:
        """The block's bitmap as one 0/1 per sector; None when every sector is present."""
        sectors = self.layout.block_size // SECTOR
        raw = self.image.pread_exact(-(-sectors // 8), int(self.bat[index]) * SECTOR, "VHD sector bitmap")
        bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="big")[:sectors]
        return None if bits.all() else bits

    def readinto(self, offset: int, buf) -> None:
        view = memoryview(buf).cast("B")
        end = offset + len(view)
        pos = offset
        for ext in self.extents(offset, end):
            part = view[ext.offset - offset:ext.end - offset]
            if ext.kind == Kind.DATA:
                self._read_exact(part, ext.host_offset)
            else:
                np.frombuffer(part, dtype=np.uint8)[:] = 0
            pos = ext.end
        if pos < end:
            np.frombuffer(view[pos - offset:], dtype=np.uint8)[:] = 0

    def _read_exact(self, part: memoryview, host: int) -> None:
        if self.image.readinto(part, host) != len(part):
            raise InvalidImage(f"{self.image.path}: short read of VHD data at offset {host}; "
                               f"the file is truncated")

    def info(self) -> dict:
        f = self.footer
        cylinders, heads, sectors = f.geometry
        data = {"subformat": SUBFORMATS[f.disk_type]}
        out: dict = {}
        if self.header is not None:
            data["block-size"] = self.layout.block_size
            out["cluster-size"] = self.layout.block_size
        data.update({
            "creator-application": printable(f.creator_app),
            "creator-version": f"{f.creator_version >> 16}.{f.creator_version & 0xFFFF}",
            "creator-host-os": printable(f.creator_os),
            "geometry": {"cylinders": cylinders, "heads": heads, "sectors-per-track": sectors},
            "uuid": str(uuid.UUID(bytes=f.unique_id)),
            "saved-state": bool(f.saved_state),
            "current-size": f.current_size,
            "original-size": f.original_size,
            "chs-size": f.chs_size,
            "size-from": "current_size" if f.size_from_current else "chs",
        })
        out["format-specific"] = {"type": "vpc", "data": data}
        notes = self._notes()
        if notes:
            out["notes"] = notes
        if self.header is not None and f.disk_type == DIFFERENCING:
            out["backing-filename"] = self.header.parent_name
        return out

    def _notes(self) -> list[str]:
        f = self.footer
        notes = []
        if not f.size_from_current and f.chs_size != f.current_size:
            notes.append(
                f"qemu and imgkit read this disk as {f.chs_size} bytes, from its CHS geometry "
                f"{f.cylinders}/{f.heads}/{f.sectors} (creator {printable(f.creator_app)!r}), but its "
                f"current_size says {f.current_size} bytes, which Hyper-V and Azure use; check which size "
                f"is right before uploading")
        if f.original_size != f.current_size:
            notes.append(f"original size {f.original_size} differs from current size {f.current_size} "
                         f"(the disk was resized, or rounded up to whole 512-byte sectors when written)")
        if self.header is not None and self.layout.block_size < QEMU_MIN_BLOCK_SIZE:
            notes.append(f"the block size {self.layout.block_size} is below 4 KiB: qemu 7.2 reads such blocks "
                         f"as if they had no sector bitmap, so it sees different data than imgkit and the "
                         f"VHD specification")
        if f.saved_state:
            notes.append("the saved-state flag is set: a virtual machine was saved with this disk attached")
        if self.unsafe_reason:
            notes.append(self.unsafe_reason)
        return notes


def open_reader(image: ImageFile, options: dict) -> VhdReader:
    return VhdReader(image)


# -- writer --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """What a writer will produce for a virtual size and -o options (shared with measure)."""
    subformat: str
    source_size: int
    disk_size: int          # source_size rounded up to whole sectors
    block_size: int

    @property
    def entries(self) -> int:
        return -(-self.disk_size // self.block_size)

    @property
    def bitmap_size(self) -> int:
        return bitmap_bytes(self.block_size)

    @property
    def block_span(self) -> int:
        return self.bitmap_size + self.block_size

    @property
    def table_offset(self) -> int:
        return FOOTER_SIZE + HEADER_SIZE

    @property
    def first_block(self) -> int:
        return self.table_offset + round_up(self.entries * 4, SECTOR)

    def file_size(self, blocks: int) -> int:
        if self.subformat == "fixed":
            return self.disk_size + FOOTER_SIZE
        return self.first_block + blocks * self.block_span + FOOTER_SIZE


def make_plan(virtual_size: int, options: dict) -> Plan:
    subformat = options.get("subformat", "dynamic")
    if subformat not in ("dynamic", "fixed"):
        raise UsageError(f"subformat={subformat!r}: use dynamic or fixed")
    if options.get("force_size", "on") not in ("on", "off", "true", "false", "yes", "no"):
        raise UsageError(f"force_size={options['force_size']!r}: use on or off")
    if "block_size" in options and subformat != "dynamic":
        raise UsageError("block_size applies only to subformat=dynamic")
    block_size = parse_size(options.get("block_size", str(DEFAULT_BLOCK_SIZE)))
    if not is_power_of_two(block_size) or not SECTOR <= block_size <= VHD_MAX_BLOCK_SIZE:
        raise UsageError(f"block_size={options.get('block_size')}: use a power of two from 4K to 256M")
    if block_size < QEMU_MIN_BLOCK_SIZE:
        raise UsageError(f"block_size={options.get('block_size')}: qemu misreads VHD blocks smaller than 4K "
                         f"(it assumes they have no sector bitmap); use 4K or more")
    disk_size = round_up(virtual_size, SECTOR)
    if disk_size > MAX_SIZE:
        raise UnsupportedFormat(f"a VHD holds at most 2040 GiB ({MAX_SIZE} bytes); this disk is "
                                f"{virtual_size} bytes: use qcow2 or raw")
    plan = Plan(subformat, virtual_size, disk_size, block_size)
    if subformat == "dynamic":
        check_addressable(plan)
    return plan


def check_addressable(plan: Plan) -> None:
    """Refuse a block size whose table imgkit could not read back, or whose blocks it cannot address."""
    too_small = f"block_size={plan.block_size} is too small for a {plan.source_size}-byte VHD"
    if plan.entries * 4 > VHD_MAX_BAT_BYTES:
        raise UsageError(f"{too_small}: its block table would exceed {VHD_MAX_BAT_BYTES // MiB} MiB; "
                         f"use a larger block_size")
    last_block = plan.file_size(plan.entries) - FOOTER_SIZE - plan.block_span
    if last_block // SECTOR > MAX_BAT_SECTOR:
        raise UsageError(f"{too_small}: its blocks would lie beyond what the block table can address; "
                         f"use a larger block_size")


def make_footer(plan: Plan) -> bytes:
    """Creator qem2 with current_size = the true size: qemu, Hyper-V and imgkit all read it so."""
    major, minor = (int(part) for part in __version__.split(".")[:2])
    cylinders, heads, sectors = spec_geometry(plan.disk_size)
    return Footer(
        features=2, version=0x00010000,
        data_offset=FOOTER_SIZE if plan.subformat == "dynamic" else NO_OFFSET,
        timestamp=min(max(int(time.time()) - VHD_EPOCH, 0), 0xFFFFFFFF),
        creator_app=WRITER_CREATOR, creator_version=(major << 16) | minor, creator_os=WRITER_HOST_OS,
        original_size=plan.source_size, current_size=plan.disk_size,
        cylinders=cylinders, heads=heads, sectors=sectors,
        disk_type=DYNAMIC if plan.subformat == "dynamic" else FIXED,
        checksum=0, unique_id=uuid.uuid4().bytes, saved_state=0,
    ).pack()


def make_header(plan: Plan) -> bytes:
    raw = HEADER.pack(HEADER_COOKIE, NO_OFFSET, plan.table_offset, 0x00010000, plan.entries,
                      plan.block_size, 0, bytes(16), 0)
    return with_checksum(raw.ljust(HEADER_SIZE, b"\0"), HEADER_CHECKSUM_AT)


class DynamicWriter(Writer):
    """Blocks (bitmap of ones, then data) in guest order; table, header and footers in finish()."""

    def __init__(self, out: AtomicOutput, plan: Plan):
        self.out = out
        self.plan = plan
        self.chunk_size = plan.block_size
        self.bat = np.full(plan.entries, UNUSED, dtype=">u4")
        self.bitmap = b"\xff" * plan.bitmap_size
        self.next_block = plan.first_block

    def encode(self, offset: int, data: memoryview, mask: np.ndarray):
        """(block index, zero-copy slice) for every block that holds data."""
        bs = self.chunk_size
        first = offset // bs
        return [(first + i, data[i * bs:(i + 1) * bs]) for i in np.flatnonzero(mask).tolist()]

    def commit(self, offset: int, encoded) -> None:
        for index, payload in encoded:
            self.bat[index] = self.next_block // SECTOR
            self.out.pwrite(self.bitmap, self.next_block)
            self.out.pwrite(payload, self.next_block + self.plan.bitmap_size)
            self.next_block += self.plan.block_span

    def finish(self) -> None:
        footer = make_footer(self.plan)
        table = self.bat.tobytes()
        table += b"\xff" * (round_up(len(table), SECTOR) - len(table))
        self.out.pwrite(footer, 0)
        self.out.pwrite(make_header(self.plan), FOOTER_SIZE)
        self.out.pwrite(table, self.plan.table_offset)
        self.out.pwrite(footer, self.next_block)
        self.out.truncate(self.next_block + FOOTER_SIZE)


class FixedWriter(RawWriter):
    """A sparse raw file of the disk size, then the footer."""

    def __init__(self, out: AtomicOutput, plan: Plan):
        super().__init__(out, plan.disk_size, "off")
        self.plan = plan

    def finish(self) -> None:
        super().finish()
        self.out.pwrite(make_footer(self.plan), self.plan.disk_size)


def create_writer(out: AtomicOutput, virtual_size: int, options: dict) -> Writer:
    plan = make_plan(virtual_size, options)
    return DynamicWriter(out, plan) if plan.subformat == "dynamic" else FixedWriter(out, plan)


def measure(extents, virtual_size: int, options: dict) -> dict:
    """Exact file sizes of what create_writer produces (with the default -S scan granularity).

    A fixed VHD's file is always full size (holes only make it cheaper on the host), so both
    numbers are that size, as qemu-img measure answers for raw."""
    plan = make_plan(virtual_size, options)
    if plan.subformat == "fixed":
        return {"required": plan.file_size(0), "fully-allocated": plan.file_size(0)}
    return {"required": plan.file_size(count_blocks(extents, plan)),
            "fully-allocated": plan.file_size(plan.entries)}


def count_blocks(extents, plan: Plan) -> int:
    """Blocks touched by DATA, seen at the engine's zero-scan granularity."""
    unit = max(DEFAULT_SPARSE, plan.block_size)
    count, last = 0, -1
    for ext in extents:
        if ext.kind != Kind.DATA or ext.length == 0 or ext.offset >= plan.source_size:
            continue
        lo = ext.offset // unit * unit // plan.block_size
        hi = (min(round_up(ext.end, unit), plan.disk_size) - 1) // plan.block_size
        lo = max(lo, last + 1)
        if hi >= lo:
            count += hi - lo + 1
            last = hi
    return count


# -- check ---------------------------------------------------------------------------------------

class Findings:
    """Corruption messages with a cap per kind, so a shredded table does not print a million lines."""

    def __init__(self, report: CheckReport):
        self.report = report

    def add(self, message: str) -> None:
        self.report.corruptions.append(message)

    def add_each(self, hits: np.ndarray, describe, kind: str) -> None:
        """describe(i) for the first hits, then one line counting the rest."""
        for i in hits[:MAX_FINDINGS].tolist():
            self.add(describe(i))
        if len(hits) > MAX_FINDINGS:
            self.add(f"... and {len(hits) - MAX_FINDINGS} more {kind}")


def check(image: ImageFile) -> CheckReport:
    """Footer and header checksums, footer copy, block table bounds and overlaps, truncation."""
    report = CheckReport(image.path, "vhd")
    findings = Findings(report)
    try:
        _check(image, report, findings)
    except LimitExceeded as exc:
        report.check_errors.append(exc.message)
    except InvalidImage as exc:
        findings.add(exc.message)
    return report


def _check(image: ImageFile, report: CheckReport, findings: Findings) -> None:
    raw, at = locate_footer(image)
    problem = verify_checksum(image, raw, FOOTER_CHECKSUM_AT, at, "VHD footer")
    if problem:
        findings.add(problem)
    footer = Footer.parse(raw)
    size = checked_size(image, footer)
    if footer.disk_type == FIXED:
        report.image_end_offset = at + FOOTER_SIZE
        if at < size:
            findings.add(f"{image.path}: fixed VHD holds {at} bytes of data, less than its virtual size "
                         f"of {size}; the file is truncated")
        return
    if footer.disk_type not in (DYNAMIC, DIFFERENCING):
        findings.add(f"{image.path}: VHD disk type {footer.disk_type} is not fixed (2), dynamic (3) or "
                     f"differencing (4)")
        return
    if at != 0:
        findings.add(f"{image.path}: the footer copy at offset 0 is missing or damaged (the footer at "
                     f"offset {at} was used)")
    if footer.disk_type == DIFFERENCING:
        report.warnings.append("differencing disk: sectors not present here come from its parent image, "
                               "which is not checked")
    _check_tail_footer(image, raw, findings)
    header_raw, header = read_header(image, footer)
    problem = verify_checksum(image, header_raw, HEADER_CHECKSUM_AT, footer.data_offset,
                              "VHD dynamic disk header")
    if problem:
        findings.add(problem)
    layout = dynamic_layout(image, footer, header, size)
    _check_blocks(image, layout, size, report, findings)


def _check_tail_footer(image: ImageFile, copy: bytes, findings: Findings) -> None:
    tail_at = image.size - FOOTER_SIZE
    tail = image.pread_exact(FOOTER_SIZE, tail_at, "VHD footer")
    if tail == copy:
        return
    if tail[:8] != FOOTER_COOKIE:
        findings.add(f"{image.path}: no VHD footer in the last 512 bytes (offset {tail_at}); the file is "
                     f"truncated or its end was overwritten")
        return
    findings.add(f"{image.path}: the footer copy at offset 0 differs from the footer at offset {tail_at}")
    problem = verify_checksum(image, tail, FOOTER_CHECKSUM_AT, tail_at, "VHD footer")
    if problem:
        findings.add(problem)


def _check_blocks(image: ImageFile, layout: Layout, size: int, report: CheckReport,
                  findings: Findings) -> None:
    """Every allocated block inside the data area, clear of metadata and of every other block."""
    in_file = max(0, min(layout.max_entries, (image.size - layout.table_offset) // 4))
    if in_file < layout.max_entries:
        findings.add(f"{image.path}: the VHD block table ({layout.max_entries} entries at offset "
                     f"{layout.table_offset}) runs past the end of the file ({image.size} bytes)")
    count = -(-size // layout.block_size)
    bat = read_table(image, layout, min(in_file, count))
    report.total_clusters = count
    allocated = np.flatnonzero(bat != UNUSED)
    report.allocated_clusters = int(len(allocated))
    starts = bat[allocated] * SECTOR
    ends = starts + layout.block_span
    data_end = image.size - FOOTER_SIZE
    metadata_end = max(layout.table_offset + layout.table_bytes, layout.header_offset + HEADER_SIZE)
    report.image_end_offset = int(max(ends.max(initial=0), metadata_end)) + FOOTER_SIZE
    path = image.path
    beyond = np.flatnonzero(ends > data_end)
    findings.add_each(beyond, lambda i: (
        f"{path}: block table entry {int(allocated[i])}: block at offset {int(starts[i])} "
        f"(+{layout.block_span} bytes) runs past the data area, which ends at {data_end} "
        f"(truncated file or corrupt entry)"), "blocks past the end")
    regions = ((0, FOOTER_SIZE, "footer copy"),
               (layout.header_offset, layout.header_offset + HEADER_SIZE, "dynamic disk header"),
               (layout.table_offset, layout.table_offset + layout.table_bytes, "block allocation table"))
    for lo, hi, name in regions:
        findings.add_each(np.flatnonzero((starts < hi) & (ends > lo)), lambda i: (
            f"{path}: block table entry {int(allocated[i])}: block at offset {int(starts[i])} "
            f"overlaps the {name} at offset {lo}"), f"blocks over the {name}")
    order = np.argsort(starts, kind="stable")
    clash = np.flatnonzero(ends[order][:-1] > starts[order][1:])
    findings.add_each(clash, lambda i: (
        f"{path}: the blocks of table entries {int(allocated[order[i]])} and {int(allocated[order[i + 1]])} "
        f"overlap at offset {int(starts[order[i + 1]])}"), "overlapping blocks")
