"""Side-by-side benchmarks: imgkit and qemu-img (or dd) alternately on the same files.

Usage: python bench/run.py [--size 4G] [--reps 3] [--only NAME,...] [--no-append]

Builds realistic inputs once in bench/work/ (an ext4 file system filled from /usr/share with
mke2fs -d, sparse; a fully allocated copy of it; qcow2/vhd/vmdk versions made by qemu-img),
then runs every case alternately `--reps` times and prints the median wall time, CPU time and
peak RSS of each side and the ratio imgkit / reference. Results are appended to
bench/RESULTS.md with the date and the machine. The machine is shared and noisy: read the
ratios, not the seconds.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"
IMGKIT = [sys.executable, "-m", "imgkit"]


@dataclass
class Case:
    name: str
    ours: list[str]
    theirs: list[str]
    outputs: tuple[str, ...] = ()      # removed before every run; sizes compared after
    needs: tuple[str, ...] = ()        # driver modules that must exist
    note: str = ""

    @property
    def durable(self) -> list[str] | None:
        """qemu-img convert with -t writeback: it then flushes its output as imgkit always does
        (qemu-img's default for convert, -t unsafe, never syncs)."""
        if self.theirs[:2] != ["qemu-img", "convert"]:
            return None
        return self.theirs[:2] + ["-t", "writeback"] + self.theirs[2:]


def sh(*cmd, **kw):
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


def build_inputs(size: str) -> None:
    WORK.mkdir(exist_ok=True)
    sparse = WORK / "fs.raw"
    if not sparse.exists():
        print(f"bench: building a {size} ext4 image from /usr/share (mke2fs -d)", flush=True)
        tmp = WORK / "fs.raw.tmp"
        sh("truncate", "-s", size, tmp)
        sh("mke2fs", "-q", "-F", "-t", "ext4", "-E", "lazy_itable_init=0,nodiscard", "-d", "/usr/share", tmp)
        tmp.rename(sparse)
    dense = WORK / "dense.raw"
    if not dense.exists():
        print("bench: making a fully allocated copy", flush=True)
        sh("cp", "--sparse=never", sparse, WORK / "dense.raw.tmp")
        (WORK / "dense.raw.tmp").rename(dense)
    for fmt, opts, name in (("qcow2", [], "fs.qcow2"), ("vpc", ["-o", "subformat=dynamic"], "fs.vhd"),
                            ("vmdk", [], "fs.vmdk")):
        target = WORK / name
        if not target.exists():
            print(f"bench: qemu-img convert -O {fmt} -> {name}", flush=True)
            sh("qemu-img", "convert", "-f", "raw", "-O", fmt, *opts, sparse, WORK / (name + ".tmp"))
            (WORK / (name + ".tmp")).rename(target)


def cases() -> list[Case]:
    w = WORK
    out = str(w / "out")
    q = ["qemu-img", "convert", "-f"]
    return [
        Case("raw->raw (dense source)", IMGKIT + ["convert", "-q", "-O", "raw", str(w / "dense.raw"), out],
             q + ["raw", "-O", "raw", str(w / "dense.raw"), out], (out,)),
        Case("map --scan vs dd (dense, cached)", IMGKIT + ["map", "--scan", "--output", "json", str(w / "dense.raw")],
             ["dd", f"if={w / 'dense.raw'}", "of=/dev/null", "bs=4M", "status=none"],
             note="ratio < 1.67 means >= 60% of dd's read throughput"),
        Case("raw->qcow2", IMGKIT + ["convert", "-q", "-O", "qcow2", str(w / "dense.raw"), out],
             q + ["raw", "-O", "qcow2", str(w / "dense.raw"), out], (out,), ("qcow2",)),
        Case("qcow2->raw", IMGKIT + ["convert", "-q", "-O", "raw", str(w / "fs.qcow2"), out],
             q + ["qcow2", "-O", "raw", str(w / "fs.qcow2"), out], (out,), ("qcow2",)),
        Case("raw->qcow2 -c", IMGKIT + ["convert", "-q", "-c", "-O", "qcow2", str(w / "dense.raw"), out],
             q + ["raw", "-c", "-O", "qcow2", str(w / "dense.raw"), out], (out,), ("qcow2",)),
        Case("raw->vhd (dynamic)", IMGKIT + ["convert", "-q", "-O", "vhd", str(w / "dense.raw"), out],
             q + ["raw", "-O", "vpc", "-o", "subformat=dynamic", str(w / "dense.raw"), out], (out,), ("vhd",)),
        Case("vhd->raw", IMGKIT + ["convert", "-q", "-O", "raw", str(w / "fs.vhd"), out],
             q + ["vpc", "-O", "raw", str(w / "fs.vhd"), out], (out,), ("vhd",)),
        Case("raw->vmdk (monolithicSparse)", IMGKIT + ["convert", "-q", "-O", "vmdk", str(w / "dense.raw"), out],
             q + ["raw", "-O", "vmdk", str(w / "dense.raw"), out], (out,), ("vmdk",)),
        Case("vmdk->raw", IMGKIT + ["convert", "-q", "-O", "raw", str(w / "fs.vmdk"), out],
             q + ["vmdk", "-O", "raw", str(w / "fs.vmdk"), out], (out,), ("vmdk",)),
        Case("raw->vmdk streamOptimized",
             IMGKIT + ["convert", "-q", "-O", "vmdk", "-o", "subformat=streamOptimized", str(w / "dense.raw"), out],
             q + ["raw", "-O", "vmdk", "-o", "subformat=streamOptimized", str(w / "dense.raw"), out], (out,), ("vmdk",)),
        Case("bitmap vs dd (dense, cached)", IMGKIT + ["bitmap", "--force", "-o", str(w / "out.mf"), str(w / "dense.raw")],
             ["dd", f"if={w / 'dense.raw'}", "of=/dev/null", "bs=4M", "status=none"], (str(w / "out.mf"),),
             ("ims",), note="ratio < 1.67 means >= 60% of dd's read throughput"),
        Case("prepare qcow2 -> raw+bitmap+manifest vs qemu-img convert -O raw",
             IMGKIT + ["prepare", str(w / "fs.qcow2"), "--out", str(w / "prep"), "--method", "quick",
                       "--disk", "data", "-q"],
             q + ["qcow2", "-O", "raw", str(w / "fs.qcow2"), out], (str(w / "prep"), out), ("qcow2", "ims")),
    ]


def available(module: str) -> bool:
    import importlib.util
    name = "imgkit.ims" if module == "ims" else f"imgkit.formats.{module}"
    return importlib.util.find_spec(name) is not None


def run_once(cmd: list[str]) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, peak RSS bytes) of one run of cmd."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.read().decode()[-500:]}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024


