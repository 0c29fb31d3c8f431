"""Any disk -> a registration-ready folder: image, bitmap, request.json, metadata.json, manifest.json, SHA256SUMS.

One pass over the data: the converted image, the SHA-256 of the virtual disk and the .mf bitmap
are all produced while the engine streams windows into the writer (DigestWriter wraps the
driver's Writer, so the engine needs no special case). A file whose bytes are its virtual disk
(identity mapped, as RAW is) takes that stream digest as its file digest; any other file is
hashed from its own, compact bytes.

The folder appears complete or not at all: it is built in a hidden temp folder beside it and
renamed at the end; any failure or interrupt removes the temp folder.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import queue
import re
import shutil
import sys
import threading
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace

from .. import __version__, api, engine
from ..errors import INTERNAL_ERROR_EXIT, ImgkitError, OutputError, UnsupportedFormat, UsageError
from ..formats import get_format, load_driver
from ..formats.base import Writer
from ..io import AtomicOutput, ImageFile, forget_temp, register_temp
from . import bitmap as mf
from . import rules
from .validate import (ERROR, Finding, Request, check_consistency, check_disk, check_file, check_min_disk,
                       check_min_disk_range, check_request, error, parse_image_tag, smallest_min_disk)

HASH_CHUNK = 4 << 20
ZEROS = bytes(HASH_CHUNK)
COMPACT_FORMAT = "qcow2"
SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")
BITMAP_LAYOUT = ("one bit per block of granularity bytes (last block may be short), set when the block holds a "
                 "non-zero byte, least significant bit first, ceil(blocks/8) bytes, no header")


class PrepareFailed(ImgkitError):
    """The image breaks an IMS rule, so no folder was written."""
    exit_code = 1


@dataclass
class Options:
    """prepare's arguments that apply to every source."""

    out_dir: str
    request: Request
    method: str = "auto"            # auto, quick or file
    out_format: str | None = None
    src_format: str | None = None
    bucket: str | None = None
    force: bool = False
    threads: int | None = None
    progress: str | None = None     # None, "bar" or "json"
    force_format: bool = False      # read as -f says even if another format's magic is present


@dataclass
class Job:
    """One source and where its folder goes (the temp folder is chosen by the parent)."""

    src: str
    name: str
    stem: str
    folder: str
    tmp: str
    position: int = 0


@dataclass
class Outcome:
    src: str
    name: str
    ok: bool
    folder: str | None = None
    method: str | None = None
    format: str | None = None
    size: int | None = None
    reason: str = ""
    error: str | None = None
    exit_code: int = 0
    findings: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return dict(self.__dict__)


# ---------------------------------------------------------------- planning (before any conversion)

def safe_stem(src: str) -> str:
    """The source's name without extension, fit for an OBS object name (IMG.0075, IMG.0175)."""
    stem = os.path.splitext(os.path.basename(src))[0] or "image"
    return SAFE_NAME.sub("_", stem)[:rules.OBJECT_NAME_MAX - 8]


def plan(sources: list[str], opts: Options) -> list[Job]:
    """Jobs for every source, or UsageError/OutputError before anything is converted."""
    if not sources:
        raise UsageError("prepare needs at least one source image")
    check_options(opts)
    jobs, seen = [], {}
    for i, src in enumerate(sources):
        stem = safe_stem(src)
        if stem in seen:
            raise UsageError(f"{src} and {seen[stem]} would both be written to {stem}/; rename one of them")
        seen[stem] = src
        name = stem if not opts.request.name else (opts.request.name if len(sources) == 1
                                                   else f"{opts.request.name}-{stem}")
        folder = os.path.join(opts.out_dir, stem)
        tmp = os.path.join(opts.out_dir, f".{stem}.{uuid.uuid4().hex[:8]}.imgkit-tmp")
        jobs.append(Job(os.fspath(src), name, stem, folder, tmp, i))
    for job in jobs:
        fatal = field_errors(replace(opts.request, name=job.name), opts)
        if fatal:
            raise UsageError(f"{job.src}: " + "; ".join(f"{f.code}: {f.message} ({f.fix})" for f in fatal))
        if os.path.lexists(job.folder) and not opts.force:
            raise OutputError(f"{job.folder}: already exists (use --force to replace it)")
    return jobs


