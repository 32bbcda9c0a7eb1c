"""From utterances to batches: filtering, the dataset, collation, duration-bucketed training batches that shard
identically across processes, and the forward passes of evaluation and inference."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import Wav2Vec2Config

from speechxfer.audio import NORM_EPSILON, SAMPLE_RATE_HZ, Moments, load_audio
from speechxfer.augment import AugmentOptions, augment, duration_bounds_s
from speechxfer.compat import gc_paused
from speechxfer.errors import AudioError, counted
from speechxfer.manifest import Utterance, UtteranceTable, duration_mismatch
from speechxfer.text import TextNormalizer
from speechxfer.vocabulary import EncodedTexts, Vocabulary, encode_texts

LABEL_PAD = -100  # label id the CTC loss ignores (transformers' convention)
_MAX_EXAMPLES = 10  # dropped utterance ids kept in a DropReport
# How far, in batches' worth of audio, each epoch may move an utterance from its place in length order before
# batches are cut (DurationBatchSampler). On Common Voice-like lengths at 60 s a batch, 2 keeps padding near 1.5%
# (0.4% sorted) while 85% of the pairs that share a batch in one epoch are apart in the next.
REFORM_BATCHES = 2.0


@dataclass(frozen=True)
class FrameGeometry:
    """Where the output frames of stacked unpadded 1-D convolutions lie in their input, in samples: frame t is
    computed from samples [t * stride, t * stride + receptive_field)."""

    receptive_field: int  # input samples each output frame is computed from
    stride: int  # input samples from one output frame to the next

    @classmethod
    def of(cls, layers: Iterable[tuple[int, int]]) -> FrameGeometry:
        """Of (kernel, stride) layers applied in order."""
        receptive_field, stride = 1, 1
        for layer_kernel, layer_stride in layers:
            receptive_field += (layer_kernel - 1) * stride
            stride *= layer_stride
        return cls(receptive_field, stride)

    def frames(self, num_samples: int) -> int:
        """Output frames of an input of `num_samples` samples; 0 when it is shorter than the receptive field.
        Equal to applying each layer's (samples - kernel) // stride + 1 in turn (floor divisions nest)."""
        return max(0, (num_samples - self.receptive_field) // self.stride + 1)


def frame_geometry(config: Wav2Vec2Config) -> FrameGeometry:
    """Where a wav2vec2 model's CTC output frames (logits) lie in its input: the conv feature encoder's kernels and
    strides, then the optional adapter's layers."""
    layers = list(zip(config.conv_kernel, config.conv_stride))
    if config.add_adapter:
        # an adapter conv pads one sample on each side: it counts as a kernel two shorter (1 for the default 3)
        layers += [(config.adapter_kernel_size - 2, config.adapter_stride)] * config.num_adapter_layers
    return FrameGeometry.of(layers)


def output_frames(config: Wav2Vec2Config, num_samples: int) -> int:
    """Frames of the CTC output (logits) for an input of `num_samples` samples, without padding; 0 when the input
    is too short."""
    return frame_geometry(config).frames(num_samples)


@dataclass(frozen=True)
class DropReport:
    """Utterances left out of training, by reason."""

    too_short: int  # duration below min_duration_s, or too short for the model to give one output frame
    too_long: int  # duration above max_duration_s
    label_too_long: int  # more labels (plus blanks between repeats) than the model has output frames
    rejected_text: int  # the normalizer rejected the text, or nothing was left of it
    examples: list[str]  # ids of the first dropped utterances

    @property
    def total(self) -> int:
        return self.too_short + self.too_long + self.label_too_long + self.rejected_text

    def __str__(self) -> str:
        if self.total == 0:
            return "dropped no utterances"
        return (f"dropped {counted(self.total, 'utterance')}: {self.too_short} too short, {self.too_long} too long, "
                f"{self.label_too_long} with a label longer than the output frames, "
                f"{self.rejected_text} with rejected text; e.g. {', '.join(self.examples)}")


class Examples(Sequence[tuple[Utterance, np.ndarray]]):
    """What filter_utterances keeps: item k is (utterance, its label ids: a read-only view into one array that
    holds all of them). Columns serve those that look at every item: `durations_s` (float64 (items,)) and `rows`
    (int64 (items,): each item's position in the utterances filtered); an item's Utterance is only fetched (from
    an UtteranceTable: built) when asked for."""

    def __init__(self, utterances: Sequence[Utterance], rows: np.ndarray, labels: np.ndarray, starts: np.ndarray,
                 ends: np.ndarray, durations_s: np.ndarray):
        self.utterances = utterances
        self.rows = rows
        self._labels = labels  # read-only, shared: item k's labels are labels[starts[k]:ends[k]]
        self._starts = starts
        self._ends = ends
        self.durations_s = durations_s

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[k] for k in range(*index.indices(len(self)))]
        index = range(len(self))[index]  # IndexError past the end; negative from the end
        return self.utterances[self.rows[index]], self._labels[self._starts[index]:self._ends[index]]

    def __iter__(self) -> Iterator[tuple[Utterance, np.ndarray]]:
        return map(self.__getitem__, range(len(self)))

    @classmethod
    def concat(cls, parts: Sequence[Examples]) -> Examples:
        """The items of `parts`, one after another, over their utterances joined (UtteranceTable.concat when
        every part's are a table)."""
        tables = [part.utterances for part in parts]
        utterances = (UtteranceTable.concat(tables) if all(isinstance(t, UtteranceTable) for t in tables)
                      else [u for t in tables for u in t])
        row_offsets = np.cumsum([0] + [len(t) for t in tables])
        label_offsets = np.cumsum([0] + [len(part._labels) for part in parts])
        labels = np.concatenate([part._labels for part in parts])
        labels.flags.writeable = False
        join = np.concatenate
        return cls(utterances, join([p.rows + k for p, k in zip(parts, row_offsets)]), labels,
                   join([p._starts + k for p, k in zip(parts, label_offsets)]),
                   join([p._ends + k for p, k in zip(parts, label_offsets)]), join([p.durations_s for p in parts]))

    def select(self, mask: np.ndarray) -> Examples:
        """The items where `mask` (bool (items,)) holds, in order, their labels in the same array."""
        return Examples(self.utterances, self.rows[mask], self._labels, self._starts[mask], self._ends[mask],
                        self.durations_s[mask])


