"""QCOW2 reading, info, map and check against qemu-img on images qemu made (fixtures/qcow2)."""
from __future__ import annotations

import hashlib
import json
import lzma
import threading

import numpy as np
import pytest

from conftest import FIXTURES, qemu, qemu_info, qemu_map, run_cli
from imgkit import api
from imgkit.errors import UnsafeImage
from imgkit.extents import Kind

QCOW2_FIXTURES = FIXTURES / "qcow2"
MANIFEST = json.loads((QCOW2_FIXTURES / "manifest.json").read_text())
IMAGES = sorted(e["name"] for e in MANIFEST if e["name"].endswith(".qcow2"))
NEEDS_BACKING = {"overlay.qcow2"}

# Every deliberate difference from qemu-img 7.2, in one place, with the reason.
KNOWN_DIFFERENCES = {
    # info
    "info:format-specific.data.encrypt": "encrypted images are refused, so imgkit never describes the "
                                         "encryption block qemu shows",
    "info:warnings": "imgkit warns (on stderr in the CLI) when the dirty bit is set; qemu-img is silent",
    # map
    "map:compressed": "imgkit's map marks compressed extents with \"compressed\": true (qemu 7.2 has no "
                      "such key); dropped before comparing",
    "map:offset-of-unallocated-subcluster": "with extended L2, qemu reports the host offset of an "
                                            "unallocated or zero subcluster inside an allocated cluster; "
                                            "imgkit reports no offset for data that is not there",
}


def unpack_fixtures(dest) -> dict:
    """Decompress every fixture into dest, verifying its sha256 pin; returns name -> path."""
    paths = {}
    for entry in MANIFEST:
        data = lzma.decompress((QCOW2_FIXTURES / entry["file"]).read_bytes())
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], entry["name"]
        path = dest / entry["name"]
        path.write_bytes(data)
        paths[entry["name"]] = path
    return paths


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return unpack_fixtures(tmp_path_factory.mktemp("qcow2-fixtures"))


def test_manifest_pins_and_commands(images):
    for entry in MANIFEST:
        assert entry["tool"].startswith("qemu-img version 7.2"), entry
        assert entry["command"], entry
        assert images[entry["name"]].stat().st_size == entry["size"]


