"""The CTC character vocabulary, stored as a Hugging Face Wav2Vec2CTCTokenizer, and the charset audit.

Token ids are list positions: 0 is the CTC blank ("[PAD]", which transformers also uses as pad token), then
"[UNK]", then the word delimiter "|", then the characters of the normalized training texts in code-point order.
"""

from __future__ import annotations

import itertools
import json
import os
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from speechxfer.errors import InputError, Problem, counted, decoded_text, output_folder
from speechxfer.manifest import read_manifest
from speechxfer.text import TextNormalizer, TextRejected, code_points

BLANK = "[PAD]"
UNK = "[UNK]"
WORD_DELIMITER = "|"
# Characters listed by name in CharsetAudit.warnings (all are in charset_audit.json)
_WARNED_CHARS = 8


@dataclass(frozen=True)
class Vocabulary:
    """Characters and special tokens of a CTC head; the index of a token is its id."""

    tokens: tuple[str, ...]
    blank: str = BLANK  # CTC blank, also the tokenizer's pad token
    unk: str = UNK
    delimiter: str = WORD_DELIMITER  # stands for the space between words

    def __post_init__(self) -> None:
        duplicates = [t for t, n in Counter(self.tokens).items() if n > 1]
        if duplicates:
            raise ValueError(f"vocabulary tokens repeat: {duplicates}")
        for name in ("blank", "unk", "delimiter"):
            if getattr(self, name) not in self.tokens:
                raise ValueError(f"vocabulary lacks its {name} token {getattr(self, name)!r}")

    @cached_property
    def blank_id(self) -> int:
        return self.tokens.index(self.blank)

    @cached_property
    def unk_id(self) -> int:
        return self.tokens.index(self.unk)

    @cached_property
    def delimiter_id(self) -> int:
        return self.tokens.index(self.delimiter)

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> Vocabulary:
        """Build from normalized texts: blank, unk, delimiter, then every non-space character, sorted."""
        chars: set[str] = set()
        for text in texts:
            chars.update(text)
        chars.discard(" ")
        if WORD_DELIMITER in chars:
            raise ValueError(f"the texts hold the word delimiter {WORD_DELIMITER!r}; normalize it away first")
        return cls((BLANK, UNK, WORD_DELIMITER, *sorted(chars)))

    def encode(self, text: str) -> list[int]:
        """Ids of a normalized text, one per character: " " becomes the delimiter, unknown characters unk."""
        return self.encode_all([text]).tolist()

    def encode_all(self, texts: Iterable[str]) -> np.ndarray:
        """The ids `encode` gives each text, of all texts end to end: (total characters,), in the smallest signed
        integer type that holds every id (a million transcripts' labels in a few bytes a character)."""
        codes = code_points("".join(texts))
        table = self._code_ids
        if len(table) <= np.iinfo(codes.dtype).max:  # a code point past the table: its last entry, unk
            codes = np.minimum(codes, len(table) - 1)
        return table[codes]

    @cached_property
    def _code_ids(self) -> np.ndarray:
        """encode_all's table, code point -> id: the one-character tokens, " " the delimiter, unk elsewhere (the
        last entry, for every code point beyond)."""
        chars = {ord(t): i for i, t in enumerate(self.tokens) if len(t) == 1} | {ord(" "): self.delimiter_id}
        table = np.full(max(chars) + 2, self.unk_id, dtype=np.min_scalar_type(-len(self.tokens)))
        table[list(chars)] = list(chars.values())
        return table

    def decode(self, ids: Sequence[int]) -> str:
        """Text of label ids (not a CTC path: repeats stay); blanks (padding) are dropped, the delimiter is a space."""
        self._check(ids)
        return " ".join("".join(" " if i == self.delimiter_id else self.tokens[i]
                                for i in map(int, ids) if i != self.blank_id).split())

    def _check(self, ids: Sequence[int]) -> None:
        bad = [int(i) for i in ids if not 0 <= int(i) < len(self.tokens)]
        if bad:
            raise ValueError(f"token id {bad[0]} outside the vocabulary of {len(self.tokens)}")

    def decode_ctc(self, ids: Sequence[int]) -> str:
        """Text of a frame-level CTC path (frames,): collapse repeats, drop blanks, the delimiter becomes a space."""
        pieces = [" " if i == self.delimiter_id else self.tokens[i] for i in self.collapse_ctc(ids)]
        return " ".join("".join(pieces).split())

    def collapse_ctc(self, ids: Sequence[int]) -> list[int]:
        """Token ids a frame-level CTC path (frames,) emits: repeats collapsed, then blanks dropped."""
        self._check(ids)
        emitted = []
        previous = None
        for i in map(int, ids):
            if i != previous and i != self.blank_id:
                emitted.append(i)
            previous = i
        return emitted

    @cached_property
    def _ids(self) -> dict[str, int]:
        return {t: i for i, t in enumerate(self.tokens)}

    def save(self, directory: str | os.PathLike, *, lang: str | None = None,
             other_languages: Mapping[str, Mapping[str, int]] | None = None) -> None:
        """Write vocab.json, tokenizer_config.json and special_tokens_map.json, as Wav2Vec2CTCTokenizer reads them.

        With `lang`, vocab.json holds one vocabulary per language as MMS's does ({lang: {token: id}}: this one
        beside `other_languages`), and the tokenizer's target_lang is `lang`.
        """
        from transformers import Wav2Vec2CTCTokenizer

        directory = output_folder(directory)
        vocab_file = directory / "vocab.json"
        table = self._ids if lang is None else {**(other_languages or {}), lang: self._ids}
        vocab_file.write_text(json.dumps(table, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        # No bos/eos: they would become extra ids beyond the CTC head; no lowercasing: text.py already did it.
        tokenizer = Wav2Vec2CTCTokenizer(str(vocab_file), unk_token=self.unk, pad_token=self.blank,
                                         word_delimiter_token=self.delimiter, bos_token=None, eos_token=None,
                                         do_lower_case=False, target_lang=lang)
        tokenizer.save_pretrained(directory)
        # transformers 5 no longer writes this file; older releases (and other tools) look for it.
        special = {"pad_token": self.blank, "unk_token": self.unk}
        (directory / "special_tokens_map.json").write_text(json.dumps(special, ensure_ascii=False, indent=1) + "\n",
                                                           encoding="utf-8")

    @classmethod
    def load(cls, directory: str | os.PathLike, *, target_lang: str | None = None) -> Vocabulary:
        """Read vocab.json (ours or any Hugging Face CTC model folder's), with the special tokens its config names.

        target_lang picks one language of a multi-language vocab.json (as MMS checkpoints ship); None: the
        tokenizer's own target_lang (tokenizer_config.json), the language of the adapter in model.safetensors.
        """
        directory = Path(directory)
        vocab_file = directory / "vocab.json"
        vocab = read_json_object(vocab_file)
        config = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            if (directory / name).is_file():
                config |= {k: v for k, v in read_json_object(directory / name).items() if isinstance(v, str)}
        if vocab and all(isinstance(v, dict) for v in vocab.values()):
            target_lang = target_lang if target_lang is not None else config.get("target_lang")
            if target_lang not in vocab:
                raise InputError(f"vocab.json holds one vocabulary per language; choose target_lang from "
                                 f"{', '.join(sorted(vocab))}", path=vocab_file)
            vocab = vocab[target_lang]
        if not vocab or not all(isinstance(k, str) and isinstance(v, int) for k, v in vocab.items()):
            raise InputError("expected a mapping of token to integer id", path=vocab_file)
        if sorted(vocab.values()) != list(range(len(vocab))):
            raise InputError(f"token ids must be 0..{len(vocab) - 1} without gaps", path=vocab_file)
        tokens = tuple(sorted(vocab, key=vocab.__getitem__))
        try:
            return cls(tokens, blank=config.get("pad_token", BLANK), unk=config.get("unk_token", UNK),
                       delimiter=config.get("word_delimiter_token", WORD_DELIMITER))
        except ValueError as err:
            raise InputError(str(err), path=vocab_file) from None


def language_vocabularies(directory: str | os.PathLike) -> dict[str, dict[str, int]]:
    """{language: {token: id}} of a folder whose vocab.json holds one vocabulary per language (MMS's layout);
    empty when the folder has no vocab.json or a single vocabulary."""
    vocab_file = Path(directory) / "vocab.json"
    if not vocab_file.is_file():
        return {}
    table = read_json_object(vocab_file)
    return table if table and all(isinstance(v, dict) for v in table.values()) else {}


def read_json_object(path: str | os.PathLike) -> dict:
    """A JSON file holding an object (a model folder's vocab.json, config.json, ...); InputError naming the file
    (and the line, for bad JSON) when it cannot be read, is not UTF-8 JSON, or holds something else."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise InputError(f"cannot read: {err.strerror}", path=path) from None
    text = decoded_text(data, path)
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as err:  # RecursionError: nested 1000 deep
        raise InputError(f"not valid JSON: {err}", path=path, line=getattr(err, "lineno", None)) from None
    if not isinstance(value, dict):
        raise InputError(f"expected a JSON object, got {type(value).__name__}", path=path)
    return value


@dataclass(frozen=True)
class UnseenCharacter:
    """A character of a dev or test split that the training split never shows."""

    split: str
    char: str
    name: str  # Unicode character name, or U+XXXX when it has none
    count: int  # occurrences in that split
    utterances: int  # utterances of that split holding it
    example_ids: tuple[str, ...]  # up to five of them


@dataclass(frozen=True)
class CharsetAudit:
    """What the vocabulary built from train will not be able to write in the other splits."""

    train_chars: dict[str, int]  # character -> count in the normalized training texts (spaces excluded)
    unseen: list[UnseenCharacter]  # by split, then most frequent first
    coverage: dict[str, float] = field(default_factory=dict)  # split -> share of its characters seen in train

    def to_dict(self) -> dict:
        return {"train_chars": self.train_chars, "coverage": self.coverage,
                "unseen": [vars(u) | {"example_ids": list(u.example_ids)} for u in self.unseen]}

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), ensure_ascii=False, indent=1) + "\n", encoding="utf-8")

    def warnings(self) -> list[str]:
        """One line a split whose references hold characters the train transcripts never do: the model cannot
        write them, so each costs a word error however well it trains."""
        lines = []
        for split, share in self.coverage.items():
            chars = [u for u in self.unseen if u.split == split]
            if chars:
                listed = ", ".join(f"{u.char!r} ({u.count})" for u in chars[:_WARNED_CHARS])
                more = f" and {len(chars) - _WARNED_CHARS} more" if len(chars) > _WARNED_CHARS else ""
                utterances = max(u.utterances for u in chars)
                lines.append(f"{split}: {counted(len(chars), 'character')} that no train transcript holds, so the "
                             f"model cannot write them: {listed}{more} ({1 - share:.1%} of {split}'s characters, "
                             f"in {counted(utterances, 'utterance')} or more)")
        return lines

    def format_table(self) -> str:
        """A plain-text table of unseen characters, one row each, with the splits' coverage."""
        lines = [f"{len(self.train_chars)} characters in train"]
        lines += [f"{split}: {share:.2%} of characters seen in train" for split, share in self.coverage.items()]
        if not self.unseen:
            lines.append("every dev/test character appears in train")
            return "\n".join(lines)
        lines.append(f"{'split':<6} {'char':<5} {'name':<40} {'count':>6} {'utts':>5}  examples")
        for u in self.unseen:
            lines.append(f"{u.split:<6} {u.char!r:<5} {u.name[:40]:<40} {u.count:>6} {u.utterances:>5}  "
                         f"{', '.join(u.example_ids)}")
        return "\n".join(lines)


def character_counts(texts: Iterable[str]) -> Counter[str]:
    """How often each character but the space occurs in `texts`: code points counted by numpy a block of texts at a
    time (a Counter updated a text at a time takes ~4 us a text, seconds for a million)."""
    counts = np.zeros(0, dtype=np.int64)  # by code point
    texts = iter(texts)
    while block := list(itertools.islice(texts, 1 << 16)):
        found = np.bincount(code_points("".join(block)))
        size = max(len(found), len(counts))
        counts = np.pad(counts, (0, size - len(counts))) + np.pad(found, (0, size - len(found)))
    return Counter({chr(code): int(counts[code]) for code in np.flatnonzero(counts).tolist() if code != ord(" ")})


# Texts encode_texts normalizes and encodes at once.
_ENCODE_BLOCK = 1 << 16


class EncodedTexts:
    """Texts normalized once, each character of them held as a small integer (its provisional id, in the order the
    characters were first met): what training counts its vocabulary's characters from (`character_counts`) and
    what filter_utterances turns into label ids once the vocabulary is known (`take_labels`). So a million training
    texts are normalized once before the first update, and their characters take a byte or two each.

    `starts`: int64 (texts + 1,), text k's characters are [starts[k], starts[k + 1]) (none when rejected);
    `rejected`: bool (texts,), the normalizer rejected text k (TextRejected); `character_counts`: how often each
    character but the space occurs in the texts not rejected (vocabulary.character_counts of them)."""

    def __init__(self, ids: np.ndarray, chars: str, starts: np.ndarray, rejected: np.ndarray,
                 character_counts: Counter[str]):
        self._ids: np.ndarray | None = ids  # provisional id of each character, end to end
        self._chars = chars  # provisional id -> character
        self.starts = starts
        self.rejected = rejected
        self.character_counts = character_counts

    def __len__(self) -> int:
        return len(self.rejected)

    def take_labels(self, vocab: Vocabulary) -> np.ndarray:
        """The label ids of every text end to end, as vocab.encode_all gives them (text k's at [starts[k],
        starts[k + 1])), in vocab.encode_all's type. Made in place of the provisional ids where the two types
        are as wide (a second array as long would be hundreds of MB for a million texts): once only."""
        if self._ids is None:
            raise RuntimeError("the labels of these texts were already taken")
        ids, self._ids = self._ids, None
        to_label = vocab.encode_all([self._chars])  # provisional id -> label id
        if ids.dtype.itemsize != to_label.dtype.itemsize:
            return to_label[ids]
        labels = ids.view(to_label.dtype)
        step = 1 << 22  # a slice at a time: the lookup's result is a temporary array as long
        for start in range(0, len(ids), step):
            labels[start:start + step] = to_label[ids[start:start + step]]
        return labels


def encode_texts(texts: Sequence[str], normalizer: TextNormalizer) -> EncodedTexts:
    """Normalize each of `texts` once and keep its characters as EncodedTexts: a text the normalizer rejects is
    marked and holds none (normalized_references, for dev and test, says why each was left out)."""
    chars: list[str] = []  # provisional id -> character
    counts = np.zeros(0, dtype=np.int64)  # by provisional id
    # Provisional ids in the type a vocabulary of these characters and its three special tokens takes
    # (Vocabulary._code_ids), so that take_labels can write the labels over them.
    to_id = np.full(0, -1, dtype=np.int8)  # code point -> provisional id, -1 where none yet
    # Room for the texts as written: normalization seldom lengthens a text (NFD and NFKC can), and pages never
    # written take no memory.
    ids = np.empty(sum(map(len, texts)) + 1, dtype=to_id.dtype)
    filled = 0
    lengths = np.zeros(len(texts), dtype=np.int64)  # of each normalized text
    rejected = np.zeros(len(texts), dtype=bool)
    for first in range(0, len(texts), _ENCODE_BLOCK):
        normalized = normalizer.normalize_all(texts[first:first + _ENCODE_BLOCK])  # None: rejected
        if None in normalized:
            rejected[first:first + len(normalized)] = [text is None for text in normalized]
            normalized = [text or "" for text in normalized]
        lengths[first:first + len(normalized)] = list(map(len, normalized))
        codes = code_points("".join(normalized))
        if len(codes) and codes.max() >= len(to_id):
            to_id = np.pad(to_id, (0, int(codes.max()) + 1 - len(to_id)), constant_values=-1)
        present = np.bincount(codes, minlength=len(to_id))
        new = np.flatnonzero((present > 0) & (to_id < 0))
        if len(new):
            wide = np.min_scalar_type(-(len(chars) + len(new) + 3))
            if wide.itemsize > to_id.dtype.itemsize:
                to_id, ids = to_id.astype(wide), ids.astype(wide)
            to_id[new] = np.arange(len(chars), len(chars) + len(new))
            chars += map(chr, new.tolist())
            counts = np.pad(counts, (0, len(new)))
        counts[to_id[present > 0]] += present[present > 0]
        if filled + len(codes) > len(ids):  # grown by normalization: room for twice as much, or this block
            ids = np.concatenate([ids[:filled], np.empty(max(filled, len(codes)), ids.dtype)])
        ids[filled:filled + len(codes)] = to_id[codes]
        filled += len(codes)
    starts = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    character_counts = Counter({c: n for c, n in zip(chars, counts.tolist()) if c != " "})
    return EncodedTexts(ids[:filled], "".join(chars), starts, rejected, character_counts)


def charset_audit(train_chars: Mapping[str, int], others: Mapping[str, Sequence[tuple[str, str]]]) -> CharsetAudit:
    """Compare characters of other splits (split -> [(utterance id, normalized text)]) with the training texts'
    (character_counts of them)."""
    unseen: list[UnseenCharacter] = []
    coverage: dict[str, float] = {}
    for split, items in others.items():
        counts: Counter[str] = Counter()
        ids: dict[str, list[str]] = {}
        total = 0
        for utterance_id, text in items:
            chars = [c for c in text if c != " "]
            total += len(chars)
            missing = [c for c in chars if c not in train_chars]
            counts.update(missing)
            for c in dict.fromkeys(missing):
                ids.setdefault(c, []).append(utterance_id)
        coverage[split] = 1.0 - sum(counts.values()) / total if total else 1.0
        unseen += [UnseenCharacter(split, c, unicodedata.name(c, f"U+{ord(c):04X}"), n, len(ids[c]),
                                   tuple(ids[c][:5]))
                   for c, n in sorted(counts.items(), key=lambda item: (-item[1], item[0]))]
    return CharsetAudit(dict(sorted(train_chars.items())), unseen, coverage)


def vocabulary_from_manifests(train: str | os.PathLike, *, normalizer: TextNormalizer,
                              others: Mapping[str, str | os.PathLike] | None = None,
                              ) -> tuple[Vocabulary, CharsetAudit, list[Problem]]:
    """Vocabulary of the normalized train manifest, and the audit of other splits (split -> manifest path).

    Bad manifest rows and texts the normalizer rejects are skipped and returned as Problems.
    """
    problems: list[Problem] = []
    normalized: dict[str, list[tuple[str, str]]] = {}
    for split, path in {"train": train, **(others or {})}.items():
        utterances, bad = read_manifest(path)
        problems += bad
        items = []
        for u in utterances:
            try:
                items.append((u.id, normalizer(u.text)))
            except TextRejected as err:
                problems.append(Problem(os.fspath(path), None, "rejected_text", str(err), u.id))
        normalized[split] = items
    train_texts = [text for _, text in normalized.pop("train")]
    if not any(train_texts):
        raise InputError("no usable training text after normalization", path=train)
    try:
        vocabulary = Vocabulary.from_texts(train_texts)
    except ValueError as err:
        raise InputError(str(err), path=train) from None
    return vocabulary, charset_audit(character_counts(train_texts), normalized), problems
