"""Format detection: every signature in formats.md §5 is named, polyglots are refused, -f is checked.

Tiny files carry each magic; real files come from qemu-img create (and a pinned genisoimage ISO).
The CVE-2024-40767 pattern (a qcow2 uploaded "as raw") is tested end to end through the CLI.
"""
import bz2
import gzip
import hashlib
import io
import json
import lzma
import random
import struct
import tarfile

import pytest
from hypothesis import given, settings, strategies as st

from imgkit import probe as probe_mod
from imgkit.errors import InvalidImage, UnsafeImage, UnsupportedFormat, UsageError
from imgkit.io import ImageFile

from conftest import FIXTURES, qemu, run_cli

KiB, MiB = 1 << 10, 1 << 20
HARDENING = FIXTURES / "hardening"


def vhd_footer(disk_type: int = 2, size: int = MiB) -> bytes:
    """A VHD footer (formats.md §2.1) with a valid checksum."""
    footer = bytearray(512)
    struct.pack_into(">8sIIQI4sI4sQQHBBI", footer, 0, b"conectix", 2, 0x10000,
                     (1 << 64) - 1 if disk_type == 2 else 512, 0, b"qem2", 0x50003, b"Wi2k",
                     size, size, 65535, 16, 255, disk_type)
    struct.pack_into(">I", footer, 64, ~sum(footer) & 0xFFFFFFFF)
    return bytes(footer)


def zeros_with(size: int, *patches) -> bytes:
    buf = bytearray(size)
    for offset, data in patches:
        if offset < 0:
            offset += size
        buf[offset:offset + len(data)] = data
    return bytes(buf)


def tar_bytes() -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("disk.vmdk")
        info.size = 512
        tar.addfile(info, io.BytesIO(bytes(512)))
    return out.getvalue()


def zstd_bytes() -> bytes:
    zstandard = pytest.importorskip("zstandard")
    return zstandard.ZstdCompressor().compress(bytes(4096))


def dmg_bytes() -> bytes:
    koly = struct.pack(">4sII", b"koly", 4, 512) + bytes(500)
    return bytes(64 * KiB) + koly


def iso_bytes() -> bytes:
    return gzip.decompress((HARDENING / "tiny.iso.gz").read_bytes())


