"""The VMDK text descriptor: parsed against an allow-list of line forms, and written as qemu does.

A descriptor's extent lines name files on the user's machine (CVE-2022-47951 abused exactly
that), so nothing here ever opens a path: names are only reported.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from ...errors import InvalidImage

NO_PARENT = 0xFFFFFFFF
ADAPTERS = ("ide", "lsilogic", "buslogic", "legacyESX")
SECTORS_PER_TRACK = 63

_QUOTED = r'"([^"\x00-\x1f]*)"'
_EXTENT = re.compile(
    r"(RW|RDONLY|NOACCESS)\s+(\d{1,20})\s+(SPARSE|FLAT|ZERO|VMFS|VMFSSPARSE|VMFSRDM|VMFSRAW|SESPARSE)"
    r'(?:\s+' + _QUOTED + r'(?:\s+(\d{1,20}))?)?')
_SETTINGS = {
    "version": re.compile(r"version\s*=\s*([1-3])"),
    "encoding": re.compile(r"encoding\s*=\s*" + _QUOTED),
    "cid": re.compile(r"CID\s*=\s*([0-9a-fA-F]{1,8})"),
    "parent_cid": re.compile(r"parentCID\s*=\s*([0-9a-fA-F]{1,8})"),
    "create_type": re.compile(r'createType\s*=\s*"([A-Za-z0-9_]{1,64})"'),
    "parent_hint": re.compile(r"parentFileNameHint\s*=\s*" + _QUOTED),
    "native_snapshot": re.compile(r'isNativeSnapshot\s*=\s*"(yes|no)"'),
    "ddb": re.compile(r"(ddb\.[A-Za-z0-9_.]{1,128}|changeTrackPath)\s*=\s*" + _QUOTED),
}


@dataclass(frozen=True)
class ExtentLine:
    access: str
    sectors: int
    kind: str
    filename: str | None
    start: int | None


@dataclass
class Descriptor:
    version: int | None = None
    cid: int | None = None
    parent_cid: int = NO_PARENT
    create_type: str | None = None
    parent_hint: str | None = None
    extents: list[ExtentLine] = field(default_factory=list)
    ddb: dict[str, str] = field(default_factory=dict)

    @property
    def is_delta(self) -> bool:
        """A child disk: its unwritten grains live in a parent file."""
        return self.parent_cid != NO_PARENT or self.parent_hint is not None

    def extent_files(self) -> list[str]:
        return [e.filename for e in self.extents if e.filename is not None]


def parse(raw: bytes, where: str) -> Descriptor:
    """Parse descriptor text (NUL padding allowed at the end); any other line is refused."""
    text = raw.split(b"\0", 1)[0]
    try:
        decoded = text.decode("utf-8")
    except UnicodeDecodeError:   # encoding="windows-1252" descriptors exist; every byte maps in latin-1
        decoded = text.decode("latin-1")
    desc = Descriptor()
    for number, line in enumerate(decoded.split("\n"), 1):
        _parse_line(desc, line.strip(), number, where)
    if desc.version is None:
        raise InvalidImage(f"{where}: the VMDK descriptor has no version= line")
    return desc


def _parse_line(desc: Descriptor, line: str, number: int, where: str) -> None:
    if not line or line.startswith("#"):
        return
    extent = _EXTENT.fullmatch(line)
    if extent:
        access, sectors, kind, name, start = extent.groups()
        desc.extents.append(ExtentLine(access, int(sectors), kind, name,
                                       None if start is None else int(start)))
        return
    for key, pattern in _SETTINGS.items():
        found = pattern.fullmatch(line)
        if found:
            _apply_setting(desc, key, found.groups())
            return
    shown = line if len(line) <= 60 else line[:57] + "..."
    raise InvalidImage(f"{where}: VMDK descriptor line {number} is not a known form: {shown!r}")


def _apply_setting(desc: Descriptor, key: str, groups: tuple) -> None:
    value = groups[0]
    if key == "version":
        desc.version = int(value)
    elif key == "cid":
        desc.cid = int(value, 16)
    elif key == "parent_cid":
        desc.parent_cid = int(value, 16)
    elif key == "create_type":
        desc.create_type = value
    elif key == "parent_hint":
        desc.parent_hint = value
    elif key == "ddb":
        desc.ddb[value] = groups[1]


def geometry_heads(adapter: str) -> int:
    """qemu's CHS heads: 16 for IDE, 255 for SCSI adapters."""
    return 16 if adapter == "ide" else 255


def build(cid: int, create_type: str, capacity: int, filename: str, adapter: str,
          hwversion: str, toolsversion: str) -> bytes:
    """The descriptor text qemu-img 7.2 writes (formats.md §3.4), for one SPARSE extent."""
    heads = geometry_heads(adapter)
    cylinders = capacity // (heads * SECTORS_PER_TRACK)
    return (
        "# Disk DescriptorFile\n"
        "version=1\n"
        f"CID={cid:08x}\n"
        f"parentCID={NO_PARENT:08x}\n"
        f'createType="{create_type}"\n'
        "\n"
        "# Extent description\n"
        f'RW {capacity} SPARSE "{safe_name(filename)}"\n'
        "\n"
        "# The Disk Data Base\n"
        "#DDB\n"
        "\n"
        f'ddb.virtualHWVersion = "{hwversion}"\n'
        f'ddb.geometry.cylinders = "{cylinders}"\n'
        f'ddb.geometry.heads = "{heads}"\n'
        f'ddb.geometry.sectors = "{SECTORS_PER_TRACK}"\n'
        f'ddb.adapterType = "{adapter}"\n'
        f'ddb.toolsVersion = "{toolsversion}"\n'
    ).encode("utf-8")


def safe_name(filename: str) -> str:
    """A file name that fits between the descriptor's quotes (no quote, no control character)."""
    return re.sub(r'["\x00-\x1f\x7f]', "_", filename) or "disk.vmdk"