def check_options(opts: Options) -> None:
    if opts.method not in ("auto", "quick", "file"):
        raise UsageError(f"--method {opts.method}: use auto, quick or file")
    if opts.out_format:
        get_format(opts.out_format)
        if opts.method == "quick" and get_format(opts.out_format).name != "raw":
            raise UsageError(f"--format {opts.out_format}: quick import takes RAW (+ bitmap) or ZVHD2, "
                             f"and imgkit writes RAW")
    mf.check_granularity(opts.request.granularity)
    if opts.bucket is not None and not rules.BUCKET_NAME.fullmatch(opts.bucket):
        raise UsageError(f"--bucket {opts.bucket!r}: not a valid OBS bucket name (IMG.0109)")
    parent = os.path.dirname(os.path.abspath(opts.out_dir))
    if not os.path.isdir(parent):
        raise OutputError(f"{opts.out_dir}: its folder {parent} does not exist")
    if os.path.exists(opts.out_dir) and not os.path.isdir(opts.out_dir):
        raise OutputError(f"{opts.out_dir}: exists and is not a folder")


def candidate_paths(opts: Options) -> list[rules.ImportPath]:
    """The paths this run may take, preferred first."""
    file_path = rules.path_for("file", "system") if opts.request.disk == "system" else rules.path_for("data", "data")
    quick_path = rules.path_for("quick", opts.request.disk)
    return {"auto": [file_path, quick_path], "file": [file_path], "quick": [quick_path]}[opts.method]


def request_for(req: Request, path: rules.ImportPath) -> Request:
    return replace(req, method=path.method, disk=path.disk)


def field_errors(req: Request, opts: Options) -> list[Finding]:
    """The field errors every candidate path shares (those make the run impossible)."""
    per_path = [[f for f in check_request(request_for(req, p)) if f.severity == ERROR]
                for p in candidate_paths(opts)]
    if all(per_path):
        return per_path[-1]
    return []


# ---------------------------------------------------------------- choosing the path for one disk

@dataclass
class Choice:
    path: rules.ImportPath
    out_format: str
    reason: str


def choose(reader, src: str, req: Request, opts: Options) -> Choice:
    """auto: the file path with a compact format when all its rules hold, else quick import."""
    refused = []
    for path in candidate_paths(opts):
        out_format = opts.out_format or (COMPACT_FORMAT if path.method != "quick" else "raw")
        problems, held = judge_path(reader, request_for(req, path), path, out_format)
        if not problems:
            prefix = f"--method {opts.method}" if opts.method != "auto" else "auto"
            why = "; ".join(refused + held)
            target = f"{out_format} + bitmap" if out_format.upper() in path.needs_bitmap else out_format
            return Choice(path, out_format, f"{prefix}: {path.title} as {target}" + (f" ({why})" if why else ""))
        refused.append(f"{path.title} as {out_format} is not possible: {'; '.join(problems)}")
    raise PrepareFailed(f"{src}: " + "; ".join(refused))


def judge_path(reader, req: Request, path: rules.ImportPath, out_format: str) -> tuple[list[str], list[str]]:
    """(why this path cannot take this disk, which of its rules hold), judged before converting."""
    problems = [f.message for f in check_request(req) if f.severity == ERROR]
    min_disk_findings, facts = check_min_disk(path, reader.virtual_size, req.min_disk)
    problems += [f.message for f in min_disk_findings if f.severity == ERROR]
    held = [f"min_disk {facts['min-disk']} GB fits {path.min_disk[0]}-{path.min_disk[1]} GB"] \
        if facts.get("min-disk") is not None and not min_disk_findings else []
    try:
        driver = load_driver(out_format)
        if not hasattr(driver, "create_writer"):
            raise UnsupportedFormat(f"writing {out_format} is not supported")
    except UnsupportedFormat as exc:
        return problems + [exc.message], held
    if out_format.upper() not in path.formats:
        problems.append(f"{out_format.upper()} is not accepted ({path.format_code})")
    estimate = estimated_size(reader, driver)
    limit = f"{path.max_file // rules.GB} GB"
    if estimate is not None and estimate > path.max_file:
        problems.append(f"the {out_format} file would be about {estimate} bytes, over the {limit} limit (IMG.0059)")
    elif estimate is not None:
        held.append(f"measure: about {estimate} bytes of {out_format}, under {limit}")
    return problems, held


def estimated_size(reader, driver) -> int | None:
    """measure's estimate of the converted file, from metadata only."""
    if not hasattr(driver, "measure"):
        return None
    return driver.measure(reader.extents(), reader.virtual_size, {})["required"]


