"""The training loop on tiny random checkpoints and ~1 s generated tones: what it changes, what it writes,
resuming, a shipped recipe, and the 1- vs 2-process check."""

from __future__ import annotations

import contextlib
import errno
import fractions
import json
import logging
import math
import multiprocessing
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file

from speechxfer import batching, surgery, training
from speechxfer.audio import load_audio
from speechxfer.cli import main
from speechxfer.errors import InputError
from speechxfer.manifest import Utterance, load_manifest, write_manifest
from speechxfer.recipe import TrainOptions, load_recipe
from speechxfer.surgery import build_ctc_model
from speechxfer.vocabulary import Vocabulary
from tiny import digital_silence, make_tiny_checkpoint, write_tone

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["ab ba", "abc", "ca ab", "bac a", "cab", "a bc", "ba ca", "cc ab", "abba", "b a c"]
SOURCE_VOCAB = ["[PAD]", "[UNK]", "|", "a", "b", "c", "d"]


def write_corpus(folder: Path) -> dict[str, Path]:
    """train (6), dev (2) and test (2) manifests of 0.8-1.2 s tones with short texts."""
    sizes = {"train": 6, "dev": 2, "test": 2}
    manifests, k = {}, 0
    for split, count in sizes.items():
        utterances = []
        for _ in range(count):
            duration_s = 0.8 + 0.4 * (k % 3) / 2
            audio = write_tone(folder / "audio" / f"u{k}.wav", duration_s=duration_s, frequency_hz=200 + 50 * k, seed=k)
            utterances.append(Utterance(id=f"u{k}", audio_path=str(audio), text=TEXTS[k].upper(), duration_s=duration_s))
            k += 1
        manifests[split] = folder / f"{split}.jsonl"
        write_manifest(manifests[split], utterances)
    return manifests


def write_recipe(path: Path, *, base: Path, manifests: dict[str, Path], output_dir: Path, **sections) -> Path:
    recipe = {"base": str(base), "data": {name: str(p) for name, p in manifests.items()},
              "train": {"max_updates": 4, "max_batch_s": 2.5, "lr": 1e-3, "min_duration_s": 0.1, "log_every": 1,
                        "warmup_ratio": 0.25, "hold_ratio": 0.25},
              "eval": {"every_updates": 2},
              "output_dir": str(output_dir)}
    for name, values in sections.items():
        recipe.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def stable_run(tmp_path_factory, corpus):
    """4 updates from a self-supervised XLS-R-like checkpoint, uninterrupted."""
    tmp = tmp_path_factory.mktemp("stable")
    base = make_tiny_checkpoint(tmp / "ssl", arch="stable")
    recipe = load_recipe(write_recipe(tmp / "recipe.yaml", base=base, manifests=corpus, output_dir=tmp / "out"))
    return recipe, training.train(recipe)


def check_trained_folder(recipe, result, source_model) -> None:
    out = Path(result.output_dir)
    for name in ("config.json", "model.safetensors", "vocab.json", "preprocessor_config.json", "recipe.yaml",
                 "metrics.jsonl", "charset_audit.json", "test_report.json", "curves.png", "last/training_state.pt"):
        assert (out / name).is_file(), name
    assert result.updates == 4 and result.best_update in (2, 4)

    from transformers import Wav2Vec2ForCTC

    trained = Wav2Vec2ForCTC.from_pretrained(out)
    before = source_model.feature_extractor.state_dict()
    after = trained.wav2vec2.feature_extractor.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "the frozen feature encoder changed"
    vocab = Vocabulary.load(out)
    initial, _ = build_ctc_model(recipe.base, vocab, config_overrides=vars(recipe.model), seed=recipe.train.seed)
    assert initial.lm_head.weight.shape == trained.lm_head.weight.shape
    assert not torch.allclose(initial.lm_head.weight, trained.lm_head.weight), "the head did not train"

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["update"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
    assert [r["update"] for r in records if "dev_wer" in r] == [2, 4]
    report = json.loads((out / "test_report.json").read_text())
    assert report["sentences"] == 2 and report["model_update"] == result.best_update and 0 <= report["cer"]

    # transformers alone reads the folder and transcribes as our own greedy decoding does
    from transformers import pipeline

    audio = load_audio(recipe.data.test.replace("test.jsonl", "audio/u8.wav"))
    text = pipeline("automatic-speech-recognition", model=str(out), device="cpu")(audio)["text"]
    inputs = torch.from_numpy((audio - audio.mean()) / np.sqrt(audio.var() + 1e-7))[None]
    with torch.no_grad():
        ours = vocab.decode_ctc(trained.eval()(inputs).logits.argmax(-1)[0].tolist())
    assert text.split() == ours.split()


def test_stable_architecture_from_a_self_supervised_checkpoint(stable_run):
    from transformers import Wav2Vec2Model

    recipe, result = stable_run
    check_trained_folder(recipe, result, Wav2Vec2Model.from_pretrained(recipe.base))


def test_base_architecture_from_a_ctc_checkpoint_with_its_own_vocabulary(tmp_path, corpus):
    from transformers import Wav2Vec2ForCTC

    base = make_tiny_checkpoint(tmp_path / "ctc", arch="base", ctc_vocab=SOURCE_VOCAB)
    # An alphabet without u, n and k: the "[UNK]" this model emits must still be scored, never rejected.
    recipe = load_recipe(write_recipe(tmp_path / "recipe.yaml", base=base, manifests=corpus,
                                      output_dir=tmp_path / "out", text={"alphabet": "abc"}))
    result = training.train(recipe)
    check_trained_folder(recipe, result, Wav2Vec2ForCTC.from_pretrained(base).wav2vec2)
    config = json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())
    assert config["return_attention_mask"] is False  # group-norm models get no attention mask
    check_test_report_is_what_evaluate_gives(recipe, result, corpus, tmp_path)


def check_test_report_is_what_evaluate_gives(recipe, result, corpus, tmp_path) -> None:
    """The greedy test report that train() wrote is the score `speechxfer evaluate` gives the folder, whatever its
    --max-batch-s. The test set (1.2 s and 0.8 s) shares one padded batch under max_batch_s 2.5: a model without
    an attention mask must be given neither padding, in training or in evaluate."""
    from speechxfer.decoding import GreedyDecoder
    from speechxfer.evaluate import evaluate
    from speechxfer.manifest import read_jsonl
    from speechxfer.text import TextNormalizer
    from speechxfer.transcribe import Recognizer, TranscribeOptions

    report = json.loads((Path(result.output_dir) / "test_report.json").read_text())
    assert report["char_hits"] + report["char_substitutions"] + report["char_insertions"] > 0, \
        "the model emits nothing: the comparison would hold whatever the batches"
    recognizer = Recognizer(result.output_dir, device="cpu")
    decoder = GreedyDecoder(recognizer.vocabulary, frame_s=recognizer.frame_s)
    for max_batch_s in (0.1, 100.0):
        evaluation = evaluate(recognizer, corpus["test"], output_dir=tmp_path / f"eval-{max_batch_s:g}",
                              decoder=decoder, normalizer=TextNormalizer(recipe.text),
                              options=TranscribeOptions(max_batch_s=max_batch_s))
        assert {"model_update": report["model_update"], **evaluation.report.to_dict()} == report
    hyps = [row["text"] for _, row in read_jsonl(evaluation.hypotheses_path)]
    if recipe.text.alphabet is not None:  # the case the alphabet is there for
        assert any("[UNK]" in h for h in hyps), f"no unknown token to score: {hyps}"


