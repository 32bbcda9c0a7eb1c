import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf
from tiny import write_tone

from speechxfer.audio import SAMPLE_RATE_HZ, audio_duration_s, file_problem, load_audio
from speechxfer.errors import AudioError

needs_mp3 = pytest.mark.skipif("MP3" not in sf.available_formats(), reason="this libsndfile cannot write MP3")


def peak_hz(samples: np.ndarray, sample_rate_hz: int = SAMPLE_RATE_HZ) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / sample_rate_hz)[np.argmax(spectrum)])


def test_16k_mono_wav_is_returned_as_is(tmp_path):
    path = write_tone(tmp_path / "a.wav", duration_s=0.5, subtype="FLOAT")
    audio = load_audio(path)
    assert audio.dtype == np.float32 and audio.shape == (8000,)
    np.testing.assert_array_equal(audio, sf.read(path, dtype="float32")[0])


def test_stereo_44k_becomes_16k_mono_of_the_right_length(tmp_path):
    path = write_tone(tmp_path / "stereo.wav", duration_s=1.0, sample_rate_hz=44100, channels=2,
                      frequency_hz=1000.0)
    audio = load_audio(path)
    assert audio.shape == (16000,) and audio.dtype == np.float32
    # write_tone scales channel c by (1 + 0.1 c): the mono mix has amplitude 0.3 * 1.05
    assert np.sqrt(np.mean(audio[1000:-1000] ** 2)) == pytest.approx(0.3 * 1.05 / np.sqrt(2), rel=0.02)


def test_resampling_keeps_a_1khz_tone_at_1khz(tmp_path):
    path = write_tone(tmp_path / "tone.wav", duration_s=1.0, sample_rate_hz=44100, frequency_hz=1000.0)
    audio = load_audio(path)
    assert peak_hz(audio) == pytest.approx(1000.0, abs=2.0)
    assert peak_hz(load_audio(path, sample_rate_hz=8000), 8000) == pytest.approx(1000.0, abs=2.0)


def test_resampling_is_band_limited(tmp_path):
    # 10 kHz lies above the 8 kHz Nyquist limit of 16 kHz audio: it must vanish, not alias to 6 kHz
    path = write_tone(tmp_path / "high.wav", duration_s=1.0, sample_rate_hz=44100, frequency_hz=10000.0)
    audio = load_audio(path)
    assert np.sqrt(np.mean(audio[2000:-2000] ** 2)) < 0.02 * 0.3


def test_offset_and_duration_read_only_the_span(tmp_path):
    rate = 16000
    t = np.arange(rate) / rate
    two_tones = np.concatenate([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 1000 * t)]).astype(np.float32)
    sf.write(tmp_path / "two.flac", two_tones, rate)
    span = load_audio(tmp_path / "two.flac", offset_s=1.25, duration_s=0.5)
    assert span.shape == (8000,)
    assert peak_hz(span) == pytest.approx(1000.0, abs=3.0)
    np.testing.assert_allclose(span, two_tones[20000:28000], atol=1e-4)  # FLAC is 16-bit
    assert load_audio(tmp_path / "two.flac", offset_s=1.75).shape == (4000,)


@needs_mp3
def test_mp3_loads_as_16k_mono(tmp_path):
    path = write_tone(tmp_path / "tone.wav", duration_s=1.0, sample_rate_hz=44100, channels=2,
                      frequency_hz=1000.0)
    data, rate = sf.read(path)
    sf.write(tmp_path / "tone.mp3", data, rate, format="MP3")
    audio = load_audio(tmp_path / "tone.mp3")
    assert abs(audio.shape[0] - 16000) <= 600  # an MP3 frame is 1152 samples
    assert peak_hz(audio) == pytest.approx(1000.0, abs=3.0)
    assert audio_duration_s(tmp_path / "tone.mp3") == pytest.approx(1.0, abs=0.04)
    span = load_audio(tmp_path / "tone.mp3", offset_s=0.5, duration_s=0.25)
    assert span.shape == (4000,)


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is not installed")
@pytest.mark.filterwarnings("ignore:'(aifc|audioop|sunau)' is deprecated:DeprecationWarning")  # audioread's imports
def test_formats_libsndfile_lacks_go_through_the_fallback(tmp_path):
    m4a = tmp_path / "tone.m4a"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-f", "lavfi", "-i", "sine=frequency=1000:duration=1",
                    "-ac", "2", "-ar", "44100", str(m4a)], check=True)
    with pytest.raises(sf.LibsndfileError):
        sf.info(m4a)
    audio = load_audio(m4a)
    assert abs(audio.shape[0] - 16000) < 800  # AAC adds encoder delay
    assert peak_hz(audio) == pytest.approx(1000.0, abs=3.0)
    assert audio_duration_s(m4a) == pytest.approx(1.0, abs=0.05)
    assert load_audio(m4a, offset_s=0.5, duration_s=0.25).shape == (4000,)


