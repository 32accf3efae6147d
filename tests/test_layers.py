"""Data flows one way: no module under fwdgrad/ imports from a layer above its own (README, Layout)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fwdgrad"
#: Bottom to top; a module may import from its own layer and the ones below it.
LAYERS = (
    {"rng", "conf", "data", "measure", "provenance", "edge", "files", "signals", "statefile", "native"}
    | {"__version__"},
    {"fixed_point"},
    {"methods", "config"},
    {"quant"},
    {"engine"},
    {"ff"},
    {"models", "analysis"},
    {"train"},
    {"export", "plots", "report", "tracking"},
    {"pipeline"},
    {"cli"},
)
LEVEL = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _top(module: str) -> str:
    """fwdgrad.x.y -> x (the unit the layers are made of)."""
    return module.split(".")[1] if "." in module else module


def _imports(path: Path) -> set[str]:
    package = list(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])  # the containing package
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            if target.startswith("fwdgrad"):
                found |= {target} if node.module else {f"{target}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("fwdgrad")}
    return {_top(t) for t in found if t != "fwdgrad"}


MODULES = sorted(p for p in PACKAGE.rglob("*.py"))


def test_every_unit_has_a_layer():
    units = {_top(".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts)) for p in MODULES}
    assert units - {"__init__", "__main__"} <= set(LEVEL), units - set(LEVEL)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_import_from_a_layer_above(path):
    unit = _top(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts))
    if unit in ("__init__", "__main__"):
        return
    above = {t for t in _imports(path) if LEVEL[t] > LEVEL[unit]}
    assert not above, f"{path.relative_to(PACKAGE)} ({unit}, layer {LEVEL[unit]}) imports from above: {above}"
