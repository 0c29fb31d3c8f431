"""Fuzzing: imgkit's own images, mutated, never make an operation fail with anything but an ImgkitError.

Valid images of every format come from imgkit's writers (api.convert of seeded random sparse raw
disks). Hypothesis then patches header fields with boundary integers (0, 1, 2^31-1, 2^32-1,
2^63-1, 2^64-1 and neighbours), table entries (L1/L2, BAT, GD/GT), VMDK stream markers, random
bytes, or truncates the file. Property: info, map, check, compare and convert-to-raw either
succeed with consistent output (the map covers the disk in order, the converted raw compares equal
to the image) or raise ImgkitError. Anything else, or an operation still running after
GUARD_SECONDS, is a finding.

CI runs a bounded number of examples; `pytest --long tests/test_fuzz.py` (or IMGKIT_FUZZ_LONG=1)
runs for minutes. Findings become entries of REGRESSIONS below (byte patches, derived from the
image's own tables so they survive a writer's layout change).

The differential test checks valid images against qemu-img: `qemu-img compare` reads our file as
the same disk as its source, and our map's data ranges are qemu-img map's.
"""
from __future__ import annotations

import importlib.util
import json
import os
import random
import signal
import struct
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from imgkit import api
from imgkit.errors import ImgkitError

from conftest import long_mode, qemu, write_sparse