def _flatten(value, prefix=""):
    if isinstance(value, dict):
        out = {}
        for key, sub in value.items():
            out.update(_flatten(sub, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}


@pytest.mark.parametrize("name", IMAGES)
def test_info_matches_qemu_field_by_field(qemu_img, images, name):
    ours = _flatten(api.info(images[name]))
    theirs = _flatten(qemu_info(images[name]))
    for key in sorted(set(ours) | set(theirs)):
        if f"info:{key}" in KNOWN_DIFFERENCES:
            continue
        assert ours.get(key) == theirs.get(key), f"{name}: {key}"


def test_info_details(images):
    dirty = api.info(images["dirty.qcow2"])
    assert dirty["dirty-flag"] is True and "dirty bit" in dirty["warnings"][0]
    snap = api.info(images["snap.qcow2"])["snapshots"]
    assert [s["name"] for s in snap] == ["first"]
    overlay = api.info(images["overlay.qcow2"])
    assert overlay["backing-filename"] == "base.qcow2"
    assert overlay["backing-filename-format"] == "qcow2"
    assert api.info(images["el2.qcow2"])["format-specific"]["data"]["extended-l2"] is True
    assert api.info(images["zstd.qcow2"])["format-specific"]["data"]["compression-type"] == "zstd"
    assert api.info(images["v2.qcow2"])["format-specific"]["data"]["compat"] == "0.10"


@pytest.mark.parametrize("name", sorted(set(IMAGES) - NEEDS_BACKING))
def test_read_equals_qemu_conversion(qemu_img, images, tmp_path, name):
    ours, theirs = tmp_path / "ours.raw", tmp_path / "theirs.raw"
    api.convert(images[name], ours, "raw")
    qemu("convert", "-O", "raw", str(images[name]), str(theirs))
    assert ours.read_bytes() == theirs.read_bytes()


def test_fixture_content_is_the_source(images):
    """The plain conversions hold exactly src.raw."""
    source = images["src.raw"].read_bytes()
    for name in ("v2.qcow2", "v3.qcow2", "c512.qcow2", "c4k.qcow2", "c2m.qcow2", "zlib.qcow2",
                 "zstd.qcow2", "zlib4k.qcow2", "rc1.qcow2", "rc64.qcow2"):
        with api.open_image(images[name]) as reader:
            buf = bytearray(reader.virtual_size)
            reader.readinto(0, buf)
        assert bytes(buf) == source, name


def _normalise_map(entries):
    out = []
    for entry in entries:
        entry = dict(entry)
        entry.pop("compressed", None)
        if not entry["data"]:
            entry.pop("offset", None)
        if out and all(out[-1].get(k) == entry.get(k) for k in ("present", "zero", "data", "depth")) \
                and "offset" not in entry and "offset" not in out[-1] \
                and out[-1]["start"] + out[-1]["length"] == entry["start"]:
            out[-1]["length"] += entry["length"]
            continue
        out.append(entry)
    return out


@pytest.mark.parametrize("name", sorted(set(IMAGES) - NEEDS_BACKING))
def test_map_matches_qemu(qemu_img, images, name):
    with api.open_image(images[name]) as reader:
        ours = list(api.map_entries(reader))
    assert _normalise_map(ours) == _normalise_map(qemu_map(images[name]))


def test_extents_kinds(images):
    with api.open_image(images["zeros.qcow2"]) as reader:
        kinds = {(e.offset, e.kind) for e in reader.extents()}
    assert (65536, Kind.ZERO) in kinds and (1048576, Kind.ZERO) in kinds
    with api.open_image(images["zlib.qcow2"]) as reader:
        assert any(e.compressed and e.kind == Kind.DATA for e in reader.extents())
    with api.open_image(images["overlay.qcow2"]) as reader:
        assert {e.kind for e in reader.extents()} == {Kind.DATA, Kind.UNALLOCATED}


@pytest.mark.parametrize("name", IMAGES)
def test_check_matches_qemu(qemu_img, images, name):
    result = qemu("check", "--output=json", str(images[name]), check=False)
    theirs = json.loads(result.stdout)
    theirs.pop("messages", None)
    report = api.check(images[name])
    ours = report.to_json()
    ours.pop("messages")
    assert ours == theirs
    assert report.exit_code == result.returncode


def test_backing_file_is_reported_never_followed(images, tmp_path):
    with pytest.raises(UnsafeImage, match="backing file"):
        api.convert(images["overlay.qcow2"], tmp_path / "x.raw", "raw")
    assert not (tmp_path / "x.raw").exists()


def test_readinto_coalesces_contiguous_clusters(tmp_path):
    """A dense 4 MiB window is one pread, not one per cluster."""
    src = tmp_path / "dense.raw"
    src.write_bytes(np.random.default_rng(1).integers(0, 256, 8 << 20, dtype=np.uint8).tobytes())
    api.convert(src, tmp_path / "dense.qcow2", "qcow2")
    with api.open_image(tmp_path / "dense.qcow2") as reader:
        calls = []
        real = reader.image.readinto
        reader.image.readinto = lambda buf, offset: calls.append(offset) or real(buf, offset)
        buf = bytearray(4 << 20)
        reader.readinto(2 << 20, buf)
    assert len(calls) == 1
    assert bytes(buf) == src.read_bytes()[2 << 20:6 << 20]


def test_threads_share_a_tiny_l2_cache(tmp_path):
    """readinto from several threads through a 2-slot cache over many L2 tables stays correct."""
    rng = np.random.default_rng(2)
    src = tmp_path / "many.raw"
    data = rng.integers(0, 256, 2 << 20, dtype=np.uint8).tobytes()
    src.write_bytes(data)
    api.convert(src, tmp_path / "many.qcow2", "qcow2", options={"cluster_size": "512"})
    errors = []
    with api.open_image(tmp_path / "many.qcow2") as reader:
        reader._cache_slots = 2

        def worker(seed):
            local = np.random.default_rng(seed)
            for _ in range(200):
                offset = int(local.integers(0, len(data) - 70000))
                buf = bytearray(int(local.integers(1, 70000)))
                reader.readinto(offset, buf)
                if bytes(buf) != data[offset:offset + len(buf)]:
                    errors.append(offset)

        threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors


def test_zstd_without_the_package_is_a_clear_error(images, monkeypatch):
    from imgkit.errors import UnsupportedFormat
    from imgkit.formats.qcow2 import codec
    monkeypatch.setattr(codec, "zstd_module", lambda: None)
    with api.open_image(images["zstd.qcow2"]) as reader:
        assert reader.info()["format-specific"]["data"]["compression-type"] == "zstd"
        with pytest.raises(UnsupportedFormat, match="zstandard"):
            reader.readinto(0, bytearray(65536))


def test_cli_info_and_check(qemu_img, images):
    result = run_cli("info", "--output", "json", images["snap.qcow2"])
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["snapshots"][0]["name"] == "first"
    result = run_cli("check", images["v3.qcow2"])
    assert result.returncode == 0, result.stderr
    assert "No errors" in result.stdout
    result = run_cli("check", "--output", "json", images["dirty.qcow2"])
    assert result.returncode == 2
    assert json.loads(result.stdout)["corruptions"] == 2
