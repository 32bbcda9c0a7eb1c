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
