"""The shipped seed checkpoint (seed/): loads as a plain Hugging Face model, holds the source languages'
letters, and recognizes synthetic speech of a source language it was trained on."""

import json
from pathlib import Path

import pytest
import torch
from transformers import Wav2Vec2ForCTC

from speechxfer.surgery import build_ctc_model, needs_attention_mask
from speechxfer.vocabulary import BLANK, WORD_DELIMITER, Vocabulary

SEED = Path(__file__).resolve().parent.parent / "seed"


def test_seed_is_a_small_fp16_safetensors_model_folder():
    weights = SEED / "model.safetensors"
    assert weights.stat().st_size < 25 * 2**20
    assert not list(SEED.glob("*.bin"))
    model = Wav2Vec2ForCTC.from_pretrained(SEED, use_safetensors=True)
    assert 1e6 < model.num_parameters() < 12e6
    assert model.config.vocab_size == len(json.loads((SEED / "vocab.json").read_text(encoding="utf-8")))
    assert not needs_attention_mask(model.config)  # group-norm front-end: zero padding, no mask


def test_seed_vocabulary_covers_the_source_languages():
    vocab = Vocabulary.load(SEED)
    assert vocab.tokens[vocab.blank_id] == BLANK and WORD_DELIMITER in vocab.tokens
    letters = set(vocab.tokens)
    # German, Swedish/Finnish, Polish, Czech, Turkish and Catalan letters beside the Latin alphabet
    assert set("abcdefghijklmnopqrstuvwxyz") <= letters
    assert set("äöüßåąłżźśćńęčřšžůěğışçàèéíòóú") <= letters


def test_seed_transfers_to_a_target_vocabulary():
    target = Vocabulary.from_texts(["el niño come mañana", "ésta"])
    model, report = build_ctc_model(SEED, target)
    assert model.lm_head.out_features == len(target)
    assert report.random == 0  # every Spanish letter is in the seed or has its base letter there (ñ from n)
    seed_head = Wav2Vec2ForCTC.from_pretrained(SEED, use_safetensors=True).lm_head.weight.float()
    source = Vocabulary.load(SEED)
    row = target.tokens.index("a")
    assert torch.equal(model.lm_head.weight[row], seed_head[source.tokens.index("a")])


def test_seed_recognizes_synthetic_german(tmp_path):
    synth = pytest.importorskip("speechxfer.synth")
    if not synth.espeak_available():
        pytest.skip("espeak-ng is not installed")
    from speechxfer.audio import load_audio
    from speechxfer.scoring import score
    from speechxfer.text import TextNormalizer

    sentences = ["der hund läuft über die straße", "wir haben heute keine zeit für das spiel",
                 "meine schwester wohnt in einem kleinen haus"]
    corpus = synth.build_corpus("de", sentences, tmp_path, seed=3, jobs=1, dev_fraction=0, test_fraction=0)
    vocab = Vocabulary.load(SEED)
    model = Wav2Vec2ForCTC.from_pretrained(SEED, use_safetensors=True, dtype=torch.float32).eval()
    normalize = TextNormalizer()
    refs, hyps = {}, {}
    for utterance in corpus.splits["train"]:
        audio = torch.from_numpy(load_audio(utterance.audio_path))
        audio = (audio - audio.mean()) / (audio.std() + 1e-7)
        with torch.inference_mode():
            ids = model(audio[None]).logits.argmax(-1)[0].tolist()
        refs[utterance.id], hyps[utterance.id] = normalize(utterance.text), vocab.decode_ctc(ids)
    report = score(refs, hyps, bootstrap=0)
    assert report.cer < 0.3, (report.cer, hyps)  # the card's held-out German CER is 0.06


def test_the_seed_recipe_builds_the_shipped_architecture():
    import dataclasses

    from speechxfer.recipe import load_recipe
    from speechxfer.surgery import build_scratch_model

    recipe = load_recipe(SEED.parent / "recipes" / "seed" / "seed.yaml")
    built = build_scratch_model(recipe.model_config, Vocabulary.load(SEED),
                                config_overrides=dataclasses.asdict(recipe.model))
    shipped = Wav2Vec2ForCTC.from_pretrained(SEED, use_safetensors=True)
    assert {k: v.shape for k, v in built.state_dict().items()} == {k: v.shape for k, v in shipped.state_dict().items()}
    ours, theirs = built.config.to_dict(), shipped.config.to_dict()
    differing = {k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k)}
    assert differing <= {"architectures", "dtype", "_name_or_path", "transformers_version"}, differing


def test_train_seed_merges_languages_with_their_own_casing(tmp_path):
    import importlib.util

    from speechxfer.manifest import Utterance, load_manifest, write_manifest

    spec = importlib.util.spec_from_file_location("train_seed", SEED.parent / "scripts" / "train_seed.py")
    train_seed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_seed)
    for language in ("de", "tr"):
        for split in ("train", "dev", "test"):
            write_manifest(tmp_path / "data" / language / f"{split}.jsonl", [
                Utterance(id=f"{language}-{split}-{k}", audio_path=str(tmp_path / f"{k}.flac"),
                          text="Im Iğdır, dort!", duration_s=1.0) for k in range(3)])
    manifests = train_seed.write_manifests(tmp_path / "data", ["de", "tr"], tmp_path / "merged", dev_utterances=2)
    train = load_manifest(manifests["all"]["train"])
    assert [(u.language, u.text) for u in train] == [("de", "im iğdır dort")] * 3 + [("tr", "ım ığdır dort")] * 3
    assert len(load_manifest(manifests["all"]["dev"])) == 4  # the first 2 of each language
    assert [u.id for u in load_manifest(manifests["test"]["tr"])] == ["tr-test-0", "tr-test-1", "tr-test-2"]
