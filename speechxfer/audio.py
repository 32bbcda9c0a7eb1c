"""Audio loading: any file soundfile reads (WAV, FLAC, OGG/Opus, MP3, ...), others through audioread
(ffmpeg); always returned as 16 kHz mono float32. And the level of audio, which tells silence from sound."""

from __future__ import annotations

import math
import os
import stat

import numpy as np
import soundfile as sf
import soxr

from speechxfer.errors import AudioError

SAMPLE_RATE_HZ = 16000
# Files a folder is searched for; files named one by one may have any suffix the audio layer reads.
AUDIO_SUFFIXES = frozenset({".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".aac", ".wma", ".aif", ".aiff",
                            ".au", ".sph", ".webm", ".mp4"})

# Audio whose level (Moments.level_dbfs) is below this gets an empty transcript without running the model, in
# `transcribe` and its users (TranscribeOptions.silence_dbfs) and in training's dev/test decoding. Level: the RMS
# about the mean (what the normalization divides by, so a DC offset hides no silence; 0 dBFS: a full-scale square
# wave). Digital silence with a little quantization noise (Asterisk's silence/N.wav: -96 dBFS, 16-bit zeros +-1 LSB)
# is raised ~3000x by the normalization and decoded as words; A-law's idle channel with noise is -72 dBFS. The
# quietest real recordings measured: -24 dBFS (Asterisk es_MX Allison speech; a beep -29), -26 (it_IT Carlo), -29
# (esco), -33 (the demo's espeak audio); speech scaled down to -70 dBFS as 16-bit still decodes (es18-3000 test WER
# 52.3% against 50.9%; 61.7% at -80).
SILENCE_DBFS = -70.0

# Added to the variance before the square root, as transformers' Wav2Vec2FeatureExtractor does.
NORM_EPSILON = 1e-7

# sample formats (soundfile subtypes) that can hold NaN or infinite values; integer PCM and compressed formats cannot
_FLOAT_SUBTYPES = ("FLOAT", "DOUBLE")
_NOT_FINITE = "audio holds NaN or infinite samples"


