"""Shared helpers for tests: tiny generated audio and tiny random wav2vec2 checkpoints (not a test module)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile as sf


def write_tone(path, *, duration_s: float = 1.0, sample_rate_hz: int = 16000, frequency_hz: float = 440.0,
               channels: int = 1, seed: int = 0, subtype: str | None = None) -> Path:
    """Write a sine tone with a little noise; (samples, channels) for channels > 1."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(duration_s * sample_rate_hz))) / sample_rate_hz
    mono = 0.3 * np.sin(2 * np.pi * frequency_hz * t) + 0.01 * rng.standard_normal(t.shape)
    data = mono if channels == 1 else np.stack([mono * (1 + 0.1 * c) for c in range(channels)], axis=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, data.astype(np.float32), sample_rate_hz, subtype=subtype)
    return path


def digital_silence(path, *, duration_s: float, seed: int = 0) -> Path:
    """Zeros with +-1 LSB of quantization noise (about -92 dBFS) as 16 kHz 16-bit PCM, as Asterisk's silence/N.wav
    prompts hold."""
    samples = np.random.default_rng(seed).integers(-1, 2, round(duration_s * 16000)).astype(np.int16)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, samples, 16000, subtype="PCM_16")
    return path


def tiny_config(*, arch: str = "stable", vocab_size: int = 32, pad_token_id: int = 0):
    """A random wav2vec2 config of ~0.1 M parameters.

    arch "stable": XLS-R-like (layer-norm feature extractor, stable layer norm, takes an attention mask);
    arch "base": wav2vec2-base-like (group-norm feature extractor, no attention mask).
    """
    from transformers import Wav2Vec2Config

    stable = arch == "stable"
    return Wav2Vec2Config(
        vocab_size=vocab_size,
        pad_token_id=pad_token_id,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(16, 16, 16),
        conv_stride=(5, 4, 4),
        conv_kernel=(10, 4, 4),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        feat_extract_norm="layer" if stable else "group",
        do_stable_layer_norm=stable,
        feat_extract_activation="gelu",
        mask_time_prob=0.0,
        layerdrop=0.0,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        feat_proj_dropout=0.0,
        final_dropout=0.0,
    )


def make_tiny_checkpoint(directory, *, arch: str = "stable", ctc_vocab: list[str] | None = None, seed: int = 0) -> Path:
    """Save a tiny random checkpoint as a Hugging Face folder (safetensors).

    ctc_vocab None: self-supervised only (Wav2Vec2Model, like XLS-R).
    ctc_vocab given: Wav2Vec2ForCTC with that vocabulary (token id = index; index 0 is the blank "[PAD]"),
    plus vocab.json / tokenizer files, like an MMS or speechxfer model.
    """
    import torch
    from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC, Wav2Vec2Model

    torch.manual_seed(seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stable = arch == "stable"
    if ctc_vocab is None:
        model = Wav2Vec2Model(tiny_config(arch=arch))
    else:
        model = Wav2Vec2ForCTC(tiny_config(arch=arch, vocab_size=len(ctc_vocab), pad_token_id=0))
        (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(ctc_vocab)}, ensure_ascii=False))
        from transformers import Wav2Vec2CTCTokenizer

        Wav2Vec2CTCTokenizer(str(directory / "vocab.json"), unk_token="[UNK]", pad_token="[PAD]",
                             word_delimiter_token="|").save_pretrained(directory)
    model.save_pretrained(directory, safe_serialization=True)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                             return_attention_mask=stable).save_pretrained(directory)
    return directory


def make_tiny_adapter_checkpoint(directory, *, vocabularies: dict[str, list[str]], seed: int = 0) -> Path:
    """Save a tiny random MMS-style adapter model: Wav2Vec2ForCTC with attention adapters (adapter_attn_dim), one
    adapter.<lang>.safetensors per language (adapter layers and CTC head, saved as the MMS adapter fine-tuning
    guide does), vocab.json with one vocabulary per language (index 0 "<pad>" is the blank), and the first
    language's adapter also in model.safetensors."""
    import torch
    from safetensors.torch import save_file
    from transformers import Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

    torch.manual_seed(seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    first = next(iter(vocabularies.values()))
    config = tiny_config(vocab_size=len(first), pad_token_id=0)
    config.adapter_attn_dim = 8
    model = Wav2Vec2ForCTC(config)
    for language, tokens in reversed(vocabularies.items()):  # the first language's weights stay in the model
        model.lm_head = torch.nn.Linear(config.hidden_size, len(tokens))
        model.init_adapter_layers()
        weights = {name: param.detach().clone().contiguous() for name, param in model._get_adapters().items()}
        save_file(weights, directory / f"adapter.{language}.safetensors", metadata={"format": "pt"})
    model.save_pretrained(directory, safe_serialization=True)
    table = {language: {t: i for i, t in enumerate(tokens)} for language, tokens in vocabularies.items()}
    (directory / "vocab.json").write_text(json.dumps(table, ensure_ascii=False), encoding="utf-8")
    Wav2Vec2CTCTokenizer(str(directory / "vocab.json"), unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                         eos_token="</s>", word_delimiter_token="|",
                         target_lang=next(iter(vocabularies))).save_pretrained(directory)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                             return_attention_mask=True).save_pretrained(directory)
    return directory
