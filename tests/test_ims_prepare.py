"""imgkit prepare end to end: the folder, its checksums recomputed independently, the method choice,
every readable input format, atomicity on failure and interrupt, and batches."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import FIXTURES, qemu, run_cli, write_sparse
from imgkit import engine
from imgkit.errors import OutputError, UsageError
from imgkit.extents import Extent, Kind
from imgkit.ims import prepare as ims_prepare
from imgkit.ims.prepare import Options, PrepareFailed, choose, prepare
from imgkit.ims.validate import Request
from test_ims_bitmap import python_bitmap
from test_ims_validate import mbr_disk

MiB = 1 << 20
GiB = 1 << 30
OS = "Ubuntu 18.04 server 64bit"


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def sample_raw(tmp_path, qemu_img):
    """The lead's sample disk (MBR + ext4, made by sfdisk and mke2fs) as a raw file."""
    path = tmp_path / "src" / "sample.raw"
    path.parent.mkdir()
    qemu("convert", "-f", "qcow2", "-O", "raw", str(FIXTURES / "sample-disk.qcow2"), str(path))
    return path


def leftovers(folder) -> list[str]:
    return [n for n in os.listdir(folder) if "imgkit-tmp" in n] if os.path.isdir(folder) else []


def check_folder(folder: Path, source: Path) -> dict:
    """Recompute every checksum of the folder independently of imgkit."""
    manifest = json.loads((folder / "manifest.json").read_text())
    for entry in manifest["files"]:
        assert sha256(folder / entry["name"]) == entry["sha256"], entry["name"]
        assert (folder / entry["name"]).stat().st_size == entry["size"]
    assert manifest["source"]["sha256"] == sha256(source)
    assert manifest["image"]["sha256"] == sha256(folder / manifest["image"]["file"])
    sums = (folder / "SHA256SUMS").read_text().splitlines()
    assert {line.split("  ")[1] for line in sums} == {e["name"] for e in manifest["files"]} | {"manifest.json"}
    if shutil.which("sha256sum"):
        subprocess.run(["sha256sum", "--quiet", "-c", "SHA256SUMS"], cwd=folder, check=True)
    return manifest


# ------------------------------------------------------------------ end to end

def test_quick_import_folder_end_to_end(tmp_path, sample_raw):
    out = tmp_path / "out"
    result = run_cli("prepare", sample_raw, "--out", out, "--os-version", OS, "--method", "quick",
                     "--bucket", "my-images", "--tag", "env.prod", "--name", "web 01")
    assert result.returncode == 0, result.stderr
    folder = out / "sample"
    assert sorted(os.listdir(folder)) == ["SHA256SUMS", "manifest.json", "metadata.json", "request.json",
                                          "sample.mf", "sample.raw"]
    assert leftovers(out) == []
    manifest = check_folder(folder, sample_raw)
    assert (folder / "sample.raw").read_bytes() == sample_raw.read_bytes()
    assert manifest["image"]["virtual-sha256"] == sha256(sample_raw)
    assert (folder / "sample.mf").read_bytes() == python_bitmap(sample_raw.read_bytes(), 2 * MiB)
    assert manifest["bitmap"]["granularity"] == manifest["bitmap-granularity"] == 2 * MiB
    assert manifest["method"]["method"] == "quick" and manifest["imgkit-version"]
    assert manifest["disk"]["boot"] == "bios" and manifest["validation"]["ok"]
    body = json.loads((folder / "request.json").read_text())
    assert body == {"name": "web 01", "os_version": OS, "image_url": "my-images:sample.raw", "min_disk": 1,
                    "tags": ["env.prod"], "type": "ECS"}
    meta = json.loads((folder / "metadata.json").read_text())
    assert meta["create"]["body"]["disk_format"] == "raw" and meta["create"]["body"]["min_disk"] == 40
    assert meta["register"]["body"] == {"image_url": "my-images:sample.raw"}


def test_auto_takes_the_file_path_with_qcow2_when_it_can(tmp_path, sample_raw):
    [outcome] = prepare([str(sample_raw)], Options(str(tmp_path / "out"), Request(os_version=OS)))
    assert outcome.ok and outcome.method == "file" and outcome.format == "qcow2"
    folder = tmp_path / "out" / "sample"
    assert sorted(os.listdir(folder)) == ["SHA256SUMS", "manifest.json", "metadata.json", "request.json",
                                          "sample.qcow2"]
    manifest = check_folder(folder, sample_raw)
    assert manifest["image"]["virtual-sha256"] == sha256(sample_raw)
    assert qemu("compare", "-f", "raw", "-F", "qcow2", str(sample_raw), str(folder / "sample.qcow2")).returncode == 0
    body = json.loads((folder / "request.json").read_text())
    assert body["min_disk"] == 40 and body["image_url"] == "<bucket>:sample.qcow2"


