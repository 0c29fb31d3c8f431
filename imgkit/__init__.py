"""imgkit: prepare and convert virtual disk images for Huawei Cloud IMS.

The Python API (imgkit.api) is loaded on first attribute access, so `import imgkit` is cheap:

    import imgkit
    imgkit.convert("disk.qcow2", "disk.raw", "raw")
    with imgkit.open_image("disk.vmdk") as r:
        for ext in r.extents(): ...
"""
from __future__ import annotations

__version__ = "0.1.0"

_API = ("open_image", "info", "map_entries", "compare", "convert", "check", "measure")


def __getattr__(name):
    if name in _API:
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'imgkit' has no attribute {name!r}")


__all__ = list(_API) + ["__version__"]
