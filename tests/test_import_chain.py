"""docs/DESIGN.md's import chain holds for the code: every module of the package stands in it, and none imports one
later in it (or one of its own group), function-level imports included. The CLI's parser and `wer` load no torch."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
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


def test_the_parser_and_wer_never_import_torch(tmp_path):
    """torch takes 10-20 s to import on a loaded machine: `--help` of every command that runs no model, and `wer`
    itself, must not pay for it (the commands that run a model declare their arguments when parsed)."""
    (tmp_path / "ref.txt").write_text("u1 Una casa\nu2 dos\n", encoding="utf-8")
    (tmp_path / "hyp.txt").write_text("u1 una ca[UNK]a\nu2 dos\n", encoding="utf-8")
    program = (
        "import sys\n"
        "from speechxfer.cli import build_parser, main\n"
        "parser = build_parser()\n"
        "for command in ('wer', 'prepare', 'vocab', 'synth', 'train', 'lm build'):\n"
        "    try:\n"
        "        parser.parse_args([*command.split(), '--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "assert main(['wer', sys.argv[1], sys.argv[2], '--normalize', 'basic', '--json']) == 0\n"
        "print('loaded:', sorted({'torch', 'transformers'} & set(sys.modules)))\n")
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", program, str(tmp_path / "ref.txt"), str(tmp_path / "hyp.txt")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert '"cer": 0.1,' in done.stdout  # it did score: ca[UNK]a is one wrong character of ten
    assert done.stdout.rstrip().endswith("loaded: []")
