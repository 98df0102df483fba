"""The repository explains itself: every file, module and link its documents name exists in it.

Module moves (issue 16) leave no stale path behind in README.md, BENCHMARKS.md, docs/ or the
docstrings' neighbours; nothing points outside the repository (a clone has no ``../shared``).
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]
PATH = re.compile(r"(?<![\w/.-])((?:operators3d|pipeline|launch|benchmarks|docs|tests)/[\w/.-]*\w)")
MODULE = re.compile(r"`((?:operators3d|pipeline)(?:\.\w+)+)")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _resolves(dotted: str) -> bool:
    """``dotted`` is a module, or a module followed by attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_named_files_modules_and_links_exist(doc):
    text = doc.read_text()
    missing = []
    for path in sorted(set(PATH.findall(text))):
        bare = path.rstrip(".")
        if any(ch in bare for ch in "*{<") or bare.endswith("/"):
            continue
        if not (ROOT / bare).exists():
            missing.append(bare)
    for dotted in sorted(set(MODULE.findall(text))):
        if not _resolves(dotted):
            missing.append(dotted)
    for target in LINK.findall(text):
        if re.match(r"[a-z]+://", target):
            continue
        if not (doc.parent / target).exists():
            missing.append(f"link {target}")
    assert not missing, f"{doc.relative_to(ROOT)} names what the repository does not have: {missing}"


def test_nothing_points_outside_the_repository():
    for doc in DOCS:
        assert "../shared" not in doc.read_text(), doc
