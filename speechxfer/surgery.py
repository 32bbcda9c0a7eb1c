"""Model surgery: load a multilingual wav2vec2 checkpoint, give it a CTC head sized from the target vocabulary
(rows transferred from the source head where the source has one), add what a parameter-efficient method trains
(MMS-style attention adapters, or LoRA through peft), and save the result as a plain Hugging Face model folder.

Adapter folders follow MMS (facebook/mms-1b-all): model.safetensors holds the base weights once, with one
language's adapter and head in place (the tokenizer's `target_lang`); `adapter.<lang>.safetensors` holds each
language's adapter and head; vocab.json holds one vocabulary per language. So
`Wav2Vec2ForCTC.from_pretrained(folder, target_lang=LANG)` loads any of them.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import unicodedata
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from anyascii import anyascii
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, PretrainedConfig, Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

from speechxfer.atomic import atomic_write, follow_umask, sync_folder
from speechxfer.audio import SAMPLE_RATE_HZ
from speechxfer.compat import adapter_weights, optional_model_file, quiet_load_report, write_failure
from speechxfer.config import AT_LEAST_ONE, SHARE, Check, check_fields, checked
from speechxfer.errors import InputError, WriteError, first_line
from speechxfer.vocabulary import Vocabulary, language_vocabularies, read_json_object

# Source tokens that play the blank / unknown / word-delimiter role in the conventions of HF, fairseq and MMS
# vocabularies; the blank is taken from the source config's pad_token_id first.
_SOURCE_BLANKS = ("[PAD]", "<pad>")
_SOURCE_UNKS = ("[UNK]", "<unk>")
_SOURCE_DELIMITERS = ("|", " ")

# Weights a checkpoint may lack without being broken: the CTC head (SSL-only sources, replaced anyway) and the
# learned SpecAugment mask vector (created only when masking is switched on, e.g. by config_overrides).
_HEAD = "lm_head."
_MAY_BE_MISSING = (_HEAD, "wav2vec2.masked_spec_embed")

# Files of a Hugging Face model folder: save_model_folder replaces them all (a stale added_tokens.json or weight shard
# would corrupt the new model); anything else already in the destination folder is left alone.
_HF_FOLDER_FILES = frozenset({"config.json", "generation_config.json", "preprocessor_config.json", "vocab.json",
                              "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                              "tokenizer.json"})
_HF_WEIGHT_FILE = re.compile(r"(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?")
# MMS's file of one language's adapter and head (transformers' WAV2VEC2_ADAPTER_SAFE_FILE), and the folder of a LoRA
# run's weights alone, in peft's layout, beside the merged model (not in the model folder's root: transformers would
# take an adapter_config.json there for a peft model and load its base instead).
ADAPTER_FILE = "adapter.{}.safetensors"
LORA_FOLDER = "lora"
# MMS adapters: the bottleneck width of facebook/mms-1b-all (config.adapter_attn_dim).
MMS_ADAPTER_DIM = 16
# Attention and feed-forward projections of every transformer layer (the module names peft matches).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "intermediate_dense", "output_dense")
_ADAPTER_PARAMS = ".adapter_layer."
_LORA_PARAMS = ".lora_"
# The feature encoder's module name, as lora/ saves it when it trains (peft matches modules_to_save by name ending).
_LORA_ENCODER = "wav2vec2.feature_extractor"
# Folders inside a model folder while save_model_folder replaces its files (see there), and the list of the new
# files inside the ready one.
MODEL_STAGING = ".model.staging"
MODEL_READY = ".model.ready"
_READY_LIST = ".files.json"


@dataclass(frozen=True, kw_only=True)
class LoraOptions:
    """The `adapt.lora:` section of a recipe: low-rank updates W + (alpha / rank) * B A of chosen projections."""

    rank: int = checked(8, AT_LEAST_ONE)  # inner dimension of B A
    alpha: int = checked(16, AT_LEAST_ONE)  # the update is scaled by alpha / rank
    dropout: float = checked(0.0, SHARE)  # dropout on the input of A
    # module names (last part) that get a LoRA update; default: attention and feed-forward projections
    target_modules: tuple[str, ...] = checked(LORA_TARGETS, Check(lambda v: len(v) > 0, "a non-empty list"))

    __post_init__ = check_fields


@dataclass(frozen=True, kw_only=True)
class AdaptOptions:
    """The `adapt:` section of a recipe: which weights a fine-tuning run trains and how the model folder is laid out.

    full: every weight the `freezing` section leaves trainable. adapter: only MMS-style attention adapters (each with
    its own layer norm) and the CTC head; the folder gets `adapter.<lang>.safetensors` beside the base weights, and a
    second language trained into the same folder adds its adapter beside the first. lora: only LoRA updates of
    `lora.target_modules` and the CTC head (and the feature encoder with `freezing.feature_encoder: false`); the
    folder holds the merged model, and the LoRA weights (with head and trained encoder) alone in lora/.
    """

    method: Literal["full", "adapter", "lora"] = "full"
    # adapter: the language code of this run's adapter and vocabulary (adapter.<lang>.safetensors, vocab.json key)
    lang: str | None = checked(None, Check(lambda v: re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", v) is not None,
                                           "a language code of letters, digits, '-' and '_' (e.g. swh, pt-BR)"))
    # adapter: the bottleneck width of adapters added to a base without any (a base with adapters keeps its own)
    adapter_dim: int = checked(MMS_ADAPTER_DIM, AT_LEAST_ONE)
    # A base with adapters (MMS): the language whose adapter and head rows the run starts from (its adapter is loaded
    # into the base for every method); None: the one in the base's model.safetensors
    init_lang: str | None = None
    # base: start from `base` (and init_lang) as written. auto: rank `candidates` by zero-shot CER on the first
    # rank_utterances of data.dev (ranking.resolve_init_from, as `speechxfer rank-sources` does) and start from the
    # best: its checkpoint becomes `base` and its adapter language `init_lang` in the run's recipe.yaml
    init_from: Literal["base", "auto"] = "base"
    # auto: model folders or hub ids to rank; none given: `base` alone (the languages of an adapter model)
    candidates: tuple[str, ...] = ()
    rank_utterances: int = checked(50, AT_LEAST_ONE)  # auto: dev utterances each candidate is scored on
    lora: LoraOptions = field(default_factory=LoraOptions)

    __post_init__ = check_fields


@dataclass(frozen=True)
class TransferReport:
    """How each row of the new CTC head was initialised."""

    shared: int  # rows copied from the same token in the source head (blank, "|", shared characters)
    base_letter: int  # from the same letter in another case, or its base letter after NFD decomposition (é→e)
    transliterated: int  # mean of the rows of the anyascii transliteration (ж→zh, ł→l)
    random: int  # Hugging Face's default initialisation (normal, std = initializer_range; zero bias)
    sources: dict[str, str] = field(default_factory=dict)  # target token -> source token(s) used, "z+h" for several
    source_vocab_size: int = 0  # rows of the source head with a known token; 0 when the source had none

    def __str__(self) -> str:
        total = self.shared + self.base_letter + self.transliterated + self.random
        if self.source_vocab_size == 0:
            return f"new CTC head of {total} rows, randomly initialised (the source has no CTC head with a vocabulary)"
        return (f"new CTC head of {total} rows from a source head of {self.source_vocab_size}: {self.shared} shared, "
                f"{self.base_letter} from base letters, {self.transliterated} transliterated, {self.random} random")


def needs_attention_mask(config: Wav2Vec2Config) -> bool:
    """Whether batches for this model carry an attention mask.

    Layer-norm feature extractors (XLS-R, large-lv60) take one; group-norm ones (wav2vec2-base) must get zero padding
    and no mask, as the transformers documentation says, because they were pre-trained without one.
    """
    return config.feat_extract_norm == "layer"


def build_ctc_model(source: str | os.PathLike, vocab: Vocabulary, *,
                    config_overrides: Mapping[str, Any] | None = None, seed: int = 0,
                    adapt: AdaptOptions = AdaptOptions()) -> tuple[Wav2Vec2ForCTC, TransferReport]:
    """Load a wav2vec2 checkpoint (hub id or local folder) and give it a CTC head for `vocab`.

    The source may be self-supervised only (Wav2Vec2Model / Wav2Vec2ForPreTraining) or CTC-fine-tuned with a
    vocab.json; in the latter case the new head's rows are transferred from the old one (see TransferReport).
    Only safetensors weights are read and no remote code runs. `config_overrides` sets config fields such as
    mask_time_prob, layerdrop or dropouts. Rows initialised at random depend only on `seed`.
    `adapt` adds what its method trains: attention adapters (random when the base has none) or LoRA updates (B = 0,
    so the model is still the base). With a base that has adapters, `adapt.init_lang` loads that language's adapter
    (whatever the method), and its head rows are the ones transferred.
    Returns the float32 model in train mode and the transfer report. Raises InputError for a missing folder, a
    non-wav2vec2 checkpoint, missing safetensors weights, an unknown override, adapter language or LoRA target.
    """
    name = model_source(source)
    config = _load_config(name)
    _set_training_options(config, config_overrides)
    new_adapters = adapt.method == "adapter" and config.adapter_attn_dim is None
    if new_adapters:
        config.adapter_attn_dim = adapt.adapter_dim

    # fork_rng keeps the caller's RNG untouched while every random initialisation below follows `seed`.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _load_weights(name, config, new_adapters=new_adapters)
        source_lang = None
        if new_adapters:
            head = {k: v.clone() for k, v in model.lm_head.state_dict().items()}
            model.init_adapter_layers()  # also re-initialises the head, whose rows the transfer below still needs
            model.lm_head.load_state_dict(head)
        elif adapt.init_lang is not None and config.adapter_attn_dim is None:
            raise InputError(f"adapt.init_lang {adapt.init_lang}: this base has no language adapters", path=name)
        elif adapt.init_lang is not None:
            load_adapter(model, adapt.init_lang, directory=name)
            source_lang = adapt.init_lang
        source_vocab = (_source_vocabulary(name, model.config, lang=source_lang)
                        if "Wav2Vec2ForCTC" in (config.architectures or []) else None)
        report = replace_ctc_head(model, vocab, source_vocab=source_vocab)
        if adapt.method == "lora":
            add_lora(model, adapt.lora)
    model.train()
    return model, report


def add_lora(model: Wav2Vec2ForCTC, options: LoraOptions) -> None:
    """Wrap every module named in options.target_modules in a peft LoRA layer, in place (the model stays a
    Wav2Vec2ForCTC); B starts at zero, so the output is unchanged until training. InputError when peft is missing
    or no module matches."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise InputError("adapt.method lora needs the peft library: pip install 'speechxfer[adapt]'") from None
    config = LoraConfig(r=options.rank, lora_alpha=options.alpha, lora_dropout=options.dropout,
                        target_modules=list(options.target_modules), bias="none")
    try:
        inject_adapter_in_model(config, model)
    except ValueError as err:  # "Target modules {...} not found in the base model"
        raise InputError(f"adapt.lora.target_modules: {first_line(err)}") from None


