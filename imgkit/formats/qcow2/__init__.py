"""QCOW2 v2/v3: a reader that maps from L1/L2 alone, a streaming writer, check and measure.

Layout facts: shared/reference/formats.md §1 (qemu's docs/interop/qcow2.rst is the authority).
Nothing here ever opens a second file: backing files and external data files are reported,
never followed.

  layout.py  header, extensions, snapshot and bitmap directories (all bounds-checked)
  codec.py   compressed clusters (deflate, zstd)
  reader.py  extents and reads
  writer.py  the writer and measure
  check.py   qemu-img check
"""
from __future__ import annotations

from .check import check
from .layout import COMPRESSED, COPIED, OFFSET_MASK, Header, parse_header, read_table
from .reader import Qcow2Reader, open_reader
from .writer import Qcow2Writer, create_writer, measure, parse_write_options

OPTIONS = {
    "compat": "1.1 (default, also v3) or 0.10 (also v2)",
    "cluster_size": "512 to 2M, a power of two (default 64K)",
    "refcount_bits": "1, 2, 4, 8, 16 (default), 32 or 64",
    "compression_type": "zlib (default) or zstd (needs compat=1.1 and the zstandard package)",
    "lazy_refcounts": "off (the only value: refcounts are always exact)",
    "compress": "on: compress every data cluster (set by -c)",
}

__all__ = ["OPTIONS", "open_reader", "create_writer", "check", "measure", "Qcow2Reader", "Qcow2Writer",
           "Header", "parse_header", "parse_write_options", "read_table", "COPIED", "COMPRESSED",
           "OFFSET_MASK"]
