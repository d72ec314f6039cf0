"""Architecture rules of ARCHITECTURE.md, checked on the source.

* The pure layers (psp, guest, wire, migrate) import no trio, no socket/subprocess, no structlog, and
  nothing from the daemon or the CLI: they must run under any event loop and in a fuzzer.
* The trust boundary: host-side code never imports the memory engine nor asks the firmware for one.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parent.parent / "sevmigd"
PURE = ("psp", "guest", "wire", "migrate")
FORBIDDEN_IN_PURE = ("trio", "socket", "subprocess", "structlog", "asyncio", "selectors",
                     "sevmigd.daemon", "sevmigd.cli", "sevmigd.store")
HOST_SIDE = [PKG / "guest" / "hypervisor.py", PKG / "migrate", PKG / "wire", PKG / "daemon"]


def _modules(root: pathlib.Path):
    if root.is_file():
        yield root
    else:
        yield from sorted(root.rglob("*.py"))


def _imports(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _hits(names: set[str], forbidden) -> list[str]:
    return sorted(n for n in names for f in forbidden if n == f or n.startswith(f + "."))


@pytest.mark.parametrize("layer", PURE)
def test_pure_layers_do_no_io(layer):
    bad = {}
    for path in _modules(PKG / layer):
        hits = _hits(_imports(path), FORBIDDEN_IN_PURE)
        if hits:
            bad[str(path.relative_to(PKG))] = hits
    assert not bad, f"pure layer imports I/O or daemon modules: {bad}"


def test_pure_layers_have_no_await():
    bad = []
    for layer in PURE:
        for path in _modules(PKG / layer):
            tree = ast.parse(path.read_text())
            if any(isinstance(n, (ast.Await, ast.AsyncFunctionDef)) for n in ast.walk(tree)):
                bad.append(str(path.relative_to(PKG)))
    assert not bad, f"await in a pure layer: {bad}"


def test_host_side_never_touches_guest_keys():
    bad = {}
    for root in HOST_SIDE:
        if not root.exists():
            continue
        for path in _modules(root):
            src = path.read_text()
            hits = _hits(_imports(path), ("sevmigd.psp.memengine",))
            if "memory_engine(" in src:
                hits.append("Firmware.memory_engine()")
            if hits:
                bad[str(path.relative_to(PKG))] = hits
    assert not bad, f"host-side code reaches for a guest memory key: {bad}"


def test_checker_catches_a_violation(tmp_path):
    """The checker itself can fail: a module importing trio is flagged."""
    f = tmp_path / "x.py"
    f.write_text("import trio\nfrom sevmigd.psp.memengine import MemoryEngine\n")
    assert _hits(_imports(f), FORBIDDEN_IN_PURE) == ["trio"]
    assert _hits(_imports(f), ("sevmigd.psp.memengine",)) == ["sevmigd.psp.memengine",
                                                               "sevmigd.psp.memengine.MemoryEngine"]
