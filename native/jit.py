"""numba kernels. Imported only through imgkit.native.kernels(), never at package import."""
from __future__ import annotations

import numpy as np
from numba import njit


@njit(nogil=True, cache=True)
def nonzero_blocks_into(data, block_size, out):
    """out[i] = block i has a non-zero byte; each block is left at its first non-zero 64-bit word."""
    n = data.shape[0]
    nblocks = out.shape[0]
    aligned = (block_size % 8 == 0) and (data.ctypes.data % 8 == 0)
    if aligned:
        full_words = n // 8
        words = data[: full_words * 8].view(np.uint64)
        wpb = block_size // 8
        for b in range(nblocks):
            start = b * wpb
            stop = min(start + wpb, full_words)
            found = False
            for w in range(start, stop):
                if words[w] != 0:
                    found = True
                    break
            if not found and (b + 1) * block_size > full_words * 8:
                for i in range(max(full_words * 8, b * block_size), min(n, (b + 1) * block_size)):
                    if data[i] != 0:
                        found = True
                        break
            out[b] = found
    else:
        for b in range(nblocks):
            found = False
            for i in range(b * block_size, min(n, (b + 1) * block_size)):
                if data[i] != 0:
                    found = True
                    break
            out[b] = found


@njit(nogil=True, cache=True)
def pack_bits_into(mask, out):
    """LSB-first bitmap: bit i of the result is mask[i]."""
    for i in range(mask.shape[0]):
        if mask[i]:
            out[i >> 3] |= np.uint8(1 << (i & 7))
