"""Self-training on tiny random checkpoints and generated audio: pseudo-labelled manifests (confidence, threshold,
vocabulary check), training on them under a batch-share cap, the dev/test refusal, and self-train rounds."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml
from transformers import Wav2Vec2ForCTC

from speechxfer import selftrain, training
from speechxfer.batching import DurationBatchSampler
from speechxfer.cli import main
from speechxfer.decoding import GreedyDecoder
from speechxfer.errors import ManifestError
from speechxfer.manifest import Utterance, load_manifest, read_manifest, write_manifest
from speechxfer.recipe import load_recipe
from speechxfer.selftrain import pseudo_label, self_train
from speechxfer.transcribe import Recognizer, find_audio
from tiny import digital_silence, make_tiny_checkpoint, write_tone

CTC_VOCAB = ["[PAD]", "[UNK]", "|", "a", "b", "c"]
TEXTS = ["ab ba", "abc", "ca ab", "bac a", "cab", "a bc", "ba ca", "cc ab"]


def varying_noise(path: Path, *, duration_s: float, seed: int) -> Path:
    """Noise whose loudness changes every 0.1 s, so a random model emits many different tokens."""
    rng = np.random.default_rng(seed)
    envelope = np.repeat(rng.uniform(0.05, 1.0, int(duration_s * 10)), 1600)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, (0.3 * rng.standard_normal(envelope.size) * envelope).astype(np.float32), 16000)
    return path


def make_teacher(directory: Path) -> Path:
    """A tiny random CTC checkpoint that spells noise with its letters: its unknown token never wins, and sharper
    posteriors than a random head's make confidences differ from file to file."""
    make_tiny_checkpoint(directory, ctc_vocab=CTC_VOCAB, seed=0)
    model = Wav2Vec2ForCTC.from_pretrained(directory)
    with torch.no_grad():
        model.lm_head.weight *= 3
        model.lm_head.bias[CTC_VOCAB.index("[UNK]")] = -30
        model.lm_head.bias[CTC_VOCAB.index("[PAD]")] += 1
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return make_teacher(tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="module")
def unlabelled(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("unlabelled")
    for k in range(6):
        varying_noise(folder / ("sub" if k % 2 else ".") / f"n{k}.wav", duration_s=1.0 + 0.2 * k, seed=k)
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """train (4), dev (2) and test (2) manifests of ~1 s tones with short texts."""
    folder = tmp_path_factory.mktemp("corpus")
    manifests, k = {}, 0
    for split, count in {"train": 4, "dev": 2, "test": 2}.items():
        rows = []
        for _ in range(count):
            audio = write_tone(folder / "audio" / f"u{k}.wav", duration_s=0.8 + 0.1 * k, frequency_hz=200 + 50 * k,
                               seed=k)
            rows.append(Utterance(id=f"u{k}", audio_path=str(audio), text=TEXTS[k], duration_s=0.8 + 0.1 * k))
            k += 1
        manifests[split] = folder / f"{split}.jsonl"
        write_manifest(manifests[split], rows)
    return manifests


def write_recipe(path: Path, *, base: Path, manifests: dict[str, Path], output_dir: Path, **data) -> Path:
    recipe = {"base": str(base), "data": {**{name: str(p) for name, p in manifests.items()}, **data},
              "train": {"max_updates": 2, "max_batch_s": 6.0, "lr": 1e-3, "min_duration_s": 0.1, "log_every": 1},
              "eval": {"every_updates": 2}, "output_dir": str(output_dir)}
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def test_pseudo_label_writes_confidence_and_drops_what_falls_below_the_threshold(tmp_path, teacher, unlabelled):
    recognizer = Recognizer(teacher, device="cpu")
    decoder = GreedyDecoder(recognizer.vocabulary, frame_s=recognizer.frame_s)
    segments, _ = find_audio([str(unlabelled)], recursive=True)
    everything = pseudo_label(recognizer, segments, output=tmp_path / "all.jsonl", decoder=decoder)
    rows = load_manifest(everything.manifest)
    assert everything.kept == len(rows) >= 4 and sum(everything.dropped.values()) == len(segments) - len(rows)
    ids = ["pseudo/" + s.name for s in segments]
    assert [u.id for u in rows] == [i for i in ids if i in {u.id for u in rows}]  # in input order
    for u in rows:
        assert u.pseudo_label and 0 < u.confidence <= 1
        assert set(u.text) <= set("abc ") and u.text == " ".join(u.text.split())
        assert u.duration_s == pytest.approx(sf.info(u.audio_path).duration)
    # A threshold between the confidences keeps exactly the rows at or above it.
    threshold = float(np.median([u.confidence for u in rows]))
    above = pseudo_label(recognizer, segments, output=tmp_path / "above.jsonl", decoder=decoder,
                         min_confidence=threshold)
    assert [u.id for u in load_manifest(above.manifest)] == [u.id for u in rows if u.confidence >= threshold]
    assert above.dropped["low_confidence"] == sum(u.confidence < threshold for u in rows) > 0
    assert {p.kind for p in above.problems} >= {"low_confidence"}
    # Labels are normalized and checked against the model's vocabulary: "a" made "é" is not a letter of it.
    odd = pseudo_label(recognizer, segments, output=tmp_path / "odd.jsonl", decoder=decoder,
                       normalizer=lambda text: text.replace("a", "é"))
    assert odd.dropped["unknown_characters"] == sum("a" in u.text for u in rows) > 0
    assert [u.text for u in load_manifest(odd.manifest)] == [u.text for u in rows if "a" not in u.text]


def test_pseudo_label_command_writes_a_manifest_that_manifest_readers_take(tmp_path, teacher, unlabelled, capsys):
    out = tmp_path / "pl.jsonl"
    assert main(["pseudo-label", str(teacher), str(unlabelled), "--output", str(out), "--device", "cpu",
                 "--min-confidence", "0"]) == 0
    kept, problems = read_manifest(out, check_audio=True)  # paths and durations hold, as prepare writes them
    assert problems == [] and kept and all(u.pseudo_label and u.confidence is not None for u in kept)
    assert f"of 6 files pseudo-labelled -> {out}" in capsys.readouterr().out
    assert main(["pseudo-label", str(teacher), str(tmp_path / "none"), "--output", str(out)]) == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line == "speechxfer pseudo-label: error: no audio to pseudo-label"


def test_pseudo_label_refuses_an_output_it_cannot_write_before_decoding_anything(tmp_path, teacher, unlabelled,
                                                                                monkeypatch, capsys):
    decoded = []
    real_transcribe = selftrain.transcribe
    monkeypatch.setattr(selftrain, "transcribe", lambda *a, **k: decoded.append(1) or real_transcribe(*a, **k))
    (tmp_path / "file").write_text("")
    for output, why in [(tmp_path, "is a folder: the pseudo-labelled manifest to write is a file (OUT.jsonl)"),
                        (tmp_path / "file" / "pl.jsonl", "the output folder is a file")]:
        assert main(["pseudo-label", str(teacher), str(unlabelled), "--output", str(output), "--device", "cpu"]) == 2
        bad = output if output == tmp_path else output.parent
        assert capsys.readouterr().err.strip().splitlines()[-1] == f"speechxfer pseudo-label: error: {bad}: {why}"
    assert decoded == []


def test_pseudo_label_leaves_silent_audio_out(tmp_path, teacher, unlabelled, capsys):
    # Digital silence, which the teacher would spell as words.
    silence = digital_silence(tmp_path / "silence.wav", duration_s=1.0)
    out = tmp_path / "pl.jsonl"
    command = ["pseudo-label", str(teacher), str(unlabelled), str(silence), "--output", str(out), "--device", "cpu"]
    assert main(command) == 0
    captured = capsys.readouterr()
    assert "pseudo/silence" not in {u.id for u in load_manifest(out)}
    assert f"{silence}: [silent] " in captured.err and "below -70 dBFS: not transcribed" in captured.err
    assert "left out 1 silent" in captured.out and "1 of 7 inputs are silent" in captured.err
    assert main([*command, "--silence-dbfs", "off"]) == 0
    captured = capsys.readouterr()
    assert "silent" not in captured.out + captured.err
    # run through the model, the silence is spelled as words, as the teacher spells any noise
    assert "pseudo/silence" in {u.id for u in load_manifest(out)}


def test_a_pseudo_labelled_manifest_trains_under_its_epoch_share(tmp_path, teacher, unlabelled, corpus, monkeypatch,
                                                                caplog):
    pseudo = tmp_path / "pl.jsonl"
    assert main(["pseudo-label", str(teacher), str(unlabelled), "--output", str(pseudo), "--device", "cpu"]) == 0
    samplers = []

    class Recording(DurationBatchSampler):
        def __init__(self, durations_s, **kwargs):
            super().__init__(durations_s, **kwargs)
            samplers.append((list(durations_s), kwargs))

    monkeypatch.setattr(training, "DurationBatchSampler", Recording)
    base = make_tiny_checkpoint(tmp_path / "ssl")
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", base=base, manifests=corpus, output_dir=tmp_path / "out",
                                      pseudo_labelled=[{"manifest": str(pseudo), "max_share": 0.4}]))
    with caplog.at_level(logging.INFO, logger="speechxfer"):
        result = training.train(recipe)
    assert result.updates == 2 and result.best_dev_wer is not None
    assert f"pseudo-labelled: {len(load_manifest(pseudo))} utterances kept" in caplog.text
    durations, kwargs = samplers[0]  # the training sampler (dev and test ones come later)
    groups = kwargs["groups"]
    assert kwargs["max_share"] == {1: 0.4} and groups.count(1) == len(load_manifest(pseudo)) and groups.count(0) == 4
    sampler = Recording(durations, **kwargs)
    for epoch in range(4):  # re-formed each epoch
        served = [i for batch in sampler.global_batches(epoch) for i in batch]
        assert sorted(i for i in served if groups[i] == 0) == [i for i in range(len(groups)) if groups[i] == 0]
        pseudo_s = sum(durations[i] for i in served if groups[i] == 1)
        assert 0 < pseudo_s <= 0.4 * sum(durations[i] for i in served) + 1e-9  # pseudo labels do train, capped
    held = sampler.in_epoch(0)
    assert (f"pseudo-labelled {pseudo}: {groups.count(1)} utterances, " in caplog.text
            and "at most 40% of each epoch's seconds: about " in caplog.text
            and f"({sum(held[i] for i in range(len(groups)) if groups[i] == 1)} utterances) of them each epoch"
            in caplog.text)
    saved = yaml.safe_load((tmp_path / "out" / "recipe.yaml").read_text(encoding="utf-8"))
    assert saved["data"]["pseudo_labelled"] == [{"manifest": str(pseudo), "max_share": 0.4}]


