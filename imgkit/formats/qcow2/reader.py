"""The QCOW2 reader: extents from L1/L2 alone, reads coalesced into one pread per host run."""
from __future__ import annotations

import os
import threading
from collections import OrderedDict

import numpy as np

from ...errors import InvalidImage, UnsafeImage, UnsupportedFormat
from ...extents import Extent, Kind, merge
from ...io import ImageFile
from ...limits import QCOW2_L2_CACHE_BYTES
from ..base import Reader
from .codec import inflate_cluster
from .layout import (Bitmap, COMPAT_LAZY_REFCOUNTS, COMPRESSED, COMPRESSION_NAMES, CRYPT_NAMES,
                      Header, INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE, INCOMPAT_DIRTY, OFFSET_MASK,
                      Snapshot, ZERO_FLAG, parse_bitmaps, parse_header, parse_snapshots, read_table)

DATA, ZERO, UNALLOCATED, PACKED = 0, 1, 2, 3   # unit kinds inside the driver (PACKED = compressed)


class Qcow2Reader(Reader):
    format = "qcow2"

    def __init__(self, image: ImageFile, hdr: Header, snapshots: list[Snapshot], bitmaps: list[Bitmap]):
        super().__init__(image)
        self.hdr = hdr
        self.snapshots = snapshots
        self.bitmaps = bitmaps
        self.virtual_size = hdr.virtual_size // 512 * 512   # qemu reads whole sectors only
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
        self._refuse_unaligned(offsets[~packed])
        if subs == 1:
            kinds = np.full(len(entries), UNALLOCATED, np.uint8)
            kinds[offsets != 0] = DATA
            kinds[(entries & ZERO_FLAG) != 0] = ZERO
            kinds[packed] = PACKED
            return kinds, np.where(packed, entries, offsets)
        kinds, hosts = self._classify_subclusters(rows, offsets)
        kinds[packed] = PACKED
        hosts = np.where(packed[:, None], entries[:, None], hosts)
        skip, count = first % subs, stop - first
        return kinds.reshape(-1)[skip:skip + count], hosts.reshape(-1)[skip:skip + count]

    def _refuse_unaligned(self, offsets: np.ndarray) -> None:
        bad = offsets % np.uint64(self.cluster_size) != 0
        if bad.any():
            raise InvalidImage(f"{self.image.path}: QCOW2 L2 entry points to an unaligned data "
                               f"cluster ({int(offsets[np.flatnonzero(bad)[0]]):#x})")

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
        # A compressed run never crosses a guest cluster: two L2 entries naming the same
        # compressed bytes are two clusters, each inflated on its own.
        cluster = (origin + np.arange(len(kinds), dtype=np.int64) * self.unit) // self.cluster_size
        new_packed_cluster = (kinds[1:] == PACKED) & (cluster[1:] != cluster[:-1])
        cuts = np.flatnonzero((kinds[1:] != kinds[:-1]) | ~same_host | new_packed_cluster) + 1
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