def clear(paths) -> None:
    for p in paths:
        if os.path.isdir(p):
            shutil.rmtree(p)
        elif os.path.lexists(p):
            os.unlink(p)


def output_size(paths) -> int:
    total = 0
    for p in paths:
        if os.path.isdir(p):
            total += sum(f.stat().st_size for f in Path(p).rglob("*") if f.is_file())
        elif os.path.exists(p):
            total += os.path.getsize(p)
    return total


def bench(case: Case, reps: int) -> dict:
    ours, theirs, durable = [], [], []
    sizes = {}
    run_once(case.ours)            # warm up: page cache, numba's on-disk cache
    clear(case.outputs)
    sides = [("ours", case.ours, ours), ("theirs", case.theirs, theirs)]
    if case.durable:
        sides.append(("durable", case.durable, durable))
    for _ in range(reps):
        for side, cmd, bucket in sides:
            clear(case.outputs)
            bucket.append(run_once(cmd))
            sizes[side] = output_size(case.outputs)
    clear(case.outputs)
    med = lambda runs, i: statistics.median(r[i] for r in runs)
    return {"name": case.name, "reps": reps, "note": case.note,
            "ours": [med(ours, 0), med(ours, 1), max(r[2] for r in ours)],
            "theirs": [med(theirs, 0), med(theirs, 1), max(r[2] for r in theirs)],
            "ratio": med(ours, 0) / med(theirs, 0),
            "durable_ratio": med(ours, 0) / med(durable, 0) if durable else None,
            "size_ratio": (sizes["ours"] / sizes["theirs"]) if sizes.get("theirs") else None}


def machine() -> str:
    qemu = subprocess.run(["qemu-img", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    return f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, {qemu}"


def render(results: list[dict], size: str) -> str:
    lines = [f"### {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, input {size} virtual",
             f"Machine: {machine()}", "",
             "| case | imgkit wall s | ref wall s | **ratio** | ratio vs qemu -t writeback | imgkit CPU s | ref CPU s "
             "| imgkit RSS MB | ref RSS MB | size ratio | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        o, t = r["ours"], r["theirs"]
        size_ratio = f"{r['size_ratio']:.3f}" if r["size_ratio"] else ""
        durable = f"{r['durable_ratio']:.2f}" if r["durable_ratio"] else ""
        lines.append(f"| {r['name']} | {o[0]:.2f} | {t[0]:.2f} | **{r['ratio']:.2f}** | {durable} | {o[1]:.2f} | {t[1]:.2f} "
                     f"| {o[2] / 1e6:.0f} | {t[2] / 1e6:.0f} | {size_ratio} | {r['note']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="4G", help="virtual size of the test disk (default 4G)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", help="comma-separated substrings of case names")
    ap.add_argument("--no-append", action="store_true", help="do not append to bench/RESULTS.md")
    args = ap.parse_args()
    build_inputs(args.size)
    results = []
    for case in cases():
        if args.only and not any(s in case.name for s in args.only.split(",")):
            continue
        missing = [m for m in case.needs if not available(m)]
        if missing:
            print(f"bench: skip {case.name} (missing {', '.join(missing)})", flush=True)
            continue
        print(f"bench: {case.name} ...", flush=True)
        try:
            results.append(bench(case, args.reps))
        except RuntimeError as exc:
            print(f"bench: {case.name} FAILED: {exc}", flush=True)
            continue
        r = results[-1]
        print(f"   ratio {r['ratio']:.2f}  (imgkit {r['ours'][0]:.2f}s / ref {r['theirs'][0]:.2f}s)", flush=True)
    text = render(results, args.size)
    print(text)
    if not args.no_append and results:
        with open(HERE / "RESULTS.md", "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
