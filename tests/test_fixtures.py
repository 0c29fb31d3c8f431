"""Every fixture is pinned: the bytes in the repository are the bytes the manifest names."""
import hashlib
import json

import pytest

from conftest import FIXTURES

MANIFESTS = sorted(FIXTURES.rglob("manifest.json"))
ENTRIES = [(m, e) for m in MANIFESTS for e in json.loads(m.read_text())]


def test_there_are_pinned_fixtures():
    assert any(e["name"] == "sample-disk.qcow2" for _, e in ENTRIES)


@pytest.mark.parametrize("manifest,entry", ENTRIES,
                         ids=[f"{m.parent.name}/{e['name']}" for m, e in ENTRIES])
def test_fixture_matches_its_pin(manifest, entry):
    data = (manifest.parent / entry["name"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == entry["sha256"]
    assert entry["command"] and entry["tool"]
