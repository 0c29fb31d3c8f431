"""Check an image file and the request that will register it against the IMS rules (rules.py).

Three layers, so prepare can run the cheap ones before converting and the rest after:
check_request (fields only), check_file (format, size, min_disk: needs only sizes) and
check_disk / check_bitmap (read the disk). validate() runs them all on one file.
Every finding carries the service's code when it has one (IMG.xxxx), else an IMGKIT code.
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field

from .. import api
from ..errors import ImgkitError, UnsafeImage, UnsupportedFormat, UsageError
from ..formats import REGISTRY
from ..io import ImageFile
from ..probe import read_head_tail, signatures
from . import bitmap as mf
from . import rules
from .partitions import read_partition_table
from .rules import GB, ImportPath

ERROR = "error"
WARNING = "warning"


@dataclass(frozen=True)
class Finding:
    code: str
    severity: str
    message: str
    fix: str

    def to_json(self) -> dict:
        return {"code": self.code, "severity": self.severity, "message": self.message, "fix": self.fix}


def error(code: str, message: str, fix: str) -> Finding:
    return Finding(code, ERROR, message, fix)


def warning(code: str, message: str, fix: str) -> Finding:
    return Finding(code, WARNING, message, fix)


@dataclass
class Request:
    """What the user means to send to IMS, as given on the command line."""

    method: str = "file"
    disk: str = "system"
    min_disk: int | None = None
    name: str | None = None
    description: str | None = None
    tags: tuple[str, ...] = ()
    image_tags: tuple[str, ...] = ()      # "key=value"
    os_version: str | None = None
    os_type: str | None = None
    architecture: str | None = None
    firmware: str | None = None
    image_url: str | None = None
    bitmap: str | None = None
    granularity: int = rules.DEFAULT_GRANULARITY

    @property
    def path(self) -> ImportPath:
        try:
            return rules.path_for(self.method, self.disk)
        except KeyError:
            pairs = ", ".join(f"{m} with --disk {d}" for m, d in rules.PATHS)
            raise UsageError(f"--method {self.method} has no {self.disk} disk variant (there is: {pairs})") \
                from None


@dataclass
class Report:
    image: str
    path: ImportPath
    findings: list[Finding] = field(default_factory=list)
    facts: dict = field(default_factory=dict)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == ERROR]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == WARNING]

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_json(self) -> dict:
        return {"image": self.image, "ok": self.ok, "method": self.path.method, "disk": self.path.disk,
                "path": self.path.title, "request": f"{self.path.http} {self.path.uri}",
                "section": self.path.section, "errors": len(self.errors), "warnings": len(self.warnings),
                "facts": self.facts, "findings": [f.to_json() for f in self.findings]}


# ---------------------------------------------------------------- fields (no file needed)

def check_request(req: Request) -> list[Finding]:
    """Every rule on the request's fields; raises UsageError for a method/disk pair that does not exist."""
    path = req.path
    found: list[Finding] = []
    if req.name is not None:
        found += check_name(req.name, path.name_max)
    if req.description is not None:
        found += check_description(req.description)
    found += check_tags(req.tags, req.image_tags, native=path.method == "register")
    found += check_os(req, path)
    found += check_boot_request(req, path)
    if req.image_url is not None:
        found += check_image_url(req.image_url)
    if req.min_disk is not None:
        found += check_min_disk_range(req.min_disk, path)
    return found


def check_name(name: str, maximum: int = rules.NAME_MAX) -> list[Finding]:
    fix = f"use 1-{maximum} letters, digits, '-', '.', '_', spaces or Chinese characters"
    if not name:
        return [error("IMG.0013", "the image name is empty", fix)]
    found = []
    if len(name) > maximum:
        found.append(error("IMG.0002", f"the image name has {len(name)} characters, more than {maximum}",
                           f"shorten it to {maximum} characters"))
    if not rules.NAME_CHARS.fullmatch(name):
        bad = sorted({c for c in name if not rules.NAME_CHARS.fullmatch(c)})
        found.append(error("IMG.0003", f"the image name contains {''.join(bad)!r}", fix))
    if name != name.strip(" "):
        found.append(error("IMG.0062", "the image name starts or ends with a space", "remove the outer spaces"))
    return found