def is_lora_model(model: Wav2Vec2ForCTC) -> bool:
    """Whether add_lora has wrapped some of the model's modules."""
    return any(_LORA_PARAMS in name for name, _ in model.named_parameters())


def merge_lora(model: Wav2Vec2ForCTC) -> Wav2Vec2ForCTC:
    """A plain Wav2Vec2ForCTC (no peft layers) whose wrapped weights are W + (alpha / rank) * B A; `model` is left
    as it is."""
    from peft.tuners.lora import LoraLayer

    state = model.state_dict()
    merged = {k.replace(".base_layer.", "."): v for k, v in state.items() if _LORA_PARAMS not in f".{k}"}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer):
                merged[f"{name}.weight"] = merged[f"{name}.weight"] + module.get_delta_weight("default")
    plain = Wav2Vec2ForCTC(model.config)
    plain.load_state_dict(merged)
    return plain.to(next(model.parameters()).device)


def _save_lora_weights(directory: Path, model: Wav2Vec2ForCTC) -> None:
    """The LoRA weights and the CTC head alone, and the feature encoder when it trains in this run (recipe
    `freezing.feature_encoder: false`), as peft's PeftModel.save_pretrained lays them out (adapter_config.json with
    the head and encoder as modules to save), so that peft's PeftModel.from_pretrained loads them onto the base model
    given a head of the vocabulary's size and gives the run's model."""
    import dataclasses

    from peft import get_peft_model_state_dict

    saved = {"lm_head": model.lm_head}
    # The model says whether its encoder trained: apply_freezing thaws it under lora only where the recipe says so,
    # never freezes it again, and before the thaw (head_only_updates) it is still the base's, which the base gives.
    encoder = model.wav2vec2.feature_extractor
    if any(p.requires_grad for p in encoder.parameters()):
        saved[_LORA_ENCODER] = encoder
    config = dataclasses.replace(model.peft_config["default"], modules_to_save=list(saved),
                                 base_model_name_or_path=model.config._name_or_path, inference_mode=True)
    weights = {**get_peft_model_state_dict(model),
               **{f"{name}.{k}": v for name, module in saved.items() for k, v in module.state_dict().items()}}
    directory.mkdir()
    config.save_pretrained(directory)
    save_file({f"base_model.model.{k}": v.detach().contiguous().cpu() for k, v in weights.items()},
              directory / "adapter_model.safetensors")


