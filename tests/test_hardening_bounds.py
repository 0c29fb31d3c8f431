"""Hostile images: every command finishes, in bounded memory, with a documented exit code and one line.

Each crafted file starts as a real image made by qemu-img from a small patterned raw disk and then
has fields patched at the offsets of shared/reference/formats.md (§1 qcow2, §2 VHD, §3 VMDK) with
boundary values, or is truncated. info, map, compare, convert, check and validate each run in a
process of their own whose peak RSS is measured alone: a fork server reaps each command with
wait4() (CI), and a few cases repeat it with a fresh wrapper process and
getrusage(RUSAGE_CHILDREN).ru_maxrss. In CI the nastiest value of each field runs; --long (or
IMGKIT_FUZZ_LONG=1) runs every case.

The property: exit code in the documented set (imgkit/errors.py; compare and check keep qemu-img's),
stderr at most one line, never a traceback or "internal error", input unchanged, and convert leaves
no temp file and no partial output. Peak RSS must stay under 256 MB. Wall time is recorded (not
asserted, the box is shared); a 60 s guard turns a hang into a failure.

Set IMGKIT_HOSTILE_REPORT=/path/table.md to get the observed table (case, command, exit, s, MB).
Cases of a format whose driver module is not in the tree are skipped with that reason.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from conftest import long_mode, qemu, qemu_img_path

KiB, MiB = 1 << 10, 1 << 20
U32, U63, U64 = (1 << 32) - 1, (1 << 63) - 1, (1 << 64) - 1
RSS_LIMIT_MB = 256
HANG_GUARD_S = 60
COMMON_CODES = {0, 1, 64, 65, 66, 67, 68, 74}
ALLOWED = {"info": COMMON_CODES, "map": COMMON_CODES, "convert": COMMON_CODES,
           "compare": {0, 1, 2}, "check": {0, 1, 2, 3, 63}, "validate": COMMON_CODES}
COMMANDS = ("info", "map", "compare", "convert", "check", "validate")

WRAPPER = r"""
import json, resource, subprocess, sys, time
start = time.monotonic()
try:
    done = subprocess.run(sys.argv[2:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          timeout=float(sys.argv[1]))
    code, err = done.returncode, done.stderr
except subprocess.TimeoutExpired as exc:
    code, err = None, exc.stderr or b""
print(json.dumps({"rc": code, "seconds": time.monotonic() - start,
                  "max_rss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
                  "stderr": err.decode(errors="replace")}))
"""


def measured(args: list[str], timeout: float = HANG_GUARD_S) -> dict:
    """Run imgkit with args in a fresh wrapper process; rc, seconds, peak RSS and stderr."""
    cmd = [sys.executable, "-c", WRAPPER, str(timeout), sys.executable, "-m", "imgkit", *map(str, args)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 30, check=True)
    return json.loads(out.stdout)


# A fork server: one process that has imported imgkit forks a child per command and reaps it with
# wait4(), whose rusage is that child's alone. Same numbers as the wrapper above (plus the
# anonymous pages the child inherits), without paying interpreter and numpy start-up 900 times.
# Anything a command loads itself (drivers, numba for huge jobs) is counted in full, and
# test_fresh_process_measurement_agrees repeats a few cases the plain way.
FORK_SERVER = r"""
import json, os, select, signal, sys, time
import imgkit.api, imgkit.cli, imgkit.engine
for line in sys.stdin:
    request = json.loads(line)
    err_r, err_w = os.pipe()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os.close(err_r)
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0); os.dup2(null, 1); os.dup2(err_w, 2)
        code = 99
        try:
            imgkit.cli.main(request["args"])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        finally:
            try:
                sys.stdout.flush(); sys.stderr.flush()
            finally:
                os._exit(code)
    os.close(err_w)
    os.set_blocking(err_r, False)
    chunks, timed_out = [], False
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() - start > request["timeout"]:
            os.kill(pid, signal.SIGKILL)
            done, status, usage = os.wait4(pid, 0)
            timed_out = True
            break
        if select.select([err_r], [], [], 0.02)[0]:
            chunks.append(os.read(err_r, 65536))
    while True:
        try:
            piece = os.read(err_r, 65536)
        except BlockingIOError:
            break
        if not piece:
            break
        chunks.append(piece)
    os.close(err_r)
    code = None if timed_out else os.waitstatus_to_exitcode(status)
    print(json.dumps({"rc": code, "seconds": time.monotonic() - start, "max_rss_kib": usage.ru_maxrss,
                      "stderr": b"".join(chunks).decode(errors="replace")}), flush=True)
