"""Filtering, dataset, collation, the duration-bucketed batch sampler and inference batches."""

from __future__ import annotations

import random
from functools import partial

import numpy as np
import pytest
import torch
from transformers import Wav2Vec2Model

from speechxfer.augment import AugmentOptions, NoiseOptions, SpeedOptions, TelephoneOptions, speed_factor
from speechxfer.batching import (REFORM_BATCHES, DurationBatchSampler, Examples, SpeechDataset, _cut_batches,
                                 _fill_greedily, collate, filter_utterances, frame_geometry, inference_batches,
                                 output_frames)
from speechxfer.manifest import Utterance, read_manifest_table, write_manifest
from speechxfer.surgery import build_ctc_model, needs_attention_mask
from speechxfer.text import TextNormalizer, TextOptions
from speechxfer.vocabulary import Vocabulary, encode_texts
from tiny import make_tiny_checkpoint, tiny_config, write_tone

VOCAB = Vocabulary.from_texts(["ab cd"])


@pytest.mark.parametrize("arch,adapter_layers", [("stable", 0), ("base", 0), ("stable", 2)])
def test_output_frames_equals_the_models_output_length(arch, adapter_layers):
    config = tiny_config(arch=arch)
    if adapter_layers:
        config.add_adapter, config.num_adapter_layers, config.output_hidden_size = True, adapter_layers, 32
    model = Wav2Vec2Model(config).eval()
    geometry = frame_geometry(config)
    # kernels (10, 4, 4), strides (5, 4, 4): frame t sees samples [80 t, 80 t + 85); each adapter layer halves
    assert (geometry.receptive_field, geometry.stride) == (85, 80 * 2 ** adapter_layers)
    edges = [geometry.receptive_field + k * geometry.stride + d for k in (0, 1, 2) for d in (0, 1, geometry.stride - 1)]
    for samples in [*edges, 1599, 1600, 16000, 23457]:
        with torch.no_grad():
            frames = model(torch.randn(1, samples)).last_hidden_state.shape[1]
        assert output_frames(config, samples) == geometry.frames(samples) == frames, samples
    assert output_frames(config, geometry.receptive_field - 1) == output_frames(config, 5) == 0
    with pytest.raises(RuntimeError):  # the model itself cannot take an input shorter than its receptive field
        model(torch.randn(1, geometry.receptive_field - 1))


def utterance(uid: str, text: str, duration_s: float, path: str = "/nowhere.wav", offset_s: float = 0.0):
    return Utterance(id=uid, audio_path=path, text=text, duration_s=duration_s, offset_s=offset_s)


def test_filter_utterances_drops_each_kind_with_counts():
    config = tiny_config()
    frames = output_frames(config, 1600)  # 0.1 s
    assert frames == 19
    normalizer = TextNormalizer(TextOptions(digits="reject"))
    utterances = [
        utterance("ok", "Ab, CD!", 1.0),
        utterance("short", "ab", 0.05),
        utterance("long", "ab", 30.0),
        utterance("digits", "ab 12", 1.0),
        utterance("empty", "?!", 1.0),
        utterance("fits", "ab" * 9 + "a", 0.1),  # 19 labels in 19 frames
        utterance("too-many", "ab" * 10, 0.1),  # 20 labels
        utterance("repeats-fit", "a" * 10, 0.1),  # 10 labels + 9 blanks between repeats = 19
        utterance("repeats-too-many", "a" * 11, 0.1),  # 11 + 10 = 21
    ]
    kept, report = filter_utterances(utterances, normalizer=normalizer, vocab=VOCAB, config=config,
                                     min_duration_s=0.08, max_duration_s=20.0)
    assert [u.id for u, _ in kept] == ["ok", "fits", "repeats-fit"]
    assert [labels.tolist() for _, labels in kept] == [VOCAB.encode(t) for t in ("ab cd", "ab" * 9 + "a", "a" * 10)]
    assert (report.too_short, report.too_long, report.rejected_text, report.label_too_long) == (1, 1, 2, 2)
    assert report.total == 6
    assert report.examples == ["short", "long", "digits", "empty", "too-many", "repeats-too-many"]
    assert "dropped 6 utterances" in str(report)


