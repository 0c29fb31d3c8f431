"""The .mf bitmap: layout, the property against a plain Python loop, holes never read, the CLI."""
from __future__ import annotations

import hashlib
import os
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import run_cli, write_sparse
from imgkit import api, engine
from imgkit.extents import Extent, Kind
from imgkit.formats import raw
from imgkit.formats.base import Reader
from imgkit.io import AtomicOutput
from imgkit.ims import bitmap as mf
from imgkit.ims.prepare import DigestWriter

MiB = 1 << 20
GRANULARITIES = [512, 1024, 4096, 65536, MiB, 2 * MiB, 4 * MiB, 8 * MiB]


def python_bitmap(data: bytes, granularity: int) -> bytes:
    """The reference: a plain loop over the bytes, bit i = block i has a non-zero byte, LSB first."""
    nblocks = -(-len(data) // granularity)
    out = bytearray(-(-nblocks // 8))
    for i in range(nblocks):
        block = data[i * granularity:(i + 1) * granularity]
        if block.count(0) != len(block):
            out[i // 8] |= 1 << (i % 8)
    return bytes(out)


def image_bytes(size: int, runs) -> bytes:
    data = bytearray(size)
    for offset, chunk in runs:
        data[offset:offset + len(chunk)] = chunk
    return bytes(data)


layouts = st.integers(1, 3 * MiB + 777).flatmap(lambda size: st.tuples(
    st.just(size),
    st.lists(st.tuples(st.integers(0, size - 1), st.integers(1, 300_000), st.sampled_from([0, 0, 1, 0x80, 0xFF])),
             max_size=8),
    st.sampled_from(GRANULARITIES)))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layouts)
def test_bitmap_equals_a_plain_python_loop(tmp_path_factory, layout):
    size, raw_runs, granularity = layout
    runs = [(off, bytes([value]) * min(length, size - off)) for off, length, value in raw_runs]
    folder = tmp_path_factory.mktemp("bm")
    path = folder / "disk.raw"
    write_sparse(path, size, runs)
    expected = python_bitmap(image_bytes(size, runs), granularity)
    with api.open_image(path) as reader:
        assert engine.identity_mapped(reader)                       # RAW: scanned in place (mmap)
        assert mf.pack(mf.compute_mask(reader, granularity)) == expected
        assert mf.pack(engine.block_mask(reader, granularity, in_place=False)) == expected  # buffered
        streamed, digest = streamed_bitmap(reader, folder / "copy.raw", granularity)
    assert mf.pack(streamed) == expected
    assert digest == hashlib.sha256(image_bytes(size, runs)).hexdigest()


def streamed_bitmap(reader, dst, granularity: int) -> tuple[np.ndarray, str]:
    """The bitmap and digest prepare builds while converting (DigestWriter around the raw writer)."""
    stream = mf.StreamingBitmap(reader.virtual_size, granularity)
    with AtomicOutput(dst) as out:
        writer = DigestWriter(raw.create_writer(out, reader.virtual_size, {}), reader.virtual_size, stream)
        engine.copy(reader, writer)
        writer.finish()
    return stream.mask, writer.hexdigest()


@pytest.mark.parametrize("granularity", [512, MiB, 2 * MiB, 64 * MiB])
def test_data_across_mapped_windows(tmp_path, granularity):
    """RAW is scanned 64 MiB at a time: runs that straddle those windows, and blocks bigger than them."""
    size = 200 * MiB + 123
    window = engine.MAPPED_WINDOW
    runs = [(window - 3, b"\x01" * 7), (2 * window - 1, b"\x02"), (2 * window + 4096, bytes(8192)),
            (3 * window - 512, b"\x03" * 1024), (size - 1, b"\x04")]
    path = tmp_path / "wide.raw"
    write_sparse(path, size, runs)
    expected = np.zeros(mf.block_count(size, granularity), dtype=np.bool_)
    for offset, chunk in runs:
        if any(chunk):
            expected[offset // granularity:(offset + len(chunk) - 1) // granularity + 1] = True
    with api.open_image(path) as reader:
        assert mf.compute_mask(reader, granularity).tolist() == expected.tolist()
        assert engine.block_mask(reader, granularity).tolist() == expected.tolist()


def test_layout_is_lsb_first_without_header(tmp_path):
    path = tmp_path / "image01.raw"
    g = 2 * MiB
    write_sparse(path, 20 * MiB + 1, [(0, b"\x01"), (9 * g + 5, b"\x02"), (20 * MiB, b"\x03")])
    result = run_cli("bitmap", path)
    assert result.returncode == 0, result.stderr
    # blocks 0, 9 and 10 (the one-byte last block) -> bits 0, 9, 10
    assert (tmp_path / "image01.mf").read_bytes() == bytes([0b00000001, 0b00000110])


def test_zero_data_written_into_the_file_is_not_data(tmp_path):
    path = tmp_path / "zeros.raw"
    write_sparse(path, 8 * MiB, [(0, bytes(8 * MiB))])   # allocated but all zero
    with api.open_image(path) as reader:
        assert not mf.compute_mask(reader).any()


class CountingReader(Reader):
    """A disk whose extents say where data is; it records every read."""

    format = "fake"

    def __init__(self, size: int, data_ranges):
        self.virtual_size = size
        self.data_ranges = data_ranges
        self.reads = []
        self.lock = threading.Lock()

    def extents(self, start=0, end=None):
        pos = 0
        for off, length in self.data_ranges:
            if off > pos:
                yield Extent(pos, off - pos, Kind.UNALLOCATED)
            yield Extent(off, length, Kind.DATA)
            pos = off + length
        if pos < self.virtual_size:
            yield Extent(pos, self.virtual_size - pos, Kind.UNALLOCATED)

    def readinto(self, offset, buf):
        view = memoryview(buf).cast("B")
        with self.lock:
            self.reads.append((offset, len(view)))
        view[:] = b"\x07" * len(view)


def test_holes_are_never_read():
    reader = CountingReader(64 * MiB, [(5 * MiB, 4096), (40 * MiB + 1, 3 * MiB)])
    mask = mf.compute_mask(reader, 2 * MiB)
    assert np.flatnonzero(mask).tolist() == [2, 20, 21]
    for offset, length in reader.reads:
        assert any(o <= offset and offset + length <= o + n for o, n in reader.data_ranges), (offset, length)
    assert sum(n for _, n in reader.reads) == 4096 + 3 * MiB


def test_cli_writes_beside_the_image_and_verifies(tmp_path):
    path = tmp_path / "disk.img"
    write_sparse(path, 16 * MiB, [(3 * MiB, b"data")])
    assert run_cli("bitmap", path).returncode == 0
    assert (tmp_path / "disk.mf").read_bytes() == b"\x02"
    again = run_cli("bitmap", path)
    assert again.returncode == 73 and "--force" in again.stderr
    assert run_cli("bitmap", "--force", path).returncode == 0
    ok = run_cli("bitmap", "--verify", path)
    assert ok.returncode == 0 and "matches" in ok.stdout


def test_cli_verify_reports_the_first_mismatching_block(tmp_path):
    path = tmp_path / "disk.raw"
    write_sparse(path, 16 * MiB, [(3 * MiB, b"data"), (15 * MiB, b"more")])
    other = tmp_path / "other.mf"
    other.write_bytes(b"\x02")                       # block 7 (15 MiB) missing
    result = run_cli("bitmap", "--verify", "--output", "json", path, other)
    assert result.returncode == 1
    import json
    verdict = json.loads(result.stdout)
    assert verdict["matches"] is False and verdict["block"] == 7 and verdict["expected"] is True
    assert "block 7" in verdict["message"]


def test_cli_verify_refuses_a_bitmap_of_the_wrong_size(tmp_path):
    path = tmp_path / "disk.raw"
    write_sparse(path, 32 * MiB, [])
    (tmp_path / "disk.mf").write_bytes(b"\x00")
    result = run_cli("bitmap", "--verify", path)
    assert result.returncode == 1 and "needs 2" in result.stdout


def test_cli_output_name_and_granularity(tmp_path):
    path = tmp_path / "disk.raw"
    write_sparse(path, 4 * MiB, [(MiB, b"x")])
    out = tmp_path / "custom.bits"
    result = run_cli("bitmap", "--granularity", "1M", "-o", out, "--output", "json", path)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == b"\x02"
    assert not (tmp_path / "disk.mf").exists()


def test_cli_refuses_bad_granularity_and_stray_bitmap_argument(tmp_path):
    path = tmp_path / "disk.raw"
    write_sparse(path, MiB, [])
    assert run_cli("bitmap", "--granularity", "3000", path).returncode == 64
    assert run_cli("bitmap", "--granularity", "256", path).returncode == 64
    assert run_cli("bitmap", path, tmp_path / "x.mf").returncode == 64
    assert not os.path.exists(tmp_path / "disk.mf")


def test_padding_bits_must_be_zero(tmp_path):
    path = tmp_path / "disk.raw"
    write_sparse(path, 5 * 2 * MiB, [(0, b"x")])            # 5 blocks: bits 5-7 of the byte are padding
    (tmp_path / "good.mf").write_bytes(b"\x01")
    (tmp_path / "bad.mf").write_bytes(b"\x81")
    with api.open_image(path) as reader:
        assert mf.verify_bitmap(reader, str(tmp_path / "good.mf")).matches
        verdict = mf.verify_bitmap(reader, str(tmp_path / "bad.mf"))
    assert not verdict.matches and verdict.block == 7 and "padding" in verdict.message


@pytest.mark.parametrize("fmt,qemu_fmt", [("qcow2", "qcow2"), ("vhd", "vpc"), ("vmdk", "vmdk")])
def test_bitmap_of_other_formats_matches_their_raw(tmp_path, qemu_img, fmt, qemu_fmt):
    from conftest import qemu
    size = 24 * MiB
    runs = [(0, b"\x01"), (5 * MiB + 7, b"\x02" * 3000), (12 * MiB, bytes(MiB)), (size - 4096, b"\x03" * 4096)]
    raw_path = tmp_path / "disk.raw"
    write_sparse(raw_path, size, runs)
    image = tmp_path / f"disk.{fmt}"
    qemu("convert", "-f", "raw", "-O", qemu_fmt, str(raw_path), str(image))
    with api.open_image(image) as reader:
        assert not engine.identity_mapped(reader)
        got = mf.pack(mf.compute_mask(reader, MiB))
        virtual_size = reader.virtual_size          # VHD rounds the size up to its geometry
    assert got == python_bitmap(image_bytes(virtual_size, runs), MiB)


def test_falls_back_to_the_engine_when_mmap_fails(tmp_path, monkeypatch):
    path = tmp_path / "disk.raw"
    write_sparse(path, 6 * MiB, [(5 * MiB, b"z")])

    real_mmap = engine.mmap.mmap

    def no_file_mmap(fd, *args, **kwargs):       # anonymous maps (the engine's buffers) still work
        if fd != -1:
            raise OSError(19, "No such device")
        return real_mmap(fd, *args, **kwargs)

    monkeypatch.setattr(engine.mmap, "mmap", no_file_mmap)
    with api.open_image(path) as reader:
        assert mf.pack(mf.compute_mask(reader)) == b"\x04"
