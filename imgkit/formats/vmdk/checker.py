"""imgkit check for hosted sparse VMDK files.

Finds what a reader could silently get wrong: primary and redundant grain tables that
disagree, grains outside the file or on top of each other or of metadata, malformed markers,
and a footer that is not the header with the real grain directory offset. Memory grows with
the allocated grains (two u64 per grain), not with the virtual size.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ... import limits
from ...errors import InvalidImage
from ...io import ImageFile
from ..base import CheckReport
from .layout import (FLAG_REDUNDANT_GD, GD_AT_END, GRAIN_MARKER_BYTES, MARKER_GD, MARKER_GT, SECTOR,
                     sectors_for, unpack_grain_marker, unpack_marker)
from .sparse import FOOTER_AREA, SparseExtent, gd_entries, load_gd, open_extent

MAX_MESSAGES = 1000


class _Findings:
    """Corruptions, with the count kept exact and the text capped."""

    def __init__(self, report: CheckReport):
        self.report = report
        self.extra = 0

    def add(self, message: str) -> None:
        if len(self.report.corruptions) < MAX_MESSAGES:
            self.report.corruptions.append(message)
        else:
            self.extra += 1


def check(image: ImageFile) -> CheckReport:
    extent = open_extent(image)
    report = CheckReport(filename=image.path, format="vmdk")
    found = _Findings(report)
    for warning in extent.warnings:
        found.add(warning)
    spans = _metadata_spans(extent)
    redundant = _redundant_gd(extent, found)
    if redundant is not None:
        spans += [(int(s) * SECTOR, extent.gt_bytes, f"redundant grain table {i}")
                  for i, s in enumerate(redundant) if s]
    if extent.front_header.gd_offset == GD_AT_END:
        _check_stream_metadata(extent, found)
    starts, ends, grains = _grain_spans(extent, redundant, found, report)
    _check_overlaps(spans, starts, ends, grains, found)
    if found.extra:
        report.corruptions.append(f"... and {found.extra} more corruptions")
    return report


def _metadata_spans(extent: SparseExtent) -> list[tuple[int, int, str]]:
    h, front = extent.header, extent.front_header
    spans = [(0, SECTOR, "header")]
    if front.descriptor_offset and front.descriptor_size:
        spans.append((front.descriptor_offset * SECTOR, front.descriptor_size * SECTOR, "descriptor"))
    spans.append((extent.gd_offset * SECTOR, gd_entries(h) * 4, "grain directory"))
    spans += [(int(s) * SECTOR, extent.gt_bytes, f"grain table {i}") for i, s in enumerate(extent.gd) if s]
    if front.gd_offset == GD_AT_END:
        spans.append((extent.image.size - FOOTER_AREA, FOOTER_AREA, "footer"))
    return spans


def _redundant_gd(extent: SparseExtent, found: _Findings):
    """The redundant directory, with every table compared against its primary twin."""
    h = extent.header
    if not (h.flags & FLAG_REDUNDANT_GD) or h.rgd_offset == 0 or extent.gd_offset == h.rgd_offset:
        return None
    try:
        redundant = load_gd(extent, h.rgd_offset, "redundant grain directory")
    except InvalidImage as exc:
        found.add(str(exc))
        return None
    read = extent.image.pread_exact
    for i, (p, r) in enumerate(zip(extent.gd.tolist(), redundant.tolist())):
        primary = read(extent.gt_bytes, p * SECTOR, "grain table") if p else bytes(extent.gt_bytes)
        spare = read(extent.gt_bytes, r * SECTOR, "redundant grain table") if r else bytes(extent.gt_bytes)
        if primary != spare:
            diff = np.count_nonzero(np.frombuffer(primary, "<u4") != np.frombuffer(spare, "<u4"))
            found.add(f"grain table {i}: {diff} entries differ between the primary and redundant copies")
    return redundant


def _check_stream_metadata(extent: SparseExtent, found: _Findings) -> None:
    """GD_AT_END files: GT and GD markers in front of their tables, footer equal to the header."""
    read = extent.image.pread_exact
    gt_sectors = sectors_for(extent.gt_bytes)
    for i, s in enumerate(extent.gd.tolist()):
        if s and not _marker_is(read(SECTOR, (s - 1) * SECTOR, "GT marker"), gt_sectors, MARKER_GT):
            found.add(f"grain table {i} at sector {s} has no well-formed GT marker in front of it")
    gd_sectors = sectors_for(len(extent.gd) * 4)
    if not _marker_is(read(SECTOR, (extent.gd_offset - 1) * SECTOR, "GD marker"), gd_sectors, MARKER_GD):
        found.add(f"grain directory at sector {extent.gd_offset} has no well-formed GD marker in front of it")
    front, footer = extent.front_header, extent.header
    for f in dataclasses.fields(front):
        if f.name != "gd_offset" and getattr(front, f.name) != getattr(footer, f.name):
            found.add(f"footer field {f.name} is {getattr(footer, f.name)!r} but the header says "
                      f"{getattr(front, f.name)!r}")


def _marker_is(sector: bytes, num_sectors: int, kind: int) -> bool:
    return unpack_marker(sector) == (num_sectors, 0, kind)


def _grain_spans(extent: SparseExtent, redundant, found: _Findings, report: CheckReport):
    """(start, end, grain) arrays for every allocated grain; bad entries reported, not returned."""
    h, image = extent.header, extent.image
    grain_bytes, per_table = h.grain_bytes, h.gtes_per_gt
    total = -(-h.capacity // h.grain_size)
    starts, ends, grains = [], [], []
    allocated = 0
    for i, sector in enumerate(extent.gd.tolist()):
        if not sector:
            continue
        entries = np.frombuffer(image.pread_exact(extent.gt_bytes, sector * SECTOR, "grain table"), "<u4")
        entries = entries[:max(0, total - i * per_table)]
        used = np.flatnonzero(entries >= 2)
        allocated += len(used)
        index = used.astype(np.int64) + i * per_table
        host = entries[used].astype(np.int64) * SECTOR
        if extent.compressed:
            length = np.array([_stream_grain_length(extent, int(g), int(o), found)
                               for g, o in zip(index, host)], dtype=np.int64)
        else:
            length = np.minimum(grain_bytes, extent.virtual_size - index * grain_bytes)
        outside = (length < 0) | (host + np.maximum(length, 0) > image.size)
        for g, o in zip(index[outside & (length >= 0)].tolist(), host[outside & (length >= 0)].tolist()):
            found.add(f"grain {g} at offset {o} lies beyond the end of the file ({image.size} bytes)")
        keep = ~outside
        starts.append(host[keep])
        ends.append(host[keep] + -(-length[keep] // SECTOR) * SECTOR)
        grains.append(index[keep])
    report.total_clusters = total
    report.allocated_clusters = allocated
    report.compressed_clusters = allocated if extent.compressed else None
    empty = np.zeros(0, np.int64)
    return (np.concatenate(starts) if starts else empty, np.concatenate(ends) if ends else empty,
            np.concatenate(grains) if grains else empty)


def _stream_grain_length(extent: SparseExtent, grain: int, host: int, found: _Findings) -> int:
    """Bytes the grain's marker claims (marker included), or -1 after reporting a bad marker."""
    image = extent.image
    if host + GRAIN_MARKER_BYTES > image.size:
        found.add(f"grain {grain} at offset {host} lies beyond the end of the file ({image.size} bytes)")
        return -1
    lba, size = unpack_grain_marker(image.pread_exact(GRAIN_MARKER_BYTES, host, "grain marker"))
    if lba != grain * extent.header.grain_size:
        found.add(f"grain {grain} at offset {host}: marker says LBA {lba}, "
                  f"expected {grain * extent.header.grain_size}")
        return -1
    if size == 0 or size > limits.MAX_COMPRESSED_CHUNK:
        found.add(f"grain {grain} at offset {host}: marker gives a compressed size of {size}")
        return -1
    return GRAIN_MARKER_BYTES + size


def _check_overlaps(spans, starts, ends, grains, found: _Findings) -> None:
    """Sort metadata and grains by start; anything starting before the furthest end so far overlaps."""
    meta_start = np.array([s for s, _, _ in spans], dtype=np.int64)
    meta_end = meta_start + np.array([-(-n // SECTOR) * SECTOR for _, n, _ in spans], dtype=np.int64)
    all_start = np.concatenate([meta_start, starts])
    all_end = np.concatenate([meta_end, ends])
    labels = len(spans)
    order = np.argsort(all_start, kind="stable")
    s, e = all_start[order], all_end[order]
    if len(s) < 2:
        return
    reach = np.maximum.accumulate(e)[:-1]
    for k in np.flatnonzero(s[1:] < reach).tolist():
        idx = int(order[k + 1])
        what = spans[idx][2] if idx < labels else f"grain {int(grains[idx - labels])}"
        found.add(f"{what} at offset {int(s[k + 1])} overlaps an earlier structure")
