"""CTC decoding of a model's log posteriors into text with word timestamps: greedy, or beam search with an
n-gram language model (torchaudio's flashlight decoder).

Both decoders take audio in pieces (`stream()`: `step` each window's frames in order, then `finish`), so a file of
any length is decoded while keeping only 8 bytes per frame, never the full (frames, vocab) posteriors.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch

from speechxfer.errors import InputError, SpeechxferError
from speechxfer.vocabulary import Vocabulary

# Words of an ARPA file that are markers, not words to spell.
_ARPA_MARKERS = frozenset({"<s>", "</s>", "<unk>"})
# The grid `lm tune` and a recipe's `lm:` section search by default: LM weights x word scores of BeamSearchOptions.
DEFAULT_LM_WEIGHTS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)
DEFAULT_WORD_SCORES = (-1.0, 0.0, 1.0, 2.0)


@dataclass(frozen=True)
class WordTiming:
    """One decoded word and where the model emitted it."""

    word: str
    start_s: float  # start of the word's first emitted frame
    end_s: float  # end of its last emitted frame
    confidence: float  # mean top posterior over the frames that emitted the word's letters, in (0, 1]


@dataclass(frozen=True)
class Transcript:
    """The decoded text of one utterance or file, and its words with times."""

    text: str  # words joined by single spaces
    words: tuple[WordTiming, ...]
    # How sure the decoder is of the whole text. Greedy: the mean top posterior over the frames that emit a token
    # (letters and word delimiters), in [0, 1]; 0 when every frame is blank. Blank frames are left out because
    # they are mostly silence and pauses, which the model marks blank with near certainty: averaged in, a long
    # pause would raise the confidence of an utterance whose letters are guesses. Beam search: the best
    # hypothesis's score (acoustic log posterior + lm_weight x LM log probability + word_score x words) per
    # frame, a log-domain number (at most 0 when word_score <= 0); -inf when there is no hypothesis.
    confidence: float = 0.0


class DecoderStream(Protocol):
    def step(self, log_probs: torch.Tensor) -> None: ...

    def finish(self) -> Transcript: ...


class Decoder(Protocol):
    def stream(self) -> DecoderStream: ...


def decode_batch(decoder: Decoder, log_probs: torch.Tensor, lengths: torch.Tensor) -> list[Transcript]:
    """Decode a padded batch. log_probs: (batch, frames, vocab) log posteriors on the CPU; lengths: (batch,) frames."""
    transcripts = []
    for item, length in zip(log_probs, lengths.tolist()):
        stream = decoder.stream()
        stream.step(item[:length])
        transcripts.append(stream.finish())
    return transcripts


class _FramePath:
    """Per-frame argmax token and its posterior, gathered window by window (8 bytes a frame)."""

    def __init__(self) -> None:
        self._ids: list[np.ndarray] = []
        self._probs: list[np.ndarray] = []

    def add(self, log_probs: torch.Tensor) -> None:
        best, ids = log_probs.max(dim=-1)
        self._ids.append(ids.to(torch.int32).numpy())
        self._probs.append(best.exp().numpy())

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        ids = np.concatenate(self._ids) if self._ids else np.zeros(0, np.int32)
        probs = np.concatenate(self._probs) if self._probs else np.zeros(0, np.float32)
        return ids, probs


class GreedyDecoder:
    """Best path decoding: argmax per frame; words and their times come from the frames of that path."""

    def __init__(self, vocabulary: Vocabulary, *, frame_s: float):
        self.vocabulary = vocabulary
        self.frame_s = frame_s  # seconds between output frames (the feature encoder's total stride)

    def stream(self) -> GreedyStream:
        return GreedyStream(self)


class GreedyStream:
    """One greedy decoding in progress; `step` with consecutive frames (frames, vocab), then `finish`."""

    def __init__(self, decoder: GreedyDecoder):
        self._decoder = decoder
        self._path = _FramePath()

    def step(self, log_probs: torch.Tensor) -> None:
        self._path.add(log_probs)

    def finish(self) -> Transcript:
        ids, probs = self._path.arrays()
        vocabulary = self._decoder.vocabulary
        emitting = np.flatnonzero(ids != vocabulary.blank_id)
        words = []
        for frames in _word_frames(emitting.tolist(), ids[emitting].tolist(), delimiter_id=vocabulary.delimiter_id):
            # the word's stretch of the path, blanks included: they separate repeated letters
            text = vocabulary.decode_ctc(ids[frames[0]: frames[-1] + 1])
            if text:
                words.append(_word_timing(text, frames, probs, frame_s=self._decoder.frame_s))
        confidence = float(probs[emitting].mean()) if len(emitting) else 0.0
        return Transcript(" ".join(w.word for w in words), tuple(words), confidence)


def _word_frames(frames: list[int], tokens: list[int], *, delimiter_id: int) -> list[list[int]]:
    """The frames of each word's letters, from the frames that emit a token (ascending) and their tokens: words
    end at the word delimiter."""
    words: list[list[int]] = [[]]
    for frame, token in zip(frames, tokens):
        if token == delimiter_id:
            if words[-1]:
                words.append([])
        else:
            words[-1].append(frame)
    return [w for w in words if w]


def _word_timing(word: str, frames: list[int], probs: np.ndarray, *, frame_s: float) -> WordTiming:
    """A word from its first to the end of its last letter frame; confidence: the mean posterior of those frames."""
    return WordTiming(word, frames[0] * frame_s, (frames[-1] + 1) * frame_s, float(probs[frames].mean()))


@dataclass(frozen=True)
class BeamSearchOptions:
    """Lexicon beam search with an n-gram LM (flashlight's decoder, through torchaudio)."""

    lm_path: str  # ARPA file or KenLM binary
    lexicon_path: str | None = None  # lines `word<TAB>letters separated by spaces`; None: the ARPA's unigrams
    beam_size: int = 50  # hypotheses kept after each frame
    lm_weight: float = 2.0  # weight of the LM log probability against the acoustic score
    word_score: float = 0.0  # added per word: positive favours more, shorter words

    def __post_init__(self) -> None:
        if isinstance(self.beam_size, bool) or not isinstance(self.beam_size, int) or self.beam_size < 1:
            raise InputError(f"beam_size (--beam-size) must be a whole number of at least 1, got {self.beam_size!r}")
        for name in ("lm_weight", "word_score"):
            if not math.isfinite(getattr(self, name)):
                raise InputError(f"{name} (--{name.replace('_', '-')}) must be a finite number, "
                                 f"got {getattr(self, name)!r}")


class BeamSearchDecoder:
    """Beam search over the lexicon's words, scored by the acoustic model plus the weighted n-gram LM.

    The flashlight decoder keeps one search state, so streams of one decoder must not interleave: finish one
    before starting the next.
    """

    def __init__(self, vocabulary: Vocabulary, options: BeamSearchOptions, *, frame_s: float):
        ctc_decoder = import_ctc_decoder()
        self.vocabulary = vocabulary
        self.options = options
        self.frame_s = frame_s
        if not os.path.isfile(options.lm_path):
            raise InputError("a folder, not a language model file" if os.path.isdir(options.lm_path) else
                             "no such language model file", path=options.lm_path)
        kind = lm_format(options.lm_path)
        if kind is None:  # a text corpus, most often: it is what an LM is built from
            raise InputError("not an ARPA file or a KenLM binary (to build an ARPA model from text: "
                             "speechxfer lm build TEXT OUT.arpa)", path=options.lm_path)
        if options.lexicon_path is not None:
            entries = read_lexicon(options.lexicon_path, vocabulary)
            self.skipped_words = 0
        else:
            if kind != "arpa":
                raise InputError(f"{'a KenLM binary' if kind == 'kenlm' else 'a compressed file'} holds no readable "
                                 "word list: give --lexicon", path=options.lm_path)
            entries, self.skipped_words = lexicon_from_arpa(options.lm_path, vocabulary)
        if not entries:
            raise InputError("no word of the lexicon can be spelled with the model's vocabulary",
                             path=options.lexicon_path or options.lm_path)
        self.lexicon_size = len(entries)
        with tempfile.TemporaryDirectory() as tmp:
            lexicon_file = Path(tmp, "lexicon.txt")
            lexicon_file.write_text("".join(f"{word}\t{' '.join(letters)} {vocabulary.delimiter}\n"
                                            for word, letters in entries.items()), encoding="utf-8")
            try:
                with _quiet_stderr():
                    self._decoder = ctc_decoder(
                        lexicon=str(lexicon_file), tokens=list(vocabulary.tokens), lm=options.lm_path,
                        beam_size=options.beam_size, lm_weight=options.lm_weight, word_score=options.word_score,
                        blank_token=vocabulary.blank, sil_token=vocabulary.delimiter, unk_word="<unk>")
            except RuntimeError as err:  # KenLM's load errors (bad ARPA, wrong binary) arrive as RuntimeError
                raise InputError(f"cannot load the language model: {str(err).splitlines()[-1]}",
                                 path=options.lm_path) from None

    def stream(self) -> BeamSearchStream:
        return BeamSearchStream(self)


class BeamSearchStream:
    """One beam search in progress; `step` with consecutive frames (frames, vocab), then `finish`."""

    def __init__(self, decoder: BeamSearchDecoder):
        self._owner = decoder
        self._path = _FramePath()
        decoder._decoder.decode_begin()

    def step(self, log_probs: torch.Tensor) -> None:
        self._path.add(log_probs)
        self._owner._decoder.decode_step(log_probs.float().contiguous())

    def finish(self) -> Transcript:
        flashlight = self._owner._decoder
        flashlight.decode_end()
        hypotheses = flashlight.get_final_hypothesis()
        if not hypotheses:
            return Transcript("", (), -math.inf)
        best = hypotheses[0]
        _, probs = self._path.arrays()
        delimiter = self._owner.vocabulary.delimiter_id
        # flashlight pads its path with one frame at the start: timestep t is frame t - 1
        emitted = [(frame, token) for frame, token in zip((best.timesteps - 1).tolist(), best.tokens.tolist())
                   if token == delimiter or 0 <= frame < len(probs)]
        groups = _word_frames([f for f, _ in emitted], [t for _, t in emitted], delimiter_id=delimiter)
        words = tuple(_word_timing(word, g, probs, frame_s=self._owner.frame_s) for word, g in zip(best.words, groups))
        return Transcript(" ".join(best.words), words, float(best.score) / max(1, len(probs)))


def make_decoder(vocabulary: Vocabulary, *, frame_s: float, beam: BeamSearchOptions | None = None) -> Decoder:
    """The greedy decoder, or beam search with an LM when `beam` is given."""
    if beam is None:
        return GreedyDecoder(vocabulary, frame_s=frame_s)
    return BeamSearchDecoder(vocabulary, beam, frame_s=frame_s)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2: KenLM writes its loading progress bar there (its errors still raise)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def import_ctc_decoder():
    try:
        import flashlight.lib.text.decoder  # noqa: F401  (torchaudio's ctc_decoder binds to it lazily)
        from torchaudio.models.decoder import ctc_decoder
    except ImportError:
        raise SpeechxferError("beam search with an n-gram LM needs flashlight-text: pip install 'speechxfer[lm]'") \
            from None
    return ctc_decoder


# How every KenLM binary starts (kenlm lm/binary_format.cc: kMagicBeforeVersion, and kMagicIncomplete of a build
# that failed), and the compressed files KenLM opens when it is built with zlib, bzip2 and lzma: gzip, bzip2, xz.
_KENLM_MAGIC = b"mmap lm http://kheafield.com/code"
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")


def lm_format(path: str | os.PathLike) -> Literal["arpa", "kenlm", "compressed"] | None:
    """What an n-gram LM file is: "arpa" (text, first non-blank line `\\data\\`), "kenlm" (a KenLM binary),
    "compressed" (gzip, bzip2 or xz: KenLM reads a compressed ARPA file), or None (anything else)."""
    with open(path, "rb") as f:
        head = f.read(len(_KENLM_MAGIC))
        if head.startswith(_KENLM_MAGIC):
            return "kenlm"
        if head.startswith(_COMPRESSED_MAGIC):
            return "compressed"
        f.seek(0)
        for line in f:
            if line.strip():
                return "arpa" if line.strip() == b"\\data\\" else None
    return None


def lexicon_from_arpa(path: str | os.PathLike, vocabulary: Vocabulary) -> tuple[dict[str, list[str]], int]:
    """Spell each unigram of an ARPA file with the vocabulary's characters: ({word: letters}, words skipped
    because a character is not in the vocabulary)."""
    letters = set(vocabulary.tokens) - {vocabulary.blank, vocabulary.unk, vocabulary.delimiter}
    entries: dict[str, list[str]] = {}
    skipped = 0
    in_unigrams = False
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            line = line.strip()
            if line == "\\1-grams:":
                in_unigrams = True
                continue
            if not in_unigrams or not line:
                continue
            if line.startswith("\\"):
                break
            fields = line.split()
            if len(fields) < 2:
                raise InputError(f"malformed unigram line {line!r}", path=path, line=number)
            word = fields[1]
            if word in _ARPA_MARKERS:
                continue
            if set(word) <= letters:
                entries[word] = list(word)
            else:
                skipped += 1
    if not in_unigrams:
        raise InputError("no \\1-grams: section", path=path)
    return entries, skipped


def read_lexicon(path: str | os.PathLike, vocabulary: Vocabulary) -> dict[str, list[str]]:
    """Read `word<TAB or space>letter letter ...` lines (a trailing word delimiter is optional); every letter
    must be a token of the vocabulary."""
    tokens = set(vocabulary.tokens)
    entries: dict[str, list[str]] = {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read lexicon: {err}", path=path) from None
    for number, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields:
            continue
        word, spelling = fields[0], fields[1:]
        if spelling and spelling[-1] == vocabulary.delimiter:
            spelling = spelling[:-1]
        if not spelling:
            raise InputError(f"word {word!r} has no spelling", path=path, line=number)
        unknown = [t for t in spelling if t not in tokens]
        if unknown:
            raise InputError(f"spelling of {word!r} uses tokens outside the model's vocabulary: {unknown}",
                             path=path, line=number)
        entries[word] = spelling
    return entries