def test_pseudo_labels_of_dev_or_test_audio_are_refused_with_file_and_line(tmp_path, corpus, capsys):
    test_row = load_manifest(corpus["test"])[1]
    pseudo = tmp_path / "pl.jsonl"
    write_manifest(pseudo, [Utterance("x", str(write_tone(tmp_path / "x.wav")), "ab", 1.0, pseudo_label=True),
                            dataclasses.replace(test_row, id="renamed", pseudo_label=True)])
    base = make_tiny_checkpoint(tmp_path / "ssl")
    recipe = write_recipe(tmp_path / "r.yaml", base=base, manifests=corpus, output_dir=tmp_path / "out",
                          pseudo_labelled=[{"manifest": str(pseudo)}])
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"speechxfer train: error: {pseudo}:2: pseudo-labelled utterance renamed: its audio file is also "
                   f"in the test set ({corpus['test']}:2); test audio must never be pseudo-labelled for training")
    with pytest.raises(ManifestError, match=r"audio/u4.wav: pseudo-labelled utterance pseudo/u4: its audio file is "
                                            r"also in the dev set \(.*dev.jsonl:1\)"):
        self_train(load_recipe(recipe), unlabelled=[str(Path(corpus["dev"]).parent / "audio")], rounds=1)
    assert not (tmp_path / "out" / "round-0").exists()  # refused before any training