def test_a_silent_dev_utterance_gets_an_empty_hypothesis_and_the_dev_wer_evaluate_gives(tmp_path, corpus, stable_run,
                                                                                        monkeypatch, caplog):
    """Dev (and test) hold one utterance of digital silence (+-1 LSB), which the normalization would raise to words:
    training's decoding leaves it empty without the model, as `speechxfer evaluate` does, so the best dev WER and the
    test report are those evaluate gives the model on the same manifest, and the run says so once a split."""
    from speechxfer.decoding import GreedyDecoder
    from speechxfer.evaluate import evaluate
    from speechxfer.text import TextNormalizer
    from speechxfer.transcribe import Recognizer, TranscribeOptions

    dev = load_manifest(corpus["dev"])
    silence = digital_silence(tmp_path / "silence.wav", duration_s=1.0)
    held_out = tmp_path / "dev.jsonl"
    # "abz": a letter no train text has, which the run warns of
    write_manifest(held_out, [dev[0], Utterance(id="silence", audio_path=str(silence), text="ABZ", duration_s=1.0)])
    manifests = {**corpus, "dev": held_out, "test": held_out}
    recipe = load_recipe(write_recipe(tmp_path / "recipe.yaml", base=Path(stable_run[0].base), manifests=manifests,
                                      output_dir=tmp_path / "out"))
    reports = []
    real_evaluate = training.evaluate

    def recorded(*args, **kwargs):
        report, hyps = real_evaluate(*args, **kwargs)
        reports.append(report)
        # as from a model that hears words in the speech: what training makes of the hypotheses beside the report
        return report, {key: h or ("" if key == "silence" else "a") for key, h in hyps.items()}

    monkeypatch.setattr(training, "evaluate", recorded)
    with caplog.at_level(logging.WARNING, logger="speechxfer"):
        result = training.train(recipe)
    assert len(reports) == 3  # dev at updates 2 and 4, then test
    for report in reports:
        scored = {u.id: u for u in report.per_utterance}
        assert scored["silence"].hypothesis == "" and scored["silence"].words.errors == 1  # "abz": one deletion
    assert [m for m in caplog.messages if "utterance silent" in m] == [
        "dev: 1 utterance silent (below -70 dBFS): empty hypotheses, not run through the model",
        "test: 1 utterance silent (below -70 dBFS): empty hypotheses, not run through the model"]
    assert [m for m in caplog.messages if "cannot write" in m] == [
        f"{split}: 1 character that no train transcript holds, so the model cannot write them: 'z' (1) (14.3% of "
        f"{split}'s characters, in 1 utterance or more) (see {result.output_dir}/charset_audit.json and the recipe's "
        "text section)" for split in ("dev", "test")]
    # the share of empty dev hypotheses (the blank-collapse warning's measure) counts only what the model heard:
    # none of it here, where the one utterance heard has words
    records = [json.loads(line) for line in (Path(result.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [row["dev_empty_share"] for row in records if "dev_empty_share" in row] == [0.0, 0.0]

    recognizer = Recognizer(result.output_dir, device="cpu")
    evaluation = evaluate(recognizer, held_out, output_dir=tmp_path / "evaluation",
                          decoder=GreedyDecoder(recognizer.vocabulary, frame_s=recognizer.frame_s),
                          normalizer=TextNormalizer(recipe.text))
    assert result.best_dev_wer == evaluation.report.wer
    report = json.loads((Path(result.output_dir) / "test_report.json").read_text())
    assert {"model_update": report["model_update"], **evaluation.report.to_dict()} == report
    # run through the model, the silence is spelled as words: the gate is what keeps it empty
    ungated = evaluate(recognizer, held_out, output_dir=tmp_path / "ungated", bootstrap=0,
                       decoder=GreedyDecoder(recognizer.vocabulary, frame_s=recognizer.frame_s),
                       normalizer=TextNormalizer(recipe.text), options=TranscribeOptions(silence_dbfs=None))
    assert {u.id: u.hypothesis for u in ungated.report.per_utterance}["silence"] != ""


class Interrupted(Exception):
    pass


def train_until_second_evaluation(recipe, monkeypatch) -> None:
    """Run train() and stop it with Interrupted as its second dev evaluation starts: last/ then holds the checkpoint
    of the first evaluation, and the updates after it are lost, as after a kill."""
    real_evaluate = training.evaluate
    calls = []

    def crash_at_second_evaluation(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise Interrupted
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(training, "evaluate", crash_at_second_evaluation)
    with pytest.raises(Interrupted):
        training.train(recipe)
    monkeypatch.setattr(training, "evaluate", real_evaluate)


def test_resume_from_last_reaches_the_uninterrupted_state(tmp_path, corpus, stable_run, monkeypatch):
    straight_recipe, _ = stable_run
    out = tmp_path / "out"
    recipe = load_recipe(write_recipe(tmp_path / "recipe.yaml", base=Path(straight_recipe.base), manifests=corpus,
                                      output_dir=out))
    train_until_second_evaluation(recipe, monkeypatch)  # update 4: last/ still holds update 2
    assert torch.load(out / "last" / "training_state.pt", weights_only=True)["state"]["update"] == 2
    with pytest.raises(InputError, match="--resume"):
        training.train(recipe)  # a fresh run would overwrite last/

    result = training.train(recipe, resume=True)
    assert result.updates == 4
    straight = load_file(Path(straight_recipe.output_dir) / "last" / "model.safetensors")
    resumed = load_file(out / "last" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    assert max((straight[k] - resumed[k]).abs().max().item() for k in straight) <= 1e-6
    losses = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["update"] for r in losses if "loss" in r] == [1, 2, 3, 4]  # lost records dropped, none repeated


def open_files_under(folder: Path) -> list[str]:
    """The files under `folder` that this process holds open."""
    held = []
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):  # the fd of the listing itself is gone by now
            target = os.readlink(fd)
            if target.startswith(f"{folder}/"):
                held.append(target)
    return held


def test_a_run_that_fails_mid_way_closes_its_logs_and_loader_workers(tmp_path, corpus, stable_run, monkeypatch):
    """An error at update 3 leaves metrics.jsonl with whole lines of updates 1 and 2, and nothing of the run open:
    no data-loader worker, no file under the output folder (the run lock included), no TensorBoard writer, although
    the caller still holds the error and with it train()'s frames."""
    out = tmp_path / "out"
    recipe = load_recipe(write_recipe(tmp_path / "recipe.yaml", base=Path(stable_run[0].base), manifests=corpus,
                                      output_dir=out, train={"num_workers": 1}))
    real_get_lr = training.get_lr

    def fails_at_the_third_update(update, options):
        if update == 2:  # 0-based
            raise Interrupted
        return real_get_lr(update, options)

    monkeypatch.setattr(training, "get_lr", fails_at_the_third_update)
    workers_before, threads_before = set(multiprocessing.active_children()), set(threading.enumerate())
    with pytest.raises(Interrupted) as caught:
        training.train(recipe)
    assert caught.traceback  # held, as a caller reporting the error holds it
    assert set(multiprocessing.active_children()) <= workers_before
    assert open_files_under(out) == []
    # TensorBoard's writer holds no file open between events, but a thread with events not yet written
    assert not [t for t in set(threading.enumerate()) - threads_before if "Writer" in type(t).__name__]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["update"] for r in records if "loss" in r] == [1, 2]
    assert [r["update"] for r in records if "dev_wer" in r] == [2]


class Unreadable(Exception):
    pass


@pytest.mark.parametrize("split, audio", [("dev", "u7.wav"), ("train", "u3.wav")])
def test_an_error_from_a_loader_worker_leaves_no_worker_alive(tmp_path, corpus, stable_run, monkeypatch, split,
                                                              audio):
    """A data-loader worker fails while reading one utterance's audio (an error that is no unusable audio, so it
    stops the run), in the middle of the dev evaluation at update 2 or of a training epoch: the error comes through
    the loader's iterator, which its traceback holds, yet no worker process is left alive while the caller holds
    the error."""
    recipe = load_recipe(write_recipe(tmp_path / "recipe.yaml", base=Path(stable_run[0].base), manifests=corpus,
                                      output_dir=tmp_path / "out", train={"num_workers": 1}))
    real_load_audio = batching.load_audio

    def load_audio(path, **kwargs):
        if Path(path).name == audio:
            raise Unreadable(path)
        return real_load_audio(path, **kwargs)

    monkeypatch.setattr(batching, "load_audio", load_audio)  # the workers are forked with it
    evaluations = []
    real_evaluate = training.evaluate
    monkeypatch.setattr(training, "evaluate", lambda *args, **kwargs: evaluations.append(1) or real_evaluate(
        *args, **kwargs))
    workers_before = set(multiprocessing.active_children())
    with pytest.raises(Exception, match=audio) as caught:
        training.train(recipe)
    assert caught.traceback and "Unreadable" in str(caught.value)  # re-raised by torch, held by the caller
    assert evaluations == [1] or split == "train"  # the dev case fails in the first evaluation
    assert set(multiprocessing.active_children()) <= workers_before


def test_batches_are_re_formed_each_epoch_and_resume_exactly(tmp_path, corpus, stable_run, monkeypatch):
    base = Path(stable_run[0].base)
    recipes = [load_recipe(write_recipe(tmp_path / f"{name}.yaml", base=base, manifests=corpus,
                                        output_dir=tmp_path / name, train={"max_updates": 8}))
               for name in ("straight", "resumed")]
    spy = BatchSpy(monkeypatch)
    training.train(recipes[0])
    straight = list(spy.batches)  # the spy goes on recording in the runs below
    # 6 utterances of 0.8-1.2 s, at most 2.5 s a batch: 3 batches of 2 an epoch, each epoch every utterance once
    epochs = [straight[:3], straight[3:6]]
    assert all(sorted(i for batch in epoch for i in batch) == [f"u{k}" for k in range(6)] for epoch in epochs)
    assert {frozenset(b) for b in epochs[0]} != {frozenset(b) for b in epochs[1]}  # other pairs, not other order

    train_until_second_evaluation(recipes[1], monkeypatch)  # update 4: last/ holds update 2, inside epoch 0
    spy = BatchSpy(monkeypatch)
    assert training.train(recipes[1], resume=True).updates == 8
    assert spy.batches == straight[2:]  # the rest of epoch 0, then the same re-formed epochs 1 and 2


def test_pseudo_labelled_subsets_train_long_utterances_and_resume_exactly(tmp_path, corpus, stable_run, monkeypatch):
    # 6 s of labelled audio; at max_share 0.3 an epoch holds up to 0.3 / 0.7 x 6 = 2.57 s of these 6.4 s, a subset
    # drawn anew each epoch. Three are over half of max_batch_s 2.5 (each in a batch of its own): they train too.
    durations_s = [0.4, 0.5, 0.6, 1.3, 1.6, 2.0]
    pseudo = tmp_path / "pseudo.jsonl"
    write_manifest(pseudo, [Utterance(id=f"p{k}", text=TEXTS[k].upper(), duration_s=duration_s, pseudo_label=True,
                                      audio_path=str(write_tone(tmp_path / f"p{k}.wav", duration_s=duration_s, seed=k)))
                            for k, duration_s in enumerate(durations_s)])
    recipes = [load_recipe(write_recipe(tmp_path / f"{name}.yaml", base=Path(stable_run[0].base), manifests=corpus,
                                        output_dir=tmp_path / name, train={"max_updates": 12},
                                        data={"pseudo_labelled": [{"manifest": str(pseudo), "max_share": 0.3}]}))
               for name in ("straight", "resumed")]
    spy = BatchSpy(monkeypatch)
    training.train(recipes[0])
    straight = list(spy.batches)
    assert {f"p{k}" for k in (3, 4, 5)} & {i for batch in straight for i in batch}  # a long one trains
    # epoch 0 holds every labelled utterance once, in its first 5 batches here, and up to 2.57 s of pseudo labels
    epoch_0 = [i for batch in straight[:5] for i in batch]
    assert sorted(i for i in epoch_0 if i.startswith("u")) == [f"u{k}" for k in range(6)]
    assert 0 < sum(durations_s[int(i[1:])] for i in epoch_0 if i.startswith("p")) <= 0.3 / 0.7 * 6.0 + 1e-9
    train_until_second_evaluation(recipes[1], monkeypatch)  # update 4: last/ holds update 2
    spy = BatchSpy(monkeypatch)
    assert training.train(recipes[1], resume=True).updates == 12
    assert spy.batches == straight[2:]


def test_no_audio_file_is_opened_before_the_first_update_but_those_of_its_batch(tmp_path, corpus, stable_run,
                                                                                  monkeypatch):
    opened: list[str] = []  # audio files read, in order; None marks each batch handed to an update
    real_load_audio = batching.load_audio
    monkeypatch.setattr(batching, "load_audio", lambda path, **kw: opened.append(path) or real_load_audio(path, **kw))
    real_info = soundfile.info
    monkeypatch.setattr(soundfile, "info", lambda path, *a, **kw: opened.append(path) or real_info(path, *a, **kw))
    spy = BatchSpy(monkeypatch)
    real_stream = training._batch_stream

    def marked(*args, **kwargs):
        for step in real_stream(*args, **kwargs):
            opened.append(None)
            yield step
    monkeypatch.setattr(training, "_batch_stream", marked)
    recipe = write_recipe(tmp_path / "recipe.yaml", base=Path(stable_run[0].base), manifests=corpus,
                          output_dir=tmp_path / "out", train={"max_updates": 1}, eval={"every_updates": 100})
    training.train(load_recipe(recipe))
    first = opened[:opened.index(None)]
    assert sorted(Path(p).stem for p in first) == sorted(spy.batches[0])  # 2 of the 6 train files


def test_gradient_checkpointing_gives_the_losses_and_weights_of_a_plain_run(tmp_path, corpus, stable_run,
                                                                           monkeypatch):
    plain_recipe, _ = stable_run
    recipe = load_recipe(write_recipe(tmp_path / "recipe.yaml", base=Path(plain_recipe.base), manifests=corpus,
                                      output_dir=tmp_path / "out", train={"gradient_checkpointing": True}))
    checkpointed = []
    real_enable = training.enable_gradient_checkpointing

    def enable(model):
        real_enable(model)
        checkpointed.append(model)

    monkeypatch.setattr(training, "enable_gradient_checkpointing", enable)
    assert training.train(recipe).updates == 4
    assert all(layer.gradient_checkpointing for layer in checkpointed[0].wav2vec2.encoder.layers)

    def losses(run_dir: str) -> list[float]:
        records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in records if "loss" in r]

    assert losses(recipe.output_dir) == pytest.approx(losses(plain_recipe.output_dir), rel=1e-5)
    plain = load_file(Path(plain_recipe.output_dir) / "last" / "model.safetensors")
    recomputed = load_file(tmp_path / "out" / "last" / "model.safetensors")
    assert max((plain[k] - recomputed[k]).abs().max().item() for k in plain) <= 1e-6


def test_fused_adamw_gives_the_weights_of_the_per_tensor_one():
    """training.adamw takes torch's fused kernel on the CPU; five updates over parameter groups with layer-wise
    learning rates and weight decay (one frozen group) land within 1e-6 of the per-tensor optimizer's weights."""
    from transformers import Wav2Vec2ForCTC

    from speechxfer.freezing import parameter_groups
    from tiny import tiny_config

    torch.manual_seed(0)
    models = [Wav2Vec2ForCTC(tiny_config())]
    models.append(Wav2Vec2ForCTC(tiny_config()))
    models[1].load_state_dict(models[0].state_dict())
    for model in models:
        model.freeze_feature_encoder()
    fused, plain = (parameter_groups(model, lr=1e-3, weight_decay=0.01, layer_lr_decay=0.5) for model in models)
    fused = training.adamw(fused, lr=1e-3, device=torch.device("cpu"))
    plain = torch.optim.AdamW(plain, lr=1e-3, betas=training.ADAM_BETAS, eps=training.ADAM_EPS, foreach=False)
    assert fused.defaults["fused"] is True
    params = [[p for p in model.parameters()] for model in models]
    for _ in range(5):
        for fused_p, plain_p in zip(*params):
            if fused_p.requires_grad:
                fused_p.grad = torch.randn_like(fused_p)
                plain_p.grad = fused_p.grad.clone()
        fused.step()
        plain.step()
    before = Wav2Vec2ForCTC(tiny_config()).state_dict()
    after = [model.state_dict() for model in models]
    assert max((after[0][k] - after[1][k]).abs().max().item() for k in before) <= 1e-6
    moved = [k for k in before if not torch.equal(after[0][k], after[1][k])]
    assert moved, "the two optimizers round alike: the comparison would hold for any optimizer"
    encoder = models[0].wav2vec2.feature_extractor.state_dict()
    assert all(torch.equal(v, models[1].wav2vec2.feature_extractor.state_dict()[k]) for k, v in encoder.items())


class EncoderSpy:
    """Counts the conv feature encoder's passes in training mode (dev and test decoding left out) and the
    utterances (rows) they compute, at its last conv layer, whichever way the encoder is run (its forward,
    _EncoderFeed's padded pass)."""

    def __init__(self, monkeypatch):
        from transformers.models.wav2vec2 import modeling_wav2vec2

        self.calls = self.rows = 0
        real_init = modeling_wav2vec2.Wav2Vec2FeatureEncoder.__init__

        def count(layer, args, output):
            if layer.training:
                self.calls += 1
                self.rows += output.shape[0]

        def init(encoder, config):
            real_init(encoder, config)
            encoder.conv_layers[-1].register_forward_hook(count)

        monkeypatch.setattr(modeling_wav2vec2.Wav2Vec2FeatureEncoder, "__init__", init)


def training_losses(run_dir) -> list[float]:
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


@pytest.mark.parametrize("freezing", [{}, {"feature_encoder": False, "head_only_updates": 4}],
                         ids=["frozen", "thawed-at-4"])
def test_the_feature_encoder_cache_gives_the_losses_of_the_uncached_run(tmp_path, corpus, stable_run, monkeypatch,
                                                                         caplog, freezing):
    """A layer-norm model without augmentation: the frozen encoder computes each training utterance once (6), not
    once per batch it is in (8 updates of 2 utterances, 3 batches an epoch: 16), and the losses and weights are
    those of a run with train.feature_cache_mib 0. With a schedule that thaws the encoder at update 4, the cache serves the updates
    before it and is dropped there. (The resume tests run stable_run's recipe, cache on.)"""
    base = Path(stable_run[0].base)
    runs = {}
    for name, cache_mib in (("uncached", 0), ("cached", 64)):
        spy = EncoderSpy(monkeypatch)
        recipe = load_recipe(write_recipe(tmp_path / f"{name}.yaml", base=base, manifests=corpus,
                                          output_dir=tmp_path / name, freezing=freezing,
                                          train={"max_updates": 8, "feature_cache_mib": cache_mib},
                                          eval={"every_updates": 8}))
        with caplog.at_level(logging.INFO, logger="speechxfer"):
            training.train(recipe)
        runs[name] = spy.rows
    said = [r.getMessage() for r in caplog.records if r.name == "speechxfer.training"]
    if freezing:
        assert runs == {"uncached": 16, "cached": 6 + 8}  # updates 1-4 (8 lookups, 2 reused), then every batch
        assert any(m.startswith("update 4: the feature encoder trains from here on; its cached output is dropped")
                   for m in said)
    else:
        assert runs == {"uncached": 16, "cached": 6}
        assert "feature encoder cache: 6 utterances, 0 MiB; 10 of 16 lookups reused" in said
    assert training_losses(tmp_path / "cached") == pytest.approx(training_losses(tmp_path / "uncached"), rel=1e-5)
    cached = load_file(tmp_path / "cached" / "last" / "model.safetensors")
    uncached = load_file(tmp_path / "uncached" / "last" / "model.safetensors")
    # An utterance's frames computed alone and in a padded batch differ by float rounding (~1e-7); once the encoder
    # trains, AdamW's division by the root of tiny squared gradients grows that to ~2e-6 in 4 updates: 0.2% of one
    # update's step (lr 1e-3).
    assert max((cached[k] - uncached[k]).abs().max().item() for k in cached) <= (1e-5 if freezing else 1e-6)


def test_no_feature_encoder_cache_with_augmentation(tmp_path, corpus, stable_run, monkeypatch, caplog):
    """With augmentation each epoch's audio differs: a layer-norm model's encoder runs on every batch (4 updates
    of 2 utterances), and no cache is announced."""
    spy = EncoderSpy(monkeypatch)
    recipe = load_recipe(write_recipe(tmp_path / "recipe.yaml", base=Path(stable_run[0].base), manifests=corpus,
                                      output_dir=tmp_path / "out", train={"max_updates": 4},
                                      eval={"every_updates": 4}, augment={"gain": {"probability": 1.0}}))
    with caplog.at_level(logging.INFO, logger="speechxfer"):
        training.train(recipe)
    assert (spy.calls, spy.rows) == (4, 8)
    assert not [r for r in caplog.records if "feature encoder cache" in r.getMessage()
                or "computed once" in r.getMessage()]


def test_the_encoder_feed_gives_each_utterance_the_frames_it_has_alone(tmp_path):
    """A group-norm model normalizes over the padded row, so in a padded batch a short utterance's logits are not
    those it gets alone (as transcribe decodes it); fed by _EncoderFeed with the mask, they are."""
    model = build_ctc_model(str(make_tiny_checkpoint(tmp_path / "base", arch="base")),
                            Vocabulary.from_texts(["abc"]))[0].eval()
    generator = torch.Generator().manual_seed(0)
    lengths = [16000, 9000]
    input_values = torch.zeros(2, max(lengths))
    mask = torch.zeros(2, max(lengths), dtype=torch.long)
    for row, n in enumerate(lengths):
        input_values[row, :n] = torch.randn(n, generator=generator)
        mask[row, :n] = 1
    with torch.no_grad():
        alone = [model(input_values[row:row + 1, :n]).logits[0] for row, n in enumerate(lengths)]
        padded = model(input_values).logits
        feed = training._EncoderFeed(model, max_bytes=0, autocast=contextlib.nullcontext)
        with feed.feeding(["long", "short"], {"input_values": input_values, "attention_mask": mask}):
            fed = model(input_values=input_values, attention_mask=mask).logits
    short = alone[1].shape[0]
    assert (padded[1, :short] - alone[1]).abs().max() > 1e-3  # what training saw before
    for row, logits in enumerate(alone):
        torch.testing.assert_close(fed[row, :logits.shape[0]], logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("arch,conv_bias,activation", [("base", False, "gelu"), ("base", True, "relu"),
                                                       ("stable", True, "gelu")])
def test_one_padded_pass_gives_each_utterance_its_own_frames_and_gradients(monkeypatch, arch, conv_bias, activation,
                                                                            checkpointing):
    """_EncoderFeed computes a batch of very different lengths in one padded pass (group norm over each row's own
    frames): each utterance's frames, and the gradients they send to the trainable encoder's weights, are those of
    the encoder run on it alone."""
    from transformers import Wav2Vec2ForCTC

    from tiny import tiny_config

    config = tiny_config(arch=arch)
    config.conv_bias, config.feat_extract_activation = conv_bias, activation
    model = Wav2Vec2ForCTC(config).train()
    if checkpointing:
        training.enable_gradient_checkpointing(model)
        assert all(layer.gradient_checkpointing for layer in model.wav2vec2.feature_extractor.conv_layers)
    encoder = model.wav2vec2.feature_extractor
    generator = torch.Generator().manual_seed(0)
    lengths = [16000, 2400, 401]
    input_values = torch.zeros(len(lengths), max(lengths))
    for row, n in enumerate(lengths):
        input_values[row, :n] = torch.randn(n, generator=generator)
    feed = training._EncoderFeed(model, max_bytes=0, autocast=contextlib.nullcontext)
    assert feed.geometries is not None  # the padded pass, not one utterance at a time
    checkpoints = []
    real_checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint",
                        lambda *args, **kwargs: checkpoints.append(1) or real_checkpoint(*args, **kwargs))
    batched = feed.own_frames(input_values, lengths)
    assert len(checkpoints) == (checkpointing and arch == "base")  # the group-norm layer recomputed in backward
    alone = [encoder(input_values[row:row + 1, :n])[0] for row, n in enumerate(lengths)]
    weights = [torch.randn(part.shape, generator=generator) for part in alone]
    # Equal up to float rounding (sums in another order): up to ~1e-6 of the largest value, frames and gradients.
    for mine, theirs in zip(batched, alone):
        assert mine.shape == theirs.shape
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-5 * theirs.abs().max().item())
    if arch == "base":  # what the model's own padded pass gives the short ones: the feed is needed
        padded = encoder(input_values)
        assert (padded[2, :, :alone[2].shape[1]] - alone[2]).abs().max() > 1e-3
    params = list(encoder.parameters())
    grads = [torch.autograd.grad(sum((part * w).sum() for part, w in zip(parts, weights)), params)
             for parts in (batched, alone)]
    scale = max(grad.abs().max().item() for grad in grads[1])
    for mine, theirs in zip(*grads):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-5 * scale)


