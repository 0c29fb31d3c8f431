"""Hostile and damaged QCOW2 images: every case ends in a clean ImgkitError or a check finding,
never a traceback, a huge allocation or a hang."""
from __future__ import annotations

import shutil
import signal
import struct
from contextlib import contextmanager

import pytest

from conftest import qemu, run_cli
from imgkit import api
from imgkit.errors import ImgkitError, InvalidImage
from imgkit.formats import qcow2
from imgkit.io import ImageFile
from test_qcow2_read import unpack_fixtures

BOUNDARY = [0, 1, 2**31 - 1, 2**32 - 1, 2**63 - 1, 2**64 - 1]
HEADER_FIELDS = {   # name: (offset, width in bytes)
    "version": (4, 4), "backing_file_offset": (8, 8), "backing_file_size": (16, 4),
    "cluster_bits": (20, 4), "size": (24, 8), "crypt_method": (32, 4), "l1_size": (36, 4),
    "l1_table_offset": (40, 8), "refcount_table_offset": (48, 8), "refcount_table_clusters": (56, 4),
    "nb_snapshots": (60, 4), "snapshots_offset": (64, 8), "incompatible_features": (72, 8),
    "compatible_features": (80, 8), "autoclear_features": (88, 8), "refcount_order": (96, 4),
    "header_length": (100, 4), "compression_type": (104, 1),
}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return unpack_fixtures(tmp_path_factory.mktemp("qcow2-corrupt"))


@contextmanager
def deadline(seconds: int):
    """Fail instead of hanging: SIGALRM interrupts the main thread."""
    def expired(signum, frame):
        raise TimeoutError(f"no answer within {seconds} s")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def exercise(path, tmp_path):
    """info, map, a full read and check; returns the check report or the error that stopped it."""
    outcomes = {}
    with deadline(60):
        for name, step in (("info", lambda: api.info(path, "qcow2")),
                           ("map", lambda: _map(path)),
                           ("read", lambda: api.convert(path, tmp_path / "out.raw", "raw", src_format="qcow2",
                                                        force=True)),
                           ("check", lambda: api.check(path, "qcow2"))):
            try:
                outcomes[name] = step()
            except ImgkitError as exc:
                assert "\n" not in exc.message
                outcomes[name] = exc
    return outcomes


def _map(path):
    with api.open_image(path, "qcow2") as reader:
        return list(api.map_entries(reader))


def patched(src, dst, offset: int, data: bytes):
    shutil.copyfile(src, dst)
    with open(dst, "r+b") as f:
        f.seek(offset)
        f.write(data)
    return dst


@pytest.mark.parametrize("field", sorted(HEADER_FIELDS))
def test_header_fields_with_boundary_values(images, tmp_path, field):
    offset, width = HEADER_FIELDS[field]
    for value in BOUNDARY:
        value &= (1 << (8 * width)) - 1
        path = patched(images["v3.qcow2"], tmp_path / f"{field}-{value}.qcow2", offset,
                       value.to_bytes(width, "big"))
        exercise(path, tmp_path)


def _layout(path):
    with ImageFile(path) as image:
        hdr = qcow2.parse_header(image)
        l1 = qcow2.read_table(image, hdr.l1_offset, hdr.l1_size, "L1")
    return hdr, int(l1[0]) & qcow2.OFFSET_MASK


def _entry_cases(images):
    """(name, fixture, where, value): where is 'l1' or an L2 index of the first L2 table."""
    hdr, l2 = _layout(images["v3.qcow2"])
    cs = hdr.cluster_size
    data = qcow2.COPIED | 5 * cs
    return [
        ("l1-past-end", "v3.qcow2", "l1", qcow2.COPIED | (1 << 40)),
        ("l1-unaligned", "v3.qcow2", "l1", qcow2.COPIED | (l2 + 512)),
        ("l1-into-refcount-table", "v3.qcow2", "l1", qcow2.COPIED | hdr.reftable_offset),
        ("l1-reserved-bits", "v3.qcow2", "l1", qcow2.COPIED | l2 | 1),
        ("l2-past-end", "v3.qcow2", 0, qcow2.COPIED | (1 << 40)),
        ("l2-into-l1", "v3.qcow2", 0, qcow2.COPIED | hdr.l1_offset),
        ("l2-into-header", "v3.qcow2", 0, qcow2.COPIED | cs),
        ("l2-unaligned", "v3.qcow2", 0, data + 512),
        ("l2-twice-one-cluster", "v3.qcow2", 1, data),
        ("l2-no-copied-flag", "v3.qcow2", 0, 5 * cs),
        ("compressed-past-end", "zlib.qcow2", 0, qcow2.COMPRESSED | (1 << 40)),
        ("compressed-into-header", "zlib.qcow2", 0, qcow2.COMPRESSED | (3 << 54) | 16),
        ("compressed-with-copied", "zlib.qcow2", 0, qcow2.COMPRESSED | qcow2.COPIED | 5 * cs),
        ("compressed-huge-count", "zlib.qcow2", 0, qcow2.COMPRESSED | (0xFF << 54) | 5 * cs),
    ]


