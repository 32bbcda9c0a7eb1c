"""rank-sources: reading a source's output back into target characters, a tiny model trained on target-like
data ranking above a random one, adapter models scored per language, and bad candidates listed last."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from speechxfer import training
from speechxfer.cli import main
from speechxfer.errors import InputError, RecipeError
from speechxfer.manifest import Utterance, load_manifest, write_manifest
from speechxfer.ranking import format_ranking, rank_sources, read_back_table, resolve_init_from
from speechxfer.recipe import load_recipe
from speechxfer.surgery import find_source_tokens
from speechxfer.vocabulary import Vocabulary
from tiny import make_tiny_adapter_checkpoint, make_tiny_checkpoint

# Each letter is a tone of its own: the source language writes what the target writes "á" as "a".
TONE_HZ = {"a": 300.0, "b": 700.0, "c": 1500.0}
TARGET_SPELLING = str.maketrans({"a": "á"})
MMS_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "|"]


def write_spelled(path: Path, text: str, *, seed: int) -> float:
    """0.2 s of each letter's tone, 50 ms of silence after each; returns the duration in seconds."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(0.2 * 16000)) / 16000
    wave = np.concatenate([np.concatenate([0.3 * np.sin(2 * np.pi * TONE_HZ[c] * t), np.zeros(800)])
                           for c in text])
    wave += 0.01 * rng.standard_normal(wave.shape)
    sf.write(path, wave.astype(np.float32), 16000)
    return len(wave) / 16000


def write_split(folder: Path, name: str, texts: list[str], *, spelling: dict | None = None) -> Path:
    (folder / "audio").mkdir(parents=True, exist_ok=True)
    utterances = []
    for k, text in enumerate(texts):
        audio = folder / "audio" / f"{name}{k}.wav"
        duration_s = write_spelled(audio, text, seed=k + 1000 * len(name))
        utterances.append(Utterance(id=f"{name}{k}", audio_path=str(audio),
                                    text=text.translate(spelling) if spelling else text, duration_s=duration_s))
    write_manifest(folder / f"{name}.jsonl", utterances)
    return folder / f"{name}.jsonl"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """Source-language train/dev (written with "a") and the target's dev (the same sounds written with "á")."""
    folder = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    texts = ["".join(rng.choice(list("abc"), size=rng.integers(2, 5))) for _ in range(40)]
    return {"train": write_split(folder, "train", texts[:32]), "dev": write_split(folder, "dev", texts[32:36]),
            "target_dev": write_split(folder, "target", texts[36:], spelling=TARGET_SPELLING)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus) -> Path:
    """A tiny model fine-tuned for 40 updates (about 7 s on one core) on the source language."""
    folder = tmp_path_factory.mktemp("trained")
    base = make_tiny_checkpoint(folder / "ssl")
    recipe = {"base": str(base), "data": {"train": str(corpus["train"]), "dev": str(corpus["dev"])},
              "model": {"mask_time_prob": 0.0}, "freezing": {"feature_encoder": False},
              "train": {"max_updates": 40, "max_batch_s": 8, "lr": 3e-3, "min_duration_s": 0.1, "log_every": 10,
                        "warmup_ratio": 0.1, "hold_ratio": 0.6},
              "eval": {"every_updates": 1000}, "output_dir": str(folder / "out")}
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return Path(training.train(load_recipe(folder / "recipe.yaml")).output_dir)


@pytest.fixture(scope="module")
def random_source(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("random") / "ctc", ctc_vocab=["[PAD]", "[UNK]", "|", *"abcd"],
                                seed=1)


def test_read_back_reverses_the_row_transfer():
    source = Vocabulary(("[PAD]", "[UNK]", "|", "<s>", "a", "e", "h", "z"))
    target = {"a": 5, "é": 9, "e": 1, "ж": 2, "q": 1}
    read_back = read_back_table(target, source)
    # "e" reads as "e" (shared) although "é" (which the transfer also starts from "e") is more frequent
    assert read_back.spellings == {("a",): "a", ("e",): "e", ("z", "h"): "ж"}
    assert (read_back.mapped, read_back.characters) == (4, 5)
    letters = {t: i for i, t in enumerate(source.tokens)}
    for key, char in read_back.spellings.items():
        assert list(key) == find_source_tokens(char, letters)[1]  # the transfer's own mapping, reversed
    # longest spelling first; a token that spells no target character stays as it is
    assert read_back(["z", "h", "a", " ", "e", "h", " ", " "]) == "жa eh"


