"""Plain-numpy twins of the numba kernels: the reference the property tests compare against."""
from __future__ import annotations

import numpy as np


def nonzero_blocks_numpy(buf, block_size: int) -> np.ndarray:
    data = np.frombuffer(buf, dtype=np.uint8) if not isinstance(buf, np.ndarray) else buf
    nblocks = -(-len(data) // block_size)
    padded = np.zeros(nblocks * block_size, dtype=np.uint8)
    padded[:len(data)] = data
    return padded.reshape(nblocks, block_size).any(axis=1) if nblocks else np.zeros(0, np.bool_)


def pack_bits_numpy(mask: np.ndarray) -> np.ndarray:
    return np.packbits(np.asarray(mask, dtype=np.bool_), bitorder="little")
