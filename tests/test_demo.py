"""The offline demo's recipes and script, and scripts/learning_curve.py run end to end on a tiny checkpoint and
generated tones (two data sizes, three conditions, two updates each)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from speechxfer.errors import InputError
from speechxfer.manifest import Utterance, load_manifest, write_manifest
from speechxfer.prepare import prepare
from speechxfer.recipe import Recipe, load_recipe
from speechxfer.text import TextNormalizer
from tiny import make_tiny_checkpoint, write_tone

REPO = Path(__file__).resolve().parents[1]
DEMO_RECIPES = sorted((REPO / "recipes" / "demo").glob("*.yaml"))
SEED_VOCAB = ["[PAD]", "[UNK]", "|", "a", "b", "c", "d"]


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


learning_curve = _load_script("learning_curve")


def _leaves(tree: dict, prefix: str = "") -> dict:
    """{"train.lr": 0.001, ...} of a nested mapping."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "replacements":
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def test_demo_recipes_exist():
    assert any(path.stem == "es" for path in DEMO_RECIPES)


@pytest.mark.parametrize("path", DEMO_RECIPES, ids=lambda p: p.stem)
def test_demo_recipe_loads_and_writes_only_what_differs_from_the_defaults(path):
    recipe = load_recipe(path)
    assert (path.parent / recipe.base).resolve() == REPO / "seed"  # relative to the recipe until seed/ exists
    if recipe.data.prepare is None:
        # demo.sh synthesizes data/demo/<lang>/ and trains into runs/demo-<lang>
        corpus = REPO / "data" / "demo" / path.stem
        assert (recipe.data.train, recipe.data.dev, recipe.data.test) == tuple(
            str(corpus / f"{split}.jsonl") for split in ("train", "dev", "test"))
    assert Path(recipe.output_dir).name == f"demo-{path.stem}"

    defaults = _leaves(dataclasses.asdict(Recipe(base="", output_dir="")))
    written = _leaves(yaml.safe_load(path.read_text(encoding="utf-8")))
    for key, value in written.items():
        if key in defaults and not key.startswith(("data.", "base", "output_dir")):
            assert value != defaults[key], f"{path.name}: {key} repeats the default {value!r}"


def test_demo_script_stops_before_installing_anything_without_a_recipe_or_seed(tmp_path):
    assert subprocess.run(["bash", "-n", REPO / "scripts" / "demo.sh"]).returncode == 0
    missing = subprocess.run(["bash", REPO / "scripts" / "demo.sh", "xx"], capture_output=True, text=True)
    assert missing.returncode == 2 and "no recipe recipes/demo/xx.yaml" in missing.stderr
    assert "es" in missing.stderr.split("languages with one:")[1]
    no_seed = subprocess.run(["bash", REPO / "scripts" / "demo.sh", "es"], capture_output=True, text=True,
                             env={"PATH": "/usr/bin:/bin", "SEED_DIR": str(tmp_path / "none")})
    assert no_seed.returncode == 2 and "no seed checkpoint" in no_seed.stderr
    assert "installing" not in no_seed.stdout


def write_corpus(folder: Path) -> Path:
    """train (8 tones of 1 s, 8 s in all), dev (2), test (2), with texts of the seed's letters."""
    texts = ["ab ba", "abc", "ca ab", "bac a", "cab", "a bc", "ba ca", "cc ab", "abba", "b a c", "dab", "ad"]
    splits = {"train": range(0, 8), "dev": range(8, 10), "test": range(10, 12)}
    for split, indices in splits.items():
        write_manifest(folder / f"{split}.jsonl", [
            Utterance(id=f"u{k}", audio_path=str(write_tone(folder / "audio" / f"u{k}.wav", duration_s=1.0,
                                                            frequency_hz=200 + 40 * k, seed=k)),
                      text=texts[k], duration_s=1.0) for k in indices])
    return folder


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("curve")
    # seed 1: the script draws the from-scratch weights with seed 0, which must not give the seed's own weights
    seed = make_tiny_checkpoint(tmp / "seed", arch="base", ctc_vocab=SEED_VOCAB, seed=1)
    corpus = write_corpus(tmp / "corpus")
    recipe = tmp / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "base": str(seed), "data": {"train": "unused.jsonl"}, "freezing": {"head_only_updates": 1},
        "train": {"lr": 1e-3, "max_batch_s": 2.5, "min_duration_s": 0.1, "warmup_ratio": 0.5, "hold_ratio": 0.0},
        "output_dir": str(tmp / "unused")}), encoding="utf-8")
    args = ["--seed-dir", str(seed), "--corpus", str(corpus), "--recipe", str(recipe), "--minutes", "0.1",
            "--budget-updates", "2", "--max-batch-s", "2.5", "--device", "cpu", "--out", str(tmp / "out"),
            "--report-dir", str(tmp / "docs")]
    return tmp, args