def test_read_back_prefers_the_more_frequent_character_among_equals():
    source = Vocabulary(("[PAD]", "[UNK]", "|", "e"))
    assert read_back_table({"é": 1, "è": 3}, source).spellings == {("e",): "è"}
    assert read_back_table({"é": 3, "è": 1}, source).spellings == {("e",): "é"}


def test_a_model_trained_on_target_like_data_ranks_above_a_random_one(corpus, trained, random_source, tmp_path):
    not_ctc = make_tiny_checkpoint(tmp_path / "ssl")
    a_file = corpus["train"]
    scores = rank_sources([str(random_source), str(tmp_path / "missing"), str(trained), str(not_ctc),
                           str(a_file)], corpus["target_dev"], device="cpu")
    assert [s.candidate for s in scores] == [str(trained), str(random_source), str(tmp_path / "missing"),
                                             str(not_ctc), str(a_file)]
    best, random, *bad = scores
    assert best.cer < 0.8 < random.cer
    # its "a" reads back as the target's "á": all three letters of the dev texts mapped
    assert (best.mapped, best.characters, best.utterances) == (3, 3, 4)
    assert [s.error is None for s in scores] == [True, True, False, False, False]
    assert "no such model folder" in bad[0].error
    assert "lacks 2 weights" in bad[1].error and "lm_head" in bad[1].error
    assert "not a file" in bad[2].error
    lines = format_ranking(scores).splitlines()
    assert lines[0].split() == ["rank", "CER", "utterances", "seconds", "mapped", "language", "candidate"]
    assert lines[1].split()[0] == "1" and lines[1].endswith(str(trained))
    assert all(line.startswith("-") and "not scored" in line for line in lines[3:]) and len(lines) == 6


def test_the_first_n_usable_dev_utterances_in_manifest_order(corpus, trained, tmp_path):
    target = load_manifest(corpus["target_dev"])
    punctuation_only = dataclasses.replace(target[0], id="punctuation_only", text="?!")  # empty once normalized
    utterances = [punctuation_only, *target]
    write_manifest(tmp_path / "dev.jsonl", utterances)
    first_two = rank_sources([trained], tmp_path / "dev.jsonl", n=2, device="cpu")[0]
    assert first_two.utterances == 2
    alone = []
    for u in target[:2]:
        write_manifest(tmp_path / f"{u.id}.jsonl", [u])
        alone.append(rank_sources([trained], tmp_path / f"{u.id}.jsonl", device="cpu")[0].cer)
    chars = [len(u.text) for u in target[:2]]
    assert first_two.cer == pytest.approx((alone[0] * chars[0] + alone[1] * chars[1]) / sum(chars))
    all_four = rank_sources([trained], corpus["target_dev"], device="cpu")[0]
    assert all_four.utterances == 4 and all_four.cer < 0.8
    # The same audio written with the source's "a": reading "a" back as "á" makes both spellings score alike.
    write_manifest(tmp_path / "plain.jsonl", [dataclasses.replace(u, text=u.text.replace("á", "a")) for u in target])
    assert rank_sources([trained], tmp_path / "plain.jsonl", device="cpu")[0].cer == all_four.cer
    with pytest.raises(InputError, match="n .--n. must be at least 1"):
        rank_sources([trained], tmp_path / "dev.jsonl", n=0)


def test_a_candidate_that_transcribes_no_dev_utterance_is_not_scored(corpus, trained, tmp_path, caplog):
    target = load_manifest(corpus["target_dev"])
    write_manifest(tmp_path / "dev.jsonl", [dataclasses.replace(u, audio_path=str(tmp_path / f"gone{k}.wav"))
                                            for k, u in enumerate(target)])
    scores = rank_sources([trained, trained], tmp_path / "dev.jsonl", device="cpu")
    assert all(s.cer is None and "no dev utterance could be transcribed" in s.error for s in scores)
    # each audio problem logged once, not once per candidate
    assert sum("no such audio file" in r.getMessage() for r in caplog.records) == len(target)


