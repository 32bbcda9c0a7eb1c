"""Waveform augmentation for training: speed perturbation, additive noise, reverberation, a telephone channel and
gain, each drawn per utterance with its own probability and range, and deterministic for (seed, epoch, utterance).

`augment(wave, ...)` applies the chain speed → reverberation → noise → gain → telephone, in the order sound meets
them: a talker in a room with background noise, picked up at some level, sent through a phone line. Each effect
draws from its own numpy Generator, seeded from a stable hash of (seed, epoch, effect, utterance id), so the output
does not depend on the loader worker, the process, or the order utterances are read in; a resumed run sees the
same audio as an uninterrupted one, and switching one effect on or off leaves the draws of the others unchanged.

Written here over soxr (already the resampler of `speechxfer.audio`) and scipy.signal rather than taken from a
library, because determinism per utterance is a hard requirement and none of the candidates takes a Generator:
- audiomentations 0.43.1 draws every parameter from Python's global `random` (`random.random() < self.p`,
  `random.uniform` for the SNR, `random.choice` for the impulse-response file) and AddColorNoise from numpy's global
  RNG; seeding those globals per utterance inside loader workers couples the result to anything else that touches
  them. It also pins soxr < 1.0, and speechxfer runs soxr 1.x.
- torch-audiomentations 0.12.0 decides with torch.distributions (Bernoulli, Uniform) on torch's global generator
  and picks background files with Python's `random.choice`.
- torchaudio's functional ops (speed, fftconvolve, mu_law_encoding, biquads) would serve, but the loader holds numpy
  arrays and each op is a line of numpy, soxr or scipy.signal.
scipy.signal is imported inside the two functions that use it (reverberation, the voice band): importing it costs
about 2 s of CPU, which a run without those effects, or a process that only imports this module, need not pay.
Room impulse responses are simulated as exponentially decaying Gaussian noise behind a direct-path impulse (the
statistical model of a diffuse late field; Polack 1993) rather than by the image method (pyroomacoustics), which
would add a compiled dependency for geometry the recipe has no use for; measured ones can be given as files.

Noise sources can hold hours of audio (MUSAN's noise part alone is about 6 h: 1.4 GB as 16 kHz float32 in every
worker), so each worker caches only the index of files and durations, read once from the headers, and reads the
span it draws by seeking. Impulse responses are short and are cached decoded (the last 256 used, per worker).
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soxr

from speechxfer.audio import AUDIO_SUFFIXES, SAMPLE_RATE_HZ, audio_duration_s, load_audio
from speechxfer.config import SHARE, Check, check_fields, checked
from speechxfer.errors import AudioError, InputError

NOISE_COLORS = {"white": 0.0, "pink": 1.0, "brown": 2.0}  # exponent of 1/f in the power spectrum
TELEPHONE_RATE_HZ = 8000  # narrow-band telephony (G.711): nothing above 4 kHz survives
TELEPHONE_BAND_HZ = (300.0, 3400.0)  # the voice band of a telephone channel (ITU-T G.712)
MU_LAW_MU = 255  # G.711 μ-law, 8 bits per sample
# Coloured noise is flat below this frequency: a 1/f² spectrum down to the lowest FFT bin of a 10 s utterance
# (0.1 Hz) puts nearly all its power in an inaudible drift, and the SNR would then measure the drift.
_NOISE_FLOOR_HZ = 20.0
# The amplitude of an exponential tail falls by 60 dB after RT60: exp(-ln(1000) * t / rt60).
_LN_1000 = math.log(1000.0)


def _finite_numbers(values: object) -> bool:
    return isinstance(values, (tuple, list)) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)


# The checks of the options' fields (config.checked): from a recipe, lists arrive as tuples of floats.
_RANGE = Check(lambda v: _finite_numbers(v) and len(v) == 2 and v[0] <= v[1], "[low, high] with low <= high")
_FACTORS = Check(lambda v: _finite_numbers(v) and len(v) > 0 and min(v) > 0, "a non-empty list of numbers > 0")
_RT60 = Check(lambda v: _RANGE.test(v) and v[0] > 0, "[low, high] with 0 < low <= high")
_COLORS = Check(lambda v: isinstance(v, (tuple, list)) and len(v) > 0 and all(c in NOISE_COLORS for c in v),
                f"a non-empty list of {', '.join(NOISE_COLORS)}")


@dataclass(frozen=True, kw_only=True)
class SpeedOptions:
    """Kaldi-style speed perturbation: resampled as if played faster or slower, so tempo and pitch change together
    and an utterance of n samples comes out with about n / factor (Ko et al. 2015, "Audio augmentation for speech
    recognition"; Kaldi's perturb_data_dir_speed.sh)."""

    probability: float = checked(0.0, SHARE)  # chance that an utterance is perturbed; 0 turns the effect off
    factors: tuple[float, ...] = checked((0.9, 1.0, 1.1), _FACTORS)  # one drawn uniformly; > 1 is faster (shorter)

    __post_init__ = check_fields


@dataclass(frozen=True, kw_only=True)
class NoiseOptions:
    """Additive noise at a random signal-to-noise ratio, from files or generated."""

    probability: float = checked(0.0, SHARE)  # chance that an utterance gets noise; 0 turns the effect off
    # [low, high] dB, drawn uniformly; signal power entering this stage
    snr_db: tuple[float, float] = checked((5.0, 20.0), _RANGE)
    # A folder (searched recursively for audio files), one audio file, or a text file listing one audio path per
    # line (relative to the list; blank lines and lines starting with # skipped). None: generated coloured noise.
    source: str | None = None
    # generated noise, one drawn uniformly: power ∝ 1, 1/f, 1/f²
    colors: tuple[str, ...] = checked(("white", "pink", "brown"), _COLORS)

    __post_init__ = check_fields


@dataclass(frozen=True, kw_only=True)
class ReverbOptions:
    """Reverberation: convolution with a room impulse response, simulated or from files; the output keeps the
    input's length (the tail past the last sample is dropped) and its RMS level."""

    probability: float = checked(0.0, SHARE)  # chance that an utterance is reverberated; 0 turns the effect off
    # simulated rooms: seconds for the tail to decay by 60 dB, [low, high]
    rt60_s: tuple[float, float] = checked((0.2, 0.8), _RT60)
    # simulated rooms: direct-path / tail energy, dB, [low, high]
    direct_to_reverberant_db: tuple[float, float] = checked((0.0, 10.0), _RANGE)
    source: str | None = None  # measured impulse responses, given as for noise.source; None: simulated rooms

    __post_init__ = check_fields


@dataclass(frozen=True, kw_only=True)
class TelephoneOptions:
    """A narrow-band telephone channel: resampled down to 8 kHz and back up (no energy above 4 kHz survives)."""

    probability: float = checked(0.0, SHARE)  # chance that an utterance goes through the channel; 0: off
    band_pass: bool = True  # also the 300-3400 Hz voice band (4th-order Butterworth), at 8 kHz
    mu_law: bool = True  # also 8-bit μ-law coding (G.711), at 8 kHz; clips at full scale like a real codec

    __post_init__ = check_fields


@dataclass(frozen=True, kw_only=True)
class GainOptions:
    """A level change, before the telephone channel so that loud utterances clip in its μ-law coder. Models whose
    feature extractor normalizes each waveform (do_normalize) see gain only through that clipping."""

    probability: float = checked(0.0, SHARE)  # chance that an utterance's level changes; 0 turns the effect off
    gain_db: tuple[float, float] = checked((-6.0, 6.0), _RANGE)  # [low, high] dB, drawn uniformly

    __post_init__ = check_fields


@dataclass(frozen=True, kw_only=True)
class AugmentOptions:
    """The `augment:` section of a recipe: every effect is off (probability 0) unless the recipe sets it."""

    speed: SpeedOptions = field(default_factory=SpeedOptions)
    reverb: ReverbOptions = field(default_factory=ReverbOptions)
    noise: NoiseOptions = field(default_factory=NoiseOptions)
    gain: GainOptions = field(default_factory=GainOptions)
    telephone: TelephoneOptions = field(default_factory=TelephoneOptions)

    @property
    def enabled(self) -> bool:
        """Whether any effect can apply."""
        return any(getattr(self, name).probability > 0 for name in _EFFECTS)


_EFFECTS = ("speed", "reverb", "noise", "gain", "telephone")  # the order augment() applies them in


def augment(wave: np.ndarray, *, sample_rate_hz: int = SAMPLE_RATE_HZ, options: AugmentOptions, seed: int,
            epoch: int, utterance_id: str) -> np.ndarray:
    """The augmented copy of `wave` (samples,) at `sample_rate_hz`, float32.

    Deterministic for (seed, epoch, utterance_id) whatever process calls it. The length changes only through speed
    perturbation, to about len(wave) / speed_factor(...). Returns `wave` itself (as float32) when no effect is
    drawn. Raises InputError/AudioError naming the file when a noise or impulse-response source is bad.
    """
    x = np.asarray(wave, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"augment takes a mono waveform (samples,), got shape {x.shape}")
    if not options.enabled or x.size == 0:
        return x
    factor = speed_factor(options, seed=seed, epoch=epoch, utterance_id=utterance_id)
    if factor != 1.0:
        x = soxr.resample(x, sample_rate_hz * factor, sample_rate_hz, quality="HQ")
    rng = _draw("reverb", options.reverb.probability, seed, epoch, utterance_id)
    if rng is not None:
        x = _reverberate(x, sample_rate_hz, options.reverb, rng)
    rng = _draw("noise", options.noise.probability, seed, epoch, utterance_id)
    if rng is not None:
        x = _add_noise(x, sample_rate_hz, options.noise, rng)
    rng = _draw("gain", options.gain.probability, seed, epoch, utterance_id)
    if rng is not None:
        x = x * np.float32(10.0 ** (rng.uniform(*options.gain.gain_db) / 20.0))
    rng = _draw("telephone", options.telephone.probability, seed, epoch, utterance_id)
    if rng is not None:
        x = _telephone(x, sample_rate_hz, options.telephone)
    return np.ascontiguousarray(x, dtype=np.float32)


def speed_factor(options: AugmentOptions, *, seed: int, epoch: int, utterance_id: str) -> float:
    """The speed factor `augment` applies to this utterance in this epoch: 1.0 when speed perturbation is off or
    not drawn. Needs no audio, so a batch planner can know an epoch's exact durations (duration_s / factor)."""
    rng = _draw("speed", options.speed.probability, seed, epoch, utterance_id)
    return 1.0 if rng is None else float(rng.choice(options.speed.factors))


def duration_bounds_s(duration_s: float, *, options: AugmentOptions) -> tuple[float, float]:
    """(shortest, longest) seconds an utterance of `duration_s` can come out of `augment` with, in any epoch.

    The longest bounds padded batch sizes; the shortest bounds the CTC frames available for its labels.
    """
    if options.speed.probability == 0:
        return duration_s, duration_s
    factors = options.speed.factors + ((1.0,) if options.speed.probability < 1 else ())
    return duration_s / max(factors), duration_s / min(factors)


def check_sources(options: AugmentOptions) -> None:
    """List the noise and impulse-response files the options name and read their headers, so that a missing or
    empty folder, a bad line of a list, or an unreadable file stops a run before training starts. Raises
    InputError/AudioError naming the file (and line). Cached per process: `augment` then reuses the index."""
    for effect in (options.noise, options.reverb):
        if effect.probability > 0 and effect.source is not None:
            _audio_index(effect.source)


def _draw(effect: str, probability: float, seed: int, epoch: int, utterance_id: str) -> np.random.Generator | None:
    """The Generator for one effect on one utterance in one epoch, or None when the effect is not applied.

    Seeded from BLAKE2b over the four values: Python's hash() of a str is salted per process (PYTHONHASHSEED).
    """
    if probability == 0:
        return None
    key = f"{seed}\x1f{epoch}\x1f{effect}\x1f{utterance_id}".encode()
    rng = np.random.default_rng(int.from_bytes(hashlib.blake2b(key, digest_size=16).digest(), "little"))
    return rng if rng.random() < probability else None


def _add_noise(x: np.ndarray, sample_rate_hz: int, options: NoiseOptions, rng: np.random.Generator) -> np.ndarray:
    """x plus noise scaled to an SNR drawn from options.snr_db, measured over the whole utterance."""
    snr_db = rng.uniform(*options.snr_db)
    if options.source is None:
        noise = _colored_noise(x.size, sample_rate_hz, NOISE_COLORS[rng.choice(options.colors)], rng)
    else:
        noise = _noise_from_files(options.source, x.size, sample_rate_hz, rng)
    signal_power = float(np.mean(np.square(x, dtype=np.float64)))
    noise_power = float(np.mean(np.square(noise, dtype=np.float64)))
    if signal_power == 0 or noise_power == 0:  # an SNR is undefined against silence (or with a silent noise span)
        return x
    scale = math.sqrt(signal_power / (noise_power * 10.0 ** (snr_db / 10.0)))
    return (x + scale * noise).astype(np.float32)


def _colored_noise(num_samples: int, sample_rate_hz: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise whose power spectrum falls as 1/f**exponent (0 white, 1 pink, 2 brown), flat below
    _NOISE_FLOOR_HZ; (num_samples,) float64, unscaled."""
    if exponent == 0:
        return rng.standard_normal(num_samples)
    # shaped at the next power of two and cut: an FFT of a length with a large prime factor is ~10x slower
    size = 1 << (num_samples - 1).bit_length()
    frequencies_hz = np.maximum(np.fft.rfftfreq(size, d=1.0 / sample_rate_hz), _NOISE_FLOOR_HZ)
    return np.fft.irfft(np.fft.rfft(rng.standard_normal(size)) * frequencies_hz ** (-exponent / 2.0), n=size)[
        :num_samples]


def _noise_from_files(source: str, num_samples: int, sample_rate_hz: int, rng: np.random.Generator) -> np.ndarray:
    """A span of `num_samples` from the source's files: a file drawn in proportion to its duration (so every second
    of noise is equally likely), a start drawn uniformly, looped when the file is shorter than the utterance."""
    index = _audio_index(source)
    durations_s = np.array([duration_s for _, duration_s in index])
    path, duration_s = index[rng.choice(len(index), p=durations_s / durations_s.sum())]
    need_s = num_samples / sample_rate_hz
    if duration_s > need_s:
        noise = load_audio(path, sample_rate_hz=sample_rate_hz, offset_s=rng.uniform(0.0, duration_s - need_s),
                           duration_s=need_s)
    else:
        noise = load_audio(path, sample_rate_hz=sample_rate_hz)
    return np.resize(noise, num_samples)  # loops a short file; trims the sample that seconds rounding may add


def _reverberate(x: np.ndarray, sample_rate_hz: int, options: ReverbOptions, rng: np.random.Generator) -> np.ndarray:
    """x convolved with an impulse response, cut to len(x) and scaled back to x's RMS level."""
    if options.source is None:
        rir = _simulated_rir(rng.uniform(*options.rt60_s), rng.uniform(*options.direct_to_reverberant_db),
                             sample_rate_hz, rng)
    else:
        index = _audio_index(options.source)
        rir = _measured_rir(index[rng.integers(len(index))][0], sample_rate_hz)
    import scipy.signal  # imported where used: see the module docstring

    wet = scipy.signal.oaconvolve(x, rir)[: x.size]
    wet_rms = math.sqrt(float(np.mean(np.square(wet))))
    if wet_rms == 0:
        return x
    return (wet * (math.sqrt(float(np.mean(np.square(x, dtype=np.float64)))) / wet_rms)).astype(np.float32)


def _simulated_rir(rt60_s: float, direct_to_reverberant_db: float, sample_rate_hz: int,
                   rng: np.random.Generator) -> np.ndarray:
    """A unit direct-path impulse followed by Gaussian noise whose amplitude decays by 60 dB over rt60_s, holding
    10**(-direct_to_reverberant_db / 10) of the direct path's energy; (round(rt60_s * rate),) float64."""
    length = max(2, round(rt60_s * sample_rate_hz))
    t_s = np.arange(1, length) / sample_rate_hz
    tail = rng.standard_normal(length - 1) * np.exp(-_LN_1000 * t_s / rt60_s)
    tail *= math.sqrt(10.0 ** (-direct_to_reverberant_db / 10.0) / float(np.sum(np.square(tail))))
    return np.concatenate(([1.0], tail))


@functools.lru_cache(maxsize=256)
def _measured_rir(path: str, sample_rate_hz: int) -> np.ndarray:
    """A measured impulse response from its strongest sample on (so the speech does not shift by the propagation
    delay), at unit energy."""
    rir = load_audio(path, sample_rate_hz=sample_rate_hz).astype(np.float64)
    if not rir.any():
        raise AudioError("impulse response holds only silence", path=path)
    rir = rir[int(np.argmax(np.abs(rir))):]
    return rir / math.sqrt(float(np.sum(np.square(rir))))


def _telephone(x: np.ndarray, sample_rate_hz: int, options: TelephoneOptions) -> np.ndarray:
    """x through 8 kHz narrow band (optionally band-passed and μ-law coded there), back at sample_rate_hz and
    len(x)."""
    narrow = soxr.resample(x, sample_rate_hz, TELEPHONE_RATE_HZ, quality="HQ")
    if options.band_pass:
        narrow = _voice_band(narrow)
    if options.mu_law:
        narrow = _mu_law_round_trip(narrow)
    wide = soxr.resample(narrow.astype(np.float32), TELEPHONE_RATE_HZ, sample_rate_hz, quality="HQ")
    return np.resize(wide, x.size) if wide.size >= x.size else np.pad(wide, (0, x.size - wide.size))


def _voice_band(x: np.ndarray) -> np.ndarray:
    """x, sampled at TELEPHONE_RATE_HZ, through a 4th-order Butterworth band-pass over TELEPHONE_BAND_HZ."""
    import scipy.signal  # imported where used: see the module docstring

    return scipy.signal.sosfilt(_voice_band_sos(), x)


@functools.cache
def _voice_band_sos() -> np.ndarray:
    """The band-pass as second-order sections (designed once per process: the design costs more than the filtering)."""
    import scipy.signal  # imported where used: see the module docstring

    return scipy.signal.butter(4, TELEPHONE_BAND_HZ, btype="bandpass", fs=TELEPHONE_RATE_HZ, output="sos")


def _mu_law_round_trip(x: np.ndarray) -> np.ndarray:
    """Encode to 8-bit μ-law codes (clipping at full scale) and decode them back to floats, float32."""
    magnitude = np.minimum(np.abs(x).astype(np.float32), np.float32(1.0))
    compressed = np.sign(x).astype(np.float32) * np.log1p(MU_LAW_MU * magnitude) / np.float32(math.log1p(MU_LAW_MU))
    codes = np.rint((compressed + 1) * (MU_LAW_MU / 2)).astype(np.uint8)
    return _mu_law_levels()[codes]


@functools.cache
def _mu_law_levels() -> np.ndarray:
    """The float value each of the 256 μ-law codes decodes to, float32."""
    expanded = np.arange(MU_LAW_MU + 1) / MU_LAW_MU * 2.0 - 1.0
    return (np.sign(expanded) * np.expm1(np.abs(expanded) * math.log1p(MU_LAW_MU)) / MU_LAW_MU).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _audio_index(source: str) -> tuple[tuple[str, float], ...]:
    """(path, duration_s) of every audio file a noise or impulse-response source names, sorted by path so that
    every process draws from the same list. InputError/AudioError name the folder, list line or file."""
    root = Path(source)
    if root.is_dir():
        paths = sorted(os.fspath(p) for p in root.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)
        if not paths:
            raise InputError("no audio files in this folder", path=source)
    elif not root.is_file():
        raise InputError("no such file or folder", path=source)
    elif root.suffix.lower() in AUDIO_SUFFIXES:
        paths = [source]
    else:
        paths = sorted(set(_read_list(root)))
    index = []
    for path in paths:
        duration_s = audio_duration_s(path)
        if duration_s == 0:
            raise AudioError("no audio samples", path=path)
        index.append((path, duration_s))
    return tuple(index)


def _read_list(path: Path) -> list[str]:
    """The audio paths a list file holds, one a line, relative to the list's folder."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise InputError("not a list of audio paths (not UTF-8 text) and not an audio file by its suffix "
                         f"({', '.join(sorted(AUDIO_SUFFIXES))})", path=path) from None
    paths = []
    for number, line in enumerate(lines, start=1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        audio = path.parent / Path(entry).expanduser()
        if not audio.is_file():
            raise InputError(f"no such audio file: {entry}", path=path, line=number)
        paths.append(os.fspath(audio))
    if not paths:
        raise InputError("the list names no audio files", path=path)
    return paths