def test_auto_explains_why_it_falls_back_to_quick_import(tmp_path, sample_raw):
    [outcome] = prepare([str(sample_raw)], Options(str(tmp_path / "out"), Request(os_version=OS, min_disk=20)))
    assert outcome.ok and outcome.method == "quick" and outcome.format == "raw"
    assert "not possible" in outcome.reason and "40-255" in outcome.reason


@pytest.mark.parametrize("fmt,qemu_fmt", [("qcow2", "qcow2"), ("vhd", "vpc"), ("vmdk", "vmdk")])
def test_every_readable_input_format(tmp_path, sample_raw, fmt, qemu_fmt):
    src = tmp_path / f"disk.{fmt}"
    qemu("convert", "-f", "raw", "-O", qemu_fmt, str(sample_raw), str(src))
    [outcome] = prepare([str(src)], Options(str(tmp_path / "out"), Request(os_version=OS), method="quick"))
    assert outcome.ok, outcome.error
    folder = tmp_path / "out" / "disk"
    manifest = check_folder(folder, src)
    assert manifest["source"]["format"] == fmt
    image = (folder / "disk.raw").read_bytes()
    assert image[:sample_raw.stat().st_size] == sample_raw.read_bytes()
    assert not any(image[sample_raw.stat().st_size:])     # vhd may round the size up
    assert (folder / "disk.mf").read_bytes() == python_bitmap(image, 2 * MiB)


class DeclaredDisk:
    """A disk of a declared size and data layout (no file): for choices at sizes no test should write."""

    format = "raw"

    def __init__(self, virtual_size: int, data: int):
        self.virtual_size = virtual_size
        self.data = data

    def extents(self, start=0, end=None):
        yield Extent(0, self.data, Kind.DATA, host_offset=0)
        yield Extent(self.data, self.virtual_size - self.data, Kind.UNALLOCATED)


def test_auto_choice_at_sizes_beyond_the_file_path():
    opts = Options("unused", Request(os_version=OS))
    small = choose(DeclaredDisk(200 * GiB, 10 * GiB), "d.raw", opts.request, opts)
    assert small.path.method == "file" and small.out_format == "qcow2"
    big_disk = choose(DeclaredDisk(256 * GiB, GiB), "d.raw", opts.request, opts)
    assert big_disk.path.method == "quick" and "IMG.0111" not in big_disk.reason and "255" in big_disk.reason
    big_file = choose(DeclaredDisk(250 * GiB, 130 * GiB), "d.raw", opts.request, opts)
    assert big_file.path.method == "quick" and "IMG.0059" in big_file.reason


def test_data_disk_uses_the_data_image_request(tmp_path):
    src = tmp_path / "data1.raw"
    write_sparse(src, 8 * MiB, [(3 * MiB, b"data")])     # no partition table: fine for a data disk
    [outcome] = prepare([str(src)], Options(str(tmp_path / "out"), Request(disk="data", os_type="Windows"),
                                            method="quick"))
    assert outcome.ok
    body = json.loads((tmp_path / "out" / "data1" / "request.json").read_text())
    assert body["type"] == "DataImage" and body["os_type"] == "Windows" and "os_version" not in body


# ------------------------------------------------------------------ refused before any conversion

def test_bad_os_version_fails_before_any_conversion(tmp_path):
    src = mbr_disk(tmp_path / "disk.raw")
    out = tmp_path / "out"
    result = run_cli("prepare", src, "--out", out, "--os-version", "Ubuntu 18.04 server")
    assert result.returncode == 64 and OS in result.stderr
    assert not out.exists()
    missing = run_cli("prepare", src, "--out", out)
    assert missing.returncode == 64 and "--os-version" in missing.stderr


def test_bad_arguments_are_refused_by_plan(tmp_path):
    src = str(mbr_disk(tmp_path / "disk.raw"))
    out = str(tmp_path / "out")
    with pytest.raises(UsageError, match="IMG.0002"):
        prepare([src], Options(out, Request(os_version=OS, name="x" * 129)))
    with pytest.raises(UsageError, match="quick import"):
        prepare([src], Options(out, Request(os_version=OS), method="quick", out_format="qcow2"))
    with pytest.raises(UsageError, match="granularity"):
        prepare([src], Options(out, Request(os_version=OS, granularity=3000)))
    with pytest.raises(UsageError, match="IMG.0109"):
        prepare([src], Options(out, Request(os_version=OS), bucket="Bad Bucket"))
    other = tmp_path / "b"
    other.mkdir()
    with pytest.raises(UsageError, match="both"):
        prepare([src, str(mbr_disk(other / "disk.raw"))], Options(out, Request(os_version=OS)))
    assert not os.path.exists(out)


