import contextlib
import io
import json
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


# --- the `lm:` stage of a recipe: built after `speechxfer train`, used by transcribe/evaluate of the folder --------

SPLITS = {"train": ["Abc ab", "ca ab", "bac a", "cab", "a bc", "AB CA"],  # "ab ca" is also a test transcript
          "dev": ["cc ab", "abba"], "test": ["b a c", "ab ca"]}
# Two lines equal to a dev or test transcript once normalized, which the LM must not see.
LM_TEXT = "Cab abc.\nCC, ab!\na cab ba\nB  a C\nbac bac cab\n"


def write_lm_run(folder, *, lm: dict | None = None):
    """Tone manifests with SPLITS' texts, lm.txt, and a recipe of 4 updates from a tiny checkpoint; returns the
    recipe's path. `lm` is the recipe's lm section (default: lm.txt, a 2 x 1 grid, beam 5)."""
    import yaml

    manifests, k = {}, 0
    for split, texts in SPLITS.items():
        utterances = []
        for text in texts:
            duration_s = 0.8 + 0.2 * (k % 3)
            audio = write_tone(folder / "audio" / f"u{k}.wav", duration_s=duration_s, frequency_hz=200 + 50 * k, seed=k)
            utterances.append(Utterance(f"u{k}", str(audio), text, duration_s))
            k += 1
        manifests[split] = folder / f"{split}.jsonl"
        write_manifest(manifests[split], utterances)
    (folder / "lm.txt").write_text(LM_TEXT, encoding="utf-8")
    base = make_tiny_checkpoint(folder / "ssl")
    recipe = {"base": str(base), "data": {name: str(path) for name, path in manifests.items()},
              "train": {"max_updates": 4, "max_batch_s": 2.5, "lr": 1e-3, "min_duration_s": 0.1, "log_every": 1},
              "eval": {"every_updates": 2}, "output_dir": str(folder / "out"),
              "lm": {"texts": ["lm.txt"], "weights": [0.5, 2.0], "word_scores": [0.0], "beam_size": 5} if lm is None
              else lm}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


class Captured:
    """stdout and stderr of a block (capsys is per test; these runs are shared by a module's tests)."""

    def __enter__(self):
        self._out, self._err = io.StringIO(), io.StringIO()
        self._redirects = contextlib.ExitStack()
        self._redirects.enter_context(contextlib.redirect_stdout(self._out))
        self._redirects.enter_context(contextlib.redirect_stderr(self._err))
        return self

    def __exit__(self, *exc):
        self._redirects.close()
        self.out, self.err = self._out.getvalue(), self._err.getvalue()


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    """`speechxfer train` of a recipe with an lm: section, its LM stage cut short by a kill (KeyboardInterrupt in
    the tuning), then `train --resume`: (recipe path, output folder, first run's output and the files it left in
    lm/, resumed run's output, the test_report.json and metrics.jsonl the first run left)."""
    import speechxfer.lm

    folder = tmp_path_factory.mktemp("lm_run")
    recipe = write_lm_run(folder)
    out = folder / "out"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch, Captured() as first:
        patch.setattr(speechxfer.lm, "tune_lm", killed)
        assert main(["train", str(recipe)]) == 130
    first.lm_files = sorted(path.name for path in (out / "lm").iterdir())
    greedy_report = json.loads((out / "test_report.json").read_text(encoding="utf-8"))
    metrics = (out / "metrics.jsonl").read_text(encoding="utf-8")
    with Captured() as resumed:
        assert main(["train", str(recipe), "--resume"]) == 0
    return recipe, out, first, resumed, greedy_report, metrics


@needs_lmplz
def test_an_interrupted_lm_stage_keeps_the_greedy_report_and_resume_redoes_only_it(lm_run):
    _, out, first, resumed, greedy_report, metrics = lm_run
    assert "interrupted" in first.err
    assert "lm" not in greedy_report and greedy_report["sentences"] == 2  # the greedy report, written before
    assert first.lm_files == ["lm.arpa", "text.txt"]  # no decoder.json: transcribe/evaluate stayed greedy
    # the resumed run trained no further, and its report keeps every greedy number
    assert (out / "metrics.jsonl").read_text(encoding="utf-8") == metrics
    report = json.loads((out / "test_report.json").read_text(encoding="utf-8"))
    assert {k: v for k, v in report.items() if k != "lm"} == greedy_report
    assert f"test WER {greedy_report['wer']:.2%}" in resumed.out and "test WER with the LM" in resumed.out


@needs_lmplz
def test_the_lm_stage_builds_tunes_and_reports_greedy_and_with_the_lm(lm_run):
    _, out, _, resumed, _, _ = lm_run
    report = json.loads((out / "test_report.json").read_text(encoding="utf-8"))
    settings = json.loads((out / "lm" / "decoder.json").read_text(encoding="utf-8"))
    assert settings["lm_path"] == "lm.arpa" and settings["beam_size"] == 5 and settings["order"] == 3
    assert settings["lm_weight"] in (0.5, 2.0) and settings["word_score"] == 0.0 and settings["dev_utterances"] == 2
    assert report["lm"]["decoder"] == settings and report["lm"]["sentences"] == 2
    assert 0 <= report["lm"]["wer"] and 0 <= report["lm"]["greedy"]["wer"] and "wer_ci95" in report["lm"]
    assert (out / "lm" / "lm.arpa").read_text(encoding="utf-8").startswith("\\data\\")
    assert f"LM weight {settings['lm_weight']:g}, word score 0: dev WER" in resumed.err
    # plain transformers still loads the folder
    from transformers import Wav2Vec2ForCTC, pipeline

    Wav2Vec2ForCTC.from_pretrained(out)
    pipeline("automatic-speech-recognition", model=str(out), device="cpu")


