"""Progress as a byte counter: tqdm on a terminal (or -p), JSON lines, or nothing."""
from __future__ import annotations

import json
import sys
import time


class NoProgress:
    def __call__(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


class JsonProgress:
    """One JSON object per line on stderr, at most every 0.5 s, plus a final one."""

    def __init__(self, total: int, label: str, stream=None):
        self.total, self.label, self.done = total, label, 0
        self.stream = stream or sys.stderr
        self.last = 0.0

    def __call__(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= 0.5:
            self.last = now
            self._emit()

    def _emit(self) -> None:
        pct = 100.0 * self.done / self.total if self.total else 100.0
        self.stream.write(json.dumps({"task": self.label, "done": self.done, "total": self.total,
                                      "percent": round(pct, 2)}) + "\n")
        self.stream.flush()

    def close(self) -> None:
        self._emit()


class TqdmProgress:
    def __init__(self, total: int, label: str):
        from tqdm import tqdm
        self.bar = tqdm(total=total, desc=label, unit="B", unit_scale=True, unit_divisor=1024,
                        file=sys.stderr, leave=False, dynamic_ncols=True)

    def __call__(self, n: int) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def make_progress(mode: str | None, total: int, label: str):
    """mode: 'json', 'bar', 'quiet', or None (a bar only when stderr is a terminal)."""
    if mode == "json":
        return JsonProgress(total, label)
    if mode == "bar" or (mode is None and sys.stderr.isatty()):
        return TqdmProgress(total, label)
    return NoProgress()