def check_description(text: str) -> list[Finding]:
    found = []
    if len(text) > rules.DESCRIPTION_MAX:
        found.append(error("IMG.0004", f"the description has {len(text)} characters, more than "
                                       f"{rules.DESCRIPTION_MAX}", f"shorten it to {rules.DESCRIPTION_MAX}"))
    bad = sorted({c for c in text if c in rules.DESCRIPTION_FORBIDDEN})
    if bad:
        found.append(error("IMG.0054", f"the description contains {''.join(bad)!r}",
                           "remove line breaks and angle brackets (< >)"))
    return found


def parse_tag(tag: str) -> tuple[str, str]:
    """9.2: the key is before the first '.', the value is the rest (dots kept), else empty."""
    key, _, value = tag.partition(".")
    return key, value


def parse_image_tag(tag: str) -> tuple[str, str]:
    key, _, value = tag.partition("=")
    return key, value


def check_tags(tags, image_tags, native: bool = False) -> list[Finding]:
    found = []
    if tags and image_tags:
        found.append(error("IMGKIT.TAGS_BOTH", "both tags and image_tags are given",
                           "use --tag key.value or --image-tag key=value, not both"))
    pairs = [(t, *parse_tag(t)) for t in tags] + [(t, *parse_image_tag(t)) for t in image_tags]
    seen: set[str] = set()
    for text, key, value in pairs:
        found += check_tag(text, key, value)
        if key in seen:
            found.append(error("IMG.0115", f"tag key {key!r} is used twice", "give each key once"))
        seen.add(key)
    if native:
        for text in tags:
            if not 1 <= len(text) <= rules.NATIVE_TAG_MAX or "=" in text:
                found.append(error("IMG.0115", f"tag {text!r} is not a valid metadata tag (1-255 characters, "
                                               f"no '=')", "shorten it and drop '='"))
    return found


def check_tag(text: str, key: str, value: str) -> list[Finding]:
    found = []
    if not key or len(key) > rules.TAG_KEY_MAX or not rules.TAG_KEY.fullmatch(key):
        found.append(error("IMG.0115", f"tag {text!r}: the key {key!r} must be 1-{rules.TAG_KEY_MAX} letters, "
                                       f"digits, '_' or '-'", "fix the key"))
    if len(value) > rules.TAG_VALUE_MAX or not rules.TAG_VALUE.fullmatch(value):
        found.append(error("IMG.0115", f"tag {text!r}: the value {value!r} must be 0-{rules.TAG_VALUE_MAX} "
                                       f"letters, digits, '_', '.' or '-'", "fix the value"))
    return found


def suggest_os_versions(text: str, n: int = 3) -> list[str]:
    """The nearest valid os_version values to a typo (case-insensitive)."""
    lowered = {v.lower(): v for v in rules.ALL_OS_VERSIONS}
    return [lowered[m] for m in difflib.get_close_matches(text.lower(), list(lowered), n=n, cutoff=0.5)]


def check_os(req: Request, path: ImportPath) -> list[Finding]:
    found = []
    if req.os_version is None:
        if path.os_version_required:
            found.append(error("IMG.0159", f"os_version is required for a {path.title}",
                               "pass --os-version with a value of table 9-1"))
        elif path.disk == "system":
            found.append(warning("IMGKIT.OS_VERSION_MISSING", "no os_version given; IMS then assumes a generic "
                                 "Linux and ECS creation may fail", "pass --os-version"))
    elif req.os_version not in rules.ALL_OS_VERSIONS:
        near = suggest_os_versions(req.os_version)
        hint = (f"did you mean: {'; '.join(near)}?" if near
                else "use a value of table 9-1 (listed in imgkit/ims/rules.py)")
        found.append(error("IMGKIT.OS_VERSION", f"os_version {req.os_version!r} is not in table 9-1", hint))
    allowed = rules.DATA_OS_TYPES if path.disk == "data" else rules.OS_TYPES
    if req.os_type is not None and req.os_type not in allowed:
        found.append(error("IMG.0056", f"os_type {req.os_type!r} is not one of {', '.join(allowed)}",
                           f"use {' or '.join(allowed)}"))
    elif req.os_type in ("Linux", "Windows") and req.os_version in rules.ALL_OS_VERSIONS \
            and rules.os_type_of(req.os_version) != req.os_type:
        found.append(error("IMG.0122", f"os_type {req.os_type} contradicts os_version {req.os_version!r}",
                           f"use os_type {rules.os_type_of(req.os_version)}"))
    return found


