"""The layering of docs/architecture.md holds: each package imports only the packages it
may, and no file imports another file's private (underscore) names."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "ddq"
DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"

# Keep in step with the table in docs/architecture.md (test_doc_table_matches checks it).
ALLOWED: dict[str, set[str]] = {
    "quantizer": set(),
    "layers": {"quantizer"},
    "conversion": {"layers", "quantizer"},
    "budget": {"conversion", "layers", "quantizer"},
    "training": {"budget", "conversion", "layers", "quantizer", "atomic"},
    "deploy": {"conversion", "layers", "quantizer", "atomic", "models"},
    "report": {"budget", "conversion", "layers", "quantizer"},
    "data": {"atomic"},
    "models": {"atomic"},
    "jobs": {"training", "budget", "conversion", "data", "models", "report", "atomic"},
    "cli": {"jobs", "training", "deploy", "data", "models", "report", "conversion"},
}
ROOT_NAMES = {"__version__"}  # ``from .. import __version__`` reads the root package only


def _imports(path: Path) -> list[tuple[list[str], list[str]]]:
    """(absolute module path inside ddq, imported names) of every ddq import in ``path``."""
    rel = list(path.relative_to(SRC).with_suffix("").parts)
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            names = [a.name for a in node.names]
            if node.level:
                base = rel[: len(rel) - node.level]
                mod = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "ddq":
                mod = node.module.split(".")[1:]
            else:
                continue
            out.append((mod, names))
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "ddq":
                    out.append((parts[1:], []))
    return out


def _files() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if len(p.relative_to(SRC).parts) > 1)


def test_every_package_is_in_the_table() -> None:
    packages = {p.relative_to(SRC).parts[0] for p in _files()}
    assert packages == set(ALLOWED), packages ^ set(ALLOWED)


@pytest.mark.parametrize("path", _files(), ids=lambda p: str(p.relative_to(SRC)))
def test_imports_follow_the_layering(path: Path) -> None:
    pkg = path.relative_to(SRC).parts[0]
    bad = []
    for mod, names in _imports(path):
        # ``from .. import x`` names the root package's names, or subpackages.
        targets = [n for n in names if n not in ROOT_NAMES] if not mod else [mod[0]]
        bad += [t for t in targets if t != pkg and t not in ALLOWED[pkg]]
    assert not bad, f"{path.relative_to(SRC)} ({pkg}) imports {sorted(set(bad))}"


@pytest.mark.parametrize("path", _files(), ids=lambda p: str(p.relative_to(SRC)))
def test_no_private_name_is_imported_across_files(path: Path) -> None:
    private = [
        (".".join(mod), n)
        for mod, names in _imports(path)
        for n in names
        if n.startswith("_") and not n.startswith("__")
    ]
    assert not private, f"{path.relative_to(SRC)} imports private names {private}"


def test_doc_table_matches() -> None:
    rows = {}
    section = DOC.read_text().split("## Who may import whom", 1)[1]
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0].startswith("`"):
            names = {w.strip("`, ") for w in cells[1].split("`")[1::2]}
            for pkg in (w.strip("`, ") for w in cells[0].split("`")[1::2]):
                rows[pkg] = names
    assert rows == ALLOWED