def test_learning_curve_trains_every_cell_and_writes_the_report(grid_run, monkeypatch):
    tmp, args = grid_run
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # restored after the test; the script sets it for --device cpu
    assert learning_curve.main(args) == 0

    results = json.loads((tmp / "out" / "results.json").read_text())
    assert sorted(results["cells"]) == sorted(f"{c}/0.1" for c in learning_curve.CONDITIONS)
    for cell in results["cells"].values():
        assert cell["updates"] == 2 and 0 <= cell["test_cer"] and 0 <= cell["test_wer"]
        assert cell["train_utterances"] == 6  # 1 s each, up to 6 s
    assert json.loads((tmp / "docs" / "learning_curves.json").read_text()) == results
    report = (tmp / "docs" / "learning_curves.md").read_text()
    assert "| 0.1 |" in report and "not run" not in report
    assert (tmp / "docs" / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # (b) is the seed with a new random head; (c) shares no weight with the seed
    seed = load_file(tmp / "seed" / "model.safetensors")
    hf_example = load_file(tmp / "out" / "base_hf_example" / "model.safetensors")
    scratch = load_file(tmp / "out" / "base_scratch" / "model.safetensors")
    body = [k for k in seed if not k.startswith("lm_head.")]
    assert all(torch.equal(seed[k].float(), hf_example[k]) for k in body)
    assert not any(torch.equal(seed[k].float(), scratch[k]) for k in body if seed[k].numel() > 1
                   and seed[k].std() > 0)
    assert hf_example["lm_head.weight"].shape[0] == len(json.loads((tmp / "out" / "vocab" / "vocab.json").read_text()))


def test_learning_curve_rerun_skips_cached_cells_and_refuses_other_settings(grid_run, monkeypatch, capsys):
    tmp, args = grid_run
    if not (tmp / "out" / "results.json").exists():
        pytest.skip("needs the grid of the previous test")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")

    def no_training(*_, **__):
        raise AssertionError("a cached cell was trained again")

    monkeypatch.setattr("speechxfer.training.train", no_training)
    assert learning_curve.main(args) == 0
    other = [a if a != "2" else "3" for a in args]  # --budget-updates 3
    assert learning_curve.main(other) == 2
    assert "other settings" in capsys.readouterr().err


def test_learning_curve_subsets_are_nested_prefixes_of_one_shuffle(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    grid = learning_curve.Grid(recipe=tmp_path / "unused.yaml", seed_dir=tmp_path, corpus=corpus,
                               minutes=(0.02, 0.05, 0.1), budget_updates=1, max_batch_s=1.0, device="cpu",
                               out=tmp_path / "out")
    subsets = {m: load_manifest(path) for m, path in learning_curve.write_subsets(grid).items()}
    assert [len(subsets[m]) for m in grid.minutes] == [2, 3, 6]  # 1 s each: up to 1.2 s, 3 s, 6 s
    assert [u.id for u in subsets[0.1][:3]] == [u.id for u in subsets[0.05]]
    assert [u.id for u in subsets[0.1]] != sorted(u.id for u in subsets[0.1])  # shuffled, not the file order
    too_much = dataclasses.replace(grid, minutes=(1.0,))
    with pytest.raises(InputError, match="fewer than 1"):
        learning_curve.write_subsets(too_much)


def test_learning_curve_checks_report_both_acceptance_criteria():
    def cells(wers):
        return {f"{c}/{m:g}": {"test_wer": w} for (c, m), w in wers.items()}

    minutes = (5.0, 10.0, 20.0, 40.0)
    wers = {("transfer", 5.0): 0.5, ("transfer", 10.0): 0.3, ("transfer", 20.0): 0.2, ("transfer", 40.0): 0.15,
            ("hf_example", 5.0): 0.6, ("hf_example", 10.0): 0.25, ("hf_example", 20.0): 0.3,
            ("hf_example", 40.0): 0.2, ("scratch", 40.0): 0.35}
    first, second = learning_curve.checks(cells(wers), minutes)
    assert "yes, with 10 minutes" in first and "35.0%" in first
    assert second.startswith("- Is (a) no worse than (b) at every point? no, worse at 10 min (30.0% vs 25.0%)")
    wers[("scratch", 40.0)] = 0.1
    assert "? no (best of (a) up to 10 minutes: 30.0%)" in learning_curve.checks(cells(wers), minutes)[0]


ASTERISK_RECIPES = [path for path in DEMO_RECIPES
                    if (spec := load_recipe(path).data.prepare) is not None and spec.format == "asterisk"]


@pytest.mark.parametrize("path", ASTERISK_RECIPES, ids=lambda p: p.stem)
def test_asterisk_recipe_text_section_takes_every_prompt_of_its_corpus(path, tmp_path):
    """The real-speech recipes' text sections against the Debian corpora they read (installed by .ci/run): every
    transcript of every split normalizes to letters, the recipe's kept characters and spaces (digits spelled,
    punctuation gone), and only a transcript with digits is left out, where the recipe rejects digits."""
    recipe = load_recipe(path)
    if not Path(recipe.data.prepare.source).is_dir():
        pytest.skip(f"{recipe.data.prepare.source} is not installed (apt-get install asterisk-core-sounds-*-wav)")
    result = prepare(recipe.data.prepare.format, recipe.data.prepare.source, tmp_path)
    normalizer = TextNormalizer(recipe.text)
    assert result.utterances > 400
    for split, manifest in result.manifests.items():
        texts = [utterance.text for utterance in load_manifest(manifest)]
        normalized = normalizer.normalize_all(texts)
        rejected = [text for text, out in zip(texts, normalized) if not out]
        if recipe.text.digits == "reject":
            assert rejected and all(any(c.isdigit() for c in text) for text in rejected), (split, rejected)
        else:
            assert rejected == [], (split, rejected)
        odd = {c for out in normalized if out for c in out if not (c.isalpha() or c == " " or c in recipe.text.keep)}
        assert odd == set(), (split, odd)
        if recipe.text.digits == "spell":
            assert not any(c.isdigit() for out in normalized if out for c in out)