# ---------------------------------------------------------------- streaming digest and bitmap

class DigestWriter(Writer):
    """Wraps a driver's Writer: SHA-256 of the virtual disk in commit order, and the bitmap mask.

    The digest runs in its own thread (OrderedHasher), so hashing overlaps reading and writing;
    commit only hands it a copy of the window (the engine reuses the buffer after commit)."""

    def __init__(self, inner: Writer, virtual_size: int, bitmap: mf.StreamingBitmap | None):
        self.inner = inner
        self.chunk_size = inner.chunk_size
        self.virtual_size = virtual_size
        self.bitmap = bitmap
        self.hasher = OrderedHasher()
        self.hasher.start()
        self.hashed = 0

    def encode(self, offset, data, mask):
        blocks = self.bitmap.window(offset, data) if self.bitmap is not None else None
        return self.inner.encode(offset, data, mask), data, blocks

    def commit(self, offset, encoded) -> None:
        inner, data, blocks = encoded
        self.hasher.feed_zeros(offset - self.hashed)
        self.hasher.feed(bytes(data))
        self.hashed = offset + len(data)
        if blocks is not None:
            self.bitmap.apply(*blocks)
        self.inner.commit(offset, inner)

    def finish(self) -> None:
        self.hasher.feed_zeros(self.virtual_size - self.hashed)
        self.hashed = self.virtual_size
        self.inner.finish()

    def hexdigest(self) -> str:
        return self.hasher.hexdigest()

    def cancel(self) -> None:
        self.hasher.cancel()


class OrderedHasher(threading.Thread):
    """SHA-256 over pieces handed in order: bytes, or a count of zero bytes (windows never read)."""

    QUEUE_DEPTH = 8      # bounds the copies held: 8 windows

    def __init__(self):
        super().__init__(daemon=True)
        self.sha = hashlib.sha256()
        self.pieces: queue.Queue = queue.Queue(self.QUEUE_DEPTH)
        self.failure: BaseException | None = None
        self.cancelled = False

    def feed(self, data: bytes) -> None:
        self._put(data)

    def feed_zeros(self, count: int) -> None:
        if count > 0:
            self._put(count)

    def _put(self, piece) -> None:
        if self.failure is not None:
            raise self.failure
        self.pieces.put(piece)

    def run(self) -> None:
        """Consumes until the None sentinel even after a failure, so a put() never blocks on a
        full queue that nobody drains."""
        zeros = memoryview(ZEROS)
        while (piece := self.pieces.get()) is not None:
            if self.cancelled or self.failure is not None:
                continue
            try:
                if isinstance(piece, int):
                    for done in range(0, piece, HASH_CHUNK):
                        self.sha.update(zeros[:min(HASH_CHUNK, piece - done)])
                else:
                    self.sha.update(piece)
            except BaseException as exc:   # handed to the caller by _put() or hexdigest()
                self.failure = exc

    def hexdigest(self) -> str:
        self.pieces.put(None)
        self.join()
        if self.failure is not None:
            raise self.failure
        return self.sha.hexdigest()

    def cancel(self) -> None:
        self.cancelled = True
        self.pieces.put(None)


class FileHasher(threading.Thread):
    """SHA-256 of a whole file, in a thread (pread and sha256 release the GIL)."""

    def __init__(self, path: str):
        super().__init__(daemon=True)
        self.path = path
        self.sha = hashlib.sha256()
        self.failure: BaseException | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            hash_file(self.path, self.sha, self.stop)
        except BaseException as exc:   # handed to the caller by result()
            self.failure = exc

    def result(self) -> str:
        self.join()
        if self.failure is not None:
            raise self.failure
        return self.sha.hexdigest()


def hash_file(path: str, sha, stop: threading.Event | None = None) -> None:
    with ImageFile(path) as image:
        buf = memoryview(bytearray(HASH_CHUNK))
        pos = 0
        while pos < image.size and not (stop and stop.is_set()):
            n = image.readinto(buf[:min(HASH_CHUNK, image.size - pos)], pos)
            if n == 0:
                break
            sha.update(buf[:n])
            pos += n


def file_sha256(path: str) -> str:
    sha = hashlib.sha256()
    hash_file(path, sha)
    return sha.hexdigest()


# ---------------------------------------------------------------- one image