# name -> (bytes builder, words the refusal message must contain).
UNSUPPORTED = {
    "qcow1": (lambda: zeros_with(4096, (0, b"QFI\xfb\x00\x00\x00\x01")), "QCOW version 1"),
    "qed": (lambda: zeros_with(4096, (0, b"QED\x00")), "QED"),
    "vhdx": (lambda: zeros_with(256 * KiB, (0, b"vhdxfile"), (64 * KiB, b"head")), "VHDX"),
    "vdi": (lambda: zeros_with(1024, (0, b"<<< QEMU VM Virtual Disk Image >>>\n"),
                               (0x40, struct.pack("<II", 0xBEDA107F, 0x00010001))), "VDI"),
    "luks1": (lambda: zeros_with(4096, (0, b"LUKS\xba\xbe\x00\x01")), "LUKS"),
    "luks2": (lambda: zeros_with(32 * KiB, (0, b"LUKS\xba\xbe\x00\x02"), (0x4000, b"SKUL\xba\xbe\x00\x02")),
              "LUKS"),
    "parallels": (lambda: zeros_with(4096, (0, b"WithoutFreeSpace")), "Parallels"),
    "parallels-ext": (lambda: zeros_with(4096, (0, b"WithouFreSpacExt")), "Parallels"),
    "iso9660": (iso_bytes, "ISO 9660"),
    "iso9660-minimal": (lambda: zeros_with(40 * KiB, (0x8000, b"\x01CD001\x01"), (0x8800, b"\xffCD001\x01")),
                        "ISO 9660"),
    "udf": (lambda: zeros_with(40 * KiB, (0x8000, b"\x00BEA01\x01"), (0x8800, b"\x00NSR02\x01")), "UDF"),
    "zvhd-head": (lambda: zeros_with(12 * KiB, (0, b"stream\x00\x00"), (-4096, b"stream\x00\x00")), "ZVHD"),
    "zvhd-tail-only": (lambda: zeros_with(12 * KiB, (-4096, b"stream\x00\x00")), "ZVHD"),
    "zvhd2-head": (lambda: zeros_with(12 * KiB, (0, b"z2strm\x00\x00"), (-4096, b"z2strm\x00\x00")), "ZVHD2"),
    "zvhd2-tail-only": (lambda: zeros_with(12 * KiB, (-4096, b"z2strm\x00\x00")), "ZVHD2"),
    "bochs": (lambda: zeros_with(4096, (0, b"Bochs Virtual HD Image\x00")), "Bochs"),
    "cloop": (lambda: zeros_with(4096, (0, b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop\n")), "cloop"),
    "dmg": (dmg_bytes, "DMG"),
    "gzip": (lambda: gzip.compress(bytes(64 * KiB)), "gzip"),
    "xz": (lambda: lzma.compress(bytes(64 * KiB)), "xz"),
    "bzip2": (lambda: bz2.compress(bytes(64 * KiB)), "bzip2"),
    "bzip2-empty": (lambda: bz2.compress(b""), "bzip2"),
    "zstd": (zstd_bytes, "zstd"),
    "tar": (tar_bytes, "tar"),
}

# Formats imgkit reads: only the signature is checked here (the drivers test their own parsing).
READABLE = {
    "qcow2-v2": (lambda: zeros_with(512, (0, b"QFI\xfb\x00\x00\x00\x02")), "qcow2"),
    "qcow2-v3": (lambda: zeros_with(512, (0, b"QFI\xfb\x00\x00\x00\x03")), "qcow2"),
    "qcow2-cut-in-version": (lambda: b"QFI\xfb\x00\x00", "qcow2"),
    "vmdk-sparse": (lambda: zeros_with(512, (0, b"KDMV")), "vmdk"),
    "vmdk-cowd": (lambda: zeros_with(512, (0, b"COWD")), "vmdk"),
    "vmdk-descriptor": (lambda: b"# Disk DescriptorFile\nversion=1\nCID=fffffffe\n", "vmdk"),
    "vmdk-descriptor-version-line": (lambda: b"\n# a comment\n\n  version=2\ncreateType=\"x\"\n" + bytes(300),
                                     "vmdk"),
    "vhd-dynamic": (lambda: vhd_footer(3) + bytes(1536) + vhd_footer(3), "vhd"),
    "vhd-fixed": (lambda: bytes(MiB) + vhd_footer(2), "vhd"),
}


def make(tmp_path, name: str, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def found(path) -> list[str]:
    with ImageFile(path) as image:
        head, tail = probe_mod.read_head_tail(image)
        return probe_mod.signatures(head, tail, image.size)


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_fixture_iso_is_pinned():
    entry, = json.loads((HARDENING / "manifest.json").read_text())
    assert hashlib.sha256((HARDENING / entry["name"]).read_bytes()).hexdigest() == entry["sha256"]


@pytest.mark.parametrize("case", sorted(UNSUPPORTED))
def test_unsupported_formats_are_named(tmp_path, case):
    build, words = UNSUPPORTED[case]
    path = make(tmp_path, case + ".img", build())
    with ImageFile(path) as image, pytest.raises(UnsupportedFormat) as err:
        probe_mod.probe(image)
    assert words in str(err.value) and str(path) in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("case", ["qcow1", "vhdx", "iso9660", "gzip", "tar"])
def test_cli_names_unsupported_formats(tmp_path, case):
    build, words = UNSUPPORTED[case]
    path = make(tmp_path, case + ".img", build())
    for command in (["info"], ["map"], ["convert", "-O", "raw"], ["check"]):
        extra = [str(tmp_path / "out.raw")] if command[0] == "convert" else []
        res = run_cli(*command, path, *extra)
        # check keeps qemu-img's codes: 63 "this format has no checks"
        assert res.returncode == (63 if command == ["check"] else 67), (command, res.stderr)
        assert words in one_line(res.stderr)
    assert not (tmp_path / "out.raw").exists()


@pytest.mark.parametrize("case", sorted(READABLE))
def test_readable_formats_are_detected(tmp_path, case):
    build, name = READABLE[case]
    assert found(make(tmp_path, case, build())) == [name]


REAL_TOOL_FORMATS = {
    "vhdx": ("VHDX", []), "vdi": ("VDI", []), "qed": ("QED", []), "qcow": ("QCOW version 1", []),
    "parallels": ("Parallels", []),
    "luks": ("LUKS", ["--object", "secret,id=s0,data=imgkit", "-o", "key-secret=s0,iter-time=10"]),
}


@pytest.mark.parametrize("fmt", sorted(REAL_TOOL_FORMATS))
def test_files_made_by_qemu_img_are_named(tmp_path, qemu_img, fmt):
    words, extra = REAL_TOOL_FORMATS[fmt]
    path = tmp_path / f"disk.{fmt}"
    qemu("create", "-q", "-f", fmt, *extra, str(path), "1M")
    res = run_cli("info", path)
    assert res.returncode == 67, res.stderr
    line = one_line(res.stderr)
    assert words in line and str(path) in line


@pytest.mark.parametrize("fmt,opts", [("qcow2", []), ("vpc", ["-o", "subformat=dynamic"]),
                                      ("vpc", ["-o", "subformat=fixed"]), ("vmdk", []),
                                      ("vmdk", ["-o", "subformat=streamOptimized"]),
                                      ("vmdk", ["-o", "subformat=monolithicFlat"])])
def test_files_made_by_qemu_img_for_our_formats(tmp_path, qemu_img, fmt, opts):
    path = tmp_path / "disk.img"
    qemu("create", "-q", "-f", fmt, *opts, str(path), "1M")
    assert found(path) == [{"vpc": "vhd"}.get(fmt, fmt)]


# ---- false positives ------------------------------------------------------------------------


def mbr_disk() -> bytes:
    disk = bytearray(2 * MiB)
    disk[0:3] = b"\xeb\x63\x90"
    struct.pack_into("<B3sB3sII", disk, 0x1BE, 0x80, b"\x00\x02\x00", 0x83, b"\xff\xff\xff", 2048, 2048)
    disk[510:512] = b"\x55\xaa"
    return bytes(disk)


def gpt_disk() -> bytes:
    disk = bytearray(mbr_disk())
    disk[0x1C2] = 0xEE
    disk[512:520] = b"EFI PART"
    disk[-512 + 0:-512 + 8] = b"EFI PART"
    return bytes(disk)


def hybrid_iso() -> bytes:
    """An ISO with an MBR in front (isohybrid): still an ISO."""
    data = bytearray(iso_bytes())
    data[:512] = mbr_disk()[:512]
    return bytes(data)


RAW_LOOKALIKES = {
    "mbr": mbr_disk,
    "gpt": gpt_disk,
    "zeros": lambda: bytes(3 * MiB),
    "random": lambda: random.Random(7).randbytes(256 * KiB),
    "prose": lambda: b"This is a README.\nversion=1 is mentioned here, not on the first line.\n" * 40,
    "version-10": lambda: b"version=10\n" + bytes(100),
    "versions": lambda: b"versions=1\n",
    "version-after-nul": lambda: b"\x00\x01version=1\n" + bytes(600),
    "version-line-binary": lambda: b"version=1\n\x00\x01\x02" + bytes(600),
    "ini-like": lambda: b"[disk]\nversion=1\n",
    "conectix-mid-file": lambda: zeros_with(MiB, (4096, b"conectix"), (MiB - 1024, b"conectix")),
    "gzip-magic-only": lambda: zeros_with(4096, (0, b"\x1f\x8b")),
    "bzh-without-block": lambda: b"BZh9 is a sentence" + bytes(4000),
    "cd001-without-descriptor-type": lambda: zeros_with(40 * KiB, (0x8000, b"\x07CD001")),
    "koly-without-header-size": lambda: zeros_with(64 * KiB, (-512, b"koly")),
    "short-vhd-tail": lambda: zeros_with(600, (-512, b"conectix")),
}


@pytest.mark.parametrize("case", sorted(RAW_LOOKALIKES))
def test_raw_disks_are_raw(tmp_path, case):
    path = make(tmp_path, case, RAW_LOOKALIKES[case]())
    assert found(path) == []
    with ImageFile(path) as image:
        result = probe_mod.probe(image)
    assert result.format == "raw" and result.warning is None


def test_hybrid_iso_with_mbr_is_iso(tmp_path):
    assert found(make(tmp_path, "hybrid.iso", hybrid_iso())) == ["iso"]


def test_empty_file_is_refused(tmp_path):
    res = run_cli("info", make(tmp_path, "empty", b""))
    assert res.returncode == 65 and "empty" in one_line(res.stderr)


@settings(max_examples=30, deadline=None)
@given(head=st.binary(min_size=0, max_size=40 * KiB), size_pad=st.integers(0, 9000))
def test_signatures_never_raise_on_any_bytes(head, size_pad):
    data = head + bytes(size_pad)
    tail = data[-probe_mod.TAIL_BYTES:]
    assert isinstance(probe_mod.signatures(data[:probe_mod.HEAD_BYTES], tail, len(data)), list)


@settings(max_examples=30, deadline=None)
@given(text=st.text(alphabet="version=123#\n \tDisk", max_size=300))
def test_text_without_a_version_line_is_not_vmdk(text):
    lines = [ln.strip() for ln in text.split("\n") if ln.strip() and not ln.strip().startswith("#")]
    head = text.encode()
    expected = bool(lines) and lines[0] in ("version=1", "version=2", "version=3")
    assert probe_mod._vmdk_descriptor(head) == (expected or head.startswith(b"# Disk DescriptorFile"))


# ---- polyglots and -f ----------------------------------------------------------------------


def qcow2_with_iso(tmp_path, qemu_img):
    """A real qcow2 (64 KiB header cluster) with an ISO primary volume descriptor at 0x8000."""
    path = tmp_path / "poly.qcow2"
    qemu("create", "-q", "-f", "qcow2", str(path), "1M")
    with open(path, "r+b") as f:
        f.seek(0x8000)
        f.write(b"\x01CD001\x01")
    return path


def iso_with_qcow2_header(tmp_path):
    """The pinned ISO with a qcow2 magic over its (unused) first 32 KiB."""
    data = bytearray(iso_bytes())
    data[:8] = b"QFI\xfb\x00\x00\x00\x03"
    return make(tmp_path, "poly.iso", bytes(data))


def iso_with_vhd_footer(tmp_path):
    data = iso_bytes()
    return make(tmp_path, "iso-vhd.img", data + vhd_footer(2, len(data)))


def qcow2_with_vhd_footer(tmp_path, qemu_img):
    path = tmp_path / "qcow2-vhd.img"
    qemu("create", "-q", "-f", "qcow2", str(path), "1M")
    with open(path, "ab") as f:
        f.write(vhd_footer(2, path.stat().st_size))
    return path


def test_polyglots_are_refused_listing_the_matches(tmp_path, qemu_img):
    cases = {
        "qcow2+iso": (qcow2_with_iso(tmp_path, qemu_img), ["QCOW2", "ISO 9660"]),
        "iso+qcow2 header": (iso_with_qcow2_header(tmp_path), ["QCOW2", "ISO 9660"]),
        "iso+vhd footer": (iso_with_vhd_footer(tmp_path), ["VHD", "ISO 9660"]),
        "qcow2+vhd footer": (qcow2_with_vhd_footer(tmp_path, qemu_img), ["QCOW2", "VHD"]),
    }
    for label, (path, names) in cases.items():
        for command in (["info"], ["map"], ["check"], ["convert", "-O", "raw", path.with_suffix(".out")]):
            res = run_cli(command[0], path, *command[1:])
            # check keeps qemu-img's codes: 1 "could not check"
            assert res.returncode == (1 if command == ["check"] else 68), (label, command, res.stderr)
            line = one_line(res.stderr)
            assert "ambiguous" in line and all(n in line for n in names), line
            assert "-f" in line
        assert not path.with_suffix(".out").exists()


def test_forcing_one_of_the_matches_is_accepted(tmp_path, qemu_img):
    path = qcow2_with_vhd_footer(tmp_path, qemu_img)
    with ImageFile(path) as image:
        assert probe_mod.probe(image, "qcow2").format == "qcow2"
        assert probe_mod.probe(image, "vpc").format == "vhd"
        assert probe_mod.probe(image, "vhd").matches == ["qcow2", "vhd"]


@pytest.mark.parametrize("forced,build", [("qcow2", lambda: bytes(MiB)), ("vhd", mbr_disk),
                                          ("vmdk", lambda: vhd_footer(3) + bytes(2048)),
                                          ("vhd", lambda: zeros_with(4096, (0, b"QFI\xfb\x00\x00\x00\x03")))])
def test_forced_format_is_checked_against_its_own_magic(tmp_path, forced, build):
    path = make(tmp_path, "disk", build())
    with ImageFile(path) as image, pytest.raises(InvalidImage) as err:
        probe_mod.probe(image, forced)
    assert "not a" in str(err.value)
    res = run_cli("info", "-f", forced, path)
    assert res.returncode == 65 and "not a" in one_line(res.stderr)


def test_forcing_a_format_we_do_not_know_is_a_usage_error(tmp_path):
    path = make(tmp_path, "disk.vhdx", UNSUPPORTED["vhdx"][0]())
    with ImageFile(path) as image, pytest.raises(UsageError):
        probe_mod.probe(image, "vhdx")
    res = run_cli("info", "-f", "vhdx", path)
    assert res.returncode == 64 and "vhdx" in one_line(res.stderr)


def test_ambiguous_error_is_unsafe_class(tmp_path):
    path = iso_with_vhd_footer(tmp_path)
    with ImageFile(path) as image, pytest.raises(UnsafeImage):
        probe_mod.probe(image)


# ---- -f raw on a disguised image (CVE-2024-40767) --------------------------------------------


@pytest.fixture
def disguised_qcow2(tmp_path, qemu_img):
    """A qcow2 with a backing file that names /etc/passwd, as a raw upload would carry it."""
    path = tmp_path / "upload.img"
    qemu("create", "-q", "-f", "qcow2", "-b", "/etc/passwd", "-F", "raw", str(path), "1M")
    return path


def digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_raw_info_on_a_qcow2_warns(disguised_qcow2):
    res = run_cli("info", "-f", "raw", "--output", "json", disguised_qcow2)
    assert res.returncode == 0, res.stderr
    assert "warning" in one_line(res.stderr) and "QCOW2" in res.stderr
    data = json.loads(res.stdout)
    assert data["format"] == "raw" and data["warnings"]


def test_raw_map_on_a_qcow2_warns(disguised_qcow2):
    res = run_cli("map", "-f", "raw", "--output", "json", disguised_qcow2)
    assert res.returncode == 0 and "QCOW2" in one_line(res.stderr)


def test_raw_convert_of_a_qcow2_is_refused(tmp_path, disguised_qcow2):
    out = tmp_path / "out.raw"
    before = digest(disguised_qcow2)
    res = run_cli("convert", "-f", "raw", "-O", "raw", disguised_qcow2, out)
    assert res.returncode == 68, res.stderr
    line = one_line(res.stderr)
    assert "QCOW2" in line and "--force-format" in line
    assert not out.exists() and not list(tmp_path.glob(".*imgkit-tmp"))
    assert digest(disguised_qcow2) == before


def test_raw_convert_with_force_format_copies_the_bytes(tmp_path, disguised_qcow2):
    out = tmp_path / "out.raw"
    res = run_cli("convert", "-f", "raw", "--force-format", "-O", "raw", disguised_qcow2, out)
    assert res.returncode == 0, res.stderr
    assert out.read_bytes() == disguised_qcow2.read_bytes()


def test_raw_convert_of_an_iso_polyglot_is_refused(tmp_path):
    path = iso_with_vhd_footer(tmp_path)
    res = run_cli("convert", "-f", "raw", "-O", "raw", path, tmp_path / "o.raw")
    assert res.returncode == 68 and "ISO 9660" in one_line(res.stderr)


def test_raw_without_any_magic_has_no_warning(tmp_path):
    path = make(tmp_path, "plain.raw", mbr_disk())
    res = run_cli("convert", "-f", "raw", "-O", "raw", path, tmp_path / "o.raw")
    assert res.returncode == 0 and res.stderr == ""


def test_raw_prepare_of_a_qcow2_is_refused(tmp_path, disguised_qcow2):
    out = tmp_path / "ims"
    res = run_cli("prepare", "-f", "raw", "--disk", "data", "--out", out, disguised_qcow2)
    assert res.returncode != 0 and "QCOW2" in res.stderr
    assert not any(p.is_file() for p in out.rglob("*")) if out.exists() else True
