"""Recipes: plain YAML files that map key by key onto frozen dataclasses.

A recipe file holds only what differs from the defaults below. Every key is a typed field, with its check beside
it (speechxfer.config reads the file and converts it): an unknown key, a value of the wrong type or out of range, a
duplicate key, or a missing required field (``base`` or ``model_config``, ``data.train`` unless ``data.prepare`` is
set, ``output_dir``) is a RecipeError that names the dotted key and the file.

A run starts from a checkpoint (``base``, fine-tuning; with ``adapt.init_from: auto`` the best of
``adapt.candidates`` by zero-shot CER on dev, picked when training starts) or from a Wav2Vec2 config with random
weights (``model_config``, training from scratch); the ``model`` section sets masking and dropouts on either.

Paths written in a recipe file (``data.*``, ``vocabulary.path``, ``augment.noise.source``,
``augment.reverb.source``, ``data.pseudo_labelled[i].manifest``, ``lm.texts``, and ``base`` and each of
``adapt.candidates`` when it names an existing folder) are relative to the recipe file.
``output_dir`` and every path given with ``--set`` are relative to the working directory, because that is where the
user typed them.

Defaults follow published practice for fine-tuning XLS-R with CTC:
- Hugging Face blog "Fine-tuning XLS-R for Multi-Lingual ASR with Transformers" (von Platen, 2021):
  lr 3e-4, 500 warm-up updates, mask_time_prob 0.05, layerdrop 0.0, all dropouts 0.0, CTC mean reduction.
- fairseq ``examples/wav2vec/config/finetuning/base_10h.yaml``: tri-stage schedule with phase ratios
  (0.1, 0.4, 0.5), max_update 20000, max_tokens 3.2 M samples (200 s of 16 kHz audio) per GPU.
- Babu et al. 2021, "XLS-R: Self-supervised Cross-lingual Speech Representation Learning at Scale", sec. 4:
  fine-tuning with the feature encoder frozen and a tri-stage schedule.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from speechxfer.augment import AugmentOptions
from speechxfer.config import (AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, SHARE, Check, check_fields, checked,
                               from_mapping, parse_yaml, read_yaml, set_dotted)
from speechxfer.decoding import DEFAULT_LM_WEIGHTS, DEFAULT_WORD_SCORES, BeamSearchOptions
from speechxfer.errors import InputError, RecipeError
from speechxfer.freezing import FreezeOptions
from speechxfer.prepare import FORMATS
from speechxfer.surgery import AdaptOptions, wav2vec2_config
from speechxfer.text import TextOptions


@dataclass(frozen=True, kw_only=True)
class PrepareOptions:
    """A corpus to turn into manifests with `speechxfer prepare` before training."""

    # importer name, as in `speechxfer prepare FORMAT SOURCE OUTDIR`: one of speechxfer.prepare.FORMATS
    format: str = checked(check=Check(lambda v: v in FORMATS, f"one of {', '.join(FORMATS)}"))
    source: str  # the corpus folder; required, usually given with --set data.prepare.source=PATH

    __post_init__ = check_fields


@dataclass(frozen=True, kw_only=True)
class PseudoLabelledOptions:
    """A manifest of pseudo-labelled training utterances (`speechxfer pseudo-label`) and its cap in each batch."""

    manifest: str  # JSONL manifest; its rows train whether or not they carry `pseudo_label: true`
    # The most its utterances may hold of each epoch's seconds of audio (batching.DurationBatchSampler): at 0.5,
    # at least half of every epoch is audio with other transcripts. When the manifest holds more, each epoch
    # trains on a random subset of it that fits, drawn anew each epoch (its size is reported when training starts).
    max_share: float = checked(0.5, Check(lambda v: 0 < v <= 1, "in (0, 1]"))

    __post_init__ = check_fields


@dataclass(frozen=True, kw_only=True)
class DataOptions:
    """Where the utterances come from."""

    train: str | None = None  # JSONL manifest; with `prepare` it defaults to OUTPUT_DIR/manifests/train.jsonl
    # Training utterances transcribed by a model, each manifest with its cap; never dev or test audio
    pseudo_labelled: tuple[PseudoLabelledOptions, ...] = ()
    dev: str | None = None  # evaluated every eval.every_updates; picks the best checkpoint
    test: str | None = None  # scored once with the best checkpoint at the end
    prepare: PrepareOptions | None = None  # run when the train manifest does not exist yet


@dataclass(frozen=True, kw_only=True)
class VocabularyOptions:
    """Where the CTC vocabulary comes from."""

    path: str | None = None  # folder with a vocab.json to reuse; None builds it from the normalized train texts


@dataclass(frozen=True, kw_only=True)
class ModelOptions:
    """Config values set on the model before training (SpecAugment masking, layerdrop, dropouts)."""

    mask_time_prob: float = checked(0.05, SHARE)  # share of frames that start a time mask (HF XLS-R blog)
    mask_time_length: int = 10  # frames per time mask
    mask_feature_prob: float = checked(0.0, SHARE)  # share of feature channels that start a channel mask
    mask_feature_length: int = 10  # channels per feature mask
    # probability of skipping a whole transformer layer per update
    layerdrop: float = checked(0.0, Check(lambda v: 0 <= v < 1, "in [0, 1)"))
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    feat_proj_dropout: float = 0.0
    final_dropout: float = 0.0  # dropout before the CTC head

    __post_init__ = check_fields


@dataclass(frozen=True, kw_only=True)
class TrainOptions:
    """Optimisation and batching."""

    lr: float = checked(3e-4, POSITIVE)  # peak learning rate of AdamW (top layer, when layer_lr_decay < 1)
    max_updates: int = checked(20000, AT_LEAST_ONE)  # optimizer steps, each over grad_accum_steps batches
    # Time budget in minutes of training (the loop, evaluations included; setup not), counted over resumed runs.
    # The run stops at whichever of max_minutes and max_updates comes first, and the schedule (warm-up, hold,
    # decay, short_first_share) is laid over that share of the run. None: max_updates alone.
    max_minutes: float | None = checked(None, POSITIVE)
    # seconds of audio per batch, all processes together (each takes its share)
    max_batch_s: float = checked(200.0, POSITIVE)
    grad_accum_steps: int = checked(1, AT_LEAST_ONE)
    # Keep only each transformer layer's input and recompute the rest in the backward pass (transformers' gradient
    # checkpointing): far less memory for long batches, for about one more forward pass of compute per update.
    # The loss and gradients stay the same.
    gradient_checkpointing: bool = False
    clip_norm: float | None = checked(1.0, POSITIVE)  # max global gradient norm; None disables clipping
    weight_decay: float = checked(0.0, NON_NEGATIVE)
    schedule: Literal["tri_stage", "linear"] = "tri_stage"
    warmup_ratio: float = checked(0.1, SHARE)  # share of the run spent warming up
    hold_ratio: float = checked(0.4, SHARE)  # tri_stage: share held at the peak before the exponential decay
    # Short utterances first: for the first short_first_share of the run, only training utterances up to
    # short_first_s seconds (short inputs align easily, so a model from scratch leaves the all-blank output
    # sooner). None: no such stage.
    short_first_s: float | None = checked(None, POSITIVE)
    short_first_share: float = checked(0.15, SHARE)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"  # used only where the device supports it
    seed: int = 0
    min_duration_s: float = checked(0.5, NON_NEGATIVE)  # shorter training utterances are dropped (and counted)
    max_duration_s: float = checked(20.0, POSITIVE)  # longer training utterances are dropped (and counted)
    num_workers: int = checked(0, NON_NEGATIVE)  # data-loader processes decoding audio
    # Memory (MiB, host) for the frozen conv feature encoder's output of each training utterance, computed once and
    # reused in later epochs. Only without augmentation and while the encoder is frozen (see training._EncoderFeed).
    # The losses are those of the uncached run; 0: off.
    feature_cache_mib: float = checked(2048.0, NON_NEGATIVE)
    log_every: int = checked(10, AT_LEAST_ONE)  # updates between progress/metrics lines

    __post_init__ = check_fields


@dataclass(frozen=True, kw_only=True)
class EvalOptions:
    """Dev-set evaluation during training."""

    every_updates: int = checked(500, AT_LEAST_ONE)
    # stop after this many evaluations without a better dev WER; None never stops
    patience: int | None = checked(None, AT_LEAST_ONE)
    max_dev_utterances: int | None = checked(None, AT_LEAST_ONE)  # the first N dev utterances; None uses them all

    __post_init__ = check_fields


# A tuning grid: checked in the recipe, because a bad value found after training would cost the run's LM stage.
_GRID = Check(lambda v: len(v) > 0 and all(math.isfinite(x) for x in v), "a list of at least one finite number")


@dataclass(frozen=True, kw_only=True)
class LMOptions:
    """An n-gram language model built after training (speechxfer.lm.lm_stage): KenLM on the texts below plus the
    train transcripts, its weight and word score tuned on dev, the test set scored with it, and kept in
    OUTPUT_DIR/lm/ so that `transcribe` and `evaluate` of the output folder use it by default."""

    # UTF-8 text files, one sentence a line, normalized as the `text` section says. The train transcripts are always
    # added; a line equal to a dev or test transcript (after normalization) is dropped, so the LM never saw them.
    texts: tuple[str, ...] = ()
    order: int = checked(3, Check(lambda v: v >= 2, ">= 2 (KenLM needs bigrams)"))  # n-gram order
    weights: tuple[float, ...] = checked(DEFAULT_LM_WEIGHTS, _GRID)  # LM weights tried on dev
    word_scores: tuple[float, ...] = checked(DEFAULT_WORD_SCORES, _GRID)  # word scores tried with each weight
    beam_size: int = checked(BeamSearchOptions.beam_size, AT_LEAST_ONE)  # hypotheses kept per frame

    __post_init__ = check_fields


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """Everything a training run needs; `resolved_yaml` writes it back out."""

    base: str | None = None  # hub id or folder of the source checkpoint, e.g. facebook/wav2vec2-xls-r-300m
    # Instead of base: train from scratch, from a Wav2Vec2Config given as a mapping of its options (hidden_size,
    # num_hidden_layers, conv_dim, do_stable_layer_norm, ...). vocab_size and pad_token_id come from the
    # vocabulary; masking and dropouts from the `model` section.
    model_config: dict[str, Any] | None = None
    data: DataOptions = field(default_factory=DataOptions)
    text: TextOptions = field(default_factory=TextOptions)
    vocabulary: VocabularyOptions = field(default_factory=VocabularyOptions)
    model: ModelOptions = field(default_factory=ModelOptions)
    freezing: FreezeOptions = field(default_factory=FreezeOptions)
    train: TrainOptions = field(default_factory=TrainOptions)
    eval: EvalOptions = field(default_factory=EvalOptions)
    # waveform augmentation of training utterances, drawn anew each epoch; every effect is off unless set here
    augment: AugmentOptions = field(default_factory=AugmentOptions)
    # what trains (every weight, attention adapters, or LoRA) and how the model folder is laid out
    adapt: AdaptOptions = field(default_factory=AdaptOptions)
    lm: LMOptions | None = None  # an n-gram LM built after training; None: greedy decoding only
    output_dir: str  # the trained model folder (and last/, metrics, curves)

    @property
    def run_dir(self) -> str:
        """Where this run's own files go (last/, recipe.yaml, metrics, curves, reports): output_dir, or with
        adapt.method adapter output_dir/<lang>, so that each language trained into one folder keeps its own."""
        if self.adapt.method == "adapter":
            return str(Path(self.output_dir) / self.adapt.lang)
        return self.output_dir


# keys holding paths: in a recipe file relative to the file, from --set relative to the working directory
_PATH_KEYS = ("data.train", "data.dev", "data.test", "data.prepare.source", "vocabulary.path", "augment.noise.source",
              "augment.reverb.source", "lm.texts")
# keys naming checkpoints: resolved like paths when they name an existing folder, else hub ids
_CHECKPOINT_KEYS = ("base", "adapt.candidates")


def load_recipe(path: str | os.PathLike, *, overrides: typing.Sequence[str] = ()) -> Recipe:
    """Read a recipe file, apply `key=value` overrides (values read as YAML), check every key and type.

    Returns a Recipe whose paths are absolute. Raises RecipeError naming the dotted key and the file.
    """
    path = Path(path)
    raw = read_yaml(path)
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise RecipeError(f"a recipe is a mapping of keys to values, not {type(raw).__name__}", path=path)

    here = path.resolve().parent
    for key in _PATH_KEYS:
        _resolve_path(raw, key, here)
    _resolve_pseudo_labelled(raw, here)
    _resolve_checkpoints(raw, here)

    from_cli: set[str] = set()
    for item in overrides:
        key, value = _parse_override(item, path)
        set_dotted(Recipe, raw, key, value, path=path)
        from_cli.add(key)
        if key in _PATH_KEYS or key == "output_dir":
            _resolve_path(raw, key, Path.cwd())
        elif key == "data.pseudo_labelled":
            _resolve_pseudo_labelled(raw, Path.cwd())
        elif key in _CHECKPOINT_KEYS:
            _resolve_checkpoints(raw, Path.cwd(), keys=(key,))
    if isinstance(raw.get("output_dir"), str):
        raw["output_dir"] = str(Path(raw["output_dir"]).expanduser().resolve())

    recipe = from_mapping(Recipe, raw, path=path, cli_keys=from_cli)
    auto = recipe.adapt.init_from == "auto"
    if auto and recipe.model_config is not None:
        raise RecipeError("adapt.init_from auto picks a checkpoint to fine-tune; model_config trains from scratch",
                          path=path)
    if (recipe.base is None) == (recipe.model_config is None) and not (auto and recipe.base is None):
        raise RecipeError("missing required key 'base' (a checkpoint to fine-tune), or 'model_config' to train from "
                          "scratch" if recipe.base is None else
                          "'base' and 'model_config' exclude each other: fine-tune base, or train model_config from "
                          "scratch", path=path)
    if recipe.model_config is not None:
        _check_model_config(recipe.model_config, path=path)
    _check_adapt(recipe.adapt, from_scratch=recipe.model_config is not None,
                 feature_encoder_frozen=recipe.freezing.feature_encoder, path=path)
    _check_init_from(recipe, path=path)
    data = recipe.data
    if data.train is None and data.prepare is None:
        raise RecipeError("missing required key 'data.train' (a manifest), or 'data.prepare' to build one",
                          path=path)
    manifests = [entry.manifest for entry in data.pseudo_labelled]
    for i, manifest in enumerate(manifests):
        for split in ("train", "dev", "test"):
            if getattr(data, split) == manifest:
                raise RecipeError(f"data.pseudo_labelled[{i}].manifest is also data.{split} ({manifest})"
                                  + ("" if split == "train" else f": {split} needs human transcripts"), path=path)
        if manifests.index(manifest) != i:
            raise RecipeError(f"data.pseudo_labelled[{i}].manifest repeats data.pseudo_labelled"
                              f"[{manifests.index(manifest)}] ({manifest})", path=path)
    if data.prepare is not None:
        # Prepared manifests land beside the model so that one output folder holds the whole run.
        manifests = Path(recipe.run_dir) / "manifests"
        data = dataclasses.replace(data, **{
            split: str(manifests / f"{split}.jsonl")
            for split in ("train", "dev", "test") if getattr(data, split) is None})
        recipe = dataclasses.replace(recipe, data=data)
    if recipe.train.min_duration_s >= recipe.train.max_duration_s:
        raise RecipeError("train.min_duration_s must be below train.max_duration_s", path=path)
    if recipe.train.warmup_ratio + recipe.train.hold_ratio > 1:
        raise RecipeError("train.warmup_ratio + train.hold_ratio must be at most 1", path=path)
    return recipe


def resolved_yaml(recipe: Recipe) -> str:
    """The recipe with every default filled in, as YAML that load_recipe reads back to the same Recipe."""
    return yaml.safe_dump(dataclasses.asdict(recipe), sort_keys=False, allow_unicode=True)


def _parse_override(item: str, path: Path) -> tuple[str, Any]:
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise RecipeError(f"--set {item!r}: expected KEY=VALUE, e.g. train.lr=1e-4", path=path)
    try:
        return key, parse_yaml(value, path=path) if value.strip() else None
    except RecipeError as err:  # "not valid YAML: ..." with the reason
        raise RecipeError(f"--set {key}: value {value!r} is {err.message}", path=path) from None


def _check_model_config(options: dict[str, Any], *, path: Path) -> None:
    """RecipeError unless model_config holds only Wav2Vec2Config options that the recipe does not set elsewhere."""
    model_keys = {f.name for f in dataclasses.fields(ModelOptions)}
    for key in options:
        if key in model_keys:
            raise RecipeError(f"model_config.{key}: set it in the model section (model.{key}), which applies to "
                              "every run", path=path)
    try:
        wav2vec2_config(options, prefix="model_config.")
    except InputError as err:
        raise RecipeError(err.message, path=path) from None


def _resolve_pseudo_labelled(raw: dict, folder: Path) -> None:
    """Resolve data.pseudo_labelled[i].manifest against `folder` (a list of mappings, so not a _PATH_KEYS key)."""
    data = raw.get("data")
    entries = data.get("pseudo_labelled") if isinstance(data, dict) else None
    for entry in entries if isinstance(entries, list) else ():
        if isinstance(entry, dict) and isinstance(entry.get("manifest"), str):
            entry["manifest"] = str((folder / Path(entry["manifest"]).expanduser()).resolve())


def _check_adapt(adapt: AdaptOptions, *, from_scratch: bool, feature_encoder_frozen: bool, path: Path) -> None:
    """RecipeError for adapt options that cannot go together, or with freezing.feature_encoder."""
    if adapt.method != "full" and from_scratch:
        raise RecipeError(f"adapt.method {adapt.method} adapts a pre-trained base; from model_config (scratch) every "
                          "weight trains (adapt.method full)", path=path)
    if adapt.method == "adapter" and adapt.lang is None:
        raise RecipeError("adapt.method adapter needs adapt.lang, the language code its adapter and vocabulary are "
                          "saved under (adapter.<lang>.safetensors)", path=path)
    if adapt.method != "adapter" and adapt.lang is not None:
        raise RecipeError("adapt.lang is used only with adapt.method adapter", path=path)
    if adapt.method == "adapter" and not feature_encoder_frozen:
        raise RecipeError("freezing.feature_encoder: false cannot train with adapt.method adapter (the base weights "
                          "are shared by every language's adapter); set freezing.feature_encoder: true or use "
                          "adapt.method lora", path=path)
    if adapt.init_lang is not None and from_scratch:
        raise RecipeError("adapt.init_lang picks a language of the base's adapters; model_config has none",
                          path=path)


def _check_init_from(recipe: Recipe, *, path: Path) -> None:
    """RecipeError for adapt.init_from auto without what it ranks or ranks on, and for candidates it would not
    rank. A run's resolved recipe.yaml names the pick as base, which is therefore one of the candidates."""
    adapt = recipe.adapt
    if adapt.init_from != "auto":
        if adapt.candidates:
            raise RecipeError("adapt.candidates is used only with adapt.init_from auto", path=path)
        return
    if not adapt.candidates and recipe.base is None:
        raise RecipeError("adapt.init_from auto needs adapt.candidates, the checkpoints to rank (or base alone, to "
                          "rank the languages of an adapter model)", path=path)
    if adapt.candidates and recipe.base is not None and recipe.base not in adapt.candidates:
        raise RecipeError(f"base {recipe.base} is not one of adapt.candidates: with adapt.init_from auto the ranking "
                          "picks base among them; leave base out, or list it there", path=path)
    if recipe.data.dev is None and recipe.data.prepare is None:
        raise RecipeError("adapt.init_from auto ranks the candidates on data.dev: set data.dev (a manifest of the "
                          "target language)", path=path)