def test_an_adapter_model_is_scored_per_language(corpus, tmp_path):
    model = make_tiny_adapter_checkpoint(tmp_path / "mms", vocabularies={
        "eng": [*MMS_SPECIALS, *"abcd"], "lat": [*MMS_SPECIALS, *"áb"], "rus": [*MMS_SPECIALS, *"жщ"],
        "zzz": [*MMS_SPECIALS, *"abc"]})
    (model / "adapter.zzz.safetensors").write_bytes(b"not safetensors")
    scores = rank_sources([model], corpus["target_dev"], device="cpu")
    by_language = {s.language: s for s in scores}
    assert sorted(by_language) == ["eng", "lat", "rus", "zzz"]
    assert all(s.candidate == str(model) for s in scores)
    assert by_language["eng"].mapped == 3  # á read from a (base letter), b and c shared
    assert by_language["lat"].mapped == 2  # á and b, no c: each language read through its own vocabulary
    assert by_language["eng"].cer is not None and by_language["lat"].cer is not None
    assert by_language["eng"].cer != by_language["lat"].cer  # different adapters, different heads
    assert "no character of the dev texts maps" in by_language["rus"].error
    assert "cannot load the adapter" in by_language["zzz"].error
    assert [s.language for s in scores[2:]] == ["rus", "zzz"]  # not scored: last, in the model's order
    only = rank_sources([model], corpus["target_dev"], languages=["lat", "xyz"], device="cpu")
    assert [(s.language, s.error is None) for s in only] == [("lat", True), ("xyz", False)]
    assert only[0].cer == by_language["lat"].cer and "no adapter for language 'xyz'" in only[1].error


def test_cli_prints_the_table_writes_json_and_names_bad_candidates(corpus, trained, random_source, tmp_path,
                                                                   capsys):
    out = tmp_path / "ranking.json"
    code = main(["rank-sources", str(random_source), str(tmp_path / "missing"), str(trained),
                 "--dev", str(corpus["target_dev"]), "--n", "3", "--device", "cpu", "--json", str(out)])
    captured = capsys.readouterr()
    assert code == 0
    lines = captured.out.splitlines()
    assert [line.split()[0] for line in lines] == ["rank", "1", "2", "-"]
    assert lines[1].endswith(str(trained)) and lines[2].endswith(str(random_source))
    assert f"{tmp_path / 'missing'}: not scored: no such model folder" in lines[3]
    saved = json.loads(out.read_text(encoding="utf-8"))
    assert [r["candidate"] for r in saved["ranking"]] == [str(trained), str(random_source), str(tmp_path / "missing")]
    assert saved["ranking"][0]["utterances"] == 3 and saved["n"] == 3


