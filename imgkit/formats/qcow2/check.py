"""qemu-img check for QCOW2: rebuild every host cluster's reference count and compare."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from ...errors import ImgkitError, InvalidImage, UnsupportedFormat
from ...io import ImageFile
from ...limits import QCOW2_MAX_L1_BYTES
from ..base import CheckReport
from .layout import (COMPRESSED, COPIED, Header, L1_RESERVED, OFFSET_MASK, REFTABLE_RESERVED,
                      parse_bitmaps, parse_header, parse_snapshots, read_table)

MAX_CHECK_CLUSTERS = 1 << 25          # check keeps two counters per host cluster in memory
MAX_CHECK_MESSAGES = 10000            # per kind; the rest are summarised in one line


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

    def add_each(self, rows, describe) -> None:
        """One message per row of numpy values; stops formatting once the cap is reached."""
        for row in rows:
            if len(self.items) >= MAX_CHECK_MESSAGES:
                self.dropped += 1
                continue
            self.items.append(describe(*(int(v) for v in row)))


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
        l2_refs: list = []
        active = self._l1_entries(self.hdr.l1_offset, self.hdr.l1_size, "L1 table", l2_refs)
        snapshots_ok = self._snapshot_l1s(l2_refs)
        self._walk_l2_tables(*active, l2_refs)
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

    def _ondisk_many(self, clusters: np.ndarray) -> np.ndarray:
        """On-disk refcounts of clusters (0 for clusters past the end of the file)."""
        out = np.zeros(len(clusters), np.uint64)
        inside = clusters < self.nb
        out[inside] = self.ondisk[clusters[inside].astype(np.int64)]
        return out

    # -- refcount structures ----------------------------------------------------------------

    def _load_refcounts(self) -> np.ndarray:
        hdr = self.hdr
        bits = hdr.refcount_bits
        per_block = self.cs * 8 // bits
        self.reftable = read_table(self.image, hdr.reftable_offset, hdr.reftable_clusters * self.cs // 8,
                                   "QCOW2 refcount table")
        ondisk = np.zeros(self.nb, np.uint32)   # 64-bit refcounts above 2^32-1 are clipped
        useful = min(len(self.reftable), -(-self.nb // per_block))
        for index in range(useful):
            offset = int(self.reftable[index])
            if offset == 0 or offset % self.cs or offset // self.cs >= self.nb:
                continue
            raw = self.image.pread(self.cs, offset)
            counts = _decode_refcounts(raw.ljust(self.cs, b"\0"), bits)
            lo = index * per_block
            counts = np.minimum(counts[:max(0, min(per_block, self.nb - lo))].astype(np.uint64), 0xFFFFFFFF)
            ondisk[lo:lo + len(counts)] = counts
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

    def _l1_entries(self, offset: int, size: int, what: str, l2_refs: list,
                    times: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Count an L1 table (times: how many snapshots share it) and note its L2 tables;
        returns the indices and entries that name a usable L2 table."""
        nothing = np.zeros(0, np.int64), np.zeros(0, np.uint64)
        if size == 0:
            return nothing
        self._inc(offset, size * 8, what, times)
        try:
            l1 = read_table(self.image, offset, size, f"QCOW2 {what}")
        except InvalidImage as exc:
            self.errors.add(str(exc))
            return nothing
        indices = np.flatnonzero(l1)
        entries = l1[indices]
        reserved = (entries & np.uint64(L1_RESERVED)) != 0
        self.errors.add_each(zip(indices[reserved], entries[reserved]),
                             lambda i, e: f"found L1 entry with reserved bits set: {e:#x} ({what} index {i})")
        l2 = entries & np.uint64(OFFSET_MASK)
        unaligned = (l2 % np.uint64(self.cs)) != 0
        self.errors.add_each(zip(indices[unaligned], l2[unaligned]),
                             lambda i, o: f"L2 table offset {o:#x} unaligned ({what} index {i})")
        usable = (l2 != 0) & ~unaligned
        l2_refs.append((l2[usable], times))
        return indices[usable], entries[usable]

    def _snapshot_l1s(self, l2_refs: list) -> bool:
        """Snapshot L1 tables; snapshots sharing one table are walked once, counted per snapshot."""
        if not self.hdr.nb_snapshots:
            return True
        try:
            snapshots, table_size = parse_snapshots(self.image, self.hdr)
        except InvalidImage as exc:
            self.errors.add(f"snapshot table: {exc}")
            return False
        self._inc(self.hdr.snapshots_offset, table_size, "snapshot table")
        tables = Counter((snap.l1_offset, snap.l1_size) for snap in snapshots)
        for (offset, size), times in tables.items():
            self._l1_entries(offset, size, f"snapshot L1 table at {offset:#x}", l2_refs, times)
        return True

    def _walk_l2_tables(self, indices: np.ndarray, entries: np.ndarray, l2_refs: list) -> None:
        """Each distinct L2 table is read once; its data references count once per L1 entry
        that points to it (so a table named a million times cannot make check slow)."""
        offsets = np.concatenate([o for o, _ in l2_refs]) if l2_refs else np.zeros(0, np.uint64)
        weights = np.concatenate([np.full(len(o), t, np.int64) for o, t in l2_refs]) if l2_refs else None
        tables, inverse = np.unique(offsets, return_inverse=True)
        counts = np.bincount(inverse, weights=weights, minlength=len(tables)).astype(np.int64)
        active_l2 = entries & np.uint64(OFFSET_MASK)
        active_tables = set(np.unique(active_l2).tolist())
        stats_of: dict[int, _TableStats] = {}
        for l2, times in zip(tables.tolist(), counts.tolist()):
            self._inc(l2, self.cs, "L2 table", times)
            if l2 + self.cs <= self.image.size:
                stats_of[l2] = self._l2_table(l2, times, l2 in active_tables)
        refcounts = self._ondisk_many(active_l2 // np.uint64(self.cs))
        wrong = (refcounts == 1) != ((entries & np.uint64(COPIED)) != 0)
        self.errors.add_each(zip(indices[wrong], entries[wrong], refcounts[wrong]),
                             lambda i, e, r: f"OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={e:x} refcount={r}")
        for l2, times in zip(*(a.tolist() for a in np.unique(active_l2, return_counts=True))):
            stats = stats_of.get(l2)
            if stats is not None:
                self.stats.allocated += times * stats.allocated
                self.stats.compressed += times * stats.compressed
                self.stats.fragmented += times * stats.fragmented

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
        self.errors.add_each(zip(hosts[unaligned]),
                             lambda h: f"offset={h:x}: Cluster is not properly aligned; L2 entry corrupted.")
        good = hosts[~unaligned]
        clusters = good // np.uint64(self.cs)
        self._inc_clusters(clusters, "data", times)
        stats.allocated += len(good)
        if len(good) > 1:
            stats.fragmented += int(np.count_nonzero(good[1:] != good[:-1] + np.uint64(self.cs)))
        if not active:
            return
        flagged = entries[standard][~unaligned]
        refcounts = self._ondisk_many(clusters)
        wrong = (refcounts == 1) != ((flagged & np.uint64(COPIED)) != 0)
        self.errors.add_each(zip(flagged[wrong], refcounts[wrong]),
                             lambda e, r: f"OFLAG_COPIED data cluster: l2_entry={e:x} refcount={r}")

    def _check_bitmaps(self, rows, offsets, packed) -> None:
        bitmaps = rows[~packed, 1]
        alloc = bitmaps & np.uint64(0xFFFFFFFF)
        zero = bitmaps >> np.uint64(32)
        invalid = ((alloc & zero) != 0) | ((alloc != 0) & (offsets[~packed] == 0))
        count = int(np.count_nonzero(invalid))
        if count:
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