def _resolve_checkpoints(raw: dict, folder: Path, keys: typing.Sequence[str] = _CHECKPOINT_KEYS) -> None:
    """base, and each entry of adapt.candidates, made absolute against `folder` when it names an existing path;
    anything else is a hub id (or a typo that surgery.model_source names) and stays as written."""
    def resolved(value: object) -> object:
        if isinstance(value, str) and (folder / Path(value).expanduser()).exists():
            return str((folder / Path(value).expanduser()).resolve())
        return value

    if "base" in keys and "base" in raw:
        raw["base"] = resolved(raw["base"])
    adapt = raw.get("adapt")
    if "adapt.candidates" in keys and isinstance(adapt, dict) and isinstance(adapt.get("candidates"), list):
        adapt["candidates"] = [resolved(c) for c in adapt["candidates"]]


def _resolve_path(raw: dict, key: str, folder: Path) -> None:
    node = raw
    *parents, last = key.split(".")
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, dict):
        return
    value = node.get(last)
    if isinstance(value, str):
        node[last] = str((folder / Path(value).expanduser()).resolve())
    elif isinstance(value, list):  # lm.texts; entries that are not strings are left for from_mapping to refuse
        node[last] = [str((folder / Path(v).expanduser()).resolve()) if isinstance(v, str) else v for v in value]
