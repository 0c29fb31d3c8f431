"""Hot kernels: numba versions (nogil, cached, compiled on first use) beside plain-numpy twins.

Nothing here imports numba at import time; ``kernels()`` loads it on the first call.
"""
from __future__ import annotations

import numpy as np

from .twins import nonzero_blocks_numpy, pack_bits_numpy

_compiled = None


def kernels():
    """The numba module, imported and compiled on first use (so `imgkit --help` stays fast)."""
    global _compiled
    if _compiled is None:
        from . import jit
        _compiled = jit
    return _compiled


def nonzero_blocks(buf, block_size: int) -> np.ndarray:
    """Bool array: block i of buf (the last one may be short) holds a non-zero byte."""
    data = np.frombuffer(buf, dtype=np.uint8) if not isinstance(buf, np.ndarray) else buf
    data = np.ascontiguousarray(data.reshape(-1).view(np.uint8))
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    nblocks = -(-len(data) // block_size)
    out = np.zeros(nblocks, dtype=np.bool_)
    if nblocks:
        kernels().nonzero_blocks_into(data, block_size, out)
    return out


def pack_bits(mask: np.ndarray) -> np.ndarray:
    """Bitmap bytes, bit i = mask[i], least-significant bit first in each byte."""
    mask = np.ascontiguousarray(mask, dtype=np.bool_)
    out = np.zeros((len(mask) + 7) // 8, dtype=np.uint8)
    kernels().pack_bits_into(mask, out)
    return out


__all__ = ["nonzero_blocks", "pack_bits", "nonzero_blocks_numpy", "pack_bits_numpy", "kernels"]