def test_an_encoder_without_a_padded_pass_runs_each_utterance_alone():
    """A padded convolution lets the padding into an utterance's last frames: _EncoderFeed computes each row alone."""
    from transformers import Wav2Vec2ForCTC

    from tiny import tiny_config

    model = Wav2Vec2ForCTC(tiny_config(arch="base")).eval()
    encoder = model.wav2vec2.feature_extractor
    encoder.conv_layers[1].conv.padding = (1,)
    feed = training._EncoderFeed(model, max_bytes=0, autocast=contextlib.nullcontext)
    assert feed.geometries is None
    input_values = torch.randn(2, 4000, generator=torch.Generator().manual_seed(0))
    input_values[1, 1000:] = 0
    with torch.no_grad():
        fed = feed.own_frames(input_values, [4000, 1000])
        alone = encoder(input_values[1:, :1000])[0]
    assert torch.equal(fed[1], alone)


@pytest.mark.parametrize("augment", [False, True], ids=["cached", "augmented"])
def test_a_group_norm_model_trains_on_each_utterance_alone(tmp_path, corpus, monkeypatch, caplog, augment):
    """A model without an attention mask gets its encoder's output of each utterance alone, computed in one pass
    a batch: 4 passes of 2 utterances in 4 updates with augmentation; without, each training utterance once (6,
    in the 3 batches of the first epoch) and then from the cache."""
    sections = {"train": {"max_updates": 4}, "eval": {"every_updates": 4}}
    if augment:
        sections["augment"] = {"gain": {"probability": 1.0}}
    spy = EncoderSpy(monkeypatch)
    recipe = load_recipe(write_recipe(tmp_path / "recipe.yaml", base=make_tiny_checkpoint(tmp_path / "base",
                                                                                           arch="base"),
                                      manifests=corpus, output_dir=tmp_path / "out", **sections))
    with caplog.at_level(logging.INFO, logger="speechxfer"):
        training.train(recipe)
    said = [r.getMessage() for r in caplog.records if r.name == "speechxfer.training"]
    assert any(m.startswith("the model takes no attention mask") for m in said)
    assert (spy.calls, spy.rows) == ((4, 8) if augment else (3, 6))
    assert any("feature encoder cache" in m for m in said) is not augment


