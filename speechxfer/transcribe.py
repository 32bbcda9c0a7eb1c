"""Speech to text with a CTC model folder: files, folders and manifest utterances, of any length.

Short audio is batched by length up to a budget of padded seconds (batching.inference_batches); for a model that
takes no attention mask, only audio of the same length shares a batch, so that nothing is padded and each result is
the same whatever the budget and the company. Audio longer than `chunk_s` is read in
windows of `chunk_s` with `stride_s` of context on each side; after the forward pass each window keeps the frames
of its centre and drops those of the context (as the transformers pipeline's chunk_length_s/stride_length_s do),
so the stitched frames are the ones a single pass would give wherever the model's receptive field fits in the
context, and memory stays that of one batch of windows however long the file is.

Audio (a file, or a manifest's segment) quieter than `silence_dbfs` as a whole gets an empty transcript without a
forward pass: the feature extractor's normalization would raise its noise to unit variance, and the model hears
words in it. A long file's windows are judged together, as they are normalized: a silent stretch between speech
keeps its level below the speech's, as any pause does.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from speechxfer.atomic import atomic_write
from speechxfer.audio import AUDIO_SUFFIXES, SILENCE_DBFS, Moments, audio_duration_s, is_silent, load_audio
from speechxfer.batching import frame_geometry, inference_batches
from speechxfer.compat import progress_bar
from speechxfer.decoding import Decoder, Transcript, WordTiming
from speechxfer.errors import AudioError, InputError, Problem, first_line, output_folder
from speechxfer.feature_encoder import use_blocked_feature_encoder
from speechxfer.vocabulary import Vocabulary

OUTPUT_FORMATS = ("txt", "json", "srt", "vtt", "tsv")
# Precision of the forward pass. bfloat16 suits CPUs with AVX512-BF16 or AMX (matrix products ~3x float32's on
# this project's CPU) and recent GPUs; float16 suits GPUs.
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TSV_NAME = "transcripts.tsv"
# An exported model folder (`speechxfer export`) holds the network as ONNX, run by onnxruntime on the CPU, beside
# the model folder's config, vocabulary and feature extractor settings.
EXPORTED_MODEL_FILE = "model.onnx"
# Subtitle cues: at most this many characters or seconds, so a cue fits on two short lines.
_MAX_CUE_CHARS = 42
_MAX_CUE_S = 7.0

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AudioSegment:
    """Audio to transcribe: a whole file or a span of one."""

    id: str  # the file's path as found, or the manifest's utterance id
    path: str
    duration_s: float
    offset_s: float = 0.0  # start inside the file
    name: str = ""  # output file name without suffix, relative to the output folder


@dataclass(frozen=True)
class TranscribeOptions:
    """How audio is cut into forward passes."""

    # padded seconds of audio per forward pass (batch size x longest item). Small batches win on a CPU (cache-sized
    # activations): 40 files of 1-6 s (scripts/bench_transcribe.py --quick, 2 idle cores) took 3.9 s with 20 s
    # batches, 4.3 s with 10 s, 5.3 s with 60 s and 6.3 s with 200 s.
    max_batch_s: float = 20.0
    chunk_s: float = 30.0  # audio longer than this is read in windows of this length
    stride_s: float = 5.0  # context read on each side of a window, dropped after the forward pass
    # Audio whose level (audio.Moments.level_dbfs) is below this many dBFS gets an empty transcript and is not run
    # through the model; None: all audio is. The default and why: audio.SILENCE_DBFS.
    silence_dbfs: float | None = SILENCE_DBFS

    def __post_init__(self) -> None:
        for name, value, least in (("max_batch_s", self.max_batch_s, "more than 0"),
                                   ("chunk_s", self.chunk_s, "more than 0"),
                                   ("stride_s", self.stride_s, "at least 0")):
            if not (math.isfinite(value) and (value >= 0 if least == "at least 0" else value > 0)):
                raise InputError(f"{name} (--{name.replace('_', '-')}) must be {least} seconds, got {value:g}")
        if self.silence_dbfs is not None and not (math.isfinite(self.silence_dbfs) and self.silence_dbfs <= 0):
            raise InputError(f"silence_dbfs (--silence-dbfs) must be a level of at most 0 dBFS, or off; got "
                             f"{self.silence_dbfs:g}")

    def silent(self, level_dbfs: float) -> bool:
        """Whether audio of this level (see silence_dbfs) is left to an empty transcript."""
        return is_silent(level_dbfs, self.silence_dbfs)


@dataclass(frozen=True)
class Transcription:
    segment: AudioSegment
    transcript: Transcript
    # The level (dBFS) of audio found silent (TranscribeOptions.silence_dbfs): its transcript is empty and the model
    # never ran on it. None: the model transcribed it.
    silent_dbfs: float | None = None


class Recognizer:
    """A Wav2Vec2ForCTC model folder (or hub id) loaded for inference, with its vocabulary and input settings.

    lang: for a model with language adapters (MMS's layout), the language whose adapter weights, CTC head and
    vocabulary to use (see use_adapter); None: the ones in model.safetensors (the tokenizer's target_lang).
    """

    def __init__(self, model: str | os.PathLike, *, device: str = "auto", dtype: str = "float32",
                 lang: str | None = None):
        from transformers import Wav2Vec2FeatureExtractor

        # Imported here: they import transformers, which `speechxfer --help` should not wait for.
        from speechxfer.surgery import load_ctc_model

        if dtype not in COMPUTE_DTYPES:
            raise InputError(f"unknown dtype {dtype!r} (choose from {', '.join(COMPUTE_DTYPES)})")
        # Weights stay float32; matrix products and convolutions run in `dtype` under autocast, norms and
        # softmax in float32 (torch's autocast op lists).
        self.dtype = COMPUTE_DTYPES[dtype]
        directory = model_directory(model)
        self.directory = directory
        self.model: torch.nn.Module | ExportedModel
        if Path(directory, EXPORTED_MODEL_FILE).is_file():
            self.model = ExportedModel(directory)
            # Its weights and precision were fixed by the export; so was its language for an adapter model.
            refused = [f"--{name} {value}" for name, value, default in
                       (("dtype", dtype, "float32"), ("lang", lang, None)) if value != default]
            if device not in ("auto", "cpu"):
                refused.append(f"--device {device}")
            if refused:
                raise InputError(f"{', '.join(refused)}: an exported model runs as it was exported, on the CPU",
                                 path=directory)
            self.device = torch.device("cpu")
        else:
            self.device = _pick_device(device)
            self.model = load_ctc_model(directory)
        if not Path(directory, "preprocessor_config.json").is_file():  # transformers' message is a paragraph
            raise InputError("no preprocessor_config.json in this model folder", path=directory)
        try:
            extractor = Wav2Vec2FeatureExtractor.from_pretrained(directory)
        except (OSError, ValueError, RecursionError) as err:  # RecursionError: JSON nested a thousand deep
            reason = first_line(err)
            raise InputError(f"cannot read the feature extractor settings (preprocessor_config.json): {reason}",
                             path=directory) from None
        if isinstance(self.model, torch.nn.Module):
            self.model.to(self.device)
            if self.device.type == "cpu":
                use_blocked_feature_encoder(self.model)
        self.lang: str | None = None
        if lang is None:
            self.vocabulary = Vocabulary.load(directory)
            self._check_head(self.vocabulary, None)
        else:
            self.use_adapter(lang)
        self.sample_rate_hz: int = extractor.sampling_rate
        self.normalize: bool = extractor.do_normalize  # zero mean, unit variance per utterance
        # Group-norm (wav2vec2-base-like) models take no mask: they are given batches without padding.
        self.use_attention_mask: bool = extractor.return_attention_mask
        self.geometry = frame_geometry(self.model.config)  # where each output frame lies in the input samples
        self.samples_per_frame: int = self.geometry.stride
        self.frame_s: float = self.samples_per_frame / self.sample_rate_hz
        # The convolutions' receptive field (400 samples, 25 ms, for wav2vec2): shorter audio gives no frame, and
        # torch refuses to run a convolution on it.
        self.min_samples: int = self.geometry.receptive_field

    def use_adapter(self, language: str) -> None:
        """Switch an MMS-style adapter model (config.adapter_attn_dim set) to `language`: its adapter weights and
        CTC head from adapter.<language>.safetensors in the model folder, its vocabulary from vocab.json.
        InputError for a model without adapters, a missing or mismatched adapter file, a language vocab.json lacks;
        after one, the recognizer is as it was."""
        from speechxfer.surgery import adapter_kept_on_error, load_adapter

        if isinstance(self.model, ExportedModel):
            raise InputError("an exported model holds the one language it was exported with (speechxfer export "
                             "--lang)", path=self.directory)
        if getattr(self.model.config, "adapter_attn_dim", None) is None:
            raise InputError("not an adapter model (its config.json sets no adapter_attn_dim)", path=self.directory)
        with adapter_kept_on_error(self.model):
            load_adapter(self.model, language, directory=self.directory)
            # Read after the adapter, so that a language without one gets load_adapter's message, not vocab.json's.
            vocabulary = Vocabulary.load(self.directory, target_lang=language)
            self._check_head(vocabulary, language)
        self.vocabulary, self.lang = vocabulary, language

    def _check_head(self, vocabulary: Vocabulary, lang: str | None) -> None:
        if len(vocabulary) != self.model.config.vocab_size:
            raise InputError(f"vocab.json has {len(vocabulary)} tokens"
                             + (f" for language {lang!r}" if lang else "")
                             + f" but the CTC head has {self.model.config.vocab_size} outputs",
                             path=Path(self.directory, "vocab.json"))

    @torch.inference_mode()
    def log_probs(self, waveforms: Sequence[np.ndarray], *,
                  stats: Sequence[tuple[float, float]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Log posteriors of a batch of (samples,) float32 waveforms at `sample_rate_hz`.

        Waveforms of different lengths are zero-padded, with a mask when the model takes one
        (`use_attention_mask`); give a model without one waveforms of the same length only (inference_batches).
        stats: (mean, std) to normalize each waveform with, when the feature extractor normalizes; None: each
        waveform's own. Returns (batch, frames, vocab) float32 on the CPU and (batch,) valid frames per item.
        """
        if min(len(w) for w in waveforms) < self.min_samples:
            raise AudioError(f"audio shorter than the model's receptive field ({self.min_samples} samples)")
        lengths = torch.tensor([len(w) for w in waveforms])
        batch = np.zeros((len(waveforms), int(lengths.max())), dtype=np.float32)
        for i, wave in enumerate(waveforms):
            if self.normalize:
                mean, std = stats[i] if stats is not None else Moments.of(wave).mean_std()
                np.divide(wave - np.float32(mean), np.float32(std), out=batch[i, : len(wave)])
            else:
                batch[i, : len(wave)] = wave
        batch = torch.from_numpy(batch)
        mask = None
        if self.use_attention_mask:
            mask = (torch.arange(batch.shape[1])[None, :] < lengths[:, None]).long().to(self.device)
        if isinstance(self.model, ExportedModel):
            logits = self.model(batch, attention_mask=mask)
        else:
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
                logits = self.model(batch.to(self.device), attention_mask=mask).logits
        frames = torch.tensor([self.geometry.frames(n) for n in lengths.tolist()])
        return logits.float().log_softmax(dim=-1).cpu(), frames


class ExportedModel:
    """The network of an exported model folder (EXPORTED_MODEL_FILE) in an onnxruntime session on the CPU: logits
    of a batch, as the Wav2Vec2ForCTC it was exported from gives them (to float rounding, or to int8 quantization's
    error when export quantized it). `config` is the folder's config.json, for the frame geometry."""

    def __init__(self, directory: str | os.PathLike):
        from transformers import Wav2Vec2Config

        try:
            import onnxruntime
        except ImportError:
            raise InputError("an exported model needs onnxruntime: pip install 'speechxfer[export]'",
                             path=directory) from None
        path = Path(directory, EXPORTED_MODEL_FILE)
        try:
            self.config = Wav2Vec2Config.from_pretrained(directory)
        except (OSError, ValueError, RecursionError) as err:
            reason = first_line(err)
            raise InputError(f"cannot read config.json: {reason}", path=directory) from None
        settings = onnxruntime.SessionOptions()
        # As many threads as torch uses (OMP_NUM_THREADS; torchrun sets 1 per process), not onnxruntime's
        # default of every core, so that processes sharing a machine do not oversubscribe it.
        settings.intra_op_num_threads = torch.get_num_threads()
        settings.inter_op_num_threads = 1
        try:
            self.session = onnxruntime.InferenceSession(os.fspath(path), settings,
                                                        providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own exception types for unreadable or invalid graphs
            reason = first_line(err)
            raise InputError(f"cannot load the exported model: {reason}", path=path) from None
        self.takes_mask = "attention_mask" in {i.name for i in self.session.get_inputs()}

    def __call__(self, input_values: torch.Tensor, *, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, samples) float32 and its (batch, samples) mask -> (batch, frames, vocab) float32 logits."""
        feed = {"input_values": input_values.numpy()}
        if self.takes_mask:
            feed["attention_mask"] = (attention_mask if attention_mask is not None
                                      else torch.ones_like(input_values, dtype=torch.long)).numpy()
        return torch.from_numpy(self.session.run(["logits"], feed)[0])


def model_directory(model: str | os.PathLike) -> str:
    """A local folder as it is; a hub id (as surgery.model_source tells them apart) is resolved through the local
    hub cache or a download."""
    from speechxfer.surgery import model_source

    name = model_source(model)
    if os.path.isdir(name):
        return name
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.txt"])
    except Exception as err:  # hub errors come in many types (offline, not found, gated, bad id)
        reason = first_line(err)
        raise InputError(f"no such model folder, and not a hub model that can be fetched: {reason}",
                         path=model) from None


def _pick_device(device: str) -> torch.device:
    """cpu, cuda, cuda:N, mps, or auto (the best available); InputError for another name or a missing device."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, ValueError):
        chosen = None
    if chosen is None or chosen.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"unknown device {device!r} (cpu, cuda, cuda:N, mps or auto)")
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r}: torch sees no CUDA GPU on this machine (try cpu or auto)")
    if chosen.type == "cuda" and chosen.index is not None and chosen.index >= torch.cuda.device_count():
        raise InputError(f"device {device!r}: torch sees {torch.cuda.device_count()} CUDA GPU(s) on this machine")
    if chosen.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"device {device!r}: MPS is not available on this machine (try cpu or auto)")
    return chosen


