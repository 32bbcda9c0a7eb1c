"""Synthetic speech corpora: sentences spoken by espeak-ng with a random voice per utterance, written as 16 kHz
FLAC with JSONL manifests split into train/dev/test.

espeak-ng is GPL-3, so it stays an optional extra (`pip install speechxfer[synth]`, which brings the
`espeakng-loader` wheel with libespeak-ng and its data); without it the Debian `espeak-ng` program is used.
Nothing else in speechxfer imports this module.
"""

from __future__ import annotations

import ctypes
import importlib.util
import multiprocessing
import os
import shutil
import subprocess
import tempfile
import unicodedata
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from speechxfer.audio import SAMPLE_RATE_HZ
from speechxfer.errors import InputError, Problem, SpeechxferError, decoded_text, output_folder
from speechxfer.manifest import Utterance, write_manifest

# espeak-ng voice variants that sound like plain speech (whisper, croak and the novelty voices are left out).
VARIANTS = ("f1", "f2", "f3", "f4", "f5", "m1", "m2", "m3", "m4", "m5", "m6", "m7",
            "klatt", "klatt2", "klatt3", "klatt4")
SPEED_WPM_RANGE = (130, 190)  # espeak-ng's default is 175 words per minute
PITCH_RANGE = (30, 70)  # espeak-ng pitch, 0-99, default 50
# Utterances spoken by one fresh process. espeak-ng carries state from one utterance to the next (pitch
# flutter, its random generators), so only a fixed sequence spoken from a fresh start repeats sample for
# sample; fixed-size shards make the corpus independent of how many processes speak it.
SHARD_SIZE = 64
SPLITS = ("train", "dev", "test")

_AUDIO_OUTPUT_SYNCHRONOUS = 2  # espeak_AUDIO_OUTPUT: samples go to the callback, espeak_Synth returns when done
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_PARAM_RATE = 1
_PARAM_PITCH = 3


@dataclass(frozen=True)
class Voice:
    """One way of speaking: an espeak-ng language voice with a variant, speed and pitch."""

    language: str  # espeak-ng voice name, usually the ISO 639-1 code ("de", "pt", "fr")
    variant: str  # one of VARIANTS
    speed_wpm: int
    pitch: int  # espeak-ng pitch, 0-99

    @property
    def name(self) -> str:
        """The name espeak-ng selects the voice by, e.g. "de+f3"."""
        return f"{self.language}+{self.variant}"

    @property
    def id(self) -> str:
        """Speaker id for manifests, e.g. "de+f3-s160-p45"."""
        return f"{self.name}-s{self.speed_wpm}-p{self.pitch}"


def random_voice(language: str, rng: np.random.Generator) -> Voice:
    """Draw a variant, speed and pitch uniformly from VARIANTS, SPEED_WPM_RANGE and PITCH_RANGE."""
    return Voice(language=language,
                 variant=VARIANTS[int(rng.integers(len(VARIANTS)))],
                 speed_wpm=int(rng.integers(SPEED_WPM_RANGE[0], SPEED_WPM_RANGE[1] + 1)),
                 pitch=int(rng.integers(PITCH_RANGE[0], PITCH_RANGE[1] + 1)))


def espeak_available() -> bool:
    """True when either the espeakng-loader package or the `espeak-ng` program is installed."""
    return importlib.util.find_spec("espeakng_loader") is not None or shutil.which("espeak-ng") is not None


class _LibraryEspeak:
    """libespeak-ng from the espeakng-loader wheel, called in this process through ctypes."""

    _Callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

    def __init__(self, *, seed: int):
        import espeakng_loader

        self._lib = lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                     ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        self.sample_rate_hz = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0,
                                                    espeakng_loader.get_data_path().encode(), 0)
        if self.sample_rate_hz <= 0:
            raise SpeechxferError("libespeak-ng (espeakng-loader) failed to initialize")
        # espeak-ng draws from its own generator and from libc's rand(); seeding both makes it repeatable.
        lib.espeak_ng_SetRandSeed(seed)
        ctypes.CDLL(None).srand(ctypes.c_uint(seed))
        self._chunks: list[np.ndarray] = []
        self._callback = self._Callback(self._collect)  # kept on self: ctypes must not free it while in use
        lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, samples, count: int, events) -> int:
        if count > 0:
            self._chunks.append(np.ctypeslib.as_array(samples, shape=(count,)).copy())
        return 0  # 0: go on synthesizing

    def speak(self, text: str, voice: Voice) -> np.ndarray:
        """(samples,) int16 at self.sample_rate_hz."""
        if self._lib.espeak_SetVoiceByName(voice.name.encode()) != 0:
            raise InputError(f"espeak-ng has no voice {voice.name!r}")
        self._lib.espeak_SetParameter(_PARAM_RATE, voice.speed_wpm, 0)
        self._lib.espeak_SetParameter(_PARAM_PITCH, voice.pitch, 0)
        data = text.encode()
        self._chunks = []
        if self._lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None) != 0:
            raise SpeechxferError(f"espeak-ng failed to speak {text!r} with {voice.name}")
        return np.concatenate(self._chunks) if self._chunks else np.zeros(0, dtype=np.int16)


