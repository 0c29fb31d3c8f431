"""What the IMS API reference asks of an image file, as data.

Every value here comes from shared/reference/ims-rules.md, which cites the sections of the
Image Management Service API reference (edition 21, 2022-05-20); the section is kept beside
each rule so a finding can say where it comes from. The checks in validate.py read these
tables; nothing else in imgkit hard-codes an IMS limit.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

GB = 1 << 30          # the reference's "GB" (2^30 bytes)
TB = 1 << 40          # the reference's "TB" (2^40 bytes)

DEFAULT_GRANULARITY = 2 << 20   # one bitmap bit per 2 MiB block: the ZVHD2 default block size
BITMAP_EXTENSION = ".mf"        # user guide: image01.raw -> image01.mf, in the same bucket

# 5.1.7: what a bucket may hold for registration; the import formats of every file path.
IMPORT_FORMATS = ("ZVHD", "QCOW2", "VHD", "RAW", "VHDX", "QED", "VDI", "QCOW", "ZVHD2", "ISO", "VMDK")
QUICK_FORMATS = ("RAW", "ZVHD2")          # 5.1.4, IMG.0158
BITMAP_FORMATS = ("RAW",)                 # 5.1.4: a RAW file needs a bitmap, ZVHD2 does not
DISK_FORMAT_VALUES = ("vhd", "zvhd", "zvhd2", "raw", "iso", "qcow2")   # 6.1.6 disk_format

# 9.1 name: 1-128 characters, letters, digits, '-', '.', '_', spaces and Chinese characters,
# no leading or trailing space. 6.1.6 (Native OpenStack metadata) allows 1-255.
NAME_MAX = 128
NATIVE_NAME_MAX = 255
NAME_CHARS = re.compile(r"[A-Za-z0-9\-._ \u4e00-\u9fff]*")
DESCRIPTION_MAX = 1024                    # 9.1 __description, IMG.0004
DESCRIPTION_FORBIDDEN = "\r\n<>"          # 9.1: no carriage return, no angle brackets, IMG.0054

# 9.2 tags ("key.value") and image_tags ({"key", "value"}).
TAG_KEY_MAX = 36
TAG_VALUE_MAX = 43
TAG_KEY = re.compile(r"[A-Za-z0-9_-]+")
TAG_VALUE = re.compile(r"[A-Za-z0-9_.-]*")
NATIVE_TAG_MAX = 255                      # 9.2 Native OpenStack tags: 1-255, no '='

# Object names in image_url (IMG.0075 file name rules, IMG.0175 no spaces in folder or file).
OBJECT_NAME_MAX = 128
OBJECT_NAME_CHARS = re.compile(r"[A-Za-z0-9\-._ ]*")
BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")   # OBS naming; IMG.0109

OS_TYPES = ("Linux", "Windows", "Other")  # 5.1.3 os_type
DATA_OS_TYPES = ("Linux", "Windows")      # 5.1.4 / 5.1.5 data disks, default Linux
ARCHITECTURES = ("x86", "arm")            # 5.1.4, default x86; arm switches boot to UEFI
FIRMWARES = ("bios", "uefi")              # 9.1 hw_firmware_type, IMG.0141
DEFAULT_FIRMWARE = "bios"


@dataclass(frozen=True)
class ImportPath:
    """One way a file becomes an image: the request, what it accepts, and its min_disk range."""

    method: str
    disk: str
    title: str
    http: str
    uri: str
    section: str
    formats: tuple[str, ...]
    format_code: str              # the service's error when the format is refused
    max_file: int                 # bytes, the file as uploaded
    min_disk: tuple[int, int]     # GB, inclusive
    os_version_required: bool = False
    name_max: int = NAME_MAX
    body_type: str | None = None  # the "type" field of the body

    @property
    def needs_bitmap(self) -> tuple[str, ...]:
        return BITMAP_FORMATS if self.method == "quick" else ()


PATHS: dict[tuple[str, str], ImportPath] = {(p.method, p.disk): p for p in (
    ImportPath("quick", "system", "quick import, system disk", "POST", "/v2/cloudimages/quickimport/action",
               "5.1.4", QUICK_FORMATS, "IMG.0158", TB, (1, 1024), os_version_required=True, body_type="ECS"),
    ImportPath("quick", "data", "quick import, data disk", "POST", "/v2/cloudimages/quickimport/action",
               "5.1.4", QUICK_FORMATS, "IMG.0158", TB, (1, 1024), body_type="DataImage"),
    ImportPath("file", "system", "create from file, system disk", "POST", "/v2/cloudimages/action",
               "5.1.3", IMPORT_FORMATS, "IMG.0072", 128 * GB, (40, 255)),
    ImportPath("file", "data", "create from file, data disk beside a system disk (data_images[])", "POST",
               "/v2/cloudimages/action", "5.1.3 table 5-6", IMPORT_FORMATS, "IMG.0072", 128 * GB, (1, 2048)),
    ImportPath("data", "data", "data disk image from file", "POST", "/v1/cloudimages/dataimages/action",
               "5.1.5", IMPORT_FORMATS, "IMG.0072", 128 * GB, (40, 2048)),
    ImportPath("register", "system", "register a file on image metadata", "PUT",
               "/v1/cloudimages/{image_id}/upload", "6.1.6, 5.1.7", IMPORT_FORMATS, "IMG.0072", 128 * GB,
               (40, 255), name_max=NATIVE_NAME_MAX),
)}
QUICK_RECOMMENDED_FROM = 128 * GB   # 5.1.4: at 128 GB and more, the normal import is not recommended

# Appendix B: the codes imgkit reproduces, with the service's meaning (in English).
ERROR_CODES = {
    "IMG.0002": "the image name is longer than 128 characters",
    "IMG.0003": "the image name has an invalid format",
    "IMG.0004": "the description is longer than 1024 characters",
    "IMG.0013": "the image name is missing",
    "IMG.0054": "the description has an invalid format",
    "IMG.0055": "the disk or memory size is invalid",
    "IMG.0056": "the OS type is invalid",
    "IMG.0057": "the image file does not exist, is empty or is in the wrong format",
    "IMG.0059": "the image file is larger than allowed",
    "IMG.0062": "the image name is incorrect",
    "IMG.0072": "the image format is not supported for this operation",
    "IMG.0075": "the file name contains invalid characters",
    "IMG.0109": "the bucket name contains invalid characters",
    "IMG.0111": "the system disk is larger than allowed",
    "IMG.0115": "the image tag is invalid",
    "IMG.0122": "the OS type is invalid (choose an OS that IMS supports)",
    "IMG.0141": "hw_firmware_type is neither uefi nor bios",
    "IMG.0158": "quick import takes RAW (with its bitmap) or ZVHD2 only",
    "IMG.0159": "os_version is required for a quick import of a system disk",
    "IMG.0175": "folder and file names may not contain spaces",
}

# imgkit's own codes, for findings the service has no code for (or reports only after upload).
IMGKIT_CODES = {
    "IMGKIT.UNREADABLE": "imgkit cannot read this format, so the content checks were skipped",
    "IMGKIT.UNSAFE": "reading the image would open another file, or its format is ambiguous",
    "IMGKIT.CHECK": "the format's consistency check found corruptions",
    "IMGKIT.LEAKS": "the format's consistency check found leaked clusters",
    "IMGKIT.NO_PARTITION_TABLE": "a system disk without an MBR or GPT partition table cannot boot",
    "IMGKIT.PARTITION_TABLE": "the partition table is unusual (empty, or a damaged GPT)",
    "IMGKIT.FIRMWARE": "the boot mode does not match the disk (EFI system partition vs BIOS)",
    "IMGKIT.ARM_UEFI": "arm images boot UEFI only",
    "IMGKIT.BITMAP_MISMATCH": "the .mf bitmap does not describe this image",
    "IMGKIT.OS_VERSION": "os_version is not a value of table 9-1",
    "IMGKIT.OS_VERSION_MISSING": "no os_version: the service falls back to a generic Linux",
    "IMGKIT.TAGS_BOTH": "tags and image_tags given together",
    "IMGKIT.IMAGE_URL": "image_url is not bucket:object",
    "IMGKIT.QUICK_RECOMMENDED": "a file this large should use quick import",
    "IMGKIT.DISK_FORMAT": "the format has no disk_format value in the image metadata",
}

# 9.5 table 9-1: the accepted os_version values, by family (os_type is Windows for the first).
OS_VERSIONS: dict[str, tuple[str, ...]] = {
    "Windows": (
        "Windows 10 64bit", "Windows Server 2019 Standard 64bit", "Windows Server 2019 Datacenter 64bit",
        "Windows Server 2016 Standard 64bit", "Windows Server 2016 Datacenter 64bit",
        "Windows Server 2012 R2 Standard 64bit", "Windows Server 2012 Essentials R2 64bit",
        "Windows Server 2012 R2 Datacenter 64bit", "Windows Server 2012 Datacenter 64bit",
        "Windows Server 2012 Standard 64bit", "Windows Server 2008 R2 WEB 64bit",
        "Windows Server 2008 R2 Standard 64bit", "Windows Server 2008 R2 Enterprise 64bit",
        "Windows Server 2008 R2 Datacenter 64bit"),
    "SUSE": tuple(f"SUSE Linux Enterprise Server {v}" for v in (
        "15 SP1 64bit", "15 64bit", "12 SP5 64bit", "12 SP4 64bit", "12 SP3 64bit", "12 SP2 64bit",
        "12 SP1 64bit", "11 SP4 64bit", "11 SP3 64bit", "11 SP3 32bit")),
    "Oracle Linux": tuple(f"Oracle Linux Server release {v} 64bit" for v in (
        "7.6", "7.5", "7.4", "7.3", "7.2", "7.1", "7.0", "6.10", "6.9", "6.8", "6.7", "6.5")),
    "Red Hat": tuple(f"Redhat Linux Enterprise {v}" for v in (
        "8.0 64bit", "7.6 64bit", "7.5 64bit", "7.4 64bit", "7.3 64bit", "7.2 64bit", "7.1 64bit",
        "7.0 64bit", "6.10 64bit", "6.9 64bit", "6.8 64bit", "6.7 64bit", "6.6 64bit", "6.6 32bit",
        "6.5 64bit", "6.4 64bit", "6.4 32bit")),
    "Ubuntu": tuple(f"Ubuntu {v}" for v in (
        "19.04 server 64bit", "18.04.2 server 64bit", "18.04.1 server 64bit", "18.04 server 64bit",
        "16.04.6 server 64bit", "16.04.5 server 64bit", "16.04.4 server 64bit", "16.04.3 server 64bit",
        "16.04.2 server 64bit", "16.04 server 64bit", "14.04.5 server 64bit", "14.04.4 server 64bit",
        "14.04.4 server 32bit", "14.04.3 server 64bit", "14.04.3 server 32bit", "14.04.1 server 64bit",
        "14.04.1 server 32bit", "14.04 server 64bit", "14.04 server 32bit")),
    "openSUSE": tuple(f"openSUSE {v} 64bit" for v in ("42.3", "42.2", "42.1", "15.0", "13.2", "11.3")),
    "CentOS": tuple(f"CentOS {v}" for v in (
        "8.0 64bit", "7.7 64bit", "7.6 64bit", "7.5 64bit", "7.4 64bit", "7.3 64bit", "7.2 64bit",
        "7.1 64bit", "7.0 64bit", "7.0 32bit", "6.10 64bit", "6.10 32bit", "6.9 64bit", "6.8 64bit",
        "6.7 64bit", "6.7 32bit", "6.6 64bit", "6.6 32bit", "6.5 64bit", "6.5 32bit", "6.4 64bit",
        "6.4 32bit", "6.3 64bit", "6.3 32bit")),
    "Debian": tuple(f"Debian GNU/Linux {v} 64bit" for v in (
        "10.0.0", "9.3.0", "9.0.0", "8.10.0", "8.8.0", "8.7.0", "8.6.0", "8.5.0", "8.4.0", "8.2.0", "8.1.0")),
    "Fedora": tuple(f"Fedora {v} 64bit" for v in range(30, 21, -1)),
    "EulerOS": tuple(f"EulerOS {v} 64bit" for v in ("2.9", "2.5", "2.3", "2.2", "2.1")),
    "openEuler": ("openEuler 20.03 64bit",),
    "NeoKylin": ("NeoKylin 7.4 64bit", "NeoKylin Server release 5.0 U2 64bit",
                 "NeoKylin Linux Advanced Server release 7.0 U5 64bit"),
}
ALL_OS_VERSIONS: tuple[str, ...] = tuple(v for family in OS_VERSIONS.values() for v in family)


def os_type_of(os_version: str) -> str:
    """The os_type an os_version from the table implies (Windows or Linux)."""
    return "Windows" if os_version in OS_VERSIONS["Windows"] else "Linux"


def path_for(method: str, disk: str) -> ImportPath:
    """The import path for a method and disk kind; KeyError when the pair does not exist."""
    return PATHS[(method, disk)]
