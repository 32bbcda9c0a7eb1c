"""Freezing stages, layer-wise learning rates and the parameter table, checked with real AdamW steps."""

from __future__ import annotations

import re

import pytest
import torch

from speechxfer.errors import InputError
from speechxfer.freezing import FreezeOptions, apply_freezing, parameter_groups, parameter_table
from speechxfer.surgery import build_ctc_model
from speechxfer.vocabulary import Vocabulary
from tiny import make_tiny_checkpoint

VOCAB = Vocabulary.from_texts(["abc"])


@pytest.fixture(scope="module", params=["stable", "base"])
def checkpoint(request, tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp(request.param), arch=request.param)


@pytest.fixture
def model(checkpoint):
    return build_ctc_model(checkpoint, VOCAB)[0]


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def unchanged(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(p, before[name]) for name, p in module.named_parameters())


def changed(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(not torch.equal(p, before[name]) for name, p in module.named_parameters() if p.ndim >= 2)


def start_of(before: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The part of a snapshot under `prefix`, keyed like the submodule's own parameters."""
    return {name[len(prefix):]: t for name, t in before.items() if name.startswith(prefix)}


def train_step(model, optimizer) -> None:
    torch.manual_seed(0)
    labels = torch.tensor([[3, 4, 5, 2, 4], [5, 3, -100, -100, -100]])
    loss = model(torch.randn(2, 8000), labels=labels).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def make_optimizer(model, lr: float = 1e-2):
    return torch.optim.AdamW(parameter_groups(model, lr=lr, weight_decay=0.1, layer_lr_decay=1.0))


def test_defaults_freeze_only_the_feature_encoder(model):
    assert apply_freezing(model, FreezeOptions(), update=0) is True
    assert apply_freezing(model, FreezeOptions(), update=0) is False  # idempotent
    optimizer = make_optimizer(model)
    encoder, layers, head = model.wav2vec2.feature_extractor, model.wav2vec2.encoder.layers, model.lm_head
    before = [snapshot(m) for m in (encoder, layers, head)]
    train_step(model, optimizer)
    assert unchanged(encoder, before[0])  # bit-identical: no gradient, so no AdamW update or weight decay
    assert changed(layers, before[1])
    assert changed(head, before[2])


def test_head_only_warm_up_then_the_encoder_thaws(model):
    options = FreezeOptions(head_only_updates=2)
    optimizer = make_optimizer(model)  # built once: thawing needs no new optimizer
    backbone = model.wav2vec2
    start = snapshot(backbone)
    head_before = snapshot(model.lm_head)
    for update in range(2):
        assert apply_freezing(model, options, update=update) is (update == 0)
        train_step(model, optimizer)
    assert unchanged(backbone, start)
    assert changed(model.lm_head, head_before)
    assert apply_freezing(model, options, update=2) is True
    train_step(model, optimizer)
    assert changed(backbone.encoder.layers, start_of(start, "encoder.layers."))
    assert unchanged(backbone.feature_extractor, start_of(start, "feature_extractor."))


def test_bottom_layers_and_feature_projection_stay_frozen(model):
    apply_freezing(model, FreezeOptions(bottom_layers=1), update=0)
    optimizer = make_optimizer(model)
    backbone = model.wav2vec2
    projection, layer0, layer1 = backbone.feature_projection, backbone.encoder.layers[0], backbone.encoder.layers[1]
    before = [snapshot(m) for m in (projection, layer0, layer1)]
    train_step(model, optimizer)
    assert unchanged(projection, before[0])
    assert unchanged(layer0, before[1])
    assert changed(layer1, before[2])
    with pytest.raises(InputError, match="bottom_layers is 3 but the model has 2 layers"):
        apply_freezing(model, FreezeOptions(bottom_layers=3), update=0)


def test_layer_lr_decay_groups(model):
    apply_freezing(model, FreezeOptions(head_only_updates=5), update=0)  # frozen parameters are grouped too
    groups = parameter_groups(model, lr=1.0, weight_decay=0.1, layer_lr_decay=0.5)
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len(set(map(id, grouped))) == len(list(model.parameters()))
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    layers = model.wav2vec2.encoder.layers
    assert lr_of[id(model.lm_head.weight)] == 1.0
    assert lr_of[id(layers[1].attention.q_proj.weight)] == 0.5
    assert lr_of[id(layers[0].attention.q_proj.weight)] == 0.25
    assert lr_of[id(model.wav2vec2.feature_projection.projection.weight)] == 0.125
    assert lr_of[id(model.wav2vec2.feature_extractor.conv_layers[0].conv.weight)] == 0.125
    assert decay_of[id(layers[0].attention.q_proj.weight)] == 0.1
    assert decay_of[id(layers[0].attention.q_proj.bias)] == 0.0
    assert decay_of[id(layers[0].layer_norm.weight)] == 0.0
    assert decay_of[id(model.lm_head.bias)] == 0.0


def test_parameter_table_totals(model):
    apply_freezing(model, FreezeOptions(bottom_layers=1), update=0)
    table = parameter_table(model)
    total = next(line for line in table.splitlines() if line.startswith("total"))
    trainable, frozen = (int(n.replace(",", "")) for n in re.findall(r"[\d,]+", total))
    assert trainable + frozen == model.num_parameters()
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert re.search(r"^layer 0 +0 +[\d,]+$", table, re.M)
    assert re.search(r"^feature encoder +0 +[\d,]+$", table, re.M)
    assert re.search(r"^head +[\d,]+ +0$", table, re.M)


def test_options_are_validated():
    with pytest.raises(ValueError, match="bottom_layers"):
        FreezeOptions(bottom_layers=-1)
    with pytest.raises(ValueError, match="head_only_updates"):
        FreezeOptions(head_only_updates=-2)
    with pytest.raises(ValueError, match="layer_lr_decay"):
        FreezeOptions(layer_lr_decay=1.5)