def test_filter_of_texts_encoded_once_keeps_and_drops_what_it_does_normalizing_them_itself():
    # train() encodes its texts once (the vocabulary is counted from them) and hands them to the filter
    config = tiny_config()
    normalizer = TextNormalizer(TextOptions(digits="reject"))
    texts = ["Ab, CD!", "ab", "ab 12", "?!", "ab" * 10, "a" * 10, "zz ab", "Cd"]
    utterances = [utterance(f"u{k}", text, 0.1 if k in (4, 5) else 0.05 if k == 1 else 1.0)
                  for k, text in enumerate(texts)]
    keep = partial(filter_utterances, normalizer=normalizer, vocab=VOCAB, config=config, min_duration_s=0.08,
                   max_duration_s=20.0)
    kept, report = keep(utterances)
    once, once_report = keep(utterances, encoded=encode_texts(texts, normalizer))
    assert once_report == report and (report.too_short, report.rejected_text, report.label_too_long) == (1, 2, 1)
    assert [(u.id, labels.tolist()) for u, labels in once] == [(u.id, labels.tolist()) for u, labels in kept]
    assert [u.id for u, _ in kept] == ["u0", "u5", "u6", "u7"] and kept[2][1].tolist() == VOCAB.encode("zz ab")
    with pytest.raises(ValueError, match="2 encoded texts for 8 utterances"):
        keep(utterances, encoded=encode_texts(texts[:2], normalizer))


@pytest.fixture
def audio_examples(tmp_path):
    one = write_tone(tmp_path / "one.wav", duration_s=0.5, seed=1)
    two = write_tone(tmp_path / "two.flac", duration_s=0.8, sample_rate_hz=22050, seed=2)
    long = write_tone(tmp_path / "long.wav", duration_s=3.0, seed=3)
    return [(utterance("one", "ab", 0.5, str(one)), VOCAB.encode("ab")),
            (utterance("two", "cd ab", 0.8, str(two)), VOCAB.encode("cd ab")),
            (utterance("seg", "d", 0.25, str(long), offset_s=1.0), VOCAB.encode("d"))]


def test_filter_of_a_table_keeps_what_filter_of_its_rows_keeps_and_examples_select_and_concat(tmp_path):
    config = tiny_config(arch="stable")
    texts = ["ab cd", "", "a" * 30, "dd", "ab", "cc cc", "abcd"]
    write_manifest(tmp_path / "m.jsonl", [utterance(f"u{k}", text or "  ", 0.05 + 0.1 * k, path=str(tmp_path / "a.wav"))
                                          for k, text in enumerate(texts)])
    table, _ = read_manifest_table(tmp_path / "m.jsonl")
    keep = partial(filter_utterances, normalizer=TextNormalizer(), vocab=VOCAB, config=config, min_duration_s=0.1,
                   max_duration_s=0.6)
    (from_table, report), (from_list, list_report) = keep(table), keep(list(table))
    assert isinstance(from_table, Examples) and report == list_report
    assert [(u, labels.tolist()) for u, labels in from_table] == [(u, labels.tolist()) for u, labels in from_list]
    assert [u.id for u, _ in from_table] == ["u3", "u4", "u5"]  # u0 too short, u1 empty, u2 too long a label
    assert (report.too_short, report.rejected_text, report.label_too_long, report.too_long) == (1, 0, 1, 1)
    assert from_table.durations_s.tolist() == [u.duration_s for u, _ in from_table]
    picked = from_table.select(np.array([True, False, True]))
    assert [(u.id, labels.tolist()) for u, labels in picked] == [("u3", VOCAB.encode("dd")),
                                                                 ("u5", VOCAB.encode("cc cc"))]
    both = Examples.concat([from_table, picked])
    assert [(u.id, u.line, labels.tolist()) for u, labels in both] == (
        [(u.id, u.line, labels.tolist()) for u, labels in [*from_table, *picked]])
    assert [u.id for u, _ in both[-2:]] == ["u3", "u5"] and not both[0][1].flags.writeable


def test_batches_cut_in_arrays_are_those_of_the_greedy_loop():
    def greedy(durations, order, max_batch_s):  # DurationBatchSampler's cut, one utterance at a time
        batches, batch, longest = [], [], 0.0
        for index in order:
            if batch and (len(batch) + 1) * max(longest, durations[index]) > max_batch_s:
                batches.append(batch)
                batch, longest = [], 0.0
            batch.append(index)
            longest = max(longest, durations[index])
        return batches + [batch] if batch else batches

    rng = np.random.default_rng(0)
    for size, max_batch_s in ((0, 10.0), (1, 10.0), (500, 10.0), (3000, 60.0), (2000, 2.0)):
        durations = np.round(rng.lognormal(0, 1, size), 2) + 0.01  # some over the budget, some far under it
        for order in (np.argsort(durations, kind="stable"), rng.permutation(size)):
            ends = _cut_batches(durations, order, max_batch_s=max_batch_s).tolist()
            assert [order[start:end].tolist() for start, end in zip([0, *ends], ends)] == greedy(
                durations.tolist(), order.tolist(), max_batch_s), (size, max_batch_s)


