"""Command line: one thin command per operation; every error is one line and an exit code.

numba and the format drivers load only inside commands, so `imgkit --help` stays fast.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import sys
import traceback

import click

from . import __version__
from .errors import INTERNAL_ERROR_EXIT, ImgkitError, Interrupted
from .formats import REGISTRY

# compare and check keep qemu-img's exit codes for errors (2 and 1); see errors.py for the rest.
_error_exit_override: int | None = None


def _fmt_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def _emit_json(obj) -> None:
    click.echo(json.dumps(obj, indent=4))


def _progress_mode(progress_flag: bool, quiet: bool, progress: str | None) -> str:
    if quiet:
        return "quiet"
    if progress == "json":
        return "json"
    if progress_flag or progress == "bar":
        return "bar"
    return None


def _warn(message: str) -> None:
    click.echo(f"imgkit: warning: {message}", err=True)


output_option = click.option("--output", "output", type=click.Choice(["human", "json"]), default="human",
                             show_default=True, help="Output format.")
format_option = click.option("-f", "fmt", metavar="FMT", help="Input format (default: detect).")
threads_option = click.option("-m", "threads", type=click.IntRange(1, 64), default=None,
                              help="Worker threads (default: CPU count).")
progress_options = [
    click.option("-p", "progress_flag", is_flag=True, help="Show a progress bar on stderr."),
    click.option("-q", "quiet", is_flag=True, help="No progress output."),
    click.option("--progress", "progress", type=click.Choice(["bar", "json"]),
                 help="Progress style: a bar, or one JSON object per line on stderr."),
]


def with_progress(fn):
    for opt in reversed(progress_options):
        fn = opt(fn)
    return fn


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="imgkit")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.pass_context
def cli(ctx, debug):
    """Convert, inspect and prepare virtual disk images (raw, qcow2, vhd, vmdk) for Huawei Cloud IMS.

    Exit codes: 0 ok; 1 negative answer; 2 usage; 64 bad option value; 65 invalid image;
    66 missing/unreadable input; 67 unsupported format; 68 refused for safety; 73 output exists
    or cannot be created; 74 write error (disk full); 75 verify failed; 70 internal error;
    130 interrupted; 143 terminated. compare: 0 same, 1 different, 2 error. check: 0 clean,
    1 check failed, 2 corruptions, 3 leaks, 63 no checks for this format.
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


@cli.command()
@format_option
@output_option
@click.argument("filename")
def info(fmt, output, filename):
    """Show what an image is: format, sizes and format-specific facts."""
    from . import api
    data = api.info(filename, fmt)
    for warning in data.get("warnings", []):
        _warn(warning)
    if output == "json":
        _emit_json(data)
        return
    click.echo(f"image: {data['filename']}")
    click.echo(f"file format: {data['format']}")
    click.echo(f"virtual size: {_fmt_size(data['virtual-size'])} ({data['virtual-size']} bytes)")
    click.echo(f"disk size: {_fmt_size(data['actual-size'])}")
    for key in ("cluster-size", "backing-filename", "backing-filename-format"):
        if key in data:
            click.echo(f"{key.replace('-', '_')}: {data[key]}")
    if data.get("snapshots"):
        click.echo("Snapshot list:")
        for snap in data["snapshots"]:
            click.echo(f"    {snap.get('id', '')}\t{snap.get('name', '')}\t{_fmt_size(snap.get('vm-state-size', 0))}")
    specific = data.get("format-specific")
    if specific:
        click.echo("Format specific information:")
        _echo_tree(specific.get("data", specific), 1)
    for note in data.get("notes", []):
        click.echo(f"note: {note}")


