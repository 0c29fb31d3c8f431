"""Opening a hosted sparse extent: header (or footer) validation, descriptor, grain directory.

Shared by the reader and the checker, so both refuse the same files for the same reasons.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ... import limits
from ...errors import InvalidImage, LimitExceeded, UnsafeImage, UnsupportedFormat
from ...io import ImageFile
from . import descriptor as desc_mod
from .layout import (COMPRESS_DEFLATE, COMPRESS_NONE, COWD_MAGIC, FLAG_MARKERS,
                     FLAG_NEWLINE_CHECK, FLAG_REDUNDANT_GD, GD_AT_END, INCOMPATIBLE_MASK,
                     KNOWN_INCOMPATIBLE, MAGIC, MARKER_EOS, MARKER_FOOTER, NEWLINE_BYTES, SECTOR,
                     Header, unpack_header, unpack_marker)

FOOTER_AREA = 3 * SECTOR   # footer marker, footer, end-of-stream marker


@dataclass
class SparseExtent:
    """Everything known about a hosted sparse extent before any grain table is read."""

    image: ImageFile
    header: Header                      # the header in effect (the footer's, for GD_AT_END)
    front_header: Header                # sector 0 as written
    descriptor: desc_mod.Descriptor | None
    gd: np.ndarray                      # u32 sector offsets of the grain tables
    gd_offset: int                      # sector the gd array came from
    warnings: list[str] = field(default_factory=list)

    @property
    def compressed(self) -> bool:
        return self.header.compressed

    @property
    def gt_bytes(self) -> int:
        return self.header.gtes_per_gt * 4

    @property
    def virtual_size(self) -> int:
        return self.header.capacity * SECTOR

    @property
    def create_type(self) -> str:
        """As qemu reports it: compressed extents are streamOptimized whatever the descriptor says."""
        if self.compressed:
            return "streamOptimized"
        if self.descriptor is not None and self.descriptor.create_type:
            return self.descriptor.create_type
        return "monolithicSparse"


def open_extent(image: ImageFile) -> SparseExtent:
    """Validate a KDMV file far enough that every later read is bounded; refuse what we do not read."""
    head = image.pread(SECTOR, 0)
    if head[:4] == COWD_MAGIC:
        raise UnsupportedFormat(
            f"{image.path}: a vmfsSparse (ESX COWD) extent; imgkit reads hosted sparse VMDK files only "
            f"(monolithicSparse, streamOptimized)")
    if head[:4] != MAGIC:
        return _refuse_descriptor_file(image)
    if len(head) < SECTOR:
        raise InvalidImage(f"{image.path}: VMDK header truncated ({len(head)} of {SECTOR} bytes)")
    front = unpack_header(head)
    descriptor = read_embedded_descriptor(image, front)
    if front.capacity == 0 and descriptor is not None:
        _refuse_descriptor(image, descriptor)
    header = read_footer(image, front) if front.gd_offset == GD_AT_END else front
    validate_header(image, header, "header" if header is front else "footer")
    _check_embedded_extents(image, descriptor)
    extent = SparseExtent(image, header, front, descriptor, np.zeros(0, "<u4"), 0)
    extent.gd, extent.gd_offset = choose_gd(extent)
    return extent


def validate_header(image: ImageFile, h: Header, what: str) -> None:
    """Every field a reader trusts, against the format's rules and limits.py."""
    where = f"{image.path}: VMDK {what}"
    if h.version not in (1, 2, 3):
        raise UnsupportedFormat(f"{where}: version {h.version} is not supported (1 to 3 are)")
    unknown = h.flags & INCOMPATIBLE_MASK & ~KNOWN_INCOMPATIBLE
    if unknown:
        raise UnsupportedFormat(f"{where}: unknown incompatible flags {unknown:#x}")
    if h.compressed and h.compress_algorithm != COMPRESS_DEFLATE:
        raise UnsupportedFormat(f"{where}: compression algorithm {h.compress_algorithm} is not supported")
    if not h.compressed and h.compress_algorithm not in (COMPRESS_NONE, COMPRESS_DEFLATE):
        raise UnsupportedFormat(f"{where}: compression algorithm {h.compress_algorithm} is not supported")
    if h.compressed != bool(h.flags & FLAG_MARKERS):
        raise UnsupportedFormat(f"{where}: compressed grains without grain markers (or the reverse) "
                                f"are not supported (flags {h.flags:#x})")
    if h.flags & FLAG_NEWLINE_CHECK and h.newline_bytes != NEWLINE_BYTES:
        raise InvalidImage(f"{where}: the line-ending check bytes were altered; the file went through "
                           f"a text-mode transfer and is corrupt")
    if h.grain_size < 1 or h.grain_size & (h.grain_size - 1):
        raise InvalidImage(f"{where}: grain size {h.grain_size} sectors is not a power of two")
    limits.check_max(f"{where}: grain size in sectors", h.grain_size, limits.VMDK_MAX_GRAIN_SECTORS)
    if h.gtes_per_gt < 1:
        raise InvalidImage(f"{where}: numGTEsPerGT is 0")
    limits.check_max(f"{where}: numGTEsPerGT", h.gtes_per_gt, limits.VMDK_MAX_GTES)
    limits.check_max(f"{where}: capacity in sectors", h.capacity, limits.VMDK_MAX_SECTORS)
    limits.check_virtual_size(h.capacity * SECTOR)
    limits.check_max(f"{where}: grain directory bytes", gd_entries(h) * 4, limits.VMDK_MAX_GD_BYTES)
    if h.gd_offset == GD_AT_END:
        raise InvalidImage(f"{where}: the footer's grain directory offset is GD_AT_END too")