def test_duration_comes_from_the_header(tmp_path):
    assert audio_duration_s(write_tone(tmp_path / "a.wav", duration_s=1.5, sample_rate_hz=8000)) == 1.5
    sf.write(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32), 16000)
    assert audio_duration_s(tmp_path / "empty.wav") == 0.0


def test_bad_audio_raises_audio_error_naming_the_file(tmp_path):
    (tmp_path / "zero.wav").write_bytes(b"")
    (tmp_path / "garbage.wav").write_bytes(b"this is not audio at all" * 10)
    sf.write(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32), 16000)
    sf.write(tmp_path / "nan.wav", np.array([0.1, np.nan, 0.2] * 100, dtype=np.float32), 16000, subtype="FLOAT")
    short = write_tone(tmp_path / "short.wav", duration_s=0.5)
    cases = [(tmp_path / "missing.wav", {}, "no such audio file"),
             (tmp_path / "zero.wav", {}, "empty file"),
             (tmp_path / "garbage.wav", {}, "unreadable audio"),
             (tmp_path / "empty.wav", {}, "no audio samples"),
             (tmp_path / "nan.wav", {}, "NaN"),
             (short, {"offset_s": 0.6}, "no audio samples at offset 0.6 s")]
    for path, span, message in cases:
        with pytest.raises(AudioError, match=message) as caught:
            load_audio(path, **span)
        assert str(caught.value).startswith(f"{path}: ")
    for path in (tmp_path / "missing.wav", tmp_path / "zero.wav", tmp_path / "garbage.wav"):
        with pytest.raises(AudioError, match=str(path)):
            audio_duration_s(path)


def test_infinite_samples_and_non_files_raise_audio_error(tmp_path):
    sf.write(tmp_path / "inf.wav", np.array([0.1, -np.inf, 0.2] * 100, dtype=np.float32), 16000, subtype="FLOAT")
    sf.write(tmp_path / "inf64.wav", np.array([0.1, np.inf] * 100), 16000, subtype="DOUBLE")
    (tmp_path / "folder.wav").mkdir()
    for path in (tmp_path / "inf.wav", tmp_path / "inf64.wav"):
        with pytest.raises(AudioError, match="NaN or infinite") as caught:
            load_audio(path)
        assert str(caught.value).startswith(f"{path}: ")
    with pytest.raises(AudioError, match="a folder, not an audio file"):
        load_audio(tmp_path / "folder.wav")


def test_check_finite_reads_float_files_only(tmp_path):
    nan = tmp_path / "nan.wav"
    sf.write(nan, np.array([0.1, np.nan] * 50000, dtype=np.float32), 16000, subtype="FLOAT")
    assert audio_duration_s(nan) == 6.25  # the header alone does not know
    with pytest.raises(AudioError, match=f"{nan}: audio holds NaN or infinite samples"):
        audio_duration_s(nan, check_finite=True)
    assert audio_duration_s(write_tone(tmp_path / "ok.wav", subtype="FLOAT"), check_finite=True) == 1.0
    assert audio_duration_s(write_tone(tmp_path / "ok16.wav", subtype="PCM_16"), check_finite=True) == 1.0


def test_file_problem_is_a_stat_that_names_the_kind(tmp_path):
    (tmp_path / "zero.wav").write_bytes(b"")
    (tmp_path / "folder.wav").mkdir()
    (tmp_path / "dangling.wav").symlink_to(tmp_path / "nowhere.wav")
    assert file_problem(tmp_path / "missing.wav") == ("missing_file", "no such audio file")
    assert file_problem(tmp_path / "dangling.wav") == ("missing_file", "no such audio file")
    assert file_problem(tmp_path / "zero.wav") == ("unreadable_audio", "empty file (0 bytes)")
    assert file_problem(tmp_path / "folder.wav") == ("unreadable_audio", "a folder, not an audio file")
    assert file_problem("/dev/null") == ("unreadable_audio", "not a regular file")
    (tmp_path / "text.wav").write_bytes(b"not audio")
    assert file_problem(tmp_path / "text.wav") is None  # what only reading shows is load_audio's to find
