"""docs/DESIGN.md's import chain holds for the code: every module of the package stands in it, and none imports one
later in it (or one of its own group), function-level imports included."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "speechxfer"
ENTRY_POINTS = {"__init__", "__main__"}  # __main__ only runs cli.main


def documented_chain() -> list[set[str]]:
    """The chain line of DESIGN.md (`a → b/c → d`, notes in brackets), as groups of module names in order."""
    design = (REPO / "docs" / "DESIGN.md").read_text(encoding="utf-8")
    line = re.search(r"^    \w+ → .*$", design, re.MULTILINE).group()  # the first indented line of arrows
    return [{name.strip() for name in re.sub(r"\(.*?\)", "", step).split("/")} for step in line.split("→")]


def imported_modules(path: Path) -> set[str]:
    """Package modules a file imports anywhere in it: `import speechxfer.x`, `from speechxfer.x import ...` and
    `from speechxfer import x`."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("speechxfer.")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "speechxfer":
                names |= {alias.name for alias in node.names}
            elif node.module.startswith("speechxfer."):
                names.add(node.module.split(".")[1])
    return names


def test_every_module_stands_in_the_documented_chain():
    modules = {path.stem for path in PACKAGE.glob("*.py")} - ENTRY_POINTS
    documented = set().union(*documented_chain())
    assert modules - documented == set(), "modules missing from DESIGN.md's chain"
    assert documented - modules == set(), "DESIGN.md's chain names modules that do not exist"


def test_no_module_imports_one_later_in_the_chain_or_of_its_own_group():
    rank = {name: position for position, group in enumerate(documented_chain()) for name in group}
    violations = [f"{path.stem} imports {name}"
                  for path in sorted(PACKAGE.glob("*.py")) if path.stem not in ENTRY_POINTS
                  for name in sorted(imported_modules(path))
                  if name != path.stem and rank.get(name, len(rank)) >= rank[path.stem]]
    assert violations == []


def test_the_check_sees_function_level_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import speechxfer.audio\nfrom speechxfer import text\n\n\ndef f():\n"
                      "    from speechxfer.prepare import prepare\n    import json\n", encoding="utf-8")
    assert imported_modules(source) == {"audio", "text", "prepare"}