class _ProgramEspeak:
    """The Debian `espeak-ng` program, one run per utterance (each run starts from a fresh state)."""

    def __init__(self, executable: str):
        self._executable = executable
        self.sample_rate_hz = 0  # known after the first utterance, from the WAV header

    def speak(self, text: str, voice: Voice) -> np.ndarray:
        """(samples,) int16 at self.sample_rate_hz."""
        with tempfile.TemporaryDirectory() as folder:
            wav = os.path.join(folder, "utterance.wav")
            # The text goes through stdin so that a sentence starting with "-" is not taken for an option.
            run = subprocess.run([self._executable, "-v", voice.name, "-s", str(voice.speed_wpm),
                                  "-p", str(voice.pitch), "-w", wav],
                                 input=text.encode(), capture_output=True)
            if run.returncode != 0 or not os.path.isfile(wav):
                message = run.stderr.decode(errors="replace").strip()
                raise InputError(f"espeak-ng failed with voice {voice.name!r}: {message}")
            samples, self.sample_rate_hz = sf.read(wav, dtype="int16")
        return samples


def _open_espeak(*, seed: int) -> _LibraryEspeak | _ProgramEspeak:
    try:
        return _LibraryEspeak(seed=seed)
    except ImportError:
        executable = shutil.which("espeak-ng")
        if executable is None:
            raise SpeechxferError("espeak-ng is not installed: `pip install speechxfer[synth]` (GPL-3 "
                                  "espeakng-loader) or install the `espeak-ng` program") from None
        return _ProgramEspeak(executable)


def is_plain_sentence(sentence: str, *, alphabet: str, punctuation: str, min_words: int = 4,
                      max_words: int = 20) -> bool:
    """Whether `sentence` is plain prose worth speaking: min_words..max_words words, every letter (Unicode
    category L) in `alphabet`, itself or as its lowercase (so `alphabet` lists lowercase letters), every other
    character a space or in `punctuation`, and no word with more than one capital (acronyms, CamelCase names).
    Digits and symbols are not letters, so they reject the sentence unless listed in `punctuation`."""
    words = sentence.split()
    if not min_words <= len(words) <= max_words:
        return False
    for word in words:
        if sum(c.isupper() for c in word) > 1:
            return False
        for c in word:
            if unicodedata.category(c).startswith("L"):
                if c not in alphabet and c.lower() not in alphabet:
                    return False
            elif c not in punctuation:
                return False
    return True


@dataclass(frozen=True)
class SynthCorpus:
    """What `build_corpus` wrote: utterances per split (sorted by id) and the sentences it skipped."""

    splits: dict[str, list[Utterance]]
    problems: list[Problem]


@dataclass(frozen=True)
class _Shard:
    language: str
    items: list[tuple[int, str]]  # (utterance index, sentence)
    audio_dir: str
    seed: int
    noise_snr_db: float | None


def _speak_shard(shard: _Shard) -> tuple[list[tuple[int, Utterance]], list[tuple[int, str]]]:
    """Speak one shard in this (fresh) process: (index, utterance) pairs and (index, sentence) left silent."""
    espeak = _open_espeak(seed=shard.seed)
    spoken, silent = [], []
    for index, sentence in shard.items:
        rng = np.random.default_rng([shard.seed, index])
        voice = random_voice(shard.language, rng)
        samples = espeak.speak(sentence, voice).astype(np.float32) / 32768.0
        if samples.size == 0:
            silent.append((index, sentence))
            continue
        samples = soxr.resample(samples, espeak.sample_rate_hz, SAMPLE_RATE_HZ, quality="HQ")
        if shard.noise_snr_db is not None:
            samples = samples + _noise(samples, snr_db=shard.noise_snr_db, rng=rng)
            samples = np.clip(samples, -1.0, 1.0)
        utterance_id = f"{shard.language}-{index:06d}"
        path = os.path.join(shard.audio_dir, f"{utterance_id}.flac")
        sf.write(path, samples, SAMPLE_RATE_HZ, format="FLAC", subtype="PCM_16")
        spoken.append((index, Utterance(id=utterance_id, audio_path=path, text=sentence,
                                        duration_s=samples.size / SAMPLE_RATE_HZ, speaker=voice.id,
                                        language=shard.language)))
    return spoken, silent