def test_self_train_keeps_a_better_student_discards_a_worse_one_and_continues_a_rerun(
        tmp_path, corpus, unlabelled, monkeypatch, caplog):
    # Dev WERs set per round, so that each decision is known: the students' training runs as it is.
    forced = {"round-0": 0.8, "round-1": 0.6, "round-2": 0.7}
    trained = []

    def train_with_forced_wer(recipe, *, resume=False):
        result = training.train(recipe, resume=resume)
        trained.append(Path(recipe.output_dir).parent.name)
        return dataclasses.replace(result, best_dev_wer=forced[trained[-1]])

    monkeypatch.setattr(selftrain, "train", train_with_forced_wer)
    base = make_teacher(tmp_path / "base")  # its letters carry over to round 0, whose labels are then not empty
    out = tmp_path / "out"
    # A learning rate so small that round 0 still spells the noise as its base does, so there are labels to train on.
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", base=base, manifests=corpus, output_dir=out),
                         overrides=["train.lr=1e-7"])
    with caplog.at_level(logging.INFO, logger="speechxfer"):
        first = self_train(recipe, unlabelled=[str(unlabelled)], rounds=1, device="cpu")
    assert trained == ["round-0", "round-1"]
    assert [(r.round, r.dev_wer, r.kept) for r in first.rounds] == [(0, 0.8, True), (1, 0.6, True)]
    assert first.best.model == str(out / "round-1" / "model") and first.stopped is None
    round_1 = first.rounds[1]
    assert round_1.teacher == str(out / "round-0" / "model")
    assert round_1.pseudo_labels == len(load_manifest(out / "round-1" / "pseudo_labels.jsonl")) > 0
    student_recipe = yaml.safe_load((out / "round-1" / "model" / "recipe.yaml").read_text(encoding="utf-8"))
    assert student_recipe["data"]["pseudo_labelled"] == [
        {"manifest": str(out / "round-1" / "pseudo_labels.jsonl"), "max_share": 0.5}]
    assert student_recipe["vocabulary"]["path"] == str(out / "round-0" / "model")
    assert "round 1: dev WER 60.00% against 80.00% of round 0: kept" in caplog.text
    summary = json.loads((out / "self_train.json").read_text(encoding="utf-8"))
    assert [(r["round"], r["dev_wer"], r["kept"]) for r in summary["rounds"]] == [(0, 0.8, True), (1, 0.6, True)]
    assert summary["best_round"] == 1

    # A rerun with more rounds continues after round 1; round 2's student is worse, so round 1 stays the best.
    with caplog.at_level(logging.INFO, logger="speechxfer"):
        second = self_train(recipe, unlabelled=[str(unlabelled)], rounds=3, device="cpu")
    assert trained == ["round-0", "round-1", "round-2"]
    assert [(r.round, r.kept) for r in second.rounds] == [(0, True), (1, True), (2, False)]
    assert second.rounds[2].teacher == str(out / "round-1" / "model")
    assert second.best.round == 1 and "round 2 did not improve dev WER" in second.stopped
    summary = json.loads((out / "self_train.json").read_text(encoding="utf-8"))
    assert summary["best_round"] == 1 and summary["stopped"] == second.stopped
    assert "round 2: dev WER 70.00% against 60.00% of round 1: discarded" in caplog.text


