"""Recipes: plain YAML files that map key by key onto frozen dataclasses.

A recipe file holds only what differs from the defaults below. Every key is a typed field: an unknown key, a
value of the wrong type, or a missing required field (``base``, ``data.train`` unless ``data.prepare`` is set,
``output_dir``) is a RecipeError that names the dotted key and the file.

Paths written in a recipe file (``data.*``, ``vocabulary.path``, and ``base`` when it names an existing folder)
are relative to the recipe file. ``output_dir`` and every path given with ``--set`` are relative to the working
directory, because that is where the user typed them.

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
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from speechxfer.errors import RecipeError
from speechxfer.freezing import FreezeOptions
from speechxfer.prepare import FORMATS
from speechxfer.text import TextOptions


@dataclass(frozen=True, kw_only=True)
class PrepareOptions:
    """A corpus to turn into manifests with `speechxfer prepare` before training."""

    format: str  # importer name, as in `speechxfer prepare FORMAT SOURCE OUTDIR`: one of speechxfer.prepare.FORMATS
    source: str  # the corpus folder; required, usually given with --set data.prepare.source=PATH


@dataclass(frozen=True, kw_only=True)
class DataOptions:
    """Where the utterances come from."""

    train: str | None = None  # JSONL manifest; with `prepare` it defaults to OUTPUT_DIR/manifests/train.jsonl
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

    mask_time_prob: float = 0.05  # share of frames that start a time mask (HF XLS-R blog)
    mask_time_length: int = 10  # frames per time mask
    mask_feature_prob: float = 0.0  # share of feature channels that start a channel mask
    mask_feature_length: int = 10  # channels per feature mask
    layerdrop: float = 0.0  # probability of skipping a whole transformer layer per update
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    feat_proj_dropout: float = 0.0
    final_dropout: float = 0.0  # dropout before the CTC head


@dataclass(frozen=True, kw_only=True)
class TrainOptions:
    """Optimisation and batching."""

    lr: float = 3e-4  # peak learning rate of AdamW (top layer, when layer_lr_decay < 1)
    max_updates: int = 20000  # optimizer steps, each over grad_accum_steps batches
    max_batch_s: float = 200.0  # seconds of audio per batch, all processes together (each takes its share)
    grad_accum_steps: int = 1
    clip_norm: float | None = 1.0  # max global gradient norm; None disables clipping
    weight_decay: float = 0.0
    schedule: Literal["tri_stage", "linear"] = "tri_stage"
    warmup_ratio: float = 0.1  # share of max_updates spent warming up
    hold_ratio: float = 0.4  # tri_stage: share held at the peak before the exponential decay
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"  # used only where the device supports it
    seed: int = 0
    min_duration_s: float = 0.5  # shorter training utterances are dropped (and counted)
    max_duration_s: float = 20.0  # longer training utterances are dropped (and counted)
    num_workers: int = 0  # data-loader processes decoding audio
    log_every: int = 10  # updates between progress/metrics lines


@dataclass(frozen=True, kw_only=True)
class EvalOptions:
    """Dev-set evaluation during training."""

    every_updates: int = 500
    patience: int | None = None  # stop after this many evaluations without a better dev WER; None never stops
    max_dev_utterances: int | None = None  # the first N dev utterances; None uses them all


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """Everything a training run needs; `resolved_yaml` writes it back out."""

    base: str  # hub id or folder of the source checkpoint, e.g. facebook/wav2vec2-xls-r-300m
    data: DataOptions = field(default_factory=DataOptions)
    text: TextOptions = field(default_factory=TextOptions)
    vocabulary: VocabularyOptions = field(default_factory=VocabularyOptions)
    model: ModelOptions = field(default_factory=ModelOptions)
    freezing: FreezeOptions = field(default_factory=FreezeOptions)
    train: TrainOptions = field(default_factory=TrainOptions)
    eval: EvalOptions = field(default_factory=EvalOptions)
    output_dir: str  # the trained model folder (and last/, metrics, curves)


# dotted key -> (test, what it must be); checked after types, so each test sees a value of the right type
_CHECKS: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "data.prepare.format": (lambda v: v in FORMATS, f"one of {', '.join(FORMATS)}"),
    "train.lr": (lambda v: v > 0, "> 0"),
    "train.max_updates": (lambda v: v >= 1, ">= 1"),
    "train.max_batch_s": (lambda v: v > 0, "> 0"),
    "train.grad_accum_steps": (lambda v: v >= 1, ">= 1"),
    "train.clip_norm": (lambda v: v is None or v > 0, "> 0 or null"),
    "train.weight_decay": (lambda v: v >= 0, ">= 0"),
    "train.warmup_ratio": (lambda v: 0 <= v <= 1, "between 0 and 1"),
    "train.hold_ratio": (lambda v: 0 <= v <= 1, "between 0 and 1"),
    "train.min_duration_s": (lambda v: v >= 0, ">= 0"),
    "train.max_duration_s": (lambda v: v > 0, "> 0"),
    "train.num_workers": (lambda v: v >= 0, ">= 0"),
    "train.log_every": (lambda v: v >= 1, ">= 1"),
    "eval.every_updates": (lambda v: v >= 1, ">= 1"),
    "eval.patience": (lambda v: v is None or v >= 1, ">= 1 or null"),
    "eval.max_dev_utterances": (lambda v: v is None or v >= 1, ">= 1 or null"),
    "model.mask_time_prob": (lambda v: 0 <= v <= 1, "between 0 and 1"),
    "model.mask_feature_prob": (lambda v: 0 <= v <= 1, "between 0 and 1"),
    "model.layerdrop": (lambda v: 0 <= v < 1, "in [0, 1)"),
}

# keys holding paths: in a recipe file relative to the file, from --set relative to the working directory
_PATH_KEYS = ("data.train", "data.dev", "data.test", "data.prepare.source", "vocabulary.path")


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading `1e-4` as a float (YAML 1.2) instead of the string YAML 1.1 makes of it."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_recipe(path: str | os.PathLike, *, overrides: typing.Sequence[str] = ()) -> Recipe:
    """Read a recipe file, apply `key=value` overrides (values read as YAML), check every key and type.

    Returns a Recipe whose paths are absolute. Raises RecipeError naming the dotted key and the file.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise RecipeError(f"cannot read recipe: {err.strerror}", path=path) from None
    try:
        raw = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise RecipeError(f"not valid YAML: {getattr(err, 'problem', err)}", path=path,
                          line=None if mark is None else mark.line + 1) from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise RecipeError(f"a recipe is a mapping of keys to values, not {type(raw).__name__}", path=path)

    here = path.resolve().parent
    for key in _PATH_KEYS:
        _resolve_path(raw, key, here)
    base = raw.get("base")
    if isinstance(base, str) and (here / base).expanduser().exists():
        raw["base"] = str((here / base).expanduser().resolve())

    from_cli: set[str] = set()
    for item in overrides:
        key, value = _parse_override(item, path)
        _set_dotted(raw, key, value, path)
        from_cli.add(key)
        if key in _PATH_KEYS or key == "output_dir":
            _resolve_path(raw, key, Path.cwd())
        elif key == "base" and isinstance(value, str) and Path(value).expanduser().exists():
            raw["base"] = str(Path(value).expanduser().resolve())
    if isinstance(raw.get("output_dir"), str):
        raw["output_dir"] = str(Path(raw["output_dir"]).expanduser().resolve())

    recipe = _build(Recipe, raw, prefix="", path=path, from_cli=from_cli)
    data = recipe.data
    if data.train is None and data.prepare is None:
        raise RecipeError("missing required key 'data.train' (a manifest), or 'data.prepare' to build one",
                          path=path)
    if data.prepare is not None:
        # Prepared manifests land beside the model so that one output folder holds the whole run.
        manifests = Path(recipe.output_dir) / "manifests"
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
        return key, yaml.load(value, Loader=_Loader) if value.strip() else None
    except yaml.YAMLError:
        raise RecipeError(f"--set {key}: value {value!r} is not valid YAML", path=path) from None


