"""The deflate implementation qcow2 and vmdk share: zlib-ng when installed (a dependency; it took
0.34-0.6x the stdlib's CPU for output at most 2.8 % larger in our measurements), else the stdlib
zlib. Both produce streams qemu-img and VMware read."""
from __future__ import annotations

import zlib

try:
    from zlib_ng import zlib_ng as module
except ImportError:   # pragma: no cover - depends on the installation
    module = zlib

FAST = module is not zlib
ERRORS = (zlib.error,) + ((module.error,) if FAST else ())