@pytest.mark.skipif(shutil.which("lmplz") is None, reason="KenLM's lmplz is not on PATH")
@pytest.mark.parametrize("teacher_lm", [True, False])
def test_self_train_gives_each_round_its_lm_stage_and_labels_with_the_teachers_lm(tmp_path, corpus, unlabelled,
                                                                                 monkeypatch, teacher_lm):
    """With an lm: section every round's model gets the LM stage `train` would give it (built, tuned on dev, test
    scored with it), and the next round's pseudo labels are decoded with the teacher's own LM and tuned weights,
    unless teacher_lm=False (--no-lm) asks for greedy labels."""
    beams = []
    real_make_decoder = selftrain.make_decoder
    monkeypatch.setattr(selftrain, "make_decoder", lambda *a, beam, **k: beams.append(beam) or real_make_decoder(
        *a, beam=beam, **k))
    (tmp_path / "lm.txt").write_text("ab ba\nabc\nca ab\nbac a\n", encoding="utf-8")
    out = tmp_path / "out"
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", base=make_teacher(tmp_path / "base"), manifests=corpus,
                                      output_dir=out),
                         overrides=["train.lr=1e-7", f"lm.texts=[{tmp_path / 'lm.txt'}]", "lm.weights=[0, 1]",
                                    "lm.word_scores=[0]"])
    result = self_train(recipe, unlabelled=[str(unlabelled)], rounds=1, device="cpu", teacher_lm=teacher_lm)
    teacher_lm_file = str(out / "round-0" / "model" / "lm" / "lm.arpa")
    for r in result.rounds:
        report = json.loads((Path(r.model) / "test_report.json").read_text(encoding="utf-8"))
        assert (Path(r.model) / "lm" / "decoder.json").is_file() and r.test_wer_lm == report["lm"]["wer"]
    assert len(beams) == 1  # the one labelling pass
    if teacher_lm:
        assert beams[0].lm_path == teacher_lm_file and result.rounds[1].labelled_with == teacher_lm_file
    else:
        assert beams[0] is None and result.rounds[1].labelled_with == "greedy"
    summary = json.loads((out / "self_train.json").read_text(encoding="utf-8"))
    assert summary["rounds"][1]["test_wer_lm"] == result.rounds[1].test_wer_lm

    # Killed after the labelling (the summary has round 0 alone), rerun with the other setting: the labels on disk
    # are used as they are, and the summary says how they were made, not how the rerun would have made them.
    summary["rounds"] = summary["rounds"][:1]
    (out / "self_train.json").write_text(json.dumps(summary), encoding="utf-8")
    rerun = self_train(recipe, unlabelled=[str(unlabelled)], rounds=1, device="cpu", teacher_lm=not teacher_lm)
    assert len(beams) == 1  # nothing labelled again
    assert (rerun.rounds[1].labelled_with, rerun.rounds[1].dropped) == (result.rounds[1].labelled_with,
                                                                         result.rounds[1].dropped)