def test_dataset_items_are_normalized_audio_with_labels(audio_examples):
    dataset = SpeechDataset(audio_examples)
    assert len(dataset) == 3 and dataset.durations_s.tolist() == [0.5, 0.8, 0.25]
    for index, expected_samples in enumerate((8000, 12800, 4000)):
        item = dataset[index]
        assert item["id"] == audio_examples[index][0].id
        assert item["labels"] == audio_examples[index][1]
        values = item["input_values"]
        assert values.dtype == torch.float32 and values.shape == (expected_samples,)
        assert abs(float(values.mean())) < 1e-4 and abs(float(values.std()) - 1) < 1e-3


@pytest.mark.parametrize("with_mask", [True, False])
def test_collate_pads_audio_with_zeros_and_labels_with_minus_100(audio_examples, with_mask):
    dataset = SpeechDataset(audio_examples)
    items = [dataset[i] for i in range(3)]
    batch = collate(items, attention_mask=with_mask)
    assert batch["ids"] == ["one", "two", "seg"]
    assert batch["input_values"].shape == (3, 12800)
    assert torch.equal(batch["input_values"][0, :8000], items[0]["input_values"])
    assert not batch["input_values"][0, 8000:].any() and not batch["input_values"][2, 4000:].any()
    assert batch["labels"].tolist() == [items[0]["labels"] + [-100] * 3, items[1]["labels"],
                                        items[2]["labels"] + [-100] * 4]
    if with_mask:
        assert batch["attention_mask"].sum(1).tolist() == [8000, 12800, 4000]
        assert batch["attention_mask"].dtype == torch.long
    else:
        assert "attention_mask" not in batch


@pytest.mark.parametrize("arch", ["stable", "base"])
def test_batches_train_through_a_dataloader(tmp_path, audio_examples, arch):
    model, _ = build_ctc_model(make_tiny_checkpoint(tmp_path / arch, arch=arch), VOCAB)
    dataset = SpeechDataset(audio_examples)
    sampler = DurationBatchSampler(dataset.durations_s, max_batch_s=2.0)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=partial(
        collate, attention_mask=needs_attention_mask(model.config)))
    seen = []
    for batch in loader:
        seen += batch.pop("ids")
        loss = model(**batch).loss
        assert torch.isfinite(loss)
    assert sorted(seen) == ["one", "seg", "two"]