def test_existing_folder_needs_force(tmp_path):
    src = str(mbr_disk(tmp_path / "disk.raw"))
    out = tmp_path / "out"
    (out / "disk").mkdir(parents=True)
    (out / "disk" / "old").write_text("old")
    with pytest.raises(OutputError):
        prepare([src], Options(str(out), Request(os_version=OS), method="quick"))
    [outcome] = prepare([src], Options(str(out), Request(os_version=OS), method="quick", force=True))
    assert outcome.ok and not (out / "disk" / "old").exists() and (out / "disk" / "disk.mf").exists()
    assert leftovers(out) == []


# ------------------------------------------------------------------ atomicity

def test_rule_failure_leaves_nothing(tmp_path):
    src = tmp_path / "fs.raw"
    write_sparse(src, 8 * MiB, [(1024, b"\x53\xef")])   # a file system, not a partitioned disk
    out = tmp_path / "out"
    with pytest.raises(PrepareFailed, match="IMGKIT.NO_PARTITION_TABLE"):
        prepare([str(src)], Options(str(out), Request(os_version=OS)))
    assert os.listdir(out) == []


def test_interrupt_during_conversion_leaves_nothing(tmp_path, monkeypatch):
    src = str(mbr_disk(tmp_path / "disk.raw"))
    out = tmp_path / "out"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ims_prepare.engine, "copy", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare([src], Options(str(out), Request(os_version=OS), method="quick"))
    assert os.listdir(out) == []
    monkeypatch.setattr(ims_prepare.engine, "copy", engine.copy)


# ------------------------------------------------------------------ batches

def test_batch_in_parallel_goes_on_past_a_failed_image(tmp_path):
    good1 = mbr_disk(tmp_path / "alpha.raw")
    good2 = mbr_disk(tmp_path / "beta.raw", size=12 * MiB)
    bad = tmp_path / "gamma.raw"
    write_sparse(bad, 4 * MiB, [])
    out = tmp_path / "out"
    result = run_cli("prepare", good1, bad, good2, "--out", out, "--os-version", OS, "--method", "quick",
                     "-j", "2", "--progress=json", "--name", "fleet", timeout=300)
    assert result.returncode == 1, result.stderr
    assert sorted(os.listdir(out)) == ["alpha", "beta"]
    check_folder(out / "alpha", good1)
    check_folder(out / "beta", good2)
    assert json.loads((out / "beta" / "request.json").read_text())["name"] == "fleet-beta"
    table = result.stdout.splitlines()
    assert any(line.startswith("fleet-gamma") and "FAILED" in line for line in table)
    assert sum(line.startswith("fleet-") and " ok " in line for line in table) == 2
    tasks = {json.loads(line)["task"] for line in result.stderr.splitlines() if line.startswith("{")}
    assert {"fleet-alpha", "fleet-beta"} <= tasks


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_during_prepare_leaves_nothing(tmp_path, sig, code):
    """A real imgkit process, signalled once its temp folder exists (64 GiB sparse: it is still hashing)."""
    src = mbr_disk(tmp_path / "big.raw", size=64 * GiB)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "imgkit", "prepare", str(src), "--out", str(out),
                             "--os-version", OS, "--method", "quick", "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while proc.poll() is None and not leftovers(out):
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read()
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, stderr
    assert "nothing was left behind" in stderr
    assert os.listdir(out) == []


def test_metadata_judges_the_registration_path_on_its_own_rules():
    req = Request(os_version=OS, name="big", min_disk=300)
    image = {"format": "raw", "size": 300 * GiB, "virtual-size": 300 * GiB}
    meta = ims_prepare.metadata_body(req, image, "b:big.raw", uefi=True)
    body = meta["create"]["body"]
    assert body["min_disk"] is None and body["hw_firmware_type"] == "uefi" and body["disk_format"] == "raw"
    assert any("IMG.0059" in n for n in meta["notes"]) and any("IMG.0111" in n for n in meta["notes"])
    small = ims_prepare.metadata_body(Request(os_version=OS, name="s", min_disk=1),
                                      {"format": "qcow2", "size": MiB, "virtual-size": 3 * GiB}, "b:s", False)
    assert small["create"]["body"]["min_disk"] == 40 and "notes" not in small
    assert small["register"]["body"] == {"image_url": "b:s"}


def test_forced_raw_reading_of_another_format_needs_force_format(tmp_path, qemu_img):
    from imgkit.errors import UnsafeImage
    src = tmp_path / "disguised.img"
    qemu("create", "-f", "qcow2", str(src), "16M")
    opts = Options(str(tmp_path / "out"), Request(disk="data"), method="quick", src_format="raw")
    with pytest.raises(UnsafeImage, match="QCOW2"):
        prepare([str(src)], opts)
    assert leftovers(tmp_path / "out") == []
    [outcome] = prepare([str(src)], replace(opts, force_format=True))
    assert outcome.ok and (tmp_path / "out" / "disguised" / "disguised.raw").read_bytes() == src.read_bytes()
