"""The one table of format drivers. Modules load on first use, so importing imgkit stays cheap.

A driver module provides:
  OPTIONS: dict[str, str]                    -o keys it accepts, with a one-line help each
  open_reader(image: ImageFile, options: dict) -> Reader
  create_writer(out: AtomicOutput, virtual_size: int, options: dict) -> Writer   (if writable)
and optionally:
  check(image: ImageFile) -> CheckReport
  measure(extents: Iterable[Extent], virtual_size: int, options: dict) -> dict
       with keys "required" and "fully-allocated" (bytes), as qemu-img measure
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from ..errors import UnsupportedFormat, UsageError


@dataclass(frozen=True)
class FormatSpec:
    name: str
    module: str
    extensions: tuple[str, ...]
    description: str
    aliases: tuple[str, ...] = ()

    def load(self):
        return importlib.import_module(self.module)


REGISTRY: dict[str, FormatSpec] = {
    spec.name: spec for spec in (
        FormatSpec("raw", "imgkit.formats.raw", ("raw", "img", "bin"), "raw disk, sparse on output"),
        FormatSpec("qcow2", "imgkit.formats.qcow2", ("qcow2",), "QEMU copy-on-write v2/v3"),
        FormatSpec("vhd", "imgkit.formats.vhd", ("vhd",), "Virtual PC / Hyper-V VHD, fixed and dynamic",
                   aliases=("vpc",)),
        FormatSpec("vmdk", "imgkit.formats.vmdk", ("vmdk",),
                   "VMware monolithicSparse and streamOptimized"),
    )
}


def get_format(name: str) -> FormatSpec:
    """The spec for a format name or alias; unknown names get the list of known ones."""
    key = name.lower()
    for spec in REGISTRY.values():
        if key == spec.name or key in spec.aliases:
            return spec
    raise UsageError(f"unknown format {name!r}; imgkit handles: {', '.join(REGISTRY)}")


def load_driver(name: str):
    """Import a registered driver, or explain that this build does not have it."""
    spec = get_format(name)
    try:
        return spec.load()
    except ModuleNotFoundError as exc:
        if exc.name == spec.module:
            raise UnsupportedFormat(f"{spec.name} images are not supported by this build of imgkit") from None
        raise


def parse_options(text: str | None, driver) -> dict[str, str]:
    """'-o k=v,k=v' into a dict, refusing keys the driver does not know."""
    options: dict[str, str] = {}
    if not text:
        return options
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        if key not in driver.OPTIONS:
            known = ", ".join(sorted(driver.OPTIONS)) or "none"
            raise UsageError(f"unknown option {key!r} for this format (known: {known})")
        options[key] = value.strip() if sep else "on"
    return options