KiB, MiB = 1 << 10, 1 << 20
GUARD_SECONDS = 30
CI_EXAMPLES = 25
LONG_EXAMPLES = 3000
BOUNDARIES = [0, 1, 2, 511, 512, (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 32, (1 << 63) - 1, 1 << 63,
              (1 << 64) - 1]

# Variant -> (writer format, writer options, qemu-img format name).
VARIANTS = {
    "raw": ("raw", {}, "raw"),
    "qcow2": ("qcow2", {}, "qcow2"),
    "qcow2-v2": ("qcow2", {"compat": "0.10"}, "qcow2"),
    "qcow2-compressed": ("qcow2", {"compress": "on"}, "qcow2"),
    "qcow2-512-rb1": ("qcow2", {"cluster_size": "512", "refcount_bits": "1"}, "qcow2"),
    "vhd": ("vhd", {}, "vpc"),
    "vhd-fixed": ("vhd", {"subformat": "fixed"}, "vpc"),
    "vhd-4k-blocks": ("vhd", {"block_size": "4K"}, "vpc"),
    "vmdk": ("vmdk", {}, "vmdk"),
    "vmdk-stream": ("vmdk", {"subformat": "streamOptimized"}, "vmdk"),
}

# Header fields: (offset, width, byte order); negative offsets count from the end of the file.
QCOW2_FIELDS = [(4, 4, ">"), (8, 8, ">"), (16, 4, ">"), (20, 4, ">"), (24, 8, ">"), (32, 4, ">"), (36, 4, ">"),
                (40, 8, ">"), (48, 8, ">"), (56, 4, ">"), (60, 4, ">"), (64, 8, ">"), (72, 8, ">"),
                (80, 8, ">"), (88, 8, ">"), (96, 4, ">"), (100, 4, ">"), (104, 1, ">")]
VHD_FOOTER = [(16, 8), (40, 8), (48, 8), (56, 4), (60, 4), (64, 4), (84, 1)]
VHD_FIELDS = ([(-512 + off, w, ">") for off, w in VHD_FOOTER] + [(off, w, ">") for off, w in VHD_FOOTER]
              + [(512 + off, w, ">") for off, w in ((8, 8), (16, 8), (24, 4), (28, 4), (32, 4), (36, 4))])
VMDK_FIELDS = [(4, 4, "<"), (8, 4, "<"), (12, 8, "<"), (20, 8, "<"), (28, 8, "<"), (36, 8, "<"), (44, 4, "<"),
               (48, 8, "<"), (56, 8, "<"), (64, 8, "<"), (77, 2, "<")]
FIELDS = {"raw": [], "qcow2": QCOW2_FIELDS, "vhd": VHD_FIELDS, "vmdk": VMDK_FIELDS}


def have_driver(name: str) -> bool:
    return importlib.util.find_spec(f"imgkit.formats.{name}") is not None


# ---- where the tables are (best effort: a mutated file may make these fail) -------------------


def qcow2_tables(data: bytes) -> list[tuple[int, int, str]]:
    """(offset, count, order) of u64 entries: L1, the L2 tables it names, the refcount table."""
    cluster = 1 << struct.unpack_from(">I", data, 20)[0]
    l1_off, = struct.unpack_from(">Q", data, 40)
    l1_size, = struct.unpack_from(">I", data, 36)
    tables = [(l1_off, min(l1_size, 4096), ">Q"), (struct.unpack_from(">Q", data, 48)[0], 64, ">Q")]
    for i in range(min(l1_size, 64)):
        if l1_off + 8 * i + 8 <= len(data):
            l2 = struct.unpack_from(">Q", data, l1_off + 8 * i)[0] & 0x00FFFFFFFFFFFE00
            if l2:
                tables.append((l2, cluster // 8, ">Q"))
    return tables


def vhd_tables(data: bytes) -> list[tuple[int, int, str]]:
    if data[:8] != b"conectix":
        return []
    header, = struct.unpack_from(">Q", data, 16)
    bat, = struct.unpack_from(">Q", data, header + 16)
    entries, = struct.unpack_from(">I", data, header + 28)
    return [(bat, min(entries, 4096), ">I")]


def vmdk_tables(data: bytes) -> list[tuple[int, int, str]]:
    """The GD and the grain tables it names; a stream with GD_AT_END takes gdOffset from its footer."""
    header = data[:512]
    if struct.unpack_from("<Q", header, 56)[0] == (1 << 64) - 1 and len(data) >= 1536:
        header = data[-1024:-512]
    capacity, grain = struct.unpack_from("<QQ", header, 12)
    per_gt, = struct.unpack_from("<I", header, 44)
    gd = struct.unpack_from("<Q", header, 56)[0] * 512
    gd_entries = -(-capacity // (grain * per_gt))
    tables = [(gd, min(gd_entries, 4096), "<I")]
    for i in range(min(gd_entries, 8)):
        if gd + 4 * i + 4 <= len(data):
            gt = struct.unpack_from("<I", data, gd + 4 * i)[0] * 512
            if gt:
                tables.append((gt, per_gt, "<I"))
    return tables


TABLES = {"raw": lambda d: [], "qcow2": qcow2_tables, "vhd": vhd_tables, "vmdk": vmdk_tables}


def tables_of(fmt: str, data: bytes) -> list[tuple[int, int, str]]:
    try:
        found = TABLES[fmt](data)
    except (struct.error, OverflowError, ValueError, ZeroDivisionError):
        return []
    return [(off, n, order) for off, n, order in found if n > 0 and 0 <= off < len(data)]


def entries_of(data: bytes, tables: list[tuple[int, int, str]]) -> list[int]:
    """Non-zero entry values present in the tables (a duplicate of one is a classic corruption)."""
    values = []
    for offset, count, kind in tables:
        width = struct.calcsize(kind)
        for i in range(min(count, 512)):
            at = offset + i * width
            if at + width <= len(data):
                value = struct.unpack_from(kind, data, at)[0]
                if value and value not in values:
                    values.append(value)
    return values[:64]


# ---- patches ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Patch:
    """Write data at offset (negative: from the end), or cut the file to `truncate` bytes."""
    offset: int = 0
    data: bytes = b""
    truncate: int | None = None

    def apply(self, buf: bytearray) -> bytearray:
        if self.truncate is not None:
            return buf[:self.truncate]
        offset = self.offset + len(buf) if self.offset < 0 else self.offset
        if 0 <= offset <= len(buf):
            buf[offset:offset + len(self.data)] = self.data
        return buf


def packed(value: int, width: int, order: str) -> bytes:
    return (value & ((1 << (8 * width)) - 1)).to_bytes(width, "big" if order == ">" else "little")


def integers_for(width: int):
    top = (1 << (8 * width)) - 1
    return st.one_of(st.sampled_from([b & top for b in BOUNDARIES]),
                     st.integers(0, top),
                     st.sampled_from(BOUNDARIES).flatmap(lambda b: st.integers(-2, 2).map(lambda d: (b + d) & top)))


@st.composite
def field_patch(draw, fmt: str, size: int):
    if not FIELDS[fmt]:
        return draw(random_patch(size))
    offset, width, order = draw(st.sampled_from(FIELDS[fmt]))
    return Patch(offset, packed(draw(integers_for(width)), width, order))


@st.composite
def table_patch(draw, size: int, tables: list[tuple[int, int, str]], existing: list[int]):
    if not tables:
        return draw(random_patch(size))
    offset, count, kind = draw(st.sampled_from(tables))
    width = struct.calcsize(kind)
    index = draw(st.integers(0, count - 1))
    order = kind[0]
    choices = [integers_for(width),
               st.integers(0, size + 4 * MiB),                     # inside / just past the file
               st.integers(0, size // 512 + 64),                   # as a sector number
               st.sampled_from([size, size - 512, size // 512])]
    if existing:
        choices.append(st.sampled_from(existing))                  # a second entry naming the same thing
    value = draw(st.one_of(*choices))
    return Patch(offset + index * width, packed(value, width, order))


@st.composite
def marker_patch(draw, size: int):
    """A VMDK-style marker or grain header (u64, u32, u32) at a sector boundary or in the tail."""
    sectors = max(1, size // 512)
    where = draw(st.one_of(st.integers(0, sectors - 1).map(lambda s: s * 512),
                           st.integers(-1536, -1).map(lambda o: o - o % 512 if o % 512 else o)))
    value = draw(integers_for(8))
    size = draw(st.sampled_from([0, 1, 0xFFFFFFFF, draw(st.integers(0, 1 << 20))]))
    kind = draw(st.sampled_from([0, 1, 2, 3, 4, 0xFFFFFFFF]))
    return Patch(where, struct.pack("<QII", value, size, kind))


@st.composite
def random_patch(draw, size: int):
    offset = draw(st.one_of(st.integers(0, min(size, 4096)), st.integers(0, max(size - 1, 0))))
    return Patch(offset, draw(st.binary(min_size=1, max_size=16)))


@st.composite
def truncation(draw, size: int):
    return Patch(truncate=draw(st.one_of(st.integers(0, min(size, 2048)), st.integers(0, size))))


def mutations(fmt: str, size: int, tables: list[tuple[int, int, str]], existing: list[int]):
    one = st.one_of(field_patch(fmt, size), field_patch(fmt, size), table_patch(size, tables, existing),
                    table_patch(size, tables, existing), marker_patch(size), random_patch(size),
                    truncation(size))
    return st.lists(one, min_size=1, max_size=3)


# ---- valid images from imgkit's writers -------------------------------------------------------


def random_layout(seed: int) -> tuple[int, list[tuple[int, bytes]]]:
    """A sparse disk: any size that is a multiple of 512, a few runs of random or repeated bytes."""
    rng = random.Random(seed)
    size = rng.choice([1, 2, 5, 6]) * MiB + rng.choice([0, 512, 64 * KiB, 3 * 512])
    runs = []
    for _ in range(rng.randint(0, 6)):
        length = rng.randint(1, 300 * KiB)
        offset = rng.randrange(0, size - length)
        runs.append((offset, rng.randbytes(length) if rng.random() < 0.7 else bytes([rng.randint(1, 255)]) * length))
    return size, runs


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """Per variant, three valid images made by imgkit's writers from seeded random raw disks."""
    folder = tmp_path_factory.mktemp("pool")
    images: dict[str, list[tuple[Path, Path]]] = {}
    for variant, (fmt, options, _) in VARIANTS.items():
        if not have_driver(fmt):
            continue
        images[variant] = []
        for seed in range(3):
            raw = folder / f"{variant}-{seed}.source"
            size, runs = random_layout(zlib.crc32(f"{variant}-{seed}".encode()))
            write_sparse(raw, size, runs)
            image = folder / f"{variant}-{seed}.image"
            api.convert(raw, image, fmt, options=dict(options))
            images[variant].append((raw, image))
    return images


# ---- the property -----------------------------------------------------------------------------


class GuardTimeout(Exception):
    """Not an ImgkitError on purpose: an operation that runs this long is a finding."""


@contextmanager
def guard(seconds: float = GUARD_SECONDS):
    def expire(signum, frame):
        raise GuardTimeout(f"operation still running after {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def check_map(path: Path) -> int:
    with api.open_image(path) as reader:
        size = reader.virtual_size
        pos = 0
        for entry in api.map_entries(reader):
            assert entry["start"] == pos and entry["length"] > 0, (entry, pos)
            pos += entry["length"]
        assert pos == size, f"map covers {pos} of {size} bytes"
        pos = 0
        for ext in reader.extents(0, size):
            assert ext.offset == pos and ext.length >= 0
            pos = ext.end
        assert pos == size
    return size


def exercise(path: Path, reference: Path, out: Path) -> dict:
    """Run every operation; return what succeeded. Non-ImgkitError exceptions propagate."""
    outcome = {}
    operations = {
        "info": lambda: api.info(path),
        "map": lambda: check_map(path),
        "check": lambda: api.check(path),
        "compare": lambda: api.compare(path, reference),
        "convert": lambda: api.convert(path, out, "raw", force=True),
    }
    for name, operation in operations.items():
        try:
            with guard():
                outcome[name] = operation()
        except ImgkitError as exc:
            assert "\n" not in exc.message, exc.message
            outcome[name] = exc
    info, size, converted = outcome["info"], outcome["map"], outcome["convert"]
    if not isinstance(info, Exception) and not isinstance(size, Exception):
        assert info["virtual-size"] == size
    if not isinstance(converted, Exception):
        assert os.path.getsize(out) == converted["virtual-size"]
        with guard():
            again = api.compare(out, path, fmt_a="raw")
        assert again.identical, f"convert output differs from the image it came from: {again.message}"
    return outcome


def mutate(image: Path, patches: list[Patch], target: Path) -> Path:
    buf = bytearray(image.read_bytes())
    for patch in patches:
        buf = patch.apply(buf)
    target.write_bytes(bytes(buf))
    return target


def run_fuzz(pool: dict, variant: str, tmp: Path, examples: int) -> None:
    fmt = VARIANTS[variant][0]
    images = pool[variant]
    shapes = []
    for _, image in images:
        data = image.read_bytes()
        tables = tables_of(fmt, data)
        shapes.append((len(data), tables, entries_of(data, tables)))

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(data=st.data())
    def fuzz(data):
        index = data.draw(st.integers(0, len(images) - 1), label="base")
        raw, image = images[index]
        patches = data.draw(mutations(fmt, *shapes[index]), label="patches")
        target = mutate(image, patches, tmp / "mutated.img")
        exercise(target, raw, tmp / "out.raw")

    fuzz()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_mutated_images_fail_only_with_imgkit_errors(request, tmp_path, pool, variant):
    if variant not in pool:
        pytest.skip(f"driver imgkit.formats.{VARIANTS[variant][0]} is not in this tree yet")
    run_fuzz(pool, variant, tmp_path, LONG_EXAMPLES if long_mode(request.config) else CI_EXAMPLES)


# ---- findings, kept as regressions ----------------------------------------------------------

def duplicate_first_entry(fmt: str, table: int = -1):
    """Patches that copy the first non-zero entry of a table over the next entry."""
    def patches(data: bytes) -> list[Patch]:
        offset, count, kind = tables_of(fmt, data)[table]
        width = struct.calcsize(kind)
        for i in range(count - 1):
            entry = data[offset + i * width:offset + (i + 1) * width]
            if any(entry):
                return [Patch(offset + (i + 1) * width, entry)]
        return []
    return patches


# (variant, pool index, why, patches from the image's bytes). Each is a crash once found in a driver
# (by this fuzzer, its --long runs, or by hand) and kept here so it stays fixed. The --long runs of
# 14:01 UTC (3000 examples per variant, 36,000 mutated images) found nothing new.
REGRESSIONS = [
    ("qcow2-compressed", 0, "two L2 entries naming one compressed cluster (ValueError in readinto, 33afe87)",
     duplicate_first_entry("qcow2")),
    ("qcow2", 0, "two L2 entries naming one data cluster", duplicate_first_entry("qcow2")),
    ("vhd", 0, "two BAT entries naming one block", duplicate_first_entry("vhd", 0)),
    ("vmdk", 0, "two grain table entries naming one grain", duplicate_first_entry("vmdk", 1)),
    ("vmdk-stream", 0, "two grain table entries naming one compressed grain", duplicate_first_entry("vmdk", 1)),
]


@pytest.mark.parametrize("variant,index,why,make_patches", REGRESSIONS, ids=[r[2][:50] for r in REGRESSIONS])
def test_fuzz_regressions(tmp_path, pool, variant, index, why, make_patches):
    if variant not in pool:
        pytest.skip(f"driver for {variant} is not in this tree yet")
    candidates = [pool[variant][index]] + pool[variant]          # the first image whose tables allow it
    raw, image, patches = next(((raw, image, p) for raw, image in candidates
                                if (p := make_patches(image.read_bytes()))), (None, None, []))
    assert patches, f"no pool image of {variant} has a table entry to duplicate"
    exercise(mutate(image, patches, tmp_path / "mutated.img"), raw, tmp_path / "out.raw")


# ---- differential check against qemu-img ----------------------------------------------------


def data_ranges(entries: list[dict]) -> list[tuple[int, int]]:
    """Merged [start, end) ranges of map entries that hold data."""
    ranges: list[tuple[int, int]] = []
    for e in entries:
        if not e["data"]:
            continue
        start, end = e["start"], e["start"] + e["length"]
        if ranges and ranges[-1][1] == start:
            ranges[-1] = (ranges[-1][0], end)
        else:
            ranges.append((start, end))
    return ranges


# Known, explained divergences: our data ranges are a subset of qemu-img's.
SUBSET_MAPS = {
    "vhd-fixed": "qemu's vpc driver reports every byte of a fixed disk as data; imgkit asks the file "
                 "system (SEEK_DATA/SEEK_HOLE), so holes in the file map as zero",
}


def covered(inner: list[tuple[int, int]], outer: list[tuple[int, int]]) -> bool:
    """Every range of inner lies inside some range of outer."""
    return all(any(o_start <= start and end <= o_end for o_start, o_end in outer) for start, end in inner)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_valid_images_agree_with_qemu_img(request, tmp_path, qemu_img, variant):
    fmt, options, qemu_fmt = VARIANTS[variant]
    if not have_driver(fmt):
        pytest.skip(f"driver imgkit.formats.{fmt} is not in this tree yet")

    @settings(max_examples=40 if long_mode(request.config) else 4, deadline=None, database=None)
    @given(seed=st.integers(0, 1 << 30))
    def differential(seed):
        raw, image = tmp_path / "src.raw", tmp_path / "ours.image"
        size, runs = random_layout(seed)
        write_sparse(raw, size, runs)
        api.convert(raw, image, fmt, options=dict(options), force=True)
        assert qemu("compare", "-q", "-f", "raw", "-F", qemu_fmt, str(raw), str(image), check=False).returncode == 0
        ours_raw = tmp_path / "ours.raw"
        api.convert(image, ours_raw, "raw", force=True)
        assert qemu("compare", "-q", "-f", "raw", "-F", qemu_fmt, str(ours_raw), str(image),
                    check=False).returncode == 0
        theirs = json.loads(qemu("map", "--output=json", "-f", qemu_fmt, str(image)).stdout)
        with api.open_image(image) as reader:
            ours = list(api.map_entries(reader))
        if variant in SUBSET_MAPS:
            assert covered(data_ranges(ours), data_ranges(theirs)), SUBSET_MAPS[variant]
        else:
            assert data_ranges(ours) == data_ranges(theirs)

    differential()