def test_self_train_command_refuses_what_cannot_work_before_training(tmp_path, corpus, unlabelled, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", base=tmp_path / "none", manifests=corpus, output_dir=tmp_path / "out")
    for extra, message in ((["--max-share", "1.5"], "max_share (--max-share) must be in (0, 1], got 1.5"),
                           (["--lm-weight", "2", "--no-lm"], "--lm-weight set how --lm FILE decodes; without --lm "
                            "each teacher decodes with its own LM and the weights tuned for it (or greedily with "
                            "--no-lm)"),
                           (["--set", "data.dev=null"], "self-training keeps a round only when dev WER improves: the "
                                                         "recipe needs data.dev")):
        assert main(["self-train", str(recipe), "--unlabelled", str(unlabelled), *extra]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == f"speechxfer self-train: error: {message}"
    assert not (tmp_path / "out").exists()


def test_self_train_names_a_missing_unlabelled_path_and_a_folder_without_audio(tmp_path, corpus, unlabelled, capsys):
    """--unlabelled naming nothing that exists says so in one line naming it (a file or folder, or a pattern that
    matches nothing), even beside a folder without audio; a folder without audio alone keeps its message."""
    recipe = write_recipe(tmp_path / "r.yaml", base=tmp_path / "none", manifests=corpus, output_dir=tmp_path / "out")
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("no audio here\n")
    missing, pattern = tmp_path / "unlabeled", str(tmp_path / "audio" / "*.flac")
    for paths, message in (([missing], f"{missing}: no such file or folder (--unlabelled)"),
                           ([tmp_path / "texts", missing], f"{missing}: no such file or folder (--unlabelled)"),
                           ([pattern], f"{pattern}: no file matches this pattern (--unlabelled)"),
                           ([tmp_path / "texts"], f"no audio to pseudo-label in {tmp_path / 'texts'}")):
        assert main(["self-train", str(recipe), "--unlabelled", *map(str, paths)]) == 2
        err = capsys.readouterr().err
        assert err.strip().splitlines()[-1] == f"speechxfer self-train: error: {message}"
        assert "Traceback" not in err and (len(err.strip().splitlines()) == 1 or paths == [tmp_path / "texts"])
    assert not (tmp_path / "out").exists()
