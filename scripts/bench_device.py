"""What the benchmark scripts report about the device they ran on: its name, peak accelerator memory, and the model
FLOPs utilisation (MFU) of training, from the FLOPs of each wav2vec2 training step counted from the model's shape.

Only `device_name`, `reset_peak_memory` and `peak_memory_mib` call CUDA, and only when the device is cuda.
"""

from __future__ import annotations

from pathlib import Path

# Dense (no sparsity) bf16 matrix peak of a card, in TFLOP/s, by a part of the name torch.cuda.get_device_name()
# gives it; the first match counts, so a more specific name comes first. NVIDIA's datasheets: H100/H200 SXM
# 989.4 (the H200 has the H100's arithmetic), H100 PCIe 756, H200 NVL 835.5, A100 312. A measured 8192^3 bf16
# product on an H200 of this workplace ran at about 790 (/work/.library/device/KINDS.md): MFU against the datasheet
# figure is therefore at most about 0.8.
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H200 NVL": 835.5, "H100": 989.4, "H200": 989.4, "A100": 312.0}


def device_name(device: str) -> str:
    """The card torch sees for a cuda device ("NVIDIA H200"), else the CPU's model name from /proc/cpuinfo."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU {line.partition(':')[2].strip()}"
    except OSError:
        pass
    return "CPU"


def peak_tflops(name: str) -> float | None:
    """PEAK_BF16_TFLOPS of the card called `name`; None for a card (or CPU) the table does not know."""
    for part, tflops in PEAK_BF16_TFLOPS.items():
        if part in name:
            return tflops
    return None


def reset_peak_memory(device: str) -> None:
    """Start counting the peak accelerator memory anew (nothing on the CPU, whose peak is the process's RSS)."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(torch.device(device))


def peak_memory_mib(device: str) -> float | None:
    """The most memory torch's allocator held on a cuda device since the last reset, in MiB; None on the CPU."""
    import torch

    if not device.startswith("cuda"):
        return None
    return torch.cuda.max_memory_allocated(torch.device(device)) / 2**20


def training_step_flops(config, *, rows: int, samples: int) -> float:
    """Model FLOPs of one training step (forward and backward) of a Wav2Vec2ForCTC with its conv feature encoder
    frozen, over an input of `rows` rows of `samples` samples each (a padded batch counts its padding: the device
    computes it). `config`: the model's Wav2Vec2Config.

    Counted as MFU counts them (PaLM, Chowdhery et al. 2022, appendix B): 2 FLOPs per multiply-add of the matrix
    products and convolutions, nothing for norms, activations, softmax or the CTC loss, and no recomputation by
    gradient checkpointing. Per row, with T frames after the conv encoder, hidden size H, feed-forward size I,
    L layers and V output tokens:
      conv encoder   sum over its layers of 2 * frames_out * channels_in * channels_out * kernel, forward only:
                     frozen, and the audio needs no gradient, so the backward pass stops above it
      projection     2 * T * conv_dim[-1] * H
      positional     2 * (T + 1) * H * (H / groups) * kernel (the grouped conv; an even kernel gives T + 1 frames,
                     the last dropped)
      each layer     2 * T * 4 * H^2 (query, key, value, output) + 2 * T * 2 * H * I (feed-forward)
                     + 2 * 2 * T^2 * H (scores and weighted values, all heads together)
      CTC head       2 * T * H * V
    and everything above the conv encoder three times: the forward, then gradients of the inputs and of the
    weights, each as many FLOPs as the forward. Models with an adapter (add_adapter) are not counted.
    """
    if config.add_adapter:
        raise ValueError("training_step_flops does not count a wav2vec2 adapter (config.add_adapter)")
    conv = 0
    frames, channels = samples, 1
    for width, kernel, stride in zip(config.conv_dim, config.conv_kernel, config.conv_stride):
        frames = max(0, (frames - kernel) // stride + 1)
        conv += 2 * frames * channels * width * kernel
        channels = width
    h, t = config.hidden_size, frames
    kernel, groups = config.num_conv_pos_embeddings, config.num_conv_pos_embedding_groups
    positional_frames = t + 2 * (kernel // 2) - kernel + 1
    above = (2 * t * channels * h
             + 2 * positional_frames * h * (h // groups) * kernel
             + config.num_hidden_layers * (2 * t * 4 * h * h + 2 * t * 2 * h * config.intermediate_size
                                           + 2 * 2 * t * t * h)
             + 2 * t * h * config.vocab_size)
    return float(rows * (conv + 3 * above))


class TrainingSteps:
    """Records the input shape (rows, samples) of every forward of a wav2vec2 conv feature encoder in this process
    that runs in training mode with gradients enabled, through a global forward pre-hook: what each training step of
    any loop fed the model, without touching the loop (evaluations, and encoder outputs computed ahead under
    no_grad, are left out). `flops(config, first, count)` sums training_step_flops over steps [first, first + count)."""

    def __init__(self) -> None:
        import torch
        from torch.nn.modules.module import register_module_forward_pre_hook
        from transformers.models.wav2vec2.modeling_wav2vec2 import Wav2Vec2FeatureEncoder

        self.shapes: list[tuple[int, int]] = []

        def record(module, args) -> None:
            if isinstance(module, Wav2Vec2FeatureEncoder) and module.training and torch.is_grad_enabled() and args:
                self.shapes.append(tuple(args[0].shape))

        self._handle = register_module_forward_pre_hook(record)

    def flops(self, config, *, first: int, count: int) -> float | None:
        """FLOPs of steps first..first+count-1, None when fewer were recorded (a loop that skips the encoder)."""
        if len(self.shapes) < first + count:
            return None
        return sum(training_step_flops(config, rows=rows, samples=samples)
                   for rows, samples in self.shapes[first:first + count])