def _set_dotted(raw: dict, key: str, value: Any, path: Path) -> None:
    """Set raw[a][b][c] = value for key "a.b.c", refusing keys that are not recipe fields."""
    cls: Any = Recipe
    node = raw
    parts = key.split(".")
    for depth, part in enumerate(parts):
        names = {f.name: f for f in dataclasses.fields(cls)} if cls is not None else {}
        if part not in names:
            raise RecipeError(f"--set {key}: unknown key '{'.'.join(parts[:depth + 1])}'", path=path)
        if depth == len(parts) - 1:
            node[part] = value
            return
        cls = _dataclass_in(typing.get_type_hints(cls)[part])
        if cls is None:
            raise RecipeError(f"--set {key}: '{'.'.join(parts[:depth + 1])}' has no sub-keys", path=path)
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child


def _dataclass_in(tp: Any) -> type | None:
    """The dataclass a field holds, looking through `X | None`."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        return inner[0] if inner else None
    return None


def _resolve_path(raw: dict, key: str, folder: Path) -> None:
    node = raw
    *parents, last = key.split(".")
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict) and isinstance(node.get(last), str):
        node[last] = str((folder / Path(node[last]).expanduser()).resolve())


def _build(cls: type, raw: Any, *, prefix: str, path: Path, from_cli: set[str]) -> Any:
    """Build dataclass `cls` from a mapping, checking keys, types and _CHECKS; errors name the dotted key."""
    where = prefix.rstrip(".") or "the recipe"
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: expected a mapping of keys, got {_describe(raw)}", path=path)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        raise RecipeError(f"unknown key '{prefix}{unknown[0]}' (known keys{' of ' + where if prefix else ''}: "
                          f"{', '.join(fields)})", path=path)
    hints = typing.get_type_hints(cls)
    values = {}
    for name, f in fields.items():
        key = prefix + name
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise RecipeError(f"missing required key '{key}' (set it in the recipe or with --set {key}=...)",
                                  path=path)
            continue
        value = _convert(hints[name], raw[name], key=key, path=path, from_cli=from_cli)
        check = _CHECKS.get(key)
        if check is not None and not check[0](value):
            raise RecipeError(f"{key} must be {check[1]}, got {value!r}{_origin(key, from_cli)}", path=path)
        values[name] = value
    try:
        return cls(**values)
    except ValueError as err:  # the section's own validation (TextOptions, FreezeOptions)
        raise RecipeError(f"{where}: {err}", path=path) from None


def _convert(tp: Any, value: Any, *, key: str, path: Path, from_cli: set[str]) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, key=key, path=path, from_cli=from_cli)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, prefix=key + ".", path=path, from_cli=from_cli)
    if origin is Literal:
        if value not in args:
            raise RecipeError(f"{key} must be one of {', '.join(map(str, args))}, got {_describe(value)}"
                              f"{_origin(key, from_cli)}", path=path)
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{key}: expected a mapping, got {_describe(value)}{_origin(key, from_cli)}", path=path)
        key_type, value_type = args
        return {_convert(key_type, k, key=f"{key}.{k}", path=path, from_cli=from_cli):
                _convert(value_type, v, key=f"{key}.{k}", path=path, from_cli=from_cli) for k, v in value.items()}
    accepted = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}.get(tp)
    if accepted is None:
        raise TypeError(f"recipe field {key} has a type the recipe reader does not handle: {tp}")
    # bool is an int in Python, but `lr: true` is a mistake, not 1.0
    if not isinstance(value, accepted) or (isinstance(value, bool) and tp is not bool):
        raise RecipeError(f"{key}: expected {tp.__name__}, got {_describe(value)}{_origin(key, from_cli)}",
                          path=path)
    return float(value) if tp is float else value


def _describe(value: Any) -> str:
    return "nothing (null)" if value is None else f"{type(value).__name__} {value!r}"


def _origin(key: str, from_cli: set[str]) -> str:
    return " (from --set)" if any(key == k or key.startswith(k + ".") for k in from_cli) else ""