def load_lora_weights(model: Wav2Vec2ForCTC, directory: str | os.PathLike) -> None:
    """Set the LoRA weights, the CTC head and (where they are there) the feature encoder's weights of a model that
    add_lora prepared from what _save_lora_weights wrote into `directory`/lora (a run's last/). InputError naming
    the file when it does not fit."""
    from peft import set_peft_model_state_dict

    path = Path(directory, LORA_FOLDER, "adapter_model.safetensors")
    try:
        weights = {k.removeprefix("base_model.model."): v for k, v in load_file(path).items()}
    except (OSError, SafetensorError) as err:
        raise InputError(f"unreadable LoRA weights: {err}", path=path) from None
    modules = {"lm_head": model.lm_head, _LORA_ENCODER: model.wav2vec2.feature_extractor}
    own = {name: {k.removeprefix(f"{name}."): weights.pop(k) for k in [k for k in weights if k.startswith(f"{name}.")]}
           for name in modules}
    try:
        for name, module in modules.items():
            if own[name] or name == "lm_head":  # the encoder is there only when it trained
                module.load_state_dict(own[name])
        result = set_peft_model_state_dict(model, weights)
    except RuntimeError as err:
        # torch's load_state_dict names the module's class on its first line and what does not fit on the next
        reason = (str(err).strip().splitlines()[1:] or [first_line(err)])[0].strip()
        raise InputError(f"the LoRA weights do not fit this recipe's model: {reason}", path=path) from None
    if result.unexpected_keys:
        raise InputError(f"the LoRA weights do not fit this recipe's model: {len(result.unexpected_keys)} unexpected "
                         f"weights, e.g. {result.unexpected_keys[0]}", path=path)