def _noise(samples: np.ndarray, *, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """White noise whose power is the power of `samples` (silence included) minus `snr_db` decibels."""
    power = float(np.mean(samples.astype(np.float64) ** 2))
    scale = np.sqrt(power / 10 ** (snr_db / 10))
    return (scale * rng.standard_normal(samples.size)).astype(np.float32)


def read_sentences(path: str | os.PathLike) -> list[str]:
    """Non-empty lines of a UTF-8 text file, stripped, first occurrences only. InputError names the file."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:  # its strerror alone: str(err) would name the path a second time
        raise InputError(f"cannot read sentences: {err.strerror}", path=path) from None
    lines = decoded_text(data, path).splitlines()
    sentences = list(dict.fromkeys(line.strip() for line in lines if line.strip()))
    if not sentences:
        raise InputError("no sentences", path=path)
    return sentences


def build_corpus(language: str, sentences: Iterable[str], out_dir: str | os.PathLike, *, count: int | None = None,
                 seed: int = 0, jobs: int = 1, noise_snr_db: float | None = None, dev_fraction: float = 0.05,
                 test_fraction: float = 0.05) -> SynthCorpus:
    """Speak the first `count` sentences (all when None) with a random voice each and write a corpus.

    Writes out_dir/audio/<language>-<index>.flac (16 kHz mono) and out_dir/{train,dev,test}.jsonl. The
    split is a seeded permutation of the sentences (dev and test get at least one each when there are three
    or more), the voice and noise of utterance i come from (seed, i), and every SHARD_SIZE utterances are
    spoken by a fresh process: the same arguments give the same files for any `jobs`.
    """
    chosen = list(dict.fromkeys(sentences))[:count]
    if not chosen:
        raise InputError("no sentences to speak")
    audio_dir = output_folder(out_dir) / "audio"  # out_dir first: an error then names it, not out_dir/audio
    audio_dir.mkdir(exist_ok=True)
    items = list(enumerate(chosen))
    shards = [_Shard(language, items[start:start + SHARD_SIZE], str(audio_dir.resolve()), seed, noise_snr_db)
              for start in range(0, len(items), SHARD_SIZE)]
    # spawn + one shard per process: a process that already spoke (or a fork of one) would not repeat exactly
    try:
        with ProcessPoolExecutor(max_workers=max(1, min(jobs, len(shards))), max_tasks_per_child=1,
                                 mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(_speak_shard, shards))
    except BrokenProcessPool as err:
        raise SpeechxferError(f"a synthesis process died ({err}); run from a script file or `speechxfer synth`, "
                              "not from standard input (spawned processes re-import the main module)") from err
    spoken = dict(pair for pairs, _ in results for pair in pairs)
    problems = [Problem(path=os.fspath(out_dir), line=None, kind="empty_audio", message=f"espeak-ng spoke nothing for "
                        f"{sentence!r}", utterance_id=f"{language}-{index:06d}")
                for _, silent in results for index, sentence in silent]

    order = np.random.default_rng(seed).permutation(len(chosen))
    held_out = len(chosen) >= 3
    n_test = max(int(held_out and test_fraction > 0), round(test_fraction * len(chosen)))
    n_dev = max(int(held_out and dev_fraction > 0), round(dev_fraction * len(chosen)))
    split_of = {int(i): "test" for i in order[:n_test]}
    split_of.update({int(i): "dev" for i in order[n_test:n_test + n_dev]})
    splits: dict[str, list[Utterance]] = {name: [] for name in SPLITS}
    for index in sorted(spoken):
        splits[split_of.get(index, "train")].append(spoken[index])
    for name, utterances in splits.items():
        write_manifest(Path(out_dir) / f"{name}.jsonl", utterances)
    return SynthCorpus(splits=splits, problems=problems)
