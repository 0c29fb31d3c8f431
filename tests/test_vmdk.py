"""VMDK reading: qemu-made fixtures, info/map against qemu-img, and the files we refuse."""
from __future__ import annotations

import hashlib
import json
import shutil
import struct

import pytest

from imgkit import api
from imgkit.errors import ImgkitError, InvalidImage, LimitExceeded, UnsafeImage, UnsupportedFormat
from imgkit.extents import Kind
from imgkit.limits import VMDK_MAX_DESCRIPTOR

from conftest import FIXTURES, qemu, qemu_info, qemu_map, run_cli

VMDK = FIXTURES / "vmdk"
READABLE = ["sparse.vmdk", "stream.vmdk", "lsilogic.vmdk"]

# Every deliberate difference from `qemu-img info/map --output=json`, in one place, with its reason.
KNOWN_DIFFERENCES = {
    "map: compressed grains": "qemu-img map merges neighbouring compressed grains into one entry; "
                              "imgkit lists one entry per grain with compressed=true (each has its own "
                              "host offset), so maps are compared by data coverage only",
    "read: twoGbMaxExtentSparse extent file on its own": "qemu-img refuses tg-s001.vmdk opened directly "
                              "(its descriptor area is empty); imgkit reads it as the sparse extent it is",
    "read: GTE 1 without the zeroed-grain flag": "qemu would read sector 1 (the descriptor) as guest data; "
                              "imgkit reads zeros, since no writer puts a grain at sector 1",
    "write: CID": "qemu-img picks a random CID; imgkit's is a CRC of the written grains, so the same "
                  "input gives byte-identical output",
    "write: -c with monolithicSparse": "qemu-img silently ignores it; imgkit refuses it (exit 64)",
    "write: streamOptimized layout": "qemu-img 7.2 preallocates tables at the front and writes no "
                                     "markers, footer or EOS; imgkit writes the canonical stream layout",
}


def test_manifest_pins_every_fixture():
    manifest = json.loads((VMDK / "manifest.json").read_text())
    names = {entry["name"] for entry in manifest}
    on_disk = {p.name for p in VMDK.iterdir() if p.suffix == ".vmdk"}
    assert names == on_disk
    for entry in manifest:
        assert set(entry) >= {"name", "sha256", "command", "tool"}
        assert hashlib.sha256((VMDK / entry["name"]).read_bytes()).hexdigest() == entry["sha256"], entry["name"]


@pytest.mark.parametrize("name", READABLE)
def test_reading_equals_qemu_conversion(qemu_img, tmp_path, name):
    expected = tmp_path / "qemu.raw"
    qemu("convert", "-O", "raw", str(VMDK / name), str(expected))
    ours = tmp_path / "ours.raw"
    api.convert(VMDK / name, ours, "raw", threads=2)
    assert ours.read_bytes() == expected.read_bytes()
    with api.open_image(VMDK / name) as reader:
        buf = bytearray(reader.virtual_size)
        reader.readinto(0, buf)
        assert bytes(buf) == expected.read_bytes()
        odd = bytearray(70000)   # crosses a grain boundary at an unaligned offset
        reader.readinto(2 * 1024 * 1024 + 1000, odd)
        assert bytes(odd) == expected.read_bytes()[2 * 1024 * 1024 + 1000:][:70000]


@pytest.mark.parametrize("name", READABLE)
def test_info_matches_qemu_field_by_field(qemu_img, name):
    ours, theirs = api.info(VMDK / name), qemu_info(VMDK / name)
    for key, value in theirs.items():
        assert ours.get(key) == value, key