def gd_entries(h: Header) -> int:
    return -(-h.capacity // (h.grain_size * h.gtes_per_gt))


def read_embedded_descriptor(image: ImageFile, h: Header) -> desc_mod.Descriptor | None:
    if h.descriptor_offset == 0 or h.descriptor_size == 0:
        return None
    length = h.descriptor_size * SECTOR
    if h.descriptor_size > limits.VMDK_MAX_DESCRIPTOR // SECTOR:
        raise LimitExceeded(f"{image.path}: the embedded VMDK descriptor is {h.descriptor_size} sectors, "
                            f"above the limit of {limits.VMDK_MAX_DESCRIPTOR} bytes")
    if h.descriptor_offset > limits.VMDK_MAX_SECTORS:
        raise InvalidImage(f"{image.path}: VMDK descriptor offset {h.descriptor_offset} is out of range")
    raw = image.pread_exact(length, h.descriptor_offset * SECTOR, "VMDK embedded descriptor")
    if not raw.split(b"\0", 1)[0].strip():
        return None   # an empty descriptor area, as in the extents of a twoGbMaxExtentSparse set
    return desc_mod.parse(raw, image.path)


def read_footer(image: ImageFile, front: Header) -> Header:
    """GD_AT_END: the real header sits in the last three sectors (marker, footer, EOS)."""
    if image.size < 2 * SECTOR + FOOTER_AREA:
        raise InvalidImage(f"{image.path}: VMDK grain directory is at the end but the file is too short "
                           f"for a footer")
    area = image.pread_exact(FOOTER_AREA, image.size - FOOTER_AREA, "VMDK footer")
    num, size, kind = unpack_marker(area[:SECTOR])
    if size != 0 or kind != MARKER_FOOTER or num != 1:
        raise InvalidImage(f"{image.path}: VMDK footer marker is malformed (sectors {num}, size {size}, "
                           f"type {kind})")
    if area[SECTOR:SECTOR + 4] != MAGIC:
        raise InvalidImage(f"{image.path}: VMDK footer does not start with KDMV")
    eos = unpack_marker(area[2 * SECTOR:])
    if eos != (0, 0, MARKER_EOS):
        raise InvalidImage(f"{image.path}: VMDK end-of-stream marker is malformed {eos}")
    return unpack_header(area[SECTOR:2 * SECTOR])


def load_gd(extent: SparseExtent, offset: int, what: str) -> np.ndarray:
    """The grain directory at sector offset, every table inside the file, or InvalidImage."""
    image, h = extent.image, extent.header
    n = gd_entries(h)
    if offset == 0 or offset > limits.VMDK_MAX_SECTORS:
        raise InvalidImage(f"{image.path}: VMDK {what} offset {offset} is invalid")
    gd = np.frombuffer(image.pread_exact(n * 4, offset * SECTOR, f"VMDK {what}"), dtype="<u4")
    ends = gd.astype(np.int64) * SECTOR + extent.gt_bytes
    bad = np.flatnonzero((gd != 0) & (ends > image.size))
    if len(bad):
        i = int(bad[0])
        raise InvalidImage(f"{image.path}: VMDK {what} entry {i} points to a grain table at sector "
                           f"{int(gd[i])}, beyond the end of the file")
    return gd


def choose_gd(extent: SparseExtent) -> tuple[np.ndarray, int]:
    """The primary grain directory, or the redundant one when the primary is damaged."""
    h = extent.header
    try:
        return load_gd(extent, h.gd_offset, "grain directory"), h.gd_offset
    except InvalidImage as primary_error:
        if not (h.flags & FLAG_REDUNDANT_GD) or h.rgd_offset == 0:
            raise
        gd = load_gd(extent, h.rgd_offset, "redundant grain directory")
        extent.warnings.append(f"primary grain directory damaged ({primary_error}); using the redundant one")
        return gd, h.rgd_offset


def _check_embedded_extents(image: ImageFile, descriptor: desc_mod.Descriptor | None) -> None:
    """A monolithic file's descriptor lists only itself: one SPARSE extent with a plain name."""
    if descriptor is None:
        return
    others = [e for e in descriptor.extents
              if e.kind != "SPARSE" or e.filename is None or "/" in e.filename or "\\" in e.filename]
    if others or len(descriptor.extents) > 1:
        _refuse_descriptor(image, descriptor)


def _refuse_descriptor_file(image: ImageFile):
    if image.size > limits.VMDK_MAX_DESCRIPTOR:
        raise LimitExceeded(f"{image.path}: a VMDK descriptor file of {image.size} bytes, above the limit "
                            f"of {limits.VMDK_MAX_DESCRIPTOR}")
    descriptor = desc_mod.parse(image.pread_exact(image.size, 0, "VMDK descriptor"), image.path)
    _refuse_descriptor(image, descriptor)


def _refuse_descriptor(image: ImageFile, descriptor: desc_mod.Descriptor):
    """Descriptor-only and multi-file disks keep their data in files named by the image: never opened."""
    kind = descriptor.create_type or "unknown createType"
    names = ", ".join(repr(n) for n in descriptor.extent_files()[:4]) or "none"
    raise UnsafeImage(
        f"{image.path}: a {kind} VMDK whose data lives in other files (extents: {names}); imgkit never "
        f"opens files named inside an image (CVE-2022-47951)")
