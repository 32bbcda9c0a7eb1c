import hashlib
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import scipy.signal
import soundfile as sf
from test_audio import peak_hz
from tiny import write_tone

from speechxfer.audio import SAMPLE_RATE_HZ
from speechxfer.augment import (AugmentOptions, GainOptions, NoiseOptions, ReverbOptions, SpeedOptions,
                                TelephoneOptions, augment, check_sources, duration_bounds_s, speed_factor)
from speechxfer.config import from_mapping
from speechxfer.errors import InputError, RecipeError

RATE = SAMPLE_RATE_HZ


def speech_like(duration_s: float = 2.0, seed: int = 0) -> np.ndarray:
    """A broadband test signal: a 440 Hz tone plus white noise, float32."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(duration_s * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


def power_db(x: np.ndarray) -> float:
    return 10 * np.log10(np.mean(np.square(x, dtype=np.float64)))


def run(x, options, *, seed=0, epoch=0, utterance_id="utt"):
    return augment(x, sample_rate_hz=RATE, options=options, seed=seed, epoch=epoch, utterance_id=utterance_id)


def test_default_options_change_nothing():
    x = speech_like()
    assert not AugmentOptions().enabled
    np.testing.assert_array_equal(run(x, AugmentOptions()), x)


@pytest.mark.parametrize("factor", [0.9, 1.1])
def test_speed_changes_length_and_pitch_by_the_factor(factor):
    t = np.arange(2 * RATE) / RATE
    tone = (0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
    out = run(tone, AugmentOptions(speed=SpeedOptions(probability=1.0, factors=(factor,))))
    assert abs(out.size - tone.size / factor) <= 1
    assert peak_hz(out) == pytest.approx(1000 * factor, abs=2)


def test_speed_factor_predicts_each_length_within_the_bounds():
    options = AugmentOptions(speed=SpeedOptions(probability=0.5, factors=(0.9, 1.1)))
    x = speech_like(1.0)
    shortest, longest = duration_bounds_s(1.0, options=options)
    assert (shortest, longest) == (pytest.approx(1 / 1.1), pytest.approx(1 / 0.9))
    drawn = []
    for i in range(40):
        factor = speed_factor(options, seed=3, epoch=1, utterance_id=f"u{i}")
        out = run(x, options, seed=3, epoch=1, utterance_id=f"u{i}")
        assert abs(out.size - x.size / factor) <= 1
        assert shortest - 1 / RATE <= out.size / RATE <= longest + 1 / RATE
        drawn.append(factor)
    # probability 0.5 of perturbing; each of the two factors otherwise
    assert set(drawn) == {0.9, 1.0, 1.1}
    assert 10 <= drawn.count(1.0) <= 30


def test_duration_bounds_without_speed_are_the_duration():
    assert duration_bounds_s(3.0, options=AugmentOptions()) == (3.0, 3.0)
    always = AugmentOptions(speed=SpeedOptions(probability=1.0, factors=(0.8, 0.9)))
    assert duration_bounds_s(3.0, options=always) == (pytest.approx(3 / 0.9), pytest.approx(3 / 0.8))


@pytest.mark.parametrize("color", ["white", "pink", "brown"])
@pytest.mark.parametrize("snr_db", [0.0, 10.0, 25.0])
def test_generated_noise_is_added_at_the_requested_snr(color, snr_db):
    x = speech_like()
    out = run(x, AugmentOptions(noise=NoiseOptions(probability=1.0, snr_db=(snr_db, snr_db), colors=(color,))))
    assert out.shape == x.shape and out.dtype == np.float32
    measured = power_db(x) - power_db(out.astype(np.float64) - x)
    assert abs(measured - snr_db) < 0.5


def test_noise_colors_tilt_the_spectrum():
    share_below_500_hz = {}
    for color in ("white", "pink", "brown"):
        x = speech_like()
        noise = run(x, AugmentOptions(noise=NoiseOptions(probability=1.0, snr_db=(0.0, 0.0), colors=(color,)))) - x
        frequencies, psd = scipy.signal.welch(noise, fs=RATE, nperseg=2048)
        share_below_500_hz[color] = psd[frequencies < 500].sum() / psd.sum()
    assert share_below_500_hz["white"] < 0.1 < share_below_500_hz["pink"] < share_below_500_hz["brown"]


def test_noise_from_files_at_the_requested_snr_with_short_files_looped(tmp_path):
    folder = tmp_path / "noise"
    write_tone(folder / "hum.wav", duration_s=1.5, sample_rate_hz=8000, frequency_hz=120.0, seed=1)
    write_tone(folder / "sub" / "whine.flac", duration_s=5.0, frequency_hz=3000.0, seed=2)
    x = speech_like(2.0)
    options = AugmentOptions(noise=NoiseOptions(probability=1.0, snr_db=(7.5, 7.5), source=str(folder)))
    check_sources(options)
    peaks = set()
    for i in range(12):
        noise = run(x, options, utterance_id=f"u{i}").astype(np.float64) - x
        assert abs(power_db(x) - power_db(noise) - 7.5) < 0.5
        peaks.add(round(peak_hz(noise), -1))
    assert peaks == {120.0, 3000.0}  # both files are drawn, from the folder and its subfolder


def test_noise_from_a_list_of_files(tmp_path):
    write_tone(tmp_path / "audio" / "n.wav", duration_s=1.0, frequency_hz=2000.0)
    listing = tmp_path / "noise.txt"
    listing.write_text("# music on hold\naudio/n.wav\n\n")
    x = speech_like(1.5)
    noise = run(x, AugmentOptions(noise=NoiseOptions(probability=1.0, snr_db=(3.0, 3.0), source=str(listing)))) - x
    assert peak_hz(noise) == pytest.approx(2000.0, abs=5)
    assert abs(power_db(x) - power_db(noise) - 3.0) < 0.5


def test_bad_noise_sources_name_the_file_and_line(tmp_path):
    def sources(source):
        return AugmentOptions(noise=NoiseOptions(probability=1.0, source=str(source)))

    with pytest.raises(InputError, match="no such file or folder") as err:
        check_sources(sources(tmp_path / "missing"))
    assert str(err.value).startswith(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no audio files in this folder"):
        check_sources(sources(tmp_path / "empty"))
    write_tone(tmp_path / "a.wav")
    listing = tmp_path / "list.txt"
    listing.write_text("a.wav\nb.wav\n")
    with pytest.raises(InputError) as err:
        run(speech_like(), sources(listing))
    assert str(err.value) == f"{listing}:2: no such audio file: b.wav"
    check_sources(replace(sources(listing), noise=NoiseOptions(probability=0.0, source=str(listing))))  # off: unread


def schroeder_rt60_s(rir: np.ndarray) -> float:
    """RT60 extrapolated from the -5 to -25 dB span of the backward-integrated energy decay (ISO 3382 T20)."""
    energy = np.cumsum(np.square(rir[::-1]))[::-1]
    decay_db = 10 * np.log10(energy / energy[0])
    start, stop = np.argmax(decay_db <= -5), np.argmax(decay_db <= -25)
    slope_db_per_s = (decay_db[stop] - decay_db[start]) / ((stop - start) / RATE)
    return -60 / slope_db_per_s


@pytest.mark.parametrize("rt60_s", [0.3, 0.7])
def test_simulated_reverb_decays_at_the_requested_rt60(rt60_s):
    click = np.zeros(RATE, dtype=np.float32)
    click[0] = 1.0
    # a direct path 20 dB below the tail, so the tail's decay dominates the energy curve
    options = AugmentOptions(reverb=ReverbOptions(probability=1.0, rt60_s=(rt60_s, rt60_s),
                                                  direct_to_reverberant_db=(-20, -20)))
    rir = run(click, options)
    assert rir.shape == click.shape
    assert schroeder_rt60_s(rir) == pytest.approx(rt60_s, rel=0.05)


def test_reverb_smears_speech_and_keeps_length_and_level():
    x = speech_like()
    x[RATE:] = 0  # speech for 1 s, then silence
    options = AugmentOptions(reverb=ReverbOptions(probability=1.0, rt60_s=(0.5, 0.5), direct_to_reverberant_db=(0, 0)))
    out = run(x, options)
    assert out.shape == x.shape
    assert power_db(out) == pytest.approx(power_db(x), abs=0.01)
    # the silence after the speech now holds the decaying tail, about 60 dB down by 0.5 s after the end
    tail = out[RATE: RATE + 1600]
    assert power_db(tail) > power_db(x) - 20
    assert power_db(out[RATE + 8000: RATE + 9600]) < power_db(tail) - 40


def test_measured_impulse_responses_are_aligned_on_their_direct_path(tmp_path):
    rir = np.zeros(4000, dtype=np.float32)
    rir[500] = 0.8  # 31 ms propagation delay before the direct path
    rir[900] = -0.4  # one reflection 25 ms after it
    sf.write(tmp_path / "room.wav", rir, RATE, subtype="FLOAT")
    click = np.zeros(RATE, dtype=np.float32)
    click[100] = 1.0
    out = run(click, AugmentOptions(reverb=ReverbOptions(probability=1.0, source=str(tmp_path / "room.wav"))))
    assert np.flatnonzero(np.abs(out) > 1e-3).tolist() == [100, 500]
    assert out[500] / out[100] == pytest.approx(-0.5, abs=1e-4)


@pytest.mark.parametrize("band_pass", [False, True])
@pytest.mark.parametrize("mu_law", [False, True])
def test_telephone_channel_leaves_no_energy_above_4_khz(band_pass, mu_law):
    x = (0.3 * np.random.default_rng(0).standard_normal(2 * RATE)).astype(np.float32)  # flat to 8 kHz
    out = run(x, AugmentOptions(telephone=TelephoneOptions(probability=1.0, band_pass=band_pass, mu_law=mu_law)))
    assert out.shape == x.shape and out.dtype == np.float32
    frequencies, psd = scipy.signal.welch(out, fs=RATE, nperseg=1024)
    in_band = psd[(frequencies > 500) & (frequencies < 3000)].mean()
    assert 10 * np.log10(psd[frequencies > 4100].max() / in_band) < -40
    if band_pass:
        assert 10 * np.log10(psd[(frequencies > 50) & (frequencies < 150)].mean() / in_band) < -20


def test_mu_law_clips_loud_input_at_full_scale():
    x = 3.0 * speech_like()  # peaks far above 1.0
    out = run(x, AugmentOptions(telephone=TelephoneOptions(probability=1.0, band_pass=False, mu_law=True)))
    assert np.abs(out).max() < 1.2  # clipped at 1, plus the resampling filter's ringing


def test_gain_scales_by_the_drawn_decibels():
    x = speech_like()
    out = run(x, AugmentOptions(gain=GainOptions(probability=1.0, gain_db=(-6.0, -6.0))))
    np.testing.assert_allclose(out, x * 10 ** (-6 / 20), rtol=1e-6)


def all_effects(noise_source: str | None = None) -> AugmentOptions:
    return AugmentOptions(speed=SpeedOptions(probability=1.0), reverb=ReverbOptions(probability=1.0),
                          noise=NoiseOptions(probability=1.0, source=noise_source), gain=GainOptions(probability=1.0),
                          telephone=TelephoneOptions(probability=1.0))


def test_same_seed_epoch_and_utterance_give_the_same_audio(tmp_path):
    write_tone(tmp_path / "noise" / "n.wav", duration_s=4.0, frequency_hz=700.0)
    x = speech_like()
    for options in (all_effects(), all_effects(str(tmp_path / "noise"))):
        first = run(x, options, seed=5, epoch=2, utterance_id="spk1-0001")
        np.testing.assert_array_equal(first, run(x.copy(), options, seed=5, epoch=2, utterance_id="spk1-0001"))
        for other in ({"epoch": 3}, {"seed": 6}, {"utterance_id": "spk1-0002"}):
            changed = run(x, options, **{"seed": 5, "epoch": 2, "utterance_id": "spk1-0001", **other})
            assert changed.shape != first.shape or not np.array_equal(changed, first)


def test_each_effect_draws_independently_of_the_others():
    """Turning noise on leaves the speed factor and the gain that the other effects draw unchanged."""
    x = speech_like()
    base = AugmentOptions(speed=SpeedOptions(probability=1.0), gain=GainOptions(probability=1.0))
    with_noise = replace(base, noise=NoiseOptions(probability=1.0, snr_db=(60.0, 60.0)))
    for i in range(5):
        plain, noisy = run(x, base, utterance_id=f"u{i}"), run(x, with_noise, utterance_id=f"u{i}")
        assert plain.shape == noisy.shape
        np.testing.assert_allclose(noisy, plain, atol=3e-3)


def test_output_does_not_depend_on_the_process():
    """Another interpreter, with another str-hash salt, draws the same augmentation."""
    code = ("import hashlib, sys, numpy as np; from speechxfer.augment import *; "
            "x = np.frombuffer(sys.stdin.buffer.read(), dtype=np.float32); "
            "options = AugmentOptions(speed=SpeedOptions(probability=1.0), reverb=ReverbOptions(probability=1.0), "
            "noise=NoiseOptions(probability=1.0), gain=GainOptions(probability=1.0), "
            "telephone=TelephoneOptions(probability=1.0)); "
            "print(hashlib.sha256(augment(x, options=options, seed=1, epoch=4, utterance_id='a/b c').tobytes())"
            ".hexdigest())")
    x = speech_like()
    child = subprocess.run([sys.executable, "-c", code], input=x.tobytes(), capture_output=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": "12345"})
    here = run(x, all_effects(), seed=1, epoch=4, utterance_id="a/b c")
    assert child.stdout.decode().strip() == hashlib.sha256(here.tobytes()).hexdigest()


def test_probability_applies_to_about_that_share_of_utterances():
    x = speech_like(0.5)
    options = AugmentOptions(gain=GainOptions(probability=0.3, gain_db=(6.0, 6.0)))
    changed = sum(not np.array_equal(run(x, options, utterance_id=str(i)), x) for i in range(300))
    assert 60 <= changed <= 120


@pytest.mark.parametrize("make, field", [
    (lambda: SpeedOptions(probability=1.5), "probability"),
    (lambda: SpeedOptions(factors=()), "factors"),
    (lambda: SpeedOptions(factors=(1.0, -0.9)), "factors"),
    (lambda: NoiseOptions(snr_db=(20.0, 5.0)), "snr_db"),
    (lambda: NoiseOptions(snr_db=(5.0,)), "snr_db"),
    (lambda: NoiseOptions(snr_db=(5.0, float("nan"))), "snr_db"),
    (lambda: NoiseOptions(colors=("violet",)), "colors"),
    (lambda: ReverbOptions(rt60_s=(0.0, 0.5)), "rt60_s"),
    (lambda: ReverbOptions(direct_to_reverberant_db="loud"), "direct_to_reverberant_db"),
    (lambda: TelephoneOptions(probability=-0.1), "probability"),
    (lambda: GainOptions(gain_db=(True, 3.0)), "gain_db"),
])
def test_invalid_options_name_the_field(make, field):
    with pytest.raises(ValueError, match=f"^{field} must be"):
        make()


def test_options_are_checked_alike_from_python_and_from_a_recipe():
    """One check per field (config.checked): a ValueError naming the field in Python, a RecipeError naming the
    dotted key and the file from YAML, which gives its lists as tuples of floats."""
    with pytest.raises(ValueError, match=r"^snr_db must be \[low, high\] with low <= high, got \(30, 10\)$"):
        NoiseOptions(snr_db=(30, 10))
    with pytest.raises(RecipeError, match=r"^r.yaml: augment.noise.snr_db must be \[low, high\] with low <= high, "
                                          r"got \(30.0, 10.0\)$"):
        from_mapping(AugmentOptions, {"noise": {"snr_db": [30, 10]}}, path="r.yaml", prefix="augment.")
    options = from_mapping(AugmentOptions, {"noise": {"snr_db": [0, 10], "colors": ["pink"]}}, path="r.yaml")
    assert options.noise == NoiseOptions(snr_db=(0.0, 10.0), colors=("pink",))
    assert hash(options) == hash(AugmentOptions(noise=NoiseOptions(snr_db=(0.0, 10.0), colors=("pink",))))


def test_a_silent_impulse_response_is_named(tmp_path):
    sf.write(tmp_path / "silent.wav", np.zeros(1600, dtype=np.float32), RATE)
    with pytest.raises(InputError, match="silent.wav: impulse response holds only silence"):
        run(speech_like(), AugmentOptions(reverb=ReverbOptions(probability=1.0, source=str(tmp_path / "silent.wav"))))
