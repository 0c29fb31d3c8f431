"""Shared test helpers: real qemu-img, patterned sparse images, and the CLI in a subprocess."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
IN_CI = os.environ.get("CI", "").lower() == "true"


def qemu_img_path() -> str | None:
    return shutil.which("qemu-img")


@pytest.fixture(scope="session")
def qemu_img():
    """Path of qemu-img; skips with a reason when it is missing, but fails in CI."""
    path = qemu_img_path()
    if path is None:
        if IN_CI:
            pytest.fail("qemu-img is required in CI (apt-get install -y qemu-utils)")
        pytest.skip("qemu-img not installed (apt-get install -y qemu-utils)")
    return path


def qemu(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run qemu-img with args; returns the completed process (text mode)."""
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=check)


def qemu_info(path, fmt: str | None = None) -> dict:
    args = ["info", "--output=json"] + (["-f", fmt] if fmt else []) + [str(path)]
    return json.loads(qemu(*args).stdout)


def qemu_map(path, fmt: str | None = None) -> list:
    args = ["map", "--output=json"] + (["-f", fmt] if fmt else []) + [str(path)]
    return json.loads(qemu(*args).stdout)


def run_cli(*args: str, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    """imgkit in a subprocess, exactly as a user runs it."""
    return subprocess.run([sys.executable, "-m", "imgkit", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, **kwargs)


def write_sparse(path, size: int, runs) -> bytes | None:
    """A sparse file of size bytes with (offset, data) runs written; holes stay holes."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in runs:
            f.seek(offset)
            f.write(data)
    return None


def patterned(size: int, step: int = 1 << 20, every: int = 3) -> list[tuple[int, bytes]]:
    """Runs where block i (of step bytes) is filled with byte i+1, for every `every`-th block."""
    return [(off, bytes([(off // step) % 255 + 1]) * min(step, size - off))
            for off in range(0, size, step * every)]


def pytest_addoption(parser):
    parser.addoption("--long", action="store_true", default=False,
                     help="run the long fuzz and hostile-image suites (same as IMGKIT_FUZZ_LONG=1)")


def long_mode(config) -> bool:
    """True with --long or IMGKIT_FUZZ_LONG=1: fuzzing runs for minutes, every hostile case runs."""
    return bool(config.getoption("--long", default=False)) or os.environ.get("IMGKIT_FUZZ_LONG") == "1"