def load_audio(path: str | os.PathLike, *, sample_rate_hz: int = SAMPLE_RATE_HZ, offset_s: float = 0.0,
               duration_s: float | None = None) -> np.ndarray:
    """Read `duration_s` seconds (all when None) starting at `offset_s` from `path`.

    Returns (samples,) float32 in [-1, 1], channels averaged to mono, resampled to `sample_rate_hz` with soxr's
    band-limited high-quality resampler. Only the requested span is decoded where the format can seek.
    Raises AudioError naming the file when it is missing, unreadable, empty (at that offset), or not finite.
    """
    path = os.fspath(path)
    if offset_s < 0 or (duration_s is not None and duration_s <= 0):
        raise AudioError(f"bad span: offset {offset_s} s, duration {duration_s} s", path=path)
    _check_exists(path)
    try:
        samples, file_rate_hz = _read_soundfile(path, offset_s, duration_s)
    except sf.LibsndfileError as sf_err:
        samples, file_rate_hz = _read_fallback(path, offset_s, duration_s, sf_err)
    if samples.shape[0] == 0:
        where = "" if offset_s == 0 else f" at offset {offset_s:g} s"
        raise AudioError(f"no audio samples{where}", path=path)
    mono = samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]
    if not np.isfinite(mono).all():
        raise AudioError(_NOT_FINITE, path=path)
    if file_rate_hz != sample_rate_hz:
        mono = soxr.resample(mono, file_rate_hz, sample_rate_hz, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


def audio_duration_s(path: str | os.PathLike, *, check_finite: bool = False) -> float:
    """Length of the file in seconds, from its header where soundfile reads the format (no decoding);
    through audioread (ffmpeg probes the stream) otherwise. 0.0 for a file without samples. AudioError if
    the file is missing or unreadable, or, with `check_finite`, holds NaN or infinite samples: only float
    formats can, so only those are read in full."""
    path = os.fspath(path)
    _check_exists(path)
    try:
        info = sf.info(path)
    except sf.LibsndfileError as sf_err:
        import audioread  # only for formats libsndfile lacks; it is slow to import

        try:
            with audioread.audio_open(path) as f:
                return float(f.duration)
        except Exception as err:  # audioread's backends raise assorted types (DecodeError, EOFError, ...)
            raise AudioError(_unreadable(sf_err, err), path=path) from err
    if check_finite and info.subtype in _FLOAT_SUBTYPES:
        with sf.SoundFile(path) as f:
            # a minute at a time, so that a long recording is never held whole in memory
            while (block := f.read(60 * f.samplerate, dtype="float32")).size:
                if not np.isfinite(block).all():
                    raise AudioError(_NOT_FINITE, path=path)
    return info.frames / info.samplerate


def file_problem(path: str | os.PathLike) -> tuple[str, str] | None:
    """(kind, message) when `path` is not a non-empty regular file, else None. One stat, nothing opened: cheap
    enough to run over every file of a large manifest before training."""
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return "missing_file", "no such audio file"
    except OSError as err:
        return "unreadable_audio", f"cannot read: {err.strerror}"
    if stat.S_ISDIR(status.st_mode):
        return "unreadable_audio", "a folder, not an audio file"
    if not stat.S_ISREG(status.st_mode):
        return "unreadable_audio", "not a regular file"
    if status.st_size == 0:
        return "unreadable_audio", "empty file (0 bytes)"
    return None



def _check_exists(path: str) -> None:
    problem = file_problem(path)
    if problem is not None:
        raise AudioError(problem[1], path=path)


def _read_soundfile(path: str, offset_s: float, duration_s: float | None) -> tuple[np.ndarray, int]:
    """(frames, channels) float32 and the file's rate, seeking so only the span is decoded."""
    with sf.SoundFile(path) as f:
        start = int(round(offset_s * f.samplerate))
        if start >= f.frames:
            return np.zeros((0, f.channels), dtype=np.float32), f.samplerate
        if start:
            f.seek(start)
        frames = -1 if duration_s is None else int(round(duration_s * f.samplerate))
        return f.read(frames, dtype="float32", always_2d=True), f.samplerate


def _read_fallback(path: str, offset_s: float, duration_s: float | None,
                   sf_err: sf.LibsndfileError) -> tuple[np.ndarray, int]:
    """Formats libsndfile does not know (AAC/M4A, WMA, ...) through audioread (ffmpeg or GStreamer), which
    decodes from the start: stop once the span is complete."""
    import audioread  # only for formats libsndfile lacks; it is slow to import

    try:
        with audioread.audio_open(path) as f:
            channels, rate_hz = f.channels, f.samplerate
            start = int(round(offset_s * rate_hz)) * channels
            stop = None if duration_s is None else start + int(round(duration_s * rate_hz)) * channels
            chunks, have = [], 0
            for buffer in f:  # interleaved 16-bit little-endian PCM
                chunks.append(np.frombuffer(buffer, dtype="<i2"))
                have += chunks[-1].size
                if stop is not None and have >= stop:
                    break
    except Exception as err:  # audioread's backends raise assorted types (DecodeError, EOFError, ...)
        raise AudioError(_unreadable(sf_err, err), path=path) from err
    pcm = np.concatenate(chunks) if chunks else np.zeros(0, dtype="<i2")
    samples = pcm[start:stop].astype(np.float32) / 32768.0
    samples = samples[: samples.size - samples.size % channels]
    return samples.reshape(-1, channels), rate_hz


def _unreadable(sf_err: sf.LibsndfileError, fallback_err: Exception) -> str:
    fallback = str(fallback_err) or type(fallback_err).__name__
    return f"unreadable audio (soundfile: {sf_err.error_string}; audioread: {fallback})"


class Moments:
    """Running mean and variance of samples, in float64 so that windows add up to the whole file's: the level of
    audio, and the statistics the feature extractor's normalization takes."""

    def __init__(self) -> None:
        self.count = 0
        self.total = 0.0
        self.squares = 0.0

    @classmethod
    def of(cls, samples: np.ndarray) -> Moments:
        moments = cls()
        moments.add(samples)
        return moments

    def add(self, samples: np.ndarray) -> None:
        x = samples.astype(np.float64)
        self.count += x.size
        self.total += float(x.sum())
        self.squares += float(np.dot(x, x))

    def _variance(self) -> float:
        mean = self.total / self.count
        return max(self.squares / self.count - mean * mean, 0.0)

    def mean_std(self) -> tuple[float, float]:
        return self.total / self.count, math.sqrt(self._variance() + NORM_EPSILON)

    def level_dbfs(self) -> float:
        """The RMS about the mean in dBFS (-inf for a constant)."""
        variance = self._variance()
        return 10 * math.log10(variance) if variance > 0 else -math.inf


def is_silent(level_dbfs: float, silence_dbfs: float | None) -> bool:
    """Whether audio of this level (Moments.level_dbfs) is silence under the threshold `silence_dbfs` (None: no
    audio is): what transcription and training's dev/test decoding leave to an empty transcript."""
    return silence_dbfs is not None and level_dbfs < silence_dbfs
