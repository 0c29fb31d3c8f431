"""QCOW2 on-disk layout: constants, the header with its extensions, snapshot and bitmap
directories. Every offset and size is checked against the file and limits.py before use."""
from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from ...errors import InvalidImage, LimitExceeded, UnsupportedFormat
from ...io import ImageFile
from ...limits import (MAX_VIRTUAL_SIZE, QCOW2_MAX_BACKING_NAME, QCOW2_MAX_CLUSTER_BITS, QCOW2_MAX_L1_BYTES,
                       QCOW2_MAX_REFTABLE_BYTES, QCOW2_MAX_SNAPSHOTS, QCOW2_MIN_CLUSTER_BITS, check_max,
                       check_range)

MAGIC = b"QFI\xfb"
V2_HEADER = struct.Struct(">4sIQIIQIIQQIIQ")      # 72 bytes
V3_FIELDS = struct.Struct(">QQQII")               # 32 more bytes, up to 104
V3_HEADER_LENGTH = 112                            # what we write: + compression type + padding
OFFSET_MASK = 0x00FFFFFFFFFFFE00                  # L1/L2 table and data cluster offsets, bits 9-55
COPIED = 1 << 63
COMPRESSED = 1 << 62
ZERO_FLAG = 1
L1_RESERVED = 0x7F000000000001FF
REFTABLE_RESERVED = 0x1FF

INCOMPAT_DIRTY, INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE = 1, 2, 4
INCOMPAT_COMPRESSION, INCOMPAT_EXTENDED_L2 = 8, 16
KNOWN_INCOMPAT = 0x1F
COMPAT_LAZY_REFCOUNTS = 1

EXT_BACKING_FORMAT = 0xE2792ACA
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

COMPRESSION_NAMES = {0: "zlib", 1: "zstd"}
CRYPT_NAMES = {1: "AES", 2: "LUKS"}
MAX_SNAPSHOT_EXTRA = 1024             # qemu's bound on a snapshot entry's extra data
MAX_SNAPSHOT_TABLE = 64 << 20         # qemu's bound on the whole snapshot table
MAX_BITMAPS = 65535
MAX_BITMAP_DIRECTORY = 64 << 20


@dataclass
class Snapshot:
    l1_offset: int
    l1_size: int
    id: str
    name: str
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    icount: int | None

    def to_json(self) -> dict:
        out = {}
        if self.icount is not None:
            out["icount"] = self.icount
        out.update({"vm-clock-nsec": self.vm_clock_nsec % 1_000_000_000, "name": self.name,
                    "date-sec": self.date_sec, "date-nsec": self.date_nsec,
                    "vm-clock-sec": self.vm_clock_nsec // 1_000_000_000, "id": self.id,
                    "vm-state-size": self.vm_state_size})
        return out


