"""Everything that leans on a library's internals or on its version, in one place, so an upgrade breaks one file.

Each function says what it leans on. Libraries are imported inside the functions: the CLI calls
`check_transformers_version` before any command, and that must not import transformers (an old one may not even
import) nor slow down `--help`.
"""

from __future__ import annotations

import gc
import importlib.metadata
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from speechxfer.errors import SpeechxferError, first_line

if TYPE_CHECKING:
    import torch
    from torch import nn
    from tqdm import tqdm
    from transformers import PreTrainedModel

# from_pretrained(dtype=...) came with 4.56; the suite is run against 4.57.6. Keep equal to pyproject.toml's floor
# (tests/test_compat.py checks that).
TRANSFORMERS_MIN_VERSION = "4.57"


def check_transformers_version(version: str | None = None) -> None:
    """Raise SpeechxferError unless transformers `version` (default: the installed one) is at least
    TRANSFORMERS_MIN_VERSION: older releases lack what speechxfer calls (`from_pretrained(dtype=...)`)."""
    if version is None:
        try:
            version = importlib.metadata.version("transformers")
        except importlib.metadata.PackageNotFoundError:
            raise SpeechxferError("transformers is not installed: pip install -e . (or pip install speechxfer)") \
                from None
    if _release(version) < _release(TRANSFORMERS_MIN_VERSION):
        raise SpeechxferError(f"transformers {version} is older than {TRANSFORMERS_MIN_VERSION}, the oldest "
                              f"speechxfer works with: pip install 'transformers>={TRANSFORMERS_MIN_VERSION}'")


def _release(version: str) -> tuple[int, ...]:
    """The leading release numbers of a version string: "4.57.0.dev0" -> (4, 57, 0); (0,) when there are none."""
    match = re.match(r"\d+(?:\.\d+)*", version.strip())
    return tuple(int(part) for part in match.group().split(".")) if match else (0,)


def reset_accelerator_state() -> None:
    """Forget the settings (mixed precision, gradient accumulation) an earlier Accelerator left in this process,
    keeping the distributed setup, so that a second `train()` in one process gets its own.

    Leans on accelerate's private `AcceleratorState._reset_state()` (accelerate keeps those settings in a
    process-wide singleton and has no public reset).
    """
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()


@contextmanager
def quiet_load_report() -> Iterator[None]:
    """Drop transformers' report of missing and unused weights while a model loads (the caller checks the
    `output_loading_info` itself; a missing head is expected when the source has none).

    Leans on the report's logger and text: "<Model> LOAD REPORT" in transformers 5, "Some weights of ..." warnings
    in 4.x, both logged to `transformers.modeling_utils`.
    """
    report_logger = logging.getLogger("transformers.modeling_utils")
    report_logger.addFilter(_drop_load_report)
    try:
        yield
    finally:
        report_logger.removeFilter(_drop_load_report)


