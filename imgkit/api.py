"""The operations behind the CLI, usable from Python. Each one opens, walks extents, closes."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

from . import engine
from .errors import InvalidImage, NoConsistencyChecks, UnsafeImage, UnsupportedFormat, UsageError, VerifyError
from .extents import Extent, Kind, merge
from .formats import get_format, load_driver, parse_options
from .formats.base import CheckReport, Reader
from .io import AtomicOutput, ImageFile, check_destination
from .limits import DEFAULT_SPARSE, check_virtual_size
from .probe import probe


def open_image(path: str | os.PathLike, fmt: str | None = None) -> Reader:
    """Open an image read-only, detecting its format unless fmt is given.

    The reader carries ``probe`` (what was detected) and ``unsafe_reason`` (set when reading
    its data would mean opening another file, e.g. a backing file)."""
    image = ImageFile(path)
    try:
        found = probe(image, fmt)
        reader = load_driver(found.format).open_reader(image, {})
        check_virtual_size(reader.virtual_size)
    except BaseException:
        image.close()
        raise
    reader.probe = found
    return reader


def ensure_readable(reader: Reader, force_format: bool = False) -> None:
    """Refuse to read guest data through another file, or a raw read of a disguised image."""
    reason = getattr(reader, "unsafe_reason", None)
    if reason:
        raise UnsafeImage(f"{reader.image.path}: {reason}")
    found = getattr(reader, "probe", None)
    if found is not None and found.warning and not force_format:
        raise UnsafeImage(f"{found.warning}; refusing (pass --force-format if you really mean raw)")


def info(path, fmt: str | None = None) -> dict:
    with open_image(path, fmt) as reader:
        out = {
            "virtual-size": reader.virtual_size,
            "filename": os.fspath(path),
            "format": reader.format,
            "actual-size": reader.image.allocated_bytes,
        }
        out.update(reader.info())
        out.setdefault("dirty-flag", False)
        if reader.probe.warning:
            out["warnings"] = [reader.probe.warning]
        return out


def map_entries(reader: Reader, scan: bool = False, granularity: int = 4096,
                threads: int | None = None) -> Iterator[dict]:
    """qemu-img map --output=json entries (start, length, depth, present, zero, data, offset)."""
    extents = engine.scan_extents(reader, granularity, threads) if scan else reader.extents()
    for ext in merge(extents):
        entry = {"start": ext.offset, "length": ext.length, "depth": 0,
                 "present": ext.kind != Kind.UNALLOCATED, "zero": ext.kind != Kind.DATA,
                 "data": ext.kind == Kind.DATA}
        if ext.compressed:
            entry["compressed"] = True
        elif ext.host_offset is not None:
            entry["offset"] = ext.host_offset
        yield entry


@dataclass
class CompareResult:
    identical: bool
    offset: int | None = None
    message: str = ""


def compare(path_a, path_b, fmt_a: str | None = None, fmt_b: str | None = None,
            strict: bool = False, threads: int | None = None, progress=None) -> CompareResult:
    with open_image(path_a, fmt_a) as a, open_image(path_b, fmt_b) as b:
        ensure_readable(a)
        ensure_readable(b)
        return compare_readers(a, b, strict, threads, progress)


def compare_readers(a: Reader, b: Reader, strict: bool = False, threads: int | None = None,
                    progress=None) -> CompareResult:
    if strict and a.virtual_size != b.virtual_size:
        return CompareResult(False, min(a.virtual_size, b.virtual_size),
                             f"Strict mode: Image size mismatch! ({a.virtual_size} vs {b.virtual_size})")
    diff = engine.first_difference(a, b, threads, progress)
    if diff is not None:
        return CompareResult(False, diff, f"Content mismatch at offset {diff}!")
    if a.virtual_size != b.virtual_size:
        longer = a if a.virtual_size > b.virtual_size else b
        tail = engine.first_nonzero(longer, min(a.virtual_size, b.virtual_size), threads)
        if tail is not None:
            return CompareResult(False, tail, f"Content mismatch at offset {tail}!")
    return CompareResult(True, None, "Images are identical.")


def convert(src, dst, out_format: str, *, src_format: str | None = None, options: str | dict | None = None,
            sparse: int = DEFAULT_SPARSE, threads: int | None = None, force: bool = False,
            progress=None, verify: bool = False, force_format: bool = False) -> dict:
    """Convert src into dst atomically: dst appears complete or not at all."""
    driver = load_driver(out_format)
    if not hasattr(driver, "create_writer"):
        raise UnsupportedFormat(f"writing {get_format(out_format).name} is not supported")
    opts = options if isinstance(options, dict) else parse_options(options, driver)
    engine.check_sparse_size(sparse)
    check_destination(dst, force, [src])
    with open_image(src, src_format) as reader:
        ensure_readable(reader, force_format)
        with AtomicOutput(dst, force, [src]) as out:
            writer = driver.create_writer(out, reader.virtual_size, opts)
            engine.copy(reader, writer, sparse, threads, progress)
            writer.finish()
            if verify:
                with open_image(out.tmp, get_format(out_format).name) as written:
                    # A format that stores whole sectors (VHD) may round the size up; that passes
                    # when the added tail reads as zeros. A smaller output never passes.
                    grown = written.virtual_size > reader.virtual_size
                    result = compare_readers(reader, written, strict=not grown, threads=threads)
                if not result.identical:
                    raise VerifyError(f"{dst}: verification failed ({result.message}); output removed")
        return {"source": os.fspath(src), "destination": os.fspath(dst),
                "format": get_format(out_format).name, "virtual-size": reader.virtual_size,
                "bytes": os.path.getsize(dst)}


def check(path, fmt: str | None = None) -> CheckReport:
    """Consistency check as qemu-img check. A format imgkit has no checker for (raw, or one it
    does not read) raises NoConsistencyChecks; an image its driver cannot open raises as usual."""
    image = ImageFile(path)
    try:
        try:
            found = probe(image, fmt)
        except UnsupportedFormat as exc:
            raise NoConsistencyChecks(exc.message) from None
        driver = load_driver(found.format)
        if not hasattr(driver, "check"):
            raise NoConsistencyChecks(f"{path}: {found.format} images have no consistency checks")
        return driver.check(image)
    finally:
        image.close()


def measure(out_format: str, options: str | dict | None = None, src=None, src_format: str | None = None,
            size: int | None = None) -> dict:
    """qemu-img measure: bytes needed for a new image of out_format from src (or of size)."""
    driver = load_driver(out_format)
    if not hasattr(driver, "measure"):
        raise UnsupportedFormat(f"measuring {get_format(out_format).name} output is not supported")
    opts = options if isinstance(options, dict) else parse_options(options, driver)
    if src is None:
        if size is None:
            raise UsageError("measure needs a source image or --size")
        check_virtual_size(size)
        return driver.measure(iter([Extent(0, size, Kind.UNALLOCATED)] if size else []), size, opts)
    with open_image(src, src_format) as reader:
        ensure_readable(reader)
        return driver.measure(reader.extents(), reader.virtual_size, opts)


__all__ = ["open_image", "ensure_readable", "info", "map_entries", "compare", "compare_readers",
           "convert", "check", "measure", "CompareResult", "InvalidImage"]