# Every effect on, noise from a folder given relative to the recipe file; speed factors far apart so that the
# batches planned for the slowest hold fewer utterances than unperturbed ones would.
EVERY_EFFECT = {"speed": {"probability": 1.0, "factors": [0.8, 1.0, 1.25]},
                "reverb": {"probability": 0.5}, "noise": {"probability": 0.5, "snr_db": [10, 20], "source": "noise"},
                "gain": {"probability": 0.5}, "telephone": {"probability": 0.5}}


def write_augmented_recipe(folder: Path, *, base: Path, manifests: dict[str, Path], **sections) -> Path:
    for k in range(2):
        write_tone(folder / "noise" / f"hum{k}.wav", duration_s=3.0, frequency_hz=50 + 10 * k, seed=100 + k)
    return write_recipe(folder / "recipe.yaml", base=base, manifests=manifests, output_dir=folder / "out",
                        augment=EVERY_EFFECT, **sections)


@pytest.fixture(scope="module")
def augmented_run(tmp_path_factory, corpus, stable_run):
    """stable_run's 4 updates with every augmentation on, uninterrupted."""
    tmp = tmp_path_factory.mktemp("augmented")
    recipe = load_recipe(write_augmented_recipe(tmp, base=Path(stable_run[0].base), manifests=corpus))
    return recipe, training.train(recipe)


