"""Staged freezing of a wav2vec2 CTC model, layer-wise learning rates, and the trainable-parameter table."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import Wav2Vec2ForCTC

from speechxfer.compat import mark_feature_encoder_trainable
from speechxfer.config import NON_NEGATIVE, Check, check_fields, checked
from speechxfer.errors import InputError


@dataclass(frozen=True)
class FreezeOptions:
    """The `freezing:` section of a recipe."""

    feature_encoder: bool = True  # conv feature encoder frozen for the whole run (standard for fine-tuning)
    # bottom N transformer layers (+ feature projection) frozen for the whole run
    bottom_layers: int = checked(0, NON_NEGATIVE)
    # fairseq's freeze_finetune_updates: only lm_head trains for the first K updates
    head_only_updates: int = checked(0, NON_NEGATIVE)
    # lr of layer i = lr * decay**(num_layers - i); the head keeps lr; 1.0 = off
    layer_lr_decay: float = checked(1.0, Check(lambda v: 0.0 < v <= 1.0, "in (0, 1]"))

    __post_init__ = check_fields


# What adapt.method "adapter" and "lora" add to the model, and train: transformers' attention adapter layers,
# peft's LoRA matrices (by their module names).
_ADDED = {"adapter": re.compile(r"(^|\.)adapter_layer\."), "lora": re.compile(r"(^|\.)lora_[AB]\.")}


@dataclass(frozen=True)
class _Part:
    """A component of the model: its table label, its depth for lr decay (-1 below the transformer layers,
    i for layer i, num_layers for the head and the encoder's final norm) and its named parameters."""

    label: str
    depth: int
    params: list[tuple[str, torch.nn.Parameter]]


def apply_freezing(model: Wav2Vec2ForCTC, options: FreezeOptions, *, update: int,
                   method: Literal["full", "adapter", "lora"] = "full") -> bool:
    """Set requires_grad for the state the run is in at optimizer update `update` (0-based); idempotent.

    method (the recipe's adapt.method): "full" trains what `options` leave trainable; "adapter" only the attention
    adapters (their own layer norms included) and the head, whatever `options` say of the rest; "lora" the LoRA
    matrices and the head, and the feature encoder too where `options.feature_encoder` is False (the projection,
    layers and norms train only through LoRA). head_only_updates still holds all but the head back at first.
    Returns True when some parameter changed state (e.g. at `update == head_only_updates`, when the encoder thaws).
    Frozen parameters get no gradient, so AdamW leaves them bit-identical (no weight decay either).
    """
    layers = model.wav2vec2.encoder.layers
    if options.bottom_layers > len(layers):
        raise InputError(f"freezing.bottom_layers is {options.bottom_layers} but the model has {len(layers)} layers")
    head_only = update < options.head_only_updates
    changed = False
    for part in _parts(model):
        if part.label == "head":
            frozen = False
        elif head_only:
            frozen = True
        elif part.label == "feature encoder" and method == "lora" and not options.feature_encoder:
            # A LoRA run saves a model of its own, so its encoder may train (an adapter folder's base weights are
            # shared by every language's adapter: the recipe refuses a thawed encoder there).
            frozen = False
        elif method != "full":
            frozen = None  # parameter by parameter, below
        elif part.label == "feature encoder":
            frozen = options.feature_encoder
        else:
            frozen = options.bottom_layers > 0 and part.depth < options.bottom_layers
        for name, param in part.params:
            param_frozen = frozen if frozen is not None else _ADDED[method].search(name) is None
            if param.requires_grad == param_frozen:
                param.requires_grad = not param_frozen
                changed = True
    # freeze_feature_encoder() also clears the conv stack's _requires_grad flag (which makes its input require a
    # gradient under gradient checkpointing); transformers has no unfreeze, so thawing sets the flag back by hand.
    encoder = model.wav2vec2.feature_extractor
    if any(p.requires_grad for p in encoder.parameters()):
        mark_feature_encoder_trainable(encoder)
    else:
        model.freeze_feature_encoder()
    return changed


def parameter_groups(model: Wav2Vec2ForCTC, *, lr: float, weight_decay: float,
                     layer_lr_decay: float) -> list[dict]:
    """AdamW parameter groups over every parameter, frozen ones included, so thawing needs no new optimizer.

    Layer i of L gets lr * layer_lr_decay**(L - i), everything below the layers (feature encoder, projection,
    positional convolution) lr * layer_lr_decay**(L + 1), the head and the encoder's final norm lr. Biases, norm
    weights and other vectors get no weight decay. Each group carries a "name" for logging.
    """
    num_layers = len(model.wav2vec2.encoder.layers)
    groups: dict[tuple[int, bool], dict] = {}
    for part in _parts(model):
        for name, param in part.params:
            # Weight-norm gains (the positional conv's original0 / weight_g) are norms too.
            decays = param.ndim >= 2 and not name.endswith(("original0", "weight_g"))
            key = (part.depth, decays)
            if key not in groups:
                where = ("below layers" if part.depth < 0 else "top" if part.depth == num_layers
                         else f"layer {part.depth}")
                groups[key] = {"name": where if decays else f"{where} (no decay)", "params": [],
                               "lr": lr * layer_lr_decay ** (num_layers - part.depth),
                               "weight_decay": weight_decay if decays else 0.0}
            groups[key]["params"].append(param)
    return [groups[key] for key in sorted(groups)]


def parameter_table(model: Wav2Vec2ForCTC) -> str:
    """A text table of trainable and frozen parameters per component, consecutive layers in the same state
    merged into one row, with totals (the total equals model.num_parameters())."""
    rows: list[tuple[str, int, int]] = []
    for part in _parts(model):
        trainable = sum(p.numel() for _, p in part.params if p.requires_grad)
        frozen = sum(p.numel() for _, p in part.params if not p.requires_grad)
        last = rows[-1] if rows else None
        if (last and last[0].startswith("layer") and part.label.startswith("layer")
                and (last[1] == 0) == (trainable == 0) and (last[2] == 0) == (frozen == 0)):
            first = last[0].split()[-1].split("-")[0]
            rows[-1] = (f"layers {first}-{part.depth}", last[1] + trainable, last[2] + frozen)
        else:
            rows.append((part.label, trainable, frozen))
    total_trainable = sum(r[1] for r in rows)
    total_frozen = sum(r[2] for r in rows)
    width = max(len(r[0]) for r in rows + [("component", 0, 0)])
    lines = [f"{'component':<{width}}  {'trainable':>13}  {'frozen':>13}"]
    lines += [f"{label:<{width}}  {trainable:>13,}  {frozen:>13,}" for label, trainable, frozen in rows]
    lines.append(f"{'total':<{width}}  {total_trainable:>13,}  {total_frozen:>13,}")
    return "\n".join(lines)


def _parts(model: Wav2Vec2ForCTC) -> list[_Part]:
    """The model's components in input-to-output order; every parameter in exactly one."""
    backbone = model.wav2vec2
    encoder = backbone.encoder
    num_layers = len(encoder.layers)

    def named(prefix: str, module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
        return [(f"{prefix}.{name}", p) for name, p in module.named_parameters()]

    projection = named("feature_projection", backbone.feature_projection) + named("pos_conv_embed",
                                                                                   encoder.pos_conv_embed)
    if getattr(backbone, "masked_spec_embed", None) is not None:
        projection.append(("masked_spec_embed", backbone.masked_spec_embed))
    parts = [_Part("feature encoder", -1, named("feature_extractor", backbone.feature_extractor)),
             _Part("feature projection", -1, projection)]
    parts += [_Part(f"layer {i}", i, named(f"layers.{i}", layer)) for i, layer in enumerate(encoder.layers)]
    seen = {id(p) for part in parts for _, p in part.params} | {id(p) for p in model.lm_head.parameters()}
    # The encoder's final layer norm, and an adapter where the config adds one.
    rest = [(name, p) for name, p in model.named_parameters() if id(p) not in seen]
    if rest:
        parts.append(_Part("encoder norm", num_layers, rest))
    parts.append(_Part("head", num_layers, named("lm_head", model.lm_head)))
    return parts