@pytest.mark.parametrize("name", READABLE)
def test_map_data_coverage_matches_qemu(qemu_img, name):
    def covered(entries):
        out = []
        for e in entries:
            if e["data"]:
                if out and out[-1][1] == e["start"]:
                    out[-1][1] = e["start"] + e["length"]
                else:
                    out.append([e["start"], e["start"] + e["length"]])
        return out

    with api.open_image(VMDK / name) as reader:
        ours = list(api.map_entries(reader))
    assert covered(ours) == covered(qemu_map(VMDK / name))
    if name != "stream.vmdk":
        offsets = {e["start"]: e.get("offset") for e in qemu_map(VMDK / name) if e["data"]}
        assert {e["start"]: e.get("offset") for e in ours if e["data"]} == offsets


def test_extents_come_from_metadata_only(monkeypatch):
    with api.open_image(VMDK / "stream.vmdk") as reader:
        monkeypatch.setattr(reader, "inflate", lambda *a: pytest.fail("grain data read"))
        kinds = {e.kind for e in reader.extents()}
        assert Kind.DATA in kinds and Kind.UNALLOCATED in kinds
        assert all(e.compressed for e in reader.extents() if e.kind == Kind.DATA)


@pytest.mark.parametrize("name, create_type", [("flat.vmdk", "monolithicFlat"),
                                               ("tg.vmdk", "twoGbMaxExtentSparse")])
def test_multi_file_vmdks_are_named_and_refused(name, create_type):
    with pytest.raises(UnsafeImage, match=create_type):
        api.info(VMDK / name)


def test_refusal_on_the_command_line(tmp_path):
    done = run_cli("info", VMDK / "flat.vmdk")
    assert done.returncode == 68
    assert "monolithicFlat" in done.stderr and "flat-flat.vmdk" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    done = run_cli("convert", "-O", "raw", VMDK / "tg.vmdk", tmp_path / "out.raw")
    assert done.returncode == 68 and not (tmp_path / "out.raw").exists()


def test_extent_file_of_a_split_set_reads_as_a_sparse_extent():
    with api.open_image(VMDK / "tg-s001.vmdk") as reader:
        assert reader.virtual_size == 1 << 20
        assert [e.kind for e in reader.extents()] == [Kind.UNALLOCATED]


