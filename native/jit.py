"""numba kernels. Imported only through imgkit.native.kernels(), never at package import.

Signatures are given up front so the cached machine code loads without type inference.
"""
from __future__ import annotations

import numpy as np
from numba import njit

STRIDE = 32   # words OR-ed together before each early-exit test: lets LLVM vectorise zero runs


@njit("void(uint8[::1], int64, boolean[::1])", nogil=True, cache=True)
def nonzero_blocks_into(data, block_size, out):
    """out[i] = block i has a non-zero byte; a block is left at its first non-zero stride."""
    n = data.shape[0]
    if block_size % 8 == 0 and data.ctypes.data % 8 == 0:
        words = data[: (n // 8) * 8].view(np.uint64)
        wpb = block_size // 8
        nwords = words.shape[0]
        for b in range(out.shape[0]):
            w = b * wpb
            stop = min(w + wpb, nwords)
            found = False
            while w + STRIDE <= stop:
                acc = np.uint64(0)
                for k in range(STRIDE):
                    acc |= words[w + k]
                if acc != 0:
                    found = True
                    break
                w += STRIDE
            if not found:
                while w < stop:
                    if words[w] != 0:
                        found = True
                        break
                    w += 1
            if not found:
                for i in range(max(nwords * 8, b * block_size), min(n, (b + 1) * block_size)):
                    if data[i] != 0:
                        found = True
                        break
            out[b] = found
    else:
        for b in range(out.shape[0]):
            found = False
            for i in range(b * block_size, min(n, (b + 1) * block_size)):
                if data[i] != 0:
                    found = True
                    break
            out[b] = found


@njit("void(boolean[::1], uint8[::1])", nogil=True, cache=True)
def pack_bits_into(mask, out):
    """LSB-first bitmap: bit i of the result is mask[i]."""
    for i in range(mask.shape[0]):
        if mask[i]:
            out[i >> 3] |= np.uint8(1 << (i & 7))