def prepare_one(job: Job, opts: Options) -> Outcome:
    """Build job.folder through job.tmp; nothing is left behind on failure or interrupt."""
    register_temp(job.tmp)
    try:
        make_folder(opts.out_dir, job.tmp)
        outcome = build(job, opts)
        publish(job.tmp, job.folder, opts.force)
        return outcome
    except BaseException:
        shutil.rmtree(job.tmp, ignore_errors=True)
        raise
    finally:
        forget_temp(job.tmp)


def make_folder(out_dir: str, tmp: str) -> None:
    try:
        os.makedirs(out_dir, exist_ok=True)
        os.mkdir(tmp)
    except OSError as exc:
        raise OutputError(f"{out_dir}: cannot create the image folder ({exc.strerror})") from None


def build(job: Job, opts: Options) -> Outcome:
    req = replace(opts.request, name=job.name)
    with api.open_image(job.src, opts.src_format) as reader:
        api.ensure_readable(reader, force_format=opts.force_format)
        before, disk_facts = source_findings(reader, job.src, request_for(req, candidate_paths(opts)[0]))
        fail_on_errors(job.src, before)
        choice = choose(reader, job.src, req, opts)
        req = request_for(req, choice.path)
        image_name = f"{job.stem}.{get_format(choice.out_format).extensions[0]}"
        image_path = os.path.join(job.tmp, image_name)
        produced = convert(reader, job.src, image_path, choice, req, opts, job)
    after = result_findings(image_path, choice, req, produced)
    findings = check_request(req) + before + after
    fail_on_errors(job.src, findings)
    produced["disk"] = disk_facts
    write_folder(job, opts, req, choice, image_name, produced, findings)
    return Outcome(job.src, job.name, True, job.folder, choice.path.method, choice.out_format,
                   produced["image"]["size"], choice.reason, findings=[f.to_json() for f in findings])


def source_findings(reader, src: str, req: Request) -> tuple[list[Finding], dict]:
    """What the source disk itself says: partition table and boot mode, the format's check."""
    found, facts = check_disk(reader, req, req.path)
    return found + check_consistency(src, reader.format), facts


def fail_on_errors(src: str, findings: list[Finding]) -> None:
    errors = [f for f in findings if f.severity == ERROR]
    if errors:
        raise PrepareFailed(f"{src}: " + "; ".join(f"{f.code}: {f.message} (fix: {f.fix})" for f in errors))


def convert(reader, src: str, image_path: str, choice: Choice, req: Request, opts: Options, job: Job) -> dict:
    """Stream the source into the image file; digests and bitmap come out of the same pass."""
    driver = load_driver(choice.out_format)
    stream_bitmap = None
    if choice.out_format.upper() in choice.path.needs_bitmap:
        stream_bitmap = mf.StreamingBitmap(reader.virtual_size, req.granularity)
    source_identity = engine.identity_mapped(reader)
    source_hasher = None if source_identity else FileHasher(src)
    if source_hasher is not None:
        source_hasher.start()
    progress = make_progress(opts.progress, reader.virtual_size, job.name, job.position)
    try:
        with AtomicOutput(image_path, False, [src]) as out:
            writer = DigestWriter(driver.create_writer(out, reader.virtual_size, {}), reader.virtual_size,
                                  stream_bitmap)
            try:
                engine.copy(reader, writer, threads=opts.threads, progress=progress)
                writer.finish()
            except BaseException:
                writer.cancel()
                raise
    except BaseException:
        if source_hasher is not None:
            source_hasher.stop.set()
        raise
    finally:
        progress.close()
    virtual_sha = writer.hexdigest()
    source_sha = virtual_sha if source_identity else source_hasher.result()
    with api.open_image(image_path, choice.out_format) as written:
        image_sha = virtual_sha if engine.identity_mapped(written) else file_sha256(image_path)
    produced = {
        "source": {"path": os.path.abspath(src), "size": reader.image.size, "sha256": source_sha,
                   "format": reader.format, "virtual-size": reader.virtual_size},
        "image": {"file": os.path.basename(image_path), "format": choice.out_format,
                  "virtual-size": reader.virtual_size, "size": os.path.getsize(image_path), "sha256": image_sha,
                  "virtual-sha256": virtual_sha},
        "bitmap": None,
    }
    if stream_bitmap is not None:
        produced["bitmap"] = write_bitmap_file(stream_bitmap, image_path, req.granularity)
    return produced


