"""Export a CTC model folder for CPU inference: the network as ONNX for onnxruntime, optionally with int8 weights.

The exported folder is what `speechxfer transcribe` and `evaluate` read like a model folder (transcribe.Recognizer
runs it through transcribe.ExportedModel): EXPORTED_MODEL_FILE, plus the source's config.json (frame geometry),
vocabulary and tokenizer files, preprocessor_config.json, and its recipe.yaml and lm/ when it has them, so that
evaluation normalizes and decodes as with the source. EXPORT_RECORD says where it came from and how closely its
output matches the source's on a check input.

Why onnxruntime with int8 on the matrix products (scripts/bench_transcribe.py's folder case, XLS-R-300M shape,
12 files, 1 thread, 2-core AVX2 CPU without VNNI, medians of 3 alternating runs; see the README's export section):
the float32 transformers pipeline 53.8 s, speechxfer float32 35.9 s, torch's dynamic int8 (quantize_dynamic on
nn.Linear, applied at load) 29.9 s, onnxruntime float32 41.7 s, onnxruntime int8 26.3 s, the only one at 2x the
pipeline. Per forward pass torch's int8 and onnxruntime's are alike; torch pays ~5 s to quantize at every load
(and torch.ao.quantization is deprecated), the exported int8 graph loads quantized and is a file other runtimes
deploy. Quantizing the convolutions too (onnxruntime's ConvInteger) made it slower than float32.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from speechxfer.atomic import atomic_write, error_naming, follow_umask, sync_folder
from speechxfer.compat import quiet_quantization_advice, write_failure
from speechxfer.errors import InputError, SpeechxferError, WriteError, output_folder
from speechxfer.evaluate import model_normalization
from speechxfer.lm import LM_FOLDER
from speechxfer.transcribe import EXPORTED_MODEL_FILE, ExportedModel, Recognizer

logger = logging.getLogger(__name__)

QUANTIZATIONS = ("int8",)
EXPORT_RECORD = "export.json"
# ONNX operator set of the export: 17 has LayerNormalization as one node; onnxruntime 1.16 and later run it.
ONNX_OPSET = 17
# A float32 export must give the source's log posteriors to within this on the check input (float rounding of
# another kernel library); more means the graph is not the model's.
FLOAT32_TOLERANCE = 1e-3
# Check input: two utterances of these lengths in one padded batch, neither the length the graph was traced at.
_CHECK_S = (1.3, 0.9)
_TRACE_S = (1.0, 0.6)


class ExportError(SpeechxferError):
    """The exported graph does not compute what the source model computes."""


@dataclass(frozen=True)
class ExportResult:
    """What `export_model` wrote, and how close the exported model is to the source on the check input."""

    directory: Path
    source: str  # the model folder (or hub id) exported
    lang: str | None  # the adapter language exported, for a model with language adapters
    quantize: str | None  # None: float32 weights; "int8": the MatMul weights in int8, activations quantized per batch
    model_bytes: int  # size of EXPORTED_MODEL_FILE
    max_log_prob_difference: float  # largest |exported - source| log posterior over the check input's frames
    frames_agreeing: float  # share of the check input's frames whose most likely token is the same
    export_s: float  # seconds the export took, check included


def export_model(model: str | os.PathLike, output_dir: str | os.PathLike, *, quantize: str | None = None,
                 lang: str | None = None) -> ExportResult:
    """Export a model folder (or hub id) to output_dir, which must be new or empty; built in a temporary folder
    beside it and moved into place once checked, so a failed export leaves nothing behind.

    quantize: None (float32) or "int8" (dynamic quantization of the MatMul weights). lang: for a model with
    language adapters, the language to export (default: the one in its model.safetensors).
    """
    if quantize not in (None, *QUANTIZATIONS):
        raise InputError(f"unknown quantization {quantize!r} (choose from {', '.join(QUANTIZATIONS)})")
    try:
        import onnx  # noqa: F401  (torch.onnx.export writes through it)
        import onnxruntime  # noqa: F401
    except ImportError:
        raise InputError("export needs onnx and onnxruntime: pip install 'speechxfer[export]'") from None
    target = Path(output_dir)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise InputError("the output folder exists and is not empty (export writes a new folder)", path=target)
    started = time.perf_counter()
    source = Recognizer(model, device="cpu", lang=lang)
    if isinstance(source.model, ExportedModel):
        raise InputError("this folder is an export already; export the model folder it came from", path=model)
    output_folder(target.parent)
    # Created by name, so that the umask sets its mode (a tempfile.mkdtemp folder would stay private, 0o700).
    staging = target.parent / f".{target.name}.{secrets.token_hex(4)}.export"
    try:
        staging.mkdir()
    except OSError as err:  # a read-only folder: named by the target asked for, not the hidden staging folder
        raise error_naming(err, target) from None
    try:
        _write_graph(source, staging / EXPORTED_MODEL_FILE, quantize=quantize, lang=lang)
        _copy_settings(source, staging)
        exported = Recognizer(staging, device="cpu")
        difference, agreeing = _compare(source, exported)
        if quantize is None and difference > FLOAT32_TOLERANCE:
            raise ExportError(f"the exported model's log posteriors differ from the source's by up to "
                              f"{difference:.3g} on the check input (tolerance {FLOAT32_TOLERANCE:g})")
        result = ExportResult(target, os.fspath(model), lang, quantize,
                              (staging / EXPORTED_MODEL_FILE).stat().st_size, difference, agreeing,
                              time.perf_counter() - started)
        # Without the folder's own path: the folder may move, the record travels with it.
        record = {name: value for name, value in asdict(result).items() if name != "directory"}
        record |= {"onnx_opset": ONNX_OPSET, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                   "check_input_s": list(_CHECK_S)}
        with atomic_write(staging / EXPORT_RECORD) as f:
            f.write(json.dumps(record, indent=1) + "\n")
        follow_umask(staging)
        sync_folder(staging, files=True)  # the files reach the disk before the folder's name does
        if target.exists():
            target.rmdir()  # empty, checked above
        staging.rename(target)
    except Exception as err:
        reason = write_failure(err)
        if reason is None or isinstance(err, FileNotFoundError):  # not a refused write: a bug, shown in full
            raise
        # A full disk or a refused write mid-export (the graph, the quantized copy, the settings): one line naming
        # the folder asked for, not the hidden staging folder, nor the exporter's traceback.
        raise WriteError(f"cannot write the export: {reason}; nothing was left behind", path=target,
                         reason=reason) from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    logger.info("exported %s to %s (%s, %.1f MiB): log posteriors within %.3g of the source's, best token the same "
                "in %.1f%% of the check frames", model, target, quantize or "float32", result.model_bytes / 2**20,
                difference, 100 * agreeing)
    return result


class _Logits(torch.nn.Module):
    """The traced function: (batch, samples) [and its mask] -> (batch, frames, vocab) logits."""

    def __init__(self, network: torch.nn.Module, *, takes_mask: bool):
        super().__init__()
        self.network = network
        self.takes_mask = takes_mask

    def forward(self, input_values: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.network(input_values, attention_mask=attention_mask if self.takes_mask else None).logits


def _write_graph(source: Recognizer, path: Path, *, quantize: str | None, lang: str | None) -> None:
    # Loaded anew: the source Recognizer's feature encoder is the blocked CPU one, whose loop over time blocks a
    # trace would fix to the trace input's length.
    from speechxfer.surgery import load_ctc_model

    network = load_ctc_model(source.directory)
    if lang is not None:
        network.load_adapter(lang, use_safetensors=True, local_files_only=True)  # checked by the source Recognizer
    takes_mask = source.use_attention_mask
    rate = source.sample_rate_hz
    lengths = torch.tensor([round(seconds * rate) for seconds in _TRACE_S])
    mask = (torch.arange(int(lengths.max()))[None, :] < lengths[:, None]).long()
    waves = torch.randn(mask.shape, generator=torch.Generator().manual_seed(0)) * mask  # zero padding
    inputs = {"input_values": {0: "batch", 1: "samples"}}
    if takes_mask:
        inputs["attention_mask"] = {0: "batch", 1: "samples"}
    graph = path.with_suffix(".float32.onnx") if quantize else path
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns that the model's Python conditions on tensor shapes are fixed to the trace input's, and
        # that advanced indexing is wrong for negative indices; export_model's check, on other lengths than the
        # trace's, is what tells whether the graph generalizes.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Exporting aten::index operator")
        # The TorchScript exporter (dynamo=False): torch's newer one needs onnxscript, one more dependency, for the
        # same graph of this model.
        torch.onnx.export(_Logits(network, takes_mask=takes_mask), (waves, mask) if takes_mask else (waves,),
                          os.fspath(graph), input_names=list(inputs), output_names=["logits"],
                          dynamic_axes=inputs | {"logits": {0: "batch", 1: "frames"}}, opset_version=ONNX_OPSET,
                          dynamo=False)
    del network
    if quantize == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        with quiet_quantization_advice():
            # MatMul only: onnxruntime's ConvInteger for the feature encoder was slower than its float32 Conv.
            quantize_dynamic(graph, path, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
        graph.unlink()


def _copy_settings(source: Recognizer, directory: Path) -> None:
    """config.json, the vocabulary (the exported language's alone), the feature extractor settings, and the
    recipe and LM the source's transcription and evaluation would use."""
    shutil.copy2(Path(source.directory, "config.json"), directory / "config.json")
    shutil.copy2(Path(source.directory, "preprocessor_config.json"), directory / "preprocessor_config.json")
    source.vocabulary.save(directory)
    recipe = model_normalization(source.directory, lang=source.lang)
    if recipe is not None:
        shutil.copy2(recipe, directory / "recipe.yaml")
    if Path(source.directory, LM_FOLDER).is_dir():
        shutil.copytree(Path(source.directory, LM_FOLDER), directory / LM_FOLDER)


def _compare(source: Recognizer, exported: Recognizer) -> tuple[float, float]:
    """(largest log posterior difference, share of frames with the same best token) on the check input."""
    rng = np.random.default_rng(0)
    rate = source.sample_rate_hz
    # Noise whose loudness changes every 0.1 s, so that even a random model's best token changes along it.
    waves = [(0.3 * rng.standard_normal(round(s * rate))
              * np.repeat(rng.uniform(0.05, 1.0, round(10 * s) + 1), rate // 10)[: round(s * rate)]).astype(np.float32)
             for s in _CHECK_S]
    ours, frames = source.log_probs(waves)
    theirs, _ = exported.log_probs(waves)
    valid = torch.arange(ours.shape[1])[None, :] < frames[:, None]
    difference = float((ours - theirs).abs()[valid].max())
    agreeing = float((ours.argmax(-1) == theirs.argmax(-1))[valid].float().mean())
    return difference, agreeing