def test_cli_refuses_a_json_path_in_a_missing_folder_before_any_model_runs(corpus, trained, tmp_path, capsys):
    code = main(["rank-sources", str(trained), "--dev", str(corpus["target_dev"]), "--json",
                 str(tmp_path / "no" / "ranking.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("speechxfer rank-sources: error: ") and "--json must name a file" in err[0]


def test_cli_exits_1_when_no_candidate_could_be_scored(corpus, tmp_path, capsys):
    code = main(["rank-sources", str(tmp_path / "missing"), "--dev", str(corpus["target_dev"])])
    assert code == 1 and "not scored" in capsys.readouterr().out


def write_auto_recipe(path: Path, *, dev: Path, output_dir: Path, **adapt) -> Path:
    """A recipe of one update on the target's dev utterances, its source picked by adapt.init_from auto."""
    recipe = {"data": {"train": str(dev), "dev": str(dev)}, "model": {"mask_time_prob": 0.0},
              "train": {"max_updates": 1, "max_batch_s": 8, "min_duration_s": 0.1, "log_every": 1},
              "eval": {"every_updates": 1000}, "adapt": {"init_from": "auto", **adapt}, "output_dir": str(output_dir)}
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def test_init_from_auto_trains_from_the_best_candidate_and_resume_does_not_rank_again(corpus, trained, random_source,
                                                                                     tmp_path, monkeypatch):
    out = tmp_path / "out"
    recipe = write_auto_recipe(tmp_path / "recipe.yaml", dev=corpus["target_dev"], output_dir=out,
                               candidates=[str(random_source), str(trained)], rank_utterances=3)
    assert main(["train", str(recipe)]) == 0
    saved = yaml.safe_load((out / "recipe.yaml").read_text(encoding="utf-8"))
    assert saved["base"] == str(trained) and saved["adapt"]["init_lang"] is None
    assert saved["adapt"]["candidates"] == [str(random_source), str(trained)]
    ranking = json.loads((out / "source_ranking.json").read_text(encoding="utf-8"))
    assert [r["candidate"] for r in ranking["ranking"]] == [str(trained), str(random_source)]
    assert ranking["n"] == 3 and ranking["ranking"][0]["utterances"] == 3
    assert ranking["dev"] == str(corpus["target_dev"])
    assert load_recipe(out / "recipe.yaml").base == str(trained)  # the resolved recipe reads back

    def no_ranking(*args, **kwargs):
        raise AssertionError("ranked again")

    monkeypatch.setattr("speechxfer.ranking.rank_sources", no_ranking)
    assert main(["train", str(recipe), "--resume", "--set", "train.max_updates=2"]) == 0
    saved = yaml.safe_load((out / "recipe.yaml").read_text(encoding="utf-8"))
    assert saved["base"] == str(trained) and saved["train"]["max_updates"] == 2
    assert torch.load(out / "last" / "training_state.pt", weights_only=True)["state"]["update"] == 2


def test_a_run_stopped_before_training_resumes_from_its_saved_ranking(corpus, trained, random_source, tmp_path,
                                                                     monkeypatch):
    recipe = load_recipe(write_auto_recipe(tmp_path / "recipe.yaml", dev=corpus["target_dev"],
                                           output_dir=tmp_path / "out", candidates=[str(random_source), str(trained)],
                                           rank_utterances=2))
    picked = resolve_init_from(recipe, device="cpu")
    assert (picked.base, picked.adapt.init_lang) == (str(trained), None)
    assert (tmp_path / "out" / ".speechxfer-run").is_file()  # marked, so train() takes the folder over
    monkeypatch.setattr("speechxfer.ranking.rank_sources", None)  # ranking again would fail
    assert resolve_init_from(recipe, resume=True) == picked
    plain = dataclasses.replace(recipe, adapt=dataclasses.replace(recipe.adapt, init_from="base", candidates=()))
    assert resolve_init_from(plain) is plain


def test_init_from_auto_over_an_adapter_model_picks_its_best_language_for_a_full_run(corpus, tmp_path):
    model = make_tiny_adapter_checkpoint(tmp_path / "mms", vocabularies={
        "eng": [*MMS_SPECIALS, *"abcd"], "lat": [*MMS_SPECIALS, *"áb"]})
    out = tmp_path / "out"
    recipe = write_auto_recipe(tmp_path / "recipe.yaml", dev=corpus["target_dev"], output_dir=out)
    assert main(["train", str(recipe), "--set", f"base={model}"]) == 0
    ranking = json.loads((out / "source_ranking.json").read_text(encoding="utf-8"))["ranking"]
    assert sorted(r["language"] for r in ranking) == ["eng", "lat"] and ranking[0]["cer"] is not None
    saved = yaml.safe_load((out / "recipe.yaml").read_text(encoding="utf-8"))
    assert (saved["base"], saved["adapt"]["init_lang"]) == (str(model), ranking[0]["language"])


@pytest.mark.parametrize("change, message", [
    ({"adapt": {"init_from": "best"}}, "adapt.init_from must be one of"),
    ({"adapt": {"init_from": "auto"}}, "adapt.init_from auto needs adapt.candidates"),
    ({"adapt": {"candidates": ["x/y"]}, "base": "x/y"}, "adapt.candidates is used only with adapt.init_from auto"),
    ({"adapt": {"init_from": "auto", "candidates": ["x/y"]}, "base": "x/z"}, "base x/z is not one of adapt.candidates"),
    ({"adapt": {"init_from": "auto", "candidates": ["x/y"], "rank_utterances": 0}}, "adapt.rank_utterances must be"),
    ({"adapt": {"init_from": "auto", "candidates": ["x/y"]}, "data": {"train": "t.jsonl"}}, "set data.dev"),
    ({"adapt": {"init_from": "auto", "candidates": ["x/y"]}, "model_config": {"hidden_size": 32}},
     "model_config trains from scratch"),
])
def test_bad_init_from_settings_name_the_key(tmp_path, change, message):
    recipe = {"data": {"train": "t.jsonl", "dev": "d.jsonl"}, "output_dir": str(tmp_path / "out"), **change}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    with pytest.raises(RecipeError, match=message) as caught:
        load_recipe(tmp_path / "recipe.yaml")
    assert caught.value.path == str(tmp_path / "recipe.yaml")
