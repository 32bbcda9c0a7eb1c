import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from tiny import digital_silence, make_tiny_adapter_checkpoint, make_tiny_checkpoint, write_tone

import speechxfer.surgery as surgery
import speechxfer.transcribe as transcribe_module
from speechxfer.cli import main
from speechxfer.decoding import GreedyDecoder
from speechxfer.errors import InputError, Problem
from speechxfer.transcribe import (OUTPUT_FORMATS, Recognizer, TranscribeOptions, Transcription, emissions,
                                   find_audio, read_index, transcribe, tsv_escape, tsv_unescape)

CTC_VOCAB = ["[PAD]", "[UNK]", "|", *"abcdefghij"]
needs_mp3 = pytest.mark.skipif("MP3" not in sf.available_formats(), reason="this libsndfile cannot write MP3")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("model"), ctc_vocab=CTC_VOCAB)


@pytest.fixture(scope="module")
def local_model_dir(tmp_path_factory):
    """No transformer layer: each output frame sees a bounded stretch of audio (the convolutions only)."""
    directory = make_tiny_checkpoint(tmp_path_factory.mktemp("local"), ctc_vocab=CTC_VOCAB)
    config = json.loads((directory / "config.json").read_text())
    config["num_hidden_layers"] = 0
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def varying_noise(path, *, duration_s: float, seed: int = 0, sample_rate_hz: int = 16000):
    """Noise whose loudness changes every 0.1 s, so a random model emits many different tokens."""
    rng = np.random.default_rng(seed)
    steps = int(duration_s * 10)
    envelope = np.repeat(rng.uniform(0.05, 1.0, steps), sample_rate_hz // 10)
    sf.write(path, (0.3 * rng.standard_normal(envelope.size) * envelope).astype(np.float32), sample_rate_hz)
    return path


def parse_cues(text: str) -> list[tuple[float, float]]:
    times = re.findall(r"(\d\d):(\d\d):(\d\d)[,.](\d\d\d) --> (\d\d):(\d\d):(\d\d)[,.](\d\d\d)", text)
    seconds = [(int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000, int(h2) * 3600 + int(m2) * 60 + int(s2)
                + int(ms2) / 1000) for h, m, s, ms, h2, m2, s2, ms2 in times]
    return seconds


@needs_mp3
def test_folder_of_formats_in_every_output_format(tmp_path, model_dir, capsys):
    audio = tmp_path / "audio"
    write_tone(audio / "tone.wav", duration_s=1.2)
    write_tone(audio / "tone2.flac", duration_s=0.8, frequency_hz=220.0)
    write_tone(audio / "speech.mp3", duration_s=1.0, frequency_hz=330.0)
    write_tone(audio / "stereo.wav", duration_s=1.5, sample_rate_hz=44100, channels=2)
    (audio / "notes.wav").write_text("not audio at all\n")
    out = tmp_path / "out"

    code = main(["transcribe", str(model_dir), str(audio), str(tmp_path / "missing.flac"), "--output-dir", str(out),
                 "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0
    assert "notes.wav: [unreadable_audio]" in captured.err
    assert "missing.flac: [missing_file]" in captured.err
    names = {"tone": 1.2, "tone2": 0.8, "speech": 1.0, "stereo": 1.5}
    for name, duration_s in names.items():
        for fmt in ("txt", "json", "srt", "vtt"):
            assert (out / f"{name}.{fmt}").is_file(), f"{name}.{fmt}"
        result = json.loads((out / f"{name}.json").read_text())
        assert result["text"] == (out / f"{name}.txt").read_text().strip()
        assert result["text"] == " ".join(w["word"] for w in result["words"])
        assert result["words"], "the random model should emit something"
        for fmt in ("srt", "vtt"):
            cues = parse_cues((out / f"{name}.{fmt}").read_text())
            assert len(cues) >= 1
            flat = [t for cue in cues for t in cue]
            assert flat == sorted(flat), f"{name}.{fmt} times go backwards"
            assert all(start < end for start, end in cues)
            assert flat[-1] <= duration_s + 1e-3
        assert (out / f"{name}.vtt").read_text().startswith("WEBVTT\n")
    rows = [line.split("\t") for line in (out / "transcripts.tsv").read_text().splitlines()]
    assert [r[0] for r in rows] == sorted(str(audio / f) for f in ("speech.mp3", "stereo.wav", "tone.wav",
                                                                    "tone2.flac"))
    assert {r[1] for r in rows} == {(out / f"{n}.txt").read_text().strip() for n in names}
    assert len(captured.out.splitlines()) == 4


def test_batched_equals_one_at_a_time(tmp_path, model_dir):
    paths = [str(varying_noise(tmp_path / f"{i}.wav", duration_s=d, seed=i)) for i, d in enumerate((0.7, 1.3, 1.0))]
    segments, problems = find_audio(paths)
    assert not problems
    recognizer = Recognizer(model_dir, device="cpu")
    decoder = GreedyDecoder(recognizer.vocabulary, frame_s=recognizer.frame_s)
    together = {r.segment.id: r.transcript for r in transcribe(recognizer, segments, decoder=decoder)}
    for segment in segments:
        (alone,) = transcribe(recognizer, [segment], decoder=decoder, options=TranscribeOptions(max_batch_s=0.1))
        assert alone.transcript.text == together[segment.id].text


@pytest.mark.parametrize("arch", ["base", "stable"])
def test_each_utterance_gets_the_same_log_probs_and_text_whatever_its_batch(tmp_path, arch):
    """A group-norm model takes no attention mask: its batches hold equal lengths only, never padding. A layer-norm
    model keeps padded batches, its mask keeping the padding out (up to float rounding)."""
    model = make_tiny_checkpoint(tmp_path / "model", arch=arch, ctc_vocab=CTC_VOCAB)
    # two of 1.0 s: the same length, so a mask-less model may still batch them (0.45 s gives 0.4 s of audio)
    durations = (0.7, 1.3, 1.0, 1.0, 0.45)
    paths = [str(varying_noise(tmp_path / f"{i}.wav", duration_s=d, seed=i)) for i, d in enumerate(durations)]
    segments, _ = find_audio(paths)
    recognizer = Recognizer(model, device="cpu")
    assert recognizer.use_attention_mask == (arch == "stable")
    passes: list[list[int]] = []
    real_log_probs = recognizer.log_probs

    def recorded(waveforms, **kwargs):
        passes.append([len(w) for w in waveforms])
        return real_log_probs(waveforms, **kwargs)

    recognizer.log_probs = recorded
    decoder = GreedyDecoder(recognizer.vocabulary, frame_s=recognizer.frame_s)

    def run(chosen, max_batch_s):
        options = TranscribeOptions(max_batch_s=max_batch_s)
        log_probs = {segment.id: lp for segment, lp in emissions(recognizer, chosen, options=options)}
        texts = {r.segment.id: r.transcript.text for r in transcribe(recognizer, chosen, decoder=decoder,
                                                                      options=options)}
        return log_probs, texts

    alone = [run([segment], 0.1) for segment in segments]
    alone_log_probs = {k: v for lp, _ in alone for k, v in lp.items()}
    alone_texts = {k: v for _, texts in alone for k, v in texts.items()}
    for chosen, max_batch_s in ((segments, 100.0), (segments, 2.0), (segments[1::2], 100.0), (segments[2:], 3.0)):
        log_probs, texts = run(chosen, max_batch_s)
        for segment in chosen:
            assert log_probs[segment.id].shape == alone_log_probs[segment.id].shape
            torch.testing.assert_close(log_probs[segment.id], alone_log_probs[segment.id], rtol=0, atol=1e-5)
            assert texts[segment.id] == alone_texts[segment.id]
    assert any(t for t in alone_texts.values()), "the random model should emit something"
    # what was tested: a padding-free model batched equal lengths together and nothing else; a masked one padded
    assert any(len(p) > 1 for p in passes)
    padded = any(len(set(p)) > 1 for p in passes)
    assert padded == (arch == "stable")


def test_bfloat16_forward_pass_is_close_to_float32(tmp_path, model_dir):
    wave = np.asarray(sf.read(varying_noise(tmp_path / "a.wav", duration_s=1.5))[0], dtype=np.float32)
    full = Recognizer(model_dir, device="cpu").log_probs([wave])[0].exp()
    half = Recognizer(model_dir, device="cpu", dtype="bfloat16").log_probs([wave])[0]
    assert half.dtype == torch.float32
    # bfloat16 keeps 8 significant bits: posteriors move by a little, not by nothing.
    difference = (half.exp() - full).abs().max().item()
    assert 0 < difference < 0.05
    with pytest.raises(InputError, match="unknown dtype 'int8'"):
        Recognizer(model_dir, device="cpu", dtype="int8")


@pytest.mark.parametrize("name, message", [
    ("config.json", "config.json: not valid JSON: maximum recursion depth"),
    ("vocab.json", "vocab.json: not valid JSON: maximum recursion depth"),
    ("preprocessor_config.json", r"cannot read the feature extractor settings \(preprocessor_config.json\): maximum"),
])
def test_a_model_file_of_json_nested_thousands_deep_is_an_input_error(tmp_path, model_dir, name, message):
    import shutil

    folder = Path(shutil.copytree(model_dir, tmp_path / "model"))
    (folder / name).write_text('{"a": ' + "[" * 5000 + "]" * 5000 + "}")
    with pytest.raises(InputError, match=message) as caught:
        Recognizer(folder, device="cpu")
    assert str(caught.value).startswith(str(folder))


def test_a_model_folder_without_preprocessor_config_is_one_line_naming_the_folder(tmp_path, model_dir, capsys):
    import shutil

    folder = Path(shutil.copytree(model_dir, tmp_path / "model"))
    (folder / "preprocessor_config.json").unlink()
    with pytest.raises(InputError) as caught:
        Recognizer(folder, device="cpu")
    assert str(caught.value) == f"{folder}: no preprocessor_config.json in this model folder"
    wave = varying_noise(tmp_path / "a.wav", duration_s=1.0)
    assert main(["transcribe", str(folder), str(wave)]) == 2
    err = capsys.readouterr().err  # transformers' bar of the weights it loaded may come first
    assert err.endswith("\n") and err.splitlines()[-1] == (f"speechxfer transcribe: error: {folder}: no "
                                                           "preprocessor_config.json in this model folder")
    assert "Traceback" not in err and "If you were trying" not in err


def test_an_adapter_model_switches_weights_head_and_vocabulary_per_language(tmp_path, model_dir):
    from safetensors.torch import load_file

    specials = ["<pad>", "<s>", "</s>", "<unk>", "|"]
    model = make_tiny_adapter_checkpoint(tmp_path / "mms", vocabularies={"eng": [*specials, *"abcd"],
                                                                        "spa": [*specials, *"abcdñ", "'"]})
    assert surgery.adapter_languages(model) == ["eng", "spa"]
    wave = np.asarray(sf.read(varying_noise(tmp_path / "a.wav", duration_s=1.0))[0], dtype=np.float32)
    recognizer = Recognizer(model, device="cpu", lang="spa")
    assert recognizer.lang == "spa" and recognizer.vocabulary.tokens[-2:] == ("ñ", "'")
    spa = recognizer.log_probs([wave])[0]
    assert spa.shape[-1] == 11
    weights = load_file(model / "adapter.spa.safetensors")
    assert all(torch.equal(param, weights[name]) for name, param in recognizer.model._get_adapters().items())
    recognizer.use_adapter("eng")
    assert recognizer.log_probs([wave])[0].shape[-1] == 9 and recognizer.vocabulary.tokens[-1] == "d"
    recognizer.use_adapter("spa")
    assert torch.equal(recognizer.log_probs([wave])[0], spa)  # back to the same weights, the same output
    with pytest.raises(InputError, match="no adapter for language 'fra'"):
        recognizer.use_adapter("fra")
    default = Recognizer(model, device="cpu")  # the language in model.safetensors, as the tokenizer's target_lang says
    assert default.lang is None and len(default.vocabulary) == default.model.config.vocab_size
    with pytest.raises(InputError, match="not an adapter model"):
        Recognizer(model_dir, device="cpu").use_adapter("eng")


def test_a_failed_adapter_switch_leaves_the_recognizer_as_it_was(tmp_path):
    from safetensors.torch import load_file, save_file

    specials = ["<pad>", "<s>", "</s>", "<unk>", "|"]
    model = make_tiny_adapter_checkpoint(tmp_path / "mms", vocabularies={
        "eng": [*specials, *"abcd"], "spa": [*specials, *"abcdñ", "'"], "fra": [*specials, *"abcdé"]})
    table = json.loads((model / "vocab.json").read_text(encoding="utf-8"))
    table["spa"] = table["fra"]  # 10 tokens for spa's 11-output head
    del table["fra"]  # fra's adapter without a vocabulary
    (model / "vocab.json").write_text(json.dumps(table, ensure_ascii=False), encoding="utf-8")
    # deu: a head of a new size, then an adapter layer of the wrong shape (found after the head is replaced)
    weights = load_file(model / "adapter.eng.safetensors")
    first = next(name for name in weights if not name.startswith("lm_head"))
    weights |= {"lm_head.weight": torch.zeros(12, weights["lm_head.weight"].shape[1]),
                "lm_head.bias": torch.zeros(12), first: torch.zeros(weights[first].shape[0] + 1)}
    save_file(weights, model / "adapter.deu.safetensors")

    wave = np.asarray(sf.read(varying_noise(tmp_path / "a.wav", duration_s=1.0))[0], dtype=np.float32)
    recognizer = Recognizer(model, device="cpu", lang="eng")
    before = recognizer.log_probs([wave])[0]
    for language, message in (("spa", "vocab.json has 10 tokens for language 'spa' but the CTC head has 11"),
                              ("fra", "vocab.json holds one vocabulary per language; choose target_lang from "
                                      "eng, spa"),
                              ("deu", "cannot load the adapter for language 'deu'"),
                              ("ita", r"no adapter for language 'ita' in this model folder \(it has: deu, eng, fra, "
                                      r"spa\)")):
        with pytest.raises(InputError, match=message):
            recognizer.use_adapter(language)
        assert recognizer.lang == "eng" and recognizer.vocabulary.tokens[-1] == "d"
        assert recognizer.model.config.vocab_size == 9 and recognizer.model.target_lang == "eng"
        assert torch.equal(recognizer.log_probs([wave])[0], before), language
    recognizer.use_adapter("eng")  # a switch after failed ones gives what the language gave before
    assert torch.equal(recognizer.log_probs([wave])[0], before)


def test_windows_stitch_to_the_single_pass_result(tmp_path, local_model_dir, monkeypatch):
    path = varying_noise(tmp_path / "long.wav", duration_s=4.0)
    segments, _ = find_audio([str(path)])
    recognizer = Recognizer(local_model_dir, device="cpu")
    decoder = GreedyDecoder(recognizer.vocabulary, frame_s=recognizer.frame_s)
    ((_, one_pass),) = emissions(recognizer, segments, options=TranscribeOptions(chunk_s=60.0))
    (single,) = transcribe(recognizer, segments, decoder=decoder, options=TranscribeOptions(chunk_s=60.0))
    assert len(set(one_pass.argmax(-1).tolist())) >= 4 and len(single.transcript.words) >= 3

    requested = []

    def recording_load_audio(*args, duration_s=None, **kwargs):
        requested.append(duration_s)
        return load_audio(*args, duration_s=duration_s, **kwargs)

    load_audio = transcribe_module.load_audio
    monkeypatch.setattr(transcribe_module, "load_audio", recording_load_audio)
    for chunk_s, stride_s, max_batch_s in ((1.0, 0.25, 3.0), (0.7, 0.1, 0.5), (2.5, 0.2, 10.0)):
        requested.clear()
        options = TranscribeOptions(chunk_s=chunk_s, stride_s=stride_s, max_batch_s=max_batch_s)
        ((_, stitched),) = emissions(recognizer, segments, options=options)
        assert stitched.shape == one_pass.shape
        torch.testing.assert_close(stitched, one_pass, atol=1e-4, rtol=0)
        assert torch.equal(stitched.argmax(-1), one_pass.argmax(-1))
        (windowed,) = transcribe(recognizer, segments, decoder=decoder, options=options)
        assert windowed.transcript.text == single.transcript.text
        # the file is never read whole: every read is one window with its context
        assert requested and all(d is not None and d <= chunk_s + 2 * stride_s + 0.01 for d in requested)


def test_bad_inputs_are_reported_by_name_and_the_run_goes_on(tmp_path, model_dir):
    good = write_tone(tmp_path / "good.wav", duration_s=0.5)
    (tmp_path / "text.flac").write_text("hello")
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, dtype=np.float32), 16000)
    segments, problems = find_audio([str(good), str(tmp_path / "text.flac"), str(empty), str(tmp_path / "none.wav"),
                                     str(tmp_path / "*.ogg")])
    assert [s.path for s in segments] == [str(good)]
    assert {(p.path.rsplit("/", 1)[-1], p.kind) for p in problems} == {
        ("text.flac", "unreadable_audio"), ("empty.wav", "zero_length"), ("none.wav", "missing_file"),
        ("*.ogg", "missing_file")}
    # a file that breaks between listing and reading: the others still come out
    recognizer = Recognizer(model_dir, device="cpu")
    vanished = write_tone(tmp_path / "vanished.wav", duration_s=0.6)
    segments, _ = find_audio([str(good), str(vanished)])
    vanished.unlink()
    results = list(transcribe(recognizer, segments,
                              decoder=GreedyDecoder(recognizer.vocabulary, frame_s=recognizer.frame_s)))
    assert [type(r) for r in results] == [Problem, Transcription] or [type(r) for r in results] == [Transcription,
                                                                                                      Problem]
    (problem,) = [r for r in results if isinstance(r, Problem)]
    assert problem.path == str(vanished) and problem.kind == "unreadable_audio"


def write_pcm16(path, samples) -> Path:
    """16-bit samples (integers) as a 16 kHz PCM WAV file."""
    sf.write(path, np.asarray(samples, dtype=np.int16), 16000, subtype="PCM_16")
    return Path(path)


@pytest.mark.parametrize("chunk_s", [30.0, 0.4])  # whole files, and files read in windows
def test_digital_silence_gets_an_empty_transcript_without_the_model(tmp_path, model_dir, chunk_s, caplog):
    silence = digital_silence(tmp_path / "silence.wav", duration_s=1.0)
    t = np.arange(12800) / 16000
    quiet = write_pcm16(tmp_path / "quiet.wav", np.round(32768 * 10 ** (-50 / 20) * np.sqrt(2)
                                                         * np.sin(2 * np.pi * 440 * t)))  # a tone at -50 dBFS
    loud = varying_noise(tmp_path / "loud.wav", duration_s=0.6)
    segments, _ = find_audio([str(silence), str(quiet), str(loud)])
    recognizer = Recognizer(model_dir, device="cpu")
    decoder = GreedyDecoder(recognizer.vocabulary, frame_s=recognizer.frame_s)
    heard: list[tuple[int, float]] = []  # (samples, peak in LSB) of each waveform the model was given
    real_log_probs = recognizer.log_probs

    def recorded(waveforms, **kwargs):
        heard.extend((len(w), float(np.abs(w).max()) * 32768) for w in waveforms)
        return real_log_probs(waveforms, **kwargs)

    recognizer.log_probs = recorded
    windows = chunk_s < 1  # then every file is read in windows of at most chunk_s + 2 x stride_s
    options = TranscribeOptions(chunk_s=chunk_s, stride_s=0.1)
    with caplog.at_level(logging.INFO, logger="speechxfer"):
        results = {r.segment.path: r for r in transcribe(recognizer, segments, decoder=decoder, options=options)}
    assert [m for m in caplog.messages if "silent" in m] == [
        "1 of 3 inputs are silent (below -70 dBFS): empty transcripts, not run through the model"]
    gated = results[str(silence)]
    assert gated.transcript.text == "" and gated.transcript.words == () and -96 < gated.silent_dbfs < -90
    assert results[str(quiet)].silent_dbfs is None and results[str(loud)].silent_dbfs is None
    assert results[str(loud)].transcript.text  # the random model spells noise
    assert min(peak for _, peak in heard) > 100  # never the silence (peak 1 LSB); the quiet tone's is ~200
    lengths = [n for n, _ in heard]
    assert max(lengths) <= 0.6 * 16000 and len(lengths) > 2 if windows else sorted(lengths) == [9600, 12800]
    # emissions (LM tuning, source ranking) give the silent file no frames: any decoder makes it empty
    found = {segment.path: lp for segment, lp in emissions(recognizer, segments, options=options)}
    assert found[str(silence)].shape == (0, len(recognizer.vocabulary))
    assert found[str(quiet)].shape[0] > 0

    heard.clear()
    caplog.clear()
    results = {r.segment.path: r for r in transcribe(recognizer, segments, decoder=decoder,
                                                     options=TranscribeOptions(chunk_s=chunk_s, stride_s=0.1,
                                                                               silence_dbfs=None))}
    assert all(r.silent_dbfs is None for r in results.values()) and "silent" not in caplog.text
    assert min(peak for _, peak in heard) == 1  # the silence is run through the model too


def test_silence_dbfs_on_the_command_line(tmp_path, model_dir, capsys):
    silence = digital_silence(tmp_path / "silence.wav", duration_s=0.5)
    assert main(["transcribe", str(model_dir), str(silence), "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{silence}\t\n"
    assert "warning: 1 of 1 inputs are silent (below -70 dBFS)" in captured.err
    assert main(["transcribe", str(model_dir), str(silence), "--device", "cpu", "--silence-dbfs", "off"]) == 0
    assert "silent" not in capsys.readouterr().err
    assert main(["transcribe", str(model_dir), str(silence), "--device", "cpu", "--silence-dbfs", "-100"]) == 0
    assert "silent" not in capsys.readouterr().err
    assert main(["transcribe", str(model_dir), str(silence), "--silence-dbfs", "6"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "speechxfer transcribe: error: silence_dbfs (--silence-dbfs) must be a level of at most 0 dBFS, or off; "
        "got 6")
    with pytest.raises(SystemExit) as exit_info:
        main(["transcribe", str(model_dir), str(silence), "--silence-dbfs", "quiet"])
    assert exit_info.value.code == 2 and "expected a level in dBFS (such as -70) or off, got 'quiet'" in (
        capsys.readouterr().err)


def test_output_names_do_not_collide(tmp_path):
    write_tone(tmp_path / "a" / "x.wav", duration_s=0.2)
    write_tone(tmp_path / "a" / "x.flac", duration_s=0.2)
    write_tone(tmp_path / "a" / "sub" / "x.wav", duration_s=0.2)
    segments, _ = find_audio([str(tmp_path / "a")], recursive=True)
    assert sorted(s.name for s in segments) == ["sub/x", "x.flac", "x.wav"]
    assert OUTPUT_FORMATS == ("txt", "json", "srt", "vtt", "tsv")


def test_a_rerun_keeps_finished_work_and_overwrite_redoes_it(tmp_path, model_dir, monkeypatch, capsys):
    audio = [str(write_tone(tmp_path / "in" / f"f{i}.wav", duration_s=0.4 + 0.1 * i, seed=i)) for i in range(3)]
    out = tmp_path / "out"
    real_transcribe = transcribe_module.transcribe
    asked: list[list[str]] = []  # the files each run gave the model
    stop_after: list[int] = []

    def recording(recognizer, segments, **kwargs):
        asked.append(sorted(s.path for s in segments))
        for n, result in enumerate(real_transcribe(recognizer, segments, **kwargs), start=1):
            yield result
            if stop_after and n == stop_after[0]:
                raise KeyboardInterrupt

    monkeypatch.setattr(transcribe_module, "transcribe", recording)
    command = ["transcribe", str(model_dir), *audio, "--output-dir", str(out), "--device", "cpu"]
    stop_after.append(1)  # Ctrl-C after the first file
    assert main(command) == 130
    (first,) = read_index(out / "transcripts.tsv")
    finished = {p: (out / f"{Path(p).stem}.txt").stat().st_mtime_ns for p in audio if p == first}
    # a kill while appending a row leaves half a line: it must not count, nor stop the next run
    with open(out / "transcripts.tsv", "a", encoding="utf-8") as f:
        f.write(f"{audio[2]}\thalf a ro")
    stop_after.clear()
    capsys.readouterr()
    assert main(command) == 0
    err = capsys.readouterr().err
    assert "1 of 3 files already transcribed" in err and "transcribed 2 of 2 inputs (1 done before)" in err
    assert asked[-1] == sorted(p for p in audio if p != first)
    rows = read_index(out / "transcripts.tsv")
    assert list(rows) == audio  # every row, in input order, the unfinished one replaced
    assert {t for t in rows.values()} == {(out / f"f{i}.txt").read_text().strip() for i in range(3)}
    assert all((out / f"{Path(p).stem}.txt").stat().st_mtime_ns == ns for p, ns in finished.items())
    # all done: nothing to do, the model is not even loaded
    assert main(command) == 0 and len(asked) == 2
    assert main(command + ["--overwrite"]) == 0
    assert asked[-1] == sorted(audio) and list(read_index(out / "transcripts.tsv")) == audio
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_tabs_and_newlines_in_file_names_stay_inside_their_field(tmp_path, model_dir, capsys):
    names = ["tab\there", "new\nline", "back\\slash"]
    audio = [str(write_tone(tmp_path / f"{name}.wav", duration_s=0.5, seed=i)) for i, name in enumerate(names)]
    out = tmp_path / "out"
    assert main(["transcribe", str(model_dir), *audio, "--output-dir", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out.splitlines()
    lines = (out / "transcripts.tsv").read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(printed) == 3 and all(line.count("\t") == 1 for line in lines + printed)
    assert sorted(printed) == sorted(lines)
    rows = read_index(out / "transcripts.tsv")
    assert list(rows) == audio
    assert [rows[p] for p in audio] == [(out / f"{name}.txt").read_text().strip() for name in names]
    assert tsv_unescape(tsv_escape("a\\tb\t\\\n")) == "a\\tb\t\\\n"


def test_audio_shorter_than_the_receptive_field(tmp_path, model_dir):
    recognizer = Recognizer(model_dir, device="cpu")
    assert recognizer.min_samples == 85  # kernels 10, 4, 4 with strides 5, 4: 10 + 3*5 + 3*20
    decoder = GreedyDecoder(recognizer.vocabulary, frame_s=recognizer.frame_s)
    tiny = write_tone(tmp_path / "tiny.wav", duration_s=0.001)
    exact = write_tone(tmp_path / "exact.wav", duration_s=85 / 16000)
    good = write_tone(tmp_path / "good.wav", duration_s=0.5)
    segments, problems = find_audio([str(tiny), str(exact), str(good)])
    assert not problems
    results = {r.segment.id if isinstance(r, Transcription) else r.path: r
               for r in transcribe(recognizer, segments, decoder=decoder)}
    assert results[str(tiny)].kind == "too_short" and "1 ms of audio" in results[str(tiny)].message
    assert isinstance(results[str(exact)], Transcription) and isinstance(results[str(good)], Transcription)
    with pytest.raises(InputError, match=r"chunk_s \(--chunk-s\) of 0.001 s is shorter than the model's receptive"):
        list(transcribe(recognizer, segments, decoder=decoder, options=TranscribeOptions(chunk_s=0.001)))
    # windows without context whose last one would be 20 samples long: the tail joins the window before it
    tail = write_tone(tmp_path / "tail.wav", duration_s=(3 * 1600 + 20) / 16000)
    segments, _ = find_audio([str(tail)])
    ((_, stitched),) = emissions(recognizer, segments, options=TranscribeOptions(chunk_s=0.1, stride_s=0.0))
    # (1600 - 85) // 80 + 1 = 19 frames from each of the first two windows, 20 from the last (1600 + 20 samples);
    # alone, the 20-sample tail would have stopped the convolutions
    assert len(stitched) == 19 + 19 + 20


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_batch_s": -5}, r"max_batch_s \(--max-batch-s\) must be more than 0 seconds, got -5"),
    ({"chunk_s": 0}, r"chunk_s \(--chunk-s\) must be more than 0"),
    ({"stride_s": -1}, r"stride_s \(--stride-s\) must be at least 0"),
    ({"chunk_s": float("nan")}, r"chunk_s"),
])
def test_options_that_make_no_sense_are_refused(kwargs, message):
    with pytest.raises(InputError, match=message):
        TranscribeOptions(**kwargs)


def test_shares_cover_every_unit_once_and_balance_seconds():
    seconds = [9.0, 1.0, 4.0, 4.0, 3.0, 2.0, 2.0, 1.0]
    shares = [transcribe_module.Ranks(rank, 3).share(seconds) for rank in range(3)]
    assert sorted(i for share in shares for i in share) == list(range(len(seconds)))
    assert all(share == sorted(share) for share in shares)
    assert sorted(sum(seconds[i] for i in share) for share in shares) == [8.0, 9.0, 9.0]
    assert transcribe_module.Ranks().share(seconds) == list(range(len(seconds)))


def test_two_processes_write_what_one_writes(tmp_path, model_dir):
    from processes import one_and_two_processes

    audio = tmp_path / "audio"
    audio.mkdir()
    for i, duration_s in enumerate((0.6, 1.9, 1.2, 0.9, 1.4, 4.0)):  # 4.0 s: in windows, below
        varying_noise(audio / f"{i}.wav", duration_s=duration_s, seed=20 + i)
    one, two, stderr = one_and_two_processes(["transcribe", str(model_dir), str(audio), "--device", "cpu",
                                              "--max-batch-s", "2.5", "--chunk-s", "1.5", "--stride-s", "0.3"],
                                             tmp_path)
    assert "process 0 of 2" in stderr and "process 1 of 2" in stderr
    assert len(one) == 6 * 4 + 1 and sorted(two) == sorted(one)  # no part files left behind
    assert all(two[name] == one[name] for name in one), [name for name in one if two[name] != one[name]]