def check_adapter_folder(directory: str | os.PathLike, model: Wav2Vec2ForCTC) -> None:
    """InputError unless a model already in `directory` is one whose adapters `model`'s can join: the same base
    weights (every weight but adapters and head) and adapter width. Nothing to check in a folder without a model."""
    directory = Path(directory)
    if not (directory / "model.safetensors").is_file():
        return
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    if config.get("adapter_attn_dim") != model.config.adapter_attn_dim:
        raise InputError(f"the output folder holds a model with adapter_attn_dim {config.get('adapter_attn_dim')}, "
                         f"not {model.config.adapter_attn_dim}: an adapter joins only a folder of adapters over the "
                         "same base; choose another output_dir", path=directory)
    with quiet_load_report():
        saved = Wav2Vec2ForCTC.from_pretrained(directory, use_safetensors=True).state_dict()
    own = model.state_dict()
    for key, value in own.items():
        if _ADAPTER_PARAMS in f".{key}" or key.startswith(_HEAD) or key == "wav2vec2.masked_spec_embed":
            continue
        if key not in saved or not torch.equal(saved[key], value.to(saved[key].device)):
            raise InputError(f"the output folder holds adapters over another base model (weight {key} differs): "
                             "an adapter joins only a folder of adapters over the same base; choose another "
                             "output_dir", path=directory)


def build_scratch_model(model_config: Mapping[str, Any], vocab: Vocabulary, *,
                        config_overrides: Mapping[str, Any] | None = None, seed: int = 0) -> Wav2Vec2ForCTC:
    """A randomly initialised Wav2Vec2ForCTC ("from scratch") built from Wav2Vec2Config options (see
    wav2vec2_config), with a CTC head of len(vocab) rows and `config_overrides` (masking, dropouts) set.

    The weights depend only on `seed`. Returns the float32 model in train mode; InputError for a bad option.
    """
    config = wav2vec2_config(model_config)
    _set_training_options(config, config_overrides)
    config.vocab_size = len(vocab)
    config.pad_token_id = vocab.blank_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Wav2Vec2ForCTC(config).float()
    model.train()
    return model


