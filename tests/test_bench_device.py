"""scripts/bench_device.py: the FLOPs of a wav2vec2 training step (against a hand count and torch's own FLOP
counter), the record of each training step's input, and the card table behind MFU."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import Wav2Vec2ForCTC

from tiny import tiny_config

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_device", REPO / "scripts" / "bench_device.py")
bench_device = importlib.util.module_from_spec(spec)
sys.modules["bench_device"] = bench_device
spec.loader.exec_module(bench_device)


def test_training_step_flops_equal_a_hand_count():
    # tiny_config: conv (16, 16, 16) channels, kernels (10, 4, 4), strides (5, 4, 4); H 32, I 64, 2 layers,
    # positional conv kernel 16 in 2 groups, 32 tokens. 1600 samples:
    conv = (2 * 319 * 1 * 16 * 10  # (1600 - 10) // 5 + 1 = 319 frames
            + 2 * 79 * 16 * 16 * 4  # (319 - 4) // 4 + 1 = 79
            + 2 * 19 * 16 * 16 * 4)  # (79 - 4) // 4 + 1 = 19 = T
    projection = 2 * 19 * 16 * 32
    positional = 2 * 20 * 32 * 16 * 16  # T + 1 frames, 32 / 2 input channels per group, kernel 16
    layer = 2 * 19 * 4 * 32 * 32 + 2 * 19 * 2 * 32 * 64 + 2 * 2 * 19 * 19 * 32
    head = 2 * 19 * 32 * 32
    per_row = conv + 3 * (projection + positional + 2 * layer + head)
    assert per_row == 3_605_952
    assert bench_device.training_step_flops(tiny_config(), rows=2, samples=1600) == 2 * per_row


@pytest.mark.parametrize("samples", [1600, 4321])
def test_training_step_flops_equal_torchs_count(samples):
    """torch's FlopCounterMode counts the matrix products and convolutions that a forward and backward really ran
    (2 FLOPs a multiply-add, as MFU counts): with the feature encoder frozen, the same number. The positional conv
    is ungrouped here: torch's counter takes a grouped conv's weight gradient as ungrouped (conv_backward_flop in
    torch/utils/flop_counter.py leaves groups out), so it counts it `groups` times over; the hand count above
    checks the grouped case. Attention is eager: the counter has no formula for the CPU kernel of SDPA, whose
    FLOPs (the same products) it would leave out."""
    torch.manual_seed(0)
    config = tiny_config()
    config.num_conv_pos_embedding_groups = 1
    model = Wav2Vec2ForCTC._from_config(config, attn_implementation="eager")
    model.freeze_feature_encoder()
    model.train()
    inputs = torch.randn(3, samples)
    labels = torch.randint(1, config.vocab_size, (3, 2))
    with FlopCounterMode(display=False) as counter:
        model(input_values=inputs, labels=labels).loss.backward()
    assert counter.get_total_flops() == bench_device.training_step_flops(config, rows=3, samples=samples)


def test_training_step_flops_refuse_an_adapter():
    config = tiny_config()
    config.add_adapter = True
    with pytest.raises(ValueError, match="adapter"):
        bench_device.training_step_flops(config, rows=1, samples=1600)


def test_training_steps_record_training_forwards_only():
    config = tiny_config()
    model = Wav2Vec2ForCTC(config)
    steps = bench_device.TrainingSteps()
    model.train()
    model(input_values=torch.randn(2, 1600))
    model(input_values=torch.randn(1, 3200))
    with torch.no_grad():
        model(input_values=torch.randn(5, 1600))  # encoder outputs computed ahead (a cache): not a training step
    model.eval()
    model(input_values=torch.randn(4, 1600))  # an evaluation: not a training step
    assert steps.shapes == [(2, 1600), (1, 3200)]
    second = bench_device.training_step_flops(config, rows=1, samples=3200)
    assert steps.flops(config, first=1, count=1) == second
    assert steps.flops(config, first=0, count=2) == second + bench_device.training_step_flops(config, rows=2,
                                                                                             samples=1600)
    assert steps.flops(config, first=1, count=2) is None  # a step that was never recorded


@pytest.mark.parametrize(("name", "tflops"), [("NVIDIA H200", 989.4), ("NVIDIA H100 80GB HBM3", 989.4),
                                              ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200 NVL", 835.5),
                                              ("NVIDIA A100-SXM4-80GB", 312.0), ("CPU AMD EPYC 9654", None)])
def test_peak_tflops_by_card_name(name, tflops):
    assert bench_device.peak_tflops(name) == tflops


def test_cpu_has_no_accelerator_memory_figure():
    bench_device.reset_peak_memory("cpu")
    assert bench_device.peak_memory_mib("cpu") is None
    assert bench_device.device_name("cpu").startswith("CPU")