def random_durations(n: int = 200, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [round(rng.uniform(0.5, 8.0), 2) for _ in range(n)]


def padding_share(batches: list[list[int]], durations: list[float]) -> float:
    """Share of the padded seconds (batch size x longest) that is padding."""
    padded_s = sum(len(b) * max(durations[i] for i in b) for b in batches)
    return 1 - sum(durations[i] for b in batches for i in b) / padded_s


def together(batches: list[list[int]]) -> set[frozenset[int]]:
    """Every pair of indices that share a batch."""
    return {frozenset((a, b)) for batch in batches for k, a in enumerate(batch) for b in batch[k + 1:]}


def test_sampler_covers_every_index_once_within_budget_in_every_epoch():
    durations = random_durations()
    sampler = DurationBatchSampler(durations, max_batch_s=20.0, seed=3)
    for epoch in range(3):
        assert sampler.epoch == epoch  # running through an epoch moves on to the next one
        expected = len(sampler)
        batches = list(sampler)
        assert len(batches) == expected
        assert sorted(i for b in batches for i in b) == list(range(len(durations)))
        for batch in batches:
            assert len(batch) * max(durations[i] for i in batch) <= 20.0


def test_batches_are_re_formed_each_epoch_from_seed_and_epoch():
    durations = random_durations()
    sampler = DurationBatchSampler(durations, max_batch_s=20.0, seed=3)
    epochs = [list(sampler) for _ in range(3)]
    # Which utterances share a batch changes from epoch to epoch, not only the order of the batches.
    assert len({frozenset(map(frozenset, batches)) for batches in epochs}) == 3
    assert len(together(epochs[0]) & together(epochs[1])) < 0.5 * len(together(epochs[0]))
    # The same seed and epoch give the same batches in any sampler; another seed, other ones.
    again = DurationBatchSampler(durations, max_batch_s=20.0, seed=3)
    again.set_epoch(2)
    assert list(again) == epochs[2] and again.global_batches(1) == epochs[1]
    assert list(DurationBatchSampler(durations, max_batch_s=20.0, seed=4)) != epochs[0]


def test_unshuffled_batches_are_the_length_ordered_plan_of_every_epoch():
    durations = random_durations()
    sampler = DurationBatchSampler(durations, max_batch_s=20.0, shuffle=False)
    plain = list(sampler)
    assert list(sampler) == plain and sampler.epoch == 2
    assert [durations[i] for b in plain for i in b] == sorted(durations)  # length order, cut in pieces


def test_re_formed_batches_keep_padding_small_on_common_voice_like_lengths():
    rng = np.random.default_rng(0)
    durations = np.clip(rng.lognormal(np.log(4.5), 0.35, 3000), 1.0, 15.0).round(2).tolist()
    plain = DurationBatchSampler(durations, max_batch_s=60.0, shuffle=False).global_batches()
    sampler = DurationBatchSampler(durations, max_batch_s=60.0, seed=0)
    first, second = sampler.global_batches(0), sampler.global_batches(1)
    assert padding_share(plain, durations) < 0.01 and padding_share(first, durations) < 0.025
    assert len(first) <= 1.02 * len(plain)  # about as many updates per epoch
    assert len(together(first) & together(second)) < 0.25 * len(together(first))


@pytest.mark.parametrize("replicas", [2, 3])
def test_rank_shards_make_up_the_single_process_batches_in_every_epoch(replicas):
    durations = random_durations() + [19.0]  # a batch of one: too small to share, skipped by every rank
    single = DurationBatchSampler(durations, max_batch_s=20.0, seed=5)
    shards = [DurationBatchSampler(durations, max_batch_s=20.0, seed=5, num_replicas=replicas, rank=r)
              for r in range(replicas)]
    for _ in range(3):
        global_batches = single.global_batches()
        assert all(shard.global_batches() == global_batches for shard in shards)
        shared = [b for b in global_batches if len(b) >= replicas]
        assert len(shared) < len(global_batches)
        assert shards[0].num_dropped == len(durations) - sum(map(len, shared))
        assert all(len(shard) == len(shared) for shard in shards)
        per_rank = [list(shard) for shard in shards]
        assert list(single) == global_batches
        for global_batch, parts in zip(shared, zip(*per_rank, strict=True), strict=True):
            assert sorted(i for part in parts for i in part) == sorted(global_batch)
            assert all(parts)
    # what training's loader reads: a rank's batches of any epoch, from any global batch on, the sampler not moved
    shard = shards[1]
    position = shard.state_dict()
    for epoch in (shard.epoch - 1, shard.epoch + 4):
        batches = list(shard.batches(epoch))
        assert len(batches) == len(shard.global_batches(epoch))
        assert [batch is None for batch in batches] == [len(b) < replicas for b in shard.global_batches(epoch)]
        assert list(shard.batches(epoch, start=7)) == batches[7:]
        assert shard.state_dict() == position
    assert [b for b in shard.batches(shard.epoch) if b is not None] == list(shard)


def test_sampler_resumes_mid_epoch_and_refuses_other_data():
    durations = random_durations()
    uninterrupted = DurationBatchSampler(durations, max_batch_s=20.0, seed=7)
    uninterrupted.set_epoch(2)
    expected = list(uninterrupted) + list(uninterrupted)
    first = DurationBatchSampler(durations, max_batch_s=20.0, seed=7)
    first.set_epoch(2)
    iterator = iter(first)
    head = [next(iterator) for _ in range(5)]
    state = first.state_dict()
    resumed = DurationBatchSampler(durations, max_batch_s=20.0, seed=7)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # a training loop calls this again after resuming: it must keep the position
    assert head + list(resumed) + list(resumed) == expected
    for other in (DurationBatchSampler(durations[:50], max_batch_s=20.0, seed=7),
                  DurationBatchSampler(durations, max_batch_s=21.0, seed=7)):
        with pytest.raises(ValueError, match="the data or max_batch_s changed"):
            other.load_state_dict(state)
    # A state saved before batches were re-formed each epoch counts the batches of the length-ordered plan.
    plain = DurationBatchSampler(durations, max_batch_s=20.0, shuffle=False).global_batches()
    resumed.load_state_dict({"epoch": 2, "position": 5, "num_batches": len(plain)})
    assert list(resumed) == expected[5:len(uninterrupted.global_batches(2))]
    with pytest.raises(ValueError, match="the data or max_batch_s changed"):
        resumed.load_state_dict({"epoch": 2, "position": 5, "num_batches": len(plain) + 1})


def test_an_utterance_over_the_budget_gets_a_batch_of_its_own():
    batches = list(DurationBatchSampler([1.0, 30.0, 2.0], max_batch_s=10.0, shuffle=False))
    assert batches == [[0, 2], [1]]
    with pytest.raises(ValueError):
        DurationBatchSampler([1.0], max_batch_s=10.0, num_replicas=2, rank=2)


def test_inputs_without_an_output_frame_are_dropped_as_too_short():
    config = tiny_config()
    # kernels 10, 4, 4 at strides 5, 4, 4: one output frame needs 10 + 5 * (4 - 1 + 4 * (4 - 1)) = 85 samples
    assert output_frames(config, 84) == 0 and output_frames(config, 85) == 1
    kept, report = filter_utterances([utterance("1ms", "a", 0.001), utterance("under", "a", 84 / 16000),
                                      utterance("one-frame", "a", 85 / 16000)],
                                     normalizer=TextNormalizer(), vocab=VOCAB, config=config, min_duration_s=0.0,
                                     max_duration_s=20.0)
    assert [u.id for u, _ in kept] == ["one-frame"]
    assert (report.too_short, report.label_too_long) == (2, 0)


@pytest.mark.filterwarnings("ignore:'(aifc|audioop|sunau)' is deprecated:DeprecationWarning")  # audioread's imports
def test_unusable_audio_becomes_a_problem_item_naming_manifest_and_line(tmp_path):
    import numpy as np
    import soundfile as sf

    from speechxfer.errors import AudioError
    from speechxfer.manifest import read_manifest, write_manifest

    write_tone(tmp_path / "ok.wav", duration_s=0.5)
    write_tone(tmp_path / "tiny.wav", duration_s=0.001)
    sf.write(tmp_path / "nan.wav", np.full(8000, np.nan, dtype=np.float32), 16000, subtype="FLOAT")
    (tmp_path / "text.wav").write_bytes(b"not audio" * 10)
    manifest = tmp_path / "m.jsonl"
    write_manifest(manifest, [utterance("ok", "ab", 0.5, str(tmp_path / "ok.wav")),
                              utterance("nan", "ab", 0.5, str(tmp_path / "nan.wav")),
                              utterance("text", "ab", 0.5, str(tmp_path / "text.wav")),
                              utterance("short", "ab", 0.5, str(tmp_path / "tiny.wav")),
                              utterance("close", "ab", 0.55, str(tmp_path / "ok.wav"))])  # within the tolerance
    utterances, _ = read_manifest(manifest)
    dataset = SpeechDataset([(u, VOCAB.encode(u.text)) for u in utterances])
    items = [dataset[i] for i in range(len(dataset))]
    assert [("problem" in item) for item in items] == [False, True, True, True, False]
    problems = [item["problem"] for item in items if "problem" in item]
    assert [(p.path, p.line, p.kind, p.utterance_id) for p in problems] == [
        (str(manifest), 2, "unreadable_audio", "nan"), (str(manifest), 3, "unreadable_audio", "text"),
        (str(manifest), 4, "duration_mismatch", "short")]
    assert str(problems[0]) == (f"{manifest}:2: [unreadable_audio] nan: audio holds NaN or infinite samples: "
                                f"{tmp_path / 'nan.wav'}")
    assert [dataset[1]["problem"] for _ in range(2)] == [problems[0]] * 2  # the same every time
    assert collate([items[0], items[4]], attention_mask=True)["ids"] == ["ok", "close"]
    with pytest.raises(AudioError, match=f"^{manifest}:2: \\[unreadable_audio\\] nan: "):
        collate(items[:2], attention_mask=True)  # a caller that does not skip gets a clear error


def test_labels_must_fit_the_frames_of_the_fastest_speed_perturbation():
    config = tiny_config()
    fast = AugmentOptions(speed=SpeedOptions(probability=1.0, factors=(1.0, 1.25)))
    # 0.125 s: 24 frames as listed, 19 at speed 1.25 (0.1 s); 20 labels fit the first only
    utterances = [utterance("fits-slow", "ab" * 10, 0.125), utterance("fits-fast", "ab" * 9 + "a", 0.125)]
    plain, _ = filter_utterances(utterances, normalizer=TextNormalizer(TextOptions()), vocab=VOCAB, config=config,
                                 min_duration_s=0.0, max_duration_s=20.0)
    kept, report = filter_utterances(utterances, normalizer=TextNormalizer(TextOptions()), vocab=VOCAB,
                                     config=config, min_duration_s=0.0, max_duration_s=20.0, augment_options=fast)
    assert [u.id for u, _ in plain] == ["fits-slow", "fits-fast"]
    assert [u.id for u, _ in kept] == ["fits-fast"] and report.label_too_long == 1


EVERY_EFFECT = AugmentOptions(speed=SpeedOptions(probability=1.0, factors=(0.8, 1.0, 1.25)),
                              noise=NoiseOptions(probability=0.5), telephone=TelephoneOptions(probability=0.5))


def loaded_waves(dataset: SpeechDataset, *, num_workers: int) -> dict[str, np.ndarray]:
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=num_workers, collate_fn=lambda b: b[0])
    return {item["id"]: item["input_values"].numpy() for item in loader}