@dataclass
class Header:
    path: str
    version: int
    cluster_bits: int
    virtual_size: int
    crypt_method: int
    l1_size: int
    l1_offset: int
    reftable_offset: int
    reftable_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible: int = 0
    compatible: int = 0
    autoclear: int = 0
    refcount_order: int = 4
    header_length: int = 72
    compression_type: int = 0
    backing_file: str | None = None
    backing_format: str | None = None
    data_file: str | None = None
    bitmaps: tuple[int, int, int] | None = None       # (count, directory size, directory offset)
    crypto_header: tuple[int, int] | None = None      # (offset, length)

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible & INCOMPAT_EXTENDED_L2)

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // (16 if self.extended_l2 else 8)

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def l1_needed(self) -> int:
        return -(-self.virtual_size // (self.cluster_size * self.l2_entries))


def parse_header(image: ImageFile) -> Header:
    """Every header field checked against the file size and limits.py before anything is read."""
    path = image.path
    fixed = image.pread_exact(V2_HEADER.size, 0, "QCOW2 header")
    (magic, version, backing_offset, backing_size, cluster_bits, size, crypt, l1_size, l1_offset,
     reftable_offset, reftable_clusters, nb_snapshots, snapshots_offset) = V2_HEADER.unpack(fixed)
    if magic != MAGIC:
        raise InvalidImage(f"{path}: not a QCOW2 image (bad magic)")
    if version not in (2, 3):
        raise UnsupportedFormat(f"{path}: QCOW2 version {version} is not supported (only 2 and 3)")
    if not QCOW2_MIN_CLUSTER_BITS <= cluster_bits <= QCOW2_MAX_CLUSTER_BITS:
        raise LimitExceeded(f"{path}: QCOW2 cluster_bits is {cluster_bits}, outside "
                            f"{QCOW2_MIN_CLUSTER_BITS}..{QCOW2_MAX_CLUSTER_BITS}")
    hdr = Header(path, version, cluster_bits, size, crypt, l1_size, l1_offset, reftable_offset,
                 reftable_clusters, nb_snapshots, snapshots_offset)
    if version == 3:
        _parse_v3_fields(image, hdr)
    _check_header_values(image, hdr)
    _parse_extensions(image, hdr)
    if backing_offset:
        _parse_backing_name(image, hdr, backing_offset, backing_size)
    return hdr


def _parse_v3_fields(image: ImageFile, hdr: Header) -> None:
    path = image.path
    extra = image.pread_exact(V3_FIELDS.size, V2_HEADER.size, "QCOW2 v3 header")
    (hdr.incompatible, hdr.compatible, hdr.autoclear, hdr.refcount_order,
     hdr.header_length) = V3_FIELDS.unpack(extra)
    if hdr.header_length < 104 or hdr.header_length % 8 or hdr.header_length > hdr.cluster_size:
        raise InvalidImage(f"{path}: QCOW2 header_length {hdr.header_length} is invalid "
                           f"(must be a multiple of 8 from 104 to the cluster size)")
    if hdr.header_length > 104:
        hdr.compression_type = image.pread_exact(1, 104, "QCOW2 compression type")[0]
    unknown = hdr.incompatible & ~KNOWN_INCOMPAT
    if unknown:
        bits = ", ".join(str(b) for b in range(64) if unknown >> b & 1)
        raise UnsupportedFormat(f"{path}: QCOW2 image uses unknown incompatible features (bit {bits})")
    if hdr.refcount_order > 6:
        raise InvalidImage(f"{path}: QCOW2 refcount_order {hdr.refcount_order} is above 6")
    has_bit = bool(hdr.incompatible & INCOMPAT_COMPRESSION)
    if has_bit != (hdr.compression_type != 0):
        raise InvalidImage(f"{path}: QCOW2 compression type {hdr.compression_type} disagrees with "
                           f"the compression-type feature bit")
    if hdr.compression_type not in COMPRESSION_NAMES:
        raise UnsupportedFormat(f"{path}: QCOW2 compression type {hdr.compression_type} is unknown")
    if hdr.extended_l2 and hdr.cluster_bits < 14:
        raise InvalidImage(f"{path}: QCOW2 extended L2 entries need clusters of at least 16 KiB")


def _check_header_values(image: ImageFile, hdr: Header) -> None:
    path, cs, size = image.path, hdr.cluster_size, image.size
    check_max(f"{path}: QCOW2 virtual size", hdr.virtual_size, MAX_VIRTUAL_SIZE)
    if hdr.crypt_method > 2:
        raise InvalidImage(f"{path}: QCOW2 crypt_method {hdr.crypt_method} is unknown")
    check_max(f"{path}: QCOW2 L1 table size (bytes)", hdr.l1_size * 8, QCOW2_MAX_L1_BYTES)
    if hdr.l1_size < hdr.l1_needed:
        raise InvalidImage(f"{path}: QCOW2 L1 table has {hdr.l1_size} entries, too few for the "
                           f"virtual size (needs {hdr.l1_needed})")
    if hdr.l1_size:
        _check_table(path, "L1 table", hdr.l1_offset, hdr.l1_size * 8, cs, size)
    check_max(f"{path}: QCOW2 refcount table size (bytes)", hdr.reftable_clusters * cs,
              QCOW2_MAX_REFTABLE_BYTES)
    if hdr.reftable_clusters == 0:
        raise InvalidImage(f"{path}: QCOW2 image has no refcount table")
    _check_table(path, "refcount table", hdr.reftable_offset, hdr.reftable_clusters * cs, cs, size)
    check_max(f"{path}: QCOW2 snapshot count", hdr.nb_snapshots, QCOW2_MAX_SNAPSHOTS)
    if hdr.nb_snapshots:
        _check_table(path, "snapshot table", hdr.snapshots_offset, 40, cs, size)


def _check_table(path: str, what: str, offset: int, length: int, cs: int, file_size: int) -> None:
    if offset % cs:
        raise InvalidImage(f"{path}: QCOW2 {what} offset {offset:#x} is not cluster-aligned")
    check_range(f"{path}: QCOW2 {what}", offset, length, file_size)


def _parse_extensions(image: ImageFile, hdr: Header) -> None:
    """Header extensions live in cluster 0 after the header; each is bounded by that cluster."""
    path = image.path
    start = hdr.header_length if hdr.version == 3 else V2_HEADER.size
    limit = min(hdr.cluster_size, image.size)
    area = image.pread(limit, 0)
    pos = start
    while True:
        if pos + 8 > len(area):
            if pos + 8 > hdr.cluster_size:
                raise InvalidImage(f"{path}: QCOW2 header extensions run past the first cluster")
            return   # the file ends early: the rest reads as zeros, i.e. the end marker
        ext_type, length = struct.unpack_from(">II", area, pos)
        if ext_type == 0:
            return
        body = pos + 8
        if body + length > len(area):
            raise InvalidImage(f"{path}: QCOW2 header extension {ext_type:#x} ({length} bytes) runs "
                               f"past the first cluster")
        _store_extension(path, hdr, ext_type, bytes(area[body:body + length]))
        pos = body + (length + 7) // 8 * 8


def _store_extension(path: str, hdr: Header, ext_type: int, data: bytes) -> None:
    if ext_type == EXT_BACKING_FORMAT:
        hdr.backing_format = data.decode("utf-8", "replace")
    elif ext_type == EXT_DATA_FILE:
        hdr.data_file = data.decode("utf-8", "replace")
    elif ext_type == EXT_BITMAPS:
        if len(data) < 24:
            raise InvalidImage(f"{path}: QCOW2 bitmaps extension is too short ({len(data)} bytes)")
        count, _reserved, dir_size, dir_offset = struct.unpack_from(">IIQQ", data)
        hdr.bitmaps = (count, dir_size, dir_offset)
    elif ext_type == EXT_CRYPTO:
        if len(data) < 16:
            raise InvalidImage(f"{path}: QCOW2 encryption header extension is too short")
        hdr.crypto_header = struct.unpack_from(">QQ", data)


def _parse_backing_name(image: ImageFile, hdr: Header, offset: int, length: int) -> None:
    path = image.path
    check_max(f"{path}: QCOW2 backing file name length", length, QCOW2_MAX_BACKING_NAME)
    if offset + length > hdr.cluster_size:
        raise InvalidImage(f"{path}: QCOW2 backing file name at {offset:#x} lies outside the first cluster")
    name = image.pread_exact(length, offset, "QCOW2 backing file name")
    hdr.backing_file = name.decode("utf-8", "replace")


SNAPSHOT_ENTRY = struct.Struct(">QIHHIIQII")   # 40 bytes


def parse_snapshots(image: ImageFile, hdr: Header) -> tuple[list[Snapshot], int]:
    """The snapshot table (entries and its size in bytes), every field bounded."""
    path, snaps, pos = image.path, [], hdr.snapshots_offset
    for index in range(hdr.nb_snapshots):
        if pos - hdr.snapshots_offset > MAX_SNAPSHOT_TABLE:
            raise LimitExceeded(f"{path}: QCOW2 snapshot table is larger than {MAX_SNAPSHOT_TABLE} bytes")
        raw = image.pread_exact(SNAPSHOT_ENTRY.size, pos, f"QCOW2 snapshot {index} entry")
        (l1_offset, l1_size, id_len, name_len, date_sec, date_nsec, vm_clock, vm_state,
         extra_size) = SNAPSHOT_ENTRY.unpack(raw)
        check_max(f"{path}: QCOW2 snapshot {index} extra data size", extra_size, MAX_SNAPSHOT_EXTRA)
        body = image.pread_exact(extra_size + id_len + name_len, pos + SNAPSHOT_ENTRY.size,
                                 f"QCOW2 snapshot {index} entry")
        extra = body[:extra_size]
        icount = None
        if len(extra) >= 8:
            vm_state = struct.unpack_from(">Q", extra, 0)[0]
        if len(extra) >= 24:
            value = struct.unpack_from(">Q", extra, 16)[0]
            icount = None if value == 0xFFFFFFFFFFFFFFFF else value
        check_max(f"{path}: QCOW2 snapshot {index} L1 table size (bytes)", l1_size * 8, QCOW2_MAX_L1_BYTES)
        if l1_size:
            _check_table(path, f"snapshot {index} L1 table", l1_offset, l1_size * 8,
                         hdr.cluster_size, image.size)
        snaps.append(Snapshot(l1_offset, l1_size,
                              body[extra_size:extra_size + id_len].decode("utf-8", "replace"),
                              body[extra_size + id_len:].decode("utf-8", "replace"),
                              date_sec, date_nsec, vm_clock, vm_state, icount))
        pos += (SNAPSHOT_ENTRY.size + len(body) + 7) // 8 * 8
    return snaps, pos - hdr.snapshots_offset


@dataclass
class Bitmap:
    name: str
    flags: int
    granularity_bits: int
    table_offset: int
    table_size: int

    def to_json(self) -> dict:
        names = [name for bit, name in ((0, "in-use"), (1, "auto")) if self.flags >> bit & 1]
        return {"flags": names, "name": self.name, "granularity": 1 << self.granularity_bits}


BITMAP_ENTRY = struct.Struct(">QIIBBHI")   # 24 bytes


def parse_bitmaps(image: ImageFile, hdr: Header) -> list[Bitmap]:
    """The persistent bitmap directory named by the bitmaps header extension, bounded."""
    if not hdr.bitmaps:
        return []
    path = image.path
    count, dir_size, dir_offset = hdr.bitmaps
    check_max(f"{path}: QCOW2 bitmap count", count, MAX_BITMAPS)
    check_max(f"{path}: QCOW2 bitmap directory size", dir_size, MAX_BITMAP_DIRECTORY)
    directory = image.pread_exact(dir_size, dir_offset, "QCOW2 bitmap directory")
    bitmaps, pos = [], 0
    for index in range(count):
        if pos + BITMAP_ENTRY.size > len(directory):
            raise InvalidImage(f"{path}: QCOW2 bitmap directory ends inside entry {index}")
        table_offset, table_size, flags, _type, granularity, name_size, extra = \
            BITMAP_ENTRY.unpack_from(directory, pos)
        name_at = pos + BITMAP_ENTRY.size + extra
        if name_at + name_size > len(directory) or granularity > 63:
            raise InvalidImage(f"{path}: QCOW2 bitmap directory entry {index} is invalid")
        name = directory[name_at:name_at + name_size].decode("utf-8", "replace")
        bitmaps.append(Bitmap(name, flags, granularity, table_offset, table_size))
        pos = (name_at + name_size + 7) // 8 * 8
    return bitmaps


def read_table(image: ImageFile, offset: int, count: int, what: str) -> np.ndarray:
    """count big-endian u64 entries as a native array (bounds checked by pread_exact)."""
    raw = image.pread_exact(count * 8, offset, what)
    return np.frombuffer(raw, dtype=">u8").astype(np.uint64)
