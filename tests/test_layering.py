"""Architecture rules of ARCHITECTURE.md, checked on the source.

* The pure layers (psp, guest, wire, migrate, kvm) import no trio, no socket/subprocess, no structlog, and
  nothing from the daemon or the CLI: they must run under any event loop and in a fuzzer.
* The trust boundary: host-side code never imports the memory engine nor asks the firmware for one.
* No import cycles between modules, deferred (function-level) imports included.
"""

from __future__ import annotations

import ast
import pathlib
import re

import pytest

PKG = pathlib.Path(__file__).resolve().parent.parent / "sevmigd"
PURE = ("psp", "guest", "wire", "migrate", "kvm", "owner")
FORBIDDEN_IN_PURE = ("trio", "socket", "subprocess", "structlog", "asyncio", "selectors",
                     "sevmigd.daemon", "sevmigd.cli", "sevmigd.store")
HOST_SIDE = [PKG / "guest" / "hypervisor.py", PKG / "guest" / "shared.py", PKG / "kvm", PKG / "migrate",
             PKG / "wire", PKG / "daemon"]
# The VMM process (issue 17, sevmigd/vmm/): its protocol codec (both sides) and its guest runtime (guest
# side: it opens the key slot) are pure like the layers above; process.py is its I/O edge.
PURE_FILES = (PKG / "vmm" / "protocol.py", PKG / "vmm" / "runtime.py")
#: What only the VMM process may import: its guest runtime and its main (they hold the guest's key).
VMM_GUEST_SIDE = ("sevmigd.vmm.runtime", "sevmigd.vmm.process")


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


def test_vmm_codec_and_guest_runtime_do_no_io():
    bad = {}
    for path in PURE_FILES:
        tree = ast.parse(path.read_text())
        hits = _hits(_imports(path), FORBIDDEN_IN_PURE)
        if any(isinstance(n, (ast.Await, ast.AsyncFunctionDef)) for n in ast.walk(tree)):
            hits.append("await")
        if hits:
            bad[str(path.relative_to(PKG))] = hits
    assert not bad, f"VMM codec / guest runtime does I/O: {bad}"


def test_host_side_never_imports_the_vmm_guest_runtime():
    """The daemon talks to a VMM through sevmigd.vmm.protocol only; the VMM's guest runtime (which opens
    the key slot into a memory engine) and its process main stay on the guest side of the boundary."""
    bad = {}
    for root in HOST_SIDE:
        for path in _modules(root):
            hits = _hits(_imports(path), VMM_GUEST_SIDE)
            if hits:
                bad[str(path.relative_to(PKG))] = hits
    assert not bad, f"host-side code imports the VMM's guest side: {bad}"


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
            # the key slot opener (issue 17) turns a sealed VEK into a memory engine: the VMM's, never the host's
            hits = _hits(_imports(path), ("sevmigd.psp.memengine", "sevmigd.psp.keyslot"))
            if "memory_engine(" in src:
                hits.append("Firmware.memory_engine()")
            if "open_key_slot(" in src:
                hits.append("open_key_slot()")
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


# ------------------------------------------------------------------------------------- import cycles
# No module imports one that imports it back, directly or around a longer loop, counting every import
# statement wherever it stands: at module level or deferred inside a function (a deferred import only
# hides a cycle until the day someone moves it to the top). Imports under `if TYPE_CHECKING:` never run
# and are exempt: they let a lower module name the type of the object that drives it (control.py names
# the Daemon that serves it).


