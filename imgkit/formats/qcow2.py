"""QCOW2 v2/v3: a reader that maps from L1/L2 alone, a streaming writer, check and measure.

Layout facts: shared/reference/formats.md §1 (qemu's docs/interop/qcow2.rst is the authority).
Nothing here ever opens a second file: backing files and external data files are reported,
never followed.
"""
from __future__ import annotations

import os
import struct
import threading
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from ..errors import ImgkitError, InvalidImage, LimitExceeded, UnsafeImage, UnsupportedFormat, UsageError
from ..extents import Extent, Kind, merge
from ..io import AtomicOutput, ImageFile, parse_size
from ..limits import (MAX_VIRTUAL_SIZE, QCOW2_L2_CACHE_BYTES, QCOW2_MAX_BACKING_NAME,
                      QCOW2_MAX_CLUSTER_BITS, QCOW2_MAX_L1_BYTES, QCOW2_MAX_REFTABLE_BYTES,
                      QCOW2_MAX_SNAPSHOTS, QCOW2_MIN_CLUSTER_BITS, check_max, check_range)
from .base import CheckReport, Reader, Writer

OPTIONS = {
    "compat": "1.1 (default, also v3) or 0.10 (also v2)",
    "cluster_size": "512 to 2M, a power of two (default 64K)",
    "refcount_bits": "1, 2, 4, 8, 16 (default), 32 or 64",
    "compression_type": "zlib (default) or zstd (needs compat=1.1 and the zstandard package)",
    "lazy_refcounts": "off (the only value: refcounts are always exact)",
    "compress": "on: compress every data cluster (set by -c)",
}

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
MAX_CHECK_CLUSTERS = 1 << 25          # check keeps two counters per host cluster in memory
MAX_CHECK_MESSAGES = 10000            # per kind; the rest are summarised in one line

DATA, ZERO, UNALLOCATED, PACKED = 0, 1, 2, 3   # unit kinds inside the driver (PACKED = compressed)


# --------------------------------------------------------------------------------------------
# Header


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


# --------------------------------------------------------------------------------------------
# Compression


def _zstd():
    try:
        import zstandard
    except ImportError:
        return None
    return zstandard


def _deflate_compressor():
    """zlib-ng when installed (about 2.5x faster than the stdlib at level 6, output within 3%;
    isal is faster still but 6-8% larger), else the stdlib zlib."""
    try:
        from zlib_ng import zlib_ng as module
    except ImportError:
        module = zlib
    return lambda data: _deflate_with(module, data, 6)


def _deflate_with(module, data, level: int) -> bytes:
    """Raw deflate with a 4 KiB window (windowBits -12), exactly what qemu inflates."""
    comp = module.compressobj(level, module.DEFLATED, -12)
    return comp.compress(data) + comp.flush()


def inflate_cluster(path: str, data: bytes, cluster_size: int, compression_type: int) -> bytes:
    """One compressed cluster, decompressed to exactly cluster_size bytes (never more)."""
    if compression_type == 0:
        try:
            out = zlib.decompressobj(-15).decompress(data, cluster_size)
        except zlib.error as exc:
            raise InvalidImage(f"{path}: QCOW2 compressed cluster is not valid deflate data ({exc})") from None
    else:
        out = _zstd_decompress(path, data, cluster_size)
    if len(out) != cluster_size:
        raise InvalidImage(f"{path}: QCOW2 compressed cluster decompresses to {len(out)} bytes, "
                           f"not one cluster ({cluster_size})")
    return out


def _zstd_decompress(path: str, data: bytes, cluster_size: int) -> bytes:
    zstandard = _zstd()
    if zstandard is None:
        raise UnsupportedFormat(f"{path}: this QCOW2 image uses zstd compression; install the "
                                f"zstandard package (pip install zstandard) to read it")
    out = bytearray()
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=False)
        while len(out) < cluster_size:
            piece = reader.read(cluster_size - len(out))
            if not piece:
                break
            out += piece
    except zstandard.ZstdError as exc:
        raise InvalidImage(f"{path}: QCOW2 compressed cluster is not valid zstd data ({exc})") from None
    return bytes(out)


# --------------------------------------------------------------------------------------------
# Reader


