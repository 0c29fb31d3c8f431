"""QCOW2 writing and measure: every image imgkit writes passes qemu-img check and compare."""
from __future__ import annotations

import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import qemu, qemu_info, run_cli, write_sparse
from imgkit import api
from imgkit.errors import UsageError
from imgkit.formats import qcow2

KiB, MiB = 1 << 10, 1 << 20


def assert_valid_copy(qemu_img, src, out, fmt_src="raw"):
    """qemu-img check clean (no errors, no leaks), same JSON as imgkit check, compare identical."""
    result = qemu("check", "--output=json", str(out), check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    theirs = json.loads(result.stdout)
    theirs.pop("messages", None)
    ours = api.check(out).to_json()
    assert ours.pop("messages") == []
    assert ours == theirs
    result = qemu("compare", "-f", fmt_src, "-F", "qcow2", str(src), str(out), check=False)
    assert result.returncode == 0, result.stdout + result.stderr


layouts = st.lists(st.tuples(st.integers(0, (6 * MiB) // 512 - 1),     # offset in sectors
                             st.integers(1, 300),                        # length in sectors
                             st.sampled_from(["random", "byte", "text"])),
                   max_size=6)
option_sets = st.fixed_dictionaries({
    "cluster_size": st.sampled_from(["512", "4K", "64K", "2M"]),
    "compat": st.sampled_from(["1.1", "0.10"]),
    "refcount_bits": st.sampled_from(["1", "2", "4", "8", "16", "32", "64"]),
    "compress": st.sampled_from(["off", "on"]),
    "compression_type": st.sampled_from(["zlib", "zstd"]),
})


def _payload(kind: str, length: int, seed: int) -> bytes:
    if kind == "random":
        return os.urandom(length)
    if kind == "byte":
        return bytes([seed % 255 + 1]) * length
    return (b"imgkit qcow2 round trip %d " % seed * (length // 20 + 1))[:length]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(runs=layouts, opts=option_sets, size_sectors=st.integers(1, (6 * MiB) // 512 + 7))
def test_round_trip_raw_qcow2_raw(qemu_img, tmp_path, runs, opts, size_sectors):
    if opts["compat"] == "0.10":
        opts = dict(opts, refcount_bits="16", compression_type="zlib")
    size = size_sectors * 512
    src, out, back = tmp_path / "src.raw", tmp_path / "out.qcow2", tmp_path / "back.raw"
    for path in (src, out, back):
        if path.exists():
            path.unlink()
    write_sparse(src, size, [(off * 512, _payload(kind, min(n * 512, size - off * 512), off))
                             for off, n, kind in runs if off * 512 < size])
    api.convert(src, out, "qcow2", options=opts)
    assert_valid_copy(qemu_img, src, out)
    api.convert(out, back, "raw")
    assert back.read_bytes() == src.read_bytes()


def test_zero_chunks_are_never_written(tmp_path):
    src = tmp_path / "src.raw"
    write_sparse(src, 64 * MiB, [(0, b"\0" * MiB), (8 * MiB, b"x" * 4096)])
    api.convert(src, tmp_path / "out.qcow2", "qcow2")
    with api.open_image(tmp_path / "out.qcow2") as reader:
        data = [e for e in reader.extents() if e.kind == 0]
    assert [(e.offset, e.length) for e in data] == [(8 * MiB, 64 * KiB)]
    # header, L1, one L2, one data cluster, one refcount block, one refcount table cluster
    assert os.path.getsize(tmp_path / "out.qcow2") == 6 * 64 * KiB


def test_huge_sparse_image_is_small_and_valid(qemu_img, tmp_path):
    """1 TiB virtual with a little data far apart: memory and output follow the data only."""
    src = tmp_path / "src.raw"
    write_sparse(src, 1 << 40, [(0, b"a" * 4096), (300 << 30, b"b" * 70000), ((1 << 40) - 512, b"c" * 512)])
    out = tmp_path / "out.qcow2"
    api.convert(src, out, "qcow2")
    assert os.path.getsize(out) < 2 * MiB
    assert_valid_copy(qemu_img, src, out)


def test_compressed_output_is_close_to_qemu(qemu_img, tmp_path):
    src = tmp_path / "src.raw"
    text = b"".join(b"line %d of a fairly compressible text file\n" % i for i in range(200000))
    write_sparse(src, 16 * MiB, [(0, text[:8 * MiB]), (12 * MiB, os.urandom(MiB))])
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    api.convert(src, ours, "qcow2", options={"compress": "on"})
    qemu("convert", "-c", "-O", "qcow2", str(src), str(theirs))
    assert_valid_copy(qemu_img, src, ours)
    assert os.path.getsize(ours) <= 1.05 * os.path.getsize(theirs) + 64 * KiB


def test_incompressible_clusters_are_stored_plain(tmp_path):
    src = tmp_path / "src.raw"
    write_sparse(src, MiB, [(0, os.urandom(256 * KiB))])
    api.convert(src, tmp_path / "out.qcow2", "qcow2", options={"compress": "on"})
    with api.open_image(tmp_path / "out.qcow2") as reader:
        assert not any(e.compressed for e in reader.extents())


def test_empty_and_tiny_images(qemu_img, tmp_path):
    """Sizes are rounded up to whole sectors, as qemu-img does (1000 bytes become 1024)."""
    for size in (0, 512, 1000, 65536 + 512, 65536 + 1):
        src, out = tmp_path / f"{size}.raw", tmp_path / f"{size}.qcow2"
        write_sparse(src, size, [(0, b"z" * min(size, 512))] if size else [])
        api.convert(src, out, "qcow2", src_format="raw")
        assert qemu("check", str(out), check=False).returncode == 0
        assert qemu("compare", "-f", "raw", str(src), str(out), check=False).returncode == 0
        theirs = tmp_path / f"{size}.theirs.qcow2"
        qemu("convert", "-f", "raw", "-O", "qcow2", str(src), str(theirs))
        assert api.info(out)["virtual-size"] == qemu_info(out)["virtual-size"] == qemu_info(theirs)["virtual-size"]


@pytest.mark.parametrize("text, message", [
    ("compat=2", "compat"), ("cluster_size=1K3", "size"), ("cluster_size=256", "cluster_size"),
    ("cluster_size=4M", "cluster_size"), ("cluster_size=3K", "cluster_size"),
    ("refcount_bits=3", "refcount_bits"), ("compat=0.10,refcount_bits=8", "compat=1.1"),
    ("compression_type=lzo", "compression_type"), ("compat=0.10,compression_type=zstd", "compat=1.1"),
    ("lazy_refcounts=on", "lazy_refcounts"),
])
def test_bad_options_are_usage_errors(text, message):
    from imgkit.formats import parse_options
    with pytest.raises(UsageError, match=message):
        qcow2.parse_write_options(parse_options(text, qcow2))


def test_v2_and_v3_spellings():
    assert qcow2.parse_write_options({"compat": "v2"}).version == 2
    assert qcow2.parse_write_options({"compat": "v3"}).version == 3


def test_l1_limit_is_refused_before_writing(tmp_path):
    from imgkit.io import AtomicOutput
    with AtomicOutput(tmp_path / "x.qcow2") as out:
        with pytest.raises(UsageError, match="L1"):
            qcow2.create_writer(out, 60 << 40, {"cluster_size": "512"})
        out.truncate(0)


MEASURE_OPTIONS = ["", "cluster_size=512", "cluster_size=4K", "cluster_size=2M", "refcount_bits=1",
                   "refcount_bits=64", "compat=0.10", "cluster_size=4K,refcount_bits=2"]


@pytest.mark.parametrize("opts", MEASURE_OPTIONS)
def test_measure_equals_qemu_for_sparse_raw(qemu_img, tmp_path, opts):
    src = tmp_path / "src.raw"
    write_sparse(src, 100 * MiB + 512, [(0, b"a" * 100), (5 * MiB + 4096, b"b" * 200000),
                                        (70 * MiB - 10, b"c" * 20), (100 * MiB, b"d" * 512)])
    args = ["measure", "--output=json", "-O", "qcow2"] + (["-o", opts] if opts else [])
    theirs = json.loads(qemu(*args, str(src)).stdout)
    assert api.measure("qcow2", opts or None, src=src) == theirs


@pytest.mark.parametrize("size", ["0", "1", "64K", "1G", "1000G", "17T"])
@pytest.mark.parametrize("opts", ["", "cluster_size=512", "refcount_bits=1,cluster_size=2M"])
def test_measure_equals_qemu_for_size(qemu_img, size, opts):
    from imgkit.io import parse_size
    args = ["measure", "--output=json", "-O", "qcow2", "--size", size] + (["-o", opts] if opts else [])
    result = qemu(*args, check=False)
    if result.returncode:
        with pytest.raises(UsageError):
            api.measure("qcow2", opts or None, size=parse_size(size))
        return
    assert api.measure("qcow2", opts or None, size=parse_size(size)) == json.loads(result.stdout)


def test_measure_from_a_qcow2_source(qemu_img, tmp_path):
    src = tmp_path / "src.raw"
    write_sparse(src, 10 * MiB, [(MiB, b"q" * 3 * 65536), (9 * MiB, b"r")])
    qemu("convert", "-O", "qcow2", str(src), str(tmp_path / "src.qcow2"))
    theirs = json.loads(qemu("measure", "--output=json", "-O", "qcow2", str(tmp_path / "src.qcow2")).stdout)
    theirs.pop("bitmaps")   # qemu adds the size of bitmaps to copy (only with convert --bitmaps)
    assert api.measure("qcow2", None, src=tmp_path / "src.qcow2") == theirs


def test_measured_required_covers_what_is_written(tmp_path):
    src = tmp_path / "src.raw"
    write_sparse(src, 40 * MiB, [(i * 3 * MiB, os.urandom(70000)) for i in range(12)])
    api.convert(src, tmp_path / "out.qcow2", "qcow2")
    assert os.path.getsize(tmp_path / "out.qcow2") <= api.measure("qcow2", None, src=src)["required"]


def test_cli_convert_compress_and_check_exit_codes(qemu_img, tmp_path):
    src, out = tmp_path / "src.raw", tmp_path / "out.qcow2"
    write_sparse(src, 4 * MiB, [(0, b"hello " * 20000)])
    result = run_cli("convert", "-O", "qcow2", "-c", "-o", "cluster_size=4K", src, out)
    assert result.returncode == 0, result.stderr
    assert qemu("compare", "-f", "raw", "-F", "qcow2", str(src), str(out), check=False).returncode == 0
    assert run_cli("check", out).returncode == 0
    leaked = tmp_path / "leaked.qcow2"
    leaked.write_bytes(out.read_bytes() + bytes(4096))
    _set_refcount(leaked, os.path.getsize(leaked) // 4096 - 1, 1)
    result = run_cli("check", "--output", "json", leaked)
    assert result.returncode == 3, result.stdout + result.stderr
    assert json.loads(result.stdout)["leaks"] == 1
    result = run_cli("convert", "-O", "qcow2", "-o", "cluster_size=3K", src, tmp_path / "bad.qcow2")
    assert result.returncode == 64 and "cluster_size" in result.stderr


def _set_refcount(path, cluster: int, value: int) -> None:
    """Write one 16-bit refcount in an image whose refcount blocks we locate from the header."""
    from imgkit.io import ImageFile
    with ImageFile(path) as image:
        hdr = qcow2.parse_header(image)
        table = qcow2.read_table(image, hdr.reftable_offset, hdr.reftable_clusters * hdr.cluster_size // 8, "t")
    per_block = hdr.cluster_size * 8 // hdr.refcount_bits
    block = int(table[cluster // per_block])
    with open(path, "r+b") as f:
        f.seek(block + (cluster % per_block) * 2)
        f.write(value.to_bytes(2, "big"))


@pytest.fixture(scope="module")
def fixture_images(tmp_path_factory):
    from test_qcow2_read import unpack_fixtures
    return unpack_fixtures(tmp_path_factory.mktemp("qcow2-sources"))


@pytest.mark.parametrize("name", ["zeros.qcow2", "el2.qcow2", "zlib.qcow2", "zstd.qcow2", "snap.qcow2",
                                  "c512.qcow2", "dirty.qcow2"])
@pytest.mark.parametrize("opts", [{}, {"compress": "on", "cluster_size": "4K"}])
def test_qemu_made_qcow2_to_qcow2(qemu_img, fixture_images, tmp_path, name, opts):
    out = tmp_path / "out.qcow2"
    api.convert(fixture_images[name], out, "qcow2", options=opts)
    assert_valid_copy(qemu_img, fixture_images[name], out, fmt_src="qcow2")


def test_stdlib_zlib_fallback_is_readable_by_qemu(qemu_img, tmp_path, monkeypatch):
    """Without zlib-ng, -c uses the stdlib zlib (same raw deflate, 4 KiB window)."""
    import sys
    monkeypatch.setitem(sys.modules, "zlib_ng", None)
    src, out = tmp_path / "src.raw", tmp_path / "out.qcow2"
    write_sparse(src, 2 * MiB, [(0, b"stdlib zlib " * 50000)])
    api.convert(src, out, "qcow2", options={"compress": "on"})
    with api.open_image(out) as reader:
        assert any(e.compressed for e in reader.extents())
    assert_valid_copy(qemu_img, src, out)