def _echo_tree(value, depth: int) -> None:
    pad = "    " * depth
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, (dict, list)):
                click.echo(f"{pad}{key}:")
                _echo_tree(item, depth + 1)
            else:
                click.echo(f"{pad}{key}: {json.dumps(item) if isinstance(item, bool) else item}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            click.echo(f"{pad}[{i}]:")
            _echo_tree(item, depth + 1)
    else:
        click.echo(f"{pad}{value}")


@cli.command("map")
@format_option
@output_option
@click.option("--scan", is_flag=True, help="Also read data and report all-zero blocks as zero.")
@click.option("--granularity", default="4K", show_default=True, help="Block size for --scan.")
@threads_option
@click.argument("filename")
def map_cmd(fmt, output, scan, granularity, threads, filename):
    """Show which ranges of the virtual disk hold data, zeros, or nothing."""
    from . import api, engine
    from .io import parse_size
    gran = parse_size(granularity)
    if scan:
        engine.check_block_size("--granularity", gran)
    with api.open_image(filename, fmt) as reader:
        if reader.probe.warning:
            _warn(reader.probe.warning)
        if scan:
            api.ensure_readable(reader, force_format=True)
        entries = api.map_entries(reader, scan, gran, threads)
        try:
            if output == "json":
                _stream_json_list(entries)
                return
            click.echo(f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File")
            for e in entries:
                if e["data"]:
                    mapped = hex(e["offset"]) if "offset" in e else "compressed"
                    click.echo(f"{hex(e['start']):<16}{hex(e['length']):<16}{mapped:<16}{filename}")
            sys.stdout.flush()
        except BrokenPipeError:      # `imgkit map | head`: the reader left; exit as SIGPIPE would
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(141)


def _stream_json_list(items) -> None:
    """A JSON array written entry by entry (a map can have millions of entries)."""
    out = sys.stdout
    out.write("[")
    first = True
    for item in items:
        out.write(("" if first else ",\n") + json.dumps(item, separators=(", ", ": ")))
        first = False
    out.write("]\n")


@cli.command()
@click.option("-f", "fmt_a", metavar="FMT", help="Format of the first image.")
@click.option("-F", "fmt_b", metavar="FMT", help="Format of the second image.")
@click.option("-s", "strict", is_flag=True, help="Strict: images of different size are different.")
@threads_option
@with_progress
@click.argument("image_a")
@click.argument("image_b")
def compare(fmt_a, fmt_b, strict, threads, progress_flag, quiet, progress, image_a, image_b):
    """Compare the guest content of two images: exit 0 identical, 1 different, 2 error."""
    global _error_exit_override
    _error_exit_override = 2
    from . import api
    from .progress import make_progress
    with api.open_image(image_a, fmt_a) as a, api.open_image(image_b, fmt_b) as b:
        api.ensure_readable(a, force_format=bool(fmt_a))
        api.ensure_readable(b, force_format=bool(fmt_b))
        bar = make_progress(_progress_mode(progress_flag, quiet, progress),
                            min(a.virtual_size, b.virtual_size), "compare")
        try:
            result = api.compare_readers(a, b, strict, threads, bar)
        finally:
            bar.close()
    if not quiet:
        click.echo(result.message)
    sys.exit(0 if result.identical else 1)


@cli.command()
@click.option("-f", "src_format", metavar="FMT", help="Source format (default: detect).")
@click.option("-O", "out_format", metavar="FMT", required=True, help="Output format: raw, qcow2, vhd, vmdk.")
@click.option("-o", "options", metavar="OPTS", help="Output options, k=v[,k=v...].")
@click.option("-c", "compress", is_flag=True, help="Compress data (qcow2, vmdk streamOptimized).")
@click.option("-S", "sparse", default="4K", show_default=True,
              help="Zero runs of this size become holes; 0 writes everything.")
@threads_option
@with_progress
@click.option("--force", is_flag=True, help="Replace an existing destination.")
@click.option("--force-format", is_flag=True, help="Read as -f says even if another format's magic is present.")
@click.option("--verify", is_flag=True, help="Re-read the output and compare it with the source.")
@click.argument("src")
@click.argument("dst")
def convert(src_format, out_format, options, compress, sparse, threads, progress_flag, quiet, progress,
            force, force_format, verify, src, dst):
    """Convert SRC to DST in format -O, atomically (DST appears complete or not at all)."""
    from . import api
    from .errors import UsageError
    from .formats import load_driver, parse_options
    from .io import parse_size
    from .progress import make_progress
    driver = load_driver(out_format)
    opts = parse_options(options, driver)
    if compress:
        if "compress" not in driver.OPTIONS:
            raise UsageError(f"-c: {out_format} output cannot be compressed")
        opts["compress"] = "on"
    with api.open_image(src, src_format) as probe_reader:
        total = probe_reader.virtual_size
    bar = make_progress(_progress_mode(progress_flag, quiet, progress), total, "convert")
    try:
        api.convert(src, dst, out_format, src_format=src_format, options=opts, sparse=parse_size(sparse),
                    threads=threads, force=force, progress=bar, verify=verify, force_format=force_format)
    finally:
        bar.close()


@cli.command()
@format_option
@output_option
@click.argument("filename")
def check(fmt, output, filename):
    """Check an image's metadata: 0 clean, 2 corruptions, 3 leaks, 1 could not check, 63 no checks."""
    global _error_exit_override
    _error_exit_override = 1
    from . import api
    from .errors import NoConsistencyChecks
    try:
        report = api.check(filename, fmt)
    except NoConsistencyChecks as exc:
        click.echo(f"imgkit: {exc.message}", err=True)
        sys.exit(63)
    if output == "json":
        _emit_json(report.to_json())
    else:
        for msg in report.corruptions + report.check_errors:
            click.echo(f"ERROR {msg}")
        for msg in report.leaks:
            click.echo(f"Leaked: {msg}")
        for msg in report.warnings:
            click.echo(f"Warning: {msg}")
        if report.exit_code == 0:
            click.echo("No errors were found on the image.")
        else:
            click.echo(f"{len(report.corruptions)} errors were found on the image.")
            if report.leaks:
                click.echo(f"{len(report.leaks)} leaked clusters were found on the image.")
        if report.allocated_clusters is not None and report.total_clusters:
            pct = 100.0 * report.allocated_clusters / report.total_clusters
            click.echo(f"{report.allocated_clusters}/{report.total_clusters} = {pct:.2f}% allocated")
        if report.image_end_offset is not None:
            click.echo(f"Image end offset: {report.image_end_offset}")
    sys.exit(report.exit_code)


@cli.command()
@click.option("-f", "src_format", metavar="FMT", help="Source format (default: detect).")
@click.option("-O", "out_format", metavar="FMT", required=True, help="Output format.")
@click.option("-o", "options", metavar="OPTS", help="Output options, k=v[,k=v...].")
@click.option("--size", "size", help="Measure a new empty image of this size instead of SRC.")
@output_option
@click.argument("src", required=False)
def measure(src_format, out_format, options, size, output, src):
    """How many bytes a conversion to -O will need: required and fully-allocated."""
    from . import api
    from .io import parse_size
    result = api.measure(out_format, options, src=src, src_format=src_format,
                         size=parse_size(size) if size is not None else None)
    if output == "json":
        _emit_json(result)
    else:
        click.echo(f"required size: {result['required']}")
        click.echo(f"fully allocated size: {result['fully-allocated']}")


@cli.command()
@format_option
@click.option("--granularity", default="2M", show_default=True,
              help="Bytes per bitmap bit (a power of two; 2M is the ZVHD2 block size).")
@click.option("-o", "out", metavar="OUT", help="Bitmap file (default: IMAGE with its extension replaced by .mf).")
@click.option("--force", is_flag=True, help="Replace an existing bitmap file.")
@click.option("--verify", is_flag=True, help="Compare IMAGE with an existing BITMAP instead of writing one.")
@click.option("--force-format", is_flag=True, help="Read as -f says even if another format's magic is present.")
@output_option
@threads_option
@with_progress
@click.argument("image")
@click.argument("bitmap", required=False)
def bitmap(fmt, granularity, out, force, verify, force_format, output, threads, progress_flag, quiet, progress,
           image, bitmap):
    """Write the .mf bitmap of IMAGE for a RAW quick import (one bit per block holding data).

    With --verify, recompute it and compare with BITMAP: exit 0 when it matches, 1 at the first
    mismatching block."""
    from . import api
    from .errors import UsageError
    from .ims import bitmap as mf
    from .io import parse_size
    from .progress import make_progress
    if bitmap and not verify:
        raise UsageError("a BITMAP argument is only taken with --verify (use -o to name the output)")
    gran = parse_size(granularity)
    with api.open_image(image, fmt) as reader:
        api.ensure_readable(reader, force_format=force_format)
        mf.check_granularity(gran, reader.virtual_size)
        bar = make_progress(_progress_mode(progress_flag, quiet, progress), reader.virtual_size, "bitmap")
        try:
            if verify:
                result = mf.verify_bitmap(reader, bitmap or mf.default_bitmap_path(image), gran, threads, bar)
            else:
                result = mf.write_bitmap(reader, out or mf.default_bitmap_path(image), gran, force, threads, bar)
        finally:
            bar.close()
    if verify:
        if output == "json":
            _emit_json(result.to_json())
        else:
            click.echo(result.message)
        sys.exit(0 if result.matches else 1)
    if output == "json":
        _emit_json(result)
    else:
        click.echo(f"{result['bitmap']}: {result['blocks']} blocks of {_fmt_size(result['granularity'])}, "
                   f"{result['data-blocks']} hold data ({result['bytes']} bytes)")


def _ims_request_options(fn):
    """The request fields validate and prepare share."""
    options = [
        click.option("--min-disk", "min_disk", type=int, help="Minimum disk in GB (default: the smallest valid)."),
        click.option("--name", help="Image name."),
        click.option("--description", help="Image description."),
        click.option("--tag", "tags", multiple=True, metavar="KEY.VALUE", help="A tag (repeatable)."),
        click.option("--image-tag", "image_tags", multiple=True, metavar="KEY=VALUE",
                     help="An image_tags entry (repeatable; not with --tag)."),
        click.option("--os-type", help="Linux, Windows or Other."),
        click.option("--architecture", type=click.Choice(["x86", "arm"]), help="Quick import: x86 (default) or arm."),
        click.option("--firmware", type=click.Choice(["bios", "uefi"]), help="Boot mode (hw_firmware_type)."),
    ]
    for opt in reversed(options):
        fn = opt(fn)
    return fn


@cli.command()
@format_option
@click.option("--method", type=click.Choice(["quick", "file", "data", "register"]), default="file",
              show_default=True, help="How the file becomes an image: quick import, create from file, "
                                      "data disk from file, or register on metadata.")
@click.option("--disk", type=click.Choice(["system", "data"]), help="System or data disk "
                                                                    "(default: data for --method data).")
@_ims_request_options
@click.option("--os-version", "os_version", help="OS version, a value of IMS table 9-1.")
@click.option("--image-url", "image_url", metavar="BUCKET:OBJECT", help="Where the file will be in OBS.")
@click.option("--bitmap", "bitmap_path", metavar="FILE", help="The .mf bitmap (default: IMAGE with .mf).")
@click.option("--granularity", default="2M", show_default=True, help="Bytes per bitmap bit.")
@threads_option
@output_option
@click.argument("image")
def validate(fmt, method, disk, min_disk, name, description, tags, image_tags, os_type, architecture, firmware,
             os_version, image_url, bitmap_path, granularity, threads, output, image):
    """Check IMAGE and its request against the IMS rules: exit 0 without errors, 1 with any.

    Each finding has a code (the service's IMG.xxxx where it has one), a severity, a message
    and a fix; --output json gives them to CI."""
    from .io import parse_size
    from .ims.validate import Request, validate as run_validate
    req = Request(method=method, disk=disk or ("data" if method == "data" else "system"), min_disk=min_disk,
                  name=name, description=description, tags=tags, image_tags=image_tags, os_version=os_version,
                  os_type=os_type, architecture=architecture, firmware=firmware, image_url=image_url,
                  bitmap=bitmap_path, granularity=parse_size(granularity))
    report = run_validate(image, req, fmt, threads)
    if output == "json":
        _emit_json(report.to_json())
    else:
        _echo_report(report)
    sys.exit(0 if report.ok else 1)


def _echo_report(report) -> None:
    facts = report.facts
    click.echo(f"image: {report.image}")
    click.echo(f"path: {report.path.title} ({report.path.http} {report.path.uri}, section {report.path.section})")
    if "virtual-size" in facts:
        click.echo(f"format: {facts['format']}, virtual size {_fmt_size(facts['virtual-size'])}, "
                   f"file {_fmt_size(facts['file-size'])}")
    if facts.get("min-disk") is not None:
        how = " (computed: the smallest valid value)" if facts.get("min-disk-computed") else ""
        click.echo(f"min_disk: {facts['min-disk']} GB{how}")
    if "partition-table" in facts:
        table = facts["partition-table"]
        click.echo(f"partition table: {table['table'] or 'none'}, {table['partitions']} partitions")
    if "boot" in facts:
        click.echo(f"boot: {facts['boot']}" + (" (EFI system partition found)" if "uefi" in facts["boot"] else ""))
    for finding in report.findings:
        click.echo(f"{finding.severity:<8}{finding.code:<27}{finding.message}")
        click.echo(f"{'':<35}fix: {finding.fix}")
    click.echo(f"result: {len(report.errors)} errors, {len(report.warnings)} warnings")


@cli.command()
@click.argument("sources", nargs=-1, required=True, metavar="SRC...")
@click.option("--out", "out_dir", required=True, metavar="DIR", help="Folder that receives one folder per image.")
@click.option("--os-version", "os_version", help="OS version, a value of IMS table 9-1 (required for a system disk).")
@click.option("--method", type=click.Choice(["auto", "quick", "file"]), default="auto", show_default=True,
              help="auto: create from a compact file when every rule allows it, else quick import (RAW + bitmap).")
@click.option("--disk", type=click.Choice(["system", "data"]), default="system", show_default=True)
@click.option("--format", "out_format", type=click.Choice(list(REGISTRY)),
              help="Image format (default: qcow2 for create from file, raw for quick import).")
@_ims_request_options
@click.option("--bucket", help="OBS bucket for image_url (default: a <bucket> placeholder).")
@click.option("--granularity", default="2M", show_default=True, help="Bytes per bitmap bit.")
@click.option("-f", "src_format", metavar="FMT", help="Source format (default: detect).")
@click.option("-j", "jobs", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Images prepared at once (processes).")
@threads_option
@with_progress
@click.option("--force", is_flag=True, help="Replace existing image folders.")
@click.option("--force-format", is_flag=True, help="Read as -f says even if another format's magic is present.")
@output_option
def prepare(sources, out_dir, os_version, method, disk, out_format, min_disk, name, description, tags, image_tags,
            os_type, architecture, firmware, bucket, granularity, src_format, jobs, threads, progress_flag, quiet,
            progress, force, force_format, output):
    """Turn each SRC into a folder ready for IMS: image, bitmap, request.json, metadata.json,
    manifest.json and SHA256SUMS, built atomically under DIR.

    Arguments are checked before any conversion; several SRC run -j at a time, and a failed
    image does not stop the others (exit 1 if any failed)."""
    from .errors import UsageError
    from .io import parse_size
    from .ims import prepare as ims_prepare
    from .ims.validate import Request
    if disk == "system" and not os_version:
        raise UsageError("--os-version is required for a system disk (IMG.0159 for quick import); "
                         "see table 9-1 of the IMS reference")
    req = Request(disk=disk, min_disk=min_disk, name=name, description=description, tags=tags,
                  image_tags=image_tags, os_version=os_version, os_type=os_type, architecture=architecture,
                  firmware=firmware, granularity=parse_size(granularity))
    mode = _progress_mode(progress_flag, quiet, progress)
    opts = ims_prepare.Options(out_dir, req, method, out_format, src_format, bucket, force, threads,
                               mode if mode in ("bar", "json") else None, force_format)
    outcomes = ims_prepare.prepare(list(sources), opts, jobs)
    if output == "json":
        _emit_json([o.to_json() for o in outcomes])
    else:
        _echo_outcomes(outcomes)
    sys.exit(0 if all(o.ok for o in outcomes) else 1)


def _echo_outcomes(outcomes) -> None:
    for o in outcomes:
        if o.ok:
            click.echo(f"{o.src}: {o.folder}/ ready: {o.reason}")
            for f in o.findings:
                click.echo(f"  {f['severity']} {f['code']}: {f['message']} (fix: {f['fix']})")
        else:
            click.echo(f"FAILED: {o.error}")
    if len(outcomes) > 1:
        click.echo(f"\n{'image':<28}{'status':<8}{'method':<9}{'format':<8}{'size':>12}  folder / error")
        for o in outcomes:
            size = _fmt_size(o.size) if o.size is not None else "-"
            where = o.folder if o.ok else o.error
            click.echo(f"{o.name[:27]:<28}{'ok' if o.ok else 'FAILED':<8}{o.method or '-':<9}{o.format or '-':<8}"
                       f"{size:>12}  {where}")


def _on_sigterm(signum, frame):
    raise Interrupted("terminated by SIGTERM; nothing was left behind", exit_code=143)


def main(argv=None) -> None:
    """Entry point: runs the click group and turns every failure into one line + an exit code."""
    global _error_exit_override
    _error_exit_override = None
    signal.signal(signal.SIGTERM, _on_sigterm)
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a file-size limit becomes EFBIG, not death
    debug = "--debug" in (argv if argv is not None else sys.argv[1:]) or bool(os.environ.get("IMGKIT_DEBUG"))
    from .io import remove_live_temps
    code = 0
    try:
        cli.main(args=argv, prog_name="imgkit", standalone_mode=False)
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.exceptions.Abort:
        click.echo("imgkit: interrupted; nothing was left behind", err=True)
        code = 130
    except click.ClickException as exc:
        exc.show()
        code = exc.exit_code
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except ImgkitError as exc:
        if debug:
            traceback.print_exc()
        click.echo(f"imgkit: {exc.message}", err=True)
        code = exc.exit_code if _error_exit_override is None or isinstance(exc, Interrupted) \
            else _error_exit_override
    except KeyboardInterrupt:
        click.echo("imgkit: interrupted; nothing was left behind", err=True)
        code = 130
    except BrokenPipeError:
        code = 141
    except OSError as exc:
        code = _os_error_exit(exc, debug)
    except Exception as exc:   # a bug: say so in one line, traceback only with --debug
        if debug:
            traceback.print_exc()
        click.echo(f"imgkit: internal error: {type(exc).__name__}: {exc} (run with --debug for details)",
                   err=True)
        code = INTERNAL_ERROR_EXIT
    finally:
        _cleanup_ignoring_signals(remove_live_temps)
    sys.exit(code)


def _os_error_exit(exc: OSError, debug: bool) -> int:
    """An OSError no layer turned into an ImgkitError: a full disk is still exit 74, anything else a bug."""
    if debug:
        traceback.print_exc()
    where = f"{exc.filename}: " if exc.filename else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        click.echo(f"imgkit: {where}{exc.strerror}; nothing was left behind", err=True)
        return 74
    click.echo(f"imgkit: internal error: {type(exc).__name__}: {where}{exc.strerror or exc} "
               f"(run with --debug for details)", err=True)
    return INTERNAL_ERROR_EXIT


def _cleanup_ignoring_signals(cleanup) -> None:
    """Remove temp files with Ctrl-C and SIGTERM ignored, so a second signal cannot leave one behind."""
    previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        cleanup()
    finally:
        signal.signal(signal.SIGINT, previous_int)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