def test_augmented_items_depend_on_seed_epoch_and_id_only(audio_examples):
    dataset = partial(SpeechDataset, audio_examples, augment_options=EVERY_EFFECT, seed=7)
    first = loaded_waves(dataset(epoch=3), num_workers=0)
    again = loaded_waves(dataset(epoch=3), num_workers=2)  # other processes, other order of reading
    nxt = loaded_waves(dataset(epoch=4), num_workers=0)
    plain = loaded_waves(SpeechDataset(audio_examples), num_workers=0)
    assert first.keys() == again.keys() == nxt.keys() == {"one", "two", "seg"}
    for uid in first:
        assert np.array_equal(first[uid], again[uid])
        assert first[uid].shape != nxt[uid].shape or not np.allclose(first[uid], nxt[uid])
        # speed perturbation changes the length by the factor drawn for this (seed, epoch, utterance)
        factor = speed_factor(EVERY_EFFECT, seed=7, epoch=3, utterance_id=uid)
        assert abs(len(first[uid]) - len(plain[uid]) / factor) <= 2
    assert any(not np.array_equal(first[uid], plain[uid]) for uid in first)


def test_batches_planned_for_speed_perturbation_never_exceed_max_batch_s(tmp_path):
    rng = random.Random(0)
    examples = []
    for i in range(24):
        duration_s = round(rng.uniform(0.2, 1.0), 2)
        path = write_tone(tmp_path / f"{i}.wav", duration_s=duration_s, seed=i)
        examples.append((utterance(f"u{i}", "ab", duration_s, str(path)), VOCAB.encode("ab")))
    slow = AugmentOptions(speed=SpeedOptions(probability=0.8, factors=(0.8, 0.9, 1.1)))
    max_batch_s = 2.5
    sampler = DurationBatchSampler(SpeechDataset(examples, augment_options=slow).durations_s,
                                   max_batch_s=max_batch_s, seed=1)
    longest_s, slowed = 0.0, 0
    for epoch in range(4):
        dataset = SpeechDataset(examples, augment_options=slow, seed=5, epoch=epoch)
        sampler.set_epoch(epoch)
        for batch in sampler:
            lengths_s = [len(dataset[i]["input_values"]) / 16000 for i in batch]
            slowed += sum(length_s > examples[i][0].duration_s + 0.01 for i, length_s in zip(batch, lengths_s))
            longest_s = max(longest_s, len(batch) * max(lengths_s))
            assert len(batch) * max(lengths_s) <= max_batch_s
    assert slowed > 0 and longest_s > 0.8 * max_batch_s  # the plan was tested where it matters


