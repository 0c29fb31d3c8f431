"""imgkit validate on real files: partition tables and boot mode, bitmaps, sizes at their limits
(sparse files), formats imgkit cannot read, and the JSON a CI pipeline gates on."""
from __future__ import annotations

import json
import shutil
import struct
import subprocess
import uuid
import zlib

import pytest

from conftest import qemu, run_cli, write_sparse
from imgkit import api
from imgkit.ims import bitmap as mf
from imgkit.ims.partitions import read_partition_table
from imgkit.ims.validate import Request, validate

MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40
OS = "Ubuntu 18.04 server 64bit"
ESP = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
BIOS_BOOT = "21686148-6E69-6E65-6449-6F6E744E6565"
LINUX = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"


def mbr_disk(path, size=16 * MiB, types=(0x83,), payload=True):
    """A disk with an MBR holding one partition per type (2048 sectors each), some data inside."""
    mbr = bytearray(512)
    for i, ptype in enumerate(types):
        entry = struct.pack("<B3sB3sII", 0x80 if i == 0 else 0, b"\0\0\0", ptype, b"\0\0\0",
                            2048 * (i + 1), 2048)
        mbr[446 + 16 * i: 462 + 16 * i] = entry
    mbr[510:512] = b"\x55\xaa"
    runs = [(0, bytes(mbr))] + ([(MiB + 4096, b"filesystem")] if payload else [])
    write_sparse(path, size, runs)
    return path


def gpt_disk(path, size=16 * MiB, types=(LINUX,)):
    """A GPT disk written by hand: protective MBR, header with valid CRCs, 128 entries."""
    entries = bytearray(128 * 128)
    for i, type_guid in enumerate(types):
        first = 2048 * (i + 1)
        entries[i * 128:(i + 1) * 128] = (uuid.UUID(type_guid).bytes_le + uuid.uuid4().bytes_le
                                          + struct.pack("<QQQ", first, first + 2047, 0) + bytes(72))
    last = size // 512 - 1
    header = bytearray(struct.pack("<8sIIIIQQQQ16sQIII", b"EFI PART", 0x10000, 92, 0, 0, 1, last, 34, last - 33,
                                   uuid.uuid4().bytes_le, 2, 128, 128, zlib.crc32(entries)))
    header[16:20] = struct.pack("<I", zlib.crc32(header))
    mbr = bytearray(512)
    mbr[446:462] = struct.pack("<B3sB3sII", 0, b"\0\0\0", 0xEE, b"\0\0\0", 1, last)
    mbr[510:512] = b"\x55\xaa"
    write_sparse(path, size, [(0, bytes(mbr)), (512, bytes(header)), (1024, bytes(entries)),
                              (MiB + 4096, b"filesystem")])
    return path


def codes(report, severity=None):
    return [f.code for f in report.findings if severity is None or f.severity == severity]


# ------------------------------------------------------------------ partition table and boot mode

def test_mbr_system_disk_is_clean(tmp_path):
    report = validate(str(mbr_disk(tmp_path / "disk.raw")), Request(os_version=OS))
    assert report.ok and report.findings == []
    assert report.facts["boot"] == "bios" and report.facts["partition-table"]["table"] == "mbr"
    assert report.facts["min-disk"] == 40 and report.facts["min-disk-computed"]


def test_system_disk_without_partition_table_is_an_error(tmp_path):
    path = tmp_path / "fs.raw"
    write_sparse(path, 8 * MiB, [(1024, b"\x53\xef" * 8)])
    report = validate(str(path), Request(os_version=OS))
    assert not report.ok and codes(report, "error") == ["IMGKIT.NO_PARTITION_TABLE"]
    data = validate(str(path), Request(method="data", disk="data"))
    assert data.ok and "IMGKIT.NO_PARTITION_TABLE" not in codes(data)