def _drop_load_report(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return "LOAD REPORT" not in message and not message.startswith("Some weights of")


@contextmanager
def quiet_quantization_advice() -> Iterator[None]:
    """Drop onnxruntime's advice to pre-process a graph before quantize_dynamic while the block runs.

    Leans on its text ("Please consider ... pre-processing") and on its logging through the root logger, which would
    otherwise also give the root logger a stderr handler (logging.basicConfig) for good.
    """
    root = logging.getLogger()
    quiet = logging.NullHandler()
    root.addHandler(quiet)
    root.addFilter(_drop_quantization_advice)
    try:
        yield
    finally:
        root.removeFilter(_drop_quantization_advice)
        root.removeHandler(quiet)


def _drop_quantization_advice(record: logging.LogRecord) -> bool:
    return not (record.getMessage().startswith("Please consider") and "pre-process" in record.getMessage())


def optional_model_file(name: str, filename: str) -> str | None:
    """Local path of `filename` from a model folder or hub id, None when the model has no such file.
    Raises OSError when the model cannot be reached at all.

    Leans on the private `_raise_exceptions_for_missing_entries` keyword of `transformers.utils.cached_file` (the
    public path raises for a missing file and for an unreachable model alike).
    """
    from transformers.utils import cached_file

    return cached_file(name, filename, _raise_exceptions_for_missing_entries=False)


def write_failure(err: Exception) -> str | None:
    """What the operating system said when writing a file failed ("No space left on device"), for an OSError or
    for safetensors' SafetensorError of a failed write; None for any other error (a bug, to be shown in full).

    Leans on the text of safetensors' errors, which carry no errno: a failed write reads "Error while serializing:
    I/O error: <strerror> (os error <errno>) at path ..." (safetensors 0.8). Where the text holds no errno, the
    OSError it was raised from (if any) says it, else its first line as it is: only a save calls this, so a
    SafetensorError there is one of writing; one of reading ("Error while deserializing ...") is not.
    """
    from safetensors import SafetensorError

    if isinstance(err, OSError):
        return err.strerror or first_line(err)
    if not isinstance(err, SafetensorError) or "deserializ" in str(err).lower():
        return None
    if found := re.search(r"\(os error (\d+)\)", str(err)):
        return os.strerror(int(found.group(1)))
    cause = err.__cause__ or err.__context__
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    return first_line(err) if cause is None else cause.strerror or first_line(cause)


def end_loader_workers(batches: Iterator) -> None:
    """End the worker processes of `batches`, a torch DataLoader's iterator, now (nothing for one without workers;
    again is harmless): an error raised from a worker comes through the iterator, so the error's traceback holds it,
    and with it the workers, for as long as a caller holds the error.

    Leans on the private `_shutdown_workers()` of torch's `_MultiProcessingDataLoaderIter`, which its `__del__`
    calls: torch has no public way to end them (pytorch/pytorch#64766).
    """
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def mark_feature_encoder_trainable(encoder: nn.Module) -> None:
    """Undo what `freeze_feature_encoder()` does to the conv feature encoder's own flag, after its parameters have
    been thawed: without the flag, gradient checkpointing would not make the encoder's input require a gradient.

    Leans on the private `_requires_grad` attribute of transformers' `Wav2Vec2FeatureEncoder` (transformers has
    no unfreeze).
    """
    encoder._requires_grad = True


def progress_bar(*, show: bool, **options) -> tqdm:
    """A tqdm progress bar (tqdm.auto's: a widget in a notebook) with tqdm's keyword `options`, hidden unless `show`;
    TQDM_DISABLE=1 in the environment hides it too.

    Leans on how tqdm reads its environment (tqdm.utils.envwrap, since 4.66): TQDM_* variables become the defaults
    of tqdm's keyword arguments, which an explicit `disable=False` overrides; so `disable` is passed only to hide.
    """
    from tqdm.auto import tqdm

    return tqdm(**options) if show else tqdm(disable=True, **options)


@contextmanager
def gc_paused() -> Iterator[None]:
    """CPython's cyclic garbage collector paused, for a loop that builds many objects but no reference cycles
    (reference counting still frees what it drops). Leans on the collector's heuristics: it runs every 700 new
    container objects and walks the survivors again and again, a third of the time it takes to read and filter a
    million manifest rows in CPython 3.11."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """transformers' gradient checkpointing of `model`, non-reentrant (torch's recommended kind: it needs no input
    that requires a gradient, and works under DDP with find_unused_parameters).

    Leans on the method's name: `activation_checkpointing_enable` in recent transformers 5 releases, where
    `gradient_checkpointing_enable` is a deprecated alias that warns; only the latter in 4.57.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def fused_optimizer_supported(device: torch.device) -> bool:
    """Whether torch has fused optimizer kernels (`torch.optim.AdamW(fused=True)`) for `device`'s type: CPU and
    CUDA among others since torch 2.4.

    Leans on the private `torch.utils._foreach_utils._get_fused_kernels_supported_devices()`, the list the
    optimizers check `fused=True` against (torch has no public one).
    """
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    return device.type in _get_fused_kernels_supported_devices()


def adapter_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weights of a Wav2Vec2ForCTC's attention adapters and CTC head, by the names MMS's
    adapter.<lang>.safetensors files use (what `load_adapter` expects).

    Leans on the private `_get_adapters()` of transformers' Wav2Vec2PreTrainedModel, the list `load_adapter`
    checks a file against.
    """
    return model._get_adapters()
