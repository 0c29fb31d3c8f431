"""Writing monolithicSparse and streamOptimized VMDK files.

Both writers append grains in ascending LBA order as the engine commits them, keep only the
grain table being filled in memory (so memory does not grow with the disk), and write the
descriptor and header last. The CID is a CRC of what was written, so the same input gives
the same bytes whatever the thread count.
"""
from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass

import numpy as np

from ... import limits
from ...errors import UsageError, WriteError
from ...extents import Kind, mask_runs
from ...io import AtomicOutput
from ..base import Writer
from . import deflate
from . import descriptor as desc_mod
from .layout import (COMPRESS_DEFLATE, COMPRESS_NONE, FLAG_COMPRESSED, FLAG_MARKERS, FLAG_NEWLINE_CHECK,
                     FLAG_REDUNDANT_GD, GD_AT_END, GRAIN_MARKER_BYTES, MARKER_EOS, MARKER_FOOTER,
                     MARKER_GD, MARKER_GT, SECTOR, Header, pack_grain_marker, pack_marker, sectors_for)

GRAIN_SECTORS = 128                 # 64 KiB grains, as qemu and VMware write
GRAIN_BYTES = GRAIN_SECTORS * SECTOR
GTES = 512
GT_SECTORS = GTES * 4 // SECTOR
DESCRIPTOR_OFFSET = 1
DESCRIPTOR_SECTORS = 20
SUBFORMATS = ("monolithicSparse", "streamOptimized")


@dataclass(frozen=True)
class Settings:
    subformat: str = "monolithicSparse"
    adapter: str = "ide"
    hwversion: str = "4"
    toolsversion: str = "2147483647"


def parse_settings(options: dict) -> Settings:
    """-o values checked once, for both the writer and measure."""
    subformat = options.get("subformat", "monolithicSparse")
    if subformat not in SUBFORMATS:
        raise UsageError(f"subformat={subformat!r}: imgkit writes single-file VMDKs: "
                         f"{' or '.join(SUBFORMATS)}")
    adapter = options.get("adapter_type", "ide")
    if adapter not in desc_mod.ADAPTERS:
        raise UsageError(f"adapter_type={adapter!r}: use one of {', '.join(desc_mod.ADAPTERS)}")
    hwversion = options.get("hwversion", "4")
    if not hwversion.isdigit() or len(hwversion) > 3:
        raise UsageError(f"hwversion={hwversion!r}: use a virtual hardware version number such as 4 or 13")
    toolsversion = options.get("toolsversion", "2147483647")
    if not toolsversion.isdigit() or int(toolsversion) > 0xFFFFFFFF:
        raise UsageError(f"toolsversion={toolsversion!r}: use a number below 2^32")
    compress = options.get("compress", "off")
    if compress not in ("on", "off"):
        raise UsageError(f"compress={compress!r}: use on or off")
    if compress == "on" and subformat != "streamOptimized":
        raise UsageError("-c: monolithicSparse grains cannot be compressed (qemu-img silently ignores -c "
                         "here); use -o subformat=streamOptimized")
    if compress == "off" and "compress" in options and subformat == "streamOptimized":
        raise UsageError("compress=off: streamOptimized grains are always compressed")
    return Settings(subformat, adapter, hwversion, toolsversion)


def capacity_sectors(virtual_size: int) -> int:
    """The virtual size rounded up to a sector, as qemu does, within a sparse extent's u32 range."""
    if virtual_size <= 0:
        raise UsageError("a VMDK needs a virtual size above 0 (qemu-img writes an unreadable file here)")
    capacity = sectors_for(virtual_size)
    if capacity > limits.VMDK_MAX_SECTORS:
        raise UsageError(f"virtual size {virtual_size}: a single-file VMDK holds at most 2 TiB")
    return capacity