def test_boot_sector_without_partition_entries_is_not_a_table(tmp_path):
    sector = bytearray(512)
    sector[0:3] = b"\xeb\x3c\x90"
    sector[446:462] = b"\x12" * 16          # boot code, not a partition entry
    sector[510:512] = b"\x55\xaa"
    path = tmp_path / "fat.raw"
    write_sparse(path, MiB, [(0, bytes(sector))])
    with api.open_image(path) as reader:
        table = read_partition_table(reader)
    assert table.kind is None and table.notes


def test_empty_partition_table_is_a_warning(tmp_path):
    report = validate(str(mbr_disk(tmp_path / "d.raw", types=())), Request(os_version=OS))
    assert report.ok and codes(report) == ["IMGKIT.PARTITION_TABLE"]


def test_gpt_with_esp_boots_uefi_and_the_default_bios_is_warned(tmp_path):
    path = str(gpt_disk(tmp_path / "uefi.raw", types=(ESP, LINUX)))
    default = validate(path, Request(os_version=OS))
    assert default.facts["boot"] == "uefi" and codes(default) == ["IMGKIT.FIRMWARE"]
    assert "default boot mode" in default.findings[0].message
    assert codes(validate(path, Request(os_version=OS, firmware="bios"))) == ["IMGKIT.FIRMWARE"]
    assert codes(validate(path, Request(os_version=OS, firmware="uefi"))) == []
    assert codes(validate(path, Request(method="quick", os_version=OS, architecture="arm", bitmap=None))) \
        == ["IMG.0158"]   # arm implies UEFI: no firmware finding, only the missing bitmap


def test_gpt_with_esp_and_bios_boot_partition_boots_both(tmp_path):
    path = str(gpt_disk(tmp_path / "hybrid.raw", types=(BIOS_BOOT, ESP, LINUX)))
    report = validate(path, Request(os_version=OS))
    assert report.facts["boot"] == "uefi+bios" and report.findings == []
    assert report.facts["partition-table"]["partitions"] == 3


def test_mbr_esp_type_means_uefi(tmp_path):
    report = validate(str(mbr_disk(tmp_path / "d.raw", types=(0xEF, 0x83))), Request(os_version=OS))
    assert report.facts["boot"] == "uefi" and codes(report) == ["IMGKIT.FIRMWARE"]


def test_uefi_requested_without_esp_is_warned(tmp_path):
    path = str(mbr_disk(tmp_path / "d.raw"))
    assert codes(validate(path, Request(os_version=OS, firmware="uefi"))) == ["IMGKIT.FIRMWARE"]
    with api.open_image(path) as reader:
        mf.write_bitmap(reader, str(tmp_path / "d.mf"))
    arm = validate(path, Request(method="quick", os_version=OS, architecture="arm"))
    assert codes(arm) == ["IMGKIT.FIRMWARE"] and "arm" in arm.findings[0].message


def test_damaged_gpt_header_checksum_is_noted(tmp_path):
    path = gpt_disk(tmp_path / "d.raw", types=(LINUX,))
    with open(path, "r+b") as f:
        f.seek(512 + 40)
        f.write(b"\x01")                        # first usable LBA changed, CRC now wrong
    report = validate(str(path), Request(os_version=OS))
    assert "IMGKIT.PARTITION_TABLE" in codes(report, "warning")


@pytest.mark.skipif(shutil.which("sfdisk") is None, reason="sfdisk (util-linux) not installed")
def test_gpt_made_by_sfdisk_is_read(tmp_path):
    path = tmp_path / "sf.raw"
    write_sparse(path, 64 * MiB, [])
    script = f"label: gpt\nsize=20MiB, type={ESP}\ntype={LINUX}\n"
    subprocess.run(["sfdisk", "-q", str(path)], input=script, text=True, check=True, capture_output=True)
    with api.open_image(path) as reader:
        table = read_partition_table(reader)
    assert (table.kind, table.partitions, table.has_esp, table.notes) == ("gpt", 2, True, [])


# ------------------------------------------------------------------ quick import bitmap (IMG.0158)