def _module_name(root: pathlib.Path, path: pathlib.Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the nodes inside `if TYPE_CHECKING:` blocks."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and (
                (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")
                or (isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING")):
            for stmt in node.body:
                skip.update(id(n) for n in ast.walk(stmt))
    return skip


def import_graph(root: pathlib.Path) -> dict[str, dict[str, int]]:
    """{module: {imported module of the same package: line of the first such import}} for the package at
    `root`, relative imports resolved, `from pkg import mod` pointing at the submodule."""
    paths = {_module_name(root, p): p for p in sorted(root.rglob("*.py"))}
    graph: dict[str, dict[str, int]] = {}
    for mod, path in paths.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        skip = _type_checking_nodes(tree)
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        edges: dict[str, int] = {}

        def add(target: str, line: int) -> None:
            if target in paths and target != mod:
                edges.setdefault(target, line)

        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                for a in node.names:
                    add(a.name, node.lineno)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for a in node.names:
                    sub = f"{source}.{a.name}"
                    add(sub if sub in paths else source, node.lineno)
        graph[mod] = edges
    return graph


def import_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Every strongly connected set of modules (more than one module), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                out.append(sorted(scc))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def _explain(graph: dict[str, dict[str, int]], cycle: list[str]) -> str:
    members = set(cycle)
    return "; ".join(f"{m}:{line} imports {t}" for m in cycle for t, line in sorted(graph[m].items())
                     if t in members)


def test_no_import_cycles():
    graph = import_graph(PKG)
    assert len(graph) > 50 and graph["sevmigd.daemon.server"], "the checker sees the package"
    cycles = import_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(_explain(graph, c) for c in cycles)


def test_cycle_checker_catches_a_deferred_import_cycle(tmp_path):
    """The rule can fail: a function-level import that closes a loop is a cycle, a TYPE_CHECKING one is not."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("from .. import c\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n")
    assert import_cycles(import_graph(pkg)) == []
    (pkg / "c.py").write_text("def later():\n    from pkg import a\n    return a\n")
    graph = import_graph(pkg)
    assert import_cycles(graph) == [["pkg.a", "pkg.c", "pkg.sub.b"]]
    assert "pkg.c:2 imports pkg.a" in _explain(graph, ["pkg.a", "pkg.c", "pkg.sub.b"])


# ------------------------------------------------------------------------------- drivers through kvm
# The migration drivers reach the PSP and the guest's SEV context only through sevmigd.kvm (SevGuest for
# the SEV commands, SevDevice for /dev/sev), as QEMU's target/i386/sev.c reaches them through /dev/kvm,
# and the guest's RAM only through migrate/ram.py (dirty log, bitmap windows, raw pages), as QEMU's
# migration.c leaves RAM to ram.c. So source.py and destination.py never name the firmware object
# (`.fw`), never import psp.firmware or guest modules, and never call the host view's RAM methods.

DRIVERS = [PKG / "daemon" / "source.py", PKG / "daemon" / "destination.py"]
RAM_METHODS = {"get_and_clear_dirty_log", "enable_dirty_log", "disable_dirty_log", "page_enc_bitmap",
               "page_enc_window", "page_enc_status", "set_page_enc_bitmap", "set_page_enc_status",
               "set_page_enc_window", "read_raw_pages", "write_raw_pages"}
DRIVER_FORBIDDEN_IMPORTS = ("sevmigd.psp.firmware", "sevmigd.psp.memengine", "sevmigd.guest")


def driver_violations(path: pathlib.Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = [f"imports {n}" for n in _hits(_imports(path), DRIVER_FORBIDDEN_IMPORTS)]
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "fw":
            out.append(f"line {node.lineno}: names the firmware object (.fw)")
        if isinstance(node, ast.Name) and node.id == "fw":
            out.append(f"line {node.lineno}: names the firmware object (fw)")
        if isinstance(node, ast.Attribute) and node.attr in RAM_METHODS:
            out.append(f"line {node.lineno}: RAM work ({node.attr}) outside migrate/ram.py")
    return out


@pytest.mark.parametrize("path", DRIVERS, ids=lambda p: p.name)
def test_drivers_reach_psp_and_guest_only_through_kvm_and_ram(path):
    assert not driver_violations(path)


def test_driver_checker_catches_a_violation(tmp_path):
    f = tmp_path / "drv.py"
    f.write_text("from sevmigd.guest.hypervisor import PAGE_SIZE\n"
                 "def x(self):\n    fw = self.daemon.fw\n    fw.send_update_data_batch(1, [])\n"
                 "    self.host.get_and_clear_dirty_log()\n")
    found = driver_violations(f)
    assert any("sevmigd.guest" in v for v in found)
    assert any(".fw" in v for v in found) and any("(fw)" in v for v in found)
    assert any("get_and_clear_dirty_log" in v for v in found)


# ARCHITECTURE.md names every module of the package (its path under sevmigd/, e.g. `daemon/settle.py`), so
# a newcomer finds each file's role there; package __init__ files are exempt.
ARCHITECTURE = PKG.parent / "ARCHITECTURE.md"


def _unnamed_modules(pkg: pathlib.Path, doc: str) -> list[str]:
    out = []
    for path in sorted([*pkg.rglob("*.py"), *pkg.rglob("*.c")]):
        rel = path.relative_to(pkg).as_posix()
        if path.name == "__init__.py" or rel.startswith(("build/", ".")):
            continue
        # the path under sevmigd/ (or with the sevmigd/ prefix), not as the tail of a longer path: a
        # top-level `errors.py` is not named by `wire/errors.py`
        if not re.search(r"(?<![\w/.])(?:sevmigd/)?" + re.escape(rel) + r"(?!\w)", doc):
            out.append(rel)
    return out


def test_architecture_names_every_module():
    missing = _unnamed_modules(PKG, ARCHITECTURE.read_text())
    assert not missing, f"modules ARCHITECTURE.md does not name (say what each is for): {missing}"


def test_architecture_checker_catches_an_unnamed_module(tmp_path):
    pkg = tmp_path / "sevmigd"
    (pkg / "daemon").mkdir(parents=True)
    for rel in ("__init__.py", "daemon/__init__.py", "daemon/server.py", "daemon/newthing.py", "units.py"):
        (pkg / rel).write_text("")
    doc = "`daemon/server.py`: serving. `units.py`: sizes."
    assert _unnamed_modules(pkg, doc) == ["daemon/newthing.py"]
    assert _unnamed_modules(pkg, "`sevmigd/daemon/server.py`, `daemon/newthing.py`, `guest/units.py`") == ["units.py"]
    assert _unnamed_modules(pkg, doc + " `daemon/newthing.py`: new.") == []
