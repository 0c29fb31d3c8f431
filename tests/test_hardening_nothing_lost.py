"""Nothing lost: a convert that fails at any point leaves no output, no temp file, and the input as it was.

Failures are real: a truncated image whose tables point past the end (read error mid-copy),
RLIMIT_FSIZE and a 1 MiB tmpfs (disk full), SIGINT and SIGTERM sent to a CLI subprocess while it
copies, an exception raised in a worker thread, a writer that corrupts a byte (--verify).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imgkit import api, engine, io as imgkit_io
from imgkit.errors import InputError, UnsupportedFormat, VerifyError

from conftest import qemu, run_cli, write_sparse

KiB, MiB = 1 << 10, 1 << 20
TEMP_GLOB = ".*.imgkit-tmp"
WRITERS = ["raw", "qcow2", "vhd", "vmdk"]
QEMU_NAMES = {"raw": "raw", "qcow2": "qcow2", "vhd": "vpc", "vmdk": "vmdk"}


def have_driver(name: str) -> bool:
    return importlib.util.find_spec(f"imgkit.formats.{name}") is not None


def need_driver(name: str) -> None:
    if not have_driver(name):
        pytest.skip(f"driver imgkit.formats.{name} is not in this tree yet")


def fingerprint(path) -> tuple:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, hashlib.sha256(Path(path).read_bytes()).hexdigest()


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def assert_nothing_left(folder: Path, dst: Path) -> None:
    assert not dst.exists(), f"{dst} was left behind"
    assert not list(folder.glob(TEMP_GLOB)), list(folder.glob(TEMP_GLOB))


def dense_raw(path: Path, size: int = 8 * MiB) -> Path:
    """Non-zero data everywhere, so every window is written."""
    block = hashlib.sha256(b"imgkit").digest() * (MiB // 32)
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(block)
    return path


# ---- read errors mid-copy -------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["qcow2", "vhd", "vmdk"])
def test_truncated_source_fails_mid_copy_and_leaves_nothing(tmp_path, qemu_img, fmt):
    """Tables intact, data cut off: the first windows are written, then a read past the end fails."""
    need_driver(fmt)
    src = tmp_path / f"src.{fmt}"
    qemu("convert", "-f", "raw", "-O", QEMU_NAMES[fmt], str(dense_raw(tmp_path / "dense.raw", 24 * MiB)),
         str(src))
    os.truncate(src, os.path.getsize(src) // 2)
    before = fingerprint(src)
    dst = tmp_path / "out.raw"
    res = run_cli("convert", "-m", "1", "-O", "raw", src, dst)
    assert res.returncode in (65, 66), res.stderr
    assert str(src) in one_line(res.stderr)
    assert_nothing_left(tmp_path, dst)
    assert fingerprint(src) == before


# ---- disk full --------------------------------------------------------------------------------


def limit_file_size(limit: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.parametrize("out_format", WRITERS)
def test_file_size_limit_gives_74_and_leaves_nothing(tmp_path, out_format):
    need_driver(out_format)
    src = dense_raw(tmp_path / "src.raw")
    dst = tmp_path / f"out.{out_format}"
    res = run_cli("convert", "-O", out_format, src, dst, preexec_fn=limit_file_size(1 * MiB))
    assert res.returncode == 74, res.stderr
    line = one_line(res.stderr)
    assert "too large" in line or "no space" in line
    assert_nothing_left(tmp_path, dst)


@pytest.fixture
def tiny_tmpfs(tmp_path):
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or 'mount failed'})")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=False)


@pytest.mark.parametrize("out_format", WRITERS)
def test_full_disk_gives_74_and_leaves_nothing(tmp_path, tiny_tmpfs, out_format):
    need_driver(out_format)
    src = dense_raw(tmp_path / "src.raw")
    dst = tiny_tmpfs / f"out.{out_format}"
    res = run_cli("convert", "-O", out_format, src, dst)
    assert res.returncode == 74, res.stderr
    assert "no space" in one_line(res.stderr)
    assert_nothing_left(tiny_tmpfs, dst)
    assert os.statvfs(tiny_tmpfs).f_bfree == os.statvfs(tiny_tmpfs).f_blocks


# ---- signals mid-copy ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_random(tmp_path_factory):
    """A 256 MiB sparse-but-dense file: random data in 3 of every 4 MiB."""
    path = tmp_path_factory.mktemp("big") / "big.raw"
    with open(path, "wb") as f:
        f.truncate(256 * MiB)
        for off in range(0, 256 * MiB, 4 * MiB):
            f.seek(off)
            f.write(os.urandom(3 * MiB))
    return path


def slow_convert_args(src: Path, dst: Path) -> list[str]:
    """One thread and, where the writer can, compression of random data: seconds of work."""
    if have_driver("qcow2"):
        return ["convert", "-m", "1", "-c", "-O", "qcow2", str(src), str(dst)]
    return ["convert", "-m", "1", "-O", "raw", "-S", "0", str(src), str(dst)]


def start_and_signal(args: list[str], folder: Path, signum: int) -> subprocess.CompletedProcess:
    """Start imgkit, wait until its temp file exists and has grown, then send signum."""
    proc = subprocess.Popen([sys.executable, "-m", "imgkit", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        temps = list(folder.glob(TEMP_GLOB))
        if temps and any(t.exists() and t.stat().st_size > 0 for t in temps):
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"convert finished before it could be interrupted: {proc.stderr.read()}"
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)],
                         ids=["SIGINT", "SIGTERM"])
def test_signal_mid_copy_leaves_nothing(tmp_path, big_random, signum, code):
    dst = tmp_path / "out.img"
    before = fingerprint(big_random)
    res = start_and_signal(slow_convert_args(big_random, dst), tmp_path, signum)
    assert res.returncode == code, res.stderr
    line = one_line(res.stderr)
    assert "interrupted" in line or "terminated" in line
    assert_nothing_left(tmp_path, dst)
    assert fingerprint(big_random) == before


def test_signal_during_forced_replace_keeps_the_old_file(tmp_path, big_random):
    dst = tmp_path / "out.img"
    dst.write_bytes(b"the previous image")
    res = start_and_signal(slow_convert_args(big_random, dst)[:1] + ["--force"] +
                           slow_convert_args(big_random, dst)[1:], tmp_path, signal.SIGTERM)
    assert res.returncode == 143, res.stderr
    assert dst.read_bytes() == b"the previous image"
    assert not list(tmp_path.glob(TEMP_GLOB))


# ---- exceptions in worker threads ------------------------------------------------------------


class Boom(RuntimeError):
    pass


def fail_on_call(n: int, exc: BaseException):
    calls = {"n": 0}

    def hook(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= n:
            raise exc
    return hook


@pytest.mark.parametrize("out_format", WRITERS)
def test_exception_in_encode_worker_leaves_nothing(tmp_path, monkeypatch, out_format):
    need_driver(out_format)
    src = dense_raw(tmp_path / "src.raw", 16 * MiB)
    dst = tmp_path / f"out.{out_format}"
    writer_factory = api.load_driver(out_format).create_writer

    def create_writer(out, virtual_size, options):
        writer = writer_factory(out, virtual_size, options)
        original, hook = writer.encode, fail_on_call(3, Boom("encode failed in a worker"))

        def encode(*args):
            hook()
            return original(*args)
        writer.encode = encode
        return writer

    monkeypatch.setattr(api.load_driver(out_format), "create_writer", create_writer)
    with pytest.raises(Boom):
        api.convert(src, dst, out_format, threads=2)
    assert_nothing_left(tmp_path, dst)


def test_reader_error_in_worker_leaves_nothing(tmp_path, monkeypatch):
    from imgkit.formats import raw
    src = dense_raw(tmp_path / "src.raw", 16 * MiB)
    dst = tmp_path / "out.raw"
    original, hook = raw.RawReader.readinto, fail_on_call(3, InputError(f"{src}: read error (injected)"))

    def readinto(self, offset, buf):
        hook()
        return original(self, offset, buf)
    monkeypatch.setattr(raw.RawReader, "readinto", readinto)
    with pytest.raises(InputError):
        api.convert(src, dst, "raw", threads=2)
    assert_nothing_left(tmp_path, dst)


def test_worker_bug_through_the_cli_is_one_line_exit_70(tmp_path):
    src = dense_raw(tmp_path / "src.raw", 16 * MiB)
    dst = tmp_path / "out.raw"
    script = (
        "import sys\n"
        "from imgkit.formats import raw\n"
        "calls = []\n"
        "def encode(self, offset, data, mask):\n"
        "    calls.append(offset)\n"
        "    if len(calls) >= 2:\n"
        "        raise ZeroDivisionError('injected bug')\n"
        "    return raw.RawWriter.__dict__['_orig'](self, offset, data, mask)\n"
        "raw.RawWriter._orig = raw.RawWriter.encode\n"
        "raw.RawWriter.encode = encode\n"
        "from imgkit.cli import main\n"
        f"main(['convert', '-m', '2', '-O', 'raw', {str(src)!r}, {str(dst)!r}])\n")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 70, res.stderr
    assert "internal error" in one_line(res.stderr)
    assert_nothing_left(tmp_path, dst)


# ---- input never modified --------------------------------------------------------------------


def sample_images(tmp_path: Path) -> dict[str, Path]:
    src = tmp_path / "sample.raw"
    write_sparse(src, 8 * MiB, [(0, os.urandom(64 * KiB)), (3 * MiB + 4096, b"\x11" * 8192),
                                (8 * MiB - 512, b"\xee" * 512)])
    images = {"raw": src}
    for fmt, args in (("qcow2", ["-O", "qcow2"]), ("qcow2c", ["-c", "-O", "qcow2"]), ("vhd", ["-O", "vpc"]),
                      ("vhdfixed", ["-O", "vpc", "-o", "subformat=fixed"]), ("vmdk", ["-O", "vmdk"]),
                      ("vmdkstream", ["-O", "vmdk", "-o", "subformat=streamOptimized"])):
        path = tmp_path / f"sample.{fmt}"
        qemu("convert", "-f", "raw", *args, str(src), str(path))
        images[fmt] = path
    return images


def api_sweep(name: str, path: Path, reference: Path, out: Path) -> list[tuple[str, object]]:
    """Every operation, in-process (the CLI adds nothing that touches the input)."""
    def scan():
        with api.open_image(path) as reader:
            return list(api.map_entries(reader, scan=True))
    sweeps = [("info", lambda: api.info(path)), ("map --scan", scan), ("check", lambda: api.check(path)),
              ("compare", lambda: api.compare(path, reference)),
              ("measure", lambda: api.measure("qcow2", src=path))]
    sweeps += [(f"convert -O {fmt}", lambda fmt=fmt: api.convert(path, out / f"{name}.{fmt}", fmt))
               for fmt in WRITERS if have_driver(fmt)]
    sweeps += [("convert --verify", lambda: api.convert(path, out / f"{name}.v.raw", "raw", verify=True))]
    return sweeps


def test_inputs_are_unchanged_by_every_command(tmp_path, qemu_img):
    images = sample_images(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    for name, path in images.items():
        driver = {"qcow2c": "qcow2", "vhdfixed": "vhd", "vmdkstream": "vmdk"}.get(name, name)
        if not have_driver(driver):
            continue
        os.utime(path, ns=(1_000_000_000, 1_000_000_000))
        before = fingerprint(path)
        for label, operation in api_sweep(name, path, images["raw"], out):
            try:
                operation()
            except UnsupportedFormat:
                pass                      # raw has no check
            assert fingerprint(path) == before, f"{label} changed {path}"
        for command in (["info", path], ["map", "--output", "json", path], ["check", path]):
            res = run_cli(*command)
            assert res.returncode in (0, 63), (command, res.stderr)
            assert fingerprint(path) == before, f"{command} changed {path}"


# ---- --force and destination checks ----------------------------------------------------------


def test_force_keeps_the_old_file_when_conversion_fails(tmp_path):
    src = dense_raw(tmp_path / "src.raw")
    dst = tmp_path / "existing.raw"
    dst.write_bytes(b"old contents")
    res = run_cli("convert", "--force", "-O", "raw", src, dst, preexec_fn=limit_file_size(1 * MiB))
    assert res.returncode == 74
    assert dst.read_bytes() == b"old contents"
    assert not list(tmp_path.glob(TEMP_GLOB))


def test_force_keeps_the_old_file_when_the_source_is_bad(tmp_path, qemu_img):
    need_driver("qcow2")
    src = tmp_path / "src.qcow2"
    qemu("convert", "-O", "qcow2", str(dense_raw(tmp_path / "d.raw", 16 * MiB)), str(src))
    os.truncate(src, os.path.getsize(src) // 2)
    dst = tmp_path / "existing.raw"
    dst.write_bytes(b"old contents")
    res = run_cli("convert", "--force", "-O", "raw", src, dst)
    assert res.returncode in (65, 66)
    assert dst.read_bytes() == b"old contents"
    assert not list(tmp_path.glob(TEMP_GLOB))


def test_force_replaces_after_success_and_existing_is_refused_without_it(tmp_path):
    src = dense_raw(tmp_path / "src.raw", MiB)
    dst = tmp_path / "existing.raw"
    dst.write_bytes(b"old contents")
    res = run_cli("convert", "-O", "raw", src, dst)
    assert res.returncode == 73 and "--force" in one_line(res.stderr)
    assert dst.read_bytes() == b"old contents"
    res = run_cli("convert", "--force", "-O", "raw", src, dst)
    assert res.returncode == 0, res.stderr
    assert dst.read_bytes() == src.read_bytes()


@pytest.mark.parametrize("link", ["same path", "symlink", "hard link", "symlinked folder"])
@pytest.mark.parametrize("force", [False, True], ids=["no-force", "force"])
def test_destination_that_is_the_source_is_refused(tmp_path, link, force):
    src = dense_raw(tmp_path / "src.raw", MiB)
    before = fingerprint(src)
    if link == "same path":
        dst = src
    elif link == "symlink":
        dst = tmp_path / "alias.raw"
        dst.symlink_to(src)
    elif link == "hard link":
        dst = tmp_path / "alias.raw"
        os.link(src, dst)
    else:
        (tmp_path / "alias").symlink_to(tmp_path)
        dst = tmp_path / "alias" / "src.raw"
    res = run_cli("convert", *(["--force"] if force else []), "-O", "raw", src, dst)
    assert res.returncode == 64, res.stderr
    assert "source" in one_line(res.stderr)
    assert fingerprint(src) == before
    assert not list(tmp_path.glob(TEMP_GLOB))


# ---- --verify ---------------------------------------------------------------------------------


@pytest.mark.parametrize("out_format", WRITERS)
def test_verify_passes_for_a_good_conversion(tmp_path, out_format):
    need_driver(out_format)
    src = tmp_path / "src.raw"
    write_sparse(src, 6 * MiB, [(0, os.urandom(100 * KiB)), (5 * MiB, os.urandom(4096))])
    res = run_cli("convert", "--verify", "-O", out_format, src, tmp_path / "out.img")
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("out_format", WRITERS)
def test_verify_catches_a_corrupted_write_and_removes_the_output(tmp_path, monkeypatch, out_format):
    """A writer that flips one byte of guest data: VerifyError, and no output left."""
    need_driver(out_format)
    src = tmp_path / "src.raw"
    write_sparse(src, 6 * MiB, [(0, os.urandom(100 * KiB)), (5 * MiB, os.urandom(4096))])
    dst = tmp_path / "out.img"
    state = {"copying": False, "corrupted": False}
    real_copy, real_pwrite = engine.copy, imgkit_io.AtomicOutput.pwrite

    def copy(*args, **kwargs):
        state["copying"] = True
        try:
            return real_copy(*args, **kwargs)
        finally:
            state["copying"] = False

    def pwrite(self, data, offset):
        view = memoryview(data).cast("B")
        if state["copying"] and not state["corrupted"] and len(view) >= 4096:
            damaged = bytearray(view)
            damaged[-1] ^= 0xFF
            state["corrupted"] = True
            return real_pwrite(self, damaged, offset)
        return real_pwrite(self, data, offset)

    monkeypatch.setattr(engine, "copy", copy)
    monkeypatch.setattr(imgkit_io.AtomicOutput, "pwrite", pwrite)
    with pytest.raises(VerifyError) as err:
        api.convert(src, dst, out_format, verify=True, threads=1)
    assert state["corrupted"]
    assert "verification failed" in str(err.value)
    assert_nothing_left(tmp_path, dst)


@pytest.mark.parametrize("errno_name,code,words", [("ENOSPC", 74, "No space left"), ("EFBIG", 74, "too large"),
                                                  ("EIO", 70, "internal error")])
def test_stray_os_errors_are_one_line(tmp_path, errno_name, code, words):
    """An OSError that no layer wrapped: disk full is still 74, anything else an internal error (70)."""
    script = (
        "import errno, os\n"
        "from imgkit import api\n"
        "def info(*args, **kwargs):\n"
        f"    raise OSError(errno.{errno_name}, os.strerror(errno.{errno_name}), 'somefile')\n"
        "api.info = info\n"
        "from imgkit.cli import main\n"
        "main(['info', 'whatever'])\n")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert res.returncode == code, res.stderr
    line = one_line(res.stderr)
    assert words.lower() in line.lower() and "somefile" in line