def write_bitmap_file(stream_bitmap: mf.StreamingBitmap, image_path: str, granularity: int) -> dict:
    path = mf.default_bitmap_path(image_path)
    data = mf.pack(stream_bitmap.mask)
    mf.save(data, path)
    info = mf.describe(stream_bitmap.mask, granularity, os.path.basename(path))
    return {"file": info["bitmap"], "granularity": granularity, "blocks": info["blocks"],
            "data-blocks": info["data-blocks"], "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "layout": BITMAP_LAYOUT}


def result_findings(image_path: str, choice: Choice, req: Request, produced: dict) -> list[Finding]:
    """The converted file against its path: format, size, min_disk; the format's own check."""
    image = produced["image"]
    found, _ = check_file(choice.path, choice.out_format, image["size"], image["virtual-size"], req.min_disk)
    found += check_consistency(image_path, choice.out_format)
    if choice.out_format.upper() in choice.path.needs_bitmap and produced["bitmap"] is None:
        found.append(error("IMG.0158", "no bitmap was written for a RAW quick import", "report this as a bug"))
    return found


# ---------------------------------------------------------------- the folder

def image_url(opts: Options, object_name: str) -> str:
    return f"{opts.bucket or '<bucket>'}:{object_name}"


def min_disk_for(path: rules.ImportPath, req: Request, virtual_size: int) -> int | None:
    return req.min_disk if req.min_disk is not None else smallest_min_disk(path, virtual_size)


def tag_fields(req: Request) -> dict:
    if req.image_tags:
        return {"image_tags": [dict(zip(("key", "value"), parse_image_tag(t))) for t in req.image_tags]}
    return {"tags": list(req.tags)} if req.tags else {}


def request_body(req: Request, path: rules.ImportPath, url: str, min_disk: int | None) -> dict:
    """The body of the chosen path's API call, with the service's field names."""
    body = {"name": req.name}
    if req.description:
        body["description"] = req.description
    if path.disk == "data":
        body["os_type"] = req.os_type or "Linux"
    else:
        if req.os_type:
            body["os_type"] = req.os_type
        if req.os_version:
            body["os_version"] = req.os_version
    body.update({"image_url": url, "min_disk": min_disk})
    body.update(tag_fields(req))
    if path.body_type:
        body["type"] = path.body_type
    if path.method == "quick" and path.disk == "system" and req.architecture:
        body["architecture"] = req.architecture
    return body


def metadata_body(req: Request, image: dict, url: str, uefi: bool) -> dict:
    """6.1.6 POST /v2/images, then 5.1.7 PUT /v1/cloudimages/{image_id}/upload: the registration path,
    with notes when this file breaks one of that path's rules."""
    register = rules.path_for("register", "system")
    given = req.min_disk if req.min_disk is not None and not check_min_disk_range(req.min_disk, register) else None
    found, facts = check_file(register, image["format"], image["size"], image["virtual-size"], given)
    create = {"__os_version": req.os_version, "container_format": "bare", "disk_format": image["format"],
              "min_disk": facts["min-disk"], "min_ram": 0, "name": req.name,
              "tags": list(req.tags) + [".".join(parse_image_tag(t)) for t in req.image_tags],
              "visibility": "private", "protected": False}
    if image["format"] not in rules.DISK_FORMAT_VALUES:
        del create["disk_format"]
    if uefi:
        create["hw_firmware_type"] = "uefi"
    body = {"create": {"request": "POST /v2/images", "section": "6.1.6", "body": create},
            "register": {"request": f"PUT {register.uri}", "section": "5.1.7", "body": {"image_url": url}}}
    notes = [f"{f.severity} {f.code}: {f.message} ({f.fix})" for f in found]
    if notes:
        body["notes"] = notes
    return body


def write_folder(job: Job, opts: Options, req: Request, choice: Choice, image_name: str, produced: dict,
                 findings: list[Finding]) -> None:
    """request.json, metadata.json, manifest.json and SHA256SUMS beside the image."""
    path = choice.path
    vsize = produced["image"]["virtual-size"]
    url = image_url(opts, image_name)
    min_disk = min_disk_for(path, req, vsize)
    uefi = req.firmware == "uefi" or req.architecture == "arm" or produced["disk"].get("boot") == "uefi"
    files = [{"name": image_name, "size": produced["image"]["size"], "sha256": produced["image"]["sha256"]}]
    if produced["bitmap"]:
        files.append({"name": produced["bitmap"]["file"], "size": produced["bitmap"]["size"],
                      "sha256": produced["bitmap"]["sha256"]})
    files.append(write_json(job.tmp, "request.json", request_body(req, path, url, min_disk)))
    files.append(write_json(job.tmp, "metadata.json",
                            metadata_body(req, produced["image"], url, uefi)))
    manifest = {
        "imgkit-version": __version__, "name": req.name,
        "method": {"path": path.title, "method": path.method, "disk": path.disk, "reason": choice.reason},
        "request": {"file": "request.json", "request": f"{path.http} {path.uri}", "section": path.section,
                    "image_url": url, "min-disk": min_disk},
        "source": produced["source"], "image": produced["image"], "bitmap": produced["bitmap"],
        "bitmap-granularity": produced["bitmap"]["granularity"] if produced["bitmap"] else None,
        "disk": produced["disk"],
        "files": list(files),
        "validation": {"ok": True, "errors": 0, "warnings": len(findings),
                       "findings": [f.to_json() for f in findings]},
    }
    files.append(write_json(job.tmp, "manifest.json", manifest))
    sums = "".join(f"{f['sha256']}  {f['name']}\n" for f in files).encode()
    write_bytes(job.tmp, "SHA256SUMS", sums)


def write_json(folder: str, name: str, obj) -> dict:
    data = (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode()
    write_bytes(folder, name, data)
    return {"name": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def write_bytes(folder: str, name: str, data: bytes) -> None:
    with AtomicOutput(os.path.join(folder, name)) as out:
        out.pwrite(data, 0)


def publish(tmp: str, folder: str, force: bool) -> None:
    """Rename the finished temp folder into place (replacing an old one only with --force)."""
    old = None
    try:
        if os.path.lexists(folder):
            if not force:
                raise OutputError(f"{folder}: appeared while preparing; not replaced (use --force)")
            old = f"{tmp}.old"
            os.rename(folder, old)
        os.rename(tmp, folder)
    except OSError as exc:
        if old and not os.path.lexists(folder):
            os.rename(old, folder)
        raise OutputError(f"{folder}: cannot move the prepared folder into place ({exc.strerror})") from None
    if old:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- progress and batches

def make_progress(mode: str | None, total: int, label: str, position: int):
    """One progress line per image: a tqdm bar at its own row, or JSON lines with the image's name."""
    from ..progress import JsonProgress, NoProgress
    if mode == "json":
        return JsonProgress(total, label)
    if mode == "bar":
        return _Bar(total, label, position)
    return NoProgress()


class _Bar:
    def __init__(self, total: int, label: str, position: int):
        from tqdm import tqdm
        self.bar = tqdm(total=total, desc=label, unit="B", unit_scale=True, unit_divisor=1024,
                        file=sys.stderr, position=position, leave=True, dynamic_ncols=True)

    def __call__(self, n: int) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def run_job(job: Job, opts: Options) -> Outcome:
    """prepare_one with failures turned into an Outcome (a batch goes on past a bad image)."""
    try:
        return prepare_one(job, opts)
    except ImgkitError as exc:
        return Outcome(job.src, job.name, False, error=exc.message, exit_code=exc.exit_code)


def prepare(sources: list[str], opts: Options, jobs: int = 1) -> list[Outcome]:
    """Every source into its folder; with jobs > 1, that many images at once in processes."""
    planned = plan(sources, opts)
    if len(planned) == 1:
        return [prepare_one(planned[0], opts)]
    if jobs <= 1:
        return [run_job(job, opts) for job in planned]
    per_image = replace(opts, threads=opts.threads or max(1, engine.default_threads() // jobs))
    for job in planned:
        register_temp(job.tmp)   # a worker killed outright cannot clean up: the CLI's last resort does
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            futures = [pool.submit(run_job, job, per_image) for job in planned]
            return [collect(future, job) for future, job in zip(futures, planned)]
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        finally:
            for job in planned:
                if not os.path.isdir(job.tmp):
                    forget_temp(job.tmp)


def collect(future, job: Job) -> Outcome:
    """A worker's outcome; a worker that crashed fails its image, not the batch."""
    try:
        return future.result()
    except Exception as exc:
        shutil.rmtree(job.tmp, ignore_errors=True)
        return Outcome(job.src, job.name, False, error=f"internal error: {type(exc).__name__}: {exc}",
                       exit_code=INTERNAL_ERROR_EXIT)