def wav2vec2_config(options: Mapping[str, Any], *, prefix: str = "") -> Wav2Vec2Config:
    """A Wav2Vec2Config from a mapping of its own options (those of Wav2Vec2Config.__init__, not the generic ones
    of every transformers config), each of the type of its default. vocab_size and pad_token_id are refused: they
    come from the vocabulary. InputError names the option as `prefix` + its name."""
    known = (set(inspect.signature(Wav2Vec2Config.__init__).parameters)
             - set(inspect.signature(PretrainedConfig.__init__).parameters) - {"self", "kwargs"})
    defaults = Wav2Vec2Config()
    values = {}
    for key, value in options.items():
        if key in ("vocab_size", "pad_token_id"):
            raise InputError(f"{prefix}{key} is not allowed: it is computed from the vocabulary")
        if key not in known:
            raise InputError(f"unknown key '{prefix}{key}' (not a Wav2Vec2Config option)")
        expected = _option_type(getattr(defaults, key))
        if expected is not None and not _has_type(value, expected):
            name = f"list of {expected[1].__name__}" if isinstance(expected, tuple) else expected.__name__
            shown = "nothing (null)" if value is None else f"{type(value).__name__} {value!r}"
            raise InputError(f"{prefix}{key}: expected {name}, got {shown}")
        values[key] = float(value) if expected is float else value  # `layer_norm_eps: 1` in YAML is an int
    try:
        return Wav2Vec2Config(**values)
    # The config's own checks (conv_dim, conv_stride and conv_kernel of one length, ...): ValueError in transformers
    # 4, huggingface_hub's StrictDataclassError (not a ValueError) in transformers 5.
    except Exception as err:
        raise InputError(f"{prefix.rstrip('.') or 'config'}: {' '.join(str(err).split())}") from None


def _option_type(default: Any) -> type | tuple[type, type] | None:
    """What a Wav2Vec2Config option's value must be, from its default: a type, (list, element type), or None
    (anything) when the default is None."""
    if isinstance(default, (list, tuple)):
        return (list, type(default[0]) if default else int)
    return None if default is None else type(default)


def _has_type(value: Any, expected: type | tuple[type, type]) -> bool:
    if isinstance(expected, tuple):
        return isinstance(value, (list, tuple)) and all(_has_type(v, expected[1]) for v in value)
    if isinstance(value, bool) or expected is bool:  # bool is an int in Python, but `hidden_size: true` is a mistake
        return isinstance(value, bool) and expected is bool
    return isinstance(value, (int, float)) if expected is float else isinstance(value, expected)


def _set_training_options(config: Wav2Vec2Config, overrides: Mapping[str, Any] | None) -> None:
    """Set `overrides` (masking, dropouts) on the config, and the CTC loss settings every run trains with."""
    overrides = dict(overrides or {})
    for key in ("vocab_size", "pad_token_id"):
        if key in overrides:
            raise InputError(f"config override {key!r} is not allowed: it is computed from the vocabulary")
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise InputError(f"unknown wav2vec2 config option {key!r} in config overrides")
        setattr(config, key, value)
    config.ctc_zero_infinity = True  # one impossible alignment (label longer than frames) must not poison a batch
    config.ctc_loss_reduction = "mean"


def replace_ctc_head(model: Wav2Vec2ForCTC, vocab: Vocabulary, *,
                     source_vocab: Mapping[str, int] | None = None) -> TransferReport:
    """Replace `model.lm_head` with a (len(vocab), hidden) linear layer and point the config at `vocab`.

    With `source_vocab` (token -> row of the current head), rows are copied from the same token, its base letter
    or its transliteration; other rows get Hugging Face's default init from the global RNG.
    """
    old = model.lm_head
    new = torch.nn.Linear(old.in_features, len(vocab), dtype=old.weight.dtype, device=old.weight.device)
    torch.nn.init.normal_(new.weight, mean=0.0, std=model.config.initializer_range)
    torch.nn.init.zeros_(new.bias)

    counts = {"shared": 0, "base_letter": 0, "transliterated": 0}
    sources: dict[str, str] = {}
    if source_vocab:
        special = _special_tokens(source_vocab, model.config.pad_token_id)
        target_special = {vocab.blank_id: special["blank"], vocab.unk_id: special["unk"],
                          vocab.delimiter_id: special["delimiter"]}
        with torch.no_grad():
            for row, token in enumerate(vocab.tokens):
                if row in target_special:
                    found = None if target_special[row] is None else ("shared", [target_special[row]])
                else:
                    found = find_source_tokens(token, source_vocab)
                if found is None:
                    continue
                how, source_tokens = found
                ids = [source_vocab[t] for t in source_tokens]
                new.weight[row] = old.weight[ids].mean(dim=0)
                new.bias[row] = old.bias[ids].mean()
                counts[how] += 1
                sources[token] = "+".join(source_tokens)

    model.lm_head = new
    model.config.vocab_size = len(vocab)
    model.config.pad_token_id = vocab.blank_id
    return TransferReport(**counts, random=len(vocab) - sum(counts.values()), sources=sources,
                          source_vocab_size=len(source_vocab or {}))