def check_boot_request(req: Request, path: ImportPath) -> list[Finding]:
    found = []
    if req.architecture is not None and req.architecture not in rules.ARCHITECTURES:
        found.append(error("IMGKIT.ARM_UEFI", f"architecture {req.architecture!r} is not x86 or arm",
                           "use x86 or arm"))
    if req.firmware is not None and req.firmware not in rules.FIRMWARES:
        found.append(error("IMG.0141", f"firmware {req.firmware!r} is neither bios nor uefi", "use bios or uefi"))
    if req.architecture == "arm" and req.firmware == "bios":
        found.append(error("IMGKIT.ARM_UEFI", "arm images boot UEFI only, but --firmware bios was given",
                           "use --firmware uefi (or drop it)"))
    return found


def check_image_url(url: str) -> list[Finding]:
    bucket, sep, obj = url.partition(":")
    if not sep or not bucket or not obj:
        return [error("IMGKIT.IMAGE_URL", f"image_url {url!r} is not bucket:object",
                      "write it as bucket-name:folder/file.raw")]
    found = []
    if not rules.BUCKET_NAME.fullmatch(bucket) or ".." in bucket:
        found.append(error("IMG.0109", f"bucket name {bucket!r} is not a valid OBS bucket name",
                           "use 3-63 lower-case letters, digits, '-' or '.'"))
    return found + check_object_name(obj)


def check_object_name(obj: str, severity: str = ERROR) -> list[Finding]:
    """IMG.0175: no spaces in folder or file names; IMG.0075: the file name's characters."""
    found = []
    if " " in obj:
        found.append(Finding("IMG.0175", severity, f"object name {obj!r} contains spaces",
                             "rename the file (and folders) without spaces"))
    filename = obj.rsplit("/", 1)[-1]
    if not filename or len(filename) > rules.OBJECT_NAME_MAX or not rules.OBJECT_NAME_CHARS.fullmatch(filename) \
            or filename != filename.strip(" "):
        found.append(Finding("IMG.0075", severity, f"file name {filename!r} breaks the naming rules",
                             f"use 1-{rules.OBJECT_NAME_MAX} letters, digits, '-', '.' or '_'"))
    return found


def check_min_disk_range(min_disk: int, path: ImportPath) -> list[Finding]:
    lo, hi = path.min_disk
    if lo <= min_disk <= hi:
        return []
    return [error("IMG.0055", f"min_disk {min_disk} GB is outside {lo}-{hi} GB for a {path.title} ({path.section})",
                  f"choose a min_disk from {lo} to {hi}")]


# ---------------------------------------------------------------- the file's sizes and format

