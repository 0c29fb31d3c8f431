"""VHD files that lie: bad checksums, tables pointing outside the file, overlaps, truncation, and
boundary integers in every header field. Each must end as a clean ImgkitError or a check finding."""
import itertools
import os
import signal
import struct
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import imgkit
from imgkit import api
from imgkit.errors import ImgkitError, InvalidImage, LimitExceeded
from imgkit.extents import Kind
from imgkit.formats import vhd

from conftest import run_cli, write_sparse

KiB, MiB = 1 << 10, 1 << 20
BLOCK = 64 * KiB
BOUNDARY = [0, 1, 2**31 - 1, 2**32 - 1, 2**63 - 1, 2**64 - 1]


@pytest.fixture
def dynamic(tmp_path):
    """1 MiB dynamic disk, 64 KiB blocks, data in blocks 0, 1 and 15 (BAT: 16 entries at 1536)."""
    src, dst = tmp_path / "src.raw", tmp_path / "dyn.vhd"
    write_sparse(src, MiB, [(0, b"\x11" * BLOCK), (BLOCK, b"\x22" * 4096), (MiB - 4096, b"\x33" * 4096)])
    imgkit.convert(src, dst, "vhd", options=f"block_size={BLOCK}")
    return str(dst)


@pytest.fixture
def fixed(tmp_path):
    src, dst = tmp_path / "src.raw", tmp_path / "fixed.vhd"
    write_sparse(src, MiB, [(4096, b"\x44" * 4096)])
    imgkit.convert(src, dst, "vhd", options="subformat=fixed")
    return str(dst)


def poke(path, offset, data) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def peek(path, offset, length) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def refresh_checksums(path) -> None:
    """Recompute the checksums of every footer and of the dynamic header after an edit."""
    size = os.path.getsize(path)
    for at in (0, size - 512):
        raw = peek(path, at, 512)
        if raw[:8] == b"conectix":
            poke(path, at, vhd.with_checksum(raw, vhd.FOOTER_CHECKSUM_AT))
    if size >= 1536 and peek(path, 512, 8) == b"cxsparse":
        poke(path, 512, vhd.with_checksum(peek(path, 512, 1024), vhd.HEADER_CHECKSUM_AT))


def bat_entry(path, index) -> int:
    return struct.unpack(">I", peek(path, 1536 + 4 * index, 4))[0]


def set_bat(path, index, value) -> None:
    poke(path, 1536 + 4 * index, struct.pack(">I", value))


def findings(path) -> str:
    report = api.check(path)
    assert report.exit_code == 2, report.corruptions
    return "\n".join(report.corruptions)


# -- named corruptions ----------------------------------------------------------------------------

def test_clean_images_check_clean(dynamic, fixed):
    for path in (dynamic, fixed):
        report = api.check(path)
        assert report.exit_code == 0, report.corruptions
    report = api.check(dynamic)
    assert (report.total_clusters, report.allocated_clusters) == (16, 3)
    assert report.image_end_offset == os.path.getsize(dynamic)


@pytest.mark.parametrize("which", ["dynamic", "fixed"])
def test_footer_checksum_mismatch(request, which):
    path = request.getfixturevalue(which)
    at = 0 if which == "dynamic" else os.path.getsize(path) - 512
    poke(path, at + 48, struct.pack(">Q", 2 * MiB))
    with pytest.raises(InvalidImage, match="footer checksum mismatch"):
        api.open_image(path)
    assert "footer checksum mismatch" in findings(path)


def test_header_checksum_mismatch(dynamic):
    poke(dynamic, 512 + 28, struct.pack(">I", 17))
    with pytest.raises(InvalidImage, match="dynamic disk header checksum mismatch"):
        api.open_image(dynamic)
    assert "header checksum mismatch" in findings(dynamic)


def test_footer_copy_differs_from_footer(dynamic):
    end = os.path.getsize(dynamic) - 512
    poke(dynamic, end + 32, struct.pack(">I", 0x00090009))
    refresh_checksums(dynamic)
    with api.open_image(dynamic) as reader:        # the copy at 0 is what readers use
        assert reader.virtual_size == MiB
    assert "differs from the footer" in findings(dynamic)


def test_damaged_footer_copy_falls_back_to_the_footer(dynamic):
    poke(dynamic, 0, b"xxxxxxxx")
    with api.open_image(dynamic, "vhd") as reader:       # qemu falls back the same way
        assert reader.virtual_size == MiB
    assert "footer copy at offset 0 is missing or damaged" in findings(dynamic)