def save_model_folder(directory: str | os.PathLike, model: Wav2Vec2ForCTC, vocab: Vocabulary, *,
                      lang: str | None = None) -> None:
    """Write a plain Hugging Face model folder that `transformers.pipeline("automatic-speech-recognition")` loads:
    config.json, model.safetensors, the vocabulary/tokenizer files and preprocessor_config.json.

    lang: the model has attention adapters for this language; the folder takes MMS's layout, with
    adapter.<lang>.safetensors (its adapter and head) and vocab.json keyed by language, this one beside those of
    the adapters already in the folder (whose files are kept), and this language as the tokenizer's target_lang.
    A model with LoRA layers (add_lora) is saved merged, with the LoRA weights (and head, and the feature encoder
    when it trains) alone in LORA_FOLDER.

    The folder itself never moves, and files of other kinds in it (recipe, metrics, `last/`, ...) are left alone.
    The new model files are written into `MODEL_STAGING` inside it, which is renamed to `MODEL_READY` once complete
    (the commit point); then they are moved into place one by one and model files of the previous save that the new
    one lacks (a stale added_tokens.json or weight shard) are deleted. A crash before the commit point leaves the
    previous model; one after it leaves a save that `finish_model_folder` completes. A failure before it deletes
    the staging folder; a write the file system refused there (compat.write_failure: a full disk, no permission)
    raises errors.WriteError naming `directory`.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    finish_model_folder(directory)
    staging = directory / MODEL_STAGING
    try:
        staging.mkdir()
        if is_lora_model(model):
            merge_lora(model).save_pretrained(staging)
            _save_lora_weights(staging / LORA_FOLDER, model)
        else:
            model.save_pretrained(staging)
        if lang is not None:
            save_file({k: v.detach().contiguous().cpu() for k, v in adapter_weights(model).items()},
                      staging / ADAPTER_FILE.format(lang))
            others = {code: ids for code, ids in language_vocabularies(directory).items() if code != lang}
            vocab.save(staging, lang=lang, other_languages=others)
        else:
            vocab.save(staging)
        Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SAMPLE_RATE_HZ, padding_value=0.0, do_normalize=True,
                                 return_attention_mask=needs_attention_mask(model.config)).save_pretrained(staging)
        names = sorted(entry.name for entry in staging.iterdir())
        with atomic_write(staging / _READY_LIST) as f:
            json.dump(names, f)
        follow_umask(staging)
        sync_folder(staging, files=True)
        os.replace(staging, directory / MODEL_READY)
    except Exception as err:
        # Before the commit point: the folder still holds the previous model; a full disk gets back the room the
        # new files took.
        shutil.rmtree(staging, ignore_errors=True)
        reason = write_failure(err)
        if reason is None:
            raise
        raise WriteError(f"cannot save the model: {reason}; the folder keeps what it held", path=directory,
                         reason=reason) from None
    finish_model_folder(directory)


def finish_model_folder(directory: str | os.PathLike) -> bool:
    """Complete a `save_model_folder` into `directory` that a crash interrupted after its commit point, and delete
    the staging folder of one interrupted before it. Returns whether a save was completed. Safe to call again at
    any point, including after a crash inside this function."""
    directory = Path(directory)
    if (directory / MODEL_STAGING).exists():
        shutil.rmtree(directory / MODEL_STAGING)
    ready = directory / MODEL_READY
    if not ready.is_dir():
        return False
    if (ready / _READY_LIST).is_file():  # gone only once every file is in place
        names = set(json.loads((ready / _READY_LIST).read_text(encoding="utf-8")))
        for name in sorted(names):
            if (ready / name).exists():
                if (directory / name).is_dir():  # LORA_FOLDER: a folder cannot be renamed onto a non-empty one
                    shutil.rmtree(directory / name)
                os.replace(ready / name, directory / name)
        for entry in directory.iterdir():
            if _is_model_file(entry.name) and entry.name not in names:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        sync_folder(directory)
        (ready / _READY_LIST).unlink()
    ready.rmdir()
    sync_folder(directory)
    return True


def _is_model_file(name: str) -> bool:
    """Whether a file name is one of a Hugging Face model folder's (so replaced by every save)."""
    return name in _HF_FOLDER_FILES or name == LORA_FOLDER or _HF_WEIGHT_FILE.fullmatch(name) is not None