# --- several processes ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ranks:
    """This process's place among those of a `torchrun` launch (one process without one). Every process reads the
    same inputs and plans the same batches; each runs its share (see `share`) and writes its own outputs into the
    shared output folder, and rank 0 merges what is shared (transcripts.tsv, hypotheses.jsonl)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # the process's number on its machine: its GPU

    @classmethod
    def from_environment(cls) -> Ranks:
        """torchrun's RANK, WORLD_SIZE and LOCAL_RANK; with more than one process, joins their gloo process group
        (for barriers only: no tensor crosses it, so gloo serves CPU and GPU runs alike)."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return cls()
        import datetime

        import torch.distributed as dist

        if not dist.is_initialized():
            # The barrier at the end waits for the slowest process, which may take hours on a long file; a process
            # that fails ends them all (torchrun), so no shorter timeout is needed.
            dist.init_process_group("gloo", timeout=datetime.timedelta(days=1))
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))

    def barrier(self) -> None:
        """Wait until every process gets here."""
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def device(self, device: str) -> str:
        """The device this process runs on: `auto` with several processes on a machine with GPUs means its own."""
        if device == "auto" and self.world_size > 1 and torch.cuda.is_available():
            return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        return device

    def share(self, seconds: Sequence[float]) -> list[int]:
        """Indices of the units of work (of these lengths) this process runs, in order: longest first, each to
        the process with the fewest seconds so far (the lowest rank on a tie), so that processes finish together."""
        loads = [0.0] * self.world_size
        mine = []
        for i in sorted(range(len(seconds)), key=lambda i: (-seconds[i], i)):
            rank = min(range(self.world_size), key=lambda r: (loads[r], r))
            loads[rank] += seconds[i]
            if rank == self.rank:
                mine.append(i)
        return sorted(mine)