def test_raw_quick_import_needs_its_bitmap(tmp_path):
    path = str(mbr_disk(tmp_path / "image01.raw"))
    req = Request(method="quick", os_version=OS)
    assert codes(validate(path, req)) == ["IMG.0158"]
    with api.open_image(path) as reader:
        mf.write_bitmap(reader, mf.default_bitmap_path(path))
    assert (tmp_path / "image01.mf").exists()
    report = validate(path, req)
    assert report.ok and report.findings == [] and report.facts["bitmap-matches"]


def test_stale_bitmap_is_an_error(tmp_path):
    path = str(mbr_disk(tmp_path / "disk.raw"))
    (tmp_path / "disk.mf").write_bytes(b"\x00")       # 8 blocks of 2 MiB, no data marked
    report = validate(path, Request(method="quick", os_version=OS))
    assert codes(report) == ["IMGKIT.BITMAP_MISMATCH"] and "block 0" in report.findings[0].message


def test_bitmap_given_by_path_and_granularity(tmp_path):
    path = str(mbr_disk(tmp_path / "disk.raw"))
    other = str(tmp_path / "elsewhere.bits")
    with api.open_image(path) as reader:
        mf.write_bitmap(reader, other, granularity=64 * 1024)
    assert validate(path, Request(method="quick", os_version=OS, bitmap=other, granularity=64 * 1024)).ok
    assert not validate(path, Request(method="quick", os_version=OS, bitmap=other)).ok


def test_quick_import_refuses_qcow2(tmp_path, qemu_img):
    src = mbr_disk(tmp_path / "disk.raw")
    qemu("convert", "-f", "raw", "-O", "qcow2", str(src), str(tmp_path / "disk.qcow2"))
    report = validate(str(tmp_path / "disk.qcow2"), Request(method="quick", os_version=OS))
    assert "IMG.0158" in codes(report, "error")


# ------------------------------------------------------------------ sizes at the limits (sparse files)

@pytest.mark.parametrize("method,disk,size,over", [
    ("data", "data", 128 * GiB, False), ("data", "data", 128 * GiB + 512, True),
    ("quick", "data", TiB, False), ("quick", "data", TiB + 512, True)])
def test_file_size_limits_on_sparse_files(tmp_path, method, disk, size, over):
    path = tmp_path / "big.raw"
    write_sparse(path, size, [(0, b"\x01")])
    if method == "quick":
        with api.open_image(path) as reader:
            mf.write_bitmap(reader, str(tmp_path / "big.mf"), granularity=64 * MiB)
    report = validate(str(path), Request(method=method, disk=disk, granularity=64 * MiB))
    assert ("IMG.0059" in codes(report, "error")) == over
    if not over:
        assert report.ok, report.findings


def test_min_disk_smaller_than_the_disk_is_img_0055(tmp_path):
    path = tmp_path / "d.raw"
    mbr_disk(path, size=41 * GiB)
    report = validate(str(path), Request(os_version=OS, min_disk=41))
    assert report.ok
    assert codes(validate(str(path), Request(os_version=OS, min_disk=40)), "error") == ["IMG.0055"]


# ------------------------------------------------------------------ files imgkit cannot take

def test_empty_or_missing_file_is_img_0057(tmp_path):
    (tmp_path / "empty.raw").write_bytes(b"")
    assert codes(validate(str(tmp_path / "empty.raw"), Request(os_version=OS))) == ["IMG.0057"]
    assert codes(validate(str(tmp_path / "missing.raw"), Request(os_version=OS))) == ["IMG.0057"]


def test_format_imgkit_cannot_read_is_still_judged(tmp_path):
    zvhd2 = tmp_path / "disk.zvhd2"
    write_sparse(zvhd2, MiB, [(0, b"z2strm\x00\x00")])
    report = validate(str(zvhd2), Request(method="quick", os_version=OS))
    assert report.ok and codes(report) == ["IMGKIT.UNREADABLE"]
    luks = tmp_path / "disk.luks"
    write_sparse(luks, MiB, [(0, b"LUKS\xba\xbe\x00\x01")])
    assert codes(validate(str(luks), Request(method="quick", os_version=OS)), "error") == ["IMG.0158"]
    assert codes(validate(str(luks), Request(os_version=OS)), "error") == ["IMG.0072"]