def filter_utterances(utterances: Sequence[Utterance], *, normalizer: TextNormalizer, vocab: Vocabulary,
                      config: Wav2Vec2Config, min_duration_s: float, max_duration_s: float,
                      augment_options: AugmentOptions | None = None,
                      encoded: EncodedTexts | None = None) -> tuple[Examples, DropReport]:
    """Normalize and encode each transcript, keeping (utterance, label ids) for those the model can learn from.

    Drops, with counts: durations outside [min_duration_s, max_duration_s] or shorter than the model's receptive
    field (no output frame); texts the normalizer rejects or empties; labels that cannot align with CTC, i.e.
    longer than the output frames once a blank separates each repeat. With `augment_options`, the labels must fit
    the frames of the shortest audio speed perturbation can make of the utterance (duration_bounds_s).

    `utterances`: a list, or an UtteranceTable (manifest.read_manifest_table), whose columns are read without
    building its rows. `encoded`: the utterances' texts as vocabulary.encode_texts(texts, normalizer) gives them,
    when the caller has them already (training, which counts its vocabulary's characters from them): they are
    then not normalized again, and their labels are taken (EncodedTexts.take_labels). The label ids of the kept
    utterances lie in one array: a few bytes a character instead of a Python list, for a million utterances.
    """
    with gc_paused():
        if isinstance(utterances, UtteranceTable):
            durations_s, texts = utterances.durations_s, utterances.texts
        else:
            durations_s = np.array([u.duration_s for u in utterances], dtype=np.float64)
            texts = [u.text for u in utterances]
        if encoded is None:
            encoded = encode_texts(texts, normalizer)
        elif len(encoded) != len(texts):
            raise ValueError(f"{len(encoded)} encoded texts for {len(texts)} utterances")
        return _filter(utterances, durations_s, encoded, vocab=vocab, geometry=frame_geometry(config),
                       min_duration_s=min_duration_s, max_duration_s=max_duration_s,
                       augment_options=augment_options)