# --- finding audio ----------------------------------------------------------------------------------------


def find_audio(paths: Iterable[str], *, recursive: bool = False) -> tuple[list[AudioSegment], list[Problem]]:
    """Files, folders (their audio files; with `recursive`, also in subfolders) and glob patterns, in order,
    each file once, with its duration from the header. Missing and unreadable files become Problems."""
    found: list[tuple[str, str]] = []  # (path, output name)
    problems: list[Problem] = []
    for pattern in paths:
        if os.path.isdir(pattern):
            files = Path(pattern).rglob("*") if recursive else Path(pattern).iterdir()
            audio = sorted(f for f in files if f.is_file() and f.suffix.lower() in AUDIO_SUFFIXES)
            if not audio:
                problems.append(Problem(pattern, None, "missing_file", "no audio files in this folder"))
            found += [(os.fspath(f), f.relative_to(pattern).with_suffix("").as_posix()) for f in audio]
        elif os.path.exists(pattern):
            found.append((pattern, Path(pattern).stem))
        elif glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern, recursive=recursive))
            if not matches:
                problems.append(Problem(pattern, None, "missing_file", "no file matches this pattern"))
            found += [(m, Path(m).stem) for m in matches if os.path.isfile(m)]
        else:
            problems.append(Problem(pattern, None, "missing_file", "no such file or folder"))
    segments = []
    seen: set[str] = set()
    for path, name in found:
        if os.path.abspath(path) in seen:
            continue
        seen.add(os.path.abspath(path))
        try:
            duration_s = audio_duration_s(path)
        except AudioError as err:
            problems.append(Problem(path, None, "unreadable_audio", err.message))
            continue
        if duration_s <= 0:
            problems.append(Problem(path, None, "zero_length", "the file holds no audio samples"))
            continue
        segments.append(AudioSegment(path, path, duration_s, name=name))
    return _unique_names(segments), problems


