"""Numeric bounds every parser obeys before it allocates, seeks or trusts a value from a file."""
from __future__ import annotations

from .errors import InvalidImage, LimitExceeded

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40

MAX_VIRTUAL_SIZE = 64 * TiB          # far above any cloud disk; keeps arithmetic sane
WINDOW_BUDGET = 64 * MiB             # window buffers the engine keeps in flight at once
MAX_SCAN_BLOCK = 64 * MiB            # largest -S, map --granularity or bitmap granularity
DEFAULT_SPARSE = 4 * KiB             # -S: zero runs of this size become holes
QCOW2_MAX_L1_BYTES = 32 * MiB        # qemu's QCOW_MAX_L1_SIZE
QCOW2_MAX_REFTABLE_BYTES = 8 * MiB   # qemu's QCOW_MAX_REFTABLE_SIZE
QCOW2_MIN_CLUSTER_BITS = 9
QCOW2_MAX_CLUSTER_BITS = 21
QCOW2_MAX_SNAPSHOTS = 65536
QCOW2_MAX_BACKING_NAME = 1023
QCOW2_L2_CACHE_BYTES = 32 * MiB      # L2 tables kept in memory at once
VHD_MAX_SECTORS = 0xFF000000         # qemu's VHD_MAX_SECTORS: 2040 GiB
VHD_MAX_BLOCK_SIZE = 256 * MiB
VHD_MAX_BAT_BYTES = 64 * MiB         # block table kept in memory (2040 GiB at 128 KiB blocks)
VMDK_MAX_GRAIN_SECTORS = 2 * 1024 * 2  # 2 MiB grains
VMDK_MAX_GTES = 512
VMDK_MAX_DESCRIPTOR = 1 * MiB
VMDK_MAX_SECTORS = 1 << 32           # sector offsets are u32
VMDK_MAX_GD_BYTES = 4 * MiB          # 1M grain tables: 2 TiB even with 4 KiB grains
VMDK_GT_CACHE_BYTES = 16 * MiB       # VMDK grain tables kept in memory at once
MAX_COMPRESSED_CHUNK = 4 * MiB       # any single compressed cluster/grain on disk


def check_range(what: str, offset: int, length: int, file_size: int) -> None:
    """Refuse a structure that does not lie wholly inside the file."""
    if offset < 0 or length < 0 or offset + length > file_size:
        raise InvalidImage(
            f"{what} at offset {offset} (+{length} bytes) lies outside the file ({file_size} bytes)")


def check_max(what: str, value: int, maximum: int) -> None:
    if value < 0 or value > maximum:
        raise LimitExceeded(f"{what} is {value}, above the limit of {maximum}")


def check_virtual_size(size: int) -> None:
    check_max("virtual size", size, MAX_VIRTUAL_SIZE)