def capped_data() -> tuple[list[float], list[int], dict[int, float]]:
    """Labelled utterances of 0.5-8 s, a pseudo-labelled manifest of long ones (over half of max_batch_s 20: under
    a cap per batch, each would need a batch of its own) and one of short ones, both over their share."""
    rng = random.Random(1)
    durations = random_durations(60) + [round(rng.uniform(10.5, 19.5), 2) for _ in range(30)] + random_durations(
        30, seed=2)
    return durations, [0] * 60 + [1] * 30 + [2] * 30, {1: 0.5, 2: 0.25}


def test_capped_groups_hold_at_most_their_share_of_each_epoch_and_every_utterance_trains_in_some():
    durations, groups, caps = capped_data()
    d, g = np.array(durations), np.array(groups)
    uncapped_s = d[g == 0].sum()
    sampler = DurationBatchSampler(durations, max_batch_s=20.0, seed=3, groups=groups, max_share=caps)
    shards = [DurationBatchSampler(durations, max_batch_s=20.0, seed=3, groups=groups, max_share=caps,
                                   num_replicas=2, rank=r) for r in range(2)]
    held: dict[int, list[set[int]]] = {1: [], 2: []}
    for epoch in range(10):
        in_epoch = sampler.in_epoch()
        batches = list(sampler)
        served = sorted(i for b in batches for i in b)
        assert served == np.flatnonzero(in_epoch).tolist()  # each at most once; in_epoch says which
        assert [i for i in served if groups[i] == 0] == list(range(60))  # every labelled one, every epoch
        epoch_s = d[served].sum()
        for group, share in caps.items():
            mine = [i for i in served if groups[i] == group]
            group_s = d[mine].sum()
            assert group_s <= share * epoch_s + 1e-9
            # filled up: what is left of its budget (share of the uncapped seconds plus its own) is too short for
            # the group's longest utterance
            assert share / (1 - share) * uncapped_s - group_s < d[g == group].max()
            held[group].append(set(mine))
        for batch in batches:
            assert len(batch) * max(durations[i] for i in batch) <= 20.0
        # The subset is in the global plan: each rank's shares make up the same global batches.
        assert [sorted(a + b) for a, b in zip(*map(list, shards))] == [sorted(b) for b in batches if len(b) >= 2]
    for group in caps:
        assert len({frozenset(h) for h in held[group]}) == 10  # a new subset each epoch
        assert set().union(*held[group]) == {i for i in range(120) if groups[i] == group}  # all of them in 10 epochs
    # long ones as likely as short ones: the longer half of the long group is taken about as often as the rest
    long_group = sorted(np.flatnonzero(g == 1), key=lambda i: d[i])
    takes = [sum(i in h for h in held[1]) for i in long_group]
    assert sum(takes[15:]) >= 0.6 * sum(takes[:15])