def _filter(utterances: Sequence[Utterance], durations_s: np.ndarray, encoded: EncodedTexts, *, vocab: Vocabulary,
            geometry: FrameGeometry, min_duration_s: float, max_duration_s: float,
            augment_options: AugmentOptions | None) -> tuple[Examples, DropReport]:
    """filter_utterances' work on the utterances' columns, the garbage collector paused."""
    shortest_s = durations_s if augment_options is None else duration_bounds_s(durations_s,
                                                                               options=augment_options)[0]
    # geometry.frames of each, in arrays: np.rint rounds halves to even, as round() does
    frames = np.maximum(0, (np.rint(shortest_s * SAMPLE_RATE_HZ).astype(np.int64) - geometry.receptive_field)
                        // geometry.stride + 1)
    too_short = (durations_s < min_duration_s) | (frames == 0)
    too_long = ~too_short & (durations_s > max_duration_s)
    candidate = ~(too_short | too_long)
    # Every text's labels, end to end (those of texts dropped for their duration too: no copy of the rest)
    labels = encoded.take_labels(vocab)
    labels.flags.writeable = False  # shared by every kept utterance's view
    starts, ends = encoded.starts[:-1], encoded.starts[1:]
    rejected = candidate & (ends == starts)  # rejected by the normalizer, or nothing left of the text
    encoded_rows = np.flatnonzero(candidate & ~rejected)
    starts, ends = starts[encoded_rows], ends[encoded_rows]
    # CTC needs a blank between two equal labels: count the equal neighbours (j, j + 1) inside each text.
    equal = _equal_neighbours(labels)
    repeats = np.searchsorted(equal, ends - 1) - np.searchsorted(equal, starts)
    fits = ends - starts + repeats <= frames[encoded_rows]
    label_too_long = np.zeros(len(durations_s), dtype=bool)
    label_too_long[encoded_rows[~fits]] = True
    examples = Examples(utterances, encoded_rows, labels, starts, ends, durations_s[encoded_rows]).select(fits)
    reasons = {"too_short": too_short, "too_long": too_long, "label_too_long": label_too_long,
               "rejected_text": rejected}
    dropped = np.flatnonzero(too_short | too_long | label_too_long | rejected)[:_MAX_EXAMPLES].tolist()
    return examples, DropReport(**{reason: int(mask.sum()) for reason, mask in reasons.items()},
                                examples=[utterances[position].id for position in dropped])


def _equal_neighbours(labels: np.ndarray) -> np.ndarray:
    """Every j where labels[j] == labels[j + 1] (int64, ascending), found a slice at a time: comparing all the
    labels at once would make a second array as long as they are (a million transcripts' worth)."""
    step, end = 1 << 22, len(labels) - 1
    parts = [np.flatnonzero(labels[j:min(j + step, end)] == labels[j + 1:min(j + step, end) + 1]) + j
             for j in range(0, max(end, 0), step)]
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


class SpeechDataset(torch.utils.data.Dataset):
    """Audio and labels of filtered utterances. Item i: {"id": str, "input_values": float32 tensor (samples,)
    normalized to zero mean and unit variance (as Wav2Vec2FeatureExtractor does), "labels": list[int],
    "duration_s": float, the utterance's duration as listed, "level_dbfs": float, the level of its audio as read
    (audio.Moments.level_dbfs: what dev/test decoding tells silence by), both before any augmentation}; or, for an
    utterance whose audio cannot be used, {"id": str, "problem": Problem} naming its manifest and line: unreadable
    audio (kind unreadable_audio: not audio, corrupt, NaN or infinite samples) or audio shorter than its listed
    duration (duration_mismatch: labels and batches were planned from that duration). The same file gives the same
    item every time, so skipping it keeps a resumed run equal to an uninterrupted one.

    With `augment_options` (training only), the audio is augmented before normalization, drawn from (seed, epoch,
    utterance id): the same in any loader worker and in a resumed run, different in the next epoch."""

    def __init__(self, examples: Sequence[tuple[Utterance, Sequence[int]]], *, sample_rate_hz: int = SAMPLE_RATE_HZ,
                 augment_options: AugmentOptions | None = None, seed: int = 0, epoch: int = 0):
        self.examples = examples
        self.sample_rate_hz = sample_rate_hz
        self.augment_options = augment_options
        self.seed = seed
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def durations_s(self) -> np.ndarray:
        """Duration of each item in seconds (float64 (items,)), for DurationBatchSampler: with speed perturbation,
        the longest it can come out of augmentation in any epoch, so that batches planned from them fit max_batch_s
        in every epoch."""
        durations_s = (self.examples.durations_s if isinstance(self.examples, Examples)
                       else np.array([utt.duration_s for utt, _ in self.examples], dtype=np.float64))
        if self.augment_options is None:
            return durations_s
        return duration_bounds_s(durations_s, options=self.augment_options)[1]

    def __getitem__(self, index: int) -> dict[str, Any]:
        utt, labels = self.examples[index]
        try:
            audio = load_audio(utt.audio_path, sample_rate_hz=self.sample_rate_hz, offset_s=utt.offset_s,
                               duration_s=utt.duration_s)
        except AudioError as err:
            return {"id": utt.id, "problem": utt.problem("unreadable_audio", err.message + f": {utt.audio_path}")}
        if (mismatch := duration_mismatch(utt, len(audio) / self.sample_rate_hz)) is not None:
            return {"id": utt.id, "problem": utt.problem("duration_mismatch", f"{mismatch}: {utt.audio_path}")}
        level_dbfs = Moments.of(audio).level_dbfs()
        if self.augment_options is not None:
            audio = augment(audio, sample_rate_hz=self.sample_rate_hz, options=self.augment_options, seed=self.seed,
                            epoch=self.epoch, utterance_id=utt.id)
        # Same formula and epsilon as transformers' Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm.
        normalized = (audio - audio.mean()) / np.sqrt(audio.var() + NORM_EPSILON)
        return {"id": utt.id, "input_values": torch.from_numpy(normalized.astype(np.float32)), "labels": labels,
                "duration_s": utt.duration_s, "level_dbfs": level_dbfs}


def collate(items: list[dict[str, Any]], *, attention_mask: bool) -> dict[str, Any]:
    """Pad a list of SpeechDataset items into a batch.

    Returns input_values (batch, samples) float32 zero-padded; attention_mask (batch, samples) int64, 1 on real
    samples, only when `attention_mask` (see surgery.needs_attention_mask); labels (batch, max_labels) int64 padded
    with -100; ids, a list of str. An item with a problem raises AudioError naming its manifest and line: leave
    such items out first where skipping them is wanted (as training does).
    """
    for item in items:
        if "problem" in item:
            problem = item["problem"]
            raise AudioError(f"[{problem.kind}] {problem.message}", path=problem.path, line=problem.line)
    max_samples = max(len(item["input_values"]) for item in items)
    max_labels = max(len(item["labels"]) for item in items)
    input_values = torch.zeros(len(items), max_samples, dtype=torch.float32)
    mask = torch.zeros(len(items), max_samples, dtype=torch.long)
    labels = torch.full((len(items), max_labels), LABEL_PAD, dtype=torch.long)
    for row, item in enumerate(items):
        samples = len(item["input_values"])
        input_values[row, :samples] = item["input_values"]
        mask[row, :samples] = 1
        labels[row, :len(item["labels"])] = torch.tensor(item["labels"], dtype=torch.long)
    batch: dict[str, Any] = {"input_values": input_values, "labels": labels, "ids": [item["id"] for item in items]}
    if attention_mask:
        batch["attention_mask"] = mask
    return batch


def inference_batches(num_samples: Sequence[int], *, padding_free: bool,
                      max_batch_samples: float = math.inf) -> list[list[int]]:
    """The forward passes of evaluation and inference (never training): indices, longest first (equal lengths in
    index order), cut into consecutive batches whose padded size, items x longest in samples, fits
    `max_batch_samples`; an item longer than that is a batch of its own.

    padding_free: for a model that takes no attention mask (surgery.needs_attention_mask), a batch holds only items
    of the same length, so none is padded: the group norm of the first convolution would take its statistics over
    the padding and the transformer would attend to it, and an utterance's result would then depend on the budget
    and on which other utterances share its batch. Lengths rarely repeat, so this is in practice one item per
    batch. A model with a mask gets length-sorted padded batches: the mask keeps the padding out of its results,
    up to float rounding.
    """
    batches: list[list[int]] = []
    for index in sorted(range(len(num_samples)), key=lambda i: (-num_samples[i], i)):
        if batches:
            batch = batches[-1]
            longest = num_samples[batch[0]]  # longest first: the batch's first item sets its padded length
            if (len(batch) + 1) * longest <= max_batch_samples and not (padding_free and num_samples[index] != longest):
                batch.append(index)
                continue
        batches.append([index])
    return batches


class DurationBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of dataset indices whose padded audio (batch size x longest duration) fits `max_batch_s` seconds,
    re-formed every epoch.

    Each epoch, the utterances are laid out in length order, each one's place moved by a random amount of up to
    REFORM_BATCHES batches' worth of audio either way, and the result is cut greedily into global batches, which
    are served in a random order: utterances of similar length share a batch in a different combination every
    epoch (as lhotse's DynamicBucketingSampler and the Trainer's group_by_length have it), while padding stays
    small. Both draws come from (`seed`, epoch) alone. With shuffle=False the plan is the plain one, the same in
    every epoch: length order cut greedily, served shortest first (for decoding).

    The global batches do not depend on `num_replicas`: process `rank` gets `batch[rank::num_replicas]` of each,
    and global batches with fewer items than processes are skipped by all, so every process takes the same number
    of steps. An utterance longer than `max_batch_s` forms a batch of its own.

    With `groups` (one per index) and `max_share` ({group: share}), the utterances of each capped group (share
    below 1; a pseudo-labelled manifest, say) hold at most that share of each epoch's seconds. Group g's budget is
    share_g of the seconds of the uncapped utterances plus its own in the epoch, i.e. share_g / (1 - share_g) x
    the uncapped seconds: so it holds at most share_g of the whole epoch whatever the other capped groups hold,
    and no group's budget depends on another's. When the whole group is over its budget, the epoch holds a subset
    of it (in_epoch): its utterances in a random order drawn from (`seed`, epoch, g) alone, each taken when it
    fits in what is left of the budget, so that a long utterance is as likely to be taken as a short one and a
    different subset trains each epoch. The epoch's utterances are then planned as above, the capped ones among
    the rest (with shuffle=False too: the plain plan of that epoch's subset). Without capped groups the plan is
    the one without groups. The subset is part of the global plan, so it holds whatever the number of processes;
    the number of batches may differ from epoch to epoch.

    Iterating to the end moves to the next epoch; set_epoch() jumps to one. state_dict() records the epoch and how
    many global batches have been handed out, so a resumed run yields exactly the remaining ones. It counts what the
    DataLoader fetched: with num_workers > 0 that includes prefetched batches.
    """

    def __init__(self, durations_s: Sequence[float], *, max_batch_s: float, shuffle: bool = True, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0, groups: Sequence[int] = (),
                 max_share: Mapping[int, float] | None = None):
        super().__init__()
        if max_batch_s <= 0:
            raise ValueError(f"max_batch_s must be positive, got {max_batch_s}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        max_share = {group: share for group, share in (max_share or {}).items() if share < 1}  # 1 caps nothing
        if max_share and len(groups) != len(durations_s):
            raise ValueError(f"{len(groups)} groups for {len(durations_s)} utterances")
        self.durations_s = np.asarray(durations_s, dtype=np.float64)
        self.max_batch_s = max_batch_s
        self.shuffle = shuffle
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.groups = np.asarray(groups if max_share else (), dtype=np.int64)
        self.max_share = max_share
        self.epoch = 0
        self._position = 0  # global batches of this epoch already handed out (or skipped)
        self._plans: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # epoch -> (indices served, bounds)
        # Length order, ties by index: the plain plan's order, and where each epoch's places start from.
        self._by_length = np.argsort(self.durations_s, kind="stable")

    def global_batches(self, epoch: int | None = None) -> list[list[int]]:
        """The global batches of `epoch` (default: the current one), in the order they are served, each before it
        is shared among the processes."""
        order, bounds = self._plan(self.epoch if epoch is None else epoch)
        return [batch.tolist() for batch in np.split(order, bounds[1:-1])] if len(order) else []

    def in_epoch(self, epoch: int | None = None) -> np.ndarray:
        """Which utterances the batches of `epoch` (default: the current one) hold, bool (utterances,): all of
        them unless a capped group is over its max_share, which then has a subset drawn for the epoch."""
        held = np.zeros(len(self.durations_s), dtype=bool)
        held[self._plan(self.epoch if epoch is None else epoch)[0]] = True
        return held

    @property
    def num_dropped(self) -> int:
        """Utterances of the current epoch never served because their global batch has fewer items than
        processes."""
        sizes = np.diff(self._plan(self.epoch)[1])
        return int(sizes[sizes < self.num_replicas].sum())

    def __len__(self) -> int:
        """Batches this process takes in the current epoch."""
        return int(np.count_nonzero(np.diff(self._plan(self.epoch)[1]) >= self.num_replicas))

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning; no-op when already in it (so a resumed run keeps its place)."""
        if epoch != self.epoch:
            self.epoch = epoch
            self._position = 0

    def __iter__(self) -> Iterator[list[int]]:
        if self._position >= len(self._plan(self.epoch)[1]) - 1:
            self.set_epoch(self.epoch + 1)
        for batch in self.batches(self.epoch, start=self._position):
            self._position += 1
            if batch is not None:
                yield batch
        self.set_epoch(self.epoch + 1)

    def batches(self, epoch: int, *, start: int = 0) -> Iterator[list[int]]:
        """This process's batches of `epoch` from its `start`-th global batch on, made one at a time as they are
        asked for (a plan's lists of a million indices never all at once), without moving the sampler; None for a
        global batch with fewer items than processes (which every process skips). Iterating the sampler gives
        these, Nones left out."""
        order, bounds = self._plan(epoch)
        for first, end in zip(bounds[start:-1].tolist(), bounds[start + 1:].tolist()):
            yield order[first + self.rank:end:self.num_replicas].tolist() if end - first >= self.num_replicas else None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self._position, "data": self._data_digest()}

    def load_state_dict(self, state: dict) -> None:
        if "data" in state:
            same = state["data"] == self._data_digest()
        elif self.max_share:
            # Its run capped each batch, not each epoch: there is no plan left to count its batches against.
            raise ValueError("the sampler state is from before max_share held per epoch; start the run afresh")
        else:  # from before batches were re-formed each epoch: it counts the batches of the plain plan
            same = state["num_batches"] == len(_cut_batches(self.durations_s, self._by_length,
                                                            max_batch_s=self.max_batch_s))
        if not same:
            raise ValueError("the sampler state is for other durations: the data or max_batch_s changed")
        self.epoch = state["epoch"]
        self._position = state["position"]

    def _plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(indices in the order served, bounds: int64 (batches + 1,), global batch k is indices[bounds[k]:
        bounds[k + 1]]) of `epoch`: arrays, not a list a batch (a million Python ints)."""
        if epoch not in self._plans:
            self._plans = {epoch: self._form_batches(epoch)}  # one epoch at a time
        return self._plans[epoch]

    def _form_batches(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        order = self._by_length
        if self.max_share:
            order = order[self._capped_subsets(epoch)[order]]
        if self.shuffle:
            # SeedSequence takes non-negative integers: a negative seed maps to its two's complement.
            rng = np.random.default_rng([self.seed % 2 ** 64, epoch])
            # Places in length order counted in batches' worth of audio, not in seconds: a move of REFORM_BATCHES
            # mixes about as many neighbours wherever the durations lie (padding grows only where they are sparse).
            # Utterances left out of the epoch are placed last (inf) and cut off; each utterance draws its move all
            # the same, so the draws, and the plan without caps, are those of the whole data.
            place = np.full(len(self.durations_s), np.inf)
            place[order] = np.cumsum(self.durations_s[order]) / self.max_batch_s
            place += rng.uniform(-REFORM_BATCHES, REFORM_BATCHES, len(place))
            order = np.argsort(place, kind="stable")[:len(order)]
        bounds = np.concatenate([np.zeros(1, dtype=np.int64),
                                 _cut_batches(self.durations_s, order, max_batch_s=self.max_batch_s)])
        if not self.shuffle:
            return order, bounds
        # the batches served in a random order: batch k of the plan at its place permutation.tolist().index(k)
        served = rng.permutation(len(bounds) - 1)
        sizes = np.diff(bounds)[served]
        new_bounds = np.zeros(len(bounds), dtype=np.int64)
        np.cumsum(sizes, out=new_bounds[1:])
        # each served batch's items: its first in the plan, then the next ones
        return order[np.repeat(bounds[:-1][served] - new_bounds[:-1], sizes) + np.arange(len(order))], new_bounds

    def _capped_subsets(self, epoch: int) -> np.ndarray:
        """Which utterances `epoch` holds, bool (utterances,): every uncapped one, and of each capped group g
        what fits in share_g / (1 - share_g) x the uncapped seconds, taken in a random order drawn from (seed,
        epoch, g)."""
        capped = np.isin(self.groups, list(self.max_share))
        uncapped_s = float(self.durations_s[~capped].sum())
        held = ~capped
        for group, share in sorted(self.max_share.items()):
            members = np.flatnonzero(self.groups == group)
            budget_s = share / (1 - share) * uncapped_s
            if self.durations_s[members].sum() > budget_s:
                rng = np.random.default_rng([self.seed % 2 ** 64, epoch, group])
                members = _fill_greedily(self.durations_s, rng.permutation(members), budget_s=budget_s)
            held[members] = True
        return held

    def _data_digest(self) -> str:
        """What fixes every epoch's plan but the seed: durations, caps, max_batch_s."""
        digest = hashlib.blake2b(self.durations_s.tobytes(), digest_size=16)
        digest.update(self.groups.tobytes())
        digest.update(repr((sorted(self.max_share.items()), self.max_batch_s)).encode())
        return digest.hexdigest()


def _fill_greedily(durations_s: np.ndarray, order: np.ndarray, *, budget_s: float) -> np.ndarray:
    """The indices of `order` that a greedy fill keeps, in that order: each is taken when the seconds taken so far
    plus its own fit `budget_s`, else passed over for the next ones.

    In arrays: a run of takes is where the running total (a cumsum, added up in the loop's order) stays within the
    budget; the one after it is passed over, and of the rest only those that fit what is left can still be taken."""
    taken: list[np.ndarray] = []
    total_s = 0.0
    while len(order := order[total_s + durations_s[order] <= budget_s]):  # those that still fit on their own
        running_s = np.cumsum(np.concatenate([[total_s], durations_s[order]]))[1:]
        size = int(np.searchsorted(running_s, budget_s, side="right"))  # >= 1: running_s never falls
        taken.append(order[:size])
        total_s = float(running_s[size - 1])
        order = order[size + 1:]
    return np.concatenate(taken) if taken else np.zeros(0, dtype=np.int64)


def _cut_batches(durations_s: np.ndarray, order: np.ndarray, *, max_batch_s: float) -> np.ndarray:
    """Where `order` is cut greedily into DurationBatchSampler's global batches: the end of each batch in it (int64
    (batches,)). A batch takes the next utterance while its items + 1 times the longest, that one included, fit
    max_batch_s; its first utterance whatever its length.

    One batch at a time, in arrays: (k + 1) x the longest of the first k + 1 never shrinks as k grows, so the
    utterances that fit are a prefix of those that follow, found in a window of them (doubled until the batch
    ends inside it)."""
    if len(order) == 0:
        return np.zeros(0, dtype=np.int64)
    durations = durations_s[order]
    ends: list[int] = []
    start, window = 0, 64
    while start < len(order):
        while True:
            longest = np.maximum.accumulate(durations[start:start + window])
            size = max(1, int(np.count_nonzero(np.arange(1, len(longest) + 1) * longest <= max_batch_s)))
            if size < len(longest) or start + len(longest) == len(order):
                break
            window *= 2
        start += size
        ends.append(start)
        window = max(64, 2 * size)
    return np.array(ends, dtype=np.int64)
