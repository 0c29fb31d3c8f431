"""Hot kernels: numba versions (nogil, cached) beside plain-numpy twins that give the same answers.

Nothing here imports numba at import time. Loading numba and its cached kernels costs about a
second, more than the whole scan of a small image, so the numpy twins serve until a job big
enough to repay it calls preload(), which loads numba in a background thread; from then on the
numba kernels take over (they stop at the first non-zero word of each block).
"""
from __future__ import annotations

import threading

import numpy as np

from .twins import nonzero_blocks_numpy, pack_bits_numpy

_jit = None
_loader: threading.Thread | None = None
_lock = threading.Lock()


def _load() -> None:
    global _jit
    from . import jit
    _jit = jit


def preload() -> None:
    """Start loading the numba kernels in the background; returns at once."""
    global _loader
    with _lock:
        if _jit is None and _loader is None:
            _loader = threading.Thread(target=_load, name="imgkit-numba-load")
            _loader.start()


def kernels():
    """The numba kernels module, loading it now if needed (blocks until it is ready)."""
    with _lock:
        loader = _loader
    if loader is not None:
        loader.join()
    if _jit is None:
        _load()
    return _jit


def _as_bytes(buf) -> np.ndarray:
    """A writable contiguous uint8 view (the compiled signatures take writable arrays only;
    a read-only buffer such as bytes is copied)."""
    data = np.frombuffer(buf, dtype=np.uint8) if not isinstance(buf, np.ndarray) else buf
    data = np.ascontiguousarray(data.reshape(-1).view(np.uint8))
    return data if data.flags.writeable else data.copy()


def nonzero_blocks(buf, block_size: int) -> np.ndarray:
    """Bool array: block i of buf (the last one may be short) holds a non-zero byte.
    Uses the numba kernel once it is loaded, the numpy twin before."""
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    if _jit is None:
        return nonzero_blocks_numpy(buf, block_size)
    return nonzero_blocks_jit(buf, block_size)


def nonzero_blocks_jit(buf, block_size: int) -> np.ndarray:
    """The numba kernel, loaded on demand."""
    data = _as_bytes(buf)
    out = np.zeros(-(-len(data) // block_size), dtype=np.bool_)
    if len(out):
        kernels().nonzero_blocks_into(data, block_size, out)
    return out


def pack_bits(mask: np.ndarray) -> np.ndarray:
    """Bitmap bytes, bit i = mask[i], least-significant bit first in each byte."""
    if _jit is None:
        return pack_bits_numpy(mask)
    return pack_bits_jit(mask)


def pack_bits_jit(mask: np.ndarray) -> np.ndarray:
    mask = np.ascontiguousarray(mask, dtype=np.bool_)
    out = np.zeros((len(mask) + 7) // 8, dtype=np.uint8)
    kernels().pack_bits_into(mask, out)
    return out


__all__ = ["nonzero_blocks", "nonzero_blocks_jit", "nonzero_blocks_numpy", "pack_bits", "pack_bits_jit",
           "pack_bits_numpy", "preload", "kernels"]
