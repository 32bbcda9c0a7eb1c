"""Recipes: shipped files load, every key is typed, errors name the dotted key and the file, overrides."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from speechxfer.errors import RecipeError
from speechxfer.recipe import Recipe, load_recipe, resolved_yaml

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "recipes").rglob("*.yaml"))
COMMON_VOICE = sorted((REPO / "recipes" / "common_voice").glob("*.yaml"))

MINIMAL = {"base": "facebook/wav2vec2-xls-r-300m", "data": {"train": "data/train.jsonl"}, "output_dir": "runs/x"}


def write(tmp_path: Path, content: dict | str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content, allow_unicode=True),
                    encoding="utf-8")
    return path


def with_(base: dict, dotted: str, value) -> dict:
    """A deep copy of `base` with `dotted` set to `value`."""
    import copy

    result = copy.deepcopy(base)
    node = result
    *parents, last = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return result


def test_at_least_six_common_voice_languages_are_shipped():
    assert {p.stem for p in COMMON_VOICE} >= {"tr", "cy", "sw", "ca", "pl", "ru", "rw"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_every_shipped_recipe_loads_and_round_trips(path, tmp_path):
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    needs_source = "prepare" in raw.get("data", {}) and "source" not in raw["data"]["prepare"]
    overrides = [f"data.prepare.source={tmp_path}"] if needs_source else []
    recipe = load_recipe(path, overrides=overrides)
    assert isinstance(recipe, Recipe)
    assert Path(recipe.data.train).is_absolute() and Path(recipe.output_dir).is_absolute()
    # the resolved form reads back to the same recipe
    assert load_recipe(write(tmp_path, resolved_yaml(recipe), "resolved.yaml")) == recipe


@pytest.mark.parametrize("path", COMMON_VOICE, ids=lambda p: p.stem)
def test_common_voice_recipes_need_the_corpus_path_and_name_it(path):
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    assert "data.prepare.source" in str(caught.value) and str(path) in str(caught.value)
    recipe = load_recipe(path, overrides=["data.prepare.source=/corpora/cv"])
    assert recipe.base == "facebook/wav2vec2-xls-r-300m"
    assert recipe.data.prepare.format == "commonvoice" and recipe.data.prepare.source == "/corpora/cv"
    assert Path(recipe.data.train) == Path(recipe.output_dir) / "manifests" / "train.jsonl"


def test_defaults_and_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(write(_mkdir(tmp_path / "r"), MINIMAL))
    assert recipe.train.lr == 3e-4 and recipe.train.schedule == "tri_stage" and recipe.freezing.feature_encoder
    assert recipe.model.mask_time_prob == 0.05 and recipe.eval.patience is None
    # paths in the file are relative to the file, output_dir to the working directory
    assert recipe.data.train == str(tmp_path / "r" / "data" / "train.jsonl")
    assert recipe.output_dir == str(tmp_path / "runs" / "x")
    # a hub id stays a hub id; an existing folder next to the recipe becomes an absolute path
    assert recipe.base == "facebook/wav2vec2-xls-r-300m"
    (tmp_path / "r" / "seed").mkdir()
    assert load_recipe(write(tmp_path / "r", {**MINIMAL, "base": "seed"})).base == str(tmp_path / "r" / "seed")


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_overrides_are_typed_as_yaml_and_paths_are_relative_to_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write(_mkdir(tmp_path / "r"), MINIMAL)
    recipe = load_recipe(path, overrides=["train.lr=1e-4", "train.max_updates=50", "eval.patience=3",
                                          "train.clip_norm=null", "data.dev=dev.jsonl", "text.locale=tr",
                                          "freezing.head_only_updates=10", "text.replacements={ё: е}"])
    assert recipe.train.lr == 1e-4 and isinstance(recipe.train.lr, float)
    assert recipe.train.max_updates == 50 and recipe.eval.patience == 3 and recipe.train.clip_norm is None
    assert recipe.data.dev == str(tmp_path / "dev.jsonl")  # typed on the command line: relative to the cwd
    assert recipe.text.locale == "tr" and recipe.text.replacements == {"ё": "е"}
    assert recipe.freezing.head_only_updates == 10


def test_augment_section_reads_lists_as_tuples_and_sources_relative_to_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write(_mkdir(tmp_path / "r"), {**MINIMAL, "augment": {
        "speed": {"probability": 1, "factors": [0.9, 1, 1.1]},
        "noise": {"probability": 0.5, "snr_db": [10, 30], "source": "moh"},
        "reverb": {"probability": 0.2, "source": "rirs.txt"}}})
    augment = load_recipe(path).augment
    assert augment.speed.factors == (0.9, 1.0, 1.1) and augment.noise.snr_db == (10.0, 30.0)
    assert augment.noise.source == str(tmp_path / "r" / "moh")
    assert augment.reverb.source == str(tmp_path / "r" / "rirs.txt")
    assert augment.gain.probability == 0 and not load_recipe(write(tmp_path, MINIMAL)).augment.enabled
    override = load_recipe(path, overrides=["augment.noise.source=noise", "augment.speed.factors=[0.95, 1.05]"])
    assert override.augment.noise.source == str(tmp_path / "noise") and override.augment.speed.factors == (0.95, 1.05)
    with pytest.raises(RecipeError, match=r"augment.speed.factors\[0\]: expected float, got str 'x' \(from --set\)"):
        load_recipe(path, overrides=["augment.speed.factors=[x]"])
    with pytest.raises(RecipeError, match=r"augment.noise.snr_db must be .* got \(30.0, 10.0\) \(from --set\)"):
        load_recipe(path, overrides=["augment.noise.snr_db=[30, 10]"])


def test_lm_section_reads_texts_relative_to_the_file_and_defaults_to_lm_tune_grid(tmp_path, monkeypatch):
    from speechxfer.decoding import DEFAULT_LM_WEIGHTS, DEFAULT_WORD_SCORES

    monkeypatch.chdir(tmp_path)
    assert load_recipe(write(tmp_path, MINIMAL)).lm is None  # no section: no LM, greedy only
    path = write(_mkdir(tmp_path / "r"), {**MINIMAL, "lm": {"texts": ["texts/es.txt", "/abs/x.txt"]}})
    lm = load_recipe(path).lm
    assert lm.texts == (str(tmp_path / "r" / "texts" / "es.txt"), "/abs/x.txt") and lm.order == 3
    assert lm.weights == DEFAULT_LM_WEIGHTS and lm.word_scores == DEFAULT_WORD_SCORES and lm.beam_size == 50
    assert load_recipe(write(tmp_path, {**MINIMAL, "lm": {}}, "empty.yaml")).lm.texts == ()  # train transcripts only
    override = load_recipe(path, overrides=["lm.texts=[t.txt]", "lm.weights=[1, 2.5]"]).lm
    assert override.texts == (str(tmp_path / "t.txt"),) and override.weights == (1.0, 2.5)


def test_scientific_notation_in_a_file_is_a_float(tmp_path):
    recipe = load_recipe(write(tmp_path, "base: b\ndata: {train: t.jsonl}\noutput_dir: o\ntrain: {lr: 5e-5}\n"))
    assert recipe.train.lr == 5e-5


@pytest.mark.parametrize("dotted, value, message", [
    ("trian", {}, "unknown key 'trian'"),
    ("train.lrr", 1e-4, "unknown key 'train.lrr'"),
    ("data.prepare.path", "x", "unknown key 'data.prepare.path'"),
    ("train.lr", "fast", "train.lr: expected float, got str 'fast'"),
    ("train.lr", True, "train.lr: expected float, got bool"),
    ("train.max_updates", 1.5, "train.max_updates: expected int"),
    ("train.max_updates", 0, "train.max_updates must be >= 1"),
    ("train.schedule", "cosine", "train.schedule must be one of tri_stage, linear"),
    ("train.mixed_precision", "fp8", "train.mixed_precision must be one of no, bf16, fp16"),
    ("train", [1, 2], "train: expected a mapping"),
    ("text.replacements", ["a"], "text.replacements: expected a mapping"),
    ("text.replacements", {"a": 1}, "text.replacements.a: expected str"),
    ("text.unicode_form", "NFX", "text.unicode_form must be one of"),
    ("text.lowercase", "yes", "text.lowercase: expected bool"),
    ("freezing.layer_lr_decay", 1.5, "freezing.layer_lr_decay must be in (0, 1], got 1.5"),
    ("freezing.bottom_layers", "2", "freezing.bottom_layers: expected int"),
    ("model.layerdrop", 1.0, "model.layerdrop must be in [0, 1)"),
    ("eval.every_updates", None, "eval.every_updates: expected int, got nothing"),
    ("data.prepare", {"format": "zip", "source": "x"}, "data.prepare.format must be one of"),
    ("data.prepare", {"format": "commonvoice"}, "missing required key 'data.prepare.source'"),
    ("train.max_minutes", 0, "train.max_minutes must be > 0, got 0"),
    ("train.short_first_s", -1, "train.short_first_s must be > 0"),
    ("train.short_first_share", 1.5, "train.short_first_share must be between 0 and 1"),
    ("model_config", {"hidden_size": 64}, "'base' and 'model_config' exclude each other"),
    ("augment.nois", {"probability": 0.5}, "unknown key 'augment.nois'"),
    ("augment.speed.factor", [0.9, 1.1], "unknown key 'augment.speed.factor'"),
    ("augment.speed.factors", 1.1, "augment.speed.factors: expected a list of float values, got float 1.1"),
    ("augment.speed.factors", [0.9, "fast"], "augment.speed.factors[1]: expected float, got str 'fast'"),
    ("augment.speed.factors", [0.9, 0], "augment.speed.factors must be a non-empty list of numbers > 0, got (0.9, 0.0)"),
    ("augment.noise.snr_db", [10, 20, 30], "augment.noise.snr_db: expected a list of 2 float values, got list"),
    ("augment.noise.snr_db", [30, 10], "augment.noise.snr_db must be [low, high] with low <= high, got (30.0, 10"),
    ("augment.noise.colors", ["grey"], "augment.noise.colors must be a non-empty list of white, pink, brown"),
    ("augment.telephone.probability", 1.5, "augment.telephone.probability must be between 0 and 1, got 1.5"),
    ("augment.reverb.rt60_s", [0, 0.5], "augment.reverb.rt60_s must be [low, high] with 0 < low <= high"),
    ("lm.text", ["a.txt"], "unknown key 'lm.text'"),
    ("lm.texts", "a.txt", "lm.texts: expected a list of str values, got str"),
    ("lm.texts", [1], "lm.texts[0]: expected str, got int 1"),
    ("lm.order", 1, "lm.order must be >= 2 (KenLM needs bigrams), got 1"),
    ("lm.weights", [], "lm.weights must be a list of at least one finite number, got ()"),
    ("lm.word_scores", [0, float("inf")], "lm.word_scores must be a list of at least one finite number"),
    ("lm.beam_size", 0, "lm.beam_size must be >= 1"),
])
def test_bad_keys_and_values_name_the_dotted_key_and_the_file(tmp_path, dotted, value, message):
    path = write(tmp_path, with_(MINIMAL, dotted, value))
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    assert message in str(caught.value)
    assert str(caught.value).startswith(f"{path}: ")


@pytest.mark.parametrize("missing, message", [
    ("base", "missing required key 'base' .a checkpoint to fine-tune., or 'model_config'"),
    ("output_dir", "missing required key 'output_dir'"),
    ("data", "missing required key 'data.train'"),
])
def test_missing_required_fields(tmp_path, missing, message):
    path = write(tmp_path, {k: v for k, v in MINIMAL.items() if k != missing})
    with pytest.raises(RecipeError, match=message.replace("(", r"\(")):
        load_recipe(path)


def test_inconsistent_values_are_errors(tmp_path):
    with pytest.raises(RecipeError, match="min_duration_s must be below"):
        load_recipe(write(tmp_path, with_(MINIMAL, "train", {"min_duration_s": 5.0, "max_duration_s": 2.0})))
    with pytest.raises(RecipeError, match="warmup_ratio \\+ train.hold_ratio"):
        load_recipe(write(tmp_path, with_(MINIMAL, "train", {"warmup_ratio": 0.6, "hold_ratio": 0.6})))


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", "--set train.lrr: unknown key 'train.lrr'"),
    ("nosuch.key=1", "unknown key 'nosuch'"),
    ("train.lr.x=1", "'train.lr' has no sub-keys"),
    ("train.lr", "expected KEY=VALUE"),
    ("train.lr=[1", "not valid YAML"),
    ("train.lr=abc", "train.lr: expected float, got str 'abc' (from --set)"),
])
def test_bad_overrides_name_the_key(tmp_path, override, message):
    path = write(tmp_path, MINIMAL)
    with pytest.raises(RecipeError) as caught:
        load_recipe(path, overrides=[override])
    assert message in str(caught.value) and str(path) in str(caught.value)


def test_unreadable_files_are_recipe_errors_with_the_line(tmp_path):
    with pytest.raises(RecipeError, match="cannot read recipe"):
        load_recipe(tmp_path / "absent.yaml")
    with pytest.raises(RecipeError) as caught:
        load_recipe(write(tmp_path, "base: b\ntrain: {lr: [1\noutput_dir: o\n"))
    assert caught.value.line is not None and "not valid YAML" in str(caught.value)
    with pytest.raises(RecipeError, match="a recipe is a mapping"):
        load_recipe(write(tmp_path, "- base\n- output_dir\n"))


def test_yaml_nested_thousands_deep_is_a_one_line_error_not_a_recursion_error(tmp_path):
    deep = write(tmp_path, "base: b\noutput_dir: o\ndata: " + "[" * 5000 + "]" * 5000 + "\n", "deep.yaml")
    with pytest.raises(RecipeError, match=r"deep\.yaml:3: YAML nested too deeply to read$"):
        load_recipe(deep)
    indented = write(tmp_path, "".join("  " * k + f"k{k}:\n" for k in range(3000)), "indented.yaml")
    with pytest.raises(RecipeError, match=r"indented\.yaml:\d+: YAML nested too deeply to read$"):
        load_recipe(indented)
    with pytest.raises(RecipeError, match="nested too deeply"):
        load_recipe(write(tmp_path, MINIMAL), overrides=["train.lr=" + "[" * 5000])


def test_relative_paths_do_not_depend_on_where_the_command_runs(tmp_path, monkeypatch):
    path = write(_mkdir(tmp_path / "r"), MINIMAL)
    monkeypatch.chdir(tmp_path)
    first = load_recipe(path)
    monkeypatch.chdir(_mkdir(tmp_path / "elsewhere"))
    assert load_recipe(os.path.relpath(path)).data.train == first.data.train


SCRATCH = {"model_config": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 1,
                            "intermediate_size": 128, "conv_dim": [32, 64], "conv_stride": [5, 4],
                            "conv_kernel": [10, 4], "conv_bias": False,
                            "feat_extract_norm": "group", "do_stable_layer_norm": True, "layer_norm_eps": 1},
           "data": {"train": "t.jsonl"}, "output_dir": "o"}


def test_a_model_config_instead_of_base_round_trips(tmp_path):
    recipe = load_recipe(write(tmp_path, SCRATCH))
    assert recipe.base is None and recipe.model_config["conv_dim"] == [32, 64]
    assert load_recipe(write(tmp_path, resolved_yaml(recipe), "resolved.yaml")) == recipe
    # entries of a mapping field can be set one by one
    recipe = load_recipe(write(tmp_path, SCRATCH),
                         overrides=["model_config.hidden_size=128", "text.replacements.ß=ss"])
    assert recipe.model_config["hidden_size"] == 128 and recipe.model_config["num_hidden_layers"] == 2
    assert recipe.text.replacements == {"ß": "ss"}
    with pytest.raises(RecipeError, match="'model_config.hidden_size' has no sub-keys"):
        load_recipe(write(tmp_path, SCRATCH), overrides=["model_config.hidden_size.x=1"])
    with pytest.raises(RecipeError, match="unknown key 'model_config.hidden_sze'"):
        load_recipe(write(tmp_path, SCRATCH), overrides=["model_config.hidden_sze=1"])


@pytest.mark.parametrize("key, value, message", [
    ("hidden_sze", 64, "unknown key 'model_config.hidden_sze' (not a Wav2Vec2Config option)"),
    ("hidden_size", "64", "model_config.hidden_size: expected int, got str '64'"),
    ("conv_dim", [32.5, 64], "model_config.conv_dim: expected list of int"),
    ("conv_stride", [5, 4, 2], "model_config: "),  # lengths of conv_dim, conv_stride, conv_kernel differ
    ("vocab_size", 10, "model_config.vocab_size is not allowed: it is computed from the vocabulary"),
    ("mask_time_prob", 0.1, "model_config.mask_time_prob: set it in the model section (model.mask_time_prob)"),
])
def test_bad_model_config_names_the_dotted_key_and_the_file(tmp_path, key, value, message):
    path = write(tmp_path, with_(SCRATCH, f"model_config.{key}", value))
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    assert str(caught.value).startswith(f"{path}: ") and message in str(caught.value), str(caught.value)


def test_recipes_that_are_not_utf8_text_or_repeat_a_key_are_one_line_errors(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("base: b\noutput_dir: o\ndata: {train: t.jsonl}\n# réglages\n".encode("latin-1"))
    with pytest.raises(RecipeError, match=r"latin1.yaml:4: not UTF-8 text: byte 0xe9 at offset 48"):
        load_recipe(path)
    path = tmp_path / "binary.yaml"
    path.write_bytes(bytes(range(256)))
    with pytest.raises(RecipeError, match=r"binary.yaml:2: not UTF-8 text: byte 0x80 at offset 128"):
        load_recipe(path)
    path = tmp_path / "nul.yaml"
    path.write_bytes(b"base: b\x00\n")
    with pytest.raises(RecipeError, match=r"nul.yaml:1: not YAML text: character 0x00"):
        load_recipe(path)
    path = write(tmp_path, "base: b\ndata: {train: t.jsonl}\ntrain:\n  lr: 1e-3\n  lr: 1e-4\noutput_dir: o\n")
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    assert str(caught.value) == f"{path}:5: not valid YAML: duplicate key 'lr' (first on line 4)"
    path = write(tmp_path, "base: b\ndata: {train: t.jsonl, train: u.jsonl}\noutput_dir: o\n")
    with pytest.raises(RecipeError, match="recipe.yaml:2: not valid YAML: duplicate key 'train'"):
        load_recipe(path)
    # a merge key may be overridden: that is what it is for
    path = write(tmp_path, "base: b\ndata: {train: t.jsonl}\nd: &d {lr: 1e-3, seed: 1}\ntrain:\n  <<: *d\n  lr: 1e-4\n"
                           "output_dir: o\n")
    with pytest.raises(RecipeError, match="unknown key 'd'"):  # merged fine; only the anchor holder is unknown
        load_recipe(path)


def test_sections_built_in_python_are_held_to_the_same_checks():
    from speechxfer.freezing import FreezeOptions
    from speechxfer.recipe import TrainOptions

    with pytest.raises(ValueError, match="lr must be > 0, got -1"):
        TrainOptions(lr=-1)
    with pytest.raises(ValueError, match="schedule must be one of tri_stage, linear"):
        TrainOptions(schedule="cosine")
    with pytest.raises(ValueError, match=r"layer_lr_decay must be in \(0, 1\]"):
        FreezeOptions(layer_lr_decay=0)


def test_pseudo_labelled_manifests_resolve_against_the_file_and_are_never_dev_or_test(tmp_path, monkeypatch):
    recipe = with_(MINIMAL, "data.pseudo_labelled", [{"manifest": "pl/a.jsonl", "max_share": 0.25},
                                                     {"manifest": "pl/b.jsonl"}])
    recipe["data"]["dev"] = "data/dev.jsonl"
    path = write(tmp_path, recipe)
    monkeypatch.chdir(tmp_path.parent)
    loaded = load_recipe(path)
    assert [(e.manifest, e.max_share) for e in loaded.data.pseudo_labelled] == [
        (str(tmp_path / "pl" / "a.jsonl"), 0.25), (str(tmp_path / "pl" / "b.jsonl"), 0.5)]
    assert load_recipe(write(tmp_path, resolved_yaml(loaded), "resolved.yaml")) == loaded
    assert load_recipe(path, overrides=["data.pseudo_labelled=[{manifest: x.jsonl}]"]).data.pseudo_labelled[0] \
        .manifest == str(tmp_path.parent / "x.jsonl")
    for override, message in (
            ("data.pseudo_labelled=[{manifest: data/dev.jsonl}]", r"data.pseudo_labelled\[0\].manifest is also data.dev"
                                                                  r" .*: dev needs human transcripts"),
            ("data.pseudo_labelled=[{manifest: a}, {manifest: a}]", r"data.pseudo_labelled\[1\].manifest repeats"),
            ("data.pseudo_labelled=[{manifest: a, max_share: 1.5}]", r"max_share must be in \(0, 1\]"),
            ("data.pseudo_labelled=[{manifest: a, weight: 2}]", r"unknown key 'data.pseudo_labelled\[0\].weight'")):
        monkeypatch.chdir(tmp_path)
        with pytest.raises(RecipeError, match=message):
            load_recipe(path, overrides=[override])