ENTRY_CASES = ["l1-past-end", "l1-unaligned", "l1-into-refcount-table", "l1-reserved-bits",
               "l2-past-end", "l2-into-l1", "l2-into-header", "l2-unaligned", "l2-twice-one-cluster",
               "l2-no-copied-flag", "compressed-past-end", "compressed-into-header",
               "compressed-with-copied", "compressed-huge-count"]


@pytest.mark.parametrize("case", ENTRY_CASES)
def test_bad_table_entries(qemu_img, images, tmp_path, case):
    name, fixture, where, value = next(c for c in _entry_cases(images) if c[0] == case)
    hdr, l2 = _layout(images[fixture])
    at = hdr.l1_offset if where == "l1" else l2 + 8 * where
    path = patched(images[fixture], tmp_path / f"{name}.qcow2", at, struct.pack(">Q", value))
    outcomes = exercise(path, tmp_path)
    report = outcomes["check"]
    assert not isinstance(report, ImgkitError), report
    assert report.exit_code == 2, report.to_json()
    assert report.exit_code == qemu("check", str(path), check=False).returncode


def test_every_l1_entry_names_one_l2_table(qemu_img, tmp_path):
    """Thousands of references to one L2 table: check stays fast, the reader refuses the image."""
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        f.truncate(128 << 30)
        f.write(b"x" * 4096)
    good = tmp_path / "good.qcow2"
    api.convert(src, good, "qcow2", options={"cluster_size": "4K"})
    hdr, l2 = _layout(good)
    table = struct.pack(">Q", qcow2.COPIED | l2) * hdr.l1_size
    path = patched(good, tmp_path / "shared.qcow2", hdr.l1_offset, table)
    with deadline(60):
        report = api.check(path)
        assert report.exit_code == 2
        with pytest.raises(InvalidImage, match="several L1 entries"):
            api.open_image(path)


@pytest.mark.parametrize("entry", [1 << 50, 512 + 65536, 0xFFFFFFFFFFFFFE00])
def test_bad_refcount_table_entries(images, tmp_path, entry):
    hdr, _ = _layout(images["v3.qcow2"])
    path = patched(images["v3.qcow2"], tmp_path / "rt.qcow2", hdr.reftable_offset, struct.pack(">Q", entry))
    report = exercise(path, tmp_path)["check"]
    assert not isinstance(report, ImgkitError) and report.exit_code == 2