@dataclass(frozen=True)
class SparseLayout:
    """Where monolithicSparse metadata sits (formats.md §3.3, the qemu layout)."""

    capacity: int
    tables: int
    gd_sectors: int
    rgd: int
    rgt: int
    gd: int
    gt: int
    overhead: int

    @classmethod
    def for_capacity(cls, capacity: int) -> "SparseLayout":
        grains = -(-capacity // GRAIN_SECTORS)
        tables = -(-grains // GTES)
        gd_sectors = sectors_for(tables * 4)
        rgd = DESCRIPTOR_OFFSET + DESCRIPTOR_SECTORS
        rgt = rgd + gd_sectors
        gd = rgt + tables * GT_SECTORS
        gt = gd + gd_sectors
        overhead = -(-(gt + tables * GT_SECTORS) // GRAIN_SECTORS) * GRAIN_SECTORS
        return cls(capacity, tables, gd_sectors, rgd, rgt, gd, gt, overhead)


class _GrainWriter(Writer):
    """Shared by both subformats: the grain table being filled, the CID, descriptor and header."""

    chunk_size = GRAIN_BYTES
    create_type = ""

    def __init__(self, out: AtomicOutput, virtual_size: int, settings: Settings):
        self.out = out
        self.settings = settings
        self.capacity = capacity_sectors(virtual_size)
        self.grains = -(-self.capacity // GRAIN_SECTORS)
        self.tables = -(-self.grains // GTES)
        self.next_sector = 0
        self.table_index = -1
        self.table = np.zeros(GTES, dtype="<u4")
        self.cid_crc = zlib.crc32(struct.pack("<Q", self.capacity))

    def commit(self, offset: int, encoded) -> None:
        for first_grain, grain_sectors, payload, crc in encoded:
            self._enter_table(first_grain // GTES)
            host = self.next_sector
            end = host + sectors_for(len(payload))
            if end > limits.VMDK_MAX_SECTORS:
                raise WriteError(f"{self.out.dst}: the VMDK would pass 2 TiB, beyond its 32-bit sector offsets")
            self.out.pwrite(payload, host * SECTOR)
            slot = first_grain % GTES
            self.table[slot:slot + len(grain_sectors)] = np.asarray(grain_sectors, dtype=np.int64) + host
            self.next_sector = end
            self.cid_crc = zlib.crc32(struct.pack("<QI", first_grain, crc), self.cid_crc)

    def _enter_table(self, index: int) -> None:
        """Runs never cross a table (see _grain_runs), so the previous table is complete here."""
        if index != self.table_index:
            self._flush_table()
            self.table_index = index

    def _flush_table(self) -> None:
        if self.table_index >= 0:
            self.write_table(self.table_index, self.table)
            self.table[:] = 0
        self.table_index = -1

    def write_table(self, index: int, table: np.ndarray) -> None:
        raise NotImplementedError

    def cid(self) -> int:
        """A content ID from what was written; never ffffffff, which means "no parent"."""
        return self.cid_crc if self.cid_crc != 0xFFFFFFFF else 0xFFFFFFFE

    def write_descriptor(self) -> None:
        s = self.settings
        text = desc_mod.build(self.cid(), self.create_type, self.capacity,
                              os.path.basename(self.out.dst), s.adapter, s.hwversion, s.toolsversion)
        if len(text) > DESCRIPTOR_SECTORS * SECTOR:
            raise UsageError(f"{self.out.dst}: the file name is too long for the VMDK descriptor")
        self.out.pwrite(text.ljust(DESCRIPTOR_SECTORS * SECTOR, b"\0"), DESCRIPTOR_OFFSET * SECTOR)


class MonolithicSparseWriter(_GrainWriter):
    """Version 1, flags 0x3: redundant and primary directories with preallocated tables, as qemu."""

    create_type = "monolithicSparse"

    def __init__(self, out: AtomicOutput, virtual_size: int, settings: Settings):
        super().__init__(out, virtual_size, settings)
        self.layout = SparseLayout.for_capacity(self.capacity)
        self.next_sector = self.layout.overhead

    def encode(self, offset: int, data, mask: np.ndarray):
        """Runs of consecutive data grains as zero-copy slices (the last grain padded to a whole grain)."""
        first = offset // GRAIN_BYTES
        runs = []
        for lo, hi in _grain_runs(mask, first):
            payload = data[lo * GRAIN_BYTES:hi * GRAIN_BYTES]
            if len(payload) % GRAIN_BYTES:
                payload = bytes(payload).ljust((hi - lo) * GRAIN_BYTES, b"\0")
            sectors = [i * GRAIN_SECTORS for i in range(hi - lo)]
            runs.append((first + lo, sectors, payload, deflate.crc32(payload)))
        return runs

    def write_table(self, index: int, table: np.ndarray) -> None:
        raw = table.tobytes()
        self.out.pwrite(raw, (self.layout.gt + index * GT_SECTORS) * SECTOR)
        self.out.pwrite(raw, (self.layout.rgt + index * GT_SECTORS) * SECTOR)

    def finish(self) -> None:
        self._flush_table()
        lay = self.layout
        steps = np.arange(lay.tables, dtype=np.uint32) * GT_SECTORS
        self.out.pwrite((steps + lay.gt).astype("<u4").tobytes(), lay.gd * SECTOR)
        self.out.pwrite((steps + lay.rgt).astype("<u4").tobytes(), lay.rgd * SECTOR)
        self.write_descriptor()
        self.out.truncate(max(self.next_sector, lay.overhead) * SECTOR)
        self.out.pwrite(self.header().pack(), 0)

    def header(self) -> Header:
        lay = self.layout
        return Header(version=1, flags=FLAG_NEWLINE_CHECK | FLAG_REDUNDANT_GD, capacity=self.capacity,
                      grain_size=GRAIN_SECTORS, descriptor_offset=DESCRIPTOR_OFFSET,
                      descriptor_size=DESCRIPTOR_SECTORS, gtes_per_gt=GTES, rgd_offset=lay.rgd,
                      gd_offset=lay.gd, overhead=lay.overhead, compress_algorithm=COMPRESS_NONE)


class StreamOptimizedWriter(_GrainWriter):
    """Version 3, GD_AT_END: grains behind LBA markers, each grain table behind a GT marker right
    after the grains it covers, then GD marker + GD, footer marker + footer, EOS (the VMware
    specification's layout; qemu-img 7.2 writes no markers, footer or EOS).

    Flags 0x30001 (newline check, compressed, markers) without bit 1: a stream has one grain
    directory, written once at the end; VMware's own writer (open-vmdk) sets the same flags,
    and qemu reads the redundant directory only when bit 1 is set.
    Tables follow their grains rather than all coming at the end, so only one table is ever
    held in memory, whatever the disk size."""

    create_type = "streamOptimized"

    def __init__(self, out: AtomicOutput, virtual_size: int, settings: Settings):
        super().__init__(out, virtual_size, settings)
        self.gd = np.zeros(self.tables, dtype="<u4")
        self.next_sector = GRAIN_SECTORS   # overHead: one grain, like qemu

    def encode(self, offset: int, data, mask: np.ndarray):
        """Each data grain compressed behind its 12-byte marker, padded to a sector; one blob per run."""
        first = offset // GRAIN_BYTES
        runs = []
        for lo, hi in _grain_runs(mask, first):
            blob, sectors = bytearray(), []
            for g in range(lo, hi):
                grain = data[g * GRAIN_BYTES:(g + 1) * GRAIN_BYTES]
                if len(grain) < GRAIN_BYTES:
                    grain = bytes(grain).ljust(GRAIN_BYTES, b"\0")
                packed = deflate.compress(grain)
                sectors.append(len(blob) // SECTOR)
                blob += pack_grain_marker((first + g) * GRAIN_SECTORS, len(packed))
                blob += packed
                blob += bytes(-len(blob) % SECTOR)
            runs.append((first + lo, sectors, blob, deflate.crc32(blob)))
        return runs

    def write_table(self, index: int, table: np.ndarray) -> None:
        self.out.pwrite(pack_marker(GT_SECTORS, MARKER_GT), self.next_sector * SECTOR)
        self.out.pwrite(table.tobytes(), (self.next_sector + 1) * SECTOR)
        self.gd[index] = self.next_sector + 1
        self.next_sector += 1 + GT_SECTORS

    def finish(self) -> None:
        self._flush_table()
        gd_sectors = sectors_for(self.tables * 4)
        gd_at = self.next_sector + 1
        self.out.pwrite(pack_marker(gd_sectors, MARKER_GD), self.next_sector * SECTOR)
        self.out.pwrite(self.gd.tobytes().ljust(gd_sectors * SECTOR, b"\0"), gd_at * SECTOR)
        tail = gd_at + gd_sectors
        footer = (pack_marker(1, MARKER_FOOTER) + self.header(gd_at).pack() + pack_marker(0, MARKER_EOS))
        self.out.pwrite(footer, tail * SECTOR)
        self.write_descriptor()
        self.out.truncate((tail + 3) * SECTOR)
        self.out.pwrite(self.header(GD_AT_END).pack(), 0)

    def header(self, gd_offset: int) -> Header:
        return Header(version=3, flags=FLAG_NEWLINE_CHECK | FLAG_COMPRESSED | FLAG_MARKERS,
                      capacity=self.capacity, grain_size=GRAIN_SECTORS,
                      descriptor_offset=DESCRIPTOR_OFFSET, descriptor_size=DESCRIPTOR_SECTORS,
                      gtes_per_gt=GTES, rgd_offset=0, gd_offset=gd_offset, overhead=GRAIN_SECTORS,
                      compress_algorithm=COMPRESS_DEFLATE)


def _grain_runs(mask: np.ndarray, first: int) -> list[tuple[int, int]]:
    """[lo, hi) index pairs of consecutive data grains, cut where a grain table ends."""
    runs = []
    for lo, hi in mask_runs(mask):
        while lo < hi:
            stop = min(hi, (first + lo) // GTES * GTES + GTES - first)
            runs.append((lo, stop))
            lo = stop
    return runs


def create(out: AtomicOutput, virtual_size: int, options: dict) -> Writer:
    settings = parse_settings(options)
    if settings.subformat == "streamOptimized":
        return StreamOptimizedWriter(out, virtual_size, settings)
    return MonolithicSparseWriter(out, virtual_size, settings)


def stream_grain_bound() -> int:
    """Sectors one stream grain can take at most: marker plus the largest zlib stream."""
    return sectors_for(GRAIN_MARKER_BYTES + deflate.compress_bound(GRAIN_BYTES))


def measure(extents, virtual_size: int, options: dict) -> dict:
    """monolithicSparse: exact when every grain that DATA extents touch holds a non-zero byte
    (the writer leaves all-zero grains out, so otherwise it is an upper bound).
    streamOptimized: always an upper bound, every grain counted as incompressible."""
    settings = parse_settings(options)
    capacity = capacity_sectors(virtual_size)
    grains = -(-capacity // GRAIN_SECTORS)
    touched, tables = _touched(extents, virtual_size)
    if settings.subformat == "monolithicSparse":
        overhead = SparseLayout.for_capacity(capacity).overhead
        return {"required": (overhead + touched * GRAIN_SECTORS) * SECTOR,
                "fully-allocated": (overhead + grains * GRAIN_SECTORS) * SECTOR}
    all_tables = -(-grains // GTES)

    def stream_size(n_grains: int, n_tables: int) -> int:
        sectors = (GRAIN_SECTORS + n_grains * stream_grain_bound() + n_tables * (1 + GT_SECTORS)
                   + 1 + sectors_for(all_tables * 4) + 3)
        return sectors * SECTOR

    return {"required": stream_size(touched, tables), "fully-allocated": stream_size(grains, all_tables)}


def _touched(extents, virtual_size: int) -> tuple[int, int]:
    """(grains, grain tables) that DATA extents touch, each counted once."""
    grains = tables = 0
    last_grain = last_table = -1
    for ext in extents:
        if ext.kind != Kind.DATA or ext.length == 0:
            continue
        lo = max(ext.offset // GRAIN_BYTES, last_grain + 1)
        hi = (min(ext.end, virtual_size) - 1) // GRAIN_BYTES
        if hi < lo:
            continue
        grains += hi - lo + 1
        first_table = max(lo // GTES, last_table + 1)
        tables += max(0, hi // GTES - first_table + 1)
        last_grain, last_table = hi, hi // GTES
    return grains, tables
