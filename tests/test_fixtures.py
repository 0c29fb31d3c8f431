"""Every fixture is pinned: the bytes in the repository are the bytes the manifest names.

An entry names its file by "name"; an entry with "file" stores the image named "name"
xz-compressed in "file", and its sha256 pins the image itself."""
import hashlib
import json
import lzma

import pytest

from conftest import FIXTURES

MANIFESTS = sorted(FIXTURES.rglob("manifest.json"))
ENTRIES = [(m, e) for m in MANIFESTS for e in json.loads(m.read_text())]


def pinned_bytes(manifest, entry) -> bytes:
    data = (manifest.parent / entry.get("file", entry["name"])).read_bytes()
    return lzma.decompress(data) if "file" in entry and entry["file"].endswith(".xz") else data


def test_there_are_pinned_fixtures():
    assert any(e["name"] == "sample-disk.qcow2" for _, e in ENTRIES)
    assert {m.parent.name for m in MANIFESTS} >= {"fixtures", "qcow2", "vhd", "vmdk"}


@pytest.mark.parametrize("manifest,entry", ENTRIES,
                         ids=[f"{m.parent.name}/{e['name']}" for m, e in ENTRIES])
def test_fixture_matches_its_pin(manifest, entry):
    assert hashlib.sha256(pinned_bytes(manifest, entry)).hexdigest() == entry["sha256"]
    assert entry["command"] and entry["tool"]
