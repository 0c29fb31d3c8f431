"""Command line: one thin command per operation; every error is one line and an exit code.

numba and the format drivers load only inside commands, so `imgkit --help` stays fast.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import traceback

import click

from . import __version__
from .errors import INTERNAL_ERROR_EXIT, ImgkitError, Interrupted

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
    from . import api
    from .errors import UsageError
    from .io import parse_size
    gran = parse_size(granularity)
    if scan and (gran < 512 or gran % 512 or gran & (gran - 1)):
        raise UsageError(f"--granularity {granularity}: must be a power of two, at least 512")
    with api.open_image(filename, fmt) as reader:
        if reader.probe.warning:
            _warn(reader.probe.warning)
        if scan:
            api.ensure_readable(reader, force_format=True)
        entries = api.map_entries(reader, scan, gran, threads)
        if output == "json":
            _stream_json_list(entries)
            return
        click.echo(f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File")
        for e in entries:
            if e["data"]:
                mapped = hex(e["offset"]) if "offset" in e else "compressed"
                click.echo(f"{hex(e['start']):<16}{hex(e['length']):<16}{mapped:<16}{filename}")


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
    if not result.identical and not quiet:
        click.echo(result.message)
    elif not quiet:
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
    from .errors import UnsupportedFormat
    try:
        report = api.check(filename, fmt)
    except UnsupportedFormat as exc:
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


def _on_sigterm(signum, frame):
    raise Interrupted("terminated by SIGTERM; nothing was left behind", exit_code=143)


def main(argv=None) -> None:
    """Entry point: runs the click group and turns every failure into one line + an exit code."""
    global _error_exit_override
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
    except Exception as exc:   # a bug: say so in one line, traceback only with --debug
        if debug:
            traceback.print_exc()
        click.echo(f"imgkit: internal error: {type(exc).__name__}: {exc} (run with --debug for details)",
                   err=True)
        code = INTERNAL_ERROR_EXIT
    finally:
        remove_live_temps()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    sys.exit(code)