def test_iso_file_needs_os_version(tmp_path):
    iso = tmp_path / "install.iso"
    write_sparse(iso, MiB, [(0x8001, b"CD001")])
    assert "IMGKIT.OS_VERSION_MISSING" in codes(validate(str(iso), Request()), "error")
    report = validate(str(iso), Request(os_version=OS))
    assert report.ok and codes(report) == ["IMGKIT.UNREADABLE"]


def test_ambiguous_file_is_unsafe(tmp_path):
    poly = tmp_path / "poly.img"
    write_sparse(poly, MiB, [(0, b"QFI\xfb\x00\x00\x00\x03"), (0x8001, b"CD001")])
    report = validate(str(poly), Request(os_version=OS))
    assert codes(report) == ["IMGKIT.UNSAFE"] and not report.ok


def test_backing_file_is_refused(tmp_path, qemu_img):
    base = mbr_disk(tmp_path / "base.raw")
    qemu("create", "-f", "qcow2", "-F", "raw", "-b", str(base), str(tmp_path / "top.qcow2"))
    report = validate(str(tmp_path / "top.qcow2"), Request(os_version=OS))
    assert codes(report, "error") == ["IMGKIT.UNSAFE"]


def test_local_file_name_with_spaces_is_warned(tmp_path):
    report = validate(str(mbr_disk(tmp_path / "my disk.raw")), Request(os_version=OS))
    assert report.ok and codes(report) == ["IMG.0175"]


# ------------------------------------------------------------------ the CLI and its JSON

def test_cli_json_gates_a_ci_pipeline(tmp_path):
    good = mbr_disk(tmp_path / "good.raw")
    ok = run_cli("validate", "--output", "json", "--os-version", OS, "--name", "web-01", "--tag", "env.prod", good)
    assert ok.returncode == 0, ok.stderr
    report = json.loads(ok.stdout)
    assert report["ok"] is True and report["errors"] == 0 and report["facts"]["min-disk"] == 40
    assert report["request"] == "POST /v2/cloudimages/action" and report["section"] == "5.1.3"

    bad = run_cli("validate", "--output", "json", "--method", "quick", "--name", " x", "--os-version",
                  "Ubuntu 18.04 server", "--min-disk", "2000", good)
    assert bad.returncode == 1
    report = json.loads(bad.stdout)
    assert report["ok"] is False
    found = {f["code"] for f in report["findings"] if f["severity"] == "error"}
    assert found == {"IMG.0062", "IMGKIT.OS_VERSION", "IMG.0055", "IMG.0158"}
    assert all(f["fix"] for f in report["findings"])
    typo = next(f for f in report["findings"] if f["code"] == "IMGKIT.OS_VERSION")
    assert OS in typo["fix"]


def test_cli_human_output_shows_the_computed_min_disk(tmp_path):
    result = run_cli("validate", "--method", "quick", "--disk", "data", mbr_disk(tmp_path / "d.raw", size=3 * GiB))
    assert result.returncode == 1                                   # no bitmap yet
    assert "min_disk: 3 GB (computed" in result.stdout and "IMG.0158" in result.stdout
    assert "result: 1 errors" in result.stdout


def test_readable_format_in_a_version_imgkit_cannot_take_is_an_error(tmp_path):
    """A qcow2 with an unknown incompatible feature would fail at import too: an error, not a
    warning (formats imgkit does not read at all, like ZVHD2, only get IMGKIT.UNREADABLE)."""
    disk = tmp_path / "disk.qcow2"
    api.convert(mbr_disk(tmp_path / "src.raw"), disk, "qcow2")
    data = bytearray(disk.read_bytes())
    data[72:80] = struct.pack(">Q", 1 << 40)
    disk.write_bytes(bytes(data))
    report = validate(str(disk), Request(os_version=OS))
    assert not report.ok and codes(report, "error") == ["IMG.0057"]
