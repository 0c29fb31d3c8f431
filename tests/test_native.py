"""The numba kernels agree with their plain-numpy twins on arbitrary buffers, blocks and tails."""
import numpy as np
from hypothesis import given, settings, strategies as st

from imgkit import native


@st.composite
def sparse_buffers(draw):
    size = draw(st.integers(0, 70_000))
    buf = np.zeros(size, dtype=np.uint8)
    for _ in range(draw(st.integers(0, 6))):
        if size == 0:
            break
        pos = draw(st.integers(0, size - 1))
        buf[pos] = draw(st.integers(1, 255))
    offset = draw(st.integers(0, 7))          # unaligned views exercise the byte path
    padded = np.zeros(size + offset, dtype=np.uint8)
    padded[offset:] = buf
    return padded[offset:]


@settings(max_examples=200, deadline=None)
@given(sparse_buffers(), st.sampled_from([1, 7, 8, 512, 4096, 4097, 65536, 1 << 21]))
def test_nonzero_blocks_matches_numpy(buf, block):
    got = native.nonzero_blocks_jit(buf, block)
    want = native.nonzero_blocks_numpy(buf, block)
    assert got.dtype == np.bool_
    np.testing.assert_array_equal(got, want)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.booleans(), max_size=300))
def test_pack_bits_matches_numpy(bits):
    mask = np.array(bits, dtype=np.bool_)
    np.testing.assert_array_equal(native.pack_bits_jit(mask), native.pack_bits_numpy(mask))


def test_pack_bits_is_lsb_first():
    mask = np.zeros(10, dtype=np.bool_)
    mask[[0, 3, 9]] = True
    for pack in (native.pack_bits_jit, native.pack_bits_numpy):
        assert pack(mask).tobytes() == bytes([0b00001001, 0b00000010])


def test_last_partial_block_counts():
    buf = np.zeros(4096 * 2 + 10, dtype=np.uint8)
    buf[-1] = 1
    for scan in (native.nonzero_blocks_jit, native.nonzero_blocks_numpy):
        assert scan(buf, 4096).tolist() == [False, False, True]


def test_preload_switches_to_the_numba_kernels():
    native.preload()
    assert native.kernels() is not None
    buf = np.zeros(10_000, dtype=np.uint8)
    buf[5000] = 1
    assert native.nonzero_blocks(buf, 4096).tolist() == [False, True, False]


def test_import_does_not_load_numba():
    import subprocess
    import sys
    code = "import sys, imgkit.cli, imgkit.native, imgkit.api; print('numba' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
