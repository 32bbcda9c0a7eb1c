import copy

import pytest
import torch
from tiny import tiny_config
from transformers import Wav2Vec2ForCTC

from speechxfer.batching import frame_geometry
from speechxfer.feature_encoder import MIN_CHANNELS, BlockedFeatureEncoder, use_blocked_feature_encoder


def wide_model(arch: str, *, conv_bias: bool) -> Wav2Vec2ForCTC:
    config = tiny_config(arch=arch)
    config.conv_dim = [MIN_CHANNELS] * len(config.conv_dim)
    config.conv_bias = conv_bias
    torch.manual_seed(0)
    model = Wav2Vec2ForCTC(config).eval()
    # A non-trivial affine part of every norm, so that using it wrongly shows.
    with torch.no_grad():
        for layer in model.wav2vec2.feature_extractor.conv_layers:
            if getattr(layer, "layer_norm", None) is not None:
                layer.layer_norm.weight.uniform_(0.5, 1.5)
                layer.layer_norm.bias.uniform_(-0.5, 0.5)
    return model


def padded_batch() -> torch.Tensor:
    """Three items, two zero-padded; lengths not multiples of the stride; loud enough to need normalising."""
    torch.manual_seed(1)
    batch = 3 * torch.randn(3, 5_317) + 0.5
    batch[1, 4_000:] = 0
    batch[2, 1_234:] = 0
    return batch


@pytest.mark.parametrize("arch,conv_bias", [("stable", True), ("stable", False), ("base", False)])
def test_blocked_encoder_equals_transformers(arch, conv_bias, monkeypatch):
    model = wide_model(arch, conv_bias=conv_bias)
    original = model.wav2vec2.feature_extractor
    batch = padded_batch()
    with torch.inference_mode():
        expected = original(batch)
        # Small blocks, so that the input is cut into many pieces (and the group norm's moments gathered in many).
        monkeypatch.setattr("speechxfer.feature_encoder._BLOCK_FLOATS", 3 * 4 * MIN_CHANNELS * 5)
        got = BlockedFeatureEncoder(original)(batch)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()


def test_swapped_model_keeps_its_weights_and_logits():
    model = wide_model("stable", conv_bias=True)
    reference = copy.deepcopy(model)
    keys = list(model.state_dict())
    assert use_blocked_feature_encoder(model)
    assert isinstance(model.wav2vec2.feature_extractor, BlockedFeatureEncoder)
    assert list(model.state_dict()) == keys
    assert not use_blocked_feature_encoder(model)  # already swapped
    batch = padded_batch()
    mask = (batch != 0).long()
    with torch.inference_mode():
        got = model(batch, attention_mask=mask).logits
        expected = reference(batch, attention_mask=mask).logits
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()


def test_narrow_or_unknown_encoders_are_left_alone():
    narrow = Wav2Vec2ForCTC(tiny_config(arch="stable"))  # 16 channels: oneDNN's convolution is faster there
    assert not use_blocked_feature_encoder(narrow)
    assert not isinstance(narrow.wav2vec2.feature_extractor, BlockedFeatureEncoder)
    grouped = wide_model("stable", conv_bias=True)
    grouped.wav2vec2.feature_extractor.conv_layers[1].conv.groups = 2
    assert not use_blocked_feature_encoder(grouped)


def test_input_shorter_than_the_receptive_field_gives_no_frames():
    model = wide_model("stable", conv_bias=True)
    encoder = BlockedFeatureEncoder(model.wav2vec2.feature_extractor)
    assert encoder.geometry == frame_geometry(model.config)  # the layers' geometry is the config's
    assert encoder(torch.randn(2, encoder.geometry.receptive_field - 1)).shape == (2, MIN_CHANNELS, 0)
    assert encoder(torch.randn(2, encoder.geometry.receptive_field)).shape == (2, MIN_CHANNELS, 1)


def test_blocked_encoder_runs_under_bfloat16_autocast():
    original = wide_model("base", conv_bias=False).wav2vec2.feature_extractor
    batch = padded_batch()
    with torch.inference_mode():
        expected = original(batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = BlockedFeatureEncoder(original)(batch)
    assert got.dtype == torch.float32
    error = (got - expected).abs().max().item()
    assert 0 < error < 0.1 * expected.abs().max().item()
