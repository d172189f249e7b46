"""The tree is the architecture: imports run one way between packages and between wings.

Every module of ``adacode``, ``store``, ``quantize`` and ``worker`` is parsed (not
imported) and each of its imports, at any depth (function-local imports included), is
checked against the layering drawn in ``worker/__init__.py``:

    adacode < store, quantize < worker.core < state < ingest < tuning < serving < app < commands

``store`` and ``quantize`` are side by side (neither imports the other). ``quantize`` is
pure arrays: no Kafka, no RocksDB, no HTTP.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("adacode", "store", "quantize", "worker")

#: the wings of ``worker``, lowest first; a module may import its own wing or a lower one
WINGS = ("core", "state", "ingest", "tuning", "serving", "app", "commands")

#: third-party I/O packages that the pure-array package must never import
IO_PACKAGES = ("kafka", "rocksdict", "http", "socket", "apscheduler", "prometheus_client")


def layer(module: str) -> tuple[int, str] | None:
    """``(rank, name)`` of a first-party module; ``None`` for a third-party one.

    Ranks: adacode 0, store and quantize 1 (each its own name, so they cannot import
    each other), the worker wings 2.. in :data:`WINGS` order. ``worker`` itself (its
    ``__init__``) ranks above every wing: nothing may import it.
    """
    parts = module.split(".")
    top = parts[0]
    if top == "adacode":
        return 0, "adacode"
    if top in ("store", "quantize"):
        return 1, top
    if top != "worker":
        return None
    if len(parts) < 2 or parts[1] not in WINGS:
        return 2 + len(WINGS), "worker"
    return 2 + WINGS.index(parts[1]), f"worker.{parts[1]}"


def allowed(importer: str, imported: str) -> bool:
    """Whether module ``importer`` may import module ``imported`` (both dotted names)."""
    src, dst = layer(importer), layer(imported)
    if dst is None:
        return True
    assert src is not None, importer
    if src[1] == dst[1]:
        return True
    if src[0] == dst[0]:  # store and quantize: side by side, no edge between them
        return False
    return dst[0] < src[0]


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    path: Path
    line: int


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imports_of(path: Path) -> list[Import]:
    """Every import in ``path``, absolute or relative, at any depth of the module."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[Import] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [Import(name, a.name, path, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.append(Import(name, base, path, node.lineno))
    return found


def all_modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def test_every_import_runs_down_the_layers() -> None:
    upward = [
        f"{i.path.relative_to(ROOT)}:{i.line}: {i.importer} imports {i.imported}"
        for path in all_modules()
        for i in imports_of(path)
        if not allowed(i.importer, i.imported)
    ]
    assert not upward, "imports against the layering:\n" + "\n".join(upward)


def test_every_worker_module_sits_in_a_wing() -> None:
    loose = [
        str(p.relative_to(ROOT)) for p in (ROOT / "worker").glob("*.py") if p.name != "__init__.py"
    ]
    assert not loose, f"modules outside a wing: {loose}"
    wings = {p.name for p in (ROOT / "worker").iterdir() if (p / "__init__.py").is_file()}
    assert wings == set(WINGS)


@pytest.mark.parametrize("wing", WINGS)
def test_each_wing_states_what_it_owns(wing: str) -> None:
    init = ROOT / "worker" / wing / "__init__.py"
    doc = ast.get_docstring(ast.parse(init.read_text()))
    assert doc and len(doc.split()) >= 10, f"worker/{wing}/__init__.py has no docstring"


def test_quantize_is_pure_arrays() -> None:
    io = [
        f"{i.path.relative_to(ROOT)}:{i.line}: {i.imported}"
        for path in (ROOT / "quantize").rglob("*.py")
        for i in imports_of(path)
        if i.imported.split(".")[0] in IO_PACKAGES
    ]
    assert not io, f"quantize imports I/O packages: {io}"


@pytest.mark.parametrize(
    ("importer", "imported", "ok"),
    [
        ("worker.ingest.processor", "worker.state.versions", True),
        ("worker.ingest.processor", "worker.ingest.coding", True),
        ("worker.ingest.processor", "worker.tuning.finetune", False),
        ("worker.tuning.finetune", "worker.serving.index", False),
        ("worker.serving.index", "worker.tuning.finetune", True),
        ("worker.commands.cli", "worker.app.daemon", True),
        ("worker.app.daemon", "worker.commands.cli", False),
        ("worker.core.settings", "worker.state.layout", False),
        ("worker.state.reads", "worker", False),
        ("store.records", "worker.core.settings", False),
        ("store.records", "quantize.assign", False),
        ("quantize.assign", "store.partition", False),
        ("quantize.assign", "numpy", True),
        ("worker.ingest.coding", "quantize.assign", True),
    ],
)
def test_the_rule_itself(importer: str, imported: str, ok: bool) -> None:
    assert allowed(importer, imported) is ok


def test_relative_imports_are_resolved(tmp_path: Path) -> None:
    wing = tmp_path / "worker" / "ingest"
    wing.mkdir(parents=True)
    mod = wing / "x.py"
    mod.write_text("from ..tuning import finetune\nfrom . import events\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        found = [(i.importer, i.imported) for i in imports_of(mod)]
    finally:
        ROOT = saved
    assert found == [("worker.ingest.x", "worker.tuning"), ("worker.ingest.x", "worker.ingest")]
    assert not allowed(*found[0])
