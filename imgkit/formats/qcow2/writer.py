"""The QCOW2 writer (streaming, memory bounded by one window) and measure."""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from ...errors import UnsupportedFormat, UsageError
from ...extents import Kind, mask_runs
from ...io import AtomicOutput, parse_size
from ...limits import QCOW2_MAX_L1_BYTES
from ..base import Writer
from .codec import deflate_compressor, zstd_module
from .layout import (COMPRESSED, COPIED, INCOMPAT_COMPRESSION, MAGIC, V2_HEADER, V3_FIELDS,
                      V3_HEADER_LENGTH)


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
    """-o values (and compress=on from -c) checked the way qemu-img create checks them."""
    version = _compat(options.get("compat", "1.1"))
    refcount_bits = _refcount_bits(options.get("refcount_bits", "16"), version)
    compression_type = _compression_type(options.get("compression_type", "zlib"), version)
    if options.get("lazy_refcounts", "off") != "off":
        raise UsageError("lazy_refcounts=on is not supported: imgkit always writes exact refcounts")
    compress = options.get("compress", "off")
    if compress not in ("on", "off"):
        raise UsageError(f"compress={compress!r}: use on or off")
    return WriteOptions(version, _cluster_bits(options.get("cluster_size", "64K")),
                        refcount_bits.bit_length() - 1, compression_type, compress == "on")


def _compat(text: str) -> int:
    versions = {"1.1": 3, "v3": 3, "0.10": 2, "v2": 2}
    if text not in versions:
        raise UsageError(f"compat={text!r}: use 1.1 (v3) or 0.10 (v2)")
    return versions[text]


def _cluster_bits(text: str) -> int:
    size = parse_size(text)
    if not 512 <= size <= 2 << 20 or size & (size - 1):
        raise UsageError(f"cluster_size={text}: use a power of two from 512 to 2M")
    return size.bit_length() - 1


def _refcount_bits(text: str, version: int) -> int:
    if not text.isdigit() or int(text) not in (1, 2, 4, 8, 16, 32, 64):
        raise UsageError(f"refcount_bits={text!r}: use 1, 2, 4, 8, 16, 32 or 64")
    if version == 2 and int(text) != 16:
        raise UsageError("refcount_bits other than 16 need compat=1.1")
    return int(text)


def _compression_type(text: str, version: int) -> int:
    if text not in ("zlib", "zstd"):
        raise UsageError(f"compression_type={text!r}: use zlib or zstd")
    if text == "zstd" and version == 2:
        raise UsageError("compression_type=zstd needs compat=1.1")
    return 1 if text == "zstd" else 0


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
        self.virtual_size = -(-virtual_size // 512) * 512   # qemu sizes disks in whole sectors
        self.chunk_size = cs = opts.cluster_size
        self.l2_entries = cs // 8
        self.table_span = cs * self.l2_entries
        l1_size = l1_entries_for(self.virtual_size, cs)
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
            return deflate_compressor()
        zstandard = zstd_module()
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
            return [(lo, hi - lo, data[lo * cs:min(hi * cs, len(data))], False) for lo, hi in mask_runs(mask)]
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
        self._write_tables()
        self._write_final_blocks()
        table_at, table_clusters = self._write_tail_refcounts()
        if len(self.l1):
            self.out.pwrite(self.l1.astype(">u8").tobytes(), self.l1_offset)
        self.out.pwrite(self._header(table_at, table_clusters), 0)
        self.out.truncate(table_at + table_clusters * self.chunk_size)

    def _write_tail_refcounts(self) -> tuple[int, int]:
        """The remaining refcount blocks, then the refcount table, at the end of the file;
        sized together so that they also count themselves. Returns the table's place and size."""
        cs, ledger = self.chunk_size, self.ledger
        used = -(-self.next_free // cs)
        blocks, table_clusters = self._tail_sizes(used)
        done = len(ledger.written)
        ledger.add(used, blocks - done + table_clusters)
        for index in range(done, blocks):
            host = (used + index - done) * cs
            self.out.pwrite(ledger.encode(index), host)
            ledger.written.append(host)
        table_at = (used + blocks - done) * cs
        reftable = np.zeros(table_clusters * cs // 8, np.uint64)
        reftable[:blocks] = ledger.written
        self.out.pwrite(reftable.astype(">u8").tobytes(), table_at)
        return table_at, table_clusters

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
    """qemu-img measure's numbers: fully allocated metadata plus the clusters that hold data."""
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
