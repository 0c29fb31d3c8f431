"""Format detection by magic over the head and the tail of a file.

Every signature in shared/reference/formats.md is known here, readable or not, so an
unsupported file is named ("VHDX images are not supported") rather than called raw. When
several signatures match (a polyglot), nothing is guessed: the user must say -f.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from .errors import InvalidImage, UnsafeImage, UnsupportedFormat
from .formats import REGISTRY, get_format
from .io import ImageFile

HEAD_BYTES = 64 * 1024
TAIL_BYTES = 4096
BZIP2_LEVELS = tuple(bytes([c]) for c in b"123456789")
BZIP2_BLOCK_MAGICS = (b"1AY&SY", b"\x17\x72\x45\x38\x50\x90")   # first block, or end of an empty stream
ISO_DESCRIPTOR_TYPES = (0, 1, 2, 3, 0xFF)   # boot, primary, supplementary, partition, terminator

# Human names for formats we recognise; the registry's own names are used as they are.
DISPLAY = {
    "qcow": "QCOW version 1", "qed": "QED", "vhdx": "VHDX", "vdi": "VirtualBox VDI",
    "luks": "LUKS encrypted", "parallels": "Parallels", "iso": "ISO 9660", "udf": "UDF optical disc",
    "dmg": "Apple DMG",
    "zvhd": "Huawei ZVHD", "zvhd2": "Huawei ZVHD2", "bochs": "Bochs", "cloop": "cloop",
    "gzip": "gzip-compressed", "xz": "xz-compressed", "bzip2": "bzip2-compressed",
    "zstd": "zstd-compressed", "tar": "tar archive (an OVA?)",
    "qcow2": "QCOW2", "vhd": "VHD", "vmdk": "VMDK", "raw": "raw",
}
HINTS = {
    "gzip": "decompress it first", "xz": "decompress it first", "bzip2": "decompress it first",
    "zstd": "decompress it first", "tar": "extract the disk image (.vmdk) from it first",
    "iso": "upload ISO files to IMS as they are", "udf": "upload ISO files to IMS as they are",
}


def _vmdk_descriptor(head: bytes) -> bool:
    """A text VMDK descriptor: '# Disk DescriptorFile' or a first real line 'version=N'."""
    if head.startswith(b"# Disk DescriptorFile"):
        return True
    text = head[:4096]
    if b"\x00" in text.rstrip(b"\x00"):
        return False
    for raw_line in text.split(b"\n"):
        line = raw_line.strip()
        if not line or line.startswith(b"#"):
            continue
        return line in (b"version=1", b"version=2", b"version=3")
    return False


def signatures(head: bytes, tail: bytes, size: int) -> list[str]:
    """Every format whose signature this file carries, in detection order."""
    found: list[str] = []
    if head[:4] == b"QFI\xfb":   # a file cut inside the version field is a truncated qcow2, not raw
        found.append("qcow" if len(head) >= 8 and struct.unpack(">I", head[4:8])[0] == 1 else "qcow2")
    if head[:4] == b"QED\x00":
        found.append("qed")
    if head[:4] in (b"KDMV", b"COWD") or _vmdk_descriptor(head):
        found.append("vmdk")
    if head[:8] == b"vhdxfile":
        found.append("vhdx")
    vhd_tail = size >= 1024 and tail[-512:-504] == b"conectix"
    if head[:8] == b"conectix" or vhd_tail:
        found.append("vhd")
    if head[:8] == b"z2strm\x00\x00" or (size >= 8192 and tail[-4096:-4088] == b"z2strm\x00\x00"):
        found.append("zvhd2")
    if head[:8] == b"stream\x00\x00" or (size >= 8192 and tail[-4096:-4088] == b"stream\x00\x00"):
        found.append("zvhd")
    if len(head) >= 0x44 and struct.unpack("<I", head[0x40:0x44])[0] == 0xBEDA107F:
        found.append("vdi")
    if head[:6] == b"LUKS\xba\xbe":
        found.append("luks")
    if head[:16] in (b"WithoutFreeSpace", b"WithouFreSpacExt"):
        found.append("parallels")
    if head[:22] == b"Bochs Virtual HD Image":
        found.append("bochs")
    if head[:10] == b"#!/bin/sh\n" and b"#V2.0 Format" in head[:256]:
        found.append("cloop")
    if head[:3] == b"\x1f\x8b\x08" and len(head) >= 4 and not head[3] & 0xE0:
        found.append("gzip")
    if head[:6] == b"\xfd7zXZ\x00":
        found.append("xz")
    if head[:3] == b"BZh" and head[3:4] in BZIP2_LEVELS and head[4:10] in BZIP2_BLOCK_MAGICS:
        found.append("bzip2")
    if head[:4] == b"\x28\xb5\x2f\xfd":
        found.append("zstd")
    if head[257:262] == b"ustar":
        found.append("tar")
    if head[0x8001:0x8006] == b"CD001" and head[0x8000] in ISO_DESCRIPTOR_TYPES:
        found.append("iso")
    elif head[0x8001:0x8006] == b"BEA01":
        found.append("udf")
    if size >= 1024 and tail[-512:-508] == b"koly" and tail[-504:-500] == b"\x00\x00\x02\x00":
        found.append("dmg")
    return found


@dataclass
class ProbeResult:
    format: str              # the format to open the file as
    matches: list[str]       # every signature found (empty for a plain raw disk)
    warning: str | None = None


def read_head_tail(image: ImageFile) -> tuple[bytes, bytes]:
    head = image.pread(min(HEAD_BYTES, image.size), 0)
    tail_len = min(TAIL_BYTES, image.size)
    tail = image.pread(tail_len, image.size - tail_len) if tail_len else b""
    return head, tail


def describe(name: str) -> str:
    return DISPLAY.get(name, name)


def probe(image: ImageFile, forced: str | None = None) -> ProbeResult:
    """Decide how to open a file; raise with a message naming what it is when we cannot."""
    head, tail = read_head_tail(image)
    matches = signatures(head, tail, image.size)
    if forced:
        name = get_format(forced).name
        if name == "raw":
            warning = None
            if matches:
                warning = (f"{image.path} carries a {' and '.join(describe(m) for m in matches)} "
                           f"signature but is being read as raw as requested")
            return ProbeResult("raw", matches, warning)
        if name not in matches:
            seen = ", ".join(describe(m) for m in matches) or "raw"
            raise InvalidImage(f"{image.path}: not a {describe(name)} image (it looks like: {seen})")
        return ProbeResult(name, matches)
    if not matches:
        if image.size == 0:
            raise InvalidImage(f"{image.path}: the file is empty")
        return ProbeResult("raw", [])
    if len(matches) > 1:
        listed = ", ".join(describe(m) for m in matches)
        raise UnsafeImage(
            f"{image.path}: ambiguous image, it carries signatures of several formats ({listed}); "
            f"say which one with -f")
    name = matches[0]
    if name not in REGISTRY:
        hint = HINTS.get(name)
        raise UnsupportedFormat(
            f"{image.path}: {describe(name)} images are not supported" + (f"; {hint}" if hint else ""))
    return ProbeResult(name, matches)
