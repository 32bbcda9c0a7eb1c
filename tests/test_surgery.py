"""Model surgery on tiny random checkpoints of both architectures: head size, vocabulary transfer, the model folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import soundfile as sf
import torch
from transformers import HubertConfig, HubertModel, Wav2Vec2ForCTC, Wav2Vec2Model, pipeline

from speechxfer import surgery
from speechxfer.errors import InputError
from speechxfer.surgery import build_ctc_model, needs_attention_mask, save_model_folder
from speechxfer.vocabulary import Vocabulary
from tiny import make_tiny_checkpoint, write_tone

ARCHS = ("stable", "base")
# A source CTC vocabulary in the HF convention: "[PAD]" blank at 0, "|" delimiter, upper-case "B" only.
SOURCE_TOKENS = ["[PAD]", "[UNK]", "|", "a", "B", "e", "h", "s", "z", "'"]
# Target: shared a e '; é→e by NFD; b→B by case; ж→z+h, ß→s+s transliterated; ł (anyascii "l", absent) and q random.
TARGET = Vocabulary.from_texts(["a b é ł ж ß q 'e"])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    return {(arch, kind): make_tiny_checkpoint(root / f"{arch}-{kind}", arch=arch,
                                               ctc_vocab=SOURCE_TOKENS if kind == "ctc" else None)
            for arch in ARCHS for kind in ("ssl", "ctc")}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["ssl", "ctc"])
def test_head_is_sized_from_the_vocabulary(checkpoints, arch, kind):
    model, report = build_ctc_model(checkpoints[arch, kind], TARGET)
    assert model.lm_head.out_features == len(TARGET) == model.config.vocab_size
    assert model.config.pad_token_id == TARGET.blank_id
    assert model.config.ctc_zero_infinity is True
    assert model.config.ctc_loss_reduction == "mean"
    assert model.dtype == torch.float32
    logits = model(torch.randn(1, 4000)).logits
    assert logits.shape[-1] == len(TARGET)
    assert report.shared + report.base_letter + report.transliterated + report.random == len(TARGET)
    if kind == "ssl":
        assert (report.random, report.source_vocab_size, report.sources) == (len(TARGET), 0, {})
        assert "randomly initialised" in str(report)


@pytest.mark.parametrize("arch", ARCHS)
def test_backbone_weights_come_from_the_source(checkpoints, arch):
    source = Wav2Vec2ForCTC.from_pretrained(checkpoints[arch, "ctc"], use_safetensors=True)
    model, _ = build_ctc_model(checkpoints[arch, "ssl"], TARGET)
    ssl_source = Wav2Vec2Model.from_pretrained(checkpoints[arch, "ssl"], use_safetensors=True)
    for name, tensor in ssl_source.state_dict().items():
        assert torch.equal(model.wav2vec2.state_dict()[name], tensor), name
    model, _ = build_ctc_model(checkpoints[arch, "ctc"], TARGET)
    for name, tensor in source.wav2vec2.state_dict().items():
        assert torch.equal(model.wav2vec2.state_dict()[name], tensor), name


def test_transferred_rows_equal_the_source_rows(checkpoints):
    source = Wav2Vec2ForCTC.from_pretrained(checkpoints["stable", "ctc"], use_safetensors=True).lm_head
    model, report = build_ctc_model(checkpoints["stable", "ctc"], TARGET)
    src = {t: i for i, t in enumerate(SOURCE_TOKENS)}

    def expect(target: str, *source_tokens: str) -> None:
        row = TARGET.tokens.index(target)
        ids = [src[t] for t in source_tokens]
        assert torch.allclose(model.lm_head.weight[row], source.weight[ids].mean(0)), target
        assert torch.allclose(model.lm_head.bias[row], source.bias[ids].mean()), target

    for token in ("[PAD]", "[UNK]", "|", "a", "e", "'"):
        expect(token, token)
    expect("é", "e")
    expect("b", "B")
    expect("ж", "z", "h")
    expect("ß", "s", "s")
    assert (report.shared, report.base_letter, report.transliterated, report.random) == (6, 2, 2, 2)
    assert report.sources["é"] == "e" and report.sources["ж"] == "z+h" and "q" not in report.sources
    assert report.source_vocab_size == len(SOURCE_TOKENS)
    assert "6 shared, 2 from base letters, 2 transliterated, 2 random" in str(report)
    # ł has no NFD decomposition: anyascii gives "l", which the source lacks, so it stays random like q.
    assert report.sources.get("ł") is None


def test_mms_style_special_tokens_map_onto_ours(tmp_path):
    tokens = ["<pad>", "<s>", "</s>", "<unk>", "|", "a", "e"]
    folder = make_tiny_checkpoint(tmp_path / "mms", arch="stable", ctc_vocab=tokens)
    source = Wav2Vec2ForCTC.from_pretrained(folder, use_safetensors=True).lm_head
    model, report = build_ctc_model(folder, Vocabulary.from_texts(["ae"]))
    assert report.sources == {"[PAD]": "<pad>", "[UNK]": "<unk>", "|": "|", "a": "a", "e": "e"}
    assert torch.equal(model.lm_head.weight[0], source.weight[0])
    assert torch.equal(model.lm_head.weight[1], source.weight[3])


def test_multilingual_vocab_json_uses_the_language_of_the_stored_head(tmp_path):
    folder = make_tiny_checkpoint(tmp_path / "mms", arch="base", ctc_vocab=["<pad>", "<unk>", "|", "x", "y"])
    per_language = {"fra": {"<pad>": 0, "<unk>": 1, "|": 2, "a": 3}, "eng": {"<pad>": 0, "<unk>": 1, "|": 2, "x": 3,
                                                                           "y": 4}}
    (folder / "vocab.json").write_text(json.dumps(per_language))
    _, report = build_ctc_model(folder, Vocabulary.from_texts(["xa"]))
    assert report.sources == {"[PAD]": "<pad>", "[UNK]": "<unk>", "|": "|", "x": "x"}


def test_random_rows_follow_the_seed_and_leave_the_global_rng_alone(checkpoints):
    folder = checkpoints["base", "ctc"]
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    first, _ = build_ctc_model(folder, TARGET, seed=1)
    assert torch.equal(torch.rand(3), expected_draw)
    again, _ = build_ctc_model(folder, TARGET, seed=1)
    other, _ = build_ctc_model(folder, TARGET, seed=2)
    q = TARGET.tokens.index("q")
    a = TARGET.tokens.index("a")
    assert torch.equal(first.lm_head.weight, again.lm_head.weight)
    assert not torch.equal(first.lm_head.weight[q], other.lm_head.weight[q])
    assert torch.equal(first.lm_head.weight[a], other.lm_head.weight[a])


def test_config_overrides(checkpoints):
    model, _ = build_ctc_model(checkpoints["stable", "ssl"], TARGET,
                               config_overrides={"mask_time_prob": 0.05, "layerdrop": 0.1, "hidden_dropout": 0.2})
    assert (model.config.mask_time_prob, model.config.layerdrop, model.config.hidden_dropout) == (0.05, 0.1, 0.2)
    assert model.wav2vec2.masked_spec_embed is not None  # masking needs the learned mask vector
    with pytest.raises(InputError, match="unknown wav2vec2 config option 'mask_prob'"):
        build_ctc_model(checkpoints["stable", "ssl"], TARGET, config_overrides={"mask_prob": 0.05})
    with pytest.raises(InputError, match="computed from the vocabulary"):
        build_ctc_model(checkpoints["stable", "ssl"], TARGET, config_overrides={"vocab_size": 40})


@pytest.mark.parametrize("arch,expected", [("stable", True), ("base", False)])
def test_attention_mask_rule(checkpoints, tmp_path, arch, expected):
    model, _ = build_ctc_model(checkpoints[arch, "ssl"], TARGET)
    assert needs_attention_mask(model.config) is expected
    save_model_folder(tmp_path / "out", model, TARGET)
    saved = json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())
    assert saved["return_attention_mask"] is expected
    assert (saved["sampling_rate"], saved["do_normalize"]) == (16000, True)


@pytest.mark.parametrize("arch", ARCHS)
def test_saved_folder_transcribes_with_the_transformers_pipeline(checkpoints, tmp_path, arch):
    model, _ = build_ctc_model(checkpoints[arch, "ctc"], TARGET)
    out = tmp_path / "model"
    save_model_folder(out, model, TARGET)
    assert {"config.json", "model.safetensors", "vocab.json", "tokenizer_config.json",
            "preprocessor_config.json"} <= {p.name for p in out.iterdir()}
    tone = write_tone(tmp_path / "tone.wav", duration_s=1.0)
    audio, rate = sf.read(tone, dtype="float32")
    asr = pipeline("automatic-speech-recognition", model=str(out), device="cpu")
    text = asr({"raw": audio, "sampling_rate": rate})["text"]
    assert isinstance(text, str)
    # Same emissions as our model: the greedy path decoded by our vocabulary equals the pipeline's text.
    inputs = asr.feature_extractor(audio, sampling_rate=rate, return_tensors="pt")
    with torch.no_grad():
        ids = model.eval()(inputs.input_values).logits.argmax(-1)[0]
    assert text.replace("[UNK]", "") == TARGET.decode_ctc(ids.tolist()).replace("[UNK]", "")
    reloaded = Wav2Vec2ForCTC.from_pretrained(out, use_safetensors=True)
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)


def test_saving_over_a_folder_replaces_the_model_and_keeps_other_files(checkpoints, tmp_path):
    out = tmp_path / "model"
    first, _ = build_ctc_model(checkpoints["stable", "ssl"], TARGET, seed=1)
    save_model_folder(out, first, TARGET)
    (out / "metrics.jsonl").write_text("{}\n")
    (out / "last").mkdir()
    (out / "added_tokens.json").write_text("{}")  # stale tokenizer file from an older save: must not survive
    second, _ = build_ctc_model(checkpoints["stable", "ssl"], Vocabulary.from_texts(["xyz"]), seed=2)
    save_model_folder(out, second, Vocabulary.from_texts(["xyz"]))
    assert (out / "metrics.jsonl").read_text() == "{}\n" and (out / "last").is_dir()
    assert not (out / "added_tokens.json").exists()
    assert Vocabulary.load(out).tokens == Vocabulary.from_texts(["xyz"]).tokens
    assert Wav2Vec2ForCTC.from_pretrained(out, use_safetensors=True).config.vocab_size == 6
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no staging or retired folders left behind


@pytest.mark.parametrize("error", ["safetensors", "oserror", "bug"])
def test_a_save_the_file_system_refuses_is_one_line_naming_the_folder_which_keeps_its_model(checkpoints, tmp_path,
                                                                                            monkeypatch, error):
    """The weights of a second save into a model folder cannot be written (a full disk, as safetensors and as the OS
    report it): a WriteError naming the folder, the first model's files as they were, nothing half written beside
    them. An error that is no refused write (a bug) stays itself, and leaves nothing half written either."""
    import errno
    import os

    import transformers.modeling_utils
    from safetensors import SafetensorError

    from speechxfer.errors import WriteError

    out = tmp_path / "model"
    first, _ = build_ctc_model(checkpoints["stable", "ssl"], TARGET, seed=1)
    save_model_folder(out, first, TARGET)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    second, _ = build_ctc_model(checkpoints["stable", "ssl"], TARGET, seed=2)

    def disk_full(tensors, filename, *args, **kwargs):
        if error == "safetensors":
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28) at "
                                  f'path "{Path(filename).parent}/.tmp5XQz1a"')
        if error == "oserror":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        raise ValueError("a bug")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", disk_full)
    if error == "bug":
        with pytest.raises(ValueError, match="a bug"):
            save_model_folder(out, second, TARGET)
    else:
        with pytest.raises(WriteError) as caught:
            save_model_folder(out, second, TARGET)
        assert str(caught.value) == (f"{out}: cannot save the model: No space left on device; the folder keeps what "
                                     "it held")
        assert caught.value.reason == "No space left on device"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_bad_sources_raise_input_errors(tmp_path, checkpoints):
    with pytest.raises(InputError, match="no such model folder"):
        build_ctc_model(tmp_path / "missing", TARGET)
    with pytest.raises(InputError, match="not a file"):
        build_ctc_model(write_tone(tmp_path / "a.wav"), TARGET)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="config.json"):
        build_ctc_model(tmp_path / "empty", TARGET)
    broken = tmp_path / "broken"  # config.json not JSON: the file and line, the folder named once
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "wav2vec2",\n "hidden_size": }\n')
    with pytest.raises(InputError) as err:
        build_ctc_model(broken, TARGET)
    assert str(err.value).startswith(f"{broken / 'config.json'}:2: not valid JSON: Expecting value")
    assert str(err.value).count(str(broken)) == 1

    HubertModel(HubertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                             conv_dim=(8,), conv_stride=(5,), conv_kernel=(10,))).save_pretrained(tmp_path / "hubert")
    with pytest.raises(InputError, match="'hubert' checkpoint, not wav2vec2"):
        build_ctc_model(tmp_path / "hubert", TARGET)

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((checkpoints["base", "ssl"] / "config.json").read_text())
    torch.save({}, pickled / "pytorch_model.bin")
    with pytest.raises(InputError, match="safetensors") as err:
        build_ctc_model(pickled, TARGET)
    assert str(pickled) in str(err.value)


def test_a_save_interrupted_after_its_commit_point_is_completed(checkpoints, tmp_path, monkeypatch):
    out = tmp_path / "model"
    first, _ = build_ctc_model(checkpoints["stable", "ssl"], TARGET, seed=1)
    save_model_folder(out, first, TARGET)
    (out / "added_tokens.json").write_text("{}")  # a stale file the next save must delete
    second, _ = build_ctc_model(checkpoints["stable", "ssl"], TARGET, seed=2)
    real_replace = surgery.os.replace
    moved = []

    def killed_after_the_first_move(src, dst):
        if Path(src).parent.name == surgery.MODEL_READY:
            if moved:
                raise KeyboardInterrupt
            moved.append(src)
        real_replace(src, dst)

    monkeypatch.setattr(surgery.os, "replace", killed_after_the_first_move)
    with pytest.raises(KeyboardInterrupt):
        save_model_folder(out, second, TARGET)
    monkeypatch.undo()
    assert (out / surgery.MODEL_READY).is_dir()  # half old, half new files at the top: not a usable model yet
    assert surgery.finish_model_folder(out) is True
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    assert not (out / "added_tokens.json").exists()
    reloaded = Wav2Vec2ForCTC.from_pretrained(out, use_safetensors=True)
    assert torch.equal(reloaded.lm_head.weight, second.lm_head.weight)
    assert surgery.finish_model_folder(out) is False


def test_a_bad_adapter_file_gets_one_message_from_training_and_from_transcribe(tmp_path):
    """surgery.load_adapter is the one adapter loader: building a model from an MMS-like base's init_lang and a
    Recognizer's lang report a missing or broken adapter file alike, naming the file."""
    from tiny import make_tiny_adapter_checkpoint

    from speechxfer.surgery import AdaptOptions
    from speechxfer.transcribe import Recognizer

    specials = ["<pad>", "<s>", "</s>", "<unk>", "|"]
    model = make_tiny_adapter_checkpoint(tmp_path / "mms", vocabularies={"eng": [*specials, *"abcd"],
                                                                        "spa": [*specials, *"abcdñ"]})
    vocab = Vocabulary.from_texts(["ab cd"])

    def messages(lang: str) -> list[str]:
        said = []
        for load in (lambda: build_ctc_model(model, vocab, adapt=AdaptOptions(init_lang=lang)),
                     lambda: Recognizer(model, device="cpu", lang=lang)):
            with pytest.raises(InputError) as caught:
                load()
            said.append(str(caught.value))
        return said

    (model / "adapter.spa.safetensors").write_bytes(b"not safetensors")
    broken = messages("spa")
    assert broken[0] == broken[1]
    assert broken[0].startswith(f"{model / 'adapter.spa.safetensors'}: cannot load the adapter for language 'spa': ")
    missing = messages("fra")
    assert missing[0] == missing[1] == (f"{model / 'adapter.fra.safetensors'}: no adapter for language 'fra' in this "
                                        "model folder (it has: eng, spa)")


@pytest.mark.parametrize("content, message", [("[1, 2]", "expected a JSON object, got list"),
                                              ('{"a": 0,\n  "b": }', "not valid JSON")])
def test_a_source_vocab_json_that_is_not_a_json_object_is_one_line_naming_it(tmp_path, content, message):
    source = make_tiny_checkpoint(tmp_path / "src", ctc_vocab=["[PAD]", "|", "a", "b"])
    (source / "vocab.json").write_text(content, encoding="utf-8")
    with pytest.raises(InputError, match=message) as caught:
        build_ctc_model(str(source), TARGET)
    assert str(caught.value).startswith(str(source / "vocab.json"))