@needs_lmplz
def test_the_lm_never_sees_a_dev_or_test_transcript(lm_run):
    _, out, _, resumed, _, _ = lm_run
    lines = (out / "lm" / "text.txt").read_text(encoding="utf-8").splitlines()
    # lm.txt without "CC, ab!" (dev) and "B  a C" (test), then the train transcripts without "AB CA" (test)
    assert lines == ["cab abc", "a cab ba", "bac bac cab", "abc ab", "ca ab", "bac a", "cab", "a bc"]
    assert "3 lines equal to a dev or test transcript left out (2 of lm.texts, 1 train transcripts)" in resumed.err


@needs_lmplz
def test_transcribe_and_evaluate_of_the_folder_use_its_lm_unless_told_otherwise(lm_run, tmp_path, capsys):
    recipe, out, _, _, _, _ = lm_run
    test = recipe.parent / "test.jsonl"
    lexicon = set((out / "lm" / "text.txt").read_text(encoding="utf-8").split())

    assert main(["evaluate", str(out), str(test), "--output-dir", str(tmp_path / "with"), "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert err.count("decoding with the model's language model") == 1 and "LM weight" in err
    assert f"decoder: beam search (LM {out / 'lm' / 'lm.arpa'}, beam 5" in (tmp_path / "with" / "report.md").read_text()
    hypotheses = [json.loads(line)["text"] for line in (tmp_path / "with" / "hypotheses.jsonl").open()]
    assert set(" ".join(hypotheses).split()) <= lexicon  # beam search spells only the LM's words

    assert main(["evaluate", str(out), str(test), "--output-dir", str(tmp_path / "greedy"), "--device", "cpu",
                 "--no-lm"]) == 0
    assert "language model" not in capsys.readouterr().err
    assert "decoder: greedy" in (tmp_path / "greedy" / "report.md").read_text()

    other = tmp_path / "other.arpa"
    other.write_text(ARPA, encoding="utf-8")
    assert main(["evaluate", str(out), str(test), "--output-dir", str(tmp_path / "other"), "--device", "cpu",
                 "--lm", str(other), "--beam-size", "3"]) == 0
    assert "model's language model" not in capsys.readouterr().err
    assert f"decoder: beam search (LM {other}, beam 3" in (tmp_path / "other" / "report.md").read_text()

    audio = str(recipe.parent / "audio" / "u8.wav")
    assert main(["transcribe", str(out), audio, "--device", "cpu", "--lm-weight", "7"]) == 0
    captured = capsys.readouterr()
    assert "decoding with the model's language model" in captured.err and "LM weight 7," in captured.err
    assert set(captured.out.split("\t")[1].split()) <= lexicon
    assert main(["transcribe", str(out), audio, "--device", "cpu", "--no-lm"]) == 0
    assert "language model" not in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:
        main(["transcribe", str(out), audio, "--no-lm", "--lm", str(other)])
    assert refused.value.code == 2 and "--lm: not allowed with argument --no-lm" in capsys.readouterr().err


@needs_lmplz
def test_pseudo_label_uses_the_teachers_lm_unless_told_otherwise(lm_run, tmp_path, capsys):
    recipe, out, _, _, _, _ = lm_run
    lexicon = set((out / "lm" / "text.txt").read_text(encoding="utf-8").split())
    audio = str(recipe.parent / "audio")
    assert main(["pseudo-label", str(out), audio, "--output", str(tmp_path / "lm.jsonl"), "--device", "cpu"]) == 0
    assert "decoding with the model's language model" in capsys.readouterr().err
    texts = [json.loads(line)["text"] for line in (tmp_path / "lm.jsonl").open()]
    assert set(" ".join(texts).split()) <= lexicon  # beam search spells only the LM's words (the tiny teacher may
    # leave every row empty: those are dropped)
    assert main(["pseudo-label", str(out), audio, "--output", str(tmp_path / "greedy.jsonl"), "--device", "cpu",
                 "--no-lm"]) == 0
    assert "language model" not in capsys.readouterr().err


def test_without_lmplz_training_reports_greedy_only_and_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    recipe = write_lm_run(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert main(["train", str(recipe)]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("bash scripts/install_kenlm.sh") == 2  # before training, and at the LM stage
    assert "test WER" in captured.out and "with the LM" not in captured.out
    assert "lm" not in json.loads((tmp_path / "out" / "test_report.json").read_text(encoding="utf-8"))
    assert not (tmp_path / "out" / "lm").exists()


def test_an_unreadable_lm_text_stops_train_before_it_starts(tmp_path, capsys):
    recipe = write_lm_run(tmp_path, lm={"texts": ["lm.txt", "missing.txt"]})
    (tmp_path / "lm.txt").write_bytes(b"cab\nab \xff ba\n")
    assert main(["train", str(recipe)]) == 2
    assert f"{tmp_path / 'lm.txt'}:2: not UTF-8 text: byte 0xff" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    (tmp_path / "lm.txt").write_text("cab\n", encoding="utf-8")
    assert main(["train", str(recipe)]) == 2
    assert f"{tmp_path / 'missing.txt'}: cannot read text: No such file" in capsys.readouterr().err