def test_descriptor_naming_another_path_is_never_opened(tmp_path, monkeypatch):
    evil = tmp_path / "evil.vmdk"
    evil.write_text('# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n'
                    'createType="monolithicSparse"\n\nRW 2048 SPARSE "/etc/passwd"\n')
    opened = []
    real_open = __import__("os").open

    def spy(path, *args, **kwargs):
        opened.append(str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("imgkit.io.os.open", spy)
    with pytest.raises(UnsafeImage, match="/etc/passwd"):
        api.info(evil)
    assert "/etc/passwd" not in opened


def test_descriptor_with_unknown_line_is_refused(tmp_path):
    bad = tmp_path / "bad.vmdk"
    bad.write_text('# Disk DescriptorFile\nversion=1\nRW 2048 SPARSE "x.vmdk"\nexec = "rm -rf /"\n')
    with pytest.raises(InvalidImage, match="line 4"):
        api.info(bad)


def test_descriptor_file_above_the_limit(tmp_path):
    big = tmp_path / "big.vmdk"
    big.write_bytes(b"# Disk DescriptorFile\nversion=1\n" + b"#" * VMDK_MAX_DESCRIPTOR + b"\n")
    with pytest.raises(LimitExceeded):
        api.info(big)


def test_embedded_descriptor_above_the_limit(tmp_path):
    path = tmp_path / "d.vmdk"
    shutil.copy(VMDK / "sparse.vmdk", path)
    with open(path, "r+b") as f:
        f.seek(36)
        f.write(struct.pack("<Q", VMDK_MAX_DESCRIPTOR // 512 + 1))
    with pytest.raises(LimitExceeded, match="descriptor"):
        api.info(path)


def test_cowd_extent_is_named(tmp_path):
    path = tmp_path / "esx.vmdk"
    path.write_bytes(b"COWD" + struct.pack("<I", 1) + bytes(4088))
    with pytest.raises(UnsupportedFormat, match="COWD"):
        api.info(path)


def _patch_descriptor(path, old: bytes, new: bytes):
    data = bytearray(path.read_bytes())
    at = data.index(old)
    data[at:at + len(old)] = new
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("old, new", [(b"parentCID=ffffffff", b"parentCID=1234abcd"),
                                      (b'createType="monolithicSparse"\n',
                                       b'parentFileNameHint="b.vmdk"\n')])
def test_delta_disk_has_info_but_no_data(tmp_path, old, new):
    path = tmp_path / "child.vmdk"
    shutil.copy(VMDK / "sparse.vmdk", path)
    _patch_descriptor(path, old, new)
    assert api.info(path)["format"] == "vmdk"
    with pytest.raises(UnsafeImage, match="parent"):
        api.convert(path, tmp_path / "out.raw", "raw")
    assert not (tmp_path / "out.raw").exists()


def test_capacity_zero_with_descriptor_is_descriptor_only(tmp_path):
    path = tmp_path / "zero.vmdk"
    shutil.copy(VMDK / "sparse.vmdk", path)
    with open(path, "r+b") as f:
        f.seek(12)
        f.write(struct.pack("<Q", 0))
    with pytest.raises(UnsafeImage, match="monolithicSparse"):
        api.info(path)


def test_errors_are_imgkit_errors_on_the_command_line(tmp_path):
    path = tmp_path / "trunc.vmdk"
    path.write_bytes((VMDK / "sparse.vmdk").read_bytes()[:20000])
    done = run_cli("convert", "-O", "raw", path, tmp_path / "o.raw")
    assert done.returncode == 65, done.stderr
    assert "Traceback" not in done.stderr
    assert isinstance(InvalidImage("x"), ImgkitError)


def test_vmware_style_embedded_descriptor_is_accepted(tmp_path):
    path = tmp_path / "vmware.vmdk"
    data = bytearray((VMDK / "sparse.vmdk").read_bytes())
    text = ('# Disk DescriptorFile\nversion=1\nencoding="windows-1252"\nCID=8d7b8f1c\nparentCID=ffffffff\n'
            'isNativeSnapshot="no"\ncreateType="monolithicSparse"\n\n# Extent description\n'
            'RW 12288 SPARSE "vmware.vmdk"\n\n# The Disk Data Base\n#DDB\n\n'
            'ddb.adapterType = "lsilogic"\nddb.comment = "caf\xe9"\nddb.longContentID = "0123abcd"\n'
            'ddb.toolsInstallType = "4"\nddb.uuid = "60 00 C2 9a"\nddb.virtualHWVersion = "14"\n')
    raw = text.encode("latin-1")
    data[512:512 * 21] = raw.ljust(512 * 20, b"\0")
    path.write_bytes(bytes(data))
    facts = api.info(path)["format-specific"]["data"]
    assert facts["cid"] == 0x8D7B8F1C and facts["create-type"] == "monolithicSparse"


def test_zeroed_grain_entries_read_as_zeros_like_qemu(qemu_img, tmp_path):
    path = tmp_path / "zeroed.vmdk"
    data = bytearray((VMDK / "sparse.vmdk").read_bytes())
    data[4:12] = struct.pack("<II", 2, 0x7)          # version 2, zeroed-grain GTEs in use
    for table in (22, 27):                            # redundant and primary grain tables
        data[table * 512:table * 512 + 4] = struct.pack("<I", 1)
    path.write_bytes(bytes(data))
    with api.open_image(path) as reader:
        assert next(reader.extents()).kind == Kind.ZERO
    expected = tmp_path / "qemu.raw"
    qemu("convert", "-O", "raw", str(path), str(expected))
    ours = tmp_path / "ours.raw"
    api.convert(path, ours, "raw")
    assert ours.read_bytes() == expected.read_bytes()
    assert api.check(path).exit_code == 0