def _unique_names(segments: list[AudioSegment]) -> list[AudioSegment]:
    """Keep the suffix in names that would collide (a.wav, a.mp3), then number what still collides."""
    counts: dict[str, int] = {}
    for s in segments:
        counts[s.name] = counts.get(s.name, 0) + 1
    named = [s if counts[s.name] == 1 else _renamed(s, s.name + Path(s.path).suffix) for s in segments]
    taken: set[str] = set()
    result = []
    for s in named:
        name, n = s.name, 1
        while name in taken:
            n += 1
            name = f"{s.name}-{n}"
        taken.add(name)
        result.append(s if name == s.name else _renamed(s, name))
    return result


def _renamed(segment: AudioSegment, name: str) -> AudioSegment:
    return AudioSegment(segment.id, segment.path, segment.duration_s, segment.offset_s, name)


# --- running the model ------------------------------------------------------------------------------------


def transcribe(recognizer: Recognizer, segments: Sequence[AudioSegment], *, decoder: Decoder,
               options: TranscribeOptions = TranscribeOptions(), progress: bool = False, ranks: Ranks = Ranks(),
               ) -> Iterator[Transcription | Problem]:
    """Transcribe segments, yielding each result as soon as its batch (or its last window) is done.

    Order: short segments longest first, then long ones. Audio that fails to load is yielded as a Problem and
    the run goes on. Audio below `options.silence_dbfs` is yielded with an empty transcript and its level in
    `silent_dbfs`, without a forward pass. With several `ranks`, every process is given the same segments and
    transcribes its share of the batches, which are the batches one process would run (so each result is the same).
    """
    stream = None
    for event in _pieces(recognizer, segments, options, progress, ranks):
        if isinstance(event, Problem):
            stream = None  # a long file failed half-way: drop what it had decoded
            yield event
            continue
        if isinstance(event, _Silent):
            yield Transcription(event.segment, Transcript("", ()), silent_dbfs=event.level_dbfs)
            continue
        segment, log_probs, last = event
        if stream is None:
            stream = decoder.stream()
        stream.step(log_probs)
        if last:
            yield Transcription(segment, stream.finish())
            stream = None


