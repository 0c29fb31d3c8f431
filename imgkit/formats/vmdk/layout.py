"""On-disk structures of a hosted sparse extent (formats.md §3): header, flags, markers.

Every integer is little-endian; every offset and size field counts 512-byte sectors.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

SECTOR = 512
MAGIC = b"KDMV"
COWD_MAGIC = b"COWD"
GD_AT_END = 0xFFFFFFFFFFFFFFFF

FLAG_NEWLINE_CHECK = 1 << 0
FLAG_REDUNDANT_GD = 1 << 1
FLAG_COMPRESSED = 1 << 16
FLAG_MARKERS = 1 << 17
KNOWN_INCOMPATIBLE = FLAG_COMPRESSED | FLAG_MARKERS
INCOMPATIBLE_MASK = 0xFFFF0000

COMPRESS_NONE = 0
COMPRESS_DEFLATE = 1

GTE_UNALLOCATED = 0
GTE_ZEROED = 1

MARKER_EOS = 0
MARKER_GT = 1
MARKER_GD = 2
MARKER_FOOTER = 3
GRAIN_MARKER_BYTES = 12          # u64 lba + u32 compressed size, in front of every stream grain
NEWLINE_BYTES = b"\n \r\n"

_HEADER = struct.Struct("<4sIIQQQQIQQQB4sH")   # 79 bytes, then zero padding to one sector
_MARKER = struct.Struct("<QII")                # numSectors/lba, size, type


@dataclass(frozen=True)
class Header:
    version: int
    flags: int
    capacity: int            # sectors
    grain_size: int          # sectors
    descriptor_offset: int
    descriptor_size: int
    gtes_per_gt: int
    rgd_offset: int
    gd_offset: int
    overhead: int
    unclean_shutdown: int = 0
    newline_bytes: bytes = NEWLINE_BYTES
    compress_algorithm: int = COMPRESS_NONE

    @property
    def compressed(self) -> bool:
        return bool(self.flags & FLAG_COMPRESSED)

    @property
    def grain_bytes(self) -> int:
        return self.grain_size * SECTOR

    def pack(self) -> bytes:
        raw = _HEADER.pack(MAGIC, self.version, self.flags, self.capacity, self.grain_size,
                           self.descriptor_offset, self.descriptor_size, self.gtes_per_gt,
                           self.rgd_offset, self.gd_offset, self.overhead, self.unclean_shutdown,
                           self.newline_bytes, self.compress_algorithm)
        return raw.ljust(SECTOR, b"\0")


def unpack_header(sector: bytes) -> Header:
    """Fields of a KDMV header sector (the caller checked the magic and the length)."""
    (_, version, flags, capacity, grain, desc_off, desc_size, gtes, rgd, gd, overhead,
     unclean, newlines, algorithm) = _HEADER.unpack_from(sector)
    return Header(version, flags, capacity, grain, desc_off, desc_size, gtes, rgd, gd, overhead,
                  unclean, newlines, algorithm)


def pack_marker(num_sectors: int, kind: int) -> bytes:
    """A metadata marker: one whole sector whose size field is 0."""
    return _MARKER.pack(num_sectors, 0, kind).ljust(SECTOR, b"\0")


def unpack_marker(sector: bytes) -> tuple[int, int, int]:
    """(numSectors or lba, size, type); type is meaningful only when size is 0."""
    return _MARKER.unpack_from(sector)


def pack_grain_marker(lba: int, size: int) -> bytes:
    return struct.pack("<QI", lba, size)


def unpack_grain_marker(raw: bytes) -> tuple[int, int]:
    return struct.unpack_from("<QI", raw)


def sectors_for(nbytes: int) -> int:
    return -(-nbytes // SECTOR)
