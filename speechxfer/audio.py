"""Audio loading: any file soundfile reads (WAV, FLAC, OGG/Opus, MP3, ...), others through audioread
(ffmpeg); always returned as 16 kHz mono float32."""

from __future__ import annotations

import os

import numpy as np
import soundfile as sf
import soxr

from speechxfer.errors import AudioError

SAMPLE_RATE_HZ = 16000
# Files a folder is searched for; files named one by one may have any suffix the audio layer reads.
AUDIO_SUFFIXES = frozenset({".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".aac", ".wma", ".aif", ".aiff",
                            ".au", ".sph", ".webm", ".mp4"})


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
        raise AudioError("audio holds NaN or infinite samples", path=path)
    if file_rate_hz != sample_rate_hz:
        mono = soxr.resample(mono, file_rate_hz, sample_rate_hz, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


def audio_duration_s(path: str | os.PathLike) -> float:
    """Length of the file in seconds, from its header where soundfile reads the format (no decoding);
    through audioread (ffmpeg probes the stream) otherwise. 0.0 for a file without samples. AudioError if
    the file is missing or unreadable."""
    path = os.fspath(path)
    _check_exists(path)
    try:
        info = sf.info(path)
        return info.frames / info.samplerate
    except sf.LibsndfileError as sf_err:
        import audioread  # only for formats libsndfile lacks; it is slow to import

        try:
            with audioread.audio_open(path) as f:
                return float(f.duration)
        except Exception as err:  # audioread's backends raise assorted types (DecodeError, EOFError, ...)
            raise AudioError(_unreadable(sf_err, err), path=path) from err


def _check_exists(path: str) -> None:
    if not os.path.isfile(path):
        raise AudioError("no such audio file", path=path)
    if os.path.getsize(path) == 0:
        raise AudioError("empty file (0 bytes)", path=path)


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