def emissions(recognizer: Recognizer, segments: Sequence[AudioSegment], *,
              options: TranscribeOptions = TranscribeOptions(), progress: bool = False,
              ) -> Iterator[tuple[AudioSegment, torch.Tensor] | Problem]:
    """Each segment's (frames, vocab) log posteriors, long ones stitched from their windows; for decoding the
    same audio many times (LM tuning). A silent segment (`options.silence_dbfs`) has no frames: every decoder
    makes an empty transcript of it, as `transcribe` gives it."""
    pieces: list[torch.Tensor] = []
    for event in _pieces(recognizer, segments, options, progress, Ranks()):
        if isinstance(event, Problem):
            pieces = []
            yield event
            continue
        if isinstance(event, _Silent):
            yield event.segment, torch.zeros((0, len(recognizer.vocabulary)))
            continue
        segment, log_probs, last = event
        pieces.append(log_probs)
        if last:
            yield segment, torch.cat(pieces)
            pieces = []


@dataclass(frozen=True)
class _Silent:
    """A segment below TranscribeOptions.silence_dbfs, not run through the model."""

    segment: AudioSegment
    level_dbfs: float


def _pieces(recognizer: Recognizer, segments: Sequence[AudioSegment], options: TranscribeOptions,
            progress: bool, ranks: Ranks) -> Iterator[tuple[AudioSegment, torch.Tensor, bool] | _Silent | Problem]:
    """(segment, (frames, vocab) log posteriors, whether it is the segment's last piece), a silent segment, or a
    Problem; how many segments were silent is said once, at the end.

    A long segment's pieces come consecutively and in order, never interleaved with another segment's.
    """
    if options.chunk_s * recognizer.sample_rate_hz < recognizer.min_samples:
        raise InputError(f"chunk_s (--chunk-s) of {options.chunk_s:g} s is shorter than the model's receptive field "
                         f"({1000 * recognizer.min_samples / recognizer.sample_rate_hz:.3g} ms)")
    short = [s for s in segments if s.duration_s <= options.chunk_s]
    long = [s for s in segments if s.duration_s > options.chunk_s]
    rate, padding_free = recognizer.sample_rate_hz, not recognizer.use_attention_mask
    # Planned from the listed durations, before any audio is read; the loaded lengths decide each forward pass.
    batches = [[short[i] for i in batch] for batch in inference_batches(
        [round(s.duration_s * rate) for s in short], padding_free=padding_free,
        max_batch_samples=options.max_batch_s * rate)]
    if ranks.world_size > 1:
        units = batches + [[s] for s in long]
        mine = ranks.share([sum(s.duration_s for s in unit) for unit in units])
        batches, long = [units[i] for i in mine if i < len(batches)], [units[i][0] for i in mine if i >= len(batches)]
    total_s = sum(s.duration_s for s in long) + sum(s.duration_s for batch in batches for s in batch)
    silent = 0
    with progress_bar(show=progress, total=round(total_s, 1), unit="s", desc="audio", leave=False) as bar, \
            ThreadPoolExecutor(max_workers=1) as loader:
        # Read the next batch while the model runs on this one.
        pending = loader.submit(_load_batch, recognizer, batches[0]) if batches else None
        for i in range(len(batches)):
            loaded, problems = pending.result()
            if i + 1 < len(batches):
                pending = loader.submit(_load_batch, recognizer, batches[i + 1])
            yield from problems
            heard = []
            for segment, wave, moments in loaded:
                if options.silent(level := moments.level_dbfs()):
                    silent += 1
                    yield _Silent(segment, level)
                else:
                    heard.append((segment, wave, moments))
            # Audio shorter than its listed duration would be padded in its planned batch: split it off.
            for rows in inference_batches([len(wave) for _, wave, _ in heard], padding_free=padding_free):
                passed = [heard[row] for row in rows]
                stats = [moments.mean_std() for _, _, moments in passed] if recognizer.normalize else None
                log_probs, frames = recognizer.log_probs([wave for _, wave, _ in passed], stats=stats)
                for (segment, _, _), item, n in zip(passed, log_probs, frames.tolist()):
                    yield segment, item[:n], True
            bar.update(round(sum(s.duration_s for s in batches[i]), 1))
        for segment in long:
            try:
                for event in _windowed(recognizer, segment, options):
                    if isinstance(event, _Silent):
                        silent += 1
                        yield event
                    else:
                        yield segment, *event
            except AudioError as err:
                yield Problem(segment.path, None, "unreadable_audio", err.message, segment.id)
            bar.update(round(segment.duration_s, 1))
    if silent:
        logger.warning(f"{silent} of {len(long) + sum(len(batch) for batch in batches)} inputs are silent (below "
                       f"{options.silence_dbfs:g} dBFS): empty transcripts, not run through the model")