def needed_gb(virtual_size: int) -> int:
    """The whole GB a disk must have to hold the virtual disk (at least 1)."""
    return max(1, -(-virtual_size // GB))


def smallest_min_disk(path: ImportPath, virtual_size: int) -> int | None:
    """The smallest min_disk this path accepts for this disk, or None when none fits."""
    value = max(path.min_disk[0], needed_gb(virtual_size))
    return value if value <= path.min_disk[1] else None


def check_file(path: ImportPath, fmt: str, file_size: int, virtual_size: int | None,
               min_disk: int | None) -> tuple[list[Finding], dict]:
    """Format accepted on the path, file size under its limit, min_disk able to hold the disk."""
    found: list[Finding] = []
    ims_format = fmt.upper()
    if ims_format not in path.formats:
        fix = ("convert it to RAW (imgkit prepare --method quick) or use --method file"
               if path.method == "quick" else "convert it to qcow2 (imgkit convert -O qcow2)")
        found.append(error(path.format_code, f"{ims_format} files are not accepted for a {path.title} "
                                             f"(accepted: {', '.join(path.formats)})", fix))
    if file_size > path.max_file:
        fix = "use quick import (imgkit prepare --method quick)" if path.method != "quick" else \
            "split the data over several disks"
        found.append(error("IMG.0059", f"the file is {file_size} bytes, over the {path.max_file // GB} GB "
                                       f"limit of a {path.title}", fix))
    elif path.method != "quick" and file_size >= rules.QUICK_RECOMMENDED_FROM:
        found.append(warning("IMGKIT.QUICK_RECOMMENDED", "files of 128 GB and more should use quick import "
                             "(5.1.4)", "use --method quick"))
    if path.method == "register" and fmt.lower() not in rules.DISK_FORMAT_VALUES:
        found.append(warning("IMGKIT.DISK_FORMAT", f"disk_format has no value for {ims_format} in the metadata "
                             f"(6.1.6: {', '.join(rules.DISK_FORMAT_VALUES)})", "convert to qcow2 before registering"))
    facts = {"format": fmt, "file-size": file_size}
    if virtual_size is not None:
        more, facts_min = check_min_disk(path, virtual_size, min_disk)
        found += more
        facts.update(facts_min)
    return found, facts


def check_min_disk(path: ImportPath, virtual_size: int, min_disk: int | None) -> tuple[list[Finding], dict]:
    need = needed_gb(virtual_size)
    facts = {"virtual-size": virtual_size, "virtual-size-gb": need}
    lo, hi = path.min_disk
    if min_disk is None:
        best = smallest_min_disk(path, virtual_size)
        facts.update({"min-disk": best, "min-disk-computed": True})
        if best is None:
            code = "IMG.0111" if path.disk == "system" else "IMG.0055"
            return [error(code, f"the virtual disk needs {need} GB, above the {hi} GB maximum of a {path.title}",
                          "shrink the disk or use quick import (up to 1024 GB)")], facts
        return [], facts
    facts.update({"min-disk": min_disk, "min-disk-computed": False})
    if min_disk < need:
        return [error("IMG.0055", f"min_disk {min_disk} GB cannot hold the {virtual_size}-byte virtual disk "
                                  f"({need} GB)", f"use min_disk {max(need, lo)} or more")], facts
    return [], facts


# ---------------------------------------------------------------- the disk's content

def check_disk(reader, req: Request, path: ImportPath) -> tuple[list[Finding], dict]:
    """Partition table on a system disk, and what its EFI system partition says about booting."""
    if path.disk != "system":
        return [], {}
    table = read_partition_table(reader)
    facts = {"partition-table": table.to_json()}
    found = [warning("IMGKIT.PARTITION_TABLE", note, "check the disk with fdisk -l") for note in table.notes]
    if table.kind is None:
        found.append(error("IMGKIT.NO_PARTITION_TABLE", "no MBR or GPT partition table: a system disk without "
                           "one cannot boot", "use the whole disk, not one partition or file system"))
        return found, facts
    if table.partitions == 0:
        found.append(warning("IMGKIT.PARTITION_TABLE", f"the {table.kind.upper()} partition table is empty",
                             "use the disk with the installed system"))
    boot = boot_mode(table)
    facts["boot"] = boot
    return found + check_firmware(req, boot), facts


def boot_mode(table) -> str:
    """uefi (an EFI system partition only), bios, or uefi+bios (also a GPT BIOS boot partition)."""
    if table.has_esp:
        return "uefi+bios" if table.has_bios_boot else "uefi"
    return "bios"


def check_firmware(req: Request, boot: str) -> list[Finding]:
    firmware = req.firmware or ("uefi" if req.architecture == "arm" else None)
    if boot == "uefi" and firmware in (None, "bios"):
        said = "--firmware bios was given" if firmware else f"the default boot mode is {rules.DEFAULT_FIRMWARE}"
        return [warning("IMGKIT.FIRMWARE", f"the disk has an EFI system partition and no BIOS boot partition: "
                        f"it boots UEFI, but {said}",
                        "use --firmware uefi (set hw_firmware_type=uefi on the image)")]
    if boot == "bios" and firmware == "uefi":
        reason = "arm boots UEFI" if req.architecture == "arm" else "--firmware uefi was given"
        return [warning("IMGKIT.FIRMWARE", f"{reason}, but the disk has no EFI system partition",
                        "check that the disk really boots UEFI")]
    return []


def check_consistency(image_path: str, fmt: str) -> list[Finding]:
    """The driver's check where the format has one (raw has none)."""
    try:
        report = api.check(image_path, fmt)
    except UnsupportedFormat:
        return []
    found = []
    if report.corruptions or report.check_errors:
        first = (report.corruptions + report.check_errors)[0]
        found.append(error("IMGKIT.CHECK", f"check found {len(report.corruptions)} corruptions and "
                                           f"{len(report.check_errors)} errors (first: {first})",
                           "repair it (qemu-img check -r all) or recreate the image"))
    if report.leaks:
        found.append(warning("IMGKIT.LEAKS", f"check found {len(report.leaks)} leaked clusters",
                             "harmless for IMS; imgkit convert drops them"))
    return found


def check_bitmap(reader, image_path: str, req: Request, path: ImportPath, fmt: str, threads=None,
                 progress=None) -> tuple[list[Finding], dict]:
    """A RAW quick import needs its .mf beside it (or --bitmap), and it must match the disk."""
    if fmt.upper() not in path.needs_bitmap:
        return [], {}
    where = req.bitmap or mf.default_bitmap_path(image_path)
    facts = {"bitmap": where, "bitmap-granularity": req.granularity}
    if not os.path.exists(where):
        return [error("IMG.0158", f"a RAW quick import needs its bitmap, and {where} does not exist",
                      f"imgkit bitmap {image_path}")], facts
    verdict = mf.verify_bitmap(reader, where, req.granularity, threads, progress)
    facts["bitmap-matches"] = verdict.matches
    if verdict.matches:
        return [], facts
    return [error("IMGKIT.BITMAP_MISMATCH", f"{where}: {verdict.message}",
                  f"imgkit bitmap --force {image_path}")], facts


# ---------------------------------------------------------------- everything, for one file

def detected_format(image_path: str) -> str | None:
    """The format a file carries, readable or not (for a file imgkit cannot open)."""
    try:
        with ImageFile(image_path) as image:
            found = signatures(*read_head_tail(image), image.size)
    except ImgkitError:
        return None
    return found[0] if len(found) == 1 else None


def validate(image_path: str, req: Request, fmt: str | None = None, threads=None, progress=None) -> Report:
    """All findings for one image file and the request that would import it."""
    path = req.path
    report = Report(os.fspath(image_path), path)
    report.findings += check_request(req)
    if req.image_url is None:
        report.findings += check_object_name(os.path.basename(image_path), WARNING)
    try:
        reader = api.open_image(image_path, fmt)
    except UnsupportedFormat as exc:
        report.findings += _unreadable(image_path, req, path, exc)
        return report
    except UnsafeImage as exc:
        report.findings.append(error("IMGKIT.UNSAFE", exc.message, "say which format it is with -f"))
        return report
    except ImgkitError as exc:
        report.findings.append(error("IMG.0057", exc.message, "give a valid, complete image file"))
        return report
    with reader:
        found, facts = check_file(path, reader.format, reader.image.size, reader.virtual_size, req.min_disk)
        report.findings += found
        report.facts.update(facts)
        try:
            api.ensure_readable(reader)
        except UnsafeImage as exc:
            report.findings.append(error("IMGKIT.UNSAFE", exc.message, "convert it to a standalone image first "
                                                                       "(qemu-img convert flattens backing files)"))
            return report
        report.findings += check_consistency(image_path, reader.format)
        for step in (check_disk(reader, req, path),
                     check_bitmap(reader, image_path, req, path, reader.format, threads, progress)):
            report.findings += step[0]
            report.facts.update(step[1])
    return report


def _unreadable(image_path: str, req: Request, path: ImportPath, exc: UnsupportedFormat) -> list[Finding]:
    """A format imgkit cannot read: still say whether the path accepts it."""
    fmt = detected_format(image_path)
    if fmt is None:
        return [error("IMG.0057", exc.message, "give a valid image file")]
    if fmt in REGISTRY:      # a format imgkit reads, in a version or with a feature it cannot take
        return [error("IMG.0057", exc.message, "rewrite it with the tool that made it, or convert it "
                                               "to a plain image first")]
    found, _ = check_file(path, fmt, os.path.getsize(image_path), None, req.min_disk)
    if fmt == "iso" and req.os_version is None:
        found.append(error("IMGKIT.OS_VERSION_MISSING", "os_version is required for an ISO file (5.1.3)",
                           "pass --os-version"))
    if not any(f.severity == ERROR and f.code == path.format_code for f in found):
        found.append(warning("IMGKIT.UNREADABLE", f"{exc.message}; only the file's format and size were checked",
                             "check the disk's content with the tool that made it"))
    return found
