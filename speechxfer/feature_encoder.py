"""The wav2vec2 convolutional feature encoder for inference on a CPU, computed channels-last in blocks of time.

transformers runs each of the 7 conv layers as `conv1d` on (batch, channels, time) and transposes around every
LayerNorm; on a CPU that spends more time in copies, layer norms over strided memory and in page faults for the
first layer's large output (batch x 64 x frames x channels floats) than in the convolutions themselves. Here each
conv layer is one matrix product over overlapping windows of a (time, channels) tensor, and the encoder runs on
blocks of output frames, so every intermediate is a few MiB and stays in cache. The result is the same function
(equal to transformers' output to float rounding, tested). Measured on this project's 2-core CPU with the
benchmark model (256 channels): the encoder 447 -> 221 ms for 5 x 4 s of audio, and the 200-file folder of
scripts/bench_transcribe.py 19.6 -> 13.5 s. Nothing here is a new model: the weights are the model's own.

Supported: LayerNorm conv layers (XLS-R, XLSR-53, MMS: `feat_extract_norm="layer"`) and the GroupNorm first layer
of wav2vec2-base-like models (`feat_extract_norm="group"`), whose per-channel statistics over the whole input are
gathered in a first pass over the blocks. Anything else keeps transformers' encoder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from speechxfer.batching import FrameGeometry

# Floats of the first conv layer's output per block (batch included): 2 Mi floats = 8 MiB, the size that was
# fastest on the benchmark CPU (16-32 frames a block for 5 items of 256 channels).
_BLOCK_FLOATS = 2 * 1024 * 1024
# Narrower layers make matrix products too small to beat oneDNN's convolution: on the shipped seed (32-128
# channels) this encoder took 41 ms for 5 x 4 s where transformers' took 25 ms; at 256 channels 221 ms vs 447 ms.
# Every published wav2vec2 checkpoint has 512.
MIN_CHANNELS = 256


class BlockedFeatureEncoder(nn.Module):
    """Drop-in, inference-only replacement of `Wav2Vec2FeatureEncoder`: same `conv_layers` (so the same state
    dict keys and weights), input (batch, samples) float32, output (batch, channels, frames)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.conv_layers = encoder.conv_layers
        layers = list(self.conv_layers)
        self.kernels = [layer.conv.kernel_size[0] for layer in layers]
        self.strides = [layer.conv.stride[0] for layer in layers]
        # (kernel x in_channels, out_channels): row t * in_channels + c multiplies input channel c at offset t.
        self._weights = [layer.conv.weight.detach().permute(2, 1, 0).reshape(-1, layer.conv.out_channels)
                         .contiguous() for layer in layers]
        self.group_norm = isinstance(getattr(layers[0], "layer_norm", None), nn.GroupNorm)
        self.geometry = FrameGeometry.of(zip(self.kernels, self.strides))
        self._layer_geometry = [FrameGeometry(kernel, stride) for kernel, stride in zip(self.kernels, self.strides)]

    @staticmethod
    def supports(encoder: nn.Module) -> bool:
        """Whether `encoder` (a transformers wav2vec2 feature encoder) has a layout this class computes, with
        layers wide enough for it to be the faster."""
        layers = list(getattr(encoder, "conv_layers", []))
        if not layers or not all(isinstance(getattr(layer, "conv", None), nn.Conv1d) for layer in layers):
            return False
        if any(layer.conv.padding != (0,) or layer.conv.dilation != (1,) or layer.conv.groups != 1
               for layer in layers):
            return False
        norms = [getattr(layer, "layer_norm", None) for layer in layers]
        all_layer_norm = all(isinstance(n, nn.LayerNorm) for n in norms)
        group_then_none = (isinstance(norms[0], nn.GroupNorm) and norms[0].num_groups == norms[0].num_channels
                           and all(n is None for n in norms[1:]))
        wide = min(layer.conv.out_channels for layer in layers) >= MIN_CHANNELS
        return wide and (all_layer_norm or group_then_none)

    @torch.inference_mode()
    def forward(self, input_values: torch.Tensor) -> torch.Tensor:
        batch, samples = input_values.shape
        receptive_field, stride = self.geometry.receptive_field, self.geometry.stride
        frames = self.geometry.frames(samples)
        out = input_values.new_empty(batch, frames, self._weights[-1].shape[1])
        rows_per_frame = stride // self.strides[0]
        block = max(1, _BLOCK_FLOATS // (batch * rows_per_frame * self._weights[0].shape[1]))
        moments = self._first_layer_moments(input_values, block * rows_per_frame) if self.group_norm else None
        for start in range(0, frames, block):
            end = min(frames, start + block)
            piece = input_values[:, start * stride: (end - 1) * stride + receptive_field]
            out[:, start:end] = self._layers(piece, moments)
        return out.transpose(1, 2)

    def _layers(self, x: torch.Tensor, moments: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """(batch, samples) -> (batch, frames, channels) through every conv layer."""
        h = x.unsqueeze(-1)
        for i, layer in enumerate(self.conv_layers):
            h = self._conv(h, i)
            norm = getattr(layer, "layer_norm", None)
            if isinstance(norm, nn.LayerNorm):
                h = F.layer_norm(h, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
            elif isinstance(norm, nn.GroupNorm):
                mean, inverse_std = moments
                h = torch.addcmul(norm.bias, (h - mean) * inverse_std, norm.weight)
            h = layer.activation(h)
        return h

    def _conv(self, h: torch.Tensor, i: int) -> torch.Tensor:
        """Conv layer i as one matrix product: (batch, time, channels) -> (batch, out time, out channels)."""
        batch, time, channels = h.shape
        kernel, stride = self.kernels[i], self.strides[i]
        steps = self._layer_geometry[i].frames(time)
        if h.stride(2) != 1 or h.stride(1) != channels:  # a window must be one run of memory
            h = h.contiguous()
        windows = h.as_strided((batch, steps, kernel * channels), (h.stride(0), stride * channels, 1))
        windows = windows.reshape(batch * steps, kernel * channels)
        bias = self.conv_layers[i].conv.bias
        out = windows @ self._weights[i] if bias is None else torch.addmm(bias, windows, self._weights[i])
        return out.view(batch, steps, -1)

    def _first_layer_moments(self, x: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """GroupNorm's per-item, per-channel mean and 1/std over all first-layer frames, padding included (as
        transformers computes them), gathered block by block in float64: (batch, 1, channels) each."""
        kernel, stride = self.kernels[0], self.strides[0]
        steps = self._layer_geometry[0].frames(x.shape[1])
        total = x.new_zeros(x.shape[0], self._weights[0].shape[1], dtype=torch.float64)
        squares = torch.zeros_like(total)
        for start in range(0, steps, rows):
            end = min(steps, start + rows)
            h = self._conv(x[:, start * stride: (end - 1) * stride + kernel].unsqueeze(-1), 0).double()
            total += h.sum(dim=1)
            squares += (h * h).sum(dim=1)
        mean = total / steps
        variance = (squares / steps - mean * mean).clamp_min(0)
        inverse_std = (variance + self.conv_layers[0].layer_norm.eps).rsqrt()
        return mean.float().unsqueeze(1), inverse_std.float().unsqueeze(1)


def use_blocked_feature_encoder(model: nn.Module) -> bool:
    """Swap a Wav2Vec2ForCTC's feature encoder for `BlockedFeatureEncoder` when its layout is supported (the
    model's weights and state dict keys are unchanged); True when swapped. For inference on a CPU only."""
    wav2vec2 = getattr(model, "wav2vec2", None)
    encoder = getattr(wav2vec2, "feature_extractor", None)
    if encoder is None or isinstance(encoder, BlockedFeatureEncoder) or not BlockedFeatureEncoder.supports(encoder):
        return False
    wav2vec2.feature_extractor = BlockedFeatureEncoder(encoder)
    return True