def _load_batch(recognizer: Recognizer, batch: Sequence[AudioSegment],
                ) -> tuple[list[tuple[AudioSegment, np.ndarray, Moments]], list[Problem]]:
    """Read a batch's audio, with each waveform's moments (its level, and its normalization when the model
    normalizes its input), off the thread that runs the model."""
    loaded, problems = [], []
    for segment in batch:
        try:
            wave = load_audio(segment.path, sample_rate_hz=recognizer.sample_rate_hz, offset_s=segment.offset_s,
                              duration_s=segment.duration_s)
        except AudioError as err:
            problems.append(Problem(segment.path, None, "unreadable_audio", err.message, segment.id))
            continue
        if len(wave) < recognizer.min_samples:
            rate = recognizer.sample_rate_hz
            problems.append(Problem(segment.path, None, "too_short",
                                    f"{1000 * len(wave) / rate:.3g} ms of audio, shorter than the model's receptive "
                                    f"field ({1000 * recognizer.min_samples / rate:.3g} ms): nothing to transcribe",
                                    segment.id))
            continue
        loaded.append((segment, wave, Moments.of(wave)))
    return loaded, problems


@dataclass(frozen=True)
class _Window:
    wave: np.ndarray  # samples read, context included
    keep_from: int  # first frame of the window's own part
    keep_to: int | None  # end of it; None: to the last frame (the segment's last window)