def model_source(source: str | os.PathLike) -> str:
    """A local model folder (with `~` expanded) or a hub id, telling a mistyped local path from a hub id.

    A path that exists is local. One that does not exist is taken for a local path, and refused as "no such model
    folder" instead of being looked up on the hub, when it is absolute, starts with `.` or `~`, has more than one
    `/`, or names a folder that exists (`runs/typo` where `runs/` exists); only `name` and `owner/name` forms go to
    the hub. InputError for a missing local folder, and for a file given instead of a folder.
    """
    text = os.fspath(source)
    name = os.path.expanduser(text)
    path = Path(name)
    if path.exists():
        if not path.is_dir():
            raise InputError("a model must be a model folder or a hub id, not a file", path=text)
        return name
    parent = os.path.dirname(name)
    if path.is_absolute() or text.startswith((".", "~")) or text.count("/") > 1 or (parent and os.path.isdir(parent)):
        raise InputError("no such model folder (only `name` and `owner/name` are looked up on the hub)", path=text)
    return name


def load_ctc_model(source: str | os.PathLike) -> Wav2Vec2ForCTC:
    """A fine-tuned Wav2Vec2ForCTC (local folder, as model_source resolves it, or hub id) in float32 eval mode, for
    inference: the same checks as build_ctc_model, and the CTC head must be there too. An adapter model comes with
    the adapter and head in model.safetensors; transcribe.Recognizer.use_adapter switches language."""
    name = model_source(source)
    return _load_weights(name, _load_config(name), head_required=True).eval()


def adapter_languages(directory: str | os.PathLike) -> list[str]:
    """The languages of the adapter files (adapter.<lang>.safetensors) in a model folder, sorted; [] for none."""
    prefix, suffix = ADAPTER_FILE.split("{}")
    return sorted(entry.name[len(prefix): -len(suffix)] for entry in Path(directory).iterdir()
                  if entry.name.startswith(prefix) and entry.name.endswith(suffix)
                  and len(entry.name) > len(prefix) + len(suffix))


def load_adapter(model: Wav2Vec2ForCTC, lang: str, *, directory: str | os.PathLike) -> None:
    """Load the attention adapters and CTC head of `lang` (adapter.<lang>.safetensors of `directory`, the folder or
    hub id the model was loaded from) into the model. InputError naming the file: a folder without it (listing the
    languages it has), or a file that cannot be read or does not fit the model (its keys or shapes)."""
    path = Path(directory, ADAPTER_FILE.format(lang))
    if Path(directory).is_dir() and not path.is_file():
        known = ", ".join(adapter_languages(directory)) or "none"
        raise InputError(f"no adapter for language {lang!r} in this model folder (it has: {known})", path=path)
    try:
        # It reads the folder the model was loaded from (config._name_or_path), never the hub for a folder.
        model.load_adapter(lang, use_safetensors=True, local_files_only=Path(directory).is_dir())
    except (OSError, ValueError, RuntimeError) as err:  # unreadable; not this model's adapter keys or shapes
        raise InputError(f"cannot load the adapter for language {lang!r}: {first_line(err)}", path=path) from None


@contextmanager
def adapter_kept_on_error(model: Wav2Vec2ForCTC) -> Iterator[None]:
    """Put the model's adapter weights, CTC head and target language back as they were when the block raises:
    load_adapter may fail after it has replaced the head or loaded some layers, and a caller after it (reading
    the language's vocabulary)."""
    saved = {name: param.detach().clone() for name, param in adapter_weights(model).items()}
    head, vocab_size, target_lang = model.lm_head, model.config.vocab_size, model.target_lang
    try:
        yield
    except BaseException:
        model.lm_head, model.config.vocab_size, model.target_lang = head, vocab_size, target_lang
        with torch.no_grad():
            for name, param in adapter_weights(model).items():
                param.copy_(saved[name])
        raise


def _load_config(name: str) -> Wav2Vec2Config:
    """The source's config; InputError unless it names a wav2vec2 checkpoint we can reach."""
    if Path(name).is_dir() and not (Path(name) / "config.json").is_file():  # transformers 4.x guesses a type from the name
        raise InputError("no config.json in this checkpoint folder", path=name)
    if Path(name).is_dir():  # read here first: transformers' message names the file inside a sentence, without a line
        read_json_object(Path(name) / "config.json")
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=False)
    except (OSError, ValueError, RecursionError) as err:  # RecursionError: JSON nested a thousand deep
        where = "folder" if Path(name).is_dir() else "hub id (offline, misspelt, or gated?)"
        raise InputError(f"cannot read the checkpoint's config.json from this {where}: {first_line(err)}",
                         path=name) from err
    if not isinstance(config, Wav2Vec2Config):
        raise InputError(f"a {config.model_type!r} checkpoint, not wav2vec2", path=name)
    return config


