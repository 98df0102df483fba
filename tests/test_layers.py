"""The layering of the code: no module imports a layer above its own (issue 16).

From the bottom: the operator library ``operators3d``; the foundations (the top-level modules of
``pipeline``: errors, paths, log, safeload, allocator, metrics, distributed, config_base,
modelcard, outputs, threads) and the scan format ``pipeline.data``; the building blocks ``pipeline.losses``,
``pipeline.models``, ``pipeline.classical`` and the reference-free error estimate
``pipeline.estimate`` (it runs classical pilots, a loss's k-space centre and a model's image
metric, so it sits with them); the peers ``pipeline.train`` and ``pipeline.reconstruct``, which
import nothing of each other; the entry points ``pipeline.cli`` and ``pipeline.quickstart``.
Imports inside functions count too: a lazy import still ties a lower layer to an upper one.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: The layer of each module prefix (the longest matching prefix decides), from the bottom.
LAYERS: dict[str, int] = {
    "operators3d": 0,
    "pipeline": 1,  # the package's top-level modules not named below
    "pipeline.data": 1,
    "pipeline.losses": 2,
    "pipeline.models": 2,
    "pipeline.classical": 2,
    "pipeline.estimate": 2,
    "pipeline.train": 3,
    "pipeline.reconstruct": 3,
    "pipeline.cli": 4,
    "pipeline.quickstart": 4,
}

#: Peers (same layer) that import nothing of each other, except as ``EXCEPTIONS`` allow.
PEERS = {("pipeline.train", "pipeline.reconstruct"), ("pipeline.reconstruct", "pipeline.train")}

#: ``(importing module, imported prefix)`` pairs allowed against the layering, with the reason.
EXCEPTIONS: dict[tuple[str, str], str] = {
    ("pipeline.reconstruct.coordination", "pipeline.train"):
        "given a run directory, reconstruct exports it first (train's export_run) and picks its checkpoint",
    ("pipeline.reconstruct.adapters", "pipeline.train"):
        "a network is a training run's export: read, checked and rebuilt by train's export (read_export, "
        "load_exported, with train's model configs), its intensity scale measured as training does (scan_scale)",
    ("pipeline.data.preprocess", "pipeline.classical"):
        "recon3d preprocess stores a scan's derived classical reconstructions (FBP, Noise2Inverse, SENSE)",
    ("pipeline.data.cone", "pipeline.classical"):
        "the out-of-core cone-beam FDK of recon3d preprocess filters and backprojects with classical's FDK",
}


def _layer_of(name: str) -> str | None:
    """The ``LAYERS`` prefix that ``name`` (a dotted module or imported name) falls under."""
    return max((p for p in LAYERS if name == p or name.startswith(p + ".")), key=len, default=None)


def _modules() -> list[tuple[str, Path]]:
    out = []
    for top in ("operators3d", "pipeline"):
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out.append((".".join(parts), path))
    return out


def _imports(module: str, path: Path) -> list[tuple[int, str]]:
    """``(line, dotted name)`` of everything ``path`` imports, at any depth (relative imports
    resolved; ``from M import N`` gives ``M.N``, which falls under M's prefix unless N is a
    subpackage with a layer of its own, as ``from pipeline import classical``)."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            source = ".".join(base + ([node.module] if node.module else []))
            found += [(node.lineno, f"{source}.{a.name}") for a in node.names]
    return found


def _allowed(module: str, name: str) -> bool:
    return any((module, prefix) in EXCEPTIONS for prefix in LAYERS if name == prefix or name.startswith(prefix + "."))


def _violations() -> list[str]:
    problems = []
    for module, path in _modules():
        own = _layer_of(module)
        assert own is not None, f"{module} has no layer in LAYERS"
        for line, name in _imports(module, path):
            other = _layer_of(name)
            if other is None or other == own or _allowed(module, name):
                continue
            if LAYERS[other] > LAYERS[own]:
                problems.append(f"{path.relative_to(ROOT)}:{line}: {module} imports {name} (layer {other}, "
                                f"above {own})")
            elif (own, other) in PEERS:
                problems.append(f"{path.relative_to(ROOT)}:{line}: {module} imports {name} (its peer {other})")
    return problems


def test_no_module_imports_a_higher_layer_or_its_peer():
    problems = _violations()
    assert not problems, "imports against the layering:\n" + "\n".join(problems)


def test_every_exception_is_still_used():
    """An exception no import needs any more leaves the list."""
    used = {(module, prefix) for module, path in _modules() for _, name in _imports(module, path)
            for prefix in LAYERS if (module, prefix) in EXCEPTIONS and (name == prefix or name.startswith(prefix + "."))}
    assert used == set(EXCEPTIONS), f"unused exceptions: {sorted(set(EXCEPTIONS) - used)}"


def test_the_check_sees_lazy_and_relative_imports(tmp_path):
    """The parser finds an import inside a function and resolves a relative one."""
    path = tmp_path / "validation.py"
    path.write_text("def f():\n    from ..reconstruct.estimate import estimate_error\n    import pipeline.cli\n")
    assert _imports("pipeline.train.validation", path) == [
        (2, "pipeline.reconstruct.estimate.estimate_error"), (3, "pipeline.cli")]