def _windowed(recognizer: Recognizer, segment: AudioSegment,
              options: TranscribeOptions) -> Iterator[tuple[torch.Tensor, bool] | _Silent]:
    """The kept frames of each window of a long segment, in order, and whether it is the last; or the segment as
    silent, judged by the level of all its windows (a silent stretch inside speech is normalized by the speech's
    level, as a single pass would, so its noise stays as faint as a pause's)."""
    rate, per_frame = recognizer.sample_rate_hz, recognizer.samples_per_frame
    # Window starts on frame boundaries, so that window frames line up with the frames of a single pass.
    chunk = max(1, round(options.chunk_s * rate / per_frame)) * per_frame
    stride = round(options.stride_s * rate / per_frame) * per_frame
    total = round(segment.duration_s * rate)
    # The whole segment's statistics, as a single pass would normalize with.
    moments = (_segment_moments(recognizer, segment, chunk, total)
               if recognizer.normalize or options.silence_dbfs is not None else None)
    if moments is not None and options.silent(level := moments.level_dbfs()):
        yield _Silent(segment, level)
        return
    stats = moments.mean_std() if recognizer.normalize else None

    def windows() -> Iterator[_Window]:
        start = 0
        while start < total:
            read_from, read_to = max(0, start - stride), min(total, start + chunk + stride)
            if total - (start + chunk - stride) < recognizer.min_samples:
                read_to = total  # the rest would make a window too short for the convolutions: it joins this one
            wave = _read(recognizer, segment, read_from, read_to)
            last = read_to >= total or len(wave) < read_to - read_from
            keep_from = (start - read_from) // per_frame
            yield _Window(wave, keep_from, None if last else keep_from + chunk // per_frame)
            if last:
                return
            start += chunk

    budget = max(1, int(options.max_batch_s * rate))
    batch: list[_Window] = []
    for window in windows():
        # Only windows of equal length share a pass: padding would change what a mask-less model sees.
        if batch and (len(window.wave) != len(batch[0].wave) or (len(batch) + 1) * len(window.wave) > budget):
            yield from _run_windows(recognizer, batch, stats, last=False)
            batch = []
        batch.append(window)
    yield from _run_windows(recognizer, batch, stats, last=True)


def _run_windows(recognizer: Recognizer, batch: list[_Window], stats: tuple[float, float] | None, *,
                 last: bool) -> Iterator[tuple[torch.Tensor, bool]]:
    log_probs, frames = recognizer.log_probs([w.wave for w in batch],
                                             stats=None if stats is None else [stats] * len(batch))
    for k, (window, item, n) in enumerate(zip(batch, log_probs, frames.tolist())):
        keep_to = n if window.keep_to is None else min(window.keep_to, n)
        yield item[window.keep_from: max(window.keep_from, keep_to)], last and k == len(batch) - 1


def _segment_moments(recognizer: Recognizer, segment: AudioSegment, chunk: int, total: int) -> Moments:
    moments = Moments()
    for start in range(0, total, chunk):
        wave = _read(recognizer, segment, start, min(total, start + chunk))
        moments.add(wave)
        if len(wave) < min(total, start + chunk) - start:
            break
    return moments


def _read(recognizer: Recognizer, segment: AudioSegment, start: int, end: int) -> np.ndarray:
    """Samples [start, end) of the segment at the model's rate."""
    rate = recognizer.sample_rate_hz
    return load_audio(segment.path, sample_rate_hz=rate, offset_s=segment.offset_s + start / rate,
                      duration_s=(end - start) / rate)


# --- writing results --------------------------------------------------------------------------------------


class OutputWriter:
    """Writes each transcription as soon as it is done: one file per format (txt, json, srt, vtt) under the
    output folder, and a row `path<TAB>text` (fields escaped by tsv_escape) of the folder's transcripts.tsv.

    Finished work is kept across runs: `unfinished` leaves out inputs whose outputs are all there already (unless
    `overwrite`), and transcripts.tsv keeps the rows of earlier runs. Each file is written whole or not at all;
    the TSV grows by one appended row per file (a kill loses at most the row being written) and `close` rewrites
    it, atomically, with its rows in input order.

    With several `ranks`, each process appends its rows to its own part file (transcripts.tsv.rankN, read back
    like the TSV by the next run should this one be killed), and `close` (called by every process) has rank 0
    merge the parts into transcripts.tsv once all have finished.
    """

    def __init__(self, directory: str | os.PathLike, formats: Sequence[str], *, overwrite: bool = False,
                 ranks: Ranks = Ranks()):
        unknown = [f for f in formats if f not in OUTPUT_FORMATS]
        if unknown:
            raise InputError(f"unknown output format(s) {', '.join(unknown)} (choose from "
                             f"{', '.join(OUTPUT_FORMATS)})")
        self.directory = output_folder(directory)
        self.formats = tuple(formats)
        self.overwrite = overwrite
        self.ranks = ranks
        self._index = self.directory / TSV_NAME if "tsv" in formats else None
        self._rows: dict[str, str] = {}
        self._tsv = None
        if self._index is not None:
            self._rows = self._read_rows()
            if ranks.world_size == 1:
                self._merge()  # without a row a kill left unfinished, before appending
                rows = self._index
            else:
                rows = self._part(ranks.rank)
                _write_index(rows, read_index(rows))  # this process's own part, likewise
            self._tsv = open(rows, "a", encoding="utf-8", newline="")

    def _part(self, rank: int) -> Path:
        return self._index.with_name(f"{TSV_NAME}.rank{rank}")

    def _parts(self) -> list[Path]:
        """The part files of the processes of this or an earlier run, in rank order."""
        found = [(path, path.name[len(f"{TSV_NAME}.rank"):]) for path in self.directory.glob(f"{TSV_NAME}.rank*")]
        return [path for path, rank in sorted((f for f in found if f[1].isdigit()), key=lambda f: int(f[1]))]

    def _read_rows(self) -> dict[str, str]:
        rows = read_index(self._index)
        for part in self._parts():
            rows.update(read_index(part))
        return rows

    def _merge(self, order: Sequence[str] = ()) -> None:
        """Rewrite transcripts.tsv with every row written so far (ids in `order` first), then drop the parts."""
        rows = self._read_rows()
        ids = [i for i in order if i in rows]
        ordered = set(ids)  # once: a set built per row would make a large folder's merge quadratic
        ids += [i for i in rows if i not in ordered]
        _write_index(self._index, {i: rows[i] for i in ids})
        for part in self._parts():
            part.unlink()

    def finished(self, segment: AudioSegment) -> bool:
        """Whether every requested output of this segment is there: its files, and its row in the TSV."""
        files = all((self.directory / f"{segment.name}.{fmt}").is_file() for fmt in self.formats if fmt != "tsv")
        return files and (self._index is None or segment.id in self._rows)

    def unfinished(self, segments: Sequence[AudioSegment]) -> list[AudioSegment]:
        """The segments still to transcribe: all of them with `overwrite`, else those not `finished`. With several
        ranks every process must call it, before any writes: all get the same list."""
        todo = list(segments) if self.overwrite else [s for s in segments if not self.finished(s)]
        self.ranks.barrier()  # no process writes an output before every one has looked
        return todo

    def write(self, transcription: Transcription) -> None:
        segment, transcript = transcription.segment, transcription.transcript
        texts = {
            "txt": lambda: transcript.text + "\n",
            "json": lambda: json.dumps(transcript_to_dict(transcription), ensure_ascii=False, indent=1) + "\n",
            "srt": lambda: format_srt(transcript, duration_s=segment.duration_s),
            "vtt": lambda: format_vtt(transcript, duration_s=segment.duration_s),
        }
        for fmt in self.formats:
            if fmt in texts:
                path = self.directory / f"{segment.name}.{fmt}"
                path.parent.mkdir(parents=True, exist_ok=True)
                with atomic_write(path) as f:
                    f.write(texts[fmt]())
        if self._tsv is not None:
            # After the files: a row in the TSV means the files are complete.
            self._rows[segment.id] = transcript.text
            self._tsv.write(f"{tsv_escape(segment.id)}\t{tsv_escape(transcript.text)}\n")
            self._tsv.flush()

    def close(self, order: Sequence[AudioSegment] = ()) -> None:
        """Close the TSV, rewritten with its rows in the order of `order` (rows of other ids follow). With several
        ranks, waits for every process, and rank 0 merges the parts."""
        if self._tsv is None:
            return
        self._tsv.close()
        self._tsv = None
        self.ranks.barrier()
        if self.ranks.rank == 0:
            self._merge([s.id for s in order])


_TSV_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
_TSV_UNESCAPES = {"\\": "\\", "t": "\t", "n": "\n", "r": "\r"}


def tsv_escape(text: str) -> str:
    r"""A field of transcripts.tsv and of the `path<TAB>text` lines `speechxfer transcribe` prints: backslash, tab,
    newline and carriage return written as \\, \t, \n and \r, so a row stays one line of two fields whatever the
    file is called. tsv_unescape undoes it."""
    return text.translate(_TSV_ESCAPES)


def tsv_unescape(field: str) -> str:
    """The text tsv_escape was given (a backslash before any other character is kept as it is)."""
    return re.sub(r"\\(.)", lambda m: _TSV_UNESCAPES.get(m.group(1), m.group(0)), field, flags=re.DOTALL)


def read_index(path: str | os.PathLike) -> dict[str, str]:
    """The rows of a transcripts.tsv, {path: text} with the escapes undone; {} when there is no such file.

    A last line without its newline (a run killed while writing it) is left out; of two rows of one path, the later
    wins. InputError for a file that is not such a table (it would be overwritten otherwise).
    """
    try:
        with open(path, encoding="utf-8", newline="") as f:
            lines = f.read().split("\n")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read: {err}", path=path) from None
    rows: dict[str, str] = {}
    for number, line in enumerate(lines[:-1], start=1):  # what follows the last newline is an unfinished row
        if not line:
            continue
        cells = line.split("\t")
        if len(cells) != 2:
            raise InputError(f"expected PATH<TAB>TEXT, got {len(cells)} tab-separated fields (move the file away "
                             "or choose another --output-dir)", path=path, line=number)
        rows[tsv_unescape(cells[0])] = tsv_unescape(cells[1])
    return rows


def _write_index(path: Path, rows: dict[str, str]) -> None:
    with atomic_write(path) as f:
        f.write("".join(f"{tsv_escape(i)}\t{tsv_escape(t)}\n" for i, t in rows.items()))



def transcript_to_dict(transcription: Transcription) -> dict:
    """The JSON output: path, id, duration, text and words with start/end seconds and confidence."""
    segment, transcript = transcription.segment, transcription.transcript
    return {"id": segment.id, "path": segment.path, "offset_s": segment.offset_s, "duration_s": segment.duration_s,
            "text": transcript.text,
            "words": [{"word": w.word, "start_s": round(w.start_s, 3), "end_s": round(w.end_s, 3),
                       "confidence": round(w.confidence, 4)} for w in transcript.words]}


def subtitle_cues(words: Sequence[WordTiming], *, duration_s: float) -> list[tuple[float, float, str]]:
    """Group words into (start_s, end_s, text) cues of at most _MAX_CUE_CHARS characters and _MAX_CUE_S seconds,
    times clipped to the audio's duration."""
    cues: list[list[WordTiming]] = []
    for word in words:
        if cues:
            current = cues[-1]
            chars = sum(len(w.word) + 1 for w in current) + len(word.word)
            if chars <= _MAX_CUE_CHARS and word.end_s - current[0].start_s <= _MAX_CUE_S:
                current.append(word)
                continue
        cues.append([word])
    return [(min(c[0].start_s, duration_s), min(c[-1].end_s, duration_s), " ".join(w.word for w in c))
            for c in cues]


def format_srt(transcript: Transcript, *, duration_s: float) -> str:
    """SubRip subtitles: numbered cues with HH:MM:SS,mmm times."""
    return "".join(f"{n}\n{_timestamp(start, ',')} --> {_timestamp(end, ',')}\n{text}\n\n"
                   for n, (start, end, text) in enumerate(subtitle_cues(transcript.words, duration_s=duration_s),
                                                          start=1))


def format_vtt(transcript: Transcript, *, duration_s: float) -> str:
    """WebVTT subtitles: a header, then cues with HH:MM:SS.mmm times."""
    return "WEBVTT\n\n" + "".join(f"{_timestamp(start, '.')} --> {_timestamp(end, '.')}\n{text}\n\n"
                                  for start, end, text in subtitle_cues(transcript.words, duration_s=duration_s))


def _timestamp(seconds: float, decimal_marker: str) -> str:
    ms = int(round(seconds * 1000))
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}{decimal_marker}{ms % 1000:03d}"