def _load_weights(name: str, config: Wav2Vec2Config, *, head_required: bool = False,
                  new_adapters: bool = False) -> Wav2Vec2ForCTC:
    """Wav2Vec2ForCTC with the source's weights in float32 (its own head, if any, still in place).

    head_required: the CTC head must be among the weights (inference); else it may be missing (it is replaced).
    new_adapters: config.adapter_attn_dim was set on a base without adapters, whose weights are then missing.
    """
    # The load report lists the head as missing for SSL-only sources, which is expected; real gaps are checked below.
    try:
        with quiet_load_report():
            model, info = Wav2Vec2ForCTC.from_pretrained(name, config=config, use_safetensors=True,
                                                         dtype=torch.float32, output_loading_info=True)
    except (OSError, RuntimeError) as err:
        raise InputError(f"cannot load safetensors weights: {first_line(err)} (pickled pytorch_model.bin files "
                         "are never read: convert one you trust to model.safetensors in a local folder and use that "
                         "folder)", path=name) from err
    except SafetensorError as err:  # a truncated or corrupt model.safetensors
        raise InputError(f"model.safetensors is truncated or not a safetensors file ({err})", path=name) from err
    may_be_missing = tuple(k for k in _MAY_BE_MISSING if k != _HEAD) if head_required else _MAY_BE_MISSING
    missing = sorted(k for k in info["missing_keys"] if not k.startswith(may_be_missing)
                     and not (new_adapters and _ADAPTER_PARAMS in f".{k}"))
    if missing:
        listed = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise InputError(f"the checkpoint lacks {len(missing)} weights of a wav2vec2 CTC model: {listed}", path=name)
    if "wav2vec2.masked_spec_embed" in info["missing_keys"] and model.wav2vec2.masked_spec_embed is not None:
        # Some transformers releases leave a parameter missing from the weights uninitialised (seen as NaN losses
        # on a GPU with SpecAugment on); initialise it the way the Wav2Vec2Model constructor does.
        with torch.no_grad():
            model.wav2vec2.masked_spec_embed.uniform_()
    return model


def _source_vocabulary(name: str, config: Wav2Vec2Config, *, lang: str | None = None) -> dict[str, int] | None:
    """token -> row of the source head, from its vocab.json; None when there is none.

    MMS keeps one vocabulary per language in vocab.json: `lang`'s when given (its adapter is loaded); else the head
    stored in model.safetensors is the English adapter's ("eng"), else the one whose size matches.
    """
    try:
        path = optional_model_file(name, "vocab.json")
    except OSError:
        return None
    if path is None:
        return None
    table = read_json_object(path)
    if table and all(isinstance(v, dict) for v in table.values()):
        fitting = [code for code, t in table.items() if len(t) == config.vocab_size]
        table = (table.get(lang, {}) if lang is not None else
                 table["eng"] if "eng" in fitting else (table[fitting[0]] if fitting else {}))
    return {t: i for t, i in table.items() if isinstance(i, int) and 0 <= i < config.vocab_size} or None


def _special_tokens(source_vocab: Mapping[str, int], pad_token_id: int | None) -> dict[str, str | None]:
    """The source tokens that act as blank, unknown and word delimiter, whatever their spelling."""
    by_id = {i: t for t, i in source_vocab.items()}
    blank = by_id.get(pad_token_id) if pad_token_id is not None else None
    return {
        "blank": blank or next((t for t in _SOURCE_BLANKS if t in source_vocab), None),
        "unk": next((t for t in _SOURCE_UNKS if t in source_vocab), None),
        "delimiter": next((t for t in _SOURCE_DELIMITERS if t in source_vocab), None),
    }


def find_source_tokens(token: str, source_vocab: Mapping[str, int]) -> tuple[str, list[str]] | None:
    """How a target token maps onto source tokens: ("shared" | "base_letter" | "transliterated", tokens) or None.

    The one mapping between a target and a source vocabulary: replace_ctc_head copies rows along it, and
    ranking reads a source's output back into target characters along it.
    """
    if token in source_vocab:
        return "shared", [token]
    base = "".join(c for c in unicodedata.normalize("NFD", token) if not unicodedata.combining(c))
    for candidate in dict.fromkeys((base, token.lower(), token.upper(), base.lower(), base.upper())):
        if candidate and candidate != token and candidate in source_vocab:
            return "base_letter", [candidate]
    letters = [_in_either_case(c, source_vocab) for c in anyascii(token) if not c.isspace()]
    found = [c for c in letters if c is not None]
    return ("transliterated", found) if found else None


def _in_either_case(char: str, source_vocab: Mapping[str, int]) -> str | None:
    for candidate in (char, char.lower(), char.upper()):
        if candidate in source_vocab:
            return candidate
    return None