def test_every_augmentation_on_trains_with_finite_losses(augmented_run, stable_run):
    recipe, result = augmented_run
    assert result.updates == 4
    assert recipe.augment.noise.source == str(Path(recipe.output_dir).parent / "noise")  # relative to the recipe
    records = [json.loads(line) for line in (Path(recipe.output_dir) / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses)
    plain = load_file(Path(stable_run[0].output_dir) / "last" / "model.safetensors")
    augmented = load_file(Path(recipe.output_dir) / "last" / "model.safetensors")
    assert any(not torch.equal(plain[k], augmented[k]) for k in plain)  # the model heard other audio
    saved = load_recipe(Path(recipe.output_dir) / "recipe.yaml")
    assert saved.augment == recipe.augment  # the resolved recipe carries the section


def test_resume_of_an_augmented_run_reaches_the_uninterrupted_state(tmp_path, corpus, augmented_run, monkeypatch):
    straight_recipe, _ = augmented_run
    recipe = load_recipe(write_augmented_recipe(tmp_path, base=Path(straight_recipe.base), manifests=corpus,
                                                train={"num_workers": 2}))
    # 2 loader workers here, none in the uninterrupted run: the audio must not depend on them
    train_until_second_evaluation(recipe, monkeypatch)  # update 4: last/ still holds update 2
    result = training.train(recipe, resume=True)
    assert result.updates == 4
    straight = load_file(Path(straight_recipe.output_dir) / "last" / "model.safetensors")
    resumed = load_file(tmp_path / "out" / "last" / "model.safetensors")
    assert max((straight[k] - resumed[k]).abs().max().item() for k in straight) <= 1e-6


def test_a_bad_noise_folder_stops_the_run_before_training_with_one_line(tmp_path, corpus, stable_run, capsys):
    recipe = write_augmented_recipe(tmp_path, base=Path(stable_run[0].base), manifests=corpus)
    shutil.rmtree(tmp_path / "noise")
    (tmp_path / "noise").mkdir()  # empty: no audio file to draw noise from
    code = main(["train", str(recipe)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and "Traceback" not in err
    assert len(lines) == 1 and str(tmp_path / "noise") in lines[0], err
    assert not (tmp_path / "out" / "last").exists()


def test_resume_without_last_is_an_error(tmp_path, corpus):
    recipe = load_recipe(write_recipe(tmp_path / "recipe.yaml", base=tmp_path / "none", manifests=corpus,
                                      output_dir=tmp_path / "out"))
    with pytest.raises(InputError, match="nothing to resume"):
        training.train(recipe, resume=True)


def write_common_voice(folder: Path) -> Path:
    """A Common Voice-like release folder (clips/ and train/dev/test.tsv) of WAV tones with Turkish text."""
    texts = ["Işık İstanbul’da", "kâr ılık", "Ağaç", "dört göz", "Şu çiçek", "ılık su", "Göz", "İyi"]
    header = "client_id\tpath\tsentence\tlocale\n"
    tables = {"train": "", "dev": "", "test": ""}
    for k, text in enumerate(texts):
        write_tone(folder / "clips" / f"cv_{k}.wav", duration_s=0.9 + 0.05 * k, seed=k)
        split = "train" if k < 4 else "dev" if k < 6 else "test"
        tables[split] += f"c{k % 3}\tcv_{k}.wav\t{text}\ttr\n"
    for split, rows in tables.items():
        (folder / f"{split}.tsv").write_text(header + rows, encoding="utf-8")
    return folder


def test_shipped_recipe_trains_two_updates_with_a_tiny_base(tmp_path, capsys):
    base = make_tiny_checkpoint(tmp_path / "tiny", arch="stable")
    cv = write_common_voice(tmp_path / "cv-corpus" / "tr")
    out = tmp_path / "out"
    code = main(["train", str(REPO / "recipes" / "common_voice" / "tr.yaml"), "--set", f"base={base}",
                 "--set", f"data.prepare.source={cv}", "--set", f"output_dir={out}", "--set", "train.max_updates=2",
                 "--set", "train.max_batch_s=2", "--set", "train.num_workers=0", "--set", "eval.every_updates=2"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "test WER" in printed.out
    assert (out / "manifests" / "train.jsonl").is_file()
    vocab = Vocabulary.load(out)
    assert "ı" in vocab.tokens and "I" not in vocab.tokens and "'" in vocab.tokens  # Turkish casing, apostrophe kept
    resolved = yaml.safe_load((out / "recipe.yaml").read_text(encoding="utf-8"))
    assert resolved["base"] == str(base) and resolved["text"]["locale"] == "tr"


def test_train_without_a_required_corpus_path_names_the_key(capsys):
    code = main(["train", str(REPO / "recipes" / "common_voice" / "sw.yaml")])
    err = capsys.readouterr().err
    assert code == 2 and "data.prepare.source" in err and "sw.yaml" in err and "Traceback" not in err


def test_learning_rate_schedules():
    tri = TrainOptions(lr=1e-3, max_updates=100, warmup_ratio=0.1, hold_ratio=0.4)
    assert training.get_lr(0, tri) == pytest.approx(1e-3 * training.INIT_LR_SCALE)
    assert training.get_lr(5, tri) == pytest.approx((1e-5 + 1e-3) / 2)
    assert training.get_lr(10, tri) == training.get_lr(49, tri) == pytest.approx(1e-3)
    assert training.get_lr(100, tri) == pytest.approx(1e-3 * training.FINAL_LR_SCALE)
    decaying = [training.get_lr(u, tri) for u in range(50, 101)]
    assert all(a > b for a, b in zip(decaying, decaying[1:]))
    linear = TrainOptions(lr=1e-3, max_updates=100, warmup_ratio=0.1, schedule="linear")
    assert training.get_lr(0, linear) == 0.0
    assert training.get_lr(10, linear) == pytest.approx(1e-3)
    assert training.get_lr(55, linear) == pytest.approx(0.5e-3)
    assert training.get_lr(100, linear) == 0.0


def test_blank_collapse_warning_names_the_likely_causes():
    assert training.blank_collapse_warning(0.5, update=100) is None
    warning = training.blank_collapse_warning(0.95, update=100)
    assert "95%" in warning and "train.lr" in warning and "max_updates" in warning and "vocabulary" in warning


def test_an_unreadable_checkpoint_file_is_one_line_naming_it(tmp_path, monkeypatch):
    path = tmp_path / "training_state.pt"
    torch.save({"state": {"update": 2}}, path)
    path.write_bytes(path.read_bytes()[:200])  # a copy cut short
    with pytest.raises(InputError) as caught:
        training._read_checkpoint_file(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: unreadable checkpoint file (truncated or corrupt?): PytorchStreamReader ")
    assert "\n" not in message

    def load_failing_after_a_blank_line(*args, **kwargs):
        raise RuntimeError("\nbad zip\nmore")

    # a file holding other pickled objects is refused, not unpickled, in one plain line
    torch.save({"state": {"update": 2}, "seen": fractions.Fraction(1, 3)}, path)
    with pytest.raises(InputError) as caught:
        training._read_checkpoint_file(path)
    assert str(caught.value) == (f"{path}: not a speechxfer training state: it holds pickled Python objects, which "
                                 "are not loaded (unpickling them could run code)")

    # a library message that starts on its second line still gives its first words, never an empty reason
    monkeypatch.setattr(training.torch, "load", load_failing_after_a_blank_line)
    with pytest.raises(InputError, match=r"\(truncated or corrupt\?\): bad zip$"):
        training._read_checkpoint_file(path)

    def load_failing_in_bold(*args, **kwargs):
        raise RuntimeError("\x1b[1mbad\x1b[0m zip")

    # terminal colour codes in a library's message do not reach the log
    monkeypatch.setattr(training.torch, "load", load_failing_in_bold)
    with pytest.raises(InputError, match=r"\(truncated or corrupt\?\): bad zip$"):
        training._read_checkpoint_file(path)


@pytest.mark.slow
def test_two_processes_give_the_first_loss_of_one(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "check_distributed.py"), "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "difference" in done.stdout


def test_messages_go_through_logging_and_can_be_silenced(tmp_path, corpus, caplog, capsys):
    """train() reports through the "speechxfer.training" logger, never by printing: a caller silences it with the
    logger's level, and the CLI shows the messages on stderr as plain lines."""
    base = make_tiny_checkpoint(tmp_path / "ssl", arch="stable")
    # every utterance is too short to train on: train() stops with an error after its first messages
    recipe_path = write_recipe(tmp_path / "recipe.yaml", base=base, manifests=corpus, output_dir=tmp_path / "out",
                               train={"min_duration_s": 5.0})
    recipe = load_recipe(recipe_path)
    with caplog.at_level(logging.INFO, logger="speechxfer"), pytest.raises(InputError, match="too little"):
        training.train(recipe)
    said = [r.getMessage() for r in caplog.records if r.name == "speechxfer.training" and r.levelno == logging.INFO]
    assert "vocabulary: 6 tokens: [PAD] [UNK] | a b c" in said
    assert any(m.startswith("train: 0 utterances kept; dropped 6 utterances: 6 too short") for m in said)
    printed = capsys.readouterr()
    assert "vocabulary" not in printed.out + printed.err

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="speechxfer"), pytest.raises(InputError, match="too little"):
        training.train(recipe)
    assert not [r for r in caplog.records if r.name.startswith("speechxfer")]
    printed = capsys.readouterr()
    assert "vocabulary" not in printed.out + printed.err

    assert main(["train", str(recipe_path)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert "vocabulary: 6 tokens: [PAD] [UNK] | a b c" in lines
    assert lines[-1].startswith("speechxfer train: error: ") and "too little training data" in lines[-1]
    assert not logging.getLogger("speechxfer").handlers  # the CLI's handler lives as long as its command


def write_corpus_with_bad_audio(folder: Path) -> dict[str, Path]:
    """write_corpus, plus one train row of each bad kind after its good rows (lines 7-14 of train.jsonl)."""
    import soundfile as sf

    manifests = write_corpus(folder)
    audio = folder / "audio"
    (audio / "zero.wav").write_bytes(b"")
    (audio / "folder.wav").mkdir()
    (audio / "text.wav").write_bytes(b"this is not audio at all" * 100)
    sf.write(audio / "nan.wav", np.full(16000, np.nan, dtype=np.float32), 16000, subtype="FLOAT")
    sf.write(audio / "inf.wav", np.full(16000, np.inf, dtype=np.float32), 16000, subtype="FLOAT")
    write_tone(audio / "tiny.wav", duration_s=0.001)
    bad = [("missing", "gone.wav", 1.0), ("zero", "zero.wav", 1.0), ("folder", "folder.wav", 1.0),
           ("text", "text.wav", 1.0), ("nan", "nan.wav", 1.0), ("inf", "inf.wav", 1.0),
           ("short", "tiny.wav", 1.0),  # 1 ms listed as 1 s
           ("tiny", "tiny.wav", 0.001)]  # listed right, but shorter than the model's receptive field
    rows = [json.loads(line) for line in manifests["train"].read_text(encoding="utf-8").splitlines()]
    rows += [{"id": name, "audio_path": f"audio/{file}", "text": "ab", "duration_s": duration_s}
             for name, file, duration_s in bad]
    manifests["train"].write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return manifests


@pytest.mark.filterwarnings("ignore:'(aifc|audioop|sunau)' is deprecated:DeprecationWarning")  # audioread's imports
def test_bad_audio_in_train_is_skipped_and_reported_with_manifest_and_line(tmp_path, capsys):
    manifests = write_corpus_with_bad_audio(tmp_path / "corpus")
    train = manifests["train"]
    base = make_tiny_checkpoint(tmp_path / "ssl", arch="stable")
    # one epoch is 7 batches (9 usable-looking utterances of 0.8-1.2 s at most 2.5 s a batch): 8 updates draw all
    recipe = write_recipe(tmp_path / "recipe.yaml", base=base, manifests=manifests, output_dir=tmp_path / "out",
                          train={"max_updates": 8, "min_duration_s": 0.0}, eval={"every_updates": 4})
    code = main(["train", str(recipe)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    out = printed.err  # messages go to stderr (through logging)
    # found by a stat before the first update
    assert "train: 3 bad rows skipped (2 unreadable_audio, 1 missing_file)" in out
    assert f"{train}:7: [missing_file] missing: no such audio file: " in out
    assert f"{train}:8: [unreadable_audio] zero: empty file (0 bytes): " in out
    assert f"{train}:9: [unreadable_audio] folder: a folder, not an audio file: " in out
    # too short for the model: counted by the filter
    assert "train: 10 utterances kept; dropped 1 utterance: 1 too short" in out
    # found when read: left out of their batches, each once
    for line, kind, message in ((10, "unreadable_audio", "text: unreadable audio"),
                                (11, "unreadable_audio", "nan: audio holds NaN or infinite samples"),
                                (12, "unreadable_audio", "inf: audio holds NaN or infinite samples"),
                                (13, "duration_mismatch", "short: the manifest lists 1 s, the audio holds 0.001 s")):
        assert out.count(f"train: left out {train}:{line}: [{kind}] {message}") == 1, (line, out)
    assert "train: 4 utterances left out of their batches" in out
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["update"] for r in records if "loss" in r] == list(range(1, 9))
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)


@pytest.mark.filterwarnings("ignore:'(aifc|audioop|sunau)' is deprecated:DeprecationWarning")  # audioread's imports
def test_resume_with_bad_audio_reaches_the_uninterrupted_state(tmp_path, monkeypatch, caplog):
    manifests = write_corpus_with_bad_audio(tmp_path / "corpus")
    base = make_tiny_checkpoint(tmp_path / "ssl", arch="stable")
    # at most 1.3 s a batch: one utterance each, so a bad one leaves its batch empty and the batch is skipped;
    # an epoch is 6 updates, with bad batches both before and after the checkpoint of update 3
    recipes = {name: load_recipe(write_recipe(tmp_path / f"{name}.yaml", base=base, manifests=manifests,
                                              output_dir=tmp_path / name, eval={"every_updates": 3},
                                              train={"max_batch_s": 1.3, "max_updates": 6}))
               for name in ("straight", "resumed")}
    caplog.set_level(logging.INFO, logger="speechxfer")
    training.train(recipes["straight"])
    assert "train: left out" in caplog.text

    train_until_second_evaluation(recipes["resumed"], monkeypatch)
    caplog.clear()
    assert training.train(recipes["resumed"], resume=True).updates == 6
    assert "train: left out" in caplog.text  # a bad batch skipped after the checkpoint too
    straight = load_file(tmp_path / "straight" / "last" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "last" / "model.safetensors")
    assert max((straight[k] - resumed[k]).abs().max().item() for k in straight) <= 1e-6


@pytest.mark.filterwarnings("ignore:'(aifc|audioop|sunau)' is deprecated:DeprecationWarning")  # audioread's imports
def test_training_stops_with_an_error_when_no_batch_has_usable_audio(tmp_path, capsys):
    manifests = write_corpus(tmp_path / "corpus")
    for audio in (tmp_path / "corpus" / "audio").iterdir():
        audio.write_bytes(b"not audio, but not empty either")
    recipe = write_recipe(tmp_path / "recipe.yaml", base=make_tiny_checkpoint(tmp_path / "ssl"), manifests=manifests,
                          output_dir=tmp_path / "out")
    code = main(["train", str(recipe)])
    err = capsys.readouterr().err
    assert code == 2 and f"{manifests['train']}: no training batch has usable audio" in err and "Traceback" not in err
    # the progress bar is closed before the error is printed, not redrawn after it when train()'s frame goes
    assert "train:" in err and err.endswith("\n")
    assert err.rstrip("\n").splitlines()[-1].startswith("speechxfer train: error: "), repr(err[-300:])


# --- from a config (scratch), short utterances first, time budget ----------------------------------------------------

# A tiny seed-like architecture: tapered group-norm conv front-end, pre-layer-norm ("stable") transformer.
SCRATCH_CONFIG = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                  "conv_dim": [8, 16, 16], "conv_stride": [5, 4, 4], "conv_kernel": [10, 4, 4], "conv_bias": False,
                  "feat_extract_norm": "group", "do_stable_layer_norm": True, "num_conv_pos_embeddings": 16,
                  "num_conv_pos_embedding_groups": 2}
SHORT_S = 0.9  # the corpus's train utterances last 0.8, 1.0 and 1.2 s


def write_scratch_recipe(path: Path, *, manifests: dict[str, Path], output_dir: Path, **train) -> Path:
    recipe = {"model_config": SCRATCH_CONFIG, "data": {name: str(p) for name, p in manifests.items()},
              "model": {"mask_time_prob": 0.0},
              "freezing": {"feature_encoder": False},
              "train": {"max_updates": 8, "max_batch_s": 2.5, "lr": 2e-3, "min_duration_s": 0.1, "log_every": 1,
                        "warmup_ratio": 0.25, "hold_ratio": 0.25, "short_first_s": SHORT_S,
                        "short_first_share": 0.5, **train},
              "eval": {"every_updates": 2},
              "output_dir": str(output_dir)}
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


class BatchSpy:
    """Records the ids of every training batch train() draws, in order (one batch per update here), and moves a
    fake clock on by `seconds_per_batch`, so that time budgets can be tested without timing anything."""

    real_batch_stream = training._batch_stream

    def __init__(self, monkeypatch, *, seconds_per_batch: float = 0.0):
        self.batches: list[list[str]] = []
        self.now = 0.0
        self.seconds_per_batch = seconds_per_batch

        def spy(*args, **kwargs):
            for epoch, position, batch in BatchSpy.real_batch_stream(*args, **kwargs):
                self.batches.append(list(batch["ids"]))
                self.now += self.seconds_per_batch
                yield epoch, position, batch

        monkeypatch.setattr(training, "_batch_stream", spy)
        if seconds_per_batch:
            monkeypatch.setattr(training, "time", self)

    def perf_counter(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def scratch_run(tmp_path_factory, corpus):
    """8 updates from model_config, the first half on short utterances only, uninterrupted."""
    tmp = tmp_path_factory.mktemp("scratch")
    monkeypatch = pytest.MonkeyPatch()
    spy = BatchSpy(monkeypatch)
    try:
        recipe = load_recipe(write_scratch_recipe(tmp / "recipe.yaml", manifests=corpus, output_dir=tmp / "out"))
        result = training.train(recipe)
    finally:
        monkeypatch.undo()
    return recipe, result, spy.batches


def test_a_model_config_trains_from_scratch(scratch_run):
    from transformers import Wav2Vec2ForCTC

    from speechxfer.surgery import build_scratch_model

    recipe, result, _ = scratch_run
    assert result.updates == 8 and result.stop_reason == "max_updates" and not result.stopped_early
    out = Path(result.output_dir)
    trained = Wav2Vec2ForCTC.from_pretrained(out)
    vocab = Vocabulary.load(out)
    config = trained.config
    assert (config.hidden_size, config.num_hidden_layers, list(config.conv_dim)) == (32, 2, [8, 16, 16])
    assert config.do_stable_layer_norm and config.feat_extract_norm == "group" and config.conv_bias is False
    assert config.vocab_size == len(vocab) and config.pad_token_id == vocab.blank_id
    assert config.mask_time_prob == 0.0  # the model section applies on top of model_config
    # The starting point is the config's random initialisation from the seed, and everything trained from there.
    initial = build_scratch_model(recipe.model_config, vocab, seed=recipe.train.seed).state_dict()
    assert torch.equal(initial["lm_head.weight"],
                       build_scratch_model(recipe.model_config, vocab, seed=recipe.train.seed).lm_head.weight)
    final = trained.state_dict()
    for name in ("wav2vec2.feature_extractor.conv_layers.0.conv.weight",
                 "wav2vec2.encoder.layers.0.attention.q_proj.weight", "lm_head.weight"):
        assert not torch.allclose(initial[name], final[name]), name
    resolved = yaml.safe_load((out / "recipe.yaml").read_text(encoding="utf-8"))
    assert resolved["base"] is None and resolved["model_config"] == SCRATCH_CONFIG
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert all(r["minutes"] >= 0 for r in records) and [r for r in records if "loss" in r][-1]["audio_h"] > 0


def test_short_utterances_first_stage_draws_only_short_ones(scratch_run, corpus):
    _, _, batches = scratch_run
    duration_s = {u.id: u.duration_s for u in load_manifest(corpus["train"])}
    assert len(batches) == 8  # one batch per update
    # short_first_share 0.5 of 8 updates: the first 4 batches hold only utterances up to SHORT_S seconds
    assert all(duration_s[i] <= SHORT_S for batch in batches[:4] for i in batch)
    assert any(duration_s[i] > SHORT_S for batch in batches[4:] for i in batch)


def test_resume_inside_the_short_first_stage_reaches_the_uninterrupted_state(tmp_path, corpus, scratch_run,
                                                                             monkeypatch):
    _, straight_result, straight_batches = scratch_run
    out = tmp_path / "out"
    recipe = load_recipe(write_scratch_recipe(tmp_path / "recipe.yaml", manifests=corpus, output_dir=out))
    train_until_second_evaluation(recipe, monkeypatch)  # update 4: last/ holds update 2, inside the short-first stage
    spy = BatchSpy(monkeypatch)
    result = training.train(recipe, resume=True)
    assert result.updates == 8
    assert spy.batches == straight_batches[2:]  # the same batches from update 3 on, short ones first
    straight = load_file(Path(straight_result.output_dir) / "last" / "model.safetensors")
    resumed = load_file(out / "last" / "model.safetensors")
    assert max((straight[k] - resumed[k]).abs().max().item() for k in straight) <= 1e-6


def test_time_budget_stops_the_run_and_counts_over_resumed_runs(tmp_path, corpus, monkeypatch):
    # A fake clock moving 10 s per batch: a budget of 1 minute is spent after 6 of the 1000 updates allowed.
    recipe = load_recipe(write_scratch_recipe(tmp_path / "recipe.yaml", manifests=corpus, output_dir=tmp_path / "out",
                                              max_updates=1000, max_minutes=1.0))
    BatchSpy(monkeypatch, seconds_per_batch=10.0)
    result = training.train(recipe)
    assert (result.updates, result.stop_reason) == (6, "max_minutes")
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["update"] for r in records if "dev_wer" in r] == [2, 4, 6]  # the last update is evaluated too
    assert records[-1]["minutes"] == pytest.approx(1.0)

    # Interrupted at update 4 (last/ holds update 2 and 20 s), the resumed run has 40 s of budget left.
    recipe = load_recipe(write_scratch_recipe(tmp_path / "recipe2.yaml", manifests=corpus,
                                              output_dir=tmp_path / "out2", max_updates=1000, max_minutes=1.0))
    BatchSpy(monkeypatch, seconds_per_batch=10.0)
    train_until_second_evaluation(recipe, monkeypatch)
    BatchSpy(monkeypatch, seconds_per_batch=10.0)  # a fresh clock from 0, as after a restart
    result = training.train(recipe, resume=True)
    assert (result.updates, result.stop_reason) == (6, "max_minutes")


# --- the output folder: never someone else's files, never the source checkpoint, one run at a time, kills --------


def test_a_folder_that_is_not_a_run_is_refused_and_left_alone(tmp_path, corpus, capsys):
    out = tmp_path / "out"
    (out / "model-old").mkdir(parents=True)
    (out / "model-old" / "weights_v1.bin").write_bytes(b"\0" * 16)
    (out / "model-card-draft.md").write_text("# draft\n")
    (out / "config.json").write_text("{}\n")
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    recipe = write_recipe(tmp_path / "recipe.yaml", base=tmp_path / "none", manifests=corpus, output_dir=out)
    code = main(["train", str(recipe)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "holds no speechxfer run (config.json, model-card-draft.md, model-old/)" in err and str(out) in err
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
    assert (out / "model-card-draft.md").read_text() == "# draft\n"
    # a file: not touched either
    taken = tmp_path / "taken"
    taken.write_text("mine\n")
    recipe = write_recipe(tmp_path / "recipe.yaml", base=tmp_path / "none", manifests=corpus, output_dir=taken)
    assert main(["train", str(recipe)]) == 2  # the wording every stage gives (errors.output_folder)
    assert capsys.readouterr().err == f"speechxfer train: error: {taken}: the output folder is a file\n"
    assert taken.read_text() == "mine\n"


@pytest.mark.parametrize("where", ["same", "inside", "holds"])
def test_the_source_checkpoint_is_never_the_output_folder(tmp_path, corpus, where):
    base = make_tiny_checkpoint(tmp_path / "models" / "ssl", arch="stable")
    out = {"same": base, "inside": base / "run", "holds": tmp_path / "models"}[where]
    before = {p.name: p.read_bytes() for p in base.iterdir()}
    recipe = load_recipe(write_recipe(tmp_path / "recipe.yaml", base=base, manifests=corpus, output_dir=out))
    with pytest.raises(InputError, match="source checkpoint's folder"):
        training.train(recipe)
    assert {p.name: p.read_bytes() for p in base.iterdir()} == before


def test_a_second_run_on_the_folder_is_refused_until_the_first_dies(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); "
                               "from speechxfer import training; from pathlib import Path; "
                               "training._lock_output_dir(Path(sys.argv[2])); print('locked', flush=True); "
                               "time.sleep(120)", str(REPO), str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(InputError, match=rf"another speechxfer train is running .*process {holder.pid}"):
            training._lock_output_dir(out)
    finally:
        holder.kill()  # as SIGKILL: no cleanup runs, the OS drops the lock
        holder.wait()
    training._lock_output_dir(out)  # no stale lock
    assert (out / training.RUN_MARKER).is_file()


def test_a_kill_between_the_checkpoint_renames_loses_nothing(tmp_path, corpus, stable_run, monkeypatch):
    """The kill lands after last/ (update 2) was renamed aside and before the new checkpoint (update 4) took its
    place: resume recovers update 4, and the folders follow the umask."""
    straight_recipe, straight = stable_run
    out = tmp_path / "out"
    recipe = load_recipe(write_recipe(tmp_path / "recipe.yaml", base=Path(straight_recipe.base), manifests=corpus,
                                      output_dir=out))
    real_replace = training.os.replace

    def killed_after_retiring_last(src, dst):
        if Path(src).name == training.LAST_STAGING and (out / training.LAST_RETIRED).exists():
            raise Interrupted
        real_replace(src, dst)

    previous_umask = os.umask(0o022)
    try:
        monkeypatch.setattr(training.os, "replace", killed_after_retiring_last)
        with pytest.raises(Interrupted):
            training.train(recipe)
        monkeypatch.undo()
        assert not (out / "last").exists() and (out / training.LAST_RETIRED / "training_state.pt").is_file()
        result = training.train(recipe, resume=True)
    finally:
        os.umask(previous_umask)
    assert result.updates == 4 and result.best_update == straight.best_update
    for name in ("last/model.safetensors", "model.safetensors"):
        straight_weights = load_file(Path(straight.output_dir) / name)
        weights = load_file(out / name)
        assert max((straight_weights[k] - weights[k]).abs().max().item() for k in weights) == 0.0, name
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [training.RUN_MARKER]
    assert stat.S_IMODE(out.stat().st_mode) == stat.S_IMODE((out / "last").stat().st_mode) == 0o755
    for name in ("model.safetensors", "last/model.safetensors", "last/training_state.pt", "recipe.yaml"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name


def disk_full_at(monkeypatch, module, name: str, *, folder: str, call: int, error: str) -> None:
    """Make `module.name`, a safetensors save_file, fail as on a full disk at its `call`-th write of a file inside
    a folder named `folder` (training.LAST_STAGING: a checkpoint; surgery.MODEL_STAGING: a model folder), raising
    safetensors' own error (error="safetensors") or an OSError (error="oserror")."""
    real_save_file = getattr(module, name)
    calls = []

    def save_file(tensors, filename, *args, **kwargs):
        if folder in Path(filename).parts:
            calls.append(filename)
            if len(calls) == call and error == "safetensors":
                raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28) at "
                                      f'path "{Path(filename).parent}/.tmp5XQz1a"')
            if len(calls) == call:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        return real_save_file(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(module, name, save_file)


@pytest.mark.parametrize("error", ["safetensors", "oserror"])
def test_a_full_disk_at_a_checkpoint_is_one_line_and_resume_continues_from_the_one_before(
        tmp_path, corpus, stable_run, monkeypatch, capsys, error):
    """The weights of the second checkpoint (update 4) cannot be written: one line naming last/, which still holds
    the checkpoint of update 2, nothing half written left beside it, and --resume reaches the uninterrupted run."""
    import transformers.modeling_utils

    straight_recipe, straight = stable_run
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "recipe.yaml", base=Path(straight_recipe.base), manifests=corpus,
                          output_dir=out)
    disk_full_at(monkeypatch, transformers.modeling_utils, "safe_save_file", folder=training.LAST_STAGING, call=2,
                 error=error)
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1] == (f"speechxfer train: error: {out / 'last'}: cannot save the checkpoint of update 4: "
                                    "No space left on device; what was saved before is kept, and train --resume "
                                    "continues from the last checkpoint")
    assert torch.load(out / "last" / "training_state.pt", weights_only=True)["state"]["update"] == 2
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [training.RUN_MARKER]
    monkeypatch.undo()
    assert main(["train", str(recipe), "--resume"]) == 0
    assert f"resuming from {out / 'last'} at update 2" in capsys.readouterr().err
    for name in ("last/model.safetensors", "model.safetensors"):
        straight_weights, weights = load_file(Path(straight.output_dir) / name), load_file(out / name)
        assert max((straight_weights[k] - weights[k]).abs().max().item() for k in weights) <= 1e-6, name


def test_a_full_disk_at_the_best_model_is_one_line_and_keeps_the_folder_whole(tmp_path, corpus, stable_run,
                                                                               monkeypatch, capsys):
    """The first best model (update 2) cannot be written: one line naming the output folder, no half-written model
    in it, and --resume (nothing to resume yet: no checkpoint) trains the run from the start."""
    import transformers.modeling_utils

    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "recipe.yaml", base=Path(stable_run[0].base), manifests=corpus, output_dir=out)
    disk_full_at(monkeypatch, transformers.modeling_utils, "safe_save_file", folder=surgery.MODEL_STAGING, call=1,
                 error="safetensors")
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith(f"speechxfer train: error: {out}: cannot save the best model (update 2): "
                                           "No space left on device; what was saved before is kept")
    assert sorted(p.name for p in out.iterdir()) == sorted([training.RUN_MARKER, "charset_audit.json",
                                                            "metrics.jsonl", "recipe.yaml", "tensorboard"])
    monkeypatch.undo()
    assert main(["train", str(recipe), "--resume"]) == 0
    assert (out / "model.safetensors").is_file() and (out / "last" / "training_state.pt").is_file()


def copy_of_run(stable_run, tmp_path) -> tuple[Path, Path]:
    """(recipe file, output folder) of a copy of the finished stable run."""
    recipe, result = stable_run
    out = tmp_path / "out"
    shutil.copytree(result.output_dir, out)
    recipe_file = Path(result.output_dir).parent / "recipe.yaml"
    return recipe_file, out


def test_resume_clears_leftovers_and_names_changed_recipe_keys(tmp_path, stable_run, capsys):
    recipe_file, out = copy_of_run(stable_run, tmp_path)
    retired = out / training.LAST_RETIRED  # a kill while deleting the replaced checkpoint
    shutil.copytree(out / "last", retired)
    (retired / "model.safetensors").unlink()
    (out / training.LAST_STAGING).mkdir()  # a kill while writing a checkpoint
    (out / training.LAST_STAGING / "config.json").write_text("{}")
    (out / ".recipe.yaml.0123abcd.tmp").write_text("base: x\n")  # a kill inside atomic_write
    code = main(["train", str(recipe_file), "--resume", "--set", f"output_dir={out}", "--set", "train.lr=5e-4"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    # messages go to stderr (through logging)
    assert "deleted .last.staging" in printed.err and "deleted .last.retired" in printed.err
    assert "deleted .recipe.yaml.0123abcd.tmp" in printed.err
    assert "differs from the run's recipe.yaml in: train.lr: 0.001 -> 0.0005" in printed.err
    assert "max_updates" not in printed.err and "output_dir:" not in printed.err  # moved, not changed
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [training.RUN_MARKER]


@pytest.mark.parametrize("damaged", ["training_state.pt", "model.safetensors"])
def test_a_damaged_checkpoint_is_one_line_naming_the_file(tmp_path, stable_run, capsys, damaged):
    recipe_file, out = copy_of_run(stable_run, tmp_path)
    path = out / "last" / damaged
    path.write_bytes(path.read_bytes()[:200])
    code = main(["train", str(recipe_file), "--resume", "--set", f"output_dir={out}"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("speechxfer train: error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err  # besides, transformers' loading bar
    assert f"{path}: unreadable" in errors[0]


def test_bench_train_script_help_and_arguments():
    """scripts/bench_train.py (the training speed benchmark): --help is instant and names the last line; a bad
    lever or count is an argparse error (exit 2) before any corpus or model is made."""
    script = REPO / "scripts" / "bench_train.py"
    shown = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=30)
    assert shown.returncode == 0 and "ratio_vs_trainer=X ratio_vs_limit=Y" in shown.stdout
    for bad, message in ((["--levers", "c+cache,warp"], "unknown lever warp"), (["--updates", "0"], "at least 1")):
        refused = subprocess.run([sys.executable, str(script), *bad, "--work", "/nonexistent/bench"],
                                 capture_output=True, text=True, timeout=30)
        assert refused.returncode == 2 and message in refused.stderr
    assert not Path("/nonexistent/bench").exists()


def test_bench_train_padding_share():
    """The padding figure of the benchmark: padded seconds are items x the longest item, per batch."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_train", REPO / "scripts" / "bench_train.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    figures = bench._padding([1.0, 2.0, 3.0, 4.0], [[0, 1], [2, 3]])
    assert figures == {"audio_s": 5.0, "padded_s": 6.0, "padding": pytest.approx(1 / 6), "max_padded_s": 8.0}


def test_tqdm_disable_hides_the_training_progress_bar(tmp_path, corpus, capsys):
    base = make_tiny_checkpoint(tmp_path / "ssl", arch="stable")
    bar = re.compile(r"train: +\d+%\|.*\| \d+/2 \[")
    recipes = [write_recipe(tmp_path / f"{name}.yaml", base=base, manifests=corpus, output_dir=tmp_path / name,
                            train={"max_updates": 2}, eval={"every_updates": 2}) for name in ("shown", "hidden")]
    assert main(["train", str(recipes[0])]) == 0
    assert bar.search(capsys.readouterr().err)  # on stderr even when it is no terminal: the main process's bar
    # tqdm reads TQDM_DISABLE when it is imported: a fresh interpreter
    env = os.environ | {"TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1",
                        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "speechxfer", "train", str(recipes[1])], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "vocabulary: 6 tokens" in done.stderr and not bar.search(done.stderr)