def test_bat_entry_past_the_end(dynamic):
    set_bat(dynamic, 3, os.path.getsize(dynamic) // 512 + 10)
    with pytest.raises(InvalidImage, match="block table entry 3 .* beyond the end of the file"):
        api.open_image(dynamic)
    assert "entry 3" in findings(dynamic)


def test_overlapping_blocks(dynamic):
    set_bat(dynamic, 5, bat_entry(dynamic, 0) + 1)
    with api.open_image(dynamic) as reader:
        list(reader.extents())
    assert "overlap at offset" in findings(dynamic)


def test_block_over_the_metadata(dynamic):
    set_bat(dynamic, 4, 2)
    text = findings(dynamic)
    assert "overlaps the block allocation table" in text and "overlaps the dynamic disk header" in text


def test_truncated_dynamic(dynamic):
    os.truncate(dynamic, os.path.getsize(dynamic) - 512 - 1000)
    with pytest.raises(InvalidImage, match="beyond the end of the file"):
        api.open_image(dynamic)
    text = findings(dynamic)
    assert "no VHD footer in the last 512 bytes" in text and "runs past the data area" in text
    out = run_cli("convert", "-O", "raw", dynamic, dynamic + ".raw")
    assert out.returncode == 65 and "Traceback" not in out.stderr


def test_fixed_shorter_than_its_size(fixed):
    at = os.path.getsize(fixed) - 512
    poke(fixed, at + 48, struct.pack(">Q", 2 * MiB))
    refresh_checksums(fixed)
    with pytest.raises(InvalidImage, match="truncated"):
        api.open_image(fixed)
    assert "truncated" in findings(fixed)


def test_fixed_without_footer_is_not_vhd(fixed):
    os.truncate(fixed, os.path.getsize(fixed) - 100)
    with pytest.raises(ImgkitError):
        api.open_image(fixed, "vhd")
    out = run_cli("check", "-f", "vhd", fixed)
    assert out.returncode == 1 and "Traceback" not in out.stderr


def test_size_above_2040_gib_names_the_limit(dynamic):
    poke(dynamic, 48, struct.pack(">Q", 2041 << 30))
    refresh_checksums(dynamic)
    with pytest.raises(LimitExceeded, match="2040 GiB"):
        api.open_image(dynamic)
    assert api.check(dynamic).exit_code == 1


@pytest.mark.parametrize("value,message", [(0, "not a power of two"), (3000, "not a power of two"),
                                           (256, "not a power of two"), (1 << 30, "limit")])
def test_bad_block_size(dynamic, value, message):
    poke(dynamic, 512 + 32, struct.pack(">I", value))
    refresh_checksums(dynamic)
    with pytest.raises(InvalidImage, match=message):
        api.open_image(dynamic)


def test_table_too_small_for_the_size(dynamic):
    poke(dynamic, 512 + 28, struct.pack(">I", 15))
    refresh_checksums(dynamic)
    with pytest.raises(InvalidImage, match="fewer than the 16 blocks"):
        api.open_image(dynamic)


def test_unknown_disk_type(dynamic):
    poke(dynamic, 60, struct.pack(">I", 5))
    refresh_checksums(dynamic)
    with pytest.raises(InvalidImage, match="disk type 5"):
        api.open_image(dynamic)


# -- sector bitmaps -------------------------------------------------------------------------------

def test_clear_bitmap_bits_read_as_zero(dynamic):
    block0 = bat_entry(dynamic, 0) * 512
    poke(dynamic, block0, bytes([0b11000011]) + b"\xff" * 15)   # sectors 2..5 of block 0 absent
    with api.open_image(dynamic) as reader:
        head = [e for e in reader.extents(0, BLOCK)]
        assert [(e.offset, e.length, e.kind) for e in head] == [
            (0, 1024, Kind.DATA), (1024, 2048, Kind.ZERO), (3072, BLOCK - 3072, Kind.DATA)]
        assert head[2].host_offset == block0 + 512 + 3072
        buf = bytearray(8192)
        reader.readinto(0, buf)
    assert buf[:1024] == b"\x11" * 1024 and buf[1024:3072] == bytes(2048)
    assert buf[3072:] == b"\x11" * (8192 - 3072)


def test_concurrent_reads_through_a_tiny_bitmap_cache(dynamic):
    poke(dynamic, bat_entry(dynamic, 1) * 512, b"\xf0" + b"\xff" * 15)
    with api.open_image(dynamic) as reader:
        expected = bytearray(MiB)
        reader.readinto(0, expected)
        reader._bitmaps = vhd.BitmapCache(limit=1)
        rng = np.random.default_rng(1)
        jobs = [(int(o), int(n)) for o, n in zip(rng.integers(0, MiB - 9000, 400), rng.integers(1, 9000, 400))]
        errors = []

        def work(part):
            for offset, length in part:
                buf = bytearray(length)
                reader.readinto(offset, buf)
                if buf != expected[offset:offset + length]:
                    errors.append(offset)

        threads = [threading.Thread(target=work, args=(jobs[i::8],)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    assert expected[BLOCK:BLOCK + 2048] == b"\x22" * 2048 and expected[BLOCK + 2048:BLOCK + 4096] == bytes(2048)


# -- boundary integers in every field -------------------------------------------------------------

FOOTER_FIELDS = {"features": (8, "I"), "data_offset": (16, "Q"), "timestamp": (24, "I"),
                 "creator_version": (32, "I"), "original_size": (40, "Q"), "current_size": (48, "Q"),
                 "cylinders": (56, "H"), "heads": (58, "B"), "sectors": (59, "B"), "disk_type": (60, "I"),
                 "saved_state": (84, "B")}
HEADER_FIELDS = {"data_offset": (8, "Q"), "table_offset": (16, "Q"), "version": (24, "I"),
                 "max_entries": (28, "I"), "block_size": (32, "I")}
WIDTH = {"B": 8, "H": 16, "I": 32, "Q": 64}


def boundary_cases():
    structures = (("footer", FOOTER_FIELDS), ("header", HEADER_FIELDS), ("bat", {"entry0": (0, "I")}))
    for which in ("dynamic", "fixed"):
        for where, fields in structures:
            if which == "fixed" and where != "footer":
                continue
            for name, (offset, code) in fields.items():
                for value in sorted({v & ((1 << WIDTH[code]) - 1) for v in BOUNDARY}):
                    yield which, where, name, offset, code, value


CASES = list(boundary_cases())


def exercise(path, tmp_path) -> None:
    """Everything a user can do with the file; only ImgkitError may come out, and nothing may hang."""
    try:
        api.info(path, "vhd")
        with api.open_image(path, "vhd") as reader:
            for ext in itertools.islice(reader.extents(), 100000):
                if ext.kind == Kind.DATA:
                    buf = bytearray(min(ext.length, MiB))
                    reader.readinto(ext.offset, buf)
            if reader.virtual_size <= 64 * MiB:
                imgkit.convert(path, tmp_path / "out.raw", "raw", src_format="vhd", force=True)
    except ImgkitError:
        pass
    try:
        api.check(path, "vhd")
    except ImgkitError:
        pass


@pytest.mark.parametrize("which,where,name,offset,code,value", CASES,
                         ids=[f"{w}-{s}.{n}={v:#x}" for w, s, n, _, _, v in CASES])
def test_boundary_integers(request, tmp_path, which, where, name, offset, code, value):
    path = request.getfixturevalue(which)
    base = {"footer": 0 if which == "dynamic" else os.path.getsize(path) - 512, "header": 512, "bat": 1536}
    packed = struct.pack(">" + code, value)
    poke(path, base[where] + offset, packed)
    if where == "footer" and which == "dynamic":
        poke(path, os.path.getsize(path) - 512 + offset, packed)
    refresh_checksums(path)
    signal.signal(signal.SIGALRM, lambda *a: pytest.fail("hang"))
    signal.alarm(60)
    try:
        exercise(path, tmp_path)
    finally:
        signal.alarm(0)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bitmap=st.binary(min_size=16, max_size=16), start=st.integers(0, BLOCK - 1),
       length=st.integers(1, BLOCK))
def test_random_bitmaps_map_and_read_consistently(dynamic, bitmap, start, length):
    """Extents follow the bitmap sector by sector, and readinto agrees with them."""
    poke(dynamic, bat_entry(dynamic, 0) * 512, bitmap)
    end = min(start + length, BLOCK)
    bits = np.unpackbits(np.frombuffer(bitmap, dtype=np.uint8))
    with api.open_image(dynamic) as reader:
        extents = list(reader.extents(start, end))
        buf = bytearray(end - start)
        reader.readinto(start, buf)
    assert extents[0].offset == start and extents[-1].end == end
    assert all(a.end == b.offset and a.kind != b.kind for a, b in zip(extents, extents[1:]))
    for ext in extents:
        sectors = bits[ext.offset // 512:(ext.end - 1) // 512 + 1]
        part = buf[ext.offset - start:ext.end - start]
        if ext.kind == Kind.DATA:
            assert sectors.all() and part == b"\x11" * len(part)
        else:
            assert ext.kind == Kind.ZERO and not sectors.any() and part == bytes(len(part))