class Qcow2Reader(Reader):
    format = "qcow2"

    def __init__(self, image: ImageFile, hdr: Header, snapshots: list[Snapshot], bitmaps: list[Bitmap]):
        super().__init__(image)
        self.hdr = hdr
        self.snapshots = snapshots
        self.bitmaps = bitmaps
        self.virtual_size = hdr.virtual_size
        self.cluster_size = cs = hdr.cluster_size
        self.subclusters = 32 if hdr.extended_l2 else 1
        self.unit = cs // self.subclusters
        self.table_span = cs * hdr.l2_entries
        self.l1 = read_table(image, hdr.l1_offset, hdr.l1_needed, "QCOW2 L1 table") \
            if hdr.l1_needed else np.zeros(0, np.uint64)
        self.l1_used = np.flatnonzero(self.l1 & OFFSET_MASK)
        self._refuse_shared_l2_tables()
        self.csize_shift = 62 - (hdr.cluster_bits - 8)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_slots = max(2, QCOW2_L2_CACHE_BYTES // cs)
        self._lock = threading.Lock()
        self.unsafe_reason = self._unsafe_reason()

    def _unsafe_reason(self) -> str | None:
        if self.hdr.incompatible & INCOMPAT_DATA_FILE:
            name = self.hdr.data_file or "(name not recorded)"
            return (f"its guest data lives in an external data file {name!r}; imgkit never opens "
                    f"another file named inside an image (CVE-2024-32498)")
        if self.hdr.backing_file is not None:
            return (f"it has a backing file {self.hdr.backing_file!r}; imgkit never follows backing "
                    f"files (flatten it first with qemu-img convert on a trusted host)")
        return None

    def _refuse_shared_l2_tables(self) -> None:
        """Two L1 entries naming one L2 table map two guest ranges onto the same clusters: qemu
        never writes that, and a tiny file could otherwise claim terabytes of data."""
        offsets = self.l1[self.l1_used] & OFFSET_MASK
        unique, counts = np.unique(offsets, return_counts=True)
        if len(unique) < len(offsets):
            shared = int(unique[np.argmax(counts > 1)])
            raise InvalidImage(f"{self.image.path}: QCOW2 L2 table at {shared:#x} is named by several "
                               f"L1 entries; the image is corrupt (see 'imgkit check')")

    # -- L2 tables ----------------------------------------------------------------------------

    def _l2_table(self, index: int) -> np.ndarray | None:
        """The L2 table under L1 entry index (rows of 1 or 2 u64), through the bounded cache."""
        entry = int(self.l1[index])
        offset = entry & OFFSET_MASK
        if offset == 0:
            return None
        with self._lock:
            table = self._cache.get(index)
            if table is not None:
                self._cache.move_to_end(index)
                return table
        if offset % self.cluster_size:
            raise InvalidImage(f"{self.image.path}: QCOW2 L1 entry {index} points to an unaligned "
                               f"L2 table ({offset:#x})")
        table = read_table(self.image, offset, self.cluster_size // 8, f"QCOW2 L2 table {index}")
        table = table.reshape(-1, 2) if self.subclusters > 1 else table.reshape(-1, 1)
        with self._lock:
            self._cache[index] = table
            while len(self._cache) > self._cache_slots:
                self._cache.popitem(last=False)
        return table

    def _classify(self, table: np.ndarray, first: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Kinds and host values of units [first, stop) of one L2 table (units are subclusters
        with extended L2, else clusters). For PACKED units the host value is the L2 entry."""
        subs = self.subclusters
        rows = table[first // subs:(stop - 1) // subs + 1]
        entries = rows[:, 0]
        packed = (entries & COMPRESSED) != 0
        offsets = entries & OFFSET_MASK
        if subs == 1:
            kinds = np.full(len(entries), UNALLOCATED, np.uint8)
            kinds[offsets != 0] = DATA
            kinds[(entries & ZERO_FLAG) != 0] = ZERO
            hosts = offsets
        else:
            kinds, hosts = self._classify_subclusters(rows, offsets)
        kinds[packed] = PACKED
        if subs > 1:
            hosts = np.where(packed[:, None], entries[:, None], hosts)
            kinds, hosts = kinds.reshape(-1), hosts.reshape(-1)
            skip = first - first // subs * subs
            kinds, hosts = kinds[skip:skip + stop - first], hosts[skip:skip + stop - first]
        else:
            hosts = np.where(packed, entries, hosts)
        bad = (kinds == DATA) & (hosts % np.uint64(self.cluster_size) != 0) if subs == 1 else \
            (kinds == DATA) & (hosts % np.uint64(self.unit) != 0)
        if bad.any():
            raise InvalidImage(f"{self.image.path}: QCOW2 L2 entry points to an unaligned data "
                               f"cluster ({int(hosts[np.flatnonzero(bad)[0]]):#x})")
        return kinds, hosts

    def _classify_subclusters(self, rows: np.ndarray, offsets: np.ndarray):
        bitmap = rows[:, 1]
        shifts = np.arange(32, dtype=np.uint64)
        alloc = ((bitmap[:, None] >> shifts) & np.uint64(1)).astype(bool)
        zero = ((bitmap[:, None] >> (shifts + np.uint64(32))) & np.uint64(1)).astype(bool)
        standard = ((rows[:, 0] & COMPRESSED) == 0)[:, None]
        if ((alloc & zero) & standard).any() or (alloc & standard & (offsets == 0)[:, None]).any():
            raise InvalidImage(f"{self.image.path}: QCOW2 extended L2 entry has an invalid "
                               f"subcluster bitmap")
        kinds = np.full(alloc.shape, UNALLOCATED, np.uint8)
        kinds[zero] = ZERO
        kinds[alloc] = DATA
        hosts = offsets[:, None] + shifts * np.uint64(self.unit)
        return kinds, hosts

    # -- runs -----------------------------------------------------------------------------------

    def _table_runs(self, start: int, end: int):
        """(offset, length, kind, host) runs inside one pass over [start, end), per L2 table."""
        pos = start
        while pos < end:
            index = pos // self.table_span
            base = index * self.table_span
            stop = min(end, base + self.table_span)
            table = self._l2_table(index)
            if table is None:
                nxt = np.searchsorted(self.l1_used, index)
                next_base = int(self.l1_used[nxt]) * self.table_span if nxt < len(self.l1_used) else end
                stop = min(end, max(stop, next_base))
                yield pos, stop - pos, UNALLOCATED, 0
                pos = stop
                continue
            first, last = (pos - base) // self.unit, (stop - base - 1) // self.unit + 1
            kinds, hosts = self._classify(table, first, last)
            yield from self._split_runs(base + first * self.unit, kinds, hosts, pos, stop)
            pos = stop

    def _split_runs(self, origin: int, kinds: np.ndarray, hosts: np.ndarray, lo: int, hi: int):
        unit = np.uint64(self.unit)
        step = np.where(kinds[:-1] == DATA, hosts[:-1] + unit, hosts[:-1])
        same_host = (hosts[1:] == step) | (kinds[1:] == ZERO) | (kinds[1:] == UNALLOCATED)
        cuts = np.flatnonzero((kinds[1:] != kinds[:-1]) | ~same_host) + 1
        starts = np.concatenate(([0], cuts))
        ends = np.concatenate((cuts, [len(kinds)]))
        for s, e in zip(starts.tolist(), ends.tolist()):
            run_lo = max(lo, origin + s * self.unit)
            run_hi = min(hi, origin + e * self.unit)
            kind, host = int(kinds[s]), int(hosts[s])
            if kind == DATA:
                host += run_lo - (origin + s * self.unit)
            yield run_lo, run_hi - run_lo, kind, host

    def _runs(self, start: int, end: int):
        """Runs merged across L2 tables: contiguous data becomes one run (one pread)."""
        pending = None
        for run in self._table_runs(start, end):
            if pending is not None and _joinable(pending, run):
                pending = (pending[0], pending[1] + run[1], pending[2], pending[3])
                continue
            if pending is not None:
                yield pending
            pending = run
        if pending is not None:
            yield pending

    def extents(self, start: int = 0, end: int | None = None):
        end = self.virtual_size if end is None else min(end, self.virtual_size)
        return merge(self._extents(start, end))

    def _extents(self, start: int, end: int):
        for offset, length, kind, host in self._runs(start, end):
            if kind == DATA:
                yield Extent(offset, length, Kind.DATA, host)
            elif kind == PACKED:
                yield Extent(offset, length, Kind.DATA, None, True)
            else:
                yield Extent(offset, length, Kind.ZERO if kind == ZERO else Kind.UNALLOCATED)

    # -- data -----------------------------------------------------------------------------------

    def readinto(self, offset: int, buf) -> None:
        if self.unsafe_reason:
            raise UnsafeImage(f"{self.image.path}: {self.unsafe_reason}")
        view = memoryview(buf).cast("B")
        out = np.frombuffer(view, dtype=np.uint8)
        end = offset + len(view)
        inside = min(end, self.virtual_size)
        if inside < end:
            out[max(inside - offset, 0):] = 0
        for run_offset, length, kind, host in self._runs(offset, inside):
            rel = run_offset - offset
            if kind == DATA:
                self._read_data(view[rel:rel + length], out[rel:rel + length], host)
            elif kind == PACKED:
                cluster = self._inflate(host)
                within = run_offset % self.cluster_size
                view[rel:rel + length] = cluster[within:within + length]
            else:
                out[rel:rel + length] = 0

    def _read_data(self, view: memoryview, out: np.ndarray, host: int) -> None:
        if host >= self.image.size:
            raise InvalidImage(f"{self.image.path}: QCOW2 data cluster at {host:#x} lies beyond the "
                               f"end of the file ({self.image.size} bytes)")
        got = self.image.readinto(view, host)
        if got < len(view):
            out[got:] = 0   # a last cluster cut short by the file end reads as zeros, as in qemu

    def _inflate(self, entry: int) -> bytes:
        cs, shift = self.cluster_size, self.csize_shift
        offset = entry & ((1 << shift) - 1)
        sectors = (entry >> shift) & ((1 << (self.hdr.cluster_bits - 8)) - 1)
        length = (sectors + 1) * 512 - (offset & 511)
        if offset >= self.image.size or offset >> 56:
            raise InvalidImage(f"{self.image.path}: QCOW2 compressed cluster at {offset:#x} lies beyond "
                               f"the end of the file ({self.image.size} bytes)")
        data = self.image.pread(min(length, self.image.size - offset), offset)
        return inflate_cluster(self.image.path, data, cs, self.hdr.compression_type)

    def info(self) -> dict:
        hdr = self.hdr
        data = {"compat": "1.1" if hdr.version == 3 else "0.10",
                "compression-type": COMPRESSION_NAMES[hdr.compression_type]}
        if hdr.version == 3:
            data["lazy-refcounts"] = bool(hdr.compatible & COMPAT_LAZY_REFCOUNTS)
            if self.bitmaps:
                data["bitmaps"] = [b.to_json() for b in self.bitmaps]
            data.update({"refcount-bits": hdr.refcount_bits,
                         "corrupt": bool(hdr.incompatible & INCOMPAT_CORRUPT),
                         "extended-l2": hdr.extended_l2})
        else:
            data["refcount-bits"] = hdr.refcount_bits
        if hdr.data_file is not None or hdr.incompatible & INCOMPAT_DATA_FILE:
            data["data-file"] = hdr.data_file or ""
            data["data-file-raw"] = bool(hdr.autoclear & 2)
        out = {"cluster-size": self.cluster_size,
               "format-specific": {"type": "qcow2", "data": data},
               "dirty-flag": bool(hdr.incompatible & INCOMPAT_DIRTY)}
        if hdr.backing_file is not None:
            out["backing-filename"] = hdr.backing_file
            out["full-backing-filename"] = _full_backing_name(self.image.path, hdr.backing_file)
            if hdr.backing_format is not None:
                out["backing-filename-format"] = hdr.backing_format
        if self.snapshots:
            out["snapshots"] = [s.to_json() for s in self.snapshots]
        if out["dirty-flag"]:
            out["warnings"] = [f"{self.image.path}: the dirty bit is set (qemu stopped without flushing "
                               f"lazy refcounts); the mapping is read from L1/L2 and is complete, but "
                               f"'imgkit check' may report stale refcounts"]
        return out


def _joinable(a, b) -> bool:
    if a[0] + a[1] != b[0] or a[2] != b[2] or a[2] == PACKED:
        return False
    return a[2] != DATA or a[3] + a[1] == b[3]


def _full_backing_name(image_path: str, name: str) -> str:
    """The backing name resolved against the image's folder, as qemu shows it (never opened)."""
    if os.path.isabs(name) or ":" in name.split("/")[0]:
        return name
    return os.path.join(os.path.dirname(image_path), name)


def open_reader(image: ImageFile, options: dict) -> Qcow2Reader:
    hdr = parse_header(image)
    if hdr.crypt_method:
        raise UnsupportedFormat(f"{image.path}: QCOW2 image is encrypted ({CRYPT_NAMES[hdr.crypt_method]}); "
                                f"encrypted images are not supported")
    if hdr.incompatible & INCOMPAT_CORRUPT:
        raise InvalidImage(f"{image.path}: QCOW2 image is marked corrupt by qemu; run "
                           f"'imgkit check' to see why")
    snapshots, _ = parse_snapshots(image, hdr)
    return Qcow2Reader(image, hdr, snapshots, parse_bitmaps(image, hdr))


# --------------------------------------------------------------------------------------------
# Options (shared by the writer and measure)


@dataclass(frozen=True)
class WriteOptions:
    version: int = 3
    cluster_bits: int = 16
    refcount_order: int = 4
    compression_type: int = 0
    compress: bool = False

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits


def parse_write_options(options: dict) -> WriteOptions:
    compat = options.get("compat", "1.1")
    versions = {"1.1": 3, "v3": 3, "0.10": 2, "v2": 2}
    if compat not in versions:
        raise UsageError(f"compat={compat!r}: use 1.1 (v3) or 0.10 (v2)")
    version = versions[compat]
    cluster_size = parse_size(options.get("cluster_size", "64K"))
    if not 512 <= cluster_size <= 2 << 20 or cluster_size & (cluster_size - 1):
        raise UsageError(f"cluster_size={options.get('cluster_size')}: use a power of two from 512 to 2M")
    bits_text = options.get("refcount_bits", "16")
    if not bits_text.isdigit() or int(bits_text) not in (1, 2, 4, 8, 16, 32, 64):
        raise UsageError(f"refcount_bits={bits_text!r}: use 1, 2, 4, 8, 16, 32 or 64")
    refcount_bits = int(bits_text)
    if version == 2 and refcount_bits != 16:
        raise UsageError("refcount_bits other than 16 need compat=1.1")
    ctype = options.get("compression_type", "zlib")
    if ctype not in ("zlib", "zstd"):
        raise UsageError(f"compression_type={ctype!r}: use zlib or zstd")
    if ctype == "zstd" and version == 2:
        raise UsageError("compression_type=zstd needs compat=1.1")
    if options.get("lazy_refcounts", "off") != "off":
        raise UsageError("lazy_refcounts=on is not supported: imgkit always writes exact refcounts")
    compress = options.get("compress", "off")
    if compress not in ("on", "off"):
        raise UsageError(f"compress={compress!r}: use on or off")
    return WriteOptions(version, cluster_size.bit_length() - 1, refcount_bits.bit_length() - 1,
                        1 if ctype == "zstd" else 0, compress == "on")


# --------------------------------------------------------------------------------------------
# Writer


def l1_entries_for(virtual_size: int, cluster_size: int) -> int:
    """L1 entries a new image needs; refused (as qemu does) when the table would pass 32 MiB."""
    l1_size = -(-virtual_size // (cluster_size * (cluster_size // 8)))
    if l1_size * 8 > QCOW2_MAX_L1_BYTES:
        raise UsageError(f"virtual size {virtual_size} is too large for cluster_size={cluster_size}: the L1 "
                         f"table would exceed {QCOW2_MAX_L1_BYTES} bytes; use a larger cluster_size")
    return l1_size


class RefcountLedger:
    """Refcounts of host clusters whose refcount block is not written yet (numpy per block).

    The file grows only at its end, so a block whose range lies wholly below the allocation
    point is final and can be written at once: memory stays one or two blocks.
    """

    def __init__(self, cluster_bits: int, refcount_order: int):
        self.cluster_bits = cluster_bits
        self.refcount_order = refcount_order
        self.per_block = (1 << cluster_bits) * 8 >> refcount_order
        self.cap = min((1 << (1 << refcount_order)) - 1, 0xFFFF)
        self.blocks: dict[int, np.ndarray] = {}
        self.written: list[int] = []          # host offset of refcount block i

    def _block(self, index: int) -> np.ndarray:
        block = self.blocks.get(index)
        if block is None:
            block = self.blocks[index] = np.zeros(self.per_block, np.uint16)
        return block

    def add(self, first: int, count: int) -> None:
        """+1 for host clusters [first, first + count)."""
        pos, end = first, first + count
        while pos < end:
            index, rel = divmod(pos, self.per_block)
            n = min(end - pos, self.per_block - rel)
            self._block(index)[rel:rel + n] += 1
            pos += n

    def get(self, cluster: int) -> int:
        index, rel = divmod(cluster, self.per_block)
        block = self.blocks.get(index)
        return 0 if block is None else int(block[rel])

    def encode(self, index: int) -> bytes:
        counts = self.blocks.pop(index, None)
        if counts is None:
            counts = np.zeros(self.per_block, np.uint16)
        bits = 1 << self.refcount_order
        if bits >= 8:
            return counts.astype(f">u{bits // 8}").tobytes()
        per_byte = 8 // bits
        lanes = counts.astype(np.uint8).reshape(-1, per_byte)
        packed = np.zeros(len(lanes), np.uint8)
        for lane in range(per_byte):
            packed |= lanes[:, lane] << (lane * bits)
        return packed.tobytes()


class Qcow2Writer(Writer):
    """Data clusters in guest order; each L2 table and refcount block is written as soon as it
    is final, so memory is bounded by one window; refcount table, L1 and header come last."""

    def __init__(self, out: AtomicOutput, virtual_size: int, opts: WriteOptions):
        self.out = out
        self.opts = opts
        self.virtual_size = virtual_size
        self.chunk_size = cs = opts.cluster_size
        self.l2_entries = cs // 8
        self.table_span = cs * self.l2_entries
        l1_size = l1_entries_for(virtual_size, cs)
        self.l1 = np.zeros(l1_size, np.uint64)
        self.l1_offset = cs if l1_size else 0
        l1_clusters = -(-l1_size * 8 // cs)
        self.ledger = RefcountLedger(opts.cluster_bits, opts.refcount_order)
        self.ledger.add(0, 1 + l1_clusters)
        self.next_free = cs * (1 + l1_clusters)
        self.tables: dict[int, np.ndarray] = {}
        self.csize_shift = 62 - (opts.cluster_bits - 8)
        self.compress = self._compressor() if opts.compress else None
        out.truncate(0)

    def _compressor(self):
        if self.opts.compression_type == 0:
            return _deflate_compressor()
        zstandard = _zstd()
        if zstandard is None:
            raise UnsupportedFormat("compression_type=zstd needs the zstandard package (pip install zstandard)")
        local = threading.local()

        def compress(data):
            cctx = getattr(local, "cctx", None)
            if cctx is None:
                cctx = local.cctx = zstandard.ZstdCompressor(level=3)
            return cctx.compress(data)
        return compress

    # -- encode (worker threads) ------------------------------------------------------------

    def encode(self, offset: int, data: memoryview, mask: np.ndarray):
        """Uncompressed: runs of data clusters as zero-copy slices. Compressed: one payload per
        cluster, kept uncompressed when compression does not make it smaller (as qemu does)."""
        cs = self.chunk_size
        if self.compress is None:
            edges = np.flatnonzero(np.diff(np.concatenate(([False], mask, [False])).astype(np.int8)))
            return [(int(lo), int(hi) - int(lo), data[int(lo) * cs:min(int(hi) * cs, len(data))], False)
                    for lo, hi in zip(edges[::2], edges[1::2])]
        items = []
        for i in np.flatnonzero(mask).tolist():
            chunk = data[i * cs:(i + 1) * cs]
            whole = chunk if len(chunk) == cs else bytes(chunk) + bytes(cs - len(chunk))
            packed = self.compress(whole)
            if len(packed) < cs:
                items.append((i, 1, packed, True))
            else:
                items.append((i, 1, chunk, False))
        return items

    # -- commit (one thread, ascending offsets) ---------------------------------------------

    def commit(self, offset: int, encoded) -> None:
        first = offset // self.chunk_size
        self._write_tables(below=first // self.l2_entries)
        pending: list = []            # compressed payloads that sit back to back in the file
        pending_at = pending_end = 0
        for index, count, payload, packed in encoded:
            cluster = first + index
            if packed:
                host = self._place_packed(len(payload))
                if pending and pending_end != host:
                    self._write_joined(pending, pending_at)
                    pending = []
                if not pending:
                    pending_at = host
                pending.append(payload)
                pending_end = host + len(payload)
                self._set_entries(cluster, 1, self._packed_entry(host, len(payload)), 0)
            else:
                host = self._take_clusters(count)
                self.out.pwrite(payload, host)
                self._set_entries(cluster, count, host | COPIED, self.chunk_size)
        if pending:
            self._write_joined(pending, pending_at)
        self._write_final_blocks()

    def _write_joined(self, payloads: list, at: int) -> None:
        self.out.pwrite(b"".join(payloads), at)

    def _take_clusters(self, count: int) -> int:
        cs = self.chunk_size
        host = -(-self.next_free // cs) * cs
        self.next_free = host + count * cs
        self.ledger.add(host // cs, count)
        return host

    def _place_packed(self, length: int) -> int:
        """Byte-granular placement; a shared host cluster never exceeds the refcount width."""
        cs, host = self.chunk_size, self.next_free
        if host % cs and self.ledger.get(host // cs) >= self.ledger.cap:
            host = -(-host // cs) * cs
        first_sector = host // 512
        last_sector = (host + length - 1) // 512
        first_cluster = first_sector * 512 // cs
        last_cluster = (last_sector * 512) // cs
        self.ledger.add(first_cluster, last_cluster - first_cluster + 1)
        self.next_free = host + length
        return host

    def _packed_entry(self, host: int, length: int) -> int:
        extra_sectors = (host + length - 1) // 512 - host // 512
        return COMPRESSED | (extra_sectors << self.csize_shift) | host

    def _set_entries(self, cluster: int, count: int, value: int, step: int) -> None:
        done = 0
        while done < count:
            index, rel = divmod(cluster + done, self.l2_entries)
            table = self.tables.get(index)
            if table is None:
                table = self.tables[index] = np.zeros(self.l2_entries, np.uint64)
            n = min(count - done, self.l2_entries - rel)
            table[rel:rel + n] = np.uint64(value + done * step) + np.arange(n, dtype=np.uint64) * np.uint64(step)
            done += n

    def _write_tables(self, below: int | None = None) -> None:
        """Write every L2 table whose guest range is complete (index < below; all if None)."""
        for index in sorted(i for i in self.tables if below is None or i < below):
            host = self._take_clusters(1)
            self.out.pwrite(self.tables.pop(index).astype(">u8").tobytes(), host)
            self.l1[index] = np.uint64(host | COPIED)

    def _write_final_blocks(self) -> None:
        """Write refcount blocks whose clusters all lie below the allocation point."""
        ledger = self.ledger
        while (len(ledger.written) + 1) * ledger.per_block <= self.next_free // self.chunk_size:
            index = len(ledger.written)
            host = self._take_clusters(1)
            self.out.pwrite(ledger.encode(index), host)
            ledger.written.append(host)

    def finish(self) -> None:
        cs, ledger = self.chunk_size, self.ledger
        self._write_tables()
        self._write_final_blocks()
        used = -(-self.next_free // cs)
        blocks, table_clusters = self._tail_sizes(used)
        start = used * cs
        self.next_free = start
        ledger.add(used, blocks - len(ledger.written) + table_clusters)
        for index in range(len(ledger.written), blocks):
            host = start + (index - len(ledger.written)) * cs
            self.out.pwrite(ledger.encode(index), host)
        offsets = ledger.written + [start + i * cs for i in range(blocks - len(ledger.written))]
        table_at = start + (blocks - len(ledger.written)) * cs
        reftable = np.zeros(table_clusters * cs // 8, np.uint64)
        reftable[:len(offsets)] = offsets
        self.out.pwrite(reftable.astype(">u8").tobytes(), table_at)
        if len(self.l1):
            self.out.pwrite(self.l1.astype(">u8").tobytes(), self.l1_offset)
        self.out.pwrite(self._header(table_at, table_clusters), 0)
        self.out.truncate(table_at + table_clusters * cs)

    def _tail_sizes(self, used: int) -> tuple[int, int]:
        """Refcount blocks in total and refcount table clusters so that they cover themselves."""
        per_block, done = self.ledger.per_block, len(self.ledger.written)
        blocks, table = done, 0
        while True:
            total = used + (blocks - done) + table
            need_blocks = max(-(-total // per_block), done)
            need_table = -(-need_blocks * 8 // self.chunk_size)
            if (need_blocks, need_table) == (blocks, table):
                return blocks, table
            blocks, table = need_blocks, need_table

    def _header(self, reftable_offset: int, reftable_clusters: int) -> bytes:
        opts = self.opts
        head = V2_HEADER.pack(MAGIC, opts.version, 0, 0, opts.cluster_bits, self.virtual_size, 0,
                              len(self.l1), self.l1_offset, reftable_offset, reftable_clusters, 0, 0)
        if opts.version == 2:
            return head + bytes(8)
        incompatible = INCOMPAT_COMPRESSION if opts.compression_type else 0
        head += V3_FIELDS.pack(incompatible, 0, 0, opts.refcount_order, V3_HEADER_LENGTH)
        return head + bytes([opts.compression_type]) + bytes(7) + bytes(8)


def create_writer(out: AtomicOutput, virtual_size: int, options: dict) -> Qcow2Writer:
    return Qcow2Writer(out, virtual_size, parse_write_options(options))


# --------------------------------------------------------------------------------------------
# measure


def refcount_metadata_clusters(clusters: int, cluster_size: int, refcount_order: int) -> int:
    """Refcount blocks + table clusters needed to count clusters plus themselves (fixed point)."""
    per_block = cluster_size * 8 >> refcount_order
    per_table_cluster = cluster_size // 8
    blocks = table = 0
    while True:
        new_blocks = -(-(clusters + blocks + table) // per_block)
        new_table = -(-new_blocks // per_table_cluster)
        if (new_blocks, new_table) == (blocks, table):
            return blocks + table
        blocks, table = new_blocks, new_table


def fully_allocated_size(virtual_size: int, cluster_size: int, refcount_order: int) -> int:
    """Header, every L2 and L1 entry, refcounts and all data clusters, as qemu-img measure counts."""
    aligned = -(-virtual_size // cluster_size) * cluster_size
    per_l2 = cluster_size // 8
    l2_entries = -(-(aligned // cluster_size) // per_l2) * per_l2
    l1_entries = -(-(l2_entries * 8 // cluster_size) // per_l2) * per_l2
    meta = cluster_size + l2_entries * 8 + l1_entries * 8
    meta += cluster_size * refcount_metadata_clusters((meta + aligned) // cluster_size, cluster_size,
                                                      refcount_order)
    return meta + aligned


def measure(extents, virtual_size: int, options: dict) -> dict:
    opts = parse_write_options(options)
    cs = opts.cluster_size
    l1_entries_for(virtual_size, cs)
    aligned = -(-virtual_size // cs) * cs
    full = fully_allocated_size(virtual_size, cs, opts.refcount_order)
    data, counted_to = 0, 0
    for ext in extents:
        if ext.kind != Kind.DATA or ext.end <= counted_to:
            continue
        lo = max(ext.offset, counted_to) // cs * cs
        hi = -(-ext.end // cs) * cs
        data += hi - lo
        counted_to = hi
    return {"required": full - aligned + data, "fully-allocated": full}


# --------------------------------------------------------------------------------------------
# check


def check(image: ImageFile) -> CheckReport:
    try:
        hdr = parse_header(image)
    except UnsupportedFormat as exc:   # qemu-img check cannot open it either: exit 1, not 63
        raise ImgkitError(exc.message) from None
    report = CheckReport(filename=image.path, format="qcow2")
    _RefcountCheck(image, hdr, report).run()
    return report


@dataclass
class _TableStats:
    allocated: int = 0
    compressed: int = 0
    fragmented: int = 0


@dataclass
class _Messages:
    items: list = field(default_factory=list)
    dropped: int = 0

    def add(self, text: str) -> None:
        if len(self.items) < MAX_CHECK_MESSAGES:
            self.items.append(text)
        else:
            self.dropped += 1


class _RefcountCheck:
    """Rebuild every host cluster's reference count from the metadata and compare it with the
    refcount blocks, as qemu-img check does (read-only, no repair)."""

    def __init__(self, image: ImageFile, hdr: Header, report: CheckReport):
        self.image, self.hdr, self.report = image, hdr, report
        self.cs = hdr.cluster_size
        self.nb = -(-image.size // self.cs)
        self.errors = _Messages()
        self.leaks = _Messages()
        self.stats = _TableStats()

    def run(self) -> None:
        if self.nb > MAX_CHECK_CLUSTERS:
            self.report.check_errors.append(
                f"the file has {self.nb} clusters, more than imgkit checks in memory ({MAX_CHECK_CLUSTERS})")
            return
        self.refs = np.zeros(self.nb, np.uint32)
        self.ondisk = self._load_refcounts()
        self._inc(0, self.cs, "header")
        l2_refs: dict[int, int] = {}
        active = self._l1_entries(self.hdr.l1_offset, self.hdr.l1_size, "L1 table", l2_refs)
        snapshots_ok = self._snapshot_l1s(l2_refs)
        self._walk_l2_tables(active, l2_refs)
        if snapshots_ok:
            self._bitmaps()
        if self.hdr.crypto_header:
            self._inc(*self.hdr.crypto_header, "encryption header")
        self._refcount_structures()
        self._compare()
        self._fill_report()

    # -- counting ---------------------------------------------------------------------------

    def _inc(self, offset: int, length: int, what: str, times: int = 1) -> None:
        if length <= 0:
            return
        first, last = offset // self.cs, (offset + length - 1) // self.cs
        if last >= self.nb:
            self.errors.add(f"{what} at {offset:#x} (+{length} bytes) lies beyond the end of the file "
                            f"(cluster {last} refcount=0 reference={times})")
        if first < self.nb:
            self.refs[first:min(last, self.nb - 1) + 1] += times

    def _inc_clusters(self, clusters: np.ndarray, what: str, times: int = 1) -> None:
        beyond = clusters >= self.nb
        for cluster in clusters[beyond][:16].tolist():
            self.errors.add(f"{what} cluster {cluster} lies beyond the end of the file "
                            f"(refcount=0 reference={times})")
        inside = clusters[~beyond].astype(np.int64)
        np.add.at(self.refs, inside, times)

    def _ondisk(self, cluster: int) -> int:
        return int(self.ondisk[cluster]) if cluster < self.nb else 0

    # -- refcount structures ----------------------------------------------------------------

    def _load_refcounts(self) -> np.ndarray:
        hdr = self.hdr
        bits = hdr.refcount_bits
        per_block = self.cs * 8 // bits
        self.reftable = read_table(self.image, hdr.reftable_offset, hdr.reftable_clusters * self.cs // 8,
                                   "QCOW2 refcount table")
        ondisk = np.zeros(self.nb, np.uint64 if bits > 32 else np.uint32)
        useful = min(len(self.reftable), -(-self.nb // per_block))
        for index in range(useful):
            offset = int(self.reftable[index])
            if offset == 0 or offset % self.cs or offset // self.cs >= self.nb:
                continue
            raw = self.image.pread(self.cs, offset)
            counts = _decode_refcounts(raw.ljust(self.cs, b"\0"), bits)
            lo = index * per_block
            ondisk[lo:lo + per_block] = counts[:max(0, min(per_block, self.nb - lo))]
        return ondisk

    def _refcount_structures(self) -> None:
        self._inc(self.hdr.reftable_offset, self.hdr.reftable_clusters * self.cs, "refcount table")
        blocks = []
        for index, offset in enumerate(self.reftable.tolist()):
            if offset == 0:
                continue
            if offset & REFTABLE_RESERVED or offset % self.cs:
                self.errors.add(f"refcount block {index} is not cluster aligned; refcount table entry corrupted")
            elif offset // self.cs >= self.nb:
                self.errors.add(f"refcount block {index} is outside image")
            else:
                self.refs[offset // self.cs] += 1
                blocks.append((index, offset // self.cs))
        for index, cluster in blocks:
            if self.refs[cluster] != 1:
                self.errors.add(f"refcount block {index} refcount={int(self.refs[cluster])}")

    # -- L1 / L2 ----------------------------------------------------------------------------

    def _l1_entries(self, offset: int, size: int, what: str, l2_refs: dict) -> list:
        """Count an L1 table and note its L2 tables; returns (index, entry) of valid entries."""
        if size == 0:
            return []
        self._inc(offset, size * 8, what)
        try:
            l1 = read_table(self.image, offset, size, f"QCOW2 {what}")
        except InvalidImage as exc:
            self.errors.add(str(exc))
            return []
        valid = []
        for index in np.flatnonzero(l1).tolist():
            entry = int(l1[index])
            l2 = entry & OFFSET_MASK
            if entry & L1_RESERVED:
                self.errors.add(f"found L1 entry with reserved bits set: {entry:#x} ({what} index {index})")
            if l2 == 0:
                continue
            if l2 % self.cs:
                self.errors.add(f"L2 table offset {l2:#x} unaligned ({what} index {index})")
                continue
            l2_refs[l2] = l2_refs.get(l2, 0) + 1
            valid.append((index, entry))
        return valid

    def _snapshot_l1s(self, l2_refs: dict) -> bool:
        if not self.hdr.nb_snapshots:
            return True
        try:
            snapshots, table_size = parse_snapshots(self.image, self.hdr)
        except InvalidImage as exc:
            self.errors.add(f"snapshot table: {exc}")
            return False
        self._inc(self.hdr.snapshots_offset, table_size, "snapshot table")
        for i, snap in enumerate(snapshots):
            self._l1_entries(snap.l1_offset, snap.l1_size, f"snapshot {i} L1 table", l2_refs)
        return True

    def _walk_l2_tables(self, active: list, l2_refs: dict) -> None:
        """Each distinct L2 table is read once; its data references count once per L1 entry
        that points to it (so a table named a million times cannot make check slow)."""
        stats_of: dict[int, _TableStats] = {}
        active_tables = {entry & OFFSET_MASK for _, entry in active}
        for l2, times in sorted(l2_refs.items()):
            self._inc(l2, self.cs, "L2 table", times)
            if l2 + self.cs > self.image.size:
                continue
            stats_of[l2] = self._l2_table(l2, times, l2 in active_tables)
        for index, entry in active:
            l2 = entry & OFFSET_MASK
            refcount = self._ondisk(l2 // self.cs)
            if (refcount == 1) != bool(entry & COPIED):
                self.errors.add(f"OFLAG_COPIED L2 cluster: l1_index={index} l1_entry={entry:x} "
                                f"refcount={refcount}")
            stats = stats_of.get(l2)
            if stats is not None:
                self.stats.allocated += stats.allocated
                self.stats.compressed += stats.compressed
                self.stats.fragmented += stats.fragmented

    def _l2_table(self, l2: int, times: int, active: bool) -> _TableStats:
        raw = np.frombuffer(self.image.pread(self.cs, l2), dtype=">u8").astype(np.uint64)
        extended = self.hdr.extended_l2
        rows = raw.reshape(-1, 2) if extended else raw.reshape(-1, 1)
        entries = rows[:, 0]
        packed = (entries & COMPRESSED) != 0
        offsets = entries & OFFSET_MASK
        standard = ~packed & (offsets != 0)
        stats = _TableStats()
        self._check_packed(entries[packed], rows[packed, 1] if extended else None, times, stats)
        self._check_standard(entries, offsets, standard, times, stats, active)
        if extended:
            self._check_bitmaps(rows, offsets, packed)
        return stats

    def _check_packed(self, entries: np.ndarray, bitmaps, times: int, stats: _TableStats) -> None:
        if not len(entries):
            return
        shift = 62 - (self.hdr.cluster_bits - 8)
        for entry in entries[(entries & COPIED) != 0].tolist():
            self.errors.add(f"compressed cluster has the COPIED flag set (L2 entry {entry:#x})")
        if bitmaps is not None and (bitmaps != 0).any():
            self.errors.add("compressed cluster with a non-zero subcluster allocation bitmap")
        offsets = entries & np.uint64((1 << shift) - 1)
        sectors = (entries >> np.uint64(shift)) & np.uint64((1 << (self.hdr.cluster_bits - 8)) - 1)
        bad = (offsets >> np.uint64(56)) != 0
        for entry in entries[bad].tolist():
            self.errors.add(f"bad compressed cluster descriptor {entry:#x}: offset beyond 2^56")
        start = (offsets[~bad] & ~np.uint64(511))
        end = start + (sectors[~bad] + np.uint64(1)) * np.uint64(512)
        first, last = start // np.uint64(self.cs), (end - np.uint64(1)) // np.uint64(self.cs)
        self._inc_clusters(first, "compressed data", times)
        spill = last > first
        for lo, hi in zip(first[spill].tolist(), last[spill].tolist()):
            self._inc_clusters(np.arange(lo + 1, hi + 1, dtype=np.uint64), "compressed data", times)
        stats.allocated += len(entries)
        stats.compressed += len(entries)
        stats.fragmented += len(entries)

    def _check_standard(self, entries, offsets, standard, times: int, stats: _TableStats,
                        active: bool) -> None:
        hosts = offsets[standard]
        unaligned = hosts % np.uint64(self.cs) != 0
        for host in hosts[unaligned].tolist():
            self.errors.add(f"offset={host:x}: Cluster is not properly aligned; L2 entry corrupted.")
        good = hosts[~unaligned]
        clusters = good // np.uint64(self.cs)
        self._inc_clusters(clusters, "data", times)
        stats.allocated += len(good)
        if len(good) > 1:
            stats.fragmented += int(np.count_nonzero(good[1:] != good[:-1] + np.uint64(self.cs)))
        if not active:
            return
        flagged = entries[standard][~unaligned]
        inside = clusters < self.nb
        refcounts = np.zeros(len(clusters), np.uint64)
        refcounts[inside] = self.ondisk[clusters[inside].astype(np.int64)]
        wrong = (refcounts == 1) != ((flagged & COPIED) != 0)
        for entry, refcount in zip(flagged[wrong][:MAX_CHECK_MESSAGES].tolist(), refcounts[wrong].tolist()):
            self.errors.add(f"OFLAG_COPIED data cluster: l2_entry={entry:x} refcount={refcount}")

    def _check_bitmaps(self, rows, offsets, packed) -> None:
        bitmaps = rows[~packed, 1]
        alloc = bitmaps & np.uint64(0xFFFFFFFF)
        zero = bitmaps >> np.uint64(32)
        invalid = ((alloc & zero) != 0) | ((alloc != 0) & (offsets[~packed] == 0))
        for count in [int(np.count_nonzero(invalid))] if invalid.any() else []:
            self.errors.add(f"{count} extended L2 entries have an invalid subcluster bitmap")

    # -- other structures -------------------------------------------------------------------

    def _bitmaps(self) -> None:
        """Persistent dirty bitmaps: directory, bitmap tables and their data clusters."""
        if not self.hdr.bitmaps:
            return
        _count, dir_size, dir_offset = self.hdr.bitmaps
        try:
            bitmaps = parse_bitmaps(self.image, self.hdr)
        except InvalidImage as exc:
            self.errors.add(str(exc))
            return
        self._inc(dir_offset, dir_size, "bitmap directory")
        for bitmap in bitmaps:
            self._bitmap_table(bitmap.table_offset, bitmap.table_size)

    def _bitmap_table(self, offset: int, size: int) -> None:
        if size == 0:
            return
        if size * 8 > QCOW2_MAX_L1_BYTES:
            self.errors.add(f"bitmap table of {size} entries is larger than {QCOW2_MAX_L1_BYTES} bytes")
            return
        self._inc(offset, size * 8, "bitmap table")
        try:
            table = read_table(self.image, offset, size, "QCOW2 bitmap table")
        except InvalidImage as exc:
            self.errors.add(str(exc))
            return
        hosts = table & np.uint64(OFFSET_MASK)
        self._inc_clusters(hosts[hosts != 0] // np.uint64(self.cs), "bitmap data")

    # -- verdict ----------------------------------------------------------------------------

    def _compare(self) -> None:
        ondisk = self.ondisk.astype(np.uint64)
        refs = self.refs.astype(np.uint64)
        for cluster in np.flatnonzero(ondisk != refs).tolist():
            have, want = int(ondisk[cluster]), int(refs[cluster])
            target = self.errors if have < want else self.leaks
            target.add(f"cluster {cluster} refcount={have} reference={want}")
        used = np.flatnonzero((ondisk > 0) | (refs > 0))
        self.report.image_end_offset = (int(used[-1]) + 1 if len(used) else 1) * self.cs

    def _fill_report(self) -> None:
        report = self.report
        for messages, target in ((self.errors, report.corruptions), (self.leaks, report.leaks)):
            target.extend(messages.items)
            if messages.dropped:
                target.append(f"... and {messages.dropped} more like these")
        total = -(-self.hdr.virtual_size // self.cs)
        report.total_clusters = total or None
        report.allocated_clusters = self.stats.allocated or None
        report.fragmented_clusters = self.stats.fragmented or None
        report.compressed_clusters = self.stats.compressed or None


def _decode_refcounts(raw: bytes, bits: int) -> np.ndarray:
    if bits >= 8:
        return np.frombuffer(raw, dtype=f">u{bits // 8}")
    data = np.frombuffer(raw, dtype=np.uint8)
    per_byte = 8 // bits
    lanes = [(data >> (lane * bits)) & ((1 << bits) - 1) for lane in range(per_byte)]
    return np.stack(lanes, axis=1).reshape(-1)
