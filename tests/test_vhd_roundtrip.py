"""raw -> vhd -> raw over random sparse layouts, sizes and block sizes, every output judged by qemu-img."""
import hashlib
import os

from hypothesis import HealthCheck, given, settings, strategies as st

import imgkit
from imgkit import api

from conftest import qemu, qemu_info, write_sparse

MiB = 1 << 20
SETTINGS = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def layouts(draw, max_size=12 * MiB):
    """A size (whole MiB, whole sectors, or any byte count) and runs of non-zero bytes."""
    unit = draw(st.sampled_from([MiB, 512, 1]))
    size = draw(st.integers(1, max_size // unit)) * unit
    runs = []
    for _ in range(draw(st.integers(0, 6))):
        offset = draw(st.integers(0, size - 1))
        length = draw(st.integers(1, min(size - offset, 3 * MiB)))
        fill = draw(st.integers(1, 255))
        runs.append((offset, bytes([fill]) * length if draw(st.booleans()) else _nonzero(length)))
    return size, runs


def _nonzero(length: int) -> bytes:
    return bytes(b | 1 for b in os.urandom(length))


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fresh(*paths):
    for path in paths:
        if path.exists():
            path.unlink()


def round_trip(tmp_path, size, runs, options):
    src, vhd, back = tmp_path / "src.raw", tmp_path / "out.vhd", tmp_path / "back.raw"
    fresh(src, vhd, back)
    write_sparse(src, size, runs)
    imgkit.convert(src, vhd, "vhd", options=options)
    disk_size = -(-size // 512) * 512
    assert qemu_info(vhd, "vpc")["virtual-size"] == disk_size
    assert qemu("compare", "-f", "raw", "-F", "vpc", str(src), str(vhd)).returncode == 0
    imgkit.convert(vhd, back, "raw")
    assert os.path.getsize(back) == disk_size
    original = src.read_bytes() + bytes(disk_size - size)
    assert digest(back.read_bytes()) == digest(original)
    assert api.check(vhd).exit_code == 0
    return src, vhd


@SETTINGS
@given(layout=layouts(), block_size=st.sampled_from(["4K", "64K", "512K", "2M", "4M"]))
def test_dynamic_round_trip(qemu_img, tmp_path, layout, block_size):
    size, runs = layout
    options = f"subformat=dynamic,block_size={block_size}"
    src, vhd = round_trip(tmp_path, size, runs, options)
    measured = api.measure("vhd", options, src=src)
    assert measured["required"] == os.path.getsize(vhd)
    assert measured["fully-allocated"] >= measured["required"]


@SETTINGS
@given(layout=layouts())
def test_fixed_round_trip(qemu_img, tmp_path, layout):
    size, runs = layout
    src, vhd = round_trip(tmp_path, size, runs, "subformat=fixed")
    measured = api.measure("vhd", "subformat=fixed", src=src)
    assert measured["required"] == measured["fully-allocated"] == os.path.getsize(vhd)
