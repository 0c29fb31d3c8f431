"""VMDK: hosted sparse extents (monolithicSparse, streamOptimized), read, written, checked, measured.

Descriptor-only files, multi-file disks (monolithicFlat, twoGbMaxExtent*, vmfs*) and ESX COWD
extents are recognised and refused: their data lives in files the image names, and imgkit
never opens a path read from an image.
"""
from __future__ import annotations

from ...io import AtomicOutput, ImageFile
from .checker import check
from .reader import VmdkReader
from .sparse import open_extent
from .writer import create, measure

OPTIONS = {
    "subformat": "monolithicSparse (default) or streamOptimized",
    "adapter_type": "ide (default), lsilogic, buslogic or legacyESX",
    "hwversion": "virtual hardware version written to the descriptor (default 4)",
    "toolsversion": "VMware tools version written to the descriptor (default 2147483647)",
    "compress": "on with subformat=streamOptimized (its grains are always compressed); set by -c",
}


def open_reader(image: ImageFile, options: dict) -> VmdkReader:
    return VmdkReader(open_extent(image))


def create_writer(out: AtomicOutput, virtual_size: int, options: dict):
    return create(out, virtual_size, options)


__all__ = ["OPTIONS", "open_reader", "create_writer", "check", "measure"]
