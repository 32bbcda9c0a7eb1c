import shutil

import pytest
from tiny import make_tiny_checkpoint, write_tone

from speechxfer.cli import main
from speechxfer.decoding import lexicon_from_arpa
from speechxfer.errors import InputError, SpeechxferError
from speechxfer.lm import build_lm, tune_lm
from speechxfer.manifest import Utterance, write_manifest
from speechxfer.text import TextNormalizer, TextOptions
from speechxfer.transcribe import Recognizer
from speechxfer.vocabulary import Vocabulary

CTC_VOCAB = ["[PAD]", "[UNK]", "|", *"abcdefghij"]
needs_lmplz = pytest.mark.skipif(shutil.which("lmplz") is None, reason="KenLM's lmplz is not on PATH")
ARPA = """\\data\\
ngram 1=6
ngram 2=2

\\1-grams:
-1.0\t<s>\t-0.3
-1.0\t</s>\t0
-2.0\t<unk>\t0
-0.5\tbad\t-0.3
-0.7\tcab\t-0.3
-0.9\tdeaf\t-0.3

\\2-grams:
-0.1\t<s> bad
-0.2\tbad cab

\\end\\
"""


@needs_lmplz
def test_build_normalizes_the_text_and_writes_an_arpa_model(tmp_path, capsys):
    text = tmp_path / "corpus.txt"
    text.write_text("A bad CAB.\nDeaf, bad cab!\n\n   \nHide a bead; a bad cab\n", encoding="utf-8")
    arpa = tmp_path / "lm" / "3gram.arpa"
    assert main(["lm", "build", str(text), str(arpa), "--order", "3"]) == 0
    assert "3-gram ARPA model from 3 lines" in capsys.readouterr().out
    content = arpa.read_text(encoding="utf-8")
    assert content.startswith("\\data\\") and "ngram 3=" in content
    words, skipped = lexicon_from_arpa(arpa, Vocabulary(tuple(CTC_VOCAB)))
    assert set(words) == {"a", "bad", "cab", "deaf", "hide", "bead"} and skipped == 0


def test_build_without_lmplz_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    text = tmp_path / "corpus.txt"
    text.write_text("a bad cab\n", encoding="utf-8")
    with pytest.raises(SpeechxferError, match=r"lmplz is not on PATH.*scripts/install_kenlm.sh"):
        build_lm(text, tmp_path / "lm.arpa", normalizer=TextNormalizer())


def test_tune_searches_the_grid_once_per_point(tmp_path, capsys):
    model = make_tiny_checkpoint(tmp_path / "model", ctc_vocab=CTC_VOCAB)
    utterances = [Utterance(f"u{i}", str(write_tone(tmp_path / f"u{i}.wav", duration_s=0.6, frequency_hz=150.0 * i,
                                                    seed=i)), text, 0.6)
                  for i, text in enumerate(["bad cab", "deaf", "cab bad deaf"], start=1)]
    write_manifest(tmp_path / "dev.jsonl", utterances)
    arpa = tmp_path / "lm.arpa"
    arpa.write_text(ARPA, encoding="utf-8")
    result = tune_lm(Recognizer(model, device="cpu"), tmp_path / "dev.jsonl", lm_path=str(arpa),
                     lm_weights=[0.0, 2.0], word_scores=[-1.0, 3.0], beam_size=10)
    assert [(w, s) for w, s, _ in result.grid] == [(0.0, -1.0), (0.0, 3.0), (2.0, -1.0), (2.0, 3.0)]
    assert result.wer == min(wer for _, _, wer in result.grid) and result.utterances == 3
    assert main(["lm", "tune", str(model), str(tmp_path / "dev.jsonl"), "--lm", str(arpa), "--lm-weights", "0,2",
                 "--word-scores=-1,3", "--beam-size", "10", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"best: --lm-weight {result.lm_weight:g} --word-score {result.word_score:g} (WER {result.wer:.2%}" in out
    assert len([line for line in out.splitlines() if line.count("\t") == 2]) == 1 + 4


def test_tune_leaves_out_references_the_normalizer_rejects(tmp_path):
    model = make_tiny_checkpoint(tmp_path / "model", ctc_vocab=CTC_VOCAB)
    utterances = [Utterance(f"u{i}", str(write_tone(tmp_path / f"u{i}.wav", duration_s=0.6, seed=i)), text, 0.6)
                  for i, text in enumerate(["bad cab", "deaf 2", "cab bad deaf"])]
    write_manifest(tmp_path / "dev.jsonl", utterances)
    arpa = tmp_path / "lm.arpa"
    arpa.write_text(ARPA, encoding="utf-8")
    result = tune_lm(Recognizer(model, device="cpu"), tmp_path / "dev.jsonl", lm_path=str(arpa),
                     lm_weights=[1.0], word_scores=[0.0], beam_size=5,
                     normalizer=TextNormalizer(TextOptions(digits="reject")))
    assert result.utterances == 2
    assert [(p.kind, p.utterance_id) for p in result.left_out] == [("rejected_text", "u1")]
    with pytest.raises(InputError, match=r"beam_size \(--beam-size\)"):
        tune_lm(Recognizer(model, device="cpu"), tmp_path / "dev.jsonl", lm_path=str(arpa), beam_size=0)
