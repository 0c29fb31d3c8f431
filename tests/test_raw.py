"""RAW driver and the engine: round trips, sparseness, and agreement with real qemu-img."""
import hashlib
import os
import shutil
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import imgkit
from imgkit import api, engine
from imgkit.extents import Kind

from conftest import patterned, qemu, qemu_info, qemu_map, run_cli, write_sparse

MiB = 1 << 20


def digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def fresh_pair(folder, size: int, runs):
    """src.raw written from runs and no dst.raw: hypothesis reuses one tmp_path per test."""
    src, dst = folder / "src.raw", folder / "dst.raw"
    dst.unlink(missing_ok=True)
    src.unlink(missing_ok=True)
    write_sparse(src, size, runs)
    return src, dst


@st.composite
def sparse_layouts(draw, max_size=24 * MiB):
    """A virtual size (any multiple of 512, not always whole MiB) and runs of random bytes."""
    size = draw(st.integers(1, max_size // 512)) * 512
    runs = []
    for _ in range(draw(st.integers(0, 8))):
        off = draw(st.integers(0, size - 1))
        length = draw(st.integers(1, min(size - off, 3 * MiB)))
        byte = draw(st.integers(0, 255))
        runs.append((off, bytes([byte]) * length if draw(st.booleans()) else os.urandom(length)))
    return size, runs


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layout=sparse_layouts(), sparse=st.sampled_from([0, 512, 4096, 65536]),
       threads=st.sampled_from([1, 2, 3]))
def test_raw_round_trip_is_bit_exact(tmp_path, layout, sparse, threads):
    size, runs = layout
    src, dst = fresh_pair(tmp_path, size, runs)
    imgkit.convert(src, dst, "raw", sparse=sparse, threads=threads)
    assert digest(src) == digest(dst)
    assert os.path.getsize(dst) == size


def test_output_is_sparse(tmp_path):
    src, dst = tmp_path / "dense.raw", tmp_path / "sparse.raw"
    data = bytearray(16 * MiB)
    data[5 * MiB:5 * MiB + 4096] = os.urandom(4096)
    src.write_bytes(bytes(data))                       # fully allocated, mostly zeros
    imgkit.convert(src, dst, "raw")
    assert os.stat(dst).st_blocks * 512 <= 64 * 1024
    assert digest(src) == digest(dst)


def test_preallocation_full_allocates_every_block(tmp_path):
    src, dst = tmp_path / "s.raw", tmp_path / "d.raw"
    write_sparse(src, 8 * MiB, [(MiB, b"x" * 4096)])
    imgkit.convert(src, dst, "raw", options="preallocation=full")
    assert os.stat(dst).st_blocks * 512 >= 8 * MiB
    assert digest(src) == digest(dst)


def test_extents_report_holes_as_zero_and_data_with_offsets(tmp_path):
    path = tmp_path / "a.raw"
    write_sparse(path, 10 * MiB, [(2 * MiB, b"\1" * MiB)])
    with api.open_image(path) as reader:
        exts = list(reader.extents())
    assert [e.kind for e in exts] == [Kind.ZERO, Kind.DATA, Kind.ZERO]
    assert exts[1].offset == exts[1].host_offset == 2 * MiB
    assert sum(e.length for e in exts) == 10 * MiB


def test_windows_cover_exactly_the_data():
    from imgkit.extents import Extent
    exts = [Extent(0, 100, Kind.ZERO), Extent(100, 9 * MiB, Kind.DATA), Extent(9 * MiB + 100, 50, Kind.ZERO)]
    wins = list(engine.windows(exts, 10 * MiB, 4 * MiB))
    assert [w.offset for w in wins] == [0, 4 * MiB, 8 * MiB]
    covered = [r for w in wins for r in w.data]
    assert covered[0] == (100, 4 * MiB - 100)
    assert sum(length for _, length in covered) == 9 * MiB
    every = list(engine.windows([], 10 * MiB, 4 * MiB, everything=True))
    assert [(w.offset, w.length) for w in every] == [(0, 4 * MiB), (4 * MiB, 4 * MiB), (8 * MiB, 2 * MiB)]


def test_compare_semantics(tmp_path):
    a, b, c = tmp_path / "a.raw", tmp_path / "b.raw", tmp_path / "c.raw"
    write_sparse(a, 8 * MiB, [(MiB, b"abc")])
    write_sparse(b, 12 * MiB, [(MiB, b"abc")])                  # longer, zero tail
    write_sparse(c, 8 * MiB, [(MiB, b"abd")])
    assert api.compare(a, b).identical
    strict = api.compare(a, b, strict=True)
    assert not strict.identical and "size mismatch" in strict.message
    diff = api.compare(a, c)
    assert not diff.identical and diff.offset == MiB + 2
    write_sparse(b, 12 * MiB, [(MiB, b"abc"), (10 * MiB, b"!")])
    assert api.compare(a, b).offset == 10 * MiB


def test_cli_compare_exit_codes(tmp_path):
    a, c = tmp_path / "a.raw", tmp_path / "c.raw"
    write_sparse(a, MiB, [(4096, b"1")])
    write_sparse(c, MiB, [(4096, b"2")])
    assert run_cli("compare", a, a).returncode == 0
    res = run_cli("compare", a, c)
    assert res.returncode == 1 and "4096" in res.stdout
    res = run_cli("compare", a, tmp_path / "missing.raw")
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "Traceback" not in res.stderr


def test_map_scan_finds_allocated_zero_blocks(tmp_path):
    path = tmp_path / "a.raw"
    data = bytearray(4 * MiB)
    data[8192:8192 + 10] = b"x" * 10
    path.write_bytes(bytes(data))
    with api.open_image(path) as reader:
        plain = list(api.map_entries(reader))
        scanned = list(api.map_entries(reader, scan=True, granularity=4096))
    assert [e["data"] for e in plain] == [True]
    assert [(e["start"], e["length"], e["data"]) for e in scanned] == [
        (0, 8192, False), (8192, 4096, True), (12288, 4 * MiB - 12288, False)]


def test_cli_errors_are_one_line_with_documented_codes(tmp_path):
    src = tmp_path / "s.raw"
    write_sparse(src, MiB, [(0, b"a")])
    cases = [
        (("info", tmp_path / "nope.raw"), 66),
        (("info", tmp_path), 66),
        (("convert", "-O", "raw", src, src), 64),
        (("convert", "-O", "nosuch", src, tmp_path / "o"), 64),
        (("convert", "-O", "raw", "-o", "bogus=1", src, tmp_path / "o"), 64),
        (("convert", "-O", "raw", "-S", "1000", src, tmp_path / "o"), 64),
        (("convert", "-O", "raw", "-S", "1P", src, tmp_path / "o"), 64),
        (("map", "--scan", "--granularity", "1G", src), 64),
        (("convert", "-O", "raw", "-c", src, tmp_path / "o"), 64),
        (("convert", "-O", "raw", src, tmp_path / "no-such-dir" / "o"), 73),
    ]
    for args, code in cases:
        res = run_cli(*args)
        assert res.returncode == code, (args, res.stderr)
        assert res.stderr.startswith("imgkit: ") and res.stderr.count("\n") == 1, res.stderr
        assert "Traceback" not in res.stderr
    assert not (tmp_path / "o").exists()


def test_existing_destination_needs_force(tmp_path):
    src, dst = tmp_path / "s.raw", tmp_path / "d.raw"
    write_sparse(src, MiB, [(0, b"new")])
    dst.write_bytes(b"old")
    res = run_cli("convert", "-O", "raw", src, dst)
    assert res.returncode == 73 and dst.read_bytes() == b"old"
    assert run_cli("convert", "-O", "raw", "--force", src, dst).returncode == 0
    assert digest(src) == digest(dst)
    assert not list(tmp_path.glob(".*imgkit-tmp"))


def test_unreadable_input(tmp_path):
    src = tmp_path / "secret.raw"
    write_sparse(src, MiB, [(0, b"a")])
    src.chmod(0)
    cmd = [sys.executable, "-m", "imgkit", "info", str(src)]
    if os.geteuid() == 0:          # root reads anything: run without the capabilities that allow it
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: cannot make a file unreadable")
        cmd = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] + cmd
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert res.returncode == 66 and "permission denied" in res.stderr


