import json

import pytest
from tiny import make_tiny_checkpoint, write_tone

from speechxfer.cli import main
from speechxfer.decoding import GreedyDecoder
from speechxfer.evaluate import evaluate, frequent_substitutions
from speechxfer.manifest import Utterance, write_manifest
from speechxfer.scoring import score
from speechxfer.transcribe import Recognizer

CTC_VOCAB = ["[PAD]", "[UNK]", "|", *"abcdefghij"]
TEXTS = ["Abc deaf", "a bad cab", "Jig, fig!", "hide ice", "bead"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    model = make_tiny_checkpoint(root / "model", ctc_vocab=CTC_VOCAB)
    utterances = []
    for i, text in enumerate(TEXTS):
        path = write_tone(root / "clips" / f"u{i}.wav", duration_s=0.5 + 0.2 * i, frequency_hz=200.0 + 90 * i, seed=i)
        utterances.append(Utterance(f"u{i}", str(path), text, 0.5 + 0.2 * i))
    (root / "clips" / "broken.wav").write_text("not audio")
    utterances.append(Utterance("broken", str(root / "clips" / "broken.wav"), "big fade", 1.0))
    write_manifest(root / "test.jsonl", utterances)
    return model, root / "test.jsonl"


def wer_json(capsys, *args: str) -> dict:
    assert main(["wer", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_evaluate_equals_wer_on_its_own_hypotheses(tmp_path, corpus, capsys):
    model, manifest = corpus
    out = tmp_path / "eval"
    assert main(["evaluate", str(model), str(manifest), "--output-dir", str(out), "--normalize", "basic",
                 "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "broken.wav: [unreadable_audio]" in captured.err
    hypotheses = [json.loads(line) for line in (out / "hypotheses.jsonl").read_text().splitlines()]
    assert sorted(h["id"] for h in hypotheses) == ["broken", "u0", "u1", "u2", "u3", "u4"]
    assert [h["text"] for h in hypotheses if h["id"] == "broken"] == [""]
    ours = json.loads((out / "score.json").read_text())
    theirs = wer_json(capsys, str(manifest), str(out / "hypotheses.jsonl"), "--normalize", "basic")
    assert {k: theirs[k] for k in ours} == ours
    assert ours["sentences"] == 6 and ours["ref_words"] == 12 and ours["wer_ci95"] is not None
    rows = (out / "per_utterance.tsv").read_text().splitlines()
    assert len(rows) == 1 + 6
    report = (out / "report.md").read_text()
    assert f"WER {ours['wer']:.2%}" in report and "broken.wav" in report
    # without normalization the references keep their capitals and commas: a different, still equal, score
    out_raw = tmp_path / "raw"
    assert main(["evaluate", str(model), str(manifest), "--output-dir", str(out_raw), "--device", "cpu"]) == 0
    capsys.readouterr()
    raw = json.loads((out_raw / "score.json").read_text())
    assert {k: v for k, v in wer_json(capsys, str(manifest), str(out_raw / "hypotheses.jsonl")).items()
            if k in raw} == raw


def test_frequent_substitutions_count_aligned_word_pairs(tmp_path, corpus):
    report = score({"1": "a b c d", "2": "a b e", "3": "x b"}, {"1": "a q c", "2": "a q e f", "3": "x r"},
                   bootstrap=0)
    assert frequent_substitutions(report, 2) == [("b", "q", 2), ("b", "r", 1)]
    model, manifest = corpus
    recognizer = Recognizer(model, device="cpu")
    result = evaluate(recognizer, manifest, output_dir=tmp_path, bootstrap=0,
                      decoder=GreedyDecoder(recognizer.vocabulary, frame_s=recognizer.frame_s))
    assert sum(c for _, _, c in result.substitutions) <= result.report.substitutions
    assert result.report.sentences == 6 and len(result.problems) == 1


def test_references_the_normalizer_rejects_are_left_out_and_counted(tmp_path, corpus, capsys):
    model, manifest = corpus
    rows = manifest.read_text().splitlines()
    digits = json.loads(rows[0]) | {"id": "digits", "text": "bad 42 cab"}
    empty = json.loads(rows[1]) | {"id": "punctuation", "text": "?!"}
    (tmp_path / "test.jsonl").write_text("\n".join(rows + [json.dumps(digits), json.dumps(empty)]) + "\n")
    (tmp_path / "text.yaml").write_text("text:\n  digits: reject\n")
    out = tmp_path / "eval"
    assert main(["evaluate", str(model), str(tmp_path / "test.jsonl"), "--output-dir", str(out), "--normalize",
                 str(tmp_path / "text.yaml"), "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "2 utterances left out of scoring (1 rejected by the normalizer, 1 empty after normalization)" \
        in captured.out
    assert "utterance digits: the normalizer rejects the reference" in captured.err
    scored = json.loads((out / "score.json").read_text())
    assert scored["sentences"] == 6  # the five clips and the broken one, as without the two extra rows
    report = (out / "report.md").read_text()
    assert "left out: 2 utterances" in report and "--allow-missing" in report and "[rejected_text]" in report
    theirs = wer_json(capsys, str(tmp_path / "test.jsonl"), str(out / "hypotheses.jsonl"), "--normalize",
                      str(tmp_path / "text.yaml"), "--allow-missing")
    assert theirs["wer"] == scored["wer"]


def test_two_processes_write_what_one_writes(tmp_path, corpus):
    """`evaluate` under torchrun: each process transcribes its share, rank 0 merges and scores; the files are those
    of one process, and no part file (hypotheses.jsonl.rankN, problems.rankN.jsonl) is left behind."""
    from processes import one_and_two_processes

    model, manifest = corpus
    one, two, stderr = one_and_two_processes(["evaluate", str(model), str(manifest), "--device", "cpu", "--normalize",
                                              "basic", "--max-batch-s", "1.5"], tmp_path)
    assert "broken.wav: [unreadable_audio]" in stderr  # the failure of whichever process read it, reported once
    assert sorted(one) == ["hypotheses.jsonl", "per_utterance.tsv", "report.md", "score.json"]
    assert sorted(two) == sorted(one)  # no part files left behind
    assert all(two[name] == one[name] for name in one), [name for name in one if two[name] != one[name]]
