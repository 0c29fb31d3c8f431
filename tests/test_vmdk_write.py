"""VMDK writing: round trips, byte-identical output for any thread count, qemu-img check and
compare on every output, qemu's own layout for monolithicSparse, the canonical stream layout."""
from __future__ import annotations

import hashlib
import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from imgkit import api
from imgkit.errors import UsageError
from imgkit.formats.vmdk.layout import GD_AT_END, MARKER_EOS, MARKER_FOOTER, unpack_header, unpack_marker

from conftest import qemu, qemu_info, run_cli, write_sparse

MiB = 1 << 20
GRAIN = 64 << 10
SUBFORMATS = ["monolithicSparse", "streamOptimized"]


def convert(src, dst, subformat, threads=2, extra=""):
    opts = f"subformat={subformat}" + (f",{extra}" if extra else "")
    api.convert(src, dst, "vmdk", options=opts, threads=threads, force=True)


def read_back(path) -> bytes:
    with api.open_image(path, "vmdk") as reader:
        buf = bytearray(reader.virtual_size)
        reader.readinto(0, buf)
        return bytes(buf)


def qemu_clean(src, out):
    assert qemu("check", str(out), check=False).returncode == 0, qemu("check", str(out), check=False).stdout
    assert qemu("compare", "-f", "raw", "-F", "vmdk", str(src), str(out), check=False).returncode == 0
    report = api.check(out)
    assert report.exit_code == 0, report.corruptions


