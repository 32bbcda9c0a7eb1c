"""Synthetic corpora (espeak-ng), the sentence filter of scripts/prepare_texts.py, and scripts/train_seed.py."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speechxfer.cli import main as cli_main
from speechxfer.errors import InputError
from speechxfer.manifest import load_manifest
from speechxfer.synth import (Voice, _ProgramEspeak, build_corpus, espeak_available, is_plain_sentence,
                              read_sentences)

ROOT = Path(__file__).resolve().parent.parent
needs_espeak = pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed (speechxfer[synth])")

SENTENCES = ["Guten Morgen, wie geht es dir heute?", "Das Wetter ist schön und warm.",
             "Ich lese gern ein gutes Buch.", "Wo ist der nächste Bahnhof?", "Wir fahren morgen nach Berlin."]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def corpus_dirs(tmp_path_factory):
    """The same corpus built twice: once with two processes, once through the CLI with one."""
    if not espeak_available():
        pytest.skip("espeak-ng is not installed (speechxfer[synth])")
    base = tmp_path_factory.mktemp("synth")
    build_corpus("de", SENTENCES, base / "a", seed=7, jobs=2)
    sentences = base / "de.txt"
    sentences.write_text("\n".join(SENTENCES + SENTENCES[:2]) + "\n", encoding="utf-8")  # repeats are dropped
    assert cli_main(["synth", "de", str(sentences), str(base / "b"), "--seed", "7", "--jobs", "1"]) == 0
    return base / "a", base / "b"


@needs_espeak
def test_corpus_is_deterministic_16khz_flac(corpus_dirs):
    a, b = corpus_dirs
    files = sorted((a / "audio").glob("*.flac"))
    assert [f.name for f in files] == [f"de-{i:06d}.flac" for i in range(len(SENTENCES))]
    for f in files:
        info = sf.info(f)
        assert (info.format, info.samplerate, info.channels) == ("FLAC", 16000, 1)
        samples, _ = sf.read(f, dtype="int16")
        again, _ = sf.read(b / "audio" / f.name, dtype="int16")
        assert samples.size > 8000 and np.array_equal(samples, again)
    for split in ("train", "dev", "test"):
        assert (a / f"{split}.jsonl").read_text() == (b / f"{split}.jsonl").read_text()


@needs_espeak
def test_manifest_matches_files_and_splits_are_disjoint(corpus_dirs):
    a, _ = corpus_dirs
    splits = {name: load_manifest(a / f"{name}.jsonl") for name in ("train", "dev", "test")}
    assert [len(splits["dev"]), len(splits["test"])] == [1, 1]
    everything = [u for utterances in splits.values() for u in utterances]
    assert sorted(u.id for u in everything) == [f"de-{i:06d}" for i in range(len(SENTENCES))]
    assert sorted(u.text for u in everything) == sorted(SENTENCES)
    for u in everything:
        info = sf.info(u.audio_path)
        assert u.duration_s == pytest.approx(info.frames / info.samplerate, abs=1e-6)
        assert u.language == "de" and u.speaker.startswith("de+") and "-s" in u.speaker
    # relative paths keep the corpus movable
    assert json.loads((a / "train.jsonl").read_text().splitlines()[0])["audio_path"].startswith("audio/")


@needs_espeak
def test_noise_changes_samples_not_length(tmp_path, corpus_dirs):
    a, _ = corpus_dirs
    build_corpus("de", SENTENCES[:1], tmp_path, seed=7, noise_snr_db=10.0)
    clean, _ = sf.read(a / "audio" / "de-000000.flac")
    noisy, _ = sf.read(tmp_path / "audio" / "de-000000.flac")
    assert noisy.shape == clean.shape
    snr_db = 10 * np.log10(np.mean(clean ** 2) / np.mean((noisy - clean) ** 2))
    assert 8.0 < snr_db < 12.0


@needs_espeak
def test_unknown_voice_is_a_one_line_error(tmp_path, capsys):
    sentences = tmp_path / "s.txt"
    sentences.write_text("Un dos tres cuatro.\n", encoding="utf-8")
    assert cli_main(["synth", "xx-nothing", str(sentences), str(tmp_path / "out"), "--jobs", "1"]) == 2
    assert "xx-nothing" in capsys.readouterr().err


def test_bad_sentence_files_and_output_folders_are_one_line_naming_the_path(tmp_path, capsys):
    sentences = tmp_path / "s.txt"
    sentences.write_text("Un dos tres cuatro.\n", encoding="utf-8")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("Un dos tres.\n".encode() + "Cinco seis siete ocho ñ.\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"latin1\.txt:2: not UTF-8 \(invalid continuation byte\)$"):
        read_sentences(latin1)
    # a folder as SENTENCES_FILE, a file as OUTDIR: no espeak-ng needed to be told
    for argv, message in (
            ([str(tmp_path), str(tmp_path / "out")], f"{tmp_path}: cannot read sentences: Is a directory"),
            ([str(sentences), str(sentences)], f"{sentences}: the output folder is a file"),
            ([str(sentences), str(sentences / "out")], f"{sentences / 'out'}: cannot create the output folder: Not a "
                                                         "directory")):
        assert cli_main(["synth", "es", *argv, "--jobs", "1"]) == 2
        assert capsys.readouterr().err == f"speechxfer synth: error: {message}\n"
    assert not (tmp_path / "out").exists() and sentences.read_text(encoding="utf-8") == "Un dos tres cuatro.\n"


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="no espeak-ng program")
def test_program_fallback_repeats_itself():
    espeak = _ProgramEspeak(shutil.which("espeak-ng"))
    voice = Voice(language="es", variant="m3", speed_wpm=160, pitch=50)
    first = espeak.speak("Hola, buenos días a todos.", voice)
    assert espeak.sample_rate_hz == 22050 and first.dtype == np.int16 and first.size > 10000
    assert np.array_equal(first, espeak.speak("Hola, buenos días a todos.", voice))


def test_plain_sentence_filter():
    prepare = _script("prepare_texts")
    alphabet, punctuation = prepare.ALPHABETS["es"], prepare.COMMON_PUNCTUATION + prepare.PUNCTUATION["es"]
    assert is_plain_sentence("¿Dónde está la estación de trenes?", alphabet=alphabet, punctuation=punctuation)
    rejected = ["Tengo 3 gatos en casa.",  # digit
                "Es muy caro, cuesta mucho $ hoy.",  # symbol
                "Hola amigo mío.",  # three words
                "Me gusta la música de Jörg mucho.",  # letter outside the Spanish alphabet
                "La OTAN se reunió ayer en Bruselas.",  # acronym
                "El archivo (grande) no cabe aquí."]  # brackets
    assert not any(is_plain_sentence(s, alphabet=alphabet, punctuation=punctuation) for s in rejected)
    assert is_plain_sentence("İstanbul çok güzel bir şehir.", alphabet=prepare.ALPHABETS["tr"],
                             punctuation=prepare.COMMON_PUNCTUATION)
    # dialogue dash stripped, split at sentence ends, repeats and untranslated (English) sentences dropped
    paragraphs = ["— ¿Qué hora es ahora mismo? Son las tres y media.  ¿Qué hora es ahora mismo?",
                  "Tengo 3 gatos negros en casa. Open the file with this dialog."]
    assert prepare.plain_sentences(iter(paragraphs), "es", untranslated={"Open the file with this dialog."}) == [
        "¿Qué hora es ahora mismo?", "Son las tres y media."]


@needs_espeak
def test_train_seed_two_updates_then_resume(tmp_path):
    import torch
    from transformers import Wav2Vec2ForCTC

    from speechxfer.vocabulary import Vocabulary

    build_corpus("de", SENTENCES[:3], tmp_path / "data" / "de", seed=1)
    train_seed = _script("train_seed")
    args = ["--data", str(tmp_path / "data"), "--languages", "de", "--out", str(tmp_path / "seed"),
            "--work-dir", str(tmp_path / "run"), "--max-minutes", "5", "--hidden-size", "64", "--layers", "1",
            "--eval-every", "1", "--threads", "1"]
    assert train_seed.main(args + ["--max-updates", "2"]) == 0
    model = Wav2Vec2ForCTC.from_pretrained(tmp_path / "seed", dtype="auto")  # as stored (4.x loads float32)
    vocab = Vocabulary.load(tmp_path / "seed")
    assert model.config.vocab_size == len(vocab) and model.config.pad_token_id == vocab.blank_id
    assert next(model.parameters()).dtype == torch.float16
    with torch.no_grad():
        logits = model.float()(torch.randn(1, 16000)).logits
    assert logits.shape[-1] == len(vocab)
    summary = json.loads((tmp_path / "seed" / "training_summary.json").read_text())
    assert summary["updates"] == 2 and set(summary["test"]) == {"de"}
    assert "| de |" in (tmp_path / "seed" / "README.md").read_text()

    assert train_seed.main(args + ["--max-updates", "3", "--resume"]) == 0
    assert json.loads((tmp_path / "seed" / "training_summary.json").read_text())["updates"] == 3
