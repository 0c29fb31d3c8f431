"""Plain-numpy twins of the numba kernels: the reference the property tests compare against,
and the kernels in use until numba has loaded."""
from __future__ import annotations

import numpy as np


def nonzero_blocks_numpy(buf, block_size: int) -> np.ndarray:
    """Block i holds a non-zero byte. Whole blocks are reduced as 64-bit words where they can be
    (max over uint64 vectorises well), the short last block byte by byte."""
    data = np.frombuffer(buf, dtype=np.uint8) if not isinstance(buf, np.ndarray) else buf
    data = data.reshape(-1).view(np.uint8)
    nblocks = -(-len(data) // block_size)
    whole = len(data) // block_size
    out = np.zeros(nblocks, dtype=np.bool_)
    if whole:
        body = data[:whole * block_size]
        if block_size % 8 == 0 and body.ctypes.data % 8 == 0 and body.flags.c_contiguous:
            out[:whole] = body.view(np.uint64).reshape(whole, -1).max(axis=1) != 0
        else:
            out[:whole] = body.reshape(whole, block_size).max(axis=1) != 0
    if nblocks > whole:
        out[whole] = bool(data[whole * block_size:].any())
    return out


def pack_bits_numpy(mask: np.ndarray) -> np.ndarray:
    return np.packbits(np.asarray(mask, dtype=np.bool_), bitorder="little")