@pytest.mark.parametrize("name", ["v3.qcow2", "zlib.qcow2", "snap.qcow2", "el2.qcow2", "bitmap.qcow2"])
def test_truncated_images(images, tmp_path, name):
    data = images[name].read_bytes()
    for keep in (0, 71, 104, 4096, 65536 * 3 + 100, len(data) // 2, len(data) - 1):
        path = tmp_path / f"cut{keep}.qcow2"
        path.write_bytes(data[:keep])
        exercise(path, tmp_path)


def test_snapshot_table_garbage(images, tmp_path):
    hdr, l2 = _layout(images["snap.qcow2"])
    for offset, value in ((60, 65536), (64, l2)):
        path = patched(images["snap.qcow2"], tmp_path / f"s{offset}.qcow2", offset,
                       value.to_bytes(4 if offset == 60 else 8, "big"))
        exercise(path, tmp_path)


def test_refusals_name_the_feature(images, tmp_path):
    cases = {
        "encrypted": ((32, (2).to_bytes(4, "big")), "LUKS"),
        "aes": ((32, (1).to_bytes(4, "big")), "AES"),
        "unknown-incompatible": ((72, (1 << 40).to_bytes(8, "big")), "unknown incompatible"),
        "corrupt-bit": ((72, (2).to_bytes(8, "big")), "corrupt"),
        "version": ((4, (4).to_bytes(4, "big")), "version 4"),
    }
    for label, ((offset, data), words) in cases.items():
        path = patched(images["v3.qcow2"], tmp_path / f"{label}.qcow2", offset, data)
        with pytest.raises(ImgkitError, match=words):
            api.info(path)
    corrupt = tmp_path / "corrupt-bit.qcow2"
    assert api.check(corrupt).exit_code == 0     # check still looks at an image marked corrupt


def test_external_data_file_is_unsafe(images, tmp_path):
    path = patched(images["v3.qcow2"], tmp_path / "ext.qcow2", 72, (4).to_bytes(8, "big"))
    assert api.info(path)["format-specific"]["data"]["data-file"] == ""
    with pytest.raises(ImgkitError, match="external data file.*CVE-2024-32498"):
        api.convert(path, tmp_path / "x.raw", "raw")


def test_cli_check_exit_code_for_corruption(qemu_img, images, tmp_path):
    hdr, l2 = _layout(images["v3.qcow2"])
    path = patched(images["v3.qcow2"], tmp_path / "twice.qcow2", l2 + 8,
                   struct.pack(">Q", qcow2.COPIED | 5 * hdr.cluster_size))
    result = run_cli("check", path)
    assert result.returncode == 2
    assert "ERROR cluster 5 refcount=1 reference=2" in result.stdout
    result = run_cli("check", tmp_path / "missing.qcow2")
    assert result.returncode == 1
    unknown = patched(images["v3.qcow2"], tmp_path / "unknown.qcow2", 72, (1 << 40).to_bytes(8, "big"))
    result = run_cli("check", unknown)
    assert result.returncode == qemu("check", str(unknown), check=False).returncode == 1
    assert "unknown incompatible" in result.stderr


def test_thousands_of_snapshots_sharing_one_l1_table(images, tmp_path):
    """Snapshot L1 tables shared by many entries are walked once: check answers quickly."""
    data = bytearray(images["snap.qcow2"].read_bytes())
    hdr, _ = _layout(images["snap.qcow2"])
    _, _, id_len, name_len, *_rest, extra = struct.unpack_from(">QIHHIIQII", data, hdr.snapshots_offset)
    entry_len = (40 + extra + id_len + name_len + 7) // 8 * 8
    entry = bytes(data[hdr.snapshots_offset:hdr.snapshots_offset + entry_len])
    table_at = -(-len(data) // hdr.cluster_size) * hdr.cluster_size
    data.extend(bytes(table_at - len(data)) + entry * 5000)
    struct.pack_into(">IQ", data, 60, 5000, table_at)
    path = tmp_path / "many-snapshots.qcow2"
    path.write_bytes(bytes(data))
    with deadline(60):
        assert len(api.info(path)["snapshots"]) == 5000
        report = api.check(path)
    assert report.exit_code == 2


def test_two_l2_entries_naming_one_compressed_cluster(tmp_path):
    """A crafted L2 that repeats a compressed descriptor reads as two copies of that cluster."""
    import struct

    from imgkit import api

    src, img, out = tmp_path / "s.raw", tmp_path / "c.qcow2", tmp_path / "o.raw"
    cluster = 65536
    data = bytes(range(256)) * (cluster // 256)
    src.write_bytes(data + data[::-1])
    api.convert(src, img, "qcow2", options={"compress": "on"})
    raw = bytearray(img.read_bytes())
    l1_offset = struct.unpack(">Q", raw[40:48])[0]
    l2_offset = struct.unpack(">Q", raw[l1_offset:l1_offset + 8])[0] & 0x00FFFFFFFFFFFE00
    raw[l2_offset + 8:l2_offset + 16] = raw[l2_offset:l2_offset + 8]      # entry 1 := entry 0
    img.write_bytes(bytes(raw))
    api.convert(img, out, "raw")
    assert out.read_bytes() == data + data
