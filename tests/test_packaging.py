"""A plain `pip install .` must ship every package (pyproject lists them by hand for the
native/ -> imgkit.native mapping)."""
import re

from conftest import ROOT


def test_every_package_is_listed_in_pyproject():
    text = (ROOT / "pyproject.toml").read_text()
    listed = set(re.findall(r'"(imgkit(?:\.[a-z0-9_]+)*)"', text.split("packages =", 1)[1].split("]", 1)[0]))
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "imgkit").rglob("__init__.py")}
    found.add("imgkit.native")
    assert listed == found
    assert '"imgkit.native" = "native"' in text