# ---- interop with real qemu-img -------------------------------------------------------------

@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layout=sparse_layouts(max_size=12 * MiB))
def test_raw_output_matches_qemu(qemu_img, tmp_path, layout):
    size, runs = layout
    src, dst = fresh_pair(tmp_path, size, runs)
    imgkit.convert(src, dst, "raw")
    assert qemu("compare", "-f", "raw", "-F", "raw", str(src), str(dst), check=False).returncode == 0
    assert qemu_info(dst, "raw")["virtual-size"] == size
    assert api.info(dst)["virtual-size"] == size


def test_map_agrees_with_qemu(qemu_img, tmp_path):
    path = tmp_path / "m.raw"
    write_sparse(path, 32 * MiB, patterned(32 * MiB))
    with api.open_image(path) as reader:
        ours = list(api.map_entries(reader))
    theirs = qemu_map(path, "raw")
    strip = lambda es: [(e["start"], e["length"], e["data"], e["zero"]) for e in es]
    assert strip(ours) == strip(theirs)


def test_sample_disk_converts_like_qemu(qemu_img, tmp_path):
    """The README's sample disk (a real ext4 disk made by mke2fs -d), through qemu-img to raw."""
    from conftest import FIXTURES
    raw = tmp_path / "sample.raw"
    qemu("convert", "-O", "raw", str(FIXTURES / "sample-disk.qcow2"), str(raw))
    out = tmp_path / "copy.raw"
    res = run_cli("convert", "-O", "raw", "-q", raw, out)
    assert res.returncode == 0, res.stderr
    assert qemu("compare", str(raw), str(out), check=False).returncode == 0
    with api.open_image(out) as reader:
        head = bytearray(512)
        reader.readinto(0, head)
    assert head[510:512] == b"\x55\xaa"


def test_destination_that_appears_while_writing_is_kept(tmp_path):
    from imgkit.errors import OutputError
    from imgkit.io import AtomicOutput
    dst = tmp_path / "out.raw"
    out = AtomicOutput(dst)
    out.pwrite(b"new", 0)
    dst.write_bytes(b"someone else's")
    with pytest.raises(OutputError, match="appeared while writing"):
        out.commit()
    assert dst.read_bytes() == b"someone else's"
    assert [p.name for p in tmp_path.iterdir()] == ["out.raw"]


def test_cli_exit_code_override_does_not_leak_between_runs(tmp_path, capsys):
    from imgkit.cli import main
    a = tmp_path / "a.raw"
    write_sparse(a, MiB, [(0, b"x")])
    for argv, code in ((["compare", str(a), str(a)], 0), (["info", str(tmp_path / "missing")], 66)):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == code