def test_an_epoch_subset_is_drawn_from_seed_and_epoch_and_resumes_exactly():
    durations, groups, caps = capped_data()
    make = partial(DurationBatchSampler, durations, max_batch_s=20.0, groups=groups, max_share=caps)
    uninterrupted = make(seed=7)
    epochs = [list(uninterrupted) for _ in range(3)]
    assert len({len(batches) for batches in epochs}) > 1  # the subset, and so the number of batches, varies
    again = make(seed=7)
    again.set_epoch(2)
    assert list(again) == epochs[2] and again.global_batches(1) == epochs[1]
    assert make(seed=8).global_batches(0) != epochs[0]
    first = make(seed=7)
    first.set_epoch(1)
    iterator = iter(first)
    head = [next(iterator) for _ in range(5)]
    resumed = make(seed=7)
    resumed.load_state_dict(first.state_dict())
    resumed.set_epoch(1)
    assert head + list(resumed) + list(resumed) == epochs[1] + epochs[2]
    for other in (make(seed=7, max_share={1: 0.5, 2: 0.2}), make(seed=7, groups=[0] * 60 + [2] * 60)):
        with pytest.raises(ValueError, match="the data or max_batch_s changed"):
            other.load_state_dict(first.state_dict())
    # a state from before batches were re-formed each epoch: its capped plan cannot be counted any more
    with pytest.raises(ValueError, match="before max_share held per epoch"):
        resumed.load_state_dict({"epoch": 1, "position": 5, "num_batches": 40})
    # unshuffled (decoding order): the length-ordered plan of the epoch's subset
    plain = make(shuffle=False, seed=7)
    for epoch in range(2):
        batches = plain.global_batches(epoch)
        assert [durations[i] for b in batches for i in b] == sorted(d for d, h in zip(durations, plain.in_epoch(
            epoch)) if h)