"""


class ForkServer:
    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", FORK_SERVER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def run(self, args: list, timeout: float = HANG_GUARD_S) -> dict:
        self.proc.stdin.write(json.dumps({"args": [str(a) for a in args], "timeout": timeout}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the fork server died")
        return json.loads(line)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def runner():
    server = ForkServer()
    yield server.run
    server.close()


# ---- base images (real, from qemu-img) ------------------------------------------------------


def source_raw(path: Path) -> Path:
    """4 MiB with data at 0 (64 KiB), at 1 MiB + 4 KiB (8 KiB) and in the last sector."""
    with open(path, "wb") as f:
        f.truncate(4 * MiB)
        f.write(bytes(range(256)) * 256)
        f.seek(MiB + 4 * KiB)
        f.write(b"\x5a" * 8 * KiB)
        f.seek(4 * MiB - 512)
        f.write(b"\xaa" * 512)
    return path


BASES = {
    "qcow2": ["-O", "qcow2"],
    "qcow2c": ["-c", "-O", "qcow2"],
    "vhd": ["-O", "vpc"],
    "vhdfixed": ["-O", "vpc", "-o", "subformat=fixed"],
    "vmdk": ["-O", "vmdk"],
    "vmdkstream": ["-O", "vmdk", "-o", "subformat=streamOptimized"],
}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    if qemu_img_path() is None:
        pytest.skip("qemu-img not installed (the hostile files start from qemu-made images)")
    folder = tmp_path_factory.mktemp("bases")
    src = source_raw(folder / "src.raw")
    out = {"raw": src.read_bytes()}
    for name, args in BASES.items():
        dst = folder / name
        qemu("convert", "-f", "raw", *args, str(src), str(dst))
        out[name] = dst.read_bytes()
    return out


# ---- patching helpers (offsets from formats.md) ---------------------------------------------


def put(buf: bytearray, offset: int, fmt: str, value: int) -> None:
    if offset < 0:
        offset += len(buf)
    struct.pack_into(fmt, buf, offset, value)


def be64(buf, off): return struct.unpack_from(">Q", buf, off)[0]
def be32(buf, off): return struct.unpack_from(">I", buf, off)[0]
def le64(buf, off): return struct.unpack_from("<Q", buf, off)[0]
def le32(buf, off): return struct.unpack_from("<I", buf, off)[0]


def qcow2_l1(buf) -> int:
    return be64(buf, 40)


def qcow2_l2(buf) -> int:
    return be64(buf, qcow2_l1(buf)) & 0x00FFFFFFFFFFFE00


def vhd_checksums(buf: bytearray) -> None:
    """Recompute footer (both copies) and dynamic-header checksums, so a patch is not refused early."""
    for at in (0, len(buf) - 512):
        if buf[at:at + 8] == b"conectix":
            put(buf, at + 64, ">I", 0)
            put(buf, at + 64, ">I", ~sum(buf[at:at + 512]) & 0xFFFFFFFF)
    header = be64(buf, 16) if buf[:8] == b"conectix" else None
    if header is not None and header + 1024 <= len(buf) and buf[header:header + 8] == b"cxsparse":
        put(buf, header + 36, ">I", 0)
        put(buf, header + 36, ">I", ~sum(buf[header:header + 1024]) & 0xFFFFFFFF)


def vhd_dyn(buf) -> int:
    return 512


def vhd_bat(buf) -> int:
    return be64(buf, 512 + 16)


def vmdk_gd(buf) -> int:
    return le64(buf, 56) * 512


def vmdk_gt(buf) -> int:
    return le32(buf, vmdk_gd(buf)) * 512


def vmdk_first_grain(buf) -> int:
    return le32(buf, vmdk_gt(buf)) * 512


@dataclass(frozen=True)
class Case:
    name: str
    base: str
    edit: Callable[[bytearray], bytes | bytearray | None]
    what: str
    core: bool = True                    # False: runs only in long mode

    @property
    def driver(self) -> str:
        """The module under imgkit.formats that must exist for this case to run."""
        return {"qcow2c": "qcow2", "vhdfixed": "vhd", "vmdkstream": "vmdk"}.get(self.base, self.base)


CASES: list[Case] = []


def case(name: str, base: str, what: str):
    def register(fn):
        CASES.append(Case(name, base, fn, what))
        return fn
    return register


def field(name: str, base: str, offset, fmt: str, value: int, what: str, fix=None, core=True):
    """A case that writes value at offset (an int, or a function of the buffer)."""
    def edit(buf):
        put(buf, offset(buf) if callable(offset) else offset, fmt, value)
        if fix:
            fix(buf)
    CASES.append(Case(name, base, edit, what, core))


def fields(prefix: str, base: str, offset, fmt: str, values, what: str, fix=None):
    """One case per value; the first value (the nastiest) runs in CI, the others in long mode."""
    for i, value in enumerate(values):
        shown = value if value < 1 << 16 else f"{value:#x}"
        field(f"{prefix}={shown}", base, offset, fmt, value, what, fix, core=(i == 0))


def truncations(base: str, points: list[int], core: int = 3):
    """The file cut at each point (negative: from the end); the first `core` points run in CI."""
    for i, point in enumerate(points):
        def edit(buf, point=point):
            return buf[:point] if point >= 0 else buf[:len(buf) + point]
        label = f"-{-point}" if point < 0 else str(point)
        CASES.append(Case(f"{base}.truncated@{label}", base, edit, f"file cut to {label} bytes", i < core))


# qcow2 header (§1.1, BE)
fields("qcow2.version", "qcow2", 4, ">I", (U32, 0, 2),
       "unknown version")
fields("qcow2.cluster_bits", "qcow2", 20, ">I", (U32, 63, 0, 8, 22),
       "cluster size out of range")
fields("qcow2.size", "qcow2", 24, ">Q", (U64, U63, 1 << 63, 1 << 62),
       "virtual size beyond limits")
field("qcow2.size=2^50 (l1 too small)", "qcow2", 24, ">Q", 1 << 50, "size needs a bigger L1 than l1_size")
fields("qcow2.crypt_method", "qcow2", 32, ">I", (U32, 1, 2),
       "encryption")
fields("qcow2.l1_size", "qcow2", 36, ">I", (U32, (1 << 31) - 1, 1 << 22),
       "huge L1 table")
fields("qcow2.l1_table_offset", "qcow2", 40, ">Q", (U64 - 0xFFFF, 0x30001, 1 << 62, 0),
       "L1 outside file / unaligned")
fields("qcow2.refcount_table_offset", "qcow2", 48, ">Q", (1 << 62, 0x10001, 0),
       "refcount table outside file")
fields("qcow2.refcount_table_clusters", "qcow2", 56, ">I", (U32, (1 << 31) - 1),
       "huge refcount table")
fields("qcow2.nb_snapshots", "qcow2", 60, ">I", (U32, 65537),
       "huge snapshot count")
field("qcow2.snapshots_offset=past EOF", "qcow2", 64, ">Q", 1 << 60, "snapshot table outside file")
fields("qcow2.incompatible", "qcow2", 72, ">Q", (U64, 1 << 2, 1 << 4, 1 << 40),
       "unknown/unsupported feature bits")
fields("qcow2.refcount_order", "qcow2", 96, ">I", (U32, 7, 99),
       "refcount width out of range")
fields("qcow2.header_length", "qcow2", 100, ">I", (U32, 8, 105, 1 << 20),
       "header length out of range")
field("qcow2.extension_length=2^32-1", "qcow2", 0x74, ">I", U32, "header extension runs past the cluster")


@case("qcow2.backing_name_length=2^32-1", "qcow2", "backing name beyond the header cluster")
def _(buf):
    put(buf, 8, ">Q", 0x200)
    put(buf, 16, ">I", U32)


@case("qcow2.backing=/etc/passwd", "qcow2", "backing file (refused for data, reported by info)")
def _(buf):
    name = b"/etc/passwd"
    put(buf, 8, ">Q", 0x300)
    put(buf, 16, ">I", len(name))
    buf[0x300:0x300 + len(name)] = name


@case("qcow2.external_data_file=/etc/passwd", "qcow2",
      "external data file (CVE-2024-32498 pattern)")
def _(buf):
    put(buf, 72, ">Q", 1 << 2)
    name = b"/etc/passwd"
    ext = struct.pack(">II", 0x44415441, len(name)) + name + bytes(-len(name) % 8) + bytes(8)
    buf[0x70:0x70 + len(ext)] = ext


field("qcow2.L1[0]=past EOF", "qcow2", qcow2_l1, ">Q", (1 << 63) | (1 << 40), "L2 table outside file")
field("qcow2.L1[0]=unaligned", "qcow2", qcow2_l1, ">Q", (1 << 63) | 0x40200, "L2 table not cluster-aligned")
field("qcow2.L1[0]=2^64-1", "qcow2", qcow2_l1, ">Q", U64, "reserved bits set in L1 entry")
field("qcow2.L2[0]=past EOF", "qcow2", qcow2_l2, ">Q", (1 << 63) | (1 << 40),
      "data cluster outside the file (read error mid-convert)")
field("qcow2.L2[0]=2^64-1", "qcow2", qcow2_l2, ">Q", U64, "reserved bits / compressed+copied")
field("qcow2.L2[0]=header cluster", "qcow2", qcow2_l2, ">Q", (1 << 63) | 0, "points at cluster 0 (as unallocated)")
field("qcow2.L2[0]=metadata overlap", "qcow2", qcow2_l2, ">Q", (1 << 63) | 0x10000, "data over the refcount table")
field("qcow2.L2[0]=unaligned", "qcow2", qcow2_l2, ">Q", (1 << 63) | 0x50200, "data cluster not aligned")


@case("qcow2.L1 all -> one L2", "qcow2", "every L1 entry names the same L2 table")
def _(buf):
    l1 = qcow2_l1(buf)
    l1_size = 64
    put(buf, 36, ">I", l1_size)
    put(buf, 24, ">Q", l1_size * 8192 * 65536)     # 32 GiB virtual
    entry = be64(buf, l1)
    for i in range(l1_size):
        put(buf, l1 + 8 * i, ">Q", entry)


def compressed_entry(offset: int, sectors: int, cluster_bits: int = 16) -> int:
    x = 62 - (cluster_bits - 8)
    return (1 << 62) | (sectors << x) | offset


field("qcow2c.L2[0]=compressed past EOF", "qcow2c", qcow2_l2, ">Q", compressed_entry(1 << 40, 3),
      "compressed data outside file")
field("qcow2c.L2[0]=compressed max sectors", "qcow2c", qcow2_l2, ">Q", compressed_entry(0x50000, 0xFF),
      "compressed length beyond the file end")
field("qcow2c.L2[0]=compressed at header", "qcow2c", qcow2_l2, ">Q", compressed_entry(0, 1),
      "garbage deflate stream")
field("qcow2c.compression_type=7", "qcow2c", 104, ">B", 7, "unknown compression type", fix=None)


@case("qcow2c.deflate bomb", "qcow2c", "compressed cluster inflates beyond a cluster")
def _(buf):
    import zlib
    comp = zlib.compressobj(9, zlib.DEFLATED, -12)
    bomb = comp.compress(bytes(64 * MiB)) + comp.flush()
    at = len(buf)
    buf += bomb + bytes(-len(bomb) % 512)
    put(buf, qcow2_l2(buf), ">Q", compressed_entry(at, len(bomb) // 512))


truncations("qcow2", [71, 0x40000 + 100, -65536, 4, 8, 103, 0x10000 + 8, 0x30004, 0x50000 + 4096])
truncations("qcow2c", [0x40000 + 100, -100])

# VHD dynamic (§2.1 footer, §2.4 dynamic header; BE; checksums recomputed)
fields("vhd.current_size", "vhd", 48, ">Q", (U64, 1 << 63, 1 << 50, 3 * 512),
       "virtual size beyond limits", fix=vhd_checksums)
fields("vhd.disk_type", "vhd", 60, ">I", (U32, 4, 0, 1, 5),
       "unknown/differencing disk type", fix=vhd_checksums)
fields("vhd.data_offset", "vhd", 16, ">Q", (U64 - 511, 1 << 40, 0, 511),
       "dynamic header outside file", fix=vhd_checksums)
field("vhd.geometry=max", "vhd", 56, ">I", (65535 << 16) | (16 << 8) | 255, "max geometry (size from footer)",
      fix=vhd_checksums)
field("vhd.footer checksum wrong", "vhd", 64, ">I", 0x12345678, "bad checksum")
fields("vhd.table_offset", "vhd", 512 + 16, ">Q", (U64, 1 << 40, 3),
       "BAT outside file", fix=vhd_checksums)
fields("vhd.max_table_entries", "vhd", 512 + 28, ">I", (U32, (1 << 31), 1 << 24),
       "huge BAT", fix=vhd_checksums)
field("vhd.max_table_entries=0", "vhd", 512 + 28, ">I", 0, "BAT smaller than the disk", fix=vhd_checksums)
fields("vhd.block_size", "vhd", 512 + 32, ">I", (U32, 0, 3, 256, 1 << 31, 1 << 30),
       "block size out of range", fix=vhd_checksums)
field("vhd.BAT[0]=past EOF", "vhd", vhd_bat, ">I", 0xFFFFFFFE, "block outside file (read error mid-convert)")
field("vhd.BAT[0]=0 (footer copy)", "vhd", vhd_bat, ">I", 0, "block overlapping the footer copy")
field("vhd.BAT[0]=BAT itself", "vhd", vhd_bat, ">I", 3, "block overlapping the BAT")


@case("vhd.BAT all -> one block", "vhd", "every BAT entry names the same block")
def _(buf):
    bat = vhd_bat(buf)
    first = be32(buf, bat)
    for i in range(be32(buf, 512 + 28)):
        put(buf, bat + 4 * i, ">I", first)


@case("vhd.differencing parent=/etc/passwd", "vhd", "differencing disk with a parent locator")
def _(buf):
    for at in (0, len(buf) - 512):
        put(buf, at + 60, ">I", 4)
    name = "/etc/passwd".encode("utf-16-be")
    buf[512 + 64:512 + 64 + len(name)] = name
    vhd_checksums(buf)


truncations("vhd", [511, 1536 + 4, -(2 * MiB), 8, 512, 1024, 4096, -512, -1])
fields("vhdfixed.current_size", "vhdfixed", -512 + 48, ">Q", (U64, 1 << 45, 8 * MiB),
       "fixed disk claims more than the file holds", fix=vhd_checksums)
field("vhdfixed.disk_type=3 (no header)", "vhdfixed", -512 + 60, ">I", 3, "dynamic footer at the tail only",
      fix=vhd_checksums)
truncations("vhdfixed", [-1, -513, 1024])

# VMDK monolithicSparse (§3.1 header, LE; GD/GT in sectors)
fields("vmdk.version", "vmdk", 4, "<I", (U32, 0, 4), "unknown version")
field("vmdk.flags=2^32-1", "vmdk", 8, "<I", U32, "unknown incompatible flags")
fields("vmdk.capacity", "vmdk", 12, "<Q", (U64, 1 << 63, 1 << 40, 1 << 33, 0),
       "capacity beyond limits / huge GD")
fields("vmdk.grainSize", "vmdk", 20, "<Q", (U64, 0, 3, 1 << 63, 1 << 32, 1 << 20),
       "grain size out of range")
fields("vmdk.descriptorOffset", "vmdk", 28, "<Q", (U64, 1 << 40),
       "descriptor outside file")
fields("vmdk.descriptorSize", "vmdk", 36, "<Q", (U64, 1 << 40),
       "huge descriptor")
fields("vmdk.numGTEsPerGT", "vmdk", 44, "<I", (U32, 0, 1, 1 << 20),
       "grain table size out of range")
fields("vmdk.gdOffset", "vmdk", 56, "<Q", (U64, 1 << 40, 0),
       "GD outside file / GD_AT_END without footer")
field("vmdk.compressAlgorithm=0xffff", "vmdk", 77, "<H", 0xFFFF, "unknown compression")
field("vmdk.GD[0]=past EOF", "vmdk", vmdk_gd, "<I", 0xFFFFFFF0, "grain table outside file")
field("vmdk.GT[0]=past EOF", "vmdk", vmdk_gt, "<I", 0xFFFFFFF0, "grain outside file (read error mid-convert)")
field("vmdk.GT[0]=header", "vmdk", vmdk_gt, "<I", 0, "grain 0 unallocated (fine)")
field("vmdk.GT[0]=2 (descriptor)", "vmdk", vmdk_gt, "<I", 2, "grain over the descriptor")


@case("vmdk.GD all -> one GT, capacity 2 TiB", "vmdk", "GD runs past EOF; the entries that fit all name GT 0")
def _(buf):
    gd = vmdk_gd(buf)
    first = le32(buf, gd)
    put(buf, 12, "<Q", 1 << 32)                     # 2 TiB, 128 GD entries of 32 MiB... capped by file
    entries = min((1 << 32) // (128 * 512), (vmdk_gt(buf) - gd) // 4)
    for i in range(entries):
        put(buf, gd + 4 * i, "<I", first)


def set_descriptor(buf: bytearray, text: bytes) -> None:
    start, size = le64(buf, 28) * 512, le64(buf, 36) * 512
    buf[start:start + size] = text.ljust(size, b"\0")[:size]


@case("vmdk.descriptor extent=/etc/passwd", "vmdk", "embedded descriptor names another file (CVE-2022-47951)")
def _(buf):
    set_descriptor(buf, b'# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n'
                        b'createType="monolithicFlat"\n\nRW 8192 FLAT "/etc/passwd" 0\n')


@case("vmdk.descriptor parent", "vmdk", "embedded descriptor with a parent (delta disk)")
def _(buf):
    set_descriptor(buf, b'# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=87654321\n'
                        b'parentFileNameHint="/etc/passwd"\ncreateType="monolithicSparse"\n\n'
                        b'RW 8192 SPARSE "x.vmdk"\n')


@case("vmdk.descriptor garbage", "vmdk", "descriptor of binary noise")
def _(buf):
    set_descriptor(buf, bytes((i * 37 + 11) % 256 for i in range(20 * 512)))


@case("vmdk-text.flat extent=/etc/passwd", "vmdk", "descriptor file naming /etc/passwd (CVE-2022-47951)")
def _(buf):
    return (b'# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n'
            b'createType="monolithicFlat"\n\n# Extent description\nRW 8192 FLAT "/etc/passwd" 0\n')


@case("vmdk-text.many extents", "vmdk", "descriptor with 100000 extent lines")
def _(buf):
    return (b'# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n'
            b'createType="twoGbMaxExtentSparse"\n\n' + b'RW 1 SPARSE "../../etc/shadow"\n' * 100000)


@case("vmdk-text.huge descriptor", "vmdk", "a 64 MiB text file starting with a descriptor line")
def _(buf):
    return b"# Disk DescriptorFile\nversion=1\n" + b"# padding line\n" * (64 * MiB // 15)


truncations("vmdk", [511, 27 * 512 + 100, -100, 4, 64, 512, 26 * 512 + 2, 64 * KiB + 100])

# VMDK streamOptimized (§3.5)
field("vmdkstream.grain size=2^32-1", "vmdkstream", lambda b: vmdk_first_grain(b) + 8, "<I", U32,
      "grain length beyond the file")
field("vmdkstream.grain lba=2^63", "vmdkstream", vmdk_first_grain, "<Q", 1 << 63, "grain LBA beyond the disk")
field("vmdkstream.grain size=0", "vmdkstream", lambda b: vmdk_first_grain(b) + 8, "<I", 0,
      "grain that parses as a marker")


@case("vmdkstream.zlib bomb", "vmdkstream", "grain inflating far beyond the grain size")
def _(buf):
    import zlib
    bomb = zlib.compress(bytes(64 * MiB), 9)
    at = len(buf) + (-len(buf) % 512)
    buf += bytes(at - len(buf)) + struct.pack("<QI", 0, len(bomb)) + bomb
    buf += bytes(-len(buf) % 512)
    put(buf, vmdk_gt(buf), "<I", at // 512)


@case("vmdkstream.corrupt deflate", "vmdkstream", "grain data that is not a zlib stream")
def _(buf):
    grain = vmdk_first_grain(buf)
    buf[grain + 12:grain + 64] = b"\xff" * 52


truncations("vmdkstream", [512, 64 * KiB + 20, -1024])

# raw: nothing to parse, but the same bounds apply
CASES.append(Case("raw.one byte", "raw", lambda buf: b"\x01", "one-byte disk"))
CASES.append(Case("raw.odd size", "raw", lambda buf: buf[:4 * MiB - 1], "size not a sector multiple"))


# ---- the test --------------------------------------------------------------------------------

RESULTS: list[dict] = []


def driver_missing(driver: str) -> str | None:
    if importlib.util.find_spec(f"imgkit.formats.{driver}") is None:
        return f"driver imgkit.formats.{driver} is not in this tree yet"
    return None


def build(case_: Case, bases: dict, folder: Path) -> Path:
    buf = bytearray(bases[case_.base])
    result = case_.edit(buf)
    data = bytes(buf if result is None else result)
    path = folder / "hostile.img"
    path.write_bytes(data)
    return path


def fingerprint(path: Path) -> tuple:
    st = path.stat()
    return st.st_size, st.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest()


def command_args(command: str, path: Path, folder: Path) -> list:
    return {"info": ["info", "--output", "json", path],
            "map": ["map", "--output", "json", path],
            "compare": ["compare", path, path],
            "convert": ["convert", "-O", "raw", path, folder / "out.raw"],
            "check": ["check", path],
            "validate": ["validate", "--output", "json", path]}[command]


@pytest.fixture(scope="module", autouse=True)
def report_table():
    """With IMGKIT_HOSTILE_REPORT=path: one markdown row per case (exit codes in COMMANDS order)."""
    yield
    target = os.environ.get("IMGKIT_HOSTILE_REPORT")
    if not target or not RESULTS:
        return
    rows: dict[tuple[str, int], list[dict]] = {}
    for r in RESULTS:
        runs = rows.setdefault((r["case"], r["fresh"]), [])
        runs.append(r)
    lines = [f"| case | what | exit ({'/'.join(COMMANDS)}) | max s | max MB | first refusal |",
             "|---|---|---|---|---|---|"]
    for (name, fresh), runs in rows.items():
        codes = "/".join(str(r["rc"]) for r in runs)
        message = next((r["message"] for r in runs if r["message"]), "")
        message = message.split(": ", 2)[-1] if message.startswith("imgkit: ") else message
        lines.append(f"| {name}{' (fresh process)' if fresh else ''} | {runs[0]['what']} | {codes} | "
                     f"{max(r['seconds'] for r in runs):.2f} | {max(r['rss_mb'] for r in runs):.0f} | "
                     f"{message[:90].replace('|', '/')} |")
    Path(target).write_text("\n".join(lines) + "\n")


def check_run(case_: Case, command: str, res: dict, path: Path, folder: Path, before: tuple) -> list[str]:
    """Record one run and list what is wrong with it."""
    rss_mb = res["max_rss_kib"] / 1024
    lines = res["stderr"].strip().splitlines()
    RESULTS.append({"case": case_.name, "what": case_.what, "command": command, "rc": res["rc"],
                    "seconds": res["seconds"], "rss_mb": rss_mb, "message": lines[-1] if lines else "",
                    "fresh": res.get("fresh", False)})
    problems = []
    if res["rc"] is None:
        problems.append(f"did not finish in {HANG_GUARD_S} s")
    elif res["rc"] not in ALLOWED[command]:
        problems.append(f"exit {res['rc']} not in {sorted(ALLOWED[command])}")
    if rss_mb > RSS_LIMIT_MB:
        problems.append(f"peak RSS {rss_mb:.0f} MB")
    if "Traceback" in res["stderr"] or "internal error" in res["stderr"] or len(lines) > 1:
        problems.append(f"stderr not one clean line: {res['stderr'][-400:]!r}")
    if command == "convert":
        leftovers = [p.name for p in folder.iterdir() if p.name.endswith(".imgkit-tmp")]
        if leftovers:
            problems.append(f"temp files left: {leftovers}")
        if res["rc"] != 0 and (folder / "out.raw").exists():
            problems.append("partial output left at the destination")
        (folder / "out.raw").unlink(missing_ok=True)
    if fingerprint(path) != before:
        problems.append("input file changed")
    return [f"{command}: {'; '.join(problems)}"] if problems else []


def run_case(case_: Case, bases: dict, folder: Path, run) -> None:
    reason = driver_missing(case_.driver)
    if reason:
        pytest.skip(reason)
    path = build(case_, bases, folder)
    before = fingerprint(path)
    failures = []
    for command in COMMANDS:
        failures += check_run(case_, command, run(command_args(command, path, folder)), path, folder, before)
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("case_", CASES, ids=[c.name for c in CASES])
def test_hostile_image_is_handled_in_bounds(request, tmp_path, bases, runner, case_):
    if not case_.core and not long_mode(request.config):
        pytest.skip("long mode only (--long or IMGKIT_FUZZ_LONG=1)")
    run_case(case_, bases, tmp_path, runner)


FRESH_PROCESS_CASES = ["qcow2.l1_size=0xffffffff", "qcow2c.deflate bomb", "vhd.max_table_entries=0xffffffff",
                       "vmdk.capacity=0xffffffffffffffff", "vmdkstream.zlib bomb", "vmdk-text.huge descriptor"]


@pytest.mark.parametrize("name", FRESH_PROCESS_CASES)
def test_fresh_process_measurement_agrees(tmp_path, bases, name):
    """The same property, measured the plain way: a fresh wrapper process per command."""
    case_, = [c for c in CASES if c.name == name]
    run_case(case_, bases, tmp_path, lambda args: dict(measured(args), fresh=True))


# ---- inputs that are not image files ---------------------------------------------------------


@pytest.mark.parametrize("kind", ["fifo", "directory", "char device", "symlink loop", "missing"])
def test_non_files_are_refused_at_once(tmp_path, kind):
    """A FIFO must not block waiting for a writer; devices and loops get one line and exit 66."""
    path = tmp_path / "input"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "char device":
        path = Path("/dev/zero")
    elif kind == "symlink loop":
        path.symlink_to(path)
    for command in (["info", path], ["convert", "-O", "raw", path, tmp_path / "out.raw"]):
        done = subprocess.run([sys.executable, "-m", "imgkit", *map(str, command)], capture_output=True,
                              text=True, timeout=HANG_GUARD_S)
        assert done.returncode == 66, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert not (tmp_path / "out.raw").exists()


def test_pread_never_allocates_more_than_the_file(tmp_path):
    from imgkit.io import ImageFile
    path = tmp_path / "small"
    path.write_bytes(b"x" * 1000)
    with ImageFile(path) as image:
        assert image.pread(1 << 62, 10) == b"x" * 990
        assert image.pread(U64, 0) == b"x" * 1000
        assert image.pread(10, 1 << 62) == b""
