"""Damaged VMDK files: every one a clean ImgkitError (or a check finding), never a traceback or hang."""
from __future__ import annotations

import struct
import zlib

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from imgkit import api
from imgkit.errors import ImgkitError, InvalidImage, LimitExceeded, UnsupportedFormat
from imgkit.extents import Kind

from conftest import run_cli, write_sparse

MiB = 1 << 20
SECTOR = 512
GT_SPARSE = 27 * SECTOR     # our monolithicSparse layout for a disk of one grain table (qemu's too)
RGT_SPARSE = 22 * SECTOR
GD_SPARSE = 26 * SECTOR


def varied(n: int, seed: int) -> bytes:
    return bytes((i * seed + i // 97) % 251 for i in range(n))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """(source, monolithicSparse, streamOptimized) made by imgkit from one 2 MiB source."""
    folder = tmp_path_factory.mktemp("vmdk")
    src = folder / "src.raw"
    write_sparse(src, 2 * MiB, [(0, varied(128 << 10, 3)), (MiB + 4096, b"payload" * 100)])
    out = []
    for sub in ("monolithicSparse", "streamOptimized"):
        path = folder / f"{sub}.vmdk"
        api.convert(src, path, "vmdk", options=f"subformat={sub}", threads=1)
        out.append(path.read_bytes())
    return src.read_bytes(), out[0], out[1]


def patched(tmp_path, data: bytes, *edits) -> str:
    buf = bytearray(data)
    for offset, raw in edits:
        buf[offset:offset + len(raw)] = raw
    path = tmp_path / "bad.vmdk"
    path.write_bytes(bytes(buf))
    return path


def read_all(path) -> bytes:
    with api.open_image(path, "vmdk") as reader:
        buf = bytearray(reader.virtual_size)
        reader.readinto(0, buf)
        return bytes(buf)


def one_line(exc: BaseException) -> None:
    assert isinstance(exc, ImgkitError)
    assert "\n" not in str(exc)


def u32(v): return struct.pack("<I", v)
def u64(v): return struct.pack("<Q", v)


def stream_grain_offsets(data: bytes) -> list[int]:
    offsets, pos = [], 128 * SECTOR
    while True:
        lba, size, _ = struct.unpack_from("<QII", data, pos)
        if size == 0:
            return offsets
        offsets.append(pos)
        pos += -(-(12 + size) // SECTOR) * SECTOR


# -- monolithicSparse --------------------------------------------------------------------------

def test_gt_entry_past_the_end(tmp_path, images):
    _, sparse, _ = images
    path = patched(tmp_path, sparse, (GT_SPARSE, u32(0xFFFFFF00)), (RGT_SPARSE, u32(0xFFFFFF00)))
    with pytest.raises(InvalidImage, match="beyond the end") as info:
        read_all(path)
    one_line(info.value)
    with pytest.raises(InvalidImage):
        list(api.map_entries(api.open_image(path)))
    report = api.check(path)
    assert report.exit_code == 2 and any("beyond the end" in m for m in report.corruptions)
    done = run_cli("convert", "-O", "raw", path, tmp_path / "o.raw")
    assert done.returncode == 65 and "Traceback" not in done.stderr


def test_grain_over_metadata_and_shared_grains_are_found_by_check(tmp_path, images):
    _, sparse, _ = images
    first = struct.unpack_from("<I", sparse, GT_SPARSE)[0]
    edits = [(GT_SPARSE + 4, u32(27)), (GT_SPARSE + 8, u32(first))]
    edits += [(RGT_SPARSE + o - GT_SPARSE, v) for o, v in edits]
    report = api.check(patched(tmp_path, sparse, *edits))
    assert report.exit_code == 2
    assert any("grain 1" in m and "overlaps" in m for m in report.corruptions)
    assert any("grain 2" in m and "overlaps" in m or "grain 0" in m for m in report.corruptions)


def test_damaged_primary_gd_falls_back_to_the_redundant_one(tmp_path, images):
    src, sparse, _ = images
    path = patched(tmp_path, sparse, (GD_SPARSE, u32(0xFFFFFFF0)))
    assert read_all(path) == src
    report = api.check(path)
    assert report.exit_code == 2 and any("redundant" in m for m in report.corruptions)


def test_both_gds_damaged(tmp_path, images):
    _, sparse, _ = images
    path = patched(tmp_path, sparse, (GD_SPARSE, u32(0xFFFFFFF0)), (21 * SECTOR, u32(0xFFFFFFF0)))
    with pytest.raises(InvalidImage, match="grain directory"):
        api.info(path)


def test_redundant_table_that_disagrees(tmp_path, images):
    _, sparse, _ = images
    report = api.check(patched(tmp_path, sparse, (RGT_SPARSE + 4 * 5, u32(999))))
    assert report.exit_code == 2 and any("differ" in m for m in report.corruptions)


HEADER_CASES = [
    ("version", 4, u32(0), UnsupportedFormat), ("version", 4, u32(4), UnsupportedFormat),
    ("version", 4, u32(0xFFFFFFFF), UnsupportedFormat),
    ("flags", 8, u32(0x00040003), UnsupportedFormat), ("flags", 8, u32(0x00010003), UnsupportedFormat),
    ("capacity", 12, u64(2 ** 64 - 1), LimitExceeded), ("capacity", 12, u64(2 ** 32 + 1), LimitExceeded),
    ("grainSize", 20, u64(0), InvalidImage), ("grainSize", 20, u64(3), InvalidImage),
    ("grainSize", 20, u64(2 ** 63), LimitExceeded), ("grainSize", 20, u64(8192), LimitExceeded),
    ("descriptorOffset", 28, u64(2 ** 64 - 1), InvalidImage),
    ("descriptorSize", 36, u64(2 ** 64 - 1), LimitExceeded),
    ("numGTEsPerGT", 44, u32(0), InvalidImage), ("numGTEsPerGT", 44, u32(513), LimitExceeded),
    ("numGTEsPerGT", 44, u32(2 ** 32 - 1), LimitExceeded),
    ("gdOffset", 56, u64(2 ** 64 - 2), InvalidImage),
    ("compressAlgorithm", 77, struct.pack("<H", 7), UnsupportedFormat),
    ("newline bytes", 73, b"\n \n\n", InvalidImage),
]


@pytest.mark.parametrize("field, offset, raw, error", HEADER_CASES, ids=[f"{c[0]}-{c[2].hex()}" for c in HEADER_CASES])
def test_boundary_integers_in_the_header(tmp_path, images, field, offset, raw, error):
    _, sparse, _ = images
    with pytest.raises(error) as info:
        read_all(patched(tmp_path, sparse, (offset, raw), (48, u64(0))))
    one_line(info.value)


def test_grain_directory_above_the_limit(tmp_path, images):
    _, sparse, _ = images
    with pytest.raises(LimitExceeded, match="grain directory"):
        api.info(patched(tmp_path, sparse, (12, u64(2 ** 32)), (20, u64(1))))


def test_truncated_header(tmp_path, images):
    _, sparse, _ = images
    with pytest.raises(ImgkitError):
        api.info(patched(tmp_path, sparse[:300]))


# -- streamOptimized ---------------------------------------------------------------------------

def test_grain_marker_with_the_wrong_lba(tmp_path, images):
    _, _, stream = images
    at = stream_grain_offsets(stream)[1]
    path = patched(tmp_path, stream, (at, u64(12345)))
    with pytest.raises(InvalidImage, match="LBA") as info:
        read_all(path)
    one_line(info.value)
    assert any("LBA" in m for m in api.check(path).corruptions)


@pytest.mark.parametrize("size, error, words", [(0, InvalidImage, "metadata marker"),
                                                (0xFFFFFFFF, LimitExceeded, "limit"),
                                                (3 * MiB, InvalidImage, "beyond the end")])
def test_grain_marker_sizes(tmp_path, images, size, error, words):
    _, _, stream = images
    at = stream_grain_offsets(stream)[0]
    path = patched(tmp_path, stream, (at + 8, u32(size)))
    with pytest.raises(error, match=words):
        read_all(path)
    assert api.check(path).exit_code == 2


def test_corrupt_compressed_data(tmp_path, images):
    _, _, stream = images
    at = stream_grain_offsets(stream)[0]
    with pytest.raises(InvalidImage, match="compressed"):
        read_all(patched(tmp_path, stream, (at + 12, b"\x78\x9c\xff\xff\xff\xff\xff")))


def test_inflation_is_capped_at_one_grain(tmp_path, images):
    _, _, stream = images
    at = stream_grain_offsets(stream)[0]
    bomb = zlib.compress(bytes(MiB), 9)   # 1 KiB that inflates to 16 grains
    assert len(bomb) < struct.unpack_from("<I", stream, at + 8)[0]
    with pytest.raises(InvalidImage, match="more than one grain"):
        read_all(patched(tmp_path, stream, (at + 8, u32(len(bomb)) + bomb)))


def test_truncated_compressed_stream(tmp_path, images):
    _, _, stream = images
    at = stream_grain_offsets(stream)[0]
    size = struct.unpack_from("<I", stream, at + 8)[0]
    with pytest.raises(InvalidImage, match="truncated"):
        read_all(patched(tmp_path, stream, (at + 8, u32(size // 2))))


@pytest.mark.parametrize("where, raw, words", [(-1536, u64(7), "footer marker"),
                                               (-1536 + 12, u32(2), "footer marker"),
                                               (-1024, b"XXXX", "KDMV"),
                                               (-512 + 12, u32(3), "end-of-stream")])
def test_footer_and_eos_markers(tmp_path, images, where, raw, words):
    _, _, stream = images
    path = patched(tmp_path, stream, (len(stream) + where, raw))
    with pytest.raises(InvalidImage, match=words) as info:
        api.info(path)
    one_line(info.value)
    assert run_cli("check", path).returncode == 1


def test_gt_and_gd_markers_and_footer_fields_are_checked(tmp_path, images):
    src, _, stream = images
    footer = len(stream) - 1024
    gd_at = struct.unpack_from("<Q", stream, footer + 56)[0]
    gt_at = struct.unpack_from("<I", stream, gd_at * SECTOR)[0]
    path = patched(tmp_path, stream, ((gt_at - 1) * SECTOR + 12, u32(9)),
                   ((gd_at - 1) * SECTOR, u64(77)), (footer + 64, u64(129)))
    assert read_all(path) == src      # readers follow the directory; markers are for streaming
    corruptions = api.check(path).corruptions
    assert any("GT marker" in m for m in corruptions)
    assert any("GD marker" in m for m in corruptions)
    assert any("overhead" in m for m in corruptions)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.sampled_from([1, 2]), edits=st.lists(st.tuples(st.integers(0, 30000), st.binary(min_size=1,
       max_size=8)), min_size=1, max_size=6), tail=st.booleans())
def test_fuzzed_metadata_gives_clean_errors(tmp_path, images, which, edits, tail):
    data = images[which]
    where = [(len(data) - 1 - off % 2048 if tail else off % (30 * SECTOR), raw) for off, raw in edits]
    path = patched(tmp_path, data, *where)
    try:
        with api.open_image(path, "vmdk") as reader:
            budget = 8 * MiB
            for ext in reader.extents():
                if ext.kind == Kind.DATA and budget > 0:
                    n = min(ext.length, budget)
                    reader.readinto(ext.offset, bytearray(n))
                    budget -= n
        api.check(path)
    except ImgkitError as exc:
        one_line(exc)
