"""Parameter-efficient adaptation (recipe `adapt:`): MMS-style language adapters and LoRA, on tiny checkpoints.

What trains, the MMS folder layout that plain transformers loads with target_lang, two languages in one folder,
a LoRA run's merged model against the base plus the LoRA delta, and resuming both kinds of run."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from speechxfer import surgery, training
from speechxfer.audio import load_audio
from speechxfer.cli import main
from speechxfer.errors import InputError, RecipeError
from speechxfer.freezing import FreezeOptions, apply_freezing, parameter_table
from speechxfer.manifest import load_manifest, write_manifest
from speechxfer.recipe import load_recipe
from speechxfer.surgery import AdaptOptions, LoraOptions, build_ctc_model
from speechxfer.transcribe import Recognizer
from speechxfer.vocabulary import Vocabulary
from test_training import SOURCE_VOCAB, disk_full_at, train_until_second_evaluation, write_corpus, write_recipe
from tiny import make_tiny_checkpoint

pytest.importorskip("peft")  # the lora tests; the `test` extra installs it

ADAPTER = {"method": "adapter", "lang": "abc"}
LORA = {"method": "lora", "lora": {"rank": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj",
                                                                             "intermediate_dense"]}}
THAWED = {"feature_encoder": False}
# a LoRA run's freezing section with the conv encoder training after one head-only update
THAWED_LATER = {**THAWED, "head_only_updates": 1}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def other_language(tmp_path_factory, corpus) -> dict[str, Path]:
    """The same audio with texts in other letters (a b c -> d e f): a second language with its own vocabulary."""
    folder = tmp_path_factory.mktemp("other")
    manifests = {}
    for split, path in corpus.items():
        manifests[split] = folder / f"{split}.jsonl"
        write_manifest(manifests[split], [dataclasses.replace(u, text=u.text.translate(str.maketrans("ABC", "DEF")))
                                          for u in load_manifest(path)])
    return manifests


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny CTC checkpoint with a vocabulary, so that head rows transfer."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("base") / "ctc", arch="stable", ctc_vocab=SOURCE_VOCAB)


@pytest.fixture(scope="module")
def adapter_runs(tmp_path_factory, corpus, other_language, base):
    """Language "abc", then language "def" trained into the same folder; the folder as it was between them."""
    tmp = tmp_path_factory.mktemp("adapter")
    out = tmp / "out"
    first = load_recipe(write_recipe(tmp / "abc.yaml", base=base, manifests=corpus, output_dir=out, adapt=ADAPTER))
    training.train(first)
    between = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    second = load_recipe(write_recipe(tmp / "def.yaml", base=base, manifests=other_language, output_dir=out,
                                      adapt={**ADAPTER, "lang": "def"}))
    training.train(second)
    return first, second, between


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, corpus, base):
    tmp = tmp_path_factory.mktemp("lora")
    recipe = load_recipe(write_recipe(tmp / "recipe.yaml", base=base, manifests=corpus, output_dir=tmp / "out",
                                      adapt=LORA))
    return recipe, training.train(recipe)


@pytest.fixture(scope="module")
def lora_encoder_run(tmp_path_factory, corpus, base):
    """A LoRA run with freezing.feature_encoder: false, the encoder thawed after one head-only update."""
    tmp = tmp_path_factory.mktemp("lora-encoder")
    recipe = load_recipe(write_recipe(tmp / "recipe.yaml", base=base, manifests=corpus, output_dir=tmp / "out",
                                      adapt=LORA, freezing=THAWED_LATER))
    return recipe, training.train(recipe)


def test_adapter_training_changes_only_adapters_and_head(adapter_runs, base, tmp_path):
    from transformers import Wav2Vec2ForCTC

    first, _, between = adapter_runs
    source = load_file(base / "model.safetensors")
    for name, data in between.items():  # the folder after the first language
        (tmp_path / name).write_bytes(data)
    trained = Wav2Vec2ForCTC.from_pretrained(tmp_path, target_lang="abc").state_dict()
    vocab = Vocabulary.load(tmp_path, target_lang="abc")
    initial, _ = build_ctc_model(first.base, vocab, config_overrides=vars(first.model), seed=first.train.seed,
                                 adapt=first.adapt)
    initial = initial.state_dict()
    assert trained.keys() == initial.keys()
    changed = {k for k in trained if not torch.equal(trained[k], initial[k])}
    adapters = {k for k in trained if ".adapter_layer." in k}
    assert adapters and changed <= adapters | {"lm_head.weight", "lm_head.bias"}
    assert "lm_head.weight" in changed and any(".adapter_layer.linear_" in k for k in changed)
    # every weight of the base but its head is in the folder as it was
    backbone = [k for k in source if not k.startswith("lm_head.")]
    assert all(torch.equal(source[k], trained[k]) for k in backbone)


def test_the_table_at_start_counts_only_adapters_and_head_as_trainable(base):
    vocab = Vocabulary.from_texts(["ab c"])
    model, report = build_ctc_model(base, vocab, adapt=AdaptOptions(method="adapter", lang="x"))
    assert report.shared == len(vocab)  # the head's rows still come from the source head's
    apply_freezing(model, FreezeOptions(), update=0, method="adapter")
    expected = sum(p.numel() for n, p in model.named_parameters() if ".adapter_layer." in n or n.startswith("lm_head"))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    total = parameter_table(model).splitlines()[-1].split()
    assert int(total[1].replace(",", "")) == expected


def test_the_adapter_folder_loads_with_target_lang_and_gives_speechxfers_logits(adapter_runs, corpus):
    from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

    _, second, _ = adapter_runs
    out = Path(second.output_dir)
    assert {p.name for p in out.glob("adapter.*.safetensors")} == {"adapter.abc.safetensors",
                                                                  "adapter.def.safetensors"}
    audio = load_audio(Path(corpus["test"]).parent / "audio" / "u8.wav")
    for lang in ("abc", "def"):
        model = Wav2Vec2ForCTC.from_pretrained(out, target_lang=lang).eval()
        inputs = Wav2Vec2FeatureExtractor.from_pretrained(out)(audio, sampling_rate=16000, return_tensors="pt")
        with torch.no_grad():
            theirs = model(inputs.input_values, attention_mask=inputs.attention_mask).logits.log_softmax(-1)
        recognizer = Recognizer(out, device="cpu", lang=lang)
        ours, frames = recognizer.log_probs([audio])
        assert ours.shape == theirs.shape and int(frames[0]) == theirs.shape[1]
        assert torch.allclose(ours, theirs, atol=1e-4)
    # the folder as it is, without target_lang: the last trained language, through transformers' own pipeline
    from transformers import pipeline

    text = pipeline("automatic-speech-recognition", model=str(out), device="cpu")(audio)["text"]
    recognizer = Recognizer(out, device="cpu", lang="def")
    ours, _ = recognizer.log_probs([audio])
    assert text.split() == recognizer.vocabulary.decode_ctc(ours[0].argmax(-1).tolist()).split()


def test_two_languages_in_one_folder_each_transcribe_with_their_own_vocabulary(adapter_runs, corpus, capsys,
                                                                             tmp_path):
    first, second, between = adapter_runs
    out = Path(second.output_dir)
    assert (out / "adapter.abc.safetensors").read_bytes() == between["adapter.abc.safetensors"]
    vocabularies = json.loads((out / "vocab.json").read_text())
    assert sorted(vocabularies) == ["abc", "def"]
    assert json.loads((out / "tokenizer_config.json").read_text())["target_lang"] == "def"  # the last trained
    for lang, letters in (("abc", "abc"), ("def", "def")):
        recognizer = Recognizer(out, device="cpu", lang=lang)
        assert set(letters) <= set(recognizer.vocabulary.tokens)
        assert not (set("abcdef") - set(letters)) & set(recognizer.vocabulary.tokens)
        assert recognizer.model.config.vocab_size == len(recognizer.vocabulary)
        assert (out / lang / "recipe.yaml").is_file() and (out / lang / "last" / "training_state.pt").is_file()
    # each run kept its own metrics and test report
    assert all((out / lang / "test_report.json").is_file() for lang in ("abc", "def"))

    # the CLI decodes each language's output with that language's vocabulary
    audio = Path(corpus["test"]).parent / "audio" / "u8.wav"
    texts = {}
    for lang in ("abc", "def"):
        assert main(["transcribe", str(out), str(audio), "--lang", lang, "--device", "cpu"]) == 0
        texts[lang] = capsys.readouterr().out.split("\t", 1)[1].strip()
        recognizer = Recognizer(out, device="cpu", lang=lang)
        log_probs, _ = recognizer.log_probs([load_audio(audio)])
        assert texts[lang] == recognizer.vocabulary.decode_ctc(log_probs[0].argmax(-1).tolist()).strip()
    # evaluate scores each language against its own run's test set, normalized by that run's recipe
    from speechxfer.evaluate import model_normalization

    assert model_normalization(out, lang="abc") == str(out / "abc" / "recipe.yaml")
    for lang, recipe in (("abc", first), ("def", second)):
        assert main(["evaluate", str(out), recipe.data.test, "--lang", lang, "--device", "cpu",
                     "--output-dir", str(tmp_path / lang)]) == 0
        hypotheses = (tmp_path / lang / "hypotheses.jsonl").read_text()
        assert hypotheses.count("\n") == 2
    capsys.readouterr()
    assert main(["transcribe", str(out), str(audio), "--lang", "xyz", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "xyz" in err and "abc, def" in err


def test_a_full_run_is_refused_in_a_folder_of_adapters(adapter_runs, corpus, tmp_path):
    first, _, _ = adapter_runs
    recipe = load_recipe(write_recipe(tmp_path / "full.yaml", base=Path(first.base), manifests=corpus,
                                      output_dir=Path(first.output_dir)))
    with pytest.raises(InputError, match="language adapters"):
        training.train(recipe)


def test_an_adapter_over_another_base_is_refused(adapter_runs, corpus, tmp_path):
    first, _, _ = adapter_runs
    other = make_tiny_checkpoint(tmp_path / "other", arch="stable", ctc_vocab=SOURCE_VOCAB, seed=1)
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", base=other, manifests=corpus,
                                      output_dir=Path(first.output_dir), adapt={**ADAPTER, "lang": "ghi"}))
    with pytest.raises(InputError, match="another base model"):
        training.train(recipe)
    assert not (Path(first.output_dir) / "adapter.ghi.safetensors").exists()


@pytest.mark.parametrize("method", [{"method": "adapter", "lang": "new"}, {"method": "full"},
                                    {"method": "lora", "lora": LoraOptions(target_modules=("q_proj",))}],
                         ids=["adapter", "full", "lora"])
def test_an_mms_base_starts_from_the_adapter_and_head_rows_of_init_lang(adapter_runs, tmp_path, method):
    """The folder of two languages is an MMS-like base: a run starting from "def" starts from def's adapter, and
    the new head's rows come from def's head, whatever trains."""
    _, second, _ = adapter_runs
    mms = Path(second.output_dir)
    vocab = Vocabulary.from_texts(["de fd"])
    model, report = build_ctc_model(mms, vocab, adapt=AdaptOptions(**method, init_lang="def"))
    assert report.shared == len(vocab)
    source = load_file(mms / "adapter.def.safetensors")
    own = model.state_dict()
    adapters = [k for k in source if ".adapter_layer." in k]
    assert adapters and all(torch.equal(source[k], own[k]) for k in adapters)
    source_vocab = json.loads((mms / "vocab.json").read_text())["def"]
    assert torch.equal(own["lm_head.weight"][vocab.tokens.index("e")], source["lm_head.weight"][source_vocab["e"]])
    with pytest.raises(InputError, match="no adapter for language 'zzz' in this model folder"):
        build_ctc_model(mms, vocab, adapt=AdaptOptions(**method, init_lang="zzz"))


def test_a_lora_runs_merged_model_is_the_base_plus_the_lora_delta(lora_run, base):
    from peft import PeftModel
    from transformers import Wav2Vec2ForCTC

    recipe, _ = lora_run
    out = Path(recipe.output_dir)
    merged = load_file(out / "model.safetensors")
    source = load_file(base / "model.safetensors")
    lora = load_file(out / "lora" / "adapter_model.safetensors")
    config = json.loads((out / "lora" / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    assert not any("lora" in k or "base_layer" in k for k in merged)  # a plain model folder
    from transformers import pipeline

    pipeline("automatic-speech-recognition", model=str(out), device="cpu")
    wrapped = {k.removeprefix("base_model.model.").removesuffix(".lora_A.weight") for k in lora if "lora_A" in k}
    assert len(wrapped) == 3 * 2  # q_proj, v_proj and intermediate_dense of 2 layers
    changed_by_lora = 0
    for key, value in merged.items():
        module = key.removesuffix(".weight")
        if module in wrapped:
            a = lora[f"base_model.model.{module}.lora_A.weight"]
            b = lora[f"base_model.model.{module}.lora_B.weight"]
            assert torch.allclose(value, source[key] + scale * b @ a, atol=1e-6)
            changed_by_lora += not torch.equal(value, source[key])
        elif key in source and not key.startswith("lm_head."):
            assert torch.equal(value, source[key]), key
    assert set(merged) - set(source) == {"wav2vec2.masked_spec_embed"}  # SpecAugment's, which the base lacks
    assert changed_by_lora == len(wrapped)  # B left zero would make the test pass without training
    assert config["modules_to_save"] == ["lm_head"]  # the encoder stayed frozen: lora/ has none of it
    assert not any(".feature_extractor." in k for k in lora)

    # peft itself puts the saved LoRA weights onto the base and merges them into the same model
    vocab = Vocabulary.load(out)
    base_model = Wav2Vec2ForCTC.from_pretrained(base, vocab_size=len(vocab), ignore_mismatched_sizes=True)
    peft_merged = PeftModel.from_pretrained(base_model, out / "lora").merge_and_unload().state_dict()
    assert set(merged) - set(peft_merged) == {"wav2vec2.masked_spec_embed"}
    assert all(torch.allclose(peft_merged[k], merged[k], atol=1e-6) for k in peft_merged)


def test_a_lora_run_with_the_encoder_thawed_trains_the_encoder_lora_and_head_alone(lora_encoder_run, base):
    """The merged model is the base plus the LoRA delta everywhere but the encoder and head, bit for bit where LoRA
    wraps nothing (feature projection, layers' other weights, norms); the encoder is the trained one, in lora/ too."""
    recipe, _ = lora_encoder_run
    out = Path(recipe.output_dir)
    merged = load_file(out / "model.safetensors")
    source = load_file(base / "model.safetensors")
    lora = {k.removeprefix("base_model.model."): v for k, v in load_file(out / "lora" / "adapter_model.safetensors")
            .items()}
    config = json.loads((out / "lora" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["lm_head", "wav2vec2.feature_extractor"]
    scale = config["lora_alpha"] / config["r"]
    wrapped = {k.removesuffix(".lora_A.weight") for k in lora if "lora_A" in k}
    encoder = {k for k in merged if k.startswith("wav2vec2.feature_extractor.")}
    assert encoder and encoder == {k for k in lora if k.startswith("wav2vec2.feature_extractor.")}
    changed = set()
    for key, value in merged.items():
        module = key.removesuffix(".weight")
        if key in encoder:
            assert torch.equal(value, lora[key]), key  # lora/ holds the trained encoder
        elif module in wrapped:
            assert torch.allclose(value, source[key] + scale * lora[f"{module}.lora_B.weight"]
                                  @ lora[f"{module}.lora_A.weight"], atol=1e-6), key
        elif key in source and not key.startswith("lm_head."):
            assert torch.equal(value, source[key]), key
        if key in source and not torch.equal(value, source[key]):
            changed.add(key)
    assert set(merged) - set(source) == {"wav2vec2.masked_spec_embed"}
    assert changed & encoder, "the encoder did not train"
    assert {f"{m}.weight" for m in wrapped} <= changed and "lm_head.weight" in changed
    assert changed <= encoder | {f"{m}.weight" for m in wrapped} | {"lm_head.weight", "lm_head.bias"}


def test_under_lora_the_thawed_encoder_waits_for_head_only_updates(base):
    vocab = Vocabulary.from_texts(["ab c"])
    model, _ = build_ctc_model(base, vocab, adapt=AdaptOptions(method="lora", lora=LoraOptions(**LORA["lora"])))
    options = FreezeOptions(**THAWED_LATER)

    def trainable() -> set[str]:
        return {n for n, p in model.named_parameters() if p.requires_grad}

    apply_freezing(model, options, update=0, method="lora")
    assert trainable() == {"lm_head.weight", "lm_head.bias"}
    assert apply_freezing(model, options, update=1, method="lora")
    encoder = {n for n, _ in model.named_parameters() if n.startswith("wav2vec2.feature_extractor.")}
    lora = {n for n, _ in model.named_parameters() if ".lora_" in n}
    assert encoder and lora and trainable() == encoder | lora | {"lm_head.weight", "lm_head.bias"}
    apply_freezing(model, FreezeOptions(), update=1, method="lora")  # the default: the encoder stays frozen
    assert trainable() == lora | {"lm_head.weight", "lm_head.bias"}


def test_lora_weights_whose_encoder_does_not_fit_are_one_line_naming_the_file(lora_encoder_run, base, tmp_path):
    from safetensors.torch import save_file

    recipe, _ = lora_encoder_run
    vocab = Vocabulary.load(recipe.output_dir)
    model, _ = build_ctc_model(base, vocab, adapt=recipe.adapt)
    surgery.load_lora_weights(model, recipe.output_dir)  # fits: the trained encoder is loaded
    trained = load_file(Path(recipe.output_dir) / "model.safetensors")
    key = "wav2vec2.feature_extractor.conv_layers.0.conv.weight"
    assert torch.equal(model.state_dict()[key], trained[key])
    weights = load_file(Path(recipe.output_dir) / "lora" / "adapter_model.safetensors")
    weights[f"base_model.model.{key}"] = weights[f"base_model.model.{key}"][:, :, :1].contiguous()
    (tmp_path / "lora").mkdir()
    save_file(weights, tmp_path / "lora" / "adapter_model.safetensors")
    with pytest.raises(InputError, match="the LoRA weights do not fit this recipe's model: size mismatch for "
                                         "conv_layers.0.conv.weight") as err:
        surgery.load_lora_weights(model, tmp_path)
    assert str(err.value).startswith(f"{tmp_path / 'lora' / 'adapter_model.safetensors'}: ")
    assert "\n" not in str(err.value)


def test_peft_loads_lora_with_the_trained_encoder_onto_the_base_and_gives_the_merged_models_logits(
        lora_encoder_run, base, corpus):
    from peft import PeftModel
    from transformers import Wav2Vec2ForCTC

    recipe, _ = lora_encoder_run
    out = Path(recipe.output_dir)
    vocab = Vocabulary.load(out)
    base_model = Wav2Vec2ForCTC.from_pretrained(base, vocab_size=len(vocab), ignore_mismatched_sizes=True)
    peft_model = PeftModel.from_pretrained(base_model, out / "lora").eval()
    merged = Wav2Vec2ForCTC.from_pretrained(out).eval()
    audio = torch.from_numpy(load_audio(load_manifest(corpus["test"])[0].audio_path))[None]
    with torch.no_grad():
        expected = merged(audio).logits
        got = peft_model(input_values=audio).logits
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-5)
    # without the encoder lora/ would give other logits: the test sees the encoder
    plain = Wav2Vec2ForCTC.from_pretrained(base, vocab_size=len(vocab), ignore_mismatched_sizes=True).eval()
    with torch.no_grad():
        plain_encoder = plain.wav2vec2.feature_extractor(audio)
        merged_encoder = merged.wav2vec2.feature_extractor(audio)
    assert not torch.allclose(plain_encoder, merged_encoder, atol=1e-5)


@pytest.mark.parametrize("adapt, freezing", [(ADAPTER, {}), (LORA, {}), (LORA, THAWED_LATER)],
                         ids=["adapter", "lora", "lora-encoder"])
def test_a_resumed_run_reaches_the_uninterrupted_state(tmp_path, corpus, base, adapt, freezing, adapter_runs,
                                                       lora_run, lora_encoder_run, monkeypatch):
    straight = adapter_runs[0] if adapt is ADAPTER else lora_encoder_run[0] if freezing else lora_run[0]
    recipe = load_recipe(write_recipe(tmp_path / "recipe.yaml", base=base, manifests=corpus,
                                      output_dir=tmp_path / "out", adapt=adapt, freezing=freezing))
    train_until_second_evaluation(recipe, monkeypatch)
    result = training.train(recipe, resume=True)
    assert result.updates == 4
    last = Path(recipe.run_dir) / "last"
    straight_last = Path(straight.run_dir) / "last"
    names = ["model.safetensors"] + (["lora/adapter_model.safetensors"] if adapt is LORA else [])
    for name in names:
        a, b = load_file(straight_last / name), load_file(last / name)
        assert a.keys() == b.keys()
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6, name
    Recognizer(recipe.output_dir, device="cpu", lang=recipe.adapt.lang)  # the output folder loads


@pytest.mark.parametrize("adapt", [ADAPTER, LORA], ids=["adapter", "lora"])
def test_a_full_disk_at_the_adapter_or_lora_file_is_one_line_and_resume_continues(tmp_path, corpus, base, adapt,
                                                                                  adapter_runs, lora_run, monkeypatch,
                                                                                  capsys):
    """surgery's own save_file (adapter.<lang>.safetensors, lora/adapter_model.safetensors) fails at the second
    checkpoint: one line naming last/, which keeps update 2, and --resume reaches the uninterrupted state."""
    straight = adapter_runs[0] if adapt is ADAPTER else lora_run[0]
    recipe_file = write_recipe(tmp_path / "recipe.yaml", base=base, manifests=corpus, output_dir=tmp_path / "out",
                               adapt=adapt)
    last = Path(load_recipe(recipe_file).run_dir) / "last"
    disk_full_at(monkeypatch, surgery, "save_file", folder=training.LAST_STAGING, call=2, error="safetensors")
    assert main(["train", str(recipe_file)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith(f"speechxfer train: error: {last}: cannot save the checkpoint of update 4: "
                                           "No space left on device; what was saved before is kept")
    assert torch.load(last / "training_state.pt", weights_only=True)["state"]["update"] == 2
    monkeypatch.undo()
    assert main(["train", str(recipe_file), "--resume"]) == 0
    name = "lora/adapter_model.safetensors" if adapt is LORA else f"adapter.{adapt['lang']}.safetensors"
    a, b = load_file(Path(straight.run_dir) / "last" / name), load_file(last / name)
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


@pytest.mark.parametrize("adapt, message", [
    ({"method": "adapter"}, "adapt.method adapter needs adapt.lang"),
    ({"lang": "swh"}, "adapt.lang is used only with adapt.method adapter"),
    ({"method": "prefix"}, "adapt.method"),
    ({"method": "adapter", "lang": "a/b"}, "adapt.lang must be a language code"),
    ({"method": "lora", "lora": {"rank": 0}}, "adapt.lora.rank must be >= 1"),
])
def test_bad_adapt_sections_name_the_key(tmp_path, corpus, base, adapt, message):
    path = write_recipe(tmp_path / "recipe.yaml", base=base, manifests=corpus, output_dir=tmp_path / "out",
                        adapt=adapt)
    with pytest.raises(RecipeError, match=message):
        load_recipe(path)


def test_a_thawed_encoder_is_refused_with_adapters(tmp_path, corpus, base, capsys):
    """An adapter folder's base weights are shared by every language's adapter: the encoder cannot train there."""
    path = write_recipe(tmp_path / "recipe.yaml", base=base, manifests=corpus, output_dir=tmp_path / "out",
                        adapt=ADAPTER, freezing=THAWED)
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == (f"speechxfer train: error: {path}: freezing.feature_encoder: false cannot train with adapt.method "
                   "adapter (the base weights are shared by every language's adapter); set "
                   "freezing.feature_encoder: true or use adapt.method lora\n")
    assert not (tmp_path / "out").exists()


def test_an_unknown_lora_target_is_one_line(base):
    with pytest.raises(InputError, match="adapt.lora.target_modules"):
        build_ctc_model(base, Vocabulary.from_texts(["ab"]),
                        adapt=AdaptOptions(method="lora", lora=LoraOptions(target_modules=("no_such_proj",))))