def test_without_a_capped_group_the_plan_is_the_one_from_before_caps_per_epoch():
    def plan_before(durations, seed, epoch, max_batch_s):  # the sampler's plan as it was made before caps held
        rng = np.random.default_rng([seed % 2 ** 64, epoch])  # per epoch (every utterance in every epoch)
        by_length = np.argsort(durations, kind="stable")
        place = np.empty(len(durations))
        place[by_length] = np.cumsum(durations[by_length]) / max_batch_s
        place += rng.uniform(-REFORM_BATCHES, REFORM_BATCHES, len(place))
        order = np.argsort(place, kind="stable")
        ends = _cut_batches(durations, order, max_batch_s=max_batch_s).tolist()
        batches = [order[start:end].tolist() for start, end in zip([0, *ends], ends)]
        return [batches[k] for k in rng.permutation(len(batches))]

    rng = np.random.default_rng(5)
    for size, max_batch_s in ((1, 10.0), (300, 20.0), (3000, 60.0)):
        durations = np.round(rng.lognormal(1.2, 0.6, size), 2) + 0.01
        groups = [i % 3 for i in range(size)]
        for seed in (0, -3):
            samplers = [DurationBatchSampler(durations, max_batch_s=max_batch_s, seed=seed),
                        DurationBatchSampler(durations, max_batch_s=max_batch_s, seed=seed, groups=groups,
                                             max_share={1: 1.0, 2: 1.0})]  # a share of 1 caps nothing
            for epoch in range(3):
                expected = plan_before(durations, seed, epoch, max_batch_s)
                assert all(sampler.global_batches(epoch) == expected for sampler in samplers), (size, seed, epoch)
    # a capped group whose whole fits its share holds all of it, in that same plan
    durations = np.array(random_durations())
    fits = DurationBatchSampler(durations, max_batch_s=20.0, seed=3, groups=[0] * 150 + [1] * 50,
                                max_share={1: 0.5})
    assert all(fits.global_batches(epoch) == plan_before(durations, 3, epoch, 20.0) for epoch in range(3))


def test_greedy_fill_in_arrays_takes_what_the_loop_takes():
    def loop(durations, order, budget_s):
        taken, total_s = [], 0.0
        for index in order:
            if total_s + durations[index] <= budget_s:
                taken.append(index)
                total_s += durations[index]
        return taken

    rng = np.random.default_rng(0)
    for size in (0, 1, 50, 2000):
        durations = np.round(rng.lognormal(1, 1, size), 2) + 0.01
        for budget_s in (0.0, 3.0, 0.3 * durations.sum(), 0.99 * durations.sum(), durations.sum() + 1):
            order = rng.permutation(size)
            assert _fill_greedily(durations, order, budget_s=budget_s).tolist() == loop(
                durations.tolist(), order.tolist(), budget_s), (size, budget_s)


def test_inference_batches_pad_only_for_a_model_with_a_mask():
    samples = [16000, 8000, 16000, 24000, 8000, 12000, 16000]
    padded = inference_batches(samples, padding_free=False, max_batch_samples=48000)
    assert padded == [[3, 0], [2, 6, 5], [1, 4]]  # longest first, equal lengths in index order; fits the budget
    assert all(len(b) * samples[b[0]] <= 48000 for b in padded)
    free = inference_batches(samples, padding_free=True, max_batch_samples=48000)
    assert free == [[3], [0, 2, 6], [5], [1, 4]]  # one length per batch: nothing padded
    assert inference_batches(samples, padding_free=True, max_batch_samples=20000) == [[3], [0], [2], [6], [5], [1, 4]]
    # without a budget: a batch per length, or all of them padded
    assert inference_batches(samples, padding_free=True) == [[3], [0, 2, 6], [5], [1, 4]]
    assert inference_batches(samples, padding_free=False) == [[3, 0, 2, 6, 5, 1, 4]]
    assert inference_batches([], padding_free=True) == []


def test_labels_of_texts_that_normalization_lengthens_or_rejects_are_each_texts_own():
    # NFD spells "é" as two code points: the labels outgrow the room the texts as written take.
    normalizer = TextNormalizer(TextOptions(unicode_form="NFD", digits="reject"))
    texts = ["é" * 40, "2 é", "ée é", "", "é"]
    vocab = Vocabulary.from_texts([normalizer("é e")])
    kept, report = filter_utterances([utterance(f"u{k}", text, 2.0) for k, text in enumerate(texts)],
                                     normalizer=normalizer, vocab=vocab, config=tiny_config(arch="stable"),
                                     min_duration_s=0.1, max_duration_s=5.0)
    assert [(u.id, labels.tolist()) for u, labels in kept] == [
        (f"u{k}", vocab.encode(normalizer(texts[k]))) for k in (0, 2, 4)]
    assert len(kept[0][1]) == 80 and report.rejected_text == 2