def varied(n: int, seed: int) -> bytes:
    """Compressible but not trivial bytes."""
    return bytes((i * seed + i // 97) % 251 for i in range(n))


layouts = st.lists(st.tuples(st.integers(0, 6 * MiB), st.integers(1, 200_000), st.integers(1, 250)),
                   max_size=6)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size_sectors=st.integers(1, 7 * 2048), runs=layouts, threads=st.sampled_from([1, 2, 4]),
       subformat=st.sampled_from(SUBFORMATS))
def test_round_trip_random_layouts(qemu_img, tmp_path, size_sectors, runs, threads, subformat):
    size = size_sectors * 512
    src, out = tmp_path / "src.raw", tmp_path / "out.vmdk"
    write_sparse(src, size, [(off % size, varied(min(n, size - off % size), seed)) for off, n, seed in runs])
    convert(src, out, subformat, threads)
    assert read_back(out) == src.read_bytes()
    qemu_clean(src, out)


@pytest.mark.parametrize("subformat", SUBFORMATS)
def test_output_is_byte_identical_whatever_the_thread_count(tmp_path, subformat):
    src = tmp_path / "src.raw"
    size = 40 * MiB   # several windows and two grain tables
    write_sparse(src, size, [(0, varied(3 * MiB, 5)), (5 * MiB + 4096, b"x" * 9000),
                             (31 * MiB, varied(2 * MiB, 11)), (size - 700, b"\x01" * 700)])
    digests = set()
    for threads in (1, 2, 4):
        (tmp_path / str(threads)).mkdir()
        out = tmp_path / str(threads) / "out.vmdk"   # the name is in the descriptor
        convert(src, out, subformat, threads)
        digests.add(hashlib.sha256(out.read_bytes()).hexdigest())
    assert len(digests) == 1


@pytest.mark.parametrize("subformat", SUBFORMATS)
def test_awkward_layouts_pass_qemu(qemu_img, tmp_path, subformat):
    src, out = tmp_path / "src.raw", tmp_path / "out.vmdk"
    size = 33 * MiB + 1000   # not a sector multiple: qemu and imgkit round up to a sector
    write_sparse(src, size, [(32 * MiB - 100, varied(300, 3)), (size - 10, b"\xff" * 10)])
    convert(src, out, subformat)
    qemu_clean(src, out)
    assert qemu_info(out)["virtual-size"] == 33 * MiB + 1024


def test_monolithic_sparse_is_qemus_layout_apart_from_the_cid(qemu_img, tmp_path):
    src, ours, theirs = tmp_path / "src.raw", tmp_path / "ours.vmdk", tmp_path / "theirs.vmdk"
    write_sparse(src, 50 * MiB, [(MiB, varied(300_000, 7)), (40 * MiB, b"z" * 5)])
    convert(src, ours, "monolithicSparse", extra="adapter_type=lsilogic,hwversion=6")
    qemu("convert", "-O", "vmdk", "-o", "adapter_type=lsilogic,hwversion=6", str(src), str(theirs))

    def regions(data: bytes):
        text = data[512:21 * 512].rstrip(b"\0").decode().replace('"theirs.vmdk"', '"ours.vmdk"')
        lines = [line for line in text.split("\n") if not line.startswith("CID=")]
        return data[:512], lines, data[21 * 512:]

    a, b = ours.read_bytes(), theirs.read_bytes()
    assert regions(a) == regions(b)


def test_stream_layout_is_canonical(qemu_img, tmp_path):
    src, out = tmp_path / "src.raw", tmp_path / "out.vmdk"
    write_sparse(src, 10 * MiB, [(0, varied(GRAIN * 3, 3)), (9 * MiB, b"q" * 100)])
    convert(src, out, "streamOptimized")
    data = out.read_bytes()
    front, footer = unpack_header(data[:512]), unpack_header(data[-1024:-512])
    assert (front.version, front.flags, front.compress_algorithm, front.gd_offset) == (3, 0x30001, 1, GD_AT_END)
    assert footer.gd_offset not in (0, GD_AT_END)
    assert unpack_marker(data[-1536:-1024]) == (1, 0, MARKER_FOOTER)
    assert unpack_marker(data[-512:]) == (0, 0, MARKER_EOS)
    lbas = []
    pos = 128 * 512
    while True:   # walk the stream as a streaming reader would: grains, then metadata markers
        value, size, kind = unpack_marker(data[pos:pos + 512])
        if size == 0:
            break
        lbas.append(value)
        pos += -(-(12 + size) // 512) * 512
    assert lbas == sorted(lbas) == [0, 128, 256, 9 * 2048]
    assert data[pos + 512:pos + 514] == b"\x00\x00" or kind == 1
    qemu_clean(src, out)


@pytest.mark.parametrize("subformat", SUBFORMATS)
def test_measure(tmp_path, subformat):
    src, out = tmp_path / "src.raw", tmp_path / "out.vmdk"
    write_sparse(src, 70 * MiB, [(0, varied(MiB + 5, 3)), (33 * MiB, varied(70_000, 9)),
                                 (70 * MiB - 1, b"\x01")])
    convert(src, out, subformat)
    measured = api.measure("vmdk", f"subformat={subformat}", src=src)
    actual = out.stat().st_size
    if subformat == "monolithicSparse":
        assert measured["required"] == actual
    else:   # an upper bound: every grain counted as incompressible
        assert actual <= measured["required"] <= measured["fully-allocated"]
    empty = api.measure("vmdk", f"subformat={subformat}", size=70 * MiB)
    assert empty["required"] < measured["required"]
    assert empty["fully-allocated"] == measured["fully-allocated"]


def test_measure_full_monolithic_sparse(tmp_path):
    src, out = tmp_path / "src.raw", tmp_path / "out.vmdk"
    src.write_bytes(b"\x07" * (3 * MiB + 512))
    convert(src, out, "monolithicSparse")
    assert api.measure("vmdk", "", src=src)["fully-allocated"] == out.stat().st_size


def test_descriptor_options(tmp_path):
    src, out = tmp_path / "src.raw", tmp_path / "out.vmdk"
    write_sparse(src, 8 * MiB, [(0, b"a")])
    convert(src, out, "streamOptimized", extra="adapter_type=buslogic,hwversion=13,toolsversion=10304")
    text = out.read_bytes()[512:512 * 21].rstrip(b"\0").decode()
    for line in ('ddb.adapterType = "buslogic"', 'ddb.virtualHWVersion = "13"', 'ddb.toolsVersion = "10304"',
                 'ddb.geometry.heads = "255"', 'createType="streamOptimized"', 'RW 16384 SPARSE "out.vmdk"'):
        assert line in text


@pytest.mark.parametrize("opts", ["subformat=monolithicFlat", "adapter_type=scsi", "hwversion=x",
                                  "toolsversion=99999999999", "compress=on", "subformat=streamOptimized,compress=off"])
def test_bad_options(tmp_path, opts):
    src = tmp_path / "src.raw"
    write_sparse(src, MiB, [])
    with pytest.raises(UsageError):
        api.convert(src, tmp_path / "out.vmdk", "vmdk", options=opts)
    assert not (tmp_path / "out.vmdk").exists()


def test_empty_disk_is_refused(tmp_path):
    src = tmp_path / "src.raw"
    src.write_bytes(b"")
    with pytest.raises(UsageError):
        api.convert(src, tmp_path / "out.vmdk", "vmdk", src_format="raw")


def test_compress_flag_on_the_command_line(qemu_img, tmp_path):
    src = tmp_path / "src.raw"
    write_sparse(src, 4 * MiB, [(MiB, varied(GRAIN, 3))])
    done = run_cli("convert", "-c", "-O", "vmdk", src, tmp_path / "a.vmdk")
    assert done.returncode == 64 and "streamOptimized" in done.stderr
    done = run_cli("convert", "-c", "-O", "vmdk", "-o", "subformat=streamOptimized", "-m", "1",
                   src, tmp_path / "b.vmdk")
    assert done.returncode == 0, done.stderr
    qemu_clean(src, tmp_path / "b.vmdk")
    done = run_cli("measure", "-O", "vmdk", "--output=json", src)
    assert done.returncode == 0, done.stderr


def test_all_zero_data_leaves_grains_unallocated(tmp_path):
    src, out = tmp_path / "src.raw", tmp_path / "out.vmdk"
    src.write_bytes(bytes(2 * MiB))   # allocated on disk, zero in content
    convert(src, out, "monolithicSparse")
    with api.open_image(out) as reader:
        assert {e.kind.name for e in reader.extents()} == {"UNALLOCATED"}
    assert out.stat().st_size == 128 * 512
    assert struct.unpack_from("<I", out.read_bytes(), 4)[0] == 1


@pytest.mark.parametrize("subformat", SUBFORMATS)
def test_info_of_our_output_matches_qemu(qemu_img, tmp_path, subformat):
    src, out = tmp_path / "src.raw", tmp_path / "out.vmdk"
    write_sparse(src, 5 * MiB, [(MiB, varied(GRAIN + 1, 3))])
    convert(src, out, subformat)
    ours, theirs = api.info(out), qemu_info(out)
    for key, value in theirs.items():
        assert ours.get(key) == value, key
